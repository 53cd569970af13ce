"""The host gate for configured GPU hosts: is each host what `gpufleet configure` should have made?

Checks run through pytest-testinfra over SSH (strict host key checking), driven by the stack's
spec: a supported OS, time sync, the Docker engine running with log rotation in daemon.json and
the `nvidia` runtime registered; then the GPU checks: the NVIDIA driver loaded and in the expected
branch, `nvidia-smi` seeing the expected GPUs, persistence mode on, a container seeing the GPUs.
On a host with no NVIDIA PCI device (vendor 10de) every GPU check reports ``skip: no GPU
present`` as its own result, or fails when the spec lists GPUs and ``require_gpu`` is on.

    report = run_gpu_host_gate(gpu_host_targets("lab", spec, project_root=Path.cwd()), "lab")
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from generators.ansible_inventory import resolve_path, selected_hosts, ssh_arguments
from gpufleet.spec.hosts import HostSpec
from gpufleet.spec.stack import StackSpec
from validation.host import GATE_NAME, connect, describe_exception
from validation.report import CheckResult, GateReport

NVIDIA_DRIVER_DEFAULTS = (
    Path(__file__).resolve().parents[1]
    / "ansible"
    / "roles"
    / "nvidia_driver"
    / "defaults"
    / "main.yml"
)
NVIDIA_PCI_VENDOR = "0x10de"
GPU_PCI_CLASSES = ("0x0300", "0x0302")  # VGA-compatible and 3D controllers
SUPPORTED_OS = {("ubuntu", "22.04"), ("ubuntu", "24.04"), ("debian", "12")}
# What nvidia-smi calls each family (the A10's name must not match an A100).
GPU_NAME_PATTERNS = {
    "t4": re.compile(r"\bT4\b"),
    "a10": re.compile(r"\bA10\b(?!0)"),
    "h100": re.compile(r"\bH100\b"),
}
_DRIVER_VERSION = re.compile(r"Kernel Module(?: for \S+)?\s+(?P<version>[0-9]+(?:\.[0-9]+)+)")


@dataclasses.dataclass(frozen=True)
class GpuHostTarget:
    """One host to check: how to reach it and what the spec expects of it."""

    name: str
    hostspec: str
    backend_options: dict[str, Any]
    gpu_family: str | None
    gpu_count: int
    driver_branch: str
    require_gpu: bool
    manage_services: bool
    probe_image: str


def gpu_host_targets(
    stack: str, spec: StackSpec, *, project_root: Path, limit: str | None = None
) -> list[GpuHostTarget]:
    """The stack's hosts (or only `limit`) as gate targets, reached as Ansible reaches them.

    Raises InventoryError (from the inventory generator) for a local stack, a stack without
    hosts, an unknown `limit` or a host without an address: the gate could check nothing.
    """
    config = spec.host_config
    ssh_extra_args = ssh_arguments(config, project_root)
    branches = _branches_by_family()
    targets = []
    for host in selected_hosts(stack, spec, limit):
        options: dict[str, Any] = {"ssh_extra_args": ssh_extra_args}
        if config.ssh_private_key_file:
            options["ssh_identity_file"] = str(
                resolve_path(config.ssh_private_key_file, project_root)
            )
        if host.ssh_user != "root":
            options["sudo"] = True
        family = host.gpus.model if host.gpus else None
        targets.append(
            GpuHostTarget(
                name=host.name,
                hostspec=_ssh_hostspec(host),
                backend_options=options,
                gpu_family=family,
                gpu_count=host.gpus.count if host.gpus else 0,
                driver_branch=config.driver_branch or branches[family or "default"],
                require_gpu=config.require_gpu,
                manage_services=config.manage_services,
                probe_image=config.gpu_probe_image,
            )
        )
    return targets


def run_gpu_host_gate(targets: Sequence[GpuHostTarget], stack: str) -> GateReport:
    """Every check on every target; check names start with the host's name."""
    checks: list[CheckResult] = []
    for target in targets:
        checks.extend(_host_checks(target))
    return GateReport(GATE_NAME, checks, stack)


def _host_checks(target: GpuHostTarget) -> list[CheckResult]:
    try:
        host = connect(target.hostspec, **target.backend_options)
        host.check_output("true")
    except Exception as exc:  # ssh refused, host key mismatch, no route: nothing can be checked
        sudo = " and passwordless sudo for the user" if target.backend_options.get("sudo") else ""
        message = (
            f"could not reach {target.hostspec}: {describe_exception(exc)}; check the address, "
            f"the SSH key and known_hosts (`gpufleet configure` uses the same){sudo}"
        )
        return [CheckResult(f"{target.name}: connection", "error", message)]
    checks = [
        _run(target, "os supported", lambda: _check_os(host)),
        _run(target, "time sync", lambda: _check_time_sync(host, target)),
        _run(target, "docker engine", lambda: _check_docker(host, target)),
        _run(target, "docker log rotation", lambda: _check_log_rotation(host)),
        _run(target, "nvidia runtime registered", lambda: _check_nvidia_runtime(host)),
    ]
    return checks + _gpu_checks(host, target)


