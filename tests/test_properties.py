"""Property tests: any valid spec renders and round-trips; no invalid input gets past the CLI.

Real: everything - the pydantic models, the YAML loader, spec files on disk, the renderer,
protobuf's text parser and the Typer CLI run in-process. Hypothesis generates the inputs:
valid spec dicts built to satisfy the cross-field rules by construction, ensemble sets, random
bytes, random and YAML-ish text, random YAML documents, and valid specs with one mutation;
a mutation that always breaks a spec (an unknown key, a 0 dimension...) must be refused with an
error line naming the mutated field.

Each `@example` below is a bug these properties found (since fixed), kept in its smallest form
as a regression case. Hypothesis runs explicit examples first and skips the random search while
one fails; `--hypothesis-verbosity=verbose` lists failures that share a raise site.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple, get_args

import yaml
from google.protobuf import text_format
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import model_config_pb2 as pb
from typer.testing import CliRunner

from generators.model_repository import render_repository_files
from generators.triton_config import render_config_pbtxt, render_model_config
from gpufleet.cli import app
from gpufleet.spec import model as spec_model
from gpufleet.spec.loading import load_model_specs, model_spec_hash
from gpufleet.spec.model import ModelSpec
from gpufleet.spec.model_checks import PLATFORM_BACKEND
from gpufleet.spec.paths import FILE_NAME_PATTERN
from gpufleet.spec.problems import SpecProblem
from gpufleet.spec.yaml_source import SpecDumper
from tests.conftest import SAMPLE_SPECS, snapshot, write_spec

runner = CliRunner()

DTYPES = list(get_args(spec_model.DType))
BACKENDS = [b for b in get_args(spec_model.Backend) if b != "ensemble"]
PLATFORMS = [p for p in get_args(spec_model.Platform) if p != "ensemble"]
GPU_FAMILIES = list(get_args(spec_model.GpuFamily))
# Every key any spec object knows, so random documents reach the nested validators.
SPEC_KEYS = sorted(
    {
        name
        for model in vars(spec_model).values()
        if isinstance(model, type) and issubclass(model, spec_model.SpecModel)
        for name in model.model_fields
    }
)

SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}

# ---------------------------------------------------------------------------------------------
# Valid specs, built so that every cross-field rule of gpufleet.spec.model_checks holds.
# ---------------------------------------------------------------------------------------------

# PyYAML's emitter writes U+0085 (NEL) unescaped with allow_unicode, and its own loader then
# reads it as a line break: a PyYAML limitation, not gpufleet's, so valid specs avoid it.
characters = st.characters(codec="utf-8", exclude_characters="\x85")
text = st.text(characters, min_size=1, max_size=8)
# Files in the model's own directory: plain names only (gpufleet.spec.paths).
file_names = st.from_regex(FILE_NAME_PATTERN, fullmatch=True).filter(lambda name: ".." not in name)
model_names = st.builds(
    str.__add__,
    st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"),
    st.text(
        alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-", max_size=12
    ),
)
string_values = st.one_of(
    st.text(characters, max_size=8), st.integers(), st.floats(), st.booleans()
)  # Triton parameters are strings; the spec stringifies numbers and booleans.
parameters = st.dictionaries(text, string_values, max_size=3)


def spelled(values: list[str], aliases: dict[str, str]) -> st.SearchStrategy[str]:
    """A value or one of its aliases, as an author might type it (case and spaces ignored)."""
    names = st.sampled_from(sorted({*values, *aliases}))
    return st.one_of(names, names.map(str.upper), names.map(lambda v: f" {v} "))


dtypes = spelled(DTYPES, spec_model.DTYPE_ALIASES)
dims = st.one_of(st.just(-1), st.integers(1, 64))


@st.composite
def merged_factors(draw: st.DrawFn, factors: list[int]) -> list[int]:
    """The same element count as `factors`, regrouped: permuted, neighbours merged, 1s added."""
    merged: list[int] = []
    for factor in draw(st.permutations(factors)):
        if merged and draw(st.booleans()):
            merged[-1] *= factor
        else:
            merged.append(factor)
    for _ in range(draw(st.integers(0, 2))):
        merged.insert(draw(st.integers(0, len(merged))), 1)
    return merged


@st.composite
def reshapes(draw: st.DrawFn, shape: list[int], *, batching: bool) -> list[int]:
    """A reshape Triton accepts for `shape`: the same -1s, and between them the same counts."""
    runs: list[list[int]] = [[]]
    for dim in shape:
        if dim == -1:
            runs.append([])
        else:
            runs[-1].append(dim)
    parts = [draw(merged_factors(run)) for run in runs]
    reshape = [dim for index, part in enumerate(parts) for dim in ([-1] if index else []) + part]
    if batching and all(size == 1 for size in reshape) and draw(st.booleans()):
        return []  # a [1]-like tensor seen as a scalar: only in a batching model
    return reshape


@st.composite
def tensors(
    draw: st.DrawFn, name: str, *, output: bool, batching: bool, tensorrt: bool
) -> dict[str, Any]:
    shape = draw(st.lists(dims, min_size=1, max_size=4))
    tensor: dict[str, Any] = {"name": name, "dtype": draw(dtypes), "shape": shape}
    if draw(st.booleans()):
        tensor["reshape"] = draw(reshapes(shape, batching=batching))
    flags = []
    if tensorrt:  # shape tensors and non-linear IO formats are TensorRT's only
        flags.append("shape_tensor")
        if len(shape) == 3:
            flags.append("non_linear_format_io")
    if output:
        if draw(st.booleans()):
            tensor["label_file"] = draw(file_names)
    else:
        flags += ["optional", "ragged_batch"]
        if len(shape) == 3 and draw(st.booleans()):
            tensor["format"] = draw(st.sampled_from(["nchw", "nhwc"]))
    for flag in flags:
        if draw(st.booleans()):
            tensor[flag] = draw(st.booleans())
    return tensor


queue_policies = st.fixed_dictionaries(
    {},
    optional={
        "max_queue_size": st.integers(0, 10_000),
        "timeout_us": st.integers(0, 10**7),
        "timeout_action": st.sampled_from(["reject", "delay"]),
        "allow_timeout_override": st.booleans(),
    },
)


@st.composite
def dynamic_batchings(draw: st.DrawFn, max_batch_size: int) -> dict[str, Any]:
    batching = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "max_queue_delay_us": st.integers(0, 10**6),
                "preferred_batch_sizes": st.lists(st.integers(1, max_batch_size), max_size=4),
                "default_queue_policy": queue_policies,
            },
        )
    )
    levels = draw(st.integers(0, 5))
    if levels:
        batching["priority_levels"] = levels
        batching["default_priority_level"] = draw(st.integers(1, levels))
        batching["priority_queue_policies"] = draw(
            st.dictionaries(st.integers(1, levels), queue_policies, max_size=levels)
        )
    elif draw(st.booleans()):
        batching["priority_levels"] = 0
        batching["default_priority_level"] = 0
    if draw(st.booleans()):  # Triton keeps the order only with a single priority level
        batching["preserve_ordering"] = levels <= 1 and draw(st.booleans())
    if batching.get("preserve_ordering"):  # ... and without delaying timed-out requests
        policies = [
            batching.get("default_queue_policy"),
            *batching.get("priority_queue_policies", {}).values(),
        ]
        for policy in policies:
            if policy and policy.get("timeout_action") == "delay":
                policy.pop("timeout_us", None)
    return batching


@st.composite
def instance_groups(draw: st.DrawFn, *, tensorrt: bool) -> dict[str, Any]:
    kind = draw(st.sampled_from(["auto", "gpu", "cpu", "model"]))
    optional: dict[str, st.SearchStrategy[Any]] = {
        "count": st.integers(1, 8),
        "name": text,
        "passive": st.booleans(),
        "host_policy": text,
    }
    if tensorrt:  # TensorRT optimization profiles
        optional["profiles"] = st.lists(text, max_size=2)
    group = draw(st.fixed_dictionaries({"kind": st.just(kind)}, optional=optional))
    if kind in ("gpu", "auto") and draw(st.booleans()):  # auto may become gpu at load time
        group["gpus"] = draw(st.lists(st.integers(0, 7), min_size=1, max_size=4))
    return group


version_policies = st.one_of(
    st.fixed_dictionaries({"latest": st.integers(1, 5)}),
    st.just({"all": True}),
    st.fixed_dictionaries({"specific": st.lists(st.integers(1, 100), min_size=1, max_size=4)}),
)


@st.composite
def warmups(draw: st.DrawFn, inputs: list[dict[str, Any]], max_batch_size: int) -> dict[str, Any]:
    """Data for every required input and some optional ones, in the input's dtype and shape."""
    chosen = [t for t in inputs if not t.get("optional") or draw(st.booleans())]
    if not chosen:  # Triton refuses a warmup request without inputs
        chosen = [draw(st.sampled_from(inputs))]
    data: dict[str, Any] = {}
    for tensor in chosen:
        shape = [draw(st.integers(1, 64)) if dim == -1 else dim for dim in tensor["shape"]]
        sample: dict[str, Any] = {"dtype": tensor["dtype"], "shape": shape}
        if draw(st.booleans()):
            sample["data"] = draw(st.sampled_from(["zero", "random"]))
        else:
            sample["data_file"] = draw(file_names)
        data[tensor["name"]] = sample
    return draw(
        st.fixed_dictionaries(
            {
                "name": text,
                "batch_size": st.integers(1, max(max_batch_size, 1)),
                "inputs": st.just(data),
            },
            optional={"count": st.integers(0, 5)},
        )
    )


