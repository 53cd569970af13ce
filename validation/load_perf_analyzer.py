"""The load gate's perf_analyzer engine: one model at one concurrency level, measured by Triton's
own perf_analyzer, read back into the load gate's LevelMeasurement.

perf_analyzer runs over gRPC with the gate's settings: ``--concurrency-range c``,
``--measurement-interval`` = ``window_s``, ``--stability-percentage`` and ``--max-trials`` =
``max_windows``; it always compares its last 3 windows (``stable_windows`` other than 3 is
noted in the result). Its request is the gate's: the target's tensors as ``--input-data`` JSON
(base64 of the raw bytes, batch size 1, the batch dimension left to ``-b 1`` for a batching
model). It writes the verbose CSV (``-f``, ``--verbose-csv``): throughput, p50/p90/p95/p99, mean
latency and Triton's queue/compute split of its stable windows; its standard output (``-v``)
adds the request count, Triton's request time and executions, and every window it measured.

Outcomes, as the Python engine's:

- measured: a ``LevelMeasurement`` (engine ``perf_analyzer``, its version);
- not stable within ``max_windows``: perf_analyzer gives up without a result; the measurement
  is marked unstable and carries the last windows' throughput and mean latency it printed (no
  percentiles: it computes none for an unstable run). The gate warns in perf_analyzer's words,
  and fails where those numbers already miss an objective (``unstable_misses``);
- requests failed (perf_analyzer stops at the first failure) or the run outlived the level's
  deadline (a frozen Triton): an error outcome; whether Triton is still live is checked after;
- perf_analyzer cannot read Triton's statistics (a deployed Triton restricts them to the admin
  key, which perf_analyzer cannot send over gRPC: its ``-H`` is for HTTP only): an error
  outcome that says so. ``choose_engine`` avoids it by picking the Python engine there.

Client CPU: perf_analyzer's own (user + system, all its threads, from ``wait4``) over the whole
run, per request Triton counted in that time (its statistics read before and after).
"""

from __future__ import annotations

import base64
import csv
import importlib.metadata
import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as triton_grpc
from numpy.typing import NDArray
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from gpufleet.spec.model import Objectives
from gpufleet.spec.stack import LoadGateSettings
from validation.load import PROBE_TIMEOUT_S, LevelMeasurement, LoadTarget
from validation.perf_analyzer import INSTALL_HINT, PerfAnalyzer, find_perf_analyzer

ENGINE = "perf_analyzer"
PERF_ANALYZER_WINDOWS = 3  # perf_analyzer compares its last 3 windows; not configurable
_START_ALLOWANCE_S = 10.0  # reading its input data, connecting, the model's metadata
_POLL_S = 0.05
_UNSTABLE = "Failed to obtain stable measurement"
_RESTRICTED = "This protocol is restricted"
_PASS_LINE = re.compile(
    r"Pass \[(\d+)\] throughput: ([\d.]+) infer/sec\. Avg latency: (\d+) usec \(std (\d+) usec\)"
)
_REQUEST_COUNT = re.compile(r"Client:\s*\n\s*Request count: (\d+)")
_SERVER_REQUEST = re.compile(
    r"Avg request latency: (\d+) usec \(overhead (\d+) usec \+ queue (\d+) usec \+ compute "
    r"input (\d+) usec \+ compute infer (\d+) usec \+ compute output (\d+) usec\)"
)
_SERVER_COUNTS = re.compile(
    r"Inference count: (\d+)\s*\n\s*Execution count: (\d+)\s*\n\s*Successful request count: (\d+)"
)


@dataclass(frozen=True)
class PassWindow:
    """One measurement window as perf_analyzer printed it."""

    throughput_per_s: float
    mean_latency_ms: float


@dataclass(frozen=True)
class PerfAnalyzerRun:
    """What one perf_analyzer run left: exit code, output, CSV and its CPU time."""

    returncode: int | None  # None: killed at the deadline
    output: str
    csv_rows: list[dict[str, str]]
    cpu_s: float
    wall_s: float
    command: list[str]

    @property
    def unstable(self) -> bool:
        return self.returncode not in (0, None) and _UNSTABLE in self.output

    @property
    def statistics_restricted(self) -> bool:
        return self.returncode not in (0, None) and _RESTRICTED in self.output

    def passes(self) -> list[PassWindow]:
        return [
            PassWindow(float(match.group(2)), int(match.group(3)) / 1000)
            for match in _PASS_LINE.finditer(self.output)
        ]

    def error_text(self) -> str:
        """perf_analyzer's own words for why it stopped: its last non-empty lines."""
        lines = [line.strip() for line in self.output.splitlines() if line.strip()]
        useful = [line for line in lines if not _PASS_LINE.search(line)]
        return " ".join(useful[-3:]) if useful else f"exit code {self.returncode}"


