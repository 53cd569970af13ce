"""Render a ModelSpec as Triton's own `ModelConfig` protobuf and as `config.pbtxt` text.

The text is printed by `google.protobuf.text_format` from `model_config_pb2` (the schema shipped
in tritonclient), so it is valid by construction and parses back to the same message.

    message = render_model_config(spec)
    text = render_config_pbtxt(spec, "modelconfigs/resnet50.yaml", spec_hash=model_spec_hash(spec))
"""

from __future__ import annotations

from google.protobuf import text_format
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from tritonclient.grpc import model_config_pb2 as pb

from gpufleet.spec.model import (
    Accelerator,
    DynamicBatching,
    InputSpec,
    ModelSpec,
    Optimization,
    OutputSpec,
    QueuePolicy,
    Warmup,
)

DTYPE_TO_TRITON = {
    "bool": pb.TYPE_BOOL,
    "uint8": pb.TYPE_UINT8,
    "uint16": pb.TYPE_UINT16,
    "uint32": pb.TYPE_UINT32,
    "uint64": pb.TYPE_UINT64,
    "int8": pb.TYPE_INT8,
    "int16": pb.TYPE_INT16,
    "int32": pb.TYPE_INT32,
    "int64": pb.TYPE_INT64,
    "fp16": pb.TYPE_FP16,
    "fp32": pb.TYPE_FP32,
    "fp64": pb.TYPE_FP64,
    "bf16": pb.TYPE_BF16,
    "string": pb.TYPE_STRING,
}
FORMAT_TO_TRITON = {"nchw": pb.ModelInput.FORMAT_NCHW, "nhwc": pb.ModelInput.FORMAT_NHWC}
KIND_TO_TRITON = {
    "auto": pb.ModelInstanceGroup.KIND_AUTO,
    "gpu": pb.ModelInstanceGroup.KIND_GPU,
    "cpu": pb.ModelInstanceGroup.KIND_CPU,
    "model": pb.ModelInstanceGroup.KIND_MODEL,
}
TIMEOUT_ACTION_TO_TRITON = {
    "reject": pb.ModelQueuePolicy.REJECT,
    "delay": pb.ModelQueuePolicy.DELAY,
}
PRIORITY_TO_TRITON = {
    "default": pb.ModelOptimizationPolicy.PRIORITY_DEFAULT,
    "max": pb.ModelOptimizationPolicy.PRIORITY_MAX,
    "min": pb.ModelOptimizationPolicy.PRIORITY_MIN,
}
# An ensemble is a platform in Triton, not a backend.
PLATFORM_ONLY_BACKENDS = {"ensemble"}


def render_model_config(spec: ModelSpec) -> pb.ModelConfig:
    """The ModelConfig message that `spec` describes (fields not set in the spec stay unset)."""
    config = pb.ModelConfig(name=spec.name, max_batch_size=spec.max_batch_size)
    if spec.backend in PLATFORM_ONLY_BACKENDS:
        config.platform = spec.backend
    elif spec.backend is not None:
        config.backend = spec.backend
    if spec.platform is not None:
        config.platform = spec.platform
    for tensor in spec.inputs:
        _render_input(tensor, config.input.add())
    for output in spec.outputs:
        _render_output(output, config.output.add())
    if spec.dynamic_batching is not None:
        _render_dynamic_batching(spec.dynamic_batching, config.dynamic_batching)
    for group in spec.instance_groups:
        target = config.instance_group.add(
            kind=KIND_TO_TRITON[group.kind],
            gpus=group.gpus,
            profile=group.profiles,
            passive=group.passive,
        )
        if group.count is not None:
            target.count = group.count
        if group.name is not None:
            target.name = group.name
        if group.host_policy is not None:
            target.host_policy = group.host_policy
    if spec.version_policy is not None:
        policy = spec.version_policy
        if policy.latest is not None:
            config.version_policy.latest.num_versions = policy.latest
        elif policy.all:
            config.version_policy.all.SetInParent()
        elif policy.specific is not None:
            config.version_policy.specific.versions.extend(policy.specific)
    for sample in spec.warmup:
        _render_warmup(sample, config.model_warmup.add())
    if spec.optimization is not None:
        _render_optimization(spec.optimization, config.optimization)
    if spec.response_cache is not None:
        config.response_cache.enable = spec.response_cache
    if spec.decoupled is not None:
        config.model_transaction_policy.decoupled = spec.decoupled
    if spec.default_model_filename is not None:
        config.default_model_filename = spec.default_model_filename
    for key, value in spec.parameters.items():
        config.parameters[key].string_value = value
    if spec.ensemble_steps:
        for step in spec.ensemble_steps:
            config.ensemble_scheduling.step.add(
                model_name=step.model,
                model_version=step.version,
                input_map=step.inputs,
                output_map=step.outputs,
            )
    return config


