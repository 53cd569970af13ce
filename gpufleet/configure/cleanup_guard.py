"""Remove what a `gpufleet configure` run leaves on disk that must not outlive it, even when the
run is killed with SIGKILL and its own `finally` never runs.

`gpufleet configure` starts this file as a separate process (its own session, so a signal to
the run's process group does not reach it) with a pipe on its stdin that only the run holds.
When the run ends in any way, the kernel closes the pipe; the guard reads end-of-file and then
empties the run's `env/` directory (the 0600 extravars with the secrets) and reduces the
environment ansible-runner recorded in `artifacts/<ident>/command` to variable names. The run
does the same itself when it ends normally; doing it twice is harmless.

    python3 -I cleanup_guard.py <private data dir>/env <private data dir>/artifacts/<ident>

Standard library only, run with `-I`: it must start fast and owe nothing to the environment.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path


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


def main(env_dir: str, artifact_dir: str) -> None:
    # Ctrl-C in the terminal reaches the run, which cleans up itself; the guard waits for it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdin.buffer.read()  # returns when the run's end of the pipe is closed
    empty_env_dir(Path(env_dir))
    forget_environment(Path(artifact_dir))


if __name__ == "__main__":
    main(*sys.argv[1:3])
