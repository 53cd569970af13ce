"""What `gpufleet tune` is after, from the spec's own objectives, and how noise is respected.

A candidate *meets* the objective when it loaded, no request failed, its p99 is at most
``objectives.p99_latency_ms`` at every concurrency level the spec names, and its throughput at
the highest level is at least ``min_throughput_per_s`` (when set). Among those:

1. the highest throughput at the highest level decides;
2. candidates whose throughput lies within the measured noise of the best are told apart by the
   lowest p99 at the lowest level, when that difference exceeds the noise too. Only candidates
   measured more than once take part: one p99 reading at a low level is a draw from a wide
   spread (sleepy_mlp, quiet machine: ±33% to ±80% between repeats), and the lowest single
   reading among many is luck (run H: picked at 0.91 of the best, its p99 not confirmed side by
   side). The best by throughput is among the top candidates measured again, unless the quick
   search's budget ran out first;
3. the pick replaces the spec as written only when it beats it (measured side by side in the
   same run) by more than the noise: it meets the objective where the spec as written does
   not, or has a higher throughput, or the same throughput and a lower p99 at the lowest level
   (than the spec's median by more than the noise, and than its best reading). Otherwise the
   spec as written is kept: a change the measurements cannot tell from noise is not a
   recommendation. A spec as written whose readings show more than one steady state (a span of
   more than three typical spreads) is taken at its lower state against a steady pick.

The noise is the spread of repeated trials of one candidate: (max - min) / median of its
throughput (highest level) and of its p99 (lowest level), leaving out the one measurement
farthest from the median when there are four or more. A difference between two candidates
must exceed the larger of their own spreads, and never less than the typical spread (the median
over the candidates measured more than once), which also stands in for a candidate measured
once. One candidate whose figures swing (measured on tabular_mlp: one instance at batch 32 read
4,098/s, then 1,525/s) thus blurs its own comparisons only, not every comparison of the run.
When nothing meets the objective, the closest candidate is the one whose worst ratio
(p99 / objective, objective / throughput) is smallest.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from gpufleet.spec.model import ModelSpec
from gpufleet.tune.space import Candidate, SpaceError
from gpufleet.tune.trial import Trial

FAILED = math.inf
ConfigKey = tuple[Candidate, bool]  # a candidate, and whether it is the spec as written


@dataclass(frozen=True)
class Objective:
    levels: tuple[int, ...]
    p99_ms: float
    min_throughput_per_s: float | None

    @classmethod
    def of(cls, spec: ModelSpec) -> Objective:
        objectives = spec.objectives
        if objectives is None or objectives.p99_latency_ms is None:
            raise SpaceError(
                f"{spec.name}: objectives.p99_latency_ms is not set; the tuner needs a p99 "
                "objective (and the concurrency levels it holds at) to know what is good enough"
            )
        return cls(
            tuple(objectives.concurrency),
            objectives.p99_latency_ms,
            objectives.min_throughput_per_s,
        )

    @property
    def text(self) -> str:
        levels = ", ".join(str(level) for level in self.levels)
        minimum = (
            f", >= {self.min_throughput_per_s:g}/s at c={self.levels[-1]}"
            if self.min_throughput_per_s
            else ""
        )
        return f"p99 <= {self.p99_ms:g} ms at c={levels}{minimum}"


@dataclass(frozen=True)
class Assessment:
    """One candidate over all its measurements (medians where measured more than once)."""

    candidate: Candidate
    baseline: bool
    trials: tuple[Trial, ...]
    throughput_per_s: float  # at the highest level
    p99_ms: tuple[float, ...]  # per level
    meets: bool
    violation: float  # worst ratio against the objectives; <= 1 when met

    @property
    def p99_lowest_ms(self) -> float:
        return self.p99_ms[0] if self.p99_ms else FAILED

    @property
    def p99_highest_ms(self) -> float:
        return self.p99_ms[-1] if self.p99_ms else FAILED

    @property
    def loaded(self) -> bool:
        return any(trial.loaded for trial in self.trials)

    @property
    def throughput_readings(self) -> list[float]:
        """The throughput at the highest level of each of its measurements."""
        return [trial.levels[-1].throughput_per_s for trial in self.trials if trial.levels]

    @property
    def p99_lowest_readings(self) -> list[float]:
        """The p99 at the lowest level of each of its measurements."""
        return [trial.levels[0].p99_ms for trial in self.trials if trial.levels]

    @property
    def lowest_throughput_per_s(self) -> float:
        return min(self.throughput_readings, default=0.0)

    @property
    def label(self) -> str:
        return "the spec as written" if self.baseline else self.candidate.label

    @property
    def key(self) -> ConfigKey:
        return (self.candidate, self.baseline)

    def rank(self) -> tuple[bool, float]:
        """Sort key, best last: meeting first, then throughput; otherwise the closest."""
        return (self.meets, self.throughput_per_s if self.meets else -self.violation)


def assess(objective: Objective, trials: Sequence[Trial]) -> Assessment:
    """Combine the measurements of one candidate (all with the same candidate and baseline)."""
    loaded = [
        trial for trial in trials if trial.loaded and len(trial.levels) == len(objective.levels)
    ]
    first = trials[0]
    if not loaded:
        return Assessment(first.candidate, first.baseline, tuple(trials), 0.0, (), False, FAILED)
    throughput = statistics.median(trial.levels[-1].throughput_per_s for trial in loaded)
    p99 = tuple(
        statistics.median(trial.levels[index].p99_ms for trial in loaded)
        for index in range(len(objective.levels))
    )
    errors = any(level.errors for trial in loaded for level in trial.levels)
    ratios = [value / objective.p99_ms for value in p99]
    if objective.min_throughput_per_s:
        ratios.append(objective.min_throughput_per_s / throughput if throughput > 0 else FAILED)
    violation = FAILED if errors else max(ratios)
    return Assessment(
        first.candidate, first.baseline, tuple(trials), throughput, p99, violation <= 1.0, violation
    )


def assess_all(objective: Objective, trials: Sequence[Trial]) -> list[Assessment]:
    groups: dict[tuple[Candidate, bool], list[Trial]] = {}
    for trial in trials:
        groups.setdefault((trial.candidate, trial.baseline), []).append(trial)
    return [assess(objective, group) for group in groups.values()]


@dataclass(frozen=True)
class Spread:
    """A spread of repeated trials, as fractions of the median (0.05 = 5%)."""

    throughput: float
    p99: float


@dataclass(frozen=True)
class Noise:
    """The spreads of repeated trials: typical (the median over the candidates measured more
    than once) and each such candidate's own."""

    throughput: float  # typical
    p99: float  # typical
    candidates: int  # candidates measured more than once
    measurements: int
    own: dict[ConfigKey, Spread] = field(default_factory=dict)

    def between(self, one: Assessment, other: Assessment) -> Spread:
        """What a difference between these two must exceed: the larger of their own spreads,
        never less than the typical spread."""
        spreads = [Spread(self.throughput, self.p99)]
        spreads += [self.own[key] for key in (one.key, other.key) if key in self.own]
        return Spread(
            max(spread.throughput for spread in spreads), max(spread.p99 for spread in spreads)
        )

    def unsteady(self, assessment: Assessment) -> bool:
        """Whether its throughput readings (at least 3, none left out) span more than UNSTEADY
        times the typical spread: more than one steady state, not noise."""
        values = assessment.throughput_readings
        if len(values) < 3 or statistics.median(values) <= 0:
            return False
        return (max(values) - min(values)) / statistics.median(values) > UNSTEADY * self.throughput

    @property
    def largest_own_throughput(self) -> float:
        return max((spread.throughput for spread in self.own.values()), default=0.0)

    @property
    def text(self) -> str:
        largest = ""
        if self.own:
            largest = f"; the largest own spread: throughput ±{self.largest_own_throughput:.1%}"
        return (
            f"throughput ±{self.throughput:.1%}, p99 ±{self.p99:.1%} (typical spread of "
            f"{self.measurements} measurements of {self.candidates} candidates{largest})"
        )


