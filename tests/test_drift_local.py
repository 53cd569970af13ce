"""`gpufleet drift` on a local stack: each kind of drift injected for real, detected with its
layer, host and object, then repaired by the command the item names; clean before and after.

Real: the `gpufleet` CLI as a separate process, a real MLflow registry (sqlite) with real torch
models, the real Triton 2.51 binary (nvidia-pytriton) on loopback, its HTTP repository API (with
the stack's admin key) for the injections. Nothing is mocked. One stack serves the module; the
tests run in order and each leaves it repaired (drift exit 0) for the next.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest

from gpufleet.registry.demo import demo_network, register_torch_model
from gpufleet.spec.loading import load_model_spec_file
from tests.conftest import PROJECT_ROOT
from tests.test_local_stack import STACK, Project, make_project
from validation.loopback import http_request

MODEL = "tabular_mlp"

REPORT_SCHEMA = json.loads((PROJECT_ROOT / "schemas/drift-report.schema.json").read_text())


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    project = make_project(tmp_path_factory.mktemp("drift-local"))
    project.first_up = project.gpufleet("up", "--only", "host")
    assert project.first_up.returncode == 0, project.first_up.stdout + project.first_up.stderr
    try:
        yield project
    finally:
        project.gpufleet("down")


def drift(project: Project, *args: str) -> tuple[int, dict[str, Any]]:
    result = project.gpufleet("drift", "--json", *args)
    assert result.returncode in (0, 1, 2), result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["exit_code"] == result.returncode
    jsonschema.validate(report, REPORT_SCHEMA)  # the documented schema
    return result.returncode, report


def assert_clean(project: Project) -> None:
    code, report = drift(project)
    assert (code, report["items"]) == (0, []), report
    assert {check["layer"] for check in report["checks"]} == {"files", "triton"}
    assert all(check["error"] is None for check in report["checks"])


def repair(project: Project, items: list[dict[str, Any]]) -> None:
    """Run each distinct repair command the items name (generate before up), in order."""
    commands = sorted({item["repair"] for item in items}, key=lambda c: "up" in c.split())
    assert commands
    for command in commands:
        words = command.split()
        assert words[:1] == ["gpufleet"], command
        assert words[-2:] == ["--stack", STACK], command
        extra = ["--only", "host"] if words[1] == "up" else []
        result = project.gpufleet(*words[1:-2], *extra)
        assert result.returncode == 0, command + "\n" + result.stdout + result.stderr


def admin_post(project: Project, path: str, body: dict[str, Any] | None = None) -> None:
    """POST to the local Triton's repository API with the stack's admin key."""
    import urllib.request

    port = project.state().servers["triton"].ports["http"]
    key = (project.state_dir / "triton-admin-key").read_text()
    data = json.dumps(body or {}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        method="POST",
        headers={"triton-admin-key": key, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        assert response.status == 200


def items_of(report: dict[str, Any], layer: str) -> list[dict[str, Any]]:
    return [item for item in report["items"] if item["layer"] == layer]


def test_a_clean_stack_reports_nothing_in_json_table_and_junit(project: Project) -> None:
    assert_clean(project)
    junit = project.root / "drift.junit.xml"
    table = project.gpufleet("drift", "--junit", str(junit))
    assert table.returncode == 0, table.stdout + table.stderr
    assert f"stack {STACK}: no drift" in table.stdout
    assert "hosts: not applicable" in table.stdout
    suites = ET.fromstring(junit.read_text())  # noqa: S314 - written by this test's run
    cases = {case.get("name") for case in suites.iter("testcase")}
    assert f"model {MODEL} config" in cases
    assert f"model {MODEL} versions" in cases
    assert f"model {MODEL} files" in cases
    assert any(name and name.endswith(f"{MODEL}/config.pbtxt") for name in cases)
    assert not list(suites.iter("failure"))
    assert not list(suites.iter("error"))


def test_a_config_edited_on_the_host_and_reloaded_shows_even_a_default_changed(
    project: Project,
) -> None:
    """The edit turns off `input_pinned_memory`, a field the spec leaves to Triton (which fills
    it in as true): normalising Triton's defaults must not hide it (argo-cd#8767)."""
    config = project.repository / MODEL / "config.pbtxt"
    original = config.read_text()
    config.write_text(
        original.replace("max_batch_size: 64", "max_batch_size: 32")
        + "optimization {\n  input_pinned_memory {\n    enable: false\n  }\n}\n"
    )
    admin_post(project, f"/v2/repository/models/{MODEL}/load")

    code, report = drift(project)
    assert code == 1
    [file_item] = items_of(report, "files")
    assert file_item["object"] == f"file {config}"
    assert "max_batch_size: 32" in file_item["found"]
    assert file_item["repair"] == f"gpufleet generate --stack {STACK}"
    triton = items_of(report, "triton")
    assert {(item["host"], item["object"]) for item in triton} == {
        ("local", f"model {MODEL} config")
    }
    found = {(item["expected"], item["found"]) for item in triton}
    assert found == {
        ("max_batch_size: 64", "max_batch_size: 32"),
        (
            "optimization.input_pinned_memory.enable: true",
            "optimization.input_pinned_memory.enable: false",
        ),
    }
    assert {item["repair"] for item in triton} == {f"gpufleet up --stack {STACK}"}

    repair(project, report["items"])
    assert config.read_text() == original
    assert_clean(project)


