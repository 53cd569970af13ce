"""The `gpufleet` CLI: generate, --check drift detection, exit codes, atomic output, schema.

Real: the Typer app run in-process with CliRunner, spec files and output directories on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from generators.schemas import render_schemas
from gpufleet.cli import app
from tests.conftest import GOLDEN_REPOSITORY, PROJECT_ROOT, SAMPLE_SPECS, snapshot, write_spec

runner = CliRunner()


def test_generate_writes_a_model_repository(scratch_project: Path) -> None:
    result = runner.invoke(app, ["generate"])
    assert result.exit_code == 0, result.output
    repository = scratch_project / "build" / "model_repository"
    assert (repository / "resnet50" / "config.pbtxt").is_file()
    assert "5 created, 0 updated, 0 unchanged, 0 removed" in result.output


def test_second_generate_rewrites_nothing(scratch_project: Path) -> None:
    runner.invoke(app, ["generate"])
    config = scratch_project / "build/model_repository/resnet50/config.pbtxt"
    before = config.stat().st_mtime_ns
    result = runner.invoke(app, ["generate"])
    assert "0 created, 0 updated, 5 unchanged" in result.output
    assert config.stat().st_mtime_ns == before


def test_check_passes_when_in_sync_and_reports_a_diff_when_not(scratch_project: Path) -> None:
    runner.invoke(app, ["generate"])
    assert runner.invoke(app, ["generate", "--check"]).exit_code == 0
    spec = scratch_project / "modelconfigs/tabular_mlp.yaml"
    spec.write_text(
        spec.read_text().replace("max_queue_delay_us: 2000", "max_queue_delay_us: 3000")
    )
    before = snapshot(scratch_project / "build")
    result = runner.invoke(app, ["generate", "--check"])
    assert result.exit_code == 1
    assert "-  max_queue_delay_microseconds: 2000" in result.output
    assert "+  max_queue_delay_microseconds: 3000" in result.output
    assert "run `gpufleet generate` to update them" in result.output
    assert snapshot(scratch_project / "build") == before, "--check must write nothing"


def test_check_on_an_empty_directory_reports_every_file(scratch_project: Path) -> None:
    result = runner.invoke(app, ["generate", "--check", "--json"])
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["ok"] is False
    assert len(summary["created"]) == 5
    assert not (scratch_project / "build").exists()


def test_hand_edited_config_is_drift(scratch_project: Path) -> None:
    runner.invoke(app, ["generate"])
    config = scratch_project / "build/model_repository/bert_encoder/config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size: 16", "max_batch_size: 4"))
    result = runner.invoke(app, ["generate", "--check"])
    assert result.exit_code == 1
    assert "+max_batch_size: 16" in result.output


def test_removed_spec_removes_only_its_generated_config(scratch_project: Path) -> None:
    runner.invoke(app, ["generate"])
    repository = scratch_project / "build/model_repository"
    (repository / "bert_encoder" / "1").mkdir()
    (repository / "bert_encoder" / "1" / "model.onnx").write_bytes(b"weights")
    (repository / "handmade").mkdir()
    (repository / "handmade" / "config.pbtxt").write_text('name: "handmade"\n')
    (scratch_project / "modelconfigs/bert_encoder.yaml").unlink()
    assert runner.invoke(app, ["generate", "--check"]).exit_code == 1
    result = runner.invoke(app, ["generate"])
    assert "removed" in result.output
    assert result.exit_code == 0
    assert not (repository / "bert_encoder" / "config.pbtxt").exists()
    assert (repository / "bert_encoder" / "1" / "model.onnx").read_bytes() == b"weights"
    assert (repository / "handmade" / "config.pbtxt").exists(), (
        "configs gpufleet did not write stay"
    )


def test_bad_spec_exits_2_and_leaves_the_repository_as_it_was(scratch_project: Path) -> None:
    runner.invoke(app, ["generate"])
    repository = scratch_project / "build/model_repository"
    before = snapshot(repository)
    # One good change and one bad file: nothing at all may be written.
    spec = scratch_project / "modelconfigs/tabular_mlp.yaml"
    spec.write_text(spec.read_text().replace("count: 2", "count: 3"))
    write_spec(
        scratch_project / "modelconfigs",
        "broken",
        "name: broken\nbackend: python\nmax_batch_size: -4\n",
    )
    result = runner.invoke(app, ["generate"])
    assert result.exit_code == 2
    assert (
        "broken.yaml:3: max_batch_size: Input should be greater than or equal to 0" in result.output
    )
    assert "Traceback" not in result.output
    assert snapshot(repository) == before


def test_generate_for_a_stack_uses_its_models_and_repository(scratch_project: Path) -> None:
    result = runner.invoke(app, ["generate", "--stack", "local"])
    assert result.exit_code == 0, result.output
    repository = scratch_project / "build/local/model_repository"
    assert sorted(p.name for p in repository.iterdir()) == ["tabular_mlp"]


@pytest.mark.parametrize(
    ("stack_text", "expected"),
    [
        (
            "config:\n  gpufleet:environment: moon\n",
            "Pulumi.bad.yaml:2: config.gpufleet:environment: Input should be 'local', 'static', 'proxmox' or 'azure'",
        ),
        (
            "config:\n  gpufleet:environment: local\n  gpufleet:modles: []\n",
            "Pulumi.bad.yaml:3: config.gpufleet:modles: unknown key 'modles'; did you mean 'models'?",
        ),
        (
            "config:\n  gpufleet:environment: local\n  gpufleet:models: [resnet50, nope]\n",
            "Pulumi.bad.yaml:3: config.gpufleet:models[1]: no model spec named 'nope'",
        ),
        (
            "config:\n  aws:region: x\n",
            "Pulumi.bad.yaml:1: config.gpufleet:environment: required key is missing",
        ),
    ],
)
def test_bad_stack_file(scratch_project: Path, stack_text: str, expected: str) -> None:
    (scratch_project / "stacks" / "Pulumi.bad.yaml").write_text(stack_text)
    result = runner.invoke(app, ["generate", "--stack", "bad"])
    assert result.exit_code == 2
    assert expected in result.output, result.output


def test_unknown_stack_names_the_known_ones(scratch_project: Path) -> None:
    result = runner.invoke(app, ["generate", "--stack", "nope"])
    assert result.exit_code == 2
    assert (
        "no stack named 'nope' (known stacks: azure-dev, azure-prod, lab, local, onprem-prod, "
        "onprem-staging)" in result.output
    )


def test_help_explains_the_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("generate", "schema", "import-config"):
        assert command in result.output
    assert "--check" in runner.invoke(app, ["generate", "--help"]).output


def test_committed_schemas_are_current() -> None:
    for name, content in render_schemas().items():
        assert (PROJECT_ROOT / "schemas" / name).read_text() == content, "run `make schemas`"


def test_schema_command_writes_both_schemas(tmp_path: Path) -> None:
    result = runner.invoke(app, ["schema", "--out", str(tmp_path)])
    assert result.exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "modelspec.schema.json",
        "stackspec.schema.json",
    ]


@pytest.mark.parametrize("spec_path", sorted(SAMPLE_SPECS.glob("*.yaml")), ids=lambda p: p.stem)
def test_sample_specs_validate_against_the_schema_they_name(spec_path: Path) -> None:
    first_line = spec_path.read_text().splitlines()[0]
    assert first_line == "# yaml-language-server: $schema=../schemas/modelspec.schema.json"
    schema = json.loads((SAMPLE_SPECS / "../schemas/modelspec.schema.json").read_text())
    jsonschema.validate(yaml.safe_load(spec_path.read_text()), schema)


def test_schema_catches_an_editor_typo() -> None:
    schema = json.loads((PROJECT_ROOT / "schemas/modelspec.schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError, match="max_batchsize"):
        jsonschema.validate({"name": "m", "backend": "python", "max_batchsize": 1}, schema)


def test_stack_files_validate_against_the_stack_schema() -> None:
    schema = json.loads((PROJECT_ROOT / "schemas/stackspec.schema.json").read_text())
    for stack in (PROJECT_ROOT / "stacks").glob("Pulumi.*.yaml"):
        jsonschema.validate(yaml.safe_load(stack.read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"config": {"gpufleet:environment": "moon"}}, schema)


def test_import_config_writes_specs_that_regenerate_the_same_config(tmp_path: Path) -> None:
    """Golden configs -> import-config -> generate: the same Triton configs come back."""
    specs_dir, repository = tmp_path / "specs", tmp_path / "repository"
    configs = sorted(GOLDEN_REPOSITORY.glob("*/config.pbtxt"))
    result = runner.invoke(app, ["import-config", *map(str, configs), "--out", str(specs_dir)])
    assert result.exit_code == 0, result.output
    assert sorted(p.stem for p in specs_dir.iterdir()) == sorted(p.parent.name for p in configs)
    first_line = (specs_dir / "resnet50.yaml").read_text().splitlines()[0]
    assert first_line.startswith("# yaml-language-server: $schema=")
    assert first_line.endswith("schemas/modelspec.schema.json")
    result = runner.invoke(app, ["generate", "--specs", str(specs_dir), "--out", str(repository)])
    assert result.exit_code == 0, result.output
    for config in configs:
        regenerated = repository / config.parent.name / "config.pbtxt"
        body = [line for line in regenerated.read_text().splitlines() if not line.startswith("#")]
        assert body == [
            line for line in config.read_text().splitlines() if not line.startswith("#")
        ]


def test_import_config_takes_the_model_name_from_the_directory(tmp_path: Path) -> None:
    config = tmp_path / "repo" / "echo" / "config.pbtxt"
    config.parent.mkdir(parents=True)
    config.write_text('backend: "python"\nmax_batch_size: 4\n')
    result = runner.invoke(app, ["import-config", str(config), "--out", str(tmp_path / "specs")])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((tmp_path / "specs" / "echo.yaml").read_text())["name"] == "echo"


def test_import_config_refuses_unsupported_fields_and_writes_nothing(tmp_path: Path) -> None:
    good = tmp_path / "good.pbtxt"
    good.write_text('name: "good"\nbackend: "python"\n')
    sequence = tmp_path / "sequence.pbtxt"
    sequence.write_text(
        'name: "seq"\nbackend: "python"\nmax_batch_size: 4\nsequence_batching { }\n'
    )
    broken = tmp_path / "broken.pbtxt"
    broken.write_text('name: "broken"\nmax_batch_size: [\n')
    result = runner.invoke(
        app,
        ["import-config", str(good), str(sequence), str(broken), "--out", str(tmp_path / "specs")],
    )
    assert result.exit_code == 2
    assert "sequence_batching" in result.output
    assert f"{broken}:" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "specs").exists(), "one bad config means nothing is written"


def test_import_config_does_not_overwrite_without_force(tmp_path: Path) -> None:
    config = tmp_path / "m.pbtxt"
    config.write_text('name: "m"\nbackend: "python"\n')
    existing = write_spec(tmp_path / "specs", "m", "name: m\nbackend: onnxruntime\n")
    arguments = ["import-config", str(config), "--out", str(tmp_path / "specs")]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 2
    assert "pass --force to overwrite it" in result.output
    assert "onnxruntime" in existing.read_text()
    assert runner.invoke(app, [*arguments, "--force"]).exit_code == 0
    assert "backend: python" in existing.read_text()


def test_empty_specs_directory_is_bad_input_not_a_mass_removal(scratch_project: Path) -> None:
    runner.invoke(app, ["generate"])
    empty = scratch_project / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["generate", "--specs", str(empty)])
    assert result.exit_code == 2
    assert "no model specs (*.yaml) here" in result.output
    assert len(list((scratch_project / "build/model_repository").glob("*/config.pbtxt"))) == 5


def test_a_write_that_fails_midway_leaves_the_repository_as_it_was(scratch_project: Path) -> None:
    """tabular_mlp is written before zz_blocked fails: both must be absent afterwards."""
    repository = scratch_project / "repo"
    repository.mkdir()
    (repository / "zz_blocked").write_text("a file where a model directory must go")
    write_spec(
        scratch_project / "modelconfigs", "zz_blocked", "name: zz_blocked\nbackend: python\n"
    )
    before = snapshot(repository)
    result = runner.invoke(app, ["generate", "--out", str(repository)])
    assert result.exit_code == 2
    assert result.output.startswith(f"error: {repository / 'zz_blocked'}")
    assert "Traceback" not in result.output
    assert snapshot(repository) == before
    assert sorted(p.name for p in repository.iterdir()) == ["zz_blocked"], "no empty model dirs"


def test_output_path_that_is_a_file_is_bad_input(scratch_project: Path) -> None:
    (scratch_project / "not_a_dir").write_text("x")
    result = runner.invoke(app, ["generate", "--out", "not_a_dir"])
    assert result.exit_code == 2
    assert result.output.startswith("error: not_a_dir/")
    assert "Traceback" not in result.output


def test_header_names_the_spec_the_same_way_from_any_working_directory(
    scratch_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner.invoke(app, ["generate"])
    monkeypatch.chdir(scratch_project / "modelconfigs")
    result = runner.invoke(
        app, ["generate", "--specs", ".", "--out", "../build/model_repository", "--check"]
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        (
            "[image_classifier, resnet50]",
            "config.gpufleet:models[0]: ensemble 'image_classifier' calls 'image_preprocess', which this stack does not serve; add image_preprocess to gpufleet:models",
        ),
        (
            "[resnet50, resnet50]",
            "config.gpufleet:models[1]: 'resnet50' is listed twice; remove one",
        ),
    ],
)
def test_stack_models_must_be_servable(scratch_project: Path, models: str, expected: str) -> None:
    (scratch_project / "stacks" / "Pulumi.bad.yaml").write_text(
        f"config:\n  gpufleet:environment: local\n  gpufleet:models: {models}\n"
    )
    result = runner.invoke(app, ["generate", "--stack", "bad"])
    assert result.exit_code == 2
    assert f"Pulumi.bad.yaml:3: {expected}" in result.output, result.output


def test_yaml_1_1_booleans_and_octals_stay_as_written_in_parameters(scratch_project: Path) -> None:
    """PyYAML alone would turn `no` into "false" and `010` into "8" in the Triton config."""
    write_spec(
        scratch_project / "modelconfigs",
        "params",
        "name: params\nbackend: python\nparameters:\n  FORCE_CPU_ONLY_INPUT_TENSORS: no\n"
        "  padded: 010\n  duration: 1:30\n  enabled: true\n",
    )
    assert runner.invoke(app, ["generate"]).exit_code == 0
    config = (scratch_project / "build/model_repository/params/config.pbtxt").read_text()
    for key, value in (
        ("FORCE_CPU_ONLY_INPUT_TENSORS", "no"),
        ("padded", "10"),
        ("duration", "1:30"),
        ("enabled", "true"),
    ):
        assert f'key: "{key}"\n  value {{\n    string_value: "{value}"' in config


def test_import_config_errors_are_one_line_each_naming_the_file(tmp_path: Path) -> None:
    config = tmp_path / "m.pbtxt"
    config.write_text(
        'name: "m"\nbackend: "python"\nmax_batch_size: 4\nsequence_batching { }\nbatch_input [ { kind: BATCH_ELEMENT_COUNT target_name: "n" data_type: TYPE_FP32 } ]\n'
    )
    bad_syntax = tmp_path / "s.pbtxt"
    bad_syntax.write_text('name: "s"\nmax_batch_size: [\n')
    result = runner.invoke(
        app, ["import-config", str(config), str(bad_syntax), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines == [
        f"error: {config}: sequence_batching: the model spec cannot express this field; remove it from the config, or extend ModelSpec and the generator",
        f"error: {config}: batch_input: the model spec cannot express this field; remove it from the config, or extend ModelSpec and the generator",
        f"error: {bad_syntax}:2:17: " + lines[2].split(f"{bad_syntax}:2:17: ", 1)[1],
    ]


def test_import_config_reads_a_file_with_a_byte_order_mark(tmp_path: Path) -> None:
    config = tmp_path / "bom.pbtxt"
    config.write_bytes('\ufeffname: "bom"\nbackend: "python"\n'.encode())
    result = runner.invoke(app, ["import-config", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "bom.yaml").exists()
