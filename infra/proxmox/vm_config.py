"""What one GPU VM should look like on Proxmox, as data: no I/O, no API calls.

Three things live here, all pure functions the provider and the tests share:

* `vm_inputs`: the dynamic resource's inputs for one host (a JSON-safe dict) from the stack
  name, the `HostSpec` and the `ProxmoxCluster`. The secret is not among them: the component
  adds it as a Pulumi secret. The CA is there as its PEM text (`ca_certificate`), not as a
  path: the same certificate in another checkout changes nothing, and refresh and destroy
  need no file.
* `pve_params` / `config_update`: the PVE config parameters those inputs mean (q35 + OVMF
  with an EFI disk, `cpu: host`, no balloon, GPUs as `hostpciN` with `pcie=1`, cloud-init user,
  keys and addressing, `net0`, the guest agent, tags naming the stack and host), and the
  smallest POST that brings an existing config there.
* `actual_inputs` / `classify`: the inputs a VM's actual config amounts to (for drift), and
  how each changed input reaches the VM.

How a change reaches the VM (`PVE_KEY_APPLY`, `INPUT_APPLY`):

    input (PVE key)                      class    why
    name, stack (name, tags)             live     PVE writes them to a running VM at once
    network.bridge/vlan (net0)           live     PVE re-links a running NIC (bridge, VLAN)
    disk_gb grown (resize)               live     grows online; the guest's filesystem
                                                  follows at its next boot (growpart)
    cores, memory_mb (cores, memory)     restart  no CPU/memory hotplug: pending till start
    hardware (machine, bios, cpu,        restart  chipset, firmware, CPU model, balloon and
      balloon, agent; efidisk0)                   agent device are set up at start only
    pci (hostpciN, the GPUs)             restart  PCI passthrough is never hot-plugged
    ci_user, ssh_keys, network.ipv4/     restart  cloud-init: PVE regenerates its drive at
      gateway/nameserver (ciuser,                 start and the guest applies it on that
      sshkeys, ipconfig0, nameserver)             boot (a new instance id)
    node, template_vmid, storage         replace  the GPUs belong to the node; a clone
                                                  cannot change its source: clone anew
    host (the host's name in the         replace  a renamed host (`renamed_from`) gets a new
      stack, not the VM's PVE name)               VM, the old one deleted first: the GPUs
                                                  cannot be in both; an edited PVE name is
                                                  drift of `name`, repaired live
    disk_gb shrunk                       replace  PVE cannot shrink a disk
    endpoint, ca_certificate,            state    how to reach PVE, not the VM: nothing
      token_id, user, secret,                     to apply, the state just follows
      allow_restart (ca_bundle: a path,
      in states written before the PEM)

"restart" changes are written to the config at once; PVE keeps them pending until the VM
starts again. The provider reports them as `pending_restart` (read back from PVE, so PVE has
the last word), and restarts the VM itself only when `allow_restart` is true.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from gpufleet.spec.hosts import HostSpec
from gpufleet.spec.proxmox import ProxmoxCluster

Apply = Literal["live", "restart", "replace", "state"]

TAG_PREFIX: Final = "gpufleet"
# PVE's pve-tag format, lower case only: [a-z0-9_][a-z0-9_+.-]*
_TAG_BAD_CHARS = re.compile(r"[^a-z0-9_+.-]+")
# The VM's hardware, fixed by this module. In the inputs so a change here (or drift on the
# VM) shows up in a diff.
HARDWARE: Final[dict[str, str | int]] = {
    "machine": "q35",
    "bios": "ovmf",
    "cpu": "host",
    "balloon": 0,
    "agent": "1",
}
# OVMF keeps its variables on this disk. Secure Boot off (no pre-enrolled keys): the NVIDIA
# driver's kernel modules are not signed by a key the firmware trusts.
EFIDISK_OPTIONS: Final = "efitype=4m,pre-enrolled-keys=0"
CLOUDINIT_DRIVE: Final = "ide2"
# Disk keys PVE boots from, in the order PVE picks the first disk.
_BOOT_DISK_KEY = re.compile(r"^(scsi|virtio|sata|ide)\d+$")
_HOSTPCI_KEY = re.compile(r"^hostpci(\d+)$")

# What PVE does with each key `config_update` writes, on a running VM (the table above).
PVE_KEY_APPLY: Final[dict[str, Apply]] = {
    "name": "live",
    "tags": "live",
    "net0": "live",
    "cores": "restart",
    "memory": "restart",
    "balloon": "restart",
    "cpu": "restart",
    "machine": "restart",
    "bios": "restart",
    "efidisk0": "restart",
    CLOUDINIT_DRIVE: "restart",
    "agent": "restart",
    "hostpci": "restart",
    "ciuser": "restart",
    "sshkeys": "restart",
    "ipconfig0": "restart",
    "nameserver": "restart",
}
# How each input reaches the VM; `classify` sorts a diff by it.
INPUT_APPLY: Final[dict[str, Apply]] = {
    "stack": "live",
    "name": "live",
    "tags": "live",
    "cores": "restart",
    "memory_mb": "restart",
    "hardware": "restart",
    "pci": "restart",
    "ci_user": "restart",
    "ssh_keys": "restart",
    # network: bridge/vlan live, addressing restart; `classify` looks inside.
    "network": "restart",
    "disk_gb": "live",
    "node": "replace",
    "host": "replace",
    "template_vmid": "replace",
    "storage": "replace",
    "endpoint": "state",
    "ca_certificate": "state",
    "ca_bundle": "state",  # the CA file's path, in states written before ca_certificate
    "token_id": "state",
    "user": "state",
    "secret": "state",
    "allow_restart": "state",
}
# The inputs that describe the VM itself, as opposed to how to reach PVE.
VM_KEYS: Final = (
    "name",
    "tags",
    "node",
    "storage",
    "cores",
    "memory_mb",
    "disk_gb",
    "hardware",
    "network",
    "ci_user",
    "ssh_keys",
    "pci",
)
_NETWORK_LIVE: Final = ("bridge", "vlan")


# ----------------------------------------------------------------------------- inputs


def vm_tags(stack: str, host_name: str) -> list[str]:
    """The tags that mark a VM as this stack's VM for this host (and let a retry find it)."""
    return [_tag(f"{TAG_PREFIX}-{stack}"), _tag(f"{TAG_PREFIX}-host-{host_name}")]


