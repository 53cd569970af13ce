"""The infrastructure layer of `gpufleet drift`: the machines a stack's hosts run on.

    checks = check_stack_infrastructure(load_stack_spec(stacks_dir, "onprem-prod"),
                                        project_root=Path.cwd())

- proxmox stacks: each host's VM read from the PVE API against the spec (proxmox_vms.py);
- azure stacks: `pulumi preview --refresh --expect-no-changes --json` (azure_preview.py);
- static and local stacks have no infrastructure gpufleet provisions: no checks.

Neither needs the hosts' addresses, which `load_environment` insists on for proxmox and
azure stacks (they come from the provisioner's outputs): `gpufleet drift` should call
`check_stack_infrastructure` with the loaded stack spec, so that a VM that is gone, and so
has no address, is reported as drift instead of stopping the check. `check_infrastructure`
takes an `Environment` for callers that already have one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from gpufleet.drift.azure_preview import PreviewRunner, check_azure_preview
from gpufleet.drift.items import LayerCheck
from gpufleet.drift.proxmox_vms import DEFAULT_WORKERS, check_proxmox_vms
from gpufleet.lifecycle.environment import Environment
from gpufleet.spec.loading import LoadedStackSpec
from infra.proxmox.session import Timing


def check_stack_infrastructure(
    loaded: LoadedStackSpec,
    *,
    project_root: Path,
    environ: Mapping[str, str] | None = None,
    timing: Timing | None = None,
    workers: int = DEFAULT_WORKERS,
    run_preview: PreviewRunner | None = None,
) -> list[LayerCheck]:
    """The stack's infrastructure against its spec; [] for stacks without provisioned machines.

    `environ` holds the Proxmox secret's variable (default: os.environ); `timing` and `workers`
    tune the PVE calls; `run_preview` replaces the Pulumi CLI (tests, benches).
    """
    environment = loaded.spec.environment
    if environment == "proxmox":
        return check_proxmox_vms(
            loaded, project_root=project_root, environ=environ, timing=timing, workers=workers
        )
    if environment == "azure":
        return check_azure_preview(loaded, project_root=project_root, run_preview=run_preview)
    return []


def check_infrastructure(
    environment: Environment, *, environ: Mapping[str, str] | None = None
) -> list[LayerCheck]:
    """`check_stack_infrastructure` for an environment already loaded (its addresses unused)."""
    return check_stack_infrastructure(
        environment.loaded, project_root=environment.project_root, environ=environ
    )
