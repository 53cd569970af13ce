"""The generated serving stack, deployed by the serving_stack role and run on a Docker engine.

Real: `gpufleet generate --stack` as a process, rendering a static stack (one host on
127.0.0.1) with a python-backend model; the inventory generator; ansible-playbook running the
serving_stack role (local connection: this machine is the host) twice, the second run
reporting changed=0; Debian's docker-compose against the tests' dockerd; Triton, MLflow,
Postgres and Prometheus containers talking over the stack's internal network; MLflow's own
basic-auth app refusing requests without a login and MLflow's Python client logging in with
MLFLOW_TRACKING_USERNAME/PASSWORD; every check through ports published on 127.0.0.1; Triton's
main process killed with SIGKILL during a load test and brought back by the restart policy. Not real: the images are the local stand-ins of
tests/serving_images.py (built here from Debian packages and PyPI wheels; no registry can be
reached), so Triton is 2.51 on the CPU, and Grafana is left out of this run (no package of it
can be installed here: tests/test_serving_monitoring.py checks its dashboard query by query).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from tritonclient.utils import InferenceServerException

from generators.registry_repository import LINEAGE_FILE
from gpufleet.spec.loading import load_stack_spec
from gpufleet.spec.model import Objectives
from gpufleet.spec.registry import registry_tracking_uri
from gpufleet.spec.stack import LoadGateSettings
from tests.conftest import snapshot
from tests.docker_hosts import CommandFailed, DockerEngine
from tests.serving_deploy import (
    GPUFLEET,
    HOST,
    MLFLOW_ADMIN,
    PROJECT,
    SECRETS,
    STACK,
    DeployedStack,
    prepare_stack,
)
from tests.serving_images import ServingImages
from tests.serving_models import FEATURES, MODEL_NAME, write_affine_model
from validation.load import LoadTarget, run_load_gate

ADMIN_HEADER = "triton-admin-key"
# What the registry step writes beside a version's files; the role only checks it is there.
LINEAGE = json.dumps({"format": "gpufleet.lineage/v1"})


@dataclass
class Deployment:
    stack: DeployedStack
    runs: list[str]  # ansible-playbook's output of the first and the second converge


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory,
    docker_engine: DockerEngine,
    serving_images: ServingImages,
) -> Iterator[Deployment]:
    stack = prepare_stack(tmp_path_factory.mktemp("serving-run"), docker_engine, serving_images)
    try:
        runs = [stack.converge(), stack.converge()]
        yield Deployment(stack, runs)
    finally:
        stack.down()


@pytest.fixture
def deployed_stack(deployment: Deployment) -> DeployedStack:
    return deployment.stack


def changed_tasks(output: str) -> list[str]:
    """Names of the tasks that reported `changed` for the host, in order."""
    changed, task = [], ""
    for line in output.splitlines():
        if line.startswith("TASK [") and " : " in line:  # TASK [role : name] ****
            task = line[line.index(" : ") + 3 : line.rindex("]")]
        elif line.startswith(f"changed: [{HOST}]") and task not in changed:
            changed.append(task)
    return changed


def recap(output: str) -> dict[str, int]:
    line = next(line for line in output.splitlines() if line.startswith(HOST) and "ok=" in line)
    return {key: int(value) for key, value in (part.split("=") for part in line.split()[2:])}


def infer_http(url: str, batch: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    client = httpclient.InferenceServerClient(url)
    tensor = httpclient.InferInput("INPUT0", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    output = client.infer(MODEL_NAME, [tensor]).as_numpy("OUTPUT0")
    assert output is not None
    return output


def http_status(
    url: str, method: str = "GET", headers: dict[str, str] | None = None, timeout: float = 5
) -> int:
    data = None if method == "GET" else b"{}"
    request = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def prometheus_query(stack: DeployedStack, expr: str) -> list[dict[str, Any]]:
    url = f"http://{stack.url('prometheus')}/api/v1/query?" + urllib.parse.urlencode(
        {"query": expr}
    )
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.loads(response.read())
    result = body["data"]["result"]
    assert isinstance(result, list)
    return result


def test_the_role_converges_the_stack_and_a_second_run_changes_nothing(
    deployment: Deployment,
) -> None:
    deployed_stack = deployment.stack
    first, second = (recap(output) for output in deployment.runs)
    assert first["failed"] == 0
    assert changed_tasks(deployment.runs[0]) == [
        "Create the stack directory",
        "Copy the generated stack files",
        "Copy the model repository",
        "Write each service's env file with its secrets",
        "Bring the stack up (compose creates or recreates only what changed)",
    ], "nothing is restarted right after compose created it"
    assert second["changed"] == 0, deployment.runs[1][-3000:]
    assert second["failed"] == 0
    assert "Triton is ready" in deployment.runs[1]
    state = {
        service: deployed_stack.inspect(service)["State"]["Status"]
        for service in ("triton", "postgres", "mlflow", "prometheus")
    }
    assert state == dict.fromkeys(state, "running")


def test_a_changed_rule_and_a_model_no_longer_served_reach_the_host(
    deployment: Deployment,
) -> None:
    """A spec change that only touches mounted files (an alert threshold), and on the host a
    model and a version that gpufleet deployed for an earlier spec (each with its lineage
    manifest) and a version directory someone else put there (none): the role removes what
    gpufleet wrote and is no longer served, keeps the other, restarts the services that read
    the changed files (Triton, Prometheus), and nothing else."""
    stack = deployment.stack
    stack_file = stack.project / "stacks" / f"Pulumi.{STACK}.yaml"
    document = yaml.safe_load(stack_file.read_text())
    document["config"]["gpufleet:serving"]["monitoring"]["alerts"] = {"queue_time_ms": 250}
    stack_file.write_text(yaml.safe_dump(document))
    generate = subprocess.run(
        [str(GPUFLEET), "generate", "--stack", STACK],
        cwd=stack.project,
        capture_output=True,
        text=True,
        check=False,
    )
    assert generate.returncode == 0, generate.stdout + generate.stderr
    host_repository = stack.deployed / "model_repository"
    write_affine_model(host_repository, name="retired_model")
    (host_repository / "retired_model" / "1" / LINEAGE_FILE).write_text(LINEAGE)
    retired_version = host_repository / MODEL_NAME / "2"
    retired_version.mkdir()
    shutil.copy(host_repository / MODEL_NAME / "1" / "model.py", retired_version)
    (retired_version / LINEAGE_FILE).write_text(LINEAGE)
    operators_version = host_repository / MODEL_NAME / "3"  # no manifest: not gpufleet's
    operators_version.mkdir()
    shutil.copy(host_repository / MODEL_NAME / "1" / "model.py", operators_version)
    # A rule file an earlier spec generated (listed in the host's manifest), and a manifest
    # entry pointing outside the stack directory, which must be left alone.
    manifest = stack.deployed / ".gpufleet-generated.json"
    old_rules = stack.deployed / "prometheus" / "rules" / "retired.rules.yml"
    old_rules.write_text("groups: []\n")
    outside = stack.deployed.parent / "not-generated.txt"
    outside.write_text("keep me\n")
    listed = json.loads(manifest.read_text())
    # An env file of a service this host does not run (Grafana is off here): it must go.
    stale_secrets = stack.deployed / "secrets" / "grafana.env"
    stale_secrets.write_text("GF_SECURITY_ADMIN_PASSWORD=old\n")
    manifest.write_text(
        json.dumps([*listed, "prometheus/rules/retired.rules.yml", "../not-generated.txt"])
    )
    started = {
        service: stack.inspect(service)["State"]["StartedAt"]
        for service in ("triton", "prometheus", "postgres", "mlflow")
    }
    output = stack.converge()
    assert recap(output)["failed"] == 0
    assert not (host_repository / "retired_model").exists()
    assert not retired_version.exists()
    assert (operators_version / "model.py").is_file()
    assert f"no longer served: {MODEL_NAME}/3. They have no gpufleet-lineage.json" in output
    assert not old_rules.exists()
    assert not stale_secrets.exists()
    assert sorted(path.name for path in (stack.deployed / "secrets").iterdir()) == [
        "mlflow.env",
        "postgres.env",
        "triton.env",
    ]
    assert outside.read_text() == "keep me\n"
    restarted = {
        service
        for service, at in started.items()
        if stack.inspect(service)["State"]["StartedAt"] != at
    }
    assert restarted == {"triton", "prometheus"}
    index = urllib.request.Request(
        f"http://{stack.url('http')}/v2/repository/index",
        method="POST",
        data=b"{}",
        headers={ADMIN_HEADER: SECRETS["GPUFLEET_TRITON_ADMIN_KEY"]},
    )
    with urllib.request.urlopen(index, timeout=10) as answer:
        assert [model["name"] for model in json.loads(answer.read())] == [MODEL_NAME]
    deadline = time.monotonic() + 60
    while True:
        try:
            rules = prometheus_rules(stack)
        except OSError:
            rules = {}
        if "> 250" in rules.get("TritonQueueTimeHigh", ""):
            break
        assert time.monotonic() < deadline, f"Prometheus still has {rules}"
        time.sleep(1)


def test_a_controller_without_versions_is_refused_and_the_host_keeps_its_models(
    deployment: Deployment,
) -> None:
    """The deploy from a fresh checkout: configs generated, no version directory filled."""
    stack = deployment.stack
    controller_version = stack.project / "build" / STACK / "model_repository" / MODEL_NAME / "1"
    aside = stack.work / "version-aside"
    before = snapshot(stack.deployed / "model_repository")
    assert f"{MODEL_NAME}/1/model.py" in before
    controller_version.rename(aside)
    try:
        with pytest.raises(CommandFailed) as refused:
            stack.converge()
    finally:
        aside.rename(controller_version)
    message = str(refused.value)
    assert f"{HOST}: model(s) {MODEL_NAME} have no version directory in" in message
    assert "fill the repository first" in message
    assert snapshot(stack.deployed / "model_repository") == before
    assert np.array_equal(
        infer_http(stack.url("http"), np.ones((1, FEATURES), np.float32)), [[3.0] * FEATURES]
    )


def prometheus_rules(stack: DeployedStack) -> dict[str, str]:
    """Alert name -> its expression, as the running Prometheus has loaded them."""
    url = f"http://{stack.url('prometheus')}/api/v1/rules"
    with urllib.request.urlopen(url, timeout=5) as answer:
        groups = json.loads(answer.read())["data"]["groups"]
    return {rule["name"]: rule["query"] for group in groups for rule in group["rules"]}


def test_triton_answers_over_http_and_grpc_on_the_published_ports(
    deployed_stack: DeployedStack,
) -> None:
    batch = np.arange(2 * FEATURES, dtype=np.float32).reshape(2, FEATURES)
    assert np.array_equal(infer_http(deployed_stack.url("http"), batch), 2 * batch + 1)
    client = grpcclient.InferenceServerClient(deployed_stack.url("grpc"))
    tensor = grpcclient.InferInput("INPUT0", [1, FEATURES], "FP32")
    tensor.set_data_from_numpy(batch[:1])
    result = client.infer(MODEL_NAME, [tensor]).as_numpy("OUTPUT0")
    assert np.array_equal(result, 2 * batch[:1] + 1)
    triton = deployed_stack.inspect("triton")
    published = {
        port: [binding["HostIp"] for binding in bindings or []]
        for port, bindings in triton["NetworkSettings"]["Ports"].items()
    }
    assert published == {"8000/tcp": ["127.0.0.1"], "8001/tcp": ["127.0.0.1"], "8002/tcp": []}
    assert triton["Config"]["User"] == "1000:1000"
    assert triton["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    # Docker's own health check (every 10 s) agrees with the readiness seen above.
    deadline = time.monotonic() + 60
    while deployed_stack.inspect("triton")["State"]["Health"]["Status"] != "healthy":
        assert time.monotonic() < deadline, "Docker never saw Triton healthy"
        time.sleep(1)


def test_triton_admin_apis_need_the_admin_key(deployed_stack: DeployedStack) -> None:
    """The repository, shared-memory, statistics, trace and logging APIs, over HTTP and gRPC."""
    base = f"http://{deployed_stack.url('http')}/v2"
    restricted = [
        ("POST", f"{base}/repository/index"),
        ("GET", f"{base}/systemsharedmemory/status"),
        ("GET", f"{base}/models/stats"),
        ("GET", f"{base}/trace/setting"),
        ("GET", f"{base}/logging"),
    ]
    wrong = {ADMIN_HEADER: "not-the-key"}
    right = {ADMIN_HEADER: SECRETS["GPUFLEET_TRITON_ADMIN_KEY"]}
    for method, url in restricted:
        assert http_status(url, method) == 403, url
        assert http_status(url, method, wrong) == 403, url
        assert http_status(url, method, right) == 200, url
    # Inference, metadata and health stay open.
    assert http_status(f"{base}/health/ready") == 200
    assert http_status(f"{base}/models/{MODEL_NAME}") == 200
    client = grpcclient.InferenceServerClient(deployed_stack.url("grpc"))
    with pytest.raises(InferenceServerException, match="restricted, expecting header"):
        client.get_model_repository_index()
    with pytest.raises(InferenceServerException, match="restricted, expecting header"):
        client.get_inference_statistics(MODEL_NAME)
    # Triton 2.51 expects the gRPC header under a prefix of its own.
    grpc_right = {f"triton-grpc-protocol-{ADMIN_HEADER}": right[ADMIN_HEADER]}
    assert client.get_model_repository_index(headers=grpc_right).models[0].name == MODEL_NAME
    assert client.get_inference_statistics(MODEL_NAME, headers=grpc_right).model_stats


def test_no_process_on_the_host_has_the_admin_key_on_its_command_line(
    deployed_stack: DeployedStack,
) -> None:
    """`ps` on the host shows every container's processes: Triton's shows the template only."""
    key = SECRETS["GPUFLEET_TRITON_ADMIN_KEY"].encode()
    command_lines = {}
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):  # a process that exited meanwhile
            command_lines[path.parent.name] = path.read_bytes()
    assert [pid for pid, line in command_lines.items() if key in line] == []
    container = deployed_stack.inspect("triton")["State"]["Pid"]
    launcher = command_lines[str(container)].split(b"\0")
    assert launcher[:3] == [b"python3", b"/gpufleet/secret_args.py", b"tritonserver"]
    triton = command_lines[str(triton_pid(container))].split(b"\0")
    assert triton[0].endswith(b"/tritonserver")
    apis = b"model-repository,shared-memory,statistics,trace,logging"
    template = b"triton-admin-key=${TRITON_ADMIN_KEY}"
    assert b"--http-restricted-api=" + apis + b":" + template in triton
    assert b"--grpc-restricted-protocol=" + apis + b":" + template in triton


def triton_pid(container_pid: int) -> int:
    """tritonserver: the child of the container's main process (secret_args.py)."""
    children = Path(f"/proc/{container_pid}/task/{container_pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def basic_auth(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


ADMIN_LOGIN = basic_auth(MLFLOW_ADMIN, SECRETS["GPUFLEET_MLFLOW_ADMIN_PASSWORD"])


def test_mlflow_asks_for_a_login_and_accepts_the_admins(
    deployed_stack: DeployedStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registry is published (on 127.0.0.1 here), so it must not answer without a login."""
    mlflow = f"http://{deployed_stack.url('mlflow')}"
    search = f"{mlflow}/api/2.0/mlflow/experiments/search?max_results=5"
    models = f"{mlflow}/api/2.0/mlflow/registered-models/search"
    assert http_status(search) == 401
    assert http_status(models) == 401
    assert http_status(f"{mlflow}/api/2.0/mlflow/experiments/create", "POST") == 401
    # Each login is checked against a deliberately slow password hash: on a busy machine that
    # takes seconds, so these requests get a generous timeout.
    wrong = basic_auth(MLFLOW_ADMIN, "not-the-password")
    assert http_status(search, headers=wrong, timeout=120) == 401
    assert http_status(search, headers=ADMIN_LOGIN, timeout=120) == 200
    assert http_status(models, headers=ADMIN_LOGIN, timeout=120) == 200
    assert http_status(f"{mlflow}/health") == 200, "the health check needs no login"
    # MLflow's own client, at the URL every step asks for, with the login from the environment.
    loaded = load_stack_spec(deployed_stack.project / "stacks", STACK)
    tracking_uri = registry_tracking_uri(loaded.spec, {})
    assert tracking_uri == mlflow
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", MLFLOW_ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRETS["GPUFLEET_MLFLOW_ADMIN_PASSWORD"])
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    client.create_registered_model("registry-login-check")
    names = [model.name for model in client.search_registered_models()]
    assert "registry-login-check" in names
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    with pytest.raises(MlflowException, match=r"401"):
        client.search_registered_models()


def test_mlflow_keeps_its_runs_in_postgres(deployed_stack: DeployedStack) -> None:
    mlflow = f"http://{deployed_stack.url('mlflow')}"
    assert http_status(f"{mlflow}/health") == 200
    request = urllib.request.Request(
        f"{mlflow}/api/2.0/mlflow/experiments/create",
        data=json.dumps({"name": "serving-stack-run"}).encode(),
        headers={"Content-Type": "application/json", **ADMIN_LOGIN},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        experiment = json.loads(response.read())["experiment_id"]
    rows = deployed_stack.compose(
        "exec",
        "-T",
        "postgres",
        *("psql", "-U", "mlflow", "-d", "mlflow", "-tAc"),
        "SELECT experiment_id, name FROM experiments",
    ).stdout
    assert f"{experiment}|serving-stack-run" in rows.splitlines()


def test_postgres_and_the_metrics_stay_on_the_internal_network(
    deployed_stack: DeployedStack,
) -> None:
    postgres = deployed_stack.inspect("postgres")
    assert set(postgres["NetworkSettings"]["Networks"]) == {f"{PROJECT}_backend"}
    assert all(not bindings for bindings in postgres["NetworkSettings"]["Ports"].values())
    backend = json.loads(
        deployed_stack.engine.docker("network", "inspect", f"{PROJECT}_backend").stdout
    )
    assert backend[0]["Internal"] is True


def test_prometheus_scrapes_triton_and_sees_the_load(deployed_stack: DeployedStack) -> None:
    batch = np.ones((1, FEATURES), dtype=np.float32)
    for _ in range(25):
        infer_http(deployed_stack.url("http"), batch)
    deadline = time.monotonic() + 60
    while True:
        up = prometheus_query(deployed_stack, 'up{job="triton"}')
        count = prometheus_query(deployed_stack, f'sum(nv_inference_count{{model="{MODEL_NAME}"}})')
        if up and up[0]["value"][1] == "1" and count and float(count[0]["value"][1]) >= 25:
            break
        assert time.monotonic() < deadline, f"up={up} count={count}"
        time.sleep(1)
    assert up[0]["metric"]["host"] == HOST
    with urllib.request.urlopen(
        f"http://{deployed_stack.url('prometheus')}/api/v1/rules"
    ) as answer:
        rules = [
            rule["name"]
            for group in json.loads(answer.read())["data"]["groups"]
            for rule in group["rules"]
        ]
    assert "TritonDown" in rules


def test_a_killed_triton_is_restarted_and_the_load_gate_counts_the_failures(
    deployed_stack: DeployedStack,
) -> None:
    """SIGKILL to tritonserver (a crash, not `docker stop`) during a load test; the container's
    main process, secret_args.py, exits as it did."""
    before = deployed_stack.inspect("triton")
    pid = triton_pid(before["State"]["Pid"])
    assert pid > 0
    readiness: list[tuple[float, bool]] = []
    stop_polling = threading.Event()

    def poll_readiness() -> None:
        ready = f"http://{deployed_stack.url('http')}/v2/health/ready"
        while not stop_polling.is_set():
            try:
                readiness.append((time.monotonic(), http_status(ready) == 200))
            except OSError:
                readiness.append((time.monotonic(), False))
            time.sleep(0.2)

    poller = threading.Thread(target=poll_readiness)
    poller.start()
    killer = threading.Timer(1.5, os.kill, (pid, signal.SIGKILL))
    killer.start()
    try:
        inputs = {"INPUT0": np.ones((1, FEATURES), dtype=np.float32)}
        report = run_load_gate(
            deployed_stack.url("grpc"),
            [LoadTarget(MODEL_NAME, inputs, Objectives(p99_latency_ms=5000, concurrency=[2]))],
            # Never stable: the load runs all 20 windows (10 s) unless a failure ends it.
            LoadGateSettings(
                window_s=0.5, stable_windows=2, stability_percent=1e-6, max_windows=20
            ),
        )
        deadline = time.monotonic() + 180
        while not (readiness and readiness[-1][1] and readiness_dropped(readiness)):
            assert time.monotonic() < deadline, "Triton did not come back ready"
            time.sleep(0.5)
    finally:
        killer.cancel()
        stop_polling.set()
        poller.join()
    (check,) = report.checks
    assert check.status == "fail", check.message
    assert check.measurements["errors"] > 0
    assert f"{check.measurements['errors']} of" in check.message
    after = deployed_stack.inspect("triton")
    # Restarted by its policy; a slow start on a busy machine may take more than one try.
    assert after["RestartCount"] >= before["RestartCount"] + 1
    assert after["State"]["Pid"] != before["State"]["Pid"]
    batch = np.full((1, FEATURES), 3, dtype=np.float32)
    assert np.array_equal(infer_http(deployed_stack.url("http"), batch), 2 * batch + 1)


def readiness_dropped(readiness: list[tuple[float, bool]]) -> bool:
    """Ready, then not ready (the outage), then ready again."""
    states = [ready for _, ready in readiness]
    if True not in states:
        return False
    first_ready = states.index(True)
    return False in states[first_ready:] and states[-1]


def test_no_secret_in_any_generated_file_deployed_file_or_log(deployment: Deployment) -> None:
    deployed_stack = deployment.stack
    env_files = sorted((deployed_stack.deployed / "secrets").iterdir())
    assert [path.name for path in env_files] == ["mlflow.env", "postgres.env", "triton.env"]
    for path in env_files:
        assert path.stat().st_mode & 0o777 == 0o600
    searched = [
        path
        for root in (deployed_stack.project, deployed_stack.deployed)
        for path in root.rglob("*")
        if path.is_file() and path.parent.name != "secrets"
    ]
    assert len(searched) > 10
    texts = [path.read_text(errors="replace") for path in searched]
    texts += deployment.runs
    for service in ("triton", "postgres", "mlflow", "prometheus"):
        logs = deployed_stack.engine.docker("logs", deployed_stack.container(service))
        texts.append(logs.stdout + logs.stderr)
    for value in SECRETS.values():
        for text in texts:
            assert value not in text