def _tag(text: str) -> str:
    return _TAG_BAD_CHARS.sub("-", text.lower()).strip("-")


def vm_inputs(
    stack: str,
    host: HostSpec,
    cluster: ProxmoxCluster,
    *,
    ca_certificate: str | None,
    allow_restart: bool = False,
) -> dict[str, Any]:
    """The dynamic resource's inputs for one host's VM: plain JSON, no secret.

    `ca_certificate` is the PEM text of `cluster.ca_bundle` (the component reads the file),
    None for the default CAs.
    """
    if host.proxmox is None:
        raise ValueError(f"host {host.name!r} has no proxmox block")
    vm = host.proxmox
    return {
        "stack": stack,
        "host": host.name,
        "name": host.name,
        "tags": vm_tags(stack, host.name),
        "endpoint": cluster.endpoint,
        "ca_certificate": ca_certificate,
        "token_id": cluster.token_id,
        "user": cluster.user,
        "template_vmid": cluster.template_vmid,
        "storage": cluster.storage,
        "node": vm.node,
        "cores": vm.cores,
        "memory_mb": vm.memory_mb,
        "disk_gb": vm.disk_gb,
        "hardware": dict(HARDWARE),
        "network": vm.network.model_dump(mode="json"),
        "ci_user": vm.ci_user,
        "ssh_keys": list(vm.ssh_keys),
        "pci": [device.model_dump(mode="json", exclude_none=True) for device in vm.pci],
        "allow_restart": allow_restart,
    }


def cluster_of(inputs: Mapping[str, Any], *, ca_file: Path | None = None) -> ProxmoxCluster:
    """The `ProxmoxCluster` the inputs were made from (enough of it to connect).

    `ca_file` holds the inputs' `ca_certificate`; without one, a state written before
    `ca_certificate` existed may still name the file by its absolute path (`ca_bundle`).
    """
    ca_bundle = str(ca_file) if ca_file is not None else inputs.get("ca_bundle")
    return ProxmoxCluster.model_validate(
        {
            "endpoint": inputs["endpoint"],
            "ca_bundle": ca_bundle,
            "token_id": inputs.get("token_id"),
            "user": inputs.get("user"),
            "template_vmid": inputs["template_vmid"],
            "storage": inputs["storage"],
        }
    )


# ---------------------------------------------------------------------- PVE parameters


