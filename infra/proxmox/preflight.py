"""Preflight: is the Proxmox cluster ready for a stack's VMs? Every problem at once, one line each.

    problems = run_preflight(spec, api, stack="onprem-prod")   # [] means ready

It only reads the API; nothing is changed. It checks that:

- each host's node is in the cluster and online;
- the template exists, is a template, is on an online node and can be cloned to each host's node
  (PVE clones to another node only from shared storage);
- the storage exists, is enabled and active on each node a host uses, holds VM images, and has
  room for the new VMs' disks (summed over the cluster for shared storage);
- each GPU: its resource mapping exists and maps a device on the host's node, or its raw address
  is a device of the node; IOMMU is on; its IOMMU group holds no other device (functions of the
  same card aside) that another VM or another host of the stack passes through; and no other VM
  passes the device or the mapping through already;
- the login holds each privilege provisioning needs, on its path.

An API that cannot be used (no connection, TLS not verified, login refused) is one problem and
ends the checks. Any other failing call is one problem with PVE's words, and only the checks
that needed its answer are skipped. VMs of the stack itself (tagged `gpufleet-<stack>`, or
named like one of its hosts) are not "other VMs", and their disks are not counted again. A login
sees only the VMs it may audit: devices of VMs it cannot see are not checked.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxmoxer import ProxmoxAPI  # type: ignore[import-untyped]

from gpufleet.spec.hosts import HostSpec
from gpufleet.spec.proxmox import ProxmoxCluster, ProxmoxVm
from gpufleet.spec.stack import StackSpec
from infra.proxmox.client import (
    ProxmoxApiError,
    ProxmoxError,
    ProxmoxUnreachable,
    api_get,
    close,
    connect,
)

GIB = 1024**3
STACK_TAG_PREFIX = "gpufleet-"
# What creating a host's VM takes on /vms (PVE's privilege names) and why.
VM_PRIVILEGES = (
    ("VM.Allocate", "create the hosts' VMs"),
    ("VM.Audit", "read the VMs back"),
    ("VM.Config.CPU", "set the VMs' cores"),
    ("VM.Config.Memory", "set the VMs' memory"),
    ("VM.Config.Disk", "grow the VMs' disks"),
    ("VM.Config.Network", "attach the VMs' network"),
    ("VM.Config.Cloudinit", "set the VMs' cloud-init user, keys and addresses"),
    ("VM.Config.Options", "name and tag the VMs"),
    ("VM.Config.HWType", "set q35, OVMF and the GPUs' hostpci entries"),
    ("VM.PowerMgmt", "start the VMs"),
    # PVE 9's name; the guest agent's answer is how a new VM's address becomes known.
    ("VM.GuestAgent.Audit", "read the VMs' addresses from the guest agent"),
)
# A built-in role that holds each privilege, for the "grant it" hint.
ROLE_FOR_PREFIX = (
    ("VM.", "PVEVMAdmin"),
    ("Datastore.", "PVEDatastoreUser"),
    ("Mapping.", "PVEMappingUser"),
    ("SDN.", "PVESDNUser"),
)
_DRIVE_KEY = re.compile(r"^(ide|sata|scsi|virtio)\d+$|^(efidisk|tpmstate)0$")
_HOSTPCI_KEY = re.compile(r"^hostpci\d+$")
_PCI = re.compile(r"^(?:([0-9a-f]{4}):)?([0-9a-f]{2}):([0-9a-f]{2})(?:\.([0-7]))?$")


@dataclass(frozen=True)
class PciAddress:
    """A PCI address; no function means every function of the card (`0000:41:00`)."""

    domain: str
    bus: str
    slot: str
    function: str | None

    @classmethod
    def parse(cls, text: str) -> PciAddress | None:
        found = _PCI.match(text.strip().lower())
        if found is None:
            return None
        domain, bus, slot, function = found.groups()
        return cls(domain or "0000", bus, slot, function)

    def same_card(self, other: PciAddress) -> bool:
        return (self.domain, self.bus, self.slot) == (other.domain, other.bus, other.slot)

    def overlaps(self, other: PciAddress) -> bool:
        functions = (self.function, other.function)
        return self.same_card(other) and (None in functions or self.function == other.function)

    def __str__(self) -> str:
        card = f"{self.domain}:{self.bus}:{self.slot}"
        return card if self.function is None else f"{card}.{self.function}"


# PCI resource mapping name -> [(node, device addresses)], one entry per mapped device.
Mappings = dict[str, list[tuple[str, tuple[PciAddress, ...]]]]


@dataclass(frozen=True)
class Vm:
    """A guest as /cluster/resources lists it (kind qemu, or lxc for a container)."""

    vmid: int
    kind: str
    node: str
    name: str
    status: str
    template: bool
    tags: frozenset[str]

    @property
    def label(self) -> str:
        return f"VM {self.vmid} ({self.name}, {self.status})"


@dataclass(frozen=True)
class PciDevice:
    """A device of a node (nodes/{node}/hardware/pci); group -1 means IOMMU is off."""

    address: PciAddress
    group: int


@dataclass(frozen=True)
class Passthrough:
    """A hostpciN of another VM: its mapping (if mapped) and the devices it takes on its node."""

    vm: Vm
    key: str
    mapping: str | None
    addresses: tuple[PciAddress, ...]

    @property
    def label(self) -> str:
        return f"{self.vm.label[:-1]}, {self.key})"


@dataclass(frozen=True)
class GpuRequest:
    """One PCI device a host of the stack asks for, and the node devices that could serve it."""

    host: HostSpec
    index: int
    mapping: str | None
    candidates: tuple[PciAddress, ...]

    @property
    def node(self) -> str:
        return _vm(self.host).node

    @property
    def label(self) -> str:
        what = f"PCI mapping {self.mapping}" if self.mapping else f"PCI device {self.candidates[0]}"
        return f"host {self.host.name} (node {self.node}): {what}"


def check_stack(
    spec: StackSpec, secret: str, *, project_root: Path, stack: str | None = None
) -> list[str]:
    """Connect to the stack's cluster (TLS verified) and run the preflight; [] = ready.

    A connection that cannot be made is the one problem returned.
    """
    if spec.proxmox is None:
        raise ValueError("preflight checks proxmox stacks only")
    try:
        api = connect(spec.proxmox, secret, project_root=project_root)
    except ProxmoxError as error:
        return [str(error)]
    try:
        return run_preflight(spec, api, stack=stack)
    finally:
        close(api)


def run_preflight(spec: StackSpec, api: ProxmoxAPI, *, stack: str | None = None) -> list[str]:
    """Every problem that would stop the stack's VMs from being made, one line each; [] = ready.

    `stack` is the stack's name: VMs tagged `gpufleet-<stack>` belong to it.
    """
    if spec.proxmox is None:
        raise ValueError("preflight checks proxmox stacks only")
    return _Preflight(spec.proxmox, spec.hosts, api, stack).run()


class _Preflight:
    """One run: the answers read so far and the problems found."""

    def __init__(
        self, cluster: ProxmoxCluster, hosts: Sequence[HostSpec], api: ProxmoxAPI, stack: str | None
    ) -> None:
        self.cluster = cluster
        self.hosts = list(hosts)
        self.api = api
        self.stack = stack
        self.problems: list[str] = []
        self.node_status: dict[str, str] = {}
        self._storage_answers: dict[tuple[str, str], dict[str, Any] | ProxmoxApiError] = {}

    def run(self) -> list[str]:
        try:
            self._probe()
            online = self._check_nodes()
            vms = self._read_vms()
            if vms is not None:
                self._check_template(vms, online)
            self._check_storage(online, vms or [])
            self._check_gpus(online, vms)
            self._check_privileges()
        except ProxmoxUnreachable as error:
            self.problems.append(str(error))
        return list(dict.fromkeys(self.problems))

    # ------------------------------------------------------------------ reading

    def _probe(self) -> None:
        try:
            api_get(self.api, "version")
        except ProxmoxApiError as error:
            raise ProxmoxUnreachable(
                f"{self.cluster.endpoint} answered GET /version with {error.reason}: check that "
                "proxmox.endpoint is a Proxmox VE API"
            ) from None

    def _get(self, api_path: str, what: str, /, **params: Any) -> Any:
        """The answer, or None after noting the failed call as a problem."""
        try:
            return api_get(self.api, api_path, **params)
        except ProxmoxApiError as error:
            self.problems.append(self._cannot_read(what, error))
            return None

    def _storage_status(self, node: str, storage: str) -> dict[str, Any] | ProxmoxApiError:
        """nodes/{node}/storage/{storage}/status, read once per run."""
        key = (node, storage)
        if key not in self._storage_answers:
            try:
                answer = api_get(self.api, f"nodes/{node}/storage/{storage}/status")
                self._storage_answers[key] = answer if isinstance(answer, dict) else {}
            except ProxmoxApiError as error:
                self._storage_answers[key] = error
        return self._storage_answers[key]

    @staticmethod
    def _cannot_read(what: str, error: ProxmoxApiError) -> str:
        hint = {
            403: "grant the login that privilege so preflight can check this",
            595: "the API's node cannot reach that node: check the cluster network",
        }.get(error.status_code, "fix what PVE reports and run preflight again")
        return f"cannot read {what} (GET /{error.path}): {error.reason}; {hint}"

    def _read_vms(self) -> list[Vm] | None:
        data = self._get("cluster/resources", "the cluster's VMs", type="vm")
        if data is None:
            return None
        vms = []
        for item in _dicts(data):
            if item.get("type") not in ("qemu", "lxc") or _int(item.get("vmid")) is None:
                continue
            tags = re.split(r"[;,\s]+", str(item.get("tags") or "").lower())
            vms.append(
                Vm(
                    vmid=_int(item.get("vmid")) or 0,
                    kind=str(item["type"]),
                    node=str(item.get("node", "")),
                    name=str(item.get("name", "")),
                    status=str(item.get("status", "unknown")),
                    template=bool(_int(item.get("template"))),
                    tags=frozenset(tag for tag in tags if tag),
                )
            )
        return vms

    def _own(self, vm: Vm) -> bool:
        """Whether the VM is the stack's: tagged gpufleet-<stack>, else named like a host."""
        stack_tags = {tag for tag in vm.tags if tag.startswith(STACK_TAG_PREFIX)}
        if self.stack is not None and stack_tags:
            return f"{STACK_TAG_PREFIX}{self.stack}".lower() in stack_tags
        return vm.name in {host.name for host in self.hosts}

    # -------------------------------------------------------------------- nodes

    def _check_nodes(self) -> set[str]:
        """Problems with the hosts' nodes; the nodes that are online."""
        data = self._get("nodes", "the cluster's nodes")
        if data is None:
            return set()
        self.node_status = {str(item.get("node")): str(item.get("status")) for item in _dicts(data)}
        online = set()
        for node, hosts in _by_node(self.hosts).items():
            status = self.node_status.get(node)
            if status is None:
                known = ", ".join(sorted(self.node_status)) or "none"
                self.problems.append(
                    f"node {node} ({_hosts_text(hosts)}) is not in the cluster (its nodes: "
                    f"{known}): set proxmox.node of {_hosts_text(hosts)} to one of them"
                )
            elif status != "online":
                self.problems.append(
                    f"node {node} ({_hosts_text(hosts)}) is {status}: bring it back online, or "
                    "move the hosts to an online node"
                )
            else:
                online.add(node)
        return online

    # ----------------------------------------------------------------- template

    def _check_template(self, vms: list[Vm], online: set[str]) -> None:
        vmid = self.cluster.template_vmid
        template = next((vm for vm in vms if vm.vmid == vmid), None)
        if template is None:
            self.problems.append(
                f"template {vmid} does not exist (or the login cannot see it: that needs "
                f"VM.Audit on /vms/{vmid}): make one (qm template <vmid>) or set "
                "proxmox.template_vmid to a template's id"
            )
        elif template.kind != "qemu" or not template.template:
            kind = "a container" if template.kind != "qemu" else "not a template"
            self.problems.append(
                f"{template.label} on node {template.node} is {kind}: make the VM a template "
                f"(qm template {vmid}) or set proxmox.template_vmid to a template's id"
            )
        elif self.node_status.get(template.node, "online") != "online":
            self.problems.append(
                f"template {vmid} is on node {template.node}, which is "
                f"{self.node_status[template.node]}: VMs are cloned there, bring it back online"
            )
        else:
            self._check_clone_targets(template, online)

    def _check_clone_targets(self, template: Vm, online: set[str]) -> None:
        """PVE clones to another node only if all the template's disks are on shared storage."""
        elsewhere = {
            node: hosts
            for node, hosts in _by_node(self.hosts).items()
            if node != template.node and node in online
        }
        if not elsewhere:
            return
        path = f"nodes/{template.node}/qemu/{template.vmid}/config"
        config = self._get(path, f"the config of template {template.vmid}")
        if not isinstance(config, dict):
            return
        local = []
        for key, value in sorted(config.items()):
            if not _DRIVE_KEY.match(key) or "media=cdrom" in str(value):
                continue
            volume = str(value).split(",")[0]
            storage = volume.split(":")[0] if ":" in volume else None
            if storage is None:
                local.append(f"{key} ({volume})")
                continue
            status = self._storage_status(template.node, storage)
            if isinstance(status, ProxmoxApiError):
                what = f"storage {storage} on node {template.node}"
                self.problems.append(self._cannot_read(what, status))
            elif not _int(status.get("shared")):
                local.append(f"{key} on {storage}")
        if local:
            hosts = [host for group in elsewhere.values() for host in group]
            self.problems.append(
                f"template {template.vmid} is on node {template.node} with disks on storage that "
                f"is not shared ({', '.join(local)}), so PVE cannot clone it to node(s) "
                f"{', '.join(sorted(elsewhere))} of {_hosts_text(hosts)}: keep the template's "
                "disks on shared storage, or give each node its own template"
            )

    # ------------------------------------------------------------------ storage

    def _check_storage(self, online: set[str], vms: list[Vm]) -> None:
        storage = self.cluster.storage
        made = {vm.name for vm in vms if self._own(vm)}
        missing: list[str] = []
        usable: dict[str, dict[str, Any]] = {}
        for node, hosts in _by_node(self.hosts).items():
            if node not in online:
                continue
            where = f"storage {storage} on node {node} ({_hosts_text(hosts)})"
            status = self._storage_status(node, storage)
            if isinstance(status, ProxmoxApiError):
                reason = status.reason.lower()
                if "no such storage" in reason or "does not exist" in reason:
                    missing.append(node)
                else:
                    what = f"storage {storage} on node {node}"
                    self.problems.append(self._cannot_read(what, status))
            elif not _int(status.get("enabled", 1)):
                self.problems.append(
                    f"{where} is not enabled there (disabled, or its nodes list leaves {node} "
                    "out): enable it on the node or set proxmox.storage to another storage"
                )
            elif not _int(status.get("active", 1)):
                self.problems.append(
                    f"{where} is not active: check what backs it on {node} (pvesm status)"
                )
            elif "images" not in str(status.get("content", "images")).split(","):
                self.problems.append(
                    f"{where} does not hold VM disks (content: {status.get('content')}): add "
                    "'images' to its content or set proxmox.storage to another storage"
                )
            else:
                usable[node] = status
        if missing:
            hosts = [host for host in self.hosts if _vm(host).node in missing]
            self.problems.append(
                f"storage {storage} does not exist on node(s) {', '.join(missing)} "
                f"({_hosts_text(hosts)}): create it or set proxmox.storage to an existing storage"
            )
        self._check_room(usable, made)

    def _check_room(self, usable: dict[str, dict[str, Any]], made: set[str]) -> None:
        """Free space for the disks of hosts whose VM does not exist yet."""
        groups: dict[str, list[HostSpec]] = {}
        for host in self.hosts:
            node = _vm(host).node
            if node in usable and host.name not in made:
                shared = _int(usable[node].get("shared"))
                groups.setdefault("" if shared else node, []).append(host)
        for key, hosts in groups.items():
            status = usable[key or _vm(hosts[0]).node]
            need_gib = sum(_vm(host).disk_gb for host in hosts)
            avail = _int(status.get("avail")) or 0
            if avail < need_gib * GIB:
                where = f"on node {key}" if key else "(shared by the nodes)"
                sizes = ", ".join(f"{host.name} {_vm(host).disk_gb} GiB" for host in hosts)
                self.problems.append(
                    f"storage {self.cluster.storage} {where} has {avail / GIB:.1f} GiB free but "
                    f"the new disks need {need_gib} GiB ({sizes}): free space there, lower "
                    "disk_gb or set proxmox.storage to a storage with room"
                )

    # --------------------------------------------------------------------- GPUs

    def _check_gpus(self, online: set[str], vms: list[Vm] | None) -> None:
        hosts = [host for host in self.hosts if _vm(host).pci and _vm(host).node in online]
        if not hosts:
            return
        mappings = self._read_mappings()
        devices = {}
        for node in sorted({_vm(host).node for host in hosts}):
            found = self._read_devices(node)
            if found is not None:
                devices[node] = found
        others = self._read_passthroughs(vms, {_vm(host).node for host in hosts}, mappings)
        requests = self._requests(hosts, mappings)
        for request in requests:
            node_devices = devices.get(request.node)
            if node_devices is not None:
                self._check_device(request, node_devices, others, requests)
            if request.mapping is None:
                self._check_raw_users(request, others)
        if mappings is not None:
            self._check_mapping_capacity(requests, mappings, others)
        self._check_shared_within_stack(requests)

    def _read_mappings(self) -> Mappings | None:
        """Mapping name -> [(node, device addresses)], or None when they cannot be read."""
        data = self._get("cluster/mapping/pci", "the PCI resource mappings")
        if data is None:
            return None
        mappings: Mappings = {}
        for item in _dicts(data):
            entries = mappings.setdefault(str(item.get("id")), [])
            for entry in item.get("map") or []:
                props = _properties(str(entry))
                entries.append((props.get("node", ""), _addresses(props.get("path", ""))))
        return mappings

    def _read_devices(self, node: str) -> list[PciDevice] | None:
        data = self._get(f"nodes/{node}/hardware/pci", f"the PCI devices of node {node}")
        if data is None:
            return None
        devices = []
        for item in _dicts(data):
            address = PciAddress.parse(str(item.get("id", "")))
            group = _int(item.get("iommugroup"))
            if address is not None:
                devices.append(PciDevice(address, -1 if group is None else group))
        return devices

    def _read_passthroughs(
        self,
        vms: list[Vm] | None,
        nodes: set[str],
        mappings: Mappings | None,
    ) -> list[Passthrough]:
        """The hostpciN of every other VM (not a template, not the stack's) on these nodes."""
        found = []
        for vm in vms or []:
            if vm.node not in nodes or vm.kind != "qemu" or vm.template or self._own(vm):
                continue
            path = f"nodes/{vm.node}/qemu/{vm.vmid}/config"
            config = self._get(path, f"the config of {vm.label} to see its PCI devices")
            if not isinstance(config, dict):
                continue
            for key, value in sorted(config.items()):
                if not _HOSTPCI_KEY.match(key):
                    continue
                props = _properties(str(value), first_key="host")
                mapping = props.get("mapping")
                addresses = _addresses(props.get("host", ""))
                if mapping and mappings:
                    addresses += tuple(
                        address
                        for node, paths in mappings.get(mapping, [])
                        if node == vm.node
                        for address in paths
                    )
                found.append(Passthrough(vm, key, mapping, addresses))
        return found

    def _requests(
        self,
        hosts: list[HostSpec],
        mappings: Mappings | None,
    ) -> list[GpuRequest]:
        """The hosts' devices; a mapping that is missing or absent on the node is a problem."""
        requests = []
        for host in hosts:
            node = _vm(host).node
            for index, device in enumerate(_vm(host).pci):
                if device.address is not None:
                    address = PciAddress.parse(device.address)
                    if address is not None:
                        requests.append(GpuRequest(host, index, None, (address,)))
                    continue
                name = device.mapping or ""
                if mappings is None:
                    continue
                where = f"host {host.name} (node {node}): PCI mapping {name}"
                if name not in mappings:
                    self.problems.append(
                        f"{where} does not exist (or the login cannot see it: that needs "
                        f"Mapping.Use on /mapping/pci/{name}): create it under Datacenter > "
                        f"Resource Mappings, or fix hosts[{self.hosts.index(host)}].proxmox.pci"
                    )
                    continue
                paths = tuple(
                    a for entry_node, p in mappings[name] if entry_node == node for a in p
                )
                if not paths:
                    mapped = sorted({entry_node for entry_node, _ in mappings[name]}) or ["none"]
                    self.problems.append(
                        f"{where} maps no device on {node} (it maps node(s) {', '.join(mapped)}): "
                        f"add {node}'s GPU to the mapping, or run the host on a node it maps"
                    )
                    continue
                requests.append(GpuRequest(host, index, name, paths))
        return requests

    def _check_device(
        self,
        request: GpuRequest,
        devices: list[PciDevice],
        others: list[Passthrough],
        requests: list[GpuRequest],
    ) -> None:
        """The device is on the node, IOMMU is on, and its group is not split between VMs."""
        for candidate in request.candidates:
            matches = [device for device in devices if device.address.overlaps(candidate)]
            if not matches:
                what = f" points at {candidate}, which" if request.mapping else ""
                self.problems.append(
                    f"{request.label}{what} is not a PCI device of node {request.node} "
                    f"(nodes/{request.node}/hardware/pci): check the address with lspci on "
                    f"{request.node}"
                )
                continue
            if any(device.group < 0 for device in matches):
                self.problems.append(
                    f"{request.label}: {candidate} has no IOMMU group, so IOMMU is off on node "
                    f"{request.node}: turn it on (intel_iommu=on or amd_iommu=on, and "
                    "iommu=pt, on the kernel command line) and reboot the node"
                )
                continue
            groups = {device.group for device in matches}
            mates = [
                device
                for device in devices
                if device.group in groups and not device.address.same_card(candidate)
            ]
            for mate in mates:
                users = [
                    o.label
                    for o in others
                    if o.vm.node == request.node and _hits(o.addresses, mate.address)
                ]
                users += [
                    f"host {other.host.name}"
                    for other in requests
                    if other.host is not request.host
                    and other.node == request.node
                    and _hits(other.candidates, mate.address)
                ]
                if users:
                    self.problems.append(
                        f"{request.label}: {candidate} shares IOMMU group {mate.group} with "
                        f"{mate.address}, which {', '.join(users)} passes through; a group can "
                        "go to one VM only: move a card to another slot, or pass "
                        f"{mate.address} to no other VM"
                    )

    def _check_raw_users(self, request: GpuRequest, others: list[Passthrough]) -> None:
        address = request.candidates[0]
        users = [
            o.label for o in others if o.vm.node == request.node and _hits(o.addresses, address)
        ]
        if users:
            self.problems.append(
                f"{request.label} is already passed through to {', '.join(users)}: remove it "
                "from that VM, or give the host another device"
            )

    def _check_mapping_capacity(
        self,
        requests: list[GpuRequest],
        mappings: Mappings,
        others: list[Passthrough],
    ) -> None:
        """A mapping serves as many VMs on a node as it maps devices there that are free."""
        wanted: dict[tuple[str, str], list[GpuRequest]] = {}
        for request in requests:
            if request.mapping is not None:
                wanted.setdefault((request.mapping, request.node), []).append(request)
        for (name, node), asking in wanted.items():
            entries = [paths for entry_node, paths in mappings[name] if entry_node == node]
            by_name = [o for o in others if o.vm.node == node and o.mapping == name]
            blocked = [
                o
                for o in others
                if o.vm.node == node
                and o.mapping != name
                and any(_hits(o.addresses, a) for paths in entries for a in paths)
            ]
            free = len(entries) - len(by_name) - len(blocked)
            if len(asking) <= free:
                continue
            hosts = _hosts_text([request.host for request in asking])
            if by_name or blocked:
                users = ", ".join(o.label for o in by_name + blocked)
                self.problems.append(
                    f"PCI mapping {name} on node {node} ({hosts}) is already passed through to "
                    f"{users}; it maps {len(entries)} device(s) there: stop passing it to that "
                    "VM, or add devices to the mapping"
                )
            else:
                self.problems.append(
                    f"{hosts} want {len(asking)} devices of PCI mapping {name} on node {node}, "
                    f"which maps {len(entries)} there: add devices to the mapping, or give each "
                    "host its own"
                )

    def _check_shared_within_stack(self, requests: list[GpuRequest]) -> None:
        """Two hosts must not claim the same device (raw, or a mapping's single device)."""
        definite = [r for r in requests if len(r.candidates) == 1]
        for i, first in enumerate(definite):
            for second in definite[i + 1 :]:
                same_mapping = first.mapping is not None and first.mapping == second.mapping
                if (
                    first.node == second.node
                    and not same_mapping
                    and first.candidates[0].overlaps(second.candidates[0])
                ):
                    self.problems.append(
                        f"{first.label} and {second.label} are the same device "
                        f"{first.candidates[0]}: give each host its own GPU"
                    )

    # --------------------------------------------------------------- privileges

    def _check_privileges(self) -> None:
        login = self.cluster.token_id or self.cluster.user or ""
        option = "--tokens" if self.cluster.token_id else "--users"
        for path, needs in self._required_privileges().items():
            data = self._get("access/permissions", f"the login's permissions on {path}", path=path)
            if not isinstance(data, dict):
                continue
            for privilege, why in needs:
                if not _holds(data, path, privilege):
                    self.problems.append(
                        f"{login} lacks {privilege} on {path}, needed to {why}: grant it, e.g. "
                        f"pveum acl modify {path} {option} '{login}' --roles {_role_for(privilege)}"
                    )

    def _required_privileges(self) -> dict[str, list[tuple[str, str]]]:
        vms = [_vm(host) for host in self.hosts]
        needs: dict[str, list[tuple[str, str]]] = {"/vms": list(VM_PRIVILEGES)}
        template = self.cluster.template_vmid
        needs[f"/vms/{template}"] = [("VM.Clone", f"clone template {template}")]
        needs[f"/storage/{self.cluster.storage}"] = [
            ("Datastore.AllocateSpace", "put the VMs' disks on it")
        ]
        for vm in vms:
            network = vm.network
            path = f"/sdn/zones/localnetwork/{network.bridge}"
            if network.vlan is not None:
                path += f"/{network.vlan}"
            bridge = f"bridge {network.bridge}" + (f" VLAN {network.vlan}" if network.vlan else "")
            needs.setdefault(path, [("SDN.Use", f"attach the VMs to {bridge}")])
            for device in vm.pci:
                if device.mapping is not None:
                    needs.setdefault(
                        f"/mapping/pci/{device.mapping}",
                        [("Mapping.Use", f"pass PCI mapping {device.mapping} through")],
                    )
        return needs


