"""The host gate: is the machine that serves a stack in the state the stack expects?

It checks, through pytest-testinfra, that the servers ``gpufleet up`` started still run under the
pids it recorded, that their ports listen on loopback and nowhere else, that the model
repository holds every model with a config and a version directory, that the disk under the
repository has room, and it reports the checksum problems found against the models' lineage.
The host is a testinfra host spec (``local://`` here; ``ssh://...`` or ``docker://...`` later),
so every fact comes from commands run on that host: ``ps``, ``ss`` (or ``netstat``), ``df``,
``test`` and ``ls``.

    expectations = HostExpectations(
        processes=[ExpectedProcess("triton", pid=4242, executable="tritonserver",
                                   ports=(8000, 8001, 8002))],
        model_repository="/srv/gpufleet/model_repository",
        models=["tabular_mlp"],
        min_free_disk_gb=1.0,
    )
    report = run_host_gate(expectations, stack="local")   # GateReport("host", ...)
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import PurePath, PurePosixPath
from typing import Any

# testinfra ships no type information.
import testinfra.backend  # type: ignore[import-untyped]
import testinfra.host  # type: ignore[import-untyped]

from validation.report import CheckResult, GateReport

GATE_NAME = "host"
LINEAGE_CHECK = "model files match lineage"

# Linux keeps the first 15 bytes of an executable's file name as the process's comm.
_COMM_LENGTH = 15
_INTERPRETER = re.compile(r"python[0-9.]*")
_VERSION_DIR = re.compile(r"[0-9]+")
# `df -P` line: filesystem, 1024-blocks, used, available, capacity, mount point (may hold spaces).
_DF_LINE = re.compile(r"^.+?\s+\d+\s+\d+\s+(?P<avail>\d+)\s+(?:\d+%|-)\s+(?P<mount>/.*)$")
_BYTES_PER_GB = 1e9
_MAX_QUOTED_CHARS = 300
_FAILED_COMMAND = re.compile(
    r"exit_status=(?P<rc>\d+), command=b'(?P<command>[^']*)'.*_stderr=b'(?P<stderr>[^']*)'"
)

_NEEDS_PS = "the host needs `ps` (Debian package procps)"
_NEEDS_SS = "the host needs `ss` (Debian package iproute2) or `netstat` (net-tools)"
_NEEDS_LS = "the host needs a POSIX shell with `test` and `ls` (Debian package coreutils)"
_NEEDS_DF = "the host needs `df` (Debian package coreutils)"


@dataclasses.dataclass(frozen=True)
class ExpectedProcess:
    """A server ``gpufleet up`` started: its role, the pid it recorded, what that pid runs.

    ``executable`` is the program's file name (``tritonserver``, ``mlflow``); for a Python
    program started as ``python path/to/script`` or ``python -m module`` the script or module
    name counts too. ``ports`` are the TCP ports it must listen on, on 127.0.0.1 only.
    """

    name: str
    pid: int
    executable: str
    ports: Sequence[int] = ()


@dataclasses.dataclass(frozen=True)
class HostExpectations:
    """What the host gate expects of the host.

    ``model_repository`` is a path on the host (absolute, unless the host is this machine and
    the path is meant relative to the working directory). ``repository_problems`` are the
    checksum problems another module found between the repository and the models' lineage;
    each becomes one failed check.
    """

    processes: Sequence[ExpectedProcess]
    model_repository: str | PurePath
    models: Sequence[str]
    min_free_disk_gb: float
    repository_problems: Sequence[str] = ()


class _CannotCheck(Exception):
    """A check could not run; the message says what went wrong."""


def run_host_gate(
    expectations: HostExpectations, *, host: str = "local://", stack: str = ""
) -> GateReport:
    """Run every host check against the testinfra host ``host``; one CheckResult per check."""
    try:
        target = connect(host)
    except Exception as exc:  # an unknown backend, a missing client library, ...
        message = f"could not reach host {host!r}: {describe_exception(exc)}; check the host spec"
        return GateReport(GATE_NAME, [CheckResult("host connection", "error", message)], stack)
    start_hint = f"start the stack with `gpufleet up --stack {stack or '<stack>'}`"
    checks = [
        *(_process_check(target, process, start_hint) for process in expectations.processes),
        *_port_checks(target, expectations.processes, start_hint),
        *_repository_checks(target, expectations, start_hint),
        _disk_check(target, expectations),
        *_lineage_checks(expectations.repository_problems),
    ]
    return GateReport(GATE_NAME, checks, stack)


def connect(host: str, **backend_options: Any) -> Any:
    """A fresh testinfra Host for the spec ``host`` (``local://``, ``ssh://user@name``...);
    ``backend_options`` go to testinfra's backend (``ssh_identity_file``, ``ssh_extra_args``).

    Not ``testinfra.get_host``: it caches each Host, with what its modules found out (where
    ``ss`` is, which ``ps``), for the life of the process; a gate must see the host as it is now.
    """
    backend = testinfra.backend.get_backend(host, **backend_options)
    target = testinfra.host.Host(backend)
    backend.set_host(target)
    return target


# -- processes -------------------------------------------------------------------------------


def _process_check(host: Any, expected: ExpectedProcess, start_hint: str) -> CheckResult:
    return _run_check(
        f"{expected.name} process", lambda: _check_process(host, expected, start_hint), _NEEDS_PS
    )


def _check_process(host: Any, expected: ExpectedProcess, start_hint: str) -> CheckResult:
    name = f"{expected.name} process"
    who = f"{expected.name} (pid {expected.pid})"
    measurements: dict[str, Any] = {
        "pid": expected.pid,
        "executable": expected.executable,
        "ports": list(expected.ports),
    }
    found = host.process.filter(pid=expected.pid)
    if not found:
        return CheckResult(name, "fail", f"{who} is not running; {start_hint}", measurements)
    process = found[0]
    command = str(process.args)
    measurements["command"] = command
    if not _runs_executable(str(process.comm), command, expected.executable):
        message = (
            f"{who} is not running: pid {expected.pid} now runs `{_shorten(command)}`, not "
            f"{expected.executable}; {start_hint}"
        )
        return CheckResult(name, "fail", message, measurements)
    if str(process.stat).startswith("Z"):
        message = f"{who} is not running: it has exited and is not yet reaped; {start_hint}"
        return CheckResult(name, "fail", message, measurements)
    return CheckResult(name, "pass", f"{who} runs {expected.executable}", measurements)


def _runs_executable(comm: str, command: str, executable: str) -> bool:
    """Whether a process with this comm and command line runs ``executable``."""
    if comm == executable[:_COMM_LENGTH]:
        return True
    argv = command.split()
    if not argv:
        return False
    program = PurePosixPath(argv[0]).name
    if program == executable:
        return True
    if _INTERPRETER.fullmatch(program) and len(argv) > 1:
        script = argv[2] if argv[1] == "-m" and len(argv) > 2 else argv[1]
        return PurePosixPath(script).name == executable
    return False


# -- ports -----------------------------------------------------------------------------------


def _port_checks(
    host: Any, processes: Sequence[ExpectedProcess], start_hint: str
) -> list[CheckResult]:
    listing = functools.cache(functools.partial(_listening_tcp, host))  # one `ss` for all ports
    return [
        _run_check(
            f"{process.name} port {port}",
            functools.partial(_check_port, process.name, port, listing, start_hint),
            _NEEDS_SS,
        )
        for process in processes
        for port in process.ports
    ]


def _listening_tcp(host: Any) -> dict[int, set[str]]:
    """Port -> addresses that listen on it, for every listening TCP socket of the host."""
    listening: dict[int, set[str]] = {}
    for spec in host.socket.get_listening_sockets():
        protocol, _, address = str(spec).partition("://")
        if protocol != "tcp":
            continue
        ip, _, port = address.rpartition(":")
        listening.setdefault(int(port), set()).add(ip)
    return listening


def _check_port(
    owner: str, port: int, listing: Callable[[], Mapping[int, set[str]]], start_hint: str
) -> CheckResult:
    name = f"{owner} port {port}"
    addresses = sorted(listing().get(port, set()))
    measurements: dict[str, Any] = {"port": port, "addresses": addresses}
    problem = _port_problem(owner, port, addresses, start_hint)
    if problem:
        return CheckResult(name, "fail", problem, measurements)
    where = _socket_names(addresses, port)
    return CheckResult(name, "pass", f"listening on {where} (loopback only)", measurements)


def _port_problem(owner: str, port: int, addresses: list[str], start_hint: str) -> str | None:
    """What is wrong with where ``port`` listens, or None if it is 127.0.0.1 and loopback only."""
    exposed = [address for address in addresses if not _is_loopback(address)]
    if exposed:
        return (
            f"{owner} port {port} listens on {_socket_names(exposed, port)}, reachable from "
            "other machines; gpufleet's local stack must be reachable from this machine only: "
            "bind it to 127.0.0.1"
        )
    if not addresses:
        return (
            f"{owner} port {port} is not listening on 127.0.0.1 (nothing listens on it); "
            f"{start_hint}"
        )
    if not any(_is_127_0_0_1(address) for address in addresses):
        return (
            f"{owner} port {port} is not listening on 127.0.0.1 (it listens on "
            f"{_socket_names(addresses, port)} only); bind it to 127.0.0.1"
        )
    return None


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``ss`` printed, without its interface (``127.0.0.53%lo``); None if odd."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # a dual-stack socket bound to ::ffff:127.0.0.1 (Triton's gRPC)
    return ip


def _is_loopback(address: str) -> bool:
    ip = _ip(address)
    return ip is not None and ip.is_loopback  # anything unrecognised counts as exposed


def _is_127_0_0_1(address: str) -> bool:
    return _ip(address) == ipaddress.IPv4Address("127.0.0.1")


def _socket_names(addresses: Sequence[str], port: int) -> str:
    """``127.0.0.1:8000, [::1]:8000``: IPv6 addresses in brackets, as in URLs."""
    return ", ".join(f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addresses)


# -- model repository ------------------------------------------------------------------------


def _repository_checks(
    host: Any, expectations: HostExpectations, start_hint: str
) -> list[CheckResult]:
    repository = PurePosixPath(expectations.model_repository)
    present = _run_check(
        "model repository", lambda: _check_repository(host, repository, start_hint), _NEEDS_LS
    )
    if present.status != "pass":
        return [present]  # each model check would only repeat that the repository is missing
    return [present] + [
        _run_check(
            f"model {model}", functools.partial(_check_model, host, repository, model), _NEEDS_LS
        )
        for model in expectations.models
    ]


def _check_repository(host: Any, repository: PurePosixPath, start_hint: str) -> CheckResult:
    name = "model repository"
    measurements = {"path": str(repository)}
    directory = host.file(str(repository))
    if not directory.exists:
        message = f"model repository {repository} does not exist; {start_hint}"
        return CheckResult(name, "fail", message, measurements)
    if not directory.is_directory:
        message = f"model repository {repository} is not a directory; remove it, then {start_hint}"
        return CheckResult(name, "fail", message, measurements)
    if host.run("test -r %s && test -x %s", str(repository), str(repository)).rc != 0:
        message = (
            f"model repository {repository} is not readable by the user the checks run as; "
            "give it read and search permission (chmod a+rX)"
        )
        return CheckResult(name, "fail", message, measurements)
    return CheckResult(name, "pass", f"{repository} is a readable directory", measurements)


def _check_model(host: Any, repository: PurePosixPath, model: str) -> CheckResult:
    name = f"model {model}"
    model_dir = repository / model
    measurements: dict[str, Any] = {"path": str(model_dir)}
    regenerate = "run `gpufleet generate` and fill the repository from the registry"
    if not host.file(str(model_dir)).is_directory:
        message = f"model {model} is not in the model repository {repository}; {regenerate}"
        return CheckResult(name, "fail", message, measurements)
    if not host.file(str(model_dir / "config.pbtxt")).is_file:
        message = f"model {model} has no config.pbtxt in {model_dir}; {regenerate}"
        return CheckResult(name, "fail", message, measurements)
    versions = sorted(
        (
            int(entry)
            for entry in host.file(str(model_dir)).listdir()
            if _VERSION_DIR.fullmatch(entry) and host.file(str(model_dir / entry)).is_directory
        ),
    )
    measurements["versions"] = versions
    if not versions:
        message = (
            f"model {model} has no version directory (a numeric folder such as 1/) in "
            f"{model_dir}, so Triton has nothing to load; fill it from the registry"
        )
        return CheckResult(name, "fail", message, measurements)
    shown = ", ".join(map(str, versions))
    return CheckResult(name, "pass", f"config.pbtxt and version {shown}", measurements)


# -- disk ------------------------------------------------------------------------------------


def _disk_check(host: Any, expectations: HostExpectations) -> CheckResult:
    return _run_check("free disk", lambda: _check_disk(host, expectations), _NEEDS_DF)


def _check_disk(host: Any, expectations: HostExpectations) -> CheckResult:
    # A repository not created yet will live on the file system of its nearest existing parent.
    path = PurePosixPath(expectations.model_repository)
    while not host.file(str(path)).exists and path != path.parent:
        path = path.parent
    free_kib, mount = _df_available(host, path)
    free_gb = free_kib * 1024 / _BYTES_PER_GB
    needed = expectations.min_free_disk_gb
    measurements = {"free_gb": round(free_gb, 3), "required_gb": needed, "mount": mount}
    message = f"{free_gb:.1f} GB free at {mount}, stack needs {needed:g} GB"
    if free_gb < needed:
        return CheckResult("free disk", "fail", message, measurements)
    return CheckResult("free disk", "pass", message, measurements)


def _df_available(host: Any, path: PurePosixPath) -> tuple[int, str]:
    """Free KiB for unprivileged users, and the mount point, of the file system holding path."""
    result = host.run("df -Pk %s", str(path))
    if result.rc != 0:
        raise _CannotCheck(f"`df -Pk {path}` failed: {result.stderr.strip() or result.rc}")
    lines = result.stdout.strip().splitlines()
    match = _DF_LINE.match(lines[-1]) if len(lines) >= 2 else None
    if match is None:
        raise _CannotCheck(f"could not read the output of `df -Pk {path}`: {result.stdout!r}")
    return int(match["avail"]), match["mount"]


# -- lineage ---------------------------------------------------------------------------------


def _lineage_checks(problems: Sequence[str]) -> list[CheckResult]:
    if not problems:
        return [CheckResult(LINEAGE_CHECK, "pass", "no checksum problems")]
    return [CheckResult(LINEAGE_CHECK, "fail", problem) for problem in problems]


# -- running checks --------------------------------------------------------------------------


def _run_check(name: str, check: Callable[[], CheckResult], needs: str) -> CheckResult:
    """Run one check and time it; if it cannot run, an "error" result that says what to do."""
    started = time.monotonic()
    try:
        result = check()
    except Exception as exc:  # any failure of testinfra or its backend: the check did not run
        result = CheckResult(
            name, "error", f"could not check {name}: {describe_exception(exc)}; {needs}"
        )
    return dataclasses.replace(result, duration_s=round(time.monotonic() - started, 3))


def describe_exception(exc: BaseException) -> str:
    """The exception's message; for a command testinfra ran, the command and its stderr."""
    text = str(exc)
    # testinfra's check_output fails with "Unexpected exit code N for CommandResult(...)".
    failed = _FAILED_COMMAND.search(text)
    if failed:
        stderr = failed["stderr"].encode().decode("unicode_escape").strip()
        text = f"`{failed['command']}` exited with {failed['rc']}: {stderr or '(no output)'}"
    return _shorten(text) or type(exc).__name__


def _shorten(text: str) -> str:
    """One line of at most _MAX_QUOTED_CHARS: quoted commands and errors stay readable."""
    line = " ".join(text.split())
    return line if len(line) <= _MAX_QUOTED_CHARS else line[:_MAX_QUOTED_CHARS] + "..."
