"""`gpufleet tune`'s quick search replayed offline on trials bench/tune.py recorded: a change
to the climb or to the choice is tried in seconds, where a run on Triton takes a quarter of an
hour per model.

What is real: the tuner's own code (gpufleet.tune: the space on the bench grid, the climb, the
re-measurement in turn, the noise and the choice), unchanged. What is not: the measurements.
Each config's recorded readings stand in for it: a measurement draws one of them at random and
scales its figures by a jitter as large as the recorded repeats' (the median, over the configs
read at least three times, of the standard deviation of the log of a figure). The spec as
written draws from its own readings, both its states included (sleepy_mlp: about 1,400/s or
about 2,050/s). No Triton runs, so a config loaded after another keeps no state of it.

A pick is scored by its config's median reading at the highest level, against the best such
median among the configs that meet the objective. Most configs were read once, so the best is
the luckiest reading of a plateau, and the shares are pessimistic: read them to compare rules
with each other, and the side-by-side figures of bench/tune.py for a pick's real worth.

    .venv/bin/python bench/tune_replay.py bench/results/tune_sleepy_quiet_*.trials.jsonl \\
        --model sleepy_mlp [--runs 100] [--out bench/results/tune_replay_sleepy_mlp.json]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))  # also runs without `pip install -e .`

from bench.loadgen import RESULTS, write_results  # noqa: E402
from bench.tune import BENCH_GRID, REPEATS, SLEEPY, TOP  # noqa: E402
from gpufleet.spec.loading import load_model_spec_file  # noqa: E402
from gpufleet.spec.model import ModelSpec  # noqa: E402
from gpufleet.tune import search  # noqa: E402
from gpufleet.tune.objective import Objective  # noqa: E402
from gpufleet.tune.space import HostFacts, SearchSpace, build_space  # noqa: E402
from gpufleet.tune.trial import LevelResult, Trial, TrialRequest  # noqa: E402

AS_WRITTEN = "as written"
Reading = tuple[tuple[int, float, float], ...]  # (concurrency, throughput/s, p99 ms) per level


def load_readings(paths: Sequence[Path], model: str) -> tuple[dict[str, list[Reading]], int]:
    """Every loaded trial's figures by config label, and the exhaustive search's trial count
    (of the last file that has one)."""
    readings: dict[str, list[Reading]] = defaultdict(list)
    exhaustive_trials = 0
    for path in paths:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [row for row in rows if row["model"] == model]
        exhaustive = sum(1 for row in rows if row["search"] == "exhaustive")
        exhaustive_trials = exhaustive or exhaustive_trials
        for row in rows:
            if row["levels"] and "refused" not in row:
                readings[row["config"]].append(tuple(tuple(level) for level in row["levels"]))
    if not readings:
        raise SystemExit(f"no trials of {model} in {', '.join(map(str, paths))}")
    return readings, exhaustive_trials


def jitter_of(readings: dict[str, list[Reading]], figure: int) -> float:
    """The typical standard deviation of log(figure) over configs read at least 3 times
    (figure 1: throughput, 2: p99) at the highest level."""
    spreads = [
        statistics.stdev(math.log(reading[-1][figure]) for reading in values)
        for values in readings.values()
        if len(values) >= 3
    ]
    return statistics.median(spreads) if spreads else 0.0


def model_spec(model: str) -> ModelSpec:
    if model == "tabular_mlp":
        return load_model_spec_file(PROJECT_ROOT / "modelconfigs" / "tabular_mlp.yaml").spec
    if model == "sleepy_mlp":
        return ModelSpec.model_validate(SLEEPY)
    raise SystemExit(f"--model {model}: bench/tune.py's models are tabular_mlp and sleepy_mlp")


class Replay:
    """Stands in for Triton (gpufleet.tune.trial.TuningTarget): each trial draws a recorded
    reading of the config."""

    address = "the replay"

    def __init__(self, readings: dict[str, list[Reading]], rng: random.Random) -> None:
        self.readings, self.rng = readings, rng
        self.throughput_jitter = jitter_of(readings, 1)
        self.p99_jitter = jitter_of(readings, 2)

    def run_trial(self, request: TrialRequest) -> Trial:
        label = AS_WRITTEN if request.baseline else request.candidate.label
        if label not in self.readings:
            raise SystemExit(f"no recorded trial of {label}: replay trials of the same grid")
        reading = self.rng.choice(self.readings[label])
        figures = tuple(
            LevelResult(
                concurrency,
                throughput * self.rng.lognormvariate(0, self.throughput_jitter),
                p99 * self.rng.lognormvariate(0, self.p99_jitter),
                p99 / 2,
                0,
                True,
            )
            for concurrency, throughput, p99 in reading
        )
        return request.trial(figures)

    def live(self) -> bool:
        return True

    def restore(self, spec: ModelSpec) -> None:
        return None


def medians(readings: dict[str, list[Reading]], objective: Objective) -> dict[str, float]:
    """Each config's median throughput at the highest level, for those whose median p99 meets
    the objective at every level."""
    met = {}
    for label, values in readings.items():
        p99s = [statistics.median(r[index][2] for r in values) for index in range(len(values[0]))]
        throughput = statistics.median(r[-1][1] for r in values)
        if max(p99s) <= objective.p99_ms and throughput >= (objective.min_throughput_per_s or 0):
            met[label] = throughput
    return met


def replay(
    spec: ModelSpec,
    space: SearchSpace,
    readings: dict[str, list[Reading]],
    seed: int,
    *,
    exhaustive: bool,
) -> tuple[int, str]:
    """One search on recorded readings: its trial count and its pick's label."""
    options = search.TuneOptions(exhaustive=exhaustive, top=TOP, repeats=REPEATS)
    result = search.tune(spec, space, Replay(readings, random.Random(seed)), options)
    chosen = result.choice.chosen
    if chosen is None:
        return len(result.trials), "nothing meets the objective"
    return len(result.trials), AS_WRITTEN if chosen.baseline else chosen.candidate.label


