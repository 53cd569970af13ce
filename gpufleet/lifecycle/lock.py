"""One lifecycle command at a time changes an environment; a second is refused naming the first.

The lock is an flock on `<state_dir>/lifecycle.lock`, released by the kernel when its holder
exits (also when killed); the file records who holds it (pid, user, machine, command, since
when) so that the refusal can say so.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import getpass
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = "lifecycle.lock"


class EnvironmentLocked(Exception):
    """Another command holds the environment's lock (exit 2)."""


@contextlib.contextmanager
def environment_lock(state_dir: Path, stack: str, command: str) -> Iterator[None]:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_FILE
    with path.open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise EnvironmentLocked(
                f"stack {stack!r} is locked by {_holder(lock.read())} ({path}); wait for it to "
                "finish"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "user": getpass.getuser(),
                    "host": socket.gethostname(),
                    "command": command,
                    "argv": sys.argv,
                    "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                }
            )
        )
        lock.flush()
        try:
            yield
        finally:
            lock.truncate(0)


def _holder(text: str) -> str:
    try:
        record = json.loads(text)
        return (
            f"`gpufleet {record['command']}` (pid {record['pid']}, user {record['user']} on "
            f"{record['host']}, since {record['since']})"
        )
    except (ValueError, KeyError, TypeError):
        return "another gpufleet command"
