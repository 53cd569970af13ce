"""Tests of generators/triton_import.py: importing Triton `config.pbtxt` files as ModelSpecs.

What is real: everything. Configs are parsed with tritonclient's own `model_config_pb2` schema,
imported, written as YAML, loaded back through `ModelSpec` and rendered again with
`generators.triton_config`; the law checked throughout is that the render equals the parsed
config (protobuf equality). Nothing is mocked. The hand-written configs under
`tests/data/import/` together set every field the importer supports (a test checks that), and
each is a config Triton 2.51 accepts: TensorRT-only flags (shape tensors, non-linear IO
formats) sit in the TensorRT fixture, a scalar reshape in a batching model, every warmup has a
batch size and data for each required input.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import model_config_pb2 as pb

from generators.triton_config import (
    DTYPE_TO_TRITON,
    FORMAT_TO_TRITON,
    KIND_TO_TRITON,
    PRIORITY_TO_TRITON,
    TIMEOUT_ACTION_TO_TRITON,
    render_model_config,
)
from generators.triton_import import (
    SUPPORTED_FIELD_PATHS,
    InvalidImportError,
    UnsupportedConfigError,
    config_differences,
    import_config_file,
    import_model_config,
    parse_config_pbtxt,
    spec_to_yaml,
)
from gpufleet.spec.loading import load_model_spec_file
from gpufleet.spec.model import (
    DynamicBatching,
    InputSpec,
    ModelSpec,
    Objectives,
    QueuePolicy,
)

DATA = Path(__file__).parent / "data" / "import"
CONFIG_FILES = sorted(DATA.glob("*.pbtxt"))
SCHEMA_LINE = "# yaml-language-server: $schema=../schemas/modelspec.schema.json"

# A small valid config the refusal tests add one unsupported thing to.
BASE = """
name: "base"
backend: "python"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""
ENSEMBLE_BASE = """
name: "pipeline"
platform: "ensemble"
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""
ENSEMBLE_STEP = """
    model_name: "inner"
    model_version: -1
    input_map { key: "in" value: "x" }
    output_map { key: "out" value: "y" }
"""
OTHER_STEP = ENSEMBLE_STEP.replace('"inner"', '"other"').replace('"y"', '"z"')


def parse(text: str, origin: str = "test.pbtxt") -> pb.ModelConfig:
    return parse_config_pbtxt(text, origin)


def yaml_round_trip(spec: ModelSpec) -> ModelSpec:
    """The spec as `gpufleet import` writes it, read back as every gpufleet command reads a spec
    file (YAML 1.2 scalars: `08` is a number there, text in PyYAML's YAML 1.1)."""
    with tempfile.TemporaryDirectory() as temp:
        path = Path(temp) / f"{spec.name}.yaml"
        path.write_text(spec_to_yaml(spec), encoding="utf-8")
        return load_model_spec_file(path).spec


def refusal(text: str) -> UnsupportedConfigError:
    with pytest.raises(UnsupportedConfigError) as caught:
        import_model_config(parse(text), origin="models/m/config.pbtxt")
    return caught.value


def is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def present_patterns(message: Message, pattern: str = "") -> Iterator[str]:
    """The supported-path pattern of every present field of `message`, recursively."""
    for field, value in message.ListFields():
        field_pattern = join(pattern, field.name)
        yield field_pattern
        if field.message_type is None:
            continue
        if is_map(field):
            if field.message_type.fields_by_name["value"].message_type is not None:
                for item in value.values():
                    yield from present_patterns(item, field_pattern + "{}")
        elif isinstance(value, Message):
            yield from present_patterns(value, field_pattern)
        else:
            for item in value:
                yield from present_patterns(item, field_pattern + "[]")


# --- the round-trip law on hand-written configs --------------------------------------------


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.stem for p in CONFIG_FILES])
def test_config_file_round_trips_through_spec_and_yaml(path: Path) -> None:
    original = parse(path.read_text(encoding="utf-8"), str(path))
    spec = import_config_file(path)
    text = spec_to_yaml(spec)
    reloaded = ModelSpec.model_validate(yaml.safe_load(text))
    assert reloaded == spec
    assert render_model_config(reloaded) == original
    assert text_format.MessageToString(render_model_config(reloaded)) == (
        text_format.MessageToString(original)
    )


def test_data_files_exercise_every_supported_field() -> None:
    configs = [parse(path.read_text(encoding="utf-8")) for path in CONFIG_FILES]
    used = {pattern for config in configs for pattern in present_patterns(config)}
    assert SUPPORTED_FIELD_PATHS - used == set()
    assert used - SUPPORTED_FIELD_PATHS == set()


