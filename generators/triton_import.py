"""Import an existing Triton `config.pbtxt` as a ModelSpec: the inverse of `triton_config`.

Bringing a model that is already served by Triton under gpufleet starts from its hand-written
`config.pbtxt`. This module parses it with Triton's own protobuf schema (`model_config_pb2` from
tritonclient), turns it into a ModelSpec and writes that spec as minimal YAML for
`modelconfigs/<name>.yaml`.

The law: for every config it accepts, `render_model_config(import_model_config(c)) == c`
(protobuf equality), so the generated `config.pbtxt` serves the same model. A config that uses
anything the spec cannot express is refused with `UnsupportedConfigError`, which lists the exact
protobuf field paths; unsupported fields are found by walking the message against an explicit
set of supported paths, so a field added to Triton's schema later is refused, never dropped.
A config the spec's own rules refuse (say a preferred batch size above `max_batch_size`) raises
`InvalidImportError`.

    spec = import_config_file(Path("models/resnet50/config.pbtxt"))
    Path("modelconfigs/resnet50.yaml").write_text(spec_to_yaml(spec))

    config = parse_config_pbtxt(text, origin="resnet50/config.pbtxt")
    spec = import_model_config(config, origin="resnet50/config.pbtxt")
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, get_args

import yaml
from google.protobuf import text_format
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet
from pydantic import ValidationError
from tritonclient.grpc import model_config_pb2 as pb

from generators.triton_config import (
    DTYPE_TO_TRITON,
    FORMAT_TO_TRITON,
    KIND_TO_TRITON,
    PLATFORM_ONLY_BACKENDS,
    PRIORITY_TO_TRITON,
    TIMEOUT_ACTION_TO_TRITON,
    render_model_config,
)
from gpufleet.spec.model import Backend, ModelSpec, Platform
from gpufleet.spec.model_checks import check_model_spec
from gpufleet.spec.problems import FieldPath, format_field_path
from gpufleet.spec.yaml_source import SpecDumper

__all__ = [
    "SUPPORTED_FIELD_PATHS",
    "InvalidImportError",
    "UnsupportedConfigError",
    "config_differences",
    "import_config_file",
    "import_model_config",
    "parse_config_pbtxt",
    "spec_to_yaml",
]

DEFAULT_SCHEMA_REF = "../schemas/modelspec.schema.json"

# Every ModelConfig field the spec expresses, as a path pattern: `[]` stands for any element of
# a repeated field, `{}` for any value of a map. A present field whose pattern is not listed
# here is refused; the walk does not descend into it.
_QUEUE_POLICY_FIELDS = (
    "timeout_action",
    "default_timeout_microseconds",
    "allow_timeout_override",
    "max_queue_size",
)
_ACCELERATOR_FIELDS = ("name", "parameters")
SUPPORTED_FIELD_PATHS: frozenset[str] = frozenset(
    {
        "name",
        "platform",
        "backend",
        "max_batch_size",
        "version_policy",
        "version_policy.latest",
        "version_policy.latest.num_versions",
        "version_policy.all",
        "version_policy.specific",
        "version_policy.specific.versions",
        "input",
        *(
            f"input[].{name}"
            for name in (
                "name",
                "data_type",
                "format",
                "dims",
                "reshape",
                "reshape.shape",
                "is_shape_tensor",
                "allow_ragged_batch",
                "optional",
                "is_non_linear_format_io",
            )
        ),
        "output",
        *(
            f"output[].{name}"
            for name in (
                "name",
                "data_type",
                "dims",
                "reshape",
                "reshape.shape",
                "label_filename",
                "is_shape_tensor",
                "is_non_linear_format_io",
            )
        ),
        "dynamic_batching",
        "dynamic_batching.preferred_batch_size",
        "dynamic_batching.max_queue_delay_microseconds",
        "dynamic_batching.preserve_ordering",
        "dynamic_batching.priority_levels",
        "dynamic_batching.default_priority_level",
        "dynamic_batching.default_queue_policy",
        *(f"dynamic_batching.default_queue_policy.{name}" for name in _QUEUE_POLICY_FIELDS),
        "dynamic_batching.priority_queue_policy",
        *(f"dynamic_batching.priority_queue_policy{{}}.{name}" for name in _QUEUE_POLICY_FIELDS),
        "instance_group",
        *(
            f"instance_group[].{name}"
            for name in ("name", "kind", "count", "gpus", "profile", "passive", "host_policy")
        ),
        "model_warmup",
        "model_warmup[].name",
        "model_warmup[].batch_size",
        "model_warmup[].count",
        "model_warmup[].inputs",
        *(
            f"model_warmup[].inputs{{}}.{name}"
            for name in ("data_type", "dims", "zero_data", "random_data", "input_data_file")
        ),
        "optimization",
        "optimization.graph",
        "optimization.graph.level",
        "optimization.priority",
        "optimization.cuda",
        "optimization.cuda.graphs",
        "optimization.cuda.busy_wait_events",
        "optimization.cuda.output_copy_stream",
        "optimization.execution_accelerators",
        "optimization.execution_accelerators.gpu_execution_accelerator",
        *(
            f"optimization.execution_accelerators.gpu_execution_accelerator[].{name}"
            for name in _ACCELERATOR_FIELDS
        ),
        "optimization.execution_accelerators.cpu_execution_accelerator",
        *(
            f"optimization.execution_accelerators.cpu_execution_accelerator[].{name}"
            for name in _ACCELERATOR_FIELDS
        ),
        "optimization.input_pinned_memory",
        "optimization.input_pinned_memory.enable",
        "optimization.output_pinned_memory",
        "optimization.output_pinned_memory.enable",
        "optimization.gather_kernel_buffer_threshold",
        "optimization.eager_batching",
        "response_cache",
        "response_cache.enable",
        "model_transaction_policy",
        "model_transaction_policy.decoupled",
        "default_model_filename",
        "parameters",
        "parameters{}.string_value",
        "ensemble_scheduling",
        "ensemble_scheduling.step",
        *(
            f"ensemble_scheduling.step[].{name}"
            for name in ("model_name", "model_version", "input_map", "output_map")
        ),
    }
)

_DTYPE_FROM_TRITON = {value: name for name, value in DTYPE_TO_TRITON.items()}
_FORMAT_FROM_TRITON = {value: name for name, value in FORMAT_TO_TRITON.items()}
_KIND_FROM_TRITON = {value: name for name, value in KIND_TO_TRITON.items()}
_TIMEOUT_ACTION_FROM_TRITON = {value: name for name, value in TIMEOUT_ACTION_TO_TRITON.items()}
_PRIORITY_FROM_TRITON = {value: name for name, value in PRIORITY_TO_TRITON.items()}
# A backend string must be one the spec keeps as written: the spec lowercases and resolves
# aliases, and renders `backend: ensemble` as a platform, so those would come back changed.
_BACKENDS = frozenset(get_args(Backend)) - PLATFORM_ONLY_BACKENDS
_PLATFORMS = frozenset(get_args(Platform))

# Values of supported fields that the spec still cannot express.
_VALUE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "backend": _BACKENDS.__contains__,
    "platform": _PLATFORMS.__contains__,
    "input[].data_type": _DTYPE_FROM_TRITON.__contains__,
    "input[].format": _FORMAT_FROM_TRITON.__contains__,
    "output[].data_type": _DTYPE_FROM_TRITON.__contains__,
    "dynamic_batching.default_queue_policy.timeout_action": (
        _TIMEOUT_ACTION_FROM_TRITON.__contains__
    ),
    "dynamic_batching.priority_queue_policy{}.timeout_action": (
        _TIMEOUT_ACTION_FROM_TRITON.__contains__
    ),
    "instance_group[].kind": _KIND_FROM_TRITON.__contains__,
    "model_warmup[].inputs{}.data_type": _DTYPE_FROM_TRITON.__contains__,
    # `zero_data: false` selects the oneof yet asks for nothing; the spec has no such state.
    "model_warmup[].inputs{}.zero_data": lambda value: value is True,
    "model_warmup[].inputs{}.random_data": lambda value: value is True,
    "optimization.priority": _PRIORITY_FROM_TRITON.__contains__,
}
# Present messages the spec cannot express as they are.
_MESSAGE_CHECKS: dict[str, Callable[[Any], bool]] = {
    # `version_policy {}` with no choice: the spec's version_policy names exactly one.
    "version_policy": lambda policy: policy.WhichOneof("policy_choice") is not None,
    # The spec renders ensemble_scheduling only from its steps.
    "ensemble_scheduling": lambda scheduling: len(scheduling.step) > 0,
    "model_warmup[].inputs{}": lambda data: data.WhichOneof("input_data_type") is not None,
}

_REFUSAL_ADVICE = (
    "Edit these fields out of the config by hand (and carry what they did some other way), "
    "or extend ModelSpec and generators/triton_config.py to express them; then import again."
)


class UnsupportedConfigError(ValueError):
    """The config uses fields the spec cannot express; `field_paths` lists them (protobuf paths).

    Nothing is imported: dropping them would change what Triton serves. `regenerated` is True
    when the final check (render the imported spec, compare with the config) found them.
    """

    def __init__(self, origin: str, field_paths: Sequence[str], *, regenerated: bool = False):
        self.origin = origin
        self.field_paths = list(field_paths)
        self.regenerated = regenerated
        listed = "\n".join(f"  {path}" for path in self.field_paths)
        if regenerated:
            head = (
                f"{origin}: the spec imported from this config regenerates a different config; "
                "the spec cannot express these fields as written:"
            )
        else:
            head = f"{origin}: the model spec cannot express these fields of the Triton config:"
        super().__init__(f"{head}\n{listed}\n{_REFUSAL_ADVICE}")


class InvalidImportError(ValueError):
    """The config is expressible but breaks the spec's rules; `reasons` says how, one per line."""

    def __init__(self, origin: str, reasons: Sequence[str]):
        self.origin = origin
        self.reasons = list(reasons)
        listed = "\n".join(f"  {reason}" for reason in self.reasons)
        super().__init__(
            f"{origin}: this Triton config does not make a valid model spec:\n{listed}\n"
            "Fix these in the config (or in the spec rules if they are wrong), then import again."
        )


