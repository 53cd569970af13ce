"""Export a torch module into the files Triton's backend for a spec loads from a version directory.

- `pytorch`: TorchScript `model.pt`, whose forward() arguments carry the spec's input names
  (Triton's PyTorch backend matches config inputs against them).
- `onnxruntime`: `model.onnx` from torch's ONNX exporter, named inputs and outputs, a dynamic
  batch axis when the spec batches; checked with onnxruntime against torch before it counts.
- `python`: TorchScript `model.pt` plus `model.py`, a Triton python-backend model that runs it.

`default_model_filename` names the file Triton loads (the `.py` file for the python backend).
Every export is reloaded and compared with the module on a batch size other than the one traced.

    files = export_model(module, spec, Path("staging/1"))
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from gpufleet.spec.model import ModelSpec, Objectives
from gpufleet.spec.paths import check_file_name

EXPORTABLE_BACKENDS = ("pytorch", "onnxruntime", "python")
TORCHSCRIPT_FILE = "model.pt"
DEFAULT_FILENAMES = {"pytorch": TORCHSCRIPT_FILE, "onnxruntime": "model.onnx", "python": "model.py"}
# Batch sizes of the example the module is traced with and of the check afterwards: different,
# and above 1, so that a batch dimension baked in by tracing shows.
TRACE_BATCH, CHECK_BATCH = 2, 3
VARIABLE_DIM_SIZE = 4  # stands in for a -1 dimension in the example inputs
_TORCH_DTYPES = {
    "bool": torch.bool,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp64": torch.float64,
}

Tensors = Sequence[torch.Tensor]


class ExportError(Exception):
    """The module cannot be exported for the spec's backend; the message says why."""


def export_model(module: torch.nn.Module, spec: ModelSpec, version_dir: Path) -> list[Path]:
    """Write the files Triton loads for `spec.backend` into `version_dir`; return their paths."""
    _check_exportable(spec)
    version_dir.mkdir(parents=True, exist_ok=True)
    named = _with_input_names(module, [tensor.name for tensor in spec.inputs])
    filename = model_filename(spec)
    with _torch_errors_as_export_errors(spec):
        if spec.backend == "onnxruntime":
            return [_export_onnx(named, spec, version_dir / filename)]
        if spec.backend == "pytorch":
            _export_torchscript(named, spec, version_dir / filename)
            return [version_dir / filename]
        _export_torchscript(named, spec, version_dir / TORCHSCRIPT_FILE)
    wrapper = version_dir / filename
    wrapper.write_text(PYTHON_MODEL_SOURCE, encoding="utf-8")
    return [version_dir / TORCHSCRIPT_FILE, wrapper]


def model_filename(spec: ModelSpec) -> str:
    """The file Triton loads from a version directory of this spec."""
    filename = spec.default_model_filename or DEFAULT_FILENAMES.get(spec.backend or "", "model")
    # The spec checks it too; checked again here, where it becomes a path to write.
    try:
        return check_file_name(filename)
    except ValueError as error:
        raise ExportError(f"spec {spec.name!r}: default_model_filename {error}") from None


