"""What a host holds that lives nowhere else, read from its serving stack's service graph.

The registry host of `gpufleet:registry` keeps the registry: Postgres (models, versions,
aliases, tags, runs), MLflow's artifacts and its user store, in named volumes. A host running
Grafana keeps Grafana's database (users, folders, dashboards made in the UI); Prometheus keeps
its time series. Everything else on a host is generated from the specs and redeployed.

    holdings = host_holdings(environment, "gpu-a")
    holdings.registry, holdings.grafana, holdings.prometheus
"""

from __future__ import annotations

import dataclasses

from generators.serving_stack.graph import build_service_graph
from gpufleet.lifecycle.environment import Environment
from gpufleet.rebuild.remote import HostShell, RemoteError


@dataclasses.dataclass(frozen=True)
class Holdings:
    registry: bool  # Postgres, MLflow's artifacts and user store
    grafana: bool
    prometheus: bool

    def listed(self) -> list[str]:
        items = []
        if self.registry:
            items += ["registry database (Postgres)", "registry artifacts", "MLflow users"]
        if self.grafana:
            items.append("Grafana's database")
        if self.prometheus:
            items.append("Prometheus history (kept only with --keep-prometheus)")
        return items


def host_holdings(environment: Environment, host: str) -> Holdings:
    if environment.spec.serving is None:
        return Holdings(False, False, False)
    graph = build_service_graph(
        environment.name,
        environment.spec,
        environment.host(host),
        [item.spec for item in environment.models],
    )
    return Holdings(
        registry=graph.has("postgres") and graph.has("mlflow"),
        grafana=graph.has("grafana"),
        prometheus=graph.has("prometheus"),
    )


def compose_project(environment: Environment) -> str:
    """The compose project the serving_stack role names the host's stack."""
    return f"gpufleet-{environment.name}"


def container_of(shell: HostShell, project: str, service: str) -> str:
    """The id of the service's running container on the host; RemoteError when none runs."""
    listed = shell.run(
        "docker ps -q --filter label=com.docker.compose.project="
        f"{project} --filter label=com.docker.compose.service={service}",
        timeout=60,
    ).stdout.split()
    if len(listed) != 1:
        found = "no" if not listed else f"{len(listed)}"
        raise RemoteError(
            f"{shell.name}: {found} running {service} container(s) of {project}; "
            "the service must run to be backed up or restored"
        )
    return listed[0]
