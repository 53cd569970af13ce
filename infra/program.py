"""The Pulumi program's body: one stack's StackSpec in, its hosts' resources and outputs out.

`infra/__main__.py` calls `build_stack(pulumi.get_stack())`; tests call it under
`pulumi.runtime.set_mocks`. The spec is read through gpufleet's loader (errors name the file,
line and field) and the program dispatches on the environment kind:

- proxmox: the preflight first (skipped with `pulumi config set gpufleet:preflight false`), then
  one component per host. Outputs per host: name, address and GPUs, which `gpufleet configure`
  and the gates need, and the changes waiting for a restart (made when
  `gpufleet:allow_restart` is true).
- both: after each host's VM, unless `gpufleet:lifecycle` is false, its configuration,
  deployment and gate (infra/steps/host_lifecycle.py), each fed the addresses the VMs report;
  a step that fails fails the update.
- azure: the resource group, the network (`infra/azure/network.py`), then one component per
  host (`infra/azure/gpu_host.py`). Outputs per host: name, private address, size and GPUs
  (and the public address where the spec asks for one). The spec's warnings (Secure Boot off,
  GRID drivers) are logged as Pulumi warnings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pulumi
from pulumi_azure_native import resources

from gpufleet.lifecycle.environment import load_environment
from gpufleet.spec.azure import azure_warnings
from gpufleet.spec.loading import LoadedStackSpec, load_stack_spec, stack_config_path
from gpufleet.spec.problems import SpecError
from gpufleet.spec.stack import StackSpec
from infra.azure.gpu_host import AzureGpuHost, AzureGpuHostArgs
from infra.azure.network import AzureNetwork, AzureNetworkArgs
from infra.azure.tags import stack_tags
from infra.proxmox.client import ProxmoxError
from infra.proxmox.gpu_host import ProxmoxGpuHost
from infra.proxmox.preflight import check_stack
from infra.steps.host_lifecycle import HostLifecycle, HostLifecycleArgs

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_NAMESPACE = "gpufleet"


GpuHost = ProxmoxGpuHost | AzureGpuHost


def build_stack(stack: str, project_root: Path = PROJECT_ROOT) -> dict[str, GpuHost]:
    """Register the stack's resources; return its hosts' components by host name."""
    try:
        loaded = load_stack_spec(project_root / "stacks", stack)
    except SpecError as error:
        raise pulumi.RunError("\n".join(str(problem) for problem in error.problems)) from None
    spec = loaded.spec
    hosts: dict[str, GpuHost]
    if spec.environment == "proxmox":
        hosts = dict(_proxmox_hosts(stack, spec, project_root))
    elif spec.environment == "azure":
        hosts = dict(_azure_hosts(loaded))
    else:
        raise pulumi.RunError(
            f"stack {stack!r} is a {spec.environment} stack; this program provisions proxmox "
            "and azure stacks (local and static stacks have nothing to provision)"
        )
    if pulumi.Config(CONFIG_NAMESPACE).get_bool("lifecycle") is not False:
        _host_lifecycles(stack, hosts, project_root)
    return hosts


def _host_lifecycles(stack: str, hosts: dict[str, GpuHost], project_root: Path) -> None:
    """Each host's configuration, deployment and gate, after its VM, fed the VMs' addresses."""
    try:
        environment = load_environment(stack, project_root=project_root, addresses={})
    except SpecError as error:
        raise pulumi.RunError("\n".join(str(problem) for problem in error.problems)) from None
    addresses: dict[str, pulumi.Output[str]] = {
        name: host.address if isinstance(host, ProxmoxGpuHost) else host.private_address
        for name, host in hosts.items()
    }
    for name, host in hosts.items():
        vm_id = host.vmid if isinstance(host, ProxmoxGpuHost) else host.vm.vm_id
        HostLifecycle(
            name,
            HostLifecycleArgs(
                stack=stack,
                environment=environment,
                host=name,
                addresses=addresses,
                vm_id=pulumi.Output.from_input(vm_id).apply(str),
                project_root=project_root,
            ),
            opts=pulumi.ResourceOptions(depends_on=[host]),
        )


def _azure_hosts(loaded: LoadedStackSpec) -> dict[str, AzureGpuHost]:
    stack, spec = loaded.name, loaded.spec
    assert spec.azure is not None  # the spec's own check for azure stacks
    for path, message in azure_warnings(spec):
        located = loaded.source.problem(stack_config_path(path), message)
        pulumi.log.warn(str(located))
    tags = stack_tags(stack, spec)
    group = resources.ResourceGroup(
        spec.azure.resource_group,
        resource_group_name=spec.azure.resource_group,
        location=spec.azure.location,
        tags=tags,
    )
    net = AzureNetwork(
        stack,
        AzureNetworkArgs(resource_group_name=group.name, environment=spec.azure, tags=tags),
    )
    default_subnet = spec.azure.subnets[0].name
    hosts = {}
    for host in spec.hosts:
        assert host.azure is not None
        component = AzureGpuHost(
            host.name,
            AzureGpuHostArgs(
                stack=stack,
                host=host,
                environment=spec.azure,
                resource_group_name=group.name,
                subnet_id=net.subnet_ids[host.azure.subnet or default_subnet],
                tags=tags,
            ),
        )
        outputs: dict[str, pulumi.Output[Any]] = {
            "name": component.name,
            "private_address": component.private_address,
            "size": component.size,
            "gpus": component.gpus,
        }
        if component.public_ip is not None:
            outputs["public_address"] = component.public_address
        pulumi.export(host.name, outputs)
        hosts[host.name] = component
    return hosts


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