def example_inputs(spec: ModelSpec, batch_size: int, *, seed: int = 0) -> list[torch.Tensor]:
    """Seeded inputs of the spec's shapes and dtypes (with `batch_size` rows when it batches)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for tensor in spec.inputs:
        if tensor.dtype not in _TORCH_DTYPES:
            raise ExportError(
                f"spec {spec.name!r}: input {tensor.name!r} is {tensor.dtype}, which a torch "
                "module cannot take; export supports numeric and bool tensors"
            )
        dims = [VARIABLE_DIM_SIZE if dim == -1 else dim for dim in tensor.shape]
        shape = [batch_size, *dims] if spec.max_batch_size > 0 else dims
        values = torch.randn(shape, generator=generator) * 4
        tensors.append(values.to(_TORCH_DTYPES[tensor.dtype]))
    return tensors


def _check_exportable(spec: ModelSpec) -> None:
    if spec.backend not in EXPORTABLE_BACKENDS:
        raise ExportError(
            f"spec {spec.name!r}: backend {spec.backend or spec.platform!r} cannot be exported "
            f"from a torch model; gpufleet exports to {', '.join(EXPORTABLE_BACKENDS)}"
        )
    if not spec.inputs or not spec.outputs:
        raise ExportError(f"spec {spec.name!r}: list its inputs and outputs to export a model")
    if spec.backend == "python" and model_filename(spec) == TORCHSCRIPT_FILE:
        raise ExportError(
            f"spec {spec.name!r}: default_model_filename {TORCHSCRIPT_FILE!r} is the TorchScript "
            "file the python model loads; name the python file something else (model.py)"
        )


@contextlib.contextmanager
def _torch_errors_as_export_errors(spec: ModelSpec) -> Iterator[None]:
    try:
        yield
    except ExportError:
        raise
    except Exception as error:  # torch's tracers and exporters raise many kinds
        reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise ExportError(
            f"spec {spec.name!r}: exporting the module for the {spec.backend} backend failed: "
            f"{type(error).__name__}: {reason}; do the spec's inputs and outputs match the model?"
        ) from error


# -- TorchScript ---------------------------------------------------------------------------------


def _export_torchscript(module: torch.nn.Module, spec: ModelSpec, path: Path) -> None:
    with _torchscript_warnings_silenced():
        example = tuple(example_inputs(spec, TRACE_BATCH))
        traced = torch.jit.trace(module, example)  # type: ignore[no-untyped-call]
        torch.jit.save(traced, str(path))
        reloaded = torch.jit.load(str(path))  # type: ignore[no-untyped-call]
    check = example_inputs(spec, CHECK_BATCH, seed=1)
    _compare(spec, path, _outputs(spec, reloaded(*check)), _reference(module, spec, check))


@contextlib.contextmanager
def _torchscript_warnings_silenced() -> Iterator[None]:
    with warnings.catch_warnings():
        # torch 2.13 deprecates TorchScript for torch.export, but TorchScript is what Triton's
        # PyTorch backend loads.
        warnings.simplefilter("ignore", DeprecationWarning)
        # The input-shape guards of a module from torch.export (MLflow's pt2 format) become
        # constants in the trace: true of every input Triton lets through, so not worth a warning.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # type: ignore[attr-defined]
        yield


# -- ONNX ----------------------------------------------------------------------------------------


def _export_onnx(module: torch.nn.Module, spec: ModelSpec, path: Path) -> Path:
    with _quiet_onnx_exporter():
        torch.onnx.export(
            module,
            tuple(example_inputs(spec, TRACE_BATCH)),
            str(path),
            input_names=[tensor.name for tensor in spec.inputs],
            output_names=[tensor.name for tensor in spec.outputs],
            dynamic_shapes=_dynamic_axes(spec),
            dynamo=True,
            external_data=False,  # one file; the protobuf limit makes that models up to 2 GB
            verbose=False,
        )
    _check_with_onnxruntime(module, spec, path)
    return path


def _dynamic_axes(spec: ModelSpec) -> dict[str, dict[int, Any] | None] | None:
    """Per input, its dynamic axes: the batch axis when the spec batches, and every -1."""
    offset = 1 if spec.max_batch_size > 0 else 0
    dynamic = torch.export.Dim.DYNAMIC
    shapes: dict[str, dict[int, Any] | None] = {}
    for tensor in spec.inputs:
        axes = {axis + offset: dynamic for axis, dim in enumerate(tensor.shape) if dim == -1}
        if offset:
            axes[0] = dynamic
        shapes[tensor.name] = axes or None
    return shapes if any(shapes.values()) else None


def _check_with_onnxruntime(module: torch.nn.Module, spec: ModelSpec, path: Path) -> None:
    import onnxruntime  # type: ignore[import-untyped]  # only here: the others do not need it

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check = example_inputs(spec, CHECK_BATCH, seed=1)
    feeds = {tensor.name: value.numpy() for tensor, value in zip(spec.inputs, check, strict=True)}
    names = [tensor.name for tensor in spec.outputs]
    results = [np.asarray(value) for value in session.run(names, feeds)]
    _compare(spec, path, results, _reference(module, spec, check))


@contextlib.contextmanager
def _quiet_onnx_exporter() -> Iterator[None]:
    """torch.onnx prints its progress and warns about torchvision; keep our output clean."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


# -- checks --------------------------------------------------------------------------------------


def _reference(module: torch.nn.Module, spec: ModelSpec, inputs: Tensors) -> list[npt.NDArray[Any]]:
    with torch.no_grad():
        return _outputs(spec, module(*inputs))


def _outputs(spec: ModelSpec, result: Any) -> list[npt.NDArray[Any]]:
    values = [result] if isinstance(result, torch.Tensor) else list(result)
    if len(values) != len(spec.outputs) or not all(isinstance(v, torch.Tensor) for v in values):
        raise ExportError(
            f"spec {spec.name!r}: the module returns {len(values)} value(s), the spec lists "
            f"{len(spec.outputs)} output tensor(s); return one tensor per output, in order"
        )
    return [value.detach().cpu().numpy() for value in values]


