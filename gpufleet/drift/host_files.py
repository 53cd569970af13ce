"""Part of the triton layer on hosts: the model files a host's Triton serves, against the sha256
their lineage manifests record. Read over SSH (testinfra, as the host gate reaches hosts) with
one `sha256sum` per version directory; the manifests are the controller's (the repository the
deploy step filled and copied to the host).

    checked, items = check_host_files(environment, "gpu-a", {"tabular_mlp": [1]}, repair)
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any

from generators.registry_repository import LINEAGE_FILE, Lineage
from gpufleet.drift.items import DriftItem
from gpufleet.lifecycle.environment import Environment
from validation.gpu_host import gpu_host_targets
from validation.host import connect

EXPECTED = "files as their lineage manifest lists them (sha256)"


def check_host_files(
    environment: Environment,
    host: str,
    versions: Mapping[str, Sequence[int]],
    repair: str,
) -> tuple[list[str], list[DriftItem]]:
    """(checked objects, items) for each model's served versions on `host`. Raises what SSH
    raises (the caller names the host as not checked)."""
    [target] = gpu_host_targets(
        environment.name, environment.spec, project_root=environment.project_root, limit=host
    )
    remote = connect(target.hostspec, **target.backend_options)
    root = PurePosixPath(environment.spec.serving_directory()) / "model_repository"
    checked: list[str] = []
    items: list[DriftItem] = []
    for model, numbers in sorted(versions.items()):
        object_ = f"model {model} files"
        checked.append(object_)
        for number in numbers:
            for problem in _version_problems(
                remote, environment, root / model / str(number), model, number
            ):
                items.append(DriftItem("triton", host, object_, EXPECTED, problem, repair))
    return checked, items


def _version_problems(
    remote: Any, environment: Environment, directory: PurePosixPath, model: str, number: int
) -> list[str]:
    try:
        lineage = Lineage.read(environment.repository / model / str(number))
    except (FileNotFoundError, ValueError) as error:
        return [
            f"no lineage manifest for {model} v{number} on this machine to compare with: {error}"
        ]
    command = (
        f"cd {shlex.quote(str(directory))} && find . -type f ! -name {LINEAGE_FILE} "
        "! -path '*/__pycache__/*' -print0 | xargs -0 -r sha256sum"
    )
    result = remote.run(command)
    if result.rc != 0:
        return [f"{directory}: missing or unreadable ({(result.stderr or '').strip()})"]
    found: dict[str, str] = {}
    for line in result.stdout.splitlines():
        digest, _, name = line.partition("  ")
        found[name.removeprefix("./")] = digest
    problems = []
    for relative, expected in sorted(lineage.files.items()):
        if relative not in found:
            problems.append(
                f"{directory / relative}: missing, though its lineage manifest lists it"
            )
        elif found[relative] != expected:
            problems.append(
                f"{directory / relative}: sha256 {found[relative]} differs from its lineage "
                f"manifest ({expected})"
            )
    for relative in sorted(set(found) - set(lineage.files)):
        problems.append(f"{directory / relative}: not in its lineage manifest")
    return problems
