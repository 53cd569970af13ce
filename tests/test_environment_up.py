"""`gpufleet up --stack NAME` on a static stack of two hosts: configure, deploy, gate, for real.

Real: the `gpufleet` CLI as separate processes; two Debian 12 hosts (containers with systemd and
sshd on a Docker engine the tests start, tests/docker_hosts.py) reached over SSH on their own
addresses on the engine's bridge, with strict host key checking; Ansible (ansible-runner)
installing Docker from Debian's archive inside them; the serving_stack role loading the Triton
image from an archive (the site has no registry) and starting it with docker-compose inside each
host; an MLflow registry on this machine (a local stack's, seeded with `gpufleet registry
seed-demo`) that the model repository is filled from; the host gate over SSH, and the
correctness and load gates over gRPC against each host's Triton. The site is shared with
test_drift_environment and test_rollout_hosts (tests/environment_site.py; its stack runs the
rollout gateway too); this module runs first, so its first `up` meets bare hosts.
Not real: no GPU (the GPU checks report "no GPU present"); the Triton image is the project's
stand-in (the nvidia-pytriton wheel's tritonserver with torch, tests/serving_images.py), not
NVIDIA's; Docker's and NVIDIA's package repositories cannot be reached, so the hosts take
`package_sources: distribution`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest
import yaml

from gpufleet.lifecycle.environment import load_environment
from gpufleet.lifecycle.lock import environment_lock
from gpufleet.lifecycle.outcome import StepFailed
from gpufleet.registry.demo import demo_network, register_torch_model
from gpufleet.spec.loading import load_model_specs
from infra.proxmox.provider import GpuVmProvider
from infra.steps.fingerprints import (
    configuration_fingerprint,
    deployment_fingerprint,
    gate_fingerprint,
)
from infra.steps.providers import (
    EnvironmentGateProvider,
    HostConfigurationProvider,
    ServingDeploymentProvider,
)
from tests.environment_site import HOSTS, MODEL, SECRETS, SITE, Site
from tests.serving_images import GATEWAY
from tests.test_proxmox_provider import FAST, HOST, Agents, make_inputs


@pytest.fixture(scope="module")
def site(shared_site: Site) -> Site:
    """The shared site (tests/environment_site.py), bare until this first `up`."""
    before = time.monotonic()
    shared_site.runs["first"] = shared_site.gpufleet("up", "--stack", SITE, "--json")
    shared_site.seconds["first"] = time.monotonic() - before
    return shared_site


def report_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.stdout.strip(), result.stderr[-4000:]
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def steps_of(report: dict[str, Any], host: str) -> dict[str, dict[str, Any]]:
    return {step["step"]: step for step in report["hosts"][host]["steps"]}


def gate_statuses(step: dict[str, Any]) -> dict[str, str]:
    return {gate["gate"]: gate["status"] for gate in step["details"]["reports"]}


def test_first_up_takes_bare_hosts_to_green_gates(site: Site) -> None:
    result = site.runs["first"]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    report = report_of(result)
    for host in HOSTS:
        assert report["hosts"][host]["stopped_at"] == "done"
        steps = steps_of(report, host)
        assert steps["configure"]["status"] == "changed", "bare hosts get Docker installed"
        assert steps["deploy"]["status"] == "changed"
        assert steps["deploy"]["details"]["models"] == {MODEL: [1]}
        gates = gate_statuses(steps["gate"])
        # Warns only that the nvidia runtime is registered without NVIDIA's toolkit binary
        # (Debian's archive has none); the GPU checks are skipped: no GPU here.
        (host_report,) = [r for r in steps["gate"]["details"]["reports"] if r["gate"] == "host"]
        warned = [c["name"] for c in host_report["checks"] if c["status"] == "warn"]
        assert warned == [f"{host}: nvidia runtime registered"]
        assert gates["host"] == "warn"
        assert gates["correctness"] == "pass"
        # The load gate passes, or warns (this busy machine: unsettled windows, a starved load
        # generator); it read Triton's restricted statistics with the admin key: the split.
        assert gates["load"] in ("pass", "warn")
        (load,) = [r for r in steps["gate"]["details"]["reports"] if r["gate"] == "load"]
        assert "queue" in load["checks"][0]["message"], load["checks"][0]["message"]
        # What the host serves is the registry's version, copied with its lineage manifest.
        lineage = site.hosts[host].exec(
            f"cat /opt/gpufleet/serving/model_repository/{MODEL}/1/gpufleet-lineage.json"
        )
        assert json.loads(lineage.stdout)["registry"]["version"] == 1
    reports = site.project / "build" / SITE / "reports"
    assert (reports / "environment.junit.xml").is_file()
    for host in HOSTS:
        assert json.loads((reports / host / "correctness.json").read_text())["status"] == "pass"
    # No secret reached a report, the printed output or the kept Ansible artifacts.
    texts = [result.stdout, result.stderr]
    texts += [path.read_text(errors="replace") for path in reports.rglob("*") if path.is_file()]
    artifacts = site.project / "build" / SITE / "ansible"
    texts += [p.read_text(errors="replace") for p in artifacts.rglob("*") if p.is_file()]
    for name, secret in SECRETS.items():
        if name != "MLFLOW_TRACKING_USERNAME":  # a login name, not a secret
            assert not any(secret in text for text in texts), name


def test_second_up_changes_nothing(site: Site) -> None:
    before = {host: site.triton_container(host)["State"]["StartedAt"] for host in HOSTS}
    generated = site.project / "build" / SITE
    mtimes = {
        path: path.stat().st_mtime_ns
        for tree in ("serving", "model_repository")
        for path in (generated / tree).rglob("*")
        if path.is_file()
    }
    started = time.monotonic()
    result = site.gpufleet("up", "--stack", SITE, "--json")
    site.seconds["second"] = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = report_of(result)
    for host in HOSTS:
        steps = steps_of(report, host)
        assert steps["configure"]["status"] == "ok", steps["configure"]["details"]
        assert steps["deploy"]["status"] == "ok", steps["deploy"]["details"]
        assert "changed=0" in steps["deploy"]["details"]["ansible"]
        assert site.triton_container(host)["State"]["StartedAt"] == before[host], "no restart"
    rewritten = [str(path) for path, mtime in mtimes.items() if path.stat().st_mtime_ns != mtime]
    assert rewritten == []


def step_props(site: Site, stack: str, host: str, address: str, vm_id: str) -> dict[str, Any]:
    """The inputs the program gives a step resource (infra/steps/host_lifecycle.py)."""
    return {
        "stack": stack,
        "host": host,
        "project_root": str(site.project),
        "address": address,
        "addresses": {host: address},
        "vm_id": vm_id,
        "after": "",
    }


def run_steps_in_order(
    site: Site, stack: str, host: str, address: str, vm_id: str
) -> dict[str, dict[str, Any]]:
    """Configuration, deployment and gate providers' create, each after the one before, as
    Pulumi's engine would call them; their outputs by step."""
    props = step_props(site, stack, host, address, vm_id)
    environment = load_environment(stack, project_root=site.project, addresses={host: address})
    outs: dict[str, dict[str, Any]] = {}
    fingerprints = {
        "configuration": configuration_fingerprint(environment, host),
        "deployment": deployment_fingerprint(environment),
        "gate": gate_fingerprint(environment),
    }
    providers = {
        "configuration": HostConfigurationProvider(),
        "deployment": ServingDeploymentProvider(),
        "gate": EnvironmentGateProvider(),
    }
    after = ""
    for step, provider in providers.items():
        inputs = {**props, "fingerprint": fingerprints[step], "after": after}
        created = provider.create(dict(inputs))
        assert created.outs is not None
        assert created.id == f"{stack}/{host}/{provider.step}"
        outs[step] = {"inputs": inputs, "outs": created.outs, "id": created.id}
        after = created.outs["run"]
    return outs


