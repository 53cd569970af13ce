"""What `gpufleet up` costs on a static stack of two hosts: the first run from bare hosts, and
the idempotent second run, step by step.

The site of tests/environment_site.py (two Debian 12 hosts on a Docker engine, a registry on
this machine, the stand-in Triton with torch shipped as an image archive), timed in one run:

1. first `up`: configure (Docker installed from Debian's archive), deploy (the image archive
   copied and loaded, the repository filled from the registry, compose up), gate;
2. second `up` with nothing changed: every step again, changing nothing.

For each run it prints the wall time and each step's time (the slowest host's), the second run
as a ratio of the first (whole and per step), and the step that dominates each. The machines
are shared and noisy: compare ratios from one run, not seconds across runs. Results:
bench/results/environment_up.json.

    .venv/bin/python bench/environment_up.py [--docker-host unix:///path/docker.sock]

Without --docker-host it starts a dockerd of its own (as root; none may be running).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from tests.docker_hosts import (  # noqa: E402
    DockerEngine,
    SshKeyPair,
    engine_for_script,
    import_host_image,
)
from tests.environment_site import HOSTS, SITE, open_site  # noqa: E402
from tests.serving_images import TRITON_TORCH, ensure_image  # noqa: E402

STEPS = ("configure", "deploy", "gate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docker-host", help="use this engine instead of starting one")
    parser.add_argument(
        "--out", type=Path, default=PROJECT_ROOT / "bench/results/environment_up.json"
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
    host_image = import_host_image(engine, print)
    triton_image = ensure_image(engine, TRITON_TORCH, host_image, print)
    key = _ssh_key(work / "ssh")
    project = work / "project"
    project.mkdir()
    runs = {}
    with open_site(engine, host_image, key, project, triton_image) as site:
        for name in ("first", "second"):
            started = time.monotonic()
            result = site.gpufleet("up", "--stack", SITE, "--json")
            seconds = time.monotonic() - started
            if result.returncode != 0:
                raise SystemExit(f"{name} up exited {result.returncode}:\n{result.stderr[-4000:]}")
            runs[name] = {"seconds": round(seconds, 1), "steps": _step_seconds(result.stdout)}
    first, second = runs["first"], runs["second"]
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({platform.machine()})",
        "hosts": len(HOSTS),
        "first_up": first,
        "second_up": second,
        "second_over_first": round(second["seconds"] / first["seconds"], 3),
        "second_over_first_per_step": {
            step: round(second["steps"][step] / first["steps"][step], 3) for step in STEPS
        },
        "dominant_step": {
            name: max(STEPS, key=lambda step: run["steps"][step]) for name, run in runs.items()
        },
    }


def _step_seconds(stdout: str) -> dict[str, float]:
    """Each step's time: the slowest host's (the hosts run each step together)."""
    report = json.loads(stdout)
    seconds = dict.fromkeys(STEPS, 0.0)
    for host in report["hosts"].values():
        for step in host["steps"]:
            seconds[step["step"]] = max(seconds[step["step"]], step["seconds"])
    return {step: round(value, 1) for step, value in seconds.items()}


def _ssh_key(directory: Path) -> SshKeyPair:
    directory.mkdir(mode=0o700)
    key = directory / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "gpufleet-bench", "-f", str(key)],
        check=True,
    )
    return SshKeyPair(private_key=key, public_key=key.with_name(f"{key.name}.pub"))


if __name__ == "__main__":
    main()
