"""Cross-field rules of a ModelSpec: what Triton would refuse, caught before it gets the chance.

`check_model_spec(spec)` looks at one spec; `check_model_set(specs)` at references between
specs (ensemble steps). Both return every problem found, each with a field path and a sentence
that says what to do.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence

from gpufleet.spec.model import InputSpec, ModelSpec, OutputSpec
from gpufleet.spec.problems import SpecProblem

# Which Triton platform belongs to which backend, for specs that name both.
PLATFORM_BACKEND = {
    "onnxruntime_onnx": "onnxruntime",
    "pytorch_libtorch": "pytorch",
    "tensorrt_plan": "tensorrt",
    "tensorflow_graphdef": "tensorflow",
    "tensorflow_savedmodel": "tensorflow",
    "ensemble": "ensemble",
}


def check_model_spec(spec: ModelSpec) -> list[SpecProblem]:
    """Every cross-field problem of one spec, in field order."""
    checks = (
        _backend,
        _tensors,
        _batching,
        _instance_groups,
        _version_policy,
        _warmup,
        _ensemble,
    )
    return [problem for check in checks for problem in check(spec)]


def check_model_set(specs: Sequence[ModelSpec]) -> dict[str, list[SpecProblem]]:
    """Problems that only show across specs, keyed by the name of the spec they belong to."""
    by_name = {spec.name: spec for spec in specs}
    found: dict[str, list[SpecProblem]] = {}
    for spec in specs:
        for index, step in enumerate(spec.ensemble_steps):
            where = ("ensemble_steps", index)
            target = by_name.get(step.model)
            if target is None:
                known = ", ".join(sorted(by_name)) or "none"
                found.setdefault(spec.name, []).append(
                    SpecProblem(
                        (*where, "model"),
                        f"no model spec named {step.model!r} (known models: {known}); "
                        "add its spec or fix the name",
                    )
                )
                continue
            for side, declared in (("inputs", target.inputs), ("outputs", target.outputs)):
                names = {tensor.name for tensor in declared}
                mapping = step.inputs if side == "inputs" else step.outputs
                for tensor in mapping:
                    if tensor not in names:
                        found.setdefault(spec.name, []).append(
                            SpecProblem(
                                (*where, side, tensor),
                                f"model {step.model!r} has no {side[:-1]} named {tensor!r} "
                                f"(it has: {', '.join(sorted(names)) or 'none'})",
                            )
                        )
    return found


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


def _duplicates(names: Sequence[str]) -> set[str]:
    return {name for name, count in Counter(names).items() if count > 1}


def _element_count(dims: Sequence[int]) -> int | None:
    return None if -1 in dims else math.prod(dims)


def _tensors(spec: ModelSpec) -> Iterator[SpecProblem]:
    tensors: tuple[tuple[str, Sequence[InputSpec | OutputSpec]], ...] = (
        ("inputs", spec.inputs),
        ("outputs", spec.outputs),
    )
    for field, declared in tensors:
        repeated = _duplicates([tensor.name for tensor in declared])
        seen: set[str] = set()
        for index, tensor in enumerate(declared):
            if tensor.name in repeated and tensor.name in seen:
                yield SpecProblem(
                    (field, index, "name"),
                    f"{field[:-1]} name {tensor.name!r} is used twice; tensor names must be unique",
                )
            seen.add(tensor.name)
            if tensor.reshape is not None:
                before, after = _element_count(tensor.shape), _element_count(tensor.reshape)
                if before is not None and after is not None and before != after:
                    yield SpecProblem(
                        (field, index, "reshape"),
                        f"reshape {tensor.reshape} holds {after} elements but shape "
                        f"{tensor.shape} holds {before}; they must hold the same number",
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


def _instance_groups(spec: ModelSpec) -> Iterator[SpecProblem]:
    for index, group in enumerate(spec.instance_groups):
        # Triton resolves kind auto to gpu or cpu at load time, so auto may list GPUs.
        if group.gpus and group.kind not in ("gpu", "auto"):
            yield SpecProblem(
                ("instance_groups", index, "gpus"),
                f"gpus are only meaningful with kind gpu (this group is kind {group.kind})",
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
    input_names = {tensor.name for tensor in spec.inputs}
    for index, sample in enumerate(spec.warmup):
        limit = max(spec.max_batch_size, 1)
        if sample.batch_size > limit:
            yield SpecProblem(
                ("warmup", index, "batch_size"),
                f"warmup batch_size {sample.batch_size} is above max_batch_size "
                f"{spec.max_batch_size}",
            )
        for name, data in sample.inputs.items():
            if name not in input_names:
                yield SpecProblem(
                    ("warmup", index, "inputs", name),
                    f"the model has no input named {name!r}",
                )
            if (data.data is None) == (data.data_file is None):
                yield SpecProblem(
                    ("warmup", index, "inputs", name),
                    "set exactly one of data (zero or random) or data_file",
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
    produced: dict[str, int] = {}  # ensemble tensor -> index of the step producing it
    for index, step in enumerate(spec.ensemble_steps):
        if step.model == spec.name:
            yield SpecProblem(
                ("ensemble_steps", index, "model"), "a step cannot call the ensemble itself"
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
