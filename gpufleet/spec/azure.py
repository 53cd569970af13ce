"""Azure stacks: the environment (`gpufleet:azure`) and each host's VM (`hosts[].azure`).

The environment names the location, resource group, network, who may reach SSH and the admin
login (a public key only: no password ever reaches a VM). A host asks for GPUs by family and
count or by exact size; `gpufleet.spec.azure_sizes` resolves it, and the checks here refuse
what Azure or the GPU driver would refuse later: a Gen1 image on a Gen2-only size, Secure Boot
on with the GRID driver, SSH open to the internet, overlapping subnets.

    vm = AzureVm.model_validate({"gpu": {"model": "h100", "count": 1}})
    vm.resolved_size.name    # 'Standard_NC40ads_H100_v5'
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from gpufleet.spec.azure_sizes import (
    GpuFamily,
    GpuSize,
    VmGeneration,
    closest_sizes,
    find_size,
    similar_size_names,
    smallest_size,
)
from gpufleet.spec.model import SpecModel
from gpufleet.spec.problems import FieldPath, FieldValueError

if TYPE_CHECKING:
    from gpufleet.spec.stack import StackSpec

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}[A-Za-z0-9_]$"
# Sources that mean "anyone": as an SSH source they open the port to the internet.
# Where cloud-init mounts each VM's data disk (infra/azure/cloud_init.py); the serving stack and
# its model repository live on it, so they outlive a rebuilt VM.
DATA_DISK_MOUNT = "/srv/gpufleet"
# Two /1s are the whole internet too: a public SSH source must be at least this narrow.
MIN_PUBLIC_SSH_PREFIX = 8
OPEN_SOURCES = frozenset({"*", "0.0.0.0/0", "::/0", "internet", "any"})
# Azure refuses these admin user names (and root would defeat disable_root).
RESERVED_ADMIN_USERS = frozenset(
    {"root", "admin", "administrator", "guest", "user", "test", "sys", "daemon", "bin"}
)


def _cidr(value: str) -> str:
    if value.strip().lower() in OPEN_SOURCES:
        raise ValueError(
            f"{value!r} opens SSH to the whole internet; list the networks that may connect "
            "(your office or VPN egress, a bastion), e.g. 203.0.113.0/24"
        )
    try:
        network = ipaddress.ip_network(value, strict=True)
    except ValueError as error:
        raise ValueError(
            f"not a network in CIDR notation ({error}); write e.g. 10.0.0.0/24"
        ) from None
    if network.prefixlen == 0:
        raise ValueError(f"{value} is the whole internet; list narrower networks")
    if network.version == 6:
        raise ValueError(
            f"{value} is IPv6; the stack's VNet and NSG are IPv4 only: list IPv4 networks"
        )
    if not network.is_private and network.prefixlen < MIN_PUBLIC_SSH_PREFIX:
        raise ValueError(
            f"{value} spans {network.num_addresses:,} public addresses, a large part of the "
            f"internet; list networks of /{MIN_PUBLIC_SSH_PREFIX} or narrower"
        )
    return value


def _ipv4_network(value: str) -> str:
    try:
        ipaddress.IPv4Network(value, strict=True)
    except ValueError as error:
        raise ValueError(f"not an IPv4 network ({error}); write e.g. 10.40.0.0/16") from None
    return value


Cidr = Annotated[str, AfterValidator(_cidr)]
Ipv4Network = Annotated[str, AfterValidator(_ipv4_network)]


class AzureSubnet(SpecModel):
    """One subnet of the stack's VNet; every subnet gets the stack's NSG."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,78}$")
    prefix: Ipv4Network


