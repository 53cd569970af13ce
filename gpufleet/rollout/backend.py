"""Where a rollout's steps act: the interface between the controller and a stack's servers.

The controller (controller.py) decides what happens in which order; a backend does each step
where the stack runs: the local stack's processes (local_backend.py) or every host of a static,
proxmox or azure stack over SSH and the network (hosts_backend.py). Every step raises
RolloutError with a message that says what failed where.

    backend = LocalRolloutBackend(local_stack)        # or HostsRolloutBackend(environment)
    RolloutController(backend, "tabular_mlp").start()
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gpufleet.registry.client import ModelRegistry
from gpufleet.rollout.traffic import VersionTraffic
from gpufleet.spec.loading import LoadedModelSpec


class RolloutError(Exception):
    """The rollout verb cannot run (bad input, wrong phase, servers down): exit 2."""


@dataclass(frozen=True)
class TritonEndpoint:
    """One Triton that serves the model: where it answers gRPC and its admin key header."""

    label: str  # "local", or the host's name
    grpc_url: str
    headers: dict[str, str] | None


class RolloutBackend(Protocol):
    """The steps of a rollout that depend on where the stack runs."""

    @property
    def stack_name(self) -> str: ...

    @property
    def specs(self) -> list[LoadedModelSpec]:
        """The stack's model specs, as written (not with the rollouts' served versions)."""
        ...

    @property
    def state_dir(self) -> Path:
        """Where `rollout/<model>.json` (the record) lives."""
        ...

    @property
    def reports_dir(self) -> Path:
        """Where the candidate's correctness reports go."""
        ...

    def registry(self) -> ModelRegistry: ...

    def tritons(self) -> list[TritonEndpoint]:
        """Every Triton that serves the stack's models, each checked to be live; RolloutError
        names the one that is not."""
        ...

    def refresh_models(self) -> None:
        """Every Triton loads what the specs and the active rollouts say (both versions of a
        model under an active rollout); Triton keeps serving loaded versions meanwhile."""
        ...

    def apply_gateway(self) -> None:
        """Every gateway routes as the active rollouts say; returns once requests sent from now
        on are routed by the new configuration. A configuration nginx refuses is never used."""
        ...

    def log_offsets(self) -> dict[str, int]:
        """Per gateway: where the next request's line will start in its access log."""
        ...

    def read_traffic(self, model: str, offsets: dict[str, int]) -> dict[int, VersionTraffic]:
        """Per version: `model`'s requests in every gateway's log since `offsets`, summed."""
        ...
