"""The Proxmox GPU-VM dynamic provider against a fake PVE: create, read, diff, update, delete.

What is real: fakepve (a fake PVE 9 API) served over HTTPS, verified against the certificate
it was started with (`fakepve_cafile`), with PVE's parameter validation (HTTP 400 with PVE's
words for a malformed `net0`, `sshkeys`, `tags`, ...), its tasks (UPIDs that run, hold the
config lock and end with `TASK ERROR: ...`), pending config on running VMs, clone and destroy
with their volumes, logins (API token; password with tickets); proxmoxer; client.py; and the
provider code, unchanged.

What is not: no Pulumi engine (the provider's methods are called directly with the dicts
the engine would pass: inputs, and the previous outputs as `olds`; the component is built
under Pulumi's mocks), and no PVE: fakepve does not model QEMU's disk resize (the request is
checked, the disk keeps its size), resource mappings (`mapping=` is not checked against
/cluster/mapping/pci), or a guest agent in a clone. The `agents` fixture wraps fakepve's start
handler so that every started VM's agent answers with the address its cloud-init config gives,
as a booted cloud image would. PVE seconds run 100x faster (time_scale 0.01).

The flaky network is fakepve's own (`flaky_network`, seeded: connections reset before PVE
sees the request). Answers lost after PVE acted, and hung requests, are the tests' own
wrapper around fakepve's request handling (`LostAnswers`): the request runs in the fake as
usual, then its connection closes instead of answering, or stays silent first.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dill  # type: ignore[import-untyped]
import pulumi
import pulumi.runtime.mocks
import pytest
import requests
import requests.adapters
from pulumi.dynamic.dynamic import serialize_provider

from gpufleet.spec.hosts import HostSpec
from gpufleet.spec.proxmox import ProxmoxCluster
from infra.proxmox import vm_config
from infra.proxmox.gpu_host import ProxmoxGpuHost
from infra.proxmox.provider import (
    OUTPUT_KEYS,
    GpuVmError,
    GpuVmProvider,
    Timing,
    VmLockedError,
)

pytestmark = pytest.mark.fakepve(time_scale=0.01)

TEMPLATE = 9000
TOKEN_ID = "gpufleet@pve!provisioner"  # noqa: S105 - a token id, not its secret
TOKEN_SECRET = "tok-3f9c1d-not-for-logs"  # noqa: S105 - the fake's token secret
PASSWORD = "secret"  # noqa: S105 - fakepve's root@pam password
STACK = "onprem-test"
KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDx9Q3nZ1M0o1x9yWc7yQ9f0h0cWc0s3V0tN5m2lq4bF ops@gpufleet"
)
FAST = Timing(
    task_timeout_s=30,
    poll_s=0.02,
    shutdown_timeout_s=20,
    agent_timeout_s=1,
    lock_retries=10,
    lock_retry_delay_s=0.05,
)
HOST: dict[str, Any] = {
    "name": "gpu-test-1",
    "gpus": {"model": "a10", "count": 1},
    "proxmox": {
        "node": "pve1",
        "cores": 16,
        "memory_mb": 65536,
        "disk_gb": 32,
        "network": {"bridge": "vmbr0", "vlan": 20, "ipv4": "10.20.0.21/24", "gateway": "10.20.0.1"},
        "ssh_keys": [KEY],
        "pci": [{"mapping": "a10-pve1-0"}],
    },
}


# ------------------------------------------------------------------------------ fixtures


class Agents:
    """Started VMs get a guest agent that reports the address their cloud-init config gives."""

    def __init__(self, pve: Any) -> None:
        self.enabled = True
        self.revoke_tickets_at_next_start = False
        self._start = pve._do_start
        self._pve = pve

    async def start(self, vm: Any, user: str, params: dict[str, Any]) -> Any:
        if self.enabled:
            vm.agent = {"interfaces": _interfaces(vm)}
        if self.revoke_tickets_at_next_start:
            self.revoke_tickets_at_next_start = False
            self._pve.revoke_tickets()  # the ticket expires while the start task runs
        return await self._start(vm, user, params)


def _interfaces(vm: Any) -> list[dict[str, Any]]:
    ipconfig = {**vm.config, **vm.pending}.get("ipconfig0", "ip=dhcp")
    ip = dict(part.split("=", 1) for part in ipconfig.split(",")).get("ip", "dhcp")
    address = f"192.0.2.{vm.vmid % 200 + 20}" if ip == "dhcp" else ip.split("/")[0]
    return [
        {"name": "lo", "ip-addresses": [{"ip-address": "127.0.0.1", "ip-address-type": "ipv4"}]},
        {
            "name": "eth0",
            "hardware-address": "bc:24:11:00:00:01",
            "ip-addresses": [
                {"ip-address": "fe80::be24:11ff:fe00:1", "ip-address-type": "ipv6", "prefix": 64},
                {"ip-address": address, "ip-address-type": "ipv4", "prefix": 24},
            ],
        },
    ]


@pytest.fixture
def pve(fakepve: Any) -> Any:
    """Nodes pve1 and pve2, a cloud-image template on pve1, the provisioner's API token."""
    fakepve.add_node("pve2")
    fakepve.apitokens[TOKEN_ID] = TOKEN_SECRET
    fakepve.add_vm(
        TEMPLATE,
        "debian-13-cloud",
        node="pve1",
        template=True,
        config={
            "scsi0": "local-lvm:base-9000-disk-0,size=32G",
            "scsihw": "virtio-scsi-pci",
            "ide2": "local-lvm:vm-9000-cloudinit,media=cdrom",
            "net0": "virtio=BC:24:11:00:90:00,bridge=vmbr0",
            "boot": "order=scsi0",
            "ostype": "l26",
            "serial0": "socket",
            "vga": "serial0",
            "agent": "1",
            "cores": 2,
            "memory": "2048",
            "template": 1,
        },
    )
    return fakepve


@pytest.fixture
def agents(pve: Any, monkeypatch: pytest.MonkeyPatch) -> Agents:
    agents = Agents(pve)
    monkeypatch.setattr(pve, "_do_start", agents.start)
    return agents


