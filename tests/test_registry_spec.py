"""`gpufleet:registry`: one registry of record per environment, and the URL every step asks for.

Real: stack files written on disk and read by the loader, the Typer app in-process (`gpufleet
generate --stack`, which loads the stack first), the serving stack generator and the inventory
generator, Debian's docker-compose (`config` on the generated files). Nothing here contacts a
registry: `registry_tracking_uri` only builds a URL (tests/test_serving_run.py logs in to the
deployed MLflow).
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from generators.ansible_inventory import render_inventory
from generators.serving_stack.files import render_serving_files
from generators.serving_stack.graph import SERVICE_SECRETS
from generators.serving_stack.secrets import MissingSecretError, render_env_files
from gpufleet.cli import app
from gpufleet.configure.runner import ansible_secrets
from gpufleet.spec.loading import load_model_specs, load_stack_spec, select_stack_models
from gpufleet.spec.registry import RegistryError, registry_host, registry_tracking_uri
from gpufleet.spec.stack import StackSpec
from tests.conftest import PROJECT_ROOT, SAMPLE_SPECS

runner = CliRunner()
EXTERNAL = "https://mlflow.ml-platform.example.internal"
ALL_SECRETS = {
    "GPUFLEET_POSTGRES_PASSWORD": "pg-Reg-71a0",
    "GPUFLEET_GRAFANA_ADMIN_PASSWORD": "graf-Reg-3c9e",
    "GPUFLEET_TRITON_ADMIN_KEY": "triton-Reg-0b5d",
    "GPUFLEET_MLFLOW_ADMIN_PASSWORD": "mlflow-Reg-88f2e1",
}


def stack_spec(**config: object) -> StackSpec:
    """A static two-host stack with a serving stack whose registry is host a (unless given)."""
    fields: dict[str, object] = {
        "environment": "static",
        "hosts": [{"name": "a", "address": "10.9.0.1"}, {"name": "b", "address": "10.9.0.2"}],
        "serving": {"publish": ["triton_http", "triton_grpc", "mlflow"]},
        "registry": {"host": "a"},
        **config,
    }
    return StackSpec.model_validate({k: v for k, v in fields.items() if v is not None})


def served(stack: str) -> dict[str, str]:
    loaded = load_stack_spec(PROJECT_ROOT / "stacks", stack)
    return render_serving_files(loaded, select_stack_models(loaded, load_model_specs(SAMPLE_SPECS)))


# --- Bad input: located, exit 2, nothing written -------------------------------------------

GOOD_HOSTS = """\
  gpufleet:hosts:
    - name: cpu-a
      address: 10.1.2.3
    - name: cpu-b
      address: 10.1.2.4
"""
SERVING = """\
  gpufleet:serving:
    publish: [triton_http, mlflow]
