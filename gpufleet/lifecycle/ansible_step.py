"""Run one playbook on some hosts of an environment and turn Ansible's counters into outcomes.

The configure step (ansible/host.yml) and the deploy step (playbooks/serving_stack.yml) both
run through here, on top of `gpufleet.configure.runner.configure_hosts`, the one ansible-runner
driver the `gpufleet configure` command uses too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from generators.ansible_inventory import InventoryError
from gpufleet.configure.runner import ConfigureError, ExtraVar, configure_hosts
from gpufleet.lifecycle.environment import Environment
from gpufleet.lifecycle.outcome import StepName, StepOutcome

Say = Callable[[str], None]


def run_playbook(
    environment: Environment,
    hosts: Sequence[str],
    *,
    step: StepName,
    playbook: str,
    say: Say,
    check: bool = False,
    extra_vars: Mapping[str, ExtraVar] | None = None,
) -> list[StepOutcome]:
    """One outcome per host: `changed`/`ok` from Ansible's counters, `failed` for a host that
    failed or was unreachable (with Ansible's reasons), `error` when Ansible could not run."""
    started = time.monotonic()
    limit = None if list(hosts) == environment.host_names else list(hosts)
    try:
        result = configure_hosts(
            environment.name,
            environment.spec,
            project_root=environment.project_root,
            say=say,
            limit=limit,
            check=check,
            playbook=playbook,
            extra_vars=extra_vars,
        )
    except (InventoryError, ConfigureError, OSError) as error:
        return [StepOutcome(step, host, "error", [str(error)]) for host in hosts]
    seconds = time.monotonic() - started
    outcomes = []
    by_host = {outcome.host: outcome for outcome in result.hosts}
    for host in hosts:
        ran = by_host.get(host)
        if ran is None:
            reason = f"Ansible reported nothing for {host}; see {result.artifact_dir}/stdout"
            outcomes.append(StepOutcome(step, host, "error", [reason], seconds))
            continue
        status = {"unreachable": "failed"}.get(ran.status, ran.status)
        reasons = list(ran.problems)
        if ran.status == "unreachable" and not reasons:
            reasons = [f"unreachable over SSH ({environment.host(host).address})"]
        outcomes.append(
            StepOutcome(
                step,
                host,
                status,  # type: ignore[arg-type]  # ok, changed or failed
                reasons,
                seconds,
                {"ansible": ran.counters(), "artifacts": str(result.artifact_dir)},
            )
        )
    return outcomes
