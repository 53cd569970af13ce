"""The serving stack generator: spec -> service graph -> compose, Prometheus and Grafana files.

Real: stack and model spec files on disk through the loader, the Typer app in-process,
Debian's docker-compose (`docker-compose config` parses and validates every generated file
against the compose specification), Debian's promtool (`check config`, `check rules`, and
`test rules` unit tests that fire each alert rule on synthetic series). Nothing here starts a
container: tests/test_serving_run.py runs the generated stack on a Docker engine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from generators.ansible_inventory import InventoryError, render_inventory
from generators.serving_stack.files import MANIFEST, render_serving_files
from generators.serving_stack.graph import SERVICE_SECRETS, ServiceGraphError, build_service_graph
from generators.serving_stack.secrets import MissingSecretError, render_env_files
from gpufleet.cli import app
from gpufleet.configure.runner import unsafe_extravars
from gpufleet.spec.loading import load_model_specs, load_stack_spec, select_stack_models
from gpufleet.spec.model import ModelSpec
from gpufleet.spec.serving import ServingSpec
from gpufleet.spec.stack import StackSpec
from tests.conftest import PROJECT_ROOT, SAMPLE_SPECS, snapshot

runner = CliRunner()
SERVING_STACKS = ("onprem-prod", "lab")
# A registry outside the stack: no host runs MLflow (tests/test_registry_spec.py has the rest).
EXTERNAL_REGISTRY = {"tracking_uri": "https://mlflow.example.internal"}


def stack_files(stack: str) -> dict[str, str]:
    loaded = load_stack_spec(PROJECT_ROOT / "stacks", stack)
    models = select_stack_models(loaded, load_model_specs(SAMPLE_SPECS))
    return render_serving_files(loaded, models)


def compose_of(stack: str, host: str) -> dict[str, object]:
    text = stack_files(stack)[f"{host}/docker-compose.yml"]
    document = yaml.safe_load(text)
    assert isinstance(document, dict)
    return document


def write_host_stack(files: dict[str, str], host: str, into: Path) -> Path:
    """One host's files in `into`, with empty secrets files where the host would have them."""
    for relative, text in files.items():
        if relative.startswith(f"{host}/"):
            path = into / relative.removeprefix(f"{host}/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for service in SERVICE_SECRETS:
        secrets = into / "secrets" / f"{service}.env"
        secrets.parent.mkdir(exist_ok=True)
        secrets.write_text("")
    return into


def static_serving_stack(tmp_path: Path, serving: object, **config: object) -> str:
    stacks = tmp_path / "stacks"
    stacks.mkdir(exist_ok=True)
    fields = {
        "environment": "static",
        "models": ["tabular_mlp"],
        "hosts": [{"name": "cpu-a", "address": "10.1.2.3"}],
        "serving": serving,
        "registry": EXTERNAL_REGISTRY,
        **config,
    }
    path = stacks / "Pulumi.svc.yaml"
    path.write_text(yaml.safe_dump({"config": {f"gpufleet:{k}": v for k, v in fields.items()}}))
    return "svc"


# --- The graph, as compose shows it --------------------------------------------------------


def test_onprem_hosts_publish_only_the_edge_services_on_their_private_address() -> None:
    compose = compose_of("onprem-prod", "gpu-prod-1")
    services = compose["services"]
    assert isinstance(services, dict)
    assert list(services) == ["triton", "postgres", "mlflow", "prometheus", "grafana"]
    published = {name: service.get("ports", []) for name, service in services.items()}
    assert published == {
        "triton": ["10.20.0.21:8000:8000", "10.20.0.21:8001:8001"],
        "postgres": [],
        "mlflow": ["10.20.0.21:5000:5000"],
        "prometheus": [],
        "grafana": ["10.20.0.21:3000:3000"],
    }
    assert compose["networks"] == {"backend": {"internal": True}, "edge": {}}
    assert services["postgres"]["networks"] == ["backend"], "Postgres never leaves the host"
    assert services["prometheus"]["networks"] == ["backend"]
    assert set(services["triton"]["networks"]) == {"backend", "edge"}


def test_triton_runs_as_non_root_with_explicit_model_control_and_restricted_apis() -> None:
    triton = compose_of("onprem-prod", "gpu-prod-1")["services"]["triton"]  # type: ignore[index]
    assert triton["user"] == "1000:1000"
    assert triton["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    python, launcher, program, *arguments = triton["command"]
    # secret_args.py hands Triton the key: no shell, and `${TRITON_ADMIN_KEY}` stays a
    # template on the command line (compose turns `$$` into `$`).
    assert (python, launcher, program) == ("python3", "/gpufleet/secret_args.py", "tritonserver")
    apis = "model-repository,shared-memory,statistics,trace,logging"
    for expected in (
        "--model-control-mode=explicit",
        "--load-model=*",
        "--model-repository=/models",
        "--metrics-config=summary_latencies=true",
        f"--http-restricted-api={apis}:triton-admin-key=$${{TRITON_ADMIN_KEY}}",
        f"--grpc-restricted-protocol={apis}:triton-admin-key=$${{TRITON_ADMIN_KEY}}",
    ):
        assert expected in arguments
    assert triton["volumes"] == ["./model_repository:/models:ro", "./triton:/gpufleet:ro"]
    assert triton["env_file"] == ["./secrets/triton.env"]
    assert triton["restart"] == "unless-stopped"
    assert triton["healthcheck"]["test"][-1] == "http://127.0.0.1:8000/v2/health/ready"
    assert triton["shm_size"] == "1024m"


def test_each_service_gets_only_its_own_secrets_file() -> None:
    services = compose_of("onprem-prod", "gpu-prod-1")["services"]
    assert isinstance(services, dict)
    env_files = {name: service.get("env_file") for name, service in services.items()}
    assert env_files == {
        "triton": ["./secrets/triton.env"],
        "postgres": ["./secrets/postgres.env"],
        "mlflow": ["./secrets/mlflow.env"],
        "prometheus": None,
        "grafana": ["./secrets/grafana.env"],
    }
    assert services["mlflow"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}


def test_gpu_reservations_are_all_the_hosts_gpus_when_a_model_may_use_one() -> None:
    """onprem-prod serves resnet50 (kind gpu on GPU 0) and bert_encoder (kind gpu, no GPU list);
    the lab's 8x H100 host serves every sample spec."""

    def reserved(stack: str, host: str) -> list[str]:
        triton = compose_of(stack, host)["services"]["triton"]  # type: ignore[index]
        (device,) = triton["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia"
        assert device["capabilities"] == ["gpu"]
        return list(device["device_ids"])

    assert reserved("onprem-prod", "gpu-prod-1") == ["0"]
    assert reserved("lab", "lab-h100-1") == [str(gpu) for gpu in range(8)]


def two_gpu_host_reservation(instance_groups: list[dict[str, object]]) -> tuple[str, ...]:
    spec = StackSpec.model_validate(
        {
            "environment": "static",
            "hosts": [{"name": "g", "address": "10.0.0.2", "gpus": {"model": "a10", "count": 2}}],
            "serving": {},
            "registry": EXTERNAL_REGISTRY,
        }
    )
    model = onnx_model(instance_groups)
    return build_service_graph("x", spec, spec.hosts[0], [model]).service("triton").gpu_device_ids


def onnx_model(instance_groups: list[dict[str, object]]) -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "name": "m",
            "backend": "onnxruntime",
            "max_batch_size": 4,
            "inputs": [{"name": "x", "dtype": "fp32", "shape": [3]}],
            "outputs": [{"name": "y", "dtype": "fp32", "shape": [3]}],
            "instance_groups": instance_groups,
        }
    )


@pytest.mark.parametrize(
    ("instance_groups", "reserved"),
    [
        # The runtime renumbers what it is given from 0: GPU 1 alone would become GPU 0 and
        # Triton would refuse "gpus: [1]". Every GPU keeps the indices as written.
        ([{"kind": "gpu", "gpus": [1]}], ("0", "1")),
        ([{"kind": "auto"}], ("0", "1")),
        ([], ("0", "1")),  # no groups: Triton places the model as kind auto
        ([{"kind": "cpu", "count": 2}], ()),
    ],
)
def test_gpu_reservations_follow_what_triton_may_place_on_a_gpu(
    instance_groups: list[dict[str, object]], reserved: tuple[str, ...]
) -> None:
    assert two_gpu_host_reservation(instance_groups) == reserved


def test_a_cpu_only_stack_reserves_no_gpu(tmp_path: Path) -> None:
    stack = static_serving_stack(tmp_path, {})
    loaded = load_stack_spec(tmp_path / "stacks", stack)
    files = render_serving_files(
        loaded, select_stack_models(loaded, load_model_specs(SAMPLE_SPECS))
    )
    triton = yaml.safe_load(files["cpu-a/docker-compose.yml"])["services"]["triton"]
    assert "deploy" not in triton


def test_monitoring_can_be_left_out() -> None:
    spec = StackSpec.model_validate(
        {
            "environment": "static",
            "hosts": [{"name": "a", "address": "192.168.1.9"}],
            "serving": {"monitoring": {"prometheus": False}, "publish": ["mlflow"]},
            "registry": {"host": "a"},
        }
    )
    graph = build_service_graph("x", spec, spec.hosts[0], [])
    assert [service.name for service in graph.services] == ["triton", "postgres", "mlflow"]


def test_the_same_spec_renders_the_same_bytes() -> None:
    assert stack_files("onprem-prod") == stack_files("onprem-prod")
    files = stack_files("onprem-prod")
    assert json.loads(files[f"gpu-prod-2/{MANIFEST}"]) == sorted(
        name.removeprefix("gpu-prod-2/") for name in files if name.startswith("gpu-prod-2/")
    )


@pytest.mark.parametrize("stack", SERVING_STACKS)
def test_generate_writes_the_same_serving_files_under_any_hash_seed(
    stack: str, tmp_path: Path
) -> None:
    """`gpufleet generate --stack` as two processes with PYTHONHASHSEED 1 and 2: the serving
    stack's files (compose, Prometheus, Grafana, manifest) and the configs are byte-identical."""
    command = [sys.executable, "-m", "gpufleet", "generate", "--stack", stack, "--out", "repo"]
    command += ["--specs", str(SAMPLE_SPECS), "--stacks-dir", str(PROJECT_ROOT / "stacks")]
    written = []
    for seed in ("1", "2"):
        work = tmp_path / f"seed-{seed}"
        work.mkdir()
        subprocess.run(
            command,
            cwd=work,
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        )
        written.append(snapshot(work))
    serving = [name for name in written[0] if name.startswith(f"build/{stack}/serving/")]
    assert len(serving) > 10, sorted(written[0])
    assert any(name.endswith("docker-compose.yml") for name in serving)
    assert written[0] == written[1]


# --- What no generated file may hold -------------------------------------------------------


def test_no_generated_file_holds_a_secret_or_a_wildcard_address(tmp_path: Path) -> None:
    """Secrets reach the host only through render_env_files; the generated files name the
    variables, never their values, and nothing is published on 0.0.0.0."""
    secrets = {
        "GPUFLEET_POSTGRES_PASSWORD": "pg-S3cret/with@odd:chars",
        "GPUFLEET_GRAFANA_ADMIN_PASSWORD": "graf-S3cret",
        "GPUFLEET_TRITON_ADMIN_KEY": "triton-S3cret",
        "GPUFLEET_MLFLOW_ADMIN_PASSWORD": "mlflow-admin-S3cret",
    }
    for stack in SERVING_STACKS:
        for name, text in stack_files(stack).items():
            for value in secrets.values():
                assert value not in text, f"{stack}: {name}"
            if name.endswith("docker-compose.yml"):
                assert "0.0.0.0:" not in text, name
    serving = load_stack_spec(PROJECT_ROOT / "stacks", "onprem-prod").spec.serving
    assert serving is not None
    env_files = render_env_files(serving, secrets, runs_registry=True)
    mlflow = env_files.pop("mlflow").splitlines()
    # The password is URL-encoded inside the store URI: '/', '@' and ':' would split it.
    assert mlflow[:2] == [
        "MLFLOW_BACKEND_STORE_URI=postgresql+psycopg2://mlflow:pg-S3cret%2Fwith%40odd%3Achars"
        "@postgres:5432/mlflow",
        "MLFLOW_AUTH_ADMIN_PASSWORD=mlflow-admin-S3cret",
    ]
    assert [line.split("=")[0] for line in mlflow] == list(SERVICE_SECRETS["mlflow"])
    assert env_files == {
        "postgres": "POSTGRES_PASSWORD=pg-S3cret/with@odd:chars",
        "triton": "TRITON_ADMIN_KEY=triton-S3cret",
        "grafana": "GF_SECURITY_ADMIN_PASSWORD=graf-S3cret",
    }
    assert {*env_files, "mlflow"} == set(SERVICE_SECRETS)


def test_a_missing_or_multiline_secret_is_refused_by_name() -> None:
    serving = ServingSpec()
    with pytest.raises(MissingSecretError, match="GPUFLEET_POSTGRES_PASSWORD is not set"):
        render_env_files(serving, {}, runs_registry=True)
    with pytest.raises(MissingSecretError, match="GPUFLEET_TRITON_ADMIN_KEY holds a line break"):
        render_env_files(
            serving,
            {
                "GPUFLEET_POSTGRES_PASSWORD": "p",
                "GPUFLEET_MLFLOW_ADMIN_PASSWORD": "mlflow-admin-pw",
                "GPUFLEET_TRITON_ADMIN_KEY": "a\nTRITON_X=1",
            },
            runs_registry=True,
        )
    with pytest.raises(
        MissingSecretError,
        match=r"GPUFLEET_POSTGRES_PASSWORD holds ' ' '\$', which Compose v1 and v2 read differently",
    ):
        render_env_files(serving, {"GPUFLEET_POSTGRES_PASSWORD": "a $HOME"}, runs_registry=True)


def test_env_files_of_several_lines_reach_ansible_as_written() -> None:
    """MLflow's env file has three lines; the extra-vars file must keep them (and quotes,
    backslashes and Jinja) exactly, for Ansible's YAML loader with its !unsafe tag."""

    class UnsafeLoader(yaml.SafeLoader):
        pass

    UnsafeLoader.add_constructor("!unsafe", lambda loader, node: loader.construct_scalar(node))
    secrets = {
        "ansible_become_password": "s3cret-{{ 7*7 }}-'\"$HOME%-\\",
        "serving_stack_env_files": {"mlflow": "A=1\nB=p{{x}}'q\"\nC=\u00e9"},
    }
    assert yaml.load(unsafe_extravars(secrets), Loader=UnsafeLoader) == secrets  # noqa: S506


# --- Bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("serving", "config", "message"),
    [
        (
            {"bind_address": "0.0.0.0"},  # noqa: S104
            {},
            "config.gpufleet:serving.bind_address: 0.0.0.0 publishes on every interface",
        ),
        ({"bind_address": "8.8.8.8"}, {}, "8.8.8.8 is not a private address"),
        (
            {"images": {"triton": "nvcr.io/nvidia/tritonserver:latest"}},
            {},
            "floats with every release; pin a version tag or digest",
        ),
        (
            {"images": {"grafana": "grafana/grafana"}},
            {},
            "'grafana/grafana' is not an image reference with a tag or digest",
        ),
        ({"publish": ["grafana", "grafana"]}, {}, "name each published service once"),
        (
            {},
            {"hosts": [{"name": "cpu-a", "address": "52.1.2.3"}]},
            "host cpu-a: 52.1.2.3 is not a private address",
        ),
        (
            {},
            {"hosts": [{"name": "cpu-a", "address": "gpu.example.internal"}]},
            "'gpu.example.internal' is not an IP address",
        ),
        (
            {},
            {"models": ["resnet50"]},
            "model resnet50 instance_groups[0] runs on GPUs but host cpu-a has none",
        ),
    ],
)
def test_bad_serving_specs_exit_2_with_a_located_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    serving: object,
    config: dict[str, object],
    message: str,
) -> None:
    shutil.copytree(SAMPLE_SPECS, tmp_path / "modelconfigs")
    monkeypatch.chdir(tmp_path)
    stack = static_serving_stack(tmp_path, serving, **config)
    result = runner.invoke(app, ["generate", "--stack", stack])
    assert result.exit_code == 2, result.output
    assert "stacks/Pulumi.svc.yaml:" in result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "build").exists(), "nothing is written when a spec is bad"


