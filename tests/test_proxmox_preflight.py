"""Proxmox preflight (`gpufleet preflight`, infra/proxmox) against a fake Proxmox VE over HTTPS.

Real: fakepve 0.5.0 (a fake PVE 9 API: routing, schema checks, API tokens, tickets, ACLs,
storage status, VM configs, tasks, offline nodes, injected errors) served by its pytest plugin
over TLS that proxmoxer verifies against `fakepve_cafile` (verification is never turned off);
proxmoxer's https backend; stack files in tmp_path read by the spec loader; the Typer CLI run
in-process. Not real: no PVE, no cluster, no GPUs or IOMMU.

fakepve keeps no PCI state: it answers `nodes/{node}/hardware/pci` and `cluster/mapping/pci`
with samples built from the API schema. `PciState` gives those two GETs the test's devices and
mappings by wrapping the fake's generic answer (`FakePve.synthesise`), after fakepve's own
routing, parameter and permission checks, offline nodes and `fail()` rules have run.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml
from fakepve import FakePve
from fakepve.certs import make_cert
from typer.testing import CliRunner

from gpufleet.cli import app
from gpufleet.spec.loading import load_stack_spec
from gpufleet.spec.stack import StackSpec
from infra.proxmox.client import (
    MissingSecretError,
    ProxmoxTaskError,
    ProxmoxUnreachable,
    connect,
    secret_from_environment,
    wait_for_task,
)
from infra.proxmox.preflight import check_stack

STACK = "fake"
TOKEN = "gpufleet@pve!provisioner"  # noqa: S105  # a token id, not a secret
SECRET = "token-secret-for-tests"  # noqa: S105  # the fake's test token
GIB = 1024**3
VM_PRIVILEGES = [
    "VM.Allocate",
    "VM.Audit",
    "VM.Clone",
    "VM.Config.CPU",
    "VM.Config.Memory",
    "VM.Config.Disk",
    "VM.Config.Network",
    "VM.Config.Cloudinit",
    "VM.Config.Options",
    "VM.Config.HWType",
    "VM.PowerMgmt",
    "VM.GuestAgent.Audit",
]
runner = CliRunner()


class PciState:
    """The PCI devices of each node and the cluster's PCI resource mappings, as PVE lists them."""

    def __init__(self, pve: FakePve) -> None:
        self.pve = pve
        self.devices: dict[str, list[dict[str, Any]]] = {}
        self.mappings: dict[str, list[str]] = {}

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        generic = self.pve.synthesise

        async def synthesise(match: Any, method: str, info: Any, user: Any, values: Any) -> Any:
            if method == "GET" and match.template == "/cluster/mapping/pci":
                return self._mapping_list(user)
            if method == "GET" and match.template == "/nodes/{node}/hardware/pci":
                return [dict(device) for device in self.devices.get(values["node"], [])]
            return await generic(match, method, info, user, values)

        monkeypatch.setattr(self.pve, "synthesise", synthesise)

    def add_device(self, node: str, address: str, group: int, name: str = "GA102GL [A10]") -> None:
        self.devices.setdefault(node, []).append(
            {
                "id": address,
                "class": "0x030200",
                "vendor": "0x10de",
                "device": "0x2236",
                "vendor_name": "NVIDIA Corporation",
                "device_name": name,
                "iommugroup": group,
                "subsystem_vendor": "0x10de",
                "subsystem_device": "0x1482",
                "mdev": False,
            }
        )

    def add_mapping(self, name: str, *entries: tuple[str, str, int]) -> None:
        self.mappings[name] = [
            f"node={node},path={path},id=10de:2236,iommugroup={group},subsystem-id=10de:1482"
            for node, path, group in entries
        ]

    def _mapping_list(self, user: str) -> list[dict[str, Any]]:
        """PVE lists the mappings the login may audit, use or modify."""
        privileges = ("Mapping.Audit", "Mapping.Use", "Mapping.Modify")
        return [
            {"id": name, "description": f"{name} GPU", "map": list(entries)}
            for name, entries in sorted(self.mappings.items())
            if any(self.pve.allowed(user, f"/mapping/pci/{name}", p) for p in privileges)
        ]


@pytest.fixture
def pci(fakepve: FakePve, monkeypatch: pytest.MonkeyPatch) -> PciState:
    state = PciState(fakepve)
    state.install(monkeypatch)
    return state


