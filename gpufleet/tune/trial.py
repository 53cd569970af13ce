"""One trial: a candidate config loaded into a running Triton and measured with the load gate.

The candidate is rendered by the generator (``render_model_config``) and sent as a config
override with an explicit load (``POST v2/repository/models/<m>/load`` with
``parameters.config``): Triton swaps the model's config without a restart and without touching
the repository. Each of the spec's concurrency levels is then measured with the load gate's own
method (``validation.load.measure_level``: perf_analyzer's windows), after two uncounted warm-up
windows at the highest level. A candidate Triton refuses
to load is recorded with Triton's reason and skipped.

    target = TritonTarget(control, grpc_url, repository, synthetic_request(spec))
    request = TrialRequest(space.spec_for(candidate), candidate, (1, 8), settings, number=1)
    trial = target.run_trial(request)

``TuningTarget`` is what a tuning run needs of the server it measures on; ``TritonTarget`` is
the real one, and the offline replay (bench/tune_replay.py) and the tests stand in for it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as pb

from generators.triton_config import render_model_config
from gpufleet.spec.model import ModelSpec
from gpufleet.spec.stack import LoadGateSettings
from gpufleet.tune.space import Candidate
from validation.load import LevelMeasurement, measure_level

_LIVE_TIMEOUT_S = 10.0

NUMPY_DTYPES = {
    "bool": np.bool_,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "fp16": np.float16,
    "fp32": np.float32,
    "fp64": np.float64,
    "string": np.object_,
}


class ModelLoader(Protocol):
    """What a trial needs of Triton's control API (validation.tritonserver.LocalTritonServer)."""

    def load_model(self, name: str, config: str | None = None) -> None: ...


@dataclass(frozen=True)
class TrialRequest:
    """One measurement a tuning run asks of its target: serve ``spec`` (``candidate``'s config,
    or the spec as written when ``baseline``) and measure it at ``levels``."""

    spec: ModelSpec
    candidate: Candidate
    levels: tuple[int, ...]
    settings: LoadGateSettings
    number: int  # the trial's place in the run, from 1
    baseline: bool = False  # the spec's own settings, as written
    repeat: int = 0  # 0: the first measurement of this config; n: the n-th re-measurement

    def trial(
        self,
        levels: tuple[LevelResult, ...] = (),
        *,
        load_error: str = "",
        duration_s: float = 0.0,
        load_s: float = 0.0,
    ) -> Trial:
        """The trial of this request, with what it measured."""
        return Trial(
            self.number,
            self.candidate,
            levels,
            load_error,
            duration_s,
            load_s,
            baseline=self.baseline,
            repeat=self.repeat,
        )


class TuningTarget(Protocol):
    """What a tuning run needs of the server it measures on."""

    @property
    def address(self) -> str: ...

    def run_trial(self, request: TrialRequest) -> Trial:
        """Serve the request's spec and measure it at its levels; a config the server refuses
        is a trial with its reason, not an error."""
        ...

    def live(self) -> bool:
        """Whether the server still answers (a refusal from a live server is the config's)."""
        ...

    def restore(self, spec: ModelSpec) -> None:
        """Serve the model with its repository's own config again; raises when that fails."""
        ...