def test_data_files_exercise_every_enum_value() -> None:
    configs = [parse(path.read_text(encoding="utf-8")) for path in CONFIG_FILES]
    tensors = [t for c in configs for t in (*c.input, *c.output)]
    assert {t.data_type for t in tensors} == set(DTYPE_TO_TRITON.values())
    assert {t.format for c in configs for t in c.input} >= set(FORMAT_TO_TRITON.values())
    kinds = {group.kind for c in configs for group in c.instance_group}
    assert kinds == set(KIND_TO_TRITON.values())
    policies = [
        policy
        for c in configs
        if c.HasField("dynamic_batching")
        for policy in (
            c.dynamic_batching.default_queue_policy,
            *c.dynamic_batching.priority_queue_policy.values(),
        )
    ]
    assert {p.timeout_action for p in policies} == set(TIMEOUT_ACTION_TO_TRITON.values())
    priorities = {c.optimization.priority for c in configs if c.HasField("optimization")}
    assert priorities == set(PRIORITY_TO_TRITON.values())
    warmup_choices = {
        data.WhichOneof("input_data_type")
        for c in configs
        for sample in c.model_warmup
        for data in sample.inputs.values()
    }
    assert warmup_choices == {"zero_data", "random_data", "input_data_file"}
    version_choices = {
        c.version_policy.WhichOneof("policy_choice")
        for c in configs
        if c.HasField("version_policy")
    }
    assert version_choices == {"latest", "all", "specific"}


def test_backend_and_platform_map_as_written() -> None:
    specs = {path.stem: import_config_file(path) for path in CONFIG_FILES}
    assert (specs["minimal_onnx"].backend, specs["minimal_onnx"].platform) == (
        None,
        "onnxruntime_onnx",
    )
    ranker = specs["priority_batching_onnx"]
    assert (ranker.backend, ranker.platform) == ("onnxruntime", "onnxruntime_onnx")
    assert (specs["vllm_real_style"].backend, specs["vllm_real_style"].platform) == ("vllm", None)
    ensemble = specs["ensemble_pipeline"]
    assert (ensemble.backend, ensemble.platform) == ("ensemble", None)
    assert [(step.model, step.version) for step in ensemble.ensemble_steps] == [
        ("preprocess", -1),
        ("resnet50_trt", 2),
    ]


def test_presence_is_kept_apart_from_defaults() -> None:
    spec = import_config_file(DATA / "libtorch_real_style.pbtxt")
    assert spec.dynamic_batching == DynamicBatching()
    assert spec.response_cache is False
    assert spec.optimization is not None
    assert spec.optimization.cuda is None
    assert spec.optimization.graph_level is None
    dtypes = import_config_file(DATA / "all_dtypes_python.pbtxt")
    assert dtypes.inputs[0].reshape == []  # `reshape: { shape: [ ] }`: a scalar
    assert dtypes.inputs[1].reshape is None
    assert dtypes.parameters["empty"] == ""
    assert import_config_file(DATA / "vllm_real_style.pbtxt").decoupled is False
    ranker = import_config_file(DATA / "priority_batching_onnx.pbtxt")
    assert ranker.dynamic_batching is not None
    assert ranker.dynamic_batching.priority_queue_policies[3] == QueuePolicy()


def test_minimal_config_gives_minimal_yaml() -> None:
    spec = import_config_file(DATA / "minimal_onnx.pbtxt")
    assert spec.model_fields_set == {"name", "platform", "max_batch_size"}
    assert spec_to_yaml(spec) == (
        f"{SCHEMA_LINE}\nname: densenet_onnx\nplatform: onnxruntime_onnx\nmax_batch_size: 8\n"
    )


def test_imported_specs_set_only_non_default_fields() -> None:
    for path in CONFIG_FILES:
        spec = import_config_file(path)
        for name in spec.model_fields_set:
            assert (
                getattr(spec, name)
                != ModelSpec.model_fields[name].get_default(call_default_factory=True)
                or name == "name"
            ), (path.name, name)


def test_unset_ensemble_step_version_is_refused() -> None:
    """proto3 reads an unset model_version as 0, a version Triton never has: it refuses it."""
    config = parse(
        ENSEMBLE_BASE + "ensemble_scheduling { step { model_name: 'inner' "
        "input_map { key: 'in' value: 'x' } output_map { key: 'out' value: 'y' } } }"
    )
    with pytest.raises(InvalidImportError) as caught:
        import_model_config(config)
    assert caught.value.reasons == [
        "ensemble_scheduling.step[0].model_version: Triton has no model version 0; use -1 "
        "(the latest) or a version number >= 1 (spec field ensemble_steps[0].version)"
    ]


