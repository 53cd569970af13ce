"""The load gate: latency and throughput of served models against their spec's objectives.

This module is the gate and its Python engine; validation/load_perf_analyzer.py is the other
engine, Triton's perf_analyzer, chosen by default where it is found (docs/load-gate.md). The
Python engine measures with perf_analyzer's method on grpcio's asyncio channel, so that it runs
wherever gpufleet runs. For one model and one concurrency level ``c``:

- ``c`` workers (coroutines on one asyncio thread) each send the given request back to back
  (the ModelInferRequest tritonclient builds, serialized once; responses are not parsed);
- time is cut into windows of ``window_s``; a request belongs to the window it completes in;
- a window gives throughput (successful requests / s), latencies, errors, client CPU time, and
  Triton's statistics (``get_inference_statistics``) are read at every window boundary;
- the measurement is the first run of ``stable_windows`` consecutive windows whose throughput
  and mean latency each lie within ``stability_percent`` of the run's average (perf_analyzer
  compares the window's average latency unless told a percentile: a p99 of one short window is
  too noisy to converge). After ``max_windows`` windows without such a run, the last
  ``stable_windows`` windows are reported and marked unstable. (Recent perf_analyzer releases
  require max/min <= 1 + threshold instead, which is slightly stricter.) A window in which a
  request failed ends the measurement: the check fails anyway.
- latency percentiles are taken over all requests of the counted windows (nearest rank, index
  ``round(p/100 * (n-1))`` as perf_analyzer), and Triton's server-side split over exactly those
  windows, from the statistics read at their first and last boundary.

Server split: Triton 2.51 counts ``queue`` and ``compute_input/infer/output`` once per request
(their counts equal the success count, also with dynamic batching), and charges each request of
a batch the whole duration of the batch's execution. So ``ns / count`` of each is the time an
average request spent in that phase, and queue + compute_* + Triton's overhead = the request
time (success ns / count). What one execution costs is reported beside it:
``batch_size`` = inferences / executions and ``execution_infer_us`` from the per-batch-size
statistics. Client overhead = mean client latency - Triton's request time: gRPC on both sides
(Triton's frontend included), the network and this client's own event loop.

Time is bounded: every request has a timeout (10 s), every statistics, readiness or liveness call
one of its own (5 s, or the request timeout if shorter), and each level a deadline
(``level_deadline_s``). A dead server refuses at once; a hung one costs one request timeout.

The client is a single asyncio thread; the gate warns when its numbers may describe the client
rather than Triton: when the client process (all its threads, gRPC's included) used nearly a
whole CPU core over the counted windows, or when most of the client latency (and at least 1 ms
of it) is spent outside Triton's request statistics. That second sign also shows a server whose
gRPC frontend waits for CPU (Triton's request time starts once the frontend has handed the
request on), so the warning says which sign it saw, with the event loop's lag (how late a 20 ms
timer fires, on average): a few tenths of a millisecond when the client keeps up, milliseconds
when responses queue in it.

    report = run_load_gate("127.0.0.1:18001", [LoadTarget("tabular_mlp", inputs, objectives)],
                           LoadGateSettings(), stack="local", progress=print)
    level = measure_level("127.0.0.1:18001", "tabular_mlp", inputs, 8, LoadGateSettings())
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio
from numpy.typing import NDArray
from tritonclient.grpc._utils import _get_inference_request
from tritonclient.utils import np_to_triton_dtype

from gpufleet.spec.model import Objectives
from gpufleet.spec.stack import LoadGateSettings
from validation.report import CheckResult, GateReport, Status

if TYPE_CHECKING:
    from validation.load_perf_analyzer import LoadEngine

GATE = "load"
REQUEST_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 5.0  # readiness, liveness and statistics calls (at most the request timeout)
# After a failed request a worker waits this long: a dead server refuses at once, and a worker
# retrying in a tight loop would only burn the client's CPU.
ERROR_BACKOFF_S = 0.05
# "Near one core". Not lower: the generator spends less CPU per request the busier it gets
# (more completions per event-loop wakeup), so at 80-90% it still has room; bench/loadgen.py
# saw it reach 98% of a core only at its maximum rate.
CLIENT_CPU_BUSY_FRACTION = 0.9
# "A large share" of the latency spent outside Triton's request statistics, and enough of it to
# matter: a fast model's latency is half gRPC's fixed cost (~0.4 ms here) and that is no news.
CLIENT_OVERHEAD_SHARE = 0.5
CLIENT_OVERHEAD_MIN_MS = 1.0
# 20 ms: at 5 ms the probe cost a tenth of the client's CPU at concurrency 1 (bench/engines.py).
LOOP_LAG_PROBE_S = 0.02
SERVER_PHASES = ("queue", "compute_input", "compute_infer", "compute_output")
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
# tritonclient's channel options: no message size limit either way.
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Window:
    """What one measurement window saw: requests that completed in it and the client's CPU."""

    duration_s: float
    latencies_ms: tuple[float, ...]  # successful requests
    errors: int = 0
    client_cpu_s: float = 0.0
    first_error: str = ""
    loop_lag_ms: float = 0.0  # mean lateness of the event loop's timer probe

    @property
    def throughput_per_s(self) -> float:
        return len(self.latencies_ms) / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def mean_latency_ms(self) -> float:
        return sum(self.latencies_ms) / len(self.latencies_ms) if self.latencies_ms else 0.0


