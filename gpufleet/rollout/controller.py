"""The rollout of one model on a stack: start, status, switch, promote, rollback, watch.

Each verb is one method; the CLI (`gpufleet rollout ...`) only parses and prints. Where the
stack runs (the local stack's processes, or each host of a static stack over SSH) is the
backend's business (backend.py); the order of each verb's steps, which is what keeps callers
from ever seeing a failed request, is decided here once for both:

- start: record the rollout with the gateway pinning every request to the stable version,
  load the candidate beside it in Triton, replay the candidate's golden examples (the
  correctness gate; a failure takes the candidate away again before any request reached it),
  then route by the strategy (a graceful nginx reload).
- rollback / promote: pin every request to the version that stays (the reload returns once
  the old nginx workers have finished their requests), then (promote) move the registry alias,
  then let Triton drop the other version, then route directly again.
- status: per-version traffic from the gateway's log and Triton's statistics, and the limits
  of the spec's `rollout.limits`; a breached limit rolls the rollout back at once (so does
  `watch`, which checks on an interval).

    controller = RolloutController(LocalRolloutBackend(local_stack), "tabular_mlp", say=print)
    outcome = controller.start()            # outcome.exit_code: 0 ok, 1 stopped by a gate/limit
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gpufleet.registry.client import MODEL_URI, RegistryVersion
from gpufleet.rollout.backend import RolloutBackend, RolloutError
from gpufleet.rollout.limits import LimitBreach, check_limits
from gpufleet.rollout.state import RolloutRecord, record_path
from gpufleet.rollout.traffic import triton_version_counts
from gpufleet.spec.loading import LoadedModelSpec
from gpufleet.spec.model import Objectives
from gpufleet.spec.rollout import Rollout
from validation.correctness import CorrectnessTarget, run_correctness_gate
from validation.report import write_reports

Say = Callable[[str], None]


@dataclass
class RolloutOutcome:
    """What a verb did: exit code 0 (done) or 1 (stopped by a gate or a limit), and why."""

    record: RolloutRecord
    message: str
    exit_code: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "exit_code": self.exit_code,
            "message": self.message,
            **self.details,
            "rollout": self.record.to_json(),
        }


class RolloutController:
    """Rollouts of one model of a stack that has a gateway."""

    def __init__(self, backend: RolloutBackend, model: str, *, say: Say = print) -> None:
        self.backend = backend
        self.model = model
        self.say = say
        self.path = record_path(backend.state_dir, model)

    # -- verbs -------------------------------------------------------------------------------

    def start(self) -> RolloutOutcome:
        item, rollout = self._spec_with_rollout()
        previous = self._load()
        if previous is not None and previous.active:
            raise RolloutError(
                f"{self.model}: a rollout to version {previous.candidate} is under way (phase "
                f"{previous.phase}); promote it or roll it back first"
            )
        registry = self.backend.registry()
        stable = registry.resolve(item.spec.source or "")
        candidate = registry.resolve(rollout.candidate)
        if candidate.version == stable.version:
            raise RolloutError(
                f"{self.model}: {rollout.candidate} and {item.spec.source} are both version "
                f"{stable.version}; register the candidate as a new version first"
            )
        self.backend.tritons()  # each one live, or RolloutError
        record = RolloutRecord(
            stack=self.backend.stack_name,
            model=self.model,
            strategy=rollout.strategy,
            stable=stable.version,
            candidate=candidate.version,
            candidate_uri=rollout.candidate,
            sticky_header=rollout.sticky_header,
        )
        record.add("start", stable=stable.version, candidate=candidate.version)
        self._save(record)
        self.say(f"  {self.model}: stable v{stable.version}, candidate v{candidate.version}")
        # Pin callers to the stable version before Triton serves a second one.
        self.backend.apply_gateway()
        try:
            self.backend.refresh_models()
        except BaseException as error:
            self._end(record, "rolled_back", "load failed", error=str(error))
            raise
        record.add("candidate loaded", version=candidate.version)
        self._save(record)
        if rollout.limits.correctness_gate:
            failure = self._correctness_gate(item, candidate)
            if failure is not None:
                self._end(record, "stopped_by_gate", "correctness gate failed", reason=failure)
                return RolloutOutcome(
                    record,
                    f"{self.model}: candidate v{candidate.version} failed the correctness gate "
                    f"before any request reached it: {failure}; it is unloaded again",
                    exit_code=1,
                )
            record.add("correctness gate passed", version=candidate.version)
        record.phase = "serving"
        record.candidate_percent = rollout.canary_weight if rollout.strategy == "canary" else 0.0
        record.access_log_offsets = self.backend.log_offsets()
        record.add("traffic opened", candidate_percent=record.candidate_percent)
        self._save(record)
        self.backend.apply_gateway()
        return RolloutOutcome(record, self._routing_sentence(record))

    def switch(self) -> RolloutOutcome:
        """blue_green: send every request to the candidate (rollback sends them back)."""
        record = self._active("switch", phases=("serving",))
        if record.strategy != "blue_green":
            raise RolloutError(
                f"{self.model}: switch moves a blue_green rollout; this one is a "
                f"{record.strategy} (promote or roll it back)"
            )
        record.candidate_percent = 100.0
        record.add("switched", candidate_percent=100.0)
        self._save(record)
        self.backend.apply_gateway()
        return RolloutOutcome(record, self._routing_sentence(record))

    def status(self, *, act: bool = True) -> RolloutOutcome:
        """Traffic per version and the limits; a breached limit rolls back when `act`."""
        record = self._load()
        if record is None:
            raise RolloutError(f"{self.model}: no rollout recorded; start one first")
        details = self._traffic(record)
        if not (record.active and record.phase == "serving"):
            return RolloutOutcome(record, f"{self.model}: rollout {record.phase}", details=details)
        _, rollout = self._spec_with_rollout()
        breaches = check_limits(record, details["gateway"], rollout.limits)
        details["limits"] = [breach.to_json() for breach in breaches]
        if not breaches:
            return RolloutOutcome(
                record, f"{self.model}: within limits; {self._routing_sentence(record)}", 0, details
            )
        if not act:
            return RolloutOutcome(record, _breach_sentence(self.model, breaches), 1, details)
        rolled = self.rollback(reason=_breach_sentence(self.model, breaches), automatic=True)
        rolled.details = {**details, **rolled.details}
        rolled.exit_code = 1
        return rolled

    def watch(self, *, interval_s: float, duration_s: float) -> RolloutOutcome:
        """Check the limits every `interval_s` for `duration_s` (or until the rollout ends)."""
        deadline = time.monotonic() + duration_s
        while True:
            outcome = self.status(act=True)
            if outcome.exit_code != 0 or not outcome.record.active:
                return outcome
            if time.monotonic() + interval_s > deadline:
                return outcome
            time.sleep(interval_s)

    def rollback(self, *, reason: str = "asked for", automatic: bool = False) -> RolloutOutcome:
        record = self._active("rollback")
        record.add("rollback", reason=reason, automatic=automatic)
        self._drain(record, keep=record.stable)
        self._end(record, "rolled_back", "candidate unloaded")
        self.backend.apply_gateway()
        return RolloutOutcome(
            record,
            f"{self.model}: rolled back to v{record.stable} ({reason}); v{record.candidate} "
            "unloaded",
        )

    def promote(self) -> RolloutOutcome:
        item, _ = self._spec_with_rollout()
        record = self._active("promote", phases=("serving",))
        match = MODEL_URI.fullmatch(item.spec.source or "")
        if match is None or match["alias"] is None:
            raise RolloutError(
                f"{self.model}: source {item.spec.source} names a version, not an alias, so "
                "promoting cannot move it; point source at an alias (models:/<name>@production)"
            )
        name, alias = match["name"], match["alias"]
        record.add("promote", alias=alias)
        self._drain(record, keep=record.candidate)
        self.backend.registry().set_alias(name, alias, record.candidate)
        record.add("alias moved", alias=alias, version=record.candidate)
        self._save(record)
        self._end(record, "promoted", "old version unloaded")
        self.backend.apply_gateway()
        return RolloutOutcome(
            record,
            f"{self.model}: promoted v{record.candidate} ({name}@{alias} now points at it); "
            f"v{record.stable} unloaded",
        )

    # -- steps -------------------------------------------------------------------------------

    def _drain(self, record: RolloutRecord, *, keep: int) -> None:
        """Every request to `keep`; returns when no request is left on the other version."""
        record.phase, record.pinned = "draining", keep
        record.add("drain", to=keep)
        self._save(record)
        self.backend.apply_gateway()  # returns once the previous nginx workers have exited

    def _end(self, record: RolloutRecord, phase: Any, event: str, **details: Any) -> None:
        """End the rollout: Triton goes back to the spec's own versions."""
        record.phase = phase
        self._save(record)
        self.backend.refresh_models()
        record.add(event, **details)
        self._save(record)

    def _correctness_gate(self, item: LoadedModelSpec, candidate: RegistryVersion) -> str | None:
        objectives = item.spec.objectives or Objectives()
        target = CorrectnessTarget(
            model=self.model,
            version=candidate.version,
            examples=self.backend.registry().golden_examples(candidate),
            atol=objectives.output_atol,
            rtol=objectives.output_rtol,
        )
        failures = []
        for triton in self.backend.tritons():
            report = run_correctness_gate(
                triton.grpc_url,
                [target],
                stack=f"{self.backend.stack_name}/{triton.label}",
                admin_headers=triton.headers,
            )
            write_reports(report, self.backend.reports_dir / triton.label)
            failures += [
                f"{triton.label}: {check.message}"
                for check in report.checks
                if check.status != "pass"
            ]
        return "; ".join(failures) or None

    def _traffic(self, record: RolloutRecord) -> dict[str, Any]:
        gateway = self.backend.read_traffic(self.model, record.access_log_offsets)
        counts: dict[int, dict[str, int]] = {}
        try:
            tritons = self.backend.tritons()
        except RolloutError:
            tritons = []  # status still reports the gateways' side
        for triton in tritons:
            for version, count in triton_version_counts(
                triton.grpc_url, self.model, triton.headers
            ).items():
                total = counts.setdefault(version, {"success": 0, "fail": 0})
                total["success"] += count["success"]
                total["fail"] += count["fail"]
        return {
            "gateway": {str(version): traffic.summary() for version, traffic in gateway.items()},
            "triton": {str(version): count for version, count in counts.items()},
        }

    # -- helpers -----------------------------------------------------------------------------

    def _spec_with_rollout(self) -> tuple[LoadedModelSpec, Rollout]:
        for item in self.backend.specs:
            if item.spec.name == self.model:
                if item.spec.rollout is None:
                    raise RolloutError(
                        f"{item.path}: {self.model} has no rollout section; add one "
                        "(strategy, candidate) to say what to roll out (docs/rollout.md)"
                    )
                return item, item.spec.rollout
        raise RolloutError(
            f"stack {self.backend.stack_name!r} serves no model {self.model!r} (its models: "
            f"{', '.join(item.spec.name for item in self.backend.specs) or 'none'})"
        )

    def _active(
        self, verb: str, phases: tuple[str, ...] = ("serving", "draining")
    ) -> RolloutRecord:
        record = self._load()
        if record is None or not record.active or record.phase not in phases:
            phase = "none recorded" if record is None else f"phase {record.phase}"
            raise RolloutError(
                f"{self.model}: no rollout to {verb} ({phase}); start one with `gpufleet rollout "
                f"start --model {self.model}`"
            )
        return record

    def _load(self) -> RolloutRecord | None:
        try:
            return RolloutRecord.load(self.path)
        except ValueError as error:
            raise RolloutError(str(error)) from None

    def _save(self, record: RolloutRecord) -> None:
        record.save(self.path)

    def _routing_sentence(self, record: RolloutRecord) -> str:
        if record.strategy == "canary":
            sticky = f", sticky on header {record.sticky_header}" if record.sticky_header else ""
            return (
                f"{self.model}: {record.candidate_percent:g}% of requests to candidate "
                f"v{record.candidate}, the rest to v{record.stable}{sticky}"
            )
        if record.strategy == "shadow":
            return (
                f"{self.model}: callers answered by v{record.stable}; every request mirrored to "
                f"candidate v{record.candidate}, its answers dropped"
            )
        on = record.candidate if record.candidate_percent >= 100 else record.stable
        return (
            f"{self.model}: every request to v{on} (blue v{record.stable}, green "
            f"v{record.candidate})"
        )


def _breach_sentence(model: str, breaches: list[LimitBreach]) -> str:
    return f"{model}: limit breached: " + "; ".join(breach.message for breach in breaches)


__all__ = ["RolloutController", "RolloutError", "RolloutOutcome"]