def hostpci_value(device: Mapping[str, str]) -> str:
    """`mapping=<name>,pcie=1` for a resource mapping, `<address>,pcie=1` for a raw device."""
    if device.get("mapping"):
        return f"mapping={device['mapping']},pcie=1"
    return f"{device['address']},pcie=1"


def encode_ssh_keys(keys: list[str]) -> str:
    """`sshkeys` as PVE takes it: the authorized_keys text, URL-encoded (spaces as %20)."""
    return urllib.parse.quote("\n".join(keys), safe="")


def ipconfig_value(network: Mapping[str, Any]) -> str:
    """`ip=dhcp`, or `ip=<cidr>[,gw=<gw>]` for a static address (a gateway only goes with it)."""
    if network["ipv4"] == "dhcp":
        return "ip=dhcp"
    value = f"ip={network['ipv4']}"
    if network.get("gateway"):
        value += f",gw={network['gateway']}"
    return value


def net0_value(network: Mapping[str, Any], mac: str | None = None) -> str:
    """`virtio[=<mac>],bridge=<bridge>[,tag=<vlan>]`; the MAC kept when the NIC exists."""
    value = f"virtio={mac}" if mac else "virtio"
    value += f",bridge={network['bridge']}"
    if network.get("vlan") is not None:
        value += f",tag={network['vlan']}"
    return value


def pve_params(inputs: Mapping[str, Any]) -> dict[str, str | int]:
    """The config keys this module manages, as PVE takes them (drives to add come apart)."""
    params: dict[str, str | int] = {
        "name": inputs["name"],
        **inputs["hardware"],
        "cores": inputs["cores"],
        "memory": inputs["memory_mb"],
        "ciuser": inputs["ci_user"],
        "sshkeys": encode_ssh_keys(inputs["ssh_keys"]),
        "ipconfig0": ipconfig_value(inputs["network"]),
        "net0": net0_value(inputs["network"]),
        "tags": ";".join(inputs["tags"]),
    }
    if inputs["network"].get("nameserver"):
        params["nameserver"] = inputs["network"]["nameserver"]
    for index, device in enumerate(inputs["pci"]):
        params[f"hostpci{index}"] = hostpci_value(device)
    return params


@dataclass(frozen=True)
class ConfigUpdate:
    """One POST to `nodes/{node}/qemu/{vmid}/config`: values to set and keys to delete."""

    set: dict[str, str | int] = field(default_factory=dict)
    delete: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.set and not self.delete

    def as_params(self) -> dict[str, str | int]:
        params = dict(self.set)
        if self.delete:
            params["delete"] = ",".join(self.delete)
        return params


def config_update(inputs: Mapping[str, Any], current: Mapping[str, Any]) -> ConfigUpdate:
    """What to POST so the VM's `current` config holds the inputs: changed keys only.

    Adds an EFI disk and a cloud-init drive on the storage when the clone has none, keeps the
    NIC's MAC, and deletes managed keys the inputs no longer have (a nameserver, extra GPUs).
    Unchanged keys are left out: PVE would mark even an unchanged value pending on a running VM.
    """
    wanted = pve_params(inputs)
    mac = _net_mac(current.get("net0"))
    if mac:
        wanted["net0"] = net0_value(inputs["network"], mac)
    storage = inputs["storage"]
    if "efidisk0" not in current:
        wanted["efidisk0"] = f"{storage}:1,{EFIDISK_OPTIONS}"
    if cloudinit_drive(current) is None:
        wanted[CLOUDINIT_DRIVE] = f"{storage}:cloudinit"
    changed = {k: v for k, v in wanted.items() if not _same_value(k, v, current.get(k))}
    delete = sorted(
        (key for key in current if _HOSTPCI_KEY.match(key) and key not in wanted),
        key=_natural,
    )
    if "nameserver" in current and "nameserver" not in wanted:
        delete.append("nameserver")
    return ConfigUpdate(changed, delete)


def _same_value(key: str, wanted: str | int, actual: Any) -> bool:
    if actual is None:
        return False
    if key == "tags":
        return set(_split_tags(str(wanted))) == set(_split_tags(str(actual)))
    if key == "sshkeys":
        return urllib.parse.unquote(str(wanted)) == urllib.parse.unquote(str(actual))
    if key == "net0":
        return _props(str(wanted)) == _props(str(actual))
    if key == "agent":
        return _agent_enabled(str(wanted)) == _agent_enabled(str(actual))
    return str(wanted) == str(actual)


