"""Security policy as tests: every resource the program registers, in every azure stack file of
stacks/, against the rules of docs/azure.md. Each rule is a function that lists violations;
the same functions are shown to catch a violation planted in otherwise good resources.

Real: the program, pulumi-azure-native's resource classes, the Pulumi SDK, the stack files and
the GPU size catalog. Mocked: the Pulumi engine and Azure (`pulumi.runtime.set_mocks`).
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pulumi_azure_native as azure_native
import pytest
import yaml

from gpufleet.spec.azure import OPEN_SOURCES, UBUNTU_IMAGES, azure_warnings
from gpufleet.spec.azure_sizes import find_size
from gpufleet.spec.loading import load_stack_spec
from gpufleet.spec.stack import StackSpec
from tests.azure_mocks import AzureMocks, run_program, walk
from tests.conftest import PROJECT_ROOT

Resources = list[Any]  # pulumi.runtime.MockResourceArgs
SERVING_PORTS = [8000, 8001, 8002, 5000, 3000, 9090]
PLATFORM_OR_BETTER = {
    "EncryptionAtRestWithPlatformKey",
    "EncryptionAtRestWithCustomerKey",
    "EncryptionAtRestWithPlatformAndCustomerKeys",
}


def azure_stacks() -> list[str]:
    stacks = []
    for path in sorted((PROJECT_ROOT / "stacks").glob("Pulumi.*.yaml")):
        config = yaml.safe_load(path.read_text())["config"]
        if config.get("gpufleet:environment") == "azure":
            stacks.append(path.name[len("Pulumi.") : -len(".yaml")])
    return stacks


AZURE_STACKS = azure_stacks()


def of_type(resources: Resources, suffix: str) -> Resources:
    return [r for r in resources if r.typ == f"azure-native:{suffix}"]


# --- the rules ----------------------------------------------------------------------------


def _sources(rule: dict[str, Any]) -> list[str]:
    return [
        *rule.get("sourceAddressPrefixes", []),
        *filter(None, [rule.get("sourceAddressPrefix")]),
    ]


def _covers(rule: dict[str, Any], port: int) -> bool:
    ranges = [
        *rule.get("destinationPortRanges", []),
        *filter(None, [rule.get("destinationPortRange")]),
    ]
    for text in ranges:
        if text == "*":
            return True
        low, _, high = text.partition("-")
        if int(low) <= port <= int(high or low):
            return True
    return False


# Azure's default inbound rules, under every NSG's own ("Default security rules" in Azure's
# network security group docs). They cannot be removed, only overridden by a lower number.
AZURE_DEFAULT_INBOUND = [
    {
        "name": "AllowVnetInBound",
        "priority": 65000,
        "access": "Allow",
        "sourceAddressPrefix": "VirtualNetwork",  # also peered VNets and VPN-connected ranges
    },
    {"name": "AllowAzureLoadBalancerInBound", "priority": 65001, "access": "Allow",
     "sourceAddressPrefix": "AzureLoadBalancer"},
    {"name": "DenyAllInBound", "priority": 65500, "access": "Deny", "sourceAddressPrefix": "*"},
]  # fmt: skip
for _default in AZURE_DEFAULT_INBOUND:
    _default.update(direction="Inbound", protocol="*", destinationPortRange="*")
OTHER_PORTS = [1, 80, 443, 2375, 6379, 10250]  # a sample of what nothing should reach


@dataclass(frozen=True)
class Source:
    """Where a connection comes from: its address and the service tags Azure counts it in."""

    what: str
    address: ipaddress.IPv4Address | None
    tags: frozenset[str]


def probe_sources(spec: StackSpec) -> list[Source]:
    """One source of each kind the policy must tell apart."""
    assert spec.azure is not None
    listed = [
        ipaddress.IPv4Network(p) for p in [*spec.azure.address_space, *spec.azure.ssh_source_cidrs]
    ]
    outside = [
        ipaddress.IPv4Address(a)
        for a in ("172.16.99.9", "172.31.7.7", "192.168.77.7", "203.0.113.7", "192.0.2.7")
        if not any(ipaddress.IPv4Address(a) in network for network in listed)
    ]
    private = [a for a in outside if _reached_through_vnet(a)]
    public = [a for a in outside if not _reached_through_vnet(a)]
    vnet, internet = frozenset({"VirtualNetwork"}), frozenset({"Internet"})
    sources = [
        Source("the internet", public[0], internet),
        Source("a peered or VPN-connected network", private[0], vnet),
        Source("Azure's load balancer", None, frozenset({"AzureLoadBalancer"})),
    ]
    for space in spec.azure.address_space:
        sources.append(Source(f"address space {space}", ipaddress.IPv4Network(space)[4], vnet))
    for cidr in map(ipaddress.IPv4Network, spec.azure.ssh_source_cidrs):
        tags = vnet if _reached_through_vnet(cidr[0]) else internet
        sources.append(Source(f"ssh source {cidr}", cidr[-2], tags))
    return sources


def _reached_through_vnet(address: ipaddress.IPv4Address) -> bool:
    """RFC 1918 ranges reach a VNet only through peering or a VPN, so Azure counts them in the
    VirtualNetwork tag; anything else comes from the internet."""
    private = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
    return any(address in ipaddress.IPv4Network(network) for network in private)


def _matches(rule: dict[str, Any], source: Source) -> bool:
    for prefix in _sources(rule):
        if prefix == "*" or prefix in source.tags:
            return True
        numeric = prefix[0].isdigit() and source.address is not None
        if numeric and source.address in ipaddress.ip_network(prefix, strict=False):
            return True
    return False


def deciding_rule(rules: list[dict[str, Any]], source: Source, port: int) -> dict[str, Any]:
    """The rule Azure applies to a TCP connection from `source` to `port`: the matching one with
    the lowest priority number, among the NSG's rules and Azure's defaults."""
    inbound = [r for r in [*rules, *AZURE_DEFAULT_INBOUND] if r["direction"] == "Inbound"]
    inbound.sort(key=lambda r: r["priority"])
    return next(
        r
        for r in inbound
        if r.get("protocol", "*") in ("*", "Tcp") and _matches(r, source) and _covers(r, port)
    )


def nsg_violations(resources: Resources, spec: StackSpec) -> list[str]:
    """Azure's defaults included: SSH only from the listed CIDRs, serving ports only from the
    stack's address space, nothing else from anywhere; no rule allows an open source."""
    assert spec.azure is not None
    found = []
    groups = of_type(resources, "network:NetworkSecurityGroup")
    if not groups:
        found.append("no network security group")
    ssh_cidrs = [ipaddress.IPv4Network(c) for c in spec.azure.ssh_source_cidrs]
    spaces = [ipaddress.IPv4Network(s) for s in spec.azure.address_space]
    for group in groups:
        rules = group.inputs.get("securityRules", [])
        for rule in rules:
            opened = [s for s in _sources(rule) if s.lower() in OPEN_SOURCES]
            if rule["direction"] == "Inbound" and rule["access"] == "Allow" and opened:
                found.append(f"{group.name}: rule {rule['name']} allows {opened[0]}")
        for source in probe_sources(spec):
            address = source.address
            for port in [22, *SERVING_PORTS, *OTHER_PORTS]:
                if port == 22:
                    wanted = address is not None and any(address in c for c in ssh_cidrs)
                else:
                    inside = address is not None and any(address in s for s in spaces)
                    wanted = port in SERVING_PORTS and inside
                rule = deciding_rule(rules, source, port)
                allowed = rule["access"] == "Allow"
                if allowed and not wanted:
                    found.append(f"{group.name}: {source.what} reaches {port} ({rule['name']})")
                elif wanted and not allowed:
                    found.append(
                        f"{group.name}: {source.what} cannot reach {port} ({rule['name']})"
                    )
    for subnet in of_type(resources, "network:Subnet"):
        if "networkSecurityGroup" not in subnet.inputs:
            found.append(f"{subnet.name}: subnet without the NSG")
    return found


