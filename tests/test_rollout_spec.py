"""The `rollout` section of a model spec and `gpufleet:gateway` of a stack: accepted, or refused
with the file, line, field and what to do; the CLI exits 2 and writes nothing.

Real: the spec loader, the `gpufleet` CLI (Typer's runner) and the JSON schema checked into
schemas/. Nothing runs a server here (tests/test_rollout_local.py does).
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from gpufleet.cli import app
from gpufleet.spec.loading import load_model_specs, load_stack_spec
from gpufleet.spec.problems import SpecError
from tests.conftest import PROJECT_ROOT, write_spec

BASE = """name: m
backend: python
source: models:/m@production
max_batch_size: 8
inputs:
  - name: x
    dtype: fp32
    shape: [4]
outputs:
  - name: y
    dtype: fp32
    shape: [4]
"""
CANARY = """rollout:
  strategy: canary
  candidate: models:/m@candidate
  weight: 10
  sticky_header: x-user-id
  limits: {max_error_ratio: 0.02, max_p99_ratio: 1.5, min_requests: 50}
"""


def problems_of(directory: Path) -> list[str]:
    with pytest.raises(SpecError) as caught:
        load_model_specs(directory)
    return [str(problem) for problem in caught.value.problems]


def test_a_canary_rollout_loads_with_its_limits(tmp_path: Path) -> None:
    write_spec(tmp_path, "m", BASE + CANARY)
    (loaded,) = load_model_specs(tmp_path)
    rollout = loaded.spec.rollout
    assert rollout is not None
    assert (rollout.strategy, rollout.canary_weight, rollout.sticky_header) == (
        "canary",
        10,
        "x-user-id",
    )
    assert rollout.limits.max_p99_ratio == 1.5
    assert rollout.limits.correctness_gate is True


def test_shadow_and_blue_green_need_only_a_candidate(tmp_path: Path) -> None:
    for strategy in ("shadow", "blue_green"):
        write_spec(
            tmp_path, "m", BASE + f"rollout:\n  strategy: {strategy}\n  candidate: models:/m/7\n"
        )
        (loaded,) = load_model_specs(tmp_path)
        assert loaded.spec.rollout is not None
        assert loaded.spec.rollout.strategy == strategy


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            BASE + CANARY.replace("models:/m@candidate", "models:/other@candidate"),
            "m.yaml:15: rollout.candidate: names registered model 'other', but source names 'm'",
            id="other-model",
        ),
        pytest.param(
            BASE + CANARY.replace("models:/m@candidate", "models:/m@production"),
            "m.yaml:15: rollout.candidate: is the source itself",
            id="candidate-is-source",
        ),
        pytest.param(
            BASE + CANARY.replace("weight: 10", "weight: 100"),
            "m.yaml:16: rollout.weight: Input should be less than 100",
            id="weight-100",
        ),
        pytest.param(
            BASE + CANARY.replace("strategy: canary", "strategy: shadow"),
            "m.yaml:16: rollout.weight: applies to strategy canary only, not shadow; drop it",
            id="shadow-weight",
        ),
        pytest.param(
            BASE + CANARY.replace("strategy: canary", "strategy: linear"),
            "m.yaml:14: rollout.strategy: Input should be 'canary', 'shadow' or 'blue_green'",
            id="unknown-strategy",
        ),
        pytest.param(
            BASE + CANARY.replace("x-user-id", "x user id"),
            "m.yaml:17: rollout.sticky_header: String should match pattern",
            id="header-with-spaces",
        ),
        pytest.param(
            BASE + CANARY.replace("max_p99_ratio: 1.5", "max_p99_ratio: 0.5"),
            "m.yaml:18: rollout.limits.max_p99_ratio: Input should be greater than or equal to 1",
            id="p99-ratio-below-1",
        ),
        pytest.param(
            BASE + CANARY + "version_policy: {latest: 2}\n",
            "m.yaml:19: version_policy: is set together with rollout",
            id="version-policy",
        ),
        pytest.param(
            BASE.replace("source: models:/m@production", "source: /srv/m") + CANARY,
            "m.yaml:13: rollout: a rollout serves a candidate beside the registry version",
            id="path-source",
        ),
        pytest.param(
            BASE + CANARY.replace("  weight: 10\n", "  wieght: 10\n"),
            "m.yaml:16: rollout.wieght: unknown key 'wieght'; did you mean 'weight'?",
            id="typo",
        ),
    ],
)
def test_a_bad_rollout_gets_one_located_line(tmp_path: Path, text: str, expected: str) -> None:
    write_spec(tmp_path, "m", text)
    found = problems_of(tmp_path)
    assert any(expected in line for line in found), "\n".join(found)
    assert all("\n" not in line and "Traceback" not in line for line in found)


def test_the_cli_exits_2_on_a_bad_rollout_and_writes_nothing(tmp_path: Path) -> None:
    specs = tmp_path / "modelconfigs"
    write_spec(specs, "m", BASE + CANARY.replace("weight: 10", "weight: 0"))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["generate", "--specs", str(specs), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "m.yaml:16: rollout.weight" in result.output
    assert not out.exists()


def test_the_checked_in_schema_knows_rollout(tmp_path: Path) -> None:
    schema = json.loads((PROJECT_ROOT / "schemas" / "modelspec.schema.json").read_text())
    document = yaml.safe_load(BASE + CANARY)
    jsonschema.validate(document, schema)
    document["rollout"]["strategy"] = "linear"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, schema)


def _stack(tmp_path: Path, gateway: str, environment: str = "local") -> Path:
    stacks = tmp_path / "stacks"
    stacks.mkdir(exist_ok=True)
    (stacks / "Pulumi.s.yaml").write_text(
        f"config:\n  gpufleet:environment: {environment}\n"
        f"  gpufleet:ports: {{triton_http: 18000, mlflow: 15000}}\n  gpufleet:gateway: {gateway}\n"
    )
    return stacks


def test_a_gateway_port_taken_by_another_server_is_refused(tmp_path: Path) -> None:
    assert load_stack_spec(_stack(tmp_path, "{http: 18080, grpc: 18081}"), "s").spec.gateway
    with pytest.raises(SpecError) as caught:
        load_stack_spec(_stack(tmp_path, "{http: 18000, grpc: 18081}"), "s")
    (problem,) = caught.value.problems
    assert "gateway.http: port 18000 is also ports.triton_http" in str(problem)


@pytest.mark.parametrize(
    ("gateway", "rollout", "expected"),
    [
        ("", CANARY, "stack 's' has no gateway to split traffic with; add gpufleet:gateway"),
        ("  gpufleet:gateway: {http: 18080, grpc: 18081}\n", "", "m has no rollout section"),
    ],
)
def test_rollout_commands_refuse_what_they_cannot_do_with_exit_2(
    tmp_path: Path, gateway: str, rollout: str, expected: str
) -> None:
    """Refused before any server or registry is contacted: none runs here."""
    write_spec(tmp_path / "modelconfigs", "m", BASE + rollout)
    stacks = tmp_path / "stacks"
    stacks.mkdir()
    (stacks / "Pulumi.s.yaml").write_text(
        "config:\n  gpufleet:environment: local\n"
        f"  gpufleet:state_dir: {tmp_path / 'state'}\n"
        f"  gpufleet:model_repository: {tmp_path / 'repository'}\n" + gateway
    )
    for verb in ("start", "status", "promote", "rollback"):
        result = CliRunner().invoke(
            app,
            [
                *("rollout", verb, "--stack", "s", "--model", "m"),
                *("--specs", str(tmp_path / "modelconfigs"), "--stacks-dir", str(stacks)),
            ],
        )
        assert result.exit_code == 2, result.output
        if verb == "start":
            assert expected in result.output, result.output
    assert not (tmp_path / "state" / "rollout").exists()
