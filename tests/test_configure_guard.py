"""A `gpufleet configure` killed with SIGKILL mid-run leaves no secret in its private data dir
and no Ansible running; Ctrl-C (SIGINT) and SIGTERM stop a run and, after it, act as they did
before it.

While a run is under way its `env/extravars` holds the sudo password (0600) and ansible-runner's
`artifacts/<ident>/command` records the caller's whole environment; the run removes both when it
ends, but SIGKILL skips that. The cleanup guard, a process of its own, removes them instead;
it also stops the killed run's ansible-playbook, which ansible-runner starts in a session of its
own (a kill of the run's process group does not reach it).

Real: the `gpufleet` CLI as a process, ansible-runner and ansible-playbook, ssh connecting to a
TCP listener on 127.0.0.1 that accepts and never answers (so the run hangs in its first task
for as long as the test needs), SIGKILL. Not real: no SSH server behind the listener; nothing
is configured, which is not what this test is about.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gpufleet.configure.cleanup_guard import RUN_MARKER, marked_processes
from gpufleet.configure.runner import configure_hosts
from gpufleet.spec.loading import load_stack_spec

STACK = "killed"
PASSWORD_VARIABLE = "GPUFLEET_TEST_GUARD_BECOME_PASSWORD"  # noqa: S105  # its name
PASSWORD = "guard-s3cret-{{ 1+1 }}-9b2e"  # noqa: S105  # a marker to search for
CREDENTIAL_VARIABLE = "GPUFLEET_TEST_GUARD_CLOUD_TOKEN"
CREDENTIAL = "cloud-token-4d1f7a"  # another credential the caller happens to have exported


class SilentListener:
    """Accepts TCP connections on 127.0.0.1 and never sends a byte: ssh waits for a banner."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen()
        self.port = self.socket.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:  # closed
                return
            self.connections.append(connection)

    def close(self) -> None:
        self.socket.close()
        for connection in self.connections:
            connection.close()


@pytest.fixture
def listener() -> Iterator[SilentListener]:
    silent = SilentListener()
    try:
        yield silent
    finally:
        silent.close()


def files_holding(root: Path, *values: str) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            found += [f"{path}: {value}" for value in values if value.encode() in content]
    return found


def ansible_processes(data_dir: Path) -> list[str]:
    """The command lines of the processes carrying a run marker under ``data_dir``."""
    found = []
    for pid in marked_processes(f"\0{RUN_MARKER}={data_dir}/".encode()):
        with contextlib.suppress(OSError):  # gone since
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            found.append(f"{pid}: {command}")
    return found


def write_stack(tmp_path: Path, ssh_port: int) -> Path:
    """A project whose one host is 127.0.0.1:``ssh_port``; its directory."""
    project = tmp_path / "project"
    (project / "stacks").mkdir(parents=True)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.touch()
    config = {
        "environment": "static",
        "hosts": [{"name": "hung", "address": "127.0.0.1", "ssh_port": ssh_port}],
        "host_config": {
            "package_sources": "distribution",
            "ssh_known_hosts_file": str(known_hosts),
            "become_password_env": PASSWORD_VARIABLE,
        },
    }
    (project / "stacks" / f"Pulumi.{STACK}.yaml").write_text(
        yaml.safe_dump({"config": {f"gpufleet:{key}": value for key, value in config.items()}})
    )
    return project