"""


@pytest.mark.parametrize(
    ("body", "marker", "where", "message"),
    [
        (
            GOOD_HOSTS + SERVING + "  gpufleet:registry:\n    host: cpu-z\n",
            "host: cpu-z",
            "config.gpufleet:registry.host",
            "no host named 'cpu-z' in gpufleet:hosts (cpu-a, cpu-b); name one of them",
        ),
        (
            GOOD_HOSTS
            + SERVING
            + f"  gpufleet:registry:\n    host: cpu-a\n    tracking_uri: {EXTERNAL}\n",
            "gpufleet:registry:",
            "config.gpufleet:registry",
            "both host and tracking_uri given; name exactly one: host: <a host of this stack>",
        ),
        (
            GOOD_HOSTS + SERVING + "  gpufleet:registry: {}\n",
            "gpufleet:registry:",
            "config.gpufleet:registry",
            "neither host nor tracking_uri given; name exactly one",
        ),
        (
            GOOD_HOSTS + "  gpufleet:registry:\n    hots: cpu-a\n",
            "hots: cpu-a",
            "config.gpufleet:registry.hots",
            "unknown key 'hots'; did you mean 'host'?",
        ),
        (
            GOOD_HOSTS + SERVING,
            "gpufleet:serving:",
            "config.gpufleet:serving",
            "a stack with a serving stack names its one registry of record: add gpufleet:registry: "
            "{host: NAME} with one of its hosts (cpu-a, cpu-b)",
        ),
        (
            GOOD_HOSTS + "  gpufleet:registry:\n    host: cpu-a\n",
            "host: cpu-a",
            "config.gpufleet:registry.host",
            "cpu-a would run MLflow in its serving stack, but this stack has no gpufleet:serving",
        ),
        (
            GOOD_HOSTS
            + "  gpufleet:serving:\n    publish: [triton_http]\n"
            + "  gpufleet:registry:\n    host: cpu-b\n",
            "publish: [triton_http]",
            "config.gpufleet:serving.publish",
            "cpu-b's MLflow is the environment's registry, which the controller (filling the "
            "model repository) and training jobs reach over the network; add mlflow to "
            "serving.publish",
        ),
        (
            GOOD_HOSTS + SERVING + f"  gpufleet:registry:\n    tracking_uri: {EXTERNAL}\n",
            "publish: [triton_http, mlflow]",
            "config.gpufleet:serving.publish",
            f"no host runs MLflow (the registry is {EXTERNAL}); remove mlflow from serving.publish",
        ),
        (
            GOOD_HOSTS + "  gpufleet:registry:\n    tracking_uri: http://mlflow.example.internal\n",
            "tracking_uri:",
            "config.gpufleet:registry.tracking_uri",
            "an external registry is reached with credentials across networks gpufleet does not "
            "control; use its https:// URL",
        ),
        (
            GOOD_HOSTS
            + "  gpufleet:registry:\n    tracking_uri: https://u:p@mlflow.example.internal\n",
            "tracking_uri:",
            "config.gpufleet:registry.tracking_uri",
            "do not put credentials in the URI; set MLFLOW_TRACKING_USERNAME",
        ),
        (
            GOOD_HOSTS + f"  gpufleet:mlflow_tracking_uri: {EXTERNAL}\n",
            "gpufleet:mlflow_tracking_uri:",
            "config.gpufleet:mlflow_tracking_uri",
            "on a static stack the environment's registry is gpufleet:registry, the one source "
            f"of truth; write gpufleet:registry: {{tracking_uri: {EXTERNAL}}} (https) or "
            "{host: NAME} and remove mlflow_tracking_uri",
        ),
    ],
)
def test_bad_registries_exit_2_with_file_line_and_field(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    body: str,
    marker: str,
    where: str,
    message: str,
) -> None:
    shutil.copytree(SAMPLE_SPECS, tmp_path / "modelconfigs")
    monkeypatch.chdir(tmp_path)
    text = "config:\n  gpufleet:environment: static\n  gpufleet:models: [tabular_mlp]\n" + body
    (tmp_path / "stacks").mkdir()
    (tmp_path / "stacks" / "Pulumi.reg.yaml").write_text(text)
    line = next(n for n, row in enumerate(text.splitlines(), 1) if marker in row)
    result = runner.invoke(app, ["generate", "--stack", "reg"])
    assert result.exit_code == 2, result.output
    assert f"stacks/Pulumi.reg.yaml:{line}: {where}: {message}" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "build").exists(), "nothing is written when a spec is bad"


def test_a_local_stack_keeps_its_own_registry_and_refuses_gpufleet_registry() -> None:
    local = StackSpec.model_validate({"environment": "local"})
    assert registry_tracking_uri(local, {}) == "http://127.0.0.1:5000"
    pointed = StackSpec.model_validate(
        {"environment": "local", "mlflow_tracking_uri": "http://127.0.0.1:5999"}
    )
    assert registry_tracking_uri(pointed, {}) == "http://127.0.0.1:5999"
    with pytest.raises(ValueError, match="a local stack's registry is the MLflow server gpufleet"):
        StackSpec.model_validate({"environment": "local", "registry": {"tracking_uri": EXTERNAL}})


# --- registry_tracking_uri -------------------------------------------------------------------


def test_the_registry_url_of_a_host_registry_comes_from_its_address() -> None:
    spec = stack_spec(ports={"mlflow": 5443})
    assert registry_tracking_uri(spec, {}) == "http://10.9.0.1:5443"
    # The provisioner's outputs win over the spec (a re-addressed VM), other hosts don't matter.
    assert registry_tracking_uri(spec, {"a": "10.9.7.7", "b": "10.9.7.8"}) == "http://10.9.7.7:5443"
    # MLflow listens only on serving.bind_address when one is set.
    bound = stack_spec(serving={"publish": ["mlflow"], "bind_address": "127.0.0.1"})
    assert registry_tracking_uri(bound, {"a": "10.9.7.7"}) == "http://127.0.0.1:5000"
    ipv6 = stack_spec(hosts=[{"name": "a", "address": "fd00::21"}])
    assert registry_tracking_uri(ipv6, {}) == "http://[fd00::21]:5000"


def test_the_registry_url_of_an_external_registry_is_its_uri() -> None:
    spec = stack_spec(serving={}, registry={"tracking_uri": EXTERNAL})
    assert registry_tracking_uri(spec, {"a": "10.9.7.7"}) == EXTERNAL
    assert registry_host(spec) is None
    no_serving = stack_spec(serving=None, registry={"tracking_uri": EXTERNAL})
    assert registry_tracking_uri(no_serving, {}) == EXTERNAL


def test_plain_http_to_an_external_registry_only_on_loopback() -> None:
    """A registry on the controller, or the near end of an SSH tunnel: the login never leaves
    this machine. Anywhere else it must be https."""
    for uri in ("http://127.0.0.1:15000", "http://localhost:15000", "http://[::1]:5000"):
        spec = stack_spec(registry={"tracking_uri": uri}, serving={})
        assert registry_tracking_uri(spec, {}) == uri
    with pytest.raises(ValueError, match="use its https:// URL, an SSH tunnel to it"):
        stack_spec(registry={"tracking_uri": "http://10.9.0.7:5000"}, serving={})


def test_a_proxmox_registry_on_dhcp_needs_the_provisioners_address() -> None:
    spec = load_stack_spec(PROJECT_ROOT / "stacks", "onprem-prod").spec
    assert registry_tracking_uri(spec, {}) == "http://10.20.0.21:5000"  # static ipv4 in the spec
    hosts = [h.model_dump(exclude_defaults=True) for h in spec.hosts]
    hosts[0]["proxmox"]["network"] = {"bridge": "vmbr0", "vlan": 20}  # DHCP
    dhcp = StackSpec.model_validate({**spec.model_dump(exclude_defaults=True), "hosts": hosts})
    with pytest.raises(RegistryError, match=r"^registry host gpu-prod-1 has no address yet; "):
        registry_tracking_uri(dhcp, {})
    assert registry_tracking_uri(dhcp, {"gpu-prod-1": "10.20.0.40"}) == "http://10.20.0.40:5000"


def test_a_stack_without_a_registry_has_no_registry_url() -> None:
    spec = stack_spec(serving=None, registry=None)
    with pytest.raises(
        RegistryError, match="the stack declares no registry; add gpufleet:registry"
    ):
        registry_tracking_uri(spec, {})


# --- Which hosts run MLflow and Postgres ---------------------------------------------------


def test_only_the_registry_host_runs_mlflow_and_postgres() -> None:
    files = served("onprem-prod")
    registry = yaml.safe_load(files["gpu-prod-1/docker-compose.yml"])
    other = yaml.safe_load(files["gpu-prod-2/docker-compose.yml"])
    assert list(registry["services"]) == ["triton", "postgres", "mlflow", "prometheus", "grafana"]
    assert list(other["services"]) == ["triton", "prometheus", "grafana"]
    assert set(registry["volumes"]) >= {"postgres-data", "mlflow-artifacts", "mlflow-auth"}
    assert not {"postgres-data", "mlflow-artifacts", "mlflow-auth"} & set(other["volumes"])
    assert "gpu-prod-1/mlflow/basic_auth.ini" in files
    assert not [
        name for name in files if name.startswith(("gpu-prod-2/mlflow", "gpu-prod-2/images"))
    ]


def test_an_external_registry_leaves_every_host_without_mlflow(tmp_path: Path) -> None:
    text = (PROJECT_ROOT / "stacks" / "Pulumi.onprem-prod.yaml").read_text()
    text = text.replace("    host: gpu-prod-1\n", f"    tracking_uri: {EXTERNAL}\n")
    text = text.replace(
        "publish: [triton_http, triton_grpc, mlflow, grafana]", "publish: [triton_http]"
    )
    (tmp_path / "Pulumi.onprem-prod.yaml").write_text(text)
    loaded = load_stack_spec(tmp_path, "onprem-prod")
    files = render_serving_files(
        loaded, select_stack_models(loaded, load_model_specs(SAMPLE_SPECS))
    )
    for host in ("gpu-prod-1", "gpu-prod-2"):
        services = yaml.safe_load(files[f"{host}/docker-compose.yml"])["services"]
        assert list(services) == ["triton", "prometheus", "grafana"]
    # Without a registry host, the Postgres and MLflow secrets are neither needed nor sent.
    only = {k: v for k, v in ALL_SECRETS.items() if "POSTGRES" not in k and "MLFLOW" not in k}
    assert loaded.spec.serving is not None
    assert set(render_env_files(loaded.spec.serving, only, runs_registry=False)) == {
        "triton",
        "grafana",
    }


def test_mlflow_runs_the_basic_auth_app_configured_without_secrets() -> None:
    files = served("onprem-prod")
    mlflow = yaml.safe_load(files["gpu-prod-1/docker-compose.yml"])["services"]["mlflow"]
    assert mlflow["command"][-2:] == ["--app-name", "basic-auth"]
    assert mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"] == "/etc/mlflow/basic_auth.ini"
    assert "./mlflow:/etc/mlflow:ro" in mlflow["volumes"]
    assert "mlflow-auth:/mlflow/auth" in mlflow["volumes"]
    assert mlflow["env_file"] == ["./secrets/mlflow.env"]
    assert mlflow["ports"] == ["10.20.0.21:5000:5000"]
    config = configparser.ConfigParser(interpolation=None)
    config.read_string(files["gpu-prod-1/mlflow/basic_auth.ini"])
    assert dict(config["mlflow"]) == {
        "default_permission": "READ",
        "database_uri": "sqlite:////mlflow/auth/basic_auth.db",
        "admin_username": "admin",
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
        "grant_default_workspace_access": "false",
    }
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in SERVICE_SECRETS["mlflow"]
    dockerfile = files["gpu-prod-1/images/mlflow/Dockerfile"]
    assert "Flask-WTF==" in dockerfile
    assert "/mlflow/auth" in dockerfile


def test_the_admin_password_travels_in_mlflows_env_file_only() -> None:
    spec = load_stack_spec(PROJECT_ROOT / "stacks", "onprem-prod").spec
    assert spec.serving is not None
    env_files = render_env_files(spec.serving, ALL_SECRETS, runs_registry=True)
    lines = env_files["mlflow"].splitlines()
    assert lines[1] == "MLFLOW_AUTH_ADMIN_PASSWORD=mlflow-Reg-88f2e1"
    name, key = lines[2].split("=", 1)
    assert name == "MLFLOW_FLASK_SERVER_SECRET_KEY"
    assert len(key) == 64
    assert "mlflow-Reg" not in key
    assert render_env_files(spec.serving, ALL_SECRETS, runs_registry=True)["mlflow"] == "\n".join(
        lines
    ), "the same key on every run: compose must not recreate MLflow for nothing"
    others = [text for service, text in env_files.items() if service != "mlflow"]
    assert not [text for text in others if "mlflow-Reg-88f2e1" in text]
    for name_, text in served("onprem-prod").items():
        assert "mlflow-Reg-88f2e1" not in text, name_
    short = {**ALL_SECRETS, "GPUFLEET_MLFLOW_ADMIN_PASSWORD": "short-pw"}
    with pytest.raises(MissingSecretError, match="shorter than 12 characters, which MLflow"):
        render_env_files(spec.serving, short, runs_registry=True)
    missing = {k: v for k, v in ALL_SECRETS.items() if k != "GPUFLEET_MLFLOW_ADMIN_PASSWORD"}
    with pytest.raises(MissingSecretError, match="GPUFLEET_MLFLOW_ADMIN_PASSWORD is not set"):
        render_env_files(spec.serving, missing, runs_registry=True)


def test_configure_sends_registry_secrets_only_when_a_host_runs_the_registry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in ALL_SECRETS.items():
        monkeypatch.setenv(name, value)
    env_files = ansible_secrets(stack_spec())["serving_stack_env_files"]
    assert isinstance(env_files, dict)
    assert set(env_files) == {"postgres", "mlflow", "triton", "grafana"}
    monkeypatch.delenv("GPUFLEET_POSTGRES_PASSWORD")
    monkeypatch.delenv("GPUFLEET_MLFLOW_ADMIN_PASSWORD")
    external = stack_spec(serving={}, registry={"tracking_uri": EXTERNAL})
    env_files = ansible_secrets(external)["serving_stack_env_files"]
    assert isinstance(env_files, dict)
    assert set(env_files) == {"triton", "grafana"}


def test_the_role_waits_for_mlflow_on_the_registry_host_only(tmp_path: Path) -> None:
    spec = load_stack_spec(PROJECT_ROOT / "stacks", "lab").spec
    hosts = render_inventory("lab", spec, project_root=tmp_path)["all"]["hosts"]
    assert "http://10.20.0.11:5000/health" in hosts["lab-t4-1"]["serving_stack_ready_urls"]
    assert not [u for u in hosts["lab-h100-1"]["serving_stack_ready_urls"] if ":5000/" in u]


@pytest.mark.parametrize("stack", ["onprem-prod", "lab"])
def test_docker_compose_accepts_the_registry_and_the_other_hosts_files(
    stack: str, tmp_path: Path
) -> None:
    files = served(stack)
    hosts = sorted({name.split("/")[0] for name in files})
    assert len(hosts) == 2
    for host in hosts:
        directory = tmp_path / host
        for relative, text in files.items():
            if relative.startswith(f"{host}/"):
                path = directory / relative.removeprefix(f"{host}/")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
        (directory / "secrets").mkdir()
        compose = yaml.safe_load(files[f"{host}/docker-compose.yml"])
        for service in compose["services"].values():
            for env_file in service.get("env_file", []):
                (directory / env_file).write_text("")
        result = subprocess.run(
            ["docker-compose", "--file", "docker-compose.yml", "config", "--services"],
            cwd=directory,
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "COMPOSE_PROJECT_NAME": f"gpufleet-{stack}"},
        )
        assert result.returncode == 0, f"{host}: {result.stderr}"
        runs_mlflow = "mlflow" in result.stdout.split()
        assert runs_mlflow == (
            host == registry_host(load_stack_spec(PROJECT_ROOT / "stacks", stack).spec)
        )
