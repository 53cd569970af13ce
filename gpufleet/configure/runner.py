"""`gpufleet configure`: converge a stack's hosts with the roles in `ansible/` via ansible-runner.

Each run gets a private data directory under the stack's state directory
(`build/<stack>/ansible/`): the inventory generated from the spec, an `env/extravars` file with
the secrets (mode 0600, removed with the rest of `env/` when the run ends), and
`artifacts/<ident>/` with the run's events, its stdout and a `summary.json`, kept for later.
Nothing secret is left on disk: the environment ansible-runner records with the command is
reduced to variable names. A separate guard process (gpufleet/configure/cleanup_guard.py) does
both clean-ups when the run dies without running its own, killed with SIGKILL say.

    result = configure_hosts("lab", spec, project_root=Path.cwd(), say=print)
    print(result.exit_code)   # 0 converged (or in sync, with check), 1 failed, unreachable, drift
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from generators.ansible_inventory import inventory_yaml, render_inventory
from generators.serving_stack.secrets import MissingSecretError, render_env_files
from gpufleet.configure import cleanup_guard
from gpufleet.configure.cleanup_guard import empty_env_dir, forget_environment
from gpufleet.configure.progress import EventTracker, HostOutcome, Say
from gpufleet.spec.registry import registry_host
from gpufleet.spec.stack import StackSpec

ANSIBLE_DIR = Path(__file__).resolve().parents[2] / "ansible"
SITE_PLAYBOOK = "site.yml"  # everything: host.yml, then the serving stack
HOST_PLAYBOOK = "host.yml"  # the host configuration alone (the lifecycle's configure step)
SERVING_PLAYBOOK = "playbooks/serving_stack.yml"  # the lifecycle's deploy step
KEPT_RUNS = 20
EXIT_CONVERGED, EXIT_HOST_FAILED, EXIT_COULD_NOT_RUN = 0, 1, 2
ExtraVar = bool | int | str  # a role setting passed for one run (never a secret)


class ConfigureError(RuntimeError):
    """The run could not start or Ansible stopped before any host ran; the message says why."""


@dataclass(frozen=True)
class ConfigureResult:
    """What a run did to each host, and where its artifacts are."""

    hosts: list[HostOutcome]
    artifact_dir: Path
    check: bool

    @property
    def exit_code(self) -> int:
        """1 when a host failed or was unreachable, or (in check mode) would change: drift."""
        if any(host.status in ("failed", "unreachable") for host in self.hosts):
            return EXIT_HOST_FAILED
        if self.check and any(host.changed for host in self.hosts):
            return EXIT_HOST_FAILED
        return EXIT_CONVERGED

    def to_json(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "exit_code": self.exit_code,
            "artifact_dir": str(self.artifact_dir),
            "hosts": [
                {
                    "host": host.host,
                    "status": host.status,
                    "ok": host.ok,
                    "changed": host.changed,
                    "failed": host.failed,
                    "skipped": host.skipped,
                    "unreachable": host.unreachable,
                    "problems": host.problems,
                }
                for host in self.hosts
            ],
        }


def configure_hosts(
    stack: str,
    spec: StackSpec,
    *,
    project_root: Path,
    say: Say,
    limit: str | Sequence[str] | None = None,
    check: bool = False,
    playbook: str = SITE_PLAYBOOK,
    extra_vars: Mapping[str, ExtraVar] | None = None,
) -> ConfigureResult:
    """Run `playbook` (default `ansible/site.yml`) against the stack's hosts (or only `limit`);
    never raises for a host that fails: that host's outcome says so. Raises InventoryError for
    a spec that cannot become an inventory and ConfigureError when Ansible cannot run at all.

    A run limited to one host gets a data directory (and lock) of its own, so that runs on
    different hosts of one stack (Pulumi's steps run hosts in parallel) do not wait for each
    other; runs on the same host, or on the whole stack, are one at a time.

    `extra_vars` are this run's settings for the roles (a live deploy's switch). They reach
    ansible-playbook's command line, so never a secret: secrets go through the 0600 file."""
    import ansible_runner  # type: ignore[import-untyped]  # slow to import; only for this command

    inventory = render_inventory(stack, spec, project_root=project_root, limit=limit)
    secrets = ansible_secrets(spec)
    data_dir = ansible_data_dir(stack, spec, project_root, limit)
    kind = "configure" if playbook != SERVING_PLAYBOOK else "deploy"
    ident = datetime.datetime.now(datetime.UTC).strftime(f"{kind}-%Y%m%dT%H%M%S%fZ")
    tracker = EventTracker(say)
    artifact_dir = data_dir / "artifacts" / ident
    with _locked(data_dir), _private_files(data_dir, artifact_dir, inventory, secrets):
        hosts = ", ".join(inventory["all"]["hosts"])
        mode = " (check mode)" if check else ""
        say(f"configuring {hosts} with {ANSIBLE_DIR / playbook}{mode}")
        try:
            with _without_environment(*_secret_variables(spec)), _interruptible() as canceled:
                runner = ansible_runner.run(
                    private_data_dir=str(data_dir),
                    project_dir=str(ANSIBLE_DIR),
                    playbook=playbook,
                    ident=ident,
                    cmdline="--check --diff" if check else None,
                    extravars=dict(extra_vars) if extra_vars else None,
                    envvars={
                        **_ansible_environment(data_dir),
                        cleanup_guard.RUN_MARKER: str(artifact_dir),
                    },
                    # Facts live for this run only, not in the kept artifacts.
                    fact_cache_type="memory",
                    # Keep the arguments out of env/: a --check left there applies to the next run.
                    suppress_env_files=True,
                    event_handler=tracker.handle,
                    quiet=True,
                    rotate_artifacts=KEPT_RUNS,
                    cancel_callback=canceled,
                )
        except Exception as error:  # ansible-runner's own failures: a missing binary, bad paths
            raise ConfigureError(f"ansible-runner could not run: {error}") from error
        finally:
            forget_environment(artifact_dir)
    outcomes = tracker.outcomes(runner.stats)
    if not outcomes:
        raise ConfigureError(
            f"Ansible stopped before any host ran ({runner.status}, rc={runner.rc}): "
            f"{_stdout_tail(artifact_dir)}; the run's output is in {artifact_dir}/stdout"
        )
    result = ConfigureResult(outcomes, artifact_dir, check)
    (artifact_dir / "summary.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return result


def ansible_data_dir(
    stack: str, spec: StackSpec, project_root: Path, limit: str | Sequence[str] | None
) -> Path:
    """ansible-runner's private data directory: the stack's, or the one host's under it."""
    root = project_root / spec.resolved_state_dir(stack) / "ansible"
    names = [limit] if isinstance(limit, str) else list(limit or [])
    return root / "hosts" / names[0] if len(names) == 1 else root


def ansible_secrets(spec: StackSpec) -> dict[str, str | dict[str, str]]:
    """Secrets for Ansible, read from the environment variables the spec names."""
    secrets: dict[str, str | dict[str, str]] = {}
    if spec.serving is not None:
        try:
            secrets["serving_stack_env_files"] = render_env_files(
                spec.serving, os.environ, runs_registry=registry_host(spec) is not None
            )
        except MissingSecretError as error:
            raise ConfigureError(str(error)) from None
    variable = spec.host_config.become_password_env
    if variable is None:
        return secrets
    password = os.environ.get(variable)
    if password and ("\n" in password or "\r" in password):
        raise ConfigureError(f"{variable} holds a line break; sudo passwords are one line")
    if not password:
        raise ConfigureError(
            f"host_config.become_password_env names {variable}, which is not set; export the "
            "sudo password in it (or remove become_password_env for passwordless sudo)"
        )
    return {**secrets, "ansible_become_password": password}


def _search_path() -> str:
    """PATH with this Python environment's bin/ first: its ansible-playbook need not be on PATH."""
    environment_bin = Path(sys.executable).parent
    if not (environment_bin / "ansible-playbook").exists() and not shutil.which("ansible-playbook"):
        raise ConfigureError("ansible-playbook not found: install ansible-core (make setup does)")
    return os.pathsep.join([str(environment_bin), os.environ.get("PATH", os.defpath)])


def unsafe_extravars(secrets: dict[str, str | dict[str, str]]) -> str:
    """YAML with every value tagged !unsafe: Ansible templates extra vars, and a password such
    as `p{{ 7*7 }}w` must reach sudo as written, not as `p49w`."""

    def unsafe(value: str) -> str:
        # A JSON string is a YAML double-quoted scalar: its escapes keep an env file's line
        # breaks, which a single-quoted scalar would fold into spaces.
        return "!unsafe " + json.dumps(value)

    lines = []
    for name, value in secrets.items():
        if isinstance(value, str):
            lines.append(f"{name}: {unsafe(value)}\n")
            continue
        lines.append(f"{name}:\n")
        lines.extend(f"  {key}: {unsafe(text)}\n" for key, text in value.items())
    return "".join(lines)


def _ansible_environment(data_dir: Path) -> dict[str, str]:
    return {
        "PATH": _search_path(),
        "ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles"),
        # Facts are gathered once per host and run, not once per playbook of site.yml.
        "ANSIBLE_GATHERING": "smart",
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        # Ansible's own default, set so that an ANSIBLE_SSH_ARGS in the caller's environment
        # (say, StrictHostKeyChecking=no, which ssh would take before ours) cannot apply.
        "ANSIBLE_SSH_ARGS": "-C -o ControlMaster=auto -o ControlPersist=60s",
        "ANSIBLE_PIPELINING": "True",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORKS": "10",
        "ANSIBLE_TIMEOUT": "15",
        "ANSIBLE_LOCAL_TEMP": str(data_dir / "tmp"),
    }


