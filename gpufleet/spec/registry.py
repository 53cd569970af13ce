"""The environment's one registry of record (`gpufleet:registry`), and the URL to reach it.

A stack with a serving stack names exactly one MLflow registry: a host of the stack, whose
serving stack then runs MLflow with Postgres (the other hosts run Triton and monitoring only),
or an external MLflow at an https:// tracking URI. Every step that reads or writes models
(seeding, filling the model repository, the correctness gate) asks `registry_tracking_uri`
where that registry is, so a second registry cannot creep in.

    url = registry_tracking_uri(spec, {"gpu-prod-1": "10.20.0.21"})  # http://10.20.0.21:5000
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING

from pydantic import Field, field_validator, model_validator

from gpufleet.spec.hosts import HOST_NAME_PATTERN
from gpufleet.spec.model import SpecModel
from gpufleet.spec.problems import FieldValueError

if TYPE_CHECKING:
    from gpufleet.spec.stack import StackSpec

REGISTRY_KEY = "gpufleet:registry"


class RegistryError(ValueError):
    """The environment's registry URL cannot be told (no registry declared, no address yet)."""


class RegistrySpec(SpecModel):
    """Where the environment's models are registered: one host of the stack, or an external
    MLflow. Exactly one of `host` and `tracking_uri`."""

    host: str | None = Field(
        default=None,
        pattern=HOST_NAME_PATTERN,
        description="The host (a name from gpufleet:hosts) whose serving stack runs MLflow with "
        "Postgres, with MLflow's basic-auth login; the stack's other hosts run Triton and "
        "monitoring only. Its MLflow must be published (serving.publish lists mlflow).",
    )
    tracking_uri: str | None = Field(
        default=None,
        description="An external MLflow tracking server (https://, no credentials in it: "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD come from the environment); "
        "then no host of the stack runs MLflow or Postgres.",
    )

    @field_validator("tracking_uri")
    @classmethod
    def _external_uri(cls, uri: str | None) -> str | None:
        if uri is None:
            return None
        check_tracking_uri(uri)
        parsed = urllib.parse.urlsplit(uri)
        # Plain HTTP only where the credentials never leave this machine: a registry on the
        # controller, or the local end of an SSH tunnel.
        if parsed.scheme != "https" and not _is_loopback(parsed.hostname or ""):
            raise ValueError(
                "an external registry is reached with credentials across networks gpufleet does "
                "not control; use its https:// URL, an SSH tunnel to it on 127.0.0.1, or run it "
                "on a host of the stack (host: NAME)"
            )
        return uri

    @model_validator(mode="after")
    def _exactly_one(self) -> RegistrySpec:
        if (self.host is None) == (self.tracking_uri is None):
            given = "both host and tracking_uri" if self.host else "neither host nor tracking_uri"
            raise ValueError(
                f"{given} given; name exactly one: host: <a host of this stack> (it runs MLflow "
                "with Postgres) or tracking_uri: https://... (an external MLflow)"
            )
        return self