accelerators = st.fixed_dictionaries({"name": text}, optional={"parameters": parameters})
optimizations = st.fixed_dictionaries(
    {},
    optional={
        "graph_level": st.integers(-1, 5),
        "priority": st.sampled_from(["default", "max", "min"]),
        "cuda": st.fixed_dictionaries(
            {},
            optional={
                "graphs": st.booleans(),
                "busy_wait_events": st.booleans(),
                "output_copy_stream": st.booleans(),
            },
        ),
        "accelerators": st.fixed_dictionaries(
            {},
            optional={
                "gpu": st.lists(accelerators, max_size=2),
                "cpu": st.lists(accelerators, max_size=2),
            },
        ),
        "input_pinned_memory": st.booleans(),
        "output_pinned_memory": st.booleans(),
        "gather_kernel_buffer_threshold": st.integers(0, 10**6),
        "eager_batching": st.booleans(),
    },
)
sources = st.one_of(
    st.builds(
        "models:/{}@{}".format,
        st.text(st.characters(codec="utf-8", exclude_characters="/@\x85"), min_size=1, max_size=8),
        st.from_regex(r"[A-Za-z0-9_-]{1,8}", fullmatch=True),
    ),
    st.builds(
        "models:/{}/{}".format, st.from_regex(r"[a-z_]{1,8}", fullmatch=True), st.integers(1, 999)
    ),
    st.text(characters, max_size=12).filter(lambda s: not s.startswith("models:/")),
)
objectives = st.fixed_dictionaries(
    {},
    optional={
        "p99_latency_ms": st.floats(min_value=0.01, max_value=1e4),
        "concurrency": st.integers(1, 64)
        | st.lists(st.integers(1, 64), min_size=1, max_size=4, unique=True).map(sorted),
        "min_throughput_per_s": st.floats(min_value=0.01, max_value=1e6),
        "output_atol": st.floats(min_value=0, max_value=1),
    },
)