def test_a_killed_run_leaves_no_secret_behind(tmp_path: Path, listener: SilentListener) -> None:
    project = write_stack(tmp_path, listener.port)
    data_dir = project / "build" / STACK / "ansible"
    run = subprocess.Popen(
        [sys.executable, "-m", "gpufleet", "configure", "--stack", STACK, "--json"],
        cwd=project,
        env={**os.environ, PASSWORD_VARIABLE: PASSWORD, CREDENTIAL_VARIABLE: CREDENTIAL},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        # Mid-run: Ansible's ssh has connected and waits for a banner that never comes.
        deadline = time.monotonic() + 180
        while not (listener.connections and list(data_dir.glob("artifacts/*/command"))):
            assert run.poll() is None, f"configure ended early ({run.returncode})"
            assert time.monotonic() < deadline, "Ansible never reached the host"
            time.sleep(0.2)
        # The exposure while the run lives: both values are on disk.
        assert sorted(files_holding(data_dir, PASSWORD, CREDENTIAL)) == sorted(
            [
                f"{data_dir}/env/extravars: {PASSWORD}",
                f"{next(data_dir.glob('artifacts/*/command'))}: {CREDENTIAL}",
            ]
        )
        running = ansible_processes(data_dir)
        assert any("ansible-playbook" in line for line in running), running
        os.kill(run.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        run.wait(timeout=30)
    finally:
        if run.poll() is None:
            os.kill(run.pid, signal.SIGKILL)
            run.wait(timeout=30)
    # The guard notices the run's end (its pipe closes) and cleans up after it.
    deadline = time.monotonic() + 60
    while left := files_holding(data_dir, PASSWORD, CREDENTIAL):
        assert time.monotonic() < deadline, f"still on disk after the kill: {left}"
        time.sleep(0.5)
    command = next(data_dir.glob("artifacts/*/command")).read_text()
    assert CREDENTIAL_VARIABLE in command, "the names of the variables are kept"
    assert list((data_dir / "env").iterdir()) == []
    # The run's Ansible (ansible-playbook, its forks, ssh) did not outlive it: killed by the
    # guard, each is gone once the kernel has torn it down (milliseconds). Left alone, the
    # playbook would end by itself only when ssh gives up on the banner (ANSIBLE_TIMEOUT, 15 s
    # after it connected, just before the kill), or, busy with a long task, much later.
    deadline = killed_at + 8
    while left := ansible_processes(data_dir):
        assert time.monotonic() < deadline, f"the killed run's Ansible still runs: {left}"
        time.sleep(0.2)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_the_callers_signal_handlers_are_back_after_a_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ansible_runner.run() left alone installs SIGINT and SIGTERM handlers that only set a
    flag, and never removes them: after one configure step, Ctrl-C and SIGTERM were swallowed
    for the rest of the process (an `up` could no longer be interrupted during its gates).
    Real: configure_hosts in this process, ansible-runner and ansible-playbook, ssh to a closed
    port on 127.0.0.1 (the host is unreachable at once)."""
    monkeypatch.setenv(PASSWORD_VARIABLE, PASSWORD)
    project = write_stack(tmp_path, closed_port())
    spec = load_stack_spec(project / "stacks", STACK).spec

    def mine(_number: int, _frame: object) -> None:
        return None

    before_int = signal.getsignal(signal.SIGINT)
    previous_term = signal.signal(signal.SIGTERM, mine)
    try:
        result = configure_hosts(STACK, spec, project_root=project, say=lambda _line: None)
        assert [outcome.status for outcome in result.hosts] == ["unreachable"]
        assert signal.getsignal(signal.SIGINT) is before_int
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous_term)


def test_ctrl_c_during_a_run_cancels_it_and_interrupts_the_caller(
    tmp_path: Path, listener: SilentListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGINT in the middle of a run cancels Ansible, the run's cleanup still removes the
    secrets from its data dir, and the caller then gets the KeyboardInterrupt it would have got
    without Ansible (before: the signal went to ansible-runner's flag and the caller carried on).
    Real: configure_hosts in this process, ansible-runner and ansible-playbook, ssh hanging on a
    listener that never answers, a real SIGINT sent to this process."""
    monkeypatch.setenv(PASSWORD_VARIABLE, PASSWORD)
    project = write_stack(tmp_path, listener.port)
    spec = load_stack_spec(project / "stacks", STACK).spec
    data_dir = project / "build" / STACK / "ansible"

    def interrupt_when_connected() -> None:
        deadline = time.monotonic() + 180
        while not listener.connections and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)

    # Python's own Ctrl-C handler, whatever this process inherited: a shell without job control
    # starts background commands with SIGINT ignored, and an ignored signal stays ignored.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    sender = threading.Thread(target=interrupt_when_connected, daemon=True)
    sender.start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            configure_hosts(STACK, spec, project_root=project, say=lambda _line: None)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)
    sender.join(timeout=5)
    assert listener.connections, "Ansible never reached the host: the signal came too early"
    assert time.monotonic() - started < 240
    assert files_holding(data_dir, PASSWORD) == []
