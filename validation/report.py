"""Gate reports: the one result format every validation gate returns.

A gate (correctness, load, host) runs checks and returns a GateReport. The report is written as
JSON (for machines and later comparisons) and JUnit XML (CI systems render it), and printed as a
short table. Status per check:

- ``pass``: the check ran and the expectation holds;
- ``fail``: the check ran and the expectation does not hold (exit 1);
- ``warn``: it holds, but something makes the number less trustworthy (still exit 0);
- ``error``: the check could not run (exit 2, unless another check failed);
- ``skip``: the check does not apply to this host, and the message says why (``no GPU present``);
  never counted as a pass, and it does not fail the gate either.

    report = GateReport("load", [CheckResult("tabular_mlp@c8", "pass", "p99 12 ms <= 50 ms")])
    write_reports(report, Path("build/local/reports"))
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.table import Table

Status = Literal["pass", "fail", "warn", "error", "skip"]
EXIT_OK, EXIT_FAILED, EXIT_COULD_NOT_RUN = 0, 1, 2
_LOG_WIDTH = 400


@dataclass(frozen=True)
class CheckResult:
    """One check of a gate: what was checked, how it went, and the numbers behind it."""

    name: str
    status: Status
    message: str
    measurements: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0


@dataclass(frozen=True)
class GateReport:
    """The checks one gate ran against one stack."""

    gate: str
    checks: Sequence[CheckResult]
    stack: str = ""

    @property
    def status(self) -> Status:
        statuses = {check.status for check in self.checks}
        for status in ("fail", "error", "warn"):
            if status in statuses:
                return status
        return "pass"

    def to_json(self) -> dict[str, Any]:
        return {
            "gate": self.gate,
            "stack": self.stack,
            "status": self.status,
            "checks": [asdict(check) for check in self.checks],
        }


def exit_code(reports: Iterable[GateReport]) -> int:
    """0 when every gate passed, 1 when one failed, 2 when one could not run (and none failed)."""
    statuses = {report.status for report in reports}
    if "fail" in statuses:
        return EXIT_FAILED
    if "error" in statuses:
        return EXIT_COULD_NOT_RUN
    return EXIT_OK


def write_reports(report: GateReport, directory: Path) -> list[Path]:
    """Write `<gate>.json` and `<gate>.junit.xml` into `directory`; return both paths."""
    from generators.model_repository import write_atomically

    json_path = directory / f"{report.gate}.json"
    junit_path = directory / f"{report.gate}.junit.xml"
    write_atomically(json_path, json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n")
    write_atomically(junit_path, junit_xml(report))
    return [json_path, junit_path]


def junit_xml(report: GateReport) -> str:
    """JUnit XML: one testsuite per gate, one testcase per check; warnings are system-out."""
    suite = ET.Element(
        "testsuite",
        name=f"gpufleet.{report.gate}",
        tests=str(len(report.checks)),
        failures=str(sum(check.status == "fail" for check in report.checks)),
        errors=str(sum(check.status == "error" for check in report.checks)),
        skipped=str(sum(check.status == "skip" for check in report.checks)),
        time=f"{sum(check.duration_s for check in report.checks):.3f}",
    )
    for check in report.checks:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"gpufleet.{report.gate}" + (f".{report.stack}" if report.stack else ""),
            name=check.name,
            time=f"{check.duration_s:.3f}",
        )
        if check.status == "fail":
            ET.SubElement(case, "failure", message=check.message).text = check.message
        elif check.status == "error":
            ET.SubElement(case, "error", message=check.message).text = check.message
        elif check.status == "skip":
            ET.SubElement(case, "skipped", message=check.message)
        else:
            ET.SubElement(case, "system-out").text = f"{check.status}: {check.message}"
    ET.indent(suite)
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"


def print_report(report: GateReport, console: Console) -> None:
    """A short table: one row per check, its status and its message."""
    table = Table(title=f"gate {report.gate}: {report.status}", title_justify="left")
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("result")
    colours = {"pass": "green", "fail": "red", "warn": "yellow", "error": "red", "skip": "cyan"}
    for check in report.checks:
        status = f"[{colours[check.status]}]{check.status}[/]"
        table.add_row(check.name, status, check.message.replace("[", r"\["))
    if not console.is_terminal:  # logs are read with grep: keep each message on one line
        console = Console(file=console.file, width=_LOG_WIDTH, no_color=console.no_color)
    console.print(table)
