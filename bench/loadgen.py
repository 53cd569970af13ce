"""How much load the load gate's generator (validation/load.py) can make, and what it costs.

The load gate reports throughput and latency; those are Triton's numbers only if the generator
is not the bottleneck. This bench serves the cheapest model there is (a python-backend identity
on Triton's dynamic batcher, so that Triton itself can go fast) with Triton pinned to CPU 0 and
this process (the generator: one asyncio thread) to CPU 1, raises the concurrency until the
throughput stops growing, and reports:

- the highest request rate the generator sustained, and its CPU share of one core there;
- its CPU time per request, and the rate that would fill one core (1 / CPU per request);
- its overhead per request: client latency - Triton's request time (statistics API), at
  concurrency 1 (the fixed cost of gRPC and the client) and at the highest rate (plus waiting
  for the busy event loop);
- the ratio to the demo model's best throughput from bench/results/serving.json (run
  bench/serving.py first for it): how far the gate is from limiting what it measures there.

    .venv/bin/python bench/loadgen.py [--window-s 1.0] [--out bench/results/loadgen.json]

Needs two CPUs. Results: bench/results/loadgen.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))  # also runs without `pip install -e .`

from generators.triton_config import render_config_pbtxt  # noqa: E402
from gpufleet.spec.loading import model_spec_hash  # noqa: E402
from gpufleet.spec.model import ModelSpec  # noqa: E402
from gpufleet.spec.stack import LoadGateSettings  # noqa: E402
from validation.load import (  # noqa: E402
    CLIENT_CPU_BUSY_FRACTION,
    LevelMeasurement,
    measure_level,
)
from validation.tritonserver import LocalTritonServer  # noqa: E402

RESULTS = PROJECT_ROOT / "bench" / "results"
SERVER_CPU, CLIENT_CPU = 0, 1
LEVELS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Throughput "stops growing": two levels in a row below 5% more than the best so far.
GROWTH, FLAT_LEVELS = 1.05, 2
# The machine is shared: a level during which other processes used more than 5% of a core is
# measured again, up to 5 times in all, after a pause; the quietest attempt counts.
NOISY_OTHERS, NOISY_ATTEMPTS, NOISY_PAUSE_S = 0.05, 5, 5.0
IDENTITY_SPEC: dict[str, Any] = {
    "name": "identity",
    "backend": "python",
    "max_batch_size": 256,
    "inputs": [{"name": "x", "dtype": "fp32", "shape": [16]}],
    "outputs": [{"name": "y", "dtype": "fp32", "shape": [16]}],
    "dynamic_batching": {"max_queue_delay_us": 0},
    "instance_groups": [{"kind": "cpu", "count": 1}],
}
IDENTITY_MODEL = """\
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(request, "x").as_numpy())]
            )
            for request in requests
        ]
"""


# -- helpers shared with bench/serving.py --------------------------------------------------------


def write_config(repository: Path, spec: ModelSpec, source: str = "") -> Path:
    """`<repository>/<name>/config.pbtxt` rendered from `spec`; returns the version 1 folder."""
    directory = repository / spec.name
    (directory / "1").mkdir(parents=True)
    config = render_config_pbtxt(spec, source or f"{spec.name}.yaml", model_spec_hash(spec))
    (directory / "config.pbtxt").write_text(config)
    return directory / "1"


def pin_process_group(pgid: int, cpus: set[int]) -> dict[str, list[int]]:
    """Pin every thread of every process in process group `pgid` (Triton and its python stubs)
    to `cpus`; returns each process's command name and the CPUs it is now allowed."""
    pinned: dict[str, list[int]] = {}
    for process in Path("/proc").iterdir():
        if not process.name.isdigit():
            continue
        try:
            # /proc/<pid>/stat: "pid (comm) state ppid pgrp ..."; comm may hold spaces.
            comm, rest = (process / "stat").read_text().rsplit(")", 1)
            if int(rest.split()[2]) != pgid:
                continue
            for task in (process / "task").iterdir():
                os.sched_setaffinity(int(task.name), cpus)
            name = f"{comm.split('(', 1)[1]} ({process.name})"
            pinned[name] = sorted(os.sched_getaffinity(int(process.name)))
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
    return pinned