class AzureEnvironment(SpecModel):
    """Where an azure stack's VMs live and who may reach them."""

    location: str = Field(pattern=r"^[a-z0-9]+$", description="Azure region, e.g. westeurope.")
    resource_group: str = Field(
        pattern=NAME_PATTERN, description="Resource group the stack creates and owns."
    )
    owner: str = Field(
        min_length=1,
        max_length=256,
        description="Team or person answerable for the stack; tagged on every resource.",
    )
    address_space: list[Ipv4Network] = Field(
        default_factory=lambda: ["10.40.0.0/16"], min_length=1, description="The VNet's prefixes."
    )
    subnets: list[AzureSubnet] = Field(
        default_factory=lambda: [AzureSubnet(name="gpu", prefix="10.40.1.0/24")],
        min_length=1,
        description="Subnets inside address_space; hosts go to the first unless they name one.",
    )
    ssh_source_cidrs: list[Cidr] = Field(
        min_length=1,
        description="Networks allowed to reach SSH (22); never 0.0.0.0/0, * or Internet.",
    )
    admin_user: str = Field(
        default="gpufleet",
        pattern=r"^[a-z_][a-z0-9_-]{0,31}$",
        description="The VMs' admin user (key login, sudo); Ansible logs in as this user.",
    )
    ssh_public_key: str = Field(
        description="OpenSSH public key authorized for admin_user (never the private key)."
    )
    outbound: Literal["nat_gateway", "none"] = Field(
        default="nat_gateway",
        description="How hosts without a public IP reach package mirrors: a NAT gateway "
        "(outbound only), or none (the subnets have no internet access at all).",
    )
    disk_encryption_set_id: str | None = Field(
        default=None,
        description="Resource id of a disk encryption set (customer-managed keys); default: "
        "Azure's platform-managed keys.",
    )
    tags: dict[str, str] = Field(
        default_factory=dict, description="Extra tags on every resource of the stack."
    )

    @field_validator("admin_user")
    @classmethod
    def _not_reserved(cls, user: str) -> str:
        if user in RESERVED_ADMIN_USERS:
            raise ValueError(f"Azure does not allow {user!r} as admin user; pick e.g. gpufleet")
        return user

    @field_validator("ssh_public_key")
    @classmethod
    def _public_key(cls, key: str) -> str:
        if "PRIVATE KEY" in key:
            raise ValueError("that is a private key; give the public key (.pub) only")
        if not key.startswith(("ssh-rsa ", "ssh-ed25519 ", "ecdsa-sha2-", "sk-")):
            raise ValueError(f"{key[:20]!r}... is not an OpenSSH public key (ssh-ed25519 ...)")
        return key.strip()

    @model_validator(mode="after")
    def _network(self) -> AzureEnvironment:
        spaces = [ipaddress.IPv4Network(prefix) for prefix in self.address_space]
        for index, space in enumerate(spaces):
            for other_index, other in enumerate(spaces[:index]):
                if space.overlaps(other):
                    raise FieldValueError(
                        ("address_space", index),
                        f"{space} overlaps address_space[{other_index}] {other}; "
                        "give the VNet disjoint prefixes",
                    )
        seen: list[tuple[int, ipaddress.IPv4Network]] = []
        for index, subnet in enumerate(self.subnets):
            prefix = ipaddress.IPv4Network(subnet.prefix)
            where: FieldPath = ("subnets", index, "prefix")
            if not any(prefix.subnet_of(space) for space in spaces):
                raise FieldValueError(
                    where,
                    f"{prefix} is outside the address space ({', '.join(self.address_space)}); "
                    "move the subnet or widen address_space",
                )
            for other_index, other in seen:
                if prefix.overlaps(other):
                    raise FieldValueError(
                        where,
                        f"subnet {subnet.name} ({prefix}) overlaps subnet "
                        f"{self.subnets[other_index].name} ({other}); give each its own prefix",
                    )
            if any(subnet.name == self.subnets[i].name for i, _ in seen):
                raise FieldValueError(("subnets", index, "name"), "subnet names must be unique")
            seen.append((index, prefix))
        return self

    def subnet_names(self) -> list[str]:
        return [subnet.name for subnet in self.subnets]


