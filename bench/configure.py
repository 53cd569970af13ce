"""What converging a host with `gpufleet configure` costs, and what its Ansible settings save.

One Debian 12 host (a systemd container from tests/docker_hosts.py, reached over SSH) is
configured three times through `gpufleet.configure.runner.configure_hosts`:

1. the first converge: apt installs from Debian's archive (network-bound);
2. a second run with gpufleet's settings (facts gathered once per run with a memory cache,
   SSH pipelining): the idempotent re-run that CI and `--check` pay for;
3. a second run with Ansible's defaults for those two (facts gathered in each of site.yml's
   five plays, no pipelining).

It reports each run's wall time and the ratios 2/1 and 3/2, from this one run (the machines
are shared and noisy: compare ratios, not seconds across runs).

    .venv/bin/python bench/configure.py [--docker-host unix:///path/docker.sock]

Without --docker-host it starts a dockerd of its own (as root; none may be running). Results:
bench/results/configure.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from gpufleet.configure import runner  # noqa: E402
from gpufleet.spec.stack import StackSpec  # noqa: E402
from tests.docker_hosts import (  # noqa: E402
    DockerEngine,
    HostPool,
    SshKeyPair,
    engine_for_script,
    import_host_image,
)

ANSIBLE_DEFAULTS = {"ANSIBLE_GATHERING": "implicit", "ANSIBLE_PIPELINING": "False"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docker-host", help="use this engine instead of starting one")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench/results/configure.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpufleet-bench-") as scratch:
        work = Path(scratch)
        with engine_for_script(args.docker_host, work) as engine:
            results = _measure(engine, work)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["ratios"], indent=2))
    print(f"wrote {args.out}")


def _measure(engine: DockerEngine, work: Path) -> dict[str, Any]:
    image = import_host_image(engine, print)
    key = _key_pair(work)
    with HostPool(engine, image, key, work, "bench") as pool:
        (host,) = pool.start(1)
        spec = StackSpec.model_validate(
            {
                "environment": "static",
                "state_dir": str(work / "state"),
                "hosts": [
                    {
                        "name": "gpu-a",
                        "address": host.address,
                        "ssh_port": host.ssh_port,
                        "gpus": {"model": "t4"},
                    }
                ],
                "host_config": {
                    "package_sources": "distribution",
                    "require_gpu": False,
                    "ssh_private_key_file": str(key.private_key),
                    "ssh_known_hosts_file": str(host.known_hosts),
                },
            }
        )
        first = _timed_run(spec, work)
        second = _timed_run(spec, work)
        with _ansible_settings(ANSIBLE_DEFAULTS):
            defaults = _timed_run(spec, work)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "runs": {"first": first, "second": second, "second_with_ansible_defaults": defaults},
        "ratios": {
            "second_over_first": round(second["seconds"] / first["seconds"], 3),
            "ansible_defaults_over_gpufleet_settings": round(
                defaults["seconds"] / second["seconds"], 3
            ),
        },
    }


def _timed_run(spec: StackSpec, work: Path) -> dict[str, Any]:
    started = time.monotonic()
    result = runner.configure_hosts("bench", spec, project_root=work, say=lambda line: None)
    seconds = time.monotonic() - started
    (host,) = result.hosts
    if host.status in ("failed", "unreachable"):
        raise SystemExit(f"the bench host {host.status}: {host.problems}")
    print(f"  {seconds:6.1f} s  {host.counters()}")
    return {"seconds": round(seconds, 2), "ok": host.ok, "changed": host.changed}


@contextmanager
def _ansible_settings(overrides: dict[str, str]) -> Iterator[None]:
    """Swap the runner's Ansible environment for one with `overrides` (the bench's only lever)."""
    original: Callable[[Path], dict[str, str]] = runner._ansible_environment
    runner._ansible_environment = lambda data_dir: {**original(data_dir), **overrides}
    try:
        yield
    finally:
        runner._ansible_environment = original


def _key_pair(work: Path) -> SshKeyPair:
    key = work / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return SshKeyPair(private_key=key, public_key=key.with_name("id_ed25519.pub"))


if __name__ == "__main__":
    main()
