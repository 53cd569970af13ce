"""`gpufleet tune` measured: time per trial, trials to the result (quick and exhaustive), and the
share of the exhaustive search's best throughput the quick search reaches.

Two CPU-servable models, each served by its own Triton (the nvidia-pytriton wheel's, loopback):

  tabular_mlp  modelconfigs/tabular_mlp.yaml: the registry's demo network exported by
               generators.model_export (TorchScript + python-backend model.py), torch_threads 1;
               nothing sleeps, the cost is torch and the python backend
  sleepy_mlp   tests/data/python_models/torch_mlp.py with a 2 ms sleep per execution (a fixed
               per-batch cost, as a GPU launch or an I/O wait), p99 20 ms at c=1 and c=8

Per model: the exhaustive search once on the bench grid (184 configs; the CLI's default on two
cores has 364), then the quick search three times on the same grid, each compared with the
exhaustive search's best (its trials, and its pick's throughput); then the spec as written, the
exhaustive pick and every quick pick measured side by side, alternating, at every level the
spec names, with the load gate's method: the fair comparison on a machine whose load drifts.
Where the p99 at the lowest level decided a quick search, its band's highest-throughput
candidate is measured side by side too (``quick_N_top_throughput``).
The machine is shared with other busy processes: every figure is noisy. The tuner's own noise
figure (the spread of repeated trials) is recorded with each run, and so is the load average.
Every trial of every search is kept beside the results, one JSON line each
(``<results>.trials.jsonl``): bench/tune_replay.py replays the quick search on them.

    .venv/bin/python bench/tune.py [--runs 3] [--models sleepy_mlp,tabular_mlp] [--window-s 0.3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))  # also runs without `pip install -e .`

from bench.loadgen import RESULTS, cpu_canary_ms, machine, write_config, write_results  # noqa: E402
from generators.model_export import export_model  # noqa: E402
from gpufleet.registry.demo import demo_network  # noqa: E402
from gpufleet.spec.loading import load_model_spec_file  # noqa: E402
from gpufleet.spec.model import ModelSpec  # noqa: E402
from gpufleet.spec.stack import LoadGateSettings  # noqa: E402
from gpufleet.tune.objective import Objective  # noqa: E402
from gpufleet.tune.search import TritonStopped, TuneOptions, TuneResult, tune  # noqa: E402
from gpufleet.tune.space import (  # noqa: E402
    Candidate,
    HostFacts,
    SearchSpace,
    SpaceLimits,
    build_space,
)
from gpufleet.tune.trial import (  # noqa: E402
    Trial,
    TrialRequest,
    TritonTarget,
    synthetic_request,
)
from validation.tritonserver import LocalTritonServer  # noqa: E402

# 4 instance counts x (max_batch_size 1, or 6 sizes x 3 delays x (none, max, and the level's batch
# of 8 where the size is above 8)) = 184 configs: wide enough that a trial share means something,
# narrow enough that the exhaustive walk fits a quarter of an hour.
BENCH_GRID = SpaceLimits(
    instance_counts=(1, 2, 3, 4),
    max_batch_sizes=(1, 2, 4, 8, 16, 32, 64),
    delays_us=(0, 500, 2000),
)
TOP, REPEATS = 3, 3  # both searches re-measure their top 3 to 3 measurements each, in turn
SIDE_BY_SIDE_ROUNDS = 3
TRITON_RESTARTS = 2  # per search, when Triton dies under it
SLEEPY = {
    "name": "sleepy_mlp",
    "backend": "python",
    "max_batch_size": 32,
    "inputs": [{"name": "features", "dtype": "fp32", "shape": [16]}],
    "outputs": [{"name": "scores", "dtype": "fp32", "shape": [4]}],
    "dynamic_batching": {"max_queue_delay_us": 1000, "preferred_batch_sizes": [8, 16]},
    "instance_groups": [{"kind": "cpu", "count": 1}],
    "parameters": {"execute_delay_ms": "2"},
    "objectives": {"p99_latency_ms": 20, "concurrency": [1, 8]},
}


def write_model(repository: Path, name: str) -> ModelSpec:
    if name == "tabular_mlp":
        spec = load_model_spec_file(PROJECT_ROOT / "modelconfigs" / "tabular_mlp.yaml").spec
        export_model(demo_network(spec), spec, write_config(repository, spec))
        return spec
    spec = ModelSpec.model_validate(SLEEPY)
    version = write_config(repository, spec)
    shutil.copy(
        PROJECT_ROOT / "tests" / "data" / "python_models" / "torch_mlp.py", version / "model.py"
    )
    return spec


def run_summary(result: TuneResult) -> dict[str, Any]:
    durations = [trial.duration_s for trial in result.trials]
    loads = [trial.load_s for trial in result.trials]
    chosen = result.choice.chosen
    return {
        "trials": len(result.trials),
        "configs_tried": result.configs_tried,
        "wall_s": round(result.wall_s, 1),
        "time_per_trial_s": {
            "median": round(statistics.median(durations), 2),
            "max": round(max(durations), 2),
            "load_median": round(statistics.median(loads), 2),
        },
        "noise": result.summary()["noise"],
        "decided_by": result.choice.decided_by,
        "chosen": (
            ("as written" if chosen.baseline else chosen.candidate.as_dict()) if chosen else None
        ),
        "chosen_throughput_per_s": round(chosen.throughput_per_s, 1) if chosen else None,
        "chosen_p99_ms": [round(v, 2) for v in chosen.p99_ms] if chosen else None,
        "load_average": os.getloadavg()[0],
    }


def trial_rows(model: str, search: str, trials: list[Trial]) -> list[dict[str, Any]]:
    """One row per trial, in order: the config's label ("as written" for the spec as written)
    and [concurrency, throughput/s, p99 ms] per level, or what Triton refused."""
    rows: list[dict[str, Any]] = []
    for trial in trials:
        row: dict[str, Any] = {
            "model": model,
            "search": search,
            "config": "as written" if trial.baseline else trial.candidate.label,
            "levels": [
                [level.concurrency, round(level.throughput_per_s, 1), round(level.p99_ms, 3)]
                for level in trial.levels
            ],
        }
        if not trial.loaded:
            row["refused"] = trial.load_error
        rows.append(row)
    return rows


def side_by_side(
    target: TritonTarget,
    spec: ModelSpec,
    space: SearchSpace,
    objective: Objective,
    picks: dict[str, Candidate | None],
    settings: LoadGateSettings,
) -> dict[str, Any]:
    """The spec as written and each distinct pick (None: the search kept the spec as written),
    in turn, SIDE_BY_SIDE_ROUNDS times, at every level the spec names: the load drifts on a
    shared machine, and alternating spreads the drift over all of them. Medians per level."""
    served: dict[Candidate | None, ModelSpec] = {None: spec}
    for candidate in picks.values():
        if candidate is not None:
            served.setdefault(candidate, space.spec_for(candidate))
    runs: dict[Candidate | None, list[Trial]] = {key: [] for key in served}
    for _ in range(SIDE_BY_SIDE_ROUNDS):
        for key, model_spec in served.items():
            candidate = key or space.snap(spec)
            request = TrialRequest(model_spec, candidate, objective.levels, settings, number=0)
            runs[key].append(target.run_trial(request))
    figures = {key: _per_level(trials) for key, trials in runs.items()}
    written = figures[None]
    out: dict[str, Any] = {"as_written": written}
    for name, candidate in picks.items():
        mine = figures[candidate]
        out[name] = {
            "candidate": candidate.as_dict() if candidate else "the spec as written",
            "per_level": mine,
            "beats_as_written_at_every_level": all(
                _beats(level, other) for level, other in zip(mine, written, strict=True)
            ),
            "throughput_ratio_to_as_written": [
                round(level["per_s"] / max(other["per_s"], 1e-9), 3)
                for level, other in zip(mine, written, strict=True)
            ],
        }
    best = figures[picks["exhaustive"]][-1]["per_s"]
    for name, candidate in picks.items():
        out[name]["share_of_exhaustive_pick"] = round(
            figures[candidate][-1]["per_s"] / max(best, 1e-9), 3
        )
    return out


def _per_level(trials: list[Trial]) -> list[dict[str, float]]:
    loaded = [trial for trial in trials if trial.loaded]
    if not loaded:
        return []
    return [
        {
            "c": loaded[0].levels[index].concurrency,
            "per_s": round(statistics.median(t.levels[index].throughput_per_s for t in loaded), 1),
            "p99_ms": round(statistics.median(t.levels[index].p99_ms for t in loaded), 2),
        }
        for index in range(len(loaded[0].levels))
    ]


def _beats(mine: dict[str, float], written: dict[str, float]) -> bool:
    """At one level: at least the throughput, and a p99 no higher (within 5%: both are medians
    of a few windows on a shared machine, and a tie is not a loss)."""
    return mine["per_s"] >= written["per_s"] * 0.95 and mine["p99_ms"] <= written["p99_ms"] * 1.05


def bench_model(
    name: str,
    host: HostFacts,
    options: dict[str, TuneOptions],
    runs: int,
    settings: LoadGateSettings,
    model: dict[str, Any],
    save: Callable[[], None],
    keep_trials: Callable[[list[dict[str, Any]]], None],
    others: dict[str, Candidate],
    earlier: dict[str, Any] | None = None,
) -> None:
    """One model: the exhaustive search (or ``earlier``'s), ``runs`` quick searches, then the
    side-by-side (with ``others``: picks made elsewhere, such as Model Analyzer's)."""
    with tempfile.TemporaryDirectory() as scratch:
        repository = Path(scratch) / "model_repository"
        spec = write_model(repository, name)
        space = build_space(spec, host, BENCH_GRID)
        model.update(grid=len(space.grid()), quick_runs=[])
        with LocalTritonServer(repository, Path(scratch) / "triton") as server:
            inputs = synthetic_request(spec)
            target = TritonTarget(server, server.grpc_url, repository, inputs)

            def search(mode: str, search_name: str) -> tuple[TuneResult, dict[str, Any]]:
                """One search (``search_name``: "exhaustive", "quick_1", ...); when Triton
                dies under it (seen twice in this bench: the python backend's stub), its log's
                tail is kept, Triton is started again and the search starts over."""
                nonlocal target
                deaths = 0
                while True:
                    print(f"{name}: {search_name}", flush=True)
                    try:
                        result = tune(
                            spec,
                            space,
                            target,
                            options[mode],
                            progress=lambda line: print(line, flush=True),
                        )
                    except TritonStopped as error:
                        deaths += 1
                        if deaths > TRITON_RESTARTS:
                            raise
                        tail = server.log_text()[-3000:]
                        model.setdefault("triton_deaths", []).append(
                            {"during": search_name, "error": str(error), "log_tail": tail}
                        )
                        print(f"{name}: Triton died ({error}); starting it again", flush=True)
                        server.stop()
                        server.start()
                        target = TritonTarget(server, server.grpc_url, repository, inputs)
                        continue
                    keep_trials(trial_rows(name, search_name, result.trials))
                    return result, run_summary(result)

            picks: dict[str, Candidate | None] = {}
            if earlier is not None:  # the exhaustive search of an earlier run of this bench
                model["exhaustive"] = earlier["exhaustive"]
                model["exhaustive_from"] = earlier["from"]
                chosen = earlier["exhaustive"]["chosen"]
                picks["exhaustive"] = None if chosen == "as written" else _candidate_of(chosen)
            else:
                full, model["exhaustive"] = search("exhaustive", "exhaustive")
                if full.choice.chosen is not None:
                    picks["exhaustive"] = _pick(full)
            save()
            for run in range(runs):
                quick, summary = search("quick", f"quick_{run + 1}")
                summary["trials_share_of_exhaustive"] = round(
                    summary["trials"] / model["exhaustive"]["trials"], 3
                )
                best = model["exhaustive"]["chosen_throughput_per_s"]
                if quick.choice.chosen and best:
                    summary["share_of_exhaustive_best_in_search"] = round(
                        quick.choice.chosen.throughput_per_s / best, 3
                    )
                    picks[f"quick_{run + 1}"] = _pick(quick)
                    top = _top_throughput(quick)
                    if top is not None:
                        picks[f"quick_{run + 1}_top_throughput"] = top
                model["quick_runs"].append(summary)
                save()  # kept after every run
            picks.update(others)
            if "exhaustive" in picks:
                print(f"{name}: side by side", flush=True)
                model["side_by_side"] = side_by_side(
                    target, spec, space, Objective.of(spec), picks, settings
                )
                for run, summary in enumerate(model["quick_runs"], start=1):
                    for suffix in ("", "_top_throughput"):
                        figures = model["side_by_side"].get(f"quick_{run}{suffix}")
                        if figures:
                            summary[f"share_of_exhaustive_pick_side_by_side{suffix}"] = figures[
                                "share_of_exhaustive_pick"
                            ]
            save()


def _pick(result: TuneResult) -> Candidate | None:
    """The search's pick; None where it kept the spec as written."""
    chosen = result.choice.chosen
    assert chosen is not None
    return None if chosen.baseline else chosen.candidate


def _top_throughput(result: TuneResult) -> Candidate | None:
    """Where the p99 at the lowest level decided among candidates within the throughput noise,
    the one with the highest throughput among them: what the search reached, apart from what
    the objective's second rule traded for a lower p99."""
    chosen, band = result.choice.chosen, result.choice.within_noise
    if chosen is None or chosen.baseline or not band or band[0].key == chosen.key:
        return None
    return band[0].candidate


def _candidate_of(chosen: dict[str, Any]) -> Candidate:
    """The candidate a results file recorded (Candidate.as_dict)."""
    sizes, batch = chosen["preferred_batch_sizes"], chosen["max_batch_size"]
    return Candidate(
        chosen["instance_count"],
        batch,
        chosen["max_queue_delay_us"],
        "none" if not sizes else "max" if sizes == [batch] else str(sizes[0]),
        chosen["instance_kind"],
    )


def _other_pick(text: str) -> tuple[str, Candidate]:
    name, _, values = text.partition("=")
    count, batch, delay, preferred = values.split(",")
    if preferred not in ("none", "max") and not preferred.isdigit():
        raise SystemExit(f"--also {text}: the preferred size is none, max or a number")
    return name, Candidate(int(count), int(batch), int(delay), preferred)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="quick searches per model")
    parser.add_argument("--models", default="sleepy_mlp,tabular_mlp")
    parser.add_argument("--window-s", type=float, default=0.3)
    parser.add_argument("--out", type=Path, default=RESULTS / "tune.json")
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME=COUNT,MBS,DELAY_US,none|max|SIZE",
        help="a config found elsewhere (Model Analyzer's pick) measured in the side-by-side",
    )
    parser.add_argument(
        "--exhaustive-from",
        type=Path,
        metavar="RESULTS",
        help="take each model's exhaustive search from an earlier run's results file",
    )
    arguments = parser.parse_args()
    settings = LoadGateSettings(
        window_s=arguments.window_s, stable_windows=3, stability_percent=15, max_windows=8
    )
    options = {
        mode: TuneOptions(
            exhaustive=mode == "exhaustive", settings=settings, top=TOP, repeats=REPEATS
        )
        for mode in ("exhaustive", "quick")
    }
    host = HostFacts.this_machine()
    results: dict[str, Any] = {
        **machine(),
        "method": "gpufleet.tune per model: the exhaustive search once, then the quick search "
        f"{arguments.runs} times, on the bench grid {BENCH_GRID}; validation/load.py "
        f"measure_level, windows of {settings.window_s:g} s, {settings.stable_windows} within "
        f"{settings.stability_percent:g}%, at most {settings.max_windows}; top {TOP} re-measured "
        f"to {REPEATS} measurements each; the quick search within its default budget (15% of "
        "the grid in trials, at least 20); then the spec as written and every pick measured side "
        f"by side, alternating, {SIDE_BY_SIDE_ROUNDS} rounds",
        "cpu_canary_ms_start": cpu_canary_ms(),
        "models": {},
    }

    def save() -> None:
        write_results(arguments.out, results)

    trials_path = arguments.out.with_suffix(".trials.jsonl")
    trials_path.unlink(missing_ok=True)

    def keep_trials(rows: list[dict[str, Any]]) -> None:
        with trials_path.open("a") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)

    for name in arguments.models.split(","):
        model: dict[str, Any] = {}
        results["models"][name] = model
        others = dict(_other_pick(text) for text in arguments.also)
        earlier = None
        if arguments.exhaustive_from:
            recorded = json.loads(arguments.exhaustive_from.read_text())["models"][name]
            earlier = {"exhaustive": recorded["exhaustive"], "from": str(arguments.exhaustive_from)}
        bench_model(
            name, host, options, arguments.runs, settings, model, save, keep_trials, others, earlier
        )
    results["cpu_canary_ms_end"] = cpu_canary_ms()
    save()


if __name__ == "__main__":
    start = time.monotonic()
    main()
    print(f"done in {time.monotonic() - start:.0f} s")
