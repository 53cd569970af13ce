"""`gpufleet up`, `down` and `validate` for a local stack: registry, repository, Triton, gates.

`up` runs these steps, each reported as it starts and ends:

1. registry: the stack's MLflow server (sqlite, loopback), started unless already running;
2. demo models: `seed_demo` for every model the registry does not have yet;
3. model repository: registry versions exported into `<repository>/<model>/<version>/`, then
   the `config.pbtxt` files generated from the specs;
4. triton: started on the stack's loopback ports with the stack's models loaded, or, when it
   already runs, told to reload only the models whose files changed. Each start gets a new
   admin key (its repository and shared-memory APIs need it), kept in
   `<state_dir>/triton-admin-key` (0600) for the next `up`'s reloads;
5. gateway (stacks with `gpufleet:gateway`): nginx in front of Triton on loopback, routing each
   model's requests as its rollout says (gpufleet/rollout/, docs/rollout.md);
6. gates: the stack's validation gates (see validation/gates.py).

A model with an active rollout (`<state_dir>/rollout/<model>.json`) is served at both its
stable and its candidate version, whatever its spec's version policy says.

Servers are recorded in `<state_dir>/run-state.json` (gpufleet/local/run_state.py) the moment
they start; `down` stops what is recorded there and nothing else. A failed `up` stops the servers
it started itself before it reports the error, so nothing is leaked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from generators.registry_repository import fill_repository
from gpufleet.drift.triton import (
    ConvergeError,
    TritonFindings,
    TritonTarget,
    check_triton,
    converge_triton,
    expected_models,
)
from gpufleet.local.credentials import (
    BasicCredentials,
    CredentialsError,
    from_environment,
    kept_from_children,
    stack_credentials,
    use_for_mlflow_client,
)
from gpufleet.local.mlflow_server import LocalMlflowServer, requires_authentication
from gpufleet.local.run_state import STATE_FILE, RunState, ServerRecord
from gpufleet.registry.client import ModelRegistry, RegistryVersion, registered_model_name
from gpufleet.registry.demo import seed_demo
from gpufleet.rollout.local_gateway import (
    GatewayError,
    GatewayFiles,
    LocalGateway,
    gateway_settings,
)
from gpufleet.rollout.state import RolloutRecord, active_records, served_specs
from gpufleet.spec.loading import LoadedModelSpec, LoadedStackSpec
from gpufleet.spec.stack import GateName
from validation.gates import GateContext, run_gates
from validation.host import ExpectedProcess
from validation.report import GateReport
from validation.tritonserver import GRPC_ADMIN_KEY_HEADER, LocalTritonServer, Ports, TritonError

Say = Callable[[str], None]
TRITON, MLFLOW, GATEWAY = "triton", "mlflow", "gateway"
EXECUTABLES = {
    TRITON: "tritonserver",
    MLFLOW: "mlflow",
    GATEWAY: "nginx",
}  # what the host gate expects each runs


class StackRunError(Exception):
    """The stack could not be brought up or checked (exit 2); the message says what to do."""


@dataclass(frozen=True)
class LocalPaths:
    """Where a local stack keeps its servers' data, logs, run state and reports."""

    root: Path

    @property
    def state_file(self) -> Path:
        return self.root / STATE_FILE

    @property
    def mlflow_store(self) -> Path:
        return self.root / "mlflow"

    @property
    def triton_work(self) -> Path:
        return self.root / "triton"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def triton_admin_key(self) -> Path:
        return self.root / "triton-admin-key"

    @property
    def gateway(self) -> GatewayFiles:
        return GatewayFiles(self.root / "gateway")