@st.composite
def backend_keys(draw: st.DrawFn) -> dict[str, str]:
    """backend, platform, or both agreeing, the way check_model_spec wants them."""
    choice = draw(st.sampled_from(["backend", "platform", "both"]))
    if choice == "backend":
        return {"backend": draw(spelled(BACKENDS, spec_model.BACKEND_ALIASES))}
    platform = draw(st.sampled_from(PLATFORMS))
    if choice == "platform":
        return {"platform": platform}
    return {"backend": PLATFORM_BACKEND[platform], "platform": platform}


def tensor_names() -> st.SearchStrategy[list[str]]:
    return st.lists(text, min_size=1, max_size=4, unique=True)


def canonical(value: str, aliases: dict[str, str]) -> str:
    """A spelled value as the spec normalizes it."""
    lowered = value.strip().lower()
    return aliases.get(lowered, lowered)


@st.composite
def spec_dicts(draw: st.DrawFn, name: st.SearchStrategy[str] = model_names) -> dict[str, Any]:
    """A valid ModelSpec dict (not an ensemble) touching every part of the spec."""
    spec: dict[str, Any] = {"name": draw(name), **draw(backend_keys())}
    backend = canonical(spec.get("backend", ""), spec_model.BACKEND_ALIASES)
    tensorrt = backend == "tensorrt" or spec.get("platform") == "tensorrt_plan"
    max_batch_size = draw(st.integers(0, 64))
    if max_batch_size or draw(st.booleans()):
        spec["max_batch_size"] = max_batch_size
    input_names, output_names = draw(tensor_names()), draw(tensor_names())
    shared = {"batching": max_batch_size > 0, "tensorrt": tensorrt}
    spec["inputs"] = [draw(tensors(n, output=False, **shared)) for n in input_names]
    spec["outputs"] = [draw(tensors(n, output=True, **shared)) for n in output_names]
    if max_batch_size and draw(st.booleans()):
        spec["dynamic_batching"] = draw(dynamic_batchings(max_batch_size))
    optional = {
        "source": sources,
        "instance_groups": st.lists(instance_groups(tensorrt=tensorrt), max_size=3),
        "version_policy": version_policies,
        "warmup": st.lists(warmups(spec["inputs"], max_batch_size), max_size=2),
        "optimization": optimizations,
        "response_cache": st.booleans(),
        "decoupled": st.booleans(),
        "default_model_filename": file_names,
        "parameters": parameters,
        "objectives": objectives,
        "gpu_families": st.lists(st.sampled_from(GPU_FAMILIES), unique=True),
    }
    spec.update(draw(st.fixed_dictionaries({}, optional=optional)))
    if spec.get("decoupled") and spec.get("response_cache"):  # no response cache when decoupled
        spec["response_cache"] = False
    return spec