MIN_NOISE = 0.01  # never call a difference under 1% real: windows agree to a few percent at best


def measure_noise(assessments: Sequence[Assessment]) -> Noise:
    own: dict[ConfigKey, Spread] = {}
    measurements = 0
    for assessment in assessments:
        loaded = [trial for trial in assessment.trials if trial.loaded and trial.levels]
        if len(loaded) < 2:
            continue
        measurements += len(loaded)
        own[assessment.key] = Spread(
            _spread([t.levels[-1].throughput_per_s for t in loaded]),
            _spread([t.levels[0].p99_ms for t in loaded]),
        )
    typical = (
        Spread(
            statistics.median(spread.throughput for spread in own.values()),
            statistics.median(spread.p99 for spread in own.values()),
        )
        if own
        else Spread(0.0, 0.0)
    )
    return Noise(
        max(MIN_NOISE, typical.throughput),
        max(MIN_NOISE, typical.p99),
        len(own),
        measurements,
        own,
    )


# A config whose readings span more than this many typical spreads has more than one steady
# state (sleepy_mlp's spec as written: about 1,400/s or about 2,050/s, spreads of 5-9%).
UNSTEADY = 3.0
TRIM_FROM = 4  # from this many measurements on, the one farthest from the median is left out


def _spread(values: Sequence[float]) -> float:
    """(max - min) / median; from TRIM_FROM values on, without the one farthest from the
    median: the spec as written is measured in every pass, and one reading of 2,067/s among
    1,382-1,490/s (sleepy_mlp, quiet machine) made its spread 58% and hid a pick 42% faster."""
    middle = statistics.median(values)
    if middle <= 0:
        return 0.0
    kept = list(values)
    if len(kept) >= TRIM_FROM:
        kept.remove(max(kept, key=lambda value: abs(value - middle)))
    return (max(kept) - min(kept)) / middle