def public_ip_violations(resources: Resources, spec: StackSpec) -> list[str]:
    """Public IPs only where the spec asks: a host's `public_ip: true`, and the NAT gateway's
    outbound-only address when `outbound: nat_gateway`."""
    assert spec.azure is not None
    wanted = {f"{h.name}-pip" for h in spec.hosts if h.azure and h.azure.public_ip}
    nat_ips = set()
    for gateway in of_type(resources, "network:NatGateway"):
        nat_ips |= {ref["id"].rsplit("/", 1)[-1] for ref in gateway.inputs["publicIpAddresses"]}
    if spec.azure.outbound != "nat_gateway" and nat_ips:
        return [f"NAT gateway addresses {sorted(nat_ips)} though outbound is none"]
    found = []
    for address in of_type(resources, "network:PublicIPAddress"):
        if address.name not in wanted | nat_ips:
            found.append(f"public IP {address.name} that the spec does not ask for")
    for nic in of_type(resources, "network:NetworkInterface"):
        for configuration in nic.inputs["ipConfigurations"]:
            ref = configuration.get("publicIPAddress")
            if ref and ref["id"].rsplit("/", 1)[-1] not in wanted:
                found.append(f"{nic.name}: public IP {ref['id']} on a host without public_ip")
    return found


def _accepts_tags(typ: str) -> bool:
    """Whether Azure's API (through pulumi-azure-native's args class) lets the type carry tags."""
    _, module, name = typ.split(":")
    args_class = getattr(getattr(azure_native, module), f"{name}Args")
    return "tags" in inspect.signature(args_class.__init__).parameters