def parse_config_pbtxt(text: str, origin: str) -> pb.ModelConfig:
    """Parse `config.pbtxt` text; a syntax or schema error names `origin:line:col` and why."""
    try:
        return text_format.Parse(text, pb.ModelConfig())
    except text_format.ParseError as error:
        line, column = error.GetLine(), error.GetColumn()
        reason = str(error)
        if line is None:
            raise ValueError(f"{origin}: {reason}") from error
        prefix = f"{line}:{column} : "
        reason = reason.removeprefix(prefix)
        raise ValueError(f"{origin}:{line}:{column}: {reason}") from error


def import_config_file(path: Path) -> ModelSpec:
    """Read, parse and import one `config.pbtxt` (errors name the file)."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}); "
            "Triton reads config.pbtxt as UTF-8, so re-save the file as UTF-8"
        ) from error
    origin = str(path)
    config = parse_config_pbtxt(text, origin)
    if not config.name:
        # Triton names a model after its directory when the config does not.
        config.name = path.resolve().parent.name
    return import_model_config(config, origin=origin)


def import_model_config(config: pb.ModelConfig, *, origin: str = "ModelConfig") -> ModelSpec:
    """The ModelSpec that renders back to exactly `config`.

    Raises `UnsupportedConfigError` when the spec cannot express part of `config`, and
    `InvalidImportError` when the resulting spec would break the spec's own rules.
    """
    refused: list[str] = []
    _find_unsupported(config, "", "", refused)
    if refused:
        raise UnsupportedConfigError(origin, refused)
    spec = _validated_spec(_spec_data(config), config, origin)
    rendered = render_model_config(spec)
    if rendered != config:  # safety net: the law must hold for whatever is returned
        raise UnsupportedConfigError(
            origin, config_differences(config, rendered) or ["(top level)"], regenerated=True
        )
    return spec


def config_differences(expected: Message, actual: Message) -> list[str]:
    """Field paths (`input[0].dims`, `parameters["k"]`) where two messages differ."""
    found: list[str] = []
    _differences(expected, actual, "", found)
    return found


class _YamlDumper(SpecDumper):
    """Block style, no anchors or aliases; strings that look like numbers quoted."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


