"""What deploying the serving stack costs, and how long Triton is gone after a crash.

One generated stack (tests/serving_deploy.py: a python-backend model, Triton, MLflow with
Postgres, Prometheus, on the local stand-in images of tests/serving_images.py) on a Docker
engine, timed in one run:

1. first converge: the serving_stack role copies the stack and the model repository, compose
   creates every container, the role waits until Triton is ready and MLflow and Prometheus
   answer;
2. idempotent re-run: the same role with nothing changed (what every `gpufleet configure` pays);
3. crash: SIGKILL to Triton's main process; seconds until `/v2/health/ready` answers 200 again
   (the restart policy, Triton's start and the model load);
4. planned restart: `docker-compose restart triton`, until ready again.

It prints the seconds and the ratios 2/1, 3/1 and 4/1 (the machines are shared and noisy:
compare ratios, not seconds across runs). Results: bench/results/serving_stack.json.

    .venv/bin/python bench/serving_stack.py [--docker-host unix:///path/docker.sock]

Without --docker-host it starts a dockerd of its own (as root; none may be running).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from tests.docker_hosts import DockerEngine, engine_for_script, import_host_image  # noqa: E402
from tests.serving_deploy import DeployedStack, prepare_stack  # noqa: E402
from tests.serving_images import ensure_serving_images  # noqa: E402

READY_TIMEOUT_S = 300.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docker-host", help="use this engine instead of starting one")
    parser.add_argument(
        "--out", type=Path, default=PROJECT_ROOT / "bench/results/serving_stack.json"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpufleet-bench-") as scratch:
        work = Path(scratch)
        with engine_for_script(args.docker_host, work) as engine:
            results = _measure(engine, work)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


def _measure(engine: DockerEngine, work: Path) -> dict[str, Any]:
    images = ensure_serving_images(engine, import_host_image(engine, print), print)
    stack = prepare_stack(work / "stack", engine, images)
    try:
        first = _timed(stack.converge)
        again = _timed(stack.converge)
        pid = stack.inspect("triton")["State"]["Pid"]
        started = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        _wait_until_ready(stack, started)
        crash = time.monotonic() - started
        restarts = stack.inspect("triton")["RestartCount"]  # `docker restart` resets it
        started = time.monotonic()
        stack.compose("restart", "triton")  # returns once the container was restarted
        _wait_until_ready(stack, started, outage_first=False)
        restart = time.monotonic() - started
    finally:
        stack.down()
    seconds = {
        "first_converge": first,
        "idempotent_converge": again,
        "crash_to_ready": crash,
        "planned_restart_to_ready": restart,
    }
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "seconds": {name: round(value, 2) for name, value in seconds.items()},
        "ratios": {
            "idempotent_over_first": round(again / first, 3),
            "crash_over_first": round(crash / first, 3),
            "planned_restart_over_crash": round(restart / crash, 3),
        },
        "triton_restart_count_after_crash": restarts,
    }


def _timed(step: Any) -> float:
    started = time.monotonic()
    step()
    return time.monotonic() - started


def _wait_until_ready(stack: DeployedStack, since: float, *, outage_first: bool = True) -> None:
    """Poll Triton's readiness every 0.1 s until it answers 200 (after an outage was seen, when
    `outage_first`: a SIGKILL takes effect a moment after os.kill returns)."""
    url = f"http://{stack.url('http')}/v2/health/ready"
    seen_down = not outage_first
    while time.monotonic() - since < READY_TIMEOUT_S:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                ready = answer.status == 200
        except (urllib.error.URLError, OSError):
            ready = False
        if not ready:
            seen_down = True
        elif seen_down:
            return
        time.sleep(0.1)
    raise SystemExit(f"Triton was not ready again within {READY_TIMEOUT_S:g} s")


if __name__ == "__main__":
    main()
