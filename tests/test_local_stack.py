"""`gpufleet up / validate / down` end to end on this machine, and each gate failing for real.

Real: the `gpufleet` CLI run as a separate process (as a user runs it, so the servers outlive
it), a real MLflow tracking server and registry (sqlite), real torch models seeded into it, the
real Triton 2.51 binary from the nvidia-pytriton wheel serving them on loopback, testinfra on
this host, tritonclient's gRPC load. Nothing is mocked. One stack is brought up for the module;
each test that breaks something on purpose puts it back before it ends.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpufleet.local.credentials import CREDENTIALS_FILE, PASSWORD_VARIABLE, USERNAME_VARIABLE
from gpufleet.local.mlflow_server import LocalMlflowServer, requires_authentication
from gpufleet.local.run_state import RunState, ServerRecord
from gpufleet.registry.client import ModelRegistry, RegistryError
from gpufleet.registry.demo import demo_network, register_torch_model
from gpufleet.spec.loading import load_model_spec_file
from tests.conftest import PROJECT_ROOT, SAMPLE_SPECS
from validation.loopback import http_request, pick_free_ports

STACK = "it"
RELAXED_P99 = "p99_latency_ms: 5000\n"


@dataclass
class Project:
    """A scratch project: specs, a stack file on free ports, and where up keeps its state."""

    root: Path
    mlflow_port: int
    first_up: subprocess.CompletedProcess[str] | None = None

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def repository(self) -> Path:
        return self.root / "model_repository"

    @property
    def specs(self) -> Path:
        return self.root / "modelconfigs"

    def gpufleet(
        self, *args: str, specs: Path | None = None, timeout_s: float = 300
    ) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "gpufleet", *args, "--stack", STACK]
        command += ["--specs", str(specs or self.specs), "--stacks-dir", str(self.root / "stacks")]
        return subprocess.run(
            command, cwd=self.root, capture_output=True, text=True, timeout=timeout_s, check=False
        )

    def registry(self, monkeypatch: pytest.MonkeyPatch) -> ModelRegistry:
        """A client of the stack's MLflow, with the credentials `up` generated for it."""
        credentials = json.loads((self.state_dir / CREDENTIALS_FILE).read_text())
        monkeypatch.setenv(USERNAME_VARIABLE, credentials["username"])
        monkeypatch.setenv(PASSWORD_VARIABLE, credentials["password"])
        return ModelRegistry(f"http://127.0.0.1:{self.mlflow_port}")

    def state(self) -> RunState:
        state = RunState.load(self.state_dir / "run-state.json")
        assert state is not None
        return state

    def report(self, gate: str) -> dict[str, object]:
        return dict(json.loads((self.state_dir / "reports" / f"{gate}.json").read_text()))

    def copy_specs(self, name: str, edit: tuple[str, str]) -> Path:
        """The specs directory copied to `name`, with one text replacement in tabular_mlp.yaml."""
        target = self.root / name
        target.mkdir(exist_ok=True)
        for spec in self.specs.glob("*.yaml"):
            (target / spec.name).write_text(spec.read_text())
        spec = target / "tabular_mlp.yaml"
        old, new = edit
        assert old in spec.read_text()
        spec.write_text(spec.read_text().replace(old, new))
        return target


