"""The containers layer: on each host, the serving stack's running containers against the compose
file the specs generate now, read over SSH the way the host gate reaches hosts (testinfra,
strict host keys; `docker inspect`, never an env file's content).

Per service of the host's compose file: a container of the compose project (label
`com.docker.compose.project=gpufleet-<stack>`) exists and runs, with the same image reference
and the same published ports and addresses; its env file is present on the host (only
`test -f`). A container of the project that no service names is an item too.

    check = check_containers(environment, "gpu-a")
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import PurePosixPath
from typing import Any

import yaml

from generators.ansible_inventory import InventoryError
from generators.serving_stack.files import COMPOSE_FILE, render_serving_files
from gpufleet.drift.items import DriftItem, LayerCheck
from gpufleet.lifecycle.environment import Environment
from gpufleet.spec.problems import SpecError
from validation.gpu_host import gpu_host_targets
from validation.host import connect

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"


def compose_project(stack: str) -> str:
    """The compose project the serving_stack role runs (generators/ansible_inventory.py)."""
    return f"gpufleet-{stack}"


def check_containers(environment: Environment, host: str) -> LayerCheck:
    """Compare `host`'s running containers with its generated compose file."""
    started = time.monotonic()
    check = LayerCheck("containers", host)
    try:
        files = render_serving_files(environment.loaded, environment.models)
        compose = yaml.safe_load(files[f"{host}/{COMPOSE_FILE}"])
        [target] = gpu_host_targets(
            environment.name,
            environment.spec,
            project_root=environment.project_root,
            limit=host,
        )
        remote = connect(target.hostspec, **target.backend_options)
        containers = _inspect(remote, compose_project(environment.name))
        _compare(environment, host, compose, containers, remote, check)
    except SpecError as error:
        check.error = "could not be checked: " + "; ".join(map(str, error.problems))
    except (InventoryError, KeyError, ValueError) as error:
        check.error = f"could not be checked: {error}"
    except Exception as error:  # SSH and docker failures: named, the layer exits 2
        check.error = (
            f"could not be checked: {host} over SSH: {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}"
        )
    check.seconds = time.monotonic() - started
    return check


def _inspect(remote: Any, project: str) -> list[dict[str, Any]]:
    """`docker inspect` of every container of the compose project (running or not)."""
    listing = remote.run(
        f"docker ps --all --quiet --filter label={shlex.quote(f'{PROJECT_LABEL}={project}')}"
    )
    if listing.rc != 0:
        raise ValueError(f"docker ps failed: {(listing.stderr or listing.stdout).strip()}")
    ids = listing.stdout.split()
    if not ids:
        return []
    inspected = remote.run("docker inspect " + " ".join(shlex.quote(i) for i in ids))
    if inspected.rc != 0:
        raise ValueError(f"docker inspect failed: {(inspected.stderr or '').strip()}")
    return list(json.loads(inspected.stdout))


def _compare(
    environment: Environment,
    host: str,
    compose: dict[str, Any],
    containers: list[dict[str, Any]],
    remote: Any,
    check: LayerCheck,
) -> None:
    repair = f"gpufleet up --stack {environment.name}"
    directory = PurePosixPath(environment.spec.serving_directory())
    by_service: dict[str, dict[str, Any]] = {}
    for container in containers:
        labels = (container.get("Config") or {}).get("Labels") or {}
        by_service[str(labels.get(SERVICE_LABEL, container.get("Name", "?")))] = container

    def item(object_: str, expected: str, found: str) -> None:
        check.items.append(DriftItem("containers", host, object_, expected, found, repair))

    services: dict[str, Any] = compose.get("services") or {}
    for name, service in sorted(services.items()):
        object_ = f"container {name}"
        check.checked.append(object_)
        found = by_service.get(name)
        if found is None:
            item(object_, "running", "missing")
            continue
        container = found
        state = container.get("State") or {}
        if not state.get("Running"):
            item(object_, "running", f"{state.get('Status', 'not running')}")
        image = (container.get("Config") or {}).get("Image", "")
        if image != service.get("image"):
            item(object_, f"image {service.get('image')}", f"image {image}")
        expected_ports = sorted(_compose_ports(service.get("ports") or []))
        found_ports = sorted(_published_ports(container))
        if expected_ports != found_ports:
            item(
                object_,
                "ports " + (", ".join(expected_ports) or "none"),
                "ports " + (", ".join(found_ports) or "none"),
            )
        for env_file in service.get("env_file") or []:
            path = directory / PurePosixPath(env_file)
            if not remote.file(str(path)).exists:  # presence only, never the values
                item(object_, f"env file {path} present", f"env file {path} missing")
    for name in sorted(set(by_service) - set(services)):
        object_ = f"container {name}"
        check.checked.append(object_)
        item(object_, "absent: no service of the compose file names it", "present")


def _compose_ports(ports: list[str]) -> list[str]:
    """`ADDRESS:HOST:CONTAINER` as `ADDRESS:HOST->CONTAINER/tcp`."""
    rendered = []
    for port in ports:
        address, published, target = str(port).rsplit(":", 2)
        protocol = "tcp"
        if "/" in target:
            target, protocol = target.split("/", 1)
        rendered.append(f"{address.strip('[]')}:{published}->{target}/{protocol}")
    return rendered


def _published_ports(container: dict[str, Any]) -> list[str]:
    bindings = (container.get("HostConfig") or {}).get("PortBindings") or {}
    rendered = []
    for target, published in bindings.items():
        number, _, protocol = str(target).partition("/")
        for binding in published or []:
            address = binding.get("HostIp") or "0.0.0.0"  # noqa: S104 - describes, binds nothing
            rendered.append(f"{address}:{binding.get('HostPort')}->{number}/{protocol or 'tcp'}")
    return rendered