def test_the_step_resources_run_the_same_steps_and_diff_finds_nothing_to_do(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The three dynamic providers of `pulumi up`, called as the engine would, on a host that
    `gpufleet up` converged: each step runs and succeeds without changing anything, and diff
    on the same inputs finds no change; a moved address or a changed step before does. The
    secrets are in this process's environment, as in the `pulumi` process's."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    address = site.addresses["serve-a"]
    steps = run_steps_in_order(site, SITE, "serve-a", address, "container-serve-a")
    assert steps["configuration"]["outs"]["status"] == "ok"
    assert steps["deployment"]["outs"]["status"] == "ok"
    assert steps["deployment"]["outs"]["registry_selection"] == {
        MODEL: f"models:/{MODEL}@production -> 1"
    }
    assert "correctness pass" in steps["gate"]["outs"]["summary"]
    providers = [
        HostConfigurationProvider(),
        ServingDeploymentProvider(),
        EnvironmentGateProvider(),
    ]
    for provider, step in zip(providers, steps.values(), strict=True):
        inputs, outs = step["inputs"], step["outs"]
        assert provider.diff(step["id"], outs, dict(inputs)).changes is False, provider.step
        moved = {**inputs, "address": "192.0.2.99"}
        assert provider.diff(step["id"], outs, moved).changes is True
        assert provider.diff(step["id"], outs, {**inputs, "after": "another-run"}).changes is True
    deployment = steps["deployment"]
    updated = ServingDeploymentProvider().update(
        deployment["id"], deployment["outs"], {**deployment["inputs"], "fingerprint": "new"}
    )
    assert updated.outs is not None
    assert updated.outs["status"] == "ok", "nothing on the host differs"
    assert updated.outs["run"] != deployment["outs"]["run"], "a new run for the gate to follow"
    ServingDeploymentProvider().delete(deployment["id"], deployment["outs"])
    _wait_for_triton(site)  # delete undoes nothing: the host still serves
    site.deployed = deployment


@pytest.mark.fakepve(time_scale=0.01)
def test_proxmox_path_vm_then_configuration_deployment_and_gate(
    site: Site,
    fakepve: Any,
    fakepve_url: str,
    fakepve_cafile: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Proxmox provider makes the VM in fakepve; its guest agent reports the address of a
    real host (serve-a's), and the three steps run against that address, in dependency order
    (the order lives here, as the engine would keep it). The steps serve a second stack on the
    host: ports and directory of its own."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    from tests.test_proxmox_provider import TEMPLATE, TOKEN_ID, TOKEN_SECRET

    fakepve.apitokens[TOKEN_ID] = TOKEN_SECRET
    fakepve.add_vm(TEMPLATE, "debian-13-cloud", node="pve1", template=True, config=_TEMPLATE)
    agents = Agents(fakepve)
    monkeypatch.setattr(fakepve, "_do_start", agents.start)
    address = site.addresses["serve-a"]
    network = {"bridge": "vmbr0", "ipv4": f"{address}/16", "gateway": "172.17.0.1"}
    created = GpuVmProvider(FAST).create(make_inputs(fakepve_url, fakepve_cafile, network=network))
    assert created.outs is not None
    assert created.outs["address"] == address, "the agent reports the real host's address"
    _write_proxmox_stack(site, fakepve_url, fakepve_cafile, network)
    try:
        steps = run_steps_in_order(site, "pve", HOST["name"], address, str(created.outs["vmid"]))
        assert steps["configuration"]["outs"]["status"] == "ok", "serve-a is configured already"
        assert steps["deployment"]["outs"]["status"] == "changed", "the second stack is new"
        assert "correctness pass" in steps["gate"]["outs"]["summary"]
        listed = site.inner_docker("serve-a", "ps", "--format", "'{{.Names}} {{.Ports}}'")
        assert "gpufleet-pve" in listed
        assert f"{address}:18001->8001" in listed
    finally:  # the shared site's next user finds serve-a running its own stack alone
        project = "label=com.docker.compose.project=gpufleet-pve"
        site.hosts["serve-a"].exec(f"docker ps -aq --filter {project} | xargs -r docker rm -f")


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


def _write_proxmox_stack(site: Site, url: str, cafile: str, network: dict[str, str]) -> None:
    from tests.test_proxmox_provider import TEMPLATE, TOKEN_ID

    site_config = yaml.safe_load((site.project / "stacks" / f"Pulumi.{SITE}.yaml").read_text())
    config = site_config["config"]
    host = {**HOST, "proxmox": {**HOST["proxmox"], "network": network}}
    config.update(
        {
            "gpufleet:environment": "proxmox",
            "gpufleet:state_dir": "build/pve",
            "gpufleet:model_repository": "build/pve/model_repository",
            "gpufleet:ports": {"triton_http": 18000, "triton_grpc": 18001, "triton_metrics": 18002},
            "gpufleet:proxmox": {
                "endpoint": url,
                "ca_bundle": cafile,
                "token_id": TOKEN_ID,
                "template_vmid": TEMPLATE,
                "storage": "local-lvm",
            },
            "gpufleet:hosts": [host],
        }
    )
    serving = config["gpufleet:serving"]
    serving["directory"] = "/opt/gpufleet/pve"
    # The site's own stack runs the gateway on serve-a's gateway ports: this one has none.
    serving.pop("gateway", None)
    serving["publish"] = [name for name in serving["publish"] if not name.startswith("gateway")]
    serving["image_archives"] = [
        path for path in serving["image_archives"] if GATEWAY.name not in path
    ]
    (site.project / "stacks" / "Pulumi.pve.yaml").write_text(yaml.safe_dump(site_config))


def test_a_second_up_while_one_runs_is_refused_naming_the_holder(site: Site) -> None:
    state_dir = site.project / "build" / SITE
    with environment_lock(state_dir, SITE, "up"):
        result = site.gpufleet("up", "--stack", SITE)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"stack '{SITE}' is locked by `gpufleet up` (pid {os.getpid()}" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_triton_that_is_not_listening_is_could_not_run_not_failed(site: Site) -> None:
    name = site.triton_container("serve-b")["Name"].lstrip("/")
    site.inner_docker("serve-b", "stop", "--time", "5", name)
    try:
        result = site.gpufleet("validate", "--stack", SITE, "--only", "correctness", "--json")
    finally:
        site.inner_docker("serve-b", "start", name)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    report = report_of(result)
    assert steps_of(report, "serve-a")["gate"]["status"] == "ok"
    failed = steps_of(report, "serve-b")["gate"]
    assert failed["status"] == "error"
    assert any("correctness" in reason for reason in failed["reasons"])


def test_a_triton_killed_during_the_load_gate_fails_it_with_the_outage_counted(
    site: Site,
) -> None:
    """SIGKILL to serve-a's Triton container while the load gate measures it (a stack file of
    its own whose load never settles, so the gate measures for 10 s); serve-b is not touched."""
    document = yaml.safe_load((site.project / "stacks" / f"Pulumi.{SITE}.yaml").read_text())
    document["config"]["gpufleet:state_dir"] = "build/site-crash"
    document["config"]["gpufleet:load_gate"] = {
        "window_s": 0.5,
        "stable_windows": 2,
        "stability_percent": 1e-6,
        "max_windows": 20,
    }
    (site.project / "stacks" / "Pulumi.site-crash.yaml").write_text(yaml.safe_dump(document))
    name = site.triton_container("serve-a")["Name"].lstrip("/")
    command = [sys.executable, "-m", "gpufleet", "validate", "--stack", "site-crash"]
    gate = subprocess.Popen(
        [*command, "--only", "load", "--json"],
        cwd=site.project,
        env={**os.environ, **SECRETS},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert gate.stderr is not None
    for line in gate.stderr:
        if "serve-a:" in line and "measuring" in line:
            break
    # SIGKILL to the container's main process, a crash: its restart policy brings it back
    # (`docker kill` would count as stopping it by hand, which no policy restarts).
    site.hosts["serve-a"].exec(f"kill -KILL $(docker inspect --format '{{{{.State.Pid}}}}' {name})")
    stdout, _ = gate.communicate(timeout=600)
    _wait_for_triton(site)
    assert gate.returncode == 1, stdout[-3000:]
    report = json.loads(stdout)
    crashed = steps_of(report, "serve-a")["gate"]
    assert crashed["status"] == "failed"
    (load,) = crashed["details"]["reports"]
    (check,) = [check for check in load["checks"] if check["status"] == "fail"]
    assert check["measurements"]["errors"] > 0
    assert f"{check['measurements']['errors']} of" in check["message"]
    # serve-b was gated too (its own outcome depends on this busy machine, not on serve-a).
    assert "gate" in steps_of(report, "serve-b")


def test_registered_wrong_weights_fail_up_naming_host_model_and_version(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new version whose weights are not the ones its golden examples were made with."""
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, SECRETS[name])
    (spec,) = [item.spec for item in load_model_specs(site.project / "modelconfigs")]
    wrong = register_torch_model(
        site.registry,
        spec,
        demo_network(spec, seed=7),
        golden_module=demo_network(spec, seed=0),
    )
    try:
        _wait_for_triton(site)
        _wrong_weights_fail_up(site, wrong.version)
    finally:  # the shared site's next user finds the registry selecting version 1 again
        site.registry.set_alias(MODEL, spec.source.rsplit("@", 1)[1], 1)


def _wrong_weights_fail_up(site: Site, wrong_version: int) -> None:
    result = site.gpufleet("up", "--stack", SITE, "--json")
    assert result.returncode == 1, result.stdout[-4000:] + result.stderr[-4000:]
    report = report_of(result)
    for host in HOSTS:
        gate_step = steps_of(report, host)["gate"]
        assert gate_step["status"] == "failed"
        assert gate_statuses(gate_step)["correctness"] == "fail"
        assert any(
            f"{MODEL}" in reason and f"v{wrong_version}" in reason
            for reason in gate_step["reasons"]
        ), gate_step["reasons"]
    text = site.gpufleet("validate", "--stack", SITE, "--only", "correctness")
    assert text.returncode == 1
    assert f"serve-a: gate: gate correctness: {MODEL} v{wrong_version}" in text.stdout
    # `pulumi up`: the moved alias is a change for the deployment; the gate step raises.
    deployment = site.deployed
    assert (
        ServingDeploymentProvider()
        .diff(deployment["id"], deployment["outs"], deployment["inputs"])
        .changes
    )
    gate_inputs = {
        **step_props(site, SITE, "serve-a", site.addresses["serve-a"], "container-serve-a"),
        "fingerprint": "any",
    }
    with pytest.raises(StepFailed, match=rf"serve-a: gate failed: gate correctness: {MODEL} v"):
        EnvironmentGateProvider().create(gate_inputs)


def test_an_unreachable_host_fails_alone_and_the_summary_says_where(site: Site) -> None:
    """serve-b answers every SSH packet with a reset (iptables, installed with Docker), also on
    the connections Ansible keeps open (ControlPersist), so it is unreachable from the start."""
    reject = "INPUT -p tcp --dport 22 -j REJECT --reject-with tcp-reset"
    site.hosts["serve-b"].exec(f"iptables -I {reject}")
    try:
        result = site.gpufleet("up", "--stack", SITE, "--json")
    finally:
        site.hosts["serve-b"].exec(f"iptables -D {reject}")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    report = report_of(result)
    assert report["hosts"]["serve-b"]["stopped_at"] == "configure"
    unreachable = steps_of(report, "serve-b")["configure"]
    assert unreachable["status"] == "failed"
    assert steps_of(report, "serve-a")["deploy"]["status"] in ("ok", "changed")
    assert "gate" in steps_of(report, "serve-a"), "the reachable host went on to its gates"
    table = site.gpufleet("validate", "--stack", SITE, "--only", "host")
    assert "serve-b" in table.stdout


def _wait_for_triton(site: Site, timeout_s: float = 400) -> None:
    """After a restart in an earlier test, each Triton answers readiness before going on."""
    deadline = time.monotonic() + timeout_s
    for host in HOSTS:
        url = f"http://{site.addresses[host]}:8000/v2/health/ready"
        while True:
            # Refused, reset, or not ready yet (503): try again.
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    break
            assert time.monotonic() < deadline, f"{host}: Triton not ready at {url}"
            time.sleep(1)