def make_project(root: Path) -> Project:
    """A scratch project in `root`: the sample tabular_mlp spec with objectives any machine
    meets, and a local stack file on free ports (also used by tests/test_drift_local.py)."""
    (root / "modelconfigs").mkdir()
    # Objectives any machine meets, however busy: this module tests the pipeline, and whether
    # the sample's 50 ms p99 holds depends on spare CPU (the verdicts: test_load_gate.py).
    sample = (SAMPLE_SPECS / "tabular_mlp.yaml").read_text()
    for old, new in (
        ("p99_latency_ms: 50\n", RELAXED_P99),
        ("min_throughput_per_s: 100", "min_throughput_per_s: 1"),
    ):
        assert old in sample
        sample = sample.replace(old, new)
    (root / "modelconfigs" / "tabular_mlp.yaml").write_text(sample)
    http, grpc, metrics, mlflow = pick_free_ports(4)
    (root / "stacks").mkdir()
    (root / "stacks" / f"Pulumi.{STACK}.yaml").write_text(
        f"""config:
  gpufleet:environment: local
  gpufleet:models: [tabular_mlp]
  gpufleet:model_repository: {root / "model_repository"}
  gpufleet:state_dir: {root / "state"}
  gpufleet:ports: {{triton_http: {http}, triton_grpc: {grpc}, triton_metrics: {metrics}, mlflow: {mlflow}}}
  gpufleet:load_gate: {{window_s: 0.5, max_windows: 8}}
"""
    )
    return Project(root, mlflow_port=mlflow)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    project = make_project(tmp_path_factory.mktemp("local-stack"))
    project.first_up = project.gpufleet("up")
    try:
        yield project
    finally:
        project.gpufleet("down")


def test_first_up_seeds_serves_and_passes_every_gate(project: Project) -> None:
    result = project.first_up
    assert result is not None
    assert result.returncode == 0, result.stdout + result.stderr
    for step in ("[registry]", "[demo models]", "[model repository]", "[triton]", "[gates]"):
        assert step in result.stdout
    assert "registered demo model tabular_mlp version 1" in result.stdout
    assert "all gates passed" in result.stdout
    for gate in ("host", "correctness"):
        assert project.report(gate)["status"] == "pass", project.report(gate)
    load = project.report("load")
    # The objectives hold; a load generator starved of CPU by another process may only warn.
    assert load["status"] in ("pass", "warn"), load
    for check in load["checks"]:
        assert check["status"] == "pass" or _says_the_client_limited_it(check["message"]), check
        # `make test` built .venv-perf: the default engine is perf_analyzer, named with its version.
        assert check["measurements"]["engine"] == "perf_analyzer", check
        assert check["measurements"]["engine_version"] == "2.51.0"
    for gate in ("host", "correctness", "load"):
        assert (project.state_dir / "reports" / f"{gate}.junit.xml").is_file()
    version_dir = project.repository / "tabular_mlp" / "1"
    assert (version_dir / "model.py").is_file()
    assert (project.repository / "tabular_mlp" / "config.pbtxt").is_file()
    lineage = json.loads((version_dir / "gpufleet-lineage.json").read_text())
    assert lineage["registry"]["name"] == "tabular_mlp"
    assert lineage["registry"]["version"] == 1
    assert len(lineage["artifact_sha256"]) == 64
    state = project.state()
    assert set(state.servers) == {"triton", "mlflow"}
    assert all(record.alive for record in state.servers.values())


def _says_the_client_limited_it(message: str) -> bool:
    """A load check's warning that blames the load generator or the busy machine, not Triton."""
    return (
        "the client may be the bottleneck" in message
        or "; unstable: " in message
        or message.startswith("perf_analyzer could not stabilise: ")
    )


def test_second_up_changes_nothing(project: Project) -> None:
    """What makes the second up fast: nothing started, seeded, exported or rewritten (its
    time is not compared with the first's, which depends on the machine's spare CPU)."""
    before = {p: p.stat().st_mtime_ns for p in project.repository.rglob("*")}
    pids = {name: record.pid for name, record in project.state().servers.items()}
    result = project.gpufleet("up", "--only", "host")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "MLflow already running" in result.stdout
    assert "every model is in the registry already" in result.stdout
    assert "configs 0 created, 0 updated" in result.stdout
    assert "model files changed for no model" in result.stdout
    assert "Triton already serving, nothing changed" in result.stdout
    assert "started MLflow" not in result.stdout
    assert "started Triton" not in result.stdout
    assert {p: p.stat().st_mtime_ns for p in project.repository.rglob("*")} == before
    assert {name: record.pid for name, record in project.state().servers.items()} == pids


