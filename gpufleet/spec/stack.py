"""StackSpec: one environment, read from the `gpufleet:` keys of `stacks/Pulumi.<stack>.yaml`.

Pulumi keeps a stack's configuration under `config:` with namespaced keys; the keys in the
`gpufleet` namespace (`gpufleet:environment`, `gpufleet:models`, ...) are this spec's fields.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from gpufleet.spec.azure import DATA_DISK_MOUNT, AzureEnvironment, check_azure_stack
from gpufleet.spec.hosts import HostConfig, HostSpec
from gpufleet.spec.model import MODEL_NAME_PATTERN, SpecModel
from gpufleet.spec.paths import check_directory, is_within
from gpufleet.spec.problems import FieldValueError
from gpufleet.spec.proxmox import ProxmoxCluster
from gpufleet.spec.registry import RegistrySpec, check_registry, check_tracking_uri
from gpufleet.spec.serving import ServingSpec

CONFIG_NAMESPACE = "gpufleet"
DEFAULT_MODEL_REPOSITORY = "build/model_repository"
DEFAULT_SERVING_DIRECTORY = "/opt/gpufleet/serving"
GateName = Literal["host", "correctness", "load"]
GATE_NAMES: tuple[GateName, ...] = ("host", "correctness", "load")
# What gpufleet keeps in a stack's state_dir: the model repository must not be (in) one of them.
STATE_SUBDIRECTORIES = (
    "ansible",
    "serving",
    "mlflow",
    "triton",
    "reports",
    "gateway",
    "rollout",
)
EnvironmentKind = Literal["local", "static", "proxmox", "azure"]
Port = Annotated[int, Field(ge=1, le=65535)]


class StackPorts(SpecModel):
    """Ports of the stack's servers (Triton's defaults and MLflow's)."""

    triton_http: Port = 8000
    triton_grpc: Port = 8001
    triton_metrics: Port = 8002
    mlflow: Port = Field(default=5000, description="The local MLflow server (local stacks).")

    @model_validator(mode="after")
    def _distinct(self) -> StackPorts:
        ports = self.model_dump()
        seen: dict[int, str] = {}
        for name, port in ports.items():
            if port in seen:
                raise ValueError(f"{name} and {seen[port]} are both port {port}; give each its own")
            seen[port] = name
        return self


class GatewaySpec(SpecModel):
    """The nginx gateway a local stack runs in front of Triton (docs/rollout.md), on loopback."""

    http: Port = Field(description="Port of the gateway's HTTP listener (Triton's HTTP API).")
    grpc: Port = Field(description="Port of the gateway's gRPC listener (passed through).")
    worker_processes: int = Field(default=2, ge=1, le=64, description="nginx worker processes.")

    @model_validator(mode="after")
    def _distinct(self) -> GatewaySpec:
        if self.http == self.grpc:
            raise ValueError(f"http and grpc are both port {self.http}; give each its own")
        return self


class LoadGateSettings(SpecModel):
    """How the load gate measures: perf_analyzer's method of stable time windows."""

    window_s: float = Field(default=1.0, gt=0, le=60, description="Length of one window.")
    stable_windows: int = Field(
        default=3, ge=2, le=10, description="Consecutive windows that must agree."
    )
    stability_percent: float = Field(
        default=10.0,
        gt=0,
        le=100,
        description="How far those windows may differ (throughput and latency).",
    )
    max_windows: int = Field(
        default=10, ge=2, le=100, description="Give up on stability after this many windows."
    )