def pin_this_process(cpu: int) -> list[int]:
    """Run this process (its current thread, and every thread it starts later) on `cpu`."""
    os.sched_setaffinity(0, {cpu})
    return sorted(os.sched_getaffinity(0))


@dataclass(frozen=True)
class BenchLevel:
    """A load-gate measurement, plus where the machine's CPU went during it (in cores, over
    the whole level, ramp-up windows included): Triton's processes, and everything that was
    neither Triton nor this process (other work on a shared machine), and the hypervisor's
    steal time."""

    level: LevelMeasurement
    server_cpu_share: float
    other_cpu_share: float = 0.0
    steal_share: float = 0.0


def process_group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds of the live processes in process group `pgid`."""
    ticks = 0
    for process in Path("/proc").iterdir():
        if not process.name.isdigit():
            continue
        try:
            fields = (process / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid:  # after "(comm)": state ppid pgrp ... utime(11) stime(12)
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_cpu_s() -> tuple[float, float]:
    """Process (user, nice, system) and steal CPU seconds of the whole machine so far, from
    /proc/stat. Interrupt time is left out: loopback traffic is mostly softirq time, charged
    to no process, and it is this bench's own traffic."""
    # cpu  user nice system idle iowait irq softirq steal ...
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = fields[0] + fields[1] + fields[2]
    ticks = os.sysconf("SC_CLK_TCK")
    return busy / ticks, fields[7] / ticks


def own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def measure(
    url: str,
    model: str,
    inputs: dict[str, NDArray[Any]],
    concurrency: int,
    settings: LoadGateSettings,
    server_pgid: int,
) -> BenchLevel:
    """One level; measured again (up to NOISY_ATTEMPTS in all) while other processes on this
    shared machine used more than NOISY_OTHERS of a core. The quietest attempt is kept."""
    attempts = []
    for attempt in range(NOISY_ATTEMPTS):
        if attempt:
            time.sleep(NOISY_PAUSE_S)
        attempts.append(_measure_once(url, model, inputs, concurrency, settings, server_pgid))
        if attempts[-1].other_cpu_share <= NOISY_OTHERS:
            break
    return min(attempts, key=lambda bench: bench.other_cpu_share)


def _measure_once(
    url: str,
    model: str,
    inputs: dict[str, NDArray[Any]],
    concurrency: int,
    settings: LoadGateSettings,
    server_pgid: int,
) -> BenchLevel:
    server_before, own_before = process_group_cpu_s(server_pgid), own_cpu_s()
    (busy_before, steal_before), started = machine_cpu_s(), time.perf_counter()
    level = measure_level(url, model, inputs, concurrency, settings)
    elapsed = time.perf_counter() - started
    busy, steal = machine_cpu_s()
    server = process_group_cpu_s(server_pgid) - server_before
    others = (busy - busy_before) - server - (own_cpu_s() - own_before)
    if level.errors:
        raise SystemExit(f"{model} c={concurrency}: requests failed: {level.first_error}")
    return BenchLevel(
        level, server / elapsed, max(others, 0.0) / elapsed, (steal - steal_before) / elapsed
    )


def sweep(
    url: str,
    model: str,
    inputs: dict[str, NDArray[Any]],
    levels: Sequence[int],
    settings: LoadGateSettings,
    server_pgid: int,
    stop: Callable[[list[BenchLevel]], bool],
) -> list[BenchLevel]:
    """Measure each concurrency level in turn until `stop` says enough."""
    measured: list[BenchLevel] = []
    for concurrency in levels:
        measured.append(measure(url, model, inputs, concurrency, settings, server_pgid))
        print(f"  {model:20s} {short_row(measured[-1])}", flush=True)
        if stop(measured):
            break
    return measured