def _cluster(url: str, cafile: str, *, password: bool = False, storage: str = "local-lvm") -> Any:
    login = {"user": "root@pam"} if password else {"token_id": TOKEN_ID}
    return ProxmoxCluster.model_validate(
        {"endpoint": url, "ca_bundle": cafile, "template_vmid": TEMPLATE, "storage": storage}
        | login
    )


def make_inputs(
    url: str,
    cafile: str,
    *,
    stack: str = STACK,
    password: bool = False,
    storage: str = "local-lvm",
    **changes: Any,
) -> dict[str, Any]:
    """The inputs the component would pass, secret included; `changes` edit the proxmox block."""
    host = HostSpec.model_validate({**HOST, "proxmox": {**HOST["proxmox"], **changes}})
    inputs = vm_config.vm_inputs(
        stack,
        host,
        _cluster(url, cafile, password=password, storage=storage),
        ca_certificate=Path(cafile).read_text(encoding="utf-8"),
    )
    inputs["secret"] = PASSWORD if password else TOKEN_SECRET
    return inputs


@pytest.fixture
def inputs(pve: Any, fakepve_url: str, fakepve_cafile: str) -> dict[str, Any]:
    return make_inputs(fakepve_url, fakepve_cafile)


@pytest.fixture
def provider() -> GpuVmProvider:
    return GpuVmProvider(FAST)


@pytest.fixture
def created(
    provider: GpuVmProvider, inputs: dict[str, Any], agents: Agents
) -> tuple[str, dict[str, Any]]:
    """A VM made by create: (id, outputs)."""
    result = provider.create(dict(inputs))
    assert result.outs is not None
    return result.id, result.outs


# ------------------------------------------------------------------------------ helpers


def made_vms(pve: Any) -> list[Any]:
    return [vm for vm in pve.vms if vm.vmid != TEMPLATE]


def leftover_volumes(pve: Any) -> list[str]:
    return [
        f"{sid}:{name}"
        for sid, store in pve.storages.items()
        for name, vol in store.get("volumes", {}).items()
        if vol.get("vmid") != TEMPLATE
    ]


def assert_nothing_leaked(pve: Any) -> None:
    """No VM but the template, no disk of another VM: what a failed create must leave."""
    assert [vm.vmid for vm in made_vms(pve)] == []
    assert leftover_volumes(pve) == []


def requests_to(pve: Any, method: str, suffix: str) -> list[bytes]:
    return [body for m, path, body in pve.requests if m == method and path.endswith(suffix)]


def form(body: bytes) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(body.decode()))


# ------------------------------------------------------------------- vm_config (pure)


def test_pve_params_for_a_gpu_vm(inputs: dict[str, Any]) -> None:
    params = vm_config.pve_params(inputs)
    assert params == {
        "name": "gpu-test-1",
        "machine": "q35",
        "bios": "ovmf",
        "cpu": "host",
        "balloon": 0,
        "agent": "1",
        "cores": 16,
        "memory": 65536,
        "ciuser": "gpufleet",
        "sshkeys": urllib.parse.quote(KEY, safe=""),
        "ipconfig0": "ip=10.20.0.21/24,gw=10.20.0.1",
        "net0": "virtio,bridge=vmbr0,tag=20",
        "tags": "gpufleet-onprem-test;gpufleet-host-gpu-test-1",
        "hostpci0": "mapping=a10-pve1-0,pcie=1",
    }
    assert "%20" in str(params["sshkeys"])
    assert " " not in str(params["sshkeys"])


def test_raw_pci_addresses_dhcp_and_tag_charset() -> None:
    assert vm_config.hostpci_value({"address": "0000:41:00.0"}) == "0000:41:00.0,pcie=1"
    assert vm_config.ipconfig_value({"ipv4": "dhcp", "gateway": "10.0.0.1"}) == "ip=dhcp"
    assert vm_config.vm_tags("Org/Prod Stack", "gpu-1") == [
        "gpufleet-org-prod-stack",
        "gpufleet-host-gpu-1",
    ]


def test_every_input_and_every_pve_key_written_is_classified(inputs: dict[str, Any]) -> None:
    # ca_bundle (the CA's path) is classified for states written before ca_certificate.
    assert set(inputs) | {"ca_bundle"} == set(vm_config.INPUT_APPLY)
    assert set(vm_config.VM_KEYS) <= set(inputs)
    with_dns = inputs | {"network": inputs["network"] | {"nameserver": "10.20.0.1"}}
    written = vm_config.config_update(with_dns, {"net0": "virtio=BC:24:11:00:00:01"}).set
    assert {
        key.rstrip("0123456789") if key.startswith("hostpci") else key for key in written
    } == set(vm_config.PVE_KEY_APPLY)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"node": "pve2"}, "replace"),
        ({"template_vmid": 9001}, "replace"),
        ({"storage": "ceph-vm"}, "replace"),
        ({"disk_gb": 16}, "replace"),
        ({"disk_gb": 64}, "live"),
        ({"cores": 8}, "restart"),
        ({"memory_mb": 32768}, "restart"),
        ({"pci": [{"mapping": "a10-pve1-1"}]}, "restart"),
        ({"ssh_keys": [KEY, KEY.replace("ops@", "ci@")]}, "restart"),
        ({"hardware": {**vm_config.HARDWARE, "machine": "pc"}}, "restart"),
        ({"tags": ["gpufleet-x", "gpufleet-host-y"]}, "live"),
        ({"name": "renamed-in-the-gui"}, "live"),
        ({"host": "gpu-test-9"}, "replace"),
        ({"endpoint": "https://pve2.example:8006"}, "state"),
        ({"secret": "rotated"}, "state"),
    ],
)
def test_classify(inputs: dict[str, Any], change: dict[str, Any], expected: str) -> None:
    changes = vm_config.classify(inputs, inputs | change)
    assert getattr(changes, expected) == list(change)


