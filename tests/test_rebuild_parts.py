"""The rebuild's parts that need no host: host key fingerprints and known_hosts edits (with the
real ssh-keygen), the registry comparison, a damaged backup found on resume, bad input.

Real: ssh-keygen (keys, hashed known_hosts, fingerprints), the gpufleet CLI in a process, files;
fakepve (PVE 9's API over TLS, its parameter checks, a full storage) for the Proxmox VM's
replacement through the project's provider.
Not here: hosts, MLflow (tests/test_rebuild.py rebuilds a real site).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpufleet.lifecycle.environment import Environment, load_environment
from gpufleet.rebuild.backup import BackupError, open_backup
from gpufleet.rebuild.host_key import HostKey, HostKeyError, accept_host_key, known_keys
from gpufleet.rebuild.registry_snapshot import compare_snapshots, lineage_tag_additions
from gpufleet.rebuild.replace import ReplaceError, replace_proxmox_vm
from tests.conftest import PROJECT_ROOT


def make_key(directory: Path, name: str) -> tuple[HostKey, str]:
    path = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    kind, key = path.with_suffix(".pub").read_text().split()[:2]
    printed = subprocess.run(
        ["ssh-keygen", "-lf", str(path.with_suffix(".pub"))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[1]
    return HostKey(kind, key), printed


def test_fingerprints_are_the_ones_ssh_keygen_prints(tmp_path: Path) -> None:
    key, printed = make_key(tmp_path, "a")
    assert key.fingerprint == printed


def test_only_the_vouched_key_replaces_the_hosts_entries_plain_or_hashed(tmp_path: Path) -> None:
    old, _ = make_key(tmp_path, "old")
    other, _ = make_key(tmp_path, "other")
    new, new_fingerprint = make_key(tmp_path, "new")
    rogue, _ = make_key(tmp_path, "rogue")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(
        f"[192.0.2.5]:2222 {old.kind} {old.key}\n192.0.2.6 {other.kind} {other.key}\n"
    )
    subprocess.run(["ssh-keygen", "-H", "-f", str(known_hosts)], capture_output=True, check=True)
    assert "192.0.2.5" not in known_hosts.read_text(), "hashed"
    assert known_keys(known_hosts, "192.0.2.5", 2222) == [old]
    with pytest.raises(HostKeyError, match="do not go on"):
        accept_host_key(known_hosts, "192.0.2.5", 2222, [rogue], new_fingerprint)
    assert known_keys(known_hosts, "192.0.2.5", 2222) == [old], "nothing changed"
    accepted = accept_host_key(known_hosts, "192.0.2.5", 2222, [rogue, new], new_fingerprint)
    assert accepted == new
    assert known_keys(known_hosts, "192.0.2.5", 2222) == [new]
    assert known_keys(known_hosts, "192.0.2.6", 22) == [other], "other hosts kept"
    assert (tmp_path / "known_hosts.old").exists()


def test_the_registry_comparison_names_every_differing_field() -> None:
    before = {
        "models": {
            "m": {
                "aliases": {"production": "2"},
                "tags": {},
                "versions": {"1": {"run_id": "r1", "artifact_sha256": {"a": "x"}}},
            }
        },
        "runs": {},
    }
    after = json.loads(json.dumps(before))
    assert compare_snapshots(before, after) == []
    after["models"]["m"]["aliases"]["production"] = "1"
    after["models"]["m"]["versions"]["1"]["artifact_sha256"]["a"] = "y"
    after["models"]["m"]["tags"]["new"] = "t"
    assert compare_snapshots(before, after) == [
        "models.m.aliases.production: '2' -> '1'",
        "models.m.tags.new: not there before -> 't'",
        "models.m.versions.1.artifact_sha256.a: 'x' -> 'y'",
    ]


def test_only_lineage_tags_the_fill_step_adds_are_told_apart_from_losses() -> None:
    """Filling the repository tags the versions it exports (generators/registry_repository.py):
    the rebuild's fill step does so for versions nobody had deployed; that is no loss."""
    before = {"models": {"m": {"versions": {"2": {"tags": {"k": "v"}}}}}, "runs": {}}
    after = json.loads(json.dumps(before))
    after["models"]["m"]["versions"]["2"]["tags"]["gpufleet.spec_hash"] = "abc"
    after["models"]["m"]["versions"]["2"]["tags"]["gpufleet.extra"] = "x"
    del after["models"]["m"]["versions"]["2"]["tags"]["k"]
    added, others = lineage_tag_additions(compare_snapshots(before, after))
    assert added == ["models.m.versions.2.tags.gpufleet.spec_hash: not there before -> 'abc'"]
    assert others == [
        "models.m.versions.2.tags.gpufleet.extra: not there before -> 'x'",
        "models.m.versions.2.tags.k: 'v' -> missing after the rebuild",
    ]


