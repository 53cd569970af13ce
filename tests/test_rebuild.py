"""`gpufleet rebuild --stack NAME --host HOST` on a static site whose rebuilt host runs the
registry: backup, reinstall, the new host key, the lifecycle steps, restore, and the registry
compared field by field; a resumed rebuild; a backup that cannot be written.

Real: the `gpufleet` CLI as separate processes; two Debian 12 hosts (containers with systemd and
sshd on a Docker network of the test's own, fixed addresses, tests/rebuild_site.py) reached over
SSH with strict host key checking; Ansible installing Docker inside them; the serving stack
(Triton, and on serve-a MLflow with Postgres) started by the serving_stack role from image
archives; pg_dump and pg_restore in the Postgres container; MLflow's registry read and written
through its API with its basic-auth login; the gates over SSH and gRPC; "reinstalling" serve-a is
deleting its container and its disk and starting a bare one at the same address (new SSH host
keys); a full disk is a 16 KiB tmpfs mounted on the backups directory; the killed rebuild is
SIGKILL to its process group; a load of HTTP inference requests against serve-b.
Not real: no GPU; stand-in images (tests/serving_images.py); Debian's packages instead of
Docker's and NVIDIA's repositories.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpufleet.lifecycle.environment import load_environment
from gpufleet.rebuild.backup import (
    ARTIFACTS_TAR,
    AUTH_TAR,
    MANIFEST,
    POSTGRES_DUMP,
    SNAPSHOT,
)
from gpufleet.rebuild.registry_snapshot import (
    compare_snapshots,
    lineage_tag_additions,
    snapshot_registry,
)
from gpufleet.rebuild.run import RebuildOptions, rebuild_host
from gpufleet.registry.demo import demo_network, register_torch_model
from gpufleet.spec.loading import load_model_specs
from tests.docker_hosts import DockerEngine, SshKeyPair
from tests.rebuild_site import (
    MODEL,
    SITE,
    InferenceLoad,
    RebuildSite,
    mlflow_login,
    open_rebuild_site,
)
from tests.test_configure_guard import ansible_processes

HOST = "serve-a"
REBUILD = ("rebuild", "--stack", SITE, "--host", HOST, "--json")


@pytest.fixture(scope="module")
def site(
    docker_engine: DockerEngine,
    debian_host_image: str,
    ssh_client_key: SshKeyPair,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RebuildSite]:
    work = tmp_path_factory.mktemp("rebuild")
    with (
        open_rebuild_site(docker_engine, debian_host_image, ssh_client_key, work) as site,
        mlflow_login(),
    ):
        yield site


@pytest.fixture(scope="module")
def shared() -> dict[str, Any]:
    """What one test leaves for the next (the module's tests run in order on one site)."""
    return {}


def report_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.stdout.strip(), result.stderr[-4000:]
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def steps_of(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {step["step"]: step for step in report["steps"]}


def backup_dirs(site: RebuildSite) -> list[Path]:
    base = site.project / "build" / SITE / "backups" / HOST
    return sorted(base.iterdir()) if base.exists() else []


def file_states(directory: Path) -> dict[str, tuple[int, str]]:
    return {
        path.name: (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        for path in sorted(directory.iterdir())
    }


def test_the_site_serves_with_its_registry_on_serve_a(
    site: RebuildSite, shared: dict[str, Any]
) -> None:
    """The site is green; then the registry changes as it does between deploys: a new version,
    the production alias moved to it, an alias and tags added."""
    result = site.runs["up"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    (spec,) = [item.spec for item in load_model_specs(site.project / "modelconfigs")]
    registry = site.registry
    new = register_torch_model(registry, spec, demo_network(spec, seed=3), seed=3)
    assert new.version == 2
    registry.set_alias(MODEL, "previous", 1)
    registry.set_tags(registry.resolve(f"models:/{MODEL}/1"), {"reviewed": "yes"})
    registry.client.set_registered_model_tag(MODEL, "owner", "serving-team")
    shared["before"] = snapshot_registry(registry)
    assert shared["before"]["models"][MODEL]["aliases"] == {"previous": "1", "production": "2"}


def test_a_backup_that_cannot_be_written_stops_before_anything_is_destroyed(
    site: RebuildSite, shared: dict[str, Any]
) -> None:
    backups = site.project / "build" / SITE / "backups"
    backups.mkdir(parents=True, exist_ok=True)
    known_hosts = (site.project / "known_hosts").read_bytes()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(backups)], check=True)
    try:
        result = site.gpufleet(*REBUILD)
        left = sorted(path.name for path in backups.rglob("*") if path.is_file())
    finally:
        subprocess.run(["umount", str(backups)], check=True)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    report = report_of(result)
    steps = steps_of(report)
    assert steps["check"]["status"] == "ok"
    assert steps["backup"]["status"] == "error"
    (reason,) = steps["backup"]["reasons"]
    assert "No space left on device" in reason, reason
    assert "nothing was destroyed" in reason
    assert "replace" not in steps, "the machine is not touched"
    assert left == [], "a failed backup leaves nothing half-written"
    # serve-a still runs as before: the same machine, the same key, the same registry.
    assert (site.project / "known_hosts").read_bytes() == known_hosts
    assert compare_snapshots(shared["before"], snapshot_registry(site.registry)) == []
    assert "Traceback" not in result.stderr


def test_the_rebuild_backs_up_verified_then_waits_for_the_reinstall(
    site: RebuildSite, shared: dict[str, Any]
) -> None:
    result = site.gpufleet(*REBUILD)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    report = report_of(result)
    steps = steps_of(report)
    assert report["resumed"] is True, "the failed attempt before is picked up"
    assert steps["backup"]["status"] == "ok"
    assert steps["replace"]["status"] == "waiting"
    (reason,) = steps["replace"]["reasons"]
    assert "still offers the host key" in reason
    assert "--host-key-fingerprint" in reason
    (directory,) = backup_dirs(site)
    manifest = json.loads((directory / MANIFEST).read_text())
    assert set(manifest["files"]) == {SNAPSHOT, POSTGRES_DUMP, ARTIFACTS_TAR, AUTH_TAR}
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == entry["sha256"]
    assert "pg_restore --list reads it" in manifest["files"][POSTGRES_DUMP]["verified"]
    assert "match the host's sha256" in manifest["files"][ARTIFACTS_TAR]["verified"]
    backed_up = json.loads((directory / SNAPSHOT).read_text())
    assert compare_snapshots(shared["before"], backed_up) == []
    shared["backup"] = (directory, file_states(directory))


def test_the_reinstalled_host_key_is_refused_until_the_operator_vouches_for_it(
    site: RebuildSite, shared: dict[str, Any]
) -> None:
    """serve-a is "reinstalled": its container and disk deleted, a bare one started at the
    same address. From here on a load runs against serve-b."""
    old_container = site.hosts[HOST].container_id
    site.recreate(HOST)
    assert site.hosts[HOST].container_id != old_container
    load = InferenceLoad(site.addresses["serve-b"])
    load.start()
    shared["load"] = load
    known_hosts = (site.project / "known_hosts").read_bytes()
    fingerprint = site.console_fingerprint(HOST)
    result = site.gpufleet(*REBUILD)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    (reason,) = steps_of(report_of(result))["replace"]["reasons"]
    assert "offers new host key(s)" in reason
    assert fingerprint in reason, "the operator compares it with the console's"
    wrong = site.gpufleet(*REBUILD, "--host-key-fingerprint", "SHA256:" + "A" * 43)
    assert wrong.returncode == 2
    (reason,) = steps_of(report_of(wrong))["replace"]["reasons"]
    assert "do not go on" in reason
    assert (site.project / "known_hosts").read_bytes() == known_hosts, "nothing accepted"
    shared["fingerprint"] = fingerprint


def test_a_rebuild_killed_mid_way_resumes_from_its_backup_and_loses_nothing(
    site: RebuildSite, shared: dict[str, Any]
) -> None:
    first = site.start_gpufleet(*REBUILD, "--host-key-fingerprint", shared["fingerprint"])
    assert first.stderr is not None
    seen = ""
    for line in first.stderr:
        seen += line
        if f"[deploy] {HOST}: started" in seen and "Probe for the stack's images" in line:
            break  # deploy starts copying the image archives: the operator's session drops
    with contextlib.suppress(ProcessLookupError):
        os.killpg(first.pid, signal.SIGKILL)
    first.communicate(timeout=120)
    # Its Ansible, in a session of its own, is stopped by the run's cleanup guard: nothing
    # goes on deploying behind the back of the run that resumes.
    deadline = time.monotonic() + 60
    while left := ansible_processes(site.project):
        assert time.monotonic() < deadline, f"the killed run's Ansible still runs: {left}"
        time.sleep(0.5)
    assert f"[configure] {HOST}: changed" in seen, seen[-3000:]
    assert f"[deploy] {HOST}: started" in seen, seen[-3000:]
    assert f"[deploy] {HOST}: " not in seen.split(f"[deploy] {HOST}: started")[1]

    started = time.monotonic()
    result = site.gpufleet(*REBUILD)
    shared["seconds"] = time.monotonic() - started
    load: InferenceLoad = shared["load"]
    load.stop()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    report = report_of(result)
    steps = steps_of(report)
    assert report["resumed"] is True
    directory, states = shared["backup"]
    assert steps["backup"]["status"] == "skipped"
    assert steps["backup"]["details"]["reused"] is True
    assert steps["backup"]["details"]["id"] == directory.name
    assert steps["replace"]["status"] == "skipped", "the key was accepted before the kill"
    assert steps["configure"]["status"] == "ok", "configured before the kill"
    assert steps["restore"]["status"] == "changed"
    assert set(steps["restore"]["details"]["restored"]) == {POSTGRES_DUMP, ARTIFACTS_TAR, AUTH_TAR}
    gates = {gate["gate"]: gate["status"] for gate in steps["gate"]["details"]["reports"]}
    assert gates["correctness"] == "pass"
    assert gates["host"] in ("pass", "warn")
    # The registry after equals the registry before, field by field (the command's own check,
    # and this test's reading through MLflow's API).
    assert steps["restore"]["details"]["registry_equal_after_restore"] is True
    assert steps["verify"]["status"] == "ok"
    registry = report["registry"]
    assert registry["equal"] is True
    assert registry["differences"] == []
    assert registry["right_after_restore"] == []
    assert registry["after"]["versions"] == 2
    # The fill step exported version 2, which nobody had deployed: it tagged its lineage.
    lineage = {line.split(":")[0] for line in registry["lineage_tags_added_by_fill"]}
    assert lineage == {
        f"models.{MODEL}.versions.2.tags.gpufleet.{name}"
        for name in ("spec_hash", "artifact_sha256", "git_commit")
    }
    added, others = lineage_tag_additions(
        compare_snapshots(shared["before"], snapshot_registry(site.registry))
    )
    assert others == []
    assert len(added) == 3
    # One backup, the first, untouched.
    assert backup_dirs(site) == [directory]
    assert file_states(directory) == states
    # serve-a serves what the restored registry's alias names.
    lineage = site.hosts[HOST].exec(
        f"cat /opt/gpufleet/serving/model_repository/{MODEL}/2/gpufleet-lineage.json"
    )
    assert json.loads(lineage.stdout)["registry"]["version"] == 2
    # The report on disk, with each step's time.
    written = json.loads(
        (site.project / "build" / SITE / "reports" / f"rebuild-{HOST}.json").read_text()
    )
    assert [step["step"] for step in written["steps"]] == [
        "check",
        "backup",
        "replace",
        "configure",
        "deploy",
        "restore",
        "fill",
        "gate",
        "verify",
    ]
    assert all(step["seconds"] >= 0 for step in written["steps"])
    # serve-b served throughout.
    assert load.ok > 0
    assert load.failed == []


@pytest.mark.fakepve(time_scale=0.01)
def test_a_proxmox_host_gets_a_new_vm_with_its_name_and_gpu_mapping(
    site: RebuildSite,
    fakepve: Any,
    fakepve_url: str,
    fakepve_cafile: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The rebuild of a Proxmox host, in this process: fakepve holds its VM (made by the
    provider, as `pulumi up` would); the rebuild powers it off and sets it aside, clones a new
    one through the same provider (same name, tags and GPU mapping, a new vmid) whose guest
    agent reports a real host's address (serve-b's), destroys the old one, trusts the host key
    known_hosts already holds for that address, then runs the lifecycle's configure and the host
    gate against the real host. The stack has no serving stack: nothing to back up."""
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

    fakepve.apitokens[TOKEN_ID] = TOKEN_SECRET
    fakepve.add_vm(TEMPLATE, "debian-13-cloud", node="pve1", template=True, config=_TEMPLATE)
    monkeypatch.setattr(fakepve, "_do_start", Agents(fakepve).start)
    monkeypatch.setenv("GPUFLEET_PROXMOX_SECRET", TOKEN_SECRET)
    address = site.addresses["serve-b"]
    gateway = address.rsplit(".", 1)[0] + ".1"
    network = {"bridge": "vmbr0", "ipv4": f"{address}/24", "gateway": gateway}
    stack = _write_proxmox_stack(site, fakepve_url, fakepve_cafile, network)
    inputs = make_inputs(fakepve_url, fakepve_cafile, stack=stack, network=network)
    first = GpuVmProvider(FAST).create(inputs)
    assert first.outs is not None
    old_vmid = int(first.id)

    environment = load_environment(
        stack, project_root=site.project, addresses={PVE_HOST["name"]: address}
    )
    lines: list[str] = []
    report = rebuild_host(
        environment, PVE_HOST["name"], RebuildOptions(proxmox_timing=FAST), say=lines.append
    )
    text = "\n".join(lines)
    assert report.exit_code == 0, text[-4000:]
    steps = {step.name: step for step in report.steps}
    replaced = steps["replace"].details
    assert replaced["old_vmid"] == old_vmid
    assert replaced["vmid"] != old_vmid
    assert replaced["name"] == PVE_HOST["name"]
    assert replaced["address"] == address
    assert replaced["host_key_changed"] is False
    assert "no Pulumi CLI here" in text
    vms = [vm for vm in fakepve.vms if not vm.config.get("template")]
    assert [vm.vmid for vm in vms] == [replaced["vmid"]], "the old VM is destroyed"
    (vm,) = vms
    assert vm.name == PVE_HOST["name"]
    assert vm.status == "running"
    assert vm.config["hostpci0"] == "mapping=a10-pve1-0,pcie=1"
    assert set(vm.config["tags"].split(";")) == set(inputs["tags"]), "no gpufleet-replaced"
    assert steps["configure"].status in ("ok", "changed")
    assert steps["gate"].status == "ok", steps["gate"].reasons
    assert steps["backup"].details["files"] == {}


_TEMPLATE = {
    "scsi0": "local-lvm:base-9000-disk-0,size=32G",
    "scsihw": "virtio-scsi-pci",
    "ide2": "local-lvm:vm-9000-cloudinit,media=cdrom",
    "net0": "virtio=BC:24:11:00:90:00,bridge=vmbr0",
    "boot": "order=scsi0",
    "ostype": "l26",
    "agent": "1",
    "cores": 2,
    "memory": "2048",
    "template": 1,
}


def _write_proxmox_stack(site: RebuildSite, url: str, cafile: str, network: dict[str, str]) -> str:
    from tests.test_proxmox_provider import HOST as PVE_HOST
    from tests.test_proxmox_provider import TEMPLATE, TOKEN_ID

    site_config = yaml.safe_load((site.project / "stacks" / f"Pulumi.{SITE}.yaml").read_text())
    config = {
        "gpufleet:environment": "proxmox",
        "gpufleet:state_dir": "build/pve",
        "gpufleet:gates": ["host"],
        "gpufleet:host_config": site_config["config"]["gpufleet:host_config"],
        "gpufleet:proxmox": {
            "endpoint": url,
            "ca_bundle": cafile,
            "token_id": TOKEN_ID,
            "template_vmid": TEMPLATE,
            "storage": "local-lvm",
        },
        "gpufleet:hosts": [{**PVE_HOST, "proxmox": {**PVE_HOST["proxmox"], "network": network}}],
    }
    (site.project / "stacks" / "Pulumi.pve.yaml").write_text(yaml.safe_dump({"config": config}))
    return "pve"
