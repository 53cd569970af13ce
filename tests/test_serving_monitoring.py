"""The generated dashboard and alert rules hold against the metrics Triton really exports.

Real: the tritonserver binary of the nvidia-pytriton wheel serving a python-backend model with
the stack's metrics flags (`--metrics-config=summary_latencies=true`); Debian's Prometheus
binary scraping it on loopback and loading the generated rule file; every dashboard query run
through Prometheus's HTTP API after a short load. Not real: Grafana (neither Debian nor PyPI
packages it), so the dashboard JSON is checked query by query instead of rendered; and no GPU,
so the GPU panels' and the GPU alert's metrics (nv_gpu_*) are absent here and checked by name
against Triton's documented GPU metrics only.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
import yaml

from generators.serving_stack.grafana import DASHBOARD_QUERIES, RATE_WINDOW, render_grafana_files
from generators.serving_stack.graph import build_service_graph
from generators.serving_stack.prometheus import RULES_FILE, render_prometheus_files
from gpufleet.spec.serving import AlertThresholds
from gpufleet.spec.stack import StackSpec
from tests.serving_models import FEATURES, MODEL_NAME, write_affine_model
from tests.triton_fixtures import TritonServerFactory
from validation.loopback import LOOPBACK, die_with_parent, pick_free_ports, stop_process_group
from validation.tritonserver import LocalTritonServer

# Triton's GPU metrics (docs/user_guide/metrics.md, "GPU Metrics"): exported only where DCGM
# sees a GPU, so never on this machine.
TRITON_GPU_METRICS = {
    "nv_gpu_utilization",
    "nv_gpu_memory_total_bytes",
    "nv_gpu_memory_used_bytes",
    "nv_gpu_power_usage",
    "nv_gpu_power_limit",
    "nv_energy_consumption",
}
_METRIC = re.compile(r"\b(nv_[a-z_]+|up)\b")


def graph_and_files() -> tuple[dict[str, str], dict[str, str]]:
    spec = StackSpec.model_validate(
        {
            "environment": "static",
            "hosts": [{"name": "h", "address": "10.0.0.9"}],
            "serving": {},
            "registry": {"tracking_uri": "https://mlflow.example.internal"},
        }
    )
    graph = build_service_graph("mon", spec, spec.hosts[0], [])
    return (
        render_prometheus_files(graph, AlertThresholds(), header=""),
        render_grafana_files(graph, header=""),
    )


def metrics_used() -> set[str]:
    prometheus_files, _ = graph_and_files()
    names = {
        m
        for _, _, queries in DASHBOARD_QUERIES
        for _, expr in queries
        for m in _METRIC.findall(expr)
    }
    names |= set(_METRIC.findall(prometheus_files[RULES_FILE]))
    return names - {"up"}


@pytest.fixture
def loaded_triton(triton_server_factory: TritonServerFactory, tmp_path: Path) -> LocalTritonServer:
    """Triton with the stack's metrics flags, after 40 requests (4 of them failing)."""
    repository = tmp_path / "repository"
    write_affine_model(repository)
    server = triton_server_factory(
        repository, extra_args=["--allow-metrics=true", "--metrics-config=summary_latencies=true"]
    )
    client = httpclient.InferenceServerClient(server.http_url)
    for index in range(40):
        batch = np.full((2, FEATURES), index, dtype=np.float32)
        tensor = httpclient.InferInput("INPUT0", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        if index % 10 == 9:  # the model fails it: Triton counts a failed request
            tensor.set_data_from_numpy(np.full((2, FEATURES), np.nan, dtype=np.float32))
            with pytest.raises(Exception, match="INPUT0 holds NaN"):
                client.infer(MODEL_NAME, [tensor])
            continue
        result = client.infer(MODEL_NAME, [tensor]).as_numpy("OUTPUT0")
        assert np.array_equal(result, 2 * batch + 1)
    return server


def exported_families(server: LocalTritonServer) -> set[str]:
    with urllib.request.urlopen(f"http://{server.metrics_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def test_every_metric_the_dashboard_and_rules_use_is_one_triton_exports(
    loaded_triton: LocalTritonServer,
) -> None:
    used = metrics_used()
    exported = exported_families(loaded_triton)
    assert "nv_inference_request_summary_us" in exported, "summary_latencies is on"
    gpu = {name for name in used if name.startswith("nv_gpu_")}
    assert gpu <= TRITON_GPU_METRICS
    assert gpu, "the GPU panels and alert are there"
    assert not exported & TRITON_GPU_METRICS, "no GPU here: Triton exports no GPU metrics"
    assert used - gpu <= exported, f"not exported by Triton: {sorted(used - gpu - exported)}"


@pytest.fixture
def prometheus_scraping(loaded_triton: LocalTritonServer, tmp_path: Path) -> Iterator[str]:
    """Debian's Prometheus on loopback, scraping that Triton every second, with the rules."""
    prometheus_files, _ = graph_and_files()
    config_dir = tmp_path / "prometheus"
    (config_dir / "rules").mkdir(parents=True)
    (config_dir / RULES_FILE).write_text(prometheus_files[RULES_FILE])
    generated = yaml.safe_load(prometheus_files["prometheus.yml"])
    # The generated job, pointed at the loopback Triton instead of the compose service name.
    triton_job = generated["scrape_configs"][0]
    triton_job["static_configs"][0]["targets"] = [loaded_triton.metrics_url]
    generated["global"].update(scrape_interval="1s", evaluation_interval="1s")
    generated["scrape_configs"] = [triton_job]
    (config_dir / "prometheus.yml").write_text(yaml.safe_dump(generated))
    (port,) = pick_free_ports(1)
    with (tmp_path / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config_dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address={LOOPBACK}:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            process_group=0,
            preexec_fn=die_with_parent,
        )
    try:
        yield f"http://{LOOPBACK}:{port}"
    finally:
        stop_process_group(process, timeout_s=20)


def query(prometheus: str, expr: str) -> list[dict[str, object]]:
    """Run `expr` as Grafana would: its $__rate_interval is 4 scrape intervals, at least 1m."""
    expr = expr.replace(RATE_WINDOW, "1m")
    url = f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    result = body["data"]["result"]
    assert isinstance(result, list)
    return result


def wait_for(prometheus: str, expr: str, timeout_s: float = 60.0) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if result := query(prometheus, expr):
                return result
        except OSError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise AssertionError(f"{expr!r} returned no data in {timeout_s:g} s")
        time.sleep(1)


def test_the_dashboard_queries_return_data_from_prometheus_scraping_triton(
    prometheus_scraping: str, loaded_triton: LocalTritonServer
) -> None:
    wait_for(prometheus_scraping, 'up{job="triton"} == 1')
    # rate() needs two samples of a series that changed: keep the load going for a while.
    client = httpclient.InferenceServerClient(loaded_triton.http_url)
    batch = np.ones((1, FEATURES), dtype=np.float32)
    tensor = httpclient.InferInput("INPUT0", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        client.infer(MODEL_NAME, [tensor])
        time.sleep(0.05)
    checked = 0
    for title, _, queries in DASHBOARD_QUERIES:
        for _, expr in queries:
            if "nv_gpu_" in expr:
                assert query(prometheus_scraping, expr) == [], "no GPU: an empty panel, no error"
                continue
            result = wait_for(prometheus_scraping, expr)
            assert {series["metric"].get("model") for series in result} == {MODEL_NAME}, title  # type: ignore[union-attr]
            checked += 1
    assert checked >= 7
    throughput = query(prometheus_scraping, DASHBOARD_QUERIES[0][2][0][1])
    assert float(throughput[0]["value"][1]) > 0  # type: ignore[index]
    failures = query(prometheus_scraping, 'sum(nv_inference_request_failure{model="affine"})')
    assert float(failures[0]["value"][1]) == 4  # type: ignore[index]


def test_prometheus_loads_every_generated_rule_healthy(prometheus_scraping: str) -> None:
    wait_for(prometheus_scraping, 'up{job="triton"} == 1')
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(f"{prometheus_scraping}/api/v1/rules", timeout=10) as answer:
            groups = json.loads(answer.read())["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        evaluated = all(rule.get("lastEvaluation", "").startswith("2") for rule in rules)
        if rules and evaluated and all(rule["health"] == "ok" for rule in rules):
            break
        assert time.monotonic() < deadline, f"rules not evaluated healthy: {rules}"
        time.sleep(1)
    assert {rule["name"] for rule in rules} == {
        "TritonDown",
        "TritonQueueTimeHigh",
        "TritonErrorRatioHigh",
        "GpuMemoryNearFull",
    }
    assert all(rule["state"] == "inactive" for rule in rules), "a healthy Triton alerts nothing"


def test_the_dashboard_json_is_provisioned_against_the_prometheus_datasource() -> None:
    _, grafana_files = graph_and_files()
    dashboard = json.loads(grafana_files["dashboards/triton.json"])
    datasources = yaml.safe_load(grafana_files["provisioning/datasources/prometheus.yml"])
    (source,) = datasources["datasources"]
    assert source["url"] == "http://prometheus:9090"
    uids = {
        target["datasource"]["uid"] for panel in dashboard["panels"] for target in panel["targets"]
    }
    assert uids == {source["uid"]}
    assert [panel["title"] for panel in dashboard["panels"]] == [t for t, _, _ in DASHBOARD_QUERIES]
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
