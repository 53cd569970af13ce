"""A static site of two Debian 12 hosts whose first host runs the environment's registry
(MLflow with Postgres in its serving stack): what tests/test_rebuild.py and bench/rebuild.py
rebuild.

The hosts are containers with systemd and sshd (tests/docker_hosts.py) on a Docker network of
the site's own with fixed addresses, so that a host deleted and recreated bare comes back at the
same address, with a new SSH host key, as a reinstalled machine does. Bootstrapping a registry
host from nothing is a chicken and egg (the model repository is filled from the registry the
host is to run), so the site starts with a repository filled from a scratch registry, deploys
without filling, seeds the registry host, then runs `gpufleet up`.

    with open_rebuild_site(engine, host_image, key, work) as site:
        site.gpufleet("rebuild", "--stack", SITE, "--host", "serve-a")
        site.recreate("serve-a")

PYTEST_DONT_REWRITE: this module asserts nothing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpufleet.registry.client import ModelRegistry
from tests.docker_hosts import (
    LOOPBACK,
    NAME_PREFIX,
    CommandFailed,
    ContainerHost,
    DockerEngine,
    HostPool,
    SshKeyPair,
    _cgroup_args,
    image_cache_dir,
)
from tests.process_environment import environment_variables
from tests.serving_images import (
    GRAFANA,
    MLFLOW,
    POSTGRES,
    PROMETHEUS,
    TRITON_TORCH,
    ImageRecipe,
    ensure_image,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SITE = "site"
HOSTS = ("serve-a", "serve-b")
REGISTRY_HOST = "serve-a"
MODEL = "tabular_mlp"
SECRETS = {
    "GPUFLEET_POSTGRES_PASSWORD": "pg-Reb-5c1e",
    "GPUFLEET_GRAFANA_ADMIN_PASSWORD": "graf-Reb-77aa",
    "GPUFLEET_TRITON_ADMIN_KEY": "key-Reb-3f0d",
    "GPUFLEET_MLFLOW_ADMIN_PASSWORD": "mlflow-Reb-9e4b21",
    "MLFLOW_TRACKING_USERNAME": "admin",  # the registry host's MLflow admin (a login name)
    "MLFLOW_TRACKING_PASSWORD": "mlflow-Reb-9e4b21",
}
_LABEL = "gpufleet.test-host=1"


class FixedAddressPool(HostPool):
    """Host containers on one network at fixed addresses; a host can be recreated bare."""

    def __init__(
        self, engine: DockerEngine, image: str, key: SshKeyPair, work_dir: Path, network: str
    ) -> None:
        super().__init__(engine, image, key, work_dir, "rebuild")
        self.network = network

    def start_at(self, address: str, timeout_s: float = 180.0) -> ContainerHost:
        name = f"{NAME_PREFIX}{self.hint}-{uuid.uuid4().hex[:8]}"
        self._names.append(name)
        self._launch_at(name, address)
        return self._ready(name, {}, time.monotonic() + timeout_s)

    def recreate(
        self, host: ContainerHost, address: str, timeout_s: float = 180.0
    ) -> ContainerHost:
        """Delete the host's container and its disk (its Docker volume), start it again bare."""
        self.engine.docker("rm", "--force", "--volumes", host.name)
        self.engine.docker("volume", "rm", "--force", f"{host.name}-docker")
        self._launch_at(host.name, address)
        return self._ready(host.name, {}, time.monotonic() + timeout_s)

    def _launch_at(self, name: str, address: str) -> None:
        self.engine.docker("volume", "create", "--label", _LABEL, f"{name}-docker")
        self.engine.docker(
            *("run", "--detach", "--name", name, "--hostname", name, "--label", _LABEL),
            *("--network", self.network, "--ip", address),
            # SYS_PTRACE: `docker exec` inside the host into a container whose process runs as
            # another user (Postgres, MLflow, Triton: health checks, pg_dump) must open that
            # process's namespaces, which the kernel allows only with it.
            *("--cap-add", "SYS_ADMIN", "--cap-add", "NET_ADMIN", "--cap-add", "SYS_PTRACE"),
            *("--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined"),
            *(
                "--tmpfs",
                "/run",
                "--tmpfs",
                "/run/lock",
                *_cgroup_args(self.engine.cgroup_version()),
            ),
            *("--volume", f"{name}-docker:/var/lib/docker", "--publish", f"{LOOPBACK}::22"),
            *(self.image, "/sbin/init"),
        )