def test_only_the_runs_admin_key_loads_a_model_and_no_command_line_holds_it(
    project: Project,
) -> None:
    """Another local user can reach Triton's loopback port but not load a model (its python
    code would run as the operator): the key up generated is in a 0600 file, and in no
    command line, log or output."""
    key_file = project.state_dir / "triton-admin-key"
    key = key_file.read_text()
    assert len(key) >= 32
    assert key_file.stat().st_mode & 0o777 == 0o600
    triton = project.state().servers["triton"]
    load = f"http://127.0.0.1:{triton.ports['http']}/v2/repository/models/tabular_mlp/load"

    assert http_request("POST", load, 60)[0] == 403
    assert http_request("POST", load, 60, {"triton-admin-key": "guess"})[0] == 403
    assert http_request("POST", load, 60, {"triton-admin-key": key})[0] == 200

    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert key.encode() not in cmdline.read_bytes(), cmdline
        except OSError:
            continue  # a process that exited meanwhile
    assert project.first_up is not None
    assert key not in project.first_up.stdout + project.first_up.stderr
    assert triton.log_path is not None
    assert key not in Path(triton.log_path).read_text(errors="replace")


def test_a_tampered_model_file_fails_the_host_gate_until_up_repairs_it(project: Project) -> None:
    model_file = project.repository / "tabular_mlp" / "1" / "model.py"
    original = model_file.read_bytes()
    model_file.write_bytes(original + b"\n# edited by hand\n")
    result = project.gpufleet("validate", "--only", "host")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "model.py" in result.stdout
    assert "differs from its lineage manifest" in result.stdout
    assert project.report("host")["status"] == "fail"

    repaired = project.gpufleet("up", "--only", "host")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert model_file.read_bytes() == original
    assert "reloaded tabular_mlp" in repaired.stdout


