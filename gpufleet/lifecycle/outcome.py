"""What a lifecycle step did to one host: its status, its one-line reasons and its time.

Statuses: `ok` (nothing to change), `changed`, `failed` (the step ran and the host is not
right: exit 1) and `error` (the step could not run: exit 2). Gates map onto the same words:
a gate that failed is `failed`, one that could not run is `error`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, Literal

StepName = Literal["configure", "deploy", "gate"]
StepStatus = Literal["ok", "changed", "failed", "error"]
EXIT_OK, EXIT_FAILED, EXIT_COULD_NOT_RUN = 0, 1, 2


@dataclasses.dataclass
class StepOutcome:
    """One step on one host."""

    step: StepName
    host: str
    status: StepStatus
    reasons: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        return self.status in ("ok", "changed")

    def to_json(self) -> dict[str, Any]:
        details = {
            key: [item.to_json() if hasattr(item, "to_json") else item for item in value]
            if isinstance(value, list)
            else value
            for key, value in self.details.items()
        }
        return {
            "step": self.step,
            "host": self.host,
            "status": self.status,
            "reasons": self.reasons,
            "seconds": round(self.seconds, 3),
            "details": details,
        }


def exit_code(outcomes: Iterable[StepOutcome]) -> int:
    """1 when a step failed on a host, else 2 when one could not run, else 0."""
    statuses = {outcome.status for outcome in outcomes}
    if "failed" in statuses:
        return EXIT_FAILED
    if "error" in statuses:
        return EXIT_COULD_NOT_RUN
    return EXIT_OK


class StepFailed(Exception):
    """Raised by callers that must stop on a failed step (the Pulumi resources): the message
    is the step's one-line reasons, host by host."""

    def __init__(self, outcomes: Iterable[StepOutcome]) -> None:
        self.outcomes = [outcome for outcome in outcomes if not outcome.succeeded]
        lines = [
            f"{outcome.host}: {outcome.step} {outcome.status}: {reason}"
            for outcome in self.outcomes
            for reason in (outcome.reasons or ["no reason given"])
        ]
        super().__init__("\n".join(lines))


def raise_unless_succeeded(outcomes: Iterable[StepOutcome]) -> None:
    listed = list(outcomes)
    if not all(outcome.succeeded for outcome in listed):
        raise StepFailed(listed)