class _FlowList(list[Any]):
    """A list of numbers, written on one line: `[3, 224, 224]`."""


def _represent_flow_list(dumper: yaml.SafeDumper, data: _FlowList) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)


_YamlDumper.add_representer(_FlowList, _represent_flow_list)


def spec_to_yaml(spec: ModelSpec, schema_ref: str | None = DEFAULT_SCHEMA_REF) -> str:
    """`spec` as a YAML document holding only its non-default values, in the spec's field order.

    `ModelSpec.model_validate(yaml.safe_load(text))` gives back an equal spec.
    """
    data = spec.model_dump(mode="json", exclude_defaults=True)
    batching = data.get("dynamic_batching")
    if isinstance(batching, dict) and "priority_queue_policies" in batching:
        # JSON mode writes the integer priority levels as strings; YAML can keep them integers.
        batching["priority_queue_policies"] = {
            int(level): policy for level, policy in batching["priority_queue_policies"].items()
        }
    body = yaml.dump(
        _flow_number_lists(data),
        Dumper=_YamlDumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=False,  # PyYAML writes U+0085 raw, which reads back as a line break
        width=100,
    )
    header = f"# yaml-language-server: $schema={schema_ref}\n" if schema_ref is not None else ""
    return header + body


def _flow_number_lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _flow_number_lists(item) for key, item in value.items()}
    if isinstance(value, list):
        if value and all(isinstance(item, int) and not isinstance(item, bool) for item in value):
            return _FlowList(value)
        return [_flow_number_lists(item) for item in value]
    return value


