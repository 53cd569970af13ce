"""The limits that stop a rollout, judged on the traffic each version answered so far.

Compared with the stable version over the same period, through the same gateway: the
candidate's error ratio against `max_error_ratio`, and its p99 against the stable version's p99
times `max_p99_ratio`. Nothing is judged before both versions answered `min_requests` (a p99 of
a dozen requests says little); a shadow's candidate is judged on the mirrored requests.

    breaches = check_limits(record, gateway_summary, spec.rollout.limits)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from gpufleet.rollout.state import RolloutRecord
from gpufleet.spec.rollout import RolloutLimits


@dataclass(frozen=True)
class LimitBreach:
    limit: str
    observed: float
    allowed: float
    message: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_limits(
    record: RolloutRecord, gateway: dict[str, dict[str, Any]], limits: RolloutLimits
) -> list[LimitBreach]:
    """The limits the candidate breaches (empty: none, or too few requests to judge yet)."""
    stable = gateway.get(str(record.stable))
    candidate = gateway.get(str(record.candidate))
    if stable is None or candidate is None:
        return []
    if min(stable["requests"], candidate["requests"]) < limits.min_requests:
        return []
    breaches = []
    if candidate["error_ratio"] > limits.max_error_ratio:
        breaches.append(
            LimitBreach(
                "max_error_ratio",
                candidate["error_ratio"],
                limits.max_error_ratio,
                f"candidate v{record.candidate} failed {candidate['failures']} of "
                f"{candidate['requests']} requests (ratio {candidate['error_ratio']:.4f} > "
                f"{limits.max_error_ratio:g})",
            )
        )
    stable_p99, candidate_p99 = stable["p99_ms"], candidate["p99_ms"]
    # nginx times requests in whole milliseconds: a stable p99 of 0 counts as 1 ms.
    allowed = max(stable_p99 or 0.0, 1.0) * limits.max_p99_ratio
    if candidate_p99 is not None and candidate_p99 > allowed:
        breaches.append(
            LimitBreach(
                "max_p99_ratio",
                candidate_p99,
                allowed,
                f"candidate v{record.candidate} p99 {candidate_p99:.1f} ms > "
                f"{limits.max_p99_ratio:g} x stable v{record.stable} p99 "
                f"{stable_p99 or 0.0:.1f} ms",
            )
        )
    return breaches
