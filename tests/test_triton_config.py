"""Each step of ModelSpec -> Triton ModelConfig, checked field by field.

Real: the generator and Triton's own protobuf schema (tritonclient's model_config_pb2).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from generators.triton_config import DTYPE_TO_TRITON, render_config_pbtxt, render_model_config
from gpufleet.spec.loading import model_spec_hash
from gpufleet.spec.model import ModelSpec
from tests.conftest import PROJECT_ROOT

BASE: dict[str, Any] = {
    "name": "m",
    "backend": "python",
    "max_batch_size": 8,
    "inputs": [{"name": "x", "dtype": "fp32", "shape": [4]}],
    "outputs": [{"name": "y", "dtype": "fp32", "shape": [4]}],
}


def render(**changes: Any) -> pb.ModelConfig:
    return render_model_config(ModelSpec.model_validate({**BASE, **changes}))


def test_name_backend_and_batch_size() -> None:
    config = render()
    assert (config.name, config.backend, config.platform, config.max_batch_size) == (
        "m",
        "python",
        "",
        8,
    )


@pytest.mark.parametrize(
    ("backend", "platform", "expected"),
    [
        ("libtorch", None, ("pytorch", "")),
        ("onnxruntime", "onnxruntime_onnx", ("onnxruntime", "onnxruntime_onnx")),
        (None, "tensorrt_plan", ("", "tensorrt_plan")),
    ],
)
def test_backend_and_platform(
    backend: str | None, platform: str | None, expected: tuple[str, str]
) -> None:
    config = render(backend=backend, platform=platform)
    assert (config.backend, config.platform) == expected


@pytest.mark.parametrize("dtype", sorted(DTYPE_TO_TRITON))
def test_every_dtype_maps_to_its_triton_type(dtype: str) -> None:
    config = render(inputs=[{"name": "x", "dtype": dtype, "shape": [-1, 3]}])
    # The friendly names are Triton's own without the prefix: fp16 -> TYPE_FP16.
    assert pb.DataType.Name(config.input[0].data_type) == f"TYPE_{dtype.upper()}"
    assert list(config.input[0].dims) == [-1, 3]


def test_friendly_dtype_names() -> None:
    config = render(
        inputs=[
            {"name": "x", "dtype": "float16", "shape": [2]},
            {"name": "t", "dtype": "bytes", "shape": [1]},
        ]
    )
    assert [pb.DataType.Name(t.data_type) for t in config.input] == ["TYPE_FP16", "TYPE_STRING"]


def test_tensor_options() -> None:
    config = render(
        inputs=[
            {
                "name": "x",
                "dtype": "fp32",
                "shape": [1, 1, 1],  # Triton wants 3 dims with a format
                "reshape": [],
                "format": "nhwc",
                "optional": True,
            }
        ],
        outputs=[{"name": "y", "dtype": "fp32", "shape": [3], "label_file": "labels.txt"}],
    )
    tensor = config.input[0]
    assert tensor.HasField("reshape")
    assert list(tensor.reshape.shape) == []
    assert tensor.format == pb.ModelInput.FORMAT_NHWC
    assert tensor.optional
    assert config.output[0].label_filename == "labels.txt"
    assert not config.output[0].HasField("reshape")


def test_dynamic_batching_with_queue_policies() -> None:
    config = render(
        dynamic_batching={
            "max_queue_delay_us": 500,
            "preferred_batch_sizes": [2, 4],
            "priority_levels": 2,
            "default_priority_level": 2,
            "default_queue_policy": {
                "max_queue_size": 10,
                "timeout_us": 100,
                "timeout_action": "delay",
                "allow_timeout_override": True,
            },
            "priority_queue_policies": {1: {"max_queue_size": 3}},
        }
    )
    batching = config.dynamic_batching
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert (batching.max_queue_delay_microseconds, list(batching.preferred_batch_size)) == (
        500,
        [2, 4],
    )
    assert not batching.preserve_ordering
    assert batching.priority_levels == 2
    assert batching.default_priority_level == 2
    policy = batching.default_queue_policy
    assert (
        policy.max_queue_size,
        policy.default_timeout_microseconds,
        policy.timeout_action,
        policy.allow_timeout_override,
    ) == (10, 100, pb.ModelQueuePolicy.DELAY, True)
    assert batching.priority_queue_policy[1].max_queue_size == 3


def test_preserve_ordering() -> None:
    assert render(dynamic_batching={"preserve_ordering": True}).dynamic_batching.preserve_ordering


def test_empty_dynamic_batching_still_turns_batching_on() -> None:
    assert render(dynamic_batching={}).HasField("dynamic_batching")
    assert not render().HasField("dynamic_batching")


def test_instance_groups() -> None:
    config = render(
        backend="tensorrt",  # profiles are TensorRT's
        instance_groups=[
            {"kind": "gpu", "count": 2, "gpus": [0, 1], "profiles": ["0"], "name": "g"},
            {"kind": "cpu"},
        ],
    )
    gpu, cpu = config.instance_group
    assert (gpu.kind, gpu.count, list(gpu.gpus), list(gpu.profile), gpu.name) == (
        pb.ModelInstanceGroup.KIND_GPU,
        2,
        [0, 1],
        ["0"],
        "g",
    )
    assert (cpu.kind, cpu.count) == (
        pb.ModelInstanceGroup.KIND_CPU,
        0,
    )  # count unset: Triton's default 1


@pytest.mark.parametrize(
    ("policy", "field"),
    [({"latest": 2}, "latest"), ({"all": True}, "all"), ({"specific": [1, 3]}, "specific")],
)
def test_version_policies(policy: dict[str, Any], field: str) -> None:
    config = render(version_policy=policy)
    assert config.version_policy.WhichOneof("policy_choice") == field


def test_warmup() -> None:
    config = render(
        warmup=[
            {
                "name": "w",
                "batch_size": 4,
                "count": 2,
                "inputs": {"x": {"dtype": "fp32", "shape": [4], "data": "random"}},
            }
        ]
    )
    sample = config.model_warmup[0]
    assert (sample.name, sample.batch_size, sample.count) == ("w", 4, 2)
    assert sample.inputs["x"].WhichOneof("input_data_type") == "random_data"


def test_optimization_accelerators_and_cuda() -> None:
    config = render(
        optimization={
            "priority": "max",
            "cuda": {"graphs": True},
            "accelerators": {
                "gpu": [
                    {
                        "name": "tensorrt",
                        "parameters": {
                            "precision_mode": "FP16",
                            "max_workspace_size_bytes": 1 << 30,
                        },
                    }
                ]
            },
            "input_pinned_memory": False,
        }
    )
    optimization = config.optimization
    assert optimization.priority == pb.ModelOptimizationPolicy.PRIORITY_MAX
    assert optimization.cuda.graphs
    accelerator = optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accelerator.name == "tensorrt"
    assert dict(accelerator.parameters) == {
        "precision_mode": "FP16",
        "max_workspace_size_bytes": "1073741824",
    }
    # An explicit `false` is kept: Triton's default for pinned memory is on.
    assert optimization.HasField("input_pinned_memory")
    assert not optimization.input_pinned_memory.enable
    assert not optimization.HasField("output_pinned_memory")


def test_cache_transaction_policy_parameters_and_filename() -> None:
    config = render(
        response_cache=True,
        decoupled=False,
        parameters={"threads": 2, "flag": True},
        default_model_filename="net.py",
    )
    assert config.response_cache.enable
    assert config.HasField("model_transaction_policy")
    assert not config.model_transaction_policy.decoupled
    assert {key: value.string_value for key, value in config.parameters.items()} == {
        "threads": "2",
        "flag": "true",
    }
    assert config.default_model_filename == "net.py"


def test_ensemble_renders_as_platform_with_steps() -> None:
    config = render_model_config(
        ModelSpec.model_validate(
            {
                **BASE,
                "backend": "ensemble",
                "ensemble_steps": [{"model": "inner", "inputs": {"a": "x"}, "outputs": {"b": "y"}}],
            }
        )
    )
    assert (config.platform, config.backend) == ("ensemble", "")
    step = config.ensemble_scheduling.step[0]
    assert (step.model_name, step.model_version, dict(step.input_map), dict(step.output_map)) == (
        "inner",
        -1,
        {"a": "x"},
        {"b": "y"},
    )


def test_output_is_deterministic_and_parses_back() -> None:
    """Key order in the YAML maps does not change a byte of the output, nor the spec hash."""

    def spec_with(order: list[int]) -> ModelSpec:
        levels = {level: {"max_queue_size": level} for level in order}
        parameters = {f"p{level}": str(level) for level in order}
        return ModelSpec.model_validate(
            {
                **BASE,
                "parameters": parameters,
                "dynamic_batching": {
                    "priority_levels": 3,
                    "default_priority_level": 1,
                    "priority_queue_policies": levels,
                },
                "optimization": {
                    "accelerators": {"gpu": [{"name": "tensorrt", "parameters": parameters}]}
                },
            }
        )

    forward, backward = spec_with([1, 2, 3]), spec_with([3, 2, 1])
    assert model_spec_hash(forward) == model_spec_hash(backward)
    first = render_config_pbtxt(forward, "modelconfigs/m.yaml", model_spec_hash(forward))
    assert first == render_config_pbtxt(backward, "modelconfigs/m.yaml", model_spec_hash(backward))
    assert first.startswith("# Generated by gpufleet from modelconfigs/m.yaml (spec sha256 ")
    assert text_format.Parse(first, pb.ModelConfig()) == render_model_config(forward)


def test_output_does_not_depend_on_the_hash_seed() -> None:
    """Two interpreters with different PYTHONHASHSEED render the samples to the same bytes."""
    script = (
        "from pathlib import Path\n"
        "from generators.model_repository import render_repository_files\n"
        "from gpufleet.spec.loading import load_model_specs\n"
        "files = render_repository_files(load_model_specs(Path('modelconfigs')))\n"
        "print(''.join(files[name] for name in sorted(files)))\n"
    )
    outputs = [
        subprocess.run(
            [sys.executable, "-c", script],
            cwd=PROJECT_ROOT,
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    ]
    assert outputs[0] == outputs[1]
    assert outputs[0].count("# Generated by gpufleet") == 5
