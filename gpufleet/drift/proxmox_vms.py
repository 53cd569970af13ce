"""The infrastructure layer of `gpufleet drift` on a proxmox stack: each host's VM as PVE runs it.

The VM a host should have is what the Pulumi program asks for (`vm_config.vm_inputs`); the VM
PVE runs is read with the provider's own `observe_vm` (config with `current=1`, and the changes
PVE holds back until the next start), so this check finds what `pulumi refresh` would find,
and nothing the provider would not act on. Reads only; TLS is always verified (client.py).

    checks = check_proxmox_vms(loaded, project_root=Path.cwd())
    # [LayerCheck("infrastructure", "", checked=["vms tagged gpufleet-onprem-prod"]),
    #  LayerCheck("infrastructure", "gpu-a", checked=["vm gpu-a", "vm gpu-a cores", ...],
    #             items=[DriftItem(..., "vm gpu-a memory_mb", "65536 MiB", "32768 MiB", ...)])]

What is compared, and the item each difference becomes (`vm <host> <input>`):

- a VM per host, found by the tags the provider writes (`gpufleet-<stack>`,
  `gpufleet-host-<host>`), else by the host's name (tags edited by hand: drift of `tags`):
  none is item `vm <host>`;
- each of the VM's inputs (`vm_config.VM_KEYS`: name, tags, node, storage, cores, memory_mb,
  disk_gb, hardware, network, ci_user, ssh_keys, pci = the `hostpciN` GPUs) against the
  running config: one item per input that differs;
- changes PVE holds back until the VM starts again: item `vm <host> pending`;
- a VM carrying the stack's tag that no host of the spec claims (a host since removed, a VM
  made by hand, a second VM for one host): item `extra vm <vmid>`.

Every item's object is also in its check's `checked` list (one JUnit test case per object).

The login is the preflight's: the token secret or password comes from the environment
variable `proxmox.secret_env` names (default GPUFLEET_PROXMOX_SECRET). One GET lists the
cluster's VMs; then each VM is read (two GETs) in a bounded thread pool, one API session per
worker; GETs the network cut short are sent again with the provider's backoff (retry.py).
When the API cannot be used at all (unreachable, TLS, refused login, no secret), the result
is one stack-wide check whose `error` says why and what to do; a VM that cannot be read makes
only its host's check an error.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from gpufleet.drift.items import DriftItem, LayerCheck
from gpufleet.spec.hosts import HostSpec
from gpufleet.spec.loading import LoadedStackSpec
from gpufleet.spec.proxmox import ProxmoxCluster
from infra.proxmox import vm_config
from infra.proxmox.client import ProxmoxError, ca_bundle_path, close, secret_from_environment
from infra.proxmox.provider import (
    VmObservation,
    cluster_vms,
    observe_vm,
    tags_of,
)
from infra.proxmox.session import PveSession, Timing

LAYER: Final = "infrastructure"
# Parallel VM reads: PVE's API daemon (pveproxy) serves a few requests at a time per node;
# eight in flight keeps a 50-VM cluster's check within seconds without crowding it.
DEFAULT_WORKERS = 8
_SHOWN_CHARS = 120  # a value longer than this is cut in an item (ssh keys, long tags)


@dataclass(frozen=True)
class _Target:
    """One host's VM as the spec asks for it, and the VM PVE has for it (None: no VM)."""

    host: HostSpec
    inputs: dict[str, Any]
    vm: dict[str, Any] | None  # its `cluster/resources` entry


class _Sessions:
    """One PveSession per worker thread (proxmoxer's HTTP session is not shared across threads);
    each is opened at its thread's first call."""

    def __init__(self, inputs: Mapping[str, Any], timing: Timing) -> None:
        self._inputs = inputs
        self._timing = timing
        self._local = threading.local()
        self._opened: list[PveSession] = []
        self._lock = threading.Lock()

    def get(self) -> PveSession:
        session: PveSession | None = getattr(self._local, "session", None)
        if session is None:
            session = PveSession(self._inputs, self._timing)
            self._local.session = session
            with self._lock:
                self._opened.append(session)
        return session

    def close(self) -> None:
        """Close every session's connections (proxmoxer keeps them open otherwise)."""
        with self._lock:
            for session in self._opened:
                close(session.api)
            self._opened.clear()


