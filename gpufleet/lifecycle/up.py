"""`gpufleet up` and `validate` for environments with hosts: every step on every host, in
order, and one report for the environment.

`up_environment` holds the environment's lock and walks configure -> deploy -> gate. A host
whose step fails stops there; the others go on. `validate_environment` runs the gate step
alone, against what runs now. Both write `<state_dir>/reports/environment.json` (and
`.junit.xml`, one test case per host and step) beside each host's gate reports.

    report = up_environment(environment, say=print)
    report.exit_code      # 0 every host green, 1 a step or gate failed, 2 one could not run
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from generators.model_repository import write_atomically
from gpufleet.lifecycle.ansible_step import Say
from gpufleet.lifecycle.configure import configure
from gpufleet.lifecycle.deploy import deploy
from gpufleet.lifecycle.environment import Environment
from gpufleet.lifecycle.gate import gate
from gpufleet.lifecycle.lock import environment_lock
from gpufleet.lifecycle.outcome import StepOutcome, exit_code
from gpufleet.spec.stack import GateName
from validation.report import CheckResult, GateReport, junit_xml

REPORT_NAME = "environment"
_CHECK_STATUS = {"ok": "pass", "changed": "pass", "failed": "fail", "error": "error"}


@dataclasses.dataclass
class EnvironmentReport:
    """Every step's outcome on every host of one run."""

    stack: str
    command: str
    hosts: list[str]
    outcomes: list[StepOutcome]

    @property
    def exit_code(self) -> int:
        return exit_code(self.outcomes)

    def host_outcomes(self, host: str) -> list[StepOutcome]:
        return [outcome for outcome in self.outcomes if outcome.host == host]

    def stopped_at(self, host: str) -> str:
        """The step where the host stopped, or "done" when every step succeeded."""
        for outcome in self.host_outcomes(host):
            if not outcome.succeeded:
                return outcome.step
        return "done"

    def gate_reports(self, host: str) -> list[GateReport]:
        reports: list[GateReport] = []
        for outcome in self.host_outcomes(host):
            reports += outcome.details.get("reports", [])
        return reports

    def to_json(self) -> dict[str, Any]:
        """Per host, each step's outcome and where the host stopped; under `gates`, every gate
        report of every host (as the local stack's `--json` lists them)."""
        return {
            "stack": self.stack,
            "command": self.command,
            "exit_code": self.exit_code,
            "gates": [
                report.to_json() for host in self.hosts for report in self.gate_reports(host)
            ],
            "hosts": {
                host: {
                    "stopped_at": self.stopped_at(host),
                    "steps": [outcome.to_json() for outcome in self.host_outcomes(host)],
                }
                for host in self.hosts
            },
        }

    def as_gate_report(self) -> GateReport:
        """The run as one JUnit suite: a test case per host and step."""
        checks = [
            CheckResult(
                f"{outcome.host} {outcome.step}",
                _CHECK_STATUS[outcome.status],  # type: ignore[arg-type]
                "; ".join(outcome.reasons) or outcome.status,
                duration_s=outcome.seconds,
            )
            for outcome in self.outcomes
        ]
        return GateReport(REPORT_NAME, checks, self.stack)

    def write(self, directory: Path) -> list[Path]:
        json_path = directory / f"{REPORT_NAME}.json"
        junit_path = directory / f"{REPORT_NAME}.junit.xml"
        write_atomically(json_path, json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")
        write_atomically(junit_path, junit_xml(self.as_gate_report()))
        return [json_path, junit_path]


def up_environment(
    environment: Environment,
    *,
    say: Say,
    gates: Sequence[GateName] | None = None,
    load_engine: str | None = None,
) -> EnvironmentReport:
    """Configure, deploy and gate every host; a host stops at its first failed step."""
    report = EnvironmentReport(environment.name, "up", environment.host_names, [])
    with environment_lock(environment.state_dir, environment.name, "up"):
        going = environment.host_names
        for title in ("configure", "deploy", "gate"):
            if not going:
                break
            say(f"[{title}] {', '.join(going)}")
            if title == "configure":
                outcomes = configure(environment, going, say=say)
            elif title == "deploy":
                outcomes = deploy(environment, going, say=say)
            else:
                outcomes = gate(environment, going, say=say, gates=gates, load_engine=load_engine)
            report.outcomes += outcomes
            for outcome in outcomes:
                say(f"[{title}] {outcome.host}: {outcome.status} in {outcome.seconds:.1f} s")
            going = [outcome.host for outcome in outcomes if outcome.succeeded]
        report.write(environment.reports_dir)
    return report


def validate_environment(
    environment: Environment,
    *,
    say: Say,
    gates: Sequence[GateName] | None = None,
    load_engine: str | None = None,
) -> EnvironmentReport:
    """The gate step on every host, against what runs now."""
    outcomes = gate(
        environment, environment.host_names, say=say, gates=gates, load_engine=load_engine
    )
    report = EnvironmentReport(environment.name, "validate", environment.host_names, outcomes)
    report.write(environment.reports_dir)
    return report
