"""What the rollout gateway (nginx, generators/gateway.py) costs in front of Triton.

One Triton from the nvidia-pytriton wheel serves the cheapest model there is (bench/loadgen.py's
python-backend identity) as versions 1 and 2; one nginx, started exactly as the local stack
starts it (gpufleet/rollout/local_gateway.py), routes a 10% canary between them. The same HTTP
client (validation/http_load.py: closed-loop threads on keep-alive connections, JSON bodies)
then measures, in one run, alternating path by path at each concurrency:

- `direct`: Triton's HTTP port;
- `gateway`: the gateway's HTTP port, through the canary route (split_clients, a rewrite to
  the version's URI, the access log, the keep-alive upstream).

It reports p50 and p99 at concurrency 1 (the added latency: gateway - direct), and the
throughput at each concurrency up to where it stops growing (the ceiling), with their
gateway/direct ratios. Absolute numbers depend on this shared 2-CPU machine; compare ratios.

    .venv/bin/python bench/gateway.py [--seconds 4] [--out bench/results/gateway.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))  # also runs without `pip install -e .`

from bench.loadgen import (  # noqa: E402
    IDENTITY_MODEL,
    IDENTITY_SPEC,
    RESULTS,
    cpu_canary_ms,
    machine,
    write_config,
    write_results,
)
from generators.gateway import ModelRoute  # noqa: E402
from gpufleet.local.run_state import ServerRecord  # noqa: E402
from gpufleet.rollout.local_gateway import GatewayFiles, LocalGateway, gateway_settings  # noqa: E402
from gpufleet.spec.model import ModelSpec  # noqa: E402
from validation.http_load import LoadResult, SteadyLoad, infer_body  # noqa: E402
from validation.loopback import pick_free_ports  # noqa: E402
from validation.tritonserver import LocalTritonServer  # noqa: E402

LEVELS = (1, 2, 4, 8, 16)
MODEL = "identity"


def run_level(address: str, body: bytes, threads: int, seconds: float) -> dict[str, Any]:
    """`threads` closed-loop senders for `seconds` (after a short warm-up) against `address`."""
    SteadyLoad(address, MODEL, body, threads=threads, total=threads * 20).start().wait()
    load = SteadyLoad(address, MODEL, body, threads=threads).start()
    time.sleep(seconds)
    started = time.monotonic()
    result: LoadResult = load.stop()
    elapsed = seconds + (time.monotonic() - started)  # senders finish their last request
    latencies = result.latencies_ms()
    return {
        "concurrency": threads,
        "requests": len(result.answers),
        "failures": len(result.failures),
        "throughput_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)), 3),
        "p99_ms": round(float(np.percentile(latencies, 99)), 3),
        "versions": dict(result.versions()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "gateway.json")
    arguments = parser.parse_args()
    canary_ms = [cpu_canary_ms()]
    spec = ModelSpec.model_validate({**IDENTITY_SPEC, "version_policy": {"all": True}})
    body = infer_body("x", np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 16))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gpufleet-bench-gateway-") as scratch:
        repository = Path(scratch) / "model_repository"
        version_dir = write_config(repository, spec)
        (version_dir / "model.py").write_text(IDENTITY_MODEL)
        (version_dir.parent / "2").mkdir()
        (version_dir.parent / "2" / "model.py").write_text(IDENTITY_MODEL)
        with LocalTritonServer(repository, Path(scratch) / "triton") as server:
            assert server.pid is not None
            http_port, grpc_port = pick_free_ports(2)
            files = GatewayFiles(Path(scratch) / "gateway")
            settings = gateway_settings(
                files,
                http_port=http_port,
                grpc_port=grpc_port,
                triton_http=server.ports.http,
                triton_grpc=server.ports.grpc,
                worker_processes=2,
            )
            route = ModelRoute(MODEL, "canary", stable=1, candidate=2, candidate_percent=10.0)
            pid = LocalGateway(files, settings).apply([route], running=None)
            record = ServerRecord.of_process("gateway", pid)
            try:
                addresses = {
                    "direct": f"127.0.0.1:{server.ports.http}",
                    "gateway": f"127.0.0.1:{http_port}",
                }
                best = {"direct": 0.0, "gateway": 0.0}
                flat = 0
                for threads in LEVELS:
                    for path, address in addresses.items():
                        row = {"path": path, **run_level(address, body, threads, arguments.seconds)}
                        rows.append(row)
                        print(_line(row), flush=True)
                    grew = [row["throughput_per_s"] > 1.05 * best[row["path"]] for row in rows[-2:]]
                    for row in rows[-2:]:
                        best[row["path"]] = max(best[row["path"]], row["throughput_per_s"])
                    flat = 0 if any(grew) else flat + 1
                    if flat == 2:
                        break
            finally:
                record.stop()
    canary_ms.append(cpu_canary_ms())
    summary = summarize(rows)
    print(
        f"added latency at concurrency 1: p50 +{summary['added_p50_ms']} ms, p99 "
        f"+{summary['added_p99_ms']} ms; throughput ceiling: direct "
        f"{summary['ceiling_per_s']['direct']}/s, gateway {summary['ceiling_per_s']['gateway']}/s "
        f"(gateway/direct {summary['ceiling_ratio']})"
    )
    write_results(
        arguments.out,
        {
            **machine(),
            "method": "validation/http_load.py: closed-loop HTTP/1.1 keep-alive threads, JSON "
            f"bodies, {arguments.seconds:g} s per level after a warm-up, direct and gateway "
            "alternating at each level in one run",
            "model": "python-backend identity (16 fp32), versions 1 and 2, one Triton",
            "gateway": "nginx (Debian), 2 workers, 10% canary route with access log",
            "cpu_canary_ms": canary_ms,
            "levels": rows,
            "summary": summary,
        },
    )


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    one = {row["path"]: row for row in rows if row["concurrency"] == 1}
    ceiling = {
        path: max(row["throughput_per_s"] for row in rows if row["path"] == path)
        for path in ("direct", "gateway")
    }
    ratios = [
        gateway["throughput_per_s"] / direct["throughput_per_s"]
        for direct, gateway in zip(rows[::2], rows[1::2], strict=True)
    ]
    return {
        "added_p50_ms": round(one["gateway"]["p50_ms"] - one["direct"]["p50_ms"], 3),
        "added_p99_ms": round(one["gateway"]["p99_ms"] - one["direct"]["p99_ms"], 3),
        "p50_ratio_c1": round(one["gateway"]["p50_ms"] / one["direct"]["p50_ms"], 3),
        "ceiling_per_s": ceiling,
        "ceiling_ratio": round(ceiling["gateway"] / ceiling["direct"], 3),
        "median_throughput_ratio": round(statistics.median(ratios), 3),
        "failures": sum(row["failures"] for row in rows),
    }


def _line(row: dict[str, Any]) -> str:
    return (
        f"c={row['concurrency']:<3} {row['path']:<8} {row['throughput_per_s']:>8}/s  "
        f"p50 {row['p50_ms']:>7} ms  p99 {row['p99_ms']:>7} ms  failures {row['failures']}"
    )


if __name__ == "__main__":
    main()
