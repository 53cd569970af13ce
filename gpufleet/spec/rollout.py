"""The `rollout` section of a ModelSpec: how a candidate version reaches traffic safely.

Triton serves the stable and the candidate version side by side; the gateway (nginx, see
generators/gateway.py) decides which requests reach which. `gpufleet rollout start` opens it,
and the limits here stop it (docs/rollout.md):

    rollout:
      strategy: canary            # canary | shadow | blue_green
      candidate: models:/tabular_mlp@candidate
      weight: 10                  # canary: percent of requests to the candidate
      sticky_header: x-user-id    # same header value, same version; absent: at random
      limits: {max_error_ratio: 0.01, max_p99_ratio: 2.0, min_requests: 200}
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# An HTTP header name nginx can turn into a variable ($http_<name with - as _>).
HEADER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9-]*$"
DEFAULT_CANARY_WEIGHT = 10.0

Strategy = Literal["canary", "shadow", "blue_green"]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RolloutLimits(_Spec):
    """What stops a rollout: checked by `gpufleet rollout status` and `rollout watch`."""

    max_error_ratio: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description="Rolled back when the candidate's failed / all requests exceeds this.",
    )
    max_p99_ratio: float = Field(
        default=2.0,
        ge=1,
        description="Rolled back when the candidate's p99 latency exceeds the stable "
        "version's p99 times this.",
    )
    min_requests: int = Field(
        default=100,
        ge=1,
        le=1_000_000,
        description="Requests each version must have answered before the limits are judged.",
    )
    correctness_gate: bool = Field(
        default=True,
        description="Replay the candidate's golden examples before any traffic reaches it.",
    )


class Rollout(_Spec):
    """A candidate version and how traffic reaches it."""

    strategy: Strategy = Field(
        description="canary: a weighted share of requests; shadow: a copy of every request, "
        "answers dropped; blue_green: all or nothing, switched at once."
    )
    candidate: str = Field(
        pattern=r"^models:/[^/@]+(@[A-Za-z0-9_-]+|/[1-9][0-9]*)$",
        description="The candidate version: models:/<name>@<alias> or models:/<name>/<version>, "
        "the same registered model as source.",
    )
    weight: float | None = Field(
        default=None,
        gt=0,
        lt=100,
        description=f"canary only: percent of requests sent to the candidate (default "
        f"{DEFAULT_CANARY_WEIGHT:g}).",
    )
    sticky_header: str | None = Field(
        default=None,
        pattern=HEADER_NAME_PATTERN,
        description="canary: requests with the same value of this header always reach the same "
        "version; requests without it (or without this setting) are spread at random.",
    )
    limits: RolloutLimits = Field(default_factory=RolloutLimits)

    @property
    def canary_weight(self) -> float:
        return self.weight if self.weight is not None else DEFAULT_CANARY_WEIGHT
