"""Content hashes that decide whether a lifecycle step has anything to do in `pulumi up`.

A step's resource carries its fingerprint as an input; an unchanged fingerprint (and address,
and VM id) means Pulumi's diff finds nothing and the step does not run. What goes in:

- configuration: the roles of ansible/host.yml (file contents), the stack's host_config and
  the host's own spec;
- deployment: the serving_stack role, the serving spec and ports, the served model specs;
  the registry versions their sources select (an alias moved in MLflow) are compared by the
  deployment provider's diff (`registry_selection`), which runs where the registry is reached;
- gate: the gates and their settings (a new deployment reruns the gate through its `after`).

Fingerprints are computed offline, by the program: no network, also under Pulumi's mocks.

No secret goes in: secrets reach the steps through the environment of the `pulumi` process.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gpufleet.lifecycle.environment import Environment
from gpufleet.registry.client import RegistryError, registered_model_name

ANSIBLE_DIR = Path(__file__).resolve().parents[2] / "ansible"
SERVING_ROLE, SERVING_PLAYBOOK = "roles/serving_stack/", "playbooks/serving_stack.yml"


def _digest(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def tree_digest(files: Iterable[Path], root: Path) -> str:
    """sha256 over the relative names and contents of `files`."""
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def _ansible_files(*, serving: bool) -> list[Path]:
    """The serving_stack role and its playbook, or everything else of ansible/host.yml."""
    serving_parts = (SERVING_ROLE, SERVING_PLAYBOOK)
    files = [path for path in ANSIBLE_DIR.rglob("*") if path.is_file() and path.name != "site.yml"]
    return [
        path
        for path in files
        if path.relative_to(ANSIBLE_DIR).as_posix().startswith(serving_parts) == serving
    ]


def configuration_fingerprint(environment: Environment, host: str) -> str:
    return _digest(
        tree_digest(_ansible_files(serving=False), ANSIBLE_DIR),
        environment.spec.host_config.model_dump(mode="json"),
        environment.host(host).model_dump(mode="json", exclude={"address"}),
    )


def deployment_fingerprint(environment: Environment) -> str:
    spec = environment.spec
    return _digest(
        tree_digest(_ansible_files(serving=True), ANSIBLE_DIR),
        spec.serving.model_dump(mode="json") if spec.serving else None,
        spec.ports.model_dump(mode="json"),
        [item.spec_hash for item in environment.models],
    )


def gate_fingerprint(environment: Environment) -> str:
    spec = environment.spec
    return _digest(
        spec.gates,
        spec.load_gate.model_dump(mode="json"),
        [
            item.spec.objectives.model_dump(mode="json") if item.spec.objectives else None
            for item in environment.models
        ],
    )


def registry_selection(environment: Environment) -> dict[str, str]:
    """Each registry-sourced model's source and the version it selects now; a registry that
    cannot answer is recorded as such (the deployment then runs, and says why it fails)."""
    sources = {
        item.spec.name: item.spec.source or ""
        for item in environment.models
        if registered_model_name(item.spec.source or "")
    }
    if not sources:
        return {}
    try:
        registry = environment.registry()
        return {
            name: f"{source} -> {registry.resolve(source).version}"
            for name, source in sources.items()
        }
    except RegistryError as error:
        return {"unresolved": str(error).splitlines()[0]}
