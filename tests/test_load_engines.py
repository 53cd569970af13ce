"""The load gate's two engines, Triton's perf_analyzer and gpufleet's Python client, against the
same real Triton: the same objectives pass and fail with either, a Triton killed mid-run fails
the level with either, perf_analyzer's server-side split agrees with Triton's statistics API,
an unstable perf_analyzer run warns in its own words, and the engine is chosen (and named) as
documented; the launcher finds the perf_analyzer that `make` installs into .venv-perf.

Real: perf_analyzer 2.51 from the tritonclient wheel in .venv-perf (with libcudart from the
nvidia-cuda-runtime-cu12 wheel and Debian's libb64), the `tritonserver` 2.51 binary from the
nvidia-pytriton wheel serving the seeded torch MLP of tests/data/python_models (2 ms per
execution; see tests/test_load_gate.py), Triton's statistics API, signals to kill Triton.
Not real: in the search-order test, the perf_analyzer first on PATH is a two-line stand-in
script (so that PATH's precedence can be shown on a machine without the SDK). Windows are 0.3 s
to keep the module short; the machine is busy, so stability is generous.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from gpufleet.spec.model import Objectives
from gpufleet.spec.stack import LoadGateSettings
from tests.conftest import PROJECT_ROOT
from tests.test_load_gate import INPUTS, NEVER_STABLE, SETTINGS, write_repository
from tests.triton_fixtures import TritonServerFactory
from validation.load import LoadTarget, run_load_gate, statistics_totals
from validation.load_perf_analyzer import (
    LoadEngine,
    choose_engine,
    input_data,
    measure_with_perf_analyzer,
)
from validation.perf_analyzer import (
    OVERRIDE_VARIABLE,
    PERF_VENV,
    PerfAnalyzer,
    find_perf_analyzer,
)
from validation.tritonserver import LocalTritonServer

ENGINES = ["perf_analyzer", "python"]


@pytest.fixture(scope="module")
def analyzer() -> PerfAnalyzer:
    found = find_perf_analyzer()
    assert found is not None, "no perf_analyzer: `make test` builds .venv-perf"
    return found


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTritonServer]:
    root = tmp_path_factory.mktemp("engines")
    with LocalTritonServer(write_repository(root), root / "triton") as server:
        yield server


def engine_named(name: str, analyzer: PerfAnalyzer) -> LoadEngine:
    return choose_engine(name, "127.0.0.1:1", find=lambda: analyzer)


def statistics(url: str) -> dict[str, int]:
    with triton_grpc.InferenceServerClient(url) as client:
        return statistics_totals(client.get_inference_statistics("mlp", as_json=True))


# -- the launcher ------------------------------------------------------------------------------


def test_launcher_finds_the_venvs_perf_analyzer_and_runs_it() -> None:
    """`make test` built .venv-perf; without PATH or override candidates, that one is used."""
    environ = {"PATH": "/usr/bin:/bin"}
    found = find_perf_analyzer(environ=environ)
    assert found is not None
    assert found.found_in == ".venv-perf"
    assert found.path == PERF_VENV / "bin" / "perf_analyzer"
    assert found.version == "2.51.0"
    [library_dir] = found.library_dirs
    assert (library_dir / "libcudart.so.12").is_file()
    assert found.environment(environ)["LD_LIBRARY_PATH"] == str(library_dir)
    # As a command: the launcher execs the binary with the library path set.
    result = subprocess.run(
        [sys.executable, "-m", "validation.perf_analyzer", "--version"],
        cwd=PROJECT_ROOT,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert (result.stdout + result.stderr).startswith("Perf Analyzer Version 2.51.0")


def test_override_then_path_then_venv_and_only_binaries_that_run(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.write_text("#!/bin/sh\nexit 127\n")
    broken.chmod(0o755)
    sdk = tmp_path / "sdk"
    sdk.mkdir()
    stand_in = sdk / "perf_analyzer"
    stand_in.write_text("#!/bin/sh\necho 'Perf Analyzer Version 2.99.0 (commit sdk)'\n")
    stand_in.chmod(0o755)
    on_path = find_perf_analyzer(environ={"PATH": f"{sdk}:/usr/bin:/bin"})
    assert on_path is not None
    assert (on_path.found_in, on_path.version, on_path.library_dirs) == ("PATH", "2.99.0", ())
    # A broken override is passed over; a working one wins.
    with_broken = find_perf_analyzer(environ={"PATH": "/bin", OVERRIDE_VARIABLE: str(broken)})
    assert with_broken is not None
    assert with_broken.found_in == ".venv-perf"
    chosen = find_perf_analyzer(environ={"PATH": f"{sdk}:/bin", OVERRIDE_VARIABLE: str(stand_in)})
    assert chosen is not None
    assert chosen.found_in == OVERRIDE_VARIABLE
    assert find_perf_analyzer(venv=tmp_path / "none", environ={"PATH": "/bin"}) is None


# -- the same verdicts from either engine --------------------------------------------------------


def test_either_engine_passes_and_fails_the_same_objectives(
    served: LocalTritonServer, analyzer: PerfAnalyzer
) -> None:
    targets = [
        LoadTarget(
            "mlp",
            INPUTS,
            Objectives(p99_latency_ms=1000, concurrency=[1, 4], min_throughput_per_s=10),
        ),
        LoadTarget("mlp", INPUTS, Objectives(p99_latency_ms=0.01, concurrency=[2])),
        LoadTarget(
            "mlp",
            INPUTS,
            Objectives(p99_latency_ms=1000, concurrency=[2], min_throughput_per_s=1e6),
        ),
    ]
    verdicts = {}
    for name in ENGINES:
        report = run_load_gate(
            served.grpc_url, targets, SETTINGS, engine=engine_named(name, analyzer)
        )
        checks = report.checks
        # A busy machine may keep either engine from stabilising: then a level that meets its
        # objectives warns instead of passing. A missed objective fails either way.
        verdicts[name] = ["fail" if check.status == "fail" else "met" for check in checks]
        messages = [check.message for check in checks]
        assert verdicts[name] == ["met", "met", "fail", "fail"], (name, messages)
        for check in checks[:2]:
            assert check.status == ("pass" if check.measurements["stable"] else "warn"), check
        assert messages[2].startswith(("p99 latency ", "mean latency ")), messages[2]
        assert messages[3].startswith("throughput "), messages[3]
        for check in checks:
            measured = check.measurements
            assert measured["engine"] == name
            assert measured["requests"] > 0
            assert measured["client_cpu_per_request_ms"] > 0
            if measured["stable"]:
                assert 0 < measured["p50_ms"] <= measured["p99_ms"]
                assert measured["server_split"]["compute_infer_us"] >= 2000
        if name == "python":  # the report says how far it is from perf_analyzer, and where
            assert (
                "times perf_analyzer's CPU per request (bench/results/engines.json)"
                in (checks[0].measurements["engine_note"])
            )
        version = checks[0].measurements["engine_version"]
        assert (
            version == "2.51.0" if name == "perf_analyzer" else version.startswith("tritonclient ")
        )
    assert verdicts["perf_analyzer"] == verdicts["python"]


@pytest.mark.parametrize("name", ENGINES)
def test_triton_killed_mid_run_fails_the_level_with_either_engine(
    triton_server_factory: TritonServerFactory,
    tmp_path: Path,
    analyzer: PerfAnalyzer,
    name: str,
) -> None:
    server = triton_server_factory(write_repository(tmp_path))
    pid = server.pid
    assert pid is not None
    killer = threading.Timer(1.5, os.killpg, (pid, signal.SIGKILL))  # Triton and its stubs
    objectives = Objectives(p99_latency_ms=1000, concurrency=[2, 4])
    killer.start()
    try:
        report = run_load_gate(
            server.grpc_url,
            [LoadTarget("mlp", INPUTS, objectives)],
            NEVER_STABLE,
            engine=engine_named(name, analyzer),
        )
    finally:
        killer.cancel()
    killed, after = report.checks
    assert killed.status == "fail", killed.message
    assert killed.message.startswith("Triton stopped answering during the load test: ")
    assert killed.measurements["server_lost"] is True
    assert killed.measurements["errors"] > 0
    assert killed.measurements["windows"] < NEVER_STABLE.max_windows
    if name == "perf_analyzer":
        assert "perf_analyzer: " in killed.message
        assert killed.message.endswith("; perf_analyzer stops at the first failed request")
    assert after.status == "error"
    assert after.message.startswith(f"Triton at {server.grpc_url} is not answering")


# -- perf_analyzer's own numbers ---------------------------------------------------------------


def test_perf_analyzers_server_split_agrees_with_tritons_statistics(
    served: LocalTritonServer, analyzer: PerfAnalyzer
) -> None:
    """perf_analyzer reads Triton's statistics itself, over its last 3 windows; the statistics
    API's delta around its whole run, read here, covers the same span when those 3 windows are
    all it measured (a loose stability criterion makes that the usual case), and then gives the
    same per-request phases."""
    settings = LoadGateSettings(window_s=0.3, stability_percent=100, max_windows=10)
    target = LoadTarget("mlp", INPUTS, Objectives(concurrency=[4]))
    for _ in range(4):  # a run of exactly 3 windows; the busy machine may stretch one
        before = statistics(served.grpc_url)
        measured = measure_with_perf_analyzer(
            analyzer, served.grpc_url, target, 4, settings, deadline_s=120
        )
        after = statistics(served.grpc_url)
        assert not isinstance(measured, str | None)
        if measured.windows == 3:
            break
    assert measured.stable
    assert measured.windows == 3
    split = measured.server_split
    delta = {key: after[key] - before.get(key, 0) for key in after}
    assert 0 < split["requests"] <= delta["success_count"]
    # Triton's count and perf_analyzer's own differ by the requests in flight at the edges.
    assert split["requests"] == pytest.approx(measured.requests, abs=2 * 4)
    whole_run = {
        phase: delta[f"{phase}_ns"] / delta[f"{phase}_count"] / 1000
        for phase in ("success", "queue", "compute_input", "compute_infer", "compute_output")
    }
    print("perf_analyzer:", split, "statistics API, whole run:", whole_run)
    # Same span: perf_analyzer 2.51's figures match to a few microseconds (the margin is for
    # requests in flight at the edges).
    for phase, ours in whole_run.items():
        theirs = split["request_us" if phase == "success" else f"{phase}_us"]
        assert theirs == pytest.approx(ours, rel=0.05, abs=20), phase
    assert split["batch_size"] > 1  # the dynamic batcher batched the 4 concurrent requests
    phases = sum(
        split[f"{p}_us"] for p in ("queue", "compute_input", "compute_infer", "compute_output")
    )
    assert phases + split["overhead_us"] == pytest.approx(split["request_us"], abs=5)
    assert measured.client_overhead_ms is not None
    assert measured.mean_latency_ms > split["request_us"] / 1000


def test_unstable_perf_analyzer_run_warns_in_its_own_words(
    served: LocalTritonServer, analyzer: PerfAnalyzer
) -> None:
    settings = NEVER_STABLE.model_copy(update={"max_windows": 3})
    objectives = Objectives(p99_latency_ms=1000, concurrency=[2])
    report = run_load_gate(
        served.grpc_url,
        [LoadTarget("mlp", INPUTS, objectives)],
        settings,
        engine=engine_named("perf_analyzer", analyzer),
    )
    [check] = report.checks
    assert check.status == "warn"
    assert check.message.startswith(
        "perf_analyzer could not stabilise: no 3 consecutive windows of 0.2 s agreed within "
        "1e-06% in 3 windows (its last 3: "
    )
    assert check.message.endswith("it reports no percentiles for an unstable run")
    assert check.measurements["stable"] is False
    assert check.measurements["throughput_per_s"] > 0
    assert check.measurements["engine_note"].endswith(
        "perf_analyzer compares its last 3 windows, not the spec's stable_windows (2)"
    )
    # What it printed already misses these objectives: a failure, as with the Python engine.
    unmeetable = Objectives(p99_latency_ms=0.001, concurrency=[2], min_throughput_per_s=1e6)
    [missed] = run_load_gate(
        served.grpc_url,
        [LoadTarget("mlp", INPUTS, unmeetable)],
        settings,
        engine=engine_named("perf_analyzer", analyzer),
    ).checks
    assert missed.status == "fail"
    assert missed.message.startswith("mean latency ")
    assert " ms of the last windows is already above the p99 objective of 0.001 ms; " in (
        missed.message
    )
    assert "; throughput " in missed.message
    assert "is below the objective of 1e+06/s (perf_analyzer could not stabilise: " in (
        missed.message
    )


# -- choosing the engine -----------------------------------------------------------------------


def test_default_engine_is_perf_analyzer_where_found_else_python_saying_why(
    served: LocalTritonServer, analyzer: PerfAnalyzer
) -> None:
    found = choose_engine(None, served.grpc_url, find=lambda: analyzer)
    assert (found.name, found.analyzer, found.problem) == ("perf_analyzer", analyzer, "")
    missing = choose_engine(None, served.grpc_url, find=lambda: None)
    assert missing.name == "python"
    assert missing.note.startswith("the Python engine, because there is no perf_analyzer")
    asked = choose_engine("perf_analyzer", served.grpc_url, find=lambda: None)
    report = run_load_gate(
        served.grpc_url,
        [LoadTarget("mlp", INPUTS, Objectives(concurrency=[1, 2]))],
        SETTINGS,
        engine=asked,
    )
    assert [check.status for check in report.checks] == ["error", "error"]
    assert report.checks[0].message.startswith(
        "--engine perf_analyzer: no perf_analyzer that runs here; run `make test`"
    )


def test_triton_with_restricted_statistics_gets_the_python_engine(
    triton_server_factory: TritonServerFactory, tmp_path: Path, analyzer: PerfAnalyzer
) -> None:
    """A deployed Triton's statistics need the admin key, which perf_analyzer cannot send over
    gRPC; the key reaches Triton through secret_args (a template on its command line)."""
    server = triton_server_factory(
        write_repository(tmp_path),
        extra_args=[
            "--grpc-restricted-protocol=statistics:triton-admin-key=${GPUFLEET_TRITON_ADMIN_KEY}"
        ],
    )
    default = choose_engine(None, server.grpc_url, find=lambda: analyzer)
    assert default.name == "python"
    assert "restricts its statistics to the admin key" in default.note
    asked = choose_engine("perf_analyzer", server.grpc_url, find=lambda: analyzer)
    assert asked.problem.startswith("--engine perf_analyzer: this Triton restricts its statistics")
    # Had it run anyway, perf_analyzer's failure says so rather than blaming the model.
    target = LoadTarget("mlp", INPUTS, Objectives(concurrency=[1]))
    outcome = measure_with_perf_analyzer(
        analyzer, server.grpc_url, target, 1, SETTINGS, deadline_s=60
    )
    assert isinstance(outcome, str)
    assert "cannot read this Triton's statistics: " in outcome
    assert outcome.endswith("run the gate with --engine python")


def test_input_data_is_the_requests_bytes_without_the_batch_dimension() -> None:
    tensors = {
        "features": np.linspace(-1, 1, 6, dtype=np.float16).reshape(1, 6),
        "ids": np.array([[7, 8]], dtype=np.int64),
        "text": np.array([[b"a", b"bc"]], dtype=np.object_),
    }
    data = input_data(tensors, batched=True)
    [step] = data["data"]
    assert step["features"]["shape"] == [6]
    assert base64.b64decode(step["features"]["b64"]) == tensors["features"].tobytes()
    assert step["ids"] == {"b64": base64.b64encode(tensors["ids"].tobytes()).decode(), "shape": [2]}
    assert step["text"] == {"content": ["a", "bc"], "shape": [2]}
    assert input_data(tensors, batched=False)["data"][0]["ids"]["shape"] == [1, 2]


def test_settings_go_to_perf_analyzers_command_line() -> None:
    from validation.load_perf_analyzer import perf_analyzer_arguments

    settings = LoadGateSettings(window_s=1.5, stability_percent=7.5, max_windows=12)
    arguments = perf_analyzer_arguments(
        "127.0.0.1:8001",
        "m",
        8,
        settings,
        version="3",
        input_file=Path("/in.json"),
        csv_file=Path("/out.csv"),
    )
    pairs = dict(zip(arguments[::2], arguments[1::2], strict=False))
    assert pairs["--concurrency-range"] == "8"
    assert pairs["--measurement-interval"] == "1500"
    assert pairs["--stability-percentage"] == "7.5"
    assert pairs["--max-trials"] == "12"
    assert arguments[-2:] == ["-x", "3"]
    assert "-H" not in arguments
