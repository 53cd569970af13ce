"""Triton Model Analyzer's own search on tabular_mlp, for comparison with bench/tune.py.

Model Analyzer 1.58 (`pip install triton-model-analyzer==1.58.0 "tritonclient[all]==2.51.0"
nvidia-cuda-runtime-cu12` in a virtual environment of its own, plus Debian's libb64-0d) runs here
with the recipe of ../shared/DESIGN.md: `triton_launch_mode: local` with the nvidia-pytriton
wheel's tritonserver, the backend directory and loopback ports as server flags, PATH and
LD_LIBRARY_PATH as the project's launcher sets them, `cpu_only: true`, and perf_analyzer behind
a wrapper that exports LD_LIBRARY_PATH. The model is tabular_mlp as generated, with its preferred
batch sizes removed (with them, Model Analyzer calls every candidate below max_batch_size 16
illegal). Constraint: p99 <= the spec's 50 ms; objective: throughput. Brute search is held to
concurrency 8 (the spec's level); quick search refuses a list of concurrencies and sweeps its own.

Measurement settings. With Model Analyzer's defaults perf_analyzer measures in `count_windows`
mode: windows of 50 requests (25 ms at concurrency 2 here), three in a row within 10% of each
other. On this 2-CPU machine under load (another bench beside it) such windows often never agree:
perf_analyzer says "Failed to obtain stable measurement", Model Analyzer raises the count by 50
and tries again, up to 10 times, then records nothing ("no valid requests recorded"); when the
first two configs get nothing, Model Analyzer stops the run. So, like the load gate
(docs/load-gate.md), this script measures in time windows: `PERF_ANALYZER_FLAGS` below (2 s
windows, three within 25%, up to 10 windows) and at most 3 automatic adjustments (+1 s per window)
per measurement. `--ma-defaults` runs with Model Analyzer's own settings instead, to show the
failure. One config was unmeasurable in every run but one: 1 instance with max_batch_size 1 swung
between 5 and 600 infer/s from window to window here (stalls near 0.5 s; cause not found). The
quick search starts its climb there and ends when it gets no measurement; `--min-instances 2`
starts it at 2 instances.

Recorded: the mode, wall time, configs profiled (distinct model configs) and measurements (config
and concurrency), the best throughput at the constraint with its config, from Model Analyzer's own
CSV (results/metrics-model-inference.csv), the settings used and the machine's load average.
Results: bench/results/tune_model_analyzer.json (quick), tune_model_analyzer_brute.json (brute),
tune_model_analyzer_quick_min2.json (`--out`, quick from 2 instances).

    .venv/bin/python bench/tune_model_analyzer.py --ma-venv /tmp/tune-ma-venv [--mode quick|brute]
        [--min-instances N] [--logs DIR] [--ma-defaults] [--out FILE]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from bench.loadgen import RESULTS, machine, write_config, write_results  # noqa: E402
from generators.model_export import export_model  # noqa: E402
from gpufleet.registry.demo import demo_network  # noqa: E402
from gpufleet.spec.loading import load_model_spec_file  # noqa: E402
from validation.loopback import pick_free_ports  # noqa: E402
from validation.tritonserver import TritonBinary  # noqa: E402

MODEL = "tabular_mlp"
P99_MAX_MS = 50  # the spec's objective at concurrency 8
SPEC_CONCURRENCY = 8
# perf_analyzer in time windows, as the load gate measures (see the module docstring).
PERF_ANALYZER_FLAGS = {
    "measurement-mode": "time_windows",
    "measurement-interval": 2000,
    "stability-percentage": 25,
    "max-trials": 10,
}
MAX_AUTO_ADJUSTS = 3
PERF_ANALYZER_TIMEOUT_S = 300
# After SIGINT Model Analyzer finishes the measurement under way, then writes its checkpoint.
_INTERRUPT_GRACE_S = 240


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ma-venv", type=Path, required=True)
    parser.add_argument("--mode", choices=("quick", "brute"), default="quick")
    parser.add_argument("--timeout-s", type=int, default=2400)
    parser.add_argument("--out", type=Path, help="default: bench/results/tune_model_analyzer*.json")
    parser.add_argument("--logs", type=Path, help="keep Triton's and perf_analyzer's logs here")
    parser.add_argument(
        "--min-instances",
        type=int,
        default=1,
        help="run_config_search_min_instance_count: where the quick search starts climbing",
    )
    parser.add_argument(
        "--ma-defaults",
        action="store_true",
        help="Model Analyzer's own perf_analyzer settings (count windows), to show the failure",
    )
    arguments = parser.parse_args()
    suffix = "" if arguments.mode == "quick" else f"_{arguments.mode}"
    out = arguments.out or RESULTS / f"tune_model_analyzer{suffix}.json"
    spec = load_model_spec_file(PROJECT_ROOT / "modelconfigs" / f"{MODEL}.yaml").spec
    batching = spec.dynamic_batching.model_copy(update={"preferred_batch_sizes": []})  # type: ignore[union-attr]
    served = spec.model_copy(update={"dynamic_batching": batching})
    binary = TritonBinary.discover()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="tune-ma-") as scratch:
        root = Path(scratch)
        repository = root / "model_repository"
        export_model(demo_network(served), served, write_config(repository, served))
        config = _analyzer_config(arguments, root, repository, binary)
        config_path = root / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        started = time.monotonic()
        returncode, output, timed_out = _run_analyzer(
            [str(arguments.ma_venv / "bin" / "model-analyzer"), "profile", "-f", str(config_path)],
            cwd=root,
            timeout_s=arguments.timeout_s,
        )
        wall_s = time.monotonic() - started
        rows = _rows(root / "export" / "results" / "metrics-model-inference.csv")
        source = "metrics-model-inference.csv"
        if not rows:  # interrupted: Model Analyzer writes its CSV only at the end
            rows = _checkpoint_rows(root / "checkpoints" / "0.ckpt")
            source = "checkpoint"
        if arguments.logs:
            arguments.logs.mkdir(parents=True, exist_ok=True)
            for name in (
                "perf_analyzer.log",
                "triton.log",
                "config.yaml",
                "export/perf_analyzer_error.log",
                "checkpoints/0.ckpt",
            ):
                if (root / name).is_file():
                    shutil.copy(root / name, arguments.logs / Path(name).name)
            (arguments.logs / "model-analyzer.log").write_text(output)
    log_lines = output.splitlines()
    results: dict[str, Any] = {
        **machine(),
        "mode": arguments.mode,
        "constraint": f"p99 <= {P99_MAX_MS} ms",
        "concurrency": [SPEC_CONCURRENCY] if arguments.mode == "brute" else "its own sweep",
        "perf_analyzer_flags": {} if arguments.ma_defaults else PERF_ANALYZER_FLAGS,
        "perf_analyzer_max_auto_adjusts": None if arguments.ma_defaults else MAX_AUTO_ADJUSTS,
        "load_average_before": [round(value, 2) for value in load_before],
        "load_average_after": [round(value, 2) for value in os.getloadavg()],
        "run_config_search_min_instance_count": arguments.min_instances,
        "returncode": returncode,
        "timed_out": timed_out,
        "wall_s": round(wall_s, 1),
        "configs_profiled": len({row.get("Model Config Path", "") for row in rows}),
        "configs_tried": sum("Creating model config:" in line for line in log_lines),
        "measurements": len(rows),
        "failed_measurements": sum("no valid requests recorded" in line for line in log_lines),
        "auto_adjusts": sum("is too small, increased to" in line for line in log_lines),
        "rows_from": source,
        "best_at_slo": best_at_slo(rows),
        f"best_at_slo_at_concurrency_{SPEC_CONCURRENCY}": best_at_slo(rows, SPEC_CONCURRENCY),
        "rows": rows,
        "log_tail": output[-3000:],
    }
    write_results(out, results)


def _analyzer_config(
    arguments: argparse.Namespace, root: Path, repository: Path, binary: TritonBinary
) -> dict[str, Any]:
    backends = binary.assemble_backend_dir(root / "backends")
    environment = binary.environment()
    cuda_lib = next(arguments.ma_venv.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib"))
    wrapper = root / "perf_analyzer"
    wrapper.write_text(
        f'#!/bin/sh\nexport LD_LIBRARY_PATH="{cuda_lib}"\n'
        f'exec "{arguments.ma_venv / "bin" / "perf_analyzer"}" "$@"\n'
    )
    wrapper.chmod(0o755)
    http, grpc, metrics = pick_free_ports(3)
    model: dict[str, Any] = {
        "cpu_only": True,
        "constraints": {"perf_latency_p99": {"max": P99_MAX_MS}},
        "objectives": ["perf_throughput"],
    }
    config: dict[str, Any] = {
        "model_repository": str(repository),
        "output_model_repository_path": str(root / "output_models"),
        "override_output_model_repository": True,
        "export_path": str(root / "export"),
        "checkpoint_directory": str(root / "checkpoints"),
        "run_config_search_mode": arguments.mode,
        "triton_launch_mode": "local",
        "triton_server_path": str(binary.server),
        "triton_server_flags": {
            "backend-directory": str(backends),
            "http-address": "127.0.0.1",
            "grpc-address": "127.0.0.1",
            "metrics-address": "127.0.0.1",
            "http-port": http,
            "grpc-port": grpc,
            "metrics-port": metrics,
        },
        "triton_server_environment": {
            "PATH": environment["PATH"],
            "LD_LIBRARY_PATH": environment["LD_LIBRARY_PATH"],
        },
        "triton_http_endpoint": f"127.0.0.1:{http}",
        "triton_grpc_endpoint": f"127.0.0.1:{grpc}",
        "triton_metrics_url": f"http://127.0.0.1:{metrics}/metrics",
        "triton_output_path": str(root / "triton.log"),
        "perf_analyzer_path": str(wrapper),
        "perf_output": True,
        "perf_output_path": str(root / "perf_analyzer.log"),
        "profile_models": {MODEL: model},
    }
    if not arguments.ma_defaults:
        config["perf_analyzer_flags"] = dict(PERF_ANALYZER_FLAGS)
        config["perf_analyzer_max_auto_adjusts"] = MAX_AUTO_ADJUSTS
        config["perf_analyzer_timeout"] = PERF_ANALYZER_TIMEOUT_S
    if arguments.min_instances != 1:
        config["run_config_search_min_instance_count"] = arguments.min_instances
    if arguments.mode == "brute":  # quick mode refuses a list of concurrencies
        config["concurrency"] = [SPEC_CONCURRENCY]
    return config


def _run_analyzer(command: list[str], cwd: Path, timeout_s: int) -> tuple[int, str, bool]:
    """Run Model Analyzer; past the timeout, interrupt it (it stops its Triton), then kill it."""
    log_path = cwd / "model-analyzer.out"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
        )
        timed_out = False
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=_INTERRUPT_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return process.returncode, log_path.read_text(errors="replace"), timed_out


def best_at_slo(
    rows: list[dict[str, str]], concurrency: int | None = None
) -> dict[str, str] | None:
    """The highest-throughput row whose p99 meets the constraint (at one concurrency if given)."""
    meeting = [
        row
        for row in rows
        if _number(row, "p99 Latency (ms)") <= P99_MAX_MS
        and (concurrency is None or row.get("Concurrency") == str(concurrency))
    ]
    return max(meeting, key=lambda row: _number(row, "Throughput (infer/sec)"), default=None)


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open() as stream:
        return list(csv.DictReader(stream))


def _checkpoint_rows(path: Path) -> list[dict[str, str]]:
    """The measurements of Model Analyzer's checkpoint, in its CSV's columns."""
    if not path.is_file():
        return []
    results = json.loads(path.read_text())["ResultManager.results"]["_results"].get(MODEL, {})
    rows = []
    for variant, (run_config, measurements) in results.items():
        model_config = run_config["_model_run_configs"][0]["_model_config_variant"]["model_config"]
        groups = ",".join(
            f"{group.get('count', 1)}:{group.get('kind', 'KIND_CPU').removeprefix('KIND_')}"
            for group in model_config.get("instanceGroup", [])
        )
        for measurement in measurements.values():
            for per_model in measurement["_model_config_measurements"]:
                data = {name: value["_value"] for name, value in per_model["_non_gpu_data"]}
                rows.append(
                    {
                        "Model": MODEL,
                        "Concurrency": str(
                            per_model["_model_specific_pa_params"]["concurrency-range"]
                        ),
                        "Model Config Path": variant,
                        "Instance Group": groups,
                        "Max Batch Size": str(model_config.get("maxBatchSize", 0)),
                        "Throughput (infer/sec)": str(data.get("perf_throughput", "")),
                        "p99 Latency (ms)": str(data.get("perf_latency_p99", "")),
                    }
                )
    return rows


def _number(row: dict[str, str], column: str) -> float:
    try:
        return float(row.get(column, "inf"))
    except ValueError:
        return float("inf")


if __name__ == "__main__":
    main()