@dataclass(frozen=True)
class LevelMeasurement:
    """One model at one concurrency level, over the counted (stable, or last) windows."""

    concurrency: int
    throughput_per_s: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    mean_latency_ms: float
    requests: int  # successful requests in the counted windows
    errors: int  # failed requests in every window measured
    total_requests: int  # requests completed (ok or failed) in every window measured
    first_error: str
    stable: bool
    windows: int  # windows measured
    counted_windows: int
    window_s: float
    server_split: dict[str, float] = field(default_factory=dict)  # empty: no statistics
    client_overhead_ms: float | None = None
    client_cpu_fraction: float = 0.0
    client_loop_lag_ms: float = 0.0
    server_lost: bool = False  # Triton stopped answering (liveness failed after the errors)
    engine: str = "python"  # what measured: "python" (this module) or "perf_analyzer"
    engine_version: str = ""
    client_cpu_per_request_ms: float | None = None  # the load generator's CPU per request

    @property
    def client_bottleneck(self) -> str:
        """Why the client may be the bottleneck ("" when it is not)."""
        return client_bottleneck(self)


@dataclass(frozen=True)
class LoadTarget:
    """A served model, the request the load is made of (batch size 1) and its objectives."""

    model: str
    inputs: dict[str, NDArray[Any]]
    objectives: Objectives
    version: str = ""  # "" lets Triton pick (its version policy's latest)
    batched: bool = True  # the model batches: the tensors' first dimension is the batch (1)


# -- pure functions: windows, percentiles, stability, statistics -----------------------------


def percentile_ms(sorted_ms: Sequence[float], percent: float) -> float:
    """Nearest-rank percentile of ascending values, as perf_analyzer: index round(p*(n-1))."""
    if not sorted_ms:
        return 0.0
    index = int(percent / 100.0 * (len(sorted_ms) - 1) + 0.5)
    return sorted_ms[index]


def is_stable(windows: Sequence[Window], stability_percent: float) -> bool:
    """Whether each window's throughput and mean latency lie within ``stability_percent`` of
    the average of ``windows``. A window with no successful request is never stable."""
    if not windows or any(not window.latencies_ms for window in windows):
        return False
    limit = stability_percent / 100.0
    throughputs = [window.throughput_per_s for window in windows]
    latencies = [window.mean_latency_ms for window in windows]
    for values in (throughputs, latencies):
        average = sum(values) / len(values)
        if any(abs(value - average) > limit * average for value in values):
            return False
    return True