def test_classify_network_bridge_live_addressing_restart(inputs: dict[str, Any]) -> None:
    network = inputs["network"]
    assert vm_config.classify(inputs, inputs | {"network": network | {"vlan": 30}}).live == [
        "network"
    ]
    readdressed = inputs | {"network": network | {"ipv4": "10.20.0.30/24"}}
    assert vm_config.classify(inputs, readdressed).restart == ["network"]


# --------------------------------------------------------------------- create, read


def test_create_clones_configures_starts_and_reports_the_address(
    pve: Any, created: tuple[str, dict[str, Any]]
) -> None:
    vmid, outs = created
    [vm] = made_vms(pve)
    assert str(vm.vmid) == vmid
    assert vm.node == "pve1"
    assert vm.status == "running"
    [clone] = requests_to(pve, "POST", f"/qemu/{TEMPLATE}/clone")
    assert form(clone) == {
        "newid": vmid,
        "name": "gpu-test-1",
        "full": "1",
        "storage": "local-lvm",
    }
    config = vm.config
    assert config["scsi0"].startswith(f"local-lvm:vm-{vmid}-disk-0,")
    assert (config["machine"], config["bios"], config["cpu"]) == ("q35", "ovmf", "host")
    assert config["efidisk0"] == "local-lvm:1,efitype=4m,pre-enrolled-keys=0"
    assert (str(config["balloon"]), str(config["cores"]), str(config["memory"])) == (
        "0",
        "16",
        "65536",
    )
    assert config["hostpci0"] == "mapping=a10-pve1-0,pcie=1"
    assert config["ciuser"] == "gpufleet"
    assert urllib.parse.unquote(config["sshkeys"]) == KEY
    assert config["ipconfig0"] == "ip=10.20.0.21/24,gw=10.20.0.1"
    assert re.fullmatch(r"virtio=BC:24:11(:[0-9A-F]{2}){3},bridge=vmbr0,tag=20", config["net0"])
    assert config["agent"] == "1"
    assert config["tags"] == "gpufleet-onprem-test;gpufleet-host-gpu-test-1"
    assert config["ide2"] == "local-lvm:vm-9000-cloudinit,media=cdrom"  # the clone's own drive
    assert vm.pending == {}
    assert outs["vmid"] == vm.vmid
    assert (outs["node"], outs["name"], outs["address"]) == ("pve1", "gpu-test-1", "10.20.0.21")
    assert outs["gpus"] == ["a10-pve1-0"]
    assert outs["pending_restart"] == []
    assert outs["drift"] == []


def test_create_grows_the_disk_with_resize(
    pve: Any, provider: GpuVmProvider, agents: Agents, fakepve_url: str, fakepve_cafile: str
) -> None:
    result = provider.create(make_inputs(fakepve_url, fakepve_cafile, disk_gb=40))
    [resize] = requests_to(pve, "PUT", f"/qemu/{result.id}/resize")
    assert form(resize) == {"disk": "scsi0", "size": "40G"}


def test_read_reports_drift_made_behind_pulumis_back(
    pve: Any, provider: GpuVmProvider, created: tuple[str, dict[str, Any]]
) -> None:
    vmid, outs = created
    assert provider.read(vmid, outs).outs == outs | {"address": "10.20.0.21"}
    pve.vm(int(vmid)).config["cores"] = 4
    pve.vm(int(vmid)).config["tags"] = "gpufleet-onprem-test;gpufleet-host-gpu-test-1;mine"
    read = provider.read(vmid, outs)
    assert read.id == vmid
    assert read.outs is not None
    assert read.outs["cores"] == 4
    assert read.outs["drift"] == ["tags", "cores"]
    assert read.outs["tags"] == sorted(["gpufleet-onprem-test", "gpufleet-host-gpu-test-1", "mine"])
    diff = provider.diff(vmid, read.outs, outs)
    assert diff.changes is True
    assert diff.replaces == []


def test_read_of_a_vm_gone_behind_pulumis_back(
    pve: Any, provider: GpuVmProvider, created: tuple[str, dict[str, Any]]
) -> None:
    vmid, outs = created
    vm = pve.vm(int(vmid))
    vm.status = "stopped"
    pve.vms.remove(vm)
    assert provider.read(vmid, outs).id == ""


# ---------------------------------------------------------------------- diff, update


def test_diff_node_or_template_replaces_delete_first(
    provider: GpuVmProvider, created: tuple[str, dict[str, Any]], inputs: dict[str, Any]
) -> None:
    vmid, outs = created
    for change in ({"node": "pve2"}, {"template_vmid": 9001}):
        diff = provider.diff(vmid, outs, inputs | change)
        assert diff.changes is True
        assert diff.replaces == list(change)
        assert diff.delete_before_replace is True
    unchanged = provider.diff(vmid, outs, inputs)
    assert unchanged.changes is False
    assert unchanged.replaces == []


def test_a_renamed_host_replaces_its_vm_deleting_first_and_a_renamed_pve_vm_is_drift(
    pve: Any,
    provider: GpuVmProvider,
    agents: Agents,
    created: tuple[str, dict[str, Any]],
    inputs: dict[str, Any],
) -> None:
    """A host renamed in the stack (`renamed_from`, so the same resource): replace, deleting
    first. Pulumi then deletes with the old state and creates with the new inputs: one VM,
    with the GPU, running. A VM renamed in PVE by hand is drift, repaired live."""
    vmid, outs = created
    renamed = inputs | {
        "host": "gpu-test-9",
        "name": "gpu-test-9",
        "tags": vm_config.vm_tags(STACK, "gpu-test-9"),
    }
    diff = provider.diff(vmid, outs, renamed)
    assert (diff.changes, diff.replaces, diff.delete_before_replace) == (True, ["host"], True)
    hand_renamed = outs | {"name": "renamed-in-the-gui", "drift": ["name"]}
    assert provider.diff(vmid, hand_renamed, inputs).replaces == []
    before_host_was_an_input = {k: v for k, v in outs.items() if k != "host"}
    assert provider.diff(vmid, before_host_was_an_input, inputs).replaces == []

    provider.delete(vmid, outs)  # delete_before_replace: the old VM goes first
    result = provider.create(renamed)
    [vm] = made_vms(pve)
    assert (str(vm.vmid), vm.name, vm.status) == (result.id, "gpu-test-9", "running")
    assert vm.config["hostpci0"] == "mapping=a10-pve1-0,pcie=1"
    assert vm.config["tags"] == "gpufleet-onprem-test;gpufleet-host-gpu-test-9"


