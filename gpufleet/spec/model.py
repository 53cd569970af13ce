"""ModelSpec: the typed description of one served model, kept in `modelconfigs/<name>.yaml`.

Field names are friendly (`fp16`, `max_queue_delay_us`, `kind: gpu`); `generators.triton_config`
maps them onto Triton's own `ModelConfig` protobuf. Optional sub-objects are `None` when not set,
so "not set" stays distinct from "set to Triton's default" and an imported config regenerates to
an equal protobuf. Scalars whose Triton default is the protobuf zero use that default directly.

Cross-field rules live in `gpufleet.spec.model_checks`; they run in the `after` validator here
and, with a located message per problem, in `gpufleet.spec.loading`.

    >>> spec = ModelSpec.model_validate({"name": "m", "backend": "python", "max_batch_size": 8})
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from gpufleet.spec.paths import FileName
from gpufleet.spec.rollout import Rollout

# Names Triton accepts for a model and that are safe as a directory name.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
MLFLOW_MODEL_URI_PATTERN = r"models:/[^/@]+(@[A-Za-z0-9_-]+|/[1-9][0-9]*)"
SHA256_PATTERN = r"^[0-9a-f]{64}$"


def _is_sha256(value: str) -> str:
    if not re.fullmatch(SHA256_PATTERN, value):
        raise ValueError("write a sha256 as 64 lowercase hex digits")
    return value


Sha256 = Annotated[
    str, AfterValidator(_is_sha256), WithJsonSchema({"type": "string", "pattern": SHA256_PATTERN})
]

Backend = Literal[
    "onnxruntime",
    "pytorch",
    "tensorrt",
    "tensorflow",
    "openvino",
    "python",
    "dali",
    "fil",
    "vllm",
    "tensorrtllm",
    "ensemble",
]
Platform = Literal[
    "onnxruntime_onnx",
    "pytorch_libtorch",
    "tensorrt_plan",
    "tensorflow_graphdef",
    "tensorflow_savedmodel",
    "ensemble",
]
BACKEND_ALIASES = {
    "libtorch": "pytorch",
    "torch": "pytorch",
    "onnx": "onnxruntime",
    "trt": "tensorrt",
}

DType = Literal[
    "bool",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "int8",
    "int16",
    "int32",
    "int64",
    "fp16",
    "fp32",
    "fp64",
    "bf16",
    "string",
]
DTYPE_ALIASES = {
    "float16": "fp16",
    "half": "fp16",
    "float32": "fp32",
    "float": "fp32",
    "float64": "fp64",
    "double": "fp64",
    "bfloat16": "bf16",
    "bytes": "string",
}

GpuFamily = Literal["t4", "a10", "a100", "l4", "l40s", "h100", "h200"]


def _normalize(aliases: dict[str, str]) -> Any:
    def normalize(value: Any) -> Any:
        if isinstance(value, str):
            lowered = value.strip().lower()
            return aliases.get(lowered, lowered)
        return value

    return BeforeValidator(normalize)


def _stringify_scalar(value: Any) -> Any:
    """Triton parameters are strings; let YAML authors write numbers and booleans plainly."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


StringValue = Annotated[
    str,
    BeforeValidator(_stringify_scalar),
    WithJsonSchema({"type": ["string", "number", "boolean"]}),
]


def _reject_zero_dim(dim: int) -> int:
    if dim == 0:
        raise ValueError("a dimension of 0 holds no data; use a positive size or -1")
    return dim


def _reject_version_zero(version: int) -> int:
    if version == 0:
        raise ValueError(
            "Triton has no model version 0; use -1 (the latest) or a version number >= 1"
        )
    return version


# Bounds of the protobuf integer types, so every valid spec renders (Triton's fields are
# int32/uint32/int64/uint64; counts and sizes use the smallest of them).
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

Dim = Annotated[
    int,
    Field(ge=-1, le=INT64_MAX),
    AfterValidator(_reject_zero_dim),
    WithJsonSchema({"type": "integer", "minimum": -1, "not": {"const": 0}}),
]
PositiveInt = Annotated[int, Field(ge=1, le=INT32_MAX)]
NonNegativeInt = Annotated[int, Field(ge=0, le=INT32_MAX)]
Microseconds = Annotated[int, Field(ge=0, le=INT64_MAX, description="Microseconds.")]


