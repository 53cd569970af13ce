"""The gateway's nginx.conf: rendered from routes, parsed back, and accepted by `nginx -t`.

Real: Debian's nginx (`nginx -t` checks every rendered file, as the gateway does before a
reload) and crossplane, nginx's parser, reading the output back. Routing with live traffic
through a real Triton is tests/test_rollout_local.py's job.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path
from typing import Any

import crossplane
import pytest
import yaml

from generators.gateway import (
    GatewayConfigError,
    GatewaySettings,
    ModelRoute,
    render_gateway_config,
)
from generators.serving_stack.files import render_serving_files
from gpufleet.spec.loading import load_model_specs, load_stack_spec, select_stack_models
from tests.conftest import SAMPLE_SPECS

ROUTES = {
    "none": [],
    "direct": [ModelRoute("m")],
    "canary": [ModelRoute("m", "canary", 1, 2, 10.0, "x-user-id")],
    "canary-random": [ModelRoute("m.v2-b", "canary", 3, 1, 12.5)],
    "shadow": [ModelRoute("m", "shadow", 1, 2)],
    "blue": [ModelRoute("m", "blue_green", 1, 2, 0.0)],
    "green": [ModelRoute("m", "blue_green", 1, 2, 100.0)],
    "all": [
        ModelRoute("a", "canary", 1, 2, 10.0, "x-user-id"),
        ModelRoute("b", "shadow", 4, 5),
        ModelRoute("c", "blue_green", 1, 2, 100.0),
        ModelRoute("d"),
    ],
}


def settings(work: Path, listen: str = "127.0.0.1") -> GatewaySettings:
    return GatewaySettings(
        http_listen=f"{listen}:18580",
        grpc_listen=f"{listen}:18581",
        triton_http="127.0.0.1:18000",
        triton_grpc="127.0.0.1:18001",
        work_dir=str(work),
        access_log=str(work / "access.log"),
        error_log=str(work / "error.log"),
    )


def parsed(work: Path, text: str) -> list[dict[str, Any]]:
    path = work / "nginx.conf"
    path.write_text(text)
    # nginx -t is the judge of validity; crossplane 0.5.8 predates some directives.
    result = crossplane.parse(str(path), single=True, check_ctx=False, check_args=False)
    assert result["status"] == "ok", result["errors"]
    config: list[dict[str, Any]] = result["config"][0]["parsed"]
    return config


def find(block: list[dict[str, Any]], directive: str, *args: str) -> list[dict[str, Any]]:
    """Every `directive` (with these leading args) anywhere under `block`."""
    found = []
    for node in block:
        if node["directive"] == directive and node["args"][: len(args)] == list(args):
            found.append(node)
        found.extend(find(node.get("block", []), directive, *args))
    return found


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_nginx_accepts_every_strategy(tmp_path: Path, name: str) -> None:
    text = render_gateway_config(settings(tmp_path), ROUTES[name])
    (tmp_path / "nginx.conf").write_text(text)
    checked = subprocess.run(
        [
            "nginx",
            "-t",
            "-p",
            str(tmp_path),
            "-e",
            str(tmp_path / "error.log"),
            "-c",
            str(tmp_path / "nginx.conf"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr


def test_a_canary_splits_on_the_sticky_header_or_at_random(tmp_path: Path) -> None:
    config = parsed(tmp_path, render_gateway_config(settings(tmp_path), ROUTES["canary"]))
    (mapping,) = find(config, "map", "$http_x_user_id")
    assert {(n["directive"], n["args"][0]) for n in mapping["block"]} == {
        ("", "$request_id"),  # no header: a random id
        ("default", "$http_x_user_id"),
    }
    key = mapping["args"][1]
    (split,) = find(config, "split_clients")
    assert split["args"][0] == f"m:{key}"
    assert [(n["directive"], n["args"]) for n in split["block"]] == [("10%", ["2"]), ("*", ["1"])]
    (location,) = find(config, "location", "=", "/v2/models/m/infer")
    assert find(location["block"], "set", "$gpufleet_version", split["args"][1])
    (rewrite,) = find(location["block"], "rewrite")
    assert rewrite["args"] == ["^", "/v2/models/m/versions/$gpufleet_version/infer", "break"]


def test_a_shadow_answers_from_stable_and_mirrors_to_the_candidate(tmp_path: Path) -> None:
    config = parsed(tmp_path, render_gateway_config(settings(tmp_path), ROUTES["shadow"]))
    (location,) = find(config, "location", "=", "/v2/models/m/infer")
    assert find(location["block"], "set", "$gpufleet_version", "1")
    (mirror,) = find(location["block"], "mirror")
    (shadow,) = find(config, "location", "=", mirror["args"][0])
    assert find(shadow["block"], "internal")
    (rewrite,) = find(shadow["block"], "rewrite")
    assert rewrite["args"][1] == "/v2/models/m/versions/2/infer"


@pytest.mark.parametrize(("name", "version"), [("blue", "1"), ("green", "2")])
def test_blue_green_sends_everything_to_one_version(
    tmp_path: Path, name: str, version: str
) -> None:
    config = parsed(tmp_path, render_gateway_config(settings(tmp_path), ROUTES[name]))
    (location,) = find(config, "location", "=", "/v2/models/m/infer")
    assert find(location["block"], "set", "$gpufleet_version", version)
    assert not find(config, "split_clients")
    assert not find(config, "mirror")


def test_grpc_passes_through_and_operator_apis_are_closed(tmp_path: Path) -> None:
    config = parsed(tmp_path, render_gateway_config(settings(tmp_path), ROUTES["all"]))
    (grpc_listen,) = find(config, "listen", "127.0.0.1:18581")
    assert grpc_listen["args"] == ["127.0.0.1:18581", "http2"]
    assert find(config, "grpc_pass", "grpc://triton_grpc")
    assert find(config, "location", "^~", "/v2/repository")[0]["block"][0]["args"] == ["403"]
    (closed,) = [
        node
        for node in find(config, "location", "~")
        if "Repository" in node["args"][1] and "SharedMemory" in node["args"][1]
    ]
    assert closed["block"][0]["args"] == ["403"]


def test_the_same_routes_give_the_same_bytes(tmp_path: Path) -> None:
    routes = list(ROUTES["all"])
    first = render_gateway_config(settings(tmp_path), routes)
    random.Random(7).shuffle(routes)  # noqa: S311 - an order, not a secret
    assert render_gateway_config(settings(tmp_path), routes) == first


@pytest.mark.parametrize(
    ("route", "listen", "expected"),
    [
        (ModelRoute("m"), "0.0.0.0", "bind the gateway to loopback or a private address"),  # noqa: S104
        (ModelRoute("m"), "8.8.8.8", "bind the gateway to loopback or a private address"),
        (ModelRoute("m"), "localhost", "is not IP:port"),
        (ModelRoute("m; evil"), "127.0.0.1", "is not a Triton model name"),
        (ModelRoute("m", "canary", 1, 1, 10.0), "127.0.0.1", "are both version 1"),
        (ModelRoute("m", "canary", 1, 2, 0.0), "127.0.0.1", "above 0 and below 100"),
        (ModelRoute("m", "blue_green", 1, 2, 50.0), "127.0.0.1", "0 or 100 percent"),
        (ModelRoute("m", "shadow", 1), "127.0.0.1", "needs both versions"),
        (ModelRoute("m", "canary", 1, 2, 5, "x y"), "127.0.0.1", "is not a header name"),
    ],
)
def test_routes_nginx_cannot_express_safely_are_refused(
    tmp_path: Path, route: ModelRoute, listen: str, expected: str
) -> None:
    with pytest.raises(GatewayConfigError, match=expected):
        render_gateway_config(settings(tmp_path, listen), [route])


# --- The generated serving stack's gateway --------------------------------------------------


def test_a_serving_stack_gateway_is_published_on_the_private_address_and_nginx_accepts_it(
    tmp_path: Path,
) -> None:
    """The generated stack's nginx.conf, its container directories mapped into a scratch
    directory, passes `nginx -t`; compose publishes it on the host's private address only."""
    stacks = tmp_path / "stacks"
    stacks.mkdir()
    fields = {
        "environment": "static",
        "models": ["tabular_mlp"],
        "hosts": [{"name": "cpu-a", "address": "10.1.2.3"}],
        "serving": {
            "gateway": {"http_port": 8080},
            "publish": ["gateway_http", "gateway_grpc", "triton_grpc"],
        },
        "registry": {"tracking_uri": "https://mlflow.example.internal"},
    }
    (stacks / "Pulumi.svc.yaml").write_text(
        yaml.safe_dump({"config": {f"gpufleet:{k}": v for k, v in fields.items()}})
    )
    loaded = load_stack_spec(stacks, "svc")
    files = render_serving_files(
        loaded, select_stack_models(loaded, load_model_specs(SAMPLE_SPECS))
    )
    compose = yaml.safe_load(files["cpu-a/docker-compose.yml"])
    gateway = compose["services"]["gateway"]
    assert gateway["ports"] == ["10.1.2.3:8080:8080", "10.1.2.3:8081:8081"]
    assert "ports" not in compose["services"]["triton"] or all(
        port.startswith("10.1.2.3:") for port in compose["services"]["triton"]["ports"]
    )
    assert gateway["depends_on"] == {"triton": {"condition": "service_started"}}
    assert "nginx" in files["cpu-a/images/gateway/Dockerfile"]

    text = files["cpu-a/gateway/nginx.conf"]
    config = parsed(tmp_path, text)
    assert find(config, "server", "triton:8000")
    assert find(config, "grpc_pass", "grpc://triton_grpc")
    assert [node["args"] for node in find(config, "listen")] == [["8080"], ["8081", "http2"]]
    for container_dir in ("/var/lib/gpufleet-gateway", "/var/log/gpufleet-gateway"):
        text = text.replace(container_dir, str(tmp_path))
    # `triton` resolves inside the stack's network only: here it is this machine.
    text = text.replace("triton:", "127.0.0.1:")
    (tmp_path / "nginx.conf").write_text(text)
    checked = subprocess.run(
        [
            "nginx",
            "-t",
            "-p",
            str(tmp_path),
            "-e",
            str(tmp_path / "error.log"),
            "-c",
            str(tmp_path / "nginx.conf"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr


def test_a_hosts_gateway_config_follows_the_active_rollouts_as_the_deploy_step_writes_it(
    tmp_path: Path,
) -> None:
    """What a rollout writes over SSH (render_host_gateway_config) is byte for byte what the
    deploy step generates for that host with the active rollouts' routes, so a later
    `gpufleet up` copies nothing new; without an active rollout the model passes through."""
    from generators.serving_stack.files import render_host_gateway_config
    from gpufleet.lifecycle.deploy import write_serving_files
    from gpufleet.lifecycle.environment import load_environment
    from gpufleet.rollout.state import RolloutRecord, active_records, served_specs

    (tmp_path / "stacks").mkdir()
    (tmp_path / "modelconfigs").mkdir()
    spec = (SAMPLE_SPECS / "tabular_mlp.yaml").read_text()
    (tmp_path / "modelconfigs" / "tabular_mlp.yaml").write_text(spec)
    fields = {
        "environment": "static",
        "models": ["tabular_mlp"],
        "hosts": [
            {"name": "cpu-a", "address": "10.1.2.3"},
            {"name": "cpu-b", "address": "10.1.2.4"},
        ],
        "serving": {"gateway": {}, "publish": ["gateway_http", "triton_grpc"]},
        "registry": {"tracking_uri": "https://mlflow.example.internal"},
    }
    (tmp_path / "stacks" / "Pulumi.hosts.yaml").write_text(
        yaml.safe_dump({"config": {f"gpufleet:{k}": v for k, v in fields.items()}})
    )
    environment = load_environment("hosts", project_root=tmp_path)
    record = RolloutRecord("hosts", "tabular_mlp", "canary", 1, 2, "models:/tabular_mlp@c")
    record.phase, record.candidate_percent, record.sticky_header = "serving", 10.0, "x-user-id"
    record.save(environment.state_dir / "rollout" / "tabular_mlp.json")
    records = active_records(environment.state_dir)
    (served,) = served_specs(environment.models, records)
    assert served.spec.version_policy is not None
    assert served.spec.version_policy.specific == [1, 2]

    routes = [item.route() for item in records]
    write_serving_files(environment, say=lambda _: None, routes=routes)
    for host in ("cpu-a", "cpu-b"):
        written = environment.state_dir / "serving" / host / "gateway" / "nginx.conf"
        text = render_host_gateway_config(environment.loaded, host, environment.models, routes)
        assert written.read_text() == text
        config = parsed(tmp_path, text)
        (split,) = find(config, "split_clients")
        assert [node["directive"] for node in split["block"]] == ["10%", "*"]
        assert [node["args"] for node in split["block"]] == [["2"], ["1"]]
    direct = render_host_gateway_config(environment.loaded, "cpu-a", environment.models, [])
    assert not find(parsed(tmp_path, direct), "split_clients")
