"""The rollout's bookkeeping on its own: the gateway log tallied per version, the limits judged
on it, the routes each phase gives the gateway, and the record read back or refused.

Real: log lines in the format nginx writes (generators/gateway.py's log_format, as JSON), files
on disk. No server (tests/test_rollout_local.py runs the whole chain).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from generators.gateway import ModelRoute
from gpufleet.rollout.limits import check_limits
from gpufleet.rollout.state import RolloutRecord, active_records, record_path
from gpufleet.rollout.traffic import read_access_log
from gpufleet.spec.rollout import RolloutLimits


def write_log(path: Path, entries: list[tuple[str, str, int, float]]) -> None:
    fields = ("model", "version", "status", "request_time")
    lines = [
        json.dumps({"msec": 1.0, **dict(zip(fields, entry, strict=True)), "uri": "/"})
        for entry in entries
    ]
    path.write_text("\n".join(lines) + "\n")


def record(**changes: object) -> RolloutRecord:
    fields: dict[str, object] = {
        "stack": "s",
        "model": "m",
        "strategy": "canary",
        "stable": 1,
        "candidate": 2,
        "candidate_uri": "models:/m@candidate",
        "phase": "serving",
        "candidate_percent": 10.0,
    }
    return RolloutRecord(**{**fields, **changes})  # type: ignore[arg-type]


def test_the_log_is_tallied_per_version_of_the_model_from_the_offset(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    write_log(log, [("m", "1", 200, 0.5)])
    offset = log.stat().st_size
    entries = [("m", "1", 200, 0.001 * n) for n in range(1, 101)]
    entries += [("m", "2", 200, 0.004), ("m", "2", 503, 0.002), ("m", "2", 400, 0.001)]
    entries += [("other", "2", 500, 9.0), ("m", "", 200, 9.0)]  # another model; unrouted
    write_log(log, [("m", "1", 200, 0.5), *entries])
    traffic = read_access_log(log, "m", offset=offset)
    assert sorted(traffic) == [1, 2]
    stable, candidate = traffic[1].summary(), traffic[2].summary()
    assert (stable["requests"], stable["failures"], stable["p99_ms"]) == (100, 0, 99.0)
    assert stable["p50_ms"] == 50.0
    assert (candidate["requests"], candidate["failures"]) == (3, 2)
    assert read_access_log(tmp_path / "missing.log", "m") == {}


def summary(requests: int, failures: int, p99_ms: float) -> dict[str, object]:
    return {
        "requests": requests,
        "failures": failures,
        "error_ratio": failures / requests,
        "p99_ms": p99_ms,
    }


@pytest.mark.parametrize(
    ("stable", "candidate", "breached"),
    [
        (summary(500, 0, 10.0), summary(100, 0, 12.0), []),
        (summary(500, 0, 10.0), summary(100, 5, 12.0), ["max_error_ratio"]),
        (summary(500, 0, 10.0), summary(100, 0, 31.0), ["max_p99_ratio"]),
        (summary(500, 0, 0.0), summary(100, 0, 2.5), ["max_p99_ratio"]),  # 0 ms counts as 1
        (summary(500, 0, 10.0), summary(99, 50, 99.0), []),  # too few to judge yet
    ],
)
def test_limits_compare_the_candidate_with_the_stable_version(
    stable: dict[str, object], candidate: dict[str, object], breached: list[str]
) -> None:
    limits = RolloutLimits(max_error_ratio=0.01, max_p99_ratio=2.0, min_requests=100)
    found = check_limits(record(), {"1": stable, "2": candidate}, limits)
    assert [breach.limit for breach in found] == breached
    assert all("candidate v2" in breach.message for breach in found)


def test_each_phase_gives_the_gateway_a_route_that_names_the_version() -> None:
    assert record(phase="loading").route() == ModelRoute("m", "blue_green", 1, 2, 0.0)
    assert record(phase="draining", pinned=2).route() == ModelRoute("m", "blue_green", 1, 2, 100)
    assert record().route() == ModelRoute("m", "canary", 1, 2, 10.0)
    assert record(phase="rolled_back").route() == ModelRoute("m")


def test_the_record_round_trips_and_a_damaged_one_is_refused(tmp_path: Path) -> None:
    original = record(history=[{"event": "start"}])
    path = record_path(tmp_path, "m")
    original.save(path)
    assert RolloutRecord.load(path) == original
    assert [item.model for item in active_records(tmp_path)] == ["m"]
    record(phase="promoted").save(path)
    assert active_records(tmp_path) == []
    path.write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a gpufleet rollout record"):
        RolloutRecord.load(path)