def tag_violations(resources: Resources, stack: str) -> list[str]:
    """Every Azure resource that Azure lets carry tags names the stack, the models and owner."""
    found = []
    for resource in resources:
        if not resource.typ.startswith("azure-native:") or not _accepts_tags(resource.typ):
            continue
        tags = resource.inputs.get("tags") or {}
        missing = {"gpufleet-stack", "gpufleet-models", "owner"} - set(tags)
        if missing or tags.get("gpufleet-stack") != stack:
            found.append(f"{resource.name}: tags {tags} lack {sorted(missing) or 'the stack'}")
    return found


def disk_violations(resources: Resources) -> list[str]:
    """Managed disks only, each encrypted at rest with platform keys or better; a VM's data
    disks are Disk resources of this stack (whose encryption is stated)."""
    found = []
    disks = {}
    for disk in of_type(resources, "compute:Disk"):
        kind = disk.inputs.get("encryption", {}).get("type")
        if kind not in PLATFORM_OR_BETTER:
            found.append(f"{disk.name}: encryption {kind!r}")
        disks[disk.name] = disk
    for vm in of_type(resources, "compute:VirtualMachine"):
        storage = vm.inputs["storageProfile"]
        os_disk = storage["osDisk"]
        if "vhd" in os_disk or "managedDisk" not in os_disk:
            found.append(f"{vm.name}: OS disk is not a managed disk (no encryption at rest)")
        for data in storage.get("dataDisks", []):
            name = data.get("managedDisk", {}).get("id", "").rsplit("/", 1)[-1]
            if data.get("createOption") != "Attach" or name not in disks:
                found.append(f"{vm.name}: data disk at LUN {data.get('lun')} is not a stack Disk")
    return found


def login_violations(resources: Resources) -> list[str]:
    """Key-only SSH: password authentication disabled, no password anywhere."""
    found = []
    for vm in of_type(resources, "compute:VirtualMachine"):
        profile = vm.inputs["osProfile"]
        linux = profile.get("linuxConfiguration", {})
        if linux.get("disablePasswordAuthentication") is not True:
            found.append(f"{vm.name}: password authentication is not disabled")
        if not linux.get("ssh", {}).get("publicKeys"):
            found.append(f"{vm.name}: no SSH public key")
        if any(isinstance(v, dict) and "adminPassword" in v for v in walk(vm.inputs)):
            found.append(f"{vm.name}: an admin password is set")
    return found