# ------------------------------------------------------------- reading a PVE config back


def _natural(key: str) -> tuple[str, int]:
    found = re.fullmatch(r"(\D+)(\d+)", key)
    return (found.group(1), int(found.group(2))) if found else (key, 0)


def _props(value: str) -> dict[str, str]:
    """A property string as a dict; `virtio=<mac>` becomes model + macaddr."""
    out: dict[str, str] = {}
    for part in value.split(","):
        key, eq, val = part.partition("=")
        if key in ("virtio", "e1000", "e1000e", "vmxnet3", "rtl8139"):
            out["model"] = key
            if val:
                out["macaddr"] = val.upper()
        elif eq:
            out[key] = val
        elif part:
            out[""] = part
    out.pop("macaddr", None)
    return out


def _net_mac(value: Any) -> str | None:
    if not value:
        return None
    first = str(value).split(",", 1)[0]
    _, eq, mac = first.partition("=")
    return mac if eq and mac else None


def _split_tags(value: str) -> list[str]:
    return [tag for tag in re.split(r"[;, ]+", value) if tag]


def _agent_enabled(value: str) -> bool:
    first = value.split(",", 1)[0]
    return first.removeprefix("enabled=") in ("1", "true", "yes", "on")


def _is_cloudinit(value: str) -> bool:
    """`local-lvm:cloudinit` (to allocate) or `local-lvm:vm-100-cloudinit` (allocated)."""
    volume = value.split(",", 1)[0]
    return volume.endswith("cloudinit") and ":" in volume


def cloudinit_drive(config: Mapping[str, Any]) -> str | None:
    """The key of the VM's cloud-init drive, or None."""
    for key, value in config.items():
        if re.fullmatch(r"(ide|sata|scsi)\d+", key) and _is_cloudinit(str(value)):
            return key
    return None


def boot_disk(config: Mapping[str, Any]) -> str | None:
    """The key of the disk the VM boots from: the first of `boot: order=`, else scsi/virtio/..."""
    order = str(config.get("boot", ""))
    if order.startswith("order="):
        for key in order.removeprefix("order=").split(";"):
            if _is_disk(config, key):
                return key
    for key in sorted(config, key=_natural):
        if _BOOT_DISK_KEY.match(key) and _is_disk(config, key):
            return key
    return None


def _is_disk(config: Mapping[str, Any], key: str) -> bool:
    value = str(config.get(key, ""))
    return bool(
        _BOOT_DISK_KEY.match(key)
        and value
        and "media=cdrom" not in value
        and not _is_cloudinit(value)
    )


def disk_size_gb(value: str) -> int | None:
    """The size= of a drive in whole GiB (rounded down), or None without one."""
    found = re.search(r"(?:^|,)size=(\d+(?:\.\d+)?)([KMGT]?)", value)
    if not found:
        return None
    factor = {"K": 1 / 1024**2, "M": 1 / 1024, "G": 1, "T": 1024, "": 1 / 1024**3}
    return int(float(found.group(1)) * factor[found.group(2)])


def _network_of(config: Mapping[str, Any]) -> dict[str, Any]:
    net = _props(str(config.get("net0", "")))
    ip = _props(str(config.get("ipconfig0", "")))
    vlan = net.get("tag")
    return {
        "bridge": net.get("bridge"),
        "vlan": int(vlan) if vlan else None,
        "ipv4": ip.get("ip"),
        "gateway": ip.get("gw"),
        "nameserver": config.get("nameserver"),
    }


def _pci_of(config: Mapping[str, Any]) -> list[dict[str, str]]:
    devices = []
    for key in sorted((k for k in config if _HOSTPCI_KEY.match(k)), key=_natural):
        props = _props(str(config[key]))
        if "mapping" in props:
            devices.append({"mapping": props["mapping"]})
        else:
            devices.append({"address": props.get("host") or props.get("", "")})
    return devices


def _int_or_none(value: Any) -> int | None:
    """An integer config value; PVE 8 may write memory as `current=<MiB>`."""
    try:
        return int(str(value).removeprefix("current="))
    except ValueError:
        return None