# ---------------------------------------------------------------------- helpers


def _vm(host: HostSpec) -> ProxmoxVm:
    if host.proxmox is None:  # a proxmox StackSpec guarantees it
        raise ValueError(f"host {host.name} has no proxmox block")
    return host.proxmox


def _by_node(hosts: Iterable[HostSpec]) -> dict[str, list[HostSpec]]:
    grouped: dict[str, list[HostSpec]] = {}
    for host in hosts:
        grouped.setdefault(_vm(host).node, []).append(host)
    return grouped


def _hosts_text(hosts: Sequence[HostSpec]) -> str:
    names = ", ".join(host.name for host in hosts)
    return f"host {names}" if len(hosts) == 1 else f"hosts {names}"


def _dicts(data: Any) -> list[dict[str, Any]]:
    return [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _properties(text: str, first_key: str | None = None) -> dict[str, str]:
    """A PVE property string `a=1,b=2` as a dict; a leading bare value goes under first_key."""
    props: dict[str, str] = {}
    for index, part in enumerate(text.split(",")):
        key, sep, value = part.partition("=")
        if sep:
            props[key.strip()] = value.strip()
        elif index == 0 and first_key is not None:
            props[first_key] = part.strip()
    return props


def _addresses(text: str) -> tuple[PciAddress, ...]:
    parsed = (PciAddress.parse(part) for part in text.split(";") if part.strip())
    return tuple(address for address in parsed if address is not None)


def _hits(addresses: Iterable[PciAddress], address: PciAddress) -> bool:
    return any(other.overlaps(address) for other in addresses)


def _holds(permissions: dict[str, Any], path: str, privilege: str) -> bool:
    """Whether the /access/permissions answer grants privilege on path (itself or propagated)."""
    for granted, privileges in permissions.items():
        if not isinstance(privileges, dict) or privilege not in privileges:
            continue
        if granted == path:
            return True
        ancestor = granted == "/" or path.startswith(granted.rstrip("/") + "/")
        if ancestor and _int(privileges[privilege]) != 0:
            return True
    return False


def _role_for(privilege: str) -> str:
    return next((role for prefix, role in ROLE_FOR_PREFIX if privilege.startswith(prefix)), "")
