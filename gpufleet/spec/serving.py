"""The serving stack each GPU host runs (`gpufleet:serving`): images, published ports, monitoring.

`generators/serving_stack/` turns it, with the host and the models placed on it, into one
typed service graph (Triton, Prometheus, Grafana; MLflow with Postgres on the registry host of
`gpufleet:registry`) and renders that graph to `docker-compose.yml`, Prometheus's configuration
and rules, Grafana's provisioning and MLflow's auth configuration. Secrets (the Postgres
password, the MLflow and Grafana admin passwords, Triton's admin key) are never part of the
spec: they live in env files on the host that nothing here generates.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import Field, field_validator

from gpufleet.spec.model import SpecModel
from gpufleet.spec.paths import check_directory

Port = Annotated[int, Field(ge=1, le=65535)]
RestrictedApi = Literal[
    "model-repository", "shared-memory", "model-config", "statistics", "trace", "logging"
]
PublishedService = Literal[
    "triton_http",
    "triton_grpc",
    "triton_metrics",
    "mlflow",
    "prometheus",
    "grafana",
    "gateway_http",
    "gateway_grpc",
]
# name[:port]/path:tag or @sha256:digest; a tag is required so a host never drifts to `latest`.
_IMAGE = re.compile(
    r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)*"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|@sha256:[0-9a-f]{64})$"
)

# What the serving_stack role puts beside the secrets directory on the host.
STACK_DIRECTORY_ENTRIES = (
    "model_repository",
    "docker-compose.yml",
    ".gpufleet-generated.json",
    "images",
    "prometheus",
    "grafana",
)


def check_pinned_image(reference: str) -> str:
    if not _IMAGE.match(reference):
        raise ValueError(
            f"{reference!r} is not an image reference with a tag or digest; write "
            "registry/name:tag (for example nvcr.io/nvidia/tritonserver:24.10-py3)"
        )
    if reference.endswith(":latest"):
        raise ValueError(f"{reference!r} floats with every release; pin a version tag or digest")
    return reference


ImageReference = Annotated[str, Field(min_length=3, max_length=256)]


class ServingImages(SpecModel):
    """The container images of the stack, each pinned by tag or digest."""

    triton: ImageReference = Field(
        default="nvcr.io/nvidia/tritonserver:24.10-py3",
        description="Triton Inference Server (24.10 is Triton 2.51, the version tested here).",
    )
    mlflow: ImageReference = Field(
        default="gpufleet/mlflow-postgres:3.17.2",
        description="MLflow tracking server with the Postgres driver; the official image lacks "
        "psycopg2, so the default is built on the host from stacks/images/mlflow/.",
    )
    postgres: ImageReference = Field(default="postgres:16.4", description="MLflow's database.")
    prometheus: ImageReference = Field(default="prom/prometheus:v2.54.1")
    grafana: ImageReference = Field(default="grafana/grafana:11.2.2")

    @field_validator("*")
    @classmethod
    def _pinned(cls, reference: str) -> str:
        return check_pinned_image(reference)


class ServingGateway(SpecModel):
    """The nginx gateway in front of Triton on each host (docs/rollout.md): Debian's nginx in an
    image built on the host; its configuration generated beside the compose file."""

    image: ImageReference = Field(
        default="gpufleet/gateway-nginx:1.22.1",
        description="An image with nginx; the default is built on the host from Debian 12's "
        "nginx package (images/gateway/Dockerfile beside the compose file).",
    )
    http_port: Port = Field(default=8080, description="Host port of the gateway's HTTP side.")
    grpc_port: Port = Field(default=8081, description="Host port of the gateway's gRPC side.")
    worker_processes: int = Field(default=2, ge=1, le=64)

    @field_validator("image")
    @classmethod
    def _pinned(cls, reference: str) -> str:
        return check_pinned_image(reference)


class ServingPorts(SpecModel):
    """Host ports of the monitoring services (Triton's and MLflow's are `gpufleet:ports`)."""

    prometheus: Port = 9090
    grafana: Port = 3000


class AlertThresholds(SpecModel):
    """When Prometheus's alert rules fire."""

    queue_time_ms: float = Field(
        default=100.0, gt=0, description="Mean time a request waits in Triton's queue (5 min)."
    )
    error_ratio: float = Field(
        default=0.01, gt=0, lt=1, description="Failed requests / all requests of a model (5 min)."
    )
    gpu_memory_ratio: float = Field(
        default=0.9, gt=0, le=1, description="GPU memory used / total, held for 10 minutes."
    )
    down_for_s: int = Field(
        default=60, ge=0, le=3600, description="How long Triton must be unreachable to alert."
    )


