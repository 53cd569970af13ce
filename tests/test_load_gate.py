"""The load gate against a real Triton: stable measurements with sane numbers and Triton's own
split of the request time, objectives that cannot be met fail, a Triton that dies or hangs in
the middle fails the check within a bounded time, and an unstable run warns. The pure parts
(percentiles, stability, statistics arithmetic, bottleneck and verdict) are tested with
hand-made windows.

Real: the `tritonserver` 2.51 binary from the nvidia-pytriton wheel (CPU, python backend,
loopback ports) serving a repository rendered from a ModelSpec by the generator, the seeded torch
MLP of tests/data/python_models/torch_mlp.py inside it (with a 2 ms sleep per execution, so that
the server, not this 2-core machine's client, sets the pace), tritonclient's asyncio gRPC
client, signals to kill or freeze Triton. Nothing is mocked. Windows are 0.3 s (1 s in a stack)
to keep the module short.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from generators.triton_config import render_config_pbtxt
from gpufleet.spec.loading import model_spec_hash
from gpufleet.spec.model import ModelSpec, Objectives
from gpufleet.spec.stack import LoadGateSettings
from tests.triton_fixtures import TritonServerFactory
from validation.load import (
    REQUEST_TIMEOUT_S,
    LevelMeasurement,
    LoadTarget,
    Window,
    client_bottleneck,
    counted_windows,
    evaluate_level,
    is_stable,
    level_deadline_s,
    measure_level,
    measurement_done,
    percentile_ms,
    run_load_gate,
    server_split,
    statistics_totals,
    summarize,
)
from validation.report import CheckResult
from validation.tritonserver import LocalTritonServer

PYTHON_MODELS = Path(__file__).parent / "data" / "python_models"
SPEC: dict[str, Any] = {
    "name": "mlp",
    "backend": "python",
    "max_batch_size": 8,
    "inputs": [{"name": "features", "dtype": "fp32", "shape": [16]}],
    "outputs": [{"name": "scores", "dtype": "fp32", "shape": [4]}],
    "dynamic_batching": {"max_queue_delay_us": 1000},
    "instance_groups": [{"kind": "cpu", "count": 1}],
    "parameters": {"execute_delay_ms": "2"},
}
INPUTS = {"features": np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 16)}
# Generous stability: the test machine has two cores shared by Triton, its stub and pytest.
SETTINGS = LoadGateSettings(window_s=0.3, stable_windows=3, stability_percent=20, max_windows=15)
NEVER_STABLE = LoadGateSettings(
    window_s=0.2, stable_windows=2, stability_percent=1e-6, max_windows=20
)


def write_repository(root: Path) -> Path:
    """`mlp` as `gpufleet generate` renders it, torch_mlp.py as its version 1."""
    spec = ModelSpec.model_validate(SPEC)
    repository = root / "model_repository"
    (repository / "mlp" / "1").mkdir(parents=True)
    config = render_config_pbtxt(spec, "mlp.yaml", model_spec_hash(spec))
    (repository / "mlp" / "config.pbtxt").write_text(config)
    shutil.copy(PYTHON_MODELS / "torch_mlp.py", repository / "mlp" / "1" / "model.py")
    return repository


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTritonServer]:
    root = tmp_path_factory.mktemp("load")
    with LocalTritonServer(write_repository(root), root / "triton") as server:
        yield server


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


# -- against real Triton ------------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 4])
def test_measurement_is_stable_with_sane_numbers(
    served: LocalTritonServer, concurrency: int
) -> None:
    level = measure_level(served.grpc_url, "mlp", INPUTS, concurrency, SETTINGS)
    # Whether windows agree depends on the machine's spare CPU; what the gate guarantees is
    # that it stops at the first stable run or at the cap, and counts the last 3 windows.
    assert level.stable or level.windows == SETTINGS.max_windows, level
    assert level.windows <= SETTINGS.max_windows
    assert level.errors == 0
    assert level.first_error == ""
    assert level.counted_windows == 3
    assert level.throughput_per_s > 0
    assert 0 < level.p50_ms <= level.p90_ms <= level.p95_ms <= level.p99_ms
    # A closed loop: throughput = concurrency / latency (Little's law).
    assert level.throughput_per_s == pytest.approx(
        concurrency / (level.mean_latency_ms / 1000), rel=0.2
    )
    split = level.server_split
    phases = ("queue_us", "compute_input_us", "compute_infer_us", "compute_output_us")
    assert split["compute_infer_us"] >= 2000  # the model sleeps 2 ms per execution
    assert sum(split[phase] for phase in phases) == pytest.approx(split["request_us"], rel=0.1)
    assert split["request_us"] / 1000 < level.mean_latency_ms
    assert level.client_overhead_ms is not None
    assert 0 < level.client_overhead_ms < level.mean_latency_ms
    assert split["requests"] == pytest.approx(level.requests, abs=2 * concurrency)
    # Measured, not bounded: process_time counts gRPC's threads too (it may pass 1 on two
    # cores), and the loop's lag grows when another process takes the CPU.
    assert level.client_cpu_fraction > 0
    assert level.client_loop_lag_ms > 0
    if concurrency > 1:
        assert split["batch_size"] > 1  # the dynamic batcher batched concurrent requests


def assert_objectives_met(check: CheckResult) -> None:
    """Objectives met: `pass`, or `warn` where the machine starved the measurement (unstable
    windows, a busy client), which a busy CI machine may rightly get. Never `fail`."""
    assert check.status in ("pass", "warn"), check.message
    if check.status == "warn":
        assert "unstable" in check.message or "bottleneck" in check.message, check.message


def test_gate_passes_with_the_numbers_in_message_and_measurements(
    served: LocalTritonServer,
) -> None:
    objectives = Objectives(p99_latency_ms=1000, concurrency=[1, 4], min_throughput_per_s=10)
    lines: list[str] = []
    report = run_load_gate(
        served.grpc_url,
        [LoadTarget("mlp", INPUTS, objectives)],
        SETTINGS,
        stack="t",
        progress=lines.append,
    )
    assert report.gate == "load"
    assert report.stack == "t"
    assert [check.name for check in report.checks] == ["mlp c=1", "mlp c=4"]
    for check in report.checks:
        assert_objectives_met(check)
    low, high = report.checks
    assert low.message.startswith("p99 ")
    assert " ms <= 1000 ms, " in low.message
    assert "/s >= 10/s" not in low.message  # the throughput objective is for the highest level
    assert "/s >= 10/s, queue " in high.message
    assert " ms, infer " in high.message
    assert high.measurements["concurrency"] == 4
    assert high.measurements["objective_min_throughput_per_s"] == 10
    assert high.measurements["server_split"]["compute_infer_us"] > 0
    assert lines[0] == "mlp c=1: measuring with python (windows of 0.3 s)"
    assert lines[1].startswith(f"mlp c=1: {low.status}: p99 ")
    assert len(lines) == 4


def test_objectives_that_cannot_be_met_fail(served: LocalTritonServer) -> None:
    too_fast = Objectives(p99_latency_ms=0.01, concurrency=[1])
    too_many = Objectives(p99_latency_ms=1000, concurrency=[1, 2], min_throughput_per_s=1e6)
    report = run_load_gate(
        served.grpc_url,
        [LoadTarget("mlp", INPUTS, too_fast), LoadTarget("mlp", INPUTS, too_many)],
        SETTINGS,
    )
    latency, low, high = report.checks
    assert latency.status == "fail"
    assert latency.message.startswith("p99 latency ")
    assert " ms is above the objective of 0.01 ms [p99 " in latency.message
    assert_objectives_met(low)
    assert high.status == "fail"
    assert high.message.startswith("throughput ")
    assert "/s at the highest concurrency (2) is below the objective of 1e+06/s" in high.message
    assert report.status == "fail"


def test_unstable_measurement_warns(served: LocalTritonServer) -> None:
    settings = NEVER_STABLE.model_copy(update={"max_windows": 3})
    report = run_load_gate(
        served.grpc_url,
        [LoadTarget("mlp", INPUTS, Objectives(p99_latency_ms=1000, concurrency=[2]))],
        settings,
    )
    [check] = report.checks
    assert check.status == "warn"
    assert check.message.endswith(
        "unstable: no 2 consecutive windows of 0.2 s agreed within 1e-06% in 3 windows; the "
        "numbers are from the last 2"
    )
    assert check.measurements["stable"] is False
    assert check.measurements["windows"] == 3


def test_triton_killed_mid_test_fails_the_check_within_bounded_time(
    triton_server_factory: TritonServerFactory, tmp_path: Path
) -> None:
    server = triton_server_factory(write_repository(tmp_path))
    pid = server.pid
    assert pid is not None
    killer = threading.Timer(1.0, os.killpg, (pid, signal.SIGKILL))  # Triton and its stubs
    objectives = Objectives(p99_latency_ms=1000, concurrency=[2, 4])
    started = time.monotonic()
    killer.start()
    try:
        report = run_load_gate(
            server.grpc_url, [LoadTarget("mlp", INPUTS, objectives)], NEVER_STABLE
        )
    finally:
        killer.cancel()
    elapsed = time.monotonic() - started
    killed, after = report.checks
    assert killed.status == "fail"
    assert killed.message.startswith(
        "Triton stopped answering during the load test: [StatusCode.UNAVAILABLE] "
    )
    failed, total = killed.measurements["errors"], killed.measurements["total_requests"]
    assert f"; {failed} of {total} requests failed" in killed.message
    assert 0 < failed < total
    # The failure ended the level early: a never-stable level would run to its cap.
    assert killed.measurements["windows"] < NEVER_STABLE.max_windows
    assert after.status == "error"
    assert after.message.startswith(f"Triton at {server.grpc_url} is not answering")
    assert elapsed < 2 * level_deadline_s(NEVER_STABLE, REQUEST_TIMEOUT_S), elapsed


def test_triton_frozen_mid_test_fails_the_check_within_bounded_time(
    triton_server_factory: TritonServerFactory, tmp_path: Path
) -> None:
    """SIGSTOP: connections stay open and nothing answers; only timeouts end the requests."""
    server = triton_server_factory(write_repository(tmp_path))
    pid = server.pid
    assert pid is not None
    freezer = threading.Timer(0.8, os.killpg, (pid, signal.SIGSTOP))
    objectives = Objectives(p99_latency_ms=1000, concurrency=[2])
    started = time.monotonic()
    freezer.start()
    try:
        report = run_load_gate(
            server.grpc_url,
            [LoadTarget("mlp", INPUTS, objectives)],
            NEVER_STABLE,
            request_timeout_s=1.0,
        )
    finally:
        freezer.cancel()
        os.killpg(pid, signal.SIGKILL)  # a stopped process cannot handle stop()'s SIGTERM
    elapsed = time.monotonic() - started
    [check] = report.checks
    assert check.status == "fail"
    assert check.message.startswith(
        "Triton stopped answering during the load test: [StatusCode.DEADLINE_EXCEEDED] "
    )
    assert check.measurements["windows"] < NEVER_STABLE.max_windows
    assert elapsed < level_deadline_s(NEVER_STABLE, 1.0), elapsed


def test_unreachable_triton_and_unknown_model_are_errors(served: LocalTritonServer) -> None:
    url = closed_port_url()
    objectives = Objectives(concurrency=[1])
    [unreachable] = run_load_gate(url, [LoadTarget("mlp", INPUTS, objectives)], SETTINGS).checks
    assert unreachable.status == "error"
    assert unreachable.message.startswith(f"Triton at {url} is not answering ([StatusCode.")
    [unknown] = run_load_gate(
        served.grpc_url, [LoadTarget("ghost", INPUTS, objectives)], SETTINGS
    ).checks
    assert unknown.status == "error"
    assert unknown.message.startswith("model 'ghost' is not ready on Triton at ")


# -- pure functions, hand-made windows ----------------------------------------------------------


def window(throughput: float, latency_ms: float, *, errors: int = 0, cpu: float = 0.1) -> Window:
    """A 1 s window with `throughput` requests of `latency_ms` each."""
    return Window(1.0, (latency_ms,) * int(throughput), errors=errors, client_cpu_s=cpu)


def measurement(**fields: Any) -> LevelMeasurement:
    values: dict[str, Any] = {
        "concurrency": 4,
        "throughput_per_s": 400.0,
        "p50_ms": 9.0,
        "p90_ms": 9.5,
        "p95_ms": 9.8,
        "p99_ms": 10.0,
        "mean_latency_ms": 9.2,
        "requests": 1200,
        "errors": 0,
        "total_requests": 1200,
        "first_error": "",
        "stable": True,
        "windows": 3,
        "counted_windows": 3,
        "window_s": 1.0,
        "server_split": {"queue_us": 1200.0, "compute_infer_us": 7000.0, "request_us": 8500.0},
        "client_overhead_ms": 0.7,
        "client_cpu_fraction": 0.3,
        "client_loop_lag_ms": 0.2,
    }
    return LevelMeasurement(**{**values, **fields})


def test_percentiles_use_perf_analyzers_nearest_rank() -> None:
    values = [float(v) for v in range(1, 11)]  # index round(p/100 * 9)
    assert [percentile_ms(values, p) for p in (50, 90, 95, 99)] == [6.0, 9.0, 10.0, 10.0]
    assert percentile_ms([3.0], 99) == 3.0
    assert percentile_ms([], 99) == 0.0


def test_windows_agreeing_within_the_percentage_are_stable() -> None:
    assert is_stable([window(100, 10), window(105, 10.4), window(96, 9.7)], 10)


@pytest.mark.parametrize(
    "windows",
    [
        pytest.param([window(100, 10), window(100, 10), window(130, 10)], id="throughput"),
        pytest.param([window(100, 10), window(100, 13), window(100, 10)], id="latency"),
        pytest.param([window(100, 10), window(0, 0), window(100, 10)], id="empty-window"),
        pytest.param([], id="no-windows"),
    ],
)
def test_windows_that_differ_are_not_stable(windows: list[Window]) -> None:
    assert not is_stable(windows, 10)


def test_measurement_stops_when_stable_on_error_or_at_the_cap() -> None:
    settings = LoadGateSettings(stable_windows=3, stability_percent=10, max_windows=5)
    assert not measurement_done([], settings)
    assert not measurement_done([window(50, 20), window(100, 10), window(100, 10)], settings)
    assert measurement_done([window(50, 20), *[window(100, 10)] * 3], settings)
    assert measurement_done([window(100, 10), window(100, 10, errors=1)], settings)
    assert measurement_done([window(50 * (i % 2 + 1), 10) for i in range(5)], settings)


def test_summary_counts_the_stable_windows_only() -> None:
    settings = LoadGateSettings(stable_windows=2, stability_percent=10, max_windows=10)
    windows = [
        Window(1.0, (50.0,) * 10),  # ramp-up: not counted
        Window(1.0, (10.0,) * 99 + (30.0,), client_cpu_s=0.2, loop_lag_ms=0.1),
        Window(1.0, (10.0,) * 100, client_cpu_s=0.4, loop_lag_ms=0.3),
    ]
    split = {"request_us": 8000.0}
    level = summarize(4, windows, settings, split)
    assert level.stable
    assert level.counted_windows == 2
    assert level.windows == 3
    assert level.requests == 200
    assert level.total_requests == 210
    assert level.throughput_per_s == 100
    assert (level.p50_ms, level.p99_ms) == (10.0, 10.0)
    assert level.p99_ms <= max(window.latencies_ms[-1] for window in windows[1:])
    assert level.mean_latency_ms == pytest.approx(10.1)
    assert level.client_overhead_ms == pytest.approx(2.1)
    assert level.client_cpu_fraction == pytest.approx(0.3)
    assert level.client_loop_lag_ms == pytest.approx(0.2)


def test_summary_after_the_cap_reports_the_last_windows_as_unstable() -> None:
    settings = LoadGateSettings(stable_windows=2, stability_percent=10, max_windows=4)
    windows = [window(100, 10), window(200, 5), window(100, 10), window(200, 5)]
    level = summarize(1, windows, settings)
    assert not level.stable
    assert level.counted_windows == 2
    assert level.requests == 300
    assert level.throughput_per_s == 150
    assert level.server_split == {}
    assert level.client_overhead_ms is None
    assert counted_windows(windows[:1], settings) == (1, False)


def test_server_split_divides_each_phase_by_its_own_count() -> None:
    before = statistics_totals({"model_stats": []})
    after = statistics_totals(
        {
            "model_stats": [
                {
                    "inference_count": "40",
                    "execution_count": "10",
                    "inference_stats": {
                        "success": {"count": "40", "ns": "400000000"},
                        "queue": {"count": "40", "ns": "120000000"},
                        "compute_input": {"count": "40", "ns": "4000000"},
                        "compute_infer": {"count": "40", "ns": "260000000"},
                        "compute_output": {"count": "40", "ns": "8000000"},
                        "fail": {},
                    },
                    "batch_stats": [
                        {"batch_size": "4", "compute_infer": {"count": "10", "ns": "65000000"}}
                    ],
                }
            ]
        }
    )
    split = server_split(before, after)
    assert split["request_us"] == 10000
    assert split["queue_us"] == 3000
    assert split["compute_input_us"] == 100
    assert split["compute_infer_us"] == 6500
    assert split["compute_output_us"] == 200
    assert split["overhead_us"] == pytest.approx(200)
    assert split["batch_size"] == 4
    assert split["execution_infer_us"] == 6500
    assert server_split(after, after) == {}


def test_client_bottleneck_says_which_sign_it_saw() -> None:
    assert client_bottleneck(measurement()) == ""
    assert client_bottleneck(measurement(client_cpu_fraction=0.85)) == ""
    busy = client_bottleneck(measurement(client_cpu_fraction=0.95))
    assert busy == (
        "the load generator's process (its event loop and gRPC's threads) used 95% of a CPU core"
    )
    outside = client_bottleneck(measurement(client_overhead_ms=6.0, mean_latency_ms=8.0))
    assert outside == (
        "75% of the client latency (6.00 of 8.00 ms per request) is spent outside Triton's "
        "request statistics (this client, gRPC on both sides, the network; the client's event "
        "loop woke 0.20 ms late on average)"
    )
    # Half of a fast request is gRPC's fixed cost: no news, no warning.
    assert client_bottleneck(measurement(client_overhead_ms=0.4, mean_latency_ms=0.7)) == ""
    both = client_bottleneck(
        measurement(client_cpu_fraction=0.92, client_overhead_ms=6.0, mean_latency_ms=8.0)
    )
    assert both.startswith("the load generator")
    assert "; 75% of the client latency" in both


def test_verdicts_of_hand_made_measurements() -> None:
    objectives = Objectives(p99_latency_ms=50, concurrency=[1, 4], min_throughput_per_s=100)
    settings = LoadGateSettings()
    status, message = evaluate_level(measurement(), objectives, settings, highest=True)
    assert (status, message) == (
        "pass",
        "p99 10.0 ms <= 50 ms, 400/s >= 100/s, queue 1.20 ms, infer 7.00 ms",
    )

    status, message = evaluate_level(
        measurement(stable=False, windows=10, counted_windows=3),
        objectives,
        settings,
        highest=False,
    )
    assert status == "warn"
    assert message == (
        "p99 10.0 ms <= 50 ms, 400/s, queue 1.20 ms, infer 7.00 ms; unstable: no 3 consecutive "
        "windows of 1 s agreed within 10% in 10 windows; the numbers are from the last 3"
    )

    status, message = evaluate_level(
        measurement(client_cpu_fraction=0.97), objectives, settings, highest=False
    )
    assert status == "warn"
    assert message.endswith(
        "; the client may be the bottleneck: the load generator's process (its event loop and "
        "gRPC's threads) used 97% of a CPU core"
    )

    status, message = evaluate_level(
        measurement(p99_ms=80.0, stable=False), objectives, settings, highest=False
    )
    assert status == "fail"
    assert message.startswith("p99 latency 80.0 ms is above the objective of 50 ms [p99 80.0")
    assert "(unstable: no 3 consecutive windows" in message

    lost = measurement(errors=5, total_requests=105, first_error="boom", server_lost=True)
    assert evaluate_level(lost, objectives, settings, highest=False) == (
        "fail",
        "Triton stopped answering during the load test: boom; 5 of 105 requests failed",
    )
    refused = measurement(errors=5, total_requests=5, first_error="[StatusCode.INTERNAL] bad")
    assert evaluate_level(refused, objectives, settings, highest=False) == (
        "fail",
        "5 of 5 requests failed: [StatusCode.INTERNAL] bad",
    )


def test_deadline_covers_every_window_and_timeout() -> None:
    settings = LoadGateSettings(window_s=1.0, max_windows=10)
    assert level_deadline_s(settings, 10.0) == 10 * (1 + 5) + 10 + 15
    assert level_deadline_s(settings, 1.0) == 10 * (1 + 1) + 1 + 3
