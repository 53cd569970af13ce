"""Dynamic providers that run a lifecycle step on one host inside `pulumi up`.

Each provider's create and update call the step function of gpufleet/lifecycle/ that the CLI
calls (`configure`, `deploy`, `gate`) for its one host, and raise when the step does not
succeed, so that `pulumi up` fails with the step's own one-line reasons. Diff compares the
inputs: the host's address, its VM's id, the step's content fingerprint (fingerprints.py) and
the run id of the step before it (a new run of a step reruns the steps after it); the
deployment also compares the registry versions the specs select now with those it deployed.
Nothing changed, nothing runs. Delete undoes nothing: the
configuration lives on the host, and goes with its VM.

The providers are pickled into the stack's state by reference to this module, and the state
holds them as Python objects: the `pulumi` process must be able to import `infra.steps` (it
runs in the project), and the state is tied to the Python version that wrote it (see
docs/lifecycle.md for what a Python upgrade means).

Secrets never travel as inputs or outputs: the steps read them from the `pulumi` process's
environment, as the CLI does.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pulumi.dynamic import CreateResult, DiffResult, ResourceProvider, UpdateResult

from gpufleet.lifecycle.configure import configure
from gpufleet.lifecycle.deploy import deploy
from gpufleet.lifecycle.environment import Environment, load_environment
from gpufleet.lifecycle.gate import gate
from gpufleet.lifecycle.outcome import StepName, StepOutcome, raise_unless_succeeded
from infra.steps.fingerprints import registry_selection

# The inputs whose change makes the step run again.
INPUT_KEYS = ("stack", "host", "address", "addresses", "vm_id", "fingerprint", "after")
OUTPUT_KEYS = ("status", "seconds", "summary", "run", "registry_selection")


def _say(line: str) -> None:
    """Progress on stderr: Pulumi shows a dynamic provider's stderr with the resource."""
    print(line, file=sys.stderr, flush=True)


def step_environment(props: dict[str, Any]) -> Environment:
    """The environment as the program saw it, with the addresses its VMs reported."""
    return load_environment(
        str(props["stack"]),
        project_root=Path(str(props["project_root"])),
        addresses=dict(props.get("addresses") or {}),
    )


class StepProvider(ResourceProvider):
    """Runs `step` on the resource's host on create and update."""

    step: StepName = "configure"

    def run(self, environment: Environment, hosts: Sequence[str]) -> list[StepOutcome]:
        raise NotImplementedError

    def _run(self, props: dict[str, Any]) -> dict[str, Any]:
        environment = step_environment(props)
        (outcome,) = self.run(environment, [str(props["host"])])
        raise_unless_succeeded([outcome])
        return {
            **props,
            "status": outcome.status,
            "seconds": round(outcome.seconds, 1),
            "summary": _summary(outcome),
            "run": uuid.uuid4().hex,
            "registry_selection": self.selection(environment),
        }

    def selection(self, environment: Environment) -> dict[str, str]:
        """What the step depends on outside the program's inputs (the deployment: the
        registry's versions); compared by diff."""
        return {}

    def create(self, props: dict[str, Any]) -> CreateResult:
        outs = self._run(props)
        return CreateResult(id_=f"{props['stack']}/{props['host']}/{self.step}", outs=outs)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        changed = [key for key in INPUT_KEYS if olds.get(key) != news.get(key)]
        if not changed and self.selection(step_environment(news)) != (
            olds.get("registry_selection") or {}
        ):
            changed = ["registry_selection"]
        return DiffResult(changes=bool(changed), replaces=[], stables=["stack", "host"])

    def update(self, _id: str, _olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        return UpdateResult(outs=self._run(news))

    def delete(self, _id: str, _props: dict[str, Any]) -> None:
        """Nothing to undo: what the step did lives on the host and goes with its VM."""


class HostConfigurationProvider(StepProvider):
    step: StepName = "configure"

    def run(self, environment: Environment, hosts: Sequence[str]) -> list[StepOutcome]:
        return configure(environment, hosts, say=_say)


class ServingDeploymentProvider(StepProvider):
    step: StepName = "deploy"

    def run(self, environment: Environment, hosts: Sequence[str]) -> list[StepOutcome]:
        return deploy(environment, hosts, say=_say)

    def selection(self, environment: Environment) -> dict[str, str]:
        return registry_selection(environment)


class EnvironmentGateProvider(StepProvider):
    step: StepName = "gate"

    def run(self, environment: Environment, hosts: Sequence[str]) -> list[StepOutcome]:
        return gate(environment, hosts, say=_say)


def _summary(outcome: StepOutcome) -> str:
    if outcome.step == "gate":
        reports = outcome.details.get("reports", [])
        return ", ".join(f"{report.gate} {report.status}" for report in reports)
    return str(outcome.details.get("ansible", outcome.status))
