"""The Pulumi dynamic provider that makes one GPU VM on Proxmox VE: clone, configure, start.

`GpuVmProvider` implements create / read / diff / update / delete for the inputs that
`vm_config.vm_inputs` builds (plus `secret`, the token secret or password, which arrives as a
Pulumi secret and is never logged or put in an error). Each method opens its own API session:
dynamic providers are pickled into the stack's state and run in the engine's provider process,
so nothing is kept between calls.

    create  adopt a VM already tagged for this stack and host (a retried create after an
            interruption), else nextid + full clone of the template; POST the config, grow the
            disk, start, and wait for the guest agent to report an address. If anything fails
            after the clone, the VM this create made is stopped and destroyed before the error
            (PVE's words) is raised: a failed create leaves nothing behind.
    read    the VM's actual config; inputs that drifted come back with their actual values
            (and are listed in `drift`), so the next diff shows them.
    diff    `vm_config.classify`: node, template_vmid, storage, the host's name (a rename with
            `renamed_from`) or a smaller disk replace the VM (delete first: the GPUs and the
            tags cannot be shared); the rest updates it.
    update  POST what differs from the actual config, grow the disk; changes PVE keeps pending
            until the next start are reported in `pending_restart`, or applied by a restart
            when `allow_restart` is true.
    delete  shutdown with a timeout, then stop; destroy with purge and unreferenced disks.
            A VM already gone (or no longer carrying this resource's tags) is not an error.

Retries: a VM locked by a backup, snapshot, ... (`VM is locked (backup)`, or a config lock
timeout) is retried a bounded number of times, then fails with a clear error; a password
login's expired ticket is renewed once per call; a VM id that a parallel create took between
`cluster/nextid` and the clone is replaced by the next free one.

A flaky network: GETs (task polls and guest-agent queries among them) are sent again with
bounded backoff (session.py, retry.py). A call that changes something and lost its answer may
have been carried out: once the guest's tasks have ended, each step reads back what PVE has
and sends only what is still missing (start only a stopped VM, POST only the config keys that
differ, ...). A clone is looked for by the id it asked for and the host's name, and sent again
with the same id, so PVE never makes two. When the network keeps failing, the error says it
was the network (ProxmoxTransientError), and a failed create's cleanup says which VM it left
on which node.

Adoption goes by the tags, which the first config POST after the clone writes: a create
killed while its clone task still runs leaves an untagged VM named after the host, which
a retry does not adopt (destroy it by hand).
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

from pulumi.dynamic import (
    CreateResult,
    DiffResult,
    ReadResult,
    ResourceProvider,
    UpdateResult,
)

from infra.proxmox import vm_config
from infra.proxmox.client import (
    ProxmoxApiError,
    ProxmoxError,
    ProxmoxTaskError,
    ProxmoxTransientError,
)
from infra.proxmox.session import GpuVmError as GpuVmError
from infra.proxmox.session import PveSession
from infra.proxmox.session import Timing as Timing

T = TypeVar("T")

_LOCKED = re.compile(r"VM is locked \(([\w-]+)\)|can't lock file '[^']*' - got timeout")
_GONE = re.compile(r"Configuration file '[^']*' does not exist|unable to find configuration file")
_ID_TAKEN = re.compile(r"already exists")
_ID_RETRIES = 10
# Answers while the guest agent is not up yet: PVE's 500s.
_AGENT_NOT_READY = 500
OUTPUT_KEYS = ("vmid", "address", "gpus", "pending_restart", "drift")


class VmLockedError(GpuVmError):
    """The VM stayed locked (backup, snapshot, ...) through every retry."""


# ---------------------------------------------------------------------------- helpers


def _locked(error: Exception) -> str | None:
    """What holds the VM's lock (`backup`, `config`, ...) if the error is a lock, else None."""
    found = _LOCKED.search(str(error))
    if found is None:
        return None
    return found.group(1) or "config"


