"""Hosts' addresses from the provisioner: `pulumi stack output --json`, never a hand edit.

The Pulumi program (infra/program.py) exports one object per host, named after the host:
`{"address": ...}` on Proxmox, `{"private_address": ...}` on Azure. Outside the program the
addresses are read from a file holding that JSON (`--outputs FILE`), or through Pulumi's
Automation API where the Pulumi CLI is installed. Static stacks list their addresses in the spec.

    outputs = read_outputs_file(Path("outputs.json"))
    addresses = host_addresses("onprem-prod", spec, outputs)   # {"gpu-a": "10.40.0.21", ...}
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gpufleet.spec.hosts import HostSpec
from gpufleet.spec.stack import StackSpec

# The key of each host's address in the program's outputs, by environment kind.
ADDRESS_KEYS = {"proxmox": "address", "azure": "private_address"}


class OutputsError(Exception):
    """The provisioner's outputs are missing or unreadable (exit 2); the message says how to
    produce them."""


def outputs_command(stack: str) -> str:
    return f"pulumi stack output --stack {stack} --json > outputs-{stack}.json"


def read_outputs_file(path: Path) -> dict[str, Any]:
    """The JSON object `pulumi stack output --json` printed into `path`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise OutputsError(
            f"{path}: {error.strerror}; write it with `pulumi stack output --json`"
        ) from None
    try:
        outputs = json.loads(text)
    except ValueError as error:
        raise OutputsError(
            f"{path}: not JSON ({error}); write it with `pulumi stack output --json`"
        ) from None
    if not isinstance(outputs, dict):
        raise OutputsError(f"{path}: expected the JSON object of `pulumi stack output --json`")
    return outputs


def outputs_from_pulumi(stack: str, project_root: Path) -> dict[str, Any]:
    """The stack's outputs through the Automation API (needs the Pulumi CLI on PATH)."""
    if shutil.which("pulumi") is None:
        raise OutputsError(
            f"stack {stack!r} is provisioned by Pulumi and no Pulumi CLI is installed here to "
            f"read its outputs; run `{outputs_command(stack)}` where it is, and pass "
            f"--outputs outputs-{stack}.json"
        )
    from pulumi import automation

    try:
        workspace = automation.LocalWorkspace(work_dir=str(project_root))
        selected = automation.select_stack(stack_name=stack, work_dir=str(project_root))
        del workspace
        return {name: item.value for name, item in selected.outputs().items()}
    except automation.errors.CommandError as error:
        raise OutputsError(
            f"could not read the outputs of stack {stack!r} through Pulumi: "
            f"{str(error).strip().splitlines()[-1]}; run `pulumi up -s {stack}` first"
        ) from None


def host_addresses(stack: str, spec: StackSpec, outputs: Mapping[str, Any]) -> dict[str, str]:
    """Each host's address from the outputs; OutputsError naming every host that has none."""
    key = ADDRESS_KEYS[spec.environment]
    addresses: dict[str, str] = {}
    missing: list[str] = []
    for host in spec.hosts:
        value = outputs.get(host.name)
        address = value.get(key) if isinstance(value, Mapping) else None
        if not isinstance(address, str) or not address or address == "[secret]":
            missing.append(host.name)
            continue
        try:
            addresses[host.name] = HostSpec._ip_or_dns_name(address) or ""
        except ValueError as error:
            raise OutputsError(f"outputs of stack {stack!r}, {host.name}.{key}: {error}") from None
    if missing:
        raise OutputsError(
            f"the outputs of stack {stack!r} give no {key} for host(s) {', '.join(missing)}; "
            f"provision them (`pulumi up -s {stack}`), then `{outputs_command(stack)}`"
        )
    return addresses


def with_addresses(spec: StackSpec, addresses: Mapping[str, str]) -> StackSpec:
    """The spec with each host's address set from `addresses` (the provisioner's)."""
    hosts = [
        host.model_copy(update={"address": addresses[host.name]})
        if host.name in addresses
        else host
        for host in spec.hosts
    ]
    return spec.model_copy(update={"hosts": hosts})


def resolve_addresses(
    stack: str, spec: StackSpec, *, outputs_file: Path | None, project_root: Path
) -> StackSpec:
    """The spec with every host's address: from the spec (static), else the provisioner."""
    if spec.environment not in ADDRESS_KEYS:
        if outputs_file is not None:
            raise OutputsError(
                f"--outputs: stack {stack!r} is a {spec.environment} stack, which Pulumi does "
                "not provision; its addresses are in its spec"
            )
        return spec
    outputs = (
        read_outputs_file(outputs_file)
        if outputs_file is not None
        else outputs_from_pulumi(stack, project_root)
    )
    return with_addresses(spec, host_addresses(stack, spec, outputs))