def check_proxmox_vms(
    loaded: LoadedStackSpec,
    *,
    project_root: Path,
    environ: Mapping[str, str] | None = None,
    timing: Timing | None = None,
    workers: int = DEFAULT_WORKERS,
) -> list[LayerCheck]:
    """The proxmox stack's VMs against its spec: a stack-wide check (the VM listing and the
    extra VMs) and one check per host. Needs no host address."""
    started = time.monotonic()
    stack, spec = loaded.name, loaded.spec
    cluster = spec.proxmox
    if cluster is None:
        raise ValueError(f"stack {stack!r} is a {spec.environment} stack, not a proxmox one")
    timing = timing or Timing()
    wide = LayerCheck(LAYER, "", checked=[f"vms tagged {_stack_tag(stack)}"])
    hosts = [host for host in spec.hosts if host.proxmox is not None]
    sessions: _Sessions | None = None
    try:
        sessions = _Sessions(_session_inputs(cluster, project_root, environ), timing)
        vms = [vm for vm in cluster_vms(sessions.get()) if not vm.get("template")]
        targets, extras = _match(stack, hosts, cluster, vms)
        wide.items = [_extra_item(stack, vm, "") for vm in extras.pop("", [])]
        wide.checked += [item.object for item in wide.items]
        wide.seconds = time.monotonic() - started

        def check(target: _Target) -> LayerCheck:
            assert sessions is not None
            return _check_host(stack, target, sessions, extras.get(target.host.name, []))

        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(targets) or 1))) as pool:
            return [wide, *pool.map(check, targets)]
    except ProxmoxError as error:
        names = ", ".join(host.name for host in hosts)
        wide.error = (
            f"could not be checked: {error} (the VMs of {names} were not compared with the spec)"
        )
        wide.items, wide.checked = [], wide.checked[:1]
        wide.seconds = time.monotonic() - started
        return [wide]
    finally:
        if sessions is not None:
            sessions.close()


# ------------------------------------------------------------------ finding the VMs


def _stack_tag(stack: str) -> str:
    return vm_config.vm_tags(stack, "")[0]


def _session_inputs(
    cluster: ProxmoxCluster, project_root: Path, environ: Mapping[str, str] | None
) -> dict[str, Any]:
    """What a PveSession connects with: the cluster's endpoint and login, the CA file by its
    absolute path (so no temporary copy), and the secret from the environment."""
    secret = secret_from_environment(cluster, environ)
    ca_bundle = None
    if cluster.ca_bundle is not None:
        ca_bundle = str(ca_bundle_path(cluster, project_root).resolve())
    return {
        "endpoint": cluster.endpoint,
        "token_id": cluster.token_id,
        "user": cluster.user,
        "template_vmid": cluster.template_vmid,
        "storage": cluster.storage,
        "ca_certificate": None,
        "ca_bundle": ca_bundle,
        "secret": secret,
    }


def _match(
    stack: str, hosts: list[HostSpec], cluster: ProxmoxCluster, vms: list[dict[str, Any]]
) -> tuple[list[_Target], dict[str, list[dict[str, Any]]]]:
    """Each host's VM (by its tags, as the provider adopts) and the stack's VMs no host claims,
    keyed by the host they are a second VM of ("" for none)."""
    stack_tag = _stack_tag(stack)
    claimed: set[int] = set()
    targets: list[_Target] = []
    extras: dict[str, list[dict[str, Any]]] = {}
    for host in hosts:
        inputs = vm_config.vm_inputs(stack, host, cluster, ca_certificate=None)
        tagged = [vm for vm in vms if set(inputs["tags"]) <= tags_of(vm)]
        if not tagged:
            # Its tags edited by hand: the provider still knows it by its id and name
            # (`_still_ours`), so `pulumi up --refresh` puts the tags back. Without the state's
            # id, the name and no other stack's tag identify it.
            tagged = [
                vm
                for vm in vms
                if vm.get("name") == host.name
                and _id(vm) not in claimed
                and _no_other_stack(vm, stack_tag)
            ]
        # Of several, the one on the spec's node with the host's name is the host's VM.
        tagged.sort(
            key=lambda vm: (vm.get("node") != inputs["node"], vm.get("name") != host.name, _id(vm))
        )
        targets.append(_Target(host, inputs, tagged[0] if tagged else None))
        claimed.update(_id(vm) for vm in tagged[:1])
        if tagged[1:]:
            extras[host.name] = tagged[1:]
            claimed.update(_id(vm) for vm in tagged[1:])
    extras[""] = [vm for vm in vms if stack_tag in tags_of(vm) and _id(vm) not in claimed]
    return targets, extras


def _no_other_stack(vm: Mapping[str, Any], stack_tag: str) -> bool:
    """The VM carries no gpufleet tag but this stack's: no other stack's, no other host's."""
    return {tag for tag in tags_of(vm) if tag.startswith("gpufleet-")} <= {stack_tag}


def _id(vm: Mapping[str, Any]) -> int:
    return int(vm["vmid"])


# ------------------------------------------------------------------ one host


def _check_host(
    stack: str, target: _Target, sessions: _Sessions, extras: list[dict[str, Any]]
) -> LayerCheck:
    started = time.monotonic()
    name = target.host.name
    check = LayerCheck(LAYER, name, checked=[f"vm {name}"])
    check.items = [_extra_item(stack, vm, name) for vm in extras]
    check.checked += [item.object for item in check.items]
    if target.vm is None:
        check.items.insert(0, _missing_item(stack, target))
        check.seconds = time.monotonic() - started
        return check
    vmid, node = _id(target.vm), str(target.vm["node"])
    try:
        seen = observe_vm(sessions.get(), node, vmid, target.inputs)
    except ProxmoxError as error:
        check.error = f"could not be checked: reading VM {vmid} on node {node}: {error}"
        check.seconds = time.monotonic() - started
        return check
    check.checked += [f"vm {name} {key}" for key in vm_config.VM_KEYS] + [f"vm {name} pending"]
    check.items += [
        _input_item(stack, target, vmid, node, seen, key)
        for key in vm_config.VM_KEYS
        if key in seen.drift
    ]
    if seen.pending:
        check.items.append(_pending_item(stack, target, vmid, node, seen))
    check.seconds = time.monotonic() - started
    return check


