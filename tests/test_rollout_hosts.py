"""`gpufleet rollout` on a static stack of two hosts: canary, rollback and promotion, for real.

Real: the `gpufleet` CLI as separate processes; two Debian 12 hosts (containers with systemd and
sshd on a Docker engine, tests/docker_hosts.py) brought up by `gpufleet up` (Ansible, Docker
inside each host, docker-compose) with the generated serving stack, its gateway included:
Debian's nginx in a container of its own, configured from the spec and reloaded over SSH; each
host's Triton loading the candidate through its repository API with the stack's admin key; an
MLflow registry on this machine that the candidates are registered in; HTTP load through each
host's gateway on its own address (validation/http_load.py, the load gate's client).
Not real: no GPU; the Triton and gateway images are the project's stand-ins
(tests/serving_images.py), shipped to the hosts as image archives.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import chi2

from gpufleet.registry.demo import demo_network, golden_inputs, register_torch_model
from gpufleet.rollout.state import RolloutRecord
from gpufleet.spec.loading import load_model_spec_file
from gpufleet.spec.model import ModelSpec
from tests.environment_site import HOSTS, MODEL, SECRETS, SITE, Site
from tests.process_environment import environment_variables
from validation.http_load import LoadResult, SteadyLoad, infer_body

ALPHA = 0.001
GATEWAY_HTTP = 8080  # the gateway's default host port (gpufleet/spec/serving.py)
CANARY = """rollout:
  strategy: canary
  candidate: models:/tabular_mlp@candidate
  weight: 10
  sticky_header: x-user-id
  # The split is under test: two equal versions' p99 differ by 2x on a busy machine.
  limits: {max_p99_ratio: 50}
"""
BLUE_GREEN = """rollout:
  strategy: blue_green
  candidate: models:/tabular_mlp@candidate
"""


@pytest.fixture(scope="module")
def site(shared_site: Site) -> Site:
    """The shared site (tests/environment_site.py), brought to the stack's state by an `up`."""
    started = time.monotonic()
    up = shared_site.gpufleet("up", "--stack", SITE, "--only", "host", "--json")
    shared_site.seconds["up"] = time.monotonic() - started
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-6000:]
    return shared_site


def specs(site: Site, name: str, rollout: str) -> Path:
    """A specs directory whose model spec has this `rollout:` section."""
    target = site.project / f"specs-{name}"
    target.mkdir(exist_ok=True)
    base = (site.project / "modelconfigs" / f"{MODEL}.yaml").read_text()
    (target / f"{MODEL}.yaml").write_text(base + rollout)
    return target


