"""The host gate's GPU checks on a host over SSH, and the gate on a host it cannot reach.

Real: `gpufleet validate --only host` as a separate process; the gate (validation/gpu_host.py)
with testinfra over SSH (strict host key checking) into a Debian 12 container with systemd
(tests/docker_hosts.py); the shell commands the gate runs there (the sysfs walk, reading
/proc/driver/nvidia/version, `nvidia-smi`, `docker run`).
Stand-ins (there is no GPU here): the host's PCI tree is a tmpfs mounted over
/sys/bus/pci/devices holding a T4 (vendor 0x10de, class 0x030200) and an Intel bridge;
/proc/driver is a tmpfs holding `nvidia/version` in the proprietary driver's format;
`nvidia-smi` is a script in /usr/local/bin printing the CSV rows and `-L` lines in NVIDIA's
formats (copies of real output, as in tests/test_host_spec.py); `docker` is a script in
/usr/local/bin that answers the gate's `docker run --runtime nvidia ... nvidia-smi -L` with the
lines a container would print. The non-GPU checks (Docker, chrony) fail on this unconfigured
host and are not what these tests look at: tests/test_configure.py covers them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.docker_hosts import ContainerHost, ContainerHostFactory, SshKeyPair
from validation.loopback import pick_free_ports

GPU_CHECKS = (
    "gpu present",
    "driver loaded",
    "driver branch",
    "nvidia-smi GPUs",
    "persistence mode",
    "container sees GPUs",
)
T4_SMI_ROW = "0, Tesla T4, {persistence}\n"
T4_LIST_LINE = "GPU 0: Tesla T4 (UUID: GPU-6a2e1c3c-7b43-5d2a-9f0e-1d5a8c3b2f10)\n"
DRIVER_VERSION = (
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  {version}  Sun May 12 19:39:15 UTC 2024\n"
    "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
)
STAND_IN_DIR = "/etc/gpufleet-test"
NVIDIA_SMI = f"""#!/bin/sh
# Stand-in for nvidia-smi: the outputs the gate asks for, from files the test writes.
case "$*" in
  *--query-gpu=*) cat {STAND_IN_DIR}/smi.csv ;;
  *-L*) cat {STAND_IN_DIR}/list.txt ;;
  *) echo "stand-in nvidia-smi: unexpected arguments: $*" >&2; exit 2 ;;
esac
"""
DOCKER = f"""#!/bin/sh
# Stand-in for the docker CLI's `docker run --runtime nvidia IMAGE nvidia-smi -L`: what a
# container would list; everything else goes to the real docker, where there is one.
case "$*" in
  "run "*"--runtime nvidia"*"nvidia-smi -L") cat {STAND_IN_DIR}/container-list.txt; exit 0 ;;