def input_data(inputs: Mapping[str, NDArray[Any]], *, batched: bool) -> dict[str, Any]:
    """perf_analyzer's --input-data JSON for one request: each tensor's raw bytes in base64,
    with its shape (without the batch dimension of a batching model, which ``-b 1`` adds)."""
    step: dict[str, Any] = {}
    for name, tensor in sorted(inputs.items()):
        array = np.ascontiguousarray(tensor)
        shape = list(array.shape[1:] if batched else array.shape)
        if np_to_triton_dtype(array.dtype) == "BYTES":
            strings = [
                item.decode() if isinstance(item, bytes) else str(item) for item in array.flat
            ]
            step[name] = {"content": strings, "shape": shape}
        else:
            step[name] = {"b64": base64.b64encode(array.tobytes()).decode(), "shape": shape}
    return {"data": [step]}


def perf_analyzer_arguments(
    grpc_url: str,
    model: str,
    concurrency: int,
    settings: LoadGateSettings,
    *,
    version: str,
    input_file: Path,
    csv_file: Path,
) -> list[str]:
    """perf_analyzer's command line for one level (no secret on it: none is needed)."""
    arguments = [
        "-m", model,
        "-u", grpc_url,
        "-i", "grpc",
        "-b", "1",
        "--concurrency-range", str(concurrency),
        "--measurement-mode", "time_windows",
        "--measurement-interval", str(max(round(settings.window_s * 1000), 1)),
        "--stability-percentage", f"{settings.stability_percent:g}",
        "--max-trials", str(settings.max_windows),
        "--input-data", str(input_file),
        "-f", str(csv_file),
        "--verbose-csv",
        "-v",
    ]  # fmt: skip
    if version:
        arguments += ["-x", version]
    return arguments


def run_perf_analyzer(
    analyzer: PerfAnalyzer,
    grpc_url: str,
    model: str,
    inputs: Mapping[str, NDArray[Any]],
    concurrency: int,
    settings: LoadGateSettings,
    *,
    batched: bool,
    version: str,
    deadline_s: float,
) -> PerfAnalyzerRun:
    """Run perf_analyzer for one level in a scratch directory; kill it at ``deadline_s``."""
    with tempfile.TemporaryDirectory(prefix="gpufleet-perf-") as scratch:
        input_file, csv_file = Path(scratch) / "input.json", Path(scratch) / "result.csv"
        input_file.write_text(json.dumps(input_data(inputs, batched=batched)))
        command = analyzer.command(
            perf_analyzer_arguments(
                grpc_url,
                model,
                concurrency,
                settings,
                version=version,
                input_file=input_file,
                csv_file=csv_file,
            )
        )
        output_file = Path(scratch) / "output.txt"
        started = time.monotonic()
        with output_file.open("wb") as output:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=analyzer.environment(),
                cwd=scratch,
            )
            returncode, cpu_s = _wait(process, started + deadline_s + _START_ALLOWANCE_S)
        wall_s = time.monotonic() - started
        rows: list[dict[str, str]] = []
        if returncode == 0 and csv_file.exists():
            with csv_file.open(newline="") as handle:
                rows = list(csv.DictReader(handle))
        text = output_file.read_text(errors="replace")
    return PerfAnalyzerRun(returncode, text, rows, cpu_s, wall_s, command)


def _wait(process: subprocess.Popen[bytes], deadline: float) -> tuple[int | None, float]:
    """Exit code and CPU seconds of the process; None when it was killed at the deadline."""
    returncode: int | None = None
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid == process.pid:
            process.returncode = returncode = os.waitstatus_to_exitcode(status)
            return returncode, usage.ru_utime + usage.ru_stime
        if time.monotonic() >= deadline:
            process.kill()
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
            return None, usage.ru_utime + usage.ru_stime
        time.sleep(_POLL_S)


def server_split_from_output(output: str) -> dict[str, float]:
    """Triton's per-request split as perf_analyzer printed it for its stable windows (µs)."""
    request, counts = _SERVER_REQUEST.search(output), _SERVER_COUNTS.search(output)
    if request is None:
        return {}
    request_us, overhead, queue, compute_input, infer, compute_output = (
        float(value) for value in request.groups()
    )
    split = {
        "request_us": request_us,
        "queue_us": queue,
        "compute_input_us": compute_input,
        "compute_infer_us": infer,
        "compute_output_us": compute_output,
        "overhead_us": overhead,
    }
    if counts is not None:
        inferences, executions, successes = (float(value) for value in counts.groups())
        split["requests"] = successes
        split["executions"] = executions
        if executions > 0:
            split["batch_size"] = inferences / executions
    return split


def request_count(output: str) -> int:
    match = _REQUEST_COUNT.search(output)
    return int(match.group(1)) if match else 0


