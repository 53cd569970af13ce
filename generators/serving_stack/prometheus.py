"""Service graph -> Prometheus's `prometheus.yml` and the Triton alert rules.

Prometheus scrapes Triton's metrics port over the stack's internal network (the port is not
published). The rules use only metrics Triton exports (checked against a running Triton in
tests/test_serving_monitoring.py); each alert has a `promtool test rules` case there too.

    files = render_prometheus_files(graph, spec.serving.monitoring.alerts)
"""

from __future__ import annotations

from typing import Any

import yaml

from generators.serving_stack.graph import PROMETHEUS_PORT, TRITON_METRICS, ServiceGraph
from gpufleet.spec.serving import AlertThresholds

RULES_FILE = "rules/triton.rules.yml"
TRITON_JOB = "triton"


def render_prometheus_files(
    graph: ServiceGraph, alerts: AlertThresholds, header: str
) -> dict[str, str]:
    """`prometheus.yml` and the rule file, relative to the mounted /etc/prometheus."""
    interval = f"{graph.scrape_interval_s}s"
    config: dict[str, Any] = {
        "global": {
            "scrape_interval": interval,
            "evaluation_interval": interval,
            "external_labels": {"stack": graph.stack, "host": graph.host},
        },
        "rule_files": [RULES_FILE],
        "scrape_configs": [
            {
                "job_name": TRITON_JOB,
                "static_configs": [
                    {"targets": [f"triton:{TRITON_METRICS}"], "labels": {"host": graph.host}}
                ],
            },
            {
                "job_name": "prometheus",
                "static_configs": [{"targets": [f"127.0.0.1:{PROMETHEUS_PORT}"]}],
            },
        ],
    }
    return {
        "prometheus.yml": header + _dump(config),
        RULES_FILE: header + _dump({"groups": [alert_rules(alerts)]}),
    }


def alert_rules(alerts: AlertThresholds) -> dict[str, Any]:
    """The rule group: Triton down, queue time high, error ratio high, GPU memory near full."""
    window = "5m"
    # Triton counts per model and version; summed per model so a new version is one series.
    requests = (
        f"sum by (model) (rate(nv_inference_request_success[{window}]))"
        f" + sum by (model) (rate(nv_inference_request_failure[{window}]))"
    )
    queue_ms = (
        f"sum by (model) (rate(nv_inference_queue_duration_us[{window}])) / 1000"
        f" / sum by (model) (rate(nv_inference_request_success[{window}]))"
    )
    errors = f"sum by (model) (rate(nv_inference_request_failure[{window}])) / ({requests})"
    return {
        "name": "gpufleet-triton",
        "rules": [
            {
                "alert": "TritonDown",
                "expr": f'up{{job="{TRITON_JOB}"}} == 0',
                "for": f"{alerts.down_for_s}s",
                "labels": {"severity": "critical"},
                "annotations": {
                    "summary": "Triton on {{ $labels.host }} does not answer Prometheus",
                    "description": "The metrics endpoint of {{ $labels.instance }} has been "
                    f"unreachable for {alerts.down_for_s} s: the server is down or restarting.",
                },
            },
            {
                "alert": "TritonQueueTimeHigh",
                "expr": f"({queue_ms}) > {alerts.queue_time_ms:g}",
                "for": "5m",
                "labels": {"severity": "warning"},
                "annotations": {
                    "summary": "Requests for {{ $labels.model }} wait {{ $value | humanize }} ms "
                    "in Triton's queue",
                    "description": f"Mean queue time above {alerts.queue_time_ms:g} ms for 5 "
                    "minutes: add instances, GPUs or hosts, or lower max_queue_delay_us.",
                },
            },
            {
                "alert": "TritonErrorRatioHigh",
                "expr": f"({errors}) > {alerts.error_ratio:g}",
                "for": "5m",
                "labels": {"severity": "critical"},
                "annotations": {
                    "summary": "{{ $labels.model }} fails {{ $value | humanizePercentage }} of "
                    "its requests",
                    "description": f"More than {alerts.error_ratio:.1%} of requests failed for "
                    "5 minutes; Triton's log names the reason.",
                },
            },
            {
                "alert": "GpuMemoryNearFull",
                "expr": (
                    "(nv_gpu_memory_used_bytes / nv_gpu_memory_total_bytes)"
                    f" > {alerts.gpu_memory_ratio:g}"
                ),
                "for": "10m",
                "labels": {"severity": "warning"},
                "annotations": {
                    "summary": "GPU {{ $labels.gpu_uuid }} on {{ $labels.host }} is "
                    "{{ $value | humanizePercentage }} full",
                    "description": f"GPU memory above {alerts.gpu_memory_ratio:.0%} for 10 "
                    "minutes: the next model load or a larger batch may fail.",
                },
            },
        ],
    }


def _dump(document: dict[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False, width=1000)