def throughput_stopped_growing(measured: list[BenchLevel]) -> bool:
    """The last FLAT_LEVELS levels each gave less than GROWTH x the best before them."""
    if len(measured) <= FLAT_LEVELS:
        return False
    rates = [bench.level.throughput_per_s for bench in measured]
    best_before = max(rates[:-FLAT_LEVELS])
    return all(rate < best_before * GROWTH for rate in rates[-FLAT_LEVELS:])


def cpu_us_per_request(level: LevelMeasurement) -> float:
    if level.throughput_per_s <= 0:
        return 0.0
    return level.client_cpu_fraction / level.throughput_per_s * 1e6


def level_row(bench: BenchLevel) -> dict[str, Any]:
    """The figures of one level for the JSON results, rounded for reading."""
    level = bench.level
    row = asdict(level)
    for key, value in list(row.items()):
        if isinstance(value, float):
            row[key] = round(value, 4)
    row["server_split"] = {key: round(value, 2) for key, value in level.server_split.items()}
    row["client_cpu_us_per_request"] = round(cpu_us_per_request(level), 1)
    row["client_bottleneck"] = level.client_bottleneck
    row["server_cpu_share"] = round(bench.server_cpu_share, 3)
    row["other_processes_cpu_share"] = round(bench.other_cpu_share, 3)
    row["steal_share"] = round(bench.steal_share, 3)
    return row


def short_row(bench: BenchLevel) -> str:
    level, split = bench.level, bench.level.server_split
    stable = "" if level.stable else " UNSTABLE"
    return (
        f"c={level.concurrency:<4d} {level.throughput_per_s:6.0f}/s  p50 {level.p50_ms:6.2f} ms  "
        f"p99 {level.p99_ms:6.2f} ms  triton {split.get('request_us', 0) / 1000:6.2f} ms  "
        f"batch {split.get('batch_size', 0):5.1f}  cpu: client {level.client_cpu_fraction:4.0%} "
        f"triton {bench.server_cpu_share:4.0%} others {bench.other_cpu_share:4.0%}  "
        f"lag {level.client_loop_lag_ms:5.2f} ms{stable}"
    )


def machine() -> dict[str, Any]:
    import torch  # the benches run in the project's venv, which has it

    model_name = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model_name = line.split(":", 1)[1].strip()
            break
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cpu_model": model_name,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": "2.51 (nvidia-pytriton 0.7.0)",
    }


def cpu_canary_ms() -> float:
    """Milliseconds a fixed pure-Python loop takes on this process's core: taken at the start
    and the end of a run, it shows a run during which the (virtual) CPU itself was slower."""
    started = time.perf_counter()
    total = 0
    for value in range(2_000_000):
        total += value
    return round((time.perf_counter() - started) * 1000, 1)


def write_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {path}")


# -- this bench ----------------------------------------------------------------------------------


def summarize(measured: list[BenchLevel], demo_throughput: float | None) -> dict[str, Any]:
    top = max(measured, key=lambda bench: bench.level.throughput_per_s)
    first = measured[0].level
    cpu_us = cpu_us_per_request(top.level)
    summary: dict[str, Any] = {
        "max_rate_per_s": round(top.level.throughput_per_s, 1),
        "at_concurrency": top.level.concurrency,
        "client_cpu_share_at_max": round(top.level.client_cpu_fraction, 3),
        "triton_cpu_share_at_max": round(top.server_cpu_share, 3),
        "client_cpu_us_per_request_at_max": round(cpu_us, 1),
        "rate_that_fills_one_core_per_s": round(1e6 / cpu_us, 0) if cpu_us else None,
        "bottleneck_at_max": bottleneck(top),
        "overhead_ms_per_request_c1": _round(first.client_overhead_ms),
        "overhead_ms_per_request_at_max": _round(top.level.client_overhead_ms),
        "latency_ms_c1": round(first.mean_latency_ms, 3),
        "triton_request_ms_c1": round(first.server_split.get("request_us", 0) / 1000, 3),
    }
    if demo_throughput:
        summary["demo_model_best_throughput_per_s"] = round(demo_throughput, 1)
        rate = top.level.throughput_per_s
        summary["max_rate_over_demo_throughput"] = round(rate / demo_throughput, 2)
    return summary