def test_a_version_with_other_weights_fails_the_correctness_gate(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = project.registry(monkeypatch)
    spec = load_model_spec_file(project.specs / "tabular_mlp.yaml").spec
    served = demo_network(spec, seed=0)
    # New weights, but the golden examples of the weights the version replaced: what a server
    # answering with the wrong version looks like from outside.
    wrong = register_torch_model(registry, spec, demo_network(spec, seed=1), golden_module=served)
    try:
        result = project.gpufleet("up", "--only", "correctness")
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"tabular_mlp v{wrong.version}" in result.stdout
        assert "golden examples" in result.stdout
        # The default version policy serves the alias target alone.
        versions = sorted(p.name for p in (project.repository / "tabular_mlp").iterdir())
        assert versions == [str(wrong.version), "config.pbtxt"]
    finally:
        registry.set_alias("tabular_mlp", "production", 1)
    rolled_back = project.gpufleet("up", "--only", "correctness")
    assert rolled_back.returncode == 0, rolled_back.stdout + rolled_back.stderr
    assert not (project.repository / "tabular_mlp" / str(wrong.version)).exists()
    assert project.report("correctness")["status"] == "pass"


def test_a_registry_artifact_changed_after_export_is_refused(project: Project) -> None:
    version_dir = project.repository / "tabular_mlp" / "1"
    lineage = json.loads((version_dir / "gpufleet-lineage.json").read_text())
    run_id = lineage["registry"]["run_id"]
    [mlmodel] = [
        path
        for path in (project.state_dir / "mlflow" / "artifacts").rglob("MLmodel")
        if run_id in path.parts  # the version's own model directory
    ]
    original = mlmodel.read_bytes()
    mlmodel.write_bytes(original + b"# edited in the artifact store\n")
    shutil.rmtree(version_dir)  # so that up must download the version again
    try:
        result = project.gpufleet("up", "--only", "host")
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"differs from the {lineage['artifact_sha256']} recorded" in result.stderr
        assert not version_dir.exists(), "nothing may be exported from a changed artifact"
    finally:
        mlmodel.write_bytes(original)
    restored = project.gpufleet("up", "--only", "host")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert (
        json.loads((version_dir / "gpufleet-lineage.json").read_text())["artifact_sha256"]
        == (lineage["artifact_sha256"])
    )


def test_the_stacks_registry_refuses_requests_without_its_credentials(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert project.first_up is not None
    assert project.first_up.returncode == 0
    credentials_file = project.state_dir / CREDENTIALS_FILE
    assert oct(credentials_file.stat().st_mode & 0o777) == "0o600"
    password = json.loads(credentials_file.read_text())["password"]
    assert len(password) >= 32
    url = f"http://127.0.0.1:{project.mlflow_port}"
    status, _body = http_request("GET", f"{url}/api/2.0/mlflow/registered-models/search", 10)
    assert status == 401
    monkeypatch.delenv(USERNAME_VARIABLE, raising=False)
    monkeypatch.delenv(PASSWORD_VARIABLE, raising=False)
    with pytest.raises(RegistryError) as error:
        ModelRegistry(url).has_registered_model("tabular_mlp")
    assert str(error.value) == (
        f"the MLflow tracking server at {url} refused the request for registered model "
        "'tabular_mlp' (UNAUTHENTICATED); set MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD to a user of that server with access (a local stack keeps its "
        "own in <state_dir>/mlflow-credentials.json)"
    )
    assert project.registry(monkeypatch).has_registered_model("tabular_mlp")
    # The password is in the credentials file and the server's environment, nowhere else.
    mlflow_pid = project.state().servers["mlflow"].pid
    cmdline = Path(f"/proc/{mlflow_pid}/cmdline").read_bytes().decode(errors="replace")
    assert "--app-name\0basic-auth" in cmdline
    elsewhere = [path for path in project.root.rglob("*") if path.is_file()]
    leaked = [
        path
        for path in elsewhere
        if path != credentials_file and password.encode() in path.read_bytes()
    ]
    assert leaked == []
    assert password not in cmdline + project.first_up.stdout + project.first_up.stderr
    triton_pid = project.state().servers["triton"].pid
    assert b"MLFLOW_TRACKING_PASSWORD" not in Path(f"/proc/{triton_pid}/environ").read_bytes()


def test_an_unmeetable_objective_fails_the_load_gate(project: Project) -> None:
    """The verdict is `fail` either way; what it rests on depends on the machine: a stable
    perf_analyzer run's p99, or, where a busy machine kept it from stabilising, the mean
    latency of its last windows (no percentiles then)."""
    strict = project.copy_specs("strict-specs", (RELAXED_P99, "p99_latency_ms: 0.001\n"))
    result = project.gpufleet("validate", "--only", "load", "--json", specs=strict)
    assert result.returncode == 1, result.stdout + result.stderr
    summary = json.loads(result.stdout)  # progress went to stderr
    assert summary["exit_code"] == 1
    [load] = summary["gates"]
    assert load == project.report("load")
    assert load["status"] == "fail"
    [check] = load["checks"]
    measured = check["measurements"]
    if measured["p99_ms"] > 0:  # percentiles were measured
        assert "above the objective of 0.001 ms" in check["message"]
        assert measured["p99_ms"] > 0.001
    else:  # an unstable perf_analyzer run prints no percentiles
        assert "above the p99 objective of 0.001 ms" in check["message"]
        assert measured["mean_latency_ms"] > 0.001


def test_engine_option_chooses_the_load_gates_engine(project: Project) -> None:
    """`--engine python` on the stack that perf_analyzer measures by default: the report names
    the engine, its version and why, and the verdict is the same kind."""
    result = project.gpufleet("validate", "--only", "load", "--json", "--engine", "python")
    assert result.returncode == 0, result.stdout + result.stderr
    [load] = json.loads(result.stdout)["gates"]
    for check in load["checks"]:
        assert check["status"] == "pass" or _says_the_client_limited_it(check["message"]), check
        assert check["measurements"]["engine"] == "python"
        assert check["measurements"]["engine_version"].startswith("tritonclient ")
        assert check["measurements"]["engine_note"].startswith("chosen with --engine python; ")
    assert "engine: python " in result.stderr  # the progress line says which and why
    bad = project.gpufleet("validate", "--only", "load", "--engine", "locust")
    assert bad.returncode == 2
    assert "locust" in bad.stderr


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("models:/tabular_mlp@canary", "alias 'canary'"),
        ("models:/tabular_mlp/99", "version 99"),
    ],
)
def test_a_source_the_registry_cannot_resolve_is_a_clear_error(
    project: Project, source: str, expected: str
) -> None:
    before = {p: p.stat().st_mtime_ns for p in project.repository.rglob("*")}
    specs = project.copy_specs(
        f"specs-{source.rsplit('/', 1)[-1]}",
        ("source: models:/tabular_mlp@production", f"source: {source}"),
    )
    result = project.gpufleet("up", "--only", "host", specs=specs)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert {p: p.stat().st_mtime_ns for p in project.repository.rglob("*")} == before


