"""The serving stack of one host as a typed service graph: what runs, how, and who reaches it.

Built from the StackSpec (images, ports, monitoring, the registry), the host (its address, its
GPUs) and the models placed on it; `compose.py` renders it to docker-compose, and the
Prometheus, Grafana and MLflow renderers read the same graph, so a port or a service name is
decided in one place. Every host runs Triton and monitoring; only the registry host of
`gpufleet:registry` also runs MLflow (behind its basic-auth login) with Postgres.

    graph = build_service_graph("onprem-prod", spec, host, models)
    graph.service("triton").gpu_device_ids  # ("0",): the host's GPUs, when a model may use one
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gpufleet.spec.hosts import HostSpec
from gpufleet.spec.model import ModelSpec
from gpufleet.spec.registry import registry_host
from gpufleet.spec.serving import ServingSpec, check_bind_address
from gpufleet.spec.stack import StackSpec

MODELS_MOUNT = "/models"
# Inside the containers: the ports every image listens on (the host side comes from the spec).
TRITON_HTTP, TRITON_GRPC, TRITON_METRICS = 8000, 8001, 8002
MLFLOW_PORT, POSTGRES_PORT, PROMETHEUS_PORT, GRAFANA_PORT = 5000, 5432, 9090, 3000
GATEWAY_HTTP, GATEWAY_GRPC = 8080, 8081
# The gateway's configuration (generated beside the compose file) and its working directories.
GATEWAY_CONFIG_DIR = "/etc/gpufleet-gateway"
GATEWAY_WORK_DIR, GATEWAY_LOG_DIR = "/var/lib/gpufleet-gateway", "/var/log/gpufleet-gateway"
POSTGRES_DB = POSTGRES_USER = "mlflow"
# The secrets each service gets, from `<secrets_dir>/<service>.env` on the host (written by the
# serving_stack role, never generated): each service sees only its own.
SERVICE_SECRETS = {
    "triton": ("TRITON_ADMIN_KEY",),
    "postgres": ("POSTGRES_PASSWORD",),
    "mlflow": (
        "MLFLOW_BACKEND_STORE_URI",  # postgresql+psycopg2://mlflow:<password>@postgres
        "MLFLOW_AUTH_ADMIN_PASSWORD",  # the admin user's, created at MLflow's first start
        "MLFLOW_FLASK_SERVER_SECRET_KEY",  # the basic-auth app's session and CSRF key
    ),
    "grafana": ("GF_SECURITY_ADMIN_PASSWORD",),
}
ADMIN_KEY_HEADER = "triton-admin-key"
# secret_args.py, generated beside the compose file and Triton's command: it hands Triton the
# admin key without putting it on a command line (`ps` on the host shows every container's).
TRITON_LAUNCHER_DIR, TRITON_LAUNCHER_MOUNT = "./triton", "/gpufleet"
TRITON_LAUNCHER = f"{TRITON_LAUNCHER_MOUNT}/secret_args.py"
# MLflow's basic-auth app: its configuration (generated, no secret in it) and its user store.
MLFLOW_AUTH_CONFIG_DIR = "/etc/mlflow"
MLFLOW_AUTH_CONFIG = f"{MLFLOW_AUTH_CONFIG_DIR}/basic_auth.ini"
MLFLOW_AUTH_DB_DIR = "/mlflow/auth"
# Internal: no route out and nothing published; the edge network carries the published ports.
BACKEND_NETWORK, EDGE_NETWORK = "backend", "edge"


class ServiceGraphError(ValueError):
    """The host cannot run the stack as specified (no private address, a GPU it lacks)."""


@dataclass(frozen=True)
class PublishedPort:
    host_ip: str
    host_port: int
    container_port: int


@dataclass(frozen=True)
class Mount:
    """A named volume or a path relative to the stack directory, mounted into a container."""

    source: str
    target: str
    read_only: bool = False

    @property
    def is_named_volume(self) -> bool:
        return not self.source.startswith(".")


@dataclass(frozen=True)
class HealthCheck:
    command: tuple[str, ...]
    interval_s: int = 10
    timeout_s: int = 5
    retries: int = 6
    start_period_s: int = 30


@dataclass(frozen=True)
class Service:
    name: str
    image: str
    command: tuple[str, ...] = ()
    user: str | None = None
    environment: dict[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()  # variables of its env file on the host
    ports: tuple[PublishedPort, ...] = ()
    mounts: tuple[Mount, ...] = ()
    networks: tuple[str, ...] = (BACKEND_NETWORK,)
    healthcheck: HealthCheck | None = None
    depends_on_healthy: tuple[str, ...] = ()
    depends_on_started: tuple[str, ...] = ()  # started first, healthy or not
    gpu_device_ids: tuple[str, ...] = ()
    shm_size_mb: int | None = None
    ulimits: dict[str, int] = field(default_factory=dict)
    build_context: str | None = None  # an image nobody publishes, built on the host


@dataclass(frozen=True)
class ServiceGraph:
    stack: str
    host: str
    secrets_dir: str
    scrape_interval_s: int
    services: tuple[Service, ...]
    restart: Literal["unless-stopped"] = "unless-stopped"

    def service(self, name: str) -> Service:
        for service in self.services:
            if service.name == name:
                return service
        raise KeyError(name)

    def env_file(self, service: Service) -> str:
        return f"./{self.secrets_dir}/{service.name}.env"

    def has(self, name: str) -> bool:
        return any(service.name == name for service in self.services)

    @property
    def volumes(self) -> tuple[str, ...]:
        names = {m.source for s in self.services for m in s.mounts if m.is_named_volume}
        return tuple(sorted(names))


def build_service_graph(
    stack: str, spec: StackSpec, host: HostSpec, models: list[ModelSpec]
) -> ServiceGraph:
    """The services `host` runs; ServiceGraphError says what to change when it cannot."""
    serving = spec.serving or ServingSpec()
    bind_address = bind_address_of(serving, host)
    published = set(serving.publish)

    def publish(service: str, host_port: int, container_port: int) -> tuple[PublishedPort, ...]:
        if service not in published:
            return ()
        return (PublishedPort(bind_address, host_port, container_port),)

    def networks(*services: str) -> tuple[str, ...]:
        if published.intersection(services):
            return (BACKEND_NETWORK, EDGE_NETWORK)
        return (BACKEND_NETWORK,)

    triton = Service(
        name="triton",
        image=serving.images.triton,
        command=_triton_command(serving),
        user=serving.triton.user,
        secrets=SERVICE_SECRETS["triton"] if serving.triton.restricted_apis else (),
        ports=(
            *publish("triton_http", spec.ports.triton_http, TRITON_HTTP),
            *publish("triton_grpc", spec.ports.triton_grpc, TRITON_GRPC),
            *publish("triton_metrics", spec.ports.triton_metrics, TRITON_METRICS),
        ),
        mounts=(
            Mount("./model_repository", MODELS_MOUNT, read_only=True),
            *(
                (Mount(TRITON_LAUNCHER_DIR, TRITON_LAUNCHER_MOUNT, read_only=True),)
                if serving.triton.restricted_apis
                else ()
            ),
        ),
        networks=networks("triton_http", "triton_grpc", "triton_metrics"),
        healthcheck=HealthCheck(
            _http_probe(f"http://127.0.0.1:{TRITON_HTTP}/v2/health/ready"),
            start_period_s=120,  # loading every model comes first
        ),
        gpu_device_ids=_gpu_device_ids(host, models),
        shm_size_mb=serving.triton.shm_size_mb,
        # NVIDIA's advice for Triton: pinned memory and deep stacks.
        ulimits={"memlock": -1, "stack": 67108864} if serving.triton.unlimited_memlock else {},
    )
    postgres = Service(
        name="postgres",
        image=serving.images.postgres,
        environment={"POSTGRES_USER": POSTGRES_USER, "POSTGRES_DB": POSTGRES_DB},
        secrets=SERVICE_SECRETS["postgres"],
        mounts=(Mount("postgres-data", "/var/lib/postgresql/data"),),
        healthcheck=HealthCheck(
            ("pg_isready", "-U", POSTGRES_USER, "-d", POSTGRES_DB), start_period_s=30
        ),
    )
    mlflow = Service(
        name="mlflow",
        image=serving.images.mlflow,
        # The store URI (it holds the password) comes from MLFLOW_BACKEND_STORE_URI. The
        # basic-auth app asks every request but /health for a login.
        command=(
            *("mlflow", "server", "--host", "0.0.0.0", "--port", str(MLFLOW_PORT)),  # noqa: S104
            *("--serve-artifacts", "--artifacts-destination", "/mlflow/artifacts"),
            *("--app-name", "basic-auth"),
        ),
        secrets=SERVICE_SECRETS["mlflow"],
        environment={
            # MLflow 3 refuses Host headers it does not know (DNS rebinding): the service name
            # for the stack's own containers, the published address for everyone else.
            "MLFLOW_SERVER_ALLOWED_HOSTS": ",".join(
                (
                    f"mlflow:{MLFLOW_PORT}",
                    f"{url_host(bind_address)}:{spec.ports.mlflow}",
                    f"localhost:{MLFLOW_PORT}",  # the health check, inside the container
                    f"127.0.0.1:{MLFLOW_PORT}",
                )
            ),
            "MLFLOW_AUTH_CONFIG_PATH": MLFLOW_AUTH_CONFIG,
        },
        ports=publish("mlflow", spec.ports.mlflow, MLFLOW_PORT),
        mounts=(
            Mount("mlflow-artifacts", "/mlflow/artifacts"),
            Mount("mlflow-auth", MLFLOW_AUTH_DB_DIR),
            Mount("./mlflow", MLFLOW_AUTH_CONFIG_DIR, read_only=True),
        ),
        networks=networks("mlflow"),
        healthcheck=HealthCheck(_http_probe(f"http://127.0.0.1:{MLFLOW_PORT}/health")),
        depends_on_healthy=("postgres",),
        build_context="./images/mlflow" if serving.images.mlflow.startswith("gpufleet/") else None,
    )
    # One registry of record per environment: the other hosts serve what it holds.
    services = [triton, postgres, mlflow] if registry_host(spec) == host.name else [triton]
    if serving.gateway is not None:
        gateway = serving.gateway
        services.append(
            Service(
                name="gateway",
                image=gateway.image,
                command=("nginx", "-c", f"{GATEWAY_CONFIG_DIR}/nginx.conf", "-g", "daemon off;"),
                ports=(
                    *publish("gateway_http", gateway.http_port, GATEWAY_HTTP),
                    *publish("gateway_grpc", gateway.grpc_port, GATEWAY_GRPC),
                ),
                mounts=(
                    Mount("./gateway", GATEWAY_CONFIG_DIR, read_only=True),
                    Mount("gateway-logs", GATEWAY_LOG_DIR),
                ),
                networks=networks("gateway_http", "gateway_grpc"),
                # Debian's image has bash but neither curl nor python3.
                healthcheck=HealthCheck(
                    ("bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{GATEWAY_HTTP}"), start_period_s=10
                ),
                # Started after Triton (nginx resolves the name `triton` at its start), but not
                # held until Triton is healthy: compose v1 fails `up` outright when a dependency
                # turns unhealthy, as a Triton still loading large models past its start period
                # does. Until Triton is ready, requests through the gateway get a 502.
                depends_on_started=("triton",),
                build_context="./images/gateway" if gateway.image.startswith("gpufleet/") else None,
            )
        )
    monitoring = serving.monitoring
    if monitoring.prometheus:
        services.append(
            Service(
                name="prometheus",
                image=serving.images.prometheus,
                command=(
                    "--config.file=/etc/prometheus/prometheus.yml",
                    "--storage.tsdb.path=/prometheus",
                    f"--storage.tsdb.retention.time={monitoring.retention_days}d",
                    f"--web.listen-address=:{PROMETHEUS_PORT}",
                ),
                ports=publish("prometheus", serving.ports.prometheus, PROMETHEUS_PORT),
                mounts=(
                    Mount("./prometheus", "/etc/prometheus", read_only=True),
                    Mount("prometheus-data", "/prometheus"),
                ),
                networks=networks("prometheus"),
                healthcheck=HealthCheck(
                    ("wget", "-q", "-O", "/dev/null", f"http://127.0.0.1:{PROMETHEUS_PORT}/-/ready")
                ),
            )
        )
    if monitoring.grafana and monitoring.prometheus:
        services.append(
            Service(
                name="grafana",
                image=serving.images.grafana,
                environment={
                    "GF_SECURITY_ADMIN_USER": "admin",
                    "GF_AUTH_ANONYMOUS_ENABLED": "false",
                    "GF_USERS_ALLOW_SIGN_UP": "false",
                    "GF_ANALYTICS_REPORTING_ENABLED": "false",
                    "GF_ANALYTICS_CHECK_FOR_UPDATES": "false",
                },
                secrets=SERVICE_SECRETS["grafana"],
                ports=publish("grafana", serving.ports.grafana, GRAFANA_PORT),
                mounts=(
                    Mount("./grafana/provisioning", "/etc/grafana/provisioning", read_only=True),
                    Mount("./grafana/dashboards", "/var/lib/grafana/dashboards", read_only=True),
                    Mount("grafana-data", "/var/lib/grafana"),
                ),
                networks=networks("grafana"),
                # Grafana's image (Alpine) has busybox wget, not python3.
                healthcheck=HealthCheck(
                    ("wget", "-q", "-O", "/dev/null", f"http://127.0.0.1:{GRAFANA_PORT}/api/health")
                ),
                depends_on_healthy=("prometheus",),
            )
        )
    return ServiceGraph(
        stack=stack,
        host=host.name,
        secrets_dir=serving.secrets_dir,
        scrape_interval_s=monitoring.scrape_interval_s,
        services=tuple(services),
    )


def _http_probe(url: str) -> tuple[str, ...]:
    """A health check with the image's own python3 (Triton's and MLflow's images have no curl
    guarantee; both have python3): fails on a refused connection or a non-2xx answer."""
    return (
        "python3",
        "-c",
        "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=4)",
        url,
    )


def _triton_command(serving: ServingSpec) -> tuple[str, ...]:
    command = [
        "tritonserver",
        f"--model-repository={MODELS_MOUNT}",
        "--model-control-mode=explicit",
        "--load-model=*",
        "--strict-readiness=true",
        "--exit-on-error=false",  # one bad model must not take the others down
        f"--http-port={TRITON_HTTP}",
        f"--grpc-port={TRITON_GRPC}",
        f"--metrics-port={TRITON_METRICS}",
        "--allow-metrics=true",
        "--allow-gpu-metrics=true",
        # p50/p99 per model for the dashboard and the queue alert (summaries, not only counters)
        "--metrics-config=summary_latencies=true",
    ]
    restricted = ",".join(serving.triton.restricted_apis)
    if not restricted:
        return tuple(command)
    # The key lives in the env file. secret_args.py expands the template for Triton's main()
    # only: Triton's command line keeps `${TRITON_ADMIN_KEY}`, so neither a generated file nor
    # `ps` shows the key. (`$$` is compose's escape for a literal `$`.)
    key = f"{restricted}:{ADMIN_KEY_HEADER}=$${{TRITON_ADMIN_KEY}}"
    return (
        *("python3", TRITON_LAUNCHER, *command),
        f"--http-restricted-api={key}",
        f"--grpc-restricted-protocol={key}",
    )


def bind_address_of(serving: ServingSpec, host: HostSpec) -> str:
    address = serving.bind_address or host.known_address()
    if address is None:
        raise ServiceGraphError(
            f"host {host.name} has no IP address to publish the stack on; set its address "
            "(or the proxmox network's ipv4), or serving.bind_address"
        )
    try:
        return check_bind_address(address)
    except ValueError as error:
        raise ServiceGraphError(
            f"host {host.name}: {error}; or set serving.bind_address to its private address"
        ) from None


def url_host(address: str) -> str:
    """An address as a URL or compose port needs it: IPv6 in brackets."""
    return f"[{address}]" if ":" in address else address


def _gpu_device_ids(host: HostSpec, models: list[ModelSpec]) -> tuple[str, ...]:
    """Every GPU of the host when a model may run on one, else none.

    All of them, not only those the instance groups name: the container runtime numbers the
    GPUs it is given from 0, so a group on GPU 1 given only GPU 1 would find no GPU 1. Groups of
    kind auto or model (and a model with no groups, which Triton treats as auto) take GPUs
    where there are any.
    """
    available = host.gpus.count if host.gpus else 0
    may_use_gpu = False
    for model in models:
        if not model.instance_groups and not model.is_ensemble:
            may_use_gpu = True
        for index, group in enumerate(model.instance_groups):
            if group.kind == "cpu":
                continue
            may_use_gpu = True
            if group.kind != "gpu":
                continue
            if available == 0:
                raise ServiceGraphError(
                    f"model {model.name} instance_groups[{index}] runs on GPUs but host "
                    f"{host.name} has none; place the model on a GPU host or use kind: cpu"
                )
            missing = [gpu for gpu in group.gpus if gpu >= available]
            if missing:
                raise ServiceGraphError(
                    f"model {model.name} instance_groups[{index}] uses GPU {missing[0]} but "
                    f"host {host.name} has {available} (0-{available - 1}); change gpus"
                )
    if not may_use_gpu:
        return ()
    return tuple(str(gpu) for gpu in range(available))