def test_renamed_from_aliases_the_component_and_its_vm_to_the_old_names(
    fakepve_cafile: str, pulumi_loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under Pulumi's mocks: the aliases the engine would get, which make the renamed host's
    resources the old ones (and so a replace, not a create beside them)."""
    aliases: dict[str, list[str]] = {}
    register = pulumi.runtime.mocks.MockMonitor.RegisterResource

    def recording(monitor: Any, request: Any) -> Any:
        aliases[request.name] = [alias.spec.name for alias in request.aliases]
        return register(monitor, request)

    monkeypatch.setattr(pulumi.runtime.mocks.MockMonitor, "RegisterResource", recording)
    pulumi.runtime.set_mocks(_Mocks(), project="gpufleet", stack=STACK, preview=False)
    renamed = {
        **HOST,
        "name": "gpu-test-9",
        "proxmox": {**HOST["proxmox"], "renamed_from": HOST["name"]},
    }

    @pulumi.runtime.test  # type: ignore[untyped-decorator]
    def check() -> pulumi.Output[Any]:
        host = ProxmoxGpuHost(
            "gpu-test-9",
            stack=STACK,
            host=HostSpec.model_validate(renamed),
            cluster=_cluster("https://pve.example.internal:8006", fakepve_cafile),
            secret=TOKEN_SECRET,
            project_root=Path("/project"),
        )
        return host.vm.urn

    check()
    assert aliases["gpu-test-9"] == ["gpu-test-1"]
    assert "gpu-test-1-vm" in aliases["gpu-test-9-vm"]


def test_update_cores_waits_for_a_restart_unless_allowed(
    pve: Any,
    provider: GpuVmProvider,
    created: tuple[str, dict[str, Any]],
    inputs: dict[str, Any],
) -> None:
    vmid, outs = created
    news = inputs | {"cores": 8}
    diff = provider.diff(vmid, outs, news)
    assert diff.changes is True
    assert diff.replaces == []
    assert vm_config.classify(outs, news).restart == ["cores"]

    updated = provider.update(vmid, outs, news).outs
    assert updated is not None
    vm = pve.vm(int(vmid))
    assert vm.config["cores"] == "16"
    assert vm.pending == {"cores": "8"}
    assert updated["pending_restart"] == ["cores"]
    assert updated["cores"] == 8

    starts = len(requests_to(pve, "POST", f"/qemu/{vmid}/status/start"))
    restarted = provider.update(vmid, updated, news | {"allow_restart": True}).outs
    assert restarted is not None
    assert restarted["pending_restart"] == []
    assert vm.config["cores"] == "8"
    assert vm.pending == {}
    assert vm.status == "running"
    assert len(requests_to(pve, "POST", f"/qemu/{vmid}/status/start")) == starts + 1
    assert restarted["address"] == "10.20.0.21"


def test_update_tags_applies_live(
    pve: Any,
    provider: GpuVmProvider,
    created: tuple[str, dict[str, Any]],
    fakepve_url: str,
    fakepve_cafile: str,
) -> None:
    vmid, outs = created
    news = make_inputs(fakepve_url, fakepve_cafile, stack="onprem-test-b")
    assert vm_config.classify(outs, news).live == ["stack", "tags"]
    updated = provider.update(vmid, outs, news).outs
    assert updated is not None
    assert updated["pending_restart"] == []
    vm = pve.vm(int(vmid))
    assert vm.config["tags"] == "gpufleet-onprem-test-b;gpufleet-host-gpu-test-1"
    assert vm.pending == {}
    assert vm.status == "running"
    [config_post] = requests_to(pve, "POST", f"/qemu/{vmid}/config")[1:]
    assert set(form(config_post)) == {"tags"}  # nothing unchanged is sent


def test_update_repairs_drift(
    pve: Any, provider: GpuVmProvider, created: tuple[str, dict[str, Any]], inputs: dict[str, Any]
) -> None:
    vmid, outs = created
    vm = pve.vm(int(vmid))
    vm.config["tags"] = "someone-elses"
    vm.config["name"] = "gpu-test-1"
    read = provider.read(vmid, outs).outs
    assert read is not None
    assert read["drift"] == ["tags"]
    provider.update(vmid, read, inputs)
    assert vm.config["tags"] == "gpufleet-onprem-test;gpufleet-host-gpu-test-1"


# ---------------------------------------------------------------------------- delete


def test_delete_stops_and_destroys_and_a_gone_vm_is_fine(
    pve: Any, provider: GpuVmProvider, created: tuple[str, dict[str, Any]]
) -> None:
    vmid, outs = created
    provider.delete(vmid, outs)
    assert_nothing_leaked(pve)
    [shutdown] = requests_to(pve, "POST", f"/qemu/{vmid}/status/shutdown")
    assert form(shutdown) == {"timeout": "20"}
    [destroy] = [path for m, path, _ in pve.requests if m == "DELETE"]
    assert destroy.endswith(f"/qemu/{vmid}")
    provider.delete(vmid, outs)  # already gone: no error


def test_delete_forces_a_stop_when_the_shutdown_outlasts_its_timeout(
    pve: Any, provider: GpuVmProvider, created: tuple[str, dict[str, Any]]
) -> None:
    vmid, outs = created
    pve.vm(int(vmid)).shutdown_secs = 600  # the guest takes 10 minutes to power off
    provider.delete(vmid, outs)
    assert_nothing_leaked(pve)
    assert len(requests_to(pve, "POST", f"/qemu/{vmid}/status/stop")) == 1
    shutdowns = [t for t in pve.tasklog if t["type"] == "qmshutdown"]
    assert [t["exitstatus"] for t in shutdowns] == ["VM quit/powerdown failed - got timeout"]


def test_delete_leaves_a_vm_that_is_not_this_resources_alone(
    pve: Any, provider: GpuVmProvider, created: tuple[str, dict[str, Any]]
) -> None:
    vmid, outs = created
    vm = pve.vm(int(vmid))
    vm.config.update(tags="other-team", name="their-vm")  # the id was reused
    vm.name = "their-vm"
    provider.delete(vmid, outs)
    assert pve.vm(int(vmid)) is vm
    assert vm.status == "running"


# -------------------------------------------------------------------------- adoption


def test_a_retried_create_adopts_the_tagged_vm_instead_of_cloning_again(
    pve: Any, provider: GpuVmProvider, agents: Agents, inputs: dict[str, Any]
) -> None:
    # An earlier create cloned and tagged VM 150, then died before Pulumi saved its id.
    pve.add_vm(
        150,
        "gpu-test-1",
        node="pve1",
        config={
            "scsi0": "local-lvm:vm-150-disk-0,size=32G",
            "ide2": "local-lvm:vm-150-cloudinit,media=cdrom",
            "net0": "virtio=BC:24:11:00:01:50,bridge=vmbr0",
            "boot": "order=scsi0",
            "tags": "gpufleet-host-gpu-test-1;gpufleet-onprem-test",
        },
    )
    result = provider.create(dict(inputs))
    assert result.id == "150"
    assert [vm.vmid for vm in made_vms(pve)] == [150]
    assert requests_to(pve, "POST", "/clone") == []
    assert requests_to(pve, "GET", "/cluster/nextid") == []
    vm = pve.vm(150)
    assert vm.status == "running"
    assert vm.config["hostpci0"] == "mapping=a10-pve1-0,pcie=1"
    assert vm.config["net0"] == "virtio=BC:24:11:00:01:50,bridge=vmbr0,tag=20"  # MAC kept
    assert result.outs is not None
    assert result.outs["address"] == "10.20.0.21"


def test_create_twice_makes_one_vm(
    pve: Any, provider: GpuVmProvider, created: tuple[str, dict[str, Any]], inputs: dict[str, Any]
) -> None:
    vmid, _ = created
    assert provider.create(dict(inputs)).id == vmid
    assert len(made_vms(pve)) == 1
    assert len(requests_to(pve, "POST", "/clone")) == 1


# ---------------------------------------------------------------------------- faults


def test_template_locked_by_a_backup_is_retried_until_the_backup_ends(
    pve: Any, provider: GpuVmProvider, agents: Agents, inputs: dict[str, Any]
) -> None:
    pve.snapshot_lock(TEMPLATE, "backup")
    timer = threading.Timer(0.2, pve.unlock, [TEMPLATE])
    timer.start()
    try:
        result = provider.create(dict(inputs))
    finally:
        timer.cancel()
    assert len(requests_to(pve, "POST", f"/qemu/{TEMPLATE}/clone")) > 1
    assert [vm.vmid for vm in made_vms(pve)] == [int(result.id)]


def test_a_backup_lock_that_outlasts_the_retries_is_a_clear_error(
    pve: Any, provider: GpuVmProvider, created: tuple[str, dict[str, Any]], inputs: dict[str, Any]
) -> None:
    vmid, outs = created
    pve.snapshot_lock(int(vmid), "backup")
    with pytest.raises(VmLockedError) as caught:
        provider.update(vmid, outs, inputs | {"cores": 8})
    message = str(caught.value)
    assert f"configuring VM {vmid}: the VM stayed locked (backup) through 11 tries" in message
    assert "wait for the backup to finish" in message
    assert TOKEN_SECRET not in message
    vm = pve.vm(int(vmid))
    assert vm.config["cores"] == "16"
    assert vm.pending == {}
    pve.unlock(int(vmid))
    provider.update(vmid, outs, inputs | {"cores": 8})
    assert vm.pending == {"cores": "8"}


def test_a_clone_task_ending_in_task_error_leaves_nothing(
    pve: Any, provider: GpuVmProvider, agents: Agents, fakepve_url: str, fakepve_cafile: str
) -> None:
    pve.add_ceph_storage("ceph-vm")
    pve.ceph_down()
    inputs = make_inputs(fakepve_url, fakepve_cafile, storage="ceph-vm")
    with pytest.raises(GpuVmError) as caught:
        provider.create(inputs)
    message = str(caught.value)
    assert f"task qmclone {TEMPLATE} on pve1 failed: clone failed: storage 'ceph-vm'" in message
    assert "is not online" in message
    assert "no VM 100 was left behind" in message
    [task] = [t for t in pve.tasklog if t["type"] == "qmclone"]
    assert task["log"][-1].startswith("TASK ERROR: clone failed")
    assert_nothing_leaked(pve)


def test_full_storage_fails_the_clone_and_leaves_nothing(
    pve: Any, provider: GpuVmProvider, agents: Agents, inputs: dict[str, Any]
) -> None:
    pve.storages["local-lvm"]["avail"] = 8 * 1024**3  # 8 GiB left; the disk needs 32
    with pytest.raises(GpuVmError, match="No space left on device"):
        provider.create(inputs)
    assert_nothing_leaked(pve)
    assert pve.storages["local-lvm"]["avail"] == 8 * 1024**3


def test_a_403_on_the_config_call_destroys_the_fresh_clone(
    pve: Any, provider: GpuVmProvider, agents: Agents, inputs: dict[str, Any]
) -> None:
    pve.fail("POST", "/nodes/{node}/qemu/{vmid}/config", error="permission_denied")
    with pytest.raises(GpuVmError) as caught:
        provider.create(inputs)
    message = str(caught.value)
    assert "POST /nodes/pve1/qemu/100/config: 403 Permission check failed" in message
    assert "VM 100 was stopped and destroyed" in message
    assert TOKEN_SECRET not in message
    assert requests_to(pve, "POST", "/qemu/100/status/start") == []
    assert_nothing_leaked(pve)


def test_no_agent_address_stops_and_destroys_the_running_vm(
    pve: Any, provider: GpuVmProvider, agents: Agents, inputs: dict[str, Any]
) -> None:
    agents.enabled = False  # the template has no qemu-guest-agent
    with pytest.raises(GpuVmError) as caught:
        provider.create(inputs)
    message = str(caught.value)
    assert "guest agent reported no IPv4 address within 1s" in message
    assert "500 QEMU guest agent is not running" in message
    assert "VM 100 was stopped and destroyed" in message
    assert_nothing_leaked(pve)


def test_an_offline_node_is_refused_before_anything_is_cloned(
    pve: Any, provider: GpuVmProvider, agents: Agents, inputs: dict[str, Any]
) -> None:
    pve.set_node_offline("pve1")
    with pytest.raises(GpuVmError, match="node pve1 is offline: bring it back or pick another"):
        provider.create(inputs)
    assert requests_to(pve, "POST", "/clone") == []
    assert_nothing_leaked(pve)


def test_delete_on_an_offline_node_fails_and_keeps_the_vm(
    pve: Any, provider: GpuVmProvider, created: tuple[str, dict[str, Any]]
) -> None:
    vmid, outs = created
    pve.set_node_offline("pve1")
    with pytest.raises(GpuVmError, match="595 No route to host"):
        provider.delete(vmid, outs)
    pve.set_node_offline("pve1", offline=False)
    provider.delete(vmid, outs)
    assert_nothing_leaked(pve)


def test_an_expired_ticket_logs_in_again_once(
    pve: Any, provider: GpuVmProvider, agents: Agents, fakepve_url: str, fakepve_cafile: str
) -> None:
    inputs = make_inputs(fakepve_url, fakepve_cafile, password=True)
    agents.revoke_tickets_at_next_start = True
    result = provider.create(inputs)
    assert len(requests_to(pve, "POST", "/access/ticket")) == 2
    assert [vm.vmid for vm in made_vms(pve)] == [int(result.id)]
    assert pve.vm(int(result.id)).status == "running"


def test_the_provider_pickles_as_pulumi_serializes_it() -> None:
    pickled = base64.b64decode(serialize_provider(GpuVmProvider(FAST)))
    provider = dill.loads(pickled)  # noqa: S301 - our own bytes, as Pulumi's provider host does
    assert isinstance(provider, GpuVmProvider)
    assert provider.timing == FAST


def test_a_create_that_loses_its_vm_id_to_another_create_takes_the_next(
    pve: Any, provider: GpuVmProvider, agents: Agents, inputs: dict[str, Any]
) -> None:
    # A parallel create (another host of the same `pulumi up`) took the id nextid handed out.
    pve.fail("POST", f"/qemu/{TEMPLATE}/clone", error="unable_create_config_file_already", times=1)
    result = provider.create(dict(inputs))
    assert len(requests_to(pve, "GET", "/cluster/nextid")) == 2
    assert [vm.vmid for vm in made_vms(pve)] == [int(result.id)]


def test_eight_hosts_created_at_once_get_eight_vms(
    pve: Any, provider: GpuVmProvider, agents: Agents, fakepve_url: str, fakepve_cafile: str
) -> None:
    """One `pulumi up` creates its VMs in parallel: all are handed the same `cluster/nextid`,
    one wins each clash, and the others must spread out rather than ask again in lockstep."""
    names = [f"gpu-test-{index}" for index in range(1, 9)]
    hosts = [
        make_inputs(fakepve_url, fakepve_cafile)
        | {"name": name, "tags": vm_config.vm_tags(STACK, name)}
        for name in names
    ]
    results: dict[str, str] = {}

    def create(inputs: dict[str, Any]) -> None:
        results[inputs["name"]] = provider.create(inputs).id

    threads = [threading.Thread(target=create, args=(inputs,)) for inputs in hosts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(results) == names
    assert sorted(vm.name for vm in made_vms(pve)) == names
    assert len(set(results.values())) == len(names)


# ------------------------------------------------------------------- the component


class _Mocks(pulumi.runtime.Mocks):
    """Pulumi's test engine: records the resources registered, answers with fixed outputs."""

    def __init__(self) -> None:
        self.registered: list[pulumi.runtime.MockResourceArgs] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.registered.append(args)
        outputs = {"vmid": 100, "address": "10.20.0.21", "gpus": ["a10-pve1-0"]}
        return f"{args.name}-id", {**args.inputs, **outputs}

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], None]:
        return {}, None


