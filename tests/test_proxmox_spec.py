"""Proxmox stacks in the StackSpec: the cluster, each host's VM, and what PVE would refuse.

Real: stack files on disk through the loader and pydantic. Nothing talks to a cluster here
(tests/test_proxmox_preflight.py does, against fakepve).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gpufleet.spec.loading import load_stack_spec
from gpufleet.spec.problems import SpecError
from tests.conftest import PROJECT_ROOT, changed_copy

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDx9Q3nZ1M0o1x9yWc7yQ9f0h0cWc0s3V0tN5m2lq4bF ops@x"
BASE: dict[str, Any] = {
    "gpufleet:environment": "proxmox",
    "gpufleet:proxmox": {
        "endpoint": "https://pve.example.internal:8006",
        "token_id": "gpufleet@pve!provisioner",
        "template_vmid": 9000,
        "storage": "local-lvm",
    },
    "gpufleet:hosts": [
        {
            "name": "gpu-1",
            "gpus": {"model": "a10", "count": 1},
            "proxmox": {"node": "pve1", "ssh_keys": [KEY], "pci": [{"mapping": "a10-pve1-0"}]},
        }
    ],
}


def load(tmp_path: Path, config: dict[str, Any]) -> Any:
    (tmp_path / "Pulumi.x.yaml").write_text(yaml.safe_dump({"config": config}))
    return load_stack_spec(tmp_path, "x").spec


def changed(path: list[Any], value: Any) -> dict[str, Any]:
    return changed_copy(BASE, path, value)


def test_the_onprem_stacks_load_with_mappings_and_no_secret() -> None:
    for name in ("onprem-prod", "onprem-staging"):
        spec = load_stack_spec(PROJECT_ROOT / "stacks", name).spec
        assert spec.proxmox is not None
        assert spec.proxmox.uses_token
        for host in spec.hosts:
            assert host.proxmox is not None
            assert all(device.mapping for device in host.proxmox.pci)
    text = (PROJECT_ROOT / "stacks" / "Pulumi.onprem-prod.yaml").read_text()
    assert "proxmox_secret" not in text.split("config:", 1)[1], "the secret is set with pulumi"


def test_the_pulumi_secret_key_is_not_part_of_the_spec(tmp_path: Path) -> None:
    config = {**BASE, "gpufleet:proxmox_secret": {"secure": "v1:abcdef"}}
    spec = load(tmp_path, config)
    assert "proxmox_secret" not in spec.model_dump()


def test_a_valid_proxmox_stack_has_defaults_for_the_vm(tmp_path: Path) -> None:
    vm = load(tmp_path, BASE).hosts[0].proxmox
    assert (vm.cores, vm.memory_mb, vm.disk_gb) == (8, 32768, 100)
    assert vm.network.ipv4 == "dhcp"
    assert vm.network.bridge == "vmbr0"


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (
            ["gpufleet:hosts", 0, "proxmox", "pci"],
            [{"address": "0000:41:00.0"}],
            "raw PCI address 0000:41:00.0 needs root@pam with a password, not API token "
            "gpufleet@pve!provisioner; map the device",
        ),
        (
            ["gpufleet:hosts", 0, "proxmox", "pci"],
            [{"mapping": "a"}, {"mapping": "b"}],
            "gpus.count is 1 but proxmox.pci passes 2 device(s) through",
        ),
        (["gpufleet:proxmox", "endpoint"], "http://pve:8006", "use https://<host>:8006"),
        (["gpufleet:proxmox", "user"], "root@pam", "give either token_id (API token) or user"),
        (["gpufleet:proxmox"], None, "a proxmox stack needs gpufleet:proxmox"),
        (["gpufleet:hosts", 0, "proxmox"], None, "hosts[0] (gpu-1): a proxmox host needs"),
        (
            ["gpufleet:hosts", 0, "proxmox", "network"],
            {"ipv4": "10.0.0.5/24", "gateway": "10.0.1.1"},
            "gateway 10.0.1.1 is outside 10.0.0.5/24",
        ),
        (
            ["gpufleet:hosts", 0, "proxmox", "network"],
            {"ipv4": "10.0.0.5"},
            "give the prefix length too",
        ),
        (
            ["gpufleet:hosts", 0, "proxmox", "ssh_keys"],
            ["-----BEGIN OPENSSH PRIVATE KEY-----"],
            "that is a private key",
        ),
        (
            ["gpufleet:hosts", 0, "proxmox", "pci"],
            [{"mapping": "a", "address": "41:00.0"}],
            "give either mapping or address",
        ),
    ],
)
def test_bad_proxmox_specs_get_a_located_error(
    tmp_path: Path, path: list[Any], value: Any, expected: str
) -> None:
    with pytest.raises(SpecError) as caught:
        load(tmp_path, changed(path, value))
    assert expected in str(caught.value)
    assert "Pulumi.x.yaml" in str(caught.value)


def test_raw_pci_addresses_are_fine_for_root_with_a_password(tmp_path: Path) -> None:
    config = changed(["gpufleet:hosts", 0, "proxmox", "pci"], [{"address": "0000:41:00.0"}])
    del config["gpufleet:proxmox"]["token_id"]
    config["gpufleet:proxmox"]["user"] = "root@pam"
    assert load(tmp_path, config).hosts[0].proxmox.pci[0].address == "0000:41:00.0"


def test_proxmox_settings_are_refused_outside_proxmox_stacks(tmp_path: Path) -> None:
    config = {**changed(["gpufleet:environment"], "static")}
    config["gpufleet:hosts"][0]["address"] = "10.0.0.5"
    with pytest.raises(SpecError, match="proxmox settings belong to proxmox stacks only"):
        load(tmp_path, config)


def test_keys_pulumi_config_set_writes_are_not_spec_errors(tmp_path: Path) -> None:
    """`pulumi config set gpufleet:preflight false` writes into the same stack file."""
    config = {**BASE, "gpufleet:preflight": False, "gpufleet:allow_restart": True}
    assert load(tmp_path, config).environment == "proxmox"


def test_a_proxmox_host_with_gpus_must_pass_them_through(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"gpus.count is 1 but proxmox.pci passes 0 device"):
        load(tmp_path, changed(["gpufleet:hosts", 0, "proxmox", "pci"], []))