def measurement_done(windows: Sequence[Window], settings: LoadGateSettings) -> bool:
    """Stop measuring: the last windows are stable, a request failed, or the cap is reached."""
    if not windows:
        return False
    if windows[-1].errors or len(windows) >= settings.max_windows:
        return True
    recent = windows[-settings.stable_windows :]
    return len(recent) == settings.stable_windows and is_stable(recent, settings.stability_percent)


def counted_windows(windows: Sequence[Window], settings: LoadGateSettings) -> tuple[int, bool]:
    """How many of the last windows are counted, and whether they are stable."""
    count = min(settings.stable_windows, len(windows))
    stable = count == settings.stable_windows and is_stable(
        windows[-count:], settings.stability_percent
    )
    return count, stable


def statistics_totals(statistics: dict[str, Any]) -> dict[str, int]:
    """Cumulative counters from Triton's statistics JSON, summed over the versions listed."""
    totals: dict[str, int] = {}

    def add(key: str, value: Any) -> None:
        totals[key] = totals.get(key, 0) + int(value or 0)

    for model in statistics.get("model_stats", []):
        add("inferences", model.get("inference_count"))
        add("executions", model.get("execution_count"))
        inference = model.get("inference_stats", {})
        for phase in ("success", *SERVER_PHASES):
            add(f"{phase}_count", inference.get(phase, {}).get("count"))
            add(f"{phase}_ns", inference.get(phase, {}).get("ns"))
        for batch in model.get("batch_stats", []):
            add("batch_infer_ns", batch.get("compute_infer", {}).get("ns"))
    return totals