class AzureGpuRequest(SpecModel):
    """GPUs by family and count: the catalog's smallest size that has them."""

    model: GpuFamily = Field(description="GPU family: t4, a10 or h100.")
    count: int = Field(default=1, ge=1, le=16, description="GPUs (devices the guest sees).")
    allow_fraction: bool = Field(
        default=False,
        description="Accept a share of a GPU (the smaller NVadsA10_v5 sizes: 1/6, 1/3, 1/2 of "
        "an A10) when count is 1.",
    )
    min_gpu_memory_gib: int = Field(
        default=0, ge=0, description="GPU memory the size must have at least (all GPUs)."
    )


class AzureImage(SpecModel):
    """A marketplace image, with the VM generation it boots."""

    publisher: str = Field(min_length=1)
    offer: str = Field(min_length=1)
    sku: str = Field(min_length=1)
    version: str = "latest"
    generation: VmGeneration = Field(description="1 (BIOS) or 2 (UEFI): read it off the sku.")


# Canonical's Ubuntu images on Azure (`az vm image list --publisher Canonical --all`).
UBUNTU_IMAGES: dict[str, AzureImage] = {
    "ubuntu-22.04": AzureImage(
        publisher="Canonical",
        offer="0001-com-ubuntu-server-jammy",
        sku="22_04-lts-gen2",
        generation=2,
    ),
    "ubuntu-22.04-gen1": AzureImage(
        publisher="Canonical", offer="0001-com-ubuntu-server-jammy", sku="22_04-lts", generation=1
    ),
    "ubuntu-24.04": AzureImage(
        publisher="Canonical", offer="ubuntu-24_04-lts", sku="server", generation=2
    ),
    "ubuntu-24.04-gen1": AzureImage(
        publisher="Canonical", offer="ubuntu-24_04-lts", sku="server-gen1", generation=1
    ),
}
ImageName = Literal["ubuntu-22.04", "ubuntu-24.04", "ubuntu-22.04-gen1", "ubuntu-24.04-gen1"]


class AzureSpot(SpecModel):
    """Run the VM on spare capacity: cheaper, and Azure may take it back (evict it)."""

    eviction_policy: Literal["Deallocate", "Delete"] = Field(
        default="Deallocate",
        description="Deallocate keeps the disks (the VM can be started again); Delete drops "
        "the VM and its disks.",
    )
    max_price: float = Field(
        default=-1,
        description="Highest price in USD per hour; -1: up to the regular price (evicted for "
        "capacity only).",
    )

    @field_validator("max_price")
    @classmethod
    def _price(cls, price: float) -> float:
        if price != -1 and price <= 0:
            raise ValueError("use -1 (up to the regular price) or a price above 0 (USD/hour)")
        return price


