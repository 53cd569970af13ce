"""Triton python-backend model for tests: multiplies its only input by the `factor` parameter."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.factor = float(config["parameters"]["factor"]["string_value"])

    def execute(self, requests):
        responses = []
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            scaled = (values * self.factor).astype(np.float32)
            responses.append(
                pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, scaled)])
            )
        return responses
