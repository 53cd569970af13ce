"""The load gate's two engines side by side: Triton's perf_analyzer and gpufleet's Python client.

One Triton (the nvidia-pytriton wheel's, CPU, pinned to CPU 0) serves the tabular_mlp demo
(modelconfigs/tabular_mlp.yaml, its generated config, the registry's demo network exported as
`gpufleet up` exports it); both clients run pinned to CPU 1 (perf_analyzer inherits this
process's affinity). At each concurrency (1, 8, 32 and the spec's levels) the engines take
turns, the order swapped every repetition (pa, py, py, pa, ...), each measuring with the load
gate's method and the same settings (short windows: the machine is shared).

Per run: throughput and p99 as the engine reports them (validation/load.py and
validation/load_perf_analyzer.py: exactly what the gate would read), and the client's CPU per
request over the whole run: this process's CPU time (all its threads) for the Python engine,
perf_analyzer's own from wait4 (all its threads), each divided by the requests Triton counted
meanwhile (its statistics, read before and after). Per level: the median of the repetitions,
the ratios python/perf_analyzer of those medians, and each figure's spread between repetitions
((max - min) / median). A run that did not stabilise is kept and marked.

    .venv/bin/python bench/engines.py [--repetitions 3] [--window-s 0.5] \\
        [--out bench/results/engines.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as triton_grpc

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))  # also runs without `pip install -e .`

from bench.loadgen import (  # noqa: E402
    CLIENT_CPU,
    RESULTS,
    SERVER_CPU,
    cpu_canary_ms,
    machine,
    pin_process_group,
    pin_this_process,
    write_config,
    write_results,
)
from generators.model_export import export_model  # noqa: E402
from gpufleet.registry.demo import demo_network  # noqa: E402
from gpufleet.spec.loading import load_model_spec_file  # noqa: E402
from gpufleet.spec.model import Objectives  # noqa: E402
from gpufleet.spec.stack import LoadGateSettings  # noqa: E402
from validation.load import (  # noqa: E402
    LevelMeasurement,
    LoadTarget,
    measure_level,
    statistics_totals,
)
from validation.load_perf_analyzer import measure_with_perf_analyzer  # noqa: E402
from validation.perf_analyzer import PerfAnalyzer, find_perf_analyzer  # noqa: E402
from validation.tritonserver import LocalTritonServer  # noqa: E402

SPEC_FILE = PROJECT_ROOT / "modelconfigs" / "tabular_mlp.yaml"
BENCH_LEVELS = (1, 8, 32)
ENGINES = ("perf_analyzer", "python")


def successes(url: str, model: str) -> int:
    with triton_grpc.InferenceServerClient(url) as client:
        totals = statistics_totals(client.get_inference_statistics(model, as_json=True))
    return totals.get("success_count", 0)


def children_cpu_s() -> float:
    """CPU seconds of this process's reaped children (perf_analyzer, once it has exited)."""
    times = os.times()
    return times.children_user + times.children_system


def own_cpu_s() -> float:
    return time.process_time()


def run_once(
    engine: str,
    analyzer: PerfAnalyzer,
    url: str,
    target: LoadTarget,
    concurrency: int,
    settings: LoadGateSettings,
) -> dict[str, Any]:
    """One measurement by one engine, with its client CPU per request over the whole run."""
    before = successes(url, target.model)
    cpu_before = children_cpu_s() if engine == "perf_analyzer" else own_cpu_s()
    started = time.perf_counter()
    measured: LevelMeasurement | str | None
    if engine == "perf_analyzer":
        measured = measure_with_perf_analyzer(
            analyzer, url, target, concurrency, settings, deadline_s=300
        )
    else:
        measured = measure_level(url, target.model, target.inputs, concurrency, settings)
    wall_s = time.perf_counter() - started
    cpu_s = (children_cpu_s() if engine == "perf_analyzer" else own_cpu_s()) - cpu_before
    requests = successes(url, target.model) - before
    if not isinstance(measured, LevelMeasurement):
        return {"engine": engine, "error": str(measured)}
    return {
        "engine": engine,
        "stable": measured.stable,
        "windows": measured.windows,
        "throughput_per_s": round(measured.throughput_per_s, 1),
        "p99_ms": round(measured.p99_ms, 3),
        "mean_ms": round(measured.mean_latency_ms, 3),
        "client_cpu_us_per_request": round(cpu_s / requests * 1e6, 1) if requests else None,
        "client_cpu_cores": round(cpu_s / wall_s, 3),
        "requests_in_run": requests,
        "server_queue_us": round(measured.server_split.get("queue_us", 0.0), 1),
        "server_infer_us": round(measured.server_split.get("compute_infer_us", 0.0), 1),
    }


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [run[key] for run in runs if run.get(key)]
    return statistics.median(values) if values else None