def test_unset_warmup_batch_size_is_refused() -> None:
    """Triton silently skips a warmup sample of batch_size 0 (the unset value)."""
    config = parse(
        BASE + 'model_warmup [ { name: "w" inputs { key: "x" value { data_type: TYPE_FP32 '
        "dims: [ 4 ] zero_data: true } } } ]"
    )
    with pytest.raises(InvalidImportError) as caught:
        import_model_config(config)
    assert caught.value.reasons == [
        "model_warmup[0].batch_size: Field required (spec field warmup[0].batch_size)"
    ]


# --- YAML output ------------------------------------------------------------------------------


def test_yaml_is_block_style_with_flow_shapes_and_integer_priority_keys() -> None:
    text = spec_to_yaml(import_config_file(DATA / "priority_batching_onnx.pbtxt"))
    assert text.splitlines()[0] == SCHEMA_LINE
    assert "  shape: [128]\n" in text
    assert "  preferred_batch_sizes: [16, 64]\n" in text
    assert "  specific: [1, 3]\n" in text
    assert "    1:\n" in text
    assert "    3: {}\n" in text
    loaded = yaml.safe_load(text)
    assert set(loaded["dynamic_batching"]["priority_queue_policies"]) == {1, 3}
    assert "&" not in text
    assert "*" not in text


def test_yaml_keys_follow_spec_field_order() -> None:
    order = list(ModelSpec.model_fields)
    for path in CONFIG_FILES:
        keys = list(yaml.safe_load(spec_to_yaml(import_config_file(path))))
        assert keys == sorted(keys, key=order.index), path.name
    tensor = yaml.safe_load(spec_to_yaml(import_config_file(DATA / "all_dtypes_python.pbtxt")))
    field_order = list(InputSpec.model_fields)
    for item in tensor["inputs"]:
        assert list(item) == sorted(item, key=field_order.index)


def test_yaml_without_schema_line() -> None:
    spec = import_config_file(DATA / "minimal_onnx.pbtxt")
    text = spec_to_yaml(spec, schema_ref=None)
    assert text.startswith("name: densenet_onnx\n")
    assert spec_to_yaml(spec, schema_ref="https://example.invalid/s.json").startswith(
        "# yaml-language-server: $schema=https://example.invalid/s.json\n"
    )


def test_yaml_keeps_strings_that_look_like_other_yaml_types() -> None:
    config = parse(
        BASE
        + """
        parameters { key: "1" value { string_value: "2" } }
        parameters { key: "yes" value { string_value: "no" } }
        parameters { key: "08" value { string_value: "09" } }
        parameters { key: "null" value { string_value: "~" } }
        parameters { key: "x: y" value { string_value: "- [a]" } }
        parameters { key: "unicode" value { string_value: "naïve ✓" } }
        """
    )
    spec = import_model_config(config)
    assert yaml_round_trip(spec) == spec
    assert render_model_config(yaml_round_trip(spec)) == config


def test_yaml_round_trips_spec_fields_triton_has_no_place_for() -> None:
    spec = import_config_file(DATA / "resnet50_tensorrt.pbtxt").model_copy(
        update={
            "source": "models:/resnet50@champion",
            "objectives": Objectives(p99_latency_ms=12.5, concurrency=4),
            "gpu_families": ["a100", "h100"],
        }
    )
    assert yaml_round_trip(spec) == spec


# --- refusals ---------------------------------------------------------------------------------

