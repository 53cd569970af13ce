"""Service graph -> Grafana provisioning: the Prometheus datasource and the Triton dashboard.

Grafana reads these at start (`/etc/grafana/provisioning`, dashboards from
`/var/lib/grafana/dashboards`), so a fresh host shows the dashboard with nothing clicked. The
panels use only metrics Triton exports; `DASHBOARD_QUERIES` lists them for the test that holds
them against a running Triton.

    files = render_grafana_files(graph, header)
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from generators.serving_stack.graph import PROMETHEUS_PORT, ServiceGraph

DATASOURCE_UID = "prometheus"
DASHBOARD_UID = "gpufleet-triton"
DASHBOARD_FILE = "dashboards/triton.json"
# Grafana's own variable: at least four scrape intervals, so rate() always has two samples.
RATE_WINDOW = "$__rate_interval"

# (panel title, unit, [(legend, PromQL)]): the dashboard, as data.
DASHBOARD_QUERIES: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    (
        "Throughput (inferences/s)",
        "ops",
        (("{{model}}", f"sum by (model) (rate(nv_inference_count[{RATE_WINDOW}]))"),),
    ),
    (
        "Request latency p50 / p99 (ms)",
        "ms",
        (
            (
                "{{model}} p50",
                'max by (model) (nv_inference_request_summary_us{quantile="0.5"}) / 1000',
            ),
            (
                "{{model}} p99",
                'max by (model) (nv_inference_request_summary_us{quantile="0.99"}) / 1000',
            ),
        ),
    ),
    (
        "Queue vs compute per request (ms)",
        "ms",
        tuple(
            (
                f"{{{{model}}}} {part}",
                f"sum by (model) (rate(nv_inference_{metric}_duration_us[{RATE_WINDOW}])) / 1000"
                f" / sum by (model) (rate(nv_inference_request_success[{RATE_WINDOW}]))",
            )
            for part, metric in (
                ("queue", "queue"),
                ("compute input", "compute_input"),
                ("compute infer", "compute_infer"),
                ("compute output", "compute_output"),
            )
        ),
    ),
    (
        "Failed requests/s",
        "reqps",
        (("{{model}}", f"sum by (model) (rate(nv_inference_request_failure[{RATE_WINDOW}]))"),),
    ),
    (
        "GPU utilization",
        "percentunit",
        (("GPU {{gpu_uuid}}", "nv_gpu_utilization"),),
    ),
    (
        "GPU memory used",
        "bytes",
        (
            ("used {{gpu_uuid}}", "nv_gpu_memory_used_bytes"),
            ("total {{gpu_uuid}}", "nv_gpu_memory_total_bytes"),
        ),
    ),
)


def render_grafana_files(graph: ServiceGraph, header: str) -> dict[str, str]:
    """Provisioning files (relative to ./grafana) and the dashboard JSON."""
    datasources = {
        "apiVersion": 1,
        "datasources": [
            {
                "name": "Prometheus",
                "uid": DATASOURCE_UID,
                "type": "prometheus",
                "access": "proxy",
                "url": f"http://prometheus:{PROMETHEUS_PORT}",
                "isDefault": True,
                "editable": False,
            }
        ],
    }
    providers = {
        "apiVersion": 1,
        "providers": [
            {
                "name": "gpufleet",
                "type": "file",
                "disableDeletion": True,
                "allowUiUpdates": False,
                "options": {
                    "path": "/var/lib/grafana/dashboards",
                    "foldersFromFilesStructure": False,
                },
            }
        ],
    }
    return {
        "provisioning/datasources/prometheus.yml": header + _yaml(datasources),
        "provisioning/dashboards/gpufleet.yml": header + _yaml(providers),
        # JSON has no comments: the dashboard's description names its generator instead.
        DASHBOARD_FILE: json.dumps(triton_dashboard(graph), indent=2, sort_keys=True) + "\n",
    }


def triton_dashboard(graph: ServiceGraph) -> dict[str, Any]:
    panels = []
    for index, (title, unit, queries) in enumerate(DASHBOARD_QUERIES):
        panels.append(
            {
                "id": index + 1,
                "type": "timeseries",
                "title": title,
                "datasource": {"type": "prometheus", "uid": DATASOURCE_UID},
                "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [
                    {
                        "refId": chr(ord("A") + number),
                        "datasource": {"type": "prometheus", "uid": DATASOURCE_UID},
                        "expr": expr,
                        "legendFormat": legend,
                    }
                    for number, (legend, expr) in enumerate(queries)
                ],
            }
        )
    return {
        "uid": DASHBOARD_UID,
        "title": f"Triton - {graph.stack} / {graph.host}",
        "description": "Generated by gpufleet from the stack's spec; edit the spec, not this.",
        "tags": ["gpufleet", "triton"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": False,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "panels": panels,
    }


def _yaml(document: dict[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False, width=1000)
