"""The tuning run: the spec as written (twice, for a first noise figure), then a quick search
(coordinate climbing) or the whole grid, then the top candidates measured again in turn with
the spec as written, then the choice.

Quick search: from the grid point nearest the spec's own settings, each axis in turn is walked
up one step at a time, and down only when going up found nothing better. A direction stops at
the first step that misses the p99 objective (without coming closer to it than the current
point: further along, the p99 only grows), or after ``patience`` + 1 steps (2 by default) that
do not beat the best point by more than the noise. The point of the axis with the best figures
becomes the current one, even when its lead is within the noise: across a plateau the climb
goes on from its measured top, where the other axes may differ (sleepy_mlp: no queue delay
beats 500 us at 4 instances, not at 2). Passes repeat until no axis moves; each move is to a
point measured better than the current one, so the climb ends. Points already measured are
never measured again by the climb. The quick search measures at most ``max_trials`` trials
(default: 15% of the grid, at least 20), the re-measurement included.

Triton is left serving the repository's own config when the run ends, also on an error.

    result = tune(spec, space, target, TuneOptions(exhaustive=False), progress=print)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gpufleet.spec.model import ModelSpec
from gpufleet.spec.stack import LoadGateSettings
from gpufleet.tune.objective import (
    Assessment,
    Choice,
    Noise,
    Objective,
    assess,
    assess_all,
    better,
    choose,
    measure_noise,
)
from gpufleet.tune.space import AXES, Candidate, SearchSpace
from gpufleet.tune.trial import Trial, TrialRequest, TuningTarget

Progress = Callable[[str], None]
MAX_RANKING_ROUNDS = 4


QUICK_SHARE, MIN_QUICK_TRIALS = 0.15, 20
FIRST_MEASUREMENTS_OF_SPEC = 2  # the spec as written, measured before the search


def quick_search_budget(grid_size: int) -> int:
    """The quick search's trials by default: 15% of the grid, at least 20."""
    return max(MIN_QUICK_TRIALS, math.ceil(QUICK_SHARE * grid_size))


class _BudgetSpent(Exception):
    """The climb reached its share of the quick search's trials."""


class TritonStopped(RuntimeError):
    """Triton stopped answering during the run: no later trial could be measured."""


@dataclass(frozen=True)
class TuneOptions:
    exhaustive: bool = False
    settings: LoadGateSettings = field(default_factory=LoadGateSettings)
    top: int = 3  # candidates measured again at the end
    repeats: int = 3  # measurements each of them gets in all
    # Non-improving steps a direction may take before it stops. 1: on sleepy_mlp each instance
    # added 5-8% (within the noise) and two together 14%; with 0 the climb stopped at 2 or 3
    # instances, 0.89 of the exhaustive pick's throughput.
    patience: int = 1
    max_trials: int | None = None  # the quick search's; None: quick_search_budget(grid)


@dataclass(frozen=True)
class TuneResult:
    spec: ModelSpec
    space: SearchSpace
    objective: Objective
    mode: str  # "quick" or "exhaustive"
    trials: list[Trial]
    assessments: list[Assessment]
    noise: Noise
    choice: Choice
    wall_s: float

    @property
    def configs_tried(self) -> int:
        return len({trial.candidate for trial in self.trials if not trial.baseline})

    @property
    def baseline(self) -> Assessment | None:
        return next((item for item in self.assessments if item.baseline), None)

    def summary(self) -> dict[str, Any]:
        chosen, closest = self.choice.chosen, self.choice.closest
        return {
            "model": self.spec.name,
            "mode": self.mode,
            "objective": self.objective.text,
            "trials": len(self.trials),
            "configs_tried": self.configs_tried,
            "grid_size": len(self.space.grid()),
            "refused_by_spec_checks": len(self.space.refused),
            "failed_loads": sum(1 for trial in self.trials if not trial.loaded),
            "wall_s": round(self.wall_s, 1),
            "noise": {
                "throughput": round(self.noise.throughput, 4),
                "p99": round(self.noise.p99, 4),
                "candidates": self.noise.candidates,
                "measurements": self.noise.measurements,
                "largest_own_throughput": round(self.noise.largest_own_throughput, 4),
            },
            "decided_by": self.choice.decided_by,
            "chosen": _assessment_json(chosen) if chosen else None,
            "closest": _assessment_json(closest) if closest else None,
            "baseline": _assessment_json(self.baseline) if self.baseline else None,
        }