REFUSALS = {
    "sequence_batching": (BASE + "sequence_batching { }", ["sequence_batching"]),
    "sequence_batching_settings": (
        BASE + "sequence_batching { max_sequence_idle_microseconds: 5000000 oldest { } }",
        ["sequence_batching"],
    ),
    "batch_input": (
        BASE + 'batch_input [ { kind: BATCH_ELEMENT_COUNT target_name: "n" data_type: '
        'TYPE_INT32 source_input: "x" } ]',
        ["batch_input"],
    ),
    "batch_output": (
        BASE + 'batch_output [ { target_name: "y" kind: BATCH_SCATTER_WITH_INPUT_SHAPE '
        'source_input: "x" } ]',
        ["batch_output"],
    ),
    "secondary_devices": (
        BASE + "instance_group [ { kind: KIND_GPU }, { kind: KIND_GPU secondary_devices "
        "[ { kind: KIND_NVDLA device_id: 0 } ] } ]",
        ["instance_group[1].secondary_devices"],
    ),
    "rate_limiter": (
        BASE + 'instance_group [ { kind: KIND_GPU rate_limiter { resources [ { name: "R1" '
        "count: 4 } ] priority: 2 } } ]",
        ["instance_group[0].rate_limiter"],
    ),
    "cuda_graph_spec": (
        BASE + "optimization { cuda { graphs: true graph_spec [ { batch_size: 4 } ] } }",
        ["optimization.cuda.graph_spec"],
    ),
    "model_operations": (
        BASE + 'model_operations { op_library_filename: "libcustom_ops.so" }',
        ["model_operations"],
    ),
    "model_repository_agents": (
        BASE + 'model_repository_agents { agents [ { name: "checksum" } ] }',
        ["model_repository_agents"],
    ),
    "model_metrics": (
        BASE + 'model_metrics { metric_control [ { metric_identifier { family: "nv_inference_'
        'request_duration" } histogram_options { buckets: [ 0.1, 1 ] } } ] }',
        ["model_metrics"],
    ),
    "metric_tags": (BASE + 'metric_tags { key: "team" value: "search" }', ["metric_tags"]),
    "cc_model_filenames": (
        BASE + 'cc_model_filenames { key: "8.0" value: "model_a100.plan" }',
        ["cc_model_filenames"],
    ),
    "runtime": (BASE + 'runtime: "model.py"', ["runtime"]),
    "max_inflight_requests": (
        ENSEMBLE_BASE
        + f"ensemble_scheduling {{ max_inflight_requests: 16 step [ {{ {ENSEMBLE_STEP} }} ] }}",
        ["ensemble_scheduling.max_inflight_requests"],
    ),
    "model_namespace": (
        ENSEMBLE_BASE
        + f"ensemble_scheduling {{ step [ {{ {ENSEMBLE_STEP} }}, {{ {OTHER_STEP} "
        + 'model_namespace: "ns" } ] }',
        ["ensemble_scheduling.step[1].model_namespace"],
    ),
    "empty_ensemble_scheduling": (
        ENSEMBLE_BASE + "ensemble_scheduling { }",
        ["ensemble_scheduling"],
    ),
    "warmup_without_data": (
        BASE + 'model_warmup [ { name: "w" inputs { key: "x" value { data_type: TYPE_FP32 '
        "dims: [ 4 ] } } } ]",
        ['model_warmup[0].inputs["x"]'],
    ),
    "warmup_zero_data_false": (
        BASE + 'model_warmup [ { name: "w" inputs { key: "x" value { data_type: TYPE_FP32 '
        "dims: [ 4 ] zero_data: false } } } ]",
        ['model_warmup[0].inputs["x"].zero_data'],
    ),
    "warmup_random_data_false": (
        BASE + 'model_warmup [ { name: "w" inputs { key: "x" value { data_type: TYPE_FP32 '
        "dims: [ 4 ] random_data: false } } } ]",
        ['model_warmup[0].inputs["x"].random_data'],
    ),
    "version_policy_without_choice": (BASE + "version_policy { }", ["version_policy"]),
    "backend_alias": (BASE.replace('"python"', '"libtorch"'), ["backend"]),
    "backend_case": (BASE.replace('"python"', '"Python"'), ["backend"]),
    "backend_custom": (BASE.replace('"python"', '"my_custom_backend"'), ["backend"]),
    "backend_ensemble": (BASE.replace('"python"', '"ensemble"'), ["backend"]),
    "platform_unknown": (
        BASE.replace('backend: "python"', 'platform: "tensorflow_keras"'),
        ["platform"],
    ),
    "unknown_priority_number": (BASE + "optimization { priority: 7 }", ["optimization.priority"]),
    "unknown_data_type_number": (
        BASE + 'input [ { name: "z" data_type: 42 dims: [ 1 ] } ]',
        ["input[1].data_type"],
    ),
    "unknown_kind_number": (BASE + "instance_group [ { kind: 9 } ]", ["instance_group[0].kind"]),
    "several_at_once": (
        BASE.replace('"python"', '"custom"')
        + 'runtime: "x.so" metric_tags { key: "a" value: "b" } '
        + "instance_group [ { kind: KIND_GPU }, { rate_limiter { priority: 1 } } ] "
        + "optimization { cuda { graph_spec [ { } ] } }",
        [  # in field-number order, as Triton prints a config
            "instance_group[1].rate_limiter",
            "metric_tags",
            "optimization.cuda.graph_spec",
            "backend",
            "runtime",
        ],
    ),
}