def dims_agree(one: list[int], other: list[int]) -> bool:
    return len(one) == len(other) and all(
        a == b or -1 in (a, b) for a, b in zip(one, other, strict=True)
    )


@st.composite
def model_sets(draw: st.DrawFn) -> list[dict[str, Any]]:
    """1-3 member specs and an ensemble whose steps chain them, tensors wired as Triton wants:
    one dtype and agreeing shapes per ensemble tensor, every produced tensor used, a batch size
    no member's max_batch_size is below."""
    names = draw(st.lists(model_names, min_size=2, max_size=4, unique=True))
    members = [draw(spec_dicts(name=st.just(n))) for n in names[1:]]
    ensemble: dict[str, Any] = {
        "name": names[0],
        **draw(
            st.sampled_from(
                [
                    {"backend": "ensemble"},
                    {"platform": "ensemble"},
                    {"backend": "ensemble", "platform": "ensemble"},
                ]
            )
        ),
    }
    ensemble_inputs: list[dict[str, Any]] = []
    produced: dict[str, dict[str, Any]] = {}  # ensemble tensor -> the member output producing it
    consumed: set[str] = set()
    steps = []
    called = draw(st.lists(st.sampled_from(members), min_size=1, max_size=4))
    for index, member in enumerate(called):
        step_inputs = {}
        for tensor in member["inputs"]:
            dtype = canonical(tensor["dtype"], spec_model.DTYPE_ALIASES)
            fitting = [
                name
                for name, source in produced.items()
                if canonical(source["dtype"], spec_model.DTYPE_ALIASES) == dtype
                and dims_agree(source["shape"], tensor["shape"])
            ]
            if fitting and draw(st.booleans()):
                step_inputs[tensor["name"]] = draw(st.sampled_from(fitting))
                consumed.add(step_inputs[tensor["name"]])
            else:
                name = f"in{len(ensemble_inputs)}"
                ensemble_inputs.append(
                    {"name": name, "dtype": tensor["dtype"], "shape": tensor["shape"]}
                )
                step_inputs[tensor["name"]] = name
        step_outputs = {t["name"]: f"s{index}_{k}" for k, t in enumerate(member["outputs"])}
        produced.update({f"s{index}_{k}": t for k, t in enumerate(member["outputs"])})
        step: dict[str, Any] = {
            "model": member["name"],
            "inputs": step_inputs,
            "outputs": step_outputs,
        }
        if draw(st.booleans()):
            step["version"] = draw(st.one_of(st.just(-1), st.integers(1, 5)))
        steps.append(step)
    limits = [m.get("max_batch_size", 0) for m in called if m.get("max_batch_size", 0)]
    ensemble["max_batch_size"] = draw(st.integers(0, min(limits, default=64)))
    ensemble["inputs"] = ensemble_inputs
    unused = [name for name in produced if name not in consumed]
    also = (
        draw(st.lists(st.sampled_from(sorted(consumed)), unique=True, max_size=2))
        if consumed
        else []
    )
    ensemble["outputs"] = [
        {"name": name, "dtype": produced[name]["dtype"], "shape": produced[name]["shape"]}
        for name in [*unused, *also]
    ]
    ensemble["ensemble_steps"] = steps
    ensemble.update(
        draw(
            st.fixed_dictionaries(
                {}, optional={"version_policy": version_policies, "parameters": parameters}
            )
        )
    )
    return [ensemble, *members]