def _fresh_vmid(pve: PveSession, clashes: int) -> int:
    """The VM id for a clone: `cluster/nextid`, or after `clashes` lost races for it, a random
    id a little above it. Creates of one `pulumi up` run in parallel and are all handed the same
    nextid; asked again in lockstep they would clash again, one winner per round."""
    first_free = int(pve.get("cluster/nextid"))
    if clashes == 0:
        return first_free
    return first_free + random.randrange(8 * clashes)  # noqa: S311 - spreading, not secrecy


# The tag of a VM a rebuild has replaced, powered off until the new VM runs.
REPLACED_TAG = "gpufleet-replaced"


def _vm_path(node: str, vmid: int, tail: str = "") -> str:
    return f"nodes/{node}/qemu/{vmid}" + (f"/{tail}" if tail else "")


def cluster_vms(pve: PveSession) -> list[dict[str, Any]]:
    """The cluster's QEMU guests, templates included (one GET of `cluster/resources`)."""
    return [vm for vm in pve.get("cluster/resources", type="vm") if vm.get("type") == "qemu"]


def tags_of(vm: Mapping[str, Any]) -> set[str]:
    """The tags a `cluster/resources` entry (or a VM config) carries."""
    return {tag for tag in re.split(r"[;, ]+", str(vm.get("tags", ""))) if tag}


def _ours(vm: Mapping[str, Any], inputs: Mapping[str, Any]) -> bool:
    """Tagged for this stack and host (what adoption goes by)."""
    return set(inputs["tags"]) <= tags_of(vm)


def _still_ours(vm: Mapping[str, Any], inputs: Mapping[str, Any]) -> bool:
    """The VM with this resource's id is still its VM: tagged so, or at least named so (someone
    may have edited the tags). A reused id with another name is someone else's VM."""
    return _ours(vm, inputs) or vm.get("name") == inputs["name"]


def _inputs_of(props: Mapping[str, Any]) -> dict[str, Any]:
    """The inputs among a resource's properties (state has the outputs mixed in)."""
    return {k: v for k, v in props.items() if not k.startswith("__") and k not in OUTPUT_KEYS}


@dataclass
class _Vm:
    """Where one VM lives, and whether this create made it (and so may destroy it)."""

    vmid: int
    node: str
    made_here: bool = False


# ------------------------------------------------------------------- observing a VM


@dataclass(frozen=True)
class VmObservation:
    """What PVE has for one VM, against the inputs it should hold (read, and the drift check)."""

    config: dict[str, Any]  # the config the VM runs with now (current=1)
    actual: dict[str, Any]  # the inputs that config amounts to (vm_config.actual_inputs)
    drift: list[str]  # the VM keys whose actual value differs from the inputs
    pending: list[dict[str, Any]]  # `pending` entries PVE holds back until the next start


def observe_vm(pve: PveSession, node: str, vmid: int, inputs: Mapping[str, Any]) -> VmObservation:
    """Read VM `vmid`'s running config and pending changes (two GETs) and compare them with the
    inputs. `read` reports this to Pulumi; `gpufleet drift` reports it as drift items."""
    # current=1: what runs now. Without it PVE answers with pending changes applied, which
    # would hide drift and report a GPU the VM does not have yet.
    config = dict(pve.get(_vm_path(node, vmid, "config"), current=1))
    actual = vm_config.actual_inputs(config, node)
    return VmObservation(
        config, actual, vm_config.drift(inputs, actual), pending_changes(pve, node, vmid)
    )


def pending_changes(pve: PveSession, node: str, vmid: int) -> list[dict[str, Any]]:
    """The entries of `nodes/{node}/qemu/{vmid}/pending` that change something: a new value
    (`pending`) or a deletion (`delete` of a key the config has)."""
    entries = pve.get(_vm_path(node, vmid, "pending"))
    return [dict(e) for e in entries if "pending" in e or (e.get("delete") and "value" in e)]


def pending_keys(changes: list[dict[str, Any]]) -> list[str]:
    return sorted(str(change["key"]) for change in changes)


# --------------------------------------------------------------------------- provider