def better(one: Assessment, other: Assessment, noise: Noise) -> bool:
    """Whether ``one`` beats ``other`` by more than the noise between them."""
    if one.meets != other.meets:
        return one.meets
    spread = noise.between(one, other)
    if one.meets:
        return one.throughput_per_s > other.throughput_per_s * (1 + spread.throughput)
    return one.violation < other.violation * (1 - spread.p99)


@dataclass(frozen=True)
class Choice:
    chosen: Assessment | None  # None: nothing meets the objective
    closest: Assessment | None  # the best there is, met or not
    decided_by: str
    within_noise: tuple[Assessment, ...] = ()


def choose(assessments: Sequence[Assessment], noise: Noise) -> Choice:
    """The objective applied to every grid candidate, then the pick against the spec as written
    (see the module docstring): kept when the pick does not beat it by more than the noise."""
    choice = _choose_candidate(assessments, noise)
    written = next((item for item in assessments if item.baseline and item.loaded), None)
    pick = choice.chosen
    if pick is None or written is None:
        return choice
    if _beats_written(pick, written, noise):
        if not better(pick, written, noise) and _beats_lower_state(pick, written, noise):
            readings = written.throughput_readings
            return replace(
                choice,
                decided_by=f"{choice.decided_by}; the spec as written read "
                f"{min(readings):.0f}-{max(readings):.0f}/s, more than one steady state, and "
                "is taken at its lower state",
            )
        return choice
    decided_by = (
        f"the spec as written: the best candidate ({pick.candidate.label}, "
        f"{pick.throughput_per_s:.0f}/s, p99 {pick.p99_lowest_ms:.2f} ms) does not beat it "
        f"({written.throughput_per_s:.0f}/s, p99 {written.p99_lowest_ms:.2f} ms) by more than "
        "the noise"
    )
    if _lower_p99_than_median(pick, written, noise.between(pick, written)):
        best_reading = min(written.p99_lowest_readings, default=FAILED)
        decided_by += (
            f"; its p99 is lower than the spec's median, not than its best reading "
            f"({best_reading:.2f} ms)"
        )
    return Choice(written, written, decided_by, choice.within_noise)