class AzureVm(SpecModel):
    """How a host's VM is made on Azure."""

    gpu: AzureGpuRequest | None = Field(
        default=None, description="GPUs wanted: the catalog's smallest size with them."
    )
    size: str | None = Field(
        default=None, description="An exact size from the catalog, e.g. Standard_NC40ads_H100_v5."
    )
    subnet: str | None = Field(
        default=None, description="Subnet name from gpufleet:azure.subnets; default the first."
    )
    zone: Literal["1", "2", "3"] | None = Field(
        default=None, description="Availability zone; none lets Azure place the VM."
    )
    image: ImageName | AzureImage = Field(
        default="ubuntu-24.04",
        description="ubuntu-22.04 or ubuntu-24.04 (Gen2; -gen1 variants for Gen1), or a "
        "marketplace image {publisher, offer, sku, version, generation}.",
    )
    os_disk_gb: int = Field(default=128, ge=30, le=4095)
    data_disk_gb: int = Field(
        default=256, ge=4, le=32767, description="Managed data disk for the model repository."
    )
    data_disk_sku: Literal["Premium_LRS", "Premium_ZRS", "StandardSSD_LRS", "StandardSSD_ZRS"] = (
        "Premium_LRS"
    )
    spot: AzureSpot | None = Field(
        default=None, description="Run as a spot VM with this eviction policy; none: regular."
    )
    secure_boot: bool | None = Field(
        default=None,
        description="Secure Boot under Trusted Launch; default on, off where the size's driver "
        "family needs it (GRID). Off is refused where the driver allows it on.",
    )
    encryption_at_host: bool = Field(
        default=False,
        description="Also encrypt temp disks and caches on the host (the subscription must have "
        "the EncryptionAtHost feature registered).",
    )
    public_ip: bool = Field(
        default=False, description="Give the VM a public IP (SSH still only from the listed CIDRs)."
    )

    @field_validator("size")
    @classmethod
    def _known_size(cls, name: str | None) -> str | None:
        if name is None:
            return None
        size = find_size(name)
        if size is None:
            close = similar_size_names(name)
            hint = f"did you mean {', '.join(close)}?" if close else "or ask by gpu: {model, count}"
            raise ValueError(f"{name!r} is not in gpufleet's GPU size catalog; {hint}")
        return size.name

    @model_validator(mode="after")
    def _size_image_secure_boot(self) -> AzureVm:
        if (self.gpu is None) == (self.size is None):
            raise ValueError("give either gpu: {model, count} or size: <Azure VM size>")
        size = self._resolve()
        image = self.resolved_image
        if image.generation not in size.generations:
            raise FieldValueError(
                ("image",),
                f"{size.name} supports Gen{'/'.join(map(str, sorted(size.generations)))} images "
                f"only and this image is Gen{image.generation}; use ubuntu-22.04 or ubuntu-24.04",
            )
        if image.generation != 2:
            raise FieldValueError(
                ("image",),
                "Trusted Launch (Secure Boot, vTPM) needs a Gen2 image; use ubuntu-22.04 or "
                "ubuntu-24.04",
            )
        if self.secure_boot is True and not size.secure_boot_allowed:
            raise FieldValueError(
                ("secure_boot",),
                f"{size.name} needs NVIDIA's {size.driver_family.upper()} driver, which does not "
                "load with Secure Boot on; set secure_boot: false or leave it out",
            )
        if self.secure_boot is False and size.secure_boot_allowed:
            raise FieldValueError(
                ("secure_boot",),
                f"{size.name} runs the datacenter driver, which Ubuntu ships signed: Secure Boot "
                "stays on; remove secure_boot: false (and set host_config.secure_boot: signed)",
            )
        return self

    def _resolve(self) -> GpuSize:
        if self.size is not None:
            found = find_size(self.size)
            assert found is not None  # the field's validator
            return found
        assert self.gpu is not None
        request = self.gpu
        found = smallest_size(
            request.model,
            request.count,
            allow_fraction=request.allow_fraction,
            min_gpu_memory_gib=request.min_gpu_memory_gib,
        )
        if found is None:
            closest = ", ".join(
                size.describe() for size in closest_sizes(request.model, request.count)
            )
            memory = (
                f" with {request.min_gpu_memory_gib} GiB GPU memory"
                if request.min_gpu_memory_gib
                else ""
            )
            raise FieldValueError(
                ("gpu",),
                f"no Azure size in the catalog has {request.count} {request.model} GPU(s){memory}; "
                f"closest: {closest}; ask for one of those or give size:",
            )
        return found

    @property
    def resolved_size(self) -> GpuSize:
        return self._resolve()

    @property
    def resolved_image(self) -> AzureImage:
        if isinstance(self.image, str):
            return UBUNTU_IMAGES[self.image]
        return self.image

    @property
    def secure_boot_enabled(self) -> bool:
        if self.secure_boot is not None:
            return self.secure_boot
        return self.resolved_size.secure_boot_allowed