def _generation(image: dict[str, Any], spec: StackSpec) -> int | None:
    candidates = list(UBUNTU_IMAGES.values())
    candidates += [h.azure.resolved_image for h in spec.hosts if h.azure]
    for known in candidates:
        if (known.publisher, known.offer, known.sku) == (
            image["publisher"],
            image["offer"],
            image["sku"],
        ):
            return known.generation
    return None


def size_violations(resources: Resources, spec: StackSpec) -> list[str]:
    """Sizes from the catalog; the image's generation one the size supports; Trusted Launch;
    Secure Boot off exactly where the size's driver family needs it, and then warned."""
    warned = " ".join(message for _, message in azure_warnings(spec))
    found = []
    for vm in of_type(resources, "compute:VirtualMachine"):
        size = find_size(vm.inputs["hardwareProfile"]["vmSize"])
        if size is None:
            found.append(
                f"{vm.name}: size {vm.inputs['hardwareProfile']['vmSize']} not in the catalog"
            )
            continue
        generation = _generation(vm.inputs["storageProfile"]["imageReference"], spec)
        if generation not in size.generations:
            found.append(f"{vm.name}: Gen{generation} image on {size.name}")
        security = vm.inputs.get("securityProfile", {})
        if security.get("securityType") != "TrustedLaunch":
            found.append(f"{vm.name}: not Trusted Launch")
        uefi = security.get("uefiSettings", {})
        if uefi.get("vTpmEnabled") is not True:
            found.append(f"{vm.name}: vTPM off")
        secure_boot = uefi.get("secureBootEnabled")
        if secure_boot is not size.secure_boot_allowed:
            found.append(
                f"{vm.name}: Secure Boot {secure_boot} on {size.name} ({size.driver_family})"
            )
        host = vm.inputs["vmName"]
        if secure_boot is False and f"{host}: Secure Boot is off" not in warned:
            found.append(f"{vm.name}: Secure Boot off without a warning")
    return found


# --- every stack, every resource ----------------------------------------------------------


def test_there_are_azure_stacks_to_check() -> None:
    assert AZURE_STACKS == ["azure-dev", "azure-prod"]


@pytest.fixture(params=AZURE_STACKS)
def program(
    request: pytest.FixtureRequest, pulumi_loop: asyncio.AbstractEventLoop
) -> tuple[str, StackSpec, AzureMocks]:
    stack = request.param
    spec = load_stack_spec(PROJECT_ROOT / "stacks", stack).spec
    mocks, _ = run_program(stack, pulumi_loop)
    assert mocks.resources
    return stack, spec, mocks


def test_no_nsg_rule_opens_anything_to_the_internet(
    program: tuple[str, StackSpec, AzureMocks],
) -> None:
    _, spec, mocks = program
    assert nsg_violations(mocks.resources, spec) == []


def test_no_public_ip_unless_the_spec_asks(program: tuple[str, StackSpec, AzureMocks]) -> None:
    _, spec, mocks = program
    assert public_ip_violations(mocks.resources, spec) == []


def test_every_resource_is_tagged(program: tuple[str, StackSpec, AzureMocks]) -> None:
    stack, _, mocks = program
    assert tag_violations(mocks.resources, stack) == []
    untaggable = {
        r.typ
        for r in mocks.resources
        if r.typ.startswith("azure-native:") and not _accepts_tags(r.typ)
    }
    assert untaggable == {"azure-native:network:Subnet"}, "only subnets, which Azure cannot tag"


def test_every_disk_is_encrypted_at_rest(program: tuple[str, StackSpec, AzureMocks]) -> None:
    _, _, mocks = program
    assert disk_violations(mocks.resources) == []
    assert of_type(mocks.resources, "compute:Disk")


def test_no_password_authentication(program: tuple[str, StackSpec, AzureMocks]) -> None:
    _, _, mocks = program
    assert login_violations(mocks.resources) == []


