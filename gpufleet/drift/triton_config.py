"""Compare a model's live Triton config with its generated `config.pbtxt`, without false drift
from the defaults Triton fills in, and without hiding a default someone changed by hand.

Both sides go through Triton's own `ModelConfig` protobuf (proto3: a field at its zero value is
absent on both sides). Triton then fills some fields the generated config leaves unset
(`version_policy`, instance group names, pinned memory, `default_model_filename`, ...). Rather
than ignoring every field the spec leaves unset (what hides a hand-changed default, argo-cd#8767),
`triton_filled` applies Triton's fill rules to the generated config: the result is what a clean
Triton reports for it. Every field where the live config differs from that is drift, including
one the spec leaves to Triton's default and someone changed (`input_pinned_memory` turned off,
`version_policy` widened). Only what depends on the machine (the GPUs of a KIND_GPU group, the
kind Triton picks for a group without one) is taken from the live side.

    differences = config_differences(generated_text, live_config, model="tabular_mlp")
    # [("optimization.input_pinned_memory.enable", "true", "(unset)"), ...]
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

ModelConfig = model_config_pb2.ModelConfig
UNSET = "(unset)"

# What Triton 2.x names a backend's model file when the config names none.
DEFAULT_MODEL_FILENAMES = {
    "python": "model.py",
    "onnxruntime": "model.onnx",
    "pytorch": "model.pt",
    "tensorrt": "model.plan",
    "openvino": "model.xml",
}
# The platform Triton fills for a backend that has one.
BACKEND_PLATFORMS = {
    "onnxruntime": "onnxruntime_onnx",
    "pytorch": "pytorch_libtorch",
    "tensorrt": "tensorrt_plan",
}
# ...and the backend it fills for a platform.
PLATFORM_BACKENDS = {platform: backend for backend, platform in BACKEND_PLATFORMS.items()}


class ConfigParseError(ValueError):
    """A config could not be read as Triton's ModelConfig."""


def parse_generated(text: str) -> Any:
    """The generated `config.pbtxt` text as a ModelConfig message."""
    config = ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise ConfigParseError(f"not a Triton model config: {error}") from None
    return config


def parse_live(config: Any) -> Any:
    """Triton's live config (a ModelConfig, or the JSON of `GET v2/models/<m>/config`)."""
    if isinstance(config, ModelConfig):
        return config
    message = ModelConfig()
    try:
        json_format.ParseDict(config, message, ignore_unknown_fields=True)
    except json_format.ParseError as error:
        raise ConfigParseError(f"Triton's config is not a ModelConfig: {error}") from None
    return message


def triton_filled(generated: Any, live: Any) -> Any:
    """What a clean Triton reports for `generated`: its fill rules applied. Machine-dependent
    choices (a group's GPUs, the kind of a group that names none) are taken from `live`."""
    filled = ModelConfig()
    filled.CopyFrom(generated)
    backend = filled.backend or PLATFORM_BACKENDS.get(filled.platform, "")
    if not filled.backend and backend:
        filled.backend = backend
    if not filled.platform and backend in BACKEND_PLATFORMS:
        filled.platform = BACKEND_PLATFORMS[backend]
    if not filled.default_model_filename and backend in DEFAULT_MODEL_FILENAMES:
        filled.default_model_filename = DEFAULT_MODEL_FILENAMES[backend]
    if not filled.HasField("version_policy"):
        filled.version_policy.latest.num_versions = 1
    optimization = filled.optimization
    if not optimization.HasField("input_pinned_memory"):
        optimization.input_pinned_memory.enable = True
    if not optimization.HasField("output_pinned_memory"):
        optimization.output_pinned_memory.enable = True
    if not filled.instance_group:
        # Triton adds one group of count 1; which kind and GPUs depends on the machine.
        group = filled.instance_group.add()
        group.count = 1
        if live.instance_group:
            group.name = live.instance_group[0].name
    for index, group in enumerate(filled.instance_group):
        live_group = live.instance_group[index] if index < len(live.instance_group) else None
        if not group.name:
            group.name = f"{filled.name}_{index}"
        if group.count == 0:
            group.count = 1
        if live_group is None:
            continue
        if group.kind == model_config_pb2.ModelInstanceGroup.KIND_AUTO:
            group.kind = live_group.kind
        if group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU and not group.gpus:
            group.gpus.extend(live_group.gpus)
    return filled


def flatten(config: Any) -> dict[str, str]:
    """`config` as `path: value` pairs (proto field names; repeated messages keyed by name)."""
    document = json_format.MessageToDict(
        config, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    lines: dict[str, str] = {}
    _flatten(document, "", lines)
    return lines


def _flatten(value: Any, path: str, lines: dict[str, str]) -> None:
    if isinstance(value, dict) and value:
        for key in sorted(value):
            _flatten(value[key], f"{path}.{key}" if path else key, lines)
    elif isinstance(value, list) and value and all(isinstance(entry, dict) for entry in value):
        for index, entry in enumerate(value):
            label = entry.get("name") or str(index)
            _flatten(entry, f"{path}[{label}]", lines)
    else:
        lines[path] = json.dumps(value, sort_keys=True)


def config_differences(generated_text: str, live_config: Any) -> list[tuple[str, str, str]]:
    """(field path, expected, found) for each field where the live config differs from what
    Triton reports for the generated config; empty when they agree."""
    live = parse_live(live_config)
    expected = flatten(triton_filled(parse_generated(generated_text), live))
    found = flatten(live)
    return [
        (path, expected.get(path, UNSET), found.get(path, UNSET))
        for path in sorted(expected.keys() | found.keys())
        if expected.get(path) != found.get(path)
    ]


def generated_config_json(text: str) -> str:
    """The generated config as the JSON Triton's load API takes as a config override."""
    return json_format.MessageToJson(parse_generated(text), preserving_proto_field_name=True)
