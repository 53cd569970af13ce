"""`gpufleet drift` on a static stack of two Debian 12 hosts: every layer against real hosts,
drift injected on the hosts for real, found with its layer, host and object, then repaired by
the command the items name; clean before the injections and after the repair.

Real: two Debian 12 hosts (containers with systemd, sshd and their own Docker engine, reached
over SSH with strict host key checking), Ansible in check mode through ansible-runner, the
serving stack's containers (Triton stand-in with torch, MLflow, Prometheus, Grafana) inspected
over SSH, each host's Triton over gRPC with the admin key, a real MLflow registry on this
machine. Nothing is mocked. The site takes minutes to build: this module shares it with
test_environment_up and test_rollout_hosts (tests/environment_site.py), and its hosts run the
rollout gateway too. The tests run in order; each leaves the site repaired for the next.
"""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import jsonschema
import pytest

from tests.conftest import PROJECT_ROOT
from tests.environment_site import HOSTS, MODEL, SITE, Site
from tests.test_environment_up import _wait_for_triton

DAEMON_JSON = "/etc/docker/daemon.json"

REPORT_SCHEMA = json.loads((PROJECT_ROOT / "schemas/drift-report.schema.json").read_text())


@pytest.fixture(scope="module")
def site(shared_site: Site) -> Site:
    """The shared site (tests/environment_site.py), brought to the stack's state by an `up`."""
    shared_site.runs["drift"] = shared_site.gpufleet("up", "--stack", SITE, "--only", "host")
    return shared_site


def drift(site: Site, *args: str) -> tuple[int, dict[str, Any]]:
    before = time.monotonic()
    result = site.gpufleet("drift", "--stack", SITE, "--json", *args)
    site.seconds[f"drift {' '.join(args)}".strip()] = time.monotonic() - before
    assert result.stdout.strip(), result.stderr[-4000:]
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["exit_code"] == result.returncode
    jsonschema.validate(report, REPORT_SCHEMA)  # the documented schema
    return result.returncode, report


def repair(site: Site, items: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    [command] = {item["repair"] for item in items}
    assert command == f"gpufleet up --stack {SITE}"
    result = site.gpufleet("up", "--stack", SITE, "--only", "host")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _wait_for_triton(site)
    return result


def assert_clean(site: Site) -> dict[str, Any]:
    code, report = drift(site)
    assert report["items"] == [], report["items"]
    assert code == 0, [check for check in report["checks"] if check["error"]]
    layers = {(check["layer"], check["host"]) for check in report["checks"]}
    for host in HOSTS:
        assert {("triton", host), ("hosts", host), ("containers", host)} <= layers
    assert ("files", "") in layers
    return report


def test_the_site_up_is_in_sync_on_every_layer(site: Site) -> None:
    first = site.runs["drift"]
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = assert_clean(site)
    containers = {
        check["host"]: check["checked"]
        for check in report["checks"]
        if check["layer"] == "containers"
    }
    for host in HOSTS:
        assert "container triton" in containers[host]
    tritons = [check for check in report["checks"] if check["layer"] == "triton"]
    assert all(f"model {MODEL} versions" in check["checked"] for check in tritons)
    assert all(f"model {MODEL} files" in check["checked"] for check in tritons)
    assert report["not_applicable"] == {}


def test_daemon_json_edited_image_changed_and_a_model_file_edited(site: Site) -> None:
    """serve-a: daemon.json edited (hosts) and Triton recreated from another image reference
    (containers); serve-b: a served model file edited (triton: its sha256 against the
    lineage). Each attributed to its host. (Each host runs Triton alone: the stopped container
    is the next test's.)"""
    serve_a = site.hosts["serve-a"]
    daemon = json.loads(serve_a.exec(f"cat {DAEMON_JSON}").stdout)
    daemon["log-opts"] = {**daemon.get("log-opts", {}), "max-size": "999m"}
    serve_a.exec(f"cat > {DAEMON_JSON}", input=json.dumps(daemon))
    triton = site.triton_container("serve-a")
    original_image = triton["Config"]["Image"]
    site.inner_docker("serve-a", "tag", original_image, "local/drift-other:1")
    compose = "/opt/gpufleet/serving/docker-compose.yml"
    serve_a.exec(f"sed -i 's#image: {original_image}$#image: local/drift-other:1#' {compose}")
    serve_a.exec(  # the compose the serving_stack role found there (Debian's: v1)
        "cd /opt/gpufleet/serving && if docker compose version >/dev/null 2>&1; then "
        'compose="docker compose"; else compose=docker-compose; fi; '
        f"$compose --project-name gpufleet-{SITE} --file docker-compose.yml up --detach triton",
        timeout=300,
    )
    model_file = f"/opt/gpufleet/serving/model_repository/{MODEL}/1/model.py"
    site.hosts["serve-b"].exec(f"echo '# edited on the host' >> {model_file}")
    _wait_for_triton(site)  # serve-a's Triton was recreated

    code, report = drift(site, "--layer", "hosts", "--layer", "containers", "--layer", "triton")
    assert code == 1, [check for check in report["checks"] if check["error"]]
    hosts_items = [item for item in report["items"] if item["layer"] == "hosts"]
    assert {item["host"] for item in hosts_items} == {"serve-a"}
    assert any("999m" in item["found"] for item in hosts_items), hosts_items
    [image] = [item for item in report["items"] if item["layer"] == "containers"]
    assert (image["host"], image["object"]) == ("serve-a", "container triton")
    assert (image["expected"], image["found"]) == (
        f"image {original_image}",
        "image local/drift-other:1",
    )
    [edited] = [item for item in report["items"] if item["layer"] == "triton"]
    assert (edited["host"], edited["object"]) == ("serve-b", f"model {MODEL} files")
    assert edited["found"].startswith(f"{model_file}: sha256 ")

    repair(site, report["items"])
    assert_clean(site)


def test_triton_down_on_one_host_exits_2_and_the_other_layers_are_reported(site: Site) -> None:
    name = site.triton_container("serve-b")["Name"].lstrip("/")
    site.inner_docker("serve-b", "stop", "--time", "5", name)
    try:
        code, report = drift(site, "--layer", "triton", "--layer", "containers")
    finally:
        site.inner_docker("serve-b", "start", name)
    assert code == 2
    errors = {(check["layer"], check["host"]) for check in report["checks"] if check["error"]}
    assert errors == {("triton", "serve-b")}
    [served] = [c for c in report["checks"] if c["layer"] == "triton" and c["host"] == "serve-a"]
    assert served["items"] == []
    assert f"model {MODEL} config" in served["checked"]
    stopped = [item for item in report["items"] if item["host"] == "serve-b"]
    assert [(item["layer"], item["object"]) for item in stopped] == [
        ("containers", "container triton")
    ]
    _wait_for_triton(site)
    assert_clean(site)