def test_sizes_images_and_secure_boot_match_the_catalog(
    program: tuple[str, StackSpec, AzureMocks],
) -> None:
    _, spec, mocks = program
    assert size_violations(mocks.resources, spec) == []


# --- the rules catch what they are for ----------------------------------------------------


def _planted(
    mocks: AzureMocks, typ: str, change: Callable[[dict[str, Any]], None], name: str | None = None
) -> Resources:
    """A copy of the registered resources with one resource's inputs changed."""
    resources = copy.deepcopy(mocks.resources)
    target = next(r for r in resources if r.typ == f"azure-native:{typ}" and name in (None, r.name))
    change(target.inputs)
    return resources


def _open_ssh(inputs: dict[str, Any]) -> None:
    inputs["securityRules"][0]["sourceAddressPrefixes"] = ["198.51.100.0/24", "0.0.0.0/0"]


def _open_triton(inputs: dict[str, Any]) -> None:
    inputs["securityRules"].append(
        {
            "name": "triton",
            "priority": 300,
            "direction": "Inbound",
            "access": "Allow",
            "sourceAddressPrefix": "172.16.0.0/12",  # a peered VNet's range
            "destinationPortRange": "8000",
        }
    )


def test_the_rules_catch_planted_violations(pulumi_loop: asyncio.AbstractEventLoop) -> None:
    spec = load_stack_spec(PROJECT_ROOT / "stacks", "azure-dev").spec
    mocks, _ = run_program("azure-dev", pulumi_loop)
    nsg = "network:NetworkSecurityGroup"
    assert nsg_violations(_planted(mocks, nsg, _open_ssh), spec) == [
        "azure-dev-nsg: rule allow-ssh-from-listed-networks allows 0.0.0.0/0",
        "azure-dev-nsg: the internet reaches 22 (allow-ssh-from-listed-networks)",
        "azure-dev-nsg: a peered or VPN-connected network reaches 22 "
        "(allow-ssh-from-listed-networks)",
        "azure-dev-nsg: address space 10.41.0.0/16 reaches 22 (allow-ssh-from-listed-networks)",
    ]
    assert nsg_violations(_planted(mocks, nsg, _open_triton), spec) == [
        "azure-dev-nsg: a peered or VPN-connected network reaches 8000 (triton)"
    ]
    # Without the final deny, Azure's own defaults decide what is left.
    no_deny = _planted(mocks, nsg, lambda i: i["securityRules"].pop())
    assert nsg_violations(no_deny, spec) == [
        *(
            f"azure-dev-nsg: a peered or VPN-connected network reaches {port} (AllowVnetInBound)"
            for port in [22, *SERVING_PORTS, *OTHER_PORTS]
        ),
        *(
            f"azure-dev-nsg: Azure's load balancer reaches {port} (AllowAzureLoadBalancerInBound)"
            for port in [22, *SERVING_PORTS, *OTHER_PORTS]
        ),
        *(
            f"azure-dev-nsg: address space 10.41.0.0/16 reaches {port} (AllowVnetInBound)"
            for port in [22, *OTHER_PORTS]
        ),
    ]

    def deny_first(inputs: dict[str, Any]) -> None:
        inputs["securityRules"][-1]["priority"] = 150

    assert nsg_violations(_planted(mocks, nsg, deny_first), spec) == [
        f"azure-dev-nsg: address space 10.41.0.0/16 cannot reach {port} (deny-all-inbound)"
        for port in SERVING_PORTS
    ]

    def public_on_a10(inputs: dict[str, Any]) -> None:
        inputs["ipConfigurations"][0]["publicIPAddress"] = {"id": "/x/az-dev-a10-frac-pip"}

    resources = _planted(mocks, "network:NetworkInterface", public_on_a10, "az-dev-a10-frac-nic")
    assert public_ip_violations(resources, spec) == [
        "az-dev-a10-frac-nic: public IP /x/az-dev-a10-frac-pip on a host without public_ip"
    ]
    untagged = _planted(mocks, "compute:Disk", lambda i: i.pop("tags"))
    assert len(tag_violations(untagged, "azure-dev")) == 1
    unencrypted = _planted(mocks, "compute:Disk", lambda i: i.update(encryption={}))
    assert disk_violations(unencrypted)[0].endswith("encryption None")
    vm = "compute:VirtualMachine"

    def password(inputs: dict[str, Any]) -> None:
        inputs["osProfile"]["adminPassword"] = "x"  # planted
        inputs["osProfile"]["linuxConfiguration"]["disablePasswordAuthentication"] = False

    assert len(login_violations(_planted(mocks, vm, password))) == 2

    def gen1_and_secure_boot_off(inputs: dict[str, Any]) -> None:
        inputs["storageProfile"]["imageReference"]["sku"] = "server-gen1"
        inputs["hardwareProfile"]["vmSize"] = "Standard_NC40ads_H100_v5"
        inputs["securityProfile"]["uefiSettings"]["secureBootEnabled"] = False

    planted = _planted(mocks, vm, gen1_and_secure_boot_off, name="az-dev-t4-1-vm")
    found = size_violations(planted, spec)
    assert found == [
        "az-dev-t4-1-vm: Gen1 image on Standard_NC40ads_H100_v5",
        "az-dev-t4-1-vm: Secure Boot False on Standard_NC40ads_H100_v5 (datacenter)",
        "az-dev-t4-1-vm: Secure Boot off without a warning",
    ]


