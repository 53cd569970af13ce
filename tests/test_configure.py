"""`gpufleet configure` converging real Debian 12 hosts, then the host gate checking them.

Real: the `gpufleet` CLI as a separate process; ansible-runner and Ansible over SSH (strict host
key checking) into Debian 12 containers with systemd as PID 1 on a Docker engine the tests
start (tests/docker_hosts.py); the roles' package installs from Debian's archive (contrib and
non-free enabled); Docker running inside the hosts; testinfra over SSH for the host gate.
Not real: no GPU (so the GPU tasks and checks report "no GPU present"); Docker's and NVIDIA's
repositories cannot be reached, so the stack uses `package_sources: distribution` (docker.io,
and the nvidia runtime registered without NVIDIA's container toolkit package). The "unsupported
OS" host is a bookworm container whose /etc/os-release and /etc/debian_version say Debian 11.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import SAMPLE_SPECS
from tests.docker_hosts import (
    DEBIAN_11_OS_RELEASE,
    DEBIAN_11_VERSION,
    ContainerHost,
    DockerEngine,
    HostPool,
    SshKeyPair,
)
from validation.loopback import pick_free_ports

STACK = "lab"
SECRET_VARIABLE = "GPUFLEET_TEST_BECOME_PASSWORD"  # noqa: S105  # its name, not a value
# A marker to search the artifacts for, with what YAML, Jinja and shells treat specially.
SECRET = "s3cret-{{ 7*7 }}-'\"$HOME%-7c1f"  # noqa: S105
FACT_GATHERING = {"gather_facts", "ansible.builtin.gather_facts", "setup", "ansible.builtin.setup"}


@dataclass
class Lab:
    """Two converged hosts (gpu-a: the spec says one T4; cpu-b: no GPU) and their project."""

    project: Path
    hosts: dict[str, ContainerHost]
    known_hosts: Path
    key: Path
    first_run: subprocess.CompletedProcess[str]

    def stack_file(self, name: str, hosts: list[dict[str, Any]], **config: Any) -> None:
        host_config = {
            "package_sources": "distribution",
            "require_gpu": False,
            "ssh_private_key_file": str(self.key),
            "ssh_known_hosts_file": str(self.known_hosts),
            "become_password_env": SECRET_VARIABLE,
            **config,
        }
        document = {
            "config": {
                "gpufleet:environment": "static",
                "gpufleet:state_dir": f"build/{name}",
                "gpufleet:hosts": hosts,
                "gpufleet:host_config": host_config,
            }
        }
        stacks = self.project / "stacks"
        stacks.mkdir(exist_ok=True)
        (stacks / f"Pulumi.{name}.yaml").write_text(yaml.safe_dump(document, sort_keys=False))

    def host_entry(self, name: str, **fields: Any) -> dict[str, Any]:
        host = self.hosts[name]
        return {"name": name, "address": host.address, "ssh_port": host.ssh_port, **fields}

    def gpufleet(
        self, *args: str, timeout: float = 900, secret: str = SECRET
    ) -> subprocess.CompletedProcess[str]:
        environment = {**os.environ, SECRET_VARIABLE: secret}
        return subprocess.run(
            [sys.executable, "-m", "gpufleet", *args],
            cwd=self.project,
            env=environment,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


@pytest.fixture(scope="module")
def lab(
    docker_engine: DockerEngine,
    debian_host_image: str,
    ssh_client_key: SshKeyPair,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Lab]:
    project = tmp_path_factory.mktemp("configure")
    with HostPool(docker_engine, debian_host_image, ssh_client_key, project, "configure") as pool:
        gpu_a, cpu_b = pool.start(2)
        known_hosts = project / "known_hosts"
        known_hosts.write_text(gpu_a.known_hosts.read_text() + cpu_b.known_hosts.read_text())
        lab = Lab(
            project=project,
            hosts={"gpu-a": gpu_a, "cpu-b": cpu_b},
            known_hosts=known_hosts,
            key=ssh_client_key.private_key,
            first_run=subprocess.CompletedProcess([], 0),
        )
        lab.stack_file(
            STACK,
            [lab.host_entry("gpu-a", gpus={"model": "t4", "count": 1}), lab.host_entry("cpu-b")],
        )
        lab.first_run = lab.gpufleet("configure", "--stack", STACK, "--json")
        yield lab


def summary(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    assert result.stdout.strip(), result.stderr[-3000:]
    return {host["host"]: host for host in json.loads(result.stdout)["hosts"]}


def gate_checks(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    """Every check of every host's gates in `validate --json`'s environment report."""
    assert result.stdout.strip(), result.stderr[-3000:]
    report = json.loads(result.stdout)
    return {
        check["name"]: check
        for host in report["hosts"].values()
        for step in host["steps"]
        for gate in step["details"]["reports"]
        for check in gate["checks"]
    }


def test_first_converge_installs_on_every_host_and_keeps_the_events(lab: Lab) -> None:
    result = lab.first_run
    assert result.returncode == 0, result.stderr[-3000:]
    hosts = summary(result)
    assert set(hosts) == {"gpu-a", "cpu-b"}
    for name, host in hosts.items():
        assert host["status"] == "changed", (name, host)
        assert host["failed"] == 0
        assert host["unreachable"] == 0
    artifact_dir = Path(json.loads(result.stdout)["artifact_dir"])
    events = list((artifact_dir / "job_events").glob("*.json"))
    assert len(events) > 50, "the run's events are kept as an artifact"
    assert json.loads((artifact_dir / "summary.json").read_text())["exit_code"] == 0
    # Progress per host and task, and the GPU tasks skipped in so many words.
    assert "gpu-a" in result.stderr
    assert "docker_engine : " in result.stderr
    assert "No NVIDIA GPU (PCI vendor 10de) on gpu-a" in result.stderr
    for name in ("gpu-a", "cpu-b"):
        installed = lab.hosts[name].exec("dpkg-query -W -f='${Status}' docker.io chrony")
        assert installed.stdout.count("install ok installed") == 2


def test_second_converge_changes_nothing(lab: Lab) -> None:
    result = lab.gpufleet("configure", "--stack", STACK, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    for name, host in summary(result).items():
        assert host["changed"] == 0, f"{name} is not idempotent: {result.stderr[-3000:]}"
        assert host["ok"] > 10


def test_host_gate_passes_what_a_host_without_gpu_can_prove(lab: Lab) -> None:
    result = lab.gpufleet("validate", "--stack", STACK, "--only", "host", "--json")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    checks = gate_checks(result)
    for host in ("gpu-a", "cpu-b"):
        for check in ("os supported", "docker engine", "docker log rotation"):
            assert checks[f"{host}: {check}"]["status"] == "pass", checks[f"{host}: {check}"]
        runtime = checks[f"{host}: nvidia runtime registered"]
        assert runtime["status"] == "warn", "registered, but the toolkit's binary is missing"
        assert "nvidia-container-runtime is not installed" in runtime["message"]
        driver = checks[f"{host}: driver loaded"]
        assert driver["status"] == "skip"
        assert driver["message"].startswith("no GPU present")
    assert "expects 1x T4" in checks["gpu-a: nvidia-smi GPUs"]["message"]
    for host in ("gpu-a", "cpu-b"):  # one report per host
        junit = (lab.project / "build" / STACK / "reports" / host / "host.junit.xml").read_text()
        assert junit.count('<skipped message="no GPU present') == 5, "5 GPU checks skipped"
    for host in ("gpu-a", "cpu-b"):  # chrony's unit needs CAP_SYS_TIME, which a container lacks
        time_sync = checks[f"{host}: time sync"]
        assert time_sync["status"] == "skip"
        assert "cannot run in a container" in time_sync["message"]


def test_a_missing_gpu_fails_the_gate_when_the_spec_requires_it(lab: Lab) -> None:
    lab.stack_file(
        "strict",
        [lab.host_entry("gpu-a", gpus={"model": "t4"}), lab.host_entry("cpu-b")],
        require_gpu=True,
    )
    result = lab.gpufleet("validate", "--stack", "strict", "--json")
    assert result.returncode == 1, result.stdout[-3000:]
    checks = gate_checks(result)
    missing = checks["gpu-a: gpu present"]
    assert missing["status"] == "fail"
    assert "expects 1x T4, but the host has no NVIDIA PCI device" in missing["message"]
    assert checks["cpu-b: driver loaded"]["status"] == "skip", "cpu-b expects no GPU"


def test_check_mode_reports_drift_without_fixing_it_and_limit_repairs_one_host(lab: Lab) -> None:
    cpu_b = lab.hosts["cpu-b"]
    drop_runtime = (
        "python3 -c \"import json; p='/etc/docker/daemon.json'; d=json.load(open(p)); "
        "d.pop('runtimes'); json.dump(d, open(p, 'w'))\""
    )
    cpu_b.exec(drop_runtime)
    drifted = cpu_b.exec("cat /etc/docker/daemon.json").stdout

    check = lab.gpufleet("configure", "--stack", STACK, "--check", "--json")
    assert check.returncode == 1, "drift found: " + check.stderr[-3000:]
    hosts = summary(check)
    assert hosts["cpu-b"]["changed"] >= 1, "the missing runtime is drift"
    assert hosts["gpu-a"]["changed"] == 0
    assert cpu_b.exec("cat /etc/docker/daemon.json").stdout == drifted, "--check changed a file"

    repair = lab.gpufleet("configure", "--stack", STACK, "--limit", "cpu-b", "--json")
    assert repair.returncode == 0, repair.stderr[-3000:]
    assert set(summary(repair)) == {"cpu-b"}
    assert summary(repair)["cpu-b"]["changed"] >= 1
    daemon = json.loads(cpu_b.exec("cat /etc/docker/daemon.json").stdout)
    assert "nvidia" in daemon.get("runtimes", {}), (daemon, repair.stderr[-5000:])
    runtimes = cpu_b.exec("docker info --format '{{json .Runtimes}}'").stdout
    assert "nvidia" in json.loads(runtimes), "Docker was restarted with the runtime"
    in_sync = lab.gpufleet("configure", "--stack", STACK, "--check", "--json")
    assert in_sync.returncode == 0, in_sync.stderr[-3000:]


def test_the_operators_daemon_json_keys_survive_a_converge(lab: Lab) -> None:
    """live-restore and icc set by hand on a converged host: the roles set their own keys and
    keep these (before, docker_engine kept only the runtimes and restarted Docker without
    them)."""
    cpu_b = lab.hosts["cpu-b"]
    add_keys = (
        "python3 -c \"import json; p='/etc/docker/daemon.json'; d=json.load(open(p)); "
        "d.update({'live-restore': True, 'icc': False}); d['log-opts']['max-file'] = '9'; "
        "json.dump(d, open(p, 'w'))\" && systemctl reset-failed docker && systemctl restart docker"
    )
    cpu_b.exec(add_keys)
    result = lab.gpufleet("configure", "--stack", STACK, "--limit", "cpu-b", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    daemon = json.loads(cpu_b.exec("cat /etc/docker/daemon.json").stdout)
    assert daemon["live-restore"] is True
    assert daemon["icc"] is False
    assert "nvidia" in daemon["runtimes"]
    assert daemon["log-opts"] == {"max-size": "100m", "max-file": "3"}, "the role's own key"
    live_restore = cpu_b.exec("docker info --format '{{.LiveRestoreEnabled}}'").stdout.strip()
    assert live_restore == "true"
    output = (Path(json.loads(result.stdout)["artifact_dir"]) / "stdout").read_text()
    assert (
        "/etc/docker/daemon.json: this role sets log-driver, log-opts; kept as they are: icc, "
        "live-restore, runtimes." in " ".join(output.split())
    )


def test_failed_and_unreachable_hosts_are_reported_while_the_others_converge(
    lab: Lab,
    docker_engine: DockerEngine,
    debian_host_image: str,
    ssh_client_key: SshKeyPair,
) -> None:
    with HostPool(docker_engine, debian_host_image, ssh_client_key, lab.project, "old") as pool:
        (old,) = pool.start(1, os_release=DEBIAN_11_OS_RELEASE, debian_version=DEBIAN_11_VERSION)
        known_hosts = lab.project / "known_hosts.mixed"
        known_hosts.write_text(lab.known_hosts.read_text() + old.known_hosts.read_text())
        (closed_port,) = pick_free_ports(1)
        lab.stack_file(
            "mixed",
            [
                lab.host_entry("gpu-a"),
                {"name": "old", "address": old.address, "ssh_port": old.ssh_port},
                {"name": "gone", "address": "127.0.0.1", "ssh_port": closed_port},
            ],
            ssh_known_hosts_file=str(known_hosts),
        )
        result = lab.gpufleet("configure", "--stack", "mixed", "--json")
    assert result.returncode == 1, result.stderr[-3000:]
    hosts = summary(result)
    assert hosts["gpu-a"]["status"] == "ok", "a healthy host converges beside the others"
    assert hosts["gpu-a"]["failed"] == 0
    assert hosts["gone"]["status"] == "unreachable"
    assert "Connection refused" in " ".join(hosts["gone"]["problems"])
    assert hosts["old"]["status"] == "failed"
    (problem,) = hosts["old"]["problems"]
    assert "base : " in problem
    assert "Debian 11" in problem
    assert "Ubuntu 22.04" in problem, "the message lists the supported systems"
    # It stopped at the first task after fact gathering: nothing before it did anything.
    artifact_dir = Path(json.loads(result.stdout)["artifact_dir"])
    results = [
        event
        for event in _events(artifact_dir)
        if event.get("event_data", {}).get("host") == "old"
        and event["event"].startswith("runner_on_")
        and event["event"] != "runner_on_start"
        and event["event_data"].get("task_action") not in FACT_GATHERING
    ]
    assert results[0]["event"] == "runner_on_failed", [e["event_data"]["task"] for e in results]
    assert len(results) == 1
    # The summary names the host, the task and the reason on one line.
    text = lab.gpufleet("configure", "--stack", "mixed", "--limit", "gone")
    assert text.returncode == 1
    assert "gone: unreachable at task" in text.stdout


def _events(artifact_dir: Path) -> list[dict[str, Any]]:
    events = [json.loads(path.read_text()) for path in (artifact_dir / "job_events").glob("*.json")]
    return sorted(events, key=lambda event: event["counter"])


def test_a_sudo_user_converges_with_the_become_password(lab: Lab) -> None:
    """A non-root user whose sudo asks for a password (with YAML/Jinja/shell metacharacters)."""
    gpu_a = lab.hosts["gpu-a"]
    gpu_a.exec("apt-get install -y -qq sudo >/dev/null", timeout=300)
    gpu_a.exec("useradd --create-home --groups sudo --shell /bin/bash ops")
    gpu_a.exec("chpasswd", input=f"ops:{SECRET}\n")
    gpu_a.exec(
        "install -d -m 700 -o ops /home/ops/.ssh && cp /root/.ssh/authorized_keys "
        "/home/ops/.ssh/ && chown ops /home/ops/.ssh/authorized_keys"
    )
    lab.stack_file("sudo", [lab.host_entry("gpu-a", ssh_user="ops")])
    result = lab.gpufleet("configure", "--stack", "sudo", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    host = summary(result)["gpu-a"]
    assert host["failed"] == 0
    assert host["changed"] == 0, "converged as root before; sudo reaches the same state"
    wrong = lab.gpufleet("configure", "--stack", "sudo", "--json", secret="wrong")  # noqa: S106
    assert wrong.returncode == 1
    assert summary(wrong)["gpu-a"]["status"] in ("failed", "unreachable")


# The serving stack's secrets, with what Jinja treats specially (extra vars are !unsafe).
SERVING_SECRETS = {
    "GPUFLEET_POSTGRES_PASSWORD": "pg-Cfg-7f3a/x@y:z",
    "GPUFLEET_GRAFANA_ADMIN_PASSWORD": "graf-Cfg-91c2",
    "GPUFLEET_TRITON_ADMIN_KEY": "key-{{7*7}}-*-5d8e0b",
    "GPUFLEET_MLFLOW_ADMIN_PASSWORD": "mlflow-Cfg-3e7a19",
}
# No registry answers on this port: compose fails at its first pull, right after the secrets.
UNPULLABLE = "127.0.0.1:9/gpufleet-test"


def test_configure_hands_the_serving_secrets_to_the_role_and_holds_its_lock(lab: Lab) -> None:
    """`configure` on a stack with gpufleet:serving: the secrets go from this process's
    environment through ansible-runner to the serving_stack role, which writes them 0600 on the
    host. The stack's images cannot be pulled on the test host (no registry is reachable from
    it), so the run ends failed at `docker-compose up`, after the secrets: the running stack
    itself is covered by tests/test_serving_run.py. While the run holds its lock, a second
    `configure` of the same stack is refused (exit 2) with the lock named."""
    lab.stack_file("served", [lab.host_entry("cpu-b")])
    stack_path = lab.project / "stacks" / "Pulumi.served.yaml"
    document = yaml.safe_load(stack_path.read_text())
    images = ("triton", "mlflow", "postgres", "prometheus", "grafana")
    document["config"]["gpufleet:models"] = ["tabular_mlp"]
    document["config"]["gpufleet:serving"] = {
        "images": {name: f"{UNPULLABLE}/{name}:1" for name in images},
        "publish": ["triton_http", "triton_grpc", "grafana", "mlflow"],
    }
    document["config"]["gpufleet:registry"] = {"host": "cpu-b"}  # so it runs MLflow too
    stack_path.write_text(yaml.safe_dump(document, sort_keys=False))
    specs = str(SAMPLE_SPECS)
    generated = lab.gpufleet("generate", "--stack", "served", "--specs", specs)
    assert generated.returncode == 0, generated.stdout + generated.stderr
    # A version to serve (the role refuses a repository without one before touching the host).
    version = lab.project / "build" / "model_repository" / "tabular_mlp" / "1"
    version.mkdir(parents=True)
    (version / "model.py").write_text("# stands in for an exported version\n")

    environment = {**os.environ, SECRET_VARIABLE: SECRET, **SERVING_SECRETS}
    command = [sys.executable, "-m", "gpufleet", "configure", "--stack", "served", "--json"]
    with subprocess.Popen(
        command,
        cwd=lab.project,
        env={**environment, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as first:
        assert first.stderr is not None
        progress = ""
        while "configuring cpu-b" not in progress and first.poll() is None:
            progress += first.stderr.readline()  # the lock is held from here to the end
        second = subprocess.run(
            command, cwd=lab.project, env=environment, capture_output=True, text=True, check=False
        )
        stdout, stderr = first.communicate(timeout=900)
    lock = lab.project / "build" / "served" / "ansible" / ".lock"
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"holds the lock {lock}" in second.stderr

    result = subprocess.CompletedProcess(command, first.returncode, stdout, progress + stderr)
    assert result.returncode == 1, result.stderr[-3000:]
    (problem,) = summary(result)["cpu-b"]["problems"]
    assert "serving_stack : Bring the stack up" in problem, problem
    secrets_dir = "/opt/gpufleet/serving/secrets"
    modes = lab.hosts["cpu-b"].exec(f"stat -c '%n %a %U' {secrets_dir}/*.env").stdout.split("\n")
    assert sorted(filter(None, modes)) == [
        f"{secrets_dir}/{service}.env 600 root"
        for service in ("grafana", "mlflow", "postgres", "triton")
    ]
    written = lab.hosts["cpu-b"].exec(f"cat {secrets_dir}/triton.env {secrets_dir}/postgres.env")
    assert written.stdout == (
        f"TRITON_ADMIN_KEY={SERVING_SECRETS['GPUFLEET_TRITON_ADMIN_KEY']}\n"
        f"POSTGRES_PASSWORD={SERVING_SECRETS['GPUFLEET_POSTGRES_PASSWORD']}\n"
    ), "each secret reaches the host as written"
    files = [path for path in (lab.project / "build" / "served").rglob("*") if path.is_file()]
    for secret in SERVING_SECRETS.values():
        assert secret not in result.stdout + result.stderr
        for path in files:
            assert secret.encode() not in path.read_bytes(), f"{path} holds a serving secret"


def test_the_become_password_is_written_nowhere(lab: Lab) -> None:
    """Runs last: every run of every stack in this module had the secret in its environment."""
    assert SECRET not in lab.first_run.stdout + lab.first_run.stderr
    build = lab.project / "build"
    files = [path for path in build.rglob("*") if path.is_file()]
    assert len(files) > 50
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), f"{path} holds the secret"
    for env_dir in build.glob("*/ansible/env"):
        assert list(env_dir.iterdir()) == [], "extravars (or another env file) outlived its run"