def share_figures(shares: list[float]) -> dict[str, float]:
    """The median, the 10th percentile and the count at 0.97 or more of sorted shares."""
    return {
        "median": round(statistics.median(shares), 3),
        "p10": round(shares[len(shares) // 10], 3),
        "at_least_0.97": sum(share >= 0.97 for share in shares),
    }


def pick_counts(runs: list[tuple[int, str]], scores: dict[str, float]) -> list[dict[str, Any]]:
    """How often each config was picked, most often first, with its median reading."""
    return [
        {"config": label, "runs": count, "median_per_s": scores.get(label)}
        for label, count in Counter(label for _, label in runs).most_common()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trials", type=Path, nargs="+", help="bench/tune.py's .trials.jsonl")
    parser.add_argument("--model", required=True)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--cpus", type=int, default=2, help="the host the trials ran on")
    parser.add_argument("--out", type=Path)
    arguments = parser.parse_args()
    spec = model_spec(arguments.model)
    space = build_space(spec, HostFacts(cpus=arguments.cpus), BENCH_GRID)
    readings, exhaustive_trials = load_readings(arguments.trials, arguments.model)
    unread = [c.label for c in space.grid() if c.label not in readings]
    if unread:
        raise SystemExit(f"{len(unread)} grid configs were never read, such as {unread[0]}")
    scores = medians(readings, Objective.of(spec))
    best = max(scores, key=scores.__getitem__)
    runs, fulls = [], []
    for seed in range(arguments.runs):
        runs.append(replay(spec, space, readings, seed, exhaustive=False))
        fulls.append(replay(spec, space, readings, seed + arguments.runs, exhaustive=True))
    shares = sorted(scores.get(label, 0.0) / scores[best] for _, label in runs)
    exhaustive_shares = sorted(scores.get(label, 0.0) / scores[best] for _, label in fulls)
    of_exhaustive = sorted(
        scores.get(label, 0.0) / scores[full]
        for (_, label), (_, full) in zip(runs, fulls, strict=True)
    )
    trials = [count for count, _ in runs]
    summary: dict[str, Any] = {
        "model": arguments.model,
        "from": [str(path) for path in arguments.trials],
        "runs": arguments.runs,
        "jitter": {
            "throughput": round(jitter_of(readings, 1), 4),
            "p99": round(jitter_of(readings, 2), 4),
        },
        "best_median": {"config": best, "per_s": scores[best]},
        "trials": {
            "median": statistics.median(trials),
            "max": max(trials),
            "exhaustive": exhaustive_trials,
            "share_of_exhaustive_median": round(statistics.median(trials) / exhaustive_trials, 3)
            if exhaustive_trials
            else None,
        },
        "share_of_exhaustive_pick": share_figures(of_exhaustive),
        "exhaustive_share_of_best": share_figures(exhaustive_shares),
        "exhaustive_picks": pick_counts(fulls, scores),
        "share_of_best": share_figures(shares),
        "picks": pick_counts(runs, scores),
    }
    print(json.dumps(summary, indent=2))
    out = arguments.out or RESULTS / f"tune_replay_{arguments.model}.json"
    write_results(out, summary)


if __name__ == "__main__":
    main()
