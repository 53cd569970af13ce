"""Tests of validation/host.py, the host gate, against this machine.

What is real: everything. The gate runs through pytest-testinfra's local backend, so every fact
comes from ``ps``, ``ss``, ``df``, ``test`` and ``ls`` run on this host; the processes and
sockets it inspects are real: the tritonserver of the nvidia-pytriton wheel, ``sleep``
subprocesses, sockets these tests bind, model repositories written into tmp_path. Nothing is
mocked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from validation.host import LINEAGE_CHECK, ExpectedProcess, HostExpectations, run_host_gate
from validation.report import CheckResult, GateReport

if TYPE_CHECKING:  # importing it for real here would keep pytest from loading it as a plugin
    from tests.triton_fixtures import TritonServerFactory

START_HINT = "start the stack with `gpufleet up --stack local`"
MODEL = "tabular_mlp"


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """A model repository holding MODEL with a config and version 1."""
    repo = tmp_path / "model_repository"
    (repo / MODEL / "1").mkdir(parents=True)
    (repo / MODEL / "config.pbtxt").write_text(f'name: "{MODEL}"\nbackend: "python"\n')
    (repo / MODEL / "1" / "model.py").write_text("")
    return repo


@pytest.fixture
def expectations(repository: Path) -> HostExpectations:
    """Expectations the host meets: no processes, the repository above, no disk demand."""
    return HostExpectations(
        processes=(), model_repository=str(repository), models=[MODEL], min_free_disk_gb=0
    )


def gate(expectations: HostExpectations, **changes: Any) -> GateReport:
    """Run the gate on the local host with ``expectations`` changed as given."""
    return run_host_gate(dataclasses.replace(expectations, **changes), stack="local")


def check(report: GateReport, name: str) -> CheckResult:
    matches = [c for c in report.checks if c.name == name]
    assert len(matches) == 1, f"{name!r} in {[c.name for c in report.checks]}"
    return matches[0]


def statuses(report: GateReport) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


@contextlib.contextmanager
def listening_socket(address: str, port: int = 0) -> Iterator[int]:
    """A TCP socket listening on (address, port) for the block; yields its port."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen()
        yield int(sock.getsockname()[1])


