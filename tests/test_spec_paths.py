"""Spec values that become paths or command-line arguments cannot escape where they belong.

Each test plays the attack: a file name with `../`, a directory outside the project or in
/etc, a secrets directory that is the stack directory's parent, an image read as an option.
Before these checks the value was accepted and the file landed outside (the export test shows
it against the exporter itself). Now each is refused with the file, line and field, exit 2, and
nothing is written.

Real: the `gpufleet` CLI run in-process with CliRunner on a copy of the sample project; spec
files on disk; torch exporting the python backend's files. Nothing is mocked.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from generators.model_export import ExportError, export_model
from gpufleet.cli import app
from gpufleet.spec.loading import load_model_spec_file
from gpufleet.spec.paths import check_directory
from gpufleet.spec.problems import SpecError
from tests.conftest import snapshot
from tests.mlflow_fixtures import mlp_spec

runner = CliRunner()


def line_of(path: Path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_an_export_never_writes_outside_its_version_directory(tmp_path: Path) -> None:
    """The attack as `gpufleet up` would run it: export_model given `../../outside.py`."""
    repository = tmp_path / "repository"
    version_dir = repository / "mlp" / "1"
    outside = tmp_path / "outside.py"
    outside.write_text("operator's file\n")
    spec = mlp_spec("mlp").model_copy(update={"default_model_filename": "../../../outside.py"})
    module = torch.nn.Sequential(torch.nn.Linear(16, 4))
    with pytest.raises(ExportError, match=r"spec 'mlp': default_model_filename .*plain file"):
        export_model(module, spec, version_dir)
    assert outside.read_text() == "operator's file\n"
    assert not any(path.is_file() for path in repository.rglob("*"))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("default_model_filename", "../../x.py"),
        ("default_model_filename", "/etc/cron.d/x"),
        ("default_model_filename", ".."),
        ("default_model_filename", "-rf"),
    ],
)
def test_a_model_spec_file_name_must_be_a_plain_name(
    tmp_path: Path, field: str, value: str
) -> None:
    document = mlp_spec("mlp").model_dump(mode="json", exclude_defaults=True)
    document[field] = value
    path = tmp_path / "mlp.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    with pytest.raises(SpecError) as raised:
        load_model_spec_file(path)
    (problem,) = raised.value.problems
    assert str(problem).startswith(f"{path}:{line_of(path, field)}: {field}: ")
    assert "not a plain file name" in str(problem)


def test_label_and_warmup_files_must_be_plain_names(tmp_path: Path) -> None:
    document = mlp_spec("mlp").model_dump(mode="json", exclude_defaults=True)
    document["outputs"][0]["label_file"] = "../../../etc/shadow"
    document["warmup"] = [
        {
            "name": "w",
            "batch_size": 1,
            "inputs": {"features": {"dtype": "fp32", "shape": [16], "data_file": "/etc/shadow"}},
        }
    ]
    path = tmp_path / "mlp.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    with pytest.raises(SpecError) as raised:
        load_model_spec_file(path)
    fields = [problem.path_text for problem in raised.value.problems]
    assert fields == ["outputs[0].label_file", "warmup[0].inputs.features.data_file"]


def test_import_config_refuses_a_third_party_config_that_names_files_outside(
    tmp_path: Path,
) -> None:
    config = tmp_path / "vendor" / "evil" / "config.pbtxt"
    config.parent.mkdir(parents=True)
    config.write_text(
        'name: "evil"\nbackend: "python"\nmax_batch_size: 4\n'
        'default_model_filename: "../../../../home/operator/.bashrc"\n'
        'input [{ name: "IN" data_type: TYPE_FP32 dims: [2] }]\n'
        'output [{ name: "OUT" data_type: TYPE_FP32 dims: [2] label_filename: "/etc/shadow" }]\n'
    )
    out = tmp_path / "specs"
    result = runner.invoke(app, ["import-config", str(config), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "default_model_filename" in result.output
    assert "label_file" in result.output
    assert "not a plain file name" in result.output
    assert not out.exists()


def stack_with(project: Path, stack: str, **config: Any) -> Path:
    """stacks/Pulumi.<stack>.yaml with `config` merged over the sample stack of that name."""
    path = project / "stacks" / f"Pulumi.{stack}.yaml"
    document = yaml.safe_load(path.read_text())
    for key, value in config.items():
        name = f"gpufleet:{key}"
        current = document["config"].get(name)
        if isinstance(current, dict) and isinstance(value, dict):
            value = {**current, **value}
        document["config"][name] = value
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def refused(project: Path, stack: str, field: str, reason: str) -> None:
    """`gpufleet generate --stack` exits 2 naming the stack file, line and field; writes nothing."""
    before = snapshot(project)
    result = runner.invoke(app, ["generate", "--stack", stack])
    assert result.exit_code == 2, result.output
    assert re.search(
        rf"stacks/Pulumi\.{stack}\.yaml:\d+: config\.gpufleet:{field}: ", result.output
    )
    assert reason in result.output
    assert snapshot(project) == before
    assert not (project.parent / "outside").exists()


def test_a_model_repository_outside_the_project_is_refused(scratch_project: Path) -> None:
    stack_with(scratch_project, "local", model_repository="../outside")
    refused(scratch_project, "local", "model_repository", "'.' or '..' part")


@pytest.mark.parametrize(
    ("config", "field", "reason"),
    [
        ({"state_dir": "/etc/gpufleet"}, "state_dir", "system directory /etc"),
        ({"model_repository": "/var/lib/docker/models"}, "model_repository", "/var/lib/docker"),
        ({"model_repository": "/"}, "model_repository", "other things live in"),
        ({"model_repository": "."}, "model_repository", "'.' or '..' part"),
        ({"model_repository": "-x"}, "model_repository", "read as an option"),
        (
            {"state_dir": "build/s", "model_repository": "build/s/ansible/models"},
            "model_repository",
            "where gpufleet keeps the stack's state",
        ),
        (
            {"state_dir": "build/m/state", "model_repository": "build/m"},
            "state_dir",
            "copied to every host",
        ),
    ],
)
def test_stack_directories_stay_out_of_system_and_state_directories(
    scratch_project: Path, config: dict[str, str], field: str, reason: str
) -> None:
    stack_with(scratch_project, "local", **config)
    refused(scratch_project, "local", field, reason)


@pytest.mark.parametrize(
    ("serving", "field", "reason"),
    [
        ({"secrets_dir": ".."}, "secrets_dir", "its parent"),
        ({"secrets_dir": "."}, "secrets_dir", "the stack directory itself"),
        ({"secrets_dir": "model_repository"}, "secrets_dir", "a name the stack already uses"),
        ({"directory": "/opt/gpufleet/../../etc"}, "directory", "'.' or '..' part"),
        ({"directory": "/etc/gpufleet"}, "directory", "system directory /etc"),
        ({"directory": "/opt"}, "directory", "other things live in"),
    ],
)
def test_the_serving_stack_directories_stay_in_their_place(
    scratch_project: Path, serving: dict[str, str], field: str, reason: str
) -> None:
    stack_with(scratch_project, "onprem-prod", serving=serving)
    refused(scratch_project, "onprem-prod", f"serving.{field}", reason)


def test_the_gpu_probe_image_cannot_be_a_docker_option(scratch_project: Path) -> None:
    """It becomes an argument of `docker run` on every host the gate checks."""
    stack_with(scratch_project, "lab", host_config={"gpu_probe_image": "--privileged"})
    refused(scratch_project, "lab", "host_config.gpu_probe_image", "not an image reference")


@pytest.mark.parametrize(
    "path", ["build/lab", "/srv/gpufleet/serving", "/opt/gpufleet", "/var/lib/gpufleet"]
)
def test_ordinary_directories_pass(path: str) -> None:
    assert check_directory(path) == path
