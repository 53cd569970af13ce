"""`gpufleet tune` measured: time per trial, trials to the result (quick and exhaustive), and the
share of the exhaustive search's best throughput the quick search reaches.

Two CPU-servable models, each served by its own Triton (the nvidia-pytriton wheel's, loopback):

  tabular_mlp  modelconfigs/tabular_mlp.yaml: the registry's demo network exported by
               generators.model_export (TorchScript + python-backend model.py), torch_threads 1;
               nothing sleeps, the cost is torch and the python backend
  sleepy_mlp   tests/data/python_models/torch_mlp.py with a 2 ms sleep per execution (a fixed
               per-batch cost, as a GPU launch or an I/O wait), p99 20 ms at c=1 and c=8

Per model and run: the quick search, then the exhaustive search on the same grid (the bench
grid below, narrower than the CLI's default so that the walk fits in minutes), then the spec as
written and the exhaustive pick measured side by side, alternating, with the load gate's method.
The machine is shared with other busy processes: every figure is noisy. The tuner's own noise
figure (the spread of repeated trials) is recorded with each run, and so is the load average.

    .venv/bin/python bench/tune.py [--runs 1] [--models tabular_mlp,sleepy_mlp] [--window-s 0.3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
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
from gpufleet.tune.objective import assess  # noqa: E402
from gpufleet.tune.search import TuneOptions, TuneResult, tune  # noqa: E402
from gpufleet.tune.space import HostFacts, SpaceLimits, build_space  # noqa: E402
from gpufleet.tune.trial import TritonTarget, run_trial, synthetic_request  # noqa: E402
from validation.tritonserver import LocalTritonServer  # noqa: E402

BENCH_GRID = SpaceLimits(
    instance_counts=(1, 2), max_batch_sizes=(1, 4, 16, 64), delays_us=(0, 2000)
)
SIDE_BY_SIDE_ROUNDS = 2
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
        "chosen": chosen.candidate.as_dict() if chosen else None,
        "chosen_throughput_per_s": round(chosen.throughput_per_s, 1) if chosen else None,
        "chosen_p99_ms": [round(v, 2) for v in chosen.p99_ms] if chosen else None,
        "load_average": os.getloadavg()[0],
    }


def side_by_side(
    target: TritonTarget, spec: ModelSpec, result: TuneResult, settings: LoadGateSettings
) -> dict[str, Any] | None:
    """The spec as written and the pick, alternating, measured at the spec's levels."""
    chosen = result.choice.chosen
    if chosen is None:
        return None
    levels = list(result.objective.levels)
    inputs = synthetic_request(spec)
    tuned = result.space.spec_for(chosen.candidate)
    runs: dict[str, list[Any]] = {"as_written": [], "tuned": []}
    for _ in range(SIDE_BY_SIDE_ROUNDS):
        for key, served in (("as_written", spec), ("tuned", tuned)):
            runs[key].append(
                run_trial(target, served, chosen.candidate, inputs, levels, settings, number=0)
            )
    out: dict[str, Any] = {}
    for key, trials in runs.items():
        assessment = assess(result.objective, trials)
        out[key] = {
            "throughput_per_s_highest_level": round(assessment.throughput_per_s, 1),
            "p99_ms_per_level": [round(v, 2) for v in assessment.p99_ms],
            "per_level": [
                [
                    {
                        "c": level.concurrency,
                        "per_s": round(level.throughput_per_s, 1),
                        "p99_ms": round(level.p99_ms, 2),
                    }
                    for level in trial.levels
                ]
                for trial in trials
            ],
        }
    written, tuned_figures = out["as_written"], out["tuned"]
    out["tuned_beats_as_written_at_every_level"] = all(
        t["per_s"] >= w["per_s"]
        for t, w in zip(_medians(runs["tuned"]), _medians(runs["as_written"]), strict=True)
    )
    out["throughput_ratio_highest_level"] = round(
        tuned_figures["throughput_per_s_highest_level"]
        / max(written["throughput_per_s_highest_level"], 1e-9),
        2,
    )
    return out


def _medians(trials: list[Any]) -> list[dict[str, float]]:
    count = len(trials[0].levels)
    return [
        {"per_s": statistics.median(t.levels[i].throughput_per_s for t in trials if t.loaded)}
        for i in range(count)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--models", default="tabular_mlp,sleepy_mlp")
    parser.add_argument("--window-s", type=float, default=0.3)
    parser.add_argument("--out", type=Path, default=RESULTS / "tune.json")
    arguments = parser.parse_args()
    settings = LoadGateSettings(
        window_s=arguments.window_s, stable_windows=3, stability_percent=15, max_windows=8
    )
    host = HostFacts.this_machine()
    results: dict[str, Any] = {
        **machine(),
        "method": "gpufleet.tune (quick, then exhaustive) on the bench grid "
        f"{BENCH_GRID}; validation/load.py measure_level, windows of {settings.window_s:g} s, "
        f"{settings.stable_windows} within {settings.stability_percent:g}%, at most "
        f"{settings.max_windows}; top 3 re-measured to 3 measurements each",
        "cpu_canary_ms_start": cpu_canary_ms(),
        "models": {},
    }
    for name in arguments.models.split(","):
        with tempfile.TemporaryDirectory() as scratch:
            repository = Path(scratch) / "model_repository"
            spec = write_model(repository, name)
            space = build_space(spec, host, BENCH_GRID)
            model: dict[str, Any] = {"grid": len(space.grid()), "runs": []}
            results["models"][name] = model
            with LocalTritonServer(repository, Path(scratch) / "triton") as server:
                target = TritonTarget(server, server.grpc_url, repository)
                inputs = synthetic_request(spec)
                for run in range(arguments.runs):
                    outcome: dict[str, Any] = {}
                    for mode in ("quick", "exhaustive"):
                        print(f"{name} run {run + 1}: {mode} search", flush=True)
                        options = TuneOptions(exhaustive=mode == "exhaustive", settings=settings)
                        result = tune(
                            spec,
                            space,
                            target,
                            inputs,
                            options,
                            progress=lambda line: print(line, flush=True),
                        )
                        outcome[mode] = run_summary(result)
                        model["partial"] = outcome  # kept while the run goes on
                        write_results(arguments.out, results)
                        if mode == "exhaustive":
                            outcome["side_by_side"] = side_by_side(target, spec, result, settings)
                    quick, full = outcome["quick"], outcome["exhaustive"]
                    if quick["chosen_throughput_per_s"] and full["chosen_throughput_per_s"]:
                        outcome["quick_share_of_exhaustive_best"] = round(
                            quick["chosen_throughput_per_s"] / full["chosen_throughput_per_s"], 3
                        )
                    outcome["quick_trials_share"] = round(quick["trials"] / full["trials"], 3)
                    outcome["quick_configs_share"] = round(
                        quick["configs_tried"] / full["configs_tried"], 3
                    )
                    model.pop("partial", None)
                    model["runs"].append(outcome)
                    write_results(arguments.out, results)  # kept after every run
    results["cpu_canary_ms_end"] = cpu_canary_ms()
    write_results(arguments.out, results)


if __name__ == "__main__":
    start = time.monotonic()
    main()
    print(f"done in {time.monotonic() - start:.0f} s")