def to_yaml(data: Any, *, unicode: bool = True) -> str:
    """``data`` as YAML that the spec loader reads back as ``data``: PyYAML's own dumper writes
    the text "08" plain, which the loader (YAML 1.2 scalars) reads as the number 8."""
    return yaml.dump(data, Dumper=SpecDumper, sort_keys=False, allow_unicode=unicode)


@given(data=spec_dicts(), unicode=st.booleans())
@settings(max_examples=150, **SETTINGS)
def test_valid_spec_validates_renders_and_round_trips(data: dict[str, Any], unicode: bool) -> None:
    spec = ModelSpec.model_validate(data)
    assert ModelSpec.model_validate(spec.model_dump(mode="json")) == spec
    spec_hash = model_spec_hash(spec)
    source_name = f"modelconfigs/{spec.name}.yaml"
    message = render_model_config(spec)
    rendered = render_config_pbtxt(spec, source_name, spec_hash)
    again = render_config_pbtxt(ModelSpec.model_validate(data), source_name, spec_hash)
    assert rendered.encode() == again.encode(), "rendering must be deterministic"
    assert text_format.Parse(rendered, pb.ModelConfig()) == message
    with tempfile.TemporaryDirectory() as temp:
        write_spec(Path(temp), spec.name, to_yaml(data, unicode=unicode))
        [loaded] = load_model_specs(Path(temp))
    assert loaded.spec == spec, "the file loader must read back the spec the dict describes"
    assert loaded.spec_hash == spec_hash


@given(specs=model_sets())
@settings(max_examples=40, **SETTINGS)
def test_ensemble_sets_load_and_render(specs: list[dict[str, Any]]) -> None:
    expected = {data["name"]: ModelSpec.model_validate(data) for data in specs}
    with tempfile.TemporaryDirectory() as temp:
        for data in specs:
            write_spec(Path(temp), data["name"], to_yaml(data))
        loaded = load_model_specs(Path(temp))
    assert {item.spec.name: item.spec for item in loaded} == expected
    for relative, content in render_repository_files(loaded).items():
        name = relative.split("/")[0]
        assert text_format.Parse(content, pb.ModelConfig()) == render_model_config(expected[name])


# ---------------------------------------------------------------------------------------------
# Invalid input: the CLI answers with located one-line errors, exit 2, and writes nothing.
# ---------------------------------------------------------------------------------------------

ANCHOR = "resnet50"  # a valid sample spec that sits next to every fuzzed file
FUZZ = "fuzz"


@cache
def baseline_repository() -> dict[str, bytes]:
    """A repository generated from the anchor spec, plus model files and a retired config."""
    with tempfile.TemporaryDirectory() as temp:
        specs, out = Path(temp) / "specs", Path(temp) / "out"
        specs.mkdir()
        shutil.copy(SAMPLE_SPECS / f"{ANCHOR}.yaml", specs)
        result = runner.invoke(app, ["generate", "--specs", str(specs), "--out", str(out)])
        assert result.exit_code == 0, result.output
        (out / ANCHOR / "1").mkdir()
        (out / ANCHOR / "1" / "model.onnx").write_bytes(b"weights")
        (out / "retired").mkdir()
        (out / "retired" / "config.pbtxt").write_bytes((out / ANCHOR / "config.pbtxt").read_bytes())
        return snapshot(out)


