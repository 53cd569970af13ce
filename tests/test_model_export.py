"""Exporting torch modules for Triton's backends, each checked by the runtime that loads it.

Real: torch 2.13 (TorchScript tracing and reloading, the dynamo ONNX exporter), onnxruntime
running the exported graph, and for the python backend a real `tritonserver` (the
nvidia-pytriton wheel's binary, CPU, loopback ports) serving the generated model.py with a
config rendered from the spec. Nothing is mocked. Not here: Triton's pytorch and onnxruntime
backends, which the wheel lacks; their files are checked by torch.jit.load and onnxruntime.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
import torch
import tritonclient.grpc as triton_grpc

from generators.model_export import ExportError, export_model, model_filename
from generators.triton_config import render_config_pbtxt
from gpufleet.registry.demo import demo_network
from gpufleet.spec.loading import model_spec_hash
from gpufleet.spec.model import ModelSpec
from tests.conftest import settled_statistics
from tests.mlflow_fixtures import mlp_spec
from tests.triton_fixtures import TritonServerFactory

# TorchScript is what Triton's PyTorch backend loads, however much torch 2.13 deprecates it.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


class TwoInTwoOut(torch.nn.Module):
    """Two inputs of different widths, two outputs: names and order must survive export."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.left = torch.nn.Linear(16, 4)
        self.right = torch.nn.Linear(3, 4)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.left(a) + self.right(b), torch.relu(self.right(b))


def two_in_two_out_spec(backend: str) -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "name": "two_in_two_out",
            "backend": backend,
            "max_batch_size": 8,
            "inputs": [
                {"name": "dense", "dtype": "fp32", "shape": [16]},
                {"name": "extra", "dtype": "fp32", "shape": [3]},
            ],
            "outputs": [
                {"name": "sum", "dtype": "fp32", "shape": [4]},
                {"name": "gate", "dtype": "fp32", "shape": [4]},
            ],
        }
    )


def reference(module: torch.nn.Module, *inputs: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        result = module(*[torch.from_numpy(value) for value in inputs])
    values = [result] if isinstance(result, torch.Tensor) else list(result)
    return [value.numpy() for value in values]


def rows(count: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, width)).astype(np.float32)


# -- pytorch (TorchScript for Triton's libtorch backend) ----------------------------------------


def test_pytorch_export_is_torchscript_named_after_the_spec_inputs(tmp_path: Path) -> None:
    spec, module = two_in_two_out_spec("pytorch"), TwoInTwoOut().eval()
    files = export_model(module, spec, tmp_path / "1")
    assert files == [tmp_path / "1" / "model.pt"]
    loaded = torch.jit.load(str(files[0]))
    # Triton's PyTorch backend matches config input names against forward()'s argument names.
    arguments = [argument.name for argument in loaded.forward.schema.arguments]
    assert arguments == ["self", "dense", "extra"]
    for batch in (1, 5):
        inputs = rows(batch, 16), rows(batch, 3, seed=1)
        got = reference(loaded, *inputs)
        for got_value, want in zip(got, reference(module, *inputs), strict=True):
            np.testing.assert_allclose(got_value, want, rtol=1e-6, atol=1e-6)


def test_default_model_filename_names_the_file_triton_loads(tmp_path: Path) -> None:
    pytorch = mlp_spec("m", backend="pytorch", default_model_filename="net.pt")
    assert export_model(demo_network(pytorch), pytorch, tmp_path / "a") == [tmp_path / "a/net.pt"]
    python = mlp_spec("m", backend="python", default_model_filename="serve.py")
    files = export_model(demo_network(python), python, tmp_path / "b")
    assert files == [tmp_path / "b/model.pt", tmp_path / "b/serve.py"]
    assert model_filename(mlp_spec("m", backend="onnxruntime")) == "model.onnx"


# -- onnxruntime ---------------------------------------------------------------------------------


