"""Benchmark the Azure program under Pulumi's mocks: a 1-host and a 50-host stack.

What a large fleet's `pulumi preview` costs on gpufleet's side: loading and validating the
StackSpec (the catalog lookups included), rendering each host's cloud-init, and registering
every resource through the Pulumi SDK and pulumi-azure-native until all registrations have
settled. The engine and Azure are mocked (`pulumi.runtime.set_mocks`, preview mode), so the
figures leave out the engine's diff and Azure's API calls: they are the program's own share.

The script writes two stack files into a temporary project (`stacks/Pulumi.bench-<n>.yaml`,
hosts cycling through a T4, a full A10, a fractional A10, an NC H100 and an ND H100, one in
five a spot VM, one in ten with a public IP), runs the program on each `--repeat` times (fresh
event loop and mocks per run), and prints the median seconds, resources registered, ms per
host and the 50-host / 1-host ratio (steadier than absolute times on a shared machine).
Results go to `bench/results/azure_preview.json`.

    .venv/bin/python bench/azure_preview.py [--hosts 1 50] [--repeat 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pulumi
import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))  # also runs without `pip install -e .`

from infra.program import build_stack  # noqa: E402

DEFAULT_RESULTS = PROJECT_ROOT / "bench" / "results" / "azure_preview.json"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDx9Q3nZ1M0o1x9yWc7yQ9f0h0cWc0s3V0tN5m2lq4bF bench"
HOST_KINDS: list[dict[str, Any]] = [
    {"gpu": {"model": "t4", "count": 1}},
    {"gpu": {"model": "a10", "count": 1}},
    {"gpu": {"model": "a10", "count": 1, "allow_fraction": True, "min_gpu_memory_gib": 8}},
    {"size": "Standard_NC40ads_H100_v5", "image": "ubuntu-22.04"},
    {"gpu": {"model": "h100", "count": 8}, "data_disk_gb": 2048},
]


class CountingMocks(pulumi.runtime.Mocks):
    """Answers like tests/azure_mocks.py, keeping only a count."""

    def __init__(self) -> None:
        self.count = 0

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.count += 1
        outputs = dict(args.inputs)
        if args.typ == "azure-native:network:NetworkInterface":
            outputs["ipConfigurations"] = [
                {**config, "privateIPAddress": f"10.60.0.{self.count % 250 + 4}"}
                for config in outputs.get("ipConfigurations", [])
            ]
        return f"/bench/{args.typ}/{args.name}", outputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], list[Any]]:
        return {}, []


def stack_config(hosts: int) -> dict[str, Any]:
    """A valid azure stack with `hosts` GPU hosts of mixed kinds."""
    entries = []
    for index in range(hosts):
        vm = json.loads(json.dumps(HOST_KINDS[index % len(HOST_KINDS)]))
        vm["zone"] = str(index % 3 + 1)
        if index % 5 == 4:
            vm["spot"] = {"eviction_policy": "Deallocate"}
        if index % 10 == 9:
            vm["public_ip"] = True
        entries.append({"name": f"gpu-{index:03d}", "azure": vm})
    return {
        "config": {
            "gpufleet:environment": "azure",
            "gpufleet:models": ["resnet50"],
            "gpufleet:azure": {
                "location": "westeurope",
                "resource_group": f"gpufleet-bench-{hosts}",
                "owner": "bench",
                "address_space": ["10.60.0.0/16"],
                "subnets": [{"name": "gpu", "prefix": "10.60.0.0/20"}],
                "ssh_source_cidrs": ["198.51.100.0/24"],
                "ssh_public_key": KEY,
            },
            "gpufleet:host_config": {"secure_boot": "signed"},
            "gpufleet:hosts": entries,
        }
    }


def run_once(stack: str, project_root: Path) -> tuple[float, int]:
    """Seconds from the program's start until every registration settled; resources made."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    mocks = CountingMocks()
    pulumi.runtime.set_mocks(mocks, project="gpufleet", stack=stack, preview=True)
    # Without an engine, Pulumi prints the program's warnings (Secure Boot off on the A10
    # hosts) to stderr; they are part of the cost, not of the report.
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            started = time.perf_counter()
            build_stack(stack, project_root=project_root)
            while pending := [task for task in asyncio.all_tasks(loop) if not task.done()]:
                loop.run_until_complete(asyncio.wait(pending, timeout=120))
            seconds = time.perf_counter() - started
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    return seconds, mocks.count


def measure(host_counts: list[int], repeat: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpufleet-bench-azure-") as temp:
        root = Path(temp)
        (root / "stacks").mkdir()
        for hosts in host_counts:
            stack = f"bench-{hosts}"
            path = root / "stacks" / f"Pulumi.{stack}.yaml"
            path.write_text(yaml.safe_dump(stack_config(hosts), sort_keys=False))
            runs = [run_once(stack, root) for _ in range(repeat)]
            seconds = [s for s, _ in runs]
            median = statistics.median(seconds)
            results[str(hosts)] = {
                "hosts": hosts,
                "resources": runs[0][1],
                "seconds_median": round(median, 4),
                "seconds_min": round(min(seconds), 4),
                "seconds_max": round(max(seconds), 4),
                "ms_per_host": round(1000 * median / hosts, 2),
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[1, 50], help="stack sizes")
    parser.add_argument("--repeat", type=int, default=5, help="runs per stack (median counts)")
    parser.add_argument("--json", type=Path, default=DEFAULT_RESULTS, help="results file")
    args = parser.parse_args()
    if min(args.hosts) < 1 or args.repeat < 1:
        parser.error("--hosts and --repeat must be at least 1")
    stacks = measure(sorted(set(args.hosts)), args.repeat)
    smallest, largest = stacks[str(min(args.hosts))], stacks[str(max(args.hosts))]
    ratio = largest["seconds_median"] / smallest["seconds_median"]
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "pulumi": _version("pulumi"),
        "pulumi_azure_native": _version("pulumi_azure_native"),
        "repeat": args.repeat,
        "stacks": stacks,
        "ratio": {
            "of": f"{largest['hosts']} hosts vs {smallest['hosts']}",
            "seconds": round(ratio, 2),
            "hosts": largest["hosts"] / smallest["hosts"],
        },
    }
    print(
        f"{'hosts':>6} {'resources':>10} {'median s':>9} {'min s':>7} {'max s':>7} {'ms/host':>8}"
    )
    for row in stacks.values():
        print(
            f"{row['hosts']:>6} {row['resources']:>10} {row['seconds_median']:>9.3f} "
            f"{row['seconds_min']:>7.3f} {row['seconds_max']:>7.3f} {row['ms_per_host']:>8.1f}"
        )
    print(
        f"{result['ratio']['of']}: {ratio:.1f}x the time for "
        f"{result['ratio']['hosts']:.0f}x the hosts"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package.replace("_", "-"))


if __name__ == "__main__":
    main()
