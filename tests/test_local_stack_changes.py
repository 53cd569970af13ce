"""`gpufleet up` on a local stack that changes under it: a first run that fails, a model removed
from the stack, a Triton that is not ready, new ports.

Real: the `gpufleet` CLI run as a separate process, a real MLflow tracking server (sqlite) with
a demo torch model seeded into it, the real Triton 2.51 binary from the nvidia-pytriton wheel on
loopback, Triton's HTTP API (repository index, model load) to see what it serves, and /proc to
find every process of the run by pid. Nothing is mocked. The models: `tabular_mlp` from the
registry, `affine` (a numpy python-backend model written into the repository by hand, no
registry source) and, for the failing run, `broken`, whose `initialize` raises.

The tests run in file order on one stack; each leaves it up and serving for the next.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from gpufleet.local.run_state import process_start_ticks
from tests.conftest import SAMPLE_SPECS
from tests.serving_models import write_affine_model
from tests.test_local_stack import STACK, Project
from validation.loopback import pick_free_ports

BROKEN_MODEL_PY = """\
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("broken on purpose by the test")
"""


def model_spec_yaml(name: str) -> str:
    """The spec of the hand-written numpy model (tests/serving_models.py) under `name`."""
    return f"""name: {name}
backend: python
max_batch_size: 8
inputs: [{{name: INPUT0, dtype: fp32, shape: [4]}}]
outputs: [{{name: OUTPUT0, dtype: fp32, shape: [4]}}]
instance_groups: [{{kind: cpu, count: 1}}]
"""


@dataclass
class Stack(Project):
    """The scratch project, with its stack file kept as data so that tests can change it."""

    models: list[str] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)

    def write_stack(self) -> None:
        config = {
            "gpufleet:environment": "local",
            "gpufleet:models": self.models,
            "gpufleet:model_repository": str(self.repository),
            "gpufleet:state_dir": str(self.state_dir),
            "gpufleet:ports": self.ports,
        }
        (self.root / "stacks").mkdir(exist_ok=True)
        stack_file = self.root / "stacks" / f"Pulumi.{STACK}.yaml"
        stack_file.write_text(yaml.safe_dump({"config": config}))

    def admin_header(self) -> dict[str, str]:
        """The admin key `up` made for its Triton (0600 in the state dir): the repository API
        is restricted to it."""
        return {"triton-admin-key": (self.state_dir / "triton-admin-key").read_text().strip()}

    def served(self) -> dict[str, str]:
        """Model -> state, from the repository index of the Triton on the stack's port."""
        url = f"http://127.0.0.1:{self.ports['triton_http']}/v2/repository/index"
        request = urllib.request.Request(url, b"", headers=self.admin_header())
        with urllib.request.urlopen(request, timeout=60) as response:  # loopback
            return {entry["name"]: entry.get("state", "") for entry in json.load(response)}


