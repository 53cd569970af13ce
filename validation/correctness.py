"""The correctness gate: replay each model version's golden examples through Triton.

A server that answers every request with HTTP 200 can still serve the wrong weights (an old
version, a different preprocessing). The golden examples logged with a model version hold inputs
and the outputs that version must give; this gate sends each example to Triton over gRPC, names
the version explicitly, and compares every output with numpy's ``allclose`` rule
(``|actual - expected| <= atol + rtol * |expected|``). One check per model version:

    targets = [CorrectnessTarget("tabular_mlp", 2, examples, atol=1e-5, rtol=1e-4)]
    report = run_correctness_gate("127.0.0.1:18001", targets, stack="local")

``pass``: every example matches; ``fail``: one does not (the first failing example is named);
``error``: the check could not run (Triton unreachable, version not loaded, no examples).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc as triton_grpc
from numpy.typing import NDArray
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from gpufleet.registry.golden import GoldenExample
from validation.report import CheckResult, GateReport, Status

GATE = "correctness"
REQUEST_TIMEOUT_S = 30.0
WRONG_WEIGHTS_HINT = (
    "the served weights are not the ones the golden examples were made with: "
    "wrong version or preprocessing?"
)
# gRPC status codes that mean "nobody answered", not "the model refused the request".
_UNREACHABLE_CODES = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")


@dataclass(frozen=True)
class CorrectnessTarget:
    """One served model version and the golden examples it must reproduce."""

    model: str
    version: int
    examples: list[GoldenExample]
    atol: float
    rtol: float

    @property
    def check_name(self) -> str:
        return f"{self.model} v{self.version}"


@dataclass(frozen=True)
class _Mismatch:
    """Why one example did not match; ``unreachable`` when Triton stopped answering."""

    message: str
    measurements: dict[str, Any]
    unreachable: bool = False


class _CouldNotRun(Exception):
    """The check cannot run; the message says why and what to do."""


def run_correctness_gate(
    grpc_url: str,
    targets: Sequence[CorrectnessTarget],
    *,
    stack: str = "",
    admin_headers: dict[str, str] | None = None,
) -> GateReport:
    """Replay every target's golden examples through Triton at ``grpc_url``; one check each.

    ``admin_headers`` (Triton's admin key) let an error say which versions Triton knows: the
    repository index is a restricted API.
    """
    with triton_grpc.InferenceServerClient(grpc_url) as client:
        checks = [_check_target(client, grpc_url, target, admin_headers) for target in targets]
    return GateReport(GATE, checks, stack)


def _check_target(
    client: triton_grpc.InferenceServerClient,
    grpc_url: str,
    target: CorrectnessTarget,
    admin_headers: dict[str, str] | None,
) -> CheckResult:
    started = time.monotonic()
    status: Status
    try:
        _ensure_ready(client, grpc_url, target, admin_headers)
        status, message, measurements = _compare_examples(client, target)
    except _CouldNotRun as reason:
        status, message, measurements = "error", str(reason), {}
    return CheckResult(
        target.check_name,
        status,
        message,
        {"atol": target.atol, "rtol": target.rtol, **measurements},
        time.monotonic() - started,
    )


def _ensure_ready(
    client: triton_grpc.InferenceServerClient,
    grpc_url: str,
    target: CorrectnessTarget,
    admin_headers: dict[str, str] | None,
) -> None:
    if not target.examples:
        raise _CouldNotRun(
            f"{target.check_name} has no golden examples; log them with the model "
            "(golden_examples.json in the version's artifacts)"
        )
    try:
        live = client.is_server_live(client_timeout=REQUEST_TIMEOUT_S)
        ready = live and client.is_model_ready(
            target.model, str(target.version), client_timeout=REQUEST_TIMEOUT_S
        )
    except InferenceServerException as error:
        raise _CouldNotRun(
            f"Triton at {grpc_url} is not answering ({_first_line(error)}); start it "
            "(gpufleet up) or check the gRPC address"
        ) from None
    if not live:
        raise _CouldNotRun(f"Triton at {grpc_url} answers but is not live; see its log")
    if not ready:
        known = _index_state(client, target, admin_headers)
        raise _CouldNotRun(
            f"model {target.model!r} version {target.version} is not ready on Triton at "
            f"{grpc_url} ({known}); load that version (is it in the model repository and "
            "allowed by the version policy?)"
        )


def _index_state(
    client: triton_grpc.InferenceServerClient,
    target: CorrectnessTarget,
    admin_headers: dict[str, str] | None,
) -> str:
    """What Triton's repository index says about the model version, for the error message."""
    try:
        index = client.get_model_repository_index(
            headers=admin_headers, as_json=True, client_timeout=REQUEST_TIMEOUT_S
        )
    except InferenceServerException as error:
        return f"the repository index could not be read: {_first_line(error)}"
    entries = [e for e in index.get("models", []) if e.get("name") == target.model]
    if not entries:
        return "the repository has no such model"
    for entry in entries:
        if entry.get("version") == str(target.version):
            reason = str(entry.get("reason") or "").strip()
            state = entry.get("state") or "not loaded"
            return f"state {state}" + (f": {_first_line(reason)}" if reason else "")
    versions = sorted(str(e.get("version")) for e in entries if e.get("version"))
    if not versions:
        return "the model is in the repository but not loaded"
    return f"versions Triton knows: {', '.join(versions)}"


def _compare_examples(
    client: triton_grpc.InferenceServerClient, target: CorrectnessTarget
) -> tuple[Status, str, dict[str, Any]]:
    max_abs_diff = 0.0
    for index, example in enumerate(target.examples):
        outcome = _compare_example(client, target, index, example)
        if isinstance(outcome, _Mismatch):
            if outcome.unreachable:
                raise _CouldNotRun(outcome.message)
            return "fail", outcome.message, outcome.measurements
        max_abs_diff = max(max_abs_diff, outcome)
    count = len(target.examples)
    noun = "example matches" if count == 1 else "examples match"
    message = f"{count} {noun} (max abs diff {max_abs_diff:.2g})"
    return "pass", message, {"examples": count, "max_abs_diff": max_abs_diff}


def _compare_example(
    client: triton_grpc.InferenceServerClient,
    target: CorrectnessTarget,
    index: int,
    example: GoldenExample,
) -> float | _Mismatch:
    """The largest absolute difference over the example's outputs, or why it does not match."""
    try:
        result = _infer(client, target, example)
    except InferenceServerException as error:
        return _refused(target, index, error)
    max_abs_diff = 0.0
    for name, expected in sorted(example.outputs.items()):
        actual = result.as_numpy(name)
        mismatch = _output_mismatch(index, name, actual, expected, target.atol, target.rtol)
        if mismatch is not None:
            return mismatch
        if expected.size:
            difference = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
            max_abs_diff = max(max_abs_diff, float(difference.max()))
    return max_abs_diff


def _infer(
    client: triton_grpc.InferenceServerClient, target: CorrectnessTarget, example: GoldenExample
) -> Any:
    inputs = []
    for name, tensor in sorted(example.inputs.items()):
        array = np.asarray(tensor)
        request_input = triton_grpc.InferInput(
            name, list(array.shape), np_to_triton_dtype(array.dtype)
        )
        request_input.set_data_from_numpy(array)
        inputs.append(request_input)
    outputs = [triton_grpc.InferRequestedOutput(name) for name in sorted(example.outputs)]
    return client.infer(
        target.model,
        inputs,
        model_version=str(target.version),
        outputs=outputs,
        client_timeout=REQUEST_TIMEOUT_S,
    )


def _refused(target: CorrectnessTarget, index: int, error: InferenceServerException) -> _Mismatch:
    text = _first_line(error)
    if any(code in str(error.status()) for code in _UNREACHABLE_CODES):
        return _Mismatch(
            f"Triton stopped answering at example {index}: {text}", {}, unreachable=True
        )
    return _Mismatch(
        f"example {index}: Triton refused the request: {text}; the golden examples do not fit "
        f"the interface of the served {target.check_name}: wrong version or preprocessing?",
        {"failed_example": index},
    )


def _output_mismatch(
    index: int,
    name: str,
    actual: NDArray[Any] | None,
    expected: NDArray[Any],
    atol: float,
    rtol: float,
) -> _Mismatch | None:
    """None when ``actual`` matches ``expected`` within ``atol + rtol * |expected|``."""
    where = f"example {index}, output {name!r}"
    if actual is None:
        return _Mismatch(
            f"{where}: missing from Triton's response; {WRONG_WEIGHTS_HINT}",
            {"failed_example": index, "output": name},
        )
    if actual.shape != expected.shape:
        return _Mismatch(
            f"{where}: shape {list(actual.shape)} differs from the expected "
            f"{list(expected.shape)}; {WRONG_WEIGHTS_HINT}",
            {"failed_example": index, "output": name},
        )
    got, want = actual.astype(np.float64), expected.astype(np.float64)
    if np.all(np.isclose(got, want, rtol=rtol, atol=atol)):
        return None
    difference = np.abs(got - want)
    difference[np.isnan(difference)] = np.inf  # NaN never matches, as in np.allclose
    worst = np.unravel_index(int(np.argmax(difference)), difference.shape)
    allowed = atol + rtol * abs(float(want[worst]))
    max_abs_diff = float(difference[worst])
    message = (
        f"{where}: max abs diff {max_abs_diff:.3g} exceeds the tolerance atol {atol:g} + rtol "
        f"{rtol:g} x |expected| ({allowed:.3g} there: got {float(got[worst]):.6g}, expected "
        f"{float(want[worst]):.6g}); {WRONG_WEIGHTS_HINT}"
    )
    measurements = {"failed_example": index, "output": name, "max_abs_diff": max_abs_diff}
    return _Mismatch(message, measurements)


def _first_line(error: object) -> str:
    """The first line of an error (gRPC errors carry their status code: [StatusCode.X] ...)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