@pytest.fixture
def cluster(fakepve: FakePve, pci: PciState) -> FakePve:
    """A cluster ready for the default stack: two nodes, shared storage, template, GPUs, token."""
    fakepve.add_node("pve2")
    fakepve.add_ceph_storage("vmdata")
    fakepve.storages["vmdata"]["avail"] = 2000 * GIB
    fakepve.add_vm(
        9000,
        "ubuntu-2404-cloud",
        node="pve1",
        template=True,
        config={
            "scsi0": "vmdata:base-9000-disk-0,size=3584M",
            "ide2": "vmdata:vm-9000-cloudinit,media=cdrom",
            "net0": "virtio,bridge=vmbr0",
        },
    )
    fakepve.add_vm(
        120,
        "build-runner",
        node="pve1",
        status="running",
        config={"scsi0": "local-lvm:vm-120-disk-0,size=32G", "net0": "virtio,bridge=vmbr0"},
    )
    for node in ("pve1", "pve2"):
        pci.add_device(node, "0000:41:00.0", 40)
        pci.add_device(node, "0000:41:00.1", 40, name="GA102 High Definition Audio")
        pci.add_device(node, "0000:42:00.0", 41, name="Ethernet Controller X710")
    pci.add_mapping("a10-pve1-0", ("pve1", "0000:41:00.0", 40))
    pci.add_mapping("a10-pve2-0", ("pve2", "0000:41:00.0", 40))
    fakepve.apitokens[TOKEN] = SECRET
    fakepve.grant(TOKEN, "/vms", *VM_PRIVILEGES)
    fakepve.grant(TOKEN, "/storage", "Datastore.AllocateSpace", "Datastore.Audit")
    fakepve.grant(TOKEN, "/mapping/pci", "Mapping.Use", "Mapping.Audit")
    fakepve.grant(TOKEN, "/sdn/zones/localnetwork", "SDN.Use")
    fakepve.grant(TOKEN, "/", "Sys.Audit")
    return fakepve


def host(
    name: str,
    node: str,
    *,
    mapping: str | None = None,
    address: str | None = None,
    disk_gb: int = 100,
) -> dict[str, Any]:
    pci = [{"mapping": mapping}] if mapping else [{"address": address}] if address else []
    entry: dict[str, Any] = {
        "name": name,
        "proxmox": {
            "node": node,
            "cores": 8,
            "memory_mb": 32768,
            "disk_gb": disk_gb,
            "network": {"bridge": "vmbr0", "vlan": 20},
            "ssh_keys": [
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDx9Q3nZ1M0o1x9yWc7yQ9f0h0cWc0s3V0tN5m2lq4bF ops@gpufleet"
            ],
            "pci": pci,
        },
    }
    if pci:
        entry["gpus"] = {"model": "a10", "count": len(pci)}
    return entry


DEFAULT_HOSTS = [
    host("gpu-1", "pve1", mapping="a10-pve1-0"),
    host("gpu-2", "pve2", mapping="a10-pve2-0"),
]


def write_stack(
    root: Path,
    url: str,
    ca_bundle: str | None,
    *,
    hosts: list[dict[str, Any]] | None = None,
    **cluster: Any,
) -> StackSpec:
    """stacks/Pulumi.fake.yaml in root, as an operator writes it; returns the loaded spec."""
    settings = {
        "endpoint": url,
        "ca_bundle": ca_bundle,
        "token_id": TOKEN,
        "template_vmid": 9000,
        "storage": "vmdata",
        **cluster,
    }
    config = {
        "gpufleet:environment": "proxmox",
        "gpufleet:proxmox": {key: value for key, value in settings.items() if value is not None},
        "gpufleet:hosts": hosts if hosts is not None else DEFAULT_HOSTS,
    }
    stacks = root / "stacks"
    stacks.mkdir(exist_ok=True)
    (stacks / f"Pulumi.{STACK}.yaml").write_text(yaml.safe_dump({"config": config}))
    return load_stack_spec(stacks, STACK).spec


def preflight(
    root: Path, url: str, cafile: str | None, secret: str = SECRET, **stack: Any
) -> list[str]:
    spec = write_stack(root, url, cafile, **stack)
    return check_stack(spec, secret, project_root=root, stack=STACK)


def revoke(pve: FakePve, path: str, privilege: str) -> None:
    for granted, privileges in pve.acl[TOKEN]:
        if granted == path:
            privileges.discard(privilege)


def another_ca(root: Path) -> str:
    """A CA certificate that did not sign the fake's certificate."""
    (root / "other-ca").mkdir()
    return str(make_cert(str(root / "other-ca"), hosts=("127.0.0.1",))[0])


def only(problems: list[str]) -> str:
    assert len(problems) == 1, problems
    return problems[0]


# ------------------------------------------------------------------------ ready


def test_a_ready_cluster_has_no_problems(
    cluster: FakePve, fakepve_url: str, fakepve_cafile: str, tmp_path: Path
) -> None:
    # ca_bundle relative to the project root, as the example stacks write it
    (tmp_path / "certs").mkdir()
    shutil.copy(fakepve_cafile, tmp_path / "certs" / "pve-root-ca.pem")
    assert preflight(tmp_path, fakepve_url, "certs/pve-root-ca.pem") == []
    seen = {path for _, path, _ in cluster.requests}
    assert "/api2/json/nodes/pve1/hardware/pci" in seen  # the GPUs were looked at
    assert "/api2/json/nodes/pve1/qemu/120/config" in seen  # other VMs' devices too
    assert all(method == "GET" for method, _, _ in cluster.requests), "preflight only reads"


