"""A host's gateway: the nginx container of its serving stack, reconfigured over SSH.

`apply(text)` writes the new `nginx.conf` beside the compose file (`<stack dir>/gateway/`,
mounted read-only into the container), has `nginx -t` inside the container check it before nginx
sees it, then sends the container's nginx its graceful reload (SIGHUP) and returns once the old
workers have exited, so that every request sent afterwards is routed by the new configuration. A
configuration nginx refuses is removed again and the gateway keeps running on its previous one.
The access log lives in the container (a named volume) and is read through `docker exec`.

    gateway = HostGateway(HostShell.for_host(environment, "gpu-a"), "gpufleet-lab", "/opt/...")
    gateway.apply(text)
    lines = gateway.read_log(offset=0)
"""

from __future__ import annotations

import shlex
import subprocess
import tempfile
import time
from pathlib import Path

from generators.serving_stack.files import GATEWAY_CONFIG
from generators.serving_stack.graph import GATEWAY_CONFIG_DIR, GATEWAY_LOG_DIR
from gpufleet.rebuild.remote import HostShell, RemoteError

ACCESS_LOG = f"{GATEWAY_LOG_DIR}/access.log"
RELOAD_TIMEOUT_S = 60.0
_POLL_S = 0.2
# Every process's stat line inside the container: nginx's master is its pid 1, its workers are
# the children of pid 1 (`docker exec` processes are children of pid 0 there).
_STATS = "for f in /proc/[0-9]*/stat; do cat $f 2>/dev/null; echo; done"


class HostGatewayError(Exception):
    """The host's gateway refused its configuration, is not running, or did not reload."""


class HostGateway:
    """The gateway container of one host's serving stack."""

    def __init__(
        self, shell: HostShell, project: str, stack_directory: str, worker_processes: int
    ) -> None:
        self.shell = shell
        self.project = project
        self.config = f"{stack_directory}/{GATEWAY_CONFIG}"
        self.worker_processes = worker_processes

    def apply(self, text: str) -> None:
        """Check `text` with nginx, put it in place, reload gracefully; HostGatewayError when
        nginx refuses it (the running gateway keeps its previous configuration)."""
        container = self._container()
        staged = f"{self.config}.new"
        inside = f"{GATEWAY_CONFIG_DIR}/{Path(staged).name}"
        with tempfile.NamedTemporaryFile("w", suffix=".conf", encoding="utf-8") as local:
            local.write(text)
            local.flush()
            self._run_stream(f"install -m 0644 /dev/stdin {shlex.quote(staged)}", Path(local.name))
        checked = self._run(
            f"docker exec {container} nginx -t -q -c {shlex.quote(inside)}", check=False
        )
        if checked.returncode != 0:
            self._run(f"rm -f {shlex.quote(staged)}", check=False)
            raise HostGatewayError(
                f"{self.shell.name}: nginx refused the gateway configuration, which was not "
                f"applied: {(checked.stderr or checked.stdout).strip()}"
            )
        self._run(f"mv -f {shlex.quote(staged)} {shlex.quote(self.config)}")
        old_workers = self._workers(container)
        self._run(f"docker kill --signal HUP {container}")
        deadline = time.monotonic() + RELOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            now = self._workers(container)
            if not (now & old_workers) and len(now) >= self.worker_processes:
                return
            time.sleep(_POLL_S)
        raise HostGatewayError(
            f"{self.shell.name}: the gateway still runs workers of its previous configuration "
            f"after {RELOAD_TIMEOUT_S:.0f} s (long requests?); see {GATEWAY_LOG_DIR}/error.log "
            "in its container"
        )

    def log_size(self) -> int:
        """Where the next request's line will start in the access log (0: no log yet)."""
        container = self._container()
        found = self._run(f"docker exec {container} stat -c %s {ACCESS_LOG}", check=False)
        return int(found.stdout.strip()) if found.returncode == 0 else 0

    def read_log(self, offset: int) -> list[bytes]:
        """The access log's lines from byte `offset` on."""
        container = self._container()
        read = self._run(f"docker exec {container} tail -c +{offset + 1} {ACCESS_LOG}", check=False)
        if read.returncode != 0:
            return []
        return [line.encode() for line in read.stdout.splitlines()]

    def _workers(self, container: str) -> set[int]:
        listed = self._run(f"docker exec {container} sh -c {shlex.quote(_STATS)}").stdout
        workers = set()
        for line in listed.splitlines():
            if ")" not in line:
                continue
            pid = int(line.split(" ", 1)[0])
            fields = line[line.rindex(")") + 2 :].split()
            if fields[0] != "Z" and int(fields[1]) == 1:
                workers.add(pid)
        return workers

    def _container(self) -> str:
        listed = self._run(
            "docker ps -q --filter label=com.docker.compose.project="
            f"{self.project} --filter label=com.docker.compose.service=gateway"
        ).stdout.split()
        if len(listed) != 1:
            raise HostGatewayError(
                f"{self.shell.name}: {len(listed) or 'no'} running gateway container(s) of "
                f"{self.project}; bring the stack up with `gpufleet up`"
            )
        return listed[0]

    def _run(self, command: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        try:
            return self.shell.run(command, timeout=120, check=check)
        except RemoteError as error:
            raise HostGatewayError(str(error)) from None

    def _run_stream(self, command: str, path: Path) -> None:
        try:
            self.shell.stream_from_file(command, path, timeout=120)
        except RemoteError as error:
            raise HostGatewayError(str(error)) from None
