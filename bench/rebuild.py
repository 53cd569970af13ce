"""What `gpufleet rebuild` costs: the time from a bare host to green gates, step by step, and the
share that backing up and restoring the registry add.

The site of tests/rebuild_site.py (two Debian 12 hosts, the registry on serve-a, the stand-in
images shipped as archives), timed in one run:

1. `gpufleet rebuild --stack site --host serve-a`: check, backup (pg_dump, artifacts, MLflow's
   users; verified), then it waits for the reinstall;
2. serve-a deleted and recreated bare at the same address (the "reinstall");
3. the same command with the new host key's fingerprint: configure, deploy, restore, fill,
   gate, verify.

It prints each step's seconds, the total from the bare host to green gates, the share of
backup + restore (and of the registry's extra fill and verify), and the step that dominates.
The machines are shared and noisy: compare ratios from one run. Results: bench/results/rebuild.json.

    .venv/bin/python bench/rebuild.py [--docker-host unix:///path/docker.sock]
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
from tests.rebuild_site import SITE, open_rebuild_site  # noqa: E402

HOST = "serve-a"
PAUSE_FILE: Path | None = None
AFTER_BARE = ("replace", "configure", "deploy", "restore", "fill", "gate", "verify")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docker-host", help="use this engine instead of starting one")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench/results/rebuild.json")
    parser.add_argument(
        "--pause-on-failure",
        type=Path,
        help="on a failure keep the site until this file exists (to look at it)",
    )
    args = parser.parse_args()
    global PAUSE_FILE
    PAUSE_FILE = args.pause_on_failure
    with tempfile.TemporaryDirectory(prefix="gpufleet-bench-") as scratch:
        work = Path(scratch)
        with engine_for_script(args.docker_host, work) as engine:
            results = _measure(engine, work)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


def _measure(engine: DockerEngine, work: Path) -> dict[str, Any]:
    host_image = import_host_image(engine, print)
    key = _ssh_key(work / "ssh")
    with open_rebuild_site(engine, host_image, key, work) as site:
        if site.runs["up"].returncode != 0:
            _fail(f"the site's up failed:\n{site.runs['up'].stderr[-4000:]}", site.project)
        rebuild = ("rebuild", "--stack", SITE, "--host", HOST, "--json")
        print(f"site up in {site.seconds}; project {site.project}", flush=True)
        first = site.gpufleet(*rebuild)
        before = _steps(first.stdout)
        if before.get("backup") is None:
            _fail(f"the backup failed:\n{first.stdout[-3000:]}{first.stderr[-3000:]}", site.project)
        started = time.monotonic()
        site.recreate(HOST)
        reinstall = time.monotonic() - started
        fingerprint = site.console_fingerprint(HOST)
        started = time.monotonic()
        second = site.gpufleet(*rebuild, "--host-key-fingerprint", fingerprint)
        wall = time.monotonic() - started
        if second.returncode != 0:
            _fail(
                f"the rebuild failed:\n{second.stdout[-4000:]}{second.stderr[-4000:]}", site.project
            )
        after = _steps(second.stdout)
        backup_bytes = sum(
            entry["bytes"]
            for entry in json.loads(second.stdout)["steps"][1]["details"]["files"].values()
        )
    steps = {
        "check": before["check"],
        "backup": before["backup"],
        **{s: after[s] for s in AFTER_BARE},
    }
    bare_to_green = sum(after[step] for step in AFTER_BARE)
    total = bare_to_green + before["check"] + before["backup"]
    backup_restore = before["backup"] + after["restore"]
    registry_extra = after["fill"] + after["verify"]
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({platform.machine()})",
        "steps_seconds": steps,
        "bare_to_green_seconds": round(bare_to_green, 1),
        "bare_to_green_wall_seconds": round(wall, 1),
        "reinstall_seconds": round(reinstall, 1),
        "backup_bytes": backup_bytes,
        "share_backup_and_restore": round(backup_restore / total, 3),
        "share_registry_fill_and_verify": round(registry_extra / total, 3),
        "dominant_step": max(steps, key=lambda step: steps[step]),
    }


def _fail(message: str, project: Path) -> None:
    print(message, flush=True)
    if PAUSE_FILE is not None:
        print(f"site kept: project {project}; create {PAUSE_FILE} to end", flush=True)
        while not PAUSE_FILE.exists():
            time.sleep(2)
    raise SystemExit(1)


def _steps(stdout: str) -> dict[str, float]:
    report = json.loads(stdout)
    return {step["step"]: round(step["seconds"], 1) for step in report["steps"]}


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