@pytest.mark.parametrize(("text", "expected"), REFUSALS.values(), ids=REFUSALS.keys())
def test_unsupported_fields_are_refused_with_their_paths(text: str, expected: list[str]) -> None:
    error = refusal(text)
    assert error.field_paths == expected
    assert not error.regenerated
    message = str(error)
    assert message.startswith("models/m/config.pbtxt: ")
    lines = message.splitlines()
    for path in expected:
        assert f"  {path}" in lines
    assert "by hand" in message
    assert "extend ModelSpec" in message


def test_refusal_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="runtime"):
        import_model_config(parse(BASE + 'runtime: "model.py"'))


def _sample_value(field: FieldDescriptor) -> Any:
    if field.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
        return True
    if field.cpp_type == FieldDescriptor.CPPTYPE_STRING:
        return b"x" if field.type == FieldDescriptor.TYPE_BYTES else "x"
    if field.cpp_type == FieldDescriptor.CPPTYPE_ENUM:
        return next(value.number for value in field.enum_type.values if value.number)
    if field.cpp_type in (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE):
        return 1.5
    return 1


Step = tuple[FieldDescriptor, str]  # a field and how it is entered: "obj", "list" or "map"


def _unsupported_fields() -> list[tuple[list[Step], FieldDescriptor, str]]:
    """Every field outside SUPPORTED_FIELD_PATHS whose parent is inside, from the descriptor."""
    found: list[tuple[list[Step], FieldDescriptor, str]] = []

    def visit(descriptor: Descriptor, pattern: str, steps: list[Step], path: str) -> None:
        for field in descriptor.fields:
            field_pattern, field_path = join(pattern, field.name), join(path, field.name)
            if field_pattern not in SUPPORTED_FIELD_PATHS:
                found.append((steps, field, field_path))
            elif is_map(field):
                value_type = field.message_type.fields_by_name["value"].message_type
                if value_type is not None:
                    step: Step = (field, "map")
                    visit(value_type, field_pattern + "{}", [*steps, step], field_path + '["k"]')
            elif field.message_type is not None and field.is_repeated:
                step = (field, "list")
                visit(field.message_type, field_pattern + "[]", [*steps, step], field_path + "[0]")
            elif field.message_type is not None:
                visit(field.message_type, field_pattern, [*steps, (field, "obj")], field_path)

    visit(pb.ModelConfig.DESCRIPTOR, "", [], "")
    return found


UNSUPPORTED_FIELDS = _unsupported_fields()


def test_unsupported_field_list_comes_from_the_schema() -> None:
    paths = {path for _, _, path in UNSUPPORTED_FIELDS}
    assert {
        "sequence_batching",
        "batch_input",
        "batch_output",
        "runtime",
        "model_operations",
        "model_repository_agents",
        "model_metrics",
        "metric_tags",
        "cc_model_filenames",
        "instance_group[0].rate_limiter",
        "instance_group[0].secondary_devices",
        "optimization.cuda.graph_spec",
        "ensemble_scheduling.max_inflight_requests",
        "ensemble_scheduling.step[0].model_namespace",
    } <= paths


def test_every_supported_path_names_a_real_field() -> None:
    real: set[str] = set()

    def visit(descriptor: Descriptor, pattern: str, depth: int) -> None:
        for field in descriptor.fields:
            field_pattern = join(pattern, field.name)
            real.add(field_pattern)
            if field.message_type is None or depth > 6:
                continue
            if is_map(field):
                value_type = field.message_type.fields_by_name["value"].message_type
                if value_type is not None:
                    visit(value_type, field_pattern + "{}", depth + 1)
            elif field.is_repeated:
                visit(field.message_type, field_pattern + "[]", depth + 1)
            else:
                visit(field.message_type, field_pattern, depth + 1)

    visit(pb.ModelConfig.DESCRIPTOR, "", 0)
    assert SUPPORTED_FIELD_PATHS - real == set()