def _missing_item(stack: str, target: _Target) -> DriftItem:
    name, inputs = target.host.name, target.inputs
    return DriftItem(
        LAYER,
        name,
        f"vm {name}",
        expected=f"a VM on node {inputs['node']} tagged {';'.join(inputs['tags'])}",
        found="no VM carries those tags",
        repair=f"pulumi up --refresh -s {stack} (the refresh drops the gone VM from the state, "
        "the update makes it again)",
    )


def _extra_item(stack: str, vm: Mapping[str, Any], host: str) -> DriftItem:
    vmid, node = _id(vm), vm.get("node")
    what = f"a second VM for host {host}" if host else "no host of the spec claims it"
    return DriftItem(
        LAYER,
        host,
        f"extra vm {vmid}",
        expected=f"only the spec's hosts' VMs carry {_stack_tag(stack)}",
        found=f"VM {vmid} ({vm.get('name')}) on node {node}, tagged "
        f"{';'.join(sorted(tags_of(vm)))}: {what}",
        repair=f"pulumi up --refresh -s {stack} if Pulumi made it (its host left the spec); "
        f"else `qm stop {vmid} && qm destroy {vmid} --purge` on node {node}",
    )


def _input_item(
    stack: str, target: _Target, vmid: int, node: str, seen: VmObservation, key: str
) -> DriftItem:
    wanted, actual = target.inputs[key], seen.actual[key]
    changes = vm_config.classify({key: actual}, {key: wanted})
    up = f"pulumi up --refresh -s {stack}"
    if key == "node":
        repair = f"`qm migrate {vmid} {wanted}` on node {node}, or {up} (replaces the VM)"
    elif changes.replace:
        repair = f"{up} (replaces VM {vmid}: it is destroyed and made anew)"
    elif changes.restart:
        repair = f"{up}, then `qm reboot {vmid}` on node {node} (PVE applies it at a restart)"
    else:
        repair = up
    return DriftItem(
        LAYER,
        target.host.name,
        f"vm {target.host.name} {key}",
        expected=_shown(key, wanted, expected=True),
        found=_shown(key, actual, expected=False),
        repair=repair,
    )


def _pending_item(
    stack: str, target: _Target, vmid: int, node: str, seen: VmObservation
) -> DriftItem:
    """Changes PVE holds until the next start: a restart repairs them when they bring the VM to
    the spec (a `pulumi up` without allow_restart left them), else they are reverted."""
    after_restart = vm_config.actual_inputs(vm_config.with_pending(seen.config, seen.pending), node)
    keys = ",".join(str(entry["key"]) for entry in seen.pending)
    if vm_config.drift(target.inputs, after_restart):
        repair = (
            f"`qm set {vmid} --revert {keys}` on node {node}, then pulumi up --refresh -s {stack}"
        )
    else:
        repair = f"`qm reboot {vmid}` on node {node} (PVE applies them at the restart)"
    return DriftItem(
        LAYER,
        target.host.name,
        f"vm {target.host.name} pending",
        expected="no change waiting for a restart",
        found="; ".join(_pending_text(entry) for entry in seen.pending),
        repair=repair,
    )


def _pending_text(entry: Mapping[str, Any]) -> str:
    old = _cut(str(entry.get("value", "(unset)")))
    new = "(deleted)" if entry.get("delete") else _cut(str(entry.get("pending")))
    return f"{entry['key']}: {old} -> {new}"


def _shown(key: str, value: Any, *, expected: bool) -> str:
    """An input's value as one short line."""
    if value is None or value == [] or value == {}:
        return "no GPU" if key == "pci" else "none"
    if key == "memory_mb":
        return f"{value} MiB"
    if key == "disk_gb":
        return f"at least {value} GiB" if expected else f"{value} GiB"
    if key == "tags":
        return ";".join(sorted(value))
    if key == "pci":
        return "; ".join(
            f"hostpci{i} mapping={d['mapping']}"
            if d.get("mapping")
            else f"hostpci{i} {d['address']}"
            for i, d in enumerate(value)
        )
    if key == "ssh_keys":
        return _cut(", ".join(_key_label(k) for k in value))
    if isinstance(value, Mapping):
        return _cut(" ".join(f"{k}={v}" for k, v in value.items() if v is not None))
    return _cut(str(value))


def _key_label(key: str) -> str:
    """`ssh-ed25519 ...lq4bF ops@gpufleet`: enough of a public key to tell which it is."""
    parts = key.split()
    if len(parts) < 2:
        return _cut(key)
    comment = f" {' '.join(parts[2:])}" if parts[2:] else ""
    return f"{parts[0]} ...{parts[1][-8:]}{comment}"


def _cut(text: str) -> str:
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."
