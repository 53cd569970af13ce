"""The run state `up` records and `down` stops: real processes, real signals, /proc.

Real: child processes in their own process groups, /proc, kill(2). Nothing is mocked.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from gpufleet.local.run_state import RunState, ServerRecord, process_start_ticks


def _wait_for(condition: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_stop_ends_the_whole_process_group() -> None:
    with subprocess.Popen(["sh", "-c", "sleep 60 & wait"], process_group=0) as leader:
        record = ServerRecord.of_process("server", leader.pid)
        assert record.alive
        assert record.stop(timeout_s=5) is True
        assert leader.poll() is not None
        assert not record.alive


def test_a_child_left_behind_by_a_dead_leader_is_stopped() -> None:
    """Like a python stub that outlives a killed Triton: the group lives on without its leader."""
    with subprocess.Popen(
        ["sh", "-c", "sleep 60 & echo $!; sleep 0.3"], process_group=0, stdout=subprocess.PIPE
    ) as leader:
        record = ServerRecord.of_process("server", leader.pid)
        assert leader.stdout is not None
        orphan = int(leader.stdout.readline())
        leader.wait(10)
    assert not record.alive
    assert process_start_ticks(orphan) is not None
    assert record.stop(timeout_s=5) is False  # the server itself was gone already
    _wait_for(lambda: process_start_ticks(orphan) is None)


def test_a_pid_now_used_by_another_process_is_never_signalled() -> None:
    with subprocess.Popen(["sleep", "60"], process_group=0) as bystander:
        ticks = process_start_ticks(bystander.pid)
        assert ticks is not None
        # The record of a server that had this pid before (it started earlier than this one).
        stale = ServerRecord("server", bystander.pid, start_ticks=ticks - 1)
        assert not stale.alive
        assert stale.stop(timeout_s=1) is False
        time.sleep(0.2)
        assert bystander.poll() is None
        bystander.kill()


def test_run_state_round_trips_and_forgets_dead_servers(tmp_path: Path) -> None:
    path = tmp_path / "run-state.json"
    with subprocess.Popen(["sleep", "60"], process_group=0) as server:
        state = RunState(stack="local")
        state.servers["triton"] = ServerRecord.of_process("triton", server.pid, ports={"http": 1})
        state.save(path)
        loaded = RunState.load(path)
        assert loaded == state
        assert loaded.running("triton") == state.servers["triton"]
        server.kill()
        server.wait()
    assert loaded.running("triton") is None
    assert "triton" not in loaded.servers


def test_an_unreadable_run_state_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "run-state.json"
    path.write_text('{"stack": "local", "servers": {"triton": {"pid": "x"}}}')
    with pytest.raises(ValueError, match="not a gpufleet run state") as error:
        RunState.load(path)
    assert "remove the file" in str(error.value)
    assert RunState.load(tmp_path / "absent.json") is None
