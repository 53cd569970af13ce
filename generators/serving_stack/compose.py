"""Service graph -> `docker-compose.yml` (the compose specification, no `version:` key).

Deterministic: services in the graph's order, keys in a fixed order, so the same graph gives
the same bytes. GPUs are device reservations (`deploy.resources.reservations.devices`), which
both `docker compose` and docker-compose 1.28+ hand to the nvidia runtime.

    text = render_compose(build_service_graph(stack, spec, host, models))
"""

from __future__ import annotations

from typing import Any

import yaml

from generators.serving_stack.graph import (
    BACKEND_NETWORK,
    EDGE_NETWORK,
    HealthCheck,
    Service,
    ServiceGraph,
    url_host,
)


def render_compose(graph: ServiceGraph, header: str) -> str:
    document: dict[str, Any] = {
        "services": {service.name: _service(graph, service) for service in graph.services},
        "networks": {
            # internal: no route out of the host; Postgres and the metrics live only here.
            BACKEND_NETWORK: {"internal": True},
            EDGE_NETWORK: {},
        },
        "volumes": {name: {} for name in graph.volumes},
    }
    return header + yaml.safe_dump(document, sort_keys=False, default_flow_style=False, width=1000)


def _service(graph: ServiceGraph, service: Service) -> dict[str, Any]:
    rendered: dict[str, Any] = {"image": service.image}
    if service.build_context:
        rendered["build"] = {"context": service.build_context}
    if service.command:
        rendered["command"] = list(service.command)
    if service.user:
        rendered["user"] = service.user
    if service.environment:
        rendered["environment"] = dict(service.environment)
    if service.secrets:
        rendered["env_file"] = [graph.env_file(service)]
    if service.ports:
        rendered["ports"] = [
            f"{url_host(port.host_ip)}:{port.host_port}:{port.container_port}"
            for port in service.ports
        ]
    if service.mounts:
        rendered["volumes"] = [
            f"{mount.source}:{mount.target}{':ro' if mount.read_only else ''}"
            for mount in service.mounts
        ]
    rendered["networks"] = list(service.networks)
    depends_on = {name: {"condition": "service_started"} for name in service.depends_on_started}
    depends_on |= {name: {"condition": "service_healthy"} for name in service.depends_on_healthy}
    if depends_on:
        rendered["depends_on"] = depends_on
    if service.healthcheck:
        rendered["healthcheck"] = _healthcheck(service.healthcheck)
    if service.shm_size_mb:
        rendered["shm_size"] = f"{service.shm_size_mb}m"
    if service.ulimits:
        rendered["ulimits"] = dict(service.ulimits)
    if service.gpu_device_ids:
        rendered["deploy"] = {
            "resources": {
                "reservations": {
                    "devices": [
                        {
                            "driver": "nvidia",
                            "device_ids": list(service.gpu_device_ids),
                            "capabilities": ["gpu"],
                        }
                    ]
                }
            }
        }
    rendered["restart"] = graph.restart
    rendered["security_opt"] = ["no-new-privileges:true"]
    rendered["logging"] = {"driver": "json-file", "options": {"max-size": "50m", "max-file": "5"}}
    return rendered


def _healthcheck(check: HealthCheck) -> dict[str, Any]:
    return {
        "test": ["CMD", *check.command],
        "interval": f"{check.interval_s}s",
        "timeout": f"{check.timeout_s}s",
        "retries": check.retries,
        "start_period": f"{check.start_period_s}s",
    }