def rollout(site: Site, verb: str, specs_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = ["rollout", verb, "--stack", SITE, "--model", MODEL, "--specs", str(specs_dir)]
    return site.gpufleet(*command, *args, timeout=900)


def spec_of(site: Site) -> ModelSpec:
    return load_model_spec_file(site.project / "modelconfigs" / f"{MODEL}.yaml").spec


def registry_login() -> contextlib.AbstractContextManager[None]:
    """The registry's login in this process's environment (the MLflow client reads it there)."""
    return environment_variables(SECRETS)


def register_candidate(site: Site, seed: int) -> int:
    spec = spec_of(site).model_copy(update={"source": f"models:/{MODEL}@candidate"})
    with registry_login():
        return register_torch_model(site.registry, spec, demo_network(spec, seed=seed)).version


def served_versions(site: Site, host: str, candidates: range) -> list[int]:
    """The versions of the model each host's Triton answers ready for (no key needed)."""
    ready = []
    for version in candidates:
        url = f"http://{site.addresses[host]}:8000/v2/models/{MODEL}/versions/{version}/ready"
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                if answer.status == 200:
                    ready.append(version)
        except urllib.error.HTTPError:
            pass
    return ready


def load(site: Site, host: str, **options: object) -> SteadyLoad:
    (request,) = golden_inputs(spec_of(site), seed=5)[:1]
    (tensor,) = request.values()
    body = infer_body("features", tensor)
    address = f"{site.addresses[host]}:{GATEWAY_HTTP}"
    return SteadyLoad(address, MODEL, body, **options)  # type: ignore[arg-type]


def record(site: Site) -> RolloutRecord:
    found = RolloutRecord.load(site.project / "build" / SITE / "rollout" / f"{MODEL}.json")
    assert found is not None
    return found


def answered(load_: SteadyLoad, count: int) -> None:
    mark = len(load_.result.answers)
    deadline = time.monotonic() + 300
    while len(load_.result.answers) < mark + count:
        assert time.monotonic() < deadline, "the load stalled"
        time.sleep(0.05)


def print_load(label: str, result: LoadResult) -> None:
    print(
        f"{label}: {len(result.answers)} answers, {len(result.failures)} failed, "
        f"{result.resent} resent, versions {dict(result.versions())}"
    )


def test_canary_at_10_percent_through_the_hosts_gateways_then_rollback_under_load(
    site: Site,
) -> None:
    candidate = register_candidate(site, seed=11)
    canary = specs(site, "canary", CANARY)
    before = {host: site.triton_container(host)["State"]["StartedAt"] for host in HOSTS}
    started = rollout(site, "start", canary)
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-6000:]
    for host in HOSTS:
        assert served_versions(site, host, range(1, candidate + 1)) == [1, candidate], host
        # A live deploy: the new version's files reached the host, and Triton loaded it through
        # its API; the role, told so by the run's extra var, did not restart Triton for them.
        started_at = site.triton_container(host)["State"]["StartedAt"]
        assert started_at == before[host], f"{host}: Triton was restarted"
    assert record(site).phase == "serving"

    # 4,000 requests without a key through serve-a's gateway: 10% to the candidate.
    split = load(site, "serve-a", total=4000, threads=4).start().wait()
    print_load("canary", split)
    assert not split.failures, split.failures[:3]
    counts = split.versions()
    observed = np.array([counts["1"], counts[str(candidate)]])
    assert observed.sum() == 4000
    expected = np.array([0.9, 0.1]) * 4000
    statistic = float(((observed - expected) ** 2 / expected).sum())
    p_value = float(chi2.sf(statistic, df=1))
    print(f"canary split {observed.tolist()}, chi-square {statistic:.3f}, p {p_value:.4f}")
    assert p_value > ALPHA, (observed, statistic)

    # The same key reaches the same version, through either host's gateway.
    by_key: dict[str | None, set[str]] = {}
    sticky_counts: dict[str, int] = {}
    for host in HOSTS:
        sticky = load(
            site, host, total=600, threads=4, key_header="x-user-id",
            key_of=lambda index: f"user-{index % 200}",
        ).start().wait()  # fmt: skip
        assert not sticky.failures, sticky.failures[:3]
        for answer in sticky.answers:
            by_key.setdefault(answer.key, set()).add(answer.version)
        for version, count in sticky.versions().items():
            sticky_counts[version] = sticky_counts.get(version, 0) + count
    assert len(by_key) == 200
    assert all(len(versions) == 1 for versions in by_key.values())
    assert 0 < sum(versions == {str(candidate)} for versions in by_key.values()) < 200

    # status: the gateways' logs (read over SSH, summed over hosts) count what callers got.
    status = rollout(site, "status", canary, "--json")
    assert status.returncode == 0, status.stdout[-3000:] + status.stderr[-3000:]
    report = json.loads(status.stdout)
    gateway = report["gateway"]
    assert gateway["1"]["requests"] == counts["1"] + sticky_counts["1"]
    assert gateway[str(candidate)]["requests"] == (
        counts[str(candidate)] + sticky_counts[str(candidate)]
    )
    assert gateway[str(candidate)]["failures"] == 0
    assert report["triton"][str(candidate)]["success"] >= gateway[str(candidate)]["requests"]

    # The rollout is what the stack serves now, not drift: the repository's config and each
    # gateway's nginx.conf with both versions and the canary route, both loaded in each Triton.
    drift = site.gpufleet(
        "drift", "--stack", SITE, "--specs", str(canary), "--layer", "files", "--layer",
        "triton", "--json", timeout=600,
    )  # fmt: skip
    assert drift.returncode == 0, drift.stdout[-4000:] + drift.stderr[-3000:]

    # Rollback under a steady load through serve-a: no caller sees a failure, and every
    # answer after it is the stable version's.
    with load(site, "serve-a", threads=4) as steady:
        answered(steady, 100)
        rolled = rollout(site, "rollback", canary)
        after = len(steady.result.answers)
        answered(steady, 200)
    print_load("rollback", steady.result)
    assert rolled.returncode == 0, rolled.stdout[-3000:] + rolled.stderr[-6000:]
    assert not steady.result.failures, steady.result.failures[:3]
    assert {answer.version for answer in steady.result.answers[after + 4 :]} == {"1"}
    assert record(site).phase == "rolled_back"
    for host in HOSTS:
        assert served_versions(site, host, range(1, candidate + 1)) == [1], host


