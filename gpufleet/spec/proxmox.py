"""Proxmox stacks: the cluster (`gpufleet:proxmox`) and each host's VM (`hosts[].proxmox`).

Secrets never live here: the API token's secret or the password is a Pulumi secret
(`pulumi config set --secret gpufleet:proxmox_secret ...`), which the Pulumi program reads, and
`gpufleet preflight` takes from the environment variable `secret_env` names.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from typing import Annotated

from pydantic import Field, field_validator, model_validator

from gpufleet.spec.model import SpecModel

TOKEN_ID_PATTERN = r"^[A-Za-z0-9._-]+@[A-Za-z0-9._-]+![A-Za-z][A-Za-z0-9._-]*$"  # noqa: S105  # a pattern
USER_PATTERN = r"^[A-Za-z0-9._-]+@[A-Za-z0-9._-]+$"
PCI_ADDRESS_PATTERN = r"^([0-9a-f]{4}:)?[0-9a-f]{2}:[0-9a-f]{2}(\.[0-7])?$"
# Keys only the Pulumi program reads (`pulumi config set` writes them into the stack file): the
# API secret (a Pulumi secret), and switches of the program. They are not part of the StackSpec.
PULUMI_ONLY_KEYS = ("proxmox_secret", "preflight", "allow_restart", "lifecycle")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


class ProxmoxCluster(SpecModel):
    """The PVE API endpoint, how to trust and log in to it, and what VMs are made from."""

    endpoint: str = Field(description="https://<host>:8006 of a cluster node or its proxy.")
    ca_bundle: str | None = Field(
        default=None,
        description="PEM file of the CA that signed the API's certificate; default: the CA "
        "bundle requests uses (certifi's), never one the environment names. TLS is always "
        "verified.",
    )
    token_id: Annotated[str, Field(pattern=TOKEN_ID_PATTERN)] | None = Field(
        default=None, description="API token id, user@realm!name; its secret is a Pulumi secret."
    )
    user: Annotated[str, Field(pattern=USER_PATTERN)] | None = Field(
        default=None,
        description="User for password login (e.g. root@pam), instead of an API token.",
    )
    secret_env: Annotated[str, Field(pattern=r"^[A-Z_][A-Z0-9_]*$")] = Field(
        default="GPUFLEET_PROXMOX_SECRET",
        description="Environment variable with the token secret or password for `gpufleet "
        "preflight` (the Pulumi program reads the gpufleet:proxmox_secret secret).",
    )
    template_vmid: int = Field(ge=100, le=999_999_999, description="VM id of the template.")
    storage: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_.-]*$", description="Storage for disks.")

    @field_validator("endpoint")
    @classmethod
    def _https(cls, endpoint: str) -> str:
        parsed = urllib.parse.urlsplit(endpoint)
        if parsed.scheme != "https" or not parsed.hostname:
            raise ValueError("use https://<host>:8006; the API is never spoken in clear text")
        if parsed.username or parsed.password:
            raise ValueError("do not put credentials in the endpoint; use token_id or user")
        return endpoint.rstrip("/")

    @model_validator(mode="after")
    def _one_login(self) -> ProxmoxCluster:
        if (self.token_id is None) == (self.user is None):
            raise ValueError("give either token_id (API token) or user (password login)")
        return self

    @property
    def uses_token(self) -> bool:
        return self.token_id is not None


class PciPassthrough(SpecModel):
    """One GPU given to the VM: a cluster resource mapping (default) or a raw PCI address."""

    mapping: str | None = Field(
        default=None, description="Cluster resource mapping name (Datacenter > Resource Mappings)."
    )
    address: Annotated[str, Field(pattern=PCI_ADDRESS_PATTERN)] | None = Field(
        default=None,
        description="Raw PCI address such as 0000:41:00.0; PVE allows it only for root@pam "
        "logged in with a password.",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> PciPassthrough:
        if (self.mapping is None) == (self.address is None):
            raise ValueError("give either mapping or address")
        if self.mapping is not None and not _NAME.match(self.mapping):
            raise ValueError(f"{self.mapping!r} is not a resource mapping name")
        return self


class VmNetwork(SpecModel):
    """The VM's first NIC and its cloud-init addressing."""

    bridge: str = Field(default="vmbr0", pattern=r"^[A-Za-z][A-Za-z0-9_.-]*$")
    vlan: int | None = Field(default=None, ge=1, le=4094)
    ipv4: str = Field(default="dhcp", description="'dhcp' or an address with prefix, 10.0.0.5/24.")
    gateway: str | None = None
    nameserver: str | None = None

    @field_validator("ipv4")
    @classmethod
    def _dhcp_or_cidr(cls, ipv4: str) -> str:
        if ipv4 != "dhcp":
            try:
                ipaddress.IPv4Interface(ipv4)
            except ValueError:
                raise ValueError(
                    "write 'dhcp' or an IPv4 address with prefix: 10.0.0.5/24"
                ) from None
            if "/" not in ipv4:
                raise ValueError("give the prefix length too, e.g. 10.0.0.5/24")
        return ipv4

    @model_validator(mode="after")
    def _gateway_in_subnet(self) -> VmNetwork:
        if self.gateway is None:
            return self
        gateway = ipaddress.IPv4Address(self.gateway)
        if self.ipv4 != "dhcp" and gateway not in ipaddress.IPv4Interface(self.ipv4).network:
            raise ValueError(f"gateway {gateway} is outside {self.ipv4}")
        return self


class ProxmoxVm(SpecModel):
    """How a host's VM is made on Proxmox."""

    node: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9-]*$", description="Cluster node to run on.")
    cores: int = Field(default=8, ge=1, le=512)
    memory_mb: int = Field(default=32768, ge=1024)
    disk_gb: int = Field(default=100, ge=10, description="Size the cloned boot disk grows to.")
    network: VmNetwork = Field(default_factory=VmNetwork)
    ci_user: str = Field(default="gpufleet", pattern=r"^[a-z_][a-z0-9_-]{0,31}$")
    ssh_keys: list[str] = Field(min_length=1, description="Public keys cloud-init authorizes.")
    pci: list[PciPassthrough] = Field(default_factory=list, max_length=16)
    renamed_from: Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")] | None = (
        Field(
            default=None,
            description="The host's name before a rename: its VM is replaced, the old one "
            "deleted first (its GPUs cannot be in two VMs), instead of a new VM made beside it.",
        )
    )

    @field_validator("ssh_keys")
    @classmethod
    def _public_keys(cls, keys: list[str]) -> list[str]:
        for key in keys:
            if "PRIVATE KEY" in key:
                raise ValueError("that is a private key; give the public key (.pub) only")
            if not key.startswith(("ssh-", "ecdsa-", "sk-")):
                raise ValueError(f"{key[:20]!r}... is not an OpenSSH public key")
        return keys