def _assessment_json(assessment: Assessment) -> dict[str, Any]:
    return {
        "label": assessment.label,
        "baseline": assessment.baseline,
        "candidate": assessment.candidate.as_dict(),
        "throughput_per_s": round(assessment.throughput_per_s, 1),
        "p99_ms": [round(value, 3) for value in assessment.p99_ms],
        "meets": assessment.meets,
        "violation": round(assessment.violation, 3) if assessment.loaded else None,
        "measurements": len(assessment.trials),
    }


class _Runner:
    """Measures candidates, remembering each one's first measurement."""

    def __init__(
        self,
        spec: ModelSpec,
        space: SearchSpace,
        target: TuningTarget,
        objective: Objective,
        options: TuneOptions,
        progress: Progress,
    ) -> None:
        self.spec, self.space, self.target = spec, space, target
        self.objective, self.options, self.progress = objective, options, progress
        self.trials: list[Trial] = []
        self.first: dict[Candidate, Assessment] = {}
        self.noise = Noise(0.0, 0.0, 0, 0)
        # The quick search's limit (None: the exhaustive search has none), and the climb's share
        # of it: the rest is kept for the top candidates' and the spec's further measurements.
        self.max_trials: int | None = None
        self.climb_trials: int | None = None
        if not options.exhaustive:
            self.max_trials = options.max_trials or quick_search_budget(len(space.grid()))
            reserve = (options.top + 1) * (options.repeats - 1)
            # at least one climb trial after the spec's first measurements
            self.climb_trials = max(FIRST_MEASUREMENTS_OF_SPEC + 1, self.max_trials - reserve)

    def measure(self, candidate: Candidate, *, baseline: bool = False) -> Trial:
        spec = self.spec if baseline else self.space.spec_for(candidate)
        repeat = sum(1 for t in self.trials if t.candidate == candidate and t.baseline == baseline)
        request = TrialRequest(
            spec,
            candidate,
            self.objective.levels,
            self.options.settings,
            number=len(self.trials) + 1,
            baseline=baseline,
            repeat=repeat,
        )
        trial = self.target.run_trial(request)
        self.trials.append(trial)
        self.progress(_trial_line(trial, self.objective))
        if not trial.loaded and not self.target.live():
            raise TritonStopped(
                f"{self.target.address} stopped answering during trial {trial.number} "
                f"({trial.load_error}): a refused config is skipped, a dead server ends the run; "
                "see Triton's log, bring it back (`gpufleet up`) and tune again"
            )
        return trial

    def assessment(self, candidate: Candidate) -> Assessment:
        """The candidate's first measurement, measured now if it never was."""
        if candidate not in self.first:
            if self.climb_trials is not None and len(self.trials) >= self.climb_trials:
                raise _BudgetSpent
            self.first[candidate] = assess(self.objective, [self.measure(candidate)])
        return self.first[candidate]

    def group(self, candidate: Candidate, baseline: bool) -> list[Trial]:
        return [t for t in self.trials if t.candidate == candidate and t.baseline == baseline]


def tune(
    spec: ModelSpec,
    space: SearchSpace,
    target: TuningTarget,
    options: TuneOptions,
    *,
    progress: Progress | None = None,
) -> TuneResult:
    """Search ``space`` on ``target`` for ``spec``'s objective (see the module docstring)."""
    started = time.monotonic()
    objective = Objective.of(spec)
    runner = _Runner(spec, space, target, objective, options, progress or _quiet)
    try:
        start = space.snap(spec)
        for _ in range(FIRST_MEASUREMENTS_OF_SPEC):  # the first figure of the noise
            runner.measure(start, baseline=True)
        runner.noise = measure_noise(assess_all(objective, runner.trials))
        if options.exhaustive:
            for candidate in space.grid():
                runner.assessment(candidate)
        else:
            try:
                _climb(runner, start)
            except _BudgetSpent:
                runner.progress(f"  the climb stops at {len(runner.trials)} trials (its budget)")
        _measure_top_again(runner, start)
    finally:
        _restore(target, spec, runner.progress)
    assessments = assess_all(objective, runner.trials)
    noise = measure_noise(assessments)
    return TuneResult(
        spec,
        space,
        objective,
        "exhaustive" if options.exhaustive else "quick",
        runner.trials,
        assessments,
        noise,
        choose(assessments, noise),
        time.monotonic() - started,
    )