def server_split(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """Triton's per-request split between two statistics snapshots, in microseconds.

    Each phase is its time divided by its own count (per request in Triton 2.51, see the module
    docstring); ``overhead_us`` is what the request time holds beyond queue and compute, as
    perf_analyzer reports it. Empty when no request succeeded in between.
    """
    delta = {key: after.get(key, 0) - before.get(key, 0) for key in after}
    requests = delta.get("success_count", 0)
    if requests <= 0:
        return {}
    split = {"request_us": delta["success_ns"] / requests / 1000}
    for phase in SERVER_PHASES:
        count = delta.get(f"{phase}_count", 0)
        split[f"{phase}_us"] = delta.get(f"{phase}_ns", 0) / count / 1000 if count else 0.0
    phases = sum(split[f"{phase}_us"] for phase in SERVER_PHASES)
    split["overhead_us"] = max(split["request_us"] - phases, 0.0)
    executions = delta.get("executions", 0)
    split["requests"] = float(requests)
    split["executions"] = float(executions)
    if executions > 0:
        split["batch_size"] = delta.get("inferences", 0) / executions
        split["execution_infer_us"] = delta.get("batch_infer_ns", 0) / executions / 1000
    return split


def summarize(
    concurrency: int,
    windows: Sequence[Window],
    settings: LoadGateSettings,
    split: dict[str, float] | None = None,
    *,
    server_lost: bool = False,
) -> LevelMeasurement:
    """The measurement of one level from its windows and the server split of the counted ones."""
    count, stable = counted_windows(windows, settings)
    counted = windows[-count:] if count else []
    latencies = sorted(latency for window in counted for latency in window.latencies_ms)
    duration = sum(window.duration_s for window in counted)
    mean = sum(latencies) / len(latencies) if latencies else 0.0
    split = split or {}
    overhead = mean - split["request_us"] / 1000 if latencies and "request_us" in split else None
    errors = sum(window.errors for window in windows)
    cpu_s = sum(w.client_cpu_s for w in counted)
    return LevelMeasurement(
        concurrency=concurrency,
        throughput_per_s=len(latencies) / duration if duration > 0 else 0.0,
        p50_ms=percentile_ms(latencies, 50),
        p90_ms=percentile_ms(latencies, 90),
        p95_ms=percentile_ms(latencies, 95),
        p99_ms=percentile_ms(latencies, 99),
        mean_latency_ms=mean,
        requests=len(latencies),
        errors=errors,
        total_requests=errors + sum(len(window.latencies_ms) for window in windows),
        first_error=next((w.first_error for w in windows if w.first_error), ""),
        stable=stable,
        windows=len(windows),
        counted_windows=count,
        window_s=settings.window_s,
        server_split=split,
        client_overhead_ms=overhead,
        client_cpu_fraction=cpu_s / duration if duration else 0.0,
        client_loop_lag_ms=sum(w.loop_lag_ms for w in counted) / count if count else 0.0,
        server_lost=server_lost,
        client_cpu_per_request_ms=cpu_s * 1000 / len(latencies) if latencies else None,
    )


def client_bottleneck(measurement: LevelMeasurement) -> str:
    """Why the client may have limited the numbers it measured ("" when nothing says so)."""
    reasons = []
    if measurement.client_cpu_fraction >= CLIENT_CPU_BUSY_FRACTION:
        reasons.append(
            "the load generator's process (its event loop and gRPC's threads) used "
            f"{measurement.client_cpu_fraction:.0%} of a CPU core"
        )
    overhead, latency = measurement.client_overhead_ms, measurement.mean_latency_ms
    if (
        overhead is not None
        and overhead >= CLIENT_OVERHEAD_MIN_MS
        and overhead >= CLIENT_OVERHEAD_SHARE * latency
    ):
        reasons.append(
            f"{overhead / latency:.0%} of the client latency ({_ms(overhead)} of {_ms(latency)} "
            "ms per request) is spent outside Triton's request statistics (this client, gRPC "
            "on both sides, the network; the client's event loop woke "
            f"{_ms(measurement.client_loop_lag_ms)} ms late on average)"
        )
    return "; ".join(reasons)


# -- the measurement --------------------------------------------------------------------------


@dataclass
class _Recorder:
    """Completions since the last window boundary (one asyncio thread: no locks needed)."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    loop_lags_ms: list[float] = field(default_factory=list)

    def take(self, duration_s: float, client_cpu_s: float) -> Window:
        """The window that ends now; the next one starts empty."""
        lags = self.loop_lags_ms
        window = Window(
            duration_s=duration_s,
            latencies_ms=tuple(self.latencies_ms),
            errors=self.errors,
            client_cpu_s=client_cpu_s,
            first_error=self.first_error,
            loop_lag_ms=sum(lags) / len(lags) if lags else 0.0,
        )
        self.latencies_ms, self.errors, self.first_error, self.loop_lags_ms = [], 0, "", []
        return window


@dataclass(frozen=True)
class _Boundary:
    time_s: float
    cpu_s: float
    statistics: dict[str, int] | None


@dataclass(frozen=True)
class _Request:
    model: str
    version: str
    inputs: list[triton_grpc.InferInput]
    timeout_s: float
    statistics_headers: dict[str, str] | None = None  # the admin key, where statistics need it
    grpc_url: str = ""

    @property
    def probe_timeout_s(self) -> float:
        return min(PROBE_TIMEOUT_S, self.timeout_s)

    @functools.cached_property
    def serialized(self) -> bytes:
        """The ModelInferRequest as tritonclient builds it, serialized once for every send."""
        request = _get_inference_request(
            model_name=self.model,
            inputs=self.inputs,
            model_version=self.version,
            request_id="",
            outputs=None,
            sequence_id=0,
            sequence_start=False,
            sequence_end=False,
            priority=0,
            timeout=None,
            parameters=None,
        )
        return bytes(request.SerializeToString())


def request_inputs(inputs: dict[str, NDArray[Any]]) -> list[triton_grpc.InferInput]:
    """tritonclient inputs for tensors that include the batch dimension."""
    built = []
    for name, tensor in sorted(inputs.items()):
        array = np.ascontiguousarray(tensor)
        one = triton_grpc.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        one.set_data_from_numpy(array)
        built.append(one)
    return built


def level_deadline_s(settings: LoadGateSettings, request_timeout_s: float) -> float:
    """The longest one level may take, even against a server that stops answering: every
    window plus its statistics call, one request timeout, and the probes before and after."""
    probe_s = min(PROBE_TIMEOUT_S, request_timeout_s)
    return settings.max_windows * (settings.window_s + probe_s) + request_timeout_s + 3 * probe_s


async def measure_level_async(
    grpc_url: str,
    model: str,
    inputs: dict[str, NDArray[Any]],
    concurrency: int,
    settings: LoadGateSettings,
    *,
    version: str = "",
    request_timeout_s: float = REQUEST_TIMEOUT_S,
) -> LevelMeasurement:
    """Measure one level (see the module docstring) with a client of its own."""
    async with triton_aio.InferenceServerClient(grpc_url) as client:
        request = _Request(
            model, version, request_inputs(inputs), request_timeout_s, grpc_url=grpc_url
        )
        return await _measure(client, request, concurrency, settings)


def measure_level(
    grpc_url: str,
    model: str,
    inputs: dict[str, NDArray[Any]],
    concurrency: int,
    settings: LoadGateSettings,
    *,
    version: str = "",
    request_timeout_s: float = REQUEST_TIMEOUT_S,
) -> LevelMeasurement:
    """``measure_level_async`` for callers without an event loop (benchmarks, scripts)."""
    return asyncio.run(
        measure_level_async(
            grpc_url,
            model,
            inputs,
            concurrency,
            settings,
            version=version,
            request_timeout_s=request_timeout_s,
        )
    )


async def _measure(
    client: triton_aio.InferenceServerClient,
    request: _Request,
    concurrency: int,
    settings: LoadGateSettings,
) -> LevelMeasurement:
    recorder = _Recorder()
    windows: list[Window] = []
    # Inference on a channel of its own (tritonclient's options), statistics on the client's.
    async with grpc.aio.insecure_channel(request.grpc_url, options=CHANNEL_OPTIONS) as channel:
        infer = _infer_call(channel)
        boundaries = [await _boundary(client, request)]
        tasks = [
            asyncio.create_task(_send_back_to_back(infer, request, recorder))
            for _ in range(concurrency)
        ]
        tasks.append(asyncio.create_task(_watch_loop_lag(recorder)))
        try:
            while not measurement_done(windows, settings):
                next_boundary = boundaries[-1].time_s + settings.window_s
                await asyncio.sleep(max(next_boundary - time.perf_counter(), 0.0))
                windows.append(await _close_window(client, request, recorder, boundaries))
        finally:  # also on cancellation by the level's deadline: no request outlives the level
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    count, _ = counted_windows(windows, settings)
    first, last = boundaries[-1 - count].statistics, boundaries[-1].statistics
    split = server_split(first, last) if first is not None and last is not None else {}
    failed = any(window.errors for window in windows)
    lost = failed and not await _is_live(client, request.probe_timeout_s)
    return summarize(concurrency, windows, settings, split, server_lost=lost)


async def _close_window(
    client: triton_aio.InferenceServerClient,
    request: _Request,
    recorder: _Recorder,
    boundaries: list[_Boundary],
) -> Window:
    """End the current window now: take its completions, CPU time and Triton's statistics."""
    time_s, cpu_s = time.perf_counter(), time.process_time()
    previous = boundaries[-1]
    window = recorder.take(time_s - previous.time_s, cpu_s - previous.cpu_s)
    boundaries.append(_Boundary(time_s, cpu_s, await _statistics(client, request)))
    return window


async def _boundary(client: triton_aio.InferenceServerClient, request: _Request) -> _Boundary:
    time_s, cpu_s = time.perf_counter(), time.process_time()
    return _Boundary(time_s, cpu_s, await _statistics(client, request))


async def _watch_loop_lag(recorder: _Recorder) -> None:
    """How late the event loop wakes a sleeper: the time a response waits for a busy loop."""
    while True:
        due = time.perf_counter() + LOOP_LAG_PROBE_S
        await asyncio.sleep(LOOP_LAG_PROBE_S)
        recorder.loop_lags_ms.append((time.perf_counter() - due) * 1000)


async def _statistics(
    client: triton_aio.InferenceServerClient, request: _Request
) -> dict[str, int] | None:
    """Triton's cumulative counters for the model, or None when it does not answer."""
    try:
        statistics = await client.get_inference_statistics(
            request.model,
            request.version,
            headers=request.statistics_headers,
            as_json=True,
            client_timeout=request.probe_timeout_s,
        )
    except Exception:  # a dead server is reported by the requests themselves
        return None
    return statistics_totals(statistics)


def _infer_call(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable:
    """ModelInfer on bytes: the request is serialized once, the response is not parsed (the
    load gate checks no outputs, as perf_analyzer checks none). See bench/engines.py for what
    this saves per request over tritonclient's ``infer``."""
    return channel.unary_unary(INFER_METHOD, request_serializer=None, response_deserializer=None)


async def _send_back_to_back(
    infer: grpc.aio.UnaryUnaryMultiCallable, request: _Request, recorder: _Recorder
) -> None:
    """One worker: the next request as soon as the previous one is answered."""
    payload, timeout_s, clock = request.serialized, request.timeout_s, time.perf_counter
    while True:
        started = clock()
        try:
            await infer(payload, timeout=timeout_s)
        except grpc.aio.AioRpcError as error:  # worded as tritonclient words it
            recorder.errors += 1
            details = _first_line(error.details() or "")
            recorder.first_error = recorder.first_error or f"[{error.code()}] {details}"
            await asyncio.sleep(ERROR_BACKOFF_S)
        except Exception as error:  # any failure counts as an error of this request
            recorder.errors += 1
            recorder.first_error = recorder.first_error or _first_line(error)
            await asyncio.sleep(ERROR_BACKOFF_S)
        else:
            recorder.latencies_ms.append((clock() - started) * 1000)


async def _is_live(client: triton_aio.InferenceServerClient, timeout_s: float) -> bool:
    try:
        return bool(await client.is_server_live(client_timeout=timeout_s))
    except Exception:
        return False


# -- the gate ---------------------------------------------------------------------------------


def run_load_gate(
    grpc_url: str,
    targets: Sequence[LoadTarget],
    settings: LoadGateSettings,
    *,
    stack: str = "",
    progress: Progress | None = None,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
    statistics_headers: dict[str, str] | None = None,
    engine: LoadEngine | None = None,
) -> GateReport:
    """Measure every target at each of its concurrency levels; one check per model and level.

    ``statistics_headers`` go with the statistics requests only (a deployed Triton restricts
    its statistics API to the admin key; inference needs none). ``engine``: what measures
    (validation/load_perf_analyzer.py's ``choose_engine``); None is this module's Python engine.

    ``progress`` is called with a line before and after each level. Every level is bounded in
    time (``level_deadline_s``), so a server that dies or hangs cannot hang the gate.
    """
    from validation.load_perf_analyzer import LoadEngine

    chosen = engine or LoadEngine("python")
    checks = asyncio.run(
        _run_gate(
            grpc_url,
            targets,
            settings,
            progress or _quiet,
            request_timeout_s,
            statistics_headers,
            chosen,
        )
    )
    return GateReport(GATE, checks, stack)


async def _run_gate(
    grpc_url: str,
    targets: Sequence[LoadTarget],
    settings: LoadGateSettings,
    progress: Progress,
    request_timeout_s: float,
    statistics_headers: dict[str, str] | None,
    engine: LoadEngine,
) -> list[CheckResult]:
    checks = []
    if engine.note or engine.problem:
        progress(f"engine: {engine.describe()}: {engine.problem or engine.note}")
    async with triton_aio.InferenceServerClient(grpc_url) as client:
        for target in targets:
            request = _Request(
                target.model,
                target.version,
                request_inputs(target.inputs),
                request_timeout_s,
                statistics_headers,
                grpc_url,
            )
            levels = target.objectives.concurrency
            for concurrency in levels:
                name = f"{target.model} c={concurrency}"
                if engine.problem:
                    checks.append(
                        CheckResult(name, "error", engine.problem, _engine_fields(engine, settings))
                    )
                    continue
                progress(
                    f"{name}: measuring with {engine.name} (windows of {settings.window_s:g} s)"
                )
                level = _Level(target, request, concurrency, settings, engine)
                check = await _check_level(client, grpc_url, level)
                checks.append(check)
                progress(f"{name}: {check.status}: {check.message}")
    return checks


@dataclass(frozen=True)
class _Level:
    target: LoadTarget
    request: _Request
    concurrency: int
    settings: LoadGateSettings
    engine: LoadEngine


async def _check_level(
    client: triton_aio.InferenceServerClient, grpc_url: str, level: _Level
) -> CheckResult:
    request, objectives, settings = level.request, level.target.objectives, level.settings
    name = f"{request.model} c={level.concurrency}"
    started = time.monotonic()
    not_ready = await _not_ready(client, grpc_url, request)
    engine_fields = _engine_fields(level.engine, settings)
    if not_ready:
        return CheckResult(name, "error", not_ready, engine_fields, time.monotonic() - started)
    deadline = level_deadline_s(settings, request.timeout_s)
    outcome = await _measure_with_engine(client, grpc_url, level, deadline)
    if isinstance(outcome, str):
        return CheckResult(name, "error", outcome, engine_fields, time.monotonic() - started)
    if outcome is None:
        message = (
            f"Triton stopped answering during the load test: the measurement did not finish "
            f"within {deadline:g} s"
        )
        return CheckResult(name, "fail", message, engine_fields, time.monotonic() - started)
    measurement = outcome
    highest = level.concurrency == max(objectives.concurrency)
    if measurement.engine == "perf_analyzer" and not measurement.stable and not measurement.errors:
        from validation.load_perf_analyzer import unstable_message, unstable_misses

        misses = unstable_misses(measurement, objectives, highest=highest)
        status: Status = "fail" if misses else "warn"
        message = unstable_message(measurement, settings)
        if misses:
            message = "; ".join(misses) + f" ({message})"
    else:
        status, message = evaluate_level(measurement, objectives, settings, highest=highest)
    measurements = {
        **asdict(measurement),
        **_objective_numbers(objectives, highest),
        **engine_fields,
    }
    return CheckResult(name, status, message, measurements, time.monotonic() - started)


async def _measure_with_engine(
    client: triton_aio.InferenceServerClient, grpc_url: str, level: _Level, deadline: float
) -> LevelMeasurement | str | None:
    """The level measured by the chosen engine; str: it could not run; None: past deadline."""
    if level.engine.analyzer is not None and level.engine.name == "perf_analyzer":
        from validation.load_perf_analyzer import measure_with_perf_analyzer

        return await asyncio.to_thread(
            measure_with_perf_analyzer,
            level.engine.analyzer,
            grpc_url,
            level.target,
            level.concurrency,
            level.settings,
            deadline_s=deadline,
        )
    try:
        return await asyncio.wait_for(
            _measure(client, level.request, level.concurrency, level.settings), deadline
        )
    except TimeoutError:
        return None


def _engine_fields(engine: LoadEngine, settings: LoadGateSettings) -> dict[str, Any]:
    """What the report says about the engine: its name, version, path and why it was chosen."""
    from validation.load_perf_analyzer import windows_note

    fields: dict[str, Any] = {"engine": engine.name, "engine_version": engine.version}
    if engine.analyzer is not None:
        fields["engine_path"] = str(engine.analyzer.path)
    notes = [engine.note, windows_note(settings) if engine.name == "perf_analyzer" else ""]
    fields["engine_note"] = "; ".join(note for note in notes if note)
    return fields


async def _not_ready(
    client: triton_aio.InferenceServerClient, grpc_url: str, request: _Request
) -> str:
    """Why the model cannot be measured ("" when it is ready)."""
    version = f" version {request.version}" if request.version else ""
    try:
        ready = await client.is_model_ready(
            request.model, request.version, client_timeout=request.probe_timeout_s
        )
    except Exception as error:
        return (
            f"Triton at {grpc_url} is not answering ({_first_line(error)}); start it "
            "(gpufleet up) or check the gRPC address"
        )
    if not ready:
        return (
            f"model {request.model!r}{version} is not ready on Triton at {grpc_url}; load it "
            "first (the correctness gate's error says why it is not)"
        )
    return ""


def _objective_numbers(objectives: Objectives, highest: bool) -> dict[str, Any]:
    numbers: dict[str, Any] = {"objective_p99_latency_ms": objectives.p99_latency_ms}
    if highest:
        numbers["objective_min_throughput_per_s"] = objectives.min_throughput_per_s
    return numbers


def evaluate_level(
    measurement: LevelMeasurement,
    objectives: Objectives,
    settings: LoadGateSettings,
    *,
    highest: bool,
) -> tuple[Status, str]:
    """Status and message of one level; ``highest``: the throughput objective applies."""
    if measurement.errors:
        return "fail", _errors_message(measurement)
    numbers = _numbers_text(measurement, objectives, highest=highest)
    misses = list(_missed_objectives(measurement, objectives, highest=highest))
    if misses:
        unstable = "" if measurement.stable else f" ({_unstable_text(measurement, settings)})"
        return "fail", "; ".join(misses) + f" [{numbers}]" + unstable
    if not measurement.stable:
        return "warn", f"{numbers}; {_unstable_text(measurement, settings)}"
    bottleneck = measurement.client_bottleneck
    if bottleneck:
        return "warn", f"{numbers}; the client may be the bottleneck: {bottleneck}"
    return "pass", numbers


def _missed_objectives(
    measurement: LevelMeasurement, objectives: Objectives, *, highest: bool
) -> Iterable[str]:
    limit = objectives.p99_latency_ms
    if limit is not None and measurement.p99_ms > limit:
        yield f"p99 latency {_ms(measurement.p99_ms)} ms is above the objective of {limit:g} ms"
    minimum = objectives.min_throughput_per_s
    if highest and minimum is not None and measurement.throughput_per_s < minimum:
        yield (
            f"throughput {measurement.throughput_per_s:.0f}/s at the highest concurrency "
            f"({measurement.concurrency}) is below the objective of {minimum:g}/s"
        )


def _numbers_text(measurement: LevelMeasurement, objectives: Objectives, *, highest: bool) -> str:
    """Like "p99 12.3 ms <= 50 ms, 410/s, queue 1.2 ms, infer 8.1 ms" (objectives where set)."""
    text = f"p99 {_ms(measurement.p99_ms)} ms"
    limit = objectives.p99_latency_ms
    if limit is not None:
        text += f" {'<=' if measurement.p99_ms <= limit else '>'} {limit:g} ms"
    text += f", {measurement.throughput_per_s:.0f}/s"
    minimum = objectives.min_throughput_per_s
    if highest and minimum is not None:
        text += f" {'>=' if measurement.throughput_per_s >= minimum else '<'} {minimum:g}/s"
    split = measurement.server_split
    if split:
        text += (
            f", queue {_ms(split['queue_us'] / 1000)} ms, "
            f"infer {_ms(split['compute_infer_us'] / 1000)} ms"
        )
    return text


def _errors_message(measurement: LevelMeasurement) -> str:
    counts = (
        f"{measurement.errors} of {measurement.total_requests} requests failed"
        if measurement.total_requests
        else f"{measurement.engine} stops at the first failed request"
    )
    if measurement.server_lost:
        return f"Triton stopped answering during the load test: {measurement.first_error}; {counts}"
    return f"{counts}: {measurement.first_error}"


def _unstable_text(measurement: LevelMeasurement, settings: LoadGateSettings) -> str:
    return (
        f"unstable: no {settings.stable_windows} consecutive windows of {settings.window_s:g} s "
        f"agreed within {settings.stability_percent:g}% in {measurement.windows} windows; the "
        f"numbers are from the last {measurement.counted_windows}"
    )


def _ms(value: float) -> str:
    """Milliseconds with about three significant digits, never in exponent form."""
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"


def _first_line(error: object) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _quiet(_: str) -> None:
    return None