def check_azure_stack(stack: StackSpec) -> None:
    """StackSpec's checks of an azure stack (and that other stacks carry no azure settings).

    A host's `gpus` (what Ansible's driver role and the host gate expect) is derived from its
    size when left out and must agree with it when given; its `ssh_user` is the admin user.
    """
    from gpufleet.spec.hosts import GpuRequest  # hosts imports this module

    if stack.environment != "azure":
        if stack.azure is not None or any(host.azure for host in stack.hosts):
            raise ValueError("azure settings belong to azure stacks only")
        return
    environment = stack.azure
    if environment is None:
        raise ValueError(
            "an azure stack needs gpufleet:azure (location, resource_group, owner, "
            "ssh_source_cidrs, ssh_public_key)"
        )
    if not stack.hosts:
        raise ValueError("an azure stack lists its VMs under gpufleet:hosts")
    for index, host in enumerate(stack.hosts):
        if host.azure is None:
            raise FieldValueError(
                ("hosts", index), f"{host.name}: an azure host needs an azure block (gpu or size)"
            )
        vm = host.azure
        size = vm.resolved_size
        if vm.subnet is not None and vm.subnet not in environment.subnet_names():
            raise FieldValueError(
                ("hosts", index, "azure", "subnet"),
                f"no subnet named {vm.subnet!r} (subnets: {', '.join(environment.subnet_names())})",
            )
        expected = GpuRequest(model=size.family, count=size.gpu_count, nvswitch=size.nvswitch)
        if host.gpus is None:
            object.__setattr__(host, "gpus", expected)  # frozen: derived once, while validating
        elif (host.gpus.model, host.gpus.count, host.gpus.has_nvswitch) != (
            expected.model,
            expected.count,
            expected.has_nvswitch,
        ):
            raise FieldValueError(
                ("hosts", index, "gpus"),
                f"{size.describe()} has {expected.count} {expected.model} GPU(s)"
                f"{' on NVSwitch' if expected.has_nvswitch else ''}, not what gpus says; "
                "make them agree or leave gpus out (it is derived from the size)",
            )
        if "ssh_user" not in host.model_fields_set:
            object.__setattr__(host, "ssh_user", environment.admin_user)
        elif host.ssh_user != environment.admin_user:
            raise FieldValueError(
                ("hosts", index, "ssh_user"),
                f"Azure VMs have one login, gpufleet:azure.admin_user "
                f"({environment.admin_user}); leave ssh_user out or make them agree",
            )
        if vm.secure_boot_enabled and stack.host_config.secure_boot == "fail":
            raise FieldValueError(
                ("host_config", "secure_boot"),
                f"{host.name} boots with Secure Boot on ({size.name}), where the driver role "
                "stops unless it installs Ubuntu's signed modules; set "
                "gpufleet:host_config.secure_boot: signed",
            )


def azure_warnings(stack: StackSpec) -> list[tuple[FieldPath, str]]:
    """What an operator should know before `pulumi up` of a valid azure stack (field path,
    message): hosts that run with Secure Boot off, and drivers gpufleet does not install."""
    warnings: list[tuple[FieldPath, str]] = []
    if stack.environment != "azure":
        return warnings
    for index, host in enumerate(stack.hosts):
        if host.azure is None:
            continue
        size = host.azure.resolved_size
        if not host.azure.secure_boot_enabled:
            warnings.append(
                (
                    ("hosts", index, "azure"),
                    f"{host.name}: Secure Boot is off: {size.name} needs NVIDIA's "
                    f"{size.driver_family.upper()} driver, which does not load with Secure "
                    "Boot on (Trusted Launch keeps vTPM and boot integrity monitoring)",
                )
            )
        if size.driver_family == "grid":
            warnings.append(
                (
                    ("hosts", index, "azure"),
                    f"{host.name}: the nvidia_driver role installs datacenter drivers only; "
                    f"install the GRID driver on {size.name} with Azure's NVIDIA GPU Driver "
                    "Extension before `gpufleet configure` (docs/azure.md)",
                )
            )
    return warnings
