"""The local stack's gateway: Debian's nginx on loopback, started, reloaded and checked here.

`apply(routes)` renders the configuration (generators/gateway.py), has `nginx -t` check it
before anything else sees it, then starts nginx or reloads it. A reload is nginx's own graceful
one (SIGHUP): new workers take new connections while the old ones finish the requests they
hold, so no request fails; `apply` returns once the old workers have exited, so every request
sent afterwards is routed by the new configuration.

    gateway = LocalGateway(paths, settings)
    pid = gateway.apply(routes, running=record)   # record: the ServerRecord of a running nginx
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from generators.gateway import GatewaySettings, ModelRoute, render_gateway_config
from generators.model_repository import write_atomically
from gpufleet.local.run_state import ServerRecord, process_start_ticks

NGINX = "nginx"
START_TIMEOUT_S = 20.0
RELOAD_TIMEOUT_S = 60.0
_POLL_S = 0.05


class GatewayError(Exception):
    """nginx is missing, refused the configuration, or did not start; the message says why."""


@dataclass(frozen=True)
class GatewayFiles:
    """Where the local gateway keeps its configuration, logs and temporary files."""

    work_dir: Path

    @property
    def config(self) -> Path:
        return self.work_dir / "nginx.conf"

    @property
    def access_log(self) -> Path:
        return self.work_dir / "access.log"

    @property
    def error_log(self) -> Path:
        return self.work_dir / "error.log"

    @property
    def server_log(self) -> Path:
        return self.work_dir / "nginx.out"


def gateway_settings(
    files: GatewayFiles,
    *,
    http_port: int,
    grpc_port: int,
    triton_http: int,
    triton_grpc: int,
    worker_processes: int,
) -> GatewaySettings:
    """The local gateway's settings: everything on 127.0.0.1."""
    return GatewaySettings(
        http_listen=f"127.0.0.1:{http_port}",
        grpc_listen=f"127.0.0.1:{grpc_port}",
        triton_http=f"127.0.0.1:{triton_http}",
        triton_grpc=f"127.0.0.1:{triton_grpc}",
        work_dir=str(files.work_dir.resolve()),
        access_log=str(files.access_log.resolve()),
        error_log=str(files.error_log.resolve()),
        worker_processes=worker_processes,
    )


class LocalGateway:
    """nginx as one process group of this machine, configured from routes."""

    def __init__(self, files: GatewayFiles, settings: GatewaySettings) -> None:
        self.files = files
        self.settings = settings

    def apply(self, routes: Sequence[ModelRoute], running: ServerRecord | None) -> int:
        """Configure the gateway for `routes`: start nginx, or reload the running one.

        Returns the pid of nginx's master process. Raises GatewayError, leaving a running
        gateway on its previous configuration, when nginx refuses the new one.
        """
        executable = shutil.which(NGINX) or (
            "/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None
        )
        if executable is None:
            raise GatewayError(
                "nginx is not installed; install Debian's package (apt-get install nginx, "
                "scripts/system-packages.sh)"
            )
        self.files.work_dir.mkdir(parents=True, exist_ok=True)
        text = render_gateway_config(self.settings, routes)
        staged = self.files.work_dir / "nginx.conf.new"
        write_atomically(staged, text)
        self._check(executable, staged)
        os.replace(staged, self.files.config)
        if running is not None and running.alive:
            self._reload(running.pid)
            return running.pid
        return self._start(executable)

    def _check(self, executable: str, config: Path) -> None:
        completed = subprocess.run(
            [executable, *self._arguments(config), "-t", "-q"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if completed.returncode != 0:
            config.unlink(missing_ok=True)
            raise GatewayError(
                f"nginx refused the generated gateway configuration: "
                f"{(completed.stderr or completed.stdout).strip()}"
            )

    def _start(self, executable: str) -> int:
        with self.files.server_log.open("ab") as log:
            process = subprocess.Popen(
                [executable, *self._arguments(self.files.config), "-g", "daemon off;"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # its own process group: `down` stops all of it
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise GatewayError(
                    f"nginx exited at start (status {process.returncode}); see "
                    f"{self.files.error_log} and {self.files.server_log}"
                )
            if len(_children(process.pid)) >= self.settings.worker_processes:
                return process.pid
            time.sleep(_POLL_S)
        process.kill()
        raise GatewayError(f"nginx started no workers in {START_TIMEOUT_S:.0f} s")

    def _reload(self, pid: int) -> None:
        """SIGHUP, then wait until only workers of the new configuration are left."""
        old_workers = set(_children(pid))
        os.kill(pid, 1)  # SIGHUP: nginx's graceful reload
        deadline = time.monotonic() + RELOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            now = set(_children(pid))
            if not (now & old_workers) and len(now) >= self.settings.worker_processes:
                return
            time.sleep(_POLL_S)
        raise GatewayError(
            f"nginx (pid {pid}) still runs workers of its previous configuration after "
            f"{RELOAD_TIMEOUT_S:.0f} s (long requests?); see {self.files.error_log}"
        )

    def _arguments(self, config: Path) -> list[str]:
        work = str(self.files.work_dir.resolve())
        return ["-p", work, "-e", str(self.files.error_log.resolve()), "-c", str(config.resolve())]


def _children(pid: int) -> list[int]:
    """Live child processes of `pid` (nginx's workers; its cache helpers too)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[1]) == pid and process_start_ticks(int(entry.name)):
            found.append(int(entry.name))
    return found