def _beats_written(pick: Assessment, written: Assessment, noise: Noise) -> bool:
    """``better`` (the objective met, or the throughput), or the same throughput and either a
    spec as written taken at its lower state (``_beats_lower_state``) or a lower p99 at the
    lowest level (``_lower_p99_than_written``)."""
    if better(pick, written, noise):
        return True
    spread = noise.between(pick, written)
    if not written.meets or pick.throughput_per_s < written.throughput_per_s * (
        1 - spread.throughput
    ):
        return False
    return _beats_lower_state(pick, written, noise) or _lower_p99_than_written(
        pick, written, spread
    )


def _lower_p99_than_written(pick: Assessment, written: Assessment, spread: Spread) -> bool:
    """The pick's p99 at the lowest level below the spec's median by more than the noise, and
    below the spec's best reading. A spec that once read as low a p99 as the pick serves it in
    one of its states: tabular_mlp's spec as written read 5.1-5.9 ms three times and 2.3 ms once
    in run J's quick search 1, against a pick at 2.3-3.0 ms; the pick replaced it and served
    0.81 of its throughput side by side, at a higher p99."""
    return _lower_p99_than_median(pick, written, spread) and (
        pick.p99_lowest_ms < min(written.p99_lowest_readings, default=FAILED)
    )


def _lower_p99_than_median(pick: Assessment, written: Assessment, spread: Spread) -> bool:
    """The pick's median p99 at the lowest level below the spec's by more than the noise."""
    return pick.p99_lowest_ms < written.p99_lowest_ms * (1 - spread.p99)


def _beats_lower_state(pick: Assessment, written: Assessment, noise: Noise) -> bool:
    """A steady pick against a spec as written with more than one steady state: the spec is
    taken at its lower state, its lowest reading, since that is what it serves after some
    loads. Replayed on sleepy_mlp's recorded trials, the median rule alone kept its spec as
    written (about 1,400/s or about 2,050/s) in 57 of 200 exhaustive searches, 1.5x slower than
    their pick."""
    return (
        noise.unsteady(written)
        and not noise.unsteady(pick)
        and pick.throughput_per_s > written.lowest_throughput_per_s * (1 + noise.throughput)
    )


def _choose_candidate(assessments: Sequence[Assessment], noise: Noise) -> Choice:
    """The objective applied to every grid candidate (the spec as written is not one: its
    preferred sizes may be off the grid)."""
    loaded = [item for item in assessments if item.loaded and not item.baseline]
    if not loaded:
        return Choice(None, None, "no candidate loaded")
    meeting = [assessment for assessment in loaded if assessment.meets]
    if not meeting:
        closest = min(loaded, key=lambda assessment: assessment.violation)
        return Choice(None, closest, "no candidate meets the objective; the closest is shown")
    best = max(meeting, key=lambda assessment: assessment.throughput_per_s)
    band = tuple(
        sorted(
            (
                assessment
                for assessment in meeting
                if assessment.throughput_per_s
                >= best.throughput_per_s * (1 - noise.between(best, assessment).throughput)
            ),
            key=lambda assessment: -assessment.throughput_per_s,
        )
    )
    if len(band) == 1:
        return Choice(best, best, "throughput: no other candidate came within the noise", band)
    measured_again = [item for item in band if len(item.throughput_readings) > 1]
    lowest = min(measured_again, key=lambda item: item.p99_lowest_ms, default=best)
    if lowest is not best and lowest.p99_lowest_ms < best.p99_lowest_ms * (
        1 - noise.between(best, lowest).p99
    ):
        return Choice(
            lowest,
            lowest,
            f"p99 at the lowest level: {len(band)} candidates within the throughput noise of the "
            f"best, and of the {len(measured_again)} measured more than once, this one's p99 at "
            "the lowest level is lower by more than the noise",
            band,
        )
    return Choice(
        best,
        best,
        f"throughput: {len(band)} candidates within its noise; of the {len(measured_again)} "
        "measured more than once, none has a p99 at the lowest level lower by more than the "
        "noise",
        band,
    )
