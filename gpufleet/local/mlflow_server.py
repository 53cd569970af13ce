"""Run a real MLflow tracking server with its model registry on this machine (sqlite, loopback).

The local stack keeps its registry in `<state_dir>/mlflow/`: the sqlite database, the artifacts
the server stores for its clients, and the server's log. The server runs in a process group of
its own, so whoever knows its pid can stop it and everything it spawned, also from another
process (`gpufleet down` after `gpufleet up`).

Given credentials, it runs MLflow's basic-auth app: every request but /health needs them (401
without), and the user is the admin of `<store>/basic_auth.db`, created on the first start. The
password reaches the server through its environment only (MLFLOW_AUTH_ADMIN_PASSWORD), never a
command line or a file of ours; `basic_auth.ini` holds no secret.

    server = LocalMlflowServer(
        Path("build/local/mlflow"), port=15000, stop_with_parent=False, credentials=credentials
    )
    server.start()            # raises MlflowServerError quoting the server's log
    print(server.url, server.pid)
    server.stop()
"""

from __future__ import annotations

import http.client
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from gpufleet.local.credentials import PASSWORD_VARIABLE, USERNAME_VARIABLE, BasicCredentials
from validation.loopback import (
    LOOPBACK,
    die_with_parent,
    http_request,
    pick_free_ports,
    stop_process_group,
)

INSTALL_HINT = "pip install 'gpufleet[local]'"
LOG_FILE = "mlflow-server.log"
DATABASE_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
AUTH_CONFIG_FILE = "basic_auth.ini"
AUTH_DATABASE_FILE = "basic_auth.db"
# A request every client makes; without credentials the basic-auth app answers it 401.
PROTECTED_PATH = "/api/2.0/mlflow/registered-models/search"

