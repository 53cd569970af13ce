"""`ProxmoxGpuHost`: one stack host's GPU VM on Proxmox, as a Pulumi component.

The component wraps a single dynamic resource (`GpuVm`, run by `provider.GpuVmProvider`)
whose inputs `vm_config.vm_inputs` builds from the host's spec; the API secret joins them as
a Pulumi secret and stays one in the state. Outputs: the VM's name, address and GPUs (what
`gpufleet configure` and the gates need), plus its vmid and any changes waiting for a restart.

    host = ProxmoxGpuHost(
        spec.name, stack=pulumi.get_stack(), host=spec, cluster=stack_spec.proxmox,
        secret=config.require_secret("proxmox_secret"), project_root=Path.cwd(),
    )
    pulumi.export(f"{spec.name}.address", host.address)

The provider class is pickled by reference: the process that runs it (Pulumi's dynamic
provider host, started in the project) must be able to import `infra.proxmox.provider`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pulumi
from pulumi.dynamic import Resource

from gpufleet.spec.hosts import HostSpec
from gpufleet.spec.proxmox import ProxmoxCluster
from infra.proxmox import vm_config
from infra.proxmox.client import ProxmoxError, ca_bundle_path
from infra.proxmox.provider import OUTPUT_KEYS, GpuVmProvider, Timing


class GpuVm(Resource, module="proxmox", name="GpuVm"):
    """The dynamic resource: one VM cloned from the template and configured for GPUs."""

    vmid: pulumi.Output[int]
    node: pulumi.Output[str]
    name: pulumi.Output[str]
    address: pulumi.Output[str]
    gpus: pulumi.Output[list[str]]
    pending_restart: pulumi.Output[list[str]]
    drift: pulumi.Output[list[str]]

    def __init__(
        self,
        name: str,
        props: dict[str, Any],
        opts: pulumi.ResourceOptions | None = None,
        timing: Timing | None = None,
    ) -> None:
        # Outputs are declared as None inputs so that Pulumi exposes them as attributes.
        super().__init__(GpuVmProvider(timing), name, {**props, **dict.fromkeys(OUTPUT_KEYS)}, opts)


class ProxmoxGpuHost(pulumi.ComponentResource):
    """A stack host's VM: cloned, configured (q35, OVMF, GPUs passed through), started."""

    name: pulumi.Output[str]
    address: pulumi.Output[str]
    gpus: pulumi.Output[list[str]]
    vmid: pulumi.Output[int]
    pending_restart: pulumi.Output[list[str]]

    def __init__(
        self,
        name: str,
        *,
        stack: str,
        host: HostSpec,
        cluster: ProxmoxCluster,
        secret: pulumi.Input[str],
        project_root: Path,
        allow_restart: bool = False,
        timing: Timing | None = None,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        renamed_from = host.proxmox.renamed_from if host.proxmox else None
        if renamed_from:
            # The same resources under the old name: Pulumi diffs instead of creating anew,
            # and the VM's diff (`host` changed) replaces it, deleting the old one first.
            opts = pulumi.ResourceOptions.merge(
                opts, pulumi.ResourceOptions(aliases=[pulumi.Alias(name=renamed_from)])
            )
        super().__init__("gpufleet:proxmox:GpuHost", name, None, opts)
        inputs: dict[str, Any] = vm_config.vm_inputs(
            stack,
            host,
            cluster,
            ca_certificate=_ca_certificate(cluster, project_root),
            allow_restart=allow_restart,
        )
        inputs["secret"] = pulumi.Output.secret(secret)
        self.vm = GpuVm(
            f"{name}-vm",
            inputs,
            pulumi.ResourceOptions(
                parent=self,
                additional_secret_outputs=["secret"],
                aliases=[pulumi.Alias(name=f"{renamed_from}-vm")] if renamed_from else None,
            ),
            timing,
        )
        self.name = self.vm.name
        self.address = self.vm.address
        self.gpus = self.vm.gpus
        self.vmid = self.vm.vmid
        self.pending_restart = self.vm.pending_restart
        self.register_outputs({"name": self.name, "address": self.address, "gpus": self.gpus})


def _ca_certificate(cluster: ProxmoxCluster, project_root: Path) -> str | None:
    """The PEM text of the stack's CA bundle (None: the default CAs); a missing file stops the
    program with the preflight's one-line message."""
    if cluster.ca_bundle is None:
        return None
    try:
        return ca_bundle_path(cluster, project_root).read_text(encoding="utf-8")
    except (ProxmoxError, OSError, UnicodeDecodeError) as error:
        raise pulumi.RunError(str(error)) from None