esac
[ -x /usr/bin/docker ] && exec /usr/bin/docker "$@"
echo "docker: not installed on this test host" >&2
exit 127
"""
PCI_DEVICES = {"0000:17:00.0": ("0x10de", "0x030200"), "0000:00:1f.0": ("0x8086", "0x060100")}


@dataclass
class GpuHost:
    """The test host with its stand-ins, and a project whose stack names it."""

    host: ContainerHost
    project: Path
    key: Path

    def set_gpu(self, *, driver: str, persistence: str, container_lines: str) -> None:
        """What the stand-ins report: the loaded driver, persistence mode, a container's view."""
        files = {
            "/proc/driver/nvidia/version": DRIVER_VERSION.format(version=driver),
            f"{STAND_IN_DIR}/smi.csv": T4_SMI_ROW.format(persistence=persistence),
            f"{STAND_IN_DIR}/list.txt": T4_LIST_LINE,
            f"{STAND_IN_DIR}/container-list.txt": container_lines,
        }
        for path, text in files.items():
            self.host.exec(f"cat > {path}", input=text)

    def stack_file(self, name: str, hosts: list[dict[str, Any]], known_hosts: Path) -> None:
        config = {
            "gpufleet:environment": "static",
            "gpufleet:state_dir": f"build/{name}",
            "gpufleet:hosts": hosts,
            "gpufleet:host_config": {
                "ssh_private_key_file": str(self.key),
                "ssh_known_hosts_file": str(known_hosts),
            },
        }
        (self.project / "stacks").mkdir(exist_ok=True)
        (self.project / "stacks" / f"Pulumi.{name}.yaml").write_text(
            yaml.safe_dump({"config": config})
        )

    def validate(self, stack: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
        """`gpufleet validate --only host --json`; the result and its checks by name."""
        command = [sys.executable, "-m", "gpufleet", "validate", "--stack", stack]
        result = subprocess.run(
            [*command, "--only", "host", "--json"],
            cwd=self.project,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env=os.environ,
        )
        assert result.stdout.strip(), result.stderr[-3000:]
        [gate] = json.loads(result.stdout)["gates"]
        return result, {check["name"]: check for check in gate["checks"]}


@pytest.fixture(scope="module")
def gpu_host(
    module_container_hosts: ContainerHostFactory,
    ssh_client_key: SshKeyPair,
    tmp_path_factory: pytest.TempPathFactory,
) -> GpuHost:
    (host,) = module_container_hosts(1)
    # A PCI tree and a driver of our own: tmpfs over the kernel's (the container has SYS_ADMIN).
    setup = [
        "mount -t tmpfs -o size=1m gpufleet-test-pci /sys/bus/pci/devices",
        "mount -t tmpfs -o size=1m gpufleet-test-driver /proc/driver",
        f"mkdir -p /proc/driver/nvidia {STAND_IN_DIR}",
    ]
    for address, (vendor, device_class) in PCI_DEVICES.items():
        device = f"/sys/bus/pci/devices/{address}"
        setup.append(f"mkdir {device} && echo {vendor} > {device}/vendor")
        setup.append(f"echo {device_class} > {device}/class")
    host.exec(" && ".join(setup))
    for name, script in (("nvidia-smi", NVIDIA_SMI), ("docker", DOCKER)):
        host.exec(f"cat > /usr/local/bin/{name} && chmod 755 /usr/local/bin/{name}", input=script)
    project = tmp_path_factory.mktemp("gpu-host-gate")
    gpu_host = GpuHost(host, project, ssh_client_key.private_key)
    entry = {"name": "gpu-a", "address": host.address, "ssh_port": host.ssh_port}
    gpu_host.stack_file("gpu", [{**entry, "gpus": {"model": "t4", "count": 1}}], host.known_hosts)
    return gpu_host


def test_a_host_as_the_spec_expects_passes_every_gpu_check(gpu_host: GpuHost) -> None:
    gpu_host.set_gpu(driver="535.183.01", persistence="Enabled", container_lines=T4_LIST_LINE)
    result, checks = gpu_host.validate("gpu")
    gpu = {name: checks[f"gpu-a: {name}"] for name in GPU_CHECKS}
    assert {name: check["status"] for name, check in gpu.items()} == dict.fromkeys(
        GPU_CHECKS, "pass"
    ), gpu
    assert gpu["gpu present"]["message"] == "1 NVIDIA PCI device(s)", "the bridge is no GPU"
    assert gpu["driver branch"]["message"] == "driver 535.183.01 is of branch 535"
    assert gpu["nvidia-smi GPUs"]["message"] == "1x Tesla T4"
    assert gpu["container sees GPUs"]["message"] == "a container sees 1 GPU(s)"
    # This bare host has no Docker or chrony: the gate fails on those, not on the GPU.
    assert result.returncode == 1
    assert checks["gpu-a: docker engine"]["status"] == "fail"


def test_a_wrong_driver_branch_persistence_off_and_a_blind_container_each_fail(
    gpu_host: GpuHost,
) -> None:
    gpu_host.set_gpu(driver="470.256.02", persistence="Disabled", container_lines="")
    result, checks = gpu_host.validate("gpu")
    assert result.returncode == 1
    gpu = {name: checks[f"gpu-a: {name}"] for name in GPU_CHECKS}
    assert gpu["driver loaded"]["status"] == "pass"
    assert gpu["driver branch"] == {
        **gpu["driver branch"],
        "status": "fail",
        "message": "driver 470.256.02 is not of branch 535",
    }
    assert gpu["persistence mode"]["status"] == "fail"
    assert gpu["persistence mode"]["message"] == "persistence mode is off on GPU 0"
    assert gpu["container sees GPUs"]["status"] == "fail"
    assert gpu["container sees GPUs"]["message"] == "a container sees 0 GPU(s), the host 1"
    junit = (
        gpu_host.project / "build" / "gpu" / "reports" / "gpu-a" / "host.junit.xml"
    ).read_text()
    assert "driver 470.256.02 is not of branch 535" in junit


def test_a_host_the_gate_cannot_reach_is_an_error_and_exit_2(gpu_host: GpuHost) -> None:
    (closed_port,) = pick_free_ports(1)
    gone = {"name": "gone", "address": "127.0.0.1", "ssh_port": closed_port}
    gpu_host.stack_file("gone", [gone], gpu_host.host.known_hosts)
    result, checks = gpu_host.validate("gone")
    assert result.returncode == 2, result.stderr[-3000:]
    assert list(checks) == ["gone: connection"], "nothing else is checked on such a host"
    check = checks["gone: connection"]
    assert check["status"] == "error"
    assert check["message"].startswith(f"could not reach ssh://root@127.0.0.1:{closed_port}: ")
    assert "Connection refused" in check["message"]
    assert "check the address, the SSH key and known_hosts" in check["message"]

    # The right port, but a known_hosts without this host's key: refused, never trusted.
    stranger = gpu_host.project / "known_hosts.empty"
    stranger.write_text("")
    entry = {"name": "gpu-a", "address": gpu_host.host.address, "ssh_port": gpu_host.host.ssh_port}
    gpu_host.stack_file("unknown-key", [entry], stranger)
    result, checks = gpu_host.validate("unknown-key")
    assert result.returncode == 2, result.stderr[-3000:]
    assert checks["gpu-a: connection"]["status"] == "error"
    assert "Host key verification failed" in checks["gpu-a: connection"]["message"]
