"""An environment as the lifecycle steps see it: the stack's spec with every host's address,
the models it serves, and where its state, repository and reports live on this machine.

    environment = load_environment("lab", project_root=Path.cwd())
    environment.host_names            # ["lab-t4-1", "lab-h100-1"]
    environment.registry()            # the environment's one registry of record
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from gpufleet.lifecycle.outputs import resolve_addresses, with_addresses
from gpufleet.registry.client import ModelRegistry, RegistryError
from gpufleet.spec.hosts import HostSpec
from gpufleet.spec.loading import (
    LoadedModelSpec,
    LoadedStackSpec,
    load_model_specs,
    load_stack_spec,
    select_stack_models,
)
from gpufleet.spec.registry import RegistryError as RegistryLocationError
from gpufleet.spec.registry import registry_tracking_uri
from gpufleet.spec.stack import StackSpec


class LifecycleError(Exception):
    """A lifecycle step cannot run as asked (exit 2); the message says why."""


@dataclasses.dataclass(frozen=True)
class Environment:
    """One stack with addresses resolved, ready for the configure, deploy and gate steps."""

    loaded: LoadedStackSpec
    models: list[LoadedModelSpec]
    project_root: Path

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def spec(self) -> StackSpec:
        return self.loaded.spec

    @property
    def host_names(self) -> list[str]:
        return [host.name for host in self.spec.hosts]

    def host(self, name: str) -> HostSpec:
        for host in self.spec.hosts:
            if host.name == name:
                return host
        known = ", ".join(self.host_names)
        raise LifecycleError(f"stack {self.name!r} has no host {name!r} ({known})")

    @property
    def state_dir(self) -> Path:
        return self.project_root / self.spec.resolved_state_dir(self.name)

    @property
    def repository(self) -> Path:
        """The model repository filled on this machine and copied to every serving host."""
        return self.project_root / self.spec.model_repository

    @property
    def reports_dir(self) -> Path:
        return self.state_dir / "reports"

    def registry_uri(self) -> str:
        """The environment's one registry of record (gpufleet:registry). Raises RegistryError
        when it cannot be told (no registry declared, its host has no address yet)."""
        addresses = {host.name: host.address for host in self.spec.hosts if host.address}
        try:
            return registry_tracking_uri(self.spec, addresses)
        except RegistryLocationError as error:
            raise RegistryError(str(error)) from None

    def registry(self) -> ModelRegistry:
        return ModelRegistry(self.registry_uri())


def load_environment(
    stack: str,
    *,
    project_root: Path,
    specs_dir: Path | None = None,
    stacks_dir: Path | None = None,
    outputs_file: Path | None = None,
    addresses: Mapping[str, str] | None = None,
) -> Environment:
    """The stack with its hosts' addresses: `addresses` when given (the Pulumi program passes
    what its VMs report), else the spec's (static) or the provisioner's outputs (proxmox, azure).

    Raises SpecError (a spec is wrong) and OutputsError (no addresses to be had).
    """
    loaded = load_stack_spec(stacks_dir or project_root / "stacks", stack)
    if loaded.spec.environment == "local":
        raise LifecycleError(
            f"stack {stack!r} is a local stack: this machine, without hosts to configure"
        )
    if addresses is not None:
        spec = with_addresses(loaded.spec, addresses)
    else:
        spec = resolve_addresses(
            stack, loaded.spec, outputs_file=outputs_file, project_root=project_root
        )
    models: list[LoadedModelSpec] = []
    if spec.serving is not None:  # hosts without a serving stack serve no model
        specs = load_model_specs(specs_dir or project_root / "modelconfigs")
        models = select_stack_models(loaded, specs)
    return Environment(dataclasses.replace(loaded, spec=spec), models, project_root)