@dataclass(frozen=True)
class TritonTarget:
    """The Triton a tuning run works on: its control API, its gRPC address, the model
    repository whose config it is put back on at the end, and the request each trial sends."""

    control: ModelLoader
    grpc_url: str
    repository: Path
    inputs: dict[str, npt.NDArray[Any]] = field(compare=False, repr=False)

    @property
    def address(self) -> str:
        return f"Triton at {self.grpc_url}"

    def run_trial(self, request: TrialRequest) -> Trial:
        """Load the request's spec as a config override, then measure each level; never raises
        for a candidate Triton refuses (the trial records why)."""
        name, settings, levels = request.spec.name, request.settings, request.levels
        started = time.monotonic()
        try:
            self.control.load_model(name, config=config_override(request.spec))
        except Exception as error:  # any refusal (TritonModelControlError, a lost connection)
            elapsed = time.monotonic() - started
            return request.trial(load_error=_first_line(error), duration_s=elapsed, load_s=elapsed)
        loaded = time.monotonic()
        # Two windows at the highest level, not counted: the first requests after a load meet
        # instances still warming up (the python stub's first torch call), which read as noise.
        warmup = settings.model_copy(update={"stable_windows": 2, "max_windows": 2})
        measure_level(self.grpc_url, name, self.inputs, max(levels), warmup)
        measured = tuple(
            LevelResult.of(measure_level(self.grpc_url, name, self.inputs, level, settings))
            for level in levels
        )
        return request.trial(
            measured, duration_s=time.monotonic() - started, load_s=loaded - started
        )

    def live(self) -> bool:
        import tritonclient.grpc as triton_grpc

        try:
            with triton_grpc.InferenceServerClient(self.grpc_url) as client:
                return bool(client.is_server_live(client_timeout=_LIVE_TIMEOUT_S))
        except Exception:  # refused, timed out, reset: not live
            return False

    def restore(self, spec: ModelSpec) -> None:
        config = repository_config_override(self.repository, spec.name)
        self.control.load_model(spec.name, config=config)


def repository_config_override(repository: Path, model: str) -> str:
    """The repository's ``config.pbtxt`` of ``model`` as a load override.

    A plain load after a load with an override leaves the override in place (Triton 2.51 sees
    unchanged files and keeps the model as it is), so the config is put back explicitly.
    """
    message = text_format.Parse(
        (repository / model / "config.pbtxt").read_text(encoding="utf-8"), pb.ModelConfig()
    )
    return json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True))


@dataclass(frozen=True)
class LevelResult:
    """What a trial measured at one concurrency level (the figures the objective needs)."""

    concurrency: int
    throughput_per_s: float
    p99_ms: float
    p50_ms: float
    errors: int
    stable: bool
    first_error: str = ""

    @classmethod
    def of(cls, level: LevelMeasurement) -> LevelResult:
        return cls(
            concurrency=level.concurrency,
            throughput_per_s=level.throughput_per_s,
            p99_ms=level.p99_ms,
            p50_ms=level.p50_ms,
            errors=level.errors,
            stable=level.stable,
            first_error=level.first_error,
        )


@dataclass(frozen=True)
class Trial:
    """One candidate, loaded (or refused by Triton) and measured once."""

    number: int
    candidate: Candidate
    levels: tuple[LevelResult, ...] = ()
    load_error: str = ""
    duration_s: float = 0.0
    load_s: float = 0.0
    baseline: bool = False  # the spec's own settings, as written
    repeat: int = 0  # 0: first measurement of this candidate; n: the n-th re-measurement

    @property
    def loaded(self) -> bool:
        return not self.load_error

    def as_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "candidate": self.candidate.as_dict(),
            "label": self.candidate.label,
            "baseline": self.baseline,
            "repeat": self.repeat,
            "load_error": self.load_error,
            "duration_s": round(self.duration_s, 3),
            "load_s": round(self.load_s, 3),
            "levels": [level.__dict__ for level in self.levels],
        }


def config_override(spec: ModelSpec) -> str:
    """The spec as Triton's JSON model config (the form the load API's override takes)."""
    message = render_model_config(spec)
    return json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True))


def synthetic_request(spec: ModelSpec, seed: int = 0) -> dict[str, npt.NDArray[Any]]:
    """One request of batch size 1: seeded data of each input's dtype and shape (-1 -> 1)."""
    rng = np.random.default_rng(seed)
    request: dict[str, npt.NDArray[Any]] = {}
    for tensor in spec.inputs:
        if tensor.optional:
            continue
        shape = [1 if dim == -1 else dim for dim in tensor.shape]
        if spec.max_batch_size > 0:
            shape = [1, *shape]
        dtype = NUMPY_DTYPES.get(tensor.dtype)
        if dtype is None:
            raise ValueError(f"input {tensor.name!r}: dtype {tensor.dtype} has no numpy type")
        if tensor.dtype == "string":
            request[tensor.name] = np.full(shape, b"0", dtype=np.object_)
        elif tensor.dtype.startswith("fp"):
            request[tensor.name] = rng.standard_normal(shape).astype(dtype)
        else:
            request[tensor.name] = np.zeros(shape, dtype=dtype)
    return request


def _first_line(error: object) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