class Monitoring(SpecModel):
    """Prometheus scraping Triton, and Grafana showing it."""

    prometheus: bool = True
    grafana: bool = True
    scrape_interval_s: int = Field(
        default=15,
        ge=1,
        le=60,
        description="At most 60 s: the alert rules' 5-minute rates need several samples.",
    )
    retention_days: int = Field(default=15, ge=1, le=3650)
    alerts: AlertThresholds = Field(default_factory=AlertThresholds)


class TritonService(SpecModel):
    """How Triton runs in the stack."""

    shm_size_mb: int = Field(
        default=1024,
        ge=64,
        le=1048576,
        description="Shared memory size (the python backend's tensors).",
    )
    user: str = Field(
        default="1000:1000",
        pattern=r"^[1-9][0-9]*(:[1-9][0-9]*)?$",
        description="Non-root uid[:gid] Triton runs as (1000 is triton-server in NVIDIA's image).",
    )
    unlimited_memlock: bool = Field(
        default=True,
        description="NVIDIA's advice for Triton (--ulimit memlock=-1 --ulimit stack=67108864); "
        "off where the container runtime may not raise limits (rootless, sandboxes).",
    )
    restricted_apis: list[RestrictedApi] = Field(
        default_factory=lambda: list[RestrictedApi](
            ["model-repository", "shared-memory", "statistics", "trace", "logging"]
        ),
        description="APIs that need the admin key header (TRITON_ADMIN_KEY in the env file), "
        "as Triton's secure-deployment guide advises: loading models, registering shared "
        "memory, and reading statistics or changing trace and log settings stay with "
        "operators (Prometheus reads the metrics port, which this does not cover).",
    )


class MlflowService(SpecModel):
    """How MLflow runs on the registry host: behind its own basic-auth login, always."""

    admin_user: str = Field(
        default="admin",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="MLflow's admin user, created with the password from "
        "secrets_env.mlflow_admin_password the first time MLflow starts (later changes of "
        "either are ignored by MLflow: rotate through its API, docs/serving-stack.md).",
    )


EnvName = Annotated[str, Field(pattern=r"^[A-Z_][A-Z0-9_]*$")]


class ServingSecrets(SpecModel):
    """Names of the environment variables `gpufleet configure` reads the stack's secrets from
    (on the machine that runs it); the values go to the host's env files and nowhere else."""

    # Variable names, not values (hence the noqa for "hard-coded password").
    postgres_password: EnvName = "GPUFLEET_POSTGRES_PASSWORD"  # noqa: S105
    grafana_admin_password: EnvName = "GPUFLEET_GRAFANA_ADMIN_PASSWORD"  # noqa: S105
    triton_admin_key: EnvName = Field(
        default="GPUFLEET_TRITON_ADMIN_KEY",
        description="The header value that unlocks Triton's restricted APIs.",
    )
    mlflow_admin_password: EnvName = Field(
        default="GPUFLEET_MLFLOW_ADMIN_PASSWORD",
        description="The password of MLflow's admin user (serving.mlflow.admin_user) on the "
        "registry host; at least 12 characters.",
    )


