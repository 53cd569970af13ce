"""The stand-in serving images (tests/serving_images.py) honour what the compose file relies on.

What is real: the Docker engine, the images built from Debian packages and PyPI wheels, Triton
2.51 from the nvidia-pytriton wheel serving a python-backend model as uid 1000, Postgres 15
initialised by the entrypoint and reached over TCP with scram-sha-256 by the host's ``psql``,
an MLflow 3.17.2 server with that Postgres as its backend store over a user-defined Docker
network, Prometheus serving its HTTP API as nobody, the Grafana stand-in run with the generated
stack's grafana service (environment, env file, provisioning mounts, health check) as 472 with
its SQLite database in a volume. Every port is published on 127.0.0.1 only.
What is not: these are not the official images (see tests/serving_images.py; Grafana's is a
Python stand-in over SQLite with a small part of its API); no GPU.

Every container and network is named gpufleet-test-* and removed after its test, with the
containers' anonymous volumes.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import secrets
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from generators.serving_stack.grafana import (
    DASHBOARD_FILE,
    DASHBOARD_UID,
    DATASOURCE_UID,
    render_grafana_files,
)
from generators.serving_stack.graph import Service, build_service_graph
from gpufleet.spec.stack import StackSpec
from tests.docker_hosts import NAME_PREFIX, DockerEngine
from tests.serving_images import RECIPES, ServingImages
from validation.loopback import LOOPBACK

_READY_TIMEOUT_S = 120.0


def _unique(hint: str) -> str:
    return f"{NAME_PREFIX}{hint}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def _container(engine: DockerEngine, hint: str, *run_args: str) -> Iterator[str]:
    """`docker run --detach` with `run_args` (options, image, command); removed afterwards with
    its anonymous volumes."""
    name = _unique(hint)
    try:
        engine.docker("run", "--detach", "--name", name, *run_args)
        yield name
    finally:
        engine.docker("rm", "--force", "--volumes", name, check=False)


@contextlib.contextmanager
def _network(engine: DockerEngine) -> Iterator[str]:
    name = _unique("net")
    engine.docker("network", "create", name)
    try:
        yield name
    finally:
        engine.docker("network", "rm", name, check=False)


def _published_port(engine: DockerEngine, name: str, port: str) -> int:
    lines = engine.docker("port", name, port).stdout.split()
    ports = [int(line.rsplit(":", 1)[1]) for line in lines if line.startswith(f"{LOOPBACK}:")]
    assert len(lines) == 1, f"{name} publishes {port} as {lines}"
    assert len(ports) == 1, f"{name} publishes {port} as {lines}, not on {LOOPBACK}"
    return ports[0]


def _logs(engine: DockerEngine, name: str) -> str:
    logs = engine.docker("logs", name, check=False)
    return logs.stdout + logs.stderr


def _http(
    method: str,
    url: str,
    body: object = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 10.0,
) -> tuple[int, bytes]:
    """One request straight to a loopback port (no proxy from the environment)."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or LOOPBACK, parts.port, timeout_s)
    headers = dict(headers or {})
    data: bytes | None = None
    if isinstance(body, bytes):
        data = body
        headers.setdefault("Content-Type", "application/octet-stream")
    elif body is not None:
        data = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    try:
        connection.request(method, f"{parts.path}?{parts.query}", data, headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _wait_until(engine: DockerEngine, name: str, what: str, ready: Callable[[], bool]) -> None:
    """Poll `ready()` until it is true; fail with the container's logs if it stops or times out."""
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while True:
        state = engine.docker("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
        if state != "running":
            pytest.fail(f"{name} is {state}, not {what}; its logs:\n{_logs(engine, name)[-4000:]}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if ready():
                return
        if time.monotonic() > deadline:
            pytest.fail(
                f"{name} not {what} in {_READY_TIMEOUT_S:g} s:\n{_logs(engine, name)[-4000:]}"
            )
        time.sleep(0.5)


def _http_ok(url: str) -> Callable[[], bool]:
    return lambda: _http("GET", url, timeout_s=2.0)[0] == 200


def _uids(engine: DockerEngine, name: str) -> dict[str, set[int]]:
    """The uids each command in the container runs as (docker exec's own ps left out)."""
    ps = engine.docker("exec", name, "ps", "-eo", "uid=,comm=").stdout
    uids: dict[str, set[int]] = {}
    for line in ps.splitlines():
        uid, command = line.split(None, 1)
        if command != "ps":
            uids.setdefault(command, set()).add(int(uid))
    return uids


def _image_config(engine: DockerEngine, tag: str) -> dict[str, Any]:
    inspect = engine.docker("image", "inspect", "--format", "{{json .Config}}", tag)
    config: dict[str, Any] = json.loads(inspect.stdout)
    return config


def test_tags_name_the_recipe_and_its_base() -> None:
    for recipe in RECIPES:
        tag = recipe.tag("base:1")
        assert tag == f"gpufleet-test/{recipe.name}:{recipe.recipe_hash('base:1')}"
        assert recipe.tag("base:2") != tag, "the base image's tag is part of the hash"
        assert recipe.dockerfile_text("base:1").startswith("FROM base:1")


# --- Triton ------------------------------------------------------------------------------------

_ADD_ONE_CONFIG = """\
name: "add_one"
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
_ADD_ONE_MODEL = """\
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            uid = np.full(x.shape, os.getuid(), dtype=np.float32)
            outputs = [pb_utils.Tensor("OUTPUT0", (x + uid).astype(np.float32))]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses
"""


def test_tritonserver_serves_a_python_backend_model_as_uid_1000(
    docker_engine: DockerEngine, serving_images: ServingImages, tmp_path: Path
) -> None:
    """NVIDIA's command line (`tritonserver --model-repository=/models ...`, no backend flags)
    loads a numpy python-backend model from a read-only bind mount; the server and the python
    backend stub run as uid 1000, and the model's answer proves which uid executed it."""
    import tritonclient.http as triton_http

    repository = tmp_path / "models"
    (repository / "add_one" / "1").mkdir(parents=True)
    (repository / "add_one" / "config.pbtxt").write_text(_ADD_ONE_CONFIG)
    (repository / "add_one" / "1" / "model.py").write_text(_ADD_ONE_MODEL)
    for path in [repository, *repository.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # readable by uid 1000 in the container

    config = _image_config(docker_engine, serving_images.tritonserver)
    assert config["User"] == "1000"
    assert {"8000/tcp", "8001/tcp", "8002/tcp"} <= set(config["ExposedPorts"])
    command = ["tritonserver", "--model-repository=/models", "--model-control-mode=explicit"]
    command += ["--load-model=*"]
    with _container(
        docker_engine,
        "triton",
        *("--shm-size", "256m", "--volume", f"{repository}:/models:ro"),
        *("--publish", f"{LOOPBACK}::8000", "--publish", f"{LOOPBACK}::8002"),
        serving_images.tritonserver,
        *command,
    ) as name:
        http_port = _published_port(docker_engine, name, "8000/tcp")
        base = f"http://{LOOPBACK}:{http_port}"
        _wait_until(docker_engine, name, "ready", _http_ok(f"{base}/v2/health/ready"))

        client = triton_http.InferenceServerClient(f"{LOOPBACK}:{http_port}")
        request = triton_http.InferInput("INPUT0", [1, 4], "FP32")
        request.set_data_from_numpy(np.arange(4, dtype=np.float32).reshape(1, 4))
        answer = client.infer("add_one", [request]).as_numpy("OUTPUT0")
        np.testing.assert_array_equal(answer, [[1000.0, 1001.0, 1002.0, 1003.0]])

        uids = _uids(docker_engine, name)
        assert uids["tritonserver"] == {1000}
        assert uids["triton_python_b"] == {1000}  # ps shows 15 characters of the stub's name
        metrics_port = _published_port(docker_engine, name, "8002/tcp")
        status, metrics = _http("GET", f"http://{LOOPBACK}:{metrics_port}/metrics")
        assert status == 200
        assert b'nv_inference_request_success{model="add_one"' in metrics


# --- Postgres ----------------------------------------------------------------------------------


def _psql(
    port: int, user: str, password: str, database: str, sql: str
) -> subprocess.CompletedProcess[str]:
    """The host's psql over TCP to 127.0.0.1 (so scram-sha-256, not the socket's trust)."""
    env = {**os.environ, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10"}
    argv = ["psql", "--no-psqlrc", "--quiet", "-v", "ON_ERROR_STOP=1", "-tA", "-c", sql]
    argv += [f"host={LOOPBACK} port={port} user={user} dbname={database} sslmode=disable"]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)


def _pg_ready(engine: DockerEngine, name: str, user: str, database: str) -> Callable[[], bool]:
    """The compose health check, run in the container."""
    check = ("exec", name, "pg_isready", "-U", user, "-d", database)
    return lambda: engine.docker(*check, check=False).returncode == 0


def test_postgres_initialises_from_env_and_keeps_data_across_a_restart(
    docker_engine: DockerEngine, serving_images: ServingImages
) -> None:
    """POSTGRES_USER/PASSWORD/DB make the role and database; a password login over TCP works, a
    wrong password is refused, the data survives `docker restart`, the password is not logged,
    and the server runs as the postgres user (999, as in the official image)."""
    password = secrets.token_urlsafe(18)
    environment = ["--env", "POSTGRES_USER=gpufleet", "--env", f"POSTGRES_PASSWORD={password}"]
    environment += ["--env", "POSTGRES_DB=registry"]
    with _container(
        docker_engine,
        "postgres",
        *environment,
        *("--publish", f"{LOOPBACK}::5432", serving_images.postgres),
    ) as name:
        port = _published_port(docker_engine, name, "5432/tcp")
        ready = _pg_ready(docker_engine, name, "gpufleet", "registry")
        _wait_until(docker_engine, name, "ready", ready)

        created = _psql(
            port,
            "gpufleet",
            password,
            "registry",
            "CREATE TABLE kept (x int); "
            "INSERT INTO kept VALUES (42); SELECT current_user, current_database()",
        )
        assert created.returncode == 0, created.stderr
        assert created.stdout.split() == ["gpufleet|registry"]
        wrong = _psql(port, "gpufleet", password + "x", "registry", "SELECT 1")
        assert wrong.returncode != 0
        assert 'password authentication failed for user "gpufleet"' in wrong.stderr
        assert _uids(docker_engine, name)["postgres"] == {999}

        docker_engine.docker("restart", name, timeout=120)
        port = _published_port(docker_engine, name, "5432/tcp")  # a new one after the restart
        _wait_until(docker_engine, name, "ready after the restart", ready)
        kept = _psql(port, "gpufleet", password, "registry", "SELECT x FROM kept")
        assert kept.returncode == 0, kept.stderr
        assert kept.stdout.split() == ["42"]

        logs = _logs(docker_engine, name)
        assert logs.count("PostgreSQL init process complete") == 1, "initialised only once"
        assert password not in logs


def test_postgres_refuses_to_initialise_without_a_password(
    docker_engine: DockerEngine, serving_images: ServingImages
) -> None:
    """Like the official image: no POSTGRES_PASSWORD (and no trust) is an error, not an open
    database."""
    run = ("run", "--rm", "--name", _unique("postgres-nopw"), serving_images.postgres)
    refused = docker_engine.docker(*run, check=False, timeout=60)
    assert refused.returncode == 1
    assert "superuser password is not specified" in refused.stderr


# --- MLflow ------------------------------------------------------------------------------------


def test_mlflow_server_keeps_experiments_in_postgres(
    docker_engine: DockerEngine, serving_images: ServingImages
) -> None:
    """`mlflow server --host 0.0.0.0 --port 5000` as uid 1000, configured only through the
    environment (MLFLOW_BACKEND_STORE_URI to the postgres container on a user-defined network,
    MLFLOW_ARTIFACTS_DESTINATION, MLFLOW_WORKERS, MLFLOW_SERVER_ALLOWED_HOSTS), answers /health, creates an experiment over
    the REST API that is then a row in Postgres, and stores a proxied artifact in
    /mlflow/artifacts."""
    password = secrets.token_urlsafe(18)
    with (
        _network(docker_engine) as network,
        _container(
            docker_engine,
            "mlflow-db",
            *("--network", network, "--network-alias", "postgres"),
            *("--env", "POSTGRES_USER=mlflow", "--env", f"POSTGRES_PASSWORD={password}"),
            serving_images.postgres,
        ) as database,
    ):
        _wait_until(
            docker_engine, database, "ready", _pg_ready(docker_engine, database, "mlflow", "mlflow")
        )
        # +psycopg2: SQLAlchemy 2.1 (what mlflow 3.17.2 gets) reads a bare postgresql:// as
        # psycopg 3, which neither this image nor an MLflow image plus psycopg2 has.
        store = f"postgresql+psycopg2://mlflow:{password}@postgres:5432/mlflow"
        environment = {
            "MLFLOW_BACKEND_STORE_URI": store,
            "MLFLOW_ARTIFACTS_DESTINATION": "/mlflow/artifacts",
            "MLFLOW_WORKERS": "1",
            # Other containers reach it as mlflow:5000; MLflow 3 refuses Host headers other than
            # localhost and private addresses unless they are listed.
            "MLFLOW_SERVER_ALLOWED_HOSTS": "mlflow:5000,127.0.0.1:*",
        }
        with _container(
            docker_engine,
            "mlflow",
            *("--network", network, "--publish", f"{LOOPBACK}::5000"),
            *(arg for key, value in environment.items() for arg in ("--env", f"{key}={value}")),
            serving_images.mlflow,
            *("mlflow", "server", "--host", "0.0.0.0", "--port", "5000"),  # noqa: S104
        ) as name:
            base = f"http://{LOOPBACK}:{_published_port(docker_engine, name, '5000/tcp')}"
            _wait_until(docker_engine, name, "healthy", _http_ok(f"{base}/health"))
            uids = _uids(docker_engine, name)
            assert "mlflow" in uids
            assert set().union(*uids.values()) == {1000}, uids

            experiment = f"images-{uuid.uuid4().hex[:8]}"
            create = f"{base}/api/2.0/mlflow/experiments/create"
            status, body = _http("POST", create, {"name": experiment})
            assert status == 200, body
            experiment_id = json.loads(body)["experiment_id"]
            status, _ = _http("POST", create, {"name": "other"}, {"Host": "elsewhere:5000"})
            assert status == 403, "a Host header not in MLFLOW_SERVER_ALLOWED_HOSTS is refused"
            search = f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}"
            status, body = _http("GET", search, headers={"Host": "mlflow:5000"})
            assert status == 200, body
            assert json.loads(body)["experiment"]["experiment_id"] == experiment_id
            rows = docker_engine.docker(
                *("exec", database, "psql", "-U", "mlflow", "-d", "mlflow", "-tA", "-c"),
                f"SELECT name FROM experiments WHERE experiment_id = {int(experiment_id)}",  # noqa: S608
            )
            assert rows.stdout.split() == [experiment]

            artifact = f"{experiment_id}/probe/hello.txt"
            url = f"{base}/api/2.0/mlflow-artifacts/artifacts/{artifact}"
            status, body = _http("PUT", url, b"hello from the test")
            assert status == 200, body
            stored = docker_engine.docker(
                "exec", name, "stat", "-c", "%u %s", f"/mlflow/artifacts/{artifact}"
            )
            assert stored.stdout.split() == ["1000", str(len(b"hello from the test"))]
            assert password not in _logs(docker_engine, name)


# --- Prometheus --------------------------------------------------------------------------------


def test_prometheus_is_ready_as_nobody(
    docker_engine: DockerEngine, serving_images: ServingImages
) -> None:
    """The official image's ENTRYPOINT and CMD, USER 65534, a writable /prometheus; promtool and
    wget (for a health check) in the image."""
    config = _image_config(docker_engine, serving_images.prometheus)
    assert config["Entrypoint"] == ["/usr/bin/prometheus"]
    assert config["Cmd"] == [
        "--config.file=/etc/prometheus/prometheus.yml",
        "--storage.tsdb.path=/prometheus",
    ]
    assert config["User"] == "65534"
    with _container(
        docker_engine,
        "prometheus",
        *("--publish", f"{LOOPBACK}::9090", serving_images.prometheus),
    ) as name:
        base = f"http://{LOOPBACK}:{_published_port(docker_engine, name, '9090/tcp')}"
        _wait_until(docker_engine, name, "ready", _http_ok(f"{base}/-/ready"))
        assert _uids(docker_engine, name)["prometheus"] == {65534}
        healthy = ("exec", name, "wget", "-q", "-O-", "http://localhost:9090/-/healthy")
        assert docker_engine.docker(*healthy).returncode == 0
        check = ("exec", name, "promtool", "check", "config", "/etc/prometheus/prometheus.yml")
        assert docker_engine.docker(*check).returncode == 0
        written = docker_engine.docker("exec", name, "ls", "/prometheus").stdout.split()
        assert "wal" in written  # the TSDB lives in /prometheus


# --- Grafana -----------------------------------------------------------------------------------


def _grafana_service() -> tuple[Service, dict[str, str]]:
    """The grafana service of a generated stack and its provisioning files (paths relative to
    the stack's ./grafana), as `gpufleet generate --stack` renders them."""
    spec = StackSpec.model_validate(
        {
            "environment": "static",
            "hosts": [{"name": "h", "address": "10.0.0.9"}],
            "serving": {},
            "registry": {"tracking_uri": "https://mlflow.example.internal"},
        }
    )
    graph = build_service_graph("images", spec, spec.hosts[0], [])
    return graph.service("grafana"), render_grafana_files(graph, header="")


def test_grafana_keeps_its_state_in_sqlite_as_uid_472(
    docker_engine: DockerEngine, serving_images: ServingImages, tmp_path: Path
) -> None:
    """The generated stack's grafana service (its GF_* environment, the admin password from an
    env file, the generated provisioning and dashboard files mounted read-only, a volume at
    /var/lib/grafana) on the stand-in: /api/health says the database is ok, the compose health
    check (wget) passes, the server runs as 472 and keeps grafana.db (owned by 472) in the volume;
    the provisioned datasource and dashboard are in the database; the admin logs in with the
    password from the env file (a wrong one is refused, and it is in no log); a dashboard saved
    through the API survives `docker restart`, and a start that changes nothing rewrites nothing
    (grafana.db's sha256 is the same after it)."""
    service, files = _grafana_service()
    for relative, text in files.items():
        path = tmp_path / "grafana" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o644)
    for directory in [tmp_path / "grafana", *(tmp_path / "grafana").rglob("*")]:
        if directory.is_dir():
            directory.chmod(0o755)
    password = secrets.token_urlsafe(18)
    env_file = tmp_path / "grafana.env"
    env_file.write_text(f"GF_SECURITY_ADMIN_PASSWORD={password}\n")
    mounts = []
    for mount in service.mounts:
        if mount.is_named_volume:
            mounts += ["--volume", mount.target]  # anonymous: removed with the container
        else:
            source = tmp_path / "grafana" / Path(mount.source).relative_to("grafana")
            mounts += ["--volume", f"{source}:{mount.target}:ro"]
    config = _image_config(docker_engine, serving_images.grafana)
    assert config["User"] == "472"
    assert "3000/tcp" in config["ExposedPorts"]
    assert config["Entrypoint"] == ["/run.sh"]
    environment = [
        arg for key, value in service.environment.items() for arg in ("--env", f"{key}={value}")
    ]
    with _container(
        docker_engine,
        "grafana",
        *environment,
        *("--env-file", str(env_file), *mounts),
        *("--publish", f"{LOOPBACK}::3000", serving_images.grafana),
    ) as name:
        base = f"http://{LOOPBACK}:{_published_port(docker_engine, name, '3000/tcp')}"
        _wait_until(docker_engine, name, "healthy", _http_ok(f"{base}/api/health"))
        status, body = _http("GET", f"{base}/api/health")
        assert json.loads(body)["database"] == "ok"
        assert service.healthcheck is not None
        probe = docker_engine.docker("exec", name, *service.healthcheck.command, check=False)
        assert probe.returncode == 0, probe.stderr
        assert _uids(docker_engine, name)["python3"] == {472}
        stat = ("exec", name, "stat", "-c", "%u %F", "/var/lib/grafana/grafana.db")
        assert docker_engine.docker(*stat).stdout.split(maxsplit=1) == ["472", "regular file\n"]

        admin = {
            "Authorization": "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()
        }
        wrong = {"Authorization": "Basic " + base64.b64encode(b"admin:admin").decode()}
        status, _ = _http("GET", f"{base}/api/search", headers=wrong)
        assert status == 401
        status, body = _http("GET", f"{base}/api/dashboards/uid/{DASHBOARD_UID}", headers=admin)
        assert status == 200, body
        provisioned = json.loads(body)
        assert provisioned["meta"]["provisioned"] is True
        assert provisioned["dashboard"]["title"] == json.loads(files[DASHBOARD_FILE])["title"]
        status, body = _http("GET", f"{base}/api/datasources/uid/{DATASOURCE_UID}", headers=admin)
        assert status == 200, body
        assert json.loads(body)["url"] == "http://prometheus:9090"

        made = {"dashboard": {"uid": "made-in-ui", "title": "Made in the UI"}, "overwrite": False}
        status, body = _http("POST", f"{base}/api/dashboards/db", made, headers=admin)
        assert status == 200, body
        checksum = ("exec", name, "sha256sum", "/var/lib/grafana/grafana.db")
        before = docker_engine.docker(*checksum).stdout.split()[0]
        docker_engine.docker("restart", name, timeout=120)
        base = f"http://{LOOPBACK}:{_published_port(docker_engine, name, '3000/tcp')}"
        _wait_until(
            docker_engine, name, "healthy after the restart", _http_ok(f"{base}/api/health")
        )
        status, body = _http("GET", f"{base}/api/dashboards/uid/made-in-ui", headers=admin)
        assert status == 200, body
        assert json.loads(body)["dashboard"]["title"] == "Made in the UI"
        assert docker_engine.docker(*checksum).stdout.split()[0] == before
        logs = _logs(docker_engine, name)
        assert logs.count("created the admin user") == 1, (
            "the admin is made at the first start only"
        )
        assert password not in logs
