"""ModelSpec loading and checks: every kind of bad input gets a located, one-line problem.

Real: YAML files on disk, the pydantic models, the loader. Nothing mocked.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.spec.loading import load_model_spec_file, load_model_specs, model_spec_hash
from gpufleet.spec.model import ModelSpec
from gpufleet.spec.problems import SpecError
from tests.conftest import SAMPLE_SPECS, write_spec

VALID = """\
name: m
backend: python
max_batch_size: 8
inputs:
  - name: x
    dtype: fp32
    shape: [4]
outputs:
  - name: y
    dtype: fp32
    shape: [4]
dynamic_batching:
  max_queue_delay_us: 100
  preferred_batch_sizes: [4, 8]
"""


def problems_of(path: Path) -> list[str]:
    with pytest.raises(SpecError) as caught:
        load_model_specs(path)
    return [str(problem) for problem in caught.value.problems]


def test_sample_specs_load() -> None:
    names = {item.spec.name for item in load_model_specs(SAMPLE_SPECS)}
    assert {"resnet50", "bert_encoder", "image_classifier", "tabular_mlp"} <= names


def test_valid_spec_loads_with_friendly_names_normalised(tmp_path: Path) -> None:
    path = write_spec(
        tmp_path,
        "m",
        VALID.replace(
            "dtype: fp32\n    shape: [4]\noutputs", "dtype: float32\n    shape: [4]\noutputs"
        ),
    )
    spec = load_model_spec_file(path).spec
    assert spec.inputs[0].dtype == "fp32"
    assert spec.dynamic_batching is not None
    assert spec.dynamic_batching.preferred_batch_sizes == [4, 8]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("name: m\n  backend: [\n", "m.yaml:2: invalid YAML", id="yaml-syntax"),
        pytest.param(
            "name: m\nbackend: python\nname: m\n",
            "m.yaml:3: invalid YAML: key 'name' is given twice",
            id="duplicate-key",
        ),
        pytest.param(
            VALID + "max_batchsize: 4\n",
            "m.yaml:15: max_batchsize: unknown key 'max_batchsize'; did you mean 'max_batch_size'?",
            id="unknown-key",
        ),
        pytest.param(
            VALID.replace("max_queue_delay_us: 100", "max_queue_delay: 100"),
            "m.yaml:13: dynamic_batching.max_queue_delay: unknown key 'max_queue_delay'; did you mean 'max_queue_delay_us'?",
            id="unknown-nested-key",
        ),
        pytest.param(
            VALID.replace("max_batch_size: 8", "max_batch_size: eight"),
            "m.yaml:3: max_batch_size: Input should be a valid integer, unable to parse string as an integer (got 'eight'); write a whole number",
            id="wrong-type",
        ),
        pytest.param(
            VALID.replace("max_batch_size: 8", "max_batch_size: -1"),
            "m.yaml:3: max_batch_size: Input should be greater than or equal to 0 (got -1); raise it",
            id="negative-size",
        ),
        pytest.param(
            VALID.replace("shape: [4]\noutputs", "shape: [0]\noutputs"),
            "m.yaml:7: inputs[0].shape[0]: a dimension of 0 holds no data",
            id="zero-dim",
        ),
        pytest.param(
            VALID.replace("shape: [4]\noutputs", "shape: [-3]\noutputs"),
            "m.yaml:7: inputs[0].shape[0]: Input should be greater than or equal to -1",
            id="negative-dim",
        ),
        pytest.param(
            VALID.replace("shape: [4]\noutputs", "shape: []\noutputs"),
            "m.yaml:7: inputs[0].shape: List should have at least 1 item",
            id="empty-shape",
        ),
        pytest.param(
            VALID.replace(
                "dtype: fp32\n    shape: [4]\noutputs", "dtype: fp33\n    shape: [4]\noutputs"
            ),
            "m.yaml:6: inputs[0].dtype: Input should be 'bool'",
            id="unknown-dtype",
        ),
        pytest.param(
            VALID.replace("- name: y", "- name: x").replace(
                "  - name: x\n    dtype: fp32\n    shape: [4]\noutputs:\n",
                "  - name: x\n    dtype: fp32\n    shape: [4]\n  - name: x\n    dtype: fp32\n    shape: [4]\noutputs:\n",
            ),
            "m.yaml:8: inputs[1].name: input name 'x' is used twice",
            id="duplicate-tensor",
        ),
        pytest.param(
            VALID.replace("[4, 8]", "[4, 16]"),
            "m.yaml:14: dynamic_batching.preferred_batch_sizes[1]: preferred batch size 16 is above max_batch_size 8",
            id="preferred-above-max",
        ),
        pytest.param(
            VALID.replace("max_batch_size: 8", "max_batch_size: 0").replace(
                "  preferred_batch_sizes: [4, 8]\n", ""
            ),
            "m.yaml:12: dynamic_batching: dynamic batching needs max_batch_size > 0",
            id="batching-without-batch",
        ),
        pytest.param(
            VALID
            + "  priority_levels: 2\n  default_priority_level: 1\n  priority_queue_policies:\n    3: {max_queue_size: 4}\n",
            "m.yaml:18: dynamic_batching.priority_queue_policies[3]: priority level 3 is above priority_levels (2)",
            id="priority-above-levels",
        ),
        pytest.param(
            VALID + "  priority_levels: 2\n",
            "m.yaml:12: dynamic_batching.default_priority_level: default_priority_level must be between 1 and priority_levels (2)",
            id="default-priority-missing",
        ),
        pytest.param(
            VALID + "instance_groups:\n  - kind: cpu\n    gpus: [0]\n",
            "m.yaml:17: instance_groups[0].gpus: gpus are only meaningful with kind gpu",
            id="gpus-on-cpu",
        ),
        pytest.param(
            VALID + "instance_groups:\n  - kind: gpu\n    count: 0\n",
            "m.yaml:17: instance_groups[0].count: Input should be greater than or equal to 1",
            id="zero-count",
        ),
        pytest.param(
            VALID + "version_policy: {latest: 1, all: true}\n",
            "m.yaml:15: version_policy: set exactly one of latest, all or specific (found latest, all)",
            id="two-version-policies",
        ),
        pytest.param(
            VALID.replace("shape: [4]\noutputs", "shape: [4]\n    reshape: [3]\noutputs"),
            "m.yaml:8: inputs[0].reshape: reshape [3] holds 3 elements but shape [4] holds 4",
            id="reshape-count",
        ),
        pytest.param(
            VALID + "warmup:\n  - name: w\n    batch_size: 9\n",
            "m.yaml:17: warmup[0].batch_size: warmup batch_size 9 is above max_batch_size 8",
            id="warmup-batch",
        ),
        pytest.param(
            VALID
            + "warmup:\n  - name: w\n    inputs: {x: {dtype: fp32, shape: [4], data: zero}}\n",
            "m.yaml:16: warmup[0].batch_size: required key is missing",
            id="warmup-batch-size-missing",
        ),
        pytest.param(
            VALID
            + "warmup:\n  - name: w\n    batch_size: 0\n"
            + "    inputs: {x: {dtype: fp32, shape: [4], data: zero}}\n",
            "m.yaml:17: warmup[0].batch_size: Input should be greater than or equal to 1",
            id="warmup-batch-size-zero",  # Triton would skip the sample without a word
        ),
        pytest.param(
            VALID.replace("shape: [4]\noutputs", "shape: [4]\n    optional: true\noutputs")
            + "warmup:\n  - name: w\n    batch_size: 1\n",
            "m.yaml:17: warmup[0].inputs: a warmup sample needs data for at least one input",
            id="warmup-without-inputs",  # Triton 2.51 refuses it, or crashes (signal 11)
        ),
        pytest.param(
            VALID.replace("shape: [4]\noutputs", "shape: [-1, 4]\n    reshape: [-1, 2]\noutputs"),
            "m.yaml:8: inputs[0].reshape: reshape [-1, 2] does not keep the element counts",
            id="reshape-between-variable-dims",
        ),
        pytest.param(
            VALID + "source: models:/m@@prod\n",
            "m.yaml:15: source: an MLflow model URI is models:/<name>@<alias>",
            id="bad-mlflow-uri",
        ),
        pytest.param(
            VALID.replace("backend: python", "backend: pyton"),
            "m.yaml:2: backend: Input should be 'onnxruntime'",
            id="unknown-backend",
        ),
        pytest.param(
            VALID.replace("backend: python\n", ""),
            "m.yaml:1: backend: set backend",
            id="no-backend",
        ),
        pytest.param(
            VALID
            + "optimization:\n  accelerators:\n    gpu:\n      - name: tensorrt\n"
            + "        parameters: {precision_mode: fp61}\n",
            "m.yaml:19: optimization.accelerators.gpu[0].parameters.precision_mode: precision_mode 'fp61' is not one of FP32, FP16, INT8 (upper case)",
            id="tensorrt-precision",
        ),
        pytest.param(
            VALID
            + "optimization:\n  accelerators:\n    gpu:\n      - name: tensorrt\n"
            + "        parameters: {max_workspace_size_bytes: 1GB}\n",
            "m.yaml:19: optimization.accelerators.gpu[0].parameters.max_workspace_size_bytes: max_workspace_size_bytes '1GB' must be a positive number of bytes",
            id="tensorrt-workspace",
        ),
        pytest.param(
            VALID.replace("name: m", "name: other"),
            "m.yaml:1: name: name 'other' differs from the file name 'm.yaml'",
            id="name-mismatch",
        ),
        pytest.param("", "m.yaml: the file is empty", id="empty-file"),
        pytest.param("# only a comment\n", "m.yaml: the file is empty", id="comment-only"),
        pytest.param("- name: m\n", "m.yaml:1: a model spec is a YAML mapping", id="not-a-mapping"),
    ],
)
def test_bad_spec_gets_one_located_line(tmp_path: Path, text: str, expected: str) -> None:
    write_spec(tmp_path, "m", text)
    found = problems_of(tmp_path)
    assert any(expected in line for line in found), "\n".join(found)
    assert all("\n" not in line and "Traceback" not in line for line in found)


def test_non_utf8_file_is_refused_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_bytes(b"name: m\nbackend: \xff\xfe python\n")
    assert problems_of(tmp_path) == [
        f"{tmp_path / 'm.yaml'}:2: not UTF-8 text (byte 17 is 0xff); save the file as UTF-8"
    ]


def test_all_problems_of_a_file_are_reported_at_once(tmp_path: Path) -> None:
    text = VALID.replace("[4, 8]", "[4, 16]") + "instance_groups:\n  - kind: cpu\n    gpus: [0]\n"
    text = text.replace(
        "shape: [4]\ndynamic", "shape: [4]\n  - {name: y, dtype: fp16, shape: [2]}\ndynamic"
    )
    write_spec(tmp_path, "m", text)
    found = problems_of(tmp_path)
    assert len(found) == 3, found
    assert [line.split(":")[1] for line in found] == sorted(
        (line.split(":")[1] for line in found), key=int
    ), "problems are listed in file order"


def test_problems_in_several_files_are_all_reported(tmp_path: Path) -> None:
    write_spec(
        tmp_path,
        "a",
        VALID.replace("name: m", "name: a").replace("max_batch_size: 8", "max_batch_size: x"),
    )
    write_spec(tmp_path, "b", VALID.replace("name: m", "name: b").replace("fp32", "fp99", 1))
    found = problems_of(tmp_path)
    assert any("a.yaml:3" in line for line in found)
    assert any("b.yaml:6" in line for line in found)


def test_two_specs_with_the_same_model_name(tmp_path: Path) -> None:
    write_spec(tmp_path, "m", VALID)
    (tmp_path / "m.yml").write_text(VALID)
    found = problems_of(tmp_path)
    assert found == [
        f"{tmp_path / 'm.yml'}:1: name: model name 'm' is already used by {tmp_path / 'm.yaml'}; model names must be unique"
    ]


ENSEMBLE = """\
name: pipeline
backend: ensemble
max_batch_size: 8
inputs: [{name: raw, dtype: fp32, shape: [4]}]
outputs: [{name: result, dtype: fp32, shape: [4]}]
ensemble_steps:
  - model: m
    inputs: {x: raw}
    outputs: {y: result}
