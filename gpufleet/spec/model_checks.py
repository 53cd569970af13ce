"""Cross-field rules of a ModelSpec: what Triton would refuse, caught before it gets the chance.

`check_model_spec(spec)` looks at one spec; `check_model_set(specs)` at references between
specs (ensemble steps). Both return every problem found, each with a field path and a sentence
that says what to do. Each rule mirrors a refusal of Triton 2.51 that
`tests/test_triton_serving.py` shows on the real server (`REFUSED_BY_TRITON`).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

from gpufleet.spec.model import EnsembleStep, InputSpec, ModelSpec, OutputSpec, QueuePolicy
from gpufleet.spec.problems import FieldPath, SpecProblem

# Which Triton platform belongs to which backend, for specs that name both.
PLATFORM_BACKEND = {
    "onnxruntime_onnx": "onnxruntime",
    "pytorch_libtorch": "pytorch",
    "tensorrt_plan": "tensorrt",
    "tensorflow_graphdef": "tensorflow",
    "tensorflow_savedmodel": "tensorflow",
    "ensemble": "ensemble",
}
TENSORRT = "TensorRT (backend tensorrt or platform tensorrt_plan)"


def check_model_spec(spec: ModelSpec) -> list[SpecProblem]:
    """Every cross-field problem of one spec, in field order."""
    checks = (
        _backend,
        _source_pins,
        _tensors,
        _batching,
        _instance_groups,
        _version_policy,
        _warmup,
        _transaction_policy,
        _tensorrt_accelerators,
        _ensemble,
        _rollout,
    )
    return [problem for check in checks for problem in check(spec)]


def check_model_set(
    specs: Sequence[ModelSpec], unchecked: Collection[str] = ()
) -> dict[str, list[SpecProblem]]:
    """Problems that only show across specs, keyed by the name of the spec they belong to.

    Steps calling a model named in `unchecked` (one whose spec failed to load) are skipped:
    that spec's own problems are reported instead.
    """
    by_name = {spec.name: spec for spec in specs}
    skipped = set(unchecked)
    found: dict[str, list[SpecProblem]] = {}
    for spec in specs:
        problems = list(_ensemble_members(spec, by_name, skipped))
        if problems:
            found[spec.name] = problems
    return found


def is_tensorrt(spec: ModelSpec) -> bool:
    """Triton fills in platform tensorrt_plan for backend tensorrt; TensorRT-only fields need it."""
    return spec.backend == "tensorrt" or spec.platform == "tensorrt_plan"


def variable_dim_pieces(dims: Sequence[int]) -> list[int]:
    """Element counts of the runs between variable (-1) dimensions: [2, 4, -1, 6] -> [8, 6].

    Triton accepts a reshape when both sides give the same list: the same number of -1s and the
    same element count between them ([2, 4, -1, 6] -> [8, -1, 1, 6]); [] counts as [1].
    """
    pieces = [1]
    for dim in dims:
        if dim == -1:
            pieces.append(1)
        else:
            pieces[-1] *= dim
    return pieces


def dims_agree(one: Sequence[int], other: Sequence[int]) -> bool:
    """Same rank, and each dimension equal or -1 on either side (Triton's wildcard compare)."""
    return len(one) == len(other) and all(
        a == b or -1 in (a, b) for a, b in zip(one, other, strict=True)
    )


def _backend(spec: ModelSpec) -> Iterator[SpecProblem]:
    if spec.backend is None and spec.platform is None:
        yield SpecProblem(
            ("backend",), "set backend (onnxruntime, pytorch, tensorrt, python, ensemble, ...)"
        )
    elif spec.backend is not None and spec.platform is not None:
        expected = PLATFORM_BACKEND[spec.platform]
        if expected != spec.backend:
            yield SpecProblem(
                ("platform",),
                f"platform {spec.platform!r} belongs to backend {expected!r}, "
                f"not {spec.backend!r}; drop platform or make them agree",
            )


def _source_pins(spec: ModelSpec) -> Iterator[SpecProblem]:
    if spec.source_sha256 and not (spec.source or "").startswith("models:/"):
        yield SpecProblem(
            ("source_sha256",),
            "pins the artifacts of registry versions, but source is not a models:/ URI; "
            "drop source_sha256 or set source to models:/<name>@<alias>",
        )


def _rollout(spec: ModelSpec) -> Iterator[SpecProblem]:
    """A rollout needs a registry source, a candidate of the same model, and its own versions."""
    rollout = spec.rollout
    if rollout is None:
        return
    source = spec.source or ""
    if not source.startswith("models:/"):
        yield SpecProblem(
            ("rollout",),
            "a rollout serves a candidate beside the registry version the source names, but "
            "source is not a models:/ URI; set source to models:/<name>@<alias>",
        )
        return
    registered = re.split(r"[@/]", source.removeprefix("models:/"), maxsplit=1)[0]
    candidate = re.split(r"[@/]", rollout.candidate.removeprefix("models:/"), maxsplit=1)[0]
    if candidate != registered:
        yield SpecProblem(
            ("rollout", "candidate"),
            f"names registered model {candidate!r}, but source names {registered!r}; a candidate "
            f"is another version of the same model (models:/{registered}@candidate)",
        )
    if rollout.candidate == source:
        yield SpecProblem(
            ("rollout", "candidate"),
            "is the source itself; name the candidate by another alias or version",
        )
    if spec.version_policy is not None:
        yield SpecProblem(
            ("version_policy",),
            "is set together with rollout, which chooses the served versions itself (the "
            "source's and the candidate's); drop version_policy",
        )
    if rollout.strategy != "canary":
        for field in ("weight", "sticky_header"):
            if getattr(rollout, field) is not None:
                yield SpecProblem(
                    ("rollout", field),
                    f"applies to strategy canary only, not {rollout.strategy}; drop it",
                )


def _reshape_problem(shape: Sequence[int], reshape: Sequence[int]) -> str | None:
    before, after = variable_dim_pieces(shape), variable_dim_pieces(reshape)
    if before == after:
        return None
    shape_text, reshape_text = list(shape), list(reshape)
    if len(before) == len(after) == 1:
        return (
            f"reshape {reshape_text} holds {after[0]} elements but shape {shape_text} holds "
            f"{before[0]}; they must hold the same number"
        )
    if len(before) != len(after):
        return (
            f"reshape {reshape_text} has {len(after) - 1} variable (-1) dimensions but shape "
            f"{shape_text} has {len(before) - 1}; use the same number of -1s in both"
        )
    return (
        f"reshape {reshape_text} does not keep the element counts between the -1 dimensions "
        f"of shape {shape_text} ({after} vs {before}); each part between -1s must hold the "
        "same number of elements"
    )


def _tensors(spec: ModelSpec) -> Iterator[SpecProblem]:
    tensors: tuple[tuple[str, Sequence[InputSpec | OutputSpec]], ...] = (
        ("inputs", spec.inputs),
        ("outputs", spec.outputs),
    )
    tensorrt = is_tensorrt(spec)
    for field, declared in tensors:
        seen: set[str] = set()
        for index, tensor in enumerate(declared):
            where = (field, index)
            if tensor.name in seen:
                yield SpecProblem(
                    (*where, "name"),
                    f"{field[:-1]} name {tensor.name!r} is used twice; tensor names must be unique",
                )
            seen.add(tensor.name)
            if tensor.reshape is not None:
                problem = _reshape_problem(tensor.shape, tensor.reshape)
                if problem is not None:
                    yield SpecProblem((*where, "reshape"), problem)
                if not tensor.reshape and spec.max_batch_size == 0:
                    yield SpecProblem(
                        (*where, "reshape"),
                        "an empty reshape (a scalar) needs a batching model: Triton supports "
                        "no scalar tensors with max_batch_size 0; set max_batch_size or give "
                        "reshape a dimension",
                    )
            if (
                isinstance(tensor, InputSpec)
                and tensor.format is not None
                and len(tensor.shape) != 3
            ):
                yield SpecProblem(
                    (*where, "format"),
                    f"format {tensor.format} needs a shape of 3 dimensions (without the "
                    f"batch dimension); shape {tensor.shape} has {len(tensor.shape)}",
                )
            if tensor.shape_tensor and not tensorrt:
                yield SpecProblem(
                    (*where, "shape_tensor"),
                    f"shape tensors are only supported by {TENSORRT}; remove shape_tensor",
                )
            if tensor.non_linear_format_io:
                if not tensorrt:
                    yield SpecProblem(
                        (*where, "non_linear_format_io"),
                        f"non-linear IO formats are only supported by {TENSORRT}; "
                        "remove non_linear_format_io",
                    )
                elif len(tensor.shape) != 3:
                    yield SpecProblem(
                        (*where, "non_linear_format_io"),
                        f"a non-linear IO format needs a shape of 3 dimensions; shape "
                        f"{tensor.shape} has {len(tensor.shape)}",
                    )


def _batching(spec: ModelSpec) -> Iterator[SpecProblem]:
    batching = spec.dynamic_batching
    if batching is None:
        return
    if spec.max_batch_size == 0:
        yield SpecProblem(
            ("dynamic_batching",),
            "dynamic batching needs max_batch_size > 0; set max_batch_size or remove "
            "dynamic_batching",
        )
    for index, size in enumerate(batching.preferred_batch_sizes):
        if spec.max_batch_size and size > spec.max_batch_size:
            yield SpecProblem(
                ("dynamic_batching", "preferred_batch_sizes", index),
                f"preferred batch size {size} is above max_batch_size {spec.max_batch_size}; "
                "lower it or raise max_batch_size",
            )
    levels = batching.priority_levels
    if levels == 0:
        if batching.default_priority_level:
            yield SpecProblem(
                ("dynamic_batching", "default_priority_level"),
                "default_priority_level needs priority_levels > 0; set priority_levels",
            )
    elif not 1 <= batching.default_priority_level <= levels:
        yield SpecProblem(
            ("dynamic_batching", "default_priority_level"),
            f"default_priority_level must be between 1 and priority_levels ({levels})",
        )
    if batching.preserve_ordering and levels > 1:
        yield SpecProblem(
            ("dynamic_batching", "preserve_ordering"),
            "Triton preserves ordering only with a single priority level; "
            "turn preserve_ordering off or use priority_levels: 1",
        )
    for level in batching.priority_queue_policies:
        if level > levels:
            yield SpecProblem(
                ("dynamic_batching", "priority_queue_policies", level),
                f"priority level {level} is above priority_levels ({levels}); "
                "raise priority_levels or remove this policy",
            )
    if batching.preserve_ordering:
        policies: list[tuple[FieldPath, QueuePolicy | None]] = [
            (("dynamic_batching", "default_queue_policy"), batching.default_queue_policy),
            *(
                (("dynamic_batching", "priority_queue_policies", level), policy)
                for level, policy in batching.priority_queue_policies.items()
            ),
        ]
        for where, policy in policies:
            if policy is not None and policy.timeout_action == "delay" and policy.timeout_us:
                yield SpecProblem(
                    (*where, "timeout_action"),
                    "Triton refuses timeout_action delay with a timeout when preserve_ordering "
                    "is on; use reject, drop timeout_us or turn preserve_ordering off",
                )


def _instance_groups(spec: ModelSpec) -> Iterator[SpecProblem]:
    for index, group in enumerate(spec.instance_groups):
        # Triton resolves kind auto to gpu or cpu at load time, so auto may list GPUs.
        if group.gpus and group.kind not in ("gpu", "auto"):
            yield SpecProblem(
                ("instance_groups", index, "gpus"),
                f"gpus are only meaningful with kind gpu (this group is kind {group.kind})",
            )
        if group.profiles and not is_tensorrt(spec):
            yield SpecProblem(
                ("instance_groups", index, "profiles"),
                f"profiles are TensorRT optimization profiles, only for {TENSORRT}; remove them",
            )


def _version_policy(spec: ModelSpec) -> Iterator[SpecProblem]:
    policy = spec.version_policy
    if policy is None:
        return
    chosen = [name for name in ("latest", "all", "specific") if getattr(policy, name) is not None]
    if len(chosen) != 1:
        yield SpecProblem(
            ("version_policy",),
            "set exactly one of latest, all or specific"
            + (f" (found {', '.join(chosen)})" if chosen else ""),
        )
    if policy.specific is not None and not policy.specific:
        yield SpecProblem(("version_policy", "specific"), "list at least one version")


def _warmup(spec: ModelSpec) -> Iterator[SpecProblem]:
    declared = {tensor.name: tensor for tensor in spec.inputs}
    for index, sample in enumerate(spec.warmup):
        where = ("warmup", index)
        limit = max(spec.max_batch_size, 1)
        if sample.batch_size > limit:
            yield SpecProblem(
                (*where, "batch_size"),
                f"warmup batch_size {sample.batch_size} is above max_batch_size "
                f"{spec.max_batch_size}",
            )
        missing = [
            name
            for name, tensor in declared.items()
            if not tensor.optional and name not in sample.inputs
        ]
        if missing:
            yield SpecProblem(
                (*where, "inputs"),
                f"the warmup leaves out required input {', '.join(map(repr, missing))}; "
                "give data for every input that is not optional",
            )
        elif not sample.inputs:
            yield SpecProblem(
                (*where, "inputs"),
                "a warmup sample needs data for at least one input; Triton cannot run a warmup "
                "request without inputs",
            )
        for name, data in sample.inputs.items():
            tensor = declared.get(name)
            if tensor is None:
                yield SpecProblem(
                    (*where, "inputs", name),
                    f"the model has no input named {name!r}",
                )
            else:
                if data.dtype != tensor.dtype:
                    yield SpecProblem(
                        (*where, "inputs", name, "dtype"),
                        f"warmup dtype {data.dtype} differs from the dtype {tensor.dtype} of "
                        f"input {name!r}; use {tensor.dtype}",
                    )
                # A shape tensor's values are sizes; TensorRT checks them, not this shape.
                if not tensor.shape_tensor and not dims_agree(data.shape, tensor.shape):
                    yield SpecProblem(
                        (*where, "inputs", name, "shape"),
                        f"warmup shape {data.shape} does not fit the shape {tensor.shape} of "
                        f"input {name!r}; give one size per dimension (any size for -1), "
                        "without the batch dimension",
                    )
            if (data.data is None) == (data.data_file is None):
                yield SpecProblem(
                    (*where, "inputs", name),
                    "set exactly one of data (zero or random) or data_file",
                )


# The ONNX Runtime backend's TensorRT accelerator reads these as numbers or one of these words;
# its README lists "FP32", "FP16" and "INT8" as the allowed precision_mode values.
TENSORRT_PRECISIONS = ("FP32", "FP16", "INT8")


def _tensorrt_accelerators(spec: ModelSpec) -> Iterator[SpecProblem]:
    accelerators = spec.optimization.accelerators if spec.optimization else None
    for index, accelerator in enumerate(accelerators.gpu if accelerators else []):
        if accelerator.name != "tensorrt":
            continue
        where = ("optimization", "accelerators", "gpu", index, "parameters")
        precision = accelerator.parameters.get("precision_mode")
        if precision is not None and precision not in TENSORRT_PRECISIONS:
            yield SpecProblem(
                (*where, "precision_mode"),
                f"precision_mode {precision!r} is not one of {', '.join(TENSORRT_PRECISIONS)} "
                "(upper case)",
            )
        workspace = accelerator.parameters.get("max_workspace_size_bytes")
        if workspace is not None and not (workspace.isdigit() and int(workspace) > 0):
            yield SpecProblem(
                (*where, "max_workspace_size_bytes"),
                f"max_workspace_size_bytes {workspace!r} must be a positive number of bytes",
            )


def _transaction_policy(spec: ModelSpec) -> Iterator[SpecProblem]:
    if spec.decoupled and spec.response_cache:
        yield SpecProblem(
            ("response_cache",),
            "Triton's response cache does not support decoupled models; turn response_cache "
            "or decoupled off",
        )


def _ensemble(spec: ModelSpec) -> Iterator[SpecProblem]:
    if not spec.is_ensemble:
        if spec.ensemble_steps:
            yield SpecProblem(
                ("ensemble_steps",), "only an ensemble (backend: ensemble) has ensemble_steps"
            )
        return
    if not spec.ensemble_steps:
        yield SpecProblem(("ensemble_steps",), "an ensemble needs at least one step")
    if spec.dynamic_batching is not None:
        yield SpecProblem(
            ("dynamic_batching",),
            "an ensemble cannot batch itself; batch in the models its steps call",
        )
    if spec.instance_groups:
        yield SpecProblem(
            ("instance_groups",), "an ensemble has no instances; remove instance_groups"
        )
    if spec.warmup:
        yield SpecProblem(
            ("warmup",), "an ensemble cannot be warmed up; warm up the models its steps call"
        )
    if spec.optimization is not None:
        yield SpecProblem(
            ("optimization",),
            "an ensemble has no optimization settings; set them on the models its steps call",
        )
    produced: dict[str, int] = {}  # ensemble tensor -> index of the step producing it
    for index, step in enumerate(spec.ensemble_steps):
        if step.model == spec.name:
            yield SpecProblem(
                ("ensemble_steps", index, "model"), "a step cannot call the ensemble itself"
            )
        for side, mapping in (("inputs", step.inputs), ("outputs", step.outputs)):
            if not mapping:
                yield SpecProblem(
                    ("ensemble_steps", index, side),
                    f"a step must map at least one model {side[:-1]} to an ensemble tensor",
                )
        for model_output, tensor in step.outputs.items():
            if tensor in produced:
                yield SpecProblem(
                    ("ensemble_steps", index, "outputs", model_output),
                    f"ensemble tensor {tensor!r} is already produced by step {produced[tensor]}; "
                    "each tensor must have one producer",
                )
            produced.setdefault(tensor, index)
    ensemble_inputs = {tensor.name for tensor in spec.inputs}
    ensemble_outputs = {tensor.name for tensor in spec.outputs}
    consumed: set[str] = set()
    for index, step in enumerate(spec.ensemble_steps):
        for model_input, tensor in step.inputs.items():
            consumed.add(tensor)
            if tensor not in ensemble_inputs and tensor not in produced:
                yield SpecProblem(
                    ("ensemble_steps", index, "inputs", model_input),
                    f"ensemble tensor {tensor!r} is neither an ensemble input nor any step's "
                    "output",
                )
    for index, step in enumerate(spec.ensemble_steps):
        for model_output, tensor in step.outputs.items():
            if produced[tensor] == index and tensor not in consumed | ensemble_outputs:
                yield SpecProblem(
                    ("ensemble_steps", index, "outputs", model_output),
                    f"ensemble tensor {tensor!r} is never used: no step reads it and it is no "
                    "ensemble output; drop this mapping or use the tensor",
                )
    yield from _steps_that_never_run(spec, produced)
    for index, output in enumerate(spec.outputs):
        if output.name not in produced:
            yield SpecProblem(
                ("outputs", index, "name"),
                f"ensemble output {output.name!r} is not produced by any step",
            )
    for index, declared in enumerate(spec.inputs):
        if declared.name not in consumed:
            yield SpecProblem(
                ("inputs", index, "name"),
                f"ensemble input {declared.name!r} is not used by any step",
            )


def _steps_that_never_run(spec: ModelSpec, produced: dict[str, int]) -> Iterator[SpecProblem]:
    """Steps waiting on a tensor that only a step waiting on them produces (a cycle)."""
    available = {tensor.name for tensor in spec.inputs}
    waiting = dict(enumerate(spec.ensemble_steps))
    progress = True
    while progress:
        progress = False
        for index, step in list(waiting.items()):
            needed = [t for t in step.inputs.values() if t in available or t in produced]
            if all(tensor in available for tensor in needed):
                available.update(step.outputs.values())
                del waiting[index]
                progress = True
    for index, step in waiting.items():
        for model_input, tensor in step.inputs.items():
            if tensor not in available and tensor in produced:
                yield SpecProblem(
                    ("ensemble_steps", index, "inputs", model_input),
                    f"ensemble tensor {tensor!r} comes from step {produced[tensor]}, which "
                    "waits (directly or not) on this step's outputs; break the cycle",
                )


@dataclass(frozen=True)
class _TensorUse:
    """What one side of an ensemble tensor says about it (Triton's TensorNode)."""

    dtype: str
    dims: list[int]
    batching: bool
    origin: str

    def agrees_with(self, other: _TensorUse) -> bool:
        def full(use: _TensorUse) -> list[int]:
            return [-1, *use.dims] if use.batching else use.dims

        return dims_agree(self.dims, other.dims) or dims_agree(full(self), full(other))


def _ensemble_members(
    spec: ModelSpec, by_name: dict[str, ModelSpec], unchecked: set[str]
) -> Iterator[SpecProblem]:
    """The steps' models exist, allow the ensemble's batch size and agree on tensor types."""
    # Ensemble tensors as the ensemble declares them: the reshape, if any, is what steps see.
    tensors: dict[str, _TensorUse] = {}
    for kind, declared in (("input", spec.inputs), ("output", spec.outputs)):
        for tensor in declared:
            dims = tensor.reshape if tensor.reshape is not None else tensor.shape
            origin = f"the ensemble's {kind} {tensor.name!r}"
            tensors.setdefault(
                tensor.name, _TensorUse(tensor.dtype, list(dims), spec.max_batch_size > 0, origin)
            )
    too_small: set[str] = set()
    for index, step in enumerate(spec.ensemble_steps):
        where = ("ensemble_steps", index)
        if step.model in unchecked:
            continue
        target = by_name.get(step.model)
        if target is None:
            known = ", ".join(sorted(by_name)) or "none"
            yield SpecProblem(
                (*where, "model"),
                f"no model spec named {step.model!r} (known models: {known}); "
                "add its spec or fix the name",
            )
            continue
        limit = target.max_batch_size
        if limit and limit < spec.max_batch_size and step.model not in too_small:
            too_small.add(step.model)
            yield SpecProblem(
                ("max_batch_size",),
                f"max_batch_size {spec.max_batch_size} is above the max_batch_size {limit} of "
                f"model {step.model!r} (step {index}); lower it to at most {limit}",
            )
        yield from _step_tensors(step, where, target, tensors)


def _step_tensors(
    step: EnsembleStep, where: FieldPath, target: ModelSpec, tensors: dict[str, _TensorUse]
) -> Iterator[SpecProblem]:
    sides: tuple[tuple[str, Sequence[InputSpec | OutputSpec], dict[str, str]], ...] = (
        ("inputs", target.inputs, step.inputs),
        ("outputs", target.outputs, step.outputs),
    )
    for side, declared, mapping in sides:
        names = {tensor.name for tensor in declared}
        for name in mapping:
            if name not in names:
                yield SpecProblem(
                    (*where, side, name),
                    f"model {step.model!r} has no {side[:-1]} named {name!r} "
                    f"(it has: {', '.join(sorted(names)) or 'none'})",
                )
        for tensor in declared:
            if tensor.name not in mapping:
                if side == "inputs" and not getattr(tensor, "optional", False):
                    yield SpecProblem(
                        (*where, side),
                        f"input {tensor.name!r} of model {step.model!r} is required but this "
                        "step maps no ensemble tensor to it; map it",
                    )
                continue
            ensemble_tensor = mapping[tensor.name]
            use = _TensorUse(
                tensor.dtype,
                list(tensor.shape),
                target.max_batch_size > 0,
                f"model {step.model!r} {side[:-1]} {tensor.name!r}",
            )
            known = tensors.setdefault(ensemble_tensor, use)
            if known is use:
                continue
            if known.dtype != use.dtype:
                yield SpecProblem(
                    (*where, side, tensor.name),
                    f"ensemble tensor {ensemble_tensor!r} is {use.dtype} for {use.origin} but "
                    f"{known.dtype} for {known.origin}; make the dtypes agree",
                )
            elif not use.agrees_with(known):
                yield SpecProblem(
                    (*where, side, tensor.name),
                    f"ensemble tensor {ensemble_tensor!r} has shape {use.dims} for "
                    f"{use.origin} but {known.dims} for {known.origin}; make the shapes agree "
                    "(-1 matches any size)",
                )
