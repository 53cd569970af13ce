"""`gpufleet rebuild` keeps Grafana's database: the backup, the loss, the restore, for real.

One Debian 12 test host (tests/docker_hosts.py, at a fixed address on a network of its own as in
tests/rebuild_site.py) configured by the lifecycle's configure step (ansible/host.yml through
ansible-runner: Ansible over SSH installs Debian's docker.io and docker-compose in it). In it, the stack's
grafana service runs from the compose file `gpufleet generate --stack` wrote for that host, with
the Grafana stand-in image of tests/serving_images.py in place of grafana/grafana (as
`serving.images.grafana`, the way the test sites substitute the other stand-ins) and its env
file written by the same render_env_files the serving_stack role's secrets come from; its
prometheus service beside it (the Prometheus stand-in: Debian's Prometheus, scraping itself
every 2 s into the project's named volume).

What is real: SSH with strict host keys, Ansible, Docker and docker-compose inside the host, the
generated compose file, env file and provisioning files, the stand-in's SQLite grafana.db in the
compose project's named volume, Prometheus and its TSDB, and the rebuild's own functions
(host_holdings, take_backup, open_backup, restore_backup) and command (`gpufleet rebuild` as a
process for the refusals and the backups with and without --keep-prometheus).
What is not: Grafana itself (a Python stand-in over SQLite that honours grafana/grafana's
contract, see tests/serving_images.py); the serving_stack role is not run (it would start
Triton and fill a model repository first): the generated stack directory is copied into the
host with `docker cp`, the images loaded with `docker save | docker load`, and only the
grafana and prometheus services started (`docker-compose up --no-deps`); the host is not
replaced (its containers and volumes are destroyed, which is what a reinstall does to them).

The module takes about 5 minutes on the busy machine, most of it the configure step.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from generators.serving_stack.secrets import render_env_files
from gpufleet.lifecycle.environment import Environment, load_environment
from gpufleet.rebuild.backup import (
    GRAFANA_DB,
    GRAFANA_DB_PATH,
    PROMETHEUS_TAR,
    _sqlite_integrity,
    open_backup,
    take_backup,
    tar_hashes,
)
from gpufleet.rebuild.holdings import compose_project, host_holdings
from gpufleet.rebuild.restore import restore_backup
from tests.docker_hosts import ContainerHost, DockerEngine, SshKeyPair
from tests.rebuild_site import FixedAddressPool, site_network
from tests.serving_images import GRAFANA, PROMETHEUS, ensure_image

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SITE = "graf"
HOST = "graf-a"
MODEL = "tabular_mlp"
STACK_DIR = "/opt/gpufleet/serving"  # serving.directory's default
SECRETS = {
    "GPUFLEET_GRAFANA_ADMIN_PASSWORD": "graf-Keep-5d2e",
    "GPUFLEET_TRITON_ADMIN_KEY": "key-Keep-71c3",
}
_HEALTH_TIMEOUT_S = 120.0


@dataclass
class GrafanaSite:
    project: Path
    engine: DockerEngine
    host: ContainerHost
    address: str

    @property
    def environment(self) -> Environment:
        return load_environment(SITE, project_root=self.project)

    @property
    def backups(self) -> Path:
        return self.project / "build" / SITE / "backups" / HOST

    def sh(self, command: str, *, check: bool = True, timeout: float = 300) -> str:
        """A shell command on the host (docker exec into the host's container, as root)."""
        return self.host.exec(command, check=check, timeout=timeout).stdout

    def compose(self, *args: str) -> str:
        project = compose_project(self.environment)
        command = f"docker-compose --project-name {project} --file docker-compose.yml"
        return self.sh(f"cd {STACK_DIR} && {command} {shlex.join(args)}")

    def grafana(self) -> str:
        """The id of the running grafana container of the stack ("" when none runs)."""
        project = compose_project(self.environment)
        return self.sh(
            "docker ps -q --filter label=com.docker.compose.service=grafana "
            f"--filter label=com.docker.compose.project={project}"
        ).strip()

    def prometheus(self) -> str:
        """The id of the running prometheus container of the stack ("" when none runs)."""
        project = compose_project(self.environment)
        return self.sh(
            "docker ps -q --filter label=com.docker.compose.service=prometheus "
            f"--filter label=com.docker.compose.project={project}"
        ).strip()

    def prometheus_api(self, path: str, **params: str) -> Any:
        """Prometheus's HTTP API inside its container (its port is not published): the data."""
        url = f"http://127.0.0.1:9090{path}?{urllib.parse.urlencode(params)}"
        command = f"docker exec {self.prometheus()} wget -q -O - {shlex.quote(url)}"
        answer = json.loads(self.sh(command))
        assert answer["status"] == "success", answer
        return answer["data"]

    def up_samples(self, at: float) -> list[tuple[float, str]]:
        """The raw samples of Prometheus scraping itself in the 10 minutes up to `at`."""
        data = self.prometheus_api(
            "/api/v1/query", query='up{job="prometheus"}[10m]', time=f"{at:.3f}"
        )
        return [(float(ts), value) for series in data["result"] for ts, value in series["values"]]

    def wait_prometheus(self) -> None:
        """/-/ready answers in the prometheus container, and its TSDB answers queries."""
        deadline = time.monotonic() + _HEALTH_TIMEOUT_S
        while time.monotonic() < deadline:
            container = self.prometheus()
            ready = f"docker exec {container} wget -q -O /dev/null http://127.0.0.1:9090/-/ready"
            if container and self.host.exec(ready, check=False).returncode == 0:
                return
            time.sleep(1)
        logs = self.sh(f"docker logs --tail 30 {self.prometheus()} 2>&1", check=False)
        raise AssertionError(f"Prometheus on {HOST} not ready:\n{logs}")

    def in_grafana(self, command: str, *, check: bool = True) -> str:
        return self.sh(f"docker exec {self.grafana()} sh -c {shlex.quote(command)}", check=check)

    def db_sha256(self) -> str:
        return self.in_grafana(f"sha256sum {GRAFANA_DB_PATH}").split()[0]

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Grafana's HTTP API on the host's published port, as the stack's admin."""
        login = f"admin:{SECRETS['GPUFLEET_GRAFANA_ADMIN_PASSWORD']}".encode()
        headers = {"Authorization": "Basic " + base64.b64encode(login).decode()}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        connection = http.client.HTTPConnection(self.address, 3000, timeout=10)
        try:
            connection.request(method, path, data, headers)
            response = connection.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            connection.close()

    def wait_healthy(self) -> None:
        """/api/health answers {"database": "ok"} from this machine, through the published
        port, and the compose health check (wget in the container) says healthy."""
        deadline = time.monotonic() + _HEALTH_TIMEOUT_S
        last = ""
        while time.monotonic() < deadline:
            container = self.grafana()
            if container:
                health = self.sh(
                    f"docker inspect --format '{{{{.State.Health.Status}}}}' {container}",
                    check=False,
                ).strip()
                with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
                    status, body = self.api("GET", "/api/health")
                    last = f"{health}, /api/health {status} {body}"
                    if health == "healthy" and status == 200 and body["database"] == "ok":
                        return
            time.sleep(1)
        logs = self.sh(f"docker logs --tail 30 {self.grafana()} 2>&1", check=False)
        raise AssertionError(f"Grafana on {HOST} not healthy ({last}):\n{logs}")


def _write_project(
    project: Path, address: str, key: Path, known_hosts: Path, images: dict[str, str]
) -> None:
    (project / "modelconfigs").mkdir(parents=True)
    spec = (PROJECT_ROOT / "modelconfigs" / f"{MODEL}.yaml").read_text()
    (project / "modelconfigs" / f"{MODEL}.yaml").write_text(spec)
    config = {
        "environment": "static",
        "models": [MODEL],
        "state_dir": f"build/{SITE}",
        "model_repository": f"build/{SITE}/model_repository",
        "hosts": [{"name": HOST, "address": address}],
        # An external registry (never contacted here): the host holds no registry of its own.
        "registry": {"tracking_uri": "https://mlflow.example.internal"},
        "host_config": {
            "package_sources": "distribution",
            "require_gpu": False,
            "ssh_private_key_file": str(key),
            "ssh_known_hosts_file": str(known_hosts),
        },
        "serving": {
            # The stand-ins in place of the official images; only Grafana and Prometheus run.
            "images": images,
            "publish": ["triton_http", "grafana"],
            # Every 2 s: a few seconds of Prometheus history to keep and find again.
            "monitoring": {"prometheus": True, "grafana": True, "scrape_interval_s": 2},
        },
    }
    (project / "stacks").mkdir()
    document = {"config": {f"gpufleet:{name}": value for name, value in config.items()}}
    (project / "stacks" / f"Pulumi.{SITE}.yaml").write_text(
        yaml.safe_dump(document, sort_keys=False)
    )


def _gpufleet(project: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpufleet", *args],
        cwd=project,
        env={**os.environ, **SECRETS, "PYTHONPATH": str(PROJECT_ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# The lifecycle's configure step (ansible/host.yml: base, Docker; not the serving_stack role,
# which is the deploy step's), in a process of its own as the rebuild runs it.
_CONFIGURE = f"""
import sys
from pathlib import Path
from gpufleet.lifecycle.configure import configure
from gpufleet.lifecycle.environment import load_environment

environment = load_environment({SITE!r}, project_root=Path.cwd())
for outcome in configure(environment, [{HOST!r}], say=print):
    if not outcome.succeeded:
        sys.exit(f"configure: {{outcome.host}} {{outcome.status}}: {{outcome.reasons}}")
"""


def _python(project: Path, script: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=project,
        env={**os.environ, **SECRETS, "PYTHONPATH": str(PROJECT_ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _load_image(engine: DockerEngine, host: ContainerHost, tag: str) -> None:
    """`docker save` from the test engine into the host's own dockerd."""
    docker = ["docker", "--host", engine.docker_host]
    with subprocess.Popen([*docker, "save", tag], stdout=subprocess.PIPE) as save:
        load = subprocess.run(
            [*docker, "exec", "-i", host.name, "docker", "load", "--quiet"],
            stdin=save.stdout,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert save.stdout is not None
        save.stdout.close()
        saved = save.wait(timeout=600)
    if saved != 0 or load.returncode != 0:
        raise RuntimeError(f"loading {tag} into {host.name} failed: {load.stderr}")


@pytest.fixture(scope="module")
def site(
    docker_engine: DockerEngine,
    debian_host_image: str,
    ssh_client_key: SshKeyPair,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GrafanaSite]:
    """The host configured, the generated stack copied in, Grafana (stand-in) running."""
    images = {
        "prometheus": ensure_image(docker_engine, PROMETHEUS, debian_host_image, print),
        "grafana": ensure_image(docker_engine, GRAFANA, debian_host_image, print),
    }
    work = tmp_path_factory.mktemp("grafana-site")
    with (
        site_network(docker_engine) as (network, subnet),
        FixedAddressPool(docker_engine, debian_host_image, ssh_client_key, work, network) as pool,
    ):
        address = str(subnet[10])
        host = pool.start_at(address)
        known_hosts = work / "known_hosts"
        entries = [line.split()[1:] for line in host.known_hosts.read_text().splitlines()]
        known_hosts.write_text("".join(f"{address} {kind} {key}\n" for kind, key in entries))
        project = work / "project"
        _write_project(project, address, ssh_client_key.private_key, known_hosts, images)
        site = GrafanaSite(project, docker_engine, host, address)

        configured = _python(project, _CONFIGURE)
        assert configured.returncode == 0, configured.stdout[-3000:] + configured.stderr[-3000:]
        generated = _gpufleet(project, "generate", "--stack", SITE)
        assert generated.returncode == 0, generated.stdout[-3000:] + generated.stderr[-3000:]
        _load_image(docker_engine, host, images["grafana"])
        _load_image(docker_engine, host, images["prometheus"])

        stack = project / "build" / SITE / "serving" / HOST
        site.sh(f"install -d -m 755 {STACK_DIR}")
        docker_engine.docker("cp", f"{stack}/.", f"{host.name}:{STACK_DIR}")
        environment = site.environment
        assert environment.spec.serving is not None
        secrets_dir = f"{STACK_DIR}/{environment.spec.serving.secrets_dir}"
        site.sh(f"install -d -m 700 {secrets_dir}")
        for service, text in render_env_files(
            environment.spec.serving, SECRETS, runs_registry=False
        ).items():
            write = f"umask 077 && cat > {secrets_dir}/{service}.env"
            host.exec(write, input=text + "\n")
        site.compose("up", "--detach", "--no-deps", "prometheus", "grafana")
        site.wait_healthy()
        site.wait_prometheus()
        yield site


def _run_rebuild(site: GrafanaSite) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    run = _gpufleet(site.project, "rebuild", "--stack", SITE, "--host", HOST, "--json")
    report = json.loads(run.stdout)
    return run, report


def test_the_generated_stack_runs_grafana_and_the_rebuild_sees_its_database(
    site: GrafanaSite,
) -> None:
    """The compose file gpufleet generated for the host runs the stand-in Grafana as uid 472
    with grafana.db in the project's named volume; host_holdings (read from the same service
    graph) says the host holds Grafana's database and no registry."""
    holdings = host_holdings(site.environment, HOST)
    assert (holdings.registry, holdings.grafana) == (False, True)
    assert "Grafana's database" in holdings.listed()
    container = site.grafana()
    mounts = json.loads(site.sh(f"docker inspect --format '{{{{json .Mounts}}}}' {container}"))
    data = [mount for mount in mounts if mount["Destination"] == "/var/lib/grafana"]
    assert [mount["Type"] for mount in data] == ["volume"]
    assert data[0]["Name"].endswith("grafana-data")
    assert site.in_grafana(f"stat -c %u {GRAFANA_DB_PATH}").strip() == "472"
    assert site.in_grafana("id -u").strip() == "472"


def test_a_backup_without_a_readable_grafana_stops_before_anything_is_destroyed(
    site: GrafanaSite,
) -> None:
    """`gpufleet rebuild` with the Grafana container stopped, then with a grafana.db that is not
    a SQLite database: each time exit 2 at the backup step (the replace step never starts), the
    reason named, no backup directory left (not even a partial one), and Grafana's data where
    it was."""
    status, body = site.api("POST", "/api/dashboards/db", {"dashboard": {"title": "Kept"}})
    assert status == 200, body
    before = site.db_sha256()

    site.compose("stop", "grafana")
    try:
        run, report = _run_rebuild(site)
    finally:
        site.compose("start", "grafana")
    site.wait_healthy()
    assert run.returncode == 2, run.stderr
    assert [(step["step"], step["status"]) for step in report["steps"]] == [
        ("check", "ok"),
        ("backup", "error"),
    ]
    reasons = " ".join(report["steps"][1]["reasons"])
    assert "no running grafana container" in reasons
    assert "nothing was destroyed" in reasons
    assert not site.backups.exists() or list(site.backups.iterdir()) == []
    assert site.db_sha256() == before

    kept = f"{GRAFANA_DB_PATH}.kept"
    site.in_grafana(
        f"mv {GRAFANA_DB_PATH} {kept} && head -c 40960 /dev/urandom > {GRAFANA_DB_PATH}"
    )
    try:
        garbage = site.db_sha256()
        run, report = _run_rebuild(site)
        assert site.db_sha256() == garbage, "the backup changed what it read"
    finally:
        site.in_grafana(f"mv -f {kept} {GRAFANA_DB_PATH}")
    assert run.returncode == 2, run.stderr
    assert [(step["step"], step["status"]) for step in report["steps"]] == [
        ("check", "ok"),
        ("backup", "error"),
    ]
    reasons = " ".join(report["steps"][1]["reasons"])
    assert "grafana.db" in reasons
    assert "is not a sound SQLite database: file is not a database" in reasons
    assert not site.backups.exists() or list(site.backups.iterdir()) == []
    assert site.db_sha256() == before
    site.wait_healthy()


def test_grafana_database_comes_back_after_its_container_and_volume_are_destroyed(
    site: GrafanaSite,
) -> None:
    """A dashboard and a user made through Grafana's API; take_backup copies grafana.db with its
    sha256 (equal to the file's in the container, verified on disk and by SQLite's integrity
    check; open_backup checks it again); the grafana container and its named volume removed,
    the service started again empty (neither the dashboard nor the user is there);
    restore_backup puts the database back: the dashboard and the user are back through the API,
    and grafana.db in the volume has the backup's sha256 (the stand-in writes nothing at a start
    that changes nothing, see test_serving_images.py)."""
    dashboard = {"uid": "ops-made-in-ui", "title": "Made by an operator", "panels": []}
    status, body = site.api("POST", "/api/dashboards/db", {"dashboard": dashboard})
    assert status == 200, body
    user = {"login": "oncall", "email": "oncall@example.internal", "password": "Oncall-1b4c"}
    status, body = site.api("POST", "/api/admin/users", user)
    assert status == 200, body
    live = site.db_sha256()

    environment = site.environment
    backup = take_backup(
        environment, HOST, host_holdings(environment, HOST), keep_prometheus=False, say=print
    )
    assert set(backup.files) == {GRAFANA_DB}, "Prometheus is kept only on request"
    entry = backup.files[GRAFANA_DB]
    saved = backup.directory / GRAFANA_DB
    assert entry["sha256"] == live == hashlib.sha256(saved.read_bytes()).hexdigest()
    assert entry["bytes"] == saved.stat().st_size
    assert "SQLite integrity_check ok" in entry["verified"]
    assert backup.directory.parent == site.backups
    assert open_backup(backup.directory).files == backup.files

    container = site.grafana()
    mounts = json.loads(site.sh(f"docker inspect --format '{{{{json .Mounts}}}}' {container}"))
    (volume,) = [m["Name"] for m in mounts if m["Destination"] == "/var/lib/grafana"]
    site.compose("rm", "--stop", "--force", "grafana")
    site.sh(f"docker volume rm {volume}")
    assert volume not in site.sh("docker volume ls --quiet").split()
    site.compose("up", "--detach", "--no-deps", "grafana")
    site.wait_healthy()
    assert site.api("GET", f"/api/dashboards/uid/{dashboard['uid']}")[0] == 404
    assert site.api("GET", "/api/users/lookup?loginOrEmail=oncall")[0] == 404
    assert site.db_sha256() != entry["sha256"]

    restored = restore_backup(environment, HOST, backup, say=print)
    assert restored == [GRAFANA_DB]
    site.wait_healthy()
    status, body = site.api("GET", f"/api/dashboards/uid/{dashboard['uid']}")
    assert status == 200, body
    assert body["dashboard"]["title"] == "Made by an operator"
    status, body = site.api("GET", "/api/users/lookup?loginOrEmail=oncall")
    assert status == 200, body
    assert body["email"] == "oncall@example.internal"
    assert site.db_sha256() == entry["sha256"]
    assert site.in_grafana(f"stat -c %u {GRAFANA_DB_PATH}").strip() == "472"
    leftovers = site.in_grafana(f"ls {GRAFANA_DB_PATH}.restored", check=False)
    assert leftovers == "", "the staged copy is moved, not left beside the database"


def test_prometheus_history_is_kept_only_on_request_and_comes_back(site: GrafanaSite) -> None:
    """Prometheus (Debian's, in the stand-in image) scrapes itself every 2 s into its named
    volume. `gpufleet rebuild` as a process, without --keep-prometheus: the check step says the
    history's size (what `du -sb` finds in the container) and that it is not kept, before the
    backup starts; the backup (grafana.db only) is taken and verified and the rebuild waits at
    the replace step for the operator (a static host still offering its known key: exit 2,
    nothing destroyed), Prometheus never stopped. The same command again with
    --keep-prometheus: the backup it would reuse lacks the history, so a new one is taken with
    prometheus.tar (its sha256 checked again by open_backup; Prometheus stopped while it is
    read, and running again after). The container and its volume removed, Prometheus started
    again empty (none of the samples); restore_backup puts the history back: the very samples
    of `up` queried before, at the same timestamp, through Prometheus's API."""
    deadline = time.monotonic() + _HEALTH_TIMEOUT_S
    # 5 s in the past: every scrape before it is in the TSDB (a scrape times out within 2 s).
    at = time.time() - 5
    while len(samples := site.up_samples(at)) < 3:
        assert time.monotonic() < deadline, f"Prometheus scraped itself {len(samples)} time(s)"
        time.sleep(2)
        at = time.time() - 5
    assert {value for _, value in samples} == {"1"}
    started = site.sh(f"docker inspect --format '{{{{.State.StartedAt}}}}' {site.prometheus()}")
    state_file = site.project / "build" / SITE / "rebuild" / f"{HOST}.json"
    try:
        run = _gpufleet(site.project, "rebuild", "--stack", SITE, "--host", HOST, "--json")
        report = json.loads(run.stdout)
        assert run.returncode == 2, run.stderr
        assert [(step["step"], step["status"]) for step in report["steps"]] == [
            ("check", "ok"),
            ("backup", "ok"),
            ("replace", "waiting"),
        ], run.stderr
        size = report["steps"][0]["details"]["prometheus_bytes"]
        assert isinstance(size, int)
        assert size > 0
        said = f"Prometheus history on {HOST}: {size / 2**20:.1f} MiB, not kept; pass --keep"
        assert said in run.stderr
        assert run.stderr.index(said) < run.stderr.index(f"[backup] {HOST}: started")
        first = report["steps"][1]["details"]
        assert set(first["files"]) == {GRAFANA_DB}, "Prometheus is kept only on request"
        now = site.sh(f"docker inspect --format '{{{{.State.StartedAt}}}}' {site.prometheus()}")
        assert now == started, "Prometheus was stopped although its history was not kept"

        run = _gpufleet(
            site.project, "rebuild", "--stack", SITE, "--host", HOST, "--keep-prometheus", "--json"
        )
        report = json.loads(run.stdout)
        assert run.returncode == 2, run.stderr
        assert [(step["step"], step["status"]) for step in report["steps"]] == [
            ("check", "ok"),
            ("backup", "ok"),
            ("replace", "waiting"),
        ], run.stderr
        assert "MiB, kept (--keep-prometheus)" in run.stderr
        assert "lacks Prometheus' history" in run.stderr
        second = report["steps"][1]["details"]
        assert second["reused"] is False
        assert second["id"] != first["id"]
        assert set(second["files"]) == {GRAFANA_DB, PROMETHEUS_TAR}
        assert Path(first["directory"]).is_dir(), "a backup is never overwritten"
        backup = open_backup(Path(second["directory"]))
        entry = backup.files[PROMETHEUS_TAR]
        saved = backup.directory / PROMETHEUS_TAR
        assert entry["sha256"] == hashlib.sha256(saved.read_bytes()).hexdigest()
        assert "file(s) in the tar match the host's sha256" in entry["verified"]
        kept = tar_hashes(saved)
        assert any(name.startswith("wal/") for name in kept), sorted(kept)
        site.wait_prometheus()
        assert site.up_samples(at) == samples, "the restarted Prometheus lost samples"

        container = site.prometheus()
        mounts = json.loads(site.sh(f"docker inspect --format '{{{{json .Mounts}}}}' {container}"))
        (volume,) = [m["Name"] for m in mounts if m["Destination"] == "/prometheus"]
        assert volume.endswith("prometheus-data")
        site.compose("rm", "--stop", "--force", "prometheus")
        site.sh(f"docker volume rm {volume}")
        site.compose("up", "--detach", "--no-deps", "prometheus")
        site.wait_prometheus()
        assert site.up_samples(at) == []

        restored = restore_backup(site.environment, HOST, backup, say=print)
        assert restored == [GRAFANA_DB, PROMETHEUS_TAR]
        site.wait_prometheus()
        site.wait_healthy()
        assert site.up_samples(at) == samples
    finally:
        state_file.unlink(missing_ok=True)
        shutil.rmtree(site.backups, ignore_errors=True)


def test_the_backup_check_names_what_sqlite_finds_wrong(tmp_path: Path) -> None:
    """The check the backup runs on a copied grafana.db (no host: files written here, read by
    this machine's SQLite): a sound database is "ok"; one with a page overwritten, and a file
    that is not a database at all, are not, and the answer says why instead of raising."""
    path = tmp_path / "grafana.db"
    with contextlib.closing(sqlite3.connect(path)) as database, database:
        database.execute("CREATE TABLE dashboard (id INTEGER PRIMARY KEY, data TEXT)")
        database.executemany(
            "INSERT INTO dashboard (data) VALUES (?)", [(f"panel {n} " * 40,) for n in range(400)]
        )
        database.execute("CREATE INDEX dashboard_data ON dashboard (data)")
    assert _sqlite_integrity(path) == "ok"

    damaged = tmp_path / "damaged.db"
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 8 * page
    data[5 * page : 6 * page] = bytes(range(256)) * (page // 256)  # page 6: no b-tree page
    damaged.write_bytes(bytes(data))
    assert _sqlite_integrity(damaged) not in ("ok", "")

    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(os.urandom(8 * page))
    assert _sqlite_integrity(garbage) == "file is not a database"