def test_blue_green_switch_and_promotion_under_load_fail_no_request(site: Site) -> None:
    green = register_candidate(site, seed=41)
    blue_green = specs(site, "blue-green", BLUE_GREEN)
    started = rollout(site, "start", blue_green)
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-6000:]

    with load(site, "serve-b", threads=4) as steady:
        answered(steady, 100)
        before_switch = len(steady.result.answers)
        switched = rollout(site, "switch", blue_green)
        after_switch = len(steady.result.answers)
        answered(steady, 100)
        promoted = rollout(site, "promote", blue_green)
        after_promote = len(steady.result.answers)
        answered(steady, 100)
    print_load("switch and promote", steady.result)
    assert switched.returncode == 0, switched.stdout[-3000:] + switched.stderr[-3000:]
    assert promoted.returncode == 0, promoted.stdout[-3000:] + promoted.stderr[-6000:]
    answers = steady.result.answers
    assert not steady.result.failures, steady.result.failures[:3]
    # A margin of one answer per sender: one may have been counted just after the mark.
    assert {answer.version for answer in answers[:before_switch]} == {"1"}
    assert {answer.version for answer in answers[after_switch + 4 :]} == {str(green)}
    assert {answer.version for answer in answers[after_promote + 4 :]} == {str(green)}

    # Promotion moved the alias, and each host serves green alone.
    with registry_login():
        assert site.registry.resolve(f"models:/{MODEL}@production").version == green
    for host in HOSTS:
        assert served_versions(site, host, range(1, green + 1)) == [green], host
    events = [entry["event"] for entry in record(site).history]
    assert {"switched", "promote", "alias moved", "old version unloaded"} <= set(events)


def test_a_stack_without_a_gateway_is_refused_before_anything_runs(tmp_path: Path) -> None:
    """No site needed: the spec alone says there is no gateway (exit 2, nothing written)."""
    (tmp_path / "stacks").mkdir()
    (tmp_path / "modelconfigs").mkdir()
    sample = Path(__file__).resolve().parent.parent / "modelconfigs" / f"{MODEL}.yaml"
    (tmp_path / "modelconfigs" / f"{MODEL}.yaml").write_text(sample.read_text() + CANARY)
    config = {
        "gpufleet:environment": "static",
        "gpufleet:models": [MODEL],
        "gpufleet:hosts": [{"name": "gpu-a", "address": "10.9.0.4"}],
        "gpufleet:registry": {"host": "gpu-a"},
        "gpufleet:serving": {"publish": ["triton_grpc", "mlflow"]},
    }
    (tmp_path / "stacks" / "Pulumi.nogw.yaml").write_text(yaml.safe_dump({"config": config}))
    result = subprocess.run(
        [sys.executable, "-m", "gpufleet", "rollout", "start", "--stack", "nogw", "--model", MODEL],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "stack 'nogw' has no gateway to split traffic with" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "build").exists()