"""


def test_ensemble_referencing_existing_model_and_tensors_loads(tmp_path: Path) -> None:
    write_spec(tmp_path, "m", VALID)
    write_spec(tmp_path, "pipeline", ENSEMBLE)
    assert {item.spec.name for item in load_model_specs(tmp_path)} == {"m", "pipeline"}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ("model: m", "model: missing"),
            "pipeline.yaml:7: ensemble_steps[0].model: no model spec named 'missing' (known models: m, pipeline)",
        ),
        (
            ("inputs: {x: raw}", "inputs: {nope: raw}"),
            "pipeline.yaml:8: ensemble_steps[0].inputs.nope: model 'm' has no input named 'nope' (it has: x)",
        ),
        (
            ("inputs: {x: raw}", "inputs: {x: ghost}"),
            "pipeline.yaml:8: ensemble_steps[0].inputs.x: ensemble tensor 'ghost' is neither an ensemble input nor any step's output",
        ),
        (
            ("outputs: {y: result}", "outputs: {y: other}"),
            "pipeline.yaml:5: outputs[0].name: ensemble output 'result' is not produced by any step",
        ),
        (
            ("max_batch_size: 8\n", "max_batch_size: 8\ndynamic_batching: {}\n"),
            "pipeline.yaml:4: dynamic_batching: an ensemble cannot batch itself",
        ),
        (
            ("model: m", "model: m\n    version: 0"),
            "pipeline.yaml:8: ensemble_steps[0].version: Triton has no model version 0",
        ),
        (
            ("max_batch_size: 8", "max_batch_size: 16"),
            "pipeline.yaml:3: max_batch_size: max_batch_size 16 is above the max_batch_size 8 of "
            "model 'm' (step 0)",
        ),
        (
            ("dtype: fp32, shape: [4]}]\noutputs", "dtype: fp16, shape: [4]}]\noutputs"),
            "pipeline.yaml:8: ensemble_steps[0].inputs.x: ensemble tensor 'raw' is fp32 for model "
            "'m' input 'x' but fp16 for the ensemble's input 'raw'",
        ),
    ],
)
def test_ensemble_mistakes(tmp_path: Path, change: tuple[str, str], expected: str) -> None:
    write_spec(tmp_path, "m", VALID)
    write_spec(tmp_path, "pipeline", ENSEMBLE.replace(*change))
    found = problems_of(tmp_path)
    assert any(expected in line for line in found), "\n".join(found)


def test_programmatic_construction_runs_the_same_checks() -> None:
    with pytest.raises(ValueError, match="preferred batch size 16 is above max_batch_size 8"):
        ModelSpec.model_validate(
            {
                "name": "m",
                "backend": "python",
                "max_batch_size": 8,
                "dynamic_batching": {"preferred_batch_sizes": [16]},
            }
        )


def test_spec_hash_ignores_comments_and_spelled_out_defaults(tmp_path: Path) -> None:
    plain = load_model_spec_file(write_spec(tmp_path / "a", "m", VALID)).spec
    verbose = load_model_spec_file(
        write_spec(tmp_path / "b", "m", "# comment\n" + VALID + "  preserve_ordering: false\n")
    ).spec
    changed = load_model_spec_file(
        write_spec(tmp_path / "c", "m", VALID.replace("100", "200"))
    ).spec
    assert model_spec_hash(plain) == model_spec_hash(verbose)
    assert model_spec_hash(plain) != model_spec_hash(changed)


@pytest.mark.parametrize(
    ("shape", "reshape", "accepted"),
    [
        ([4], [2, 2], True),
        ([4], [3], False),
        ([1], [], True),  # a scalar (batching models only)
        ([2], [], False),
        ([-1], [2, 2], False),  # Triton: "has different size for dims and reshape"
        ([4], [-1], False),
        ([-1], [], False),
        ([-1, 4], [-1, 2, 2], True),
        ([-1, 4], [-1, 2], False),
        ([-1], [-1, -1], False),  # "different number of variable-size dimensions"
        ([2, 4, -1, 6], [8, -1, 1, 6], True),  # the example in Triton's ValidateIOShape
        ([2, 4, -1, 6], [4, -1, 2, 6], False),
        ([-1, -1], [1, -1, -1, 1], True),
    ],
)
def test_reshape_rule_follows_triton(shape: list[int], reshape: list[int], accepted: bool) -> None:
    data = {
        "name": "m",
        "backend": "python",
        "max_batch_size": 8,
        "inputs": [{"name": "x", "dtype": "fp32", "shape": shape, "reshape": reshape}],
    }
    if accepted:
        assert ModelSpec.model_validate(data).inputs[0].reshape == reshape
    else:
        with pytest.raises(ValueError, match=r"inputs\[0\]\.reshape: reshape"):
            ModelSpec.model_validate(data)


def test_ensemble_problems_are_reported_beside_another_file_s_problems(tmp_path: Path) -> None:
    """A broken unrelated file hides nothing; a step calling the broken model is not blamed."""
    write_spec(tmp_path, "m", VALID)
    write_spec(tmp_path, "broken", "name: broken\nbackend: python\nmax_batch_size: -1\n")
    write_spec(tmp_path, "pipeline", ENSEMBLE.replace("model: m", "model: ghost"))
    calls_broken = ENSEMBLE.replace("name: pipeline", "name: second").replace(
        "model: m", "model: broken"
    )
    write_spec(tmp_path, "second", calls_broken)
    found = problems_of(tmp_path)
    assert any("broken.yaml:3: max_batch_size" in line for line in found)
    assert any(
        "pipeline.yaml:7: ensemble_steps[0].model: no model spec named 'ghost'" in line
        for line in found
    )
    assert not any("second.yaml" in line for line in found), found


def test_source_sha256_pins_registry_versions_with_located_problems(tmp_path: Path) -> None:
    digest = "ab" * 32
    pinned = VALID + f"source: models:/m@production\nsource_sha256:\n  3: {digest}\n"
    assert load_model_spec_file(write_spec(tmp_path / "ok", "m", pinned)).spec.source_sha256 == {
        3: digest
    }
    bad = VALID + "source_sha256:\n  0: ABC\n"
    path = write_spec(tmp_path / "bad", "m", bad)
    assert problems_of(path) == [
        f"{path}:16: source_sha256[0]: Input should be greater than or equal to 1 (got 0); "
        "raise it",
        f"{path}:16: source_sha256[0]: write a sha256 as 64 lowercase hex digits (got 'ABC')",
    ]
    unsourced = VALID + f"source_sha256:\n  3: {digest}\n"
    assert problems_of(write_spec(tmp_path / "unsourced", "m", unsourced)) == [
        f"{tmp_path / 'unsourced' / 'm.yaml'}:15: source_sha256: pins the artifacts of "
        "registry versions, but source is not a models:/ URI; drop source_sha256 or set source "
        "to models:/<name>@<alias>"
    ]