def check_generate_refuses_or_accepts(content: bytes, file_stem: str = FUZZ) -> list[str]:
    """Run `generate` on the anchor plus `content`: exit 2 with clean errors and no writes, or 0.

    Returns the error lines (none when the file was accepted).
    """
    with tempfile.TemporaryDirectory() as temp:
        specs, out = Path(temp) / "specs", Path(temp) / "out"
        specs.mkdir()
        shutil.copy(SAMPLE_SPECS / f"{ANCHOR}.yaml", specs)
        fuzzed = specs / f"{file_stem}.yaml"
        fuzzed.write_bytes(content)
        for relative, data in baseline_repository().items():
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            (out / relative).write_bytes(data)
        before = snapshot(out)
        result = runner.invoke(app, ["generate", "--specs", str(specs), "--out", str(out)])
        crash = result.exception
        if crash is not None and not isinstance(crash, SystemExit):
            # Re-raised as is, so each crash site is reported as its own bug.
            crash.add_note(f"`gpufleet generate` crashed (exit {result.exit_code}) on {content!r}")
            raise crash
        assert result.exit_code in (0, 2), result.output
        assert "Traceback" not in result.output
        if result.exit_code == 2:
            lines = result.output.removesuffix("\n").split("\n")
            for line in lines:
                assert line.startswith(f"error: {fuzzed}:"), f"not a located error line: {line!r}"
            assert snapshot(out) == before, "a refused run must leave the repository as it was"
            return lines
        # Accepted: the file was a valid spec after all; every spec has its config, named after it.
        loaded = load_model_specs(specs)
        names = {item.spec.name for item in loaded}
        assert names == {ANCHOR, file_stem}, f"accepted models {names} are not named as their files"
        for relative, expected in render_repository_files(loaded).items():
            assert (out / relative).read_text(encoding="utf-8") == expected
        return []


# Bytes: anything at all, and byte-level damage (truncation, a changed byte) to a valid file.
@st.composite
def damaged_spec_bytes(draw: st.DrawFn) -> bytes:
    data = draw(spec_dicts(name=st.just(FUZZ)))
    raw = to_yaml(data, unicode=draw(st.booleans())).encode()
    position = draw(st.integers(0, len(raw)))
    if draw(st.booleans()):
        return raw[:position]
    return raw[:position] + bytes([draw(st.integers(0, 255))]) + raw[position + 1 :]


@given(content=st.one_of(st.binary(max_size=300), damaged_spec_bytes()))
# Bug: a control character makes PyYAML raise ReaderError, whose text spans two lines; the
# second ('  in "<unicode string>", position 0') is printed without "error: " or the file.
@example(content=b"\x00")
@settings(max_examples=100, **SETTINGS)
def test_random_bytes_are_refused_cleanly(content: bytes) -> None:
    check_generate_refuses_or_accepts(content)


# Text: random unicode, and text stitched from YAML syntax, tags, anchors and spec keys.
YAML_FRAGMENTS = [
    "\n",
    "  ",
    "    ",
    "- ",
    "? ",
    ": ",
    ":",
    "[",
    "]",
    "{",
    "}",
    ", ",
    "'",
    '"',
    "#",
    "---\n",
    "...\n",
    "%YAML 1.1\n",
    "&a ",
    "*a",
    "<<: ",
    "!!binary ",
    "!!str ",
    "!!set ",
    "!!python/tuple ",
    "!custom ",
    "|\n",
    ">\n",
    "\t",
    "\x00",
    "\x07",
    "\ufeff",
    "\\n",
    "\\x00",
    "\u2028",
    "~",
    "null",
    "true",
    "-1",
    "0",
    "3",
    "1e400",
    ".nan",
    "99999999999999999999",
    "aGVsbG8=",
    "fuzz",
    "python",
    "fp32",
    "gpu",
    "x",
    *(f"{key}: " for key in SPEC_KEYS),
]
yaml_like_text = st.lists(st.sampled_from(YAML_FRAGMENTS), max_size=30).map("".join)