def test_the_stacks_own_vms_do_not_count_as_other_users(
    cluster: FakePve, fakepve_url: str, fakepve_cafile: str, tmp_path: Path
) -> None:
    """Re-run after `pulumi up`: gpu-1's VM holds its GPU and its disk is not counted again."""
    cluster.add_vm(
        150,
        "gpu-1",
        node="pve1",
        status="running",
        config={"hostpci0": "mapping=a10-pve1-0,pcie=1", "tags": f"gpufleet-{STACK}"},
    )
    cluster.storages["vmdata"]["avail"] = 150 * GIB  # room for gpu-2's 100 GiB only
    assert preflight(tmp_path, fakepve_url, fakepve_cafile) == []


# ------------------------------------------------------------------ nodes


def test_a_node_that_is_not_in_the_cluster(
    cluster: FakePve, fakepve_url: str, fakepve_cafile: str, tmp_path: Path
) -> None:
    hosts = [host("gpu-1", "pve1", mapping="a10-pve1-0"), host("gpu-9", "pve9")]
    problem = only(preflight(tmp_path, fakepve_url, fakepve_cafile, hosts=hosts))
    assert problem == (
        "node pve9 (host gpu-9) is not in the cluster (its nodes: pve1, pve2): set "
        "proxmox.node of host gpu-9 to one of them"
    )


def test_an_offline_node_is_one_problem(
    cluster: FakePve, fakepve_url: str, fakepve_cafile: str, tmp_path: Path
) -> None:
    cluster.set_node_offline("pve2")
    problem = only(preflight(tmp_path, fakepve_url, fakepve_cafile))
    assert problem == (
        "node pve2 (host gpu-2) is offline: bring it back online, or move the hosts to an "
        "online node"
    )


# --------------------------------------------------------------- template


def test_a_missing_template(
    cluster: FakePve, fakepve_url: str, fakepve_cafile: str, tmp_path: Path
) -> None:
    problem = only(preflight(tmp_path, fakepve_url, fakepve_cafile, template_vmid=9100))
    assert problem.startswith("template 9100 does not exist (or the login cannot see it")
    assert "set proxmox.template_vmid" in problem


def test_a_vm_that_is_not_a_template(
    cluster: FakePve, fakepve_url: str, fakepve_cafile: str, tmp_path: Path
) -> None:
    problem = only(preflight(tmp_path, fakepve_url, fakepve_cafile, template_vmid=120))
    assert problem.startswith(
        "VM 120 (build-runner, running) on node pve1 is not a template: make the VM a "
        "template (qm template 120)"
    )


def test_a_template_on_local_storage_cannot_be_cloned_to_another_node(
    cluster: FakePve, fakepve_url: str, fakepve_cafile: str, tmp_path: Path
) -> None:
    cluster.add_vm(
        9001,
        "ubuntu-local",
        node="pve1",
        template=True,
        config={"scsi0": "local-lvm:base-9001-disk-0,size=3584M"},
    )
    problem = only(preflight(tmp_path, fakepve_url, fakepve_cafile, template_vmid=9001))
    assert problem.startswith(
        "template 9001 is on node pve1 with disks on storage that is not shared (scsi0 on "
        "local-lvm), so PVE cannot clone it to node(s) pve2 of host gpu-2"
    )


# ---------------------------------------------------------------- storage


def test_a_storage_that_does_not_exist(
    cluster: FakePve, fakepve_url: str, fakepve_cafile: str, tmp_path: Path
) -> None:
    problem = only(preflight(tmp_path, fakepve_url, fakepve_cafile, storage="nvme-pool"))
    assert problem == (
        "storage nvme-pool does not exist on node(s) pve1, pve2 (hosts gpu-1, gpu-2): create "
        "it or set proxmox.storage to an existing storage"
    )


def test_full_storage(
    cluster: FakePve, fakepve_url: str, fakepve_cafile: str, tmp_path: Path
) -> None:
    cluster.storages["vmdata"]["avail"] = 150 * GIB
    problem = only(preflight(tmp_path, fakepve_url, fakepve_cafile))
    assert problem == (
        "storage vmdata (shared by the nodes) has 150.0 GiB free but the new disks need 200 "
        "GiB (gpu-1 100 GiB, gpu-2 100 GiB): free space there, lower disk_gb or set "
        "proxmox.storage to a storage with room"
    )