def _render_tensor(tensor: InputSpec | OutputSpec, target: pb.ModelInput | pb.ModelOutput) -> None:
    """Fields inputs and outputs share."""
    target.name = tensor.name
    target.data_type = DTYPE_TO_TRITON[tensor.dtype]
    target.dims.extend(tensor.shape)
    if tensor.reshape is not None:
        target.reshape.shape.extend(tensor.reshape)
        target.reshape.SetInParent()  # keeps `reshape: []` (a scalar) distinct from no reshape
    target.is_shape_tensor = tensor.shape_tensor
    target.is_non_linear_format_io = tensor.non_linear_format_io


def _render_input(tensor: InputSpec, target: pb.ModelInput) -> None:
    _render_tensor(tensor, target)
    if tensor.format is not None:
        target.format = FORMAT_TO_TRITON[tensor.format]
    target.optional = tensor.optional
    target.allow_ragged_batch = tensor.ragged_batch


def _render_output(tensor: OutputSpec, target: pb.ModelOutput) -> None:
    _render_tensor(tensor, target)
    if tensor.label_file is not None:
        target.label_filename = tensor.label_file


def _render_queue_policy(policy: QueuePolicy, target: pb.ModelQueuePolicy) -> None:
    target.SetInParent()
    target.max_queue_size = policy.max_queue_size
    target.default_timeout_microseconds = policy.timeout_us
    target.timeout_action = TIMEOUT_ACTION_TO_TRITON[policy.timeout_action]
    target.allow_timeout_override = policy.allow_timeout_override


def _render_dynamic_batching(batching: DynamicBatching, target: pb.ModelDynamicBatching) -> None:
    target.SetInParent()  # `dynamic_batching {}` alone turns batching on
    target.max_queue_delay_microseconds = batching.max_queue_delay_us
    target.preferred_batch_size.extend(batching.preferred_batch_sizes)
    target.preserve_ordering = batching.preserve_ordering
    target.priority_levels = batching.priority_levels
    target.default_priority_level = batching.default_priority_level
    if batching.default_queue_policy is not None:
        _render_queue_policy(batching.default_queue_policy, target.default_queue_policy)
    for level, policy in sorted(batching.priority_queue_policies.items()):
        _render_queue_policy(policy, target.priority_queue_policy[level])


def _render_warmup(sample: Warmup, target: pb.ModelWarmup) -> None:
    target.name = sample.name
    target.batch_size = sample.batch_size
    target.count = sample.count
    for name, data in sample.inputs.items():
        warmup_input = target.inputs[name]
        warmup_input.data_type = DTYPE_TO_TRITON[data.dtype]
        warmup_input.dims.extend(data.shape)
        if data.data == "zero":
            warmup_input.zero_data = True
        elif data.data == "random":
            warmup_input.random_data = True
        elif data.data_file is not None:
            warmup_input.input_data_file = data.data_file


def _render_accelerators(
    accelerators: list[Accelerator],
    target: RepeatedCompositeFieldContainer[
        pb.ModelOptimizationPolicy.ExecutionAccelerators.Accelerator
    ],
) -> None:
    for accelerator in accelerators:
        target.add(name=accelerator.name, parameters=accelerator.parameters)


def _render_optimization(optimization: Optimization, target: pb.ModelOptimizationPolicy) -> None:
    target.SetInParent()
    if optimization.graph_level is not None:
        target.graph.level = optimization.graph_level
        target.graph.SetInParent()
    target.priority = PRIORITY_TO_TRITON[optimization.priority]
    if optimization.cuda is not None:
        target.cuda.SetInParent()
        target.cuda.graphs = optimization.cuda.graphs
        target.cuda.busy_wait_events = optimization.cuda.busy_wait_events
        target.cuda.output_copy_stream = optimization.cuda.output_copy_stream
    if optimization.accelerators is not None:
        target.execution_accelerators.SetInParent()
        _render_accelerators(
            optimization.accelerators.gpu,
            target.execution_accelerators.gpu_execution_accelerator,
        )
        _render_accelerators(
            optimization.accelerators.cpu,
            target.execution_accelerators.cpu_execution_accelerator,
        )
    if optimization.input_pinned_memory is not None:
        target.input_pinned_memory.enable = optimization.input_pinned_memory
    if optimization.output_pinned_memory is not None:
        target.output_pinned_memory.enable = optimization.output_pinned_memory
    target.gather_kernel_buffer_threshold = optimization.gather_kernel_buffer_threshold
    target.eager_batching = optimization.eager_batching


def config_to_text(config: pb.ModelConfig) -> str:
    """Triton's text format for `config`: stable field order, so same message, same bytes."""
    return str(text_format.MessageToString(config))


def render_config_pbtxt(spec: ModelSpec, source_name: str, spec_hash: str) -> str:
    """The full `config.pbtxt`: a header naming the spec and its hash, then the config."""
    header = (
        f"# Generated by gpufleet from {source_name} (spec sha256 {spec_hash}).\n"
        "# Do not edit: change the spec, then run `gpufleet generate`.\n"
    )
    return header + config_to_text(render_model_config(spec))