def test_the_component_wraps_one_dynamic_resource_with_the_secret_kept_secret(
    fakepve_cafile: str, pulumi_loop: asyncio.AbstractEventLoop
) -> None:
    mocks = _Mocks()
    pulumi.runtime.set_mocks(mocks, project="gpufleet", stack=STACK, preview=False)
    cluster = _cluster("https://pve.example.internal:8006", fakepve_cafile)

    @pulumi.runtime.test  # type: ignore[untyped-decorator]
    def check() -> pulumi.Output[Any]:
        host = ProxmoxGpuHost(
            "gpu-test-1",
            stack=STACK,
            host=HostSpec.model_validate(HOST),
            cluster=cluster,
            secret=TOKEN_SECRET,
            project_root=Path("/project"),
            timing=FAST,
        )

        def verify(values: list[Any]) -> None:
            name, address, gpus, urn, secret_is_secret = values
            assert (name, address, gpus) == ("gpu-test-1", "10.20.0.21", ["a10-pve1-0"])
            assert "gpufleet:proxmox:GpuHost$pulumi-python:dynamic/proxmox:GpuVm" in urn
            assert urn.endswith("::gpu-test-1-vm")
            assert secret_is_secret
            [vm] = [r for r in mocks.registered if r.custom]
            assert vm.inputs["tags"] == ["gpufleet-onprem-test", "gpufleet-host-gpu-test-1"]
            assert vm.inputs["node"] == "pve1"
            assert "__provider" in vm.inputs

        return pulumi.Output.all(
            host.name,
            host.address,
            host.gpus,
            host.vm.urn,
            pulumi.Output.from_input(host.vm.secret.is_secret()),  # type: ignore[attr-defined]
        ).apply(verify)

    check()


