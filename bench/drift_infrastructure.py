"""Benchmark the infrastructure layer of `gpufleet drift` on a 50-VM Proxmox cluster (fakepve).

A fake PVE 9 API (fakepve, HTTPS on 127.0.0.1, TLS verified) gets five nodes, a shared
storage and a template; the Proxmox dynamic provider's own `create` makes one VM per host of a
generated proxmox stack (eight creates at a time). Then the layer checks the stack: one GET
lists the cluster's VMs, two per VM read its running config and pending changes. Each run is
timed with the calls made in parallel (`--workers`, the layer's default 8) and serially (1
worker), `--repeat` times each, alternating, so that both see the same machine; the ratio is
taken from the medians of the same run.

fakepve answers in microseconds, a real PVE in tens of milliseconds (pveproxy, pvedaemon, the
cluster file system), so the runs are made twice: with no added latency, and with fakepve's
per-response latency (`--latency`, default 0.05 s) standing in for a real cluster's. The
target is under 10 s for 50 VMs with the latency. Results go to
`bench/results/drift_infrastructure.json`.

    .venv/bin/python bench/drift_infrastructure.py [--vms 50] [--repeat 3] [--latency 0.05]

`measure(vms=50, latencies=(0.0, 0.05), repeat=3, workers=8)` returns the same dict without
writing it (for bench/drift.py).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))  # also runs without `pip install -e .`

from fakepve.certs import make_cert  # noqa: E402
from fakepve.server import FakePve  # noqa: E402

from gpufleet.drift.infrastructure import check_stack_infrastructure  # noqa: E402
from gpufleet.drift.proxmox_vms import DEFAULT_WORKERS  # noqa: E402
from gpufleet.spec.loading import LoadedStackSpec, load_stack_spec  # noqa: E402
from infra.proxmox import vm_config  # noqa: E402
from infra.proxmox.provider import GpuVmProvider  # noqa: E402
from infra.proxmox.session import Timing  # noqa: E402

DEFAULT_RESULTS = PROJECT_ROOT / "bench" / "results" / "drift_infrastructure.json"
STACK = "bench-drift"
TOKEN_ID = "gpufleet@pve!bench"  # noqa: S105  # a token id, not its secret
TOKEN_SECRET = "bench-token-not-a-secret"  # noqa: S105  # the fake's token, on loopback only
NODES = ("pve1", "pve2", "pve3", "pve4", "pve5")
TEMPLATE = 9000
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDx9Q3nZ1M0o1x9yWc7yQ9f0h0cWc0s3V0tN5m2lq4bF bench"
FAST = Timing(task_timeout_s=60, poll_s=0.02, agent_timeout_s=5, lock_retry_delay_s=0.05)
CREATE_TIME_SCALE = 0.001  # PVE's task seconds while the VMs are made


class _Served:
    """A FakePve on its own event loop in a daemon thread (as fakepve's pytest plugin runs it)."""

    def __init__(self, workdir: Path) -> None:
        certfile, keyfile = make_cert(str(workdir), hosts=("127.0.0.1",))[:2]
        self.cafile = str(certfile)
        self.pve = FakePve(host="127.0.0.1", port=0)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._call(self.pve.start(certfile, keyfile))

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    def stop(self) -> None:
        try:
            self._call(self.pve.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@contextmanager
def _cluster(workdir: Path) -> Iterator[_Served]:
    served = _Served(workdir)
    try:
        pve = served.pve
        pve.time_scale = CREATE_TIME_SCALE
        for node in NODES[1:]:
            pve.add_node(node)
        pve.add_ceph_storage("vmdata")
        pve.storages["vmdata"]["avail"] = 1 << 50
        pve.apitokens[TOKEN_ID] = TOKEN_SECRET
        pve.add_vm(
            TEMPLATE,
            "debian-13-cloud",
            node="pve1",
            template=True,
            config={
                "scsi0": "vmdata:base-9000-disk-0,size=32G",
                "ide2": "vmdata:vm-9000-cloudinit,media=cdrom",
                "net0": "virtio=BC:24:11:00:90:00,bridge=vmbr0",
                "boot": "order=scsi0",
                "agent": "1",
                "template": 1,
            },
        )
        start = pve._do_start

        async def start_with_agent(vm: Any, user: str, params: dict[str, Any]) -> Any:
            # A booted cloud image's guest agent: the address its cloud-init config gives.
            ip = vm.pending.get("ipconfig0", vm.config.get("ipconfig0", "ip=dhcp"))
            address = ip.split(",")[0].removeprefix("ip=").split("/")[0]
            vm.agent = {
                "interfaces": [
                    {
                        "name": "eth0",
                        "ip-addresses": [{"ip-address": address, "ip-address-type": "ipv4"}],
                    }
                ]
            }
            return await start(vm, user, params)

        pve._do_start = start_with_agent
        yield served
    finally:
        served.stop()


def _write_stack(root: Path, url: str, cafile: str, vms: int) -> LoadedStackSpec:
    hosts = [
        {
            "name": f"gpu-{index:03d}",
            "gpus": {"model": "a10", "count": 1},
            "proxmox": {
                "node": NODES[index % len(NODES)],
                "cores": 16,
                "memory_mb": 65536,
                "disk_gb": 32,
                "network": {
                    "bridge": "vmbr0",
                    "vlan": 20,
                    "ipv4": f"10.20.{index // 200}.{index % 200 + 20}/16",
                    "gateway": "10.20.0.1",
                },
                "ssh_keys": [KEY],
                "pci": [{"mapping": f"a10-{NODES[index % len(NODES)]}-{index // len(NODES)}"}],
            },
        }
        for index in range(vms)
    ]
    config = {
        "gpufleet:environment": "proxmox",
        "gpufleet:proxmox": {
            "endpoint": url,
            "ca_bundle": cafile,
            "token_id": TOKEN_ID,
            "template_vmid": TEMPLATE,
            "storage": "vmdata",
        },
        "gpufleet:hosts": hosts,
    }
    (root / "stacks").mkdir()
    (root / "stacks" / f"Pulumi.{STACK}.yaml").write_text(yaml.safe_dump({"config": config}))
    return load_stack_spec(root / "stacks", STACK)


def _create_vms(loaded: LoadedStackSpec, cafile: str) -> float:
    """Each host's VM through the provider's create, eight at a time; the seconds it took."""
    assert loaded.spec.proxmox is not None
    cluster, pem = loaded.spec.proxmox, Path(cafile).read_text(encoding="utf-8")
    provider = GpuVmProvider(FAST)
    started = time.perf_counter()

    def create(host: Any) -> None:
        inputs = vm_config.vm_inputs(STACK, host, cluster, ca_certificate=pem)
        provider.create({**inputs, "secret": TOKEN_SECRET})

    # Creates racing for `cluster/nextid` spread out after a clash (provider.py).
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(create, loaded.spec.hosts))
    return time.perf_counter() - started


def _timed_check(loaded: LoadedStackSpec, root: Path, workers: int) -> float:
    started = time.perf_counter()
    checks = check_stack_infrastructure(
        loaded,
        project_root=root,
        environ={"GPUFLEET_PROXMOX_SECRET": TOKEN_SECRET},
        timing=FAST,
        workers=workers,
    )
    seconds = time.perf_counter() - started
    errors = [check.error for check in checks if check.error]
    items = [item for check in checks for item in check.items]
    if errors or items:  # a clean cluster: anything else is a broken bench, not a figure
        raise SystemExit(f"the check was not clean: {errors[:3]} {items[:3]}")
    if len(checks) != len(loaded.spec.hosts) + 1:
        raise SystemExit(f"expected {len(loaded.spec.hosts) + 1} checks, got {len(checks)}")
    return seconds


def _summary(runs: list[float]) -> dict[str, float]:
    return {
        "seconds_median": round(statistics.median(runs), 4),
        "seconds_min": round(min(runs), 4),
        "seconds_max": round(max(runs), 4),
    }


def measure(
    vms: int = 50,
    latencies: tuple[float, ...] = (0.0, 0.05),
    repeat: int = 3,
    workers: int = DEFAULT_WORKERS,
) -> dict[str, Any]:
    """Make the cluster, then time the layer (parallel and serial) at each latency."""
    with tempfile.TemporaryDirectory(prefix="gpufleet-bench-drift-") as tmp:
        root = Path(tmp)
        (root / "pki").mkdir()
        with _cluster(root / "pki") as served:
            loaded = _write_stack(root, served.pve.url, served.cafile, vms)
            create_s = _create_vms(loaded, served.cafile)
            served.pve.time_scale = 1.0  # latency in real seconds from here on
            scenarios: dict[str, Any] = {}
            for latency in latencies:
                served.pve.slow_network(latency)
                _timed_check(loaded, root, workers)  # warm-up: imports, TLS, connections
                parallel, serial = [], []
                for _ in range(repeat):
                    parallel.append(_timed_check(loaded, root, workers))
                    serial.append(_timed_check(loaded, root, 1))
                par, ser = _summary(parallel), _summary(serial)
                scenarios[f"latency_{latency:g}s"] = {
                    "latency_s": latency,
                    "api_calls": 1 + 2 * vms,
                    "parallel": {"workers": workers, **par},
                    "serial": {"workers": 1, **ser},
                    "ratio_serial_over_parallel": round(
                        ser["seconds_median"] / par["seconds_median"], 2
                    ),
                    "target_s": 10.0,
                    "within_target": par["seconds_median"] < 10.0,
                }
    return {
        "vms": vms,
        "nodes": len(NODES),
        "repeat": repeat,
        "create_seconds": round(create_s, 2),
        "scenarios": scenarios,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per API answer")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    parser.add_argument("--json", type=Path, default=DEFAULT_RESULTS, help="results file")
    args = parser.parse_args()
    figures = measure(args.vms, (0.0, args.latency), args.repeat, args.workers)
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        **figures,
    }
    for name, scenario in figures["scenarios"].items():
        print(
            f"{name}: {args.vms} VMs, parallel ({scenario['parallel']['workers']} workers) "
            f"{scenario['parallel']['seconds_median']:.2f} s, serial "
            f"{scenario['serial']['seconds_median']:.2f} s, ratio "
            f"{scenario['ratio_serial_over_parallel']}x"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