def test_full_local_storage_counts_per_node(
    cluster: FakePve, fakepve_url: str, fakepve_cafile: str, tmp_path: Path
) -> None:
    cluster.storages["local-lvm"]["avail"] = 300 * GIB  # per node: local storage
    hosts = [
        host("gpu-1", "pve1", mapping="a10-pve1-0", disk_gb=200),
        host("cpu-1", "pve1", disk_gb=200),
        host("gpu-2", "pve2", mapping="a10-pve2-0", disk_gb=200),
    ]
    problems = preflight(tmp_path, fakepve_url, fakepve_cafile, storage="local-lvm", hosts=hosts)
    assert problems == [
        "storage local-lvm on node pve1 has 300.0 GiB free but the new disks need 400 GiB "
        "(gpu-1 200 GiB, cpu-1 200 GiB): free space there, lower disk_gb or set "
        "proxmox.storage to a storage with room"
    ]


def test_storage_disabled_on_a_node_inactive_or_without_images(
    cluster: FakePve, fakepve_url: str, fakepve_cafile: str, tmp_path: Path
) -> None:
    cluster.storages["vmdata"]["nodes"] = "pve1"
    problem = only(preflight(tmp_path, fakepve_url, fakepve_cafile))
    assert problem.startswith(
        "storage vmdata on node pve2 (host gpu-2) is not enabled there (disabled, or its "
        "nodes list leaves pve2 out)"
    )
    del cluster.storages["vmdata"]["nodes"]
    cluster.ceph_down()  # RBD storages go inactive
    problems = preflight(tmp_path, fakepve_url, fakepve_cafile)
    assert problems == [
        f"storage vmdata on node {node} (host {name}) is not active: check what backs it on "
        f"{node} (pvesm status)"
        for node, name in (("pve1", "gpu-1"), ("pve2", "gpu-2"))
    ]
    cluster.ceph_recover()
    problems = preflight(tmp_path, fakepve_url, fakepve_cafile, storage="local")
    assert problems == [
        f"storage local on node {node} (host {name}) does not hold VM disks (content: "
        "iso,vztmpl,backup): add 'images' to its content or set proxmox.storage to another "
        "storage"
        for node, name in (("pve1", "gpu-1"), ("pve2", "gpu-2"))
    ]


# ------------------------------------------------------------------- GPUs


def test_a_mapping_that_does_not_exist_or_misses_the_node(
    cluster: FakePve, fakepve_url: str, fakepve_cafile: str, tmp_path: Path
) -> None:
    hosts = [
        host("gpu-1", "pve1", mapping="h100-pve1-0"),
        host("gpu-2", "pve1", mapping="a10-pve2-0"),
    ]
    problems = preflight(tmp_path, fakepve_url, fakepve_cafile, hosts=hosts)
    assert problems == [
        "host gpu-1 (node pve1): PCI mapping h100-pve1-0 does not exist (or the login cannot "
        "see it: that needs Mapping.Use on /mapping/pci/h100-pve1-0): create it under "
        "Datacenter > Resource Mappings, or fix hosts[0].proxmox.pci",
        "host gpu-2 (node pve1): PCI mapping a10-pve2-0 maps no device on pve1 (it maps "
        "node(s) pve2): add pve1's GPU to the mapping, or run the host on a node it maps",
    ]


def test_a_gpu_already_passed_through_to_another_vm(
    cluster: FakePve, fakepve_url: str, fakepve_cafile: str, tmp_path: Path
) -> None:
    cluster.add_vm(
        101, "legacy-cuda", node="pve1", config={"hostpci0": "mapping=a10-pve1-0,pcie=1"}
    )
    cluster.add_vm(102, "old-render", node="pve2", config={"hostpci1": "0000:41:00,pcie=1,x-vga=1"})
    problems = preflight(tmp_path, fakepve_url, fakepve_cafile)
    assert problems == [
        "PCI mapping a10-pve1-0 on node pve1 (host gpu-1) is already passed through to VM 101 "
        "(legacy-cuda, stopped, hostpci0); it maps 1 device(s) there: stop passing it to that "
        "VM, or add devices to the mapping",
        "PCI mapping a10-pve2-0 on node pve2 (host gpu-2) is already passed through to VM 102 "
        "(old-render, stopped, hostpci1); it maps 1 device(s) there: stop passing it to that "
        "VM, or add devices to the mapping",
    ]


def test_a_vm_of_another_stack_named_like_a_host_counts(
    cluster: FakePve, fakepve_url: str, fakepve_cafile: str, tmp_path: Path
) -> None:
    cluster.add_vm(
        150,
        "gpu-1",
        node="pve1",
        config={"hostpci0": "mapping=a10-pve1-0", "tags": "gpufleet-other;team-ml"},
    )
    problem = only(preflight(tmp_path, fakepve_url, fakepve_cafile))
    assert "is already passed through to VM 150 (gpu-1, stopped, hostpci0)" in problem


def test_two_hosts_cannot_share_a_single_gpu_mapping(
    cluster: FakePve, fakepve_url: str, fakepve_cafile: str, tmp_path: Path
) -> None:
    hosts = [
        host("gpu-1", "pve1", mapping="a10-pve1-0"),
        host("gpu-2", "pve1", mapping="a10-pve1-0"),
    ]
    problem = only(preflight(tmp_path, fakepve_url, fakepve_cafile, hosts=hosts))
    assert problem == (
        "hosts gpu-1, gpu-2 want 2 devices of PCI mapping a10-pve1-0 on node pve1, which maps 1 "
        "there: add devices to the mapping, or give each host its own"
    )