@pytest.mark.parametrize(
    ("steps", "field", "expected"), UNSUPPORTED_FIELDS, ids=[p for _, _, p in UNSUPPORTED_FIELDS]
)
def test_every_unsupported_field_of_the_schema_is_refused(
    steps: list[Step], field: FieldDescriptor, expected: str
) -> None:
    """Generic: the walk refuses whatever is not on the supported list, nested ones included."""
    config = parse(ENSEMBLE_BASE + f"ensemble_scheduling {{ step [ {{ {ENSEMBLE_STEP} }} ] }}")
    message: Message = config
    for step_field, how in steps:
        container = getattr(message, step_field.name)
        if how == "obj":
            message = container
        elif how == "list":
            message = container[0] if len(container) else container.add()
        else:
            message = container["k"]
    target = getattr(message, field.name)
    if is_map(field):
        value_field = field.message_type.fields_by_name["value"]
        if value_field.message_type is None:
            target["k"] = _sample_value(value_field)
        else:
            target["k"].SetInParent()
    elif field.message_type is not None and field.is_repeated:
        target.add()
    elif field.message_type is not None:
        target.SetInParent()
    elif field.is_repeated:
        target.append(_sample_value(field))
    else:
        setattr(message, field.name, _sample_value(field))
    with pytest.raises(UnsupportedConfigError) as caught:
        import_model_config(config)
    assert caught.value.field_paths == [expected]


def _varint(number: int) -> bytes:
    encoded = bytearray()
    while True:
        byte, number = number & 0x7F, number >> 7
        encoded.append(byte | (0x80 if number else 0))
        if not number:
            return bytes(encoded)


def test_fields_from_a_newer_triton_schema_are_refused() -> None:
    """A field this tritonclient does not know (here number 999) is refused, never dropped."""
    config = parse(BASE + 'parameters { key: "k" value { string_value: "v" } }')
    newer_field = _varint(999 << 3) + _varint(1)  # field 999, varint 1
    newer = pb.ModelConfig.FromString(config.SerializeToString() + newer_field)
    with pytest.raises(UnsupportedConfigError) as caught:
        import_model_config(newer)
    assert caught.value.field_paths == ["<unknown field 999>"]

    parameter = pb.ModelParameter.FromString(
        pb.ModelParameter(string_value="v").SerializeToString() + _varint(2 << 3) + _varint(1)
    )
    nested = parse(BASE)
    nested.parameters["k"].CopyFrom(parameter)
    with pytest.raises(UnsupportedConfigError) as caught:
        import_model_config(nested)
    assert caught.value.field_paths == ['parameters["k"].<unknown field 2>']


def test_empty_model_parameter_is_an_empty_string() -> None:
    """proto3 cannot tell `value { }` from `string_value: ""`; both import as "" and round-trip."""
    config = parse(BASE + 'parameters { key: "k" value { } } parameters { key: "j" }')
    spec = import_model_config(config)
    assert spec.parameters == {"j": "", "k": ""}
    assert render_model_config(yaml_round_trip(spec)) == config


# --- configs the spec's rules refuse ----------------------------------------------------------


INVALID = {
    "preferred_above_max": (
        BASE + "dynamic_batching { preferred_batch_size: [ 4, 16 ] }",
        "dynamic_batching.preferred_batch_size[1]: preferred batch size 16 is above",
    ),
    "zero_dim": (
        BASE.replace("dims: [ 4 ] } ]\noutput", "dims: [ 4, 0 ] } ]\noutput"),
        "input[0].dims[1]: a dimension of 0 holds no data",
    ),
    "missing_name": (
        BASE.replace('name: "base"', ""),
        "name: not set; Triton takes the model name from the directory",
    ),
    "missing_data_type": (
        BASE + 'input [ { name: "z" dims: [ 1 ] } ]',
        "input[1].data_type: Field required (spec field inputs[1].dtype)",
    ),
    "backend_platform_disagree": (
        BASE.replace('backend: "python"', 'backend: "python" platform: "tensorrt_plan"'),
        "platform: platform 'tensorrt_plan' belongs to backend 'tensorrt'",
    ),
    "latest_zero": (
        BASE + "version_policy { latest { } }",
        "version_policy.latest.num_versions: Input should be greater than or equal to 1",
    ),
    "gpus_with_cpu_kind": (
        BASE + "instance_group [ { kind: KIND_CPU gpus: [ 0 ] } ]",
        "instance_group[0].gpus: gpus are only meaningful with kind gpu",
    ),
    "ensemble_without_steps": (
        ENSEMBLE_BASE,
        "ensemble_scheduling.step: an ensemble needs at least one step",
    ),
    "priority_key_zero": (
        BASE + "dynamic_batching { priority_levels: 2 default_priority_level: 1 "
        "priority_queue_policy { key: 0 value { } } }",
        "dynamic_batching.priority_queue_policy[0]: Input should be greater than or equal to 1",
    ),
    "warmup_unknown_input": (
        BASE + 'model_warmup [ { name: "w" batch_size: 1 inputs { key: "nope" value { '
        "data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } } } ]",
        'model_warmup[0].inputs["nope"]: the model has no input named',
    ),
    "shape_tensor_outside_tensorrt": (
        BASE.replace("dims: [ 4 ] } ]\noutput", "dims: [ 4 ] is_shape_tensor: true } ]\noutput"),
        "input[0].is_shape_tensor: shape tensors are only supported by TensorRT",
    ),
    "reshape_without_matching_variable_dims": (
        BASE.replace(
            "dims: [ 4 ] } ]\noutput", "dims: [ -1 ] reshape { shape: [ 2, 2 ] } } ]\noutput"
        ),
        "input[0].reshape.shape: reshape [2, 2] has 0 variable (-1) dimensions but shape [-1] has 1",
    ),
    "scalar_without_batching": (
        BASE.replace("max_batch_size: 8", "max_batch_size: 0").replace(
            "dims: [ 4 ] } ]\noutput", "dims: [ 1 ] reshape { } } ]\noutput"
        ),
        "input[0].reshape.shape: an empty reshape (a scalar) needs a batching model",
    ),
    "warmup_dtype_differs": (
        BASE + 'model_warmup [ { name: "w" batch_size: 1 inputs { key: "x" value { '
        "data_type: TYPE_INT32 dims: [ 4 ] zero_data: true } } } ]",
        'model_warmup[0].inputs["x"].data_type: warmup dtype int32 differs from the dtype fp32',
    ),
}