def spread_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [run[key] for run in runs if run.get(key)]
    middle = statistics.median(values) if values else 0
    return round((max(values) - min(values)) / middle, 3) if middle else None


def summarize_level(runs: list[dict[str, Any]]) -> dict[str, Any]:
    by_engine = {name: [run for run in runs if run["engine"] == name] for name in ENGINES}
    figures = ("throughput_per_s", "p99_ms", "client_cpu_us_per_request")
    summary: dict[str, Any] = {}
    for name, engine_runs in by_engine.items():
        stable = [run for run in engine_runs if run.get("stable")]
        summary[name] = {
            **{f"median_{key}": median_of(stable, key) for key in figures},
            **{f"spread_{key}": spread_of(stable, key) for key in figures},
            "stable_runs": len(stable),
            "runs": len(engine_runs),
        }
    ratios = {}
    for key in figures:
        python, analyzer = (
            summary["python"][f"median_{key}"],
            summary["perf_analyzer"][f"median_{key}"],
        )
        ratios[key] = round(python / analyzer, 3) if python and analyzer else None
    summary["python_over_perf_analyzer"] = ratios
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--window-s", type=float, default=0.5)
    parser.add_argument("--stability-percent", type=float, default=15.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "engines.json")
    arguments = parser.parse_args()
    analyzer = find_perf_analyzer()
    if analyzer is None:
        raise SystemExit("no perf_analyzer here: `make bench` builds .venv-perf")
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs two CPUs: one for Triton, one for the load generators")
    client_cpus = pin_this_process(CLIENT_CPU)
    canary_ms = [cpu_canary_ms()]
    spec = load_model_spec_file(SPEC_FILE).spec
    objectives = spec.objectives or Objectives()
    levels = sorted({*BENCH_LEVELS, *objectives.concurrency})
    settings = LoadGateSettings(
        window_s=arguments.window_s,
        stability_percent=arguments.stability_percent,
        max_windows=10,
    )
    inputs = {"features": np.random.default_rng(0).standard_normal((1, 16), np.float32)}
    target = LoadTarget(spec.name, inputs, objectives)
    runs: dict[int, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        repository = Path(scratch) / "model_repository"
        version_dir = write_config(repository, spec, SPEC_FILE.relative_to(PROJECT_ROOT).as_posix())
        export_model(demo_network(spec), spec, version_dir)
        with LocalTritonServer(repository, Path(scratch) / "triton") as server:
            assert server.pid is not None
            server_cpus = pin_process_group(server.pid, {SERVER_CPU})
            url = server.grpc_url
            measure_level(url, spec.name, inputs, 8, settings)  # warm up
            for concurrency in levels:
                runs[concurrency] = []
                for repetition in range(arguments.repetitions):
                    order = ENGINES if repetition % 2 == 0 else ENGINES[::-1]
                    for engine in order:
                        run = run_once(engine, analyzer, url, target, concurrency, settings)
                        run["repetition"] = repetition
                        runs[concurrency].append(run)
                        print(f"c={concurrency} rep {repetition} {engine}: {run}", flush=True)
    canary_ms.append(cpu_canary_ms())
    summary = {str(level): summarize_level(level_runs) for level, level_runs in runs.items()}
    for level, level_summary in summary.items():
        print(f"c={level}: python/perf_analyzer {level_summary['python_over_perf_analyzer']}")
    results = {
        **machine(),
        "perf_analyzer": analyzer.describe(),
        "method": "both engines against one Triton, alternating (order swapped every "
        f"repetition), {arguments.repetitions} repetitions per level; load gate settings: "
        f"window {settings.window_s:g} s, {settings.stable_windows} windows within "
        f"{settings.stability_percent:g}%, at most {settings.max_windows} windows. Medians of "
        "the stable runs; spread = (max - min) / median. Client CPU per request: the client's "
        "CPU over the whole run / requests Triton counted meanwhile.",
        "caveat": "a shared 2-CPU machine, busy with other work during the run: short windows, "
        "and single runs vary by 10-30%; read the spreads before the ratios",
        "model": "tabular_mlp: gpufleet.registry.demo.demo_network exported by "
        "generators.model_export, its generated config (dynamic batching, 2 CPU instances)",
        "affinity": {"triton": server_cpus, "clients": client_cpus},
        "cpu_canary_ms_start_end": canary_ms,
        "levels": levels,
        "summary": summary,
        "runs": {str(level): level_runs for level, level_runs in runs.items()},
    }
    write_results(arguments.out, results)


if __name__ == "__main__":
    main()