# --- finding what the spec cannot express ---------------------------------------------------


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _key_text(key: object) -> str:
    return f"[{json.dumps(key)}]" if isinstance(key, str) else f"[{key}]"


def _is_map(field: Any) -> bool:
    return field.message_type is not None and bool(field.message_type.GetOptions().map_entry)


def _map_holds_messages(field: Any) -> bool:
    return field.message_type.fields_by_name["value"].message_type is not None


def _find_unsupported(message: Message, pattern: str, path: str, found: list[str]) -> None:
    """Append the path of every present field of `message` that the spec cannot express."""
    message_check = _MESSAGE_CHECKS.get(pattern)
    if message_check is not None and not message_check(message):
        found.append(path)
    for field, value in message.ListFields():
        field_pattern, field_path = _join(pattern, field.name), _join(path, field.name)
        if field_pattern not in SUPPORTED_FIELD_PATHS:
            found.append(field_path)
            continue
        value_check = _VALUE_CHECKS.get(field_pattern)
        if value_check is not None and not value_check(value):
            found.append(field_path)
            continue
        if field.message_type is None:
            continue
        if _is_map(field):
            if _map_holds_messages(field):
                for key in sorted(value):
                    _find_unsupported(
                        value[key], field_pattern + "{}", field_path + _key_text(key), found
                    )
        elif isinstance(value, Message):
            _find_unsupported(value, field_pattern, field_path, found)
        else:
            for index, item in enumerate(value):
                _find_unsupported(item, field_pattern + "[]", f"{field_path}[{index}]", found)
    numbers = sorted({unknown.field_number for unknown in UnknownFieldSet(message)})  # type: ignore[attr-defined]  # types-protobuf lacks __iter__
    found.extend(_join(path, f"<unknown field {number}>") for number in numbers)