class GpuVmProvider(ResourceProvider):
    """Pulumi dynamic provider for one GPU passthrough VM cloned from a template (see module)."""

    def __init__(self, timing: Timing | None = None) -> None:
        super().__init__()
        self.timing = timing or Timing()

    # ------------------------------------------------------------------ Pulumi methods

    def create(self, props: dict[str, Any]) -> CreateResult:
        inputs = _inputs_of(props)
        with _failing(f"creating the VM of {inputs['name']} on {inputs['node']}"):
            return self._create(inputs)

    def _create(self, inputs: dict[str, Any]) -> CreateResult:
        pve = PveSession(inputs, self.timing)
        vm = self._adoptable(pve, inputs)
        source = None  # the template's node, when this create clones
        if vm is None:
            source = self._check_placement(pve, inputs)
            vm = _Vm(0, inputs["node"])
        try:
            if source is not None:
                self._clone(pve, vm, inputs, source)
            self._configure(pve, vm, inputs)
            self._start(pve, vm)
            address = self._wait_for_address(pve, vm, inputs)
            outs = self._outputs(pve, vm, inputs, address)
        except Exception as error:
            if not vm.made_here:
                raise
            note = self._discard(pve, vm, inputs)
            raise GpuVmError(
                f"creating VM {vm.vmid} for {inputs['name']} on {vm.node} failed: {error}; {note}"
            ) from error
        return CreateResult(str(vm.vmid), outs)

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        inputs = _inputs_of(props)
        with _failing(f"reading VM {id_} ({inputs['name']})"):
            return self._read(id_, props, inputs)

    def _read(self, id_: str, props: Mapping[str, Any], inputs: dict[str, Any]) -> ReadResult:
        pve = PveSession(inputs, self.timing)
        vm = self._locate(pve, int(id_), inputs)
        if vm is None:
            return ReadResult("", {})
        seen = observe_vm(pve, vm.node, vm.vmid, inputs)
        observed = {**inputs, **{key: seen.actual[key] for key in seen.drift}}
        address = self._current_address(pve, vm, inputs) or props.get("address")
        outs = self._outputs(pve, vm, observed, address, config=seen.config, seen=seen)
        outs["drift"] = seen.drift
        return ReadResult(id_, outs)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        changes = vm_config.classify(_inputs_of(olds), _inputs_of(news))
        return DiffResult(
            changes=changes.any,
            replaces=changes.replace,
            delete_before_replace=bool(changes.replace) or None,
        )

    def update(self, id_: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        inputs = _inputs_of(news)
        replace = vm_config.classify(_inputs_of(olds), inputs).replace
        if replace:
            raise GpuVmError(f"{', '.join(replace)} cannot change in place; the VM is replaced")
        with _failing(f"updating VM {id_} ({inputs['name']})"):
            return self._update(id_, olds, inputs)

    def _update(self, id_: str, olds: Mapping[str, Any], inputs: dict[str, Any]) -> UpdateResult:
        pve = PveSession(inputs, self.timing)
        # Found by the old inputs: a change of stack or name changes the tags it carries.
        vm = self._locate(pve, int(id_), _inputs_of(olds))
        if vm is None:
            raise GpuVmError(
                f"VM {id_} ({inputs['name']}) is gone: run `pulumi refresh`, then `pulumi up` "
                "makes it again"
            )
        self._configure(pve, vm, inputs)
        address: str | None
        if inputs.get("allow_restart") and self._pending(pve, vm):
            self._power_off(pve, vm)
            self._start(pve, vm)
            address = self._wait_for_address(pve, vm, inputs)
        else:
            address = self._current_address(pve, vm, inputs) or olds.get("address")
        return UpdateResult(self._outputs(pve, vm, inputs, address))

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        inputs = _inputs_of(props)
        with _failing(f"deleting VM {id_} ({inputs['name']})"):
            pve = PveSession(inputs, self.timing)
            vm = self._locate(pve, int(id_), inputs)
            if vm is None:
                return
            self._power_off(pve, vm)
            self._destroy(pve, vm)

    # ---------------------------------------------------- replacing (gpufleet rebuild)

    def find_vm(self, props: dict[str, Any]) -> tuple[int, str] | None:
        """(vmid, node) of the VM tagged for this stack and host, if any."""
        inputs = _inputs_of(props)
        with _failing(f"looking for the VM of {inputs['name']}"):
            vm = self._adoptable(PveSession(inputs, self.timing), inputs)
        return (vm.vmid, vm.node) if vm else None

    def set_aside(self, id_: str, props: dict[str, Any], *, tagged: bool = False) -> None:
        """Power the VM off and take the stack's and host's tags off it (tag it
        `gpufleet-replaced`), so that `create` clones a new VM, with a new vmid, whose start
        finds the GPU free; a rebuild destroys the old one once the new one runs
        (gpufleet/rebuild/replace.py). `tagged=True` undoes it: tags back, VM started."""
        inputs = _inputs_of(props)
        with _failing(f"setting VM {id_} ({inputs['name']}) aside"):
            pve = PveSession(inputs, self.timing)
            vm = self._locate(pve, int(id_), inputs)
            if vm is None:
                return
            config = pve.get(_vm_path(vm.node, vm.vmid, "config"))
            tags = tags_of(config) - set(inputs["tags"]) - {REPLACED_TAG}
            if tagged:
                tags |= set(inputs["tags"])
            else:
                self._power_off(pve, vm)
                tags.add(REPLACED_TAG)
            path = _vm_path(vm.node, vm.vmid, "config")
            pve.send("PUT", path, tags=";".join(sorted(tags)))
            if tagged:
                self._start(pve, vm)

    # ------------------------------------------------------------------- finding VMs

    def _adoptable(self, pve: PveSession, inputs: Mapping[str, Any]) -> _Vm | None:
        """The VM an interrupted create left, tagged for this stack and host, if any."""
        found = [vm for vm in cluster_vms(pve) if _ours(vm, inputs) and not vm.get("template")]
        if not found:
            return None
        if len(found) > 1:
            ids = ", ".join(f"{vm['vmid']} on {vm['node']}" for vm in found)
            raise GpuVmError(
                f"several VMs carry the tags {';'.join(inputs['tags'])}: {ids}; destroy the "
                "extra ones (or remove their tags), then run again"
            )
        vm = found[0]
        if vm["node"] != inputs["node"]:
            raise GpuVmError(
                f"VM {vm['vmid']} tagged for {inputs['name']} is on node {vm['node']}, not "
                f"{inputs['node']}: migrate it back or destroy it, then run again"
            )
        return _Vm(int(vm["vmid"]), str(vm["node"]))

    def _locate(self, pve: PveSession, vmid: int, inputs: Mapping[str, Any]) -> _Vm | None:
        """Where VM `vmid` is now, or None if it is gone or is no longer this resource's VM."""
        for vm in cluster_vms(pve):
            if int(vm["vmid"]) == vmid:
                return _Vm(vmid, str(vm["node"])) if _still_ours(vm, inputs) else None
        return None

    # ------------------------------------------------------------------------ create

    def _check_placement(self, pve: PveSession, inputs: Mapping[str, Any]) -> str:
        """Check the node is online and the template exists; the template's node."""
        node = inputs["node"]
        nodes = {str(n["node"]): str(n.get("status")) for n in pve.get("nodes")}
        if node not in nodes:
            raise GpuVmError(
                f"node {node} is not in the cluster (nodes: {', '.join(sorted(nodes))})"
            )
        if nodes[node] != "online":
            raise GpuVmError(f"node {node} is {nodes[node]}: bring it back or pick another node")
        return self._template_node(pve, inputs)

    def _template_node(self, pve: PveSession, inputs: Mapping[str, Any]) -> str:
        template = int(inputs["template_vmid"])
        for vm in cluster_vms(pve):
            if int(vm["vmid"]) == template:
                if not vm.get("template"):
                    raise GpuVmError(
                        f"VM {template} is not a template: convert it (`qm template {template}`)"
                        " or set proxmox.template_vmid to one"
                    )
                return str(vm["node"])
        raise GpuVmError(f"template VM {template} does not exist (proxmox.template_vmid)")

    def _clone(self, pve: PveSession, vm: _Vm, inputs: Mapping[str, Any], source: str) -> None:
        """A full clone of the template (on node `source`) onto the VM's node and storage, under
        a fresh VM id, waited for. Sets vm.vmid, and vm.made_here once PVE may have made it.

        A clone POST whose answer the network lost may have been carried out: before sending it
        again (with the same id, so that PVE refuses a second copy), look for the VM by that id
        and the host's name, as adoption looks for a tagged one.
        """
        template = int(inputs["template_vmid"])
        timeout = self.timing.task_timeout_s

        def clone_once() -> str | None:  # reads `clashes` of the loop below
            if vm.made_here and self._is_our_clone(pve, vm, inputs):
                return None  # the lost POST made it; _locked_retry waited for its task
            if not vm.vmid:
                vm.vmid = _fresh_vmid(pve, clashes)
            params: dict[str, Any] = {
                "newid": vm.vmid,
                "name": inputs["name"],
                "full": 1,
                "storage": inputs["storage"],
            }
            if source != vm.node:
                params["target"] = vm.node
            try:
                upid = str(pve.send("POST", _vm_path(source, template, "clone"), **params))
            except ProxmoxTransientError:
                vm.made_here = True  # perhaps: _discard looks before it destroys anything
                raise
            vm.made_here = True
            return upid

        for clashes in range(_ID_RETRIES):
            try:
                upid = self._locked_retry(
                    pve, source, template, f"cloning template {template}", clone_once
                )
            except ProxmoxApiError as error:
                # Another create (a parallel `pulumi up` step) took the id nextid gave us, unless
                # it was our own POST whose answer was lost.
                if not _ID_TAKEN.search(error.pve_message) or clashes == _ID_RETRIES - 1:
                    raise
                if vm.made_here and self._is_our_clone(pve, vm, inputs):
                    upid = None
                else:
                    vm.vmid, vm.made_here = 0, False
                    continue
            if upid is None:
                self._settle(pve, source, template)
            else:
                pve.wait(source, upid, timeout)
            return

    def _is_our_clone(self, pve: PveSession, vm: _Vm, inputs: Mapping[str, Any]) -> bool:
        """VM vm.vmid exists, is no template and carries the host's name: this create's clone."""
        for found in cluster_vms(pve):
            if int(found["vmid"]) == vm.vmid:
                return found.get("name") == inputs["name"] and not found.get("template")
        return False

    def _configure(self, pve: PveSession, vm: _Vm, inputs: Mapping[str, Any]) -> None:
        """POST the config keys that differ, then grow the boot disk to disk_gb. Each step reads
        the config first: sent again after a lost answer, it sends only what is still missing."""
        timeout = self.timing.task_timeout_s
        path = _vm_path(vm.node, vm.vmid, "config")

        def post_update() -> None:
            update = vm_config.config_update(inputs, pve.get(path))
            if not update.empty:
                pve.task("POST", path, vm.node, timeout, **update.as_params())

        def grow_disk(disk_gb: int = int(inputs["disk_gb"])) -> None:
            config = pve.get(path)
            disk = vm_config.boot_disk(config)
            if disk is None:
                raise GpuVmError(
                    f"VM {vm.vmid} has no boot disk to grow: does the template have one?"
                )
            size = vm_config.disk_size_gb(str(config[disk]))
            if size is None or size < disk_gb:
                resize = _vm_path(vm.node, vm.vmid, "resize")
                pve.task("PUT", resize, vm.node, timeout, disk=disk, size=f"{disk_gb}G")

        self._locked_retry(pve, vm.node, vm.vmid, f"configuring VM {vm.vmid}", post_update)
        self._locked_retry(pve, vm.node, vm.vmid, f"growing the disk of VM {vm.vmid}", grow_disk)

    def _start(self, pve: PveSession, vm: _Vm) -> None:
        self._power(pve, vm, "start", f"starting VM {vm.vmid}", unless="running")

    def _power(
        self, pve: PveSession, vm: _Vm, action: str, what: str, *, unless: str, **params: Any
    ) -> None:
        """POST status/<action> unless the VM's status is `unless` already (read first, so a
        call sent again after a lost answer does not start or stop the VM twice)."""
        # A shutdown ends by its own `timeout`; the task gets a minute more.
        timeout = float(params["timeout"]) + 60 if "timeout" in params else None

        def change() -> None:
            if self._status(pve, vm) != unless:
                path = _vm_path(vm.node, vm.vmid, f"status/{action}")
                pve.task("POST", path, vm.node, timeout or self.timing.task_timeout_s, **params)

        self._locked_retry(pve, vm.node, vm.vmid, what, change)

    # ----------------------------------------------------------------- the guest agent

    def _wait_for_address(self, pve: PveSession, vm: _Vm, inputs: Mapping[str, Any]) -> str:
        """The VM's IPv4 address as its guest agent reports it, within agent_timeout_s."""
        deadline = time.monotonic() + self.timing.agent_timeout_s
        last = "no answer yet"
        while True:
            try:
                address = self._agent_address(pve, vm, inputs)
                if address:
                    return address
                last = "no IPv4 address on any interface yet"
            except ProxmoxApiError as error:
                if error.status_code != _AGENT_NOT_READY:
                    raise
                last = error.reason
            if time.monotonic() >= deadline:
                raise GpuVmError(
                    f"VM {vm.vmid} started but its guest agent reported no IPv4 address within "
                    f"{self.timing.agent_timeout_s:g}s (last: {last}): the template needs "
                    "qemu-guest-agent installed and enabled, and the network must come up"
                )
            time.sleep(self.timing.poll_s)

    def _current_address(self, pve: PveSession, vm: _Vm, inputs: Mapping[str, Any]) -> str | None:
        """The agent's address now, or None (VM stopped, agent not answering)."""
        with suppress(ProxmoxApiError):
            return self._agent_address(pve, vm, inputs)
        return None

    def _agent_address(self, pve: PveSession, vm: _Vm, inputs: Mapping[str, Any]) -> str | None:
        answer = pve.get(_vm_path(vm.node, vm.vmid, "agent/network-get-interfaces"))
        found = list(_ipv4_addresses(answer.get("result", []) if isinstance(answer, dict) else []))
        wanted = str(inputs["network"]["ipv4"]).split("/")[0]
        if wanted in found:
            return wanted
        if inputs["network"]["ipv4"] == "dhcp" and found:
            return found[0]
        return None

    # ------------------------------------------------------------------ power, removal

    def _status(self, pve: PveSession, vm: _Vm) -> str:
        return str(pve.get(_vm_path(vm.node, vm.vmid, "status/current")).get("status"))

    def _power_off(self, pve: PveSession, vm: _Vm) -> None:
        """ACPI shutdown with a timeout; a guest still running after it is stopped hard."""
        timeout = self.timing.shutdown_timeout_s
        with suppress(ProxmoxTaskError):
            what = f"shutting down VM {vm.vmid}"
            self._power(pve, vm, "shutdown", what, unless="stopped", timeout=timeout)
        self._power(pve, vm, "stop", f"stopping VM {vm.vmid}", unless="stopped")

    def _destroy(self, pve: PveSession, vm: _Vm) -> None:
        """Destroy the VM with its disks and every reference (jobs, HA); gone already is fine."""
        try:
            self._locked_retry(
                pve,
                vm.node,
                vm.vmid,
                f"destroying VM {vm.vmid}",
                lambda: pve.task(
                    "DELETE",
                    _vm_path(vm.node, vm.vmid),
                    vm.node,
                    self.timing.task_timeout_s,
                    purge=1,
                    **{"destroy-unreferenced-disks": 1},
                ),
            )
        except ProxmoxError as error:
            if not _GONE.search(str(error)):
                raise

    def _discard(self, pve: PveSession, vm: _Vm, inputs: Mapping[str, Any]) -> str:
        """Stop and destroy a VM this create made; a sentence on how that went."""
        try:
            for found in cluster_vms(pve):
                if int(found["vmid"]) == vm.vmid:
                    if not _still_ours(found, inputs):
                        return f"VM {vm.vmid} is not the clone this create made: left alone"
                    vm.node = str(found["node"])
                    break
            else:
                return f"no VM {vm.vmid} was left behind"
            self._power_off(pve, vm)
            self._destroy(pve, vm)
        except ProxmoxError as error:
            return (
                f"removing the half-made VM {vm.vmid} failed too ({error}), so VM {vm.vmid} "
                f"({inputs['name']}) is left on node {vm.node}: destroy it by hand there "
                f"(`qm stop {vm.vmid}; qm destroy {vm.vmid} --purge`)"
            )
        return f"VM {vm.vmid} was stopped and destroyed"

    def _locked_retry(
        self, pve: PveSession, node: str, vmid: int, what: str, action: Callable[[], T]
    ) -> T:
        """Run `action`; while PVE says VM `vmid` is locked, wait and try again (bounded).

        An action whose answer the network lost runs again too (Timing.network_tries in all),
        once the guest's running tasks, the lost call's among them, have ended. Actions read
        what PVE has before they change it, so running one again does not do a thing twice.
        """
        timing = self.timing
        locked = 0
        network_delays = timing.backoff.delays()
        while True:
            try:
                return action()
            except ProxmoxTransientError as error:
                delay = next(network_delays, None)
                if delay is None:
                    error.tries = timing.network_tries
                    raise
                time.sleep(delay)
                self._settle(pve, node, vmid)
            except ProxmoxError as error:
                lock = _locked(error)
                if lock is None:
                    raise
                if locked == timing.lock_retries:
                    waited = timing.lock_retries * timing.lock_retry_delay_s
                    raise VmLockedError(
                        f"{what}: the VM stayed locked ({lock}) through {locked + 1} tries over "
                        f"{waited:g}s ({error}); wait for the {lock} to finish (or, if nothing "
                        f"holds it, `qm unlock {vmid}`) and run again"
                    ) from None
                locked += 1
                time.sleep(timing.lock_retry_delay_s)

    def _settle(self, pve: PveSession, node: str, vmid: int) -> None:
        """Wait, up to the task timeout, until no task runs for guest `vmid` on `node`."""
        deadline = time.monotonic() + self.timing.task_timeout_s
        with suppress(ProxmoxApiError):  # a login that may not list tasks: go on regardless
            while pve.active_tasks(node, vmid) and time.monotonic() < deadline:
                time.sleep(self.timing.poll_s)

    # ----------------------------------------------------------------------- outputs

    def _pending(self, pve: PveSession, vm: _Vm) -> list[str]:
        """Config keys PVE holds back until the VM starts again."""
        return pending_keys(pending_changes(pve, vm.node, vm.vmid))

    def _outputs(
        self,
        pve: PveSession,
        vm: _Vm,
        inputs: Mapping[str, Any],
        address: str | None,
        *,
        config: Mapping[str, Any] | None = None,
        seen: VmObservation | None = None,
    ) -> dict[str, Any]:
        """The inputs (Pulumi diffs against them) plus what PVE made: vmid, node, address, ..."""
        if config is None:
            config = pve.get(_vm_path(vm.node, vm.vmid, "config"), current=1)
        devices = vm_config.actual_inputs(config, vm.node)["pci"]
        pending = pending_keys(seen.pending) if seen is not None else self._pending(pve, vm)
        return {
            **inputs,
            "vmid": vm.vmid,
            "node": vm.node,
            "address": address,
            "gpus": [device.get("mapping") or device.get("address") for device in devices],
            "pending_restart": pending,
            "drift": [],
        }


@contextmanager
def _failing(what: str) -> Iterator[None]:
    """Say which resource and step a ProxmoxError came from (GpuVmErrors already do)."""
    try:
        yield
    except GpuVmError:
        raise
    except ProxmoxError as error:
        raise GpuVmError(f"{what}: {error}") from error


def _ipv4_addresses(interfaces: list[dict[str, Any]]) -> Iterator[str]:
    """Routable IPv4 addresses the guest agent lists (no loopback, no link-local)."""
    for interface in interfaces:
        if interface.get("name") == "lo":
            continue
        for entry in interface.get("ip-addresses") or []:
            address = str(entry.get("ip-address", ""))
            if entry.get("ip-address-type") != "ipv4":
                continue
            if address.startswith(("127.", "169.254.")):
                continue
            yield address
