"""Run a real, local ``tritonserver`` against a model repository.

gpufleet generates Triton model repositories (``config.pbtxt`` plus model files). This module
starts the Triton binary that ships in the ``nvidia-pytriton`` wheel on loopback ports, so that
validation and tests can check a repository the way production Triton sees it: does every model
load, which config does Triton resolve, does inference work. It needs neither a GPU nor a
container; Triton's Python backend runs on the CPU.

Typical use::

    with LocalTritonServer(repo, work_dir) as server:   # raises TritonStartError on failure
        server.model_config("my_model")
"""

from __future__ import annotations

import dataclasses
import http.client
import importlib.util
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self

from generators.serving_stack.secret_args import (
    hide_secret_args,
    redirect_secret_args,
    trace_me,
)
from validation.loopback import (
    LOOPBACK,
    die_with_parent,
    http_request,
    pick_free_ports,
    stop_process_group,
)

INSTALL_HINT = "pip install nvidia-pytriton"
STUB_NAME = "triton_python_backend_stub"

_POLL_INTERVAL_S = 0.25
_SETTLE_S = 0.5  # see _ports_settled
# Short: during a port race the health probe may reach some other process that never answers.
_PROBE_TIMEOUT_S = 2.0
_REQUEST_TIMEOUT_S = 30.0
_LOAD_TIMEOUT_S = 600.0
# Free ports are picked by binding to port 0 and closing the socket again; another process can
# take one before Triton binds it. Triton then exits with "already in use" and we try again.
_START_ATTEMPTS = 3
_PORT_IN_USE = "already in use"
# Triton logs: "failed to start HTTP service: Unavailable - Socket '127.0.0.1:8000' already in use "
_PORT_IN_USE_LINE = re.compile(r"Socket '[^']*:(\d+)' " + re.escape(_PORT_IN_USE))
_METRICS_OFF = re.compile(r"--allow-metrics[= ](false|0)\b")
# Error-level lines look like 'E1124 08:07:30.960599 2403 model_lifecycle.cc:642] "..."'.
# Case matters: "error: creating server: ..." is Triton's, "Error: Failed to initialize NVML" is
# noise from a machine without GPUs.
_RELEVANT_LOG_LINE = re.compile(r"^E\d{4} |[Ff]ailed to load|^error: |" + re.escape(_PORT_IN_USE))
# Error-level lines Triton prints on every start on a machine without a CUDA driver.
_LOG_NOISE = ("CudaDriverHelper has not been initialized",)
_MAX_QUOTED_LINES = 40
SHARED_MEMORY_DIR = Path("/dev/shm")  # noqa: S108 - where the python backend maps its regions
_MAX_LINE_CHARS = 1000
# Loading a model runs its python code as whoever runs Triton, and shared-memory registration
# maps memory into it: both need the admin key, from any local user. Inference, health,
# metadata and statistics (the load gate's server-side split) stay open on loopback.
RESTRICTED_APIS = ("model-repository", "shared-memory")
ADMIN_KEY_HEADER = "triton-admin-key"
# Triton 2.51 reads a restricted gRPC protocol's header under this prefix.
GRPC_ADMIN_KEY_HEADER = f"triton-grpc-protocol-{ADMIN_KEY_HEADER}"
# Set in Triton's environment only; secret_args keeps the key out of its command line.
_ADMIN_KEY_VARIABLE = "GPUFLEET_TRITON_ADMIN_KEY"


class TritonError(RuntimeError):
    """Base class of this module's errors."""


class TritonUnavailableError(TritonError):
    """The Triton binary (or a file it needs) is not installed."""


class TritonStartError(TritonError):
    """tritonserver exited, or did not become ready, during start(); quotes Triton's log."""

    def __init__(self, message: str, log_path: Path) -> None:
        super().__init__(message)
        self.log_path = log_path


class TritonRequestError(TritonError):
    """An HTTP request to tritonserver failed; ``triton_message`` is Triton's own error text."""

    def __init__(self, message: str, status: int | None, triton_message: str) -> None:
        super().__init__(message)
        self.status = status
        self.triton_message = triton_message


