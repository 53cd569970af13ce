"""The parts of `gpufleet drift` that need no server: the files layer against what
`gpufleet generate` wrote, Triton's fill rules applied to generated configs, the exit code's
precedence, the JSON (against its schema), JUnit and table forms.

Real: the sample specs, `gpufleet generate` (the Typer app in-process) writing a repository and
serving stacks on disk, Triton's `model_config_pb2`. The live Triton configs below are built as
Triton 2.51 reports them (tests/test_drift_local.py compares with a running Triton).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from generators.model_repository import render_repository_files
from gpufleet.cli import app
from gpufleet.drift.files import check_files
from gpufleet.drift.items import DriftItem, LayerCheck
from gpufleet.drift.report import DriftReport, table_lines, write_junit
from gpufleet.drift.run import run_drift
from gpufleet.drift.triton_config import config_differences, flatten, parse_generated
from gpufleet.rollout.state import RolloutRecord
from gpufleet.spec.loading import load_model_specs, load_stack_spec, select_stack_models
from tests.conftest import PROJECT_ROOT, SAMPLE_SPECS

SCHEMA = json.loads((PROJECT_ROOT / "schemas/drift-report.schema.json").read_text())


def _generated(name: str) -> str:
    specs = load_model_specs(SAMPLE_SPECS)
    return render_repository_files(specs)[f"{name}/config.pbtxt"]


def _as_triton_reports(text: str, **changes: object) -> dict[str, object]:
    """What Triton 2.51 answers for a clean load of `text` on a CPU machine (observed for the
    python backend: tests/test_drift_local.py), with `changes` applied on top."""
    live = json.loads(json.dumps(flatten_to_dict(text)))
    live.setdefault("version_policy", {"latest": {"num_versions": 1}})
    live.setdefault("optimization", {})
    live["optimization"].setdefault("input_pinned_memory", {"enable": True})
    live["optimization"].setdefault("output_pinned_memory", {"enable": True})
    for index, group in enumerate(live.get("instance_group", [])):
        group.setdefault("name", f"{live['name']}_{index}")
    live.setdefault("default_model_filename", "model.py")
    live.update(changes)
    return live


def flatten_to_dict(text: str) -> dict[str, object]:
    from google.protobuf import json_format

    document: dict[str, object] = json_format.MessageToDict(
        parse_generated(text), preserving_proto_field_name=True
    )
    return document


def test_triton_filled_defaults_are_not_drift_but_a_changed_default_is() -> None:
    generated = _generated("tabular_mlp")
    assert config_differences(generated, _as_triton_reports(generated)) == []
    changed = _as_triton_reports(
        generated, version_policy={"all": {}}, optimization={"input_pinned_memory": {}}
    )
    assert config_differences(generated, changed) == [
        ("optimization.input_pinned_memory.enable", "true", "false"),
        ("optimization.output_pinned_memory.enable", "true", "(unset)"),
        ("version_policy.all", "(unset)", "{}"),
        ("version_policy.latest.num_versions", "1", "(unset)"),
    ]


def test_machine_dependent_fills_come_from_the_live_side_only_where_the_spec_is_silent() -> None:
    text = 'name: "m"\nbackend: "python"\ninstance_group { kind: KIND_GPU }\n'
    live = _as_triton_reports(text)
    live["instance_group"] = [{"name": "m_0", "kind": "KIND_GPU", "count": 1, "gpus": [0, 1]}]
    assert config_differences(text, live) == []
    pinned = 'name: "m"\nbackend: "python"\ninstance_group { kind: KIND_GPU gpus: 0 }\n'
    assert config_differences(pinned, live) == [("instance_group[m_0].gpus", "[0]", "[0, 1]")]
    silent = 'name: "m"\nbackend: "python"\n'
    for groups, drift in (
        ([{"name": "m", "kind": "KIND_CPU", "count": 1}], []),
        (
            [{"name": "m", "kind": "KIND_CPU", "count": 4}],
            [("instance_group[m].count", "1", "4")],
        ),
    ):
        live = _as_triton_reports(silent, instance_group=groups)
        assert config_differences(silent, live) == drift


def test_flatten_keys_repeated_messages_by_name() -> None:
    lines = flatten(parse_generated(_generated("tabular_mlp")))
    assert lines["input[features].dims"] == '["16"]'
    assert lines["output[scores].data_type"] == '"TYPE_FP32"'


def test_the_files_layer_sees_what_generate_check_sees(
    scratch_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["generate", "--stack", "lab"]).exit_code == 0
    loaded = load_stack_spec(Path("stacks"), "lab")
    specs = select_stack_models(loaded, load_model_specs(Path("modelconfigs")))
    repository = Path(loaded.spec.model_repository)
    clean = check_files(loaded, specs, repository=repository)
    assert (clean.items, clean.error) == ([], None)
    assert len(clean.checked) > len(specs)  # configs and every host's serving files
    [config] = [path for path in repository.glob("*/config.pbtxt")][:1]
    config.write_text(config.read_text().replace("max_batch_size", "max_batch_size: 1 #"))
    [compose] = [
        path for path in (scratch_project / "build/lab/serving").rglob("docker-compose.yml")
    ][:1]
    compose.unlink()
    drifted = check_files(loaded, specs, repository=repository)
    found = {item.object: item.found for item in drifted.items}
    assert set(found) == {f"file {config}", f"file {compose.relative_to(scratch_project)}"}
    assert found[f"file {compose.relative_to(scratch_project)}"] == "missing"
    assert "+max_batch_size" in found[f"file {config}"]
    assert runner.invoke(app, ["generate", "--stack", "lab", "--check"]).exit_code == 1
    assert {item.repair for item in drifted.items} == {"gpufleet generate --stack lab"}


def _report(*checks: LayerCheck) -> DriftReport:
    return DriftReport("lab", ["files", "triton", "containers"], list(checks), seconds=1.5)


def _item(host: str, object_: str) -> DriftItem:
    return DriftItem("triton", host, object_, "a", "b", "gpufleet up --stack lab")


def test_exit_codes_two_wins_over_one_and_json_follows_its_schema() -> None:
    clean = LayerCheck("files", "", checked=["file x"])
    drifted = LayerCheck("triton", "gpu-a", checked=["model m config"])
    drifted.items.append(_item("gpu-a", "model m config"))
    failed = LayerCheck("triton", "gpu-b", error="could not be checked: Triton at ...")
    for checks, code, status in (
        ((clean,), 0, "in sync"),
        ((clean, drifted), 1, "drift"),
        ((clean, drifted, failed), 2, "not checked"),
    ):
        document = _report(*checks).to_json()
        jsonschema.validate(document, SCHEMA)
        assert (document["exit_code"], document["status"]) == (code, status)
    everything = _report(failed, drifted, clean).to_json()
    assert [(c["layer"], c["host"]) for c in everything["checks"]] == [
        ("files", ""),
        ("triton", "gpu-a"),
        ("triton", "gpu-b"),
    ]


def test_junit_has_one_case_per_checked_object_and_the_table_names_what_was_not_checked(
    tmp_path: Path,
) -> None:
    drifted = LayerCheck("triton", "gpu-a", checked=["model m config", "model m versions"])
    drifted.items += [_item("gpu-a", "model m config"), _item("gpu-a", "model m config")]
    failed = LayerCheck("triton", "gpu-b", error="could not be checked: Triton at 10.0.0.2")
    report = _report(LayerCheck("files", "", checked=["file x"]), drifted, failed)
    report.not_applicable["containers"] = "no serving"
    write_junit(report, tmp_path / "drift.xml")
    root = ET.fromstring((tmp_path / "drift.xml").read_text())  # noqa: S314 - written above
    suites = {suite.get("name"): suite for suite in root.iter("testsuite")}
    assert set(suites) == {"drift.files", "drift.triton"}
    triton = suites["drift.triton"]
    assert (triton.get("tests"), triton.get("failures"), triton.get("errors")) == ("3", "1", "1")
    cases = [(case.get("classname"), case.get("name")) for case in triton.iter("testcase")]
    assert cases == [
        ("drift.triton.gpu-a", "model m config"),
        ("drift.triton.gpu-a", "model m versions"),
        ("drift.triton.gpu-b", "checked"),
    ]
    lines = table_lines(report)
    assert "containers: not applicable (no serving)" in lines
    assert any("gpu-b" in line and "NOT CHECKED" in line for line in lines)
    assert any("gpu-a" in line and "DRIFT (2)" in line for line in lines)
    assert lines[-1].startswith("stack lab: 1 check(s) could not run, 2 drift item(s)")


def test_a_proxmox_stack_without_outputs_names_each_host_layer_and_still_checks_files(
    scratch_project: Path,
) -> None:
    """No addresses (no Pulumi CLI, no --outputs): triton, hosts and containers are "could not
    be checked" per host, with the command that makes the outputs; files are still compared."""
    runner = CliRunner()
    assert runner.invoke(app, ["generate", "--stack", "onprem-prod"]).exit_code == 0
    config = next(Path("build").rglob("docker-compose.yml"))
    config.write_text(config.read_text() + "# edited\n")
    result = runner.invoke(app, ["drift", "--stack", "onprem-prod", "--json"])
    assert result.exit_code == 2, result.output
    report = json.loads(result.stdout)
    jsonschema.validate(report, SCHEMA)
    hosts = [host.name for host in load_stack_spec(Path("stacks"), "onprem-prod").spec.hosts]
    not_checked = {(c["layer"], c["host"]) for c in report["checks"] if c["error"]}
    for layer in ("triton", "hosts", "containers"):
        assert {(layer, host) for host in hosts} <= not_checked
    assert all(
        "pulumi stack output --stack onprem-prod --json" in c["error"]
        for c in report["checks"]
        if c["layer"] in ("triton", "hosts", "containers")
    )
    [files] = [c for c in report["checks"] if c["layer"] == "files"]
    assert files["error"] is None
    assert [item["object"] for item in files["items"]] == [f"file {scratch_project / config}"]