def test_a_gpu_the_host_lacks_is_refused(tmp_path: Path) -> None:
    spec = StackSpec.model_validate(
        {
            "environment": "static",
            "hosts": [{"name": "t4", "address": "10.0.0.2", "gpus": {"model": "t4", "count": 1}}],
            "serving": {},
            "registry": EXTERNAL_REGISTRY,
        }
    )
    model = load_model_specs(SAMPLE_SPECS / "resnet50.yaml")[0].spec
    two_gpus = model.model_copy(
        update={
            "instance_groups": [
                model.instance_groups[0].model_copy(update={"gpus": [0, 1]}),
            ]
        }
    )
    with pytest.raises(ServiceGraphError, match=r"uses GPU 1 but host t4 has 1 \(0-0\)"):
        build_service_graph("x", spec, spec.hosts[0], [two_gpus])


def test_a_local_stack_has_no_serving_block() -> None:
    with pytest.raises(ValueError, match="a local stack serves from this machine's Triton"):
        StackSpec.model_validate({"environment": "local", "serving": {}})


# --- generate / --check --------------------------------------------------------------------


def test_generate_check_and_stale_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """generate writes each host's stack; --check is 0 in sync and 1 with a diff after a spec
    change; a host removed from the spec loses its generated files, not the env files."""
    shutil.copytree(SAMPLE_SPECS, tmp_path / "modelconfigs")
    monkeypatch.chdir(tmp_path)
    hosts = [{"name": "cpu-a", "address": "10.1.2.3"}, {"name": "cpu-b", "address": "10.1.2.4"}]
    stack = static_serving_stack(tmp_path, {}, hosts=hosts)
    assert runner.invoke(app, ["generate", "--stack", stack]).exit_code == 0
    serving = tmp_path / "build" / stack / "serving"
    assert (serving / "cpu-b" / "docker-compose.yml").is_file()
    (serving / "cpu-b" / "secrets").mkdir()
    (serving / "cpu-b" / "secrets" / "postgres.env").write_text("POSTGRES_PASSWORD=x\n")
    before = snapshot(serving)

    check = runner.invoke(app, ["generate", "--stack", stack, "--check"])
    assert check.exit_code == 0, check.output
    assert snapshot(serving) == before

    static_serving_stack(tmp_path, {"monitoring": {"scrape_interval_s": 30}}, hosts=hosts[:1])
    check = runner.invoke(app, ["generate", "--stack", stack, "--check"])
    assert check.exit_code == 1
    assert "-  scrape_interval: 15s\n" in check.output
    assert "+  scrape_interval: 30s\n" in check.output
    assert "+++ /dev/null" in check.output  # cpu-b's files would go
    assert snapshot(serving) == before, "--check writes nothing"

    result = runner.invoke(app, ["generate", "--stack", stack, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)["serving"]
    assert "cpu-a/prometheus/prometheus.yml" in summary["updated"]
    assert "cpu-b/docker-compose.yml" in summary["stale"]
    assert not (serving / "cpu-b" / "docker-compose.yml").exists()
    assert (serving / "cpu-b" / "secrets" / "postgres.env").read_text() == "POSTGRES_PASSWORD=x\n"


# --- The inventory hands the stack to the serving_stack role -------------------------------


def test_the_inventory_points_the_role_at_each_hosts_stack(tmp_path: Path) -> None:
    spec = load_stack_spec(PROJECT_ROOT / "stacks", "lab").spec
    inventory = render_inventory("lab", spec, project_root=tmp_path)["all"]
    assert inventory["vars"]["serving_stack_enabled"] is True
    assert inventory["vars"]["serving_stack_project"] == "gpufleet-lab"
    host = inventory["hosts"]["lab-t4-1"]
    assert host["serving_stack_source_dir"] == str(tmp_path / "build/lab/serving/lab-t4-1")
    assert host["serving_stack_ready_urls"] == [
        "http://10.20.0.11:8000/v2/health/ready",
        "http://10.20.0.11:5000/health",  # the registry host: MLflow's health needs no login
        "http://10.20.0.11:3000/api/health",
    ]
    assert inventory["hosts"]["lab-h100-1"]["serving_stack_ready_urls"] == [
        "http://10.20.0.12:8000/v2/health/ready",
        "http://10.20.0.12:3000/api/health",
    ]
    no_http = spec.model_copy(update={"serving": ServingSpec(publish=["triton_grpc"])}, deep=True)
    with pytest.raises(InventoryError, match="publish triton_http"):
        render_inventory("lab", no_http, project_root=tmp_path)


# --- Static checks by the consumers' own tools ---------------------------------------------


@pytest.mark.parametrize("stack", SERVING_STACKS)
def test_docker_compose_accepts_every_generated_compose_file(stack: str, tmp_path: Path) -> None:
    files = stack_files(stack)
    hosts = sorted({name.split("/")[0] for name in files})
    assert hosts
    for host in hosts:
        directory = write_host_stack(files, host, tmp_path / host)
        result = subprocess.run(
            ["docker-compose", "--file", "docker-compose.yml", "config", "--quiet"],
            cwd=directory,
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "COMPOSE_PROJECT_NAME": f"gpufleet-{stack}"},
        )
        assert result.returncode == 0, f"{host}: {result.stderr}"