def check_tracking_uri(uri: str) -> str:
    """An http(s) URL of an MLflow server without credentials in it, or ValueError saying why."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError("use an http(s):// URL of an MLflow tracking server")
    if parsed.username or parsed.password:
        raise ValueError(
            "do not put credentials in the URI; set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment"
        )
    return uri


def registry_host(spec: StackSpec) -> str | None:
    """The name of the host whose serving stack runs the registry (MLflow, Postgres), if any."""
    return spec.registry.host if spec.registry is not None else None


def check_registry(stack: StackSpec) -> None:
    """StackSpec's checks of `registry` against the rest of the stack (FieldValueError, located).

    - a local stack has no `registry`: its registry is the local MLflow server or
      `mlflow_tracking_uri`, which other stacks may not use (the registry is their one source);
    - a stack with `serving` names its registry; `registry.host` needs `serving`, is one of
      `hosts`, and publishes MLflow (the controller fills the model repository through it);
    - with an external registry no host runs MLflow, so `serving.publish` cannot list it.
    """
    registry = stack.registry
    if stack.environment == "local":
        if registry is not None:
            raise FieldValueError(
                ("registry",),
                "a local stack's registry is the MLflow server gpufleet starts on this machine "
                "(or mlflow_tracking_uri); remove gpufleet:registry",
            )
        return
    if stack.mlflow_tracking_uri is not None:
        raise FieldValueError(
            ("mlflow_tracking_uri",),
            f"on a {stack.environment} stack the environment's registry is {REGISTRY_KEY}, "
            f"the one source of truth; write {REGISTRY_KEY}: {{tracking_uri: "
            f"{stack.mlflow_tracking_uri}}} (https) or {{host: NAME}} and remove "
            "mlflow_tracking_uri",
        )
    serving = stack.serving
    if registry is None:
        if serving is not None:
            listed = ", ".join(host.name for host in stack.hosts) or "none yet"
            raise FieldValueError(
                ("serving",),
                f"a stack with a serving stack names its one registry of record: add "
                f"{REGISTRY_KEY}: {{host: NAME}} with one of its hosts ({listed}), which then "
                "runs MLflow with Postgres, or {tracking_uri: https://...} for an external MLflow",
            )
        return
    if registry.host is None:
        if serving is not None and "mlflow" in serving.publish:
            raise FieldValueError(
                ("serving", "publish"),
                f"no host runs MLflow (the registry is {registry.tracking_uri}); remove mlflow "
                "from serving.publish",
            )
        return
    names = [host.name for host in stack.hosts]
    if registry.host not in names:
        raise FieldValueError(
            ("registry", "host"),
            f"no host named {registry.host!r} in gpufleet:hosts "
            f"({', '.join(names) or 'none'}); name one of them",
        )
    if serving is None:
        raise FieldValueError(
            ("registry", "host"),
            f"{registry.host} would run MLflow in its serving stack, but this stack has no "
            "gpufleet:serving; add one, or use tracking_uri: https://... for an external MLflow",
        )
    if "mlflow" not in serving.publish:
        raise FieldValueError(
            ("serving", "publish"),
            f"{registry.host}'s MLflow is the environment's registry, which the controller "
            "(filling the model repository) and training jobs reach over the network; add "
            "mlflow to serving.publish (it asks for a login, on the host's private address)",
        )


def registry_tracking_uri(spec: StackSpec, addresses: Mapping[str, str]) -> str:
    """The URL of the environment's one registry of record, for MLflow clients.

    - local stack: its `mlflow_tracking_uri`, else the local server on 127.0.0.1:ports.mlflow;
    - `registry.tracking_uri`: that URI, as written;
    - `registry.host`: `http://<address>:<ports.mlflow>`, MLflow as the host's serving stack
      publishes it. The address is `serving.bind_address` when set (MLflow listens only
      there), else `addresses[host]` (host name -> address: the provisioner's outputs, or
      what the caller knows), else the host's address in the spec (`address`, or the static
      `ipv4` of its proxmox network). IPv6 addresses are bracketed.

    The URL never holds credentials: clients read MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD from the environment. Raises RegistryError (one line: what is
    missing and what to do) when the stack declares no registry or the host has no address.
    Nothing is contacted.
    """
    if spec.environment == "local":
        return spec.tracking_uri()
    registry = spec.registry
    if registry is None:
        raise RegistryError(
            f"the stack declares no registry; add {REGISTRY_KEY}: {{host: NAME}} or "
            "{tracking_uri: https://...} to its stack file"
        )
    if registry.tracking_uri is not None:
        return registry.tracking_uri
    assert registry.host is not None  # RegistrySpec holds exactly one of them
    address = _registry_address(spec, registry.host, addresses)
    if address is None:
        raise RegistryError(
            f"registry host {registry.host} has no address yet; provision it first (its address "
            "comes from the provisioner's outputs) or set its address in the stack file"
        )
    return f"http://{_url_host(address)}:{spec.ports.mlflow}"


def _registry_address(spec: StackSpec, name: str, addresses: Mapping[str, str]) -> str | None:
    if spec.serving is not None and spec.serving.bind_address:
        return spec.serving.bind_address
    if addresses.get(name):
        return addresses[name]
    host = next(host for host in spec.hosts if host.name == name)
    return host.known_address()


def _url_host(address: str) -> str:
    try:
        is_ipv6 = ipaddress.ip_address(address).version == 6
    except ValueError:
        is_ipv6 = False  # a DNS name
    return f"[{address}]" if is_ipv6 else address


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
