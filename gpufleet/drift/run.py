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
from gpufleet.drift.files import check_files
from gpufleet.drift.host_files import check_host_files
from gpufleet.drift.items import LAYERS, Layer, LayerCheck
from gpufleet.drift.report import DriftReport
from gpufleet.drift.triton import ExpectedModels, TritonTarget, check_triton, expected_models
from gpufleet.lifecycle.environment import Environment, load_environment
from gpufleet.lifecycle.gate import admin_key_headers, triton_grpc_url
from gpufleet.local.stack_runner import LocalStack, StackRunError
from gpufleet.spec.loading import (
    LoadedModelSpec,
    LoadedStackSpec,
    load_model_specs,
    load_stack_spec,
    select_stack_models,
)

Job = Callable[[], list[LayerCheck]]
_MAX_WORKERS = 16


def run_drift(
    stack: str,
    *,
    project_root: Path,
    layers: Sequence[Layer] | None = None,
    specs_dir: Path | None = None,
    stacks_dir: Path | None = None,
    outputs_file: Path | None = None,
) -> DriftReport:
    """Check `layers` (default: all) of the stack. Raises SpecError, OutputsError and
    LifecycleError for bad input (exit 2 before anything is checked)."""
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
        environment = load_environment(
            stack,
            project_root=project_root,
            specs_dir=specs_dir,
            stacks_dir=stacks_dir,
            outputs_file=outputs_file,
        )
        jobs = _environment_jobs(environment, asked, report)
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
        repository = project_root / loaded.spec.model_repository
        jobs.append(lambda: [check_files(loaded, models, repository=repository)])
    if "triton" in asked:

        def triton() -> list[LayerCheck]:
            try:
                return [LocalStack(loaded, models, say=lambda _line: None).triton_drift().check]
            except StackRunError as error:
                return [LayerCheck("triton", "local", error=f"could not be checked: {error}")]

        jobs.append(triton)
    return jobs


def _environment_jobs(
    environment: Environment, asked: list[Layer], report: DriftReport
) -> list[Job]:
    jobs: list[Job] = []
    repair = f"gpufleet up --stack {environment.name}"
    if "files" in asked:
        jobs.append(
            lambda: [
                check_files(
                    environment.loaded,
                    environment.models,
                    repository=environment.repository,
                    project_root=environment.project_root,
                )
            ]
        )
    if "triton" in asked:
        if environment.spec.serving is None:
            report.not_applicable["triton"] = "the stack has no gpufleet:serving"
        else:
            jobs.extend(_triton_jobs(environment, repair))
    if "hosts" in asked:
        from gpufleet.drift.hosts import check_hosts

        jobs.append(lambda: check_hosts(environment))
    if "containers" in asked:
        if environment.spec.serving is None:
            report.not_applicable["containers"] = "the stack has no gpufleet:serving"
        else:
            from gpufleet.drift.containers import check_containers

            jobs.extend(
                functools.partial(_one, check_containers, environment, host)
                for host in environment.host_names
            )
    if "infrastructure" in asked:
        jobs.append(lambda: _infrastructure(environment))
    return jobs


def _triton_jobs(environment: Environment, repair: str) -> list[Job]:
    expected: list[ExpectedModels] = []
    headers = admin_key_headers(environment)
    lock = threading.Lock()

    def job(host: str) -> list[LayerCheck]:
        with lock:  # one registry round per run, shared by the hosts
            if not expected:
                expected.append(expected_models(environment.models, environment.registry))
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


def _infrastructure(environment: Environment) -> list[LayerCheck]:
    """The infrastructure layer (proxmox, azure): gpufleet/drift/infrastructure.py."""
    if environment.spec.environment == "static":
        return []
    try:  # built on its own branch; until it is merged this build names what it lacks
        from gpufleet.drift.infrastructure import check_infrastructure  # type: ignore[import-not-found]
    except ImportError:
        return [
            LayerCheck(
                "infrastructure",
                "",
                error="could not be checked: gpufleet.drift.infrastructure is not part of this "
                "build",
            )
        ]
    checks: list[LayerCheck] = check_infrastructure(environment)
    return checks