def _differences(expected: Message, actual: Message, path: str, found: list[str]) -> None:
    present = {field.name for field, _ in expected.ListFields()}
    present |= {field.name for field, _ in actual.ListFields()}
    for field in expected.DESCRIPTOR.fields:
        if field.name not in present:
            continue
        field_path = _join(path, field.name)
        left, right = getattr(expected, field.name), getattr(actual, field.name)
        if _is_map(field):
            for key in sorted(set(left) | set(right)):
                key_path = field_path + _key_text(key)
                if key not in left or key not in right:
                    found.append(key_path)
                elif _map_holds_messages(field):
                    _differences(left[key], right[key], key_path, found)
                elif left[key] != right[key]:
                    found.append(key_path)
        elif field.has_presence and expected.HasField(field.name) != actual.HasField(field.name):
            found.append(field_path)
        elif isinstance(left, Message):
            _differences(left, right, field_path, found)
        elif field.message_type is not None:  # repeated messages
            if len(left) != len(right):
                found.append(field_path)
            else:
                for index, (one, other) in enumerate(zip(left, right, strict=True)):
                    _differences(one, other, f"{field_path}[{index}]", found)
        elif isinstance(left, str | bytes | bool | int | float):
            if left != right:
                found.append(field_path)
        elif list(left) != list(right):  # repeated scalars
            found.append(field_path)
    if _unknown_fields(expected) != _unknown_fields(actual):
        found.append(_join(path, "<unknown fields>"))


def _unknown_fields(message: Message) -> list[tuple[int, int, Any]]:
    return [
        (unknown.field_number, unknown.wire_type, unknown.data)
        for unknown in UnknownFieldSet(message)  # type: ignore[attr-defined]  # as above
    ]


# --- building the spec ------------------------------------------------------------------------


def _spec_data(config: Any) -> dict[str, Any]:
    """The spec, as the dict ModelSpec validates, holding only values that are not defaults.

    Runs only on configs `_find_unsupported` passed, so every enum value maps back.
    """
    data: dict[str, Any] = {"name": config.name}
    if config.platform in PLATFORM_ONLY_BACKENDS and not config.backend:
        data["backend"] = config.platform
    else:
        if config.backend:
            data["backend"] = config.backend
        if config.platform:
            data["platform"] = config.platform
    if config.max_batch_size:
        data["max_batch_size"] = config.max_batch_size
    if config.input:
        data["inputs"] = [_input_data(tensor) for tensor in config.input]
    if config.output:
        data["outputs"] = [_output_data(tensor) for tensor in config.output]
    if config.HasField("dynamic_batching"):
        data["dynamic_batching"] = _dynamic_batching_data(config.dynamic_batching)
    if config.instance_group:
        data["instance_groups"] = [_instance_group_data(group) for group in config.instance_group]
    if config.HasField("version_policy"):
        data["version_policy"] = _version_policy_data(config.version_policy)
    if config.model_warmup:
        data["warmup"] = [_warmup_data(sample) for sample in config.model_warmup]
    if config.HasField("optimization"):
        data["optimization"] = _optimization_data(config.optimization)
    if config.HasField("response_cache"):
        data["response_cache"] = config.response_cache.enable
    if config.HasField("model_transaction_policy"):
        data["decoupled"] = config.model_transaction_policy.decoupled
    if config.default_model_filename:
        data["default_model_filename"] = config.default_model_filename
    if config.parameters:
        data["parameters"] = {
            key: config.parameters[key].string_value for key in sorted(config.parameters)
        }
    if config.HasField("ensemble_scheduling"):
        data["ensemble_steps"] = [_step_data(step) for step in config.ensemble_scheduling.step]
    return data


def _tensor_data(tensor: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"name": tensor.name, "shape": list(tensor.dims)}
    if tensor.data_type in _DTYPE_FROM_TRITON:  # when unset, the spec reports dtype missing
        data["dtype"] = _DTYPE_FROM_TRITON[tensor.data_type]
    if tensor.HasField("reshape"):
        data["reshape"] = list(tensor.reshape.shape)
    if tensor.is_shape_tensor:
        data["shape_tensor"] = True
    if tensor.is_non_linear_format_io:
        data["non_linear_format_io"] = True
    return data