def test_onnx_export_has_the_spec_names_and_a_dynamic_batch_axis(tmp_path: Path) -> None:
    spec, module = two_in_two_out_spec("onnxruntime"), TwoInTwoOut().eval()
    files = export_model(module, spec, tmp_path / "1")
    assert files == [tmp_path / "1" / "model.onnx"]
    assert sorted(p.name for p in (tmp_path / "1").iterdir()) == ["model.onnx"]  # no .data file
    session = onnxruntime.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"])
    shapes = {tensor.name: tensor.shape for tensor in session.get_inputs()}
    assert list(shapes) == ["dense", "extra"]
    assert isinstance(shapes["dense"][0], str)  # symbolic: any batch size
    assert shapes["dense"][1:] == [16]
    assert [tensor.name for tensor in session.get_outputs()] == ["sum", "gate"]
    for batch in (1, 7):
        inputs = rows(batch, 16), rows(batch, 3, seed=1)
        got = session.run(["sum", "gate"], {"dense": inputs[0], "extra": inputs[1]})
        for got_value, want in zip(got, reference(module, *inputs), strict=True):
            np.testing.assert_allclose(got_value, want, rtol=1e-5, atol=1e-6)


def test_onnx_export_without_batching_keeps_the_spec_shape(tmp_path: Path) -> None:
    spec = mlp_spec("unbatched", backend="onnxruntime", max_batch_size=0)
    module = demo_network(spec)
    (path,) = export_model(module, spec, tmp_path / "1")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [16]
    features = rows(1, 16)[0]
    (got,) = session.run(["scores"], {"features": features})
    np.testing.assert_allclose(got, reference(module, features)[0], rtol=1e-5, atol=1e-6)