# The rules before AllowVnetInBound was taken into account: serving ports open to the
# VirtualNetwork tag and only Internet denied.
OLD_RULES = [
    {"name": "allow-ssh-from-listed-networks", "priority": 100, "access": "Allow",
     "protocol": "Tcp", "sourceAddressPrefixes": ["198.51.100.0/24"], "destinationPortRange": "22"},
    {"name": "allow-serving-inside-vnet", "priority": 200, "access": "Allow", "protocol": "Tcp",
     "sourceAddressPrefix": "VirtualNetwork",
     "destinationPortRanges": ["8000-8002", "5000", "3000", "9090"]},
    {"name": "deny-internet-inbound", "priority": 4096, "access": "Deny", "protocol": "*",
     "sourceAddressPrefix": "Internet", "destinationPortRange": "*"},
]  # fmt: skip


def test_the_policy_catches_the_old_rules_that_left_azures_vnet_default_in_force(
    pulumi_loop: asyncio.AbstractEventLoop,
) -> None:
    """SSH and every port open to peered and VPN-connected networks through AllowVnetInBound,
    though each explicit rule looked right."""
    spec = load_stack_spec(PROJECT_ROOT / "stacks", "azure-dev").spec
    mocks, _ = run_program("azure-dev", pulumi_loop)

    def old_rules(inputs: dict[str, Any]) -> None:
        inputs["securityRules"] = [{**rule, "direction": "Inbound"} for rule in OLD_RULES]

    found = nsg_violations(_planted(mocks, "network:NetworkSecurityGroup", old_rules), spec)
    peered = "azure-dev-nsg: a peered or VPN-connected network reaches"
    assert f"{peered} 22 (AllowVnetInBound)" in found
    assert f"{peered} 8000 (allow-serving-inside-vnet)" in found
    assert f"{peered} 6379 (AllowVnetInBound)" in found
    assert (
        "azure-dev-nsg: Azure's load balancer reaches 22 (AllowAzureLoadBalancerInBound)" in found
    )
    assert not any("the internet reaches" in line for line in found)  # what the old tests saw


def test_stack_files_are_found_by_environment_not_by_name(tmp_path: Path) -> None:
    """A new azure stack file is checked without touching this test."""
    assert all((PROJECT_ROOT / "stacks" / f"Pulumi.{s}.yaml").is_file() for s in AZURE_STACKS)
    assert "onprem-prod" not in AZURE_STACKS
