"""A static site of two Debian 12 hosts, a registry on this machine, and the gpufleet project
that serves them: what tests/test_environment_up.py and bench/environment_up.py start.

`shared_site` (a pytest plugin of tests/conftest.py) is one such site for the test modules of
SHARING_MODULES: building a site takes minutes, so they share it, run last and in that order.

Hosts are containers with systemd and sshd on a Docker engine (tests/docker_hosts.py), reached
on their own addresses on the engine's bridge with strict host key checking; the registry is a
local stack's MLflow, seeded with `gpufleet registry seed-demo`; the site's Triton image is the
stand-in with torch (tests/serving_images.py), shipped to the hosts as an image archive.

    with open_site(engine, host_image, key, project, triton_image) as site:
        site.gpufleet("up", "--stack", SITE, "--json")

PYTEST_DONT_REWRITE: this module asserts nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpufleet.registry.client import ModelRegistry
from tests.docker_hosts import (
    CommandFailed,
    ContainerHost,
    DockerEngine,
    HostPool,
    SshKeyPair,
    image_cache_dir,
)
from tests.serving_images import GATEWAY, TRITON_TORCH, ImageRecipe, ensure_image
from validation.loopback import pick_free_ports

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SITE, REGISTRY = "site", "registry"
HOSTS = ("serve-a", "serve-b")
# The modules that share one site, in the order they run: the first `up` of test_environment_up
# meets bare hosts; each module leaves the site serving the registry's version 1.
SHARING_MODULES = ("test_environment_up.py", "test_drift_environment.py", "test_rollout_hosts.py")
MODEL = "tabular_mlp"
SECRETS = {
    "GPUFLEET_POSTGRES_PASSWORD": "pg-Env-1d4f",
    "GPUFLEET_GRAFANA_ADMIN_PASSWORD": "graf-Env-82ac",
    "GPUFLEET_TRITON_ADMIN_KEY": "key-Env-{{7*7}}-5e21",
    # The registry's login: its admin when seed-demo starts it, the site's client afterwards.
    "MLFLOW_TRACKING_USERNAME": "gpufleet-test",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-Env-2b7c",
}


@dataclass
class Site:
    """Two bare hosts, a registry on this machine, and the gpufleet project that serves them."""

    project: Path
    engine: DockerEngine
    hosts: dict[str, ContainerHost]
    addresses: dict[str, str]
    registry_port: int
    runs: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    deployed: dict[str, Any] = field(default_factory=dict)  # a deployment provider's outputs

    def gpufleet(self, *args: str, timeout: float = 1500) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gpufleet", *args],
            cwd=self.project,
            env={**os.environ, **SECRETS},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def inner_docker(self, host: str, *args: str, check: bool = True) -> str:
        """The docker CLI inside a host (its own engine, installed by the docker_engine role)."""
        command = "docker " + " ".join(args)
        return self.hosts[host].exec(command, check=check, timeout=300).stdout

    def triton_container(self, host: str) -> dict[str, Any]:
        names = self.inner_docker(host, "ps", "--all", "--format", "'{{.Names}}'").split()
        (name,) = [name for name in names if name.startswith(f"gpufleet-{SITE}_triton")]
        details: dict[str, Any] = json.loads(self.inner_docker(host, "inspect", name))[0]
        return details

    @property
    def registry(self) -> ModelRegistry:
        return ModelRegistry(f"http://127.0.0.1:{self.registry_port}")


def bridge_address(engine: DockerEngine, host: ContainerHost) -> str:
    """The host's own address on the engine's bridge: what a site's private address is."""
    template = "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"
    return engine.docker("inspect", "--format", template, host.name).stdout.strip()


def known_hosts_line(host: ContainerHost, address: str) -> str:
    """The host's keys (recorded for 127.0.0.1:<port>) for its bridge address, port 22."""
    lines = []
    for line in host.known_hosts.read_text().splitlines():
        _, kind, key = line.split()
        lines.append(f"{address} {kind} {key}\n")
    return "".join(lines)


def image_archive(recipe: ImageRecipe, tag: str) -> Path:
    """Where tests/serving_images.py keeps the archive of the image `tag` of `recipe`."""
    return image_cache_dir() / f"{recipe.name}-{tag.rsplit(':', 1)[1]}.tar.gz"