class SpecModel(BaseModel):
    """Base of every spec object: unknown keys are errors, values are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(SpecModel):
    """One input tensor. `shape` excludes the batch dimension when `max_batch_size > 0`."""

    name: str = Field(min_length=1)
    dtype: Annotated[DType, _normalize(DTYPE_ALIASES)]
    shape: list[Dim] = Field(min_length=1, description="Dimensions; -1 for a variable size.")
    reshape: list[Dim] | None = Field(
        default=None, description="Shape the backend sees; [] turns a [1] tensor into a scalar."
    )
    format: Literal["nchw", "nhwc"] | None = None
    optional: bool = False
    shape_tensor: bool = False
    ragged_batch: bool = False
    non_linear_format_io: bool = False


class OutputSpec(SpecModel):
    """One output tensor. `shape` excludes the batch dimension when `max_batch_size > 0`."""

    name: str = Field(min_length=1)
    dtype: Annotated[DType, _normalize(DTYPE_ALIASES)]
    shape: list[Dim] = Field(min_length=1, description="Dimensions; -1 for a variable size.")
    reshape: list[Dim] | None = None
    label_file: FileName | None = Field(
        default=None, description="Classification labels file, in the model's directory."
    )
    shape_tensor: bool = False
    non_linear_format_io: bool = False


class QueuePolicy(SpecModel):
    """How long a request may wait and how many may wait (Triton's ModelQueuePolicy)."""

    max_queue_size: NonNegativeInt = Field(default=0, description="0 means unbounded.")
    timeout_us: Microseconds = Field(default=0, description="0 means no timeout.")
    timeout_action: Literal["reject", "delay"] = "reject"
    allow_timeout_override: bool = False


class DynamicBatching(SpecModel):
    """Server-side batching of individual requests (Triton's ModelDynamicBatching)."""

    max_queue_delay_us: Microseconds = Field(
        default=0, description="How long the batcher may hold a request to form a larger batch."
    )
    preferred_batch_sizes: list[PositiveInt] = Field(default_factory=list)
    preserve_ordering: bool = False
    priority_levels: NonNegativeInt = 0
    default_priority_level: NonNegativeInt = 0
    default_queue_policy: QueuePolicy | None = None
    priority_queue_policies: dict[PositiveInt, QueuePolicy] = Field(
        default_factory=dict, description="Queue policy per priority level (1 is highest)."
    )


class InstanceGroup(SpecModel):
    """Copies of the model and where they run (Triton's ModelInstanceGroup)."""

    kind: Literal["auto", "gpu", "cpu", "model"] = "auto"
    count: PositiveInt | None = Field(
        default=None, description="Instances per device; Triton's default is 1."
    )
    gpus: list[NonNegativeInt] = Field(
        default_factory=list, description="GPU indices, kind gpu only."
    )
    name: str | None = None
    profiles: list[str] = Field(default_factory=list, description="TensorRT optimization profiles.")
    passive: bool = False
    host_policy: str | None = None


class VersionPolicy(SpecModel):
    """Which versions Triton serves: exactly one of `latest`, `all` or `specific`."""

    latest: PositiveInt | None = Field(default=None, description="Serve the N newest versions.")
    all: Literal[True] | None = None
    specific: list[PositiveInt] | None = None


class WarmupInput(SpecModel):
    """Data fed to one input during warmup: `data: zero|random` or a `data_file`."""

    dtype: Annotated[DType, _normalize(DTYPE_ALIASES)]
    shape: list[PositiveInt]
    data: Literal["zero", "random"] | None = None
    data_file: FileName | None = Field(
        default=None, description="File in the model's warmup/ directory."
    )


class Warmup(SpecModel):
    """A warmup request Triton runs before it reports the model ready."""

    name: str = Field(min_length=1)
    batch_size: PositiveInt = Field(
        description="Batch size of the warmup request; Triton silently skips a sample of 0."
    )
    count: NonNegativeInt = 0
    inputs: dict[str, WarmupInput] = Field(default_factory=dict)


class Accelerator(SpecModel):
    """An accelerator such as `tensorrt` (GPU) or `openvino` (CPU), and its parameters."""

    name: str = Field(min_length=1)
    parameters: dict[str, StringValue] = Field(default_factory=dict)


class Accelerators(SpecModel):
    gpu: list[Accelerator] = Field(default_factory=list)
    cpu: list[Accelerator] = Field(default_factory=list)


class CudaOptimization(SpecModel):
    graphs: bool = Field(default=False, description="Capture CUDA graphs (TensorRT backend).")
    busy_wait_events: bool = False
    output_copy_stream: bool = False


class Optimization(SpecModel):
    """Backend optimization settings (Triton's ModelOptimizationPolicy)."""

    graph_level: Annotated[int, Field(ge=-INT32_MAX - 1, le=INT32_MAX)] | None = None
    priority: Literal["default", "max", "min"] = "default"
    cuda: CudaOptimization | None = None
    accelerators: Accelerators | None = None
    input_pinned_memory: bool | None = None
    output_pinned_memory: bool | None = None
    gather_kernel_buffer_threshold: NonNegativeInt = 0
    eager_batching: bool = False


class EnsembleStep(SpecModel):
    """One step of an ensemble: which model runs and how ensemble tensors map to its tensors."""

    model: str = Field(min_length=1)
    version: Annotated[
        int,
        Field(ge=-1, le=INT64_MAX),
        AfterValidator(_reject_version_zero),
        WithJsonSchema(
            {"type": "integer", "minimum": -1, "maximum": INT64_MAX, "not": {"const": 0}}
        ),
    ] = Field(default=-1, description="-1 is the latest; versions start at 1.")
    inputs: dict[str, str] = Field(description="Model input name -> ensemble tensor name.")
    outputs: dict[str, str] = Field(description="Model output name -> ensemble tensor name.")


_CONCURRENCY_LEVEL_SCHEMA = {"type": "integer", "minimum": 1, "maximum": 1024}


def _one_level_is_a_list(value: object) -> object:
    return [value] if isinstance(value, int) and not isinstance(value, bool) else value


def _levels_ascending(levels: list[int]) -> list[int]:
    if levels != sorted(set(levels)):
        raise ValueError("list the concurrency levels once each, in ascending order")
    return levels


class Objectives(SpecModel):
    """Service objectives the load gate holds the served model to, and the correctness
    tolerance the golden examples are compared with."""

    p99_latency_ms: float | None = Field(
        default=None, gt=0, description="p99 latency each concurrency level must stay under."
    )
    concurrency: Annotated[
        list[Annotated[int, Field(ge=1, le=1024)]],
        BeforeValidator(_one_level_is_a_list),
        AfterValidator(_levels_ascending),
        Field(min_length=1, max_length=16),
        WithJsonSchema(
            {
                "anyOf": [
                    _CONCURRENCY_LEVEL_SCHEMA,
                    {
                        "type": "array",
                        "items": _CONCURRENCY_LEVEL_SCHEMA,
                        "minItems": 1,
                        "maxItems": 16,
                        "uniqueItems": True,
                    },
                ]
            }
        ),
    ] = Field(
        default_factory=lambda: [1],
        description="Concurrency levels the load gate measures (one number or a list).",
    )
    min_throughput_per_s: float | None = Field(
        default=None, gt=0, description="Inferences per second needed at the highest level."
    )
    output_atol: float = Field(
        default=1e-5, ge=0, description="Absolute tolerance of the golden-example comparison."
    )
    output_rtol: float = Field(
        default=1e-4, ge=0, description="Relative tolerance of the golden-example comparison."
    )


class ModelSpec(SpecModel):
    """A model to serve with Triton: its interface, batching, placement and objectives."""

    name: str = Field(
        pattern=MODEL_NAME_PATTERN, description="Triton model name; also the file name."
    )
    backend: Annotated[Backend, _normalize(BACKEND_ALIASES)] | None = None
    platform: Platform | None = None
    source: str | None = Field(
        default=None,
        description="Where the model comes from: an MLflow URI (models:/name@alias, "
        "models:/name/3) or a path.",
    )
    source_sha256: dict[Annotated[int, Field(ge=1)], Sha256] = Field(
        default_factory=dict,
        description="Registry version -> sha256 of its artifact (as in the lineage manifest's "
        "artifact_sha256). When set, every version the spec serves must be listed and match, "
        "or `gpufleet up` refuses it before loading anything.",
        json_schema_extra={"propertyNames": {"pattern": "^[1-9][0-9]*$"}},
    )
    max_batch_size: NonNegativeInt = Field(default=0, description="0 disables batching.")
    inputs: list[InputSpec] = Field(default_factory=list)
    outputs: list[OutputSpec] = Field(default_factory=list)
    dynamic_batching: DynamicBatching | None = None
    instance_groups: list[InstanceGroup] = Field(default_factory=list)
    version_policy: VersionPolicy | None = None
    warmup: list[Warmup] = Field(default_factory=list)
    optimization: Optimization | None = None
    response_cache: bool | None = None
    decoupled: bool | None = Field(default=None, description="Streaming responses.")
    default_model_filename: FileName | None = Field(
        default=None, description="File Triton loads from each version directory."
    )
    parameters: dict[str, StringValue] = Field(default_factory=dict)
    ensemble_steps: list[EnsembleStep] = Field(default_factory=list)
    objectives: Objectives | None = None
    gpu_families: list[GpuFamily] = Field(
        default_factory=list, description="GPU families the model may run on; empty means any."
    )
    rollout: Rollout | None = Field(
        default=None,
        description="A candidate version served beside the source's, and how traffic reaches "
        "it (`gpufleet rollout start`, docs/rollout.md).",
    )

    @field_validator("source")
    @classmethod
    def _source_is_well_formed(cls, source: str | None) -> str | None:
        is_registry_uri = source is not None and source.startswith("models:/")
        if is_registry_uri and not re.fullmatch(MLFLOW_MODEL_URI_PATTERN, source or ""):
            raise ValueError(
                "an MLflow model URI is models:/<name>@<alias> or models:/<name>/<version>"
            )
        return source

    @model_validator(mode="after")
    def _cross_field_checks(self, info: ValidationInfo) -> ModelSpec:
        # The file loader runs the same checks itself to report each problem with its line.
        # Imported here: model_checks imports this module.
        if info.context and info.context.get("defer_cross_field_checks"):
            return self
        from gpufleet.spec.model_checks import check_model_spec

        problems = check_model_spec(self)
        if problems:
            raise ValueError("; ".join(f"{p.path_text}: {p.message}" for p in problems))
        return self

    @property
    def is_ensemble(self) -> bool:
        return self.backend == "ensemble" or self.platform == "ensemble"