def _input_data(tensor: Any) -> dict[str, Any]:
    data = _tensor_data(tensor)
    if tensor.format:
        data["format"] = _FORMAT_FROM_TRITON[tensor.format]
    if tensor.optional:
        data["optional"] = True
    if tensor.allow_ragged_batch:
        data["ragged_batch"] = True
    return data


def _output_data(tensor: Any) -> dict[str, Any]:
    data = _tensor_data(tensor)
    if tensor.label_filename:
        data["label_file"] = tensor.label_filename
    return data


def _queue_policy_data(policy: Any) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if policy.max_queue_size:
        data["max_queue_size"] = policy.max_queue_size
    if policy.default_timeout_microseconds:
        data["timeout_us"] = policy.default_timeout_microseconds
    if policy.timeout_action:
        data["timeout_action"] = _TIMEOUT_ACTION_FROM_TRITON[policy.timeout_action]
    if policy.allow_timeout_override:
        data["allow_timeout_override"] = True
    return data


def _dynamic_batching_data(batching: Any) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if batching.max_queue_delay_microseconds:
        data["max_queue_delay_us"] = batching.max_queue_delay_microseconds
    if batching.preferred_batch_size:
        data["preferred_batch_sizes"] = list(batching.preferred_batch_size)
    if batching.preserve_ordering:
        data["preserve_ordering"] = True
    if batching.priority_levels:
        data["priority_levels"] = batching.priority_levels
    if batching.default_priority_level:
        data["default_priority_level"] = batching.default_priority_level
    if batching.HasField("default_queue_policy"):
        data["default_queue_policy"] = _queue_policy_data(batching.default_queue_policy)
    if batching.priority_queue_policy:
        data["priority_queue_policies"] = {
            level: _queue_policy_data(batching.priority_queue_policy[level])
            for level in sorted(batching.priority_queue_policy)
        }
    return data


def _instance_group_data(group: Any) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if group.kind:
        data["kind"] = _KIND_FROM_TRITON[group.kind]
    if group.count:
        data["count"] = group.count
    if group.gpus:
        data["gpus"] = list(group.gpus)
    if group.name:
        data["name"] = group.name
    if group.profile:
        data["profiles"] = list(group.profile)
    if group.passive:
        data["passive"] = True
    if group.host_policy:
        data["host_policy"] = group.host_policy
    return data


def _version_policy_data(policy: Any) -> dict[str, Any]:
    choice = policy.WhichOneof("policy_choice")
    if choice == "latest":
        return {"latest": policy.latest.num_versions}
    if choice == "all":
        return {"all": True}
    return {"specific": list(policy.specific.versions)}


def _warmup_data(sample: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"name": sample.name}
    if sample.batch_size:
        data["batch_size"] = sample.batch_size
    if sample.count:
        data["count"] = sample.count
    inputs: dict[str, Any] = {}
    for name in sorted(sample.inputs):
        source = sample.inputs[name]
        item: dict[str, Any] = {"shape": list(source.dims)}
        if source.data_type in _DTYPE_FROM_TRITON:
            item["dtype"] = _DTYPE_FROM_TRITON[source.data_type]
        choice = source.WhichOneof("input_data_type")
        if choice == "zero_data":
            item["data"] = "zero"
        elif choice == "random_data":
            item["data"] = "random"
        elif choice == "input_data_file":
            item["data_file"] = source.input_data_file
        inputs[name] = item
    if inputs:
        data["inputs"] = inputs
    return data


def _accelerator_data(accelerator: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"name": accelerator.name}
    if accelerator.parameters:
        data["parameters"] = {key: accelerator.parameters[key] for key in accelerator.parameters}
    return data