def test_an_iommu_group_shared_with_a_device_another_vm_uses(
    cluster: FakePve, pci: PciState, fakepve_url: str, fakepve_cafile: str, tmp_path: Path
) -> None:
    # Two cards behind one PCIe switch without ACS: one IOMMU group. The audio function of the
    # wanted card is in its group too, which is fine.
    pci.add_device("pve1", "0000:61:00.0", 50)
    pci.add_device("pve1", "0000:61:00.1", 50, name="GA102 High Definition Audio")
    pci.add_device("pve1", "0000:62:00.0", 50)
    pci.add_mapping("a10-pve1-1", ("pve1", "0000:61:00.0", 50))
    cluster.add_vm(
        130, "old-cuda", node="pve1", status="running", config={"hostpci0": "0000:62:00.0,pcie=1"}
    )
    hosts = [host("gpu-1", "pve1", mapping="a10-pve1-1")]
    problem = only(preflight(tmp_path, fakepve_url, fakepve_cafile, hosts=hosts))
    assert problem == (
        "host gpu-1 (node pve1): PCI mapping a10-pve1-1: 0000:61:00.0 shares IOMMU group 50 "
        "with 0000:62:00.0, which VM 130 (old-cuda, running, hostpci0) passes through; a group "
        "can go to one VM only: move a card to another slot, or pass 0000:62:00.0 to no other VM"
    )


def test_iommu_off_on_the_node(
    cluster: FakePve, pci: PciState, fakepve_url: str, fakepve_cafile: str, tmp_path: Path
) -> None:
    for device in pci.devices["pve2"]:
        device["iommugroup"] = -1
    problem = only(preflight(tmp_path, fakepve_url, fakepve_cafile))
    assert problem.startswith(
        "host gpu-2 (node pve2): PCI mapping a10-pve2-0: 0000:41:00.0 has no IOMMU group, so "
        "IOMMU is off on node pve2: turn it on"
    )


def test_raw_addresses_for_root(
    cluster: FakePve, fakepve_url: str, fakepve_cafile: str, tmp_path: Path
) -> None:
    """Raw PCI addresses need root@pam with a password (PVE's rule; the spec enforces it)."""
    cluster.add_vm(140, "nic-test", node="pve2", config={"hostpci0": "42:00.0"})
    hosts = [
        host("gpu-1", "pve1", address="0000:41:00.0"),
        host("gpu-2", "pve1", address="0000:81:00.0"),
        host("net-1", "pve2", address="0000:42:00.0"),
    ]
    problems = preflight(
        tmp_path, fakepve_url, fakepve_cafile, "secret", hosts=hosts, token_id=None, user="root@pam"
    )
    assert problems == [
        "host gpu-2 (node pve1): PCI device 0000:81:00.0 is not a PCI device of node pve1 "
        "(nodes/pve1/hardware/pci): check the address with lspci on pve1",
        "host net-1 (node pve2): PCI device 0000:42:00.0 is already passed through to VM 140 "
        "(nic-test, stopped, hostpci0): remove it from that VM, or give the host another device",
    ]


def test_reading_pci_devices_needs_sys_audit(
    cluster: FakePve, fakepve_url: str, fakepve_cafile: str, tmp_path: Path
) -> None:
    revoke(cluster, "/", "Sys.Audit")
    problems = preflight(tmp_path, fakepve_url, fakepve_cafile)
    assert problems == [
        f"cannot read the PCI devices of node {node} (GET /nodes/{node}/hardware/pci): 403 "
        "Permission check failed (/, Sys.Audit|Sys.Modify); grant the login that privilege so "
        "preflight can check this"
        for node in ("pve1", "pve2")
    ]


# ------------------------------------------------------------- privileges


def test_a_missing_privilege_of_the_token(
    cluster: FakePve, fakepve_url: str, fakepve_cafile: str, tmp_path: Path
) -> None:
    revoke(cluster, "/vms", "VM.Allocate")
    problem = only(preflight(tmp_path, fakepve_url, fakepve_cafile))
    assert problem == (
        "gpufleet@pve!provisioner lacks VM.Allocate on /vms, needed to create the hosts' VMs: "
        "grant it, e.g. pveum acl modify /vms --tokens 'gpufleet@pve!provisioner' --roles "
        "PVEVMAdmin"
    )


