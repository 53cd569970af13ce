"""What `gpufleet drift` costs: the local stack clean (target: under 3 s), and with --site the
two-host static stack of tests/environment_site.py, layer by layer.

1. local: a scratch local stack (real MLflow, real Triton) brought up once, then `run_drift`
   timed in this process (five runs; the median, and every run), and the CLI once (the same
   plus the interpreter's start and imports: torch, mlflow);
2. --site: the two Debian hosts brought to green with `gpufleet up`, then `gpufleet drift
   --layer L` once per layer and once with all layers; for each, the wall time and the slowest
   host's check time. The layers run in parallel across hosts, so "all" is about the slowest
   layer, not their sum.

The machine is shared and noisy: compare ratios from one run, not seconds across runs.
Results: bench/results/drift.json.

    .venv/bin/python bench/drift.py [--site] [--docker-host unix:///path/docker.sock]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from gpufleet.drift.items import LAYERS  # noqa: E402
from gpufleet.drift.run import run_drift  # noqa: E402
from tests.test_local_stack import STACK, make_project  # noqa: E402

TARGET_LOCAL_S = 3.0
SITE_LAYERS = ("files", "triton", "hosts", "containers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", action="store_true", help="also the two-host static stack")
    parser.add_argument("--docker-host", help="the Docker engine for --site (else one is started)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench/results/drift.json")
    args = parser.parse_args()
    results: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)",
    }
    with tempfile.TemporaryDirectory(prefix="gpufleet-bench-drift-") as scratch:
        results["local"] = _local(Path(scratch) / "local")
        if args.site:
            results["site"] = _site(Path(scratch), args.docker_host)
    if not args.site and args.out.exists():  # keep the last site figures
        previous = json.loads(args.out.read_text())
        if "site" in previous:
            results["site"] = previous["site"]
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


def _local(root: Path) -> dict[str, Any]:
    root.mkdir()
    project = make_project(root)
    up = project.gpufleet("up", "--only", "host")
    if up.returncode != 0:
        raise SystemExit(f"up exited {up.returncode}:\n{up.stdout[-3000:]}{up.stderr[-3000:]}")
    try:
        runs = []
        cwd = Path.cwd()
        os.chdir(root)
        try:
            for _ in range(5):
                started = time.monotonic()
                report = run_drift(
                    STACK,
                    project_root=root,
                    specs_dir=root / "modelconfigs",
                    stacks_dir=root / "stacks",
                )
                runs.append(time.monotonic() - started)
                if report.exit_code != 0:
                    raise SystemExit(f"the clean local stack drifted: {report.to_json()}")
        finally:
            os.chdir(cwd)
        started = time.monotonic()
        cli = project.gpufleet("drift")
        cli_seconds = time.monotonic() - started
        if cli.returncode != 0:
            raise SystemExit(f"gpufleet drift exited {cli.returncode}:\n{cli.stdout}{cli.stderr}")
        per_layer = {check.layer: round(check.seconds, 3) for check in report.checks}
    finally:
        project.gpufleet("down")
    median = statistics.median(runs)
    return {
        "in_process_median_s": round(median, 3),
        "in_process_runs_s": [round(run, 3) for run in runs],
        "per_layer_last_run_s": per_layer,
        "cli_wall_s": round(cli_seconds, 2),
        "imports_and_start_over_check": round((cli_seconds - median) / median, 2),
        "target_s": TARGET_LOCAL_S,
        "meets_target": median < TARGET_LOCAL_S,
    }


def _site(work: Path, docker_host: str | None) -> dict[str, Any]:
    from tests.docker_hosts import SshKeyPair, engine_for_script, import_host_image
    from tests.environment_site import HOSTS, SITE, open_site
    from tests.serving_images import TRITON_TORCH, ensure_image

    results: dict[str, Any] = {"host_count": len(HOSTS)}
    with engine_for_script(docker_host, work) as engine:
        host_image = import_host_image(engine, print)
        triton_image = ensure_image(engine, TRITON_TORCH, host_image, print)
        keys = work / "ssh"
        keys.mkdir(mode=0o700)
        key = keys / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        project = work / "project"
        project.mkdir()
        pair = SshKeyPair(private_key=key, public_key=key.with_name("id_ed25519.pub"))
        with open_site(engine, host_image, pair, project, triton_image) as site:
            up = site.gpufleet("up", "--stack", SITE, "--json")
            if up.returncode != 0:
                raise SystemExit(f"site up exited {up.returncode}:\n{up.stderr[-4000:]}")
            for layers in [*([layer] for layer in SITE_LAYERS), list(SITE_LAYERS)]:
                args = [arg for layer in layers for arg in ("--layer", layer)]
                started = time.monotonic()
                result = site.gpufleet("drift", "--stack", SITE, "--json", *args)
                wall = time.monotonic() - started
                report = json.loads(result.stdout)
                name = layers[0] if len(layers) == 1 else "all"
                results[name] = {
                    "exit_code": result.returncode,
                    "wall_s": round(wall, 2),
                    "check_s": round(report["seconds"], 2),
                    "slowest_host_s": {
                        layer: round(
                            max(c["seconds"] for c in report["checks"] if c["layer"] == layer), 2
                        )
                        for layer in layers
                        if any(c["layer"] == layer for c in report["checks"])
                    },
                }
    singles = [results[layer]["check_s"] for layer in SITE_LAYERS if layer in results]
    if singles and "all" in results:
        results["all_over_sum_of_layers"] = round(results["all"]["check_s"] / sum(singles), 2)
    results["layers"] = [layer for layer in LAYERS if layer in SITE_LAYERS]
    return results


if __name__ == "__main__":
    main()