def write_project(
    project: Path,
    addresses: dict[str, str],
    key: Path,
    known_hosts: Path,
    triton_image: str,
    gateway_image: str | None = None,
) -> int:
    """The project's files; with `gateway_image`, every host's stack runs the gateway too."""
    (project / "modelconfigs").mkdir()
    spec = yaml.safe_load((PROJECT_ROOT / "modelconfigs" / f"{MODEL}.yaml").read_text())
    # Objectives a CPU host shared with the rest of the suite meets; the gates still measure.
    spec["objectives"] = {"p99_latency_ms": 5000, "concurrency": 4, "min_throughput_per_s": 1}
    (project / "modelconfigs" / f"{MODEL}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    http, grpc, metrics, mlflow = pick_free_ports(4)
    stacks = project / "stacks"
    stacks.mkdir()
    registry = {
        "environment": "local",
        "models": [MODEL],
        "state_dir": f"build/{REGISTRY}",
        "model_repository": f"build/{REGISTRY}/model_repository",
        "ports": {
            "triton_http": http,
            "triton_grpc": grpc,
            "triton_metrics": metrics,
            "mlflow": mlflow,
        },
    }
    archives = [str(image_archive(TRITON_TORCH, triton_image))]
    publish = ["triton_http", "triton_grpc"]
    serving: dict[str, Any] = {
        "images": {"triton": triton_image},
        "image_archives": archives,
        "publish": publish,
        "monitoring": {"prometheus": False, "grafana": False},
        # This sandbox refuses to raise RLIMIT_MEMLOCK ("operation not permitted").
        "triton": {"shm_size_mb": 256, "unlimited_memlock": False},
    }
    site = {
        "environment": "static",
        "models": [MODEL],
        "state_dir": f"build/{SITE}",
        "model_repository": f"build/{SITE}/model_repository",
        "registry": {"tracking_uri": f"http://127.0.0.1:{mlflow}"},
        "load_gate": {"window_s": 0.5, "max_windows": 8},
        "hosts": [
            {"name": name, "address": address, "ssh_port": 22}
            for name, address in addresses.items()
        ],
        "host_config": {
            "package_sources": "distribution",
            "require_gpu": False,
            "ssh_private_key_file": str(key),
            "ssh_known_hosts_file": str(known_hosts),
        },
        "serving": serving,
    }
    if gateway_image is not None:
        archives.append(str(image_archive(GATEWAY, gateway_image)))
        publish += ["gateway_http", "gateway_grpc"]
        serving["gateway"] = {"image": gateway_image}
    for name, config in ((REGISTRY, registry), (SITE, site)):
        document = {"config": {f"gpufleet:{key}": value for key, value in config.items()}}
        (stacks / f"Pulumi.{name}.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    return mlflow


@contextlib.contextmanager
def open_site(
    engine: DockerEngine,
    host_image: str,
    key: SshKeyPair,
    project: Path,
    triton_image: str,
    gateway_image: str | None = None,
) -> Iterator[Site]:
    """Bare hosts, the project written, the registry seeded; everything removed afterwards.
    With `gateway_image`, the hosts' stacks run the rollout gateway (docs/rollout.md)."""
    with HostPool(engine, host_image, key, project, "up") as pool:
        started = dict(zip(HOSTS, pool.start(len(HOSTS)), strict=True))
        addresses = {name: bridge_address(engine, host) for name, host in started.items()}
        known_hosts = project / "known_hosts"
        known_hosts.write_text(
            "".join(known_hosts_line(started[name], addresses[name]) for name in HOSTS)
        )
        port = write_project(
            project, addresses, key.private_key, known_hosts, triton_image, gateway_image
        )
        site = Site(project, engine, started, addresses, port)
        try:
            seeded = site.gpufleet("registry", "seed-demo", "--stack", REGISTRY)
            if seeded.returncode != 0:
                raise CommandFailed(f"seed-demo failed:\n{seeded.stdout}{seeded.stderr}")
            yield site
        finally:
            site.gpufleet("down", "--stack", REGISTRY)


@pytest.fixture(scope="session")
def shared_site(
    docker_engine: DockerEngine,
    debian_host_image: str,
    ssh_client_key: SshKeyPair,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Site]:
    """Bare hosts, every host's stack with the rollout gateway, the registry seeded; removed
    when the session ends, right after the last module of SHARING_MODULES."""
    triton_image = ensure_image(docker_engine, TRITON_TORCH, debian_host_image, print)
    gateway_image = ensure_image(docker_engine, GATEWAY, debian_host_image, print)
    project = tmp_path_factory.mktemp("site")
    with open_site(
        docker_engine, debian_host_image, ssh_client_key, project, triton_image, gateway_image
    ) as site:
        yield site


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules of SHARING_MODULES run last, in that order (the others keep theirs)."""

    def position(item: pytest.Item) -> int:
        name = item.path.name
        return SHARING_MODULES.index(name) + 1 if name in SHARING_MODULES else 0

    items.sort(key=position)