@pytest.mark.parametrize("stack", SERVING_STACKS)
def test_promtool_accepts_the_prometheus_config_and_rules(stack: str, tmp_path: Path) -> None:
    files = stack_files(stack)
    host = next(name.split("/")[0] for name in files)
    directory = write_host_stack(files, host, tmp_path / host)
    for command in (
        ["promtool", "check", "config", "prometheus/prometheus.yml"],
        ["promtool", "check", "rules", "prometheus/rules/triton.rules.yml"],
    ):
        result = subprocess.run(command, cwd=directory, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout + result.stderr


PROMTOOL_TESTS = """\
rule_files: [prometheus/rules/triton.rules.yml]
evaluation_interval: 1m
tests:
  - name: Triton down for longer than 60 s
    interval: 15s
    input_series:
      - series: 'up{job="triton", instance="triton:8002", host="gpu-prod-1"}'
        values: '1 1 1 1 0 0 0 0 0 0 0 0'
    alert_rule_test:
      - eval_time: 1m30s
        alertname: TritonDown
        exp_alerts: []
      - eval_time: 2m45s
        alertname: TritonDown
        exp_alerts:
          - exp_labels: {severity: critical, job: triton, instance: "triton:8002", host: gpu-prod-1}
            exp_annotations:
              summary: Triton on gpu-prod-1 does not answer Prometheus
              description: "The metrics endpoint of triton:8002 has been unreachable for 60 s: the server is down or restarting."
  - name: queue time of 200 ms per request (threshold 50 ms), and 10 ms for another model
    interval: 1m
    input_series:
      - series: 'nv_inference_request_success{model="resnet50", version="1"}'
        values: '0+60x20'
      - series: 'nv_inference_queue_duration_us{model="resnet50", version="1"}'
        values: '0+12000000x20'
      - series: 'nv_inference_request_success{model="bert_encoder", version="1"}'
        values: '0+60x20'
      - series: 'nv_inference_queue_duration_us{model="bert_encoder", version="1"}'
        values: '0+600000x20'
    alert_rule_test:
      - eval_time: 15m
        alertname: TritonQueueTimeHigh
        exp_alerts:
          - exp_labels: {severity: warning, model: resnet50}
            exp_annotations:
              summary: "Requests for resnet50 wait 200 ms in Triton's queue"
              description: "Mean queue time above 50 ms for 5 minutes: add instances, GPUs or hosts, or lower max_queue_delay_us."
  - name: one request in eleven fails
    interval: 1m
    input_series:
      - series: 'nv_inference_request_success{model="resnet50", version="1"}'
        values: '0+60x20'
      - series: 'nv_inference_request_failure{model="resnet50", version="1"}'
        values: '0+6x20'
      - series: 'nv_inference_request_success{model="bert_encoder", version="1"}'
        values: '0+60x20'
      - series: 'nv_inference_request_failure{model="bert_encoder", version="1"}'
        values: '0+0x20'
    alert_rule_test:
      - eval_time: 4m
        alertname: TritonErrorRatioHigh
        exp_alerts: []
      - eval_time: 15m
        alertname: TritonErrorRatioHigh
        exp_alerts:
          - exp_labels: {severity: critical, model: resnet50}
            exp_annotations:
              summary: "resnet50 fails 9.091% of its requests"
              description: "More than 1.0% of requests failed for 5 minutes; Triton's log names the reason."
  - name: GPU memory at 95 %
    interval: 1m
    input_series:
      - series: 'nv_gpu_memory_used_bytes{gpu_uuid="GPU-1", host="gpu-prod-1"}'
        values: '95x20'
      - series: 'nv_gpu_memory_total_bytes{gpu_uuid="GPU-1", host="gpu-prod-1"}'
        values: '100x20'
      - series: 'nv_gpu_memory_used_bytes{gpu_uuid="GPU-2", host="gpu-prod-1"}'
        values: '50x20'
      - series: 'nv_gpu_memory_total_bytes{gpu_uuid="GPU-2", host="gpu-prod-1"}'
        values: '100x20'
    alert_rule_test:
      - eval_time: 5m
        alertname: GpuMemoryNearFull
        exp_alerts: []
      - eval_time: 12m
        alertname: GpuMemoryNearFull
        exp_alerts:
          - exp_labels: {severity: warning, gpu_uuid: GPU-1, host: gpu-prod-1}
            exp_annotations:
              summary: "GPU GPU-1 on gpu-prod-1 is 95% full"
              description: "GPU memory above 90% for 10 minutes: the next model load or a larger batch may fail."
"""


def test_promtool_unit_tests_fire_each_alert_rule(tmp_path: Path) -> None:
    """Each rule fires on the series it is for (after its `for`), and not on the others."""
    files = stack_files("onprem-prod")
    directory = write_host_stack(files, "gpu-prod-1", tmp_path / "gpu-prod-1")
    (directory / "rules.test.yml").write_text(PROMTOOL_TESTS)
    result = subprocess.run(
        ["promtool", "test", "rules", "rules.test.yml"],
        cwd=directory,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
    rules = yaml.safe_load((directory / "prometheus/rules/triton.rules.yml").read_text())
    tested = {
        line.split(":")[1].strip() for line in PROMTOOL_TESTS.splitlines() if "alertname:" in line
    }
    assert tested == {rule["alert"] for rule in rules["groups"][0]["rules"]}