def test_triton_killed_during_the_load_test_fails_the_load_gate(project: Project) -> None:
    triton = project.state().servers["triton"]
    command = [sys.executable, "-m", "gpufleet", "validate", "--only", "load", "--stack", STACK]
    command += ["--specs", str(project.specs), "--stacks-dir", str(project.root / "stacks")]
    with subprocess.Popen(
        command,
        cwd=project.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as validate:
        assert validate.stdout is not None
        before_kill = ""
        while "measuring" not in before_kill and validate.poll() is None:
            before_kill += validate.stdout.readline()
        time.sleep(0.5)  # into the first window
        os.killpg(triton.pid, signal.SIGKILL)
        stdout, stderr = validate.communicate(timeout=120)
        stdout = before_kill + stdout
    assert validate.returncode == 1, stdout + stderr
    assert "stopped answering" in stdout
    # With Triton dead, validate still reports: the host gate fails on the missing process.
    dead = project.gpufleet("validate", "--only", "host")
    assert dead.returncode == 1, dead.stdout + dead.stderr
    assert f"triton (pid {triton.pid}) is not running" in dead.stdout
    restarted = project.gpufleet("up", "--only", "host")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert "started Triton" in restarted.stdout
    # The killed server's python stubs could not unmap their shared memory; up removed it.
    assert not list(Path("/dev/shm").glob(f"{triton.shm_prefix}*"))


def test_down_stops_exactly_what_up_started(project: Project) -> None:
    state = project.state()
    # down reads no model spec: a broken one must not keep anyone from stopping the stack.
    broken = project.copy_specs("broken-specs", ("max_batch_size: 64", "max_batch_size: [64"))
    with subprocess.Popen(["sleep", "60"], process_group=0) as bystander:
        result = project.gpufleet("down", specs=broken)
        assert result.returncode == 0, result.stdout + result.stderr
        for name, record in state.servers.items():
            assert f"stopped {name} (pid {record.pid})" in result.stdout
            assert not record.alive
        assert bystander.poll() is None, "down must not touch processes it did not start"
        bystander.kill()
    assert not (project.state_dir / "run-state.json").exists()
    assert not (project.state_dir / "triton-admin-key").exists()
    again = project.gpufleet("down")
    assert again.returncode == 0
    assert "nothing of stack 'it' is running" in again.stdout
    assert not list(Path("/dev/shm").glob(f"{state.servers['triton'].shm_prefix}*"))


def test_up_on_a_provisioned_stack_without_outputs_says_how_to_get_them(tmp_path: Path) -> None:
    """An azure stack's hosts have no address until Pulumi's outputs give them (no Pulumi CLI
    here): `up` exits 2 with the command that writes them, before anything runs."""
    (tmp_path / "stacks").mkdir()
    # A whole azure stack (a bare one is itself refused, for lacking gpufleet:azure).
    azure_stack = (PROJECT_ROOT / "stacks" / "Pulumi.azure-dev.yaml").read_text()
    (tmp_path / "stacks" / "Pulumi.cloud.yaml").write_text(azure_stack)
    result = subprocess.run(
        [sys.executable, "-m", "gpufleet", "up", "--stack", "cloud", "--specs", str(SAMPLE_SPECS)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
    )
    assert result.returncode == 2
    assert "pulumi stack output --stack cloud --json > outputs-cloud.json" in result.stderr
    assert not (tmp_path / "build").exists()


def _idle_stack(root: Path) -> Path:
    """A local stack file under `root` whose state lives in `root/state` (nothing running)."""
    (root / "stacks").mkdir()
    (root / "stacks" / f"Pulumi.{STACK}.yaml").write_text(
        f"config:\n  gpufleet:environment: local\n  gpufleet:state_dir: {root / 'state'}\n"
    )
    (root / "state").mkdir()
    return root / "state"


def _gpufleet_in(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "gpufleet", *args, "--stack", STACK]
    command += ["--specs", str(SAMPLE_SPECS), "--stacks-dir", str(root / "stacks")]
    return subprocess.run(command, cwd=root, capture_output=True, text=True, check=False)


def test_a_second_command_on_the_same_stack_waits_its_turn(tmp_path: Path) -> None:
    state_dir = _idle_stack(tmp_path)
    with (state_dir / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a running `gpufleet up` holds it
        result = _gpufleet_in(tmp_path, "down")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "another gpufleet command is changing stack 'it'" in result.stderr
    assert _gpufleet_in(tmp_path, "down").returncode == 0


def test_a_state_directory_of_another_stack_is_left_alone(tmp_path: Path) -> None:
    state_dir = _idle_stack(tmp_path)
    (state_dir / "run-state.json").write_text('{"stack": "prod", "servers": {}}')
    result = _gpufleet_in(tmp_path, "down")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "belongs to stack 'prod', not 'it'" in result.stderr
    assert (state_dir / "run-state.json").exists()


def test_demo_models_go_only_into_a_stacks_own_registry(tmp_path: Path) -> None:
    _idle_stack(tmp_path)
    stack_file = tmp_path / "stacks" / f"Pulumi.{STACK}.yaml"
    stack_file.write_text(
        stack_file.read_text() + "  gpufleet:mlflow_tracking_uri: http://127.0.0.1:5999\n"
    )
    result = _gpufleet_in(tmp_path, "registry", "seed-demo")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "seeded into a stack's own local registry only" in result.stderr


def test_an_mlflow_left_running_without_authentication_is_restarted_with_it(
    tmp_path: Path,
) -> None:
    """What an older gpufleet left running: the stack's MLflow, recorded, but open to anyone."""
    state_dir = _idle_stack(tmp_path)
    (tmp_path / "modelconfigs").mkdir()
    (tmp_path / "modelconfigs" / "tabular_mlp.yaml").write_text(
        (SAMPLE_SPECS / "tabular_mlp.yaml").read_text()
    )
    (port,) = pick_free_ports(1)
    stack_file = tmp_path / "stacks" / f"Pulumi.{STACK}.yaml"
    stack_file.write_text(stack_file.read_text() + f"  gpufleet:ports: {{mlflow: {port}}}\n")
    open_server = LocalMlflowServer(state_dir / "mlflow", port, stop_with_parent=False)
    open_server.start()
    try:
        assert open_server.pid is not None
        state = RunState(stack=STACK)
        state.servers["mlflow"] = ServerRecord.of_process(
            "mlflow", open_server.pid, ports={"http": port}, log_path=str(open_server.log_path)
        )
        state.save(state_dir / "run-state.json")
        assert not requires_authentication(open_server.url)

        command = [sys.executable, "-m", "gpufleet", "registry", "seed-demo", "--stack", STACK]
        command += ["--specs", str(tmp_path / "modelconfigs")]
        command += ["--stacks-dir", str(tmp_path / "stacks")]
        result = subprocess.run(
            command, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "does not refuse requests without credentials" in result.stdout + result.stderr
        assert not open_server.running  # stopped: the record was its own
        restarted = RunState.load(state_dir / "run-state.json")
        assert restarted is not None
        assert restarted.servers["mlflow"].pid != open_server.pid
        assert requires_authentication(open_server.url)
    finally:
        _gpufleet_in(tmp_path, "down")
        open_server.stop()