class TritonModelControlError(TritonRequestError):
    """Loading or unloading a model failed."""


@dataclasses.dataclass(frozen=True)
class TritonBinary:
    """Where the pieces of the Triton install shipped by the nvidia-pytriton wheel live."""

    server: Path
    libs_dir: Path
    python_backend_lib: Path
    python_backend_utils: Path
    python_stub: Path

    @classmethod
    def discover(cls, python_version: tuple[int, int] | None = None) -> TritonBinary:
        """Find Triton in the installed ``pytriton`` package.

        ``python_version`` picks the Python backend stub; it defaults to the running interpreter,
        because the stub must embed the same Python that provides the models' imports.
        """
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise TritonUnavailableError(
                f"the 'pytriton' package is not installed for {sys.executable}; the tritonserver "
                f"binary ships in its wheel: {INSTALL_HINT}"
            )
        package_dir = Path(next(iter(spec.submodule_search_locations)))
        triton_dir = package_dir / "tritonserver"
        python_backend_dir = triton_dir / "backends" / "python"
        major, minor = python_version or (sys.version_info.major, sys.version_info.minor)
        stubs_dir = triton_dir / "python_backend_stubs"
        binary = cls(
            server=triton_dir / "bin" / "tritonserver",
            # auditwheel puts the shared libraries tritonserver links against next to the package.
            libs_dir=package_dir.parent / "nvidia_pytriton.libs",
            python_backend_lib=python_backend_dir / "libtriton_python.so",
            python_backend_utils=python_backend_dir / "triton_python_backend_utils.py",
            python_stub=stubs_dir / f"{major}.{minor}" / STUB_NAME,
        )
        if not binary.python_stub.is_file():
            available = sorted(p.name for p in stubs_dir.glob("*") if (p / STUB_NAME).is_file())
            raise TritonUnavailableError(
                f"nvidia-pytriton in {package_dir} has no Python backend stub for Python "
                f"{major}.{minor} (it has: {', '.join(available) or 'none'}). Use one of those "
                f"Python versions, or an nvidia-pytriton release that supports {major}.{minor}: "
                f"{INSTALL_HINT}"
            )
        missing = [
            str(path)
            for path in (
                binary.server,
                binary.libs_dir,
                binary.python_backend_lib,
                binary.python_backend_utils,
            )
            if not path.exists()
        ]
        if missing:
            raise TritonUnavailableError(
                f"the nvidia-pytriton install in {package_dir} is incomplete, missing: "
                f"{', '.join(missing)}. Reinstall it: {INSTALL_HINT}"
            )
        return binary

    def assemble_backend_dir(self, backends_dir: Path) -> Path:
        """Build a ``--backend-directory`` holding the Python backend; returns ``backends_dir``.

        Triton looks for the stub next to ``libtriton_python.so`` in ``<backends>/python/``, but
        the wheel keeps one stub per Python version in a separate folder. We copy the pieces into
        a folder of our own instead of writing into site-packages, which may be shared or
        read-only.
        """
        python_dir = backends_dir / "python"
        python_dir.mkdir(parents=True, exist_ok=True)
        # Named files only: the wheel's backend folder also holds a __pycache__ we do not want.
        for source in (self.python_backend_lib, self.python_backend_utils, self.python_stub):
            shutil.copy2(source, python_dir / source.name)
        stub = python_dir / STUB_NAME
        stub.chmod(stub.stat().st_mode | 0o111)  # Triton execs the stub as a child process.
        return backends_dir

    def environment(self) -> dict[str, str]:
        """Environment for the tritonserver process: ours, plus its libraries and Python."""
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = _prepend_path(str(self.libs_dir), env.get("LD_LIBRARY_PATH"))
        # The stub imports numpy (and the models' imports) through the first python3 on PATH.
        # Not resolved on purpose: a venv's python is a symlink, and only the link is in the venv.
        env["PATH"] = _prepend_path(str(Path(sys.executable).parent), env.get("PATH"))
        return env