def _climb(runner: _Runner, start: Candidate) -> None:
    space = runner.space
    allowed = set(space.grid())
    current = _first_that_loads(runner, [start, *space.grid()], allowed)
    if current is None:
        return
    moved = True
    while moved:
        moved = False
        for axis in AXES:
            here = runner.assessment(current)
            best = _walk(runner, current, axis, 1, here, allowed)
            if best is here:  # up found nothing better: try down
                best = _walk(runner, current, axis, -1, here, allowed)
            if best.candidate != current:
                runner.progress(f"  moved along {axis}: {best.candidate.label}")
                current, moved = best.candidate, True


def _walk(
    runner: _Runner,
    current: Candidate,
    axis: str,
    step: int,
    best: Assessment,
    allowed: set[Candidate],
) -> Assessment:
    """Walk one direction from ``current``: the point with the best figures seen (``best`` if
    none ranks above it). Steps that do not beat the best by more than the noise count towards
    the stop."""
    here = runner.assessment(current)
    top = best
    probe: Candidate | None = current
    misses = 0
    while True:
        probe = runner.space.neighbour(probe, axis, step) if probe is not None else None
        if probe is None:
            return top
        if probe not in allowed:  # refused by the spec's checks: never tried, step over it
            continue
        trial = runner.assessment(probe)
        if not trial.loaded:  # Triton refused it: recorded, step over it
            continue
        p99_missed = any(value > runner.objective.p99_ms for value in trial.p99_ms)
        if p99_missed and not better(trial, here, runner.noise):
            return top  # this direction cannot meet the p99
        if trial.rank() > top.rank():
            top = trial
        if better(trial, best, runner.noise):
            best, misses = trial, 0
        else:
            misses += 1
            if misses > runner.options.patience:
                return top


def _first_that_loads(
    runner: _Runner, candidates: list[Candidate], allowed: set[Candidate]
) -> Candidate | None:
    for candidate in candidates:
        if candidate in allowed and runner.assessment(candidate).loaded:
            return candidate
    return None


def _measure_top_again(runner: _Runner, start: Candidate) -> None:
    """Measure the top candidates again until each has ``repeats`` measurements, in turn.

    Ranked by the medians so far, again after each round: a candidate that rises into the top
    on one lucky measurement is measured again too, so the pick always stands on ``repeats``
    measurements (at most ``MAX_RANKING_ROUNDS`` rounds). Each pass measures every short
    candidate once, then the spec as written: a config measured twice in a row is loaded over
    itself, and both figures share whatever state that load left (measured on tabular_mlp: one
    instance at batch 64 read 5,300/s three times in a row, and 2,300/s three times out of four
    when loaded after another config). In turn, every figure is taken after a different config,
    and the spec as written is measured side by side with the candidates that may replace it.
    """
    for _ in range(MAX_RANKING_ROUNDS):
        assessments = assess_all(runner.objective, runner.trials)
        ranked = sorted(
            (item for item in assessments if item.loaded and not item.baseline),
            key=lambda item: item.rank(),
            reverse=True,
        )
        short = [
            item.candidate
            for item in ranked[: runner.options.top]
            if len(runner.group(item.candidate, False)) < runner.options.repeats
        ]
        if not short:
            return
        while short:
            turn: list[tuple[Candidate, bool]] = [(c, False) for c in short] + [(start, True)]
            last = runner.trials[-1]
            if turn[0] == (last.candidate, last.baseline):  # never the same config twice in a row
                turn = turn[1:] + turn[:1]
            for candidate, baseline in turn:
                if runner.max_trials is not None and len(runner.trials) >= runner.max_trials:
                    return
                runner.measure(candidate, baseline=baseline)
            short = [c for c in short if len(runner.group(c, False)) < runner.options.repeats]


def _restore(target: TuningTarget, spec: ModelSpec, progress: Progress) -> None:
    """The model back on the repository's config.pbtxt (the spec as deployed)."""
    try:
        target.restore(spec)
    except Exception as error:
        progress(f"warning: could not reload {spec.name} with its repository config: {error}")
    else:
        progress(f"  {spec.name} reloaded with its repository config")


def _trial_line(trial: Trial, objective: Objective) -> str:
    label = "the spec as written" if trial.baseline else trial.candidate.label
    again = f" (again, #{trial.repeat + 1})" if trial.repeat else ""
    if not trial.loaded:
        return f"  trial {trial.number}: {label}{again}: Triton refused it: {trial.load_error}"
    figures = ", ".join(
        f"c={level.concurrency} {level.throughput_per_s:.0f}/s p99 {level.p99_ms:.2f} ms"
        + (f" ({level.errors} errors)" if level.errors else "")
        for level in trial.levels
    )
    return f"  trial {trial.number}: {label}{again}: {figures} ({trial.duration_s:.1f} s)"


def _quiet(_: str) -> None:
    return None