def actual_inputs(config: Mapping[str, Any], node: str) -> dict[str, Any]:
    """The VM keys of the inputs (`VM_KEYS`) as the VM's actual PVE config has them."""
    disk = boot_disk(config)
    disk_value = str(config.get(disk, "")) if disk else ""
    hardware: dict[str, Any] = {}
    for key, wanted in HARDWARE.items():
        value = config.get(key)
        if key == "agent" and value is not None:
            value = "1" if _agent_enabled(str(value)) else "0"
        elif isinstance(wanted, int) and value is not None:
            value = _int_or_none(value)
        hardware[key] = value
    sshkeys = urllib.parse.unquote(str(config.get("sshkeys", "")))
    return {
        "name": config.get("name"),
        "tags": sorted(_split_tags(str(config.get("tags", "")))),
        "node": node,
        "storage": disk_value.split(":", 1)[0] if ":" in disk_value else None,
        "cores": _int_or_none(config.get("cores", 1)),
        "memory_mb": _int_or_none(config.get("memory", 512)),
        "disk_gb": disk_size_gb(disk_value),
        "hardware": hardware,
        "network": _network_of(config),
        "ci_user": config.get("ciuser"),
        "ssh_keys": [key for key in sshkeys.splitlines() if key.strip()],
        "pci": _pci_of(config),
    }


def with_pending(config: Mapping[str, Any], pending: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The config the VM will run with after its next start: `config` (the running one) with
    the entries of PVE's `pending` listing applied (a `pending` value set, a `delete` removed)."""
    applied = dict(config)
    for entry in pending:
        key = str(entry["key"])
        if entry.get("delete"):
            applied.pop(key, None)
        elif "pending" in entry:
            applied[key] = entry["pending"]
    return applied


def drift(inputs: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """The VM keys whose actual value differs from the inputs."""
    return [key for key in VM_KEYS if not _same_input(key, inputs.get(key), actual.get(key))]


def _same_input(key: str, wanted: Any, actual: Any) -> bool:
    if key == "tags":
        return sorted(wanted or []) == sorted(actual or [])
    if key == "disk_gb" and isinstance(wanted, int) and isinstance(actual, int):
        # A disk grown beyond the inputs is not worth a diff that cannot shrink it back.
        return actual >= wanted
    if key == "network" and isinstance(wanted, Mapping) and isinstance(actual, Mapping):
        return _network_same(wanted, actual)
    return bool(wanted == actual)


def _network_same(wanted: Mapping[str, Any], actual: Mapping[str, Any]) -> bool:
    gateway = wanted.get("gateway") if wanted.get("ipv4") != "dhcp" else None
    return (
        wanted.get("bridge") == actual.get("bridge")
        and wanted.get("vlan") == actual.get("vlan")
        and wanted.get("ipv4") == actual.get("ipv4")
        and gateway == actual.get("gateway")
        and wanted.get("nameserver") == actual.get("nameserver")
    )


# ------------------------------------------------------------------------------ diffs


@dataclass(frozen=True)
class Changes:
    """The changed inputs, by how they reach the VM (see the module's table)."""

    live: list[str] = field(default_factory=list)
    restart: list[str] = field(default_factory=list)
    replace: list[str] = field(default_factory=list)
    state: list[str] = field(default_factory=list)

    @property
    def any(self) -> bool:
        return bool(self.live or self.restart or self.replace or self.state)


def classify(olds: Mapping[str, Any], news: Mapping[str, Any]) -> Changes:
    """Sort the inputs that differ between olds and news by `INPUT_APPLY`.

    Keys starting with `__` (the serialized provider) are not inputs; a key nobody
    classified counts as a replacement, the safe guess.
    """
    buckets: dict[Apply, list[str]] = {"live": [], "restart": [], "replace": [], "state": []}
    for key in sorted(set(olds) | set(news)):
        if key.startswith("__"):
            continue
        old, new = olds.get(key), news.get(key)
        if old == new or (key == "tags" and sorted(old or []) == sorted(new or [])):
            continue
        buckets[_apply_of(key, old, new)].append(key)
    return Changes(**buckets)


def _apply_of(key: str, old: Any, new: Any) -> Apply:
    if key == "host" and old is None:
        return "state"  # a state written before `host` was an input: nothing was renamed
    if key == "disk_gb":
        shrunk = isinstance(old, int) and isinstance(new, int) and new < old
        return "replace" if shrunk else "live"
    if key == "network" and isinstance(old, Mapping) and isinstance(new, Mapping):
        addressing = [k for k in set(old) | set(new) if old.get(k) != new.get(k)]
        return "live" if all(k in _NETWORK_LIVE for k in addressing) else "restart"
    return INPUT_APPLY.get(key, "replace")