@given(content=st.one_of(st.text(max_size=200), yaml_like_text))
# Bug: a tag that wants a mapping on a scalar - ValueError: not enough values to unpack.
@example(content="a: !!map x\n")
# Bug: a list (or mapping) as a key - TypeError: unhashable type: 'list'.
@example(content="{[a]: 1}\n")
# Bug: a self-referencing alias - RecursionError while finding the line of the problem.
@example(content="a: &x [*x]\n")
# Bug: nesting deeper than the recursion limit - RecursionError there too.
@example(content="a: " + "[" * 1200 + "]" * 1200 + "\n")
# Bug: a problem on line 100 prints as "fuzz.yaml💯 ..." (rich reads ":100:" as an emoji).
@example(content="\n" * 99 + "x: 1\n")
# Bug: a !!binary name skips the name == file name rule: fuzz.yaml generates model "a".
@example(content="name: !!binary YQ==\nbackend: python\n")
@settings(max_examples=150, **SETTINGS)
def test_random_text_is_refused_cleanly(content: str) -> None:
    check_generate_refuses_or_accepts(content.encode("utf-8", "surrogatepass"))


# YAML documents: random trees of mappings, lists and scalars, keyed mostly like a spec.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=10),
    st.sampled_from([*DTYPES, *BACKENDS, "gpu", "cpu", "zero", FUZZ, ANCHOR]),
)
keys = st.one_of(st.sampled_from(SPEC_KEYS), st.text(max_size=6), st.integers(-2, 5), st.none())
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=5)
    ),
    max_leaves=25,
)


@given(
    document=st.one_of(documents, st.dictionaries(keys, documents, max_size=8)),
    unicode=st.booleans(),
)
# Bug: a key with a newline is printed raw in the field path, splitting the error line.
@example(document={"\n": None}, unicode=False)
# Bug: the name-differs-from-file hint prints the name raw ("rename the file to a<newline>b.yaml").
@example(document={"name": "a\nb", "backend": "python"}, unicode=False)
@settings(max_examples=150, **SETTINGS)
def test_random_yaml_documents_are_refused_cleanly(document: Any, unicode: bool) -> None:
    check_generate_refuses_or_accepts(to_yaml(document, unicode=unicode).encode())


# Valid specs with one mutation.
def node_paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from node_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from node_paths(value, (*prefix, index))


