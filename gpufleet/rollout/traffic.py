"""What each version of a model answered during a rollout, from two sources that agree:

- the gateway's access log (one JSON object per request, generators/gateway.py): requests,
  failures (status >= 400, or no answer) and latency percentiles per version, as callers saw
  them;
- Triton's per-version statistics (its gRPC statistics API): successes and failures each
  version counted itself, which includes the mirrored requests of a shadow the gateway does not
  log (their answers never reach a caller).

    traffic = read_access_log(Path("build/local/gateway/access.log"), "tabular_mlp", offset=0)
    counts = triton_version_counts("127.0.0.1:18001", "tabular_mlp", admin_headers)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Any answer but a success counts as a failure of the version that gave it: a version that is
# not loaded answers 400 too, and a caller's malformed request fails on every version alike.
FAILED_STATUS = 400


@dataclass
class VersionTraffic:
    """Requests one version answered through the gateway, with their latencies in seconds."""

    version: int
    requests: int = 0
    failures: int = 0
    latencies_s: list[float] = field(default_factory=list)

    @property
    def error_ratio(self) -> float:
        return self.failures / self.requests if self.requests else 0.0

    def percentile_ms(self, fraction: float) -> float | None:
        """The latency below which `fraction` of requests finished (nearest rank), in ms."""
        if not self.latencies_s:
            return None
        ordered = sorted(self.latencies_s)
        rank = max(1, math.ceil(fraction * len(ordered)))
        return ordered[rank - 1] * 1000.0

    def summary(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "requests": self.requests,
            "failures": self.failures,
            "error_ratio": round(self.error_ratio, 6),
            "p50_ms": _rounded(self.percentile_ms(0.50)),
            "p99_ms": _rounded(self.percentile_ms(0.99)),
        }


def read_access_log(path: Path, model: str, *, offset: int = 0) -> dict[int, VersionTraffic]:
    """Per version: `model`'s infer requests in the gateway's log from byte `offset` on."""
    try:
        with path.open("rb") as log:
            log.seek(offset)
            lines = log.read().splitlines()
    except FileNotFoundError:
        return {}
    return parse_log_lines(lines, model)


def tally(entries: Iterable[dict[str, Any]], model: str) -> dict[int, VersionTraffic]:
    by_version: dict[int, VersionTraffic] = {}
    for entry in entries:
        if entry.get("model") != model or not str(entry.get("version", "")).isdigit():
            continue
        version = int(entry["version"])
        traffic = by_version.setdefault(version, VersionTraffic(version))
        traffic.requests += 1
        status = int(entry.get("status", 0))
        if status >= FAILED_STATUS or status == 0:
            traffic.failures += 1
        traffic.latencies_s.append(float(entry.get("request_time", 0.0)))
    return dict(sorted(by_version.items()))


def log_size(path: Path) -> int:
    """Where the next request's line will start (0 when there is no log yet)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def merge_traffic(parts: Iterable[dict[int, VersionTraffic]]) -> dict[int, VersionTraffic]:
    """Several gateways' traffic (one per host) summed per version."""
    merged: dict[int, VersionTraffic] = {}
    for part in parts:
        for version, traffic in part.items():
            total = merged.setdefault(version, VersionTraffic(version))
            total.requests += traffic.requests
            total.failures += traffic.failures
            total.latencies_s.extend(traffic.latencies_s)
    return dict(sorted(merged.items()))


def parse_log_lines(lines: list[bytes], model: str) -> dict[int, VersionTraffic]:
    """Per version: `model`'s infer requests in these access-log lines."""
    return tally(_entries(lines), model)


def triton_version_counts(
    grpc_url: str, model: str, headers: dict[str, str] | None = None
) -> dict[int, dict[str, int]]:
    """Per loaded version: Triton's own count of successful and failed inferences (its
    statistics API, restricted on generated stacks: `headers` carry the admin key)."""
    import tritonclient.grpc as triton_grpc
    from tritonclient.utils import InferenceServerException

    try:
        with triton_grpc.InferenceServerClient(grpc_url) as client:
            statistics = client.get_inference_statistics(
                model, headers=headers, as_json=True, client_timeout=10.0
            )
    except InferenceServerException:
        return {}
    counts = {}
    for stats in statistics.get("model_stats", []):
        inference = stats.get("inference_stats", {})
        counts[int(stats["version"])] = {
            "success": int(inference.get("success", {}).get("count", 0)),
            "fail": int(inference.get("fail", {}).get("count", 0)),
        }
    return counts


def _entries(lines: list[bytes]) -> Iterable[dict[str, Any]]:
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line being written right now
        if isinstance(entry, dict):
            yield entry


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
