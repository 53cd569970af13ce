"""Gate inputs gathered for a stack: models the correctness and load gates cannot check.

Real: the gate modules, reports written to disk. No server runs: these models never reach one
(Triton's address is a closed loopback port, and the registry is never asked).
"""

from __future__ import annotations

import json
from pathlib import Path

from gpufleet.registry.client import ModelRegistry
from gpufleet.spec.loading import load_model_spec_file
from gpufleet.spec.stack import StackSpec
from tests.conftest import SAMPLE_SPECS
from validation.gates import GateContext, run_gates
from validation.loopback import pick_free_ports
from validation.report import exit_code


def test_models_the_gates_cannot_check_are_reported_not_passed(tmp_path: Path) -> None:
    registry_model = load_model_spec_file(SAMPLE_SPECS / "tabular_mlp.yaml").spec
    handmade = registry_model.model_copy(update={"name": "handmade", "source": None})
    [closed_port] = pick_free_ports(1)
    context = GateContext(
        stack="scratch",
        spec=StackSpec(environment="local"),
        models=[registry_model, handmade],
        repository=tmp_path / "model_repository",  # nothing exported yet
        registry=ModelRegistry(f"http://127.0.0.1:{closed_port}"),
        processes=[],
        grpc_url=f"127.0.0.1:{closed_port}",
        reports_dir=tmp_path / "reports",
    )
    reports = run_gates(context, ["correctness", "load"], say=lambda line: None)

    for report in reports:
        statuses = {check.name: check.status for check in report.checks}
        assert statuses == {"tabular_mlp": "error", "handmade": "warn"}, report
        messages = {check.name: check.message for check in report.checks}
        assert "run `gpufleet up --stack scratch`" in messages["tabular_mlp"]
        assert "not filled from the registry" in messages["handmade"]
        written = json.loads((tmp_path / "reports" / f"{report.gate}.json").read_text())
        assert written["status"] == "error"
    assert exit_code(reports) == 2
