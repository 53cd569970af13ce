"""Remove what a `gpufleet configure` run leaves on disk that must not outlive it, even when the
run is killed with SIGKILL and its own `finally` never runs.

`gpufleet configure` starts this file as a separate process (its own session, so a signal to
the run's process group does not reach it) with a pipe on its stdin that only the run holds.
When the run ends in any way, the kernel closes the pipe; the guard reads end-of-file and then
empties the run's `env/` directory (the 0600 extravars with the secrets) and reduces the
environment ansible-runner recorded in `artifacts/<ident>/command` to variable names. The run
does the same itself when it ends normally; doing it twice is harmless.

A run that returns (ansible-runner waited for Ansible to end) writes `ended` on the pipe first.
Without it, the run was killed or raised, and its ansible-playbook, which ansible-runner starts
in a session of its own, may go on configuring hosts with nobody to read its results: the guard
kills every process carrying the run's marker in its environment
(`GPUFLEET_ANSIBLE_RUN=<artifacts/ident>`: ansible-playbook, its forks, its ssh connections).

    python3 -I cleanup_guard.py <private data dir>/env <private data dir>/artifacts/<ident>

Standard library only, run with `-I`: it must start fast and owe nothing to the environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path

RUN_MARKER = "GPUFLEET_ANSIBLE_RUN"  # in the environment of the run's ansible-playbook
ENDED = b"ended\n"  # what a run that was not killed writes before closing the pipe
MAX_LOOKS = 50


def empty_env_dir(env_dir: Path) -> None:
    """ansible-runner reads env/ (and writes its arguments there: env/cmdline, env/envvars),
    so a file left from one run, such as a `--check`, would change the next; extravars holds
    the run's secrets."""
    if not env_dir.is_dir():
        return
    for leftover in env_dir.iterdir():
        leftover.unlink(missing_ok=True)


def forget_environment(artifact_dir: Path) -> None:
    """ansible-runner records the whole environment with the command; keep only its names.

    The caller's environment may hold credentials (cloud keys, MLFLOW_TRACKING_PASSWORD) that
    have no business in an artifact kept on disk.
    """
    command_file = artifact_dir / "command"
    try:
        record = json.loads(command_file.read_text())
    except (OSError, ValueError):  # not written yet, or cut short by the kill: nothing to keep
        if command_file.exists():
            command_file.unlink()
        return
    if isinstance(record.get("env"), dict):
        record["env"] = sorted(record["env"])
        command_file.write_text(json.dumps(record, indent=2) + "\n")


def marked_processes(marker: bytes) -> list[int]:
    """The pids of the processes whose environment holds ``marker`` (NUL-delimited text, as in
    ``/proc/<pid>/environ``; a leading NUL matches a whole variable name)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environment = b"\0" + (entry / "environ").read_bytes()
            except OSError:  # gone, or not ours to read
                continue
            if marker in environment:
                found.append(int(entry.name))
    return found


def stop_run_processes(artifact_dir: Path) -> list[int]:
    """SIGKILL to every process whose environment carries this run's marker; their pids.

    The marker names the run's own artifact directory (a new one per run), so no other run's
    processes match. Looks again until a look finds none: a process forked (an ssh, say) while
    its parent was being killed is found by the next look, and a killed process forks nothing."""
    marker = f"\0{RUN_MARKER}={artifact_dir}\0".encode()
    killed: list[int] = []
    for _ in range(MAX_LOOKS):
        new = [pid for pid in marked_processes(marker) if pid not in killed]
        if not new:
            break
        for pid in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


def main(env_dir: str, artifact_dir: str) -> None:
    # Ctrl-C in the terminal reaches the run, which cleans up itself; the guard waits for it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    said = sys.stdin.buffer.read()  # returns when the run's end of the pipe is closed
    if said != ENDED:  # the run was killed: its Ansible must not go on without it
        stop_run_processes(Path(artifact_dir))
    empty_env_dir(Path(env_dir))
    forget_environment(Path(artifact_dir))


if __name__ == "__main__":
    main(*sys.argv[1:3])