@pytest.mark.parametrize(("text", "reason"), INVALID.values(), ids=INVALID.keys())
def test_spec_rule_violations_are_reported_in_config_terms(text: str, reason: str) -> None:
    with pytest.raises(InvalidImportError) as caught:
        import_model_config(parse(text), origin="models/m/config.pbtxt")
    message = str(caught.value)
    assert message.startswith("models/m/config.pbtxt: this Triton config does not make a valid")
    assert any(line.startswith(reason) for line in caught.value.reasons), caught.value.reasons
    assert isinstance(caught.value, ValueError)


# --- parsing and files ------------------------------------------------------------------------


def test_parse_error_names_origin_line_and_column() -> None:
    with pytest.raises(
        ValueError,
        match=r"^models/m/config\.pbtxt:3:3: .*no field named "
        r'"max_batch"',
    ) as caught:
        parse_config_pbtxt(
            'name: "m"\nbackend: "python"\n  max_batch: 8\n', "models/m/config.pbtxt"
        )
    assert isinstance(caught.value.__cause__, text_format.ParseError)


def test_parse_error_on_bad_syntax() -> None:
    with pytest.raises(ValueError, match=r"^cfg:2:\d+: "):
        parse_config_pbtxt('name: "m"\ninput [ { name: "x" \n', "cfg")


def test_non_utf8_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "config.pbtxt"
    path.write_bytes(b'name: "caf\xe9"\nbackend: "python"\n')
    with pytest.raises(ValueError, match=r"config\.pbtxt: not UTF-8 text \(byte 0xe9 at offset 10"):
        import_config_file(path)


def test_utf8_file_with_bom_imports(tmp_path: Path) -> None:
    path = tmp_path / "config.pbtxt"
    path.write_bytes(b'\xef\xbb\xbfname: "m"\nbackend: "python"\n')
    assert import_config_file(path).name == "m"