def node_at(root: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        root = root[part]
    return root


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


MUTATIONS = [  # the first five always make an invalid spec; the others may not
    "unknown_key",
    "negative",
    "zero_dim",
    "duplicate_tensor",
    "preferred_above_max",
    "drop_key",
    "wrong_type",
    "out_of_range",
]
wrong_values = st.one_of(
    st.text(max_size=6),
    st.floats(),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


class Mutated(NamedTuple):
    mutation: str
    stem: str  # the file stem: the name the spec had before the mutation
    spec: dict[str, Any]
    refused_at: tuple[Any, ...] | None  # the field a refusal must name; None: may be valid


def is_free_form(path: tuple[Any, ...]) -> bool:
    """Inside `parameters`, any key is fine and numbers become strings."""
    return "parameters" in path


@st.composite
def mutated_specs(draw: st.DrawFn) -> Mutated:
    """A valid spec with one mutation, and the field path its refusal must name if it must be."""
    spec = copy.deepcopy(draw(spec_dicts(name=model_names.filter(lambda n: n != ANCHOR))))
    stem = spec["name"]
    mutation = draw(st.sampled_from(MUTATIONS))
    paths = list(node_paths(spec))
    refused_at: tuple[Any, ...] | None = None
    if mutation == "drop_key":
        path = draw(
            st.sampled_from([p for p in paths if p and isinstance(node_at(spec, p[:-1]), dict)])
        )
        del node_at(spec, path[:-1])[path[-1]]
    elif mutation == "unknown_key":
        path = draw(st.sampled_from([p for p in paths if isinstance(node_at(spec, p), dict)]))
        node = node_at(spec, path)
        key = draw(text.filter(lambda k: k not in node and k not in SPEC_KEYS))
        node[key] = draw(scalars)
        if not is_free_form(path):
            refused_at = (*path, key)
    elif mutation == "wrong_type":
        path = draw(st.sampled_from(paths[1:]))
        node_at(spec, path[:-1])[path[-1]] = draw(wrong_values)
    elif mutation == "negative":
        # -1 is a valid dimension and a graph level may be negative: go below them.
        numbers = [
            p
            for p in paths
            if p and is_int(node_at(spec, p)) and not is_free_form(p) and "graph_level" not in p
        ]
        path = draw(st.sampled_from(numbers or [("max_batch_size",)]))
        node_at(spec, path[:-1])[path[-1]] = draw(st.integers(max_value=-2))
        refused_at = path
    elif mutation == "out_of_range":
        numbers = [p for p in paths if p and is_int(node_at(spec, p))]
        path = draw(st.sampled_from(numbers or [("max_batch_size",)]))
        limit = 2**31
        value = draw(st.one_of(st.integers(min_value=limit), st.integers(max_value=-limit)))
        node_at(spec, path[:-1])[path[-1]] = value
    elif mutation == "zero_dim":
        shapes = [p for p in paths if p and p[-1] == "shape" and node_at(spec, p)]
        path = draw(st.sampled_from(shapes))
        shape = node_at(spec, path)
        index = draw(st.integers(0, len(shape) - 1))
        shape[index] = 0
        refused_at = (*path, index)
    elif mutation == "duplicate_tensor":
        field = draw(st.sampled_from(["inputs", "outputs"]))
        declared = spec[field]
        original = draw(st.integers(0, len(declared) - 1))
        position = draw(st.integers(0, len(declared)))
        declared.insert(position, copy.deepcopy(declared[original]))
        second = original + 1 if position <= original else position
        refused_at = (field, second, "name")
    else:  # preferred_above_max
        max_batch_size = spec.get("max_batch_size") or draw(st.integers(1, 64))
        spec["max_batch_size"] = max_batch_size
        batching = spec.setdefault("dynamic_batching", {})
        preferred = batching.setdefault("preferred_batch_sizes", [])
        preferred.append(max_batch_size + draw(st.integers(1, 100)))
        refused_at = ("dynamic_batching", "preferred_batch_sizes", len(preferred) - 1)
    return Mutated(mutation, stem, spec, refused_at)


@given(mutated=mutated_specs())
# Bug: numbers beyond Triton's int32/uint32/int64 fields pass validation, then the renderer
# raises ValueError: Value out of range (a traceback, exit 1).
@example(
    mutated=Mutated(
        "out_of_range", "m", {"name": "m", "backend": "python", "max_batch_size": 2**31}, None
    )
)
# Found by this test (a full `make test`, 2026-12-05): the file name "08", written plain by
# PyYAML's dumper, read back as the number 8, so the file was refused for that and not for its
# duplicate tensor name. to_yaml now writes what the loader reads back.
@example(
    mutated=Mutated(
        "duplicate_tensor",
        "a",
        {
            "name": "a",
            "platform": "onnxruntime_onnx",
            "max_batch_size": 1,
            "inputs": [
                {"name": "0", "dtype": "bf16", "shape": [-1]},
                {"name": "0", "dtype": "bf16", "shape": [-1]},
            ],
            "outputs": [{"name": "0", "dtype": "bf16", "shape": [-1]}],
            "default_model_filename": "08",
        },
        ("inputs", 1, "name"),
    )
)
@settings(max_examples=200, **SETTINGS)
def test_mutated_specs_are_refused_cleanly(mutated: Mutated) -> None:
    errors = check_generate_refuses_or_accepts(to_yaml(mutated.spec).encode(), mutated.stem)
    event(f"{mutated.mutation}: {'refused' if errors else 'accepted'}")
    if mutated.refused_at is None:
        return
    assert errors, f"{mutated.mutation} must be refused"
    field = str(SpecProblem(mutated.refused_at, "")).removesuffix(": ")
    assert any(f": {field}: " in line for line in errors), (field, errors)