class ServingSpec(SpecModel):
    """What runs on each host of the stack, and who may reach it."""

    images: ServingImages = Field(default_factory=ServingImages)
    publish: list[PublishedService] = Field(
        default_factory=lambda: list[PublishedService](["triton_http", "triton_grpc", "grafana"]),
        description="Services reachable from outside the host, on its private address; the "
        "rest (Postgres always, Triton's metrics, Prometheus, MLflow) stay on the stack's "
        "internal network. mlflow is published on the registry host only (gpufleet:registry "
        "host), where it asks for a login; list it when the registry is a host of the stack.",
    )
    bind_address: str | None = Field(
        default=None,
        description="Private (or loopback) IP address to publish on; default: each host's own "
        "address. Never 0.0.0.0 or a public address.",
    )
    ports: ServingPorts = Field(default_factory=ServingPorts)
    gateway: ServingGateway | None = Field(
        default=None,
        description="nginx in front of Triton (publish gateway_http / gateway_grpc to reach "
        "it); routes each model's HTTP requests to the version Triton should answer with.",
    )
    monitoring: Monitoring = Field(default_factory=Monitoring)
    triton: TritonService = Field(default_factory=TritonService)
    mlflow: MlflowService = Field(default_factory=MlflowService)
    directory: str | None = Field(
        default=None,
        pattern=r"^/[A-Za-z0-9._/-]+$",
        description="Where the serving_stack role puts the stack and its model repository on "
        "the host; default /opt/gpufleet/serving, on azure stacks /srv/gpufleet/serving (the "
        "data disk).",
    )
    secrets_dir: str = Field(
        default="secrets",
        pattern=r"^[A-Za-z0-9._-]+$",
        description="Directory beside docker-compose.yml on the host with one 0600 env file per "
        "service (triton.env: TRITON_ADMIN_KEY, postgres.env: POSTGRES_PASSWORD, mlflow.env: "
        "MLFLOW_BACKEND_STORE_URI, MLFLOW_AUTH_ADMIN_PASSWORD, MLFLOW_FLASK_SERVER_SECRET_KEY, "
        "grafana.env: GF_SECURITY_ADMIN_PASSWORD); written by the serving_stack role, never "
        "generated.",
    )

    secrets_env: ServingSecrets = Field(default_factory=ServingSecrets)
    image_archives: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9._/~-]+[.]tar(?:[.]gz)?$")]] = (
        Field(
            default_factory=list,
            description="For sites without a container registry: `docker save` archives (.tar "
            "or .tar.gz) on the machine that runs gpufleet, relative to the project root. The "
            "serving_stack role copies and loads them on a host that lacks one of the stack's "
            "images; hosts that have every image are left alone.",
        )
    )

    @field_validator("publish")
    @classmethod
    def _publish_once(cls, services: list[str]) -> list[str]:
        if len(set(services)) != len(services):
            raise ValueError("name each published service once")
        return services

    @field_validator("bind_address")
    @classmethod
    def _private_address(cls, address: str | None) -> str | None:
        if address is None:
            return None
        return check_bind_address(address)

    @field_validator("directory")
    @classmethod
    def _own_directory(cls, directory: str | None) -> str | None:
        return None if directory is None else check_directory(directory, absolute=True)

    @field_validator("secrets_dir")
    @classmethod
    def _secrets_apart(cls, name: str) -> str:
        if name in (".", "..") or name in STACK_DIRECTORY_ENTRIES:
            raise ValueError(
                f"{name!r} is the stack directory itself, its parent, or a name the stack "
                f"already uses ({', '.join(STACK_DIRECTORY_ENTRIES)}); use a directory of its "
                "own such as secrets"
            )
        return name


def check_bind_address(address: str) -> str:
    """A private or loopback IP address, or ValueError saying why not."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"{address!r} is not an IP address; publish on an IP address") from None
    if ip.is_unspecified:
        raise ValueError(
            f"{address} publishes on every interface, the internet's included; use the "
            "host's private address"
        )
    if not (ip.is_private or ip.is_loopback) or ip.is_link_local or ip.is_multicast:
        raise ValueError(
            f"{address} is not a private address; publish on the host's private network "
            "(10/8, 172.16/12, 192.168/16, fc00::/7) and put a proxy in front for the rest"
        )
    return address