def test_the_same_ca_at_another_path_changes_nothing_and_refresh_needs_no_file(
    pve: Any,
    provider: GpuVmProvider,
    created: tuple[str, dict[str, Any]],
    fakepve_url: str,
    fakepve_cafile: str,
    tmp_path: Path,
    pulumi_loop: asyncio.AbstractEventLoop,
) -> None:
    """Two checkouts keep the cluster's CA at different paths: the component registers the
    same inputs from both, so the provider's diff between them is empty; the state holds the
    PEM, so read (refresh) works with no CA file anywhere."""
    vmid, outs = created
    pem = Path(fakepve_cafile).read_text(encoding="utf-8")
    registered = []
    for checkout, relative in (("alice", "certs/pve-root-ca.pem"), ("ci", "tls/cluster.pem")):
        project = tmp_path / checkout
        (project / relative).parent.mkdir(parents=True)
        (project / relative).write_text(pem, encoding="utf-8")
        registered.append(_registered_inputs(_cluster(fakepve_url, relative), project))
    alice, ci = registered
    assert alice == ci
    diff = provider.diff(vmid, alice | {"secret": TOKEN_SECRET}, ci | {"secret": TOKEN_SECRET})
    assert diff.changes is False
    assert alice["ca_certificate"] == pem
    assert "ca_bundle" not in alice
    for pem_file in tmp_path.rglob("*.pem"):
        pem_file.unlink()
    assert provider.read(vmid, outs).id == vmid


