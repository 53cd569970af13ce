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

Recorded: the mode, wall time, configs profiled, and the best throughput at the constraint, from
Model Analyzer's own CSV (results/metrics-model-inference.csv). Results:
bench/results/tune_model_analyzer.json.

    .venv/bin/python bench/tune_model_analyzer.py --ma-venv /tmp/tune-ma-venv [--mode quick]
"""

from __future__ import annotations

import argparse
import csv
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ma-venv", type=Path, required=True)
    parser.add_argument("--mode", choices=("quick", "brute"), default="quick")
    parser.add_argument("--timeout-s", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=RESULTS / "tune_model_analyzer.json")
    arguments = parser.parse_args()
    spec = load_model_spec_file(PROJECT_ROOT / "modelconfigs" / "tabular_mlp.yaml").spec
    batching = spec.dynamic_batching.model_copy(update={"preferred_batch_sizes": []})  # type: ignore[union-attr]
    served = spec.model_copy(update={"dynamic_batching": batching})
    binary = TritonBinary.discover()
    with tempfile.TemporaryDirectory(prefix="tune-ma-") as scratch:
        root = Path(scratch)
        repository = root / "model_repository"
        export_model(demo_network(served), served, write_config(repository, served))
        backends = binary.assemble_backend_dir(root / "backends")
        environment = binary.environment()
        cuda_lib = next(
            arguments.ma_venv.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib")
        )
        wrapper = root / "perf_analyzer"
        wrapper.write_text(
            f'#!/bin/sh\nexport LD_LIBRARY_PATH="{cuda_lib}"\n'
            f'exec "{arguments.ma_venv / "bin" / "perf_analyzer"}" "$@"\n'
        )
        wrapper.chmod(0o755)
        http, grpc, metrics = pick_free_ports(3)
        config = {
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
            "perf_analyzer_path": str(wrapper),
            "profile_models": {
                "tabular_mlp": {
                    "cpu_only": True,
                    "constraints": {"perf_latency_p99": {"max": 50}},
                    "objectives": ["perf_throughput"],
                }
            },
        }
        if arguments.mode == "brute":  # quick mode refuses a list of concurrencies
            config["concurrency"] = [8]
        config_path = root / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        started = time.monotonic()
        process = subprocess.run(
            [str(arguments.ma_venv / "bin" / "model-analyzer"), "profile", "-f", str(config_path)],
            capture_output=True,
            text=True,
            timeout=arguments.timeout_s,
            check=False,
            cwd=root,
        )
        wall_s = time.monotonic() - started
        rows = _rows(root / "export" / "results" / "metrics-model-inference.csv")
    meeting = [row for row in rows if _number(row, "p99 Latency (ms)") <= 50]
    best = max(meeting, key=lambda row: _number(row, "Throughput (infer/sec)"), default=None)
    results: dict[str, Any] = {
        **machine(),
        "mode": arguments.mode,
        "returncode": process.returncode,
        "wall_s": round(wall_s, 1),
        "configs_profiled": len(rows),
        "best_at_slo": best,
        "rows": rows,
        "log_tail": (process.stdout + process.stderr)[-3000:],
    }
    write_results(arguments.out, results)


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open() as stream:
        return list(csv.DictReader(stream))


def _number(row: dict[str, str], column: str) -> float:
    try:
        return float(row.get(column, "inf"))
    except ValueError:
        return float("inf")


if __name__ == "__main__":
    main()