def _optimization_data(optimization: Any) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if optimization.HasField("graph"):
        data["graph_level"] = optimization.graph.level
    if optimization.priority:
        data["priority"] = _PRIORITY_FROM_TRITON[optimization.priority]
    if optimization.HasField("cuda"):
        cuda = optimization.cuda
        names = ("graphs", "busy_wait_events", "output_copy_stream")
        data["cuda"] = {name: True for name in names if getattr(cuda, name)}
    if optimization.HasField("execution_accelerators"):
        accelerators = optimization.execution_accelerators
        data["accelerators"] = {
            side: [_accelerator_data(item) for item in items]
            for side, items in (
                ("gpu", accelerators.gpu_execution_accelerator),
                ("cpu", accelerators.cpu_execution_accelerator),
            )
            if items
        }
    for side in ("input_pinned_memory", "output_pinned_memory"):
        if optimization.HasField(side):
            data[side] = getattr(optimization, side).enable
    if optimization.gather_kernel_buffer_threshold:
        data["gather_kernel_buffer_threshold"] = optimization.gather_kernel_buffer_threshold
    if optimization.eager_batching:
        data["eager_batching"] = True
    return data


def _step_data(step: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"model": step.model_name}
    if step.model_version != -1:
        data["version"] = step.model_version
    data["inputs"] = {key: step.input_map[key] for key in step.input_map}
    data["outputs"] = {key: step.output_map[key] for key in step.output_map}
    return data


# --- spec validation, reported in the config's own terms ------------------------------------

_Node = dict[str, tuple[str, "_Child | None"]]
_Child = tuple[str, "_Node | None"]  # ("obj" | "list" | "map", fields of the elements)

_QUEUE_POLICY_NODE: _Node = {
    "max_queue_size": ("max_queue_size", None),
    "timeout_us": ("default_timeout_microseconds", None),
    "timeout_action": ("timeout_action", None),
    "allow_timeout_override": ("allow_timeout_override", None),
}
_TENSOR_NODE: _Node = {
    "name": ("name", None),
    "dtype": ("data_type", None),
    "shape": ("dims", ("list", None)),
    "reshape": ("reshape.shape", ("list", None)),
    "format": ("format", None),
    "optional": ("optional", None),
    "shape_tensor": ("is_shape_tensor", None),
    "ragged_batch": ("allow_ragged_batch", None),
    "non_linear_format_io": ("is_non_linear_format_io", None),
    "label_file": ("label_filename", None),
}
_ACCELERATOR_NODE: _Node = {"name": ("name", None), "parameters": ("parameters", ("map", None))}
_SPEC_TO_CONFIG: _Node = {
    "name": ("name", None),
    "backend": ("backend", None),
    "platform": ("platform", None),
    "max_batch_size": ("max_batch_size", None),
    "inputs": ("input", ("list", _TENSOR_NODE)),
    "outputs": ("output", ("list", _TENSOR_NODE)),
    "dynamic_batching": (
        "dynamic_batching",
        (
            "obj",
            {
                "max_queue_delay_us": ("max_queue_delay_microseconds", None),
                "preferred_batch_sizes": ("preferred_batch_size", ("list", None)),
                "preserve_ordering": ("preserve_ordering", None),
                "priority_levels": ("priority_levels", None),
                "default_priority_level": ("default_priority_level", None),
                "default_queue_policy": ("default_queue_policy", ("obj", _QUEUE_POLICY_NODE)),
                "priority_queue_policies": (
                    "priority_queue_policy",
                    ("map", _QUEUE_POLICY_NODE),
                ),
            },
        ),
    ),
    "instance_groups": (
        "instance_group",
        (
            "list",
            {
                "kind": ("kind", None),
                "count": ("count", None),
                "gpus": ("gpus", ("list", None)),
                "name": ("name", None),
                "profiles": ("profile", ("list", None)),
                "passive": ("passive", None),
                "host_policy": ("host_policy", None),
            },
        ),
    ),
    "version_policy": (
        "version_policy",
        (
            "obj",
            {
                "latest": ("latest.num_versions", None),
                "all": ("all", None),
                "specific": ("specific.versions", ("list", None)),
            },
        ),
    ),
    "warmup": (
        "model_warmup",
        (
            "list",
            {
                "name": ("name", None),
                "batch_size": ("batch_size", None),
                "count": ("count", None),
                "inputs": (
                    "inputs",
                    (
                        "map",
                        {
                            "dtype": ("data_type", None),
                            "shape": ("dims", ("list", None)),
                            "data_file": ("input_data_file", None),
                        },
                    ),
                ),
            },
        ),
    ),
    "optimization": (
        "optimization",
        (
            "obj",
            {
                "graph_level": ("graph.level", None),
                "priority": ("priority", None),
                "accelerators": (
                    "execution_accelerators",
                    (
                        "obj",
                        {
                            "gpu": ("gpu_execution_accelerator", ("list", _ACCELERATOR_NODE)),
                            "cpu": ("cpu_execution_accelerator", ("list", _ACCELERATOR_NODE)),
                        },
                    ),
                ),
                "input_pinned_memory": ("input_pinned_memory.enable", None),
                "output_pinned_memory": ("output_pinned_memory.enable", None),
                "gather_kernel_buffer_threshold": ("gather_kernel_buffer_threshold", None),
            },
        ),
    ),
    "response_cache": ("response_cache.enable", None),
    "decoupled": ("model_transaction_policy.decoupled", None),
    "default_model_filename": ("default_model_filename", None),
    "parameters": ("parameters", ("map", None)),
    "ensemble_steps": (
        "ensemble_scheduling.step",
        (
            "list",
            {
                "model": ("model_name", None),
                "version": ("model_version", None),
                "inputs": ("input_map", ("map", None)),
                "outputs": ("output_map", ("map", None)),
            },
        ),
    ),
}


