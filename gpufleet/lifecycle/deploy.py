"""The deploy step: the model repository filled from the environment's registry (with lineage,
as on the local stack), the `config.pbtxt` files and each host's serving stack generated, then
the serving_stack role run on the hosts (playbooks/serving_stack.yml).

Files are written only where they changed, so a deploy with nothing new rewrites nothing, copies
nothing and restarts no container (the role reports changed=0).

A model under an active rollout (`<state_dir>/rollout/<model>.json`, gpufleet/rollout/) is served
at both its stable and its candidate version, and each host's gateway routes it as the rollout
says, also across `gpufleet up`. A rollout's own deploy passes `live=True`: the role then
restarts neither Triton nor the gateway, and the models are loaded through Triton's API
(converge_tritons), so no request fails meanwhile; the rollout reloads the gateways itself.

    outcomes = deploy(environment, ["gpu-a", "gpu-b"], say=print)
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import time
from collections.abc import Iterator, Sequence

from generators.gateway import ModelRoute
from generators.model_repository import (
    apply_plan,
    plan_files,
)
from generators.registry_repository import AssemblyError, fill_repository, served_versions
from generators.serving_stack.files import (
    generated_files_on_disk,
    render_serving_files,
    serving_directory,
)
from generators.serving_stack.graph import ServiceGraphError
from gpufleet.configure.runner import SERVING_PLAYBOOK
from gpufleet.drift.triton import (
    ConvergeError,
    TritonTarget,
    check_triton,
    converge_triton,
    expected_models,
)
from gpufleet.lifecycle.ansible_step import Say, run_playbook
from gpufleet.lifecycle.environment import Environment
from gpufleet.lifecycle.gate import admin_key_headers, triton_grpc_url
from gpufleet.lifecycle.outcome import StepOutcome
from gpufleet.registry.client import RegistryError
from gpufleet.rollout.state import as_served
from gpufleet.spec.problems import SpecError

# The serving_stack role's switch for a live deploy (its defaults/main.yml says what it does).
LIVE_CHANGES = {"serving_stack_live_changes": True}


def deploy(
    environment: Environment,
    hosts: Sequence[str],
    *,
    say: Say,
    fill: bool = True,
    live: bool = False,
) -> list[StepOutcome]:
    """Fill the repository, generate the hosts' files, run the serving_stack role on `hosts`.

    `fill=False` deploys the repository as this machine holds it, without asking the registry:
    what a rebuild of the registry host does before its registry is restored (the registry runs
    on the host being deployed). `live=True`: model changes are loaded through Triton's API,
    never by restarting it, and the gateway is left for the caller to reload (a rollout)."""
    started = time.monotonic()
    try:
        served, routes = as_served(environment.models, environment.state_dir)
    except ValueError as error:
        return [StepOutcome("deploy", host, "error", [str(error)]) for host in hosts]
    environment = dataclasses.replace(environment, models=served)
    if environment.spec.serving is None:
        say(f"  stack {environment.name!r} has no gpufleet:serving: nothing to deploy")
        details = {"note": "no gpufleet:serving: nothing to deploy"}
        return [StepOutcome("deploy", host, "ok", details=dict(details)) for host in hosts]
    try:
        with _preparing(environment):
            models = (
                fill_from_registry(environment, say=say)
                if fill
                else repository_versions(environment, say=say)
            )
            write_serving_files(environment, say=say, routes=routes)
    except (RegistryError, AssemblyError) as error:
        return [StepOutcome("deploy", host, "error", [str(error)]) for host in hosts]
    except SpecError as error:
        reasons = [str(problem) for problem in error.problems]
        return [StepOutcome("deploy", host, "error", reasons) for host in hosts]
    prepared = time.monotonic() - started
    outcomes = run_playbook(
        environment,
        hosts,
        step="deploy",
        playbook=SERVING_PLAYBOOK,
        say=say,
        extra_vars=LIVE_CHANGES if live else None,
    )
    for outcome in outcomes:
        outcome.seconds += prepared
        outcome.details["models"] = models
    converge_tritons(environment, [outcome for outcome in outcomes if outcome.succeeded], say=say)
    return outcomes


def converge_tritons(
    environment: Environment, outcomes: Sequence[StepOutcome], *, say: Say
) -> None:
    """Each deployed host's Triton brought to what the specs and the registry say, also where
    no file changed (so the role restarted nothing): a model whose live config or loaded
    versions differ is reloaded with its generated config, one no spec names is unloaded. The
    drift check's triton layer decides (gpufleet/drift/triton.py). A Triton that cannot be
    asked (no admin key in the environment) is left as the role left it, and said so."""
    if not outcomes or environment.spec.serving is None:
        return
    expected = expected_models(environment.models, environment.registry)
    headers = admin_key_headers(environment)
    for outcome in outcomes:
        started = time.monotonic()
        try:
            url = triton_grpc_url(environment, outcome.host)
        except ServiceGraphError as error:
            say(f"  {outcome.host}: Triton not converged: {error}")
            continue
        target = TritonTarget(outcome.host, url, headers, f"gpufleet up --stack {environment.name}")
        findings = check_triton(target, expected)
        if findings.check.error:
            say(f"  {outcome.host}: Triton not converged: {findings.check.error}")
        else:
            try:
                converge_triton(
                    target,
                    expected,
                    reload=sorted(findings.reload),
                    unload=sorted(findings.unload),
                    say=say,
                )
            except ConvergeError as error:
                outcome.status = "error"
                outcome.reasons.append(str(error))
            else:
                if findings.reload or findings.unload:
                    outcome.status = "changed"
                    outcome.details["converged"] = {
                        "reloaded": sorted(findings.reload),
                        "unloaded": sorted(findings.unload),
                    }
        outcome.seconds += time.monotonic() - started


@contextlib.contextmanager
def _preparing(environment: Environment) -> Iterator[None]:
    """One deploy at a time fills the repository and writes the generated files: Pulumi runs
    the hosts' deployments in parallel, and they share both. Waits, never refuses."""
    environment.state_dir.mkdir(parents=True, exist_ok=True)
    with (environment.state_dir / "deploy.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def fill_from_registry(environment: Environment, *, say: Say) -> dict[str, list[int]]:
    """Export the registry versions the specs select into the repository, then write the
    configs; return each model's served versions. Raises RegistryError or AssemblyError."""
    registry = environment.registry()
    say(f"  filling {environment.repository} from the registry at {environment.registry_uri()}")
    filled = fill_repository(registry, environment.models, environment.repository, progress=say)
    say(f"  model files changed for {', '.join(sorted(filled.changed)) or 'no model'}")
    served = {
        item.spec.name: served_versions(environment.repository, item.spec.name)
        for item in environment.models
    }
    return {name: [lineage.version for lineage in versions] for name, versions in served.items()}


def repository_versions(environment: Environment, *, say: Say) -> dict[str, list[int]]:
    """Each model's versions in the repository as it is (no registry asked)."""
    say(f"  deploying {environment.repository} as it is (the registry is not asked)")
    return {
        item.spec.name: [
            lineage.version for lineage in served_versions(environment.repository, item.spec.name)
        ]
        for item in environment.models
    }


def write_serving_files(
    environment: Environment, *, say: Say, routes: Sequence[ModelRoute] = ()
) -> dict[str, str]:
    """Each host's serving stack (compose, Prometheus, Grafana, the gateway routing `routes`)
    under build/<stack>/serving/; the files as written (`<host>/<path>` -> text)."""
    root = environment.project_root / serving_directory(environment.loaded)
    files = render_serving_files(environment.loaded, environment.models, routes)
    plan = plan_files(root, files, generated_files_on_disk(root))
    apply_plan(plan)
    written = len(plan.created) + len(plan.updated) + len(plan.stale)
    say(f"  serving stacks in {root}: {written} file(s) written, {len(plan.unchanged)} unchanged")
    return files