class Ports(NamedTuple):
    """The loopback ports of one tritonserver."""

    http: int
    grpc: int
    metrics: int


class LocalTritonServer:
    """A tritonserver child process on loopback ports, in explicit model-control mode.

    ``load_models`` names the models loaded at start (None: every model in the repository,
    ``[]``: none, load them later with ``load_model``). Ports left as None are picked free.
    ``extra_args`` are appended to Triton's command line last. With ``stop_with_parent`` (the
    default) the kernel stops Triton when the process that started it dies, even by SIGKILL, so
    a killed test run leaves no server behind; pass False for a server meant to outlive it.
    Use as a context manager, or call ``start()`` and ``stop()``. Everything Triton prints goes
    to ``log_path`` in ``work_dir``.

    The repository and shared-memory APIs (``RESTRICTED_APIS``) answer only requests with the
    ``triton-admin-key`` header set to ``admin_key``: a fresh random key unless one is given.
    This object's own requests send it. The key is in no command line (secret_args.py).
    """

    def __init__(
        self,
        model_repository: Path,
        work_dir: Path,
        *,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        load_models: Sequence[str] | None = None,
        startup_timeout_s: float = 120.0,
        extra_args: Sequence[str] = (),
        binary: TritonBinary | None = None,
        stop_with_parent: bool = True,
        admin_key: str | None = None,
    ) -> None:
        self.admin_key = admin_key or secrets.token_urlsafe(32)
        self.model_repository = Path(model_repository).resolve()
        self.work_dir = Path(work_dir).resolve()
        self.load_models = None if load_models is None else list(load_models)
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = list(extra_args)
        self.stop_with_parent = stop_with_parent
        # Names the python backend's shared-memory regions of this server, for stop() to clean.
        self.shm_prefix = f"gpufleet_{uuid.uuid4().hex[:12]}_"
        self._requested_ports = (http_port, grpc_port, metrics_port)
        self._binary = binary
        self._ports: Ports | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._attached_is_running: Callable[[], bool] | None = None

    @classmethod
    def attach(
        cls,
        model_repository: Path,
        work_dir: Path,
        ports: Ports,
        is_running: Callable[[], bool],
        admin_key: str | None = None,
    ) -> LocalTritonServer:
        """A handle on a tritonserver another process started (``gpufleet up`` before), with
        the admin key it was started with.

        Its HTTP API methods work while ``is_running()`` says the server runs; ``start`` and
        ``stop`` do not apply: stop it through whoever owns its process.
        """
        server = cls(model_repository, work_dir, admin_key=admin_key)
        server._ports = ports
        server._attached_is_running = is_running
        return server

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start tritonserver and wait until it reports ready (all startup models loaded).

        Raises TritonStartError, quoting Triton's log and repository index, if the process exits
        or is not ready within ``startup_timeout_s``; the process is stopped in that case.
        """
        if self.running:
            raise TritonError(f"tritonserver is already running (pid {self._pid})")
        if not self.model_repository.is_dir():
            raise TritonStartError(
                f"model repository {self.model_repository} is not a directory", self.log_path
            )
        binary = self._binary = self._binary or TritonBinary.discover()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        backends_dir = binary.assemble_backend_dir(self.work_dir / "backends")
        for attempt in range(1, _START_ATTEMPTS + 1):
            self._ports = self._choose_ports()
            self._launch(binary, backends_dir)
            try:
                self._wait_until_ready()
                return
            except BaseException as exc:  # also KeyboardInterrupt: never leave Triton behind
                self.stop()
                retry = isinstance(exc, TritonStartError) and self._lost_port_race()
                if not retry or attempt == _START_ATTEMPTS:
                    raise

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop tritonserver: SIGTERM to its process group, SIGKILL after ``timeout_s``.

        Idempotent. Signals only the process group this object started (whose id is the pid
        of tritonserver), which also holds the Python backend stubs Triton spawned.
        """
        process, self._process = self._process, None
        if process is None:
            return
        # Also a stub that outlived a tritonserver which exited on its own (after a failed load).
        stop_process_group(process, timeout_s)
        # A stub killed before it unmapped its shared memory (Triton killed or stopped mid-load)
        # leaves its region in /dev/shm; the prefix names this server's regions and no other's.
        for region in SHARED_MEMORY_DIR.glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)

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
        if self._attached_is_running is not None:
            return self._attached_is_running()
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """Pid of the last tritonserver started (kept after stop(), so callers can check it)."""
        return self._pid

    @property
    def ports(self) -> Ports:
        if self._ports is None:
            raise TritonError("tritonserver has not been started, so it has no ports yet")
        return self._ports

    @property
    def http_url(self) -> str:
        return f"{LOOPBACK}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"{LOOPBACK}:{self.ports.metrics}"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "tritonserver.log"

    def log_text(self) -> str:
        """Everything tritonserver printed so far (stdout and stderr), or "" before start."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- Triton's HTTP API -------------------------------------------------------------------

    def is_ready(self) -> bool:
        return self.running and self._status("/v2/health/ready") == 200

    def repository_index(self) -> list[dict[str, Any]]:
        """POST /v2/repository/index: name, version, state and reason of each model."""
        index = self._call("POST", "/v2/repository/index", "could not read the repository index")
        return list(index or [])

    def model_config(self, name: str) -> dict[str, Any]:
        """GET /v2/models/{name}/config: the config Triton resolved (with auto-completed fields)."""
        config = self._call("GET", f"/v2/models/{_quote(name)}/config", f"no config for {name!r}")
        return dict(config)

    def model_statistics(self, name: str) -> dict[str, Any]:
        """GET /v2/models/{name}/stats: inference counts and timings."""
        stats = self._call("GET", f"/v2/models/{_quote(name)}/stats", f"no stats for {name!r}")
        return dict(stats)

    def load_model(self, name: str, config: str | None = None) -> None:
        """Load (or reload) a model from the repository; raises TritonModelControlError.

        ``config``: Triton's JSON model config to use instead of the repository's
        ``config.pbtxt`` (the load API's ``parameters.config`` override; nothing is written).
        """
        body = None
        if config is not None:
            body = json.dumps({"parameters": {"config": config}}).encode()
        try:
            self._call(
                "POST",
                f"/v2/repository/models/{_quote(name)}/load",
                f"could not load model {name!r}",
                error=TritonModelControlError,
                timeout_s=_LOAD_TIMEOUT_S,
                body=body,
            )
        except TritonModelControlError as exc:
            # A config Triton cannot parse or validate fails while the repository is polled: the
            # HTTP answer only says "failed to poll", the reason is in the log.
            marker = f"Poll failed for model directory '{name}': "
            reasons = [
                line.split(marker, 1)[1].rstrip('"')
                for line in self.log_text().splitlines()
                if marker in line
            ]
            if not reasons:
                raise
            raise TritonModelControlError(
                f"{exc}: {reasons[-1]}", exc.status, f"{exc.triton_message}: {reasons[-1]}"
            ) from exc

    def unload_model(self, name: str, timeout_s: float = _LOAD_TIMEOUT_S) -> None:
        """Unload a model and wait until it is unloaded.

        Raises TritonModelControlError if the repository has no such model, or Triton refuses.
        """
        # Triton answers 200 to unloading a model it has never heard of; say so instead.
        if name not in {entry.get("name") for entry in self.repository_index()}:
            raise TritonModelControlError(
                f"could not unload model {name!r}: there is no such model in "
                f"{self.model_repository}",
                status=None,
                triton_message="",
            )
        self._call(
            "POST",
            f"/v2/repository/models/{_quote(name)}/unload",
            f"could not unload model {name!r}",
            error=TritonModelControlError,
            timeout_s=timeout_s,
        )
        # Unlike load, Triton's unload returns at once, with the model still UNLOADING.
        deadline = time.monotonic() + timeout_s
        while self._is_unloading(name):
            if time.monotonic() > deadline:
                raise TritonModelControlError(
                    f"model {name!r} was still unloading after {timeout_s:g} s", None, ""
                )
            time.sleep(_POLL_INTERVAL_S)

    # -- internals ---------------------------------------------------------------------------

    @property
    def _admin_header(self) -> dict[str, str]:
        return {ADMIN_KEY_HEADER: self.admin_key}

    def _is_unloading(self, name: str) -> bool:
        return any(
            entry.get("name") == name and entry.get("state") == "UNLOADING"
            for entry in self.repository_index()
        )

    def _lost_port_race(self) -> bool:
        """Whether Triton exited because a port we picked was taken (not one the caller gave)."""
        busy = {int(port) for port in _PORT_IN_USE_LINE.findall(self.log_text())}
        return bool(busy) and not busy & set(self._requested_ports)

    def _choose_ports(self) -> Ports:
        free = iter(pick_free_ports(self._requested_ports.count(None)))
        http, grpc, metrics = (port or next(free) for port in self._requested_ports)
        return Ports(http, grpc, metrics)

    def _launch(self, binary: TritonBinary, backends_dir: Path) -> None:
        ports = self.ports
        command = [
            str(binary.server),
            "--model-repository", str(self.model_repository),
            "--backend-directory", str(backends_dir),
            "--http-address", LOOPBACK, "--http-port", str(ports.http),
            "--grpc-address", LOOPBACK, "--grpc-port", str(ports.grpc),
            "--metrics-address", LOOPBACK, "--metrics-port", str(ports.metrics),
            "--model-control-mode", "explicit",
            "--backend-config", f"python,shm-region-prefix-name={self.shm_prefix}",
        ]  # fmt: skip
        for name in ["*"] if self.load_models is None else self.load_models:
            command += ["--load-model", name]  # '*' is passed as is: there is no shell
        # Templates: Triton's command line keeps `${...}`, its main() gets the key.
        restricted = f"{','.join(RESTRICTED_APIS)}:{ADMIN_KEY_HEADER}=${{{_ADMIN_KEY_VARIABLE}}}"
        command += [
            f"--http-restricted-api={restricted}",
            f"--grpc-restricted-protocol={restricted}",
        ]
        command += self.extra_args
        environment = {**binary.environment(), _ADMIN_KEY_VARIABLE: self.admin_key}
        hidden, environment = hide_secret_args(command, environment)
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.work_dir,
                env=environment,
                # Own process group: stop() can signal Triton and its stubs, and nothing else.
                process_group=0,
                preexec_fn=self._before_exec,
            )
        self._pid = self._process.pid
        exited = redirect_secret_args(self._pid, command[0], hidden)  # kills it on failure
        if exited is not None:  # reaped there: tell Popen how it ended
            self._process.returncode = os.waitstatus_to_exitcode(exited)

    def _before_exec(self) -> None:
        if self.stop_with_parent:
            die_with_parent()
        trace_me()

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            returncode = self._process.poll()
            if returncode is not None:
                raise self._start_error(f"tritonserver exited with code {returncode} on start")
            status = self._status("/v2/health/ready")
            if status == 200 and self._ports_settled():
                return
            # Triton loads the startup models before it opens its HTTP port, so an answer other
            # than 200 means loading is over (with --exit-on-error=false it stays up not ready).
            failures = self._model_failures() if status is not None else []
            if failures:
                raise self._start_error("tritonserver started but is not ready", failures)
            if time.monotonic() > deadline:
                raise self._start_error(
                    f"tritonserver was not ready within {self.startup_timeout_s:g} s",
                    self._model_failures() if status is not None else [],
                )
            time.sleep(_POLL_INTERVAL_S)

    def _ports_settled(self) -> bool:
        """Whether Triton is still up a moment after opening its last port, the metrics one.

        Triton answers ready on HTTP before it opens the metrics port, and logs each service as
        "Started ..." a few milliseconds before it finds the port taken and exits. So a ready
        answer alone can come from a server about to exit.
        """
        metrics_on = not _METRICS_OFF.search(" ".join(self.extra_args))
        if metrics_on and f"Started Metrics Service at {self.metrics_url}" not in self.log_text():
            return False
        time.sleep(_SETTLE_S)
        return self.running and _PORT_IN_USE not in self.log_text()

    def _model_failures(self) -> list[str]:
        """Requested models that are neither ready nor loading, with Triton's reason."""
        try:
            index = self.repository_index()
        except TritonError:
            return []
        wanted = self.load_models
        failures = []
        for entry in index:
            name, state = entry.get("name"), entry.get("state", "")
            if (wanted is None or name in wanted) and state not in ("READY", "LOADING"):
                reason = str(entry.get("reason") or "no reason given").strip()
                reason = reason.replace("\n", "\n    ")  # Python tracebacks span lines
                failures.append(
                    f"model '{name}' version {entry.get('version', '?')}: "
                    f"{state or 'NOT LOADED'}: {reason}"
                )
        return failures

    def _start_error(self, headline: str, model_failures: Sequence[str] = ()) -> TritonStartError:
        lines = self.log_text().splitlines()
        relevant = [
            line[:_MAX_LINE_CHARS]
            for line in lines
            if _RELEVANT_LOG_LINE.search(line) and not any(n in line for n in _LOG_NOISE)
        ]
        parts = [f"{headline} (model repository: {self.model_repository}; log: {self.log_path})"]
        if model_failures:
            parts.append("Models not ready, from Triton's repository index:")
            parts += [f"  {failure}" for failure in model_failures]
        if relevant:
            parts.append("Error lines from Triton's log:")
            parts += [f"  {line}" for line in relevant[:_MAX_QUOTED_LINES]]
            if len(relevant) > _MAX_QUOTED_LINES:
                parts.append(f"  ... {len(relevant) - _MAX_QUOTED_LINES} more in the log")
        else:
            parts.append("Last lines of Triton's log:")
            parts += [f"  {line[:_MAX_LINE_CHARS]}" for line in lines[-20:]] or ["  (empty)"]
        return TritonStartError("\n".join(parts), self.log_path)

    def _status(self, path: str) -> int | None:
        """HTTP status of GET path, or None while nothing answers on the HTTP port."""
        try:
            url = f"http://{self.http_url}{path}"
            return http_request("GET", url, _PROBE_TIMEOUT_S, self._admin_header)[0]
        except (OSError, http.client.HTTPException):
            return None

    def _call(
        self,
        method: str,
        path: str,
        what: str,
        *,
        error: type[TritonRequestError] = TritonRequestError,
        timeout_s: float = _REQUEST_TIMEOUT_S,
        body: bytes | None = None,
    ) -> Any:
        """Send a request to Triton and return its parsed JSON answer (None if empty)."""
        if not self.running:
            raise TritonError(f"{what}: tritonserver is not running (see {self.log_path})")
        url = f"http://{self.http_url}{path}"
        try:
            status, answer = http_request(method, url, timeout_s, self._admin_header, body)
        except (OSError, http.client.HTTPException) as exc:
            raise error(f"{what}: {method} {url} failed: {exc}", None, str(exc)) from exc
        if status != 200:
            message = _triton_error_message(answer)
            raise error(f"{what}: Triton answered HTTP {status}: {message}", status, message)
        return json.loads(answer) if answer.strip() else None


def _triton_error_message(body: bytes) -> str:
    """Triton's error text from an error response body ``{"error": "..."}``."""
    text = body.decode(errors="replace").strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        return text or "(empty response)"
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        return str(parsed["error"])
    return text


def _prepend_path(entry: str, current: str | None) -> str:
    return f"{entry}{os.pathsep}{current}" if current else entry


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")