class StackSpec(SpecModel):
    """What an environment runs, where its servers listen, and the gates that check it."""

    environment: EnvironmentKind = Field(
        description="Where the stack runs: this machine (local), machines that already exist "
        "and are listed by address (static), Proxmox VMs or Azure VMs."
    )
    models: list[Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]] = Field(
        default_factory=list,
        description="Names of the model specs (modelconfigs/<name>.yaml) this stack serves; "
        "empty means every spec.",
    )
    model_repository: str = Field(
        default=DEFAULT_MODEL_REPOSITORY,
        description="Directory of the generated Triton model repository, relative to the "
        "directory gpufleet runs in (the project root).",
    )
    state_dir: str | None = Field(
        default=None,
        description="Where a local stack keeps its MLflow store, server logs, run state and "
        "gate reports; default build/<stack>.",
    )
    ports: StackPorts = Field(default_factory=StackPorts)
    gateway: GatewaySpec | None = Field(
        default=None,
        description="Local stacks: the nginx gateway in front of Triton that splits, mirrors and "
        "switches traffic between a model's versions (`gpufleet rollout`); none without it.",
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking server with the model registry of a local stack; default: "
        "the local server gpufleet starts on 127.0.0.1:<ports.mlflow>. Other stacks name "
        "theirs in gpufleet:registry.",
    )
    gates: list[GateName] = Field(
        default_factory=lambda: list(GATE_NAMES), description="Validation gates to run."
    )
    load_gate: LoadGateSettings = Field(default_factory=LoadGateSettings)
    min_free_disk_gb: float = Field(
        default=1.0, ge=0, description="Free space the host gate requires for the repository."
    )
    hosts: list[HostSpec] = Field(
        default_factory=list,
        description="The GPU hosts `gpufleet configure` converges with Ansible and the host "
        "gate checks.",
    )
    host_config: HostConfig = Field(default_factory=HostConfig)
    proxmox: ProxmoxCluster | None = Field(
        default=None, description="The Proxmox cluster of a proxmox stack."
    )
    serving: ServingSpec | None = Field(
        default=None,
        description="The docker-compose serving stack each host runs (Triton, Prometheus, "
        "Grafana; MLflow with Postgres on the registry host); `gpufleet generate --stack` "
        "renders it per host.",
    )
    registry: RegistrySpec | None = Field(
        default=None,
        description="The environment's one MLflow registry of record: host (a host of the "
        "stack runs it in its serving stack) or tracking_uri (an external MLflow). Required "
        "with serving.",
    )
    azure: AzureEnvironment | None = Field(
        default=None,
        description="The Azure environment of an azure stack: location, resource group, "
        "network, SSH sources, admin login.",
    )

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _http_uri(cls, uri: str | None, info: ValidationInfo) -> str | None:
        if uri is None:
            return None
        check_tracking_uri(uri)
        host = urllib.parse.urlsplit(uri).hostname or ""
        if info.data.get("environment") == "local" and not _is_loopback(host):
            raise ValueError(
                f"a local stack talks to loopback only, not {host!r}; leave "
                "mlflow_tracking_uri out to use the local MLflow server"
            )
        return uri

    @field_validator("model_repository", "state_dir")
    @classmethod
    def _own_directory(cls, path: str | None) -> str | None:
        return None if path is None else check_directory(path)

    @model_validator(mode="after")
    def _repository_apart_from_state(self) -> StackSpec:
        # The role copies the whole repository to every host and Triton loads all of it: the
        # Ansible private data (extravars) or a server's store must never be inside it.
        state = self.state_dir
        if state is None:
            return self
        repository = self.model_repository
        if is_within(state, repository):
            raise FieldValueError(
                ("state_dir",),
                f"{state!r} is inside the model repository {repository!r}, which is copied to "
                "every host; keep state_dir and model_repository apart",
            )
        for name in STATE_SUBDIRECTORIES:
            if is_within(repository, f"{state}/{name}"):
                raise FieldValueError(
                    ("model_repository",),
                    f"{repository!r} is inside {state}/{name}, where gpufleet keeps the "
                    "stack's state; use another directory, such as "
                    f"{state}/model_repository",
                )
        return self

    @model_validator(mode="after")
    def _gateway_ports_free(self) -> StackSpec:
        if self.gateway is None:
            return self
        if self.environment != "local":
            raise FieldValueError(
                ("gateway",),
                f"is for local stacks; a {self.environment} stack's hosts run the gateway in "
                "their serving stack (gpufleet:serving)",
            )
        taken = {port: name for name, port in self.ports.model_dump().items()}
        for name in ("http", "grpc"):
            port = getattr(self.gateway, name)
            if port in taken:
                raise FieldValueError(
                    ("gateway", name),
                    f"port {port} is also ports.{taken[port]}; give the gateway its own port",
                )
        return self

    @field_validator("gates")
    @classmethod
    def _gates_once(cls, gates: list[str]) -> list[str]:
        if len(set(gates)) != len(gates):
            raise ValueError("name each gate once")
        return gates

    @field_validator("hosts")
    @classmethod
    def _host_names_once(cls, hosts: list[HostSpec]) -> list[HostSpec]:
        names = [host.name for host in hosts]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"host names must be unique; {', '.join(repeated)} repeated")
        return hosts

    @model_validator(mode="after")
    def _proxmox_hosts(self) -> StackSpec:
        if self.environment != "proxmox":
            if self.proxmox is not None or any(host.proxmox for host in self.hosts):
                raise ValueError("proxmox settings belong to proxmox stacks only")
            return self
        if self.proxmox is None:
            raise ValueError("a proxmox stack needs gpufleet:proxmox (endpoint, login, template)")
        if not self.hosts:
            raise ValueError("a proxmox stack lists its VMs under gpufleet:hosts")
        raw_pci_allowed = self.proxmox.user == "root@pam"
        for index, host in enumerate(self.hosts):
            where = f"hosts[{index}] ({host.name})"
            if host.proxmox is None:
                raise ValueError(f"{where}: a proxmox host needs a proxmox block (node, ...)")
            raw = [device.address for device in host.proxmox.pci if device.address]
            if raw and not raw_pci_allowed:
                login = (
                    f"API token {self.proxmox.token_id}"
                    if self.proxmox.uses_token
                    else (f"user {self.proxmox.user}")
                )
                raise ValueError(
                    f"{where}: raw PCI address {raw[0]} needs root@pam with a password, not "
                    f"{login}; map the device (Datacenter > Resource Mappings > PCI) and "
                    "use mapping: <name>"
                )
            if host.gpus and len(host.proxmox.pci) != host.gpus.count:
                raise ValueError(
                    f"{where}: gpus.count is {host.gpus.count} but proxmox.pci passes "
                    f"{len(host.proxmox.pci)} device(s) through; make them agree"
                )
        return self

    @model_validator(mode="after")
    def _azure_hosts(self) -> StackSpec:
        check_azure_stack(self)
        return self

    @model_validator(mode="after")
    def _static_hosts(self) -> StackSpec:
        if self.environment == "local" and self.hosts:
            raise ValueError(
                "a local stack is this machine and has no hosts; list machines in a static, "
                "proxmox or azure stack"
            )
        if self.environment != "static":
            return self
        if not self.hosts:
            raise ValueError("a static stack lists its machines under gpufleet:hosts")
        for index, host in enumerate(self.hosts):
            if host.address is None:
                raise ValueError(
                    f"hosts[{index}] ({host.name}): a static host needs an address (IP or DNS name)"
                )
        return self

    @model_validator(mode="after")
    def _service_gates_need_serving(self) -> StackSpec:
        """Correctness and load gates talk to a host's Triton, which the serving stack runs."""
        if self.environment == "local" or self.serving is not None:
            return self
        if "gates" not in self.model_fields_set:
            object.__setattr__(self, "gates", ["host"])
        elif set(self.gates) - {"host"}:
            raise ValueError(
                "the correctness and load gates check each host's Triton, which runs in the "
                "serving stack; add gpufleet:serving, or use gates: [host]"
            )
        return self

    @model_validator(mode="after")
    def _serving_on_hosts(self) -> StackSpec:
        if self.serving is not None and self.environment == "local":
            raise ValueError(
                "a local stack serves from this machine's Triton binary, not a compose stack; "
                "put serving in a static, proxmox or azure stack"
            )
        return self

    @model_validator(mode="after")
    def _one_registry(self) -> StackSpec:
        check_registry(self)
        return self

    def serving_directory(self) -> str:
        """Where the serving stack lives on each host (on Azure: the VM's data disk)."""
        if self.serving is not None and self.serving.directory:
            return self.serving.directory
        if self.environment == "azure":
            return f"{DATA_DISK_MOUNT}/serving"
        return DEFAULT_SERVING_DIRECTORY

    def resolved_state_dir(self, stack_name: str) -> str:
        return self.state_dir or f"build/{stack_name}"

    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"http://127.0.0.1:{self.ports.mlflow}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
