"""The search space of `gpufleet tune`: which batching and instance settings may be tried.

Axes: ``instance_count``, ``max_batch_size``, ``max_queue_delay_us`` and ``preferred`` (no
preferred batch size; the batch one of the spec's concurrency levels can fill; or
``max_batch_size`` itself), plus the instance ``kind``. They are
bounded by the backend (TensorRT engines are built for the spec's ``max_batch_size`` and run on
GPUs only), by the host (no GPU: CPU instances only; instance counts up to twice its cores) and
by the objective (a queue delay at or above the p99 objective can never meet it).

Dependent settings are derived per candidate, so a spec's own values never make a candidate
invalid: a preferred size is never above the candidate's ``max_batch_size`` (a level's batch
that would be becomes ``[max_batch_size]``), and a ``max_batch_size`` of 1 batches nothing (no
delay, no preferred sizes). Every candidate is validated by the spec's own checks
(``ModelSpec`` and gpufleet/spec/model_checks.py); those it refuses are listed, never tried.

    space = build_space(spec, HostFacts.this_machine())
    for candidate in space.grid():
        tuned = space.spec_for(candidate)
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import ValidationError

from gpufleet.spec.model import DynamicBatching, InstanceGroup, ModelSpec

# "none", "max" (the candidate's max_batch_size) or a concurrency level as text ("8"): with a
# closed loop of c clients, no more than c requests wait, so a batcher that prefers more than c
# waits out its whole queue delay (measured on tabular_mlp at c=8: batch 64 with a 2 ms delay and
# preferred size 64 read 2,300/s, preferred size 8 about 5,000/s).
Preferred = str
Kind = Literal["cpu", "gpu"]
AXES = ("instance_count", "max_batch_size", "max_queue_delay_us", "preferred")

DEFAULT_DELAYS_US = (0, 100, 500, 1000, 2000, 5000)
MAX_INSTANCES = 8
MAX_BATCH_LIMIT = 256
# Backends that run only on a GPU, and those that run only on a CPU.
GPU_ONLY_BACKENDS = {"tensorrt", "tensorrtllm", "vllm"}
CPU_ONLY_BACKENDS = {"openvino"}
# A TensorRT plan is built for a batch range: never above the spec's max_batch_size.
FIXED_BATCH_LIMIT_BACKENDS = {"tensorrt", "tensorrtllm"}


class SpaceError(ValueError):
    """The model cannot be tuned on this host (the message says why and what to do)."""


@dataclass(frozen=True)
class HostFacts:
    """What the tuning host offers: CPU cores, GPUs and their family."""

    cpus: int
    gpus: int = 0
    gpu_family: str | None = None
    name: str = ""

    @classmethod
    def this_machine(cls) -> HostFacts:
        return cls(cpus=len(os.sched_getaffinity(0)), gpus=0, name=os.uname().nodename)


@dataclass(frozen=True, order=True)
class Candidate:
    """One point of the space. ``max_batch_size`` 0 means the model does not batch."""

    instance_count: int
    max_batch_size: int
    max_queue_delay_us: int
    preferred: Preferred
    kind: Kind = "cpu"

    @property
    def preferred_batch_sizes(self) -> list[int]:
        if self.max_batch_size <= 1 or self.preferred == "none":
            return []
        if self.preferred == "max":
            return [self.max_batch_size]
        return [min(int(self.preferred), self.max_batch_size)]

    @property
    def label(self) -> str:
        if self.max_batch_size == 0:
            batching = "no batching"
        else:
            sizes = self.preferred_batch_sizes
            preferred = f"pref {sizes[0]}" if sizes else "no pref"
            batching = f"mbs {self.max_batch_size}, delay {self.max_queue_delay_us} us, {preferred}"
        return f"{self.instance_count}x{self.kind}, {batching}"

    def as_dict(self) -> dict[str, object]:
        return {
            "instance_kind": self.kind,
            "instance_count": self.instance_count,
            "max_batch_size": self.max_batch_size,
            "max_queue_delay_us": self.max_queue_delay_us,
            "preferred_batch_sizes": self.preferred_batch_sizes,
        }


@dataclass(frozen=True)
class Refused:
    """A grid point the spec's own checks refuse: never tried."""

    candidate: Candidate
    reason: str


