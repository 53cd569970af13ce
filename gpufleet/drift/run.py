"""`gpufleet drift --stack NAME`: run the asked layers' checks, in parallel across hosts, and
collect one report. Each layer is one module of this package; each asks the step that owns the
layer what it would change (generate, the deploy step's Triton, configure in check mode, the
serving stack's compose, the provisioner).

    report = run_drift("local", project_root=Path.cwd(), layers=["files", "triton"])
    report.exit_code    # 0 in sync, 1 drift, 2 something could not be checked
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from generators.serving_stack.graph import ServiceGraphError
from gpufleet.drift.containers import check_containers
from gpufleet.drift.files import check_files
from gpufleet.drift.host_files import check_host_files
from gpufleet.drift.hosts import check_hosts
from gpufleet.drift.items import LAYERS, Layer, LayerCheck
from gpufleet.drift.report import DriftReport
from gpufleet.drift.triton import ExpectedModels, TritonTarget, check_triton, expected_models
from gpufleet.lifecycle.environment import Environment, load_environment
from gpufleet.lifecycle.gate import admin_key_headers, triton_grpc_url
from gpufleet.lifecycle.outputs import OutputsError
from gpufleet.local.stack_runner import LocalStack, StackRunError
from gpufleet.rollout.state import as_served
from gpufleet.spec.loading import (
    LoadedModelSpec,
    LoadedStackSpec,
    load_model_specs,
    load_stack_spec,
    select_stack_models,
)

Job = Callable[[], list[LayerCheck]]
_MAX_WORKERS = 16
HOST_LAYERS: tuple[Layer, ...] = ("triton", "hosts", "containers")


def run_drift(
    stack: str,
    *,
    project_root: Path,
    layers: Sequence[Layer] | None = None,
    specs_dir: Path | None = None,
    stacks_dir: Path | None = None,
    outputs_file: Path | None = None,
) -> DriftReport:
    """Check `layers` (default: all) of the stack. Raises SpecError for bad input (exit 2
    before anything is checked). Without the hosts' addresses (a proxmox or azure stack without
    outputs) the host layers are "could not be checked", files and infrastructure still run."""
    started = time.monotonic()
    asked = [layer for layer in LAYERS if layers is None or layer in layers]
    specs_dir = specs_dir or project_root / "modelconfigs"
    stacks_dir = stacks_dir or project_root / "stacks"
    loaded = load_stack_spec(stacks_dir, stack)
    report = DriftReport(stack, asked)
    if loaded.spec.environment == "local":
        models = select_stack_models(loaded, load_model_specs(specs_dir))
        jobs = _local_jobs(loaded, models, asked, report, project_root)
    else:
        served: list[LoadedModelSpec] = []
        if loaded.spec.serving is not None:
            served = select_stack_models(loaded, load_model_specs(specs_dir))
        try:
            environment: Environment | str = load_environment(
                stack,
                project_root=project_root,
                specs_dir=specs_dir,
                stacks_dir=stacks_dir,
                outputs_file=outputs_file,
            )
        except OutputsError as error:  # no addresses: the hosts' layers cannot be checked
            environment = str(error)
        jobs = _stack_jobs(loaded, served, project_root, asked, report)
        if isinstance(environment, Environment):
            jobs += _host_jobs(environment, asked, report)
        else:
            report.checks += [
                LayerCheck(layer, host.name, error=f"could not be checked: {environment}")
                for layer in asked
                if layer in HOST_LAYERS
                for host in loaded.spec.hosts
            ]
    with ThreadPoolExecutor(max_workers=min(_MAX_WORKERS, max(1, len(jobs)))) as pool:
        for checks in pool.map(lambda job: job(), jobs):
            report.checks.extend(checks)
    report.seconds = time.monotonic() - started
    return report


def _local_jobs(
    loaded: LoadedStackSpec,
    models: list[LoadedModelSpec],
    asked: list[Layer],
    report: DriftReport,
    project_root: Path,
) -> list[Job]:
    jobs: list[Job] = []
    for layer in ("hosts", "containers", "infrastructure"):
        if layer in asked:
            report.not_applicable[layer] = "a local stack has no hosts, containers or VMs"
    if "files" in asked:
        jobs.append(lambda: _files(loaded, models, project_root))
    if "triton" in asked:

        def triton() -> list[LayerCheck]:
            try:
                return [LocalStack(loaded, models, say=lambda _line: None).triton_drift().check]
            except StackRunError as error:
                return [LayerCheck("triton", "local", error=f"could not be checked: {error}")]

        jobs.append(triton)
    return jobs


def _stack_jobs(
    loaded: LoadedStackSpec,
    models: list[LoadedModelSpec],
    project_root: Path,
    asked: list[Layer],
    report: DriftReport,
) -> list[Job]:
    """The layers that need no host address: files, infrastructure."""
    jobs: list[Job] = []
    if "files" in asked:
        jobs.append(lambda: _files(loaded, models, project_root))
    if "infrastructure" in asked:
        jobs.append(lambda: _infrastructure(loaded, project_root))
    for layer in ("triton", "containers"):
        if layer in asked and loaded.spec.serving is None:
            report.not_applicable[layer] = "the stack has no gpufleet:serving"
    return jobs


def _files(
    loaded: LoadedStackSpec, models: list[LoadedModelSpec], project_root: Path
) -> list[LayerCheck]:
    """The files layer, against the specs and gateway routes as the stack serves them (a model
    under an active rollout serves two versions: `up` and the deploy step write them so)."""
    repository = project_root / loaded.spec.model_repository
    state_dir = project_root / loaded.spec.resolved_state_dir(loaded.name)
    try:
        served, routes = as_served(models, state_dir)
    except ValueError as error:
        return [LayerCheck("files", "", error=f"could not be checked: {error}")]
    check = check_files(
        loaded, served, repository=repository, project_root=project_root, routes=routes
    )
    return [check]


def _host_jobs(environment: Environment, asked: list[Layer], report: DriftReport) -> list[Job]:
    """The layers checked on each host: triton, hosts, containers."""
    jobs: list[Job] = []
    if "triton" in asked and "triton" not in report.not_applicable:
        jobs.extend(_triton_jobs(environment, f"gpufleet up --stack {environment.name}"))
    if "hosts" in asked:
        jobs.append(lambda: check_hosts(environment))
    if "containers" in asked and "containers" not in report.not_applicable:
        jobs.extend(
            functools.partial(_one, check_containers, environment, host)
            for host in environment.host_names
        )
    return jobs


def _triton_jobs(environment: Environment, repair: str) -> list[Job]:
    expected: list[ExpectedModels] = []
    headers = admin_key_headers(environment)
    lock = threading.Lock()

    def job(host: str) -> list[LayerCheck]:
        with lock:  # one registry round per run, shared by the hosts
            if not expected:
                served, _routes = as_served(environment.models, environment.state_dir)
                expected.append(expected_models(served, environment.registry))
        wanted = expected[0]
        try:
            url = triton_grpc_url(environment, host)
        except ServiceGraphError as error:
            return [LayerCheck("triton", host, error=f"could not be checked: {error}")]
        check = check_triton(TritonTarget(host, url, headers, repair), wanted).check
        if check.error is None:  # Triton answers: are the files it serves the registry's?
            started = time.monotonic()
            try:
                checked, items = check_host_files(environment, host, wanted.versions, repair)
            except Exception as error:  # SSH: the host is named as not checked, exit 2
                check.error = f"could not be checked: model files on {host} over SSH: {error}"
            else:
                check.checked += checked
                check.items += items
            check.seconds += time.monotonic() - started
        return [check]

    return [functools.partial(job, host) for host in environment.host_names]


def _one(
    check: Callable[[Environment, str], LayerCheck], environment: Environment, host: str
) -> list[LayerCheck]:
    return [check(environment, host)]


def _infrastructure(loaded: LoadedStackSpec, project_root: Path) -> list[LayerCheck]:
    """The infrastructure layer: proxmox VMs through the PVE API, azure through `pulumi
    preview`; static stacks have none. It needs no host address (a deleted VM has none)."""
    from gpufleet.drift.infrastructure import check_stack_infrastructure  # pulumi: slow import

    return check_stack_infrastructure(loaded, project_root=project_root)
