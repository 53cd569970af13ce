"""One model's rollout on a stack: its versions, where traffic goes now, and its whole history.

Kept in `<state_dir>/rollout/<model>.json`, which is also the rollout's report: every step
(`start`, the gate, `switch`, `promote`, `rollback`, a limit breached) is appended to `history`
with its time and details. Written atomically; a finished rollout's file stays as its record
until the next `rollout start` of that model replaces it.

    record = RolloutRecord.load(path)            # None when the model never had a rollout
    record.add("rollback", reason="candidate p99 3.1x stable")
    record.save(path)
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from generators.gateway import ModelRoute
from generators.model_repository import write_atomically
from gpufleet.spec.loading import LoadedModelSpec
from gpufleet.spec.model import VersionPolicy

FORMAT = "gpufleet.rollout/v1"
# loading: the candidate is being loaded and gated while every request goes to the stable
# version; serving: the gateway routes by the strategy (canary, shadow, blue_green switched or
# not); draining: every request goes to `pinned` while the other version is taken away; then
# one of the three ends. While a rollout is active Triton serves both versions, so the gateway
# always names the version: Triton alone would answer unversioned requests with the highest.
Phase = Literal["loading", "serving", "draining", "promoted", "rolled_back", "stopped_by_gate"]
ACTIVE_PHASES = ("loading", "serving", "draining")


@dataclass
class RolloutRecord:
    """The state and history of one model's rollout."""

    stack: str
    model: str
    strategy: str
    stable: int
    candidate: int
    candidate_uri: str
    phase: Phase = "loading"
    candidate_percent: float = 0.0
    sticky_header: str | None = None
    pinned: int | None = None  # loading and draining: the one version that gets requests
    # Per gateway (`local`, or each host's name): where this rollout's requests start in its
    # access log.
    access_log_offsets: dict[str, int] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def active(self) -> bool:
        """Whether Triton should serve both versions (the rollout has not ended)."""
        return self.phase in ACTIVE_PHASES

    @property
    def served_versions(self) -> list[int]:
        return sorted({self.stable, self.candidate})

    def route(self) -> ModelRoute:
        """Where the gateway sends this model's requests now."""
        if self.phase in ("loading", "draining"):
            pinned = self.stable if self.pinned is None else self.pinned
            return ModelRoute(
                self.model,
                "blue_green",
                stable=self.stable,
                candidate=self.candidate,
                candidate_percent=100.0 if pinned == self.candidate else 0.0,
            )
        if self.phase != "serving":
            return ModelRoute(self.model)
        kind: Any = self.strategy
        return ModelRoute(
            self.model,
            kind,
            stable=self.stable,
            candidate=self.candidate,
            candidate_percent=self.candidate_percent,
            sticky_header=self.sticky_header,
        )

    def add(self, event: str, **details: Any) -> dict[str, Any]:
        entry = {"at": time.time(), "event": event, "phase": self.phase, **details}
        self.history.append(entry)
        return entry

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    def save(self, path: Path) -> None:
        write_atomically(path, json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> RolloutRecord | None:
        """The record at `path`, None when there is none; ValueError when it is unreadable."""
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except ValueError as error:
            raise ValueError(f"{path}: not a gpufleet rollout record: {error}") from None
        if not isinstance(document, dict) or document.pop("format", None) != FORMAT:
            raise ValueError(f"{path}: not a gpufleet rollout record (format is not {FORMAT})")
        if "access_log_offset" in document:  # a record of the local stack's first release
            document["access_log_offsets"] = {"local": document.pop("access_log_offset")}
        try:
            return cls(**document)
        except TypeError as error:
            raise ValueError(f"{path}: not a gpufleet rollout record: {error}") from None


def record_path(state_dir: Path, model: str) -> Path:
    return state_dir / "rollout" / f"{model}.json"


def served_specs(
    specs: Sequence[LoadedModelSpec], records: Sequence[RolloutRecord]
) -> list[LoadedModelSpec]:
    """The specs, with each model under an active rollout serving both its versions (whatever
    its spec's version policy says): what Triton must load, locally and on every host."""
    versions = {record.model: record.served_versions for record in records if record.active}
    served = []
    for item in specs:
        wanted = versions.get(item.spec.name)
        if wanted is not None:
            policy = VersionPolicy(specific=wanted)
            item = dataclasses.replace(
                item, spec=item.spec.model_copy(update={"version_policy": policy})
            )
        served.append(item)
    return served


def active_records(state_dir: Path) -> list[RolloutRecord]:
    """Every model's rollout that has not ended, by model name."""
    found = []
    for path in sorted((state_dir / "rollout").glob("*.json")):
        record = RolloutRecord.load(path)
        if record is not None and record.active:
            found.append(record)
    return found


def as_served(
    models: Sequence[LoadedModelSpec], state_dir: Path
) -> tuple[list[LoadedModelSpec], list[ModelRoute]]:
    """The specs and gateway routes as the stack whose state is in ``state_dir`` serves them
    now (its active rollouts). The deploy step and local `up` write and load these, so
    `generate --stack` and every drift layer compare with these too. ValueError for a rollout
    record that cannot be read."""
    records = active_records(state_dir)
    return served_specs(models, records), [record.route() for record in records]