def this_process(*ports: int) -> ExpectedProcess:
    """The test process as a server that should listen on ``ports``: its own check passes."""
    return ExpectedProcess("triton", os.getpid(), Path(sys.executable).name, ports)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def non_loopback_address() -> str:
    """This machine's address on its default route (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the outgoing interface
        return str(sock.getsockname()[0])


# -- a real Triton ---------------------------------------------------------------------------


def test_running_triton_on_loopback_passes(
    triton_server_factory: TritonServerFactory,
    expectations: HostExpectations,
    tmp_path: Path,
) -> None:
    (tmp_path / "empty").mkdir()
    server = triton_server_factory(tmp_path / "empty", load_models=[])
    assert server.pid is not None
    triton = ExpectedProcess("triton", server.pid, "tritonserver", tuple(server.ports))

    report = gate(expectations, processes=[triton])

    assert (report.gate, report.stack, report.status) == ("host", "local", "pass"), report
    # Triton's gRPC port listens on ::ffff:127.0.0.1, a v4-mapped loopback address.
    assert [c.name for c in report.checks] == [
        "triton process",
        *(f"triton port {port}" for port in server.ports),
        "model repository",
        f"model {MODEL}",
        "free disk",
        LINEAGE_CHECK,
    ]
    process = check(report, "triton process")
    assert process.message == f"triton (pid {server.pid}) runs tritonserver"
    assert process.measurements["pid"] == server.pid
    assert process.measurements["ports"] == list(server.ports)
    assert f"--http-port {server.ports.http} " in process.measurements["command"]
    assert check(report, f"triton port {server.ports.http}").measurements == {
        "port": server.ports.http,
        "addresses": ["127.0.0.1"],
    }
    assert check(report, f"model {MODEL}").measurements["versions"] == [1]
    assert check(report, "free disk").measurements["free_gb"] > 0
    assert all(c.duration_s >= 0 for c in report.checks)


def test_stopped_triton_fails(
    triton_server_factory: TritonServerFactory, expectations: HostExpectations, tmp_path: Path
) -> None:
    (tmp_path / "empty").mkdir()
    server = triton_server_factory(tmp_path / "empty", load_models=[])
    server.stop()
    assert server.pid is not None
    triton = ExpectedProcess("triton", server.pid, "tritonserver", (server.ports.http,))

    report = gate(expectations, processes=[triton])

    assert report.status == "fail"
    assert check(report, "triton process").message == (
        f"triton (pid {server.pid}) is not running; {START_HINT}"
    )
    assert check(report, f"triton port {server.ports.http}").message == (
        f"triton port {server.ports.http} is not listening on 127.0.0.1 (nothing listens on "
        f"it); {START_HINT}"
    )


# -- processes -------------------------------------------------------------------------------


def test_pid_running_something_else_fails(expectations: HostExpectations) -> None:
    with subprocess.Popen(["sleep", "60"]) as sleeper:
        try:
            triton = ExpectedProcess("triton", sleeper.pid, "tritonserver")
            report = gate(expectations, processes=[triton])
        finally:
            sleeper.kill()

    result = check(report, "triton process")
    assert result.status == "fail"
    assert result.message == (
        f"triton (pid {sleeper.pid}) is not running: pid {sleeper.pid} now runs `sleep 60`, "
        f"not tritonserver; {START_HINT}"
    )


def test_exited_but_unreaped_process_fails(expectations: HostExpectations) -> None:
    with subprocess.Popen(["sleep", "0"]) as sleeper:
        # Wait for it to exit without reaping it: it stays in the process table as a zombie.
        os.waitid(os.P_PID, sleeper.pid, os.WEXITED | os.WNOWAIT)
        report = gate(expectations, processes=[ExpectedProcess("mlflow", sleeper.pid, "sleep")])

    result = check(report, "mlflow process")
    assert result.status == "fail"
    assert result.message == (
        f"mlflow (pid {sleeper.pid}) is not running: it has exited and is not yet reaped; "
        f"{START_HINT}"
    )


@pytest.mark.parametrize(
    ("command", "executable"),
    [
        (["sleep", "60"], "sleep"),
        ([sys.executable, "-c", "import time; time.sleep(60)"], Path(sys.executable).name),
        ([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "0"], "http.server"),
    ],
    ids=["program", "interpreter", "python-module"],
)
def test_pid_running_the_expected_executable_passes(
    expectations: HostExpectations, command: list[str], executable: str
) -> None:
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        try:
            report = gate(expectations, processes=[ExpectedProcess("server", proc.pid, executable)])
        finally:
            proc.kill()

    result = check(report, "server process")
    assert result.status == "pass", result.message
    assert result.measurements["pid"] == proc.pid


def test_shebang_script_counts_by_its_name(expectations: HostExpectations, tmp_path: Path) -> None:
    script = tmp_path / "mlflow"  # as the mlflow console script runs: its name becomes the comm
    script.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(60)\n")
    script.chmod(0o755)
    with subprocess.Popen([script]) as proc:
        try:
            report = gate(expectations, processes=[ExpectedProcess("mlflow", proc.pid, "mlflow")])
        finally:
            proc.kill()

    assert check(report, "mlflow process").status == "pass"


# -- ports -----------------------------------------------------------------------------------


def test_port_not_listening_fails(expectations: HostExpectations) -> None:
    port = free_port()
    report = gate(expectations, processes=[this_process(port)])

    result = check(report, f"triton port {port}")
    assert result.status == "fail"
    assert result.message == (
        f"triton port {port} is not listening on 127.0.0.1 (nothing listens on it); {START_HINT}"
    )
    assert result.measurements == {"port": port, "addresses": []}


@pytest.mark.parametrize(("address", "shown"), [("0.0.0.0", "0.0.0.0"), ("::", "[::]")])  # noqa: S104
def test_port_on_all_interfaces_fails(
    expectations: HostExpectations, address: str, shown: str
) -> None:
    with listening_socket(address) as port:
        report = gate(expectations, processes=[this_process(port)])

    result = check(report, f"triton port {port}")
    assert result.status == "fail"
    assert result.message == (
        f"triton port {port} listens on {shown}:{port}, reachable from other machines; "
        "gpufleet's local stack must be reachable from this machine only: bind it to 127.0.0.1"
    )


def test_port_on_loopback_and_a_network_address_fails(expectations: HostExpectations) -> None:
    address = non_loopback_address()
    with listening_socket("127.0.0.1") as port, listening_socket(address, port):
        report = gate(expectations, processes=[this_process(port)])

    result = check(report, f"triton port {port}")
    assert result.status == "fail"
    assert f"listens on {address}:{port}, reachable from other machines" in result.message
    assert result.measurements["addresses"] == sorted(["127.0.0.1", address])


def test_port_on_ipv4_and_ipv6_loopback_passes(expectations: HostExpectations) -> None:
    with listening_socket("127.0.0.1") as port, listening_socket("::1", port):
        report = gate(expectations, processes=[this_process(port)])

    result = check(report, f"triton port {port}")
    assert result.status == "pass", result.message
    assert result.message == f"listening on 127.0.0.1:{port}, [::1]:{port} (loopback only)"


def test_port_on_ipv6_loopback_only_fails(expectations: HostExpectations) -> None:
    with listening_socket("::1") as port:
        report = gate(expectations, processes=[this_process(port)])

    result = check(report, f"triton port {port}")
    assert result.status == "fail"
    assert result.message == (
        f"triton port {port} is not listening on 127.0.0.1 (it listens on [::1]:{port} only); "
        "bind it to 127.0.0.1"
    )


# -- model repository ------------------------------------------------------------------------


def test_missing_repository_fails(expectations: HostExpectations, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model_repository"
    report = gate(expectations, model_repository=str(missing))

    assert check(report, "model repository").message == (
        f"model repository {missing} does not exist; {START_HINT}"
    )
    # The models are not checked one by one, but the disk is, where the repository will live.
    assert statuses(report) == {
        "model repository": "fail",
        "free disk": "pass",
        LINEAGE_CHECK: "pass",
    }


def test_repository_that_is_a_file_fails(expectations: HostExpectations, tmp_path: Path) -> None:
    not_a_directory = tmp_path / "model_repository.txt"
    not_a_directory.write_text("")
    report = gate(expectations, model_repository=not_a_directory)

    result = check(report, "model repository")
    assert result.status == "fail"
    assert result.message.startswith(f"model repository {not_a_directory} is not a directory")


def test_missing_model_fails(expectations: HostExpectations, repository: Path) -> None:
    report = gate(expectations, models=[MODEL, "resnet50"])

    assert statuses(report)[f"model {MODEL}"] == "pass"
    assert check(report, "model resnet50").message == (
        f"model resnet50 is not in the model repository {repository}; run `gpufleet generate` "
        "and fill the repository from the registry"
    )


def test_model_without_config_fails(expectations: HostExpectations, repository: Path) -> None:
    (repository / MODEL / "config.pbtxt").unlink()
    report = gate(expectations)

    result = check(report, f"model {MODEL}")
    assert result.status == "fail"
    assert result.message.startswith(f"model {MODEL} has no config.pbtxt in {repository / MODEL}")


def test_model_without_version_directory_fails(
    expectations: HostExpectations, repository: Path
) -> None:
    (repository / MODEL / "1" / "model.py").rename(repository / MODEL / "model.py")
    (repository / MODEL / "1").rmdir()
    (repository / MODEL / "v2").mkdir()  # not numeric: Triton ignores it
    (repository / MODEL / "3").write_text("")  # numeric, but a file
    report = gate(expectations)

    result = check(report, f"model {MODEL}")
    assert result.status == "fail"
    assert result.message == (
        f"model {MODEL} has no version directory (a numeric folder such as 1/) in "
        f"{repository / MODEL}, so Triton has nothing to load; fill it from the registry"
    )


def test_model_versions_are_measured(expectations: HostExpectations, repository: Path) -> None:
    (repository / MODEL / "12").mkdir()
    report = gate(expectations)

    result = check(report, f"model {MODEL}")
    assert (result.status, result.message) == ("pass", "config.pbtxt and version 1, 12")
    assert result.measurements["versions"] == [1, 12]


# -- disk and lineage ------------------------------------------------------------------------


def test_not_enough_free_disk_fails(expectations: HostExpectations) -> None:
    report = gate(expectations, min_free_disk_gb=1e9)

    result = check(report, "free disk")
    assert result.status == "fail"
    match = re.fullmatch(r"([0-9.]+) GB free at (/.*), stack needs 1e\+09 GB", result.message)
    assert match, result.message
    assert float(match[1]) == pytest.approx(result.measurements["free_gb"], abs=0.05)
    assert match[2] == result.measurements["mount"]
    assert Path(match[2]).is_dir()
    assert result.measurements["required_gb"] == 1e9


def test_repository_problems_fail_one_check_each(expectations: HostExpectations) -> None:
    problems = [
        f"{MODEL}/1/model.py: sha256 abc... differs from the registry's def...",
        f"{MODEL}/1/weights.pt: missing (registry lists it)",
    ]
    report = gate(expectations, repository_problems=problems)

    lineage = [c for c in report.checks if c.name == LINEAGE_CHECK]
    assert [(c.status, c.message) for c in lineage] == [("fail", p) for p in problems]
    assert report.status == "fail"


# -- checks that cannot run ------------------------------------------------------------------


HIDDEN_TOOLS = ("ps", "ss", "netstat", "df")


def path_without(tools: tuple[str, ...], bin_dir: Path) -> str:
    """A PATH of one folder linking every program on this PATH except ``tools``."""
    bin_dir.mkdir()
    for folder in reversed(os.environ["PATH"].split(os.pathsep)):  # the first one wins
        for program in Path(folder).glob("*") if Path(folder).is_dir() else []:
            if program.name not in tools and os.access(program, os.X_OK):
                (bin_dir / program.name).unlink(missing_ok=True)
                (bin_dir / program.name).symlink_to(program)
    return str(bin_dir)


def test_missing_host_tools_are_errors_that_say_what_to_install(
    expectations: HostExpectations, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # testinfra also looks for ss in /sbin and /usr/sbin, which PATH cannot hide; Debian's
    # iproute2 (installed by .ci/run) puts it in /usr/bin.
    assert not [p for p in (Path("/sbin/ss"), Path("/usr/sbin/ss")) if p.exists()], (
        "this test hides ss through PATH; here ss is also in /sbin or /usr/sbin"
    )
    # The local backend runs its commands with this process's PATH: a host without the tools.
    monkeypatch.setenv("PATH", path_without(HIDDEN_TOOLS, tmp_path / "bin"))
    process = this_process(free_port())

    report = gate(expectations, processes=[process])

    assert statuses(report) == {
        "triton process": "error",
        f"triton port {process.ports[0]}": "error",
        "model repository": "pass",
        f"model {MODEL}": "pass",
        "free disk": "error",
        LINEAGE_CHECK: "pass",
    }
    assert report.status == "error"
    assert check(report, "triton process").message.endswith(
        "; the host needs `ps` (Debian package procps)"
    )
    assert check(report, f"triton port {process.ports[0]}").message == (
        f"could not check triton port {process.ports[0]}: could not use the Socket module, "
        'either "ss" or "netstat" utility is required in $PATH; the host needs `ss` (Debian '
        "package iproute2) or `netstat` (net-tools)"
    )
    assert check(report, "free disk").message.startswith(
        f"could not check free disk: `df -Pk {expectations.model_repository}` failed: "
    )


def test_unknown_host_backend_is_an_error(expectations: HostExpectations) -> None:
    report = run_host_gate(expectations, host="nosuchbackend://somewhere", stack="local")

    assert report.status == "error"
    assert [(c.name, c.status) for c in report.checks] == [("host connection", "error")]
    assert "Unknown connection type 'nosuchbackend'" in report.checks[0].message