class MeanOverSequence(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(8, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(tokens.mean(dim=1))


def test_onnx_export_keeps_variable_dimensions_variable(tmp_path: Path) -> None:
    spec = ModelSpec.model_validate(
        {
            "name": "sequence",
            "backend": "onnxruntime",
            "max_batch_size": 4,
            "inputs": [{"name": "tokens", "dtype": "fp32", "shape": [-1, 8]}],
            "outputs": [{"name": "pooled", "dtype": "fp32", "shape": [4]}],
        }
    )
    module = MeanOverSequence().eval()
    (path,) = export_model(module, spec, tmp_path / "1")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch, length, width = session.get_inputs()[0].shape
    assert (isinstance(batch, str), isinstance(length, str), width) == (True, True, 8)
    tokens = np.random.default_rng(0).standard_normal((3, 11, 8)).astype(np.float32)
    (got,) = session.run(["pooled"], {"tokens": tokens})
    np.testing.assert_allclose(got, reference(module, tokens)[0], rtol=1e-5, atol=1e-6)


def test_a_module_from_torch_export_exports_too(tmp_path: Path) -> None:
    """MLflow's pt2 format loads as torch.export's module, which refuses eval()."""
    spec = mlp_spec("exported", backend="onnxruntime")
    network = demo_network(spec)
    batch = torch.export.Dim.AUTO
    program = torch.export.export(network, (torch.zeros(8, 16),), dynamic_shapes=[{0: batch}])
    (path,) = export_model(program.module(), spec, tmp_path / "onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    features = rows(5, 16)
    (got,) = session.run(["scores"], {"features": features})
    np.testing.assert_allclose(got, reference(network, features)[0], rtol=1e-5, atol=1e-6)
    torchscript = mlp_spec("exported", backend="pytorch")
    (path,) = export_model(program.module(), torchscript, tmp_path / "pt")
    got = reference(torch.jit.load(str(path)), features)[0]
    np.testing.assert_allclose(got, reference(network, features)[0], rtol=1e-6, atol=1e-6)


# -- what cannot be exported ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "module", "message"),
    [
        (
            mlp_spec("trt", backend="tensorrt"),
            torch.nn.Identity(),
            "spec 'trt': backend 'tensorrt' cannot be exported from a torch model; gpufleet "
            "exports to pytorch, onnxruntime, python",
        ),
        (
            mlp_spec("clash", backend="python", default_model_filename="model.pt"),
            torch.nn.Identity(),
            "spec 'clash': default_model_filename 'model.pt' is the TorchScript file the python "
            "model loads; name the python file something else (model.py)",
        ),
        (
            two_in_two_out_spec("pytorch").model_copy(
                update={"outputs": two_in_two_out_spec("pytorch").outputs[:1]}
            ),
            TwoInTwoOut(),
            "spec 'two_in_two_out': the module returns 2 value(s), the spec lists 1 output "
            "tensor(s); return one tensor per output, in order",
        ),
        (
            mlp_spec("text", inputs=[{"name": "text", "dtype": "string", "shape": [1]}]),
            torch.nn.Identity(),
            "spec 'text': input 'text' is string, which a torch module cannot take; export "
            "supports numeric and bool tensors",
        ),
        (
            mlp_spec("wrong_width", backend="pytorch"),
            torch.nn.Linear(8, 4),
            "spec 'wrong_width': exporting the module for the pytorch backend failed: "
            "RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x16 and 8x4); do the "
            "spec's inputs and outputs match the model?",
        ),
    ],
    ids=["backend", "filename", "outputs", "dtype", "shapes"],
)
def test_what_cannot_be_exported_is_refused_with_the_reason(
    spec: ModelSpec, module: torch.nn.Module, message: str, tmp_path: Path
) -> None:
    with pytest.raises(ExportError) as error:
        export_model(module, spec, tmp_path / "1")
    assert str(error.value) == message


# -- python (model.py running the TorchScript file on real Triton) -------------------------------


def test_python_backend_model_serves_the_module_on_real_triton(
    triton_server_factory: TritonServerFactory, tmp_path: Path
) -> None:
    spec = mlp_spec(
        "python_mlp",
        max_batch_size=16,
        # A long queue delay, so that concurrent requests reach one execute() together.
        dynamic_batching={"max_queue_delay_us": 200_000},
        instance_groups=[{"kind": "cpu", "count": 1}],
        parameters={"torch_threads": 1},
    )
    module = demo_network(spec, seed=4)
    repository = tmp_path / "repository"
    export_model(module, spec, repository / spec.name / "1")
    config = render_config_pbtxt(spec, "tests/test_model_export.py", model_spec_hash(spec))
    (repository / spec.name / "config.pbtxt").write_text(config, encoding="utf-8")
    server = triton_server_factory(repository, load_models=[spec.name])

    batches = [rows(count, 16, seed=count) for count in (1, 3, 2, 5, 1, 4)]
    results = infer_concurrently(server.grpc_url, spec.name, batches)
    for batch, got in zip(batches, results, strict=True):
        np.testing.assert_allclose(got, reference(module, batch)[0], rtol=1e-5, atol=1e-6)
    assert "python_mlp_0_0: model.pt on cpu, 1 torch thread(s)" in server.log_text()
    stats = settled_statistics(server, spec.name, at_least_inferences=sum(map(len, batches)))
    # Triton handed several requests to one execute(), which answered each with its own rows.
    assert int(stats["execution_count"]) < len(batches)
    assert int(stats["inference_count"]) == sum(len(batch) for batch in batches)


def infer_concurrently(url: str, model: str, batches: list[np.ndarray]) -> list[np.ndarray]:
    """Send every batch at once over gRPC; wait for all answers (in the order sent)."""
    results: dict[int, np.ndarray] = {}
    errors: list[Exception] = []
    done = threading.Semaphore(0)

    def collect(index: int, result: Any, error: Exception | None) -> None:
        if error is None:
            results[index] = result.as_numpy("scores")
        else:
            errors.append(error)
        done.release()

    with triton_grpc.InferenceServerClient(url) as client:
        for index, batch in enumerate(batches):
            request = triton_grpc.InferInput("features", list(batch.shape), "FP32")
            request.set_data_from_numpy(batch)
            client.async_infer(
                model,
                [request],
                callback=lambda result, error, index=index: collect(index, result, error),
            )
        for _ in batches:
            assert done.acquire(timeout=60)
    assert not errors, errors
    return [results[index] for index in range(len(batches))]
