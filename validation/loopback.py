"""Servers on loopback as child processes: free ports, process groups, plain HTTP probes.

Shared by the local Triton and MLflow launchers (validation/tritonserver.py,
gpufleet/local/mlflow_server.py) and by `gpufleet down`, which stops what they started.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import urllib.error
import urllib.request

LOOPBACK = "127.0.0.1"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

# Requests go straight to loopback: an http_proxy set in the environment must not apply.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_request(
    method: str,
    url: str,
    timeout_s: float,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, bytes]:
    data = body if body is not None else (b"" if method == "POST" else None)
    # Callers only build http://127.0.0.1:<port>/... URLs, so no file: or other schemes.
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})  # noqa: S310
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, bytes(exc.read())


def pick_free_ports(count: int) -> list[int]:
    """Ports the kernel calls free right now; all bound at once so that they are distinct."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((LOOPBACK, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when its parent thread exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group is already gone
        os.killpg(pgid, signum)


def stop_process_group(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM the group `process` leads, SIGKILL after `timeout_s`; then SIGKILL what is left
    of the group (a child can outlive a leader that exited on its own)."""
    if process.poll() is None:
        signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            signal_group(process.pid, signal.SIGKILL)
            process.wait()
    signal_group(process.pid, signal.SIGKILL)