def processes_mentioning(text: str) -> dict[int, str]:
    """Live processes whose command line holds `text` (pid -> command line), from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited meanwhile
            continue
        if text in cmdline:
            found[int(entry.name)] = cmdline
    return found


def http_status(method: str, url: str, headers: dict[str, str] | None = None) -> int:
    body = b"" if method == "POST" else None
    request = urllib.request.Request(url, body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # loopback
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def stack_ports() -> dict[str, int]:
    http, grpc, metrics, mlflow = pick_free_ports(4)
    return {"triton_http": http, "triton_grpc": grpc, "triton_metrics": metrics, "mlflow": mlflow}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("local-changes")
    ports = stack_ports()
    project = Stack(
        root, mlflow_port=ports["mlflow"], models=["tabular_mlp", "affine"], ports=ports
    )
    project.specs.mkdir()
    (project.specs / "tabular_mlp.yaml").write_text((SAMPLE_SPECS / "tabular_mlp.yaml").read_text())
    (project.specs / "affine.yaml").write_text(model_spec_yaml("affine"))
    write_affine_model(project.repository)  # its version directory; up renders its config
    project.write_stack()
    try:
        yield project
    finally:
        project.gpufleet("down")


def test_a_first_up_that_fails_stops_the_servers_it_started(stack: Stack) -> None:
    """Triton cannot load `broken` (its initialize raises): up exits 2 with Triton's reason,
    and no process of the run is left: no MLflow, no Triton, no python stub."""
    (stack.specs / "broken.yaml").write_text(model_spec_yaml("broken"))
    (stack.repository / "broken" / "1").mkdir(parents=True)
    (stack.repository / "broken" / "1" / "model.py").write_text(BROKEN_MODEL_PY)
    stack.models.append("broken")
    stack.write_stack()

    result = stack.gpufleet("up", "--only", "host")

    assert result.returncode == 2, result.stdout + result.stderr
    assert "broken on purpose by the test" in result.stderr
    assert "Traceback" not in result.stderr
    mlflow_pid = int(re.findall(r"started MLflow at \S+ \(pid (\d+)", result.stdout)[0])
    assert f"stopped mlflow (pid {mlflow_pid}), which this run had started" in result.stdout
    # Every process of this run has the project's directory on its command line (MLflow its
    # store, Triton its repository, Triton's python stubs their model's path): found by pid in
    # /proc, whether or not the state file ever recorded it (a Triton that failed to start is
    # not recorded). The good up below shows that the search finds live servers.
    assert processes_mentioning(str(stack.root)) == {}
    assert process_start_ticks(mlflow_pid) is None, "MLflow still runs"
    assert stack.state().servers == {}

    (stack.specs / "broken.yaml").unlink()
    stack.models.remove("broken")
    stack.write_stack()
    started = stack.gpufleet("up", "--only", "host")
    assert started.returncode == 0, started.stdout + started.stderr
    served = stack.served()
    assert (served["affine"], served["tabular_mlp"]) == ("READY", "READY"), served
    pids = {record.pid for record in stack.state().servers.values()}
    assert pids <= set(processes_mentioning(str(stack.root))), "the search finds live servers"


def test_up_unloads_a_model_removed_from_the_stack(stack: Stack) -> None:
    triton = stack.state().servers["triton"]
    stack.models.remove("affine")
    stack.write_stack()

    result = stack.gpufleet("up", "--only", "host")

    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        f"unloaded affine from Triton (pid {triton.pid}): no longer in the stack" in result.stdout
    )
    assert stack.state().servers["triton"] == triton, "the same Triton, not a restart"
    served = stack.served()
    assert served["tabular_mlp"] == "READY"
    assert served["affine"] != "READY", served
    assert not (stack.repository / "affine" / "config.pbtxt").exists()
    url = f"http://127.0.0.1:{stack.ports['triton_http']}/v2/models/affine/ready"
    assert http_status("GET", url) != 200


def test_up_restarts_a_triton_that_is_not_ready(stack: Stack) -> None:
    """A model that fails to load makes Triton answer "not ready" (strict readiness) while it
    runs: up replaces that Triton with one serving the stack's models."""
    triton = stack.state().servers["triton"]
    base = f"http://127.0.0.1:{stack.ports['triton_http']}"
    load = f"{base}/v2/repository/models/broken/load"
    assert http_status("POST", load, stack.admin_header()) == 400, "Triton cannot load it"
    assert http_status("GET", f"{base}/v2/health/ready") != 200, "Triton still says ready"
    assert triton.alive

    result = stack.gpufleet("up", "--only", "host")

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Triton (pid {triton.pid}) is not ready; restarting it" in result.stdout
    assert not triton.alive
    restarted = stack.state().servers["triton"]
    assert restarted.pid != triton.pid
    assert restarted.alive
    assert http_status("GET", f"{base}/v2/health/ready") == 200
    assert stack.served()["tabular_mlp"] == "READY"


def test_up_restarts_the_servers_whose_ports_changed(stack: Stack) -> None:
    before = stack.state().servers
    old_ports = dict(stack.ports)
    stack.ports = stack_ports()
    stack.mlflow_port = stack.ports["mlflow"]
    stack.write_stack()

    result = stack.gpufleet("up", "--only", "host")

    assert result.returncode == 0, result.stdout + result.stderr
    after = stack.state().servers
    for name in ("triton", "mlflow"):
        assert f"{name} (pid {before[name].pid}) runs on ports" in result.stdout
        assert not before[name].alive, f"the {name} on the old ports still runs"
        assert after[name].alive
        assert after[name].pid != before[name].pid
    assert after["triton"].ports["http"] == stack.ports["triton_http"]
    assert after["mlflow"].ports == {"http": stack.ports["mlflow"]}
    assert stack.served()["tabular_mlp"] == "READY"
    assert "every model is in the registry already" in result.stdout, "the same registry data"
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(  # loopback
            f"http://127.0.0.1:{old_ports['triton_http']}/v2/health/live", timeout=10
        )