def test_each_missing_privilege_is_named_with_its_path(
    cluster: FakePve, fakepve_url: str, fakepve_cafile: str, tmp_path: Path
) -> None:
    cluster.acl[TOKEN] = [
        (path, privileges)
        for path, privileges in cluster.acl[TOKEN]
        if path != "/sdn/zones/localnetwork"
    ]
    revoke(cluster, "/vms", "VM.Clone")
    revoke(cluster, "/storage", "Datastore.AllocateSpace")
    revoke(cluster, "/mapping/pci", "Mapping.Use")
    cluster.grant(TOKEN, "/sdn/zones/localnetwork/vmbr0/30", "SDN.Use")  # another VLAN
    missing = [
        problem.split(", needed")[0] for problem in preflight(tmp_path, fakepve_url, fakepve_cafile)
    ]
    assert missing == [
        "gpufleet@pve!provisioner lacks VM.Clone on /vms/9000",
        "gpufleet@pve!provisioner lacks Datastore.AllocateSpace on /storage/vmdata",
        "gpufleet@pve!provisioner lacks SDN.Use on /sdn/zones/localnetwork/vmbr0/20",
        "gpufleet@pve!provisioner lacks Mapping.Use on /mapping/pci/a10-pve1-0",
        "gpufleet@pve!provisioner lacks Mapping.Use on /mapping/pci/a10-pve2-0",
    ]


# ------------------------------------------------------- failures of the API


def test_a_403_on_one_call_is_one_problem(
    cluster: FakePve, fakepve_url: str, fakepve_cafile: str, tmp_path: Path
) -> None:
    cluster.fail("GET", "/nodes/pve1/storage/vmdata/status", error="permission_denied")
    problem = only(preflight(tmp_path, fakepve_url, fakepve_cafile))
    assert problem == (
        "cannot read storage vmdata on node pve1 (GET /nodes/pve1/storage/vmdata/status): 403 "
        "Permission check failed (/storage/vmdata, Datastore.Audit); grant the login that "
        "privilege so preflight can check this"
    )


def test_a_tls_failure_with_the_wrong_ca_is_one_problem(
    cluster: FakePve, fakepve_url: str, tmp_path: Path
) -> None:
    other_ca = another_ca(tmp_path)
    problem = only(preflight(tmp_path, fakepve_url, other_ca))
    assert problem.startswith(f"TLS verification of {fakepve_url} failed (")
    assert "certificate" in problem
    assert problem.endswith(
        "set proxmox.ca_bundle to the PEM of the CA that signed the API's certificate, and use "
        "the host name it was issued for"
    )
    assert not cluster.requests, "nothing was sent over an unverified connection"


def test_without_ca_bundle_the_system_cas_refuse_the_fake(
    cluster: FakePve, fakepve_url: str, tmp_path: Path
) -> None:
    problem = only(preflight(tmp_path, fakepve_url, None))
    assert problem.startswith(f"TLS verification of {fakepve_url} failed (")


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"])
@pytest.mark.parametrize("login", ["token", "password"])
@pytest.mark.parametrize("ca_bundle", ["default CAs", "the stack's CA"])
def test_a_ca_bundle_in_the_environment_cannot_swap_the_trust_root(
    cluster: FakePve,
    fakepve_url: str,
    fakepve_cafile: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    login: str,
    ca_bundle: str,
) -> None:
    """The environment names the CA that signed the fake's certificate, as an attacker who
    set it (and serves the fake) would: the connection is still verified against the default
    CAs, or the stack's own CA, and refused; nothing is sent, the password login included."""
    monkeypatch.setenv(variable, fakepve_cafile)
    stack_ca = another_ca(tmp_path) if ca_bundle == "the stack's CA" else None
    logins: dict[str, Any] = {} if login == "token" else {"token_id": None, "user": "root@pam"}
    secret = SECRET if login == "token" else "secret"
    problem = only(preflight(tmp_path, fakepve_url, stack_ca, secret, **logins))
    assert problem.startswith(f"TLS verification of {fakepve_url} failed (")
    assert not cluster.requests


def test_a_password_login_over_unverified_tls_fails_at_connect(
    cluster: FakePve, fakepve_url: str, tmp_path: Path
) -> None:
    other_ca = another_ca(tmp_path)
    problem = only(
        preflight(tmp_path, fakepve_url, other_ca, "secret", token_id=None, user="root@pam")
    )
    assert problem.startswith(f"TLS verification of {fakepve_url} failed (")


def test_a_missing_ca_file_is_one_problem(
    cluster: FakePve, fakepve_url: str, tmp_path: Path
) -> None:
    problem = only(preflight(tmp_path, fakepve_url, "certs/missing.pem"))
    assert problem.startswith(
        f"proxmox.ca_bundle certs/missing.pem ({tmp_path}/certs/missing.pem) is not a file"
    )


