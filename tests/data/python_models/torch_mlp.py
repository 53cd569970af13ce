"""Triton python-backend model for tests: a seeded torch MLP that reads its tensor names from
the model config, so one file serves any spec with one input and one output.

Each execute() sleeps briefly so that concurrent requests pile up and the dynamic batcher has
something to batch; tests compare the outputs with `reference_outputs` computed locally.
"""

import json
import time

import numpy as np
import torch

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported by the tests themselves, for reference_outputs()
    pb_utils = None

SEED = 1234
EXECUTE_DELAY_S = 0.02


def build_network(in_features: int, out_features: int) -> torch.nn.Module:
    torch.manual_seed(SEED)
    return torch.nn.Sequential(
        torch.nn.Linear(in_features, 32), torch.nn.ReLU(), torch.nn.Linear(32, out_features)
    ).eval()


def reference_outputs(features: np.ndarray, out_features: int) -> np.ndarray:
    network = build_network(features.shape[-1], out_features)
    with torch.no_grad():
        return network(torch.from_numpy(features)).numpy()


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        in_features = int(config["input"][0]["dims"][-1])
        out_features = int(config["output"][0]["dims"][-1])
        torch.set_num_threads(1)
        self.network = build_network(in_features, out_features)

    def execute(self, requests):
        time.sleep(EXECUTE_DELAY_S)
        responses = []
        for request in requests:
            features = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            with torch.no_grad():
                result = self.network(torch.from_numpy(features)).numpy().astype(np.float32)
            responses.append(
                pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, result)])
            )
        return responses
