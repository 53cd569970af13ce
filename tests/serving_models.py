"""A numpy-only python-backend model for the serving-stack tests, its config generated from a
ModelSpec by gpufleet's own generator (the stack images carry numpy, not torch).

    spec = write_affine_model(repository)  # repository/affine/{config.pbtxt,1/model.py}
    # OUTPUT0 = 2 * INPUT0 + 1, batched (max_batch_size 8, dynamic batching, one CPU instance);
    # an input holding NaN fails inside the model

PYTEST_DONT_REWRITE: this module asserts nothing.
"""

from __future__ import annotations

from pathlib import Path

from generators.triton_config import render_config_pbtxt
from gpufleet.spec.loading import model_spec_hash
from gpufleet.spec.model import ModelSpec

MODEL_NAME = "affine"
FEATURES = 4
_MODEL_PY = '''\
"""OUTPUT0 = 2 * INPUT0 + 1, for every request of a batch; a NaN input fails the
batch (which Triton counts in nv_inference_request_failure)."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            if np.isnan(values).any():
                # Raised, not an error response: Triton 2.51 counts only this as a failure.
                raise pb_utils.TritonModelException("INPUT0 holds NaN")
            result = (2.0 * values + 1.0).astype(np.float32)
            responses.append(
                pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", result)])
            )
        return responses
'''


def affine_spec(name: str = MODEL_NAME) -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "name": name,
            "backend": "python",
            "max_batch_size": 8,
            "inputs": [{"name": "INPUT0", "dtype": "fp32", "shape": [FEATURES]}],
            "outputs": [{"name": "OUTPUT0", "dtype": "fp32", "shape": [FEATURES]}],
            "dynamic_batching": {"max_queue_delay_us": 500},
            "instance_groups": [{"kind": "cpu", "count": 1}],
        }
    )


def write_affine_model(repository: Path, name: str = MODEL_NAME) -> ModelSpec:
    spec = affine_spec(name)
    directory = repository / name
    (directory / "1").mkdir(parents=True, exist_ok=True)
    config = render_config_pbtxt(spec, f"tests/{name}.yaml", model_spec_hash(spec))
    (directory / "config.pbtxt").write_text(config)
    (directory / "1" / "model.py").write_text(_MODEL_PY)
    return spec
