"""The correctness gate against a real Triton: golden examples of the served weights pass,
examples made with other weights fail with a message that says what it means, tolerances are
the spec's, and a version Triton does not serve is an error (could not run), not a failure.

Real: the `tritonserver` 2.51 binary from the nvidia-pytriton wheel (CPU, python backend,
loopback ports) serving a repository rendered from a ModelSpec by the generator, the seeded torch
MLP of tests/data/python_models/torch_mlp.py inside it, tritonclient's gRPC client. Nothing is
mocked. Not real: the golden examples are made here with torch, not read from MLflow.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from generators.triton_config import render_config_pbtxt
from gpufleet.registry.golden import GoldenExample
from gpufleet.spec.loading import model_spec_hash
from gpufleet.spec.model import ModelSpec
from validation.correctness import CorrectnessTarget, run_correctness_gate
from validation.report import EXIT_COULD_NOT_RUN, EXIT_FAILED, exit_code
from validation.tritonserver import GRPC_ADMIN_KEY_HEADER, LocalTritonServer

PYTHON_MODELS = Path(__file__).parent / "data" / "python_models"
IN_FEATURES, OUT_FEATURES = 16, 4
SPEC: dict[str, Any] = {
    "name": "mlp",
    "backend": "python",
    "max_batch_size": 8,
    "inputs": [{"name": "features", "dtype": "fp32", "shape": [IN_FEATURES]}],
    "outputs": [{"name": "scores", "dtype": "fp32", "shape": [OUT_FEATURES]}],
    "instance_groups": [{"kind": "cpu", "count": 1}],
    "version_policy": {"all": True},
    "parameters": {"execute_delay_ms": "0"},
}


def _load_torch_mlp_module() -> Any:
    spec = importlib.util.spec_from_file_location("torch_mlp", PYTHON_MODELS / "torch_mlp.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


torch_mlp = _load_torch_mlp_module()


def write_model(repository: Path, data: dict[str, Any], versions: tuple[int, ...]) -> None:
    """A model directory as `gpufleet generate` renders it, torch_mlp.py in each version."""
    spec = ModelSpec.model_validate(data)
    directory = repository / spec.name
    directory.mkdir(parents=True)
    config = render_config_pbtxt(spec, f"{spec.name}.yaml", model_spec_hash(spec))
    (directory / "config.pbtxt").write_text(config)
    for version in versions:
        (directory / str(version)).mkdir()
        shutil.copy(PYTHON_MODELS / "torch_mlp.py", directory / str(version) / "model.py")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTritonServer]:
    """Triton serving `mlp` versions 1 and 2; `unloaded` is in the repository, not loaded."""
    root = tmp_path_factory.mktemp("correctness")
    repository = root / "model_repository"
    write_model(repository, SPEC, versions=(1, 2))
    write_model(repository, {**SPEC, "name": "unloaded"}, versions=(1,))
    with LocalTritonServer(repository, root / "triton", load_models=["mlp"]) as server:
        yield server


def golden_examples(count: int = 8, seed: int = 7) -> list[GoldenExample]:
    """Examples of the weights torch_mlp serves (same seed), one row each."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(count):
        features = rng.standard_normal((1, IN_FEATURES), dtype=np.float32)
        scores = torch_mlp.reference_outputs(features, OUT_FEATURES)
        examples.append(GoldenExample({"features": features}, {"scores": scores}))
    return examples


def examples_of_other_weights() -> list[GoldenExample]:
    """The same inputs, outputs from the same architecture with other weights."""
    torch.manual_seed(99)
    network = torch.nn.Sequential(
        torch.nn.Linear(IN_FEATURES, 32), torch.nn.ReLU(), torch.nn.Linear(32, OUT_FEATURES)
    ).eval()
    examples = []
    for example in golden_examples():
        with torch.no_grad():
            scores = network(torch.from_numpy(example.inputs["features"])).numpy()
        examples.append(GoldenExample(example.inputs, {"scores": scores}))
    return examples


def with_offset(
    examples: list[GoldenExample], index: int, offset: np.ndarray
) -> list[GoldenExample]:
    """`examples` with `offset` added to the expected scores of example `index`."""
    changed = list(examples)
    example = changed[index]
    changed[index] = GoldenExample(example.inputs, {"scores": example.outputs["scores"] + offset})
    return changed