def _registered_inputs(cluster: ProxmoxCluster, project: Path) -> dict[str, Any]:
    """The inputs the component registers for HOST's VM (under Pulumi's mocks), as the
    provider gets them: no output placeholders, no provider, no secret."""
    mocks = _Mocks()
    pulumi.runtime.set_mocks(mocks, project="gpufleet", stack=STACK, preview=False)

    @pulumi.runtime.test  # type: ignore[untyped-decorator]
    def register() -> pulumi.Output[Any]:
        host = ProxmoxGpuHost(
            "gpu-test-1",
            stack=STACK,
            host=HostSpec.model_validate(HOST),
            cluster=cluster,
            secret=TOKEN_SECRET,
            project_root=project,
        )
        return host.vm.urn

    register()
    [vm] = [r for r in mocks.registered if r.custom]
    skip = {"__provider", "secret", *OUTPUT_KEYS}
    return {key: value for key, value in vm.inputs.items() if key not in skip}


def test_config_update_sends_only_changes_and_deletes_what_is_no_longer_wanted(
    inputs: dict[str, Any],
) -> None:
    current = vm_config.pve_params(inputs) | {
        "net0": "virtio=BC:24:11:00:00:01,bridge=vmbr0,tag=20",
        "efidisk0": "local-lvm:vm-100-disk-1,efitype=4m,pre-enrolled-keys=0,size=4M",
        "ide2": "local-lvm:vm-100-cloudinit,media=cdrom",
        "hostpci1": "mapping=a10-pve1-1,pcie=1",
        "nameserver": "10.20.0.1",
        "memory": "65536",
        "tags": "gpufleet-host-gpu-test-1;gpufleet-onprem-test",
    }
    update = vm_config.config_update(inputs | {"cores": 8}, current)
    assert update.set == {"cores": 8}
    assert update.delete == ["hostpci1", "nameserver"]
    assert update.as_params() == {"cores": 8, "delete": "hostpci1,nameserver"}


def test_tls_is_verified_an_unknown_ca_is_refused(
    pve: Any, provider: GpuVmProvider, inputs: dict[str, Any]
) -> None:
    with pytest.raises(GpuVmError, match=r"TLS verification of https://127\.0\.0\.1:\d+ failed"):
        provider.create(
            inputs | {"ca_certificate": None}
        )  # the system's CAs do not know the fake's
    assert requests_to(pve, "GET", "/cluster/resources") == []


# ------------------------------------------------------------------- a flaky network
#
# fakepve's flaky network resets a share of connections before PVE acts on the request.
# `LostAnswers` loses answers in the two other ways a network does, for the requests a test
# names: after PVE carried the request out (the connection closes instead of the answer, or
# the answer never comes: a hung request), or before (a reset, as fakepve's own).

FLAKY = dataclasses.replace(FAST, request_timeout_s=2, network_tries=4, network_retry_delay_s=0.01)


class LostAnswers:
    """Requests matching `method` and the path pattern lose their answer, `times` times (None:
    every time): `when="after"` PVE carries them out first, `"before"` it never sees them;
    `hang_s` keeps the connection open that long, sending nothing, before it closes."""

    def __init__(
        self,
        pve: Any,
        method: str,
        path: str,
        *,
        when: str = "after",
        times: int | None = 1,
        hang_s: float = 0,
    ) -> None:
        self.method, self.path, self.when, self.times = method, path, when, times
        self.hang_s = hang_s
        self.lost: list[str] = []
        self.released = False  # set at the test's end: no hang outlives it
        self._answer = pve._answer

    async def answer(self, request: Any, handler: Any, generic: Any, node: Any) -> Any:
        hit = (
            self.times != 0
            and request.method == self.method
            and re.search(self.path + "$", request.path) is not None
        )
        if not hit:
            return await self._answer(request, handler, generic, node)
        if self.times is not None:
            self.times -= 1
        self.lost.append(request.path)
        response = None
        if self.when == "after":
            response = await self._answer(request, handler, generic, node)
        hung_until = time.monotonic() + self.hang_s
        while time.monotonic() < hung_until and not self.released:
            await asyncio.sleep(0.05)
        request.transport.close()
        if response is None:
            raise ConnectionResetError("the test lost this request")
        return response


@pytest.fixture
def lose(pve: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., LostAnswers]]:
    """lose(method, path, **options): a LostAnswers installed in the fake."""
    made: list[LostAnswers] = []

    def install(method: str, path: str, **options: Any) -> LostAnswers:
        made.append(LostAnswers(pve, method, path, **options))
        monkeypatch.setattr(pve, "_answer", made[-1].answer)
        return made[-1]

    yield install
    for lost in made:
        lost.released = True


