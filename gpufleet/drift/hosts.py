"""The hosts layer: `gpufleet configure`'s host configuration (ansible/host.yml: base system,
NVIDIA driver, Docker and its daemon.json, the NVIDIA runtime) run in Ansible's check mode with
`--diff`, through the one ansible-runner driver (gpufleet/configure/runner.py). Each task that
would change is one item, with its diff; a host Ansible could not reach is "could not be
checked". The serving stack's files and containers are the containers layer's.

    checks = check_hosts(environment)   # one LayerCheck per host
"""

from __future__ import annotations

import time

from generators.ansible_inventory import InventoryError
from gpufleet.configure.runner import HOST_PLAYBOOK, ConfigureError, configure_hosts
from gpufleet.drift.items import DriftItem, LayerCheck
from gpufleet.lifecycle.environment import Environment

CHECKED = f"host configuration (ansible/{HOST_PLAYBOOK}, check mode)"


def check_hosts(environment: Environment) -> list[LayerCheck]:
    """Run the host configuration in check mode on every host; one check per host."""
    started = time.monotonic()
    try:
        result = configure_hosts(
            environment.name,
            environment.spec,
            project_root=environment.project_root,
            say=lambda _line: None,
            check=True,
            playbook=HOST_PLAYBOOK,
        )
    except (InventoryError, ConfigureError, OSError) as error:
        return [
            LayerCheck("hosts", host, error=f"could not be checked: {error}")
            for host in environment.host_names
        ]
    seconds = time.monotonic() - started
    repair = f"gpufleet up --stack {environment.name}"
    by_host = {outcome.host: outcome for outcome in result.hosts}
    checks = []
    for host in environment.host_names:
        check = LayerCheck("hosts", host, checked=[CHECKED], seconds=seconds)
        outcome = by_host.get(host)
        if outcome is None:
            check.error = (
                f"could not be checked: Ansible reported nothing for {host}; see "
                f"{result.artifact_dir}/stdout"
            )
        elif outcome.status in ("failed", "unreachable"):
            reasons = "; ".join(outcome.problems) or outcome.status
            check.error = f"could not be checked: {reasons}"
        for task, diff in outcome.changes if outcome is not None else []:
            check.items.append(
                DriftItem("hosts", host, f"task {task}", "no change (check mode)", diff, repair)
            )
        checks.append(check)
    return checks
