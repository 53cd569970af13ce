"""The rollout's steps on a local stack: its Triton and nginx processes on this machine.

backend = LocalRolloutBackend(local_stack)   # RolloutError when the stack has no gateway
"""

from __future__ import annotations

from pathlib import Path

from gpufleet.local.stack_runner import TRITON, LocalStack, StackRunError
from gpufleet.registry.client import ModelRegistry
from gpufleet.rollout.backend import RolloutError, TritonEndpoint
from gpufleet.rollout.traffic import VersionTraffic, log_size, read_access_log
from gpufleet.spec.loading import LoadedModelSpec

LOCAL = "local"


class LocalRolloutBackend:
    """A local stack with a gateway (gpufleet:gateway)."""

    def __init__(self, stack: LocalStack) -> None:
        if stack.stack.spec.gateway is None:
            raise RolloutError(
                f"stack {stack.stack.name!r} has no gateway to split traffic with; add "
                "gpufleet:gateway (http and grpc ports) to its stack file and run `gpufleet up`"
            )
        self.stack = stack

    @property
    def stack_name(self) -> str:
        return self.stack.stack.name

    @property
    def specs(self) -> list[LoadedModelSpec]:
        return self.stack.specs

    @property
    def state_dir(self) -> Path:
        return self.stack.paths.root

    @property
    def reports_dir(self) -> Path:
        return self.stack.paths.reports / "rollout"

    def registry(self) -> ModelRegistry:
        return self.stack.registry()

    def tritons(self) -> list[TritonEndpoint]:
        triton = self.stack.running_server(TRITON)
        if triton is None:
            raise RolloutError(
                f"Triton of stack {self.stack_name!r} is not running; start the stack with "
                f"`gpufleet up --stack {self.stack_name}`"
            )
        url = f"127.0.0.1:{triton.ports['grpc']}"
        return [TritonEndpoint(LOCAL, url, self.stack.triton_admin_headers())]

    def refresh_models(self) -> None:
        try:
            self.stack.refresh_models()
        except StackRunError as error:
            raise RolloutError(str(error)) from None

    def apply_gateway(self) -> None:
        try:
            self.stack.apply_gateway()  # returns once the previous nginx workers have exited
        except StackRunError as error:
            raise RolloutError(str(error)) from None

    def log_offsets(self) -> dict[str, int]:
        return {LOCAL: log_size(self.stack.paths.gateway.access_log)}

    def read_traffic(self, model: str, offsets: dict[str, int]) -> dict[int, VersionTraffic]:
        log = self.stack.paths.gateway.access_log
        return read_access_log(log, model, offset=offsets.get(LOCAL, 0))
