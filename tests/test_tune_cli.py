"""`gpufleet tune MODEL --stack NAME` end to end on a local stack, as a user runs it.

Real: the `gpufleet` CLI as separate processes, `gpufleet up` bringing up a real MLflow (sqlite)
with the seeded tabular_mlp demo model and the real Triton 2.51 of the nvidia-pytriton wheel on
loopback; the tuner swapping configs in that Triton by explicit loads; ruamel.yaml editing the
spec file; `gpufleet generate --check`. Nothing is mocked. The space is narrowed on the command
line (one to three configs) and windows are 0.2 s to keep the module short.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet.spec.loading import load_model_spec_file
from tests.conftest import SAMPLE_SPECS
from validation.loopback import pick_free_ports

STACK = "tune"
# One instance (each load starts a python stub that imports torch), short windows, 2 repeats.
FAST = ("--instances", "1", "--delays-us", "0", "--window-s", "0.2", "--repeats", "2")


class Project:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.spec = root / "modelconfigs" / "tabular_mlp.yaml"

    def gpufleet(self, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "gpufleet", *args, "--stack", STACK]
        command += ["--specs", str(self.root / "modelconfigs")]
        command += ["--stacks-dir", str(self.root / "stacks")]
        return subprocess.run(
            command, cwd=self.root, capture_output=True, text=True, timeout=timeout_s, check=False
        )

    def set_p99(self, value: str) -> None:
        text = self.spec.read_text()
        start = text.index("p99_latency_ms: ")
        end = text.index("\n", start)
        self.spec.write_text(text[:start] + f"p99_latency_ms: {value}" + text[end:])


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    root = tmp_path_factory.mktemp("tune-stack")
    (root / "modelconfigs").mkdir()
    (root / "modelconfigs" / "tabular_mlp.yaml").write_text(
        (SAMPLE_SPECS / "tabular_mlp.yaml")
        .read_text()
        .replace("min_throughput_per_s: 100", "min_throughput_per_s: 1")
    )
    http, grpc, metrics, mlflow = pick_free_ports(4)
    (root / "stacks").mkdir()
    (root / "stacks" / f"Pulumi.{STACK}.yaml").write_text(
        f"""config:
  gpufleet:environment: local
  gpufleet:models: [tabular_mlp]
  gpufleet:model_repository: {root / "model_repository"}
  gpufleet:state_dir: {root / "state"}
  gpufleet:ports: {{triton_http: {http}, triton_grpc: {grpc}, triton_metrics: {metrics}, mlflow: {mlflow}}}
"""
    )
    project = Project(root)
    up = project.gpufleet("up", "--only", "host")
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        yield project
    finally:
        project.gpufleet("down")


def test_an_objective_no_config_meets_exits_1_and_shows_the_closest(project: Project) -> None:
    project.set_p99("0.001")
    before = project.spec.read_text()
    result = project.gpufleet("tune", "tabular_mlp", "--write", "--batch-sizes", "8", *FAST)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "closest (does not meet the objective): " in result.stdout
    assert "no config meets the objectives" in result.stderr
    assert project.spec.read_text() == before  # nothing is written
    report = json.loads((project.root / "state" / "tune" / "tabular_mlp" / "tune.json").read_text())
    assert report["summary"]["chosen"] is None
    assert report["summary"]["closest"]["meets"] is False


def test_write_applies_the_chosen_settings_and_generate_check_shows_them(project: Project) -> None:
    project.set_p99("2000")
    # The spec as written misses its objective: at c=8 no batch reaches the preferred size 16, so
    # each waits out the full 3 s delay and none completes within a trial (0/s, below the
    # 1/s minimum). Every candidate has a delay of 0 and meets a p99 of 2 s even on a machine
    # with a busy core, where the python backend's requests stall for 0.5-1 s at times (seen
    # with stress-ng: p99 503-1010 ms): a candidate beats the spec whichever wins, and the file
    # changes.
    text = project.spec.read_text()
    text = text.replace("max_queue_delay_us: 2000\n", "max_queue_delay_us: 3000000\n")
    project.spec.write_text(
        text.replace("preferred_batch_sizes: [8, 16]", "preferred_batch_sizes: [16]")
    )
    comments = [line for line in project.spec.read_text().splitlines() if line.startswith("#")]
    result = project.gpufleet("tune", "tabular_mlp", "--write", "--batch-sizes", "1,8", *FAST)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "decided by: " in result.stdout
    assert "noise: throughput ±" in result.stdout
    written = project.spec.read_text()
    assert "# gpufleet tune: " in written, result.stdout
    assert all(line in written.splitlines() for line in comments)
    report = json.loads((project.root / "state" / "tune" / "tabular_mlp" / "tune.json").read_text())
    chosen = report["summary"]["chosen"]["candidate"]
    spec = load_model_spec_file(project.spec).spec
    assert spec.max_batch_size == chosen["max_batch_size"], result.stdout
    assert spec.instance_groups[0].count == chosen["instance_count"], result.stdout
    assert f"wrote {project.spec}" in result.stdout
    for name in ("tune.png", "tune.html"):
        assert (project.root / "state" / "tune" / "tabular_mlp" / name).is_file()

    check = project.gpufleet("generate", "--check")
    assert check.returncode == 1, check.stdout + check.stderr
    assert f"+max_batch_size: {chosen['max_batch_size']}" in check.stdout, check.stdout