def _config_path(spec_path: Iterable[str | int]) -> str | None:
    """The config field path of a spec field path, or None where there is no plain counterpart."""
    parts = [part for part in spec_path if part != "[key]"]
    node: _Node | None = _SPEC_TO_CONFIG
    text = ""
    index = 0
    while index < len(parts):
        part = parts[index]
        if node is None or not isinstance(part, str) or part not in node:
            return None
        fragment, child = node[part]
        text = _join(text, fragment)
        index += 1
        if child is None:
            node = None
            continue
        kind, node = child
        if kind in ("list", "map") and index < len(parts):
            text += _key_text(parts[index])
            index += 1
        elif kind in ("list", "map"):
            node = None
    return text or None


def _reason(spec_path: FieldPath, message: str) -> str:
    config_path = _config_path(spec_path)
    spec_text = format_field_path(spec_path)
    if config_path is None:
        return f"{spec_text} (spec field): {message}"
    if config_path == spec_text:
        return f"{config_path}: {message}"
    return f"{config_path}: {message} (spec field {spec_text})"


def _validated_spec(data: dict[str, Any], config: Any, origin: str) -> ModelSpec:
    context = {"defer_cross_field_checks": True}
    try:
        unchecked = ModelSpec.model_validate(data, context=context)
    except ValidationError as error:
        reasons = []
        for detail in error.errors():
            loc: FieldPath = tuple(part for part in detail["loc"] if part != "[key]")
            message = str(detail["msg"]).removeprefix("Value error, ")
            if loc == ("name",) and not config.name:
                message = (
                    "not set; Triton takes the model name from the directory, but a spec needs "
                    'it: add `name: "<directory name>"` to the config'
                )
            reasons.append(_reason(loc, message))
        raise InvalidImportError(origin, reasons) from error
    problems = check_model_spec(unchecked)
    if problems:
        raise InvalidImportError(origin, [_reason(p.path, p.message) for p in problems])
    try:
        return ModelSpec.model_validate(data)
    except ValueError as error:  # the checks above should have caught it; report it anyway
        raise InvalidImportError(origin, [str(error)]) from error