def test_a_model_under_rollout_is_compared_as_served_by_generate_and_the_files_layer(
    scratch_project: Path,
) -> None:
    """While a rollout is active, `up` serves the stable and the candidate version
    (`version_policy: specific`): `generate --check` and drift's files layer must compare with
    that, not report it as drift (whose repair, `generate`, would undo the rollout's config).
    Real: the Typer app in-process, the sample specs and local stack, a rollout record on disk as
    `gpufleet rollout start` writes it; no server."""
    runner = CliRunner()
    loaded = load_stack_spec(Path("stacks"), "local")
    state_dir = Path(loaded.spec.resolved_state_dir("local"))
    record = RolloutRecord(
        stack="local",
        model="tabular_mlp",
        strategy="canary",
        stable=1,
        candidate=2,
        candidate_uri="models:/tabular_mlp@candidate",
        phase="serving",
    )
    record.save(state_dir / "rollout" / "tabular_mlp.json")
    assert runner.invoke(app, ["generate", "--stack", "local"]).exit_code == 0
    config = Path(loaded.spec.model_repository) / "tabular_mlp" / "config.pbtxt"
    assert "specific" in config.read_text()
    assert runner.invoke(app, ["generate", "--stack", "local", "--check"]).exit_code == 0
    report = run_drift("local", project_root=scratch_project, layers=["files"])
    assert (report.exit_code, [item.object for item in report.items]) == (0, [])

    record.phase = "promoted"  # the rollout has ended: the spec's own policy is served again
    record.save(state_dir / "rollout" / "tabular_mlp.json")
    assert runner.invoke(app, ["generate", "--stack", "local", "--check"]).exit_code == 1
    report = run_drift("local", project_root=scratch_project, layers=["files"])
    assert [item.object for item in report.items] == [f"file {scratch_project / config}"]
    assert runner.invoke(app, ["generate", "--stack", "local"]).exit_code == 0
    assert "specific" not in config.read_text()


def test_an_unreadable_rollout_record_is_bad_input_for_generate(scratch_project: Path) -> None:
    loaded = load_stack_spec(Path("stacks"), "local")
    records = Path(loaded.spec.resolved_state_dir("local")) / "rollout"
    records.mkdir(parents=True)
    (records / "tabular_mlp.json").write_text("{not json")
    result = CliRunner().invoke(app, ["generate", "--stack", "local"])
    assert result.exit_code == 2, result.output
    assert "tabular_mlp.json" in result.output
    assert not Path(loaded.spec.model_repository).exists()