def test_import_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.pbtxt"
    path.write_text(BASE + 'runtime: "model.py"\n', encoding="utf-8")
    with pytest.raises(UnsupportedConfigError) as caught:
        import_config_file(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert caught.value.origin == str(path)


# --- the safety net's diff --------------------------------------------------------------------


def test_config_differences_names_each_differing_field() -> None:
    left = parse(
        BASE + 'parameters { key: "a" value { string_value: "1" } } '
        "optimization { input_pinned_memory { } } "
        'model_warmup [ { name: "w" inputs { key: "x" value { zero_data: true } } } ]'
    )
    right = pb.ModelConfig()
    right.CopyFrom(left)
    assert config_differences(left, right) == []
    right.input[0].dims.append(2)
    right.parameters["a"].string_value = "2"
    right.parameters["b"].string_value = ""
    right.optimization.ClearField("input_pinned_memory")
    right.model_warmup[0].inputs["x"].zero_data = False  # still set: presence is the same
    right.model_warmup[0].inputs["x"].ClearField("zero_data")
    right.output.add(name="z")
    assert config_differences(left, right) == [
        "input[0].dims",
        "output",
        "optimization.input_pinned_memory",
        'parameters["a"].string_value',
        'parameters["b"]',
        'model_warmup[0].inputs["x"].zero_data',
    ]


# --- property: random subsets of a rich config round-trip or are refused -----------------------


def _rich_config() -> pb.ModelConfig:
    """The richest data file plus a few more supported fields: every part of it is supported."""
    config = parse((DATA / "priority_batching_onnx.pbtxt").read_text(encoding="utf-8"))
    config.optimization.cuda.graphs = True
    config.input[0].reshape.shape.extend([2, 64])
    config.output[0].label_filename = "labels.txt"
    config.model_transaction_policy.decoupled = True
    config.response_cache.enable = False  # Triton's response cache refuses decoupled models
    config.default_model_filename = "ranker.onnx"
    config.parameters["threads"].string_value = "4"
    return config


def _first_group(config: pb.ModelConfig) -> Any:
    return config.instance_group[0] if config.instance_group else config.instance_group.add()


# Unsupported fields the property test may add, with the path each must be refused at.
UNSUPPORTED_ADDITIONS: list[tuple[str, Any]] = [
    ("runtime", lambda c: setattr(c, "runtime", "libmodel.so")),
    ("metric_tags", lambda c: c.metric_tags.__setitem__("team", "search")),
    ("model_operations", lambda c: c.model_operations.op_library_filename.append("ops.so")),
    ("batch_input", lambda c: c.batch_input.add(target_name="n")),
    ("optimization.cuda.graph_spec", lambda c: c.optimization.cuda.graph_spec.add(batch_size=4)),
    ("instance_group[0].rate_limiter", lambda c: _first_group(c).rate_limiter.SetInParent()),
]


def _field_refs(message: Message) -> Iterator[tuple[Message, str]]:
    for field, value in message.ListFields():
        yield message, field.name
        if field.message_type is None:
            continue
        if is_map(field):
            if field.message_type.fields_by_name["value"].message_type is not None:
                for key in sorted(value):
                    yield from _field_refs(value[key])
        elif isinstance(value, Message):
            yield from _field_refs(value)
        else:
            for item in value:
                yield from _field_refs(item)


RICH = _rich_config()
RICH_FIELD_COUNT = len(list(_field_refs(RICH)))


def test_rich_config_round_trips() -> None:
    spec = import_model_config(RICH)
    assert render_model_config(yaml_round_trip(spec)) == RICH


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cleared=st.sets(st.integers(min_value=0, max_value=RICH_FIELD_COUNT - 1)),
    added=st.one_of(st.just(set()), st.sets(st.sampled_from(range(len(UNSUPPORTED_ADDITIONS))))),
)
def test_random_field_subsets_round_trip_or_are_refused(cleared: set[int], added: set[int]) -> None:
    """Clear any fields of the rich config, add any unsupported ones: never a silent change."""
    config = pb.ModelConfig()
    config.CopyFrom(RICH)
    refs = list(_field_refs(config))
    for index in sorted(cleared, reverse=True):  # children before their parents
        message, name = refs[index]
        message.ClearField(name)
    for index in sorted(added):
        UNSUPPORTED_ADDITIONS[index][1](config)
    outcome: ModelSpec | ValueError
    try:
        outcome = import_model_config(config, origin="hypothesis")
    except (UnsupportedConfigError, InvalidImportError) as error:
        outcome = error
    event(type(outcome).__name__)
    if added:
        assert isinstance(outcome, UnsupportedConfigError), outcome
        assert {UNSUPPORTED_ADDITIONS[i][0] for i in added} <= set(outcome.field_paths)
    if isinstance(outcome, UnsupportedConfigError):
        assert not outcome.regenerated, str(outcome)  # the walk, not the safety net, refuses
    elif isinstance(outcome, ModelSpec):
        assert render_model_config(outcome) == config
        assert render_model_config(yaml_round_trip(outcome)) == config


def test_rich_config_with_every_addition_lists_each_path_once() -> None:
    config = pb.ModelConfig()
    config.CopyFrom(RICH)
    for _, add in UNSUPPORTED_ADDITIONS:
        add(config)
    error = refusal(text_format.MessageToString(config))
    assert error.field_paths == [  # in field-number order, as Triton prints a config
        "instance_group[0].rate_limiter",
        "metric_tags",
        "optimization.cuda.graph_spec",
        "model_operations",
        "batch_input",
        "runtime",
    ]