class LocalStack:
    """One local stack: its specs, its servers on this machine and its gates."""

    def __init__(
        self, stack: LoadedStackSpec, specs: Sequence[LoadedModelSpec], *, say: Say = print
    ) -> None:
        if stack.spec.environment != "local":
            next_step = (
                f"configure its hosts with `gpufleet configure --stack {stack.name}`"
                if stack.spec.environment == "static"
                else f"provision it with `pulumi up -s {stack.name}`"
            )
            raise StackRunError(
                f"stack {stack.name!r} is a {stack.spec.environment} stack; `gpufleet up` runs "
                f"local stacks: {next_step}"
            )
        self.stack = stack
        self.specs = list(specs)
        self.say = say
        self.paths = LocalPaths(Path(stack.spec.resolved_state_dir(stack.name)))
        self.repository = Path(stack.spec.model_repository)
        self._started: list[ServerRecord] = []

    # -- commands ----------------------------------------------------------------------------

    def up(
        self, gates: Sequence[GateName] | None = None, *, load_engine: str | None = None
    ) -> list[GateReport]:
        """Bring the stack up (changing only what differs), then run its gates."""
        with self._locked():
            state = self._load_state()
            try:
                with self._step("registry"):
                    registry = self._registry(self._ensure_mlflow(state))
                with self._step("demo models"):
                    self._seed_missing_models(registry)
                with self._step("model repository"):
                    changed, removed = self._assemble(registry)
                with self._step("triton"):
                    self._ensure_triton(state, changed, removed, registry)
                if self.stack.spec.gateway is not None:
                    with self._step("gateway"):
                        self._ensure_gateway(state)
            except BaseException:
                self._stop_started(state)
                raise
        return self.validate(gates, state=state, registry=registry, load_engine=load_engine)

    def refresh_models(self) -> set[str]:
        """Bring the running Triton's repository in line with the specs and active rollouts:
        export the versions now wanted, reload the models whose files changed (Triton keeps
        serving a model's old versions until its new ones are ready). Returns those models."""
        with self._locked():
            state = self._load_state()
            record = state.running(TRITON)
            if record is None:
                raise StackRunError(
                    f"Triton of stack {self.stack.name!r} is not running; start it with "
                    f"`gpufleet up --stack {self.stack.name}`"
                )
            registry = self._registry(self._tracking_uri(state))
            changed, removed = self._assemble(registry)
            self._ensure_triton(state, changed, removed, registry)
            return changed

    def apply_gateway(self) -> int:
        """Start or gracefully reload the gateway with the routes of the active rollouts;
        returns nginx's pid. Raises StackRunError when the stack has no gateway."""
        with self._locked():
            state = self._load_state()
            return self._ensure_gateway(state)

    def running_server(self, name: str) -> ServerRecord | None:
        """The recorded server `name` (triton, mlflow, gateway) if it runs."""
        return self._load_state().running(name)

    def registry(self) -> ModelRegistry:
        """The stack's registry client (with the stack's credentials for its own MLflow)."""
        return self._registry(self._tracking_uri(self._load_state()))

    def validate(
        self,
        gates: Sequence[GateName] | None = None,
        *,
        state: RunState | None = None,
        registry: ModelRegistry | None = None,
        load_engine: str | None = None,
    ) -> list[GateReport]:
        """Run the stack's gates (or `gates`) against what runs now; write their reports."""
        state = state or self._load_state()
        triton = state.servers.get(TRITON)  # also when it died: the host gate says so
        if triton is None:
            raise StackRunError(
                f"nothing of stack {self.stack.name!r} was started (no Triton in "
                f"{self.paths.state_file}); start it with `gpufleet up --stack {self.stack.name}`"
            )
        context = GateContext(
            stack=self.stack.name,
            spec=self.stack.spec,
            models=[item.spec for item in self.specs],
            repository=self.repository,
            registry=registry or self._registry(self._tracking_uri(state)),
            processes=[
                ExpectedProcess(name, record.pid, EXECUTABLES[name], sorted(record.ports.values()))
                for name, record in sorted(state.servers.items())
            ],
            grpc_url=f"127.0.0.1:{triton.ports['grpc']}",
            reports_dir=self.paths.reports,
            admin_headers=self._admin_headers(),
            load_engine=load_engine,
        )
        with self._step("gates"):
            return run_gates(context, gates or self.stack.spec.gates, say=self.say)

    def seed_demo(self) -> list[RegistryVersion]:
        """Register demo models for every registry-sourced spec (starting MLflow if needed)."""
        if self.stack.spec.mlflow_tracking_uri is not None:
            raise StackRunError(
                f"stack {self.stack.name!r} uses the registry at "
                f"{self.stack.spec.mlflow_tracking_uri}; demo models (random weights, aliases "
                "moved) are seeded into a stack's own local registry only"
            )
        with self._locked():
            state = self._load_state()
            try:
                registry = self._registry(self._ensure_mlflow(state))
                return seed_demo(registry, [item.spec for item in self._registry_sourced()])
            except BaseException:
                self._stop_started(state)
                raise

    def down(self) -> list[str]:
        """Stop the servers `up` recorded (Triton first); return one line per server."""
        with self._locked():
            state = self._load_state()
            lines = []
            for name in (GATEWAY, TRITON, MLFLOW):
                record = state.servers.pop(name, None)
                if record is None:
                    continue
                stopped = record.stop()
                verb = "stopped" if stopped else "was not running:"
                lines.append(f"{verb} {name} (pid {record.pid})")
            self.paths.triton_admin_key.unlink(missing_ok=True)
            self.paths.state_file.unlink(missing_ok=True)
        return lines

    @contextlib.contextmanager
    def serving_triton(self) -> Iterator[LocalTritonServer]:
        """The stack's running Triton (its control API with the run's admin key), while the
        stack is locked: `gpufleet tune` swaps model configs in it and must not race an `up`."""
        with self._locked():
            state = self._load_state()
            record = state.running(TRITON)
            if record is None:
                raise StackRunError(
                    f"Triton of stack {self.stack.name!r} is not running; start it with "
                    f"`gpufleet up --stack {self.stack.name}`"
                )
            control = LocalTritonServer.attach(
                self.repository,
                self.paths.triton_work,
                Ports(**record.ports),
                lambda: record.alive,
                admin_key=_read_secret(self.paths.triton_admin_key),
            )
            if not control.is_ready():
                raise StackRunError(
                    f"Triton of stack {self.stack.name!r} (pid {record.pid}) is not ready; run "
                    f"`gpufleet up --stack {self.stack.name}` to bring it back"
                )
            yield control

    # -- steps -------------------------------------------------------------------------------

    def _ensure_mlflow(self, state: RunState) -> str:
        spec = self.stack.spec
        if spec.mlflow_tracking_uri is not None:
            self.say(f"  using the MLflow tracking server at {spec.mlflow_tracking_uri}")
            return spec.mlflow_tracking_uri
        record = self._running_on(state, MLFLOW, {"http": spec.ports.mlflow})
        if record is not None and not requires_authentication(spec.tracking_uri()):
            self.say(
                f"  MLflow (pid {record.pid}) does not refuse requests without credentials (an "
                "older gpufleet started it?); restarting it with authentication"
            )
            record.stop()
            del state.servers[MLFLOW]
            state.save(self.paths.state_file)
            record = None
        if record is not None:
            self.say(f"  MLflow already running at {spec.tracking_uri()} (pid {record.pid})")
            return spec.tracking_uri()
        server = LocalMlflowServer(
            self.paths.mlflow_store,
            spec.ports.mlflow,
            stop_with_parent=False,
            credentials=self._credentials(),
        )
        server.start()
        assert server.pid is not None
        self._record(
            state, MLFLOW, server.pid, ports={"http": spec.ports.mlflow}, log_path=server.log_path
        )
        self.say(f"  started MLflow at {server.url} (pid {server.pid}, log {server.log_path})")
        return server.url

    def _ensure_gateway(self, state: RunState) -> int:
        gateway = self.stack.spec.gateway
        if gateway is None:
            raise StackRunError(
                f"stack {self.stack.name!r} has no gateway; add gpufleet:gateway (its http and "
                "grpc ports) to its stack file, then run `gpufleet up`"
            )
        ports = self.stack.spec.ports
        wanted_ports = {"http": gateway.http, "grpc": gateway.grpc}
        record = self._running_on(state, GATEWAY, wanted_ports)
        files = self.paths.gateway
        settings = gateway_settings(
            files,
            http_port=gateway.http,
            grpc_port=gateway.grpc,
            triton_http=ports.triton_http,
            triton_grpc=ports.triton_grpc,
            worker_processes=gateway.worker_processes,
        )
        routes = [record.route() for record in self._active_rollouts()]
        try:
            pid = LocalGateway(files, settings).apply(routes, record)
        except GatewayError as error:
            raise StackRunError(str(error)) from None
        if record is None:
            self._record(state, GATEWAY, pid, ports=wanted_ports, log_path=files.error_log)
            self.say(f"  started the gateway (nginx, pid {pid}) on 127.0.0.1:{gateway.http}")
        else:
            self.say(f"  reloaded the gateway (nginx, pid {pid}): {len(routes)} rollout route(s)")
        return pid

    def _active_rollouts(self) -> list[RolloutRecord]:
        try:
            return active_records(self.paths.root)
        except ValueError as error:
            raise StackRunError(str(error)) from None

    def _served_specs(self) -> list[LoadedModelSpec]:
        """The specs, with each model under an active rollout serving both its versions."""
        return served_specs(self.specs, self._active_rollouts())

    def _seed_missing_models(self, registry: ModelRegistry) -> None:
        missing = [
            item.spec
            for item in self._registry_sourced()
            if not registry.has_registered_model(_registered_name(item))
        ]
        if not missing:
            self.say("  every model is in the registry already")
            return
        if self.stack.spec.mlflow_tracking_uri is not None:
            names = ", ".join(spec.name for spec in missing)
            raise StackRunError(
                f"the registry at {self.stack.spec.mlflow_tracking_uri} has no model for "
                f"{names}; register them there (demo models are seeded into local registries only)"
            )
        for version in seed_demo(registry, missing):
            self.say(f"  registered demo model {version.name} version {version.version}")

    def _assemble(self, registry: ModelRegistry) -> tuple[set[str], set[str]]:
        """Fill the repository; return the models whose files changed, and those removed."""
        filled = fill_repository(registry, self._served_specs(), self.repository, progress=self.say)
        plan, changed = filled.configs, filled.changed
        self.say(
            f"  {self.repository}: configs {len(plan.created)} created, {len(plan.updated)} "
            f"updated, {len(plan.unchanged)} unchanged; model files changed for "
            f"{', '.join(sorted(changed)) or 'no model'}"
        )
        return changed, filled.removed

    def _ensure_triton(
        self, state: RunState, changed: set[str], removed: set[str], registry: ModelRegistry
    ) -> None:
        names = [item.spec.name for item in self.specs]
        ports = self.stack.spec.ports
        wanted_ports = {
            "http": ports.triton_http,
            "grpc": ports.triton_grpc,
            "metrics": ports.triton_metrics,
        }
        record = self._running_on(state, TRITON, wanted_ports)
        if record is not None:
            control = LocalTritonServer.attach(
                self.repository,
                self.paths.triton_work,
                Ports(**record.ports),
                lambda: record.alive,
                admin_key=_read_secret(self.paths.triton_admin_key),
            )
            if control.is_ready():
                # Convergence: also what differs live though no file changed (a config loaded
                # with an override, a version loaded by hand, a model no spec names).
                self._unload(control, sorted(removed), record)
                self._reload(control, [name for name in names if name in changed], record)
                self._converge(record, registry)
                return
            self.say(f"  Triton (pid {record.pid}) is not ready; restarting it")
            record.stop()
        server = LocalTritonServer(
            self.repository,
            self.paths.triton_work,
            http_port=ports.triton_http,
            grpc_port=ports.triton_grpc,
            metrics_port=ports.triton_metrics,
            load_models=names,
            stop_with_parent=False,
            admin_key=_write_secret(self.paths.triton_admin_key, secrets.token_urlsafe(32)),
        )
        with kept_from_children():  # Triton needs no registry credentials
            server.start()  # raises TritonStartError quoting Triton's log; stops what it started
        assert server.pid is not None
        self._record(
            state,
            TRITON,
            server.pid,
            ports=wanted_ports,
            log_path=server.log_path,
            shm_prefix=server.shm_prefix,
        )
        self.say(
            f"  started Triton on 127.0.0.1:{ports.triton_http} (pid {server.pid}) with "
            f"{', '.join(names)}; log {server.log_path}"
        )

    def _unload(self, control: LocalTritonServer, models: list[str], record: ServerRecord) -> None:
        """Models whose config was removed (no longer in the stack) stop being served."""
        for name in models:
            try:
                control.unload_model(name)
            except TritonError as error:
                raise StackRunError(str(error)) from None
            self.say(f"  unloaded {name} from Triton (pid {record.pid}): no longer in the stack")

    def _reload(self, control: LocalTritonServer, models: list[str], record: ServerRecord) -> None:
        if not models:
            self.say(f"  Triton already serving, nothing changed (pid {record.pid})")
            return
        for name in models:
            try:
                control.load_model(name)
            except TritonError as error:
                raise StackRunError(str(error)) from None
            self.say(f"  reloaded {name} in Triton (pid {record.pid})")

    def triton_drift(self) -> TritonFindings:
        """The triton drift check of this stack's Triton (`gpufleet drift`). Raises
        StackRunError when nothing of the stack was started."""
        state = self._load_state()
        record = state.servers.get(TRITON)
        if record is None:
            raise StackRunError(
                f"nothing of stack {self.stack.name!r} was started (no Triton in "
                f"{self.paths.state_file}); start it with `gpufleet up --stack {self.stack.name}`"
            )
        return self._drift(record, lambda: self._registry(self._tracking_uri(state)))

    def _converge(self, record: ServerRecord, registry: ModelRegistry) -> None:
        """What still differs live though the files are right (a config loaded with an
        override, a version loaded by hand, a model no spec names) is reloaded or unloaded."""
        findings = self._drift(record, registry)
        try:
            converge_triton(
                findings.target,
                findings.expected,
                reload=sorted(findings.reload),
                unload=sorted(findings.unload),
                say=self.say,
            )
        except ConvergeError as error:
            raise StackRunError(str(error)) from None

    def _drift(
        self, record: ServerRecord, registry: ModelRegistry | Callable[[], ModelRegistry]
    ) -> TritonFindings:
        """Live Triton against the served specs: a model under an active rollout is meant to
        serve its stable and candidate versions, which is no drift to converge away."""
        target = TritonTarget(
            "local",
            f"127.0.0.1:{record.ports['grpc']}",
            self._admin_headers(),
            f"gpufleet up --stack {self.stack.name}",
            repository=self.repository,
        )
        return check_triton(target, expected_models(self._served_specs(), registry))

    def triton_admin_headers(self) -> dict[str, str] | None:
        """Triton's admin key as a gRPC header (its restricted APIs), None before a start."""
        return self._admin_headers()

    def _admin_headers(self) -> dict[str, str] | None:
        """Triton's admin key as a gRPC header, for the gates' reads of restricted APIs."""
        key = _read_secret(self.paths.triton_admin_key)
        return {GRPC_ADMIN_KEY_HEADER: key} if key else None

    # -- helpers -----------------------------------------------------------------------------

    def _credentials(self) -> BasicCredentials:
        try:
            return stack_credentials(self.paths.root)
        except CredentialsError as error:
            raise StackRunError(str(error)) from None

    def _registry(self, tracking_uri: str) -> ModelRegistry:
        """The registry client; for the stack's own MLflow, with the stack's credentials."""
        if self.stack.spec.mlflow_tracking_uri is None:
            use_for_mlflow_client(self._credentials())
        else:
            try:
                from_environment()  # only checks: the operator's environment holds them
            except CredentialsError as error:
                raise StackRunError(str(error)) from None
        return ModelRegistry(tracking_uri)

    def _registry_sourced(self) -> list[LoadedModelSpec]:
        return [item for item in self.specs if _registered_name(item)]

    def _load_state(self) -> RunState:
        try:
            state = RunState.load(self.paths.state_file)
        except ValueError as error:
            raise StackRunError(str(error)) from None
        if state is not None and state.stack != self.stack.name:
            raise StackRunError(
                f"{self.paths.state_file} belongs to stack {state.stack!r}, not "
                f"{self.stack.name!r}; give each stack its own gpufleet:state_dir"
            )
        return state or RunState(stack=self.stack.name)

    def _tracking_uri(self, state: RunState) -> str:
        """The registry: the spec's URI, else the local MLflow where it was started."""
        mlflow = state.servers.get(MLFLOW)
        if self.stack.spec.mlflow_tracking_uri is None and mlflow is not None:
            return f"http://127.0.0.1:{mlflow.ports['http']}"
        return self.stack.spec.tracking_uri()

    def _running_on(self, state: RunState, name: str, ports: dict[str, int]) -> ServerRecord | None:
        """The recorded server if it runs on `ports`; one on other ports is stopped."""
        record = state.running(name)
        if record is not None and record.ports != ports:
            self.say(
                f"  {name} (pid {record.pid}) runs on ports {record.ports}, the stack now says "
                f"{ports}; restarting it"
            )
            record.stop()
            del state.servers[name]
            state.save(self.paths.state_file)
            return None
        return record

    def _record(
        self, state: RunState, name: str, pid: int, *, log_path: Path, **details: Any
    ) -> None:
        """Write the server into the state file at once: a crash later must not orphan it."""
        try:
            record = ServerRecord.of_process(name, pid, log_path=str(log_path), **details)
        except ProcessLookupError:
            raise StackRunError(
                f"{name} (pid {pid}) exited right after it started; see its log {log_path}"
            ) from None
        state.servers[name] = record
        self._started.append(record)
        state.save(self.paths.state_file)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One command at a time changes a stack (its state file, repository and servers)."""
        self.paths.root.mkdir(parents=True, exist_ok=True)
        with (self.paths.root / ".lock").open("w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StackRunError(
                    f"another gpufleet command is changing stack {self.stack.name!r} (lock "
                    f"{self.paths.root / '.lock'}); wait for it to finish"
                ) from None
            yield

    def _stop_started(self, state: RunState) -> None:
        for record in reversed(self._started):
            record.stop()
            state.servers.pop(record.name, None)
            self.say(f"  stopped {record.name} (pid {record.pid}), which this run had started")
        if self._started:
            state.save(self.paths.state_file)
        self._started.clear()

    @contextlib.contextmanager
    def _step(self, title: str) -> Iterator[None]:
        self.say(f"[{title}]")
        started = time.monotonic()
        yield
        self.say(f"[{title}] done in {time.monotonic() - started:.1f} s")


def _registered_name(item: LoadedModelSpec) -> str:
    """The registered model a spec's `models:/` source names, or "" for other sources."""
    return registered_model_name(item.spec.source or "") or ""


def _write_secret(path: Path, value: str) -> str:
    """Write `value` to `path`, readable by this user only (0600 from creation on); return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.new")
    staged.unlink(missing_ok=True)
    descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(value)
    staged.replace(path)
    return value


def _read_secret(path: Path) -> str | None:
    """The secret `_write_secret` kept, or None (a server started before keys existed)."""
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