def csv_number(row: Mapping[str, str], column: str) -> float:
    value = row.get(column, "")
    return float(value) if value not in ("", None) else 0.0


# -- which engine, and one level measured by perf_analyzer ------------------------------------


@dataclass(frozen=True)
class LoadEngine:
    """The engine the load gate measures with, and why; ``problem``: it cannot measure at all."""

    name: str  # "perf_analyzer" or "python"
    analyzer: PerfAnalyzer | None = None
    note: str = ""  # why this engine (a fallback says so)
    problem: str = ""

    @property
    def version(self) -> str:
        if self.analyzer is not None:
            return self.analyzer.version
        return f"tritonclient {importlib.metadata.version('tritonclient')}"

    def describe(self) -> str:
        if self.analyzer is not None:
            return self.analyzer.describe()
        return "python (tritonclient's asyncio gRPC client, this process)"


# What the report says of the Python engine next to perf_analyzer (bench/engines.py measured it
# on one Triton, alternating; bench/results/engines.json has the figures).
PYTHON_ENGINE_GAP = (
    "gpufleet's Python client (grpcio's asyncio stack) spends about 1.2 to 2.5 times "
    "perf_analyzer's CPU per request (bench/results/engines.json); where the client is short "
    "of CPU (beside Triton on a small host, a busy machine) it reads lower throughput and a "
    "higher p99 than perf_analyzer would: the report's client_cpu_per_request_ms and "
    "client_overhead_ms show how much of the latency is the client's"
)


def choose_engine(
    requested: str | None,
    grpc_url: str,
    *,
    find: Callable[[], PerfAnalyzer | None] = find_perf_analyzer,
) -> LoadEngine:
    """``requested`` ("perf_analyzer", "python") or, with None, perf_analyzer where it is found
    and can read the Triton's statistics, the Python engine otherwise (saying why).

    ``find``: where perf_analyzer comes from (validation/perf_analyzer.py's search).
    """
    if requested == "python":
        return LoadEngine("python", note=f"chosen with --engine python; {PYTHON_ENGINE_GAP}")
    found = find()
    if found is None:
        why = f"no perf_analyzer that runs here; {INSTALL_HINT}"
        if requested == ENGINE:
            return LoadEngine(ENGINE, problem=f"--engine perf_analyzer: {why}")
        return LoadEngine(
            "python", note=f"the Python engine, because there is {why}; {PYTHON_ENGINE_GAP}"
        )
    if statistics_restricted(grpc_url):
        why = (
            f"this Triton restricts its statistics to the admin key, which {found.describe()} "
            "cannot send over gRPC (its -H is for HTTP only)"
        )
        if requested == ENGINE:
            return LoadEngine(ENGINE, found, problem=f"--engine perf_analyzer: {why}")
        return LoadEngine("python", note=f"the Python engine, because {why}; {PYTHON_ENGINE_GAP}")
    note = "chosen with --engine perf_analyzer" if requested == ENGINE else "found, so the default"
    return LoadEngine(ENGINE, found, note=note)


def statistics_restricted(grpc_url: str) -> bool:
    """Whether Triton refuses its statistics without the admin key (False when it does not
    answer at all: the gate's readiness check reports that)."""
    try:
        with triton_grpc.InferenceServerClient(grpc_url) as client:
            client.get_inference_statistics("", client_timeout=PROBE_TIMEOUT_S)
    except InferenceServerException as error:
        return _RESTRICTED in str(error)
    except Exception:
        return False
    return False