def named_inputs(url: str, cafile: str, name: str) -> dict[str, Any]:
    return make_inputs(url, cafile) | {"name": name, "tags": vm_config.vm_tags(STACK, name)}


class CountingSends:
    """Counts the HTTP requests the client sends (requests' adapter), dropped ones included."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent = 0
        send = requests.adapters.HTTPAdapter.send

        def counting(adapter: Any, *args: Any, **kwargs: Any) -> Any:
            self.sent += 1
            return send(adapter, *args, **kwargs)

        monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", counting)


def test_twenty_creates_and_deletes_over_a_network_that_drops_one_request_in_twenty(
    pve: Any,
    agents: Agents,
    fakepve_url: str,
    fakepve_cafile: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fakepve's flaky network, seeded: 5% of connections are reset before PVE sees the
    request. The issue's goal: at least 19 of 20 creates succeed, and no VM is ever leaked."""
    provider = GpuVmProvider(FLAKY)
    pve.flaky_network(drop_rate=0.05, seed=14)
    pve._random.seed(14)  # fakepve seeds when it starts; the fixture has started it already
    sends = CountingSends(monkeypatch)
    made: dict[str, dict[str, Any]] = {}
    failed: list[str] = []
    for number in range(20):
        inputs = named_inputs(fakepve_url, fakepve_cafile, f"gpu-flaky-{number}")
        try:
            result = provider.create(inputs)
        except GpuVmError as error:
            failed.append(str(error))
            continue
        assert result.outs is not None
        made[result.id] = result.outs
    dropped = sends.sent - len(pve.requests)  # about 17 of 350: one create in two hits one
    assert dropped >= 8, f"only {dropped} of {sends.sent} requests were dropped"
    assert len(made) >= 19, failed
    assert sorted(vm.vmid for vm in made_vms(pve)) == sorted(int(vmid) for vmid in made)
    assert all(pve.vm(int(vmid)).status == "running" for vmid in made)
    for message in failed:
        assert "transient network fault" in message
        assert "pveproxy" not in message
    for vmid, outs in made.items():
        try:
            provider.delete(vmid, outs)
        except GpuVmError:
            provider.delete(vmid, outs)  # what the next `pulumi destroy` would do
    assert_nothing_leaked(pve)


def test_a_clone_whose_answer_was_lost_is_found_and_not_made_twice(
    pve: Any,
    provider: GpuVmProvider,
    agents: Agents,
    inputs: dict[str, Any],
    lose: Callable[..., LostAnswers],
) -> None:
    lost = lose("POST", f"/qemu/{TEMPLATE}/clone")
    result = provider.create(dict(inputs))
    assert len(lost.lost) == 1
    assert len(requests_to(pve, "POST", "/clone")) == 1  # looked for, found, not sent again
    assert [vm.vmid for vm in made_vms(pve)] == [int(result.id)]
    assert pve.vm(int(result.id)).status == "running"


def test_a_clone_dropped_before_pve_saw_it_is_sent_again_with_the_same_id(
    pve: Any,
    provider: GpuVmProvider,
    agents: Agents,
    inputs: dict[str, Any],
    lose: Callable[..., LostAnswers],
) -> None:
    lose("POST", "/clone", when="before")
    result = provider.create(dict(inputs))
    clones = [form(body)["newid"] for body in requests_to(pve, "POST", "/clone")]
    assert clones == [result.id, result.id]  # the same id: PVE would refuse a second copy
    assert [vm.vmid for vm in made_vms(pve)] == [int(result.id)]


def test_hung_requests_end_at_the_request_timeout_and_a_lost_start_is_not_sent_twice(
    pve: Any,
    agents: Agents,
    inputs: dict[str, Any],
    lose: Callable[..., LostAnswers],
) -> None:
    """A task poll and the start POST get no answer for 60 s; each ends at the 2 s request
    timeout. The start had been carried out: the VM is running, so it is not sent again."""
    provider = GpuVmProvider(FLAKY)
    polls = lose("GET", r"/tasks/[^/]+/status", hang_s=60)
    start = lose("POST", "/status/start", hang_s=60)
    began = time.monotonic()
    result = provider.create(dict(inputs))
    assert time.monotonic() - began < 60
    assert (len(polls.lost), len(start.lost)) == (1, 1)
    assert len(requests_to(pve, "POST", "/status/start")) == 1
    assert pve.vm(int(result.id)).status == "running"


def test_a_failed_creates_cleanup_survives_a_lost_destroy_answer(
    pve: Any,
    provider: GpuVmProvider,
    agents: Agents,
    inputs: dict[str, Any],
    lose: Callable[..., LostAnswers],
) -> None:
    agents.enabled = False  # the create fails: no address
    lose("DELETE", r"/qemu/\d+")
    with pytest.raises(GpuVmError) as caught:
        provider.create(dict(inputs))
    assert "VM 100 was stopped and destroyed" in str(caught.value)
    assert_nothing_leaked(pve)


def test_a_network_that_keeps_failing_gets_its_own_message_and_says_what_is_left(
    pve: Any,
    agents: Agents,
    inputs: dict[str, Any],
    lose: Callable[..., LostAnswers],
) -> None:
    provider = GpuVmProvider(FLAKY)
    lose("POST", r"/qemu/\d+/config", when="before", times=None)
    lose("DELETE", r"/qemu/\d+", when="before", times=None)
    with pytest.raises(GpuVmError) as caught:
        provider.create(dict(inputs))
    message = str(caught.value)
    assert "POST /api2/json/nodes/pve1/qemu/100/config: the connection to https://127.0.0.1:" in (
        message
    )
    assert "4 times in a row: a transient network fault between here and the API" in message
    assert "pveproxy" not in message
    assert "removing the half-made VM 100 failed too (DELETE /api2/json/nodes/pve1/qemu/100" in (
        message
    )
    assert "VM 100 (gpu-test-1) is left on node pve1: destroy it by hand there" in message
    assert [vm.vmid for vm in made_vms(pve)] == [100]  # what the message says is there
    assert TOKEN_SECRET not in message