@contextlib.contextmanager
def _private_files(
    data_dir: Path,
    artifact_dir: Path,
    inventory: dict[str, Any],
    secrets: dict[str, str | dict[str, str]],
) -> Iterator[None]:
    """The run's inventory, and its secrets in a 0600 extravars file that the run never outlives:
    removed when the run ends, or by the guard when the run is killed."""
    inventory_dir = data_dir / "inventory"
    inventory_dir.mkdir(parents=True, exist_ok=True)
    for stale in inventory_dir.iterdir():  # Ansible reads every file here
        stale.unlink()
    (inventory_dir / "hosts.yml").write_text(inventory_yaml(inventory))
    env_dir = data_dir / "env"
    env_dir.mkdir(mode=0o700, exist_ok=True)
    empty_env_dir(env_dir)
    with _cleanup_guard(env_dir, artifact_dir):
        if secrets:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
            descriptor = os.open(env_dir / "extravars", flags, 0o600)
            with os.fdopen(descriptor, "w") as file:
                file.write(unsafe_extravars(secrets))
        try:
            yield
        finally:
            empty_env_dir(env_dir)


@contextlib.contextmanager
def _cleanup_guard(env_dir: Path, artifact_dir: Path) -> Iterator[None]:
    """A process of its own that cleans up after the run however it ends (see cleanup_guard)."""
    guard = subprocess.Popen(  # this Python, a file of this package
        [sys.executable, "-I", cleanup_guard.__file__, str(env_dir), str(artifact_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={},  # it needs nothing from the environment, which may hold credentials
        start_new_session=True,
    )
    assert guard.stdin is not None
    try:
        yield
        # Returned: ansible-runner waited for Ansible to end. On an exception it may not have.
        guard.stdin.write(cleanup_guard.ENDED)
    finally:
        guard.stdin.close()
        guard.wait()


def _secret_variables(spec: StackSpec) -> list[str]:
    names = [spec.host_config.become_password_env] if spec.host_config.become_password_env else []
    if spec.serving is not None:
        names += spec.serving.secrets_env.model_dump().values()
    return names


@contextlib.contextmanager
def _interruptible() -> Iterator[Callable[[], bool]]:
    """SIGINT and SIGTERM cancel the Ansible run, and then act as they did before it.

    Left to itself, ansible_runner.run() installs handlers of its own for both signals and never
    removes them: every later Ctrl-C or SIGTERM of the process (a gate, a wait) would be
    swallowed. Here the run gets a cancel callback instead; the caller's handlers are put back
    when it ends, and a signal that arrived during it is handed to them (or, where the default
    applies, raised as KeyboardInterrupt or SystemExit), so an interrupted `gpufleet configure`
    or `up` stops as the operator asked, after the usual cleanup.
    Outside the main thread (the Pulumi engine's steps) signals cannot be handled: no-op."""
    received: list[signal.Signals] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = {
        number: handler
        for number in (signal.SIGINT, signal.SIGTERM)
        if (handler := signal.getsignal(number)) != signal.SIG_IGN  # ignored stays ignored
    }
    for number in previous:
        signal.signal(number, lambda got, _frame: received.append(signal.Signals(got)))
    try:
        yield lambda: bool(received)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if received:  # after the run's own cleanup, as the caller's handler would have acted
        first = received[0]
        handler = previous[first]
        if callable(handler):
            handler(first, None)
        elif handler == signal.SIG_DFL:  # an exception, so that the callers' cleanup still runs
            raise KeyboardInterrupt if first == signal.SIGINT else SystemExit(128 + first)


@contextlib.contextmanager
def _without_environment(*variables: str) -> Iterator[None]:
    """Hide secrets' variables from Ansible's environment: they travel in extravars only."""
    values = {name: os.environ.pop(name) for name in variables if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(values)


def _stdout_tail(artifact_dir: Path, lines: int = 5) -> str:
    stdout = artifact_dir / "stdout"
    if not stdout.exists():
        return "no output"
    tail = [
        line.strip() for line in stdout.read_text(errors="replace").splitlines() if line.strip()
    ]
    return " | ".join(tail[-lines:]) or "no output"


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    """One configure per stack at a time: two runs would share the inventory and extravars."""
    data_dir.mkdir(parents=True, exist_ok=True)
    lock_path = data_dir / ".lock"
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigureError(
                f"another `gpufleet configure` of this stack is running (it holds the lock "
                f"{lock_path}); wait for it to end"
            ) from None
        yield