def _compare(
    spec: ModelSpec,
    path: Path,
    exported: list[npt.NDArray[Any]],
    expected: list[npt.NDArray[Any]],
) -> None:
    objectives = spec.objectives or Objectives()
    for tensor, got, want in zip(spec.outputs, exported, expected, strict=True):
        if got.shape != want.shape:
            raise ExportError(
                f"spec {spec.name!r}: {path.name} gives output {tensor.name!r} the shape "
                f"{list(got.shape)} where torch gives {list(want.shape)}"
            )
        if not np.allclose(got, want, rtol=objectives.output_rtol, atol=objectives.output_atol):
            worst = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
            raise ExportError(
                f"spec {spec.name!r}: {path.name} differs from the torch module by up to "
                f"{worst:.3g} on output {tensor.name!r} (atol {objectives.output_atol:g}, rtol "
                f"{objectives.output_rtol:g}); the module does not export faithfully"
            )


# -- named inputs --------------------------------------------------------------------------------


class _NamedInputs(torch.nn.Module):
    """Calls the wrapped module; its forward() signature names the spec's inputs (see below)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *tensors: torch.Tensor) -> Any:
        return self.inner(*tensors)


def _with_input_names(module: torch.nn.Module, names: list[str]) -> torch.nn.Module:
    """`module` behind a forward(self, <name>, ...) whose parameters are the spec's input names.

    torch.jit.trace and torch.export read argument names through inspect.signature, which
    honours `__signature__`: that is how TorchScript's forward schema and the ONNX graph get
    the spec's names without generating source code.
    """
    with contextlib.suppress(NotImplementedError):
        # A module from torch.export (MLflow's pt2 format) refuses eval(): its mode was fixed
        # when it was exported.
        module.eval()

    def forward(self: _NamedInputs, *tensors: torch.Tensor) -> Any:
        return self.inner(*tensors)

    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    parameters = [inspect.Parameter(name, positional) for name in ["self", *names]]
    forward.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    named_class = type("NamedInputs", (_NamedInputs,), {"forward": forward})
    named: torch.nn.Module = named_class(module)
    named.training = False  # not .eval(): that would recurse into a module that refuses it
    return named


# -- the python backend's model ------------------------------------------------------------------

PYTHON_MODEL_SOURCE = '''\
"""Triton python-backend model written by gpufleet (generators/model_export.py): runs the
TorchScript file beside it. Do not edit: `gpufleet up` exports it again from the registry.

Tensor names and datatypes come from the model config. The requests Triton hands over together
are concatenated into one forward pass when the model batches. The instance runs where Triton
placed it (KIND_GPU: cuda:<device id>, else the CPU); the model parameter `torch_threads` sets
torch's intra-op threads.
"""

import json
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

TORCHSCRIPT_FILE = "model.pt"


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_names = [tensor["name"] for tensor in config["input"]]
        self.outputs = [
            (tensor["name"], pb_utils.triton_string_to_numpy(tensor["data_type"]))
            for tensor in config["output"]
        ]
        self.batching = int(config.get("max_batch_size", 0)) > 0
        threads = config.get("parameters", {}).get("torch_threads", {}).get("string_value")
        if threads:
            torch.set_num_threads(int(threads))
        if args["model_instance_kind"] == "GPU":
            self.device = torch.device(f"cuda:{args['model_instance_device_id']}")
        else:
            self.device = torch.device("cpu")
        path = Path(args["model_repository"]) / args["model_version"] / TORCHSCRIPT_FILE
        self.model = torch.jit.load(str(path), map_location=self.device).eval()
        pb_utils.Logger.log_info(
            f"{args['model_instance_name']}: {TORCHSCRIPT_FILE} on {self.device}, "
            f"{torch.get_num_threads()} torch thread(s)"
        )

    def execute(self, requests):
        if not self.batching:
            return [self._run([request])[0] for request in requests]
        return self._run(requests)

    def _run(self, requests):
        """One forward pass for `requests`; one response each (an error response on failure)."""
        try:
            arrays = [
                [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
                for name in self.input_names
            ]
            rows = [len(array) for array in arrays[0]] if self.batching else [None]
            inputs = [
                torch.from_numpy(np.concatenate(parts) if self.batching else parts[0])
                for parts in arrays
            ]
            with torch.inference_mode():
                result = self.model(*[tensor.to(self.device) for tensor in inputs])
            results = [result] if isinstance(result, torch.Tensor) else list(result)
            outputs = [
                value.cpu().numpy().astype(dtype, copy=False)
                for value, (_, dtype) in zip(results, self.outputs)
            ]
        except Exception as error:  # one bad batch fails its requests, not the model
            message = f"{type(error).__name__}: {error}"
            error = pb_utils.TritonError(message)
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        if not self.batching:
            return [self._response(outputs)]
        bounds = np.cumsum([0, *rows])
        return [
            self._response([output[start:end] for output in outputs])
            for start, end in zip(bounds[:-1], bounds[1:])
        ]

    def _response(self, outputs):
        tensors = [pb_utils.Tensor(name, value) for (name, _), value in zip(self.outputs, outputs)]
        return pb_utils.InferenceResponse(output_tensors=tensors)
'''
