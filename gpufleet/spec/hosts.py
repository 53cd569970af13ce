"""A stack's GPU hosts and how Ansible configures them (`gpufleet:hosts`, `gpufleet:host_config`).

A host names its machine, how to reach it over SSH and the GPUs it should have; the stack-wide
`host_config` says where packages come from, which driver branch and CUDA version to install,
and what the roles may do (manage services, reboot). `generators/ansible_inventory.py` turns
both into the inventory `gpufleet configure` runs; the host gate checks the same expectations.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import Field, field_validator

from gpufleet.spec.azure import AzureVm
from gpufleet.spec.model import SpecModel
from gpufleet.spec.proxmox import ProxmoxVm
from gpufleet.spec.serving import check_pinned_image

GpuFamily = Literal["t4", "a10", "h100"]
HOST_NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
# Only 8-GPU HGX H100 boards carry NVSwitch (and need NVIDIA Fabric Manager).
NVSWITCH_GPU_COUNT = 8
_DNS_NAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"
)


class GpuRequest(SpecModel):
    """The GPUs a host has: their family and how many."""

    model: GpuFamily = Field(description="GPU family: t4, a10 or h100.")
    count: int = Field(default=1, ge=1, le=16, description="GPUs on the host.")
    nvswitch: bool | None = Field(
        default=None,
        description="Whether the GPUs sit on NVSwitch (NVIDIA Fabric Manager needed); "
        "default: true for 8 H100s, false otherwise.",
    )

    @property
    def has_nvswitch(self) -> bool:
        if self.nvswitch is not None:
            return self.nvswitch
        return self.model == "h100" and self.count == NVSWITCH_GPU_COUNT


class HostSpec(SpecModel):
    """One machine Ansible configures and the host gate checks."""

    name: str = Field(
        pattern=HOST_NAME_PATTERN,
        description="Inventory name: lower case letters, digits and dashes.",
    )
    address: str | None = Field(
        default=None,
        description="IP address or DNS name to reach the host at; Proxmox and Azure stacks "
        "get it from the Pulumi outputs.",
    )
    ssh_port: int = Field(default=22, ge=1, le=65535)
    ssh_user: str = Field(
        default="root",
        pattern=r"^[a-z_][a-z0-9_-]{0,31}$",
        description="User Ansible logs in as; a user other than root needs sudo.",
    )
    gpus: GpuRequest | None = Field(
        default=None, description="The GPUs the host should have; none for a CPU host."
    )
    proxmox: ProxmoxVm | None = Field(
        default=None, description="The host's VM on a proxmox stack: node, size, network, GPUs."
    )
    azure: AzureVm | None = Field(
        default=None,
        description="The host's VM on an azure stack: GPUs or size, image, disks, spot, zone.",
    )

    @field_validator("address")
    @classmethod
    def _ip_or_dns_name(cls, address: str | None) -> str | None:
        if address is None:
            return None
        try:
            ipaddress.ip_address(address)
        except ValueError:
            if not _DNS_NAME.match(address):
                raise ValueError(
                    f"{address!r} is neither an IP address nor a DNS name; write the bare "
                    "address (no scheme, user or port: those are ssh_user and ssh_port)"
                ) from None
        return address

    def known_address(self) -> str | None:
        """The host's address as far as the spec knows it: the static IPv4 of its proxmox
        network, else `address`; None until a provisioner reports it (DHCP, Azure)."""
        if self.proxmox is not None and self.proxmox.network.ipv4 != "dhcp":
            return self.proxmox.network.ipv4.split("/")[0]
        return self.address


class HostConfig(SpecModel):
    """How `gpufleet configure` converges every host of the stack."""

    package_sources: Literal["vendor", "distribution"] = Field(
        default="vendor",
        description="vendor: Docker CE from Docker's repository, CUDA and the container "
        "toolkit from NVIDIA's; distribution: the Debian/Ubuntu archive only (docker.io, "
        "nvidia-cuda-toolkit; the container toolkit is not in the archive: only its runtime "
        "is registered).",
    )
    driver_branch: Annotated[str, Field(pattern=r"^[0-9]{3}$")] | None = Field(
        default=None,
        description="NVIDIA driver branch such as '550'; default: the branch the nvidia_driver "
        "role maps the host's GPU family to.",
    )
    cuda_version: Annotated[str, Field(pattern=r"^[0-9]{2}\.[0-9]$")] | None = Field(
        default=None, description="CUDA toolkit version such as '12.4'; none installs no toolkit."
    )
    manage_services: bool = Field(
        default=True,
        description="Enable and start services (chrony, Docker, nvidia-persistenced); off on "
        "hosts without systemd.",
    )
    reboot: bool = Field(
        default=True, description="Reboot a host when a new driver needs it to load."
    )
    force_gpu_tasks: bool = Field(
        default=False,
        description="Run the GPU tasks (driver, nouveau blacklist) on hosts with no NVIDIA PCI "
        "device, e.g. to prepare an image.",
    )
    require_gpu: bool = Field(
        default=True,
        description="A host whose spec lists GPUs but that has none fails the host gate; "
        "false on test beds without GPUs, where the GPU checks report 'no GPU present'.",
    )
    secure_boot: Literal["fail", "signed"] = Field(
        default="fail",
        description="With Secure Boot on: stop with instructions (fail), or install Ubuntu's "
        "signed driver modules (signed).",
    )
    ssh_private_key_file: str | None = Field(
        default=None,
        description="Private key for SSH, a path on the machine that runs gpufleet (never "
        "the key itself); default: the SSH agent and ~/.ssh.",
    )
    ssh_known_hosts_file: str | None = Field(
        default=None,
        description="known_hosts file with the hosts' keys; default ~/.ssh/known_hosts. Host "
        "keys are always checked.",
    )
    become_password_env: Annotated[str, Field(pattern=r"^[A-Z_][A-Z0-9_]*$")] | None = Field(
        default=None,
        description="Name of the environment variable holding the sudo password, for "
        "ssh_users other than root without passwordless sudo.",
    )
    gpu_probe_image: str = Field(
        default="ubuntu:24.04",
        description="Image the host gate runs with the nvidia runtime to see the GPUs from a "
        "container.",
    )

    @field_validator("gpu_probe_image")
    @classmethod
    def _image_reference(cls, image: str) -> str:
        # It becomes an argument of `docker run`: an option such as --privileged must not pass.
        return check_pinned_image(image)