# -- the machine ------------------------------------------------------------------------------


def _check_os(host: Any) -> tuple[str, str]:
    os_id = host.system_info.distribution
    version = host.system_info.release
    if (os_id, version) in SUPPORTED_OS:
        return "pass", f"{os_id} {version}"
    supported = ", ".join(f"{name} {release}" for name, release in sorted(SUPPORTED_OS))
    return "fail", f"{os_id} {version} is not supported ({supported})"


def _check_time_sync(host: Any, target: GpuHostTarget) -> tuple[str, str]:
    if not host.package("chrony").is_installed:
        return "fail", "chrony is not installed; run `gpufleet configure`"
    if not target.manage_services:
        return "skip", "chrony installed; services are not managed on this host (manage_services)"
    service = host.service("chrony")
    if service.is_running:
        return "pass", "chrony is running"
    condition = host.run("systemctl show --property=ConditionResult --value chrony").stdout.strip()
    if condition == "no" and host.system_info.type == "linux" and _in_container(host):
        return "skip", "chrony is enabled but cannot run in a container (it needs CAP_SYS_TIME)"
    return "fail", "chrony is installed but not running; `systemctl status chrony` says why"


def _check_docker(host: Any, target: GpuHostTarget) -> tuple[str, str]:
    if not host.exists("docker"):
        return "fail", "docker is not installed; run `gpufleet configure`"
    if target.manage_services and not host.service("docker").is_running:
        return "fail", "the docker service is not running; `systemctl status docker` says why"
    info = host.run("docker info --format '{{.ServerVersion}}'")
    if info.rc != 0:
        return "fail", f"`docker info` failed: {info.stderr.strip() or info.stdout.strip()}"
    return "pass", f"Docker {info.stdout.strip()} is running"


def _check_log_rotation(host: Any) -> tuple[str, str]:
    daemon_json = host.file("/etc/docker/daemon.json")
    if not daemon_json.exists:
        return "fail", "/etc/docker/daemon.json is missing; run `gpufleet configure`"
    options = json.loads(daemon_json.content_string)
    log_opts = options.get("log-opts") or {}
    if "max-size" not in log_opts:
        return "fail", "daemon.json sets no log-opts.max-size: container logs grow without bound"
    return "pass", f"{options.get('log-driver', 'json-file')} logs, max-size {log_opts['max-size']}"


def _check_nvidia_runtime(host: Any) -> tuple[str, str]:
    runtimes = host.run("docker info --format '{{json .Runtimes}}'")
    if runtimes.rc != 0:
        return "fail", f"`docker info` failed: {runtimes.stderr.strip()}"
    registered = json.loads(runtimes.stdout)
    names = ", ".join(sorted(registered))
    if "nvidia" not in registered:
        return "fail", f"Docker's runtimes are {names}: no nvidia runtime"
    binary = registered["nvidia"].get("path", "")
    if not host.exists(binary):
        return "warn", (
            f"the nvidia runtime is registered ({names}), but {binary} is not installed: "
            "NVIDIA's container toolkit comes from NVIDIA's repository (package_sources: vendor)"
        )
    return "pass", f"Docker's runtimes: {names}"


# -- the GPUs ---------------------------------------------------------------------------------

GPU_CHECKS = (
    "driver loaded",
    "driver branch",
    "nvidia-smi GPUs",
    "persistence mode",
    "container sees GPUs",
)


def _gpu_checks(host: Any, target: GpuHostTarget) -> list[CheckResult]:
    try:
        devices = _nvidia_pci_devices(host)
    except Exception as exc:
        message = f"could not list PCI devices: {describe_exception(exc)}"
        return [CheckResult(f"{target.name}: gpu present", "error", message)]
    expected = f"{target.gpu_count}x {target.gpu_family.upper()}" if target.gpu_family else ""
    if not devices:
        if target.gpu_family and target.require_gpu:
            message = f"the spec expects {expected}, but the host has no NVIDIA PCI device"
            return [CheckResult(f"{target.name}: gpu present", "fail", message)]
        reason = "no GPU present (no PCI device of vendor 10de)"
        if expected:
            reason += f"; the spec expects {expected} (require_gpu is off)"
        return [CheckResult(f"{target.name}: {check}", "skip", reason) for check in GPU_CHECKS]
    checks = [
        CheckResult(f"{target.name}: gpu present", "pass", f"{len(devices)} NVIDIA PCI device(s)")
    ]
    version = [""]

    def driver_loaded() -> tuple[str, str]:
        found = parse_driver_version(host.file("/proc/driver/nvidia/version").content_string)
        version[0] = found
        return "pass", f"NVIDIA driver {found} loaded"

    def driver_branch() -> tuple[str, str]:
        if not version[0]:
            return "fail", "no driver loaded"
        if version[0].split(".")[0] != target.driver_branch:
            return "fail", f"driver {version[0]} is not of branch {target.driver_branch}"
        return "pass", f"driver {version[0]} is of branch {target.driver_branch}"

    gpus: list[dict[str, str]] = []

    def smi_gpus() -> tuple[str, str]:
        query = "nvidia-smi --query-gpu=index,name,persistence_mode --format=csv,noheader"
        gpus.extend(parse_nvidia_smi_gpus(host.check_output(query)))
        return judge_gpus(gpus, target.gpu_family, target.gpu_count)

    def persistence() -> tuple[str, str]:
        if not gpus:
            return "fail", "nvidia-smi listed no GPUs"
        off = [gpu["index"] for gpu in gpus if gpu["persistence_mode"] != "Enabled"]
        if off:
            return "fail", f"persistence mode is off on GPU {', '.join(off)}"
        return "pass", f"persistence mode on for {len(gpus)} GPU(s)"

    def container() -> tuple[str, str]:
        command = (
            "docker run --rm --runtime nvidia -e NVIDIA_VISIBLE_DEVICES=all "
            f"-e NVIDIA_DRIVER_CAPABILITIES=utility {shlex.quote(target.probe_image)} nvidia-smi -L"
        )
        listed = [
            line for line in host.check_output(command).splitlines() if line.startswith("GPU ")
        ]
        if len(listed) != len(devices):
            return "fail", f"a container sees {len(listed)} GPU(s), the host {len(devices)}"
        return "pass", f"a container sees {len(listed)} GPU(s)"

    for name, check in zip(
        GPU_CHECKS, (driver_loaded, driver_branch, smi_gpus, persistence, container), strict=True
    ):
        checks.append(_run(target, name, check))
    return checks