def target(
    examples: list[GoldenExample],
    *,
    model: str = "mlp",
    version: int = 1,
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> CorrectnessTarget:
    return CorrectnessTarget(model, version, examples, atol=atol, rtol=rtol)


def test_golden_examples_of_the_served_weights_pass(served: LocalTritonServer) -> None:
    examples = golden_examples()
    report = run_correctness_gate(
        served.grpc_url, [target(examples, version=1), target(examples, version=2)], stack="t"
    )
    assert report.gate == "correctness"
    assert report.stack == "t"
    assert report.status == "pass"
    assert [check.name for check in report.checks] == ["mlp v1", "mlp v2"]
    for check in report.checks:
        assert check.message.startswith("8 examples match (max abs diff ")
        assert check.measurements["examples"] == 8
        assert check.measurements["max_abs_diff"] < 1e-5


def test_examples_made_with_other_weights_fail_with_what_it_means(
    served: LocalTritonServer,
) -> None:
    report = run_correctness_gate(served.grpc_url, [target(examples_of_other_weights())])
    [check] = report.checks
    assert check.status == "fail"
    assert check.message.startswith("example 0, output 'scores': max abs diff ")
    assert "exceeds the tolerance atol 1e-05 + rtol 0.0001 x |expected|" in check.message
    assert check.message.endswith(
        "the served weights are not the ones the golden examples were made with: "
        "wrong version or preprocessing?"
    )
    assert check.measurements["failed_example"] == 0
    assert check.measurements["max_abs_diff"] > 1e-3
    assert exit_code([report]) == EXIT_FAILED


@pytest.mark.parametrize(
    ("atol", "rtol", "offset", "status"),
    [
        pytest.param(1e-3, 0.0, 5e-4, "pass", id="within-atol"),
        pytest.param(1e-3, 0.0, 3e-3, "fail", id="beyond-atol"),
        pytest.param(0.0, 1e-2, 0.5e-2, "pass", id="within-rtol"),
        pytest.param(0.0, 1e-2, 2e-2, "fail", id="beyond-rtol"),
    ],
)
def test_tolerance_is_respected(
    served: LocalTritonServer, atol: float, rtol: float, offset: float, status: str
) -> None:
    """Example 3 expects scores moved by `offset` (absolute with atol, relative with rtol)."""
    examples = golden_examples()
    expected = examples[3].outputs["scores"]
    shift = np.full_like(expected, offset) if atol else expected * np.float32(offset)
    changed = with_offset(examples, 3, shift)
    [check] = run_correctness_gate(served.grpc_url, [target(changed, atol=atol, rtol=rtol)]).checks
    assert check.status == status, check.message
    if status == "fail":
        assert check.message.startswith("example 3, output 'scores': max abs diff ")
        assert f"atol {atol:g} + rtol {rtol:g} x |expected|" in check.message


def test_a_request_the_model_refuses_fails_naming_the_example(served: LocalTritonServer) -> None:
    examples = golden_examples(count=2)
    narrow = GoldenExample({"features": np.zeros((1, 8), np.float32)}, examples[1].outputs)
    [check] = run_correctness_gate(served.grpc_url, [target([examples[0], narrow])]).checks
    assert check.status == "fail"
    assert check.message.startswith("example 1: Triton refused the request: ")
    assert "unexpected shape for input 'features'" in check.message


def test_a_version_triton_does_not_serve_is_an_error(served: LocalTritonServer) -> None:
    """The versions Triton knows come from its repository index, a restricted API: the gate
    reads it with the admin key; without the key the message says the index was refused."""
    refused = run_correctness_gate(served.grpc_url, [target(golden_examples(), version=3)])
    assert "the repository index could not be read" in refused.checks[0].message
    admin = {GRPC_ADMIN_KEY_HEADER: served.admin_key}
    report = run_correctness_gate(
        served.grpc_url, [target(golden_examples(), version=3)], admin_headers=admin
    )
    [check] = report.checks
    assert check.status == "error"
    assert check.name == "mlp v3"
    assert f"model 'mlp' version 3 is not ready on Triton at {served.grpc_url}" in check.message
    assert "versions Triton knows: 1, 2" in check.message
    assert "load that version" in check.message
    assert exit_code([report]) == EXIT_COULD_NOT_RUN


def test_a_model_that_is_not_loaded_is_an_error(served: LocalTritonServer) -> None:
    [check] = run_correctness_gate(
        served.grpc_url,
        [target(golden_examples(), model="unloaded")],
        admin_headers={GRPC_ADMIN_KEY_HEADER: served.admin_key},
    ).checks
    assert check.status == "error"
    assert "model 'unloaded' version 1 is not ready" in check.message
    assert "the model is in the repository but not loaded" in check.message


def test_a_version_without_examples_is_an_error(served: LocalTritonServer) -> None:
    [check] = run_correctness_gate(served.grpc_url, [target([])]).checks
    assert check.status == "error"
    assert check.message.startswith("mlp v1 has no golden examples; log them with the model")


def test_unreachable_triton_is_an_error() -> None:
    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"127.0.0.1:{sock.getsockname()[1]}"
    report = run_correctness_gate(url, [target(golden_examples(count=1))])
    [check] = report.checks
    assert check.status == "error"
    assert check.message.startswith(f"Triton at {url} is not answering ([StatusCode.UNAVAILABLE]")
    assert "start it (gpufleet up) or check the gRPC address" in check.message


def test_nan_never_matches(served: LocalTritonServer) -> None:
    examples = golden_examples(count=1)
    nan = np.full((1, OUT_FEATURES), np.nan, np.float32)
    [check] = run_correctness_gate(
        served.grpc_url, [target(with_offset(examples, 0, nan), atol=1.0, rtol=1.0)]
    ).checks
    assert check.status == "fail"
    assert "max abs diff inf" in check.message
