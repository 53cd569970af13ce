"""Golden examples: inputs and the outputs a model version must give for them.

They are logged with each model version (`golden_examples.json` in the model's artifact) and
replayed through Triton by the correctness gate, which is what catches a server that answers
200 OK with wrong predictions. Tensors keep Triton's datatype names and include the batch
dimension when the model batches (shape [1, 16] for one example of a 16-feature model).

    write_golden_examples(path, [GoldenExample({"features": x}, {"scores": y})])
    for example in read_golden_examples(path): ...
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

GOLDEN_EXAMPLES_FILE = "golden_examples.json"
FORMAT = "gpufleet.golden-examples/v1"

# Triton datatype name <-> numpy dtype, for the types golden examples may hold.
TRITON_TO_NUMPY: dict[str, type[np.generic]] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
NUMPY_TO_TRITON = {np.dtype(value): key for key, value in TRITON_TO_NUMPY.items()}


@dataclass(frozen=True)
class GoldenExample:
    """One request (input name -> tensor) and the expected response (output name -> tensor)."""

    inputs: dict[str, npt.NDArray[Any]]
    outputs: dict[str, npt.NDArray[Any]]


def golden_examples_json(examples: list[GoldenExample]) -> str:
    """Deterministic JSON text for `examples` (same tensors, same bytes)."""
    document = {
        "format": FORMAT,
        "examples": [
            {"inputs": _tensors_json(e.inputs), "outputs": _tensors_json(e.outputs)}
            for e in examples
        ],
    }
    return json.dumps(document, indent=1, sort_keys=True) + "\n"


def write_golden_examples(path: Path, examples: list[GoldenExample]) -> None:
    path.write_text(golden_examples_json(examples), encoding="utf-8")


def read_golden_examples(path: Path) -> list[GoldenExample]:
    """Parse a golden examples file; ValueError names the file and what is wrong."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.get("format") != FORMAT:
            raise ValueError(f"format is {document.get('format')!r}, expected {FORMAT!r}")
        return [
            GoldenExample(_tensors(item["inputs"]), _tensors(item["outputs"]))
            for item in document["examples"]
        ]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: not a golden examples file: {error}") from None


def _tensors_json(tensors: dict[str, npt.NDArray[Any]]) -> dict[str, Any]:
    result = {}
    for name, tensor in sorted(tensors.items()):
        array = np.asarray(tensor)
        if array.dtype not in NUMPY_TO_TRITON:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} has no golden-example form")
        result[name] = {
            "datatype": NUMPY_TO_TRITON[array.dtype],
            "shape": list(array.shape),
            "data": array.reshape(-1).tolist(),
        }
    return result


def _tensors(document: dict[str, Any]) -> dict[str, npt.NDArray[Any]]:
    return {
        name: np.asarray(item["data"], dtype=TRITON_TO_NUMPY[item["datatype"]]).reshape(
            item["shape"]
        )
        for name, item in document.items()
    }
