"""What `gpufleet up` started on this machine, so that `down` stops exactly that and no more.

The state file (`<state_dir>/run-state.json`) records each server's pid together with the
process's start time from /proc. A pid alone is not enough: after a reboot or a crash the
kernel may give the same pid to an unrelated process, and `down` must never signal that one.

    state = RunState.load(path) or RunState(stack="local")
    state.servers["triton"] = ServerRecord.of_process("triton", pid, ports={"http": 8000})
    state.save(path)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from generators.model_repository import write_atomically
from validation.loopback import signal_group
from validation.tritonserver import SHARED_MEMORY_DIR

STATE_FILE = "run-state.json"
_POLL_S = 0.1


@dataclass(frozen=True)
class ServerRecord:
    """One server process `up` started: a process-group leader, found again by pid + start."""

    name: str
    pid: int
    start_ticks: int
    ports: dict[str, int] = field(default_factory=dict)
    log_path: str = ""
    shm_prefix: str = ""  # Triton: names its python stubs' shared-memory regions

    @classmethod
    def of_process(cls, name: str, pid: int, **details: Any) -> ServerRecord:
        ticks = process_start_ticks(pid)
        if ticks is None:
            raise ProcessLookupError(f"{name} (pid {pid}) exited before it could be recorded")
        return cls(name=name, pid=pid, start_ticks=ticks, **details)

    @property
    def alive(self) -> bool:
        """Whether the recorded process (not merely some process with its pid) still runs."""
        return process_start_ticks(self.pid) == self.start_ticks

    def stop(self, timeout_s: float = 30.0) -> bool:
        """SIGTERM the server's process group, SIGKILL after `timeout_s`; False if already gone.

        The group holds the server and its children (Triton's python stubs, MLflow's workers).
        """
        was_alive = self.alive
        if was_alive:
            signal_group(self.pid, signal.SIGTERM)
            if not _wait_group_gone(self.pid, timeout_s):
                signal_group(self.pid, signal.SIGKILL)
                _wait_group_gone(self.pid, 10.0)
        elif process_start_ticks(self.pid) is None:
            # The leader died (killed, crashed) but a child may live on in its group: a python
            # stub, uvicorn's server process. Linux gives no new process a pid still in use as
            # a group id, so while one lives no stranger has the pid (checked just above).
            for pid in _group_members(self.pid, started_since=self.start_ticks):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.shm_prefix:
            for region in SHARED_MEMORY_DIR.glob(f"{self.shm_prefix}*"):
                region.unlink(missing_ok=True)
        return was_alive


@dataclass
class RunState:
    """The servers of one stack on this machine."""

    stack: str
    servers: dict[str, ServerRecord] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> RunState | None:
        """The state at `path`, or None when there is none; ValueError if it is unreadable."""
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
            servers = {name: ServerRecord(**record) for name, record in document["servers"].items()}
            return cls(stack=str(document["stack"]), servers=servers)
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(
                f"{path}: not a gpufleet run state ({error}); stop the servers it names by hand "
                "if they still run, then remove the file"
            ) from None

    def save(self, path: Path) -> None:
        document = {
            "stack": self.stack,
            "servers": {name: asdict(record) for name, record in sorted(self.servers.items())},
        }
        write_atomically(path, json.dumps(document, indent=2, sort_keys=True) + "\n")

    def running(self, name: str) -> ServerRecord | None:
        """The recorded server if it still runs. One that died (killed, crashed) is forgotten,
        and what it left behind (Triton's shared-memory regions) is removed."""
        record = self.servers.get(name)
        if record is None or record.alive:
            return record
        record.stop()
        del self.servers[name]
        return None


def process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22)."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] == "Z":  # a zombie has exited; only its exit status is left
        return None
    return int(fields[19])


def _stat_fields(pid: int | str) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state) on: [state, ppid, pgrp, ..., starttime, ...]."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces or ')'.
    return stat[stat.rindex(")") + 2 :].split()


def _group_members(pgid: int, *, started_since: int) -> list[int]:
    """Live processes of process group `pgid` that started at or after `started_since`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(entry.name)
        if (
            fields is not None
            and fields[0] != "Z"
            and int(fields[2]) == pgid
            and int(fields[19]) >= started_since
        ):
            members.append(int(entry.name))
    return members


def _wait_group_gone(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _reap_if_child(pgid)
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(_POLL_S)
    return False


def _reap_if_child(pid: int) -> None:
    """A server this very process started stays a zombie (its group alive) until reaped."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
