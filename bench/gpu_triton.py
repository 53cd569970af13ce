"""What only a GPU shows: `kind: gpu` instance groups from a spec, served by real Triton.

Generates two specs that differ only in their instance group (`kind: gpu, gpus: [0]` and
`kind: cpu`), serves both from one Triton (the nvidia-pytriton binary, python backend, a torch
MLP placed by Triton on cuda:0 or the CPU), drives the same closed-loop load at each, and
reports Triton's view of the instance groups, where each instance ran (from Triton's log), and
the GPU/CPU throughput and latency ratios from this one run. Needs a machine with an NVIDIA GPU;
not part of `make test` (CI has no GPU). Results: bench/results/gpu_triton.json.

    python bench/gpu_triton.py [--requests 3000] [--concurrency 32] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))  # also runs without `pip install -e .`

import tritonclient.grpc as triton_grpc  # noqa: E402

from generators.model_repository import (  # noqa: E402
    apply_plan,
    plan_repository,
    render_repository_files,
)
from gpufleet.spec.loading import load_model_specs  # noqa: E402
from validation.tritonserver import LocalTritonServer  # noqa: E402

IN_FEATURES, OUT_FEATURES, HIDDEN = 512, 16, 4096
SPEC = """\
name: {name}
backend: python
max_batch_size: 64
inputs: [{{name: features, dtype: fp32, shape: [{in_features}]}}]
outputs: [{{name: scores, dtype: fp32, shape: [{out_features}]}}]
dynamic_batching: {{max_queue_delay_us: 500, preferred_batch_sizes: [16, 32, 64]}}
instance_groups:
  - {group}
parameters: {{hidden_size: {hidden}, execute_delay_ms: 0}}
"""
GROUPS = {"mlp_gpu": "{kind: gpu, count: 2, gpus: [0]}", "mlp_cpu": "{kind: cpu, count: 2}"}
MODEL_FILE = PROJECT_ROOT / "tests" / "data" / "python_models" / "torch_mlp.py"


def build_repository(root: Path) -> Path:
    specs_dir, repository = root / "modelconfigs", root / "model_repository"
    specs_dir.mkdir()
    for name, group in GROUPS.items():
        text = SPEC.format(
            name=name,
            group=group,
            in_features=IN_FEATURES,
            out_features=OUT_FEATURES,
            hidden=HIDDEN,
        )
        (specs_dir / f"{name}.yaml").write_text(text)
    files = render_repository_files(load_model_specs(specs_dir))
    apply_plan(plan_repository(repository, files))
    for name in GROUPS:
        (repository / name / "1").mkdir()
        shutil.copy(MODEL_FILE, repository / name / "1" / "model.py")
    return repository


def closed_loop(
    server: LocalTritonServer, model: str, requests: int, concurrency: int
) -> dict[str, Any]:
    """`concurrency` requests in flight until `requests` are answered; latencies in ms."""
    rng = np.random.default_rng(0)
    row = rng.standard_normal((1, IN_FEATURES), dtype=np.float32)
    latencies: list[float] = []
    errors: list[str] = []
    lock, finished = threading.Lock(), threading.Event()
    issued = 0

    with triton_grpc.InferenceServerClient(server.grpc_url) as client:

        def send() -> None:
            nonlocal issued
            with lock:
                if issued >= requests:
                    return
                issued += 1
            request = triton_grpc.InferInput("features", [1, IN_FEATURES], "FP32")
            request.set_data_from_numpy(row)
            started = time.perf_counter()

            def done(result: Any, error: Any) -> None:
                with lock:
                    latencies.append((time.perf_counter() - started) * 1000)
                    if error is not None:
                        errors.append(str(error))
                    if len(latencies) == requests:
                        finished.set()
                send()

            client.async_infer(model, [request], done)

        began = time.perf_counter()
        for _ in range(concurrency):
            send()
        if not finished.wait(timeout=300):
            raise TimeoutError(f"{model}: {len(latencies)} of {requests} answered in 300 s")
        elapsed = time.perf_counter() - began
    ordered = np.sort(np.array(latencies))
    return {
        "requests": requests,
        "errors": len(errors),
        "seconds": round(elapsed, 3),
        "throughput_per_s": round(requests / elapsed, 1),
        **{f"p{q}_ms": round(float(np.percentile(ordered, q)), 2) for q in (50, 90, 99)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench/results/gpu_triton.json")
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        repository = build_repository(Path(scratch))
        with LocalTritonServer(repository, Path(scratch) / "triton") as server:
            configs = {name: server.model_config(name) for name in GROUPS}
            closed_loop(server, "mlp_gpu", 200, arguments.concurrency)  # warm up CUDA
            closed_loop(server, "mlp_cpu", 50, arguments.concurrency)
            loads = {
                name: closed_loop(server, name, arguments.requests, arguments.concurrency)
                for name in GROUPS
            }
            stats = {name: server.model_statistics(name)["model_stats"][0] for name in GROUPS}
            log = server.log_text()
            placement = sorted(set(re.findall(r"(mlp_\w+): network on ([\w:]+)", log)))
            instance_lines = sorted(
                set(
                    re.findall(r"ModelInstanceInitialize: (mlp_\w+) \(([^)]*)\)", server.log_text())
                )
            )

    results = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.node(),
        "python": platform.python_version(),
        "requests": arguments.requests,
        "concurrency": arguments.concurrency,
        "triton_instance_groups": {
            name: [
                {"kind": group["kind"], "count": group["count"], "gpus": group["gpus"]}
                for group in config["instance_group"]
            ]
            for name, config in configs.items()
        },
        "triton_instances": [f"{instance}: {where}" for instance, where in instance_lines],
        "torch_placement": [f"{instance}: {device}" for instance, device in placement],
        "load": loads,
        "executions_per_inference": {
            name: round(int(s["execution_count"]) / max(int(s["inference_count"]), 1), 3)
            for name, s in stats.items()
        },
        "ratios": {
            "gpu_over_cpu_throughput": round(
                loads["mlp_gpu"]["throughput_per_s"] / loads["mlp_cpu"]["throughput_per_s"], 2
            ),
            "gpu_over_cpu_p99": round(loads["mlp_gpu"]["p99_ms"] / loads["mlp_cpu"]["p99_ms"], 3),
        },
    }
    print(json.dumps(results, indent=2))
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