def test_a_backup_damaged_since_it_was_taken_is_refused(tmp_path: Path) -> None:
    (tmp_path / "registry-postgres.dump").write_bytes(b"PGDMP dump")
    digest = hashlib.sha256(b"PGDMP dump").hexdigest()
    manifest = {"id": "x", "files": {"registry-postgres.dump": {"sha256": digest, "bytes": 10}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert open_backup(tmp_path).id == "x"
    (tmp_path / "registry-postgres.dump").write_bytes(b"PGDMP dumq")
    with pytest.raises(BackupError, match="no longer matches its sha256"):
        open_backup(tmp_path)


@pytest.mark.parametrize(
    ("stack", "host", "message"),
    [
        ("lab", "nope", "stack 'lab' has no host 'nope'"),
        ("local", "x", "stack 'local' is a local stack"),
    ],
)
def test_bad_input_exits_2_with_one_line(stack: str, host: str, message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gpufleet", "rebuild", "--stack", stack, "--host", host],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def _pve_environment(
    fakepve: Any, url: str, cafile: str, monkeypatch: pytest.MonkeyPatch, project: Path
) -> tuple[Environment, dict[str, Any]]:
    """A proxmox stack of one host in fakepve, its VM made by the provider; (environment,
    the VM's inputs)."""
    from infra.proxmox.provider import GpuVmProvider
    from tests.test_proxmox_provider import (
        FAST,
        TEMPLATE,
        TOKEN_ID,
        TOKEN_SECRET,
        Agents,
        make_inputs,
    )
    from tests.test_proxmox_provider import HOST as PVE_HOST
    from tests.test_rebuild import _TEMPLATE

    fakepve.apitokens[TOKEN_ID] = TOKEN_SECRET
    fakepve.add_vm(TEMPLATE, "debian-13-cloud", node="pve1", template=True, config=_TEMPLATE)
    monkeypatch.setattr(fakepve, "_do_start", Agents(fakepve).start)
    monkeypatch.setenv("GPUFLEET_PROXMOX_SECRET", TOKEN_SECRET)
    network = {"bridge": "vmbr0", "ipv4": "192.0.2.44/24", "gateway": "192.0.2.1"}
    config = {
        "gpufleet:environment": "proxmox",
        "gpufleet:state_dir": "build/pve",
        "gpufleet:proxmox": {
            "endpoint": url,
            "ca_bundle": cafile,
            "token_id": TOKEN_ID,
            "template_vmid": TEMPLATE,
            "storage": "local-lvm",
        },
        "gpufleet:hosts": [{**PVE_HOST, "proxmox": {**PVE_HOST["proxmox"], "network": network}}],
    }
    (project / "stacks").mkdir()
    (project / "stacks" / "Pulumi.pve.yaml").write_text(yaml.safe_dump({"config": config}))
    inputs = make_inputs(url, cafile, stack="pve", network=network)
    GpuVmProvider(FAST).create(inputs)
    environment = load_environment(
        "pve", project_root=project, addresses={PVE_HOST["name"]: "192.0.2.44"}
    )
    return environment, inputs


@pytest.mark.fakepve(time_scale=0.01)
def test_a_proxmox_vm_is_set_aside_and_made_again_with_a_new_vmid(
    fakepve: Any,
    fakepve_url: str,
    fakepve_cafile: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """fakepve (PVE's API with its parameter checks): the provider's VM powered off and untagged,
    a new clone with the same name, tags and GPU mapping started, the old VM destroyed."""
    from tests.test_proxmox_provider import FAST

    environment, inputs = _pve_environment(
        fakepve, fakepve_url, fakepve_cafile, monkeypatch, tmp_path
    )
    (old,) = [vm.vmid for vm in fakepve.vms if not vm.config.get("template")]
    lines: list[str] = []
    done = replace_proxmox_vm(environment, "gpu-test-1", lines.append, timing=FAST)
    assert done["old_vmid"] == old
    assert done["vmid"] != old
    (vm,) = [vm for vm in fakepve.vms if not vm.config.get("template")]
    assert (vm.vmid, vm.name, vm.status) == (done["vmid"], "gpu-test-1", "running")
    assert vm.config["hostpci0"] == "mapping=a10-pve1-0,pcie=1"
    assert set(vm.config["tags"].split(";")) == set(inputs["tags"])
    assert done["address"] == "192.0.2.44"
    assert any("no Pulumi CLI here" in line for line in lines)


@pytest.mark.fakepve(time_scale=0.01)
def test_a_new_vm_that_cannot_be_made_puts_the_old_one_back(
    fakepve: Any,
    fakepve_url: str,
    fakepve_cafile: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    from tests.test_proxmox_provider import FAST

    environment, inputs = _pve_environment(
        fakepve, fakepve_url, fakepve_cafile, monkeypatch, tmp_path
    )
    (old,) = [vm.vmid for vm in fakepve.vms if not vm.config.get("template")]
    fakepve.storages["local-lvm"]["avail"] = 8 * 1024**3  # the clone needs 32 GiB
    with pytest.raises(ReplaceError, match=f"VM {old} is back as it was"):
        replace_proxmox_vm(environment, "gpu-test-1", lambda line: None, timing=FAST)
    (vm,) = [vm for vm in fakepve.vms if not vm.config.get("template")]
    assert (vm.vmid, vm.status) == (old, "running")
    assert set(vm.config["tags"].split(";")) == set(inputs["tags"])