def bottleneck(bench: BenchLevel) -> str:
    """Which side ran out of its core: 'client', 'triton', 'both' or 'neither'."""
    client = bench.level.client_cpu_fraction >= CLIENT_CPU_BUSY_FRACTION
    server = bench.server_cpu_share >= CLIENT_CPU_BUSY_FRACTION
    return {(True, True): "both", (True, False): "client", (False, True): "triton"}.get(
        (client, server), "neither"
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def demo_model_throughput() -> float | None:
    """The generated config's best throughput under its p99 objective, from serving.json."""
    try:
        serving = json.loads((RESULTS / "serving.json").read_text())
        return float(serving["summary"]["generated"]["throughput_per_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def print_summary(summary: dict[str, Any]) -> None:
    print(
        f"\nload generator: max {summary['max_rate_per_s']:.0f} requests/s at "
        f"c={summary['at_concurrency']} using {summary['client_cpu_share_at_max']:.0%} of a core "
        f"({summary['client_cpu_us_per_request_at_max']:.0f} us CPU per request: one core fills "
        f"at ~{summary['rate_that_fills_one_core_per_s']:.0f}/s); Triton used "
        f"{summary['triton_cpu_share_at_max']:.0%} of its core; out of CPU there: "
        f"{summary['bottleneck_at_max']}"
    )
    print(
        f"overhead per request (client latency - Triton request time): "
        f"{summary['overhead_ms_per_request_c1']} ms at c=1 (latency "
        f"{summary['latency_ms_c1']} ms, Triton {summary['triton_request_ms_c1']} ms), "
        f"{summary['overhead_ms_per_request_at_max']} ms at the max rate"
    )
    if "max_rate_over_demo_throughput" in summary:
        print(
            f"demo model (generated config) best throughput "
            f"{summary['demo_model_best_throughput_per_s']:.0f}/s: the generator makes "
            f"{summary['max_rate_over_demo_throughput']}x that"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window-s", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "loadgen.json")
    arguments = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs two CPUs: one for Triton, one for the load generator")
    client_cpus = pin_this_process(CLIENT_CPU)  # first: threads started later inherit it
    canary_ms = [cpu_canary_ms()]
    settings = LoadGateSettings(window_s=arguments.window_s)
    inputs = {"x": np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 16)}
    with tempfile.TemporaryDirectory() as scratch:
        repository = Path(scratch) / "model_repository"
        version_dir = write_config(repository, ModelSpec.model_validate(IDENTITY_SPEC))
        (version_dir / "model.py").write_text(IDENTITY_MODEL)
        with LocalTritonServer(repository, Path(scratch) / "triton") as server:
            assert server.pid is not None
            server_cpus = pin_process_group(server.pid, {SERVER_CPU})
            measure_level(server.grpc_url, "identity", inputs, 8, settings)  # warm up
            measured = sweep(
                server.grpc_url,
                "identity",
                inputs,
                LEVELS,
                settings,
                server.pid,
                throughput_stopped_growing,
            )
    canary_ms.append(cpu_canary_ms())
    summary = summarize(measured, demo_model_throughput())
    print_summary(summary)
    print(
        f"cpu canary (a fixed loop on CPU {CLIENT_CPU}): {canary_ms[0]} ms at start, "
        f"{canary_ms[1]} ms at end"
    )
    results = {
        **machine(),
        "method": "validation/load.py measure_level (perf_analyzer's windows), "
        f"window {settings.window_s:g} s, {settings.stable_windows} windows within "
        f"{settings.stability_percent:g}%",
        "model": "python-backend identity, 16 fp32, dynamic batching (no delay), 1 instance",
        "affinity": {"triton": server_cpus, "load_generator": client_cpus},
        "cpu_canary_ms_start_end": canary_ms,
        "summary": summary,
        "levels": [level_row(bench) for bench in measured],
    }
    write_results(arguments.out, results)


if __name__ == "__main__":
    main()