def test_connection_refused_is_one_problem(fakepve_cafile: str, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    problem = only(preflight(tmp_path, f"https://127.0.0.1:{port}", fakepve_cafile))
    assert problem == (
        f"cannot reach https://127.0.0.1:{port} (Connection refused): check proxmox.endpoint "
        "(host and port) and that pveproxy runs there"
    )


def test_a_wrong_token_secret_is_one_problem(
    cluster: FakePve, fakepve_url: str, fakepve_cafile: str, tmp_path: Path
) -> None:
    problem = only(preflight(tmp_path, fakepve_url, fakepve_cafile, "not-the-secret"))
    assert problem.startswith("the API refused the login: 401 authentication failure;")


def test_an_expired_ticket_is_one_problem(
    cluster: FakePve, fakepve_url: str, fakepve_cafile: str, tmp_path: Path
) -> None:
    cluster.ticket_ttl = -1  # every ticket the password login gets has expired already
    problem = only(
        preflight(tmp_path, fakepve_url, fakepve_cafile, "secret", token_id=None, user="root@pam")
    )
    assert problem.startswith(
        "the API refused the login: 401 permission denied - invalid PVE ticket"
    )


def test_a_wrong_password_is_one_problem(
    cluster: FakePve, fakepve_url: str, fakepve_cafile: str, tmp_path: Path
) -> None:
    problem = only(
        preflight(tmp_path, fakepve_url, fakepve_cafile, "wrong", token_id=None, user="root@pam")
    )
    assert problem == (
        f"{fakepve_url} refused the password login of root@pam: check the user and the "
        "password in GPUFLEET_PROXMOX_SECRET"
    )


# --------------------------------------------------------- all at once, CLI


def break_several_things(cluster: FakePve, pci: PciState) -> list[dict[str, Any]]:
    """Five unrelated problems; returns the hosts of the stack (gpu-3's node is offline, so
    its missing mapping is not looked at)."""
    cluster.add_node("pve3", online=False)
    cluster.vm(9000).template = False
    cluster.storages["vmdata"]["avail"] = 10 * GIB
    cluster.add_vm(101, "legacy-cuda", node="pve2", config={"hostpci0": "mapping=a10-pve2-0"})
    revoke(cluster, "/vms", "VM.PowerMgmt")
    return [*DEFAULT_HOSTS, host("gpu-3", "pve3", mapping="a10-pve3-0")]


def test_several_problems_are_reported_together(
    cluster: FakePve, pci: PciState, fakepve_url: str, fakepve_cafile: str, tmp_path: Path
) -> None:
    hosts = break_several_things(cluster, pci)
    problems = preflight(tmp_path, fakepve_url, fakepve_cafile, hosts=hosts)
    assert [problem[:40] for problem in problems] == [
        "node pve3 (host gpu-3) is offline: bring",
        "VM 9000 (ubuntu-2404-cloud, stopped) on ",
        "storage vmdata (shared by the nodes) has",
        "PCI mapping a10-pve2-0 on node pve2 (hos",
        "gpufleet@pve!provisioner lacks VM.PowerM",
    ]


def test_cli_lists_every_problem_and_exits_2(
    cluster: FakePve,
    pci: PciState,
    fakepve_url: str,
    fakepve_cafile: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    write_stack(tmp_path, fakepve_url, fakepve_cafile, hosts=break_several_things(cluster, pci))
    result = runner.invoke(
        app, ["preflight", "--stack", STACK], env={"GPUFLEET_PROXMOX_SECRET": SECRET}
    )
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 5, lines
    assert all(line.startswith("error: ") for line in lines)
    assert "Traceback" not in result.output

    result = runner.invoke(
        app, ["preflight", "--stack", STACK, "--json"], env={"GPUFLEET_PROXMOX_SECRET": SECRET}
    )
    assert result.exit_code == 2
    summary = json.loads(result.stdout)
    assert summary["ok"] is False
    assert [line.removeprefix("error: ") for line in lines] == summary["problems"]


def test_cli_passes_on_a_ready_cluster(
    cluster: FakePve,
    fakepve_url: str,
    fakepve_cafile: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    write_stack(tmp_path, fakepve_url, fakepve_cafile)
    env = {"GPUFLEET_PROXMOX_SECRET": SECRET}
    result = runner.invoke(app, ["preflight", "--stack", STACK], env=env)
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        f"preflight passed: {fakepve_url} is ready for 2 host(s) on node(s) pve1, pve2 "
        "(template 9000, storage vmdata)\n"
    )
    result = runner.invoke(app, ["preflight", "--stack", STACK, "--json"], env=env)
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"ok": True, "problems": []}


def test_cli_tls_failure_is_a_clear_error(
    cluster: FakePve, fakepve_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    other_ca = another_ca(tmp_path)
    write_stack(tmp_path, fakepve_url, other_ca)
    result = runner.invoke(
        app, ["preflight", "--stack", STACK], env={"GPUFLEET_PROXMOX_SECRET": SECRET}
    )
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: TLS verification of {fakepve_url} failed (")
    assert len(result.stderr.splitlines()) == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_cli_refuses_a_stack_that_is_not_proxmox(tmp_path: Path) -> None:
    stacks = tmp_path / "stacks"
    stacks.mkdir()
    (stacks / "Pulumi.lab.yaml").write_text(
        yaml.safe_dump(
            {
                "config": {
                    "gpufleet:environment": "static",
                    "gpufleet:hosts": [{"name": "gpu-a", "address": "192.0.2.10"}],
                }
            }
        )
    )
    result = runner.invoke(app, ["preflight", "--stack", "lab", "--stacks-dir", str(stacks)])
    assert result.exit_code == 2
    assert result.stderr == (
        "error: stack lab is a static stack; preflight checks proxmox stacks "
        "(gpufleet:environment: proxmox)\n"
    )


def test_cli_needs_the_secret(
    fakepve_url: str, fakepve_cafile: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GPUFLEET_PROXMOX_SECRET", raising=False)
    write_stack(tmp_path, fakepve_url, fakepve_cafile)
    result = runner.invoke(
        app, ["preflight", "--stack", STACK, "--stacks-dir", str(tmp_path / "stacks")]
    )
    assert result.exit_code == 2
    assert result.stderr == (
        "error: GPUFLEET_PROXMOX_SECRET is not set: export the secret of API token "
        "gpufleet@pve!provisioner in it (the value of the gpufleet:proxmox_secret Pulumi "
        "secret) and run again\n"
    )


# ------------------------------------------------------------ the client


def test_secret_from_environment_names_the_variable(
    fakepve_url: str, fakepve_cafile: str, tmp_path: Path
) -> None:
    spec = write_stack(
        tmp_path,
        fakepve_url,
        fakepve_cafile,
        token_id=None,
        user="root@pam",
        secret_env="PVE_ROOT_PASSWORD",  # noqa: S106  # a variable's name
    )
    assert spec.proxmox is not None
    assert secret_from_environment(spec.proxmox, {"PVE_ROOT_PASSWORD": "pw"}) == "pw"
    with pytest.raises(
        MissingSecretError, match=r"^PVE_ROOT_PASSWORD is not set: export the password of root@pam"
    ):
        secret_from_environment(spec.proxmox, {"PVE_ROOT_PASSWORD": ""})


def connect_as_root(root: Path, url: str, cafile: str) -> Any:
    spec = write_stack(root, url, cafile, token_id=None, user="root@pam")
    assert spec.proxmox is not None
    return connect(spec.proxmox, "secret", project_root=root)


def test_wait_for_task_returns_an_ok_task(
    fakepve: FakePve, fakepve_url: str, fakepve_cafile: str, tmp_path: Path
) -> None:
    fakepve.add_vm(200, "runner", node="pve1")
    api = connect_as_root(tmp_path, fakepve_url, fakepve_cafile)
    upid = api.nodes("pve1").qemu(200).status.start.post()
    status = wait_for_task(api, "pve1", upid, timeout_s=10, poll_s=0.05)
    assert (status["status"], status["exitstatus"]) == ("stopped", "OK")
    assert fakepve.vm(200).status == "running"


def test_wait_for_task_raises_pves_exit_status_and_log(
    fakepve: FakePve, fakepve_url: str, fakepve_cafile: str, tmp_path: Path
) -> None:
    fakepve.add_vm(9000, "template", node="pve1", template=True)
    api = connect_as_root(tmp_path, fakepve_url, fakepve_cafile)
    upid = api.nodes("pve1").qemu(9000).status.start.post()
    with pytest.raises(ProxmoxTaskError) as raised:
        wait_for_task(api, "pve1", upid, timeout_s=10, poll_s=0.05)
    assert raised.value.exitstatus == "you can't start a vm if it's a template"
    assert str(raised.value) == (
        "task qmstart 9000 on pve1 failed: you can't start a vm if it's a template; log: you "
        "can't start a vm if it's a template | TASK ERROR: you can't start a vm if it's a template"
    )


@pytest.mark.fakepve(time_scale=0.01)
def test_wait_for_task_times_out_instead_of_returning_none(
    fakepve: FakePve, fakepve_url: str, fakepve_cafile: str, tmp_path: Path
) -> None:
    vm = fakepve.add_vm(200, "slow", node="pve1")
    vm.start_secs = 100  # 1 s of real time at time_scale 0.01
    api = connect_as_root(tmp_path, fakepve_url, fakepve_cafile)
    upid = api.nodes("pve1").qemu(200).status.start.post()
    with pytest.raises(
        ProxmoxTaskError, match=r"^task qmstart 200 on pve1 still running after 0.2s"
    ):
        wait_for_task(api, "pve1", upid, timeout_s=0.2, poll_s=0.05)
    assert wait_for_task(api, "pve1", upid, timeout_s=10, poll_s=0.05)["exitstatus"] == "OK"


def test_unreachable_is_not_an_api_error(fakepve_cafile: str, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ProxmoxUnreachable, match="Connection refused"):
        connect_as_root(tmp_path, f"https://127.0.0.1:{port}", fakepve_cafile)