def measure_with_perf_analyzer(
    analyzer: PerfAnalyzer,
    grpc_url: str,
    target: LoadTarget,
    concurrency: int,
    settings: LoadGateSettings,
    *,
    deadline_s: float,
) -> LevelMeasurement | str | None:
    """One level: the measurement (stable, or unstable with perf_analyzer's last windows), a
    problem that is not the server's (str: perf_analyzer could not run), or None when it did
    not finish within ``deadline_s`` (a server that stopped answering)."""
    run = run_perf_analyzer(
        analyzer,
        grpc_url,
        target.model,
        target.inputs,
        concurrency,
        settings,
        batched=target.batched,
        version=target.version,
        deadline_s=deadline_s,
    )
    if run.returncode is None:
        return None
    if run.statistics_restricted:
        return (
            f"{analyzer.describe()} cannot read this Triton's statistics: {run.error_text()}; "
            "run the gate with --engine python"
        )
    passes = run.passes()
    common: dict[str, Any] = {
        "concurrency": concurrency,
        "window_s": settings.window_s,
        "windows": len(passes),
        "engine": ENGINE,
        "engine_version": analyzer.version,
        "client_cpu_fraction": run.cpu_s / run.wall_s if run.wall_s > 0 else 0.0,
    }
    estimated = sum(one.throughput_per_s * settings.window_s for one in passes)
    cpu_per_request = run.cpu_s * 1000 / estimated if estimated else None
    if run.returncode == 0 and run.csv_rows:
        return _stable_measurement(run, passes, common, cpu_per_request)
    if run.unstable:
        last = passes[-PERF_ANALYZER_WINDOWS:]
        requests = round(sum(one.throughput_per_s * settings.window_s for one in last))
        return LevelMeasurement(
            throughput_per_s=_mean([one.throughput_per_s for one in last]),
            p50_ms=0.0,
            p90_ms=0.0,
            p95_ms=0.0,
            p99_ms=0.0,
            mean_latency_ms=_mean([one.mean_latency_ms for one in last]),
            requests=requests,
            errors=0,
            total_requests=requests,
            first_error="",
            stable=False,
            counted_windows=len(last),
            client_cpu_per_request_ms=cpu_per_request,
            **common,
        )
    with triton_grpc.InferenceServerClient(grpc_url) as client:
        try:
            live = bool(client.is_server_live(client_timeout=PROBE_TIMEOUT_S))
        except Exception:
            live = False
    failed_threads = max(len(re.findall(r"Thread \[\d+\] had error", run.output)), 1)
    return LevelMeasurement(
        throughput_per_s=0.0,
        p50_ms=0.0,
        p90_ms=0.0,
        p95_ms=0.0,
        p99_ms=0.0,
        mean_latency_ms=0.0,
        requests=0,
        errors=failed_threads,
        total_requests=0,
        first_error=f"perf_analyzer: {run.error_text()}",
        stable=False,
        counted_windows=0,
        server_lost=not live,
        **common,
    )


def _stable_measurement(
    run: PerfAnalyzerRun,
    passes: list[PassWindow],
    common: dict[str, Any],
    cpu_per_request: float | None,
) -> LevelMeasurement:
    row = run.csv_rows[0]
    mean = csv_number(row, "Avg latency") / 1000
    split = server_split_from_output(run.output)
    requests = request_count(run.output)
    overhead = mean - split["request_us"] / 1000 if "request_us" in split else None
    return LevelMeasurement(
        throughput_per_s=csv_number(row, "Inferences/Second"),
        p50_ms=csv_number(row, "p50 latency") / 1000,
        p90_ms=csv_number(row, "p90 latency") / 1000,
        p95_ms=csv_number(row, "p95 latency") / 1000,
        p99_ms=csv_number(row, "p99 latency") / 1000,
        mean_latency_ms=mean,
        requests=requests,
        errors=0,
        total_requests=requests,
        first_error="",
        stable=True,
        counted_windows=min(PERF_ANALYZER_WINDOWS, len(passes)),
        server_split=split,
        client_overhead_ms=overhead,
        client_cpu_per_request_ms=cpu_per_request,
        **common,
    )


def unstable_message(measurement: LevelMeasurement, settings: LoadGateSettings) -> str:
    """perf_analyzer's own words for an unstable level, with the last windows it printed."""
    return (
        f"perf_analyzer could not stabilise: no {PERF_ANALYZER_WINDOWS} consecutive windows of "
        f"{settings.window_s:g} s agreed within {settings.stability_percent:g}% in "
        f"{measurement.windows} windows (its last {measurement.counted_windows}: "
        f"{measurement.throughput_per_s:.0f}/s, mean latency {measurement.mean_latency_ms:.2f} "
        "ms); it reports no percentiles for an unstable run"
    )


def unstable_misses(
    measurement: LevelMeasurement, objectives: Objectives, *, highest: bool
) -> list[str]:
    """The objectives an unstable perf_analyzer run misses on what it printed: the last
    windows' throughput (the highest level), and their mean latency against the p99 objective
    (without percentiles only a mean above it is a miss)."""
    misses = []
    limit = objectives.p99_latency_ms
    if limit is not None and measurement.mean_latency_ms > limit:
        misses.append(
            f"mean latency {measurement.mean_latency_ms:.2f} ms of the last windows is already "
            f"above the p99 objective of {limit:g} ms"
        )
    minimum = objectives.min_throughput_per_s
    if highest and minimum is not None and measurement.throughput_per_s < minimum:
        misses.append(
            f"throughput {measurement.throughput_per_s:.0f}/s at the highest concurrency "
            f"({measurement.concurrency}) is below the objective of {minimum:g}/s"
        )
    return misses


def windows_note(settings: LoadGateSettings) -> str:
    """What differs from the spec's settings under perf_analyzer ("" when nothing does)."""
    if settings.stable_windows == PERF_ANALYZER_WINDOWS:
        return ""
    return (
        f"perf_analyzer compares its last {PERF_ANALYZER_WINDOWS} windows, not the spec's "
        f"stable_windows ({settings.stable_windows})"
    )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