def _nvidia_pci_devices(host: Any) -> list[str]:
    """PCI addresses of NVIDIA GPUs, read from sysfs (no pciutils needed)."""
    listing = host.run(
        'for device in /sys/bus/pci/devices/*; do [ -r "$device/vendor" ] || continue; '
        'echo "${device##*/} $(cat "$device/vendor") $(cat "$device/class")"; done'
    )
    if listing.rc != 0:
        raise RuntimeError(f"reading /sys/bus/pci failed: {listing.stderr.strip()}")
    return nvidia_gpus_on_pci_bus(listing.stdout)


def nvidia_gpus_on_pci_bus(listing: str) -> list[str]:
    """Addresses of NVIDIA GPUs in lines of `<address> <vendor> <class>` from sysfs.

    Only display (0x0300) and 3D (0x0302) controllers count: an HGX board's NVSwitch chips carry
    NVIDIA's vendor id too (as bridges), and are not GPUs.
    """
    gpus = []
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) != 3:
            continue
        address, vendor, device_class = fields
        if vendor == NVIDIA_PCI_VENDOR and device_class[:6] in GPU_PCI_CLASSES:
            gpus.append(address)
    return gpus


def parse_driver_version(proc_version: str) -> str:
    """The version in /proc/driver/nvidia/version (proprietary or open kernel module)."""
    match = _DRIVER_VERSION.search(proc_version)
    if not match:
        raise ValueError(f"no driver version in /proc/driver/nvidia/version: {proc_version!r}")
    return match["version"]


def parse_nvidia_smi_gpus(csv_text: str) -> list[dict[str, str]]:
    """Rows of `nvidia-smi --query-gpu=index,name,persistence_mode --format=csv,noheader`."""
    rows = []
    for line in csv_text.splitlines():
        if not line.strip():
            continue
        index, *name, persistence = (field.strip() for field in line.split(","))
        rows.append({"index": index, "name": ",".join(name), "persistence_mode": persistence})
    return rows


def judge_gpus(gpus: list[dict[str, str]], family: str | None, count: int) -> tuple[str, str]:
    names = ", ".join(sorted({gpu["name"] for gpu in gpus})) or "none"
    if family is None:
        return "pass", f"{len(gpus)} GPU(s): {names} (the spec expects none in particular)"
    pattern = GPU_NAME_PATTERNS[family]
    matching = [gpu for gpu in gpus if pattern.search(gpu["name"])]
    if len(matching) != count or len(gpus) != count:
        return "fail", f"expected {count}x {family.upper()}, nvidia-smi sees {len(gpus)}: {names}"
    return "pass", f"{count}x {names}"


def _in_container(host: Any) -> bool:
    return bool(host.run("systemd-detect-virt --container").rc == 0)


def _branches_by_family() -> dict[str, str]:
    """The nvidia_driver role's map of GPU family to driver branch: one source of truth."""
    defaults = yaml.safe_load(NVIDIA_DRIVER_DEFAULTS.read_text())
    return {
        family: str(branch) for family, branch in defaults["nvidia_driver_branch_by_family"].items()
    }


def _ssh_hostspec(host: HostSpec) -> str:
    address = f"[{host.address}]" if ":" in (host.address or "") else host.address
    return f"ssh://{host.ssh_user}@{address}:{host.ssh_port}"


def _run(target: GpuHostTarget, name: str, check: Callable[[], tuple[str, str]]) -> CheckResult:
    started = time.monotonic()
    try:
        status, message = check()
    except Exception as exc:  # a command that failed or printed what we cannot read
        status, message = "error", f"could not check: {describe_exception(exc)}"
    return CheckResult(
        f"{target.name}: {name}",
        status,  # type: ignore[arg-type]
        message,
        duration_s=round(time.monotonic() - started, 3),
    )
