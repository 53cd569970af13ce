"""Deploy a generated serving stack with the serving_stack role onto a Docker engine.

Shared by tests/test_serving_run.py and bench/serving_stack.py: one gpufleet project in a
directory (a python-backend model, a static stack with one host on 127.0.0.1 whose images are
the local stand-ins of tests/serving_images.py), `gpufleet generate --stack` as a process, and
ansible-playbook running the serving_stack role on this machine (local connection) against the
engine. Nothing is mocked.

    stack = prepare_stack(root, engine, images)
    output = stack.converge()          # ansible-playbook's output; raises when it fails
    stack.compose("ps")                # docker-compose in the deployed directory
    stack.down()

PYTEST_DONT_REWRITE: this module asserts nothing.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from generators.ansible_inventory import inventory_yaml, render_inventory
from gpufleet.configure.runner import ansible_secrets, unsafe_extravars
from gpufleet.spec.loading import load_stack_spec
from tests.docker_hosts import CommandFailed, DockerEngine
from tests.process_environment import environment_variables
from tests.serving_images import ServingImages
from tests.serving_models import MODEL_NAME, affine_spec, write_affine_model
from validation.loopback import LOOPBACK, pick_free_ports

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# The compose project is gpufleet-<stack>: one per process, so that two sessions sharing an
# engine never recreate (or `down --volumes`) each other's containers.
STACK = f"svc{os.getpid()}"
HOST = "serving-a"
PROJECT = f"gpufleet-{STACK}"
SECRETS = {
    "GPUFLEET_POSTGRES_PASSWORD": "pg-Run-7f3a/x@y:z",
    "GPUFLEET_GRAFANA_ADMIN_PASSWORD": "graf-Run-91c2",
    # Jinja and glob syntax: it must reach Triton as written (extra vars are !unsafe, and
    # secret_args.py expands it without a shell). Unique per run: searching every process's
    # command line must not find another run's stack.
    "GPUFLEET_TRITON_ADMIN_KEY": f"key-{{{{7*7}}}}-*-{secrets.token_hex(6)}",
    "GPUFLEET_MLFLOW_ADMIN_PASSWORD": "mlflow-Run-4b1e/a@c:d",
}
MLFLOW_ADMIN = "admin"
GPUFLEET = Path(sys.executable).with_name("gpufleet")
ANSIBLE_PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")


@dataclass
class DeployedStack:
    engine: DockerEngine
    project: Path  # the gpufleet project: modelconfigs/, stacks/, build/
    deployed: Path  # the stack directory the role writes on the "host"
    work: Path  # ansible-playbook's inventory and temporary files
    ports: dict[str, int]

    def converge(self) -> str:
        """Run the serving_stack role once; its output (CommandFailed when it fails)."""
        return run_role(self.project, self.engine, self.work)

    def down(self) -> None:
        if (self.deployed / "docker-compose.yml").exists():
            self.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", check=False)

    def compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker-compose", "--project-name", PROJECT, "--file", "docker-compose.yml", *args],
            cwd=self.deployed,
            env={**os.environ, "DOCKER_HOST": self.engine.docker_host},
            capture_output=True,
            text=True,
            check=check,
            timeout=300,
        )

    def container(self, service: str) -> str:
        container_id = self.compose("ps", "-q", service).stdout.strip()
        if not container_id:
            raise CommandFailed(f"no {service} container in {PROJECT}")
        return container_id

    def inspect(self, service: str) -> dict[str, Any]:
        output = self.engine.docker("inspect", self.container(service)).stdout
        details: dict[str, Any] = json.loads(output)[0]
        return details

    def url(self, name: str) -> str:
        return f"{LOOPBACK}:{self.ports[name]}"


def write_project(project: Path, images: ServingImages, deployed: Path) -> dict[str, int]:
    spec = affine_spec()
    (project / "modelconfigs").mkdir(parents=True)
    (project / "modelconfigs" / f"{MODEL_NAME}.yaml").write_text(
        yaml.safe_dump(spec.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
    )
    http, grpc, metrics, mlflow, prometheus = pick_free_ports(5)
    config = {
        "environment": "static",
        "models": [MODEL_NAME],
        "model_repository": f"build/{STACK}/model_repository",
        "ports": {
            "triton_http": http,
            "triton_grpc": grpc,
            "triton_metrics": metrics,
            "mlflow": mlflow,
        },
        "hosts": [{"name": HOST, "address": LOOPBACK}],
        "registry": {"host": HOST},
        "serving": {
            "images": {
                "triton": images.tritonserver,
                "mlflow": images.mlflow,
                "postgres": images.postgres,
                "prometheus": images.prometheus,
            },
            "publish": ["triton_http", "triton_grpc", "mlflow", "prometheus"],
            "ports": {"prometheus": prometheus},
            "monitoring": {"grafana": False, "scrape_interval_s": 2},
            # This sandbox refuses to raise RLIMIT_MEMLOCK ("operation not permitted").
            "triton": {"shm_size_mb": 256, "unlimited_memlock": False},
            "directory": str(deployed),
        },
    }
    (project / "stacks").mkdir()
    (project / "stacks" / f"Pulumi.{STACK}.yaml").write_text(
        yaml.safe_dump({"config": {f"gpufleet:{key}": value for key, value in config.items()}})
    )
    return {"http": http, "grpc": grpc, "mlflow": mlflow, "prometheus": prometheus}


def run_role(project: Path, engine: DockerEngine, work: Path) -> str:
    """ansible-playbook with the serving_stack role on this machine; its output."""
    loaded = load_stack_spec(project / "stacks", STACK)
    inventory = render_inventory(STACK, loaded.spec, project_root=project)
    host_vars = inventory["all"]["hosts"][HOST]
    host_vars.update(
        ansible_connection="local",
        ansible_become=False,  # root already; this machine has no sudo
        ansible_python_interpreter=sys.executable,
        serving_stack_docker_host=engine.docker_host,
    )
    (work / "hosts.yml").write_text(inventory_yaml(inventory))
    # The secrets travel as `gpufleet configure` sends them: read from the environment by the
    # runner, written as extra vars tagged !unsafe (Ansible must not template them).
    with environment_variables(SECRETS):
        secrets = ansible_secrets(loaded.spec)
    extravars = work / "secrets.yml"
    extravars.touch(mode=0o600)
    extravars.write_text(unsafe_extravars(secrets))
    try:
        result = subprocess.run(
            [
                str(ANSIBLE_PLAYBOOK),
                *("-i", str(work / "hosts.yml"), "-e", f"@{extravars}"),
                str(PROJECT_ROOT / "ansible" / "playbooks" / "serving_stack.yml"),
            ],
            env={
                **os.environ,
                "ANSIBLE_ROLES_PATH": str(PROJECT_ROOT / "ansible" / "roles"),
                "ANSIBLE_NOCOLOR": "1",
                "ANSIBLE_LOCAL_TEMP": str(work / "tmp"),
                "ANSIBLE_RETRY_FILES_ENABLED": "False",
            },
            capture_output=True,
            text=True,
            check=False,
            timeout=900,
        )
    finally:
        extravars.unlink()
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise CommandFailed(f"ansible-playbook exited {result.returncode}:\n{output[-6000:]}")
    return output


def prepare_stack(root: Path, engine: DockerEngine, images: ServingImages) -> DeployedStack:
    """A project in `root/project` with its stack generated; not deployed yet."""
    project, deployed, work = root / "project", root / "host" / "serving", root / "ansible"
    work.mkdir(parents=True)
    project.mkdir()
    ports = write_project(project, images, deployed)
    generate = subprocess.run(
        [str(GPUFLEET), "generate", "--stack", STACK],
        cwd=project,
        capture_output=True,
        text=True,
        check=False,
    )
    if generate.returncode != 0:
        raise CommandFailed(f"gpufleet generate failed:\n{generate.stdout}{generate.stderr}")
    # The registry step's part, done by hand: the model file beside the generated config.
    write_affine_model(project / "build" / STACK / "model_repository")
    return DeployedStack(engine, project, deployed, work, ports)