def test_a_config_override_through_the_repository_api(project: Project) -> None:
    config = json.loads(_live_config(project))
    config["instance_group"] = [{"kind": "KIND_CPU", "count": 1}]
    config["dynamic_batching"]["preserve_ordering"] = True  # left to its default by the spec
    admin_post(
        project,
        f"/v2/repository/models/{MODEL}/load",
        {"parameters": {"config": json.dumps(config)}},
    )
    code, report = drift(project)
    assert code == 1
    assert items_of(report, "files") == []
    differences = {
        (item["host"], item["object"], item["expected"], item["found"])
        for item in items_of(report, "triton")
    }
    assert differences == {
        (
            "local",
            f"model {MODEL} config",
            f"instance_group[{MODEL}_0].count: 2",
            f"instance_group[{MODEL}_0].count: 1",
        ),
        (
            "local",
            f"model {MODEL} config",
            "dynamic_batching.preserve_ordering: false",
            "dynamic_batching.preserve_ordering: true",
        ),
    }
    repair(project, report["items"])  # no file changed: up reloads it all the same
    assert_clean(project)


def test_a_version_loaded_by_hand(project: Project) -> None:
    served = project.repository / MODEL / "1"
    shutil.copytree(served, project.repository / MODEL / "2")
    admin_post(project, f"/v2/repository/models/{MODEL}/load")  # latest 1: now serves v2
    code, report = drift(project)
    assert code == 1
    [item] = items_of(report, "triton")
    assert (item["host"], item["object"]) == ("local", f"model {MODEL} versions")
    assert item["expected"].startswith("registry says v1 (")
    assert item["found"] == "Triton serves v2"
    repair(project, report["items"])
    assert not (project.repository / MODEL / "2").exists()
    assert_clean(project)


def test_a_model_loaded_that_no_spec_names(project: Project) -> None:
    extra = project.repository / "drift_extra"
    shutil.copytree(project.repository / MODEL / "1", extra / "1")
    (extra / "config.pbtxt").write_text(
        (project.repository / MODEL / "config.pbtxt")
        .read_text()
        .replace(f'name: "{MODEL}"', 'name: "drift_extra"')
    )
    try:
        admin_post(project, "/v2/repository/models/drift_extra/load")
        code, report = drift(project)
        assert code == 1
        [item] = items_of(report, "triton")
        assert (item["host"], item["object"]) == ("local", "model drift_extra")
        assert item["found"] == "loaded v1"
        repair(project, report["items"])
    finally:
        shutil.rmtree(extra)
    assert_clean(project)


def test_the_alias_moved_in_mlflow(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = project.registry(monkeypatch)
    spec = load_model_spec_file(project.specs / f"{MODEL}.yaml").spec
    moved = register_torch_model(registry, spec, demo_network(spec, seed=3))
    code, report = drift(project, "--layer", "triton")
    assert code == 1
    assert [check["layer"] for check in report["checks"]] == ["triton"]
    [item] = report["items"]
    assert (item["layer"], item["host"], item["object"]) == (
        "triton",
        "local",
        f"model {MODEL} versions",
    )
    assert item["expected"] == (
        f"registry says v{moved.version} (models:/{MODEL}@production is v{moved.version})"
    )
    assert item["found"] == "Triton serves v1"
    repair(project, report["items"])
    assert_clean(project)


def test_triton_down_is_not_checked_while_the_files_layer_is_still_reported(
    project: Project,
) -> None:
    """Exit 2 names the Triton that could not be checked; the files layer still reports its
    own drift (an edited config), never a silent skip."""
    config = project.repository / MODEL / "config.pbtxt"
    config.write_text(config.read_text() + "# edited\n")
    assert project.state().servers["triton"].stop()
    code, report = drift(project)
    assert code == 2
    [triton] = [check for check in report["checks"] if check["layer"] == "triton"]
    assert triton["host"] == "local"
    assert triton["error"].startswith("could not be checked: Triton at 127.0.0.1:")
    assert f"gpufleet up --stack {STACK}" in triton["error"]
    [files] = [check for check in report["checks"] if check["layer"] == "files"]
    assert files["error"] is None
    assert [item["object"] for item in files["items"]] == [f"file {config}"]
    table = project.gpufleet("drift")
    assert table.returncode == 2
    assert "NOT CHECKED" in table.stdout
    assert "DRIFT (1)" in table.stdout

    repair(project, [*report["items"], {"repair": f"gpufleet up --stack {STACK}"}])
    assert_clean(project)


def _live_config(project: Project) -> str:
    port = project.state().servers["triton"].ports["http"]
    status, body = http_request("GET", f"http://127.0.0.1:{port}/v2/models/{MODEL}/config", 30)
    assert status == 200
    return body.decode()