_POLL_INTERVAL_S = 0.25
_PROBE_TIMEOUT_S = 2.0
_QUOTED_LOG_LINES = 20
# A picked port can be taken by another process before uvicorn binds it; then we try again.
_START_ATTEMPTS = 3
_PORT_IN_USE = "address already in use"
# MLflow's job runner (GenAI scorers, trace archival) starts eight huey worker processes that the
# model registry does not need. Telemetry would call out to mlflow-telemetry.io, and waiting
# for it made the server take seconds to exit.
_SERVER_ENVIRONMENT = {
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


class MlflowServerError(RuntimeError):
    """The MLflow server could not start; the message quotes the end of its log."""


class LocalMlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite backend and proxied artifacts in `store_dir`;
    with `credentials`, MLflow's basic-auth app with that user as its admin.

    With `stop_with_parent` (the default) the kernel stops the server when the process that
    started it dies; pass False for a server meant to outlive it (then stop it by pid with
    `os.killpg`). A port left as None is picked free.
    """

    def __init__(
        self,
        store_dir: Path,
        port: int | None = None,
        *,
        stop_with_parent: bool = True,
        startup_timeout_s: float = 180,  # the basic-auth app takes a minute on a busy machine
        credentials: BasicCredentials | None = None,
    ) -> None:
        self.store_dir = Path(store_dir).resolve()
        self.credentials = credentials
        self.stop_with_parent = stop_with_parent
        self.startup_timeout_s = startup_timeout_s
        self._requested_port = port
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the server and wait until GET /health answers 200.

        Raises MlflowServerError, quoting the server's log, when it exits or does not answer
        within `startup_timeout_s`; what was started is stopped then.
        """
        if self.running:
            raise MlflowServerError(f"the MLflow server is already running (pid {self._pid})")
        executable = Path(sys.executable).parent / "mlflow"
        if not executable.is_file():
            raise MlflowServerError(
                f"no mlflow command beside {sys.executable}; install it: {INSTALL_HINT}"
            )
        self.store_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, _START_ATTEMPTS + 1):
            self._port = self._requested_port or pick_free_ports(1)[0]
            self._refuse_busy_port()
            self._launch(executable)
            try:
                self._wait_until_healthy()
                return
            except BaseException as error:  # also KeyboardInterrupt: never leave it behind
                self.stop()
                if attempt == _START_ATTEMPTS or not self._lost_port_race(error):
                    raise

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the server's process group, SIGKILL after `timeout_s`. Idempotent."""
        process, self._process = self._process, None
        if process is None:
            return
        # `mlflow server` runs uvicorn as its child, which may outlive a parent that exited.
        stop_process_group(process, timeout_s)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- state -------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """Pid of the last server started, also its process group id (kept after stop())."""
        return self._pid

    @property
    def port(self) -> int:
        if self._port is None:
            raise MlflowServerError("the MLflow server has not been started, so it has no port")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.store_dir / LOG_FILE

    def log_text(self) -> str:
        """Everything the server printed so far, or "" before start."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- internals ---------------------------------------------------------------------------

    def _refuse_busy_port(self) -> None:
        """Fail now on a port something listens on: its /health could answer in our place."""
        with socket.socket() as probe:
            # As uvicorn binds: connections of a server stopped a moment ago linger in
            # TIME_WAIT for a minute and do not count; a listener does (Linux refuses the bind
            # then, SO_REUSEADDR or not).
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((LOOPBACK, self.port))
            except OSError as error:
                raise MlflowServerError(
                    f"cannot start the MLflow server on {LOOPBACK}:{self.port}: {error.strerror}; "
                    "stop what listens there or choose another port"
                ) from None

    def _lost_port_race(self, error: BaseException) -> bool:
        """Whether uvicorn found the port we picked (not one the caller gave) taken."""
        return (
            isinstance(error, MlflowServerError)
            and self._requested_port is None
            and _PORT_IN_USE in self.log_text()
        )

    def _launch(self, executable: Path) -> None:
        command = [
            str(executable), "server",
            "--host", LOOPBACK, "--port", str(self.port),
            "--backend-store-uri", f"sqlite:///{self.store_dir / DATABASE_FILE}",
            "--artifacts-destination", str(self.store_dir / ARTIFACTS_DIR),
            "--workers", "1",
        ]  # fmt: skip
        environment = {**os.environ, **_SERVER_ENVIRONMENT}
        for client_only in (USERNAME_VARIABLE, PASSWORD_VARIABLE):  # the server needs neither
            environment.pop(client_only, None)
        if self.credentials is not None:
            command += ["--app-name", "basic-auth"]
            environment.update(self._auth_environment(self.credentials))
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.store_dir,
                env=environment,
                # Own process group: stop() (or another process, by pid) signals it and its
                # uvicorn child, and nothing else.
                process_group=0,
                preexec_fn=die_with_parent if self.stop_with_parent else None,
            )
        self._pid = self._process.pid

    def _auth_environment(self, credentials: BasicCredentials) -> dict[str, str]:
        """The basic-auth app's settings: the config file (no secret in it), the admin's
        password and the CSRF key of its login forms (environment only)."""
        config = self.store_dir / AUTH_CONFIG_FILE
        config.write_text(
            "[mlflow]\n"
            # Only the admin exists; any user added later gets no permission until granted one.
            "default_permission = NO_PERMISSIONS\n"
            f"database_uri = sqlite:///{self.store_dir / AUTH_DATABASE_FILE}\n"
            f"admin_username = {credentials.username}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
            encoding="utf-8",
        )
        return {
            "MLFLOW_AUTH_CONFIG_PATH": str(config),
            "MLFLOW_AUTH_ADMIN_PASSWORD": credentials.password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
        }

    def _wait_until_healthy(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            returncode = self._process.poll()
            if returncode is not None:
                raise self._start_error(f"exited with code {returncode} on start")
            if self._health_status() == 200 and self._listening():
                return
            if time.monotonic() > deadline:
                raise self._start_error(
                    f"did not answer GET /health within {self.startup_timeout_s:g} s"
                )
            time.sleep(_POLL_INTERVAL_S)

    def _listening(self) -> bool:
        """Whether our uvicorn bound the port: the /health answer could come from a server that
        took the port first (uvicorn then exits with "address already in use")."""
        return f"Uvicorn running on {self.url}" in self.log_text()

    def _health_status(self) -> int | None:
        try:
            return http_request("GET", f"{self.url}/health", _PROBE_TIMEOUT_S)[0]
        except (OSError, http.client.HTTPException):
            return None

    def _start_error(self, what: str) -> MlflowServerError:
        lines = self.log_text().splitlines()[-_QUOTED_LOG_LINES:] or ["(empty)"]
        quoted = "\n".join(f"  {line}" for line in lines)
        return MlflowServerError(
            f"the MLflow server on {self.url} {what} (log: {self.log_path}); its last lines:\n"
            f"{quoted}"
        )


def requires_authentication(url: str, timeout_s: float = _PROBE_TIMEOUT_S) -> bool:
    """Whether the MLflow server at `url` answers a registry request without credentials 401
    (False also when it does not answer)."""
    try:
        return http_request("GET", f"{url}{PROTECTED_PATH}", timeout_s)[0] == 401
    except (OSError, http.client.HTTPException):
        return False
