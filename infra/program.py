"""The Pulumi program's body: one stack's StackSpec in, its hosts' resources and outputs out.

`infra/__main__.py` calls `build_stack(pulumi.get_stack())`; tests call it under
`pulumi.runtime.set_mocks`. The spec is read through gpufleet's loader (errors name the file,
line and field), proxmox stacks run the preflight first (skipped with
`pulumi config set gpufleet:preflight false`), and each host becomes one component. Outputs per
host: name, address and GPUs, which `gpufleet configure` and the gates need, and the changes
waiting for a restart (made when `gpufleet:allow_restart` is true).
"""

from __future__ import annotations

from pathlib import Path

import pulumi

from gpufleet.spec.loading import load_stack_spec
from gpufleet.spec.problems import SpecError
from gpufleet.spec.stack import StackSpec
from infra.proxmox.client import ProxmoxError
from infra.proxmox.gpu_host import ProxmoxGpuHost
from infra.proxmox.preflight import check_stack

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_NAMESPACE = "gpufleet"


def build_stack(stack: str, project_root: Path = PROJECT_ROOT) -> dict[str, ProxmoxGpuHost]:
    """Register the stack's resources; return its hosts' components by host name."""
    try:
        spec = load_stack_spec(project_root / "stacks", stack).spec
    except SpecError as error:
        raise pulumi.RunError("\n".join(str(problem) for problem in error.problems)) from None
    if spec.environment != "proxmox":
        raise pulumi.RunError(
            f"stack {stack!r} is a {spec.environment} stack; this program provisions proxmox "
            "stacks (azure: issue 6; local and static stacks have nothing to provision)"
        )
    return _proxmox_hosts(stack, spec, project_root)


def _proxmox_hosts(stack: str, spec: StackSpec, project_root: Path) -> dict[str, ProxmoxGpuHost]:
    assert spec.proxmox is not None  # the spec's own check for proxmox stacks
    cluster = spec.proxmox
    config = pulumi.Config(CONFIG_NAMESPACE)
    secret = config.require_secret("proxmox_secret")
    if config.get_bool("preflight") is not False:
        # Every host waits for the preflight: the secret reaches them only through it.
        secret = secret.apply(lambda value: _passed_preflight(stack, spec, value, project_root))
    hosts = {}
    for host in spec.hosts:
        component = ProxmoxGpuHost(
            host.name,
            stack=stack,
            host=host,
            cluster=cluster,
            secret=secret,
            project_root=project_root,
            allow_restart=config.get_bool("allow_restart") is True,
        )
        pulumi.export(
            host.name,
            {
                "name": component.name,
                "address": component.address,
                "gpus": component.gpus,
                "pending_restart": component.pending_restart,
            },
        )
        hosts[host.name] = component
    return hosts


def _passed_preflight(stack: str, spec: StackSpec, secret: str, project_root: Path) -> str:
    assert spec.proxmox is not None
    try:
        problems = check_stack(spec, secret, project_root=project_root, stack=stack)
    except ProxmoxError as error:
        problems = [str(error)]
    if problems:
        listed = "\n".join(f"  - {problem}" for problem in problems)
        raise pulumi.RunError(
            f"preflight of stack {stack!r} found {len(problems)} problem(s):\n{listed}"
        )
    return secret
