"""Triton python-backend model for tests: a seeded torch MLP that reads its tensor names from
the model config, so one file serves any spec with one input and one output.

It runs where Triton placed the instance (`kind: gpu` -> cuda:<device>, else the CPU). Each
execute() sleeps `execute_delay_ms` (model parameter, default 20) so that concurrent requests
pile up and the dynamic batcher has something to batch; `hidden_size` (default 32) sets the
width. Tests compare outputs with `reference_outputs`, computed locally with the same seed.
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


def build_network(in_features: int, out_features: int, hidden_size: int = 32) -> torch.nn.Module:
    torch.manual_seed(SEED)
    return torch.nn.Sequential(
        torch.nn.Linear(in_features, hidden_size),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden_size, out_features),
    ).eval()


def reference_outputs(features: np.ndarray, out_features: int) -> np.ndarray:
    network = build_network(features.shape[-1], out_features)
    with torch.no_grad():
        return network(torch.from_numpy(features)).numpy()


def _parameter(config: dict, name: str, default: float) -> float:
    value = config.get("parameters", {}).get(name, {}).get("string_value")
    return float(value) if value else default


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        in_features = int(config["input"][0]["dims"][-1])
        out_features = int(config["output"][0]["dims"][-1])
        hidden_size = int(_parameter(config, "hidden_size", 32))
        self.delay_s = _parameter(config, "execute_delay_ms", 20) / 1000
        if args["model_instance_kind"] == "GPU":
            self.device = torch.device(f"cuda:{args['model_instance_device_id']}")
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(1)
        network = build_network(in_features, out_features, hidden_size)
        self.network = network.to(self.device)
        pb_utils.Logger.log_info(f"{args['model_instance_name']}: network on {self.device}")

    def execute(self, requests):
        if self.delay_s:
            time.sleep(self.delay_s)
        responses = []
        for request in requests:
            features = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            with torch.no_grad():
                result = self.network(torch.from_numpy(features).to(self.device))
            scores = result.cpu().numpy().astype(np.float32)
            responses.append(
                pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, scores)])
            )
        return responses
