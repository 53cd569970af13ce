"""The CLI's side of `gpufleet rebuild --stack NAME --host HOST`: thin. Load the environment,
call gpufleet/rebuild/run.py, print a table of the steps with their times, exit 0/1/2.
"""

from __future__ import annotations

import json
from typing import NoReturn

import typer
from rich.console import Console
from rich.table import Table

from generators.ansible_inventory import InventoryError
from generators.serving_stack.graph import ServiceGraphError
from gpufleet.configure.runner import ConfigureError
from gpufleet.lifecycle.environment import Environment, LifecycleError
from gpufleet.lifecycle.lock import EnvironmentLocked
from gpufleet.rebuild.remote import RemoteError
from gpufleet.rebuild.report import RebuildReport
from gpufleet.rebuild.run import RebuildOptions, rebuild_host

EXIT_BAD_INPUT = 2
_COLOURS = {
    "ok": "green",
    "changed": "yellow",
    "skipped": "dim",
    "failed": "red",
    "error": "red",
    "waiting": "magenta",
}


def run_rebuild(
    environment: Environment,
    host: str,
    options: RebuildOptions,
    *,
    as_json: bool,
    out: Console,
    err: Console,
) -> NoReturn:
    console = err if as_json else out

    def say(line: str) -> None:
        console.print(line, markup=False, highlight=False)

    try:
        report = rebuild_host(environment, host, options, say=say)
    except (
        EnvironmentLocked,
        LifecycleError,
        InventoryError,
        ConfigureError,
        ServiceGraphError,
        RemoteError,
        OSError,
    ) as error:
        err.print("error:", str(error), markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if as_json:
        out.print_json(json.dumps(report.to_json()))
        raise typer.Exit(report.exit_code)
    print_summary(report, environment, out)
    raise typer.Exit(report.exit_code)


def print_summary(report: RebuildReport, environment: Environment, out: Console) -> None:
    table = Table(
        title=f"rebuild --stack {report.stack} --host {report.host}", title_justify="left"
    )
    for column in ("step", "status", "seconds"):
        table.add_column(column, no_wrap=True)
    for step in report.steps:
        colour = _COLOURS.get(step.status, "white")
        table.add_row(step.name, f"[{colour}]{step.status}[/]", f"{step.seconds:.1f}")
    out.print(table)
    for step in report.steps:
        for reason in step.reasons:
            out.print(f"{report.host}: {step.name}: {reason}", markup=False)
    verdict = {
        0: f"{report.host} is rebuilt: gates green, registry as before",
        1: "a gate failed or the registry differs",
        2: "stopped: see above for what to do, then run the same command again",
    }
    out.print(
        f"{verdict[report.exit_code]}; report in "
        f"{environment.reports_dir}/rebuild-{report.host}.json",
        markup=False,
    )