@contextlib.contextmanager
def site_network(engine: DockerEngine) -> Iterator[tuple[str, ipaddress.IPv4Network]]:
    """A bridge network of its own on a /24 no other network of the engine overlaps."""
    taken = []
    for network_id in engine.docker("network", "ls", "--quiet").stdout.split():
        details = json.loads(engine.docker("network", "inspect", network_id).stdout)[0]
        for config in (details.get("IPAM") or {}).get("Config") or []:
            with contextlib.suppress(ValueError, KeyError):
                taken.append(ipaddress.ip_network(config["Subnet"]))
    subnet = next(
        candidate
        for third in range(40, 250)
        if not any(
            (candidate := ipaddress.IPv4Network(f"172.30.{third}.0/24")).overlaps(other)
            for other in taken
        )
    )
    name = f"rebuild-site-{uuid.uuid4().hex[:8]}"
    engine.docker("network", "create", "--subnet", str(subnet), "--label", _LABEL, name)
    try:
        yield name, subnet
    finally:
        engine.docker("network", "rm", name, check=False)


@dataclass
class RebuildSite:
    project: Path
    engine: DockerEngine
    pool: FixedAddressPool
    hosts: dict[str, ContainerHost]
    addresses: dict[str, str]
    runs: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def gpufleet(self, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gpufleet", *args],
            cwd=self.project,
            env={**os.environ, **SECRETS},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start_gpufleet(self, *args: str) -> subprocess.Popen[str]:
        """In a process group of its own, so that a test can kill it and its Ansible at once."""
        return subprocess.Popen(
            [sys.executable, "-m", "gpufleet", *args],
            cwd=self.project,
            env={**os.environ, **SECRETS, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def recreate(self, host: str) -> ContainerHost:
        self.hosts[host] = self.pool.recreate(self.hosts[host], self.addresses[host])
        return self.hosts[host]

    def console_fingerprint(self, host: str) -> str:
        """The host key's fingerprint as an operator reads it on the machine's console."""
        line = self.hosts[host].exec("ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub").stdout
        return line.split()[1]

    @property
    def registry(self) -> ModelRegistry:
        return ModelRegistry(f"http://{self.addresses[REGISTRY_HOST]}:5000")

    def inner_docker(self, host: str, *args: str) -> str:
        return self.hosts[host].exec("docker " + " ".join(args), timeout=300).stdout


def archive_of(recipe: ImageRecipe, tag: str) -> Path:
    return image_cache_dir() / f"{recipe.name}-{tag.rsplit(':', 1)[1]}.tar.gz"


def write_project(
    project: Path, addresses: dict[str, str], key: Path, images: dict[str, str]
) -> None:
    """The site's project. `images` names the stand-ins for triton, mlflow and postgres; with
    prometheus and grafana too (tests.serving_images.PROMETHEUS, GRAFANA), every host also runs
    monitoring, Grafana's database included, from those images' archives."""
    monitored = "prometheus" in images and "grafana" in images
    recipes = {"triton": TRITON_TORCH, "mlflow": MLFLOW, "postgres": POSTGRES}
    if monitored:
        recipes.update(prometheus=PROMETHEUS, grafana=GRAFANA)
    (project / "modelconfigs").mkdir()
    spec = yaml.safe_load((PROJECT_ROOT / "modelconfigs" / f"{MODEL}.yaml").read_text())
    # Objectives a CPU host shared with the rest of the suite meets; the gates still measure.
    spec["objectives"] = {"p99_latency_ms": 5000, "concurrency": 4, "min_throughput_per_s": 1}
    (project / "modelconfigs" / f"{MODEL}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    known_hosts = project / "known_hosts"
    config = {
        "environment": "static",
        "models": [MODEL],
        "state_dir": f"build/{SITE}",
        "model_repository": f"build/{SITE}/model_repository",
        "registry": {"host": REGISTRY_HOST},
        "load_gate": {"window_s": 0.5, "max_windows": 8},
        "hosts": [{"name": name, "address": address} for name, address in addresses.items()],
        "host_config": {
            "package_sources": "distribution",
            "require_gpu": False,
            "ssh_private_key_file": str(key),
            "ssh_known_hosts_file": str(known_hosts),
        },
        "serving": {
            "images": {service: images[service] for service in recipes},
            "image_archives": [
                str(archive_of(recipe, images[service])) for service, recipe in recipes.items()
            ],
            "publish": ["triton_http", "triton_grpc", "mlflow"],
            "monitoring": {"prometheus": monitored, "grafana": monitored},
            # This sandbox refuses to raise RLIMIT_MEMLOCK ("operation not permitted").
            "triton": {"shm_size_mb": 256, "unlimited_memlock": False},
        },
    }
    (project / "stacks").mkdir()
    document = {"config": {f"gpufleet:{key}": value for key, value in config.items()}}
    (project / "stacks" / f"Pulumi.{SITE}.yaml").write_text(
        yaml.safe_dump(document, sort_keys=False)
    )


def write_known_hosts(site: RebuildSite) -> None:
    lines = []
    for name in HOSTS:
        for line in site.hosts[name].known_hosts.read_text().splitlines():
            _, kind, key = line.split()
            lines.append(f"{site.addresses[name]} {kind} {key}\n")
    (site.project / "known_hosts").write_text("".join(lines))


# Runs in a scratch directory (MLflow's sqlite store writes ./mlruns there).
_BOOTSTRAP = """
import sys
from pathlib import Path
from generators.registry_repository import fill_repository
from gpufleet.lifecycle.configure import configure
from gpufleet.lifecycle.deploy import deploy
from gpufleet.lifecycle.environment import load_environment
from gpufleet.registry.client import ModelRegistry
from gpufleet.registry.demo import seed_demo

environment = load_environment("site", project_root=Path(sys.argv[1]))
specs = [item.spec for item in environment.models]
scratch = ModelRegistry(f"sqlite:///{Path.cwd()}/scratch.db")
seed_demo(scratch, specs)
fill_repository(scratch, environment.models, environment.repository)
hosts = environment.host_names
for outcome in configure(environment, hosts, say=print) + deploy(
    environment, hosts, say=print, fill=False
):
    if not outcome.succeeded:
        sys.exit(f"bootstrap: {outcome.host} {outcome.step} {outcome.status}: {outcome.reasons}")
seed_demo(environment.registry(), specs)
"""


@contextlib.contextmanager
def open_rebuild_site(
    engine: DockerEngine, host_image: str, key: SshKeyPair, work: Path, say: Any = print
) -> Iterator[RebuildSite]:
    """The site up and green: bare hosts, bootstrapped registry host, `gpufleet up`."""
    images = {
        "triton": ensure_image(engine, TRITON_TORCH, host_image, say),
        "mlflow": ensure_image(engine, MLFLOW, host_image, say),
        "postgres": ensure_image(engine, POSTGRES, host_image, say),
    }
    project = work / "project"
    project.mkdir()
    with (
        site_network(engine) as (network, subnet),
        FixedAddressPool(engine, host_image, key, work, network) as pool,
    ):
        addresses = {name: str(subnet[10 + index]) for index, name in enumerate(HOSTS)}
        hosts = {name: pool.start_at(address) for name, address in addresses.items()}
        site = RebuildSite(project, engine, pool, hosts, addresses)
        write_project(project, addresses, key.private_key, images)
        write_known_hosts(site)
        scratch = work / "bootstrap"
        scratch.mkdir()
        started = time.monotonic()
        bootstrap = subprocess.run(
            [sys.executable, "-c", _BOOTSTRAP, str(project)],
            cwd=scratch,
            env={**os.environ, **SECRETS, "PYTHONPATH": str(PROJECT_ROOT)},
            capture_output=True,
            text=True,
            timeout=2400,
            check=False,
        )
        if bootstrap.returncode != 0:
            raise CommandFailed(
                f"bootstrap failed:\n{bootstrap.stdout[-4000:]}{bootstrap.stderr[-4000:]}"
            )
        site.seconds["bootstrap"] = time.monotonic() - started
        started = time.monotonic()
        site.runs["up"] = site.gpufleet("up", "--stack", SITE, "--json")
        site.seconds["up"] = time.monotonic() - started
        yield site


def mlflow_login() -> contextlib.AbstractContextManager[None]:
    """This process's MLflow client logs in as the site's registry admin while inside."""
    names = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    return environment_variables({name: SECRETS[name] for name in names})


class InferenceLoad(threading.Thread):
    """Requests to one host's Triton over HTTP, one after another, counting the failures."""

    def __init__(self, address: str, port: int = 8000) -> None:
        super().__init__(daemon=True)
        self.url = f"http://{address}:{port}/v2/models/{MODEL}/infer"
        self.ok = 0
        self.failed: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        body = json.dumps(
            {
                "inputs": [
                    {"name": "features", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}
                ]
            }
        ).encode()
        while not self._stop_event.is_set():
            request = urllib.request.Request(
                self.url, data=body, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as answer:
                    outputs = json.loads(answer.read())["outputs"]
                    if len(outputs[0]["data"]) != 4:
                        raise ValueError(f"unexpected answer {outputs}")
                self.ok += 1
            except (OSError, ValueError, KeyError) as error:
                self.failed.append(f"{time.strftime('%H:%M:%S')} {error}")
            self._stop_event.wait(0.2)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=60)