@dataclass(frozen=True)
class SearchSpace:
    """The axes (ascending values) for one spec on one host, and the spec they apply to."""

    spec: ModelSpec
    kinds: tuple[Kind, ...]
    axes: dict[str, tuple[int | str, ...]]
    tunes_instances: bool  # False: the spec has several instance groups, kept as they are
    refused: list[Refused] = field(default_factory=list)

    def normalize(self, candidate: Candidate) -> Candidate:
        """The canonical form: settings that change nothing where they cannot act are zeroed."""
        if candidate.max_batch_size <= 1:
            return replace(candidate, max_queue_delay_us=0, preferred="none")
        if candidate.preferred.isdigit() and int(candidate.preferred) >= candidate.max_batch_size:
            return replace(candidate, preferred="max")  # a level's batch the size cannot hold
        return candidate

    def raw_grid(self) -> Iterator[Candidate]:
        seen: set[Candidate] = set()
        for kind in self.kinds:
            for values in itertools.product(*(self.axes[axis] for axis in AXES)):
                count, batch, delay, preferred = values
                candidate = self.normalize(
                    Candidate(int(count), int(batch), int(delay), str(preferred), kind)
                )
                if candidate not in seen:
                    seen.add(candidate)
                    yield candidate

    def grid(self) -> list[Candidate]:
        """Every candidate the spec's checks accept, in a stable order."""
        refused = {item.candidate for item in self.refused}
        return [candidate for candidate in self.raw_grid() if candidate not in refused]

    def spec_for(self, candidate: Candidate) -> ModelSpec:
        """The spec with the candidate's settings; ValueError when the spec's checks refuse it."""
        return candidate_spec(self.spec, candidate, tunes_instances=self.tunes_instances)

    def neighbour(self, candidate: Candidate, axis: str, step: int) -> Candidate | None:
        """The next distinct point along one axis (``step`` +1 or -1), or None past the end.
        Values that change nothing for this candidate are stepped over (max_batch_size 1 has no
        delay; a level's preferred batch of 8 is ``max`` at max_batch_size 8)."""
        values = self.axes[axis]
        current = getattr(candidate, axis)
        if current not in values:
            return None
        index = values.index(current) + step
        while 0 <= index < len(values):
            changes: dict[str, Any] = {axis: values[index]}
            moved = self.normalize(replace(candidate, **changes))
            if moved != candidate:
                return moved
            index += step
        return None

    def snap(self, spec: ModelSpec) -> Candidate:
        """The grid point nearest to the spec's own settings (the quick search starts there)."""
        batching = spec.dynamic_batching or DynamicBatching()
        groups = spec.instance_groups
        count = (groups[0].count or 1) if len(groups) == 1 else 1
        return self.normalize(
            Candidate(
                instance_count=int(_nearest(self.axes["instance_count"], count)),
                max_batch_size=int(_nearest(self.axes["max_batch_size"], spec.max_batch_size)),
                max_queue_delay_us=int(
                    _nearest(self.axes["max_queue_delay_us"], batching.max_queue_delay_us)
                ),
                preferred=self._snap_preferred(spec.max_batch_size, batching.preferred_batch_sizes),
                kind=self.kinds[0],
            )
        )

    def _snap_preferred(self, max_batch_size: int, sizes: Sequence[int]) -> Preferred:
        """``max`` when the spec prefers its own max_batch_size, else the largest of its
        preferred sizes that is a level's batch, else ``max`` or ``none``."""
        options = self.axes["preferred"]
        levels = [str(size) for size in sorted(sizes, reverse=True) if str(size) in options]
        if not sizes:
            wanted = "none"
        elif max_batch_size in sizes or not levels:
            wanted = "max"
        else:
            wanted = levels[0]
        return wanted if wanted in options else str(options[0])


def _nearest(values: Sequence[int | str], wanted: int) -> int | str:
    return min(values, key=lambda value: (abs(int(value) - wanted), value))


@dataclass(frozen=True)
class SpaceLimits:
    """Overrides of the default axes (a small space for tests and benchmarks); None: default."""

    instance_counts: tuple[int, ...] | None = None
    max_batch_sizes: tuple[int, ...] | None = None
    delays_us: tuple[int, ...] | None = None
    preferred: tuple[Preferred, ...] | None = None


