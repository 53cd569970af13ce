"""What the generated Triton config buys: the demo model under Triton's defaults vs the spec's.

The tabular_mlp demo (modelconfigs/tabular_mlp.yaml: 16 fp32 features -> 4 scores, a torch MLP
on the python backend) is served by one Triton pinned to CPU 0, under two configs side by side:

  (a) defaults   Triton's defaults: no dynamic batching, one instance (no instance_group)
  (b) generated  render_config_pbtxt of the spec: dynamic batching (2 ms delay, preferred 8/16),
                 two CPU instances - both on the one pinned core

The model is the one `gpufleet up --stack local` serves: the registry's demo network
(gpufleet.registry.demo.demo_network: seeded Linear(16, 32), ReLU, Linear(32, 4)) exported by
generators.model_export into TorchScript plus its python-backend model.py, which runs one
forward pass per batch Triton hands over, with `torch_threads: 1` from the spec. Its cost is real
torch compute plus the python backend's own work; nothing sleeps.

The load is the load gate's own generator (validation/load.py, perf_analyzer's windows) on CPU
1; both configs are measured at the same concurrency levels (1 to 128, until p99 passes the
spec's objective), and each config's point is its best throughput whose p99 meets the
objective, taken at the lowest concurrency within 5% of it (on a plateau more concurrency only
adds queueing). Beside each level: the CPU share of Triton's processes, of this client,
and of other processes on the machine (it is shared: read those before trusting a figure).

  (c) torch      the same TorchScript file called directly in torch on one core (CPU 1, one
                 thread) at its best batch size: the ceiling, with no serving at all

Printed: a table, b/a (throughput, p99) and b/c at those points, and b/a at each concurrency.
Results: bench/results/serving.json.

    .venv/bin/python bench/serving.py [--window-s 1.0] [--out bench/results/serving.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))  # also runs without `pip install -e .`

from bench.loadgen import (  # noqa: E402
    CLIENT_CPU,
    RESULTS,
    SERVER_CPU,
    BenchLevel,
    bottleneck,
    cpu_canary_ms,
    level_row,
    machine,
    pin_process_group,
    pin_this_process,
    sweep,
    write_config,
    write_results,
)
from generators.model_export import export_model  # noqa: E402
from gpufleet.registry.demo import demo_network  # noqa: E402
from gpufleet.spec.loading import load_model_spec_file  # noqa: E402
from gpufleet.spec.model import ModelSpec  # noqa: E402
from gpufleet.spec.stack import LoadGateSettings  # noqa: E402
from validation.load import measure_level  # noqa: E402
from validation.tritonserver import LocalTritonServer  # noqa: E402

SPEC_FILE = PROJECT_ROOT / "modelconfigs" / "tabular_mlp.yaml"
LEVELS = (1, 2, 4, 8, 16, 32, 64, 128)
NOISE = 0.05  # throughputs this close are one plateau (perf_analyzer's windows agree to 10%)
TORCH_BATCHES = (1, 2, 4, 8, 16, 32, 64)
TORCH_SECONDS = 0.5


def configs(spec: ModelSpec) -> dict[str, ModelSpec]:
    """(a) and (b): the spec without batching or instance groups, and the spec itself."""
    defaults = spec.model_copy(
        update={"name": f"{spec.name}_defaults", "dynamic_batching": None, "instance_groups": []}
    )
    return {"defaults": defaults, "generated": spec}


def triton_view(config: dict[str, Any]) -> dict[str, Any]:
    """What Triton resolved: batching and instances (after its own defaults)."""
    batching = config.get("dynamic_batching")
    return {
        "max_batch_size": config.get("max_batch_size"),
        "dynamic_batching": None
        if batching is None
        else {
            "max_queue_delay_us": int(batching.get("max_queue_delay_microseconds", 0)),
            "preferred_batch_sizes": [int(s) for s in batching.get("preferred_batch_size", [])],
        },
        "instance_groups": [
            {"kind": group["kind"], "count": group["count"]}
            for group in config.get("instance_group", [])
        ],
    }


def operating_point(measured: list[BenchLevel], p99_limit: float) -> BenchLevel:
    """The best throughput whose p99 meets the objective, at the least latency that gets it:
    the lowest concurrency within NOISE of the best. On a plateau (Triton saturated) more
    concurrency only queues, and which plateau level measures highest is noise."""
    meeting = [bench for bench in measured if bench.level.p99_ms <= p99_limit]
    if not meeting:
        raise SystemExit(f"no concurrency level met p99 <= {p99_limit:g} ms")
    best = max(bench.level.throughput_per_s for bench in meeting)
    return next(bench for bench in meeting if bench.level.throughput_per_s >= best * (1 - NOISE))


def torch_ceiling(torchscript: Path, in_features: int) -> dict[str, Any]:
    """Rows/s of the served TorchScript file called directly, one thread, at each batch size."""
    torch.set_num_threads(1)
    network = torch.jit.load(str(torchscript)).eval()  # type: ignore[no-untyped-call]
    rows_per_s = {}
    for batch in TORCH_BATCHES:
        features = torch.from_numpy(
            np.random.default_rng(0).standard_normal((batch, in_features), np.float32)
        )
        with torch.inference_mode():  # as the served model.py
            for _ in range(20):
                network(features)
            calls, started = 0, time.perf_counter()
            while time.perf_counter() - started < TORCH_SECONDS:
                network(features)
                calls += 1
            rows_per_s[batch] = calls * batch / (time.perf_counter() - started)
    best = max(rows_per_s, key=lambda batch: rows_per_s[batch])
    return {
        "best_batch": best,
        "rows_per_s": round(rows_per_s[best], 0),
        "rows_per_s_by_batch": {str(b): round(r, 0) for b, r in rows_per_s.items()},
        "torch_threads": torch.get_num_threads(),
    }


def point(bench: BenchLevel) -> dict[str, Any]:
    level, split = bench.level, bench.level.server_split
    return {
        "concurrency": level.concurrency,
        "throughput_per_s": round(level.throughput_per_s, 1),
        "p50_ms": round(level.p50_ms, 3),
        "p99_ms": round(level.p99_ms, 3),
        "stable": level.stable,
        "triton_request_ms": round(split.get("request_us", 0) / 1000, 3),
        "queue_ms": round(split.get("queue_us", 0) / 1000, 3),
        "compute_infer_ms": round(split.get("compute_infer_us", 0) / 1000, 3),
        "batch_size": round(split.get("batch_size", 0), 2),
        "client_cpu_share": round(level.client_cpu_fraction, 3),
        "triton_cpu_share": round(bench.server_cpu_share, 3),
        "other_processes_cpu_share": round(bench.other_cpu_share, 3),
        "out_of_cpu": bottleneck(bench),
        "gate_warning": level.client_bottleneck,
    }


def same_concurrency(
    defaults: list[BenchLevel], generated: list[BenchLevel]
) -> list[dict[str, Any]]:
    """b/a at each concurrency both configs were measured at."""
    by_level = {bench.level.concurrency: bench.level for bench in defaults}
    rows = []
    for bench in generated:
        b, a = bench.level, by_level.get(bench.level.concurrency)
        if a is not None and a.throughput_per_s and a.p99_ms:
            rows.append(
                {
                    "concurrency": b.concurrency,
                    "throughput_b_over_a": round(b.throughput_per_s / a.throughput_per_s, 2),
                    "p99_b_over_a": round(b.p99_ms / a.p99_ms, 2),
                }
            )
    return rows


def print_table(summary: dict[str, Any], p99_limit: float) -> None:
    print(
        f"\nbest throughput with p99 <= {p99_limit:g} ms, at the lowest concurrency within "
        f"{NOISE:.0%} of it (Triton on CPU {SERVER_CPU}):"
    )
    print(
        f"  {'':24s} {'c':>4s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'batch':>6s}"
        "  out of CPU"
    )
    for key, label in (("defaults", "(a) Triton defaults"), ("generated", "(b) generated config")):
        row = summary[key]
        print(
            f"  {label:24s} {row['concurrency']:4d} {row['throughput_per_s']:8.0f} "
            f"{row['p50_ms']:8.2f} {row['p99_ms']:8.2f} {row['batch_size']:6.1f}  "
            f"{row['out_of_cpu']}"
        )
    ceiling = summary["torch"]
    print(
        f"  {'(c) torch, one core':24s} {'':4s} {ceiling['rows_per_s']:8.0f}   "
        f"(rows/s at batch {ceiling['best_batch']}, no serving)"
    )
    ratios = summary["ratios"]
    print(
        f"b/a: throughput {ratios['throughput_b_over_a']}x, p99 {ratios['p99_b_over_a']}x; "
        f"b/c: {ratios['b_over_c']}"
    )
    print("at the same concurrency, b/a:")
    for row in summary["same_concurrency"]:
        print(
            f"  c={row['concurrency']:<4d} throughput {row['throughput_b_over_a']:5.2f}x  "
            f"p99 {row['p99_b_over_a']:5.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window-s", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "serving.json")
    arguments = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs two CPUs: one for Triton, one for the load generator")
    client_cpus = pin_this_process(CLIENT_CPU)
    canary_ms = [cpu_canary_ms()]
    spec = load_model_spec_file(SPEC_FILE).spec
    p99_limit = spec.objectives.p99_latency_ms if spec.objectives else None
    if p99_limit is None:
        raise SystemExit(f"{SPEC_FILE}: objectives.p99_latency_ms is not set")
    settings = LoadGateSettings(window_s=arguments.window_s)
    inputs = {"features": np.random.default_rng(0).standard_normal((1, 16), np.float32)}
    served = configs(spec)
    source = SPEC_FILE.relative_to(PROJECT_ROOT).as_posix()
    levels: dict[str, list[BenchLevel]] = {}
    network = demo_network(spec)
    with tempfile.TemporaryDirectory() as scratch:
        repository = Path(scratch) / "model_repository"
        version_dirs = {}
        for key, config in served.items():
            version_dirs[key] = write_config(repository, config, source)
            export_model(network, config, version_dirs[key])
        with LocalTritonServer(repository, Path(scratch) / "triton") as server:
            assert server.pid is not None
            server_cpus = pin_process_group(server.pid, {SERVER_CPU})
            views = {key: triton_view(server.model_config(c.name)) for key, c in served.items()}
            for key, config in served.items():
                measure_level(server.grpc_url, config.name, inputs, 8, settings)  # warm up
                levels[key] = sweep(
                    server.grpc_url,
                    config.name,
                    inputs,
                    LEVELS,
                    settings,
                    server.pid,
                    lambda measured: measured[-1].level.p99_ms > p99_limit,
                )
        in_features = spec.inputs[0].shape[-1]
        ceiling = torch_ceiling(version_dirs["generated"] / "model.pt", in_features)
    canary_ms.append(cpu_canary_ms())
    points = {key: operating_point(measured, p99_limit) for key, measured in levels.items()}
    a, b = points["defaults"].level, points["generated"].level
    summary = {
        "defaults": point(points["defaults"]),
        "generated": point(points["generated"]),
        "torch": ceiling,
        "ratios": {
            "throughput_b_over_a": round(b.throughput_per_s / a.throughput_per_s, 2),
            "p99_b_over_a": round(b.p99_ms / a.p99_ms, 2),
            "b_over_c": round(b.throughput_per_s / ceiling["rows_per_s"], 4),
        },
        "same_concurrency": same_concurrency(levels["defaults"], levels["generated"]),
    }
    print_table(summary, p99_limit)
    print(
        f"cpu canary (a fixed loop on CPU {CLIENT_CPU}): {canary_ms[0]} ms at start, "
        f"{canary_ms[1]} ms at end"
    )
    results = {
        **machine(),
        "method": "validation/load.py measure_level (perf_analyzer's windows), "
        f"window {settings.window_s:g} s, {settings.stable_windows} windows within "
        f"{settings.stability_percent:g}%; best throughput with p99 <= {p99_limit:g} ms",
        "model": "gpufleet.registry.demo.demo_network (Linear(16,32)-ReLU-Linear(32,4)) "
        "exported by generators.model_export (TorchScript + python-backend model.py, one "
        "forward per batch), torch_threads 1",
        "affinity": {"triton": server_cpus, "load_generator_and_torch": client_cpus},
        "cpu_canary_ms_start_end": canary_ms,
        "triton_configs": views,
        "summary": summary,
        "levels": {
            key: [level_row(level) for level in measured] for key, measured in levels.items()
        },
    }
    write_results(arguments.out, results)


if __name__ == "__main__":
    main()
