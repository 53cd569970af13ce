"""What a rebuild did: each step's status, reasons and time, the backup, and the registry
compared before and after. Written to `<state_dir>/reports/rebuild-<host>.json`.

Statuses: ok, changed, skipped (nothing to do, or done by the run this one resumes), failed (a
gate failed or the registry differs: exit 1), error (could not run: exit 2), waiting (for the
operator: reinstall, a host key to vouch for: exit 2).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from generators.model_repository import write_atomically

STEPS = ("check", "backup", "replace", "configure", "deploy", "restore", "fill", "gate", "verify")


@dataclasses.dataclass
class StepRecord:
    name: str
    status: str
    seconds: float
    reasons: list[str] = dataclasses.field(default_factory=list)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        return self.status in ("ok", "changed", "skipped")

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.name,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "reasons": self.reasons,
            "details": self.details,
        }


@dataclasses.dataclass
class RebuildReport:
    stack: str
    host: str
    resumed: bool
    steps: list[StepRecord] = dataclasses.field(default_factory=list)
    backup: dict[str, Any] | None = None
    registry: dict[str, Any] | None = None

    @property
    def exit_code(self) -> int:
        statuses = {step.status for step in self.steps}
        if "failed" in statuses:
            return 1
        if statuses & {"error", "waiting"}:
            return 2
        return 0

    @property
    def stopped_at(self) -> str:
        for step in self.steps:
            if not step.succeeded:
                return step.name
        return "done" if self.steps and self.steps[-1].name == STEPS[-1] else "-"

    def to_json(self) -> dict[str, Any]:
        return {
            "stack": self.stack,
            "host": self.host,
            "command": "rebuild",
            "resumed": self.resumed,
            "exit_code": self.exit_code,
            "stopped_at": self.stopped_at,
            "seconds": round(sum(step.seconds for step in self.steps), 3),
            "steps": [step.to_json() for step in self.steps],
            "backup": self.backup,
            "registry": self.registry,
        }

    def write(self, reports_dir: Path) -> Path:
        path = reports_dir / f"rebuild-{self.host}.json"
        write_atomically(path, json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")
        return path
