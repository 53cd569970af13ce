"""Run a stack's validation gates and keep their reports.

Each gate lives in its own module (host.py, correctness.py, load.py) and takes plain inputs;
this module gathers those inputs for one stack (the versions its repository serves, their golden
examples from the registry, the servers `gpufleet up` recorded) and writes every report as JSON
and JUnit XML into the stack's reports directory.

    reports = run_gates(context, ["correctness", "load"], say=print)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy.typing as npt

from generators.registry_repository import Lineage, served_versions, verify_repository
from gpufleet.registry.client import ModelRegistry, RegistryError, registered_model_name
from gpufleet.registry.golden import GoldenExample
from gpufleet.spec.model import ModelSpec, Objectives
from gpufleet.spec.stack import GateName, StackSpec
from validation.correctness import CorrectnessTarget, run_correctness_gate
from validation.host import ExpectedProcess, HostExpectations, run_host_gate
from validation.load import LoadTarget, run_load_gate
from validation.load_perf_analyzer import choose_engine
from validation.report import CheckResult, GateReport, write_reports

Say = Callable[[str], None]


@dataclass(frozen=True)
class GateContext:
    """Everything the gates need to know about one running stack."""

    stack: str
    spec: StackSpec
    models: Sequence[ModelSpec]
    repository: Path
    registry: ModelRegistry
    processes: Sequence[ExpectedProcess]
    grpc_url: str
    reports_dir: Path
    # Triton's admin key as a gRPC header: its statistics and repository index are restricted.
    admin_headers: dict[str, str] | None = None
    # The load gate's engine: "perf_analyzer", "python", or None: perf_analyzer where found.
    load_engine: str | None = None


def run_gates(context: GateContext, gates: Sequence[GateName], *, say: Say) -> list[GateReport]:
    """Run `gates` in the order given; write each report; return them all."""
    runners: dict[GateName, Callable[[GateContext, Say], GateReport]] = {
        "host": _host_gate,
        "correctness": _correctness_gate,
        "load": _load_gate,
    }
    reports = []
    for gate in gates:
        started = time.monotonic()
        report = runners[gate](context, say)
        paths = write_reports(report, context.reports_dir)
        say(
            f"  gate {gate}: {report.status} in {time.monotonic() - started:.1f} s "
            f"({', '.join(str(path) for path in paths)})"
        )
        reports.append(report)
    return reports


def _host_gate(context: GateContext, say: Say) -> GateReport:
    from_registry = [
        spec.name for spec in context.models if registered_model_name(spec.source or "")
    ]
    expectations = HostExpectations(
        processes=context.processes,
        model_repository=context.repository.resolve(),
        models=[spec.name for spec in context.models],
        min_free_disk_gb=context.spec.min_free_disk_gb,
        repository_problems=verify_repository(context.repository, from_registry),
    )
    return run_host_gate(expectations, stack=context.stack)


def _correctness_gate(context: GateContext, say: Say) -> GateReport:
    targets: list[CorrectnessTarget] = []
    problems: list[CheckResult] = []
    for spec in context.models:
        objectives = spec.objectives or Objectives()
        served = _served_from_registry(context, spec, "no golden examples to replay")
        if isinstance(served, CheckResult):
            problems.append(served)
            continue
        for lineage in served:
            try:
                examples = context.registry.golden_examples(lineage.registry_version)
            except RegistryError as error:
                problems.append(CheckResult(f"{spec.name} v{lineage.version}", "error", str(error)))
                continue
            targets.append(
                CorrectnessTarget(
                    model=spec.name,
                    version=lineage.version,
                    examples=examples,
                    atol=objectives.output_atol,
                    rtol=objectives.output_rtol,
                )
            )
    report = run_correctness_gate(
        context.grpc_url, targets, stack=context.stack, admin_headers=context.admin_headers
    )
    return GateReport(report.gate, [*problems, *report.checks], report.stack)


def _load_gate(context: GateContext, say: Say) -> GateReport:
    targets: list[LoadTarget] = []
    problems: list[CheckResult] = []
    for spec in context.models:
        served = _served_from_registry(context, spec, "no golden example to send")
        if isinstance(served, CheckResult):
            problems.append(served)
            continue
        try:
            examples = context.registry.golden_examples(served[-1].registry_version)
        except RegistryError as error:
            problems.append(CheckResult(spec.name, "error", str(error)))
            continue
        if not examples:
            message = f"{spec.name}: its registry version has no golden examples to send"
            problems.append(CheckResult(spec.name, "error", message))
            continue
        targets.append(
            LoadTarget(
                model=spec.name,
                inputs=_one_request(examples[0], batching=spec.max_batch_size > 0),
                objectives=spec.objectives or Objectives(),
                batched=spec.max_batch_size > 0,
            )
        )
    report = run_load_gate(
        context.grpc_url,
        targets,
        context.spec.load_gate,
        stack=context.stack,
        progress=lambda line: say(f"  {line}"),
        statistics_headers=context.admin_headers,
        engine=choose_engine(context.load_engine, context.grpc_url),
    )
    return GateReport(report.gate, [*problems, *report.checks], report.stack)


def _served_from_registry(
    context: GateContext, spec: ModelSpec, lacking: str
) -> list[Lineage] | CheckResult:
    """The registry versions the model serves, or the result for a model a gate cannot check.

    A model not filled from the registry (hand-made version directories, an ensemble) is a
    warning: it is served, just not checked. A registry model without a readable lineage
    manifest is an error: `gpufleet up` should have exported it.
    """
    if not registered_model_name(spec.source or ""):
        return CheckResult(
            spec.name,
            "warn",
            f"not checked: {spec.name} is not filled from the registry (source "
            f"{spec.source or 'not set'}), so there is {lacking}",
        )
    served = served_versions(context.repository, spec.name)
    if not served:
        return CheckResult(
            spec.name,
            "error",
            f"{context.repository / spec.name} has no version exported from the registry (no "
            f"readable lineage manifest); run `gpufleet up --stack {context.stack}`",
        )
    return served


def _one_request(example: GoldenExample, *, batching: bool) -> dict[str, npt.NDArray[Any]]:
    """The example's inputs as one request of batch size 1 (perf_analyzer's default)."""
    return {name: tensor[:1] if batching else tensor for name, tensor in example.inputs.items()}