def build_space(spec: ModelSpec, host: HostFacts, limits: SpaceLimits | None = None) -> SearchSpace:
    """The space for ``spec`` on ``host``; SpaceError when nothing could be tried."""
    limits = limits or SpaceLimits()
    if spec.is_ensemble:
        raise SpaceError(
            f"{spec.name} is an ensemble: it has no batching or instances of its own; tune its "
            "member models instead"
        )
    if spec.decoupled:
        raise SpaceError(
            f"{spec.name} is decoupled (streaming): the load gate's request/response method "
            "cannot measure it"
        )
    kinds = allowed_kinds(spec, host)
    tunes_instances = len(spec.instance_groups) <= 1
    counts = limits.instance_counts or tuple(range(1, min(2 * host.cpus, MAX_INSTANCES) + 1))
    if not tunes_instances:
        counts = (1,)
    axes: dict[str, tuple[int | str, ...]] = {
        "instance_count": tuple(sorted(set(counts))),
        "max_batch_size": tuple(sorted(set(limits.max_batch_sizes or batch_sizes(spec)))),
        "max_queue_delay_us": tuple(sorted(set(limits.delays_us or delays_us(spec)))),
        "preferred": limits.preferred or preferred_options(spec),
    }
    if spec.max_batch_size == 0:  # the model's tensors have no batch dimension: keep it so
        axes["max_batch_size"] = (0,)
        axes["max_queue_delay_us"] = (0,)
        axes["preferred"] = ("none",)
    space = SearchSpace(spec, kinds, axes, tunes_instances)
    refused = []
    for candidate in space.raw_grid():
        try:
            space.spec_for(candidate)
        except ValueError as error:
            refused.append(Refused(candidate, _first_reason(error)))
    space = replace(space, refused=refused)
    if not space.grid():
        reasons = sorted({item.reason for item in refused})
        raise SpaceError(
            f"{spec.name}: the spec's own checks refuse every candidate ({'; '.join(reasons)})"
        )
    return space


def allowed_kinds(spec: ModelSpec, host: HostFacts) -> tuple[Kind, ...]:
    """Instance kinds the backend and the host allow, the spec's own first."""
    backend = spec.backend or ""
    kinds: list[Kind] = []
    if backend not in GPU_ONLY_BACKENDS:
        kinds.append("cpu")
    if host.gpus and backend not in CPU_ONLY_BACKENDS:
        kinds.append("gpu")
    if spec.gpu_families and host.gpus and host.gpu_family not in spec.gpu_families:
        kinds = [kind for kind in kinds if kind != "gpu"]
    if not kinds:
        raise SpaceError(
            f"{spec.name} ({backend}) runs on a GPU only and this host has "
            f"{'no GPU' if not host.gpus else 'no GPU of the families ' + str(spec.gpu_families)}"
            "; tune it on a stack with one"
        )
    own = [group.kind for group in spec.instance_groups if group.kind in kinds]
    return tuple(sorted(kinds, key=lambda kind: kind not in own))


def batch_sizes(spec: ModelSpec) -> tuple[int, ...]:
    """Powers of two up to the backend's bound (and the spec's own value)."""
    if spec.backend in FIXED_BATCH_LIMIT_BACKENDS:
        upper = spec.max_batch_size
    else:
        upper = min(max(spec.max_batch_size, 64), MAX_BATCH_LIMIT)
    sizes = {2**power for power in range(upper.bit_length()) if 2**power <= upper}
    return tuple(sorted(sizes | {spec.max_batch_size} - {0}))


def preferred_options(spec: ModelSpec) -> tuple[Preferred, ...]:
    """None, the batch of each concurrency level the spec names (above 1), and max_batch_size."""
    levels = (
        sorted({level for level in spec.objectives.concurrency if level > 1})
        if spec.objectives
        else []
    )
    return ("none", *(str(level) for level in levels), "max")


def delays_us(spec: ModelSpec) -> tuple[int, ...]:
    """Queue delays below the p99 objective (a longer wait can never meet it)."""
    own = spec.dynamic_batching.max_queue_delay_us if spec.dynamic_batching else 0
    limit_ms = spec.objectives.p99_latency_ms if spec.objectives else None
    delays = set(DEFAULT_DELAYS_US) | {own}
    if limit_ms is not None:
        delays = {delay for delay in delays if delay < limit_ms * 1000}
    return tuple(sorted(delays))


def candidate_spec(spec: ModelSpec, candidate: Candidate, *, tunes_instances: bool) -> ModelSpec:
    """``spec`` with the candidate's settings, validated by the spec's own checks."""
    data = spec.model_dump()
    data["max_batch_size"] = candidate.max_batch_size
    if candidate.max_batch_size > 0:
        batching = dict(data.get("dynamic_batching") or DynamicBatching().model_dump())
        batching["max_queue_delay_us"] = candidate.max_queue_delay_us
        batching["preferred_batch_sizes"] = candidate.preferred_batch_sizes
        data["dynamic_batching"] = batching
    if tunes_instances:
        group = dict(data["instance_groups"][0]) if data["instance_groups"] else {}
        group.update(kind=candidate.kind, count=candidate.instance_count)
        if candidate.kind != "gpu":
            group["gpus"] = []
        data["instance_groups"] = [InstanceGroup.model_validate(group).model_dump()]
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as error:
        raise ValueError(_first_reason(error)) from None


def _first_reason(error: Exception) -> str:
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        return str(first.get("msg", error)).removeprefix("Value error, ")
    return str(error)
