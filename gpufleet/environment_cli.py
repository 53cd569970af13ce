"""The CLI's side of environments with hosts (static, proxmox, azure): `up` and `validate`.

Thin: load the environment (addresses from the spec or the provisioner's outputs), call the
lifecycle (gpufleet/lifecycle/), print a table per host and its gate reports, exit 0/1/2.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.table import Table

from generators.ansible_inventory import InventoryError
from gpufleet.configure.runner import ConfigureError
from gpufleet.lifecycle.environment import Environment, LifecycleError, load_environment
from gpufleet.lifecycle.lock import EnvironmentLocked
from gpufleet.lifecycle.outcome import StepOutcome
from gpufleet.lifecycle.outputs import OutputsError
from gpufleet.lifecycle.up import EnvironmentReport, up_environment, validate_environment
from gpufleet.spec.problems import SpecError
from gpufleet.spec.stack import GateName
from validation.report import print_report

EXIT_BAD_INPUT = 2
_COLOURS = {"ok": "green", "changed": "yellow", "failed": "red", "error": "red"}


def open_environment(
    stack: str,
    *,
    specs_dir: Path,
    stacks_dir: Path,
    outputs_file: Path | None,
    err: Console,
) -> Environment:
    """The environment, or exit 2 with one line per problem."""
    try:
        return load_environment(
            stack,
            project_root=Path.cwd(),
            specs_dir=specs_dir,
            stacks_dir=stacks_dir,
            outputs_file=outputs_file,
        )
    except SpecError as error:
        _fail([str(problem) for problem in error.problems], err)
    except (OutputsError, LifecycleError) as error:
        _fail([str(error)], err)


def run_environment_command(
    command: str,
    environment: Environment,
    *,
    gates: list[GateName] | None,
    as_json: bool,
    out: Console,
    err: Console,
    load_engine: str | None = None,
) -> NoReturn:
    """`up` or `validate` on every host; the table, the reports, the exit code."""
    console = err if as_json else out

    def say(line: str) -> None:
        console.print(line, markup=False, highlight=False)

    run: Callable[..., EnvironmentReport] = (
        up_environment if command == "up" else validate_environment
    )
    try:
        report = run(environment, say=say, gates=gates, load_engine=load_engine)
    except (EnvironmentLocked, InventoryError, ConfigureError, OSError) as error:
        _fail([str(error)], err)
    if as_json:
        out.print_json(json.dumps(report.to_json()))
        raise typer.Exit(report.exit_code)
    for host in report.hosts:
        for gate_report in report.gate_reports(host):
            print_report(gate_report, out)
    print_summary(report, environment.reports_dir, out)
    raise typer.Exit(report.exit_code)


def print_summary(report: EnvironmentReport, reports_dir: Path, out: Console) -> None:
    """One row per host: each step's status and time, and where the host stopped."""
    steps = ["configure", "deploy", "gate"] if report.command == "up" else ["gate"]
    table = Table(title=f"{report.command} --stack {report.stack}", title_justify="left")
    for column in ("host", *steps, "stopped at"):
        table.add_column(column, no_wrap=True)
    for host in report.hosts:
        by_step: dict[str, StepOutcome] = {o.step: o for o in report.host_outcomes(host)}
        cells = []
        for step in steps:
            outcome = by_step.get(step)
            cells.append(
                f"[{_COLOURS[outcome.status]}]{outcome.status}[/] {outcome.seconds:.0f} s"
                if outcome
                else "-"
            )
        table.add_row(host, *cells, report.stopped_at(host))
    out.print(table)
    for outcome in report.outcomes:
        for reason in outcome.reasons:
            out.print(f"{outcome.host}: {outcome.step}: {reason}", markup=False)
    verdict = {0: "every host is green", 1: "a step or gate failed", 2: "a step could not run"}
    out.print(f"{verdict[report.exit_code]}; reports in {reports_dir}/", markup=False)


def _fail(problems: list[str], err: Console) -> NoReturn:
    for line in problems:
        err.print("error:", line, markup=False)
    raise typer.Exit(EXIT_BAD_INPUT)
