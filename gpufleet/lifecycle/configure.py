"""The configure step: a host's base system, NVIDIA driver, CUDA, Docker and the NVIDIA
container runtime (ansible/host.yml). Idempotent: a second run reports `ok` (changed=0).

    outcomes = configure(environment, ["gpu-a"], say=print)
"""

from __future__ import annotations

from collections.abc import Sequence

from gpufleet.configure.runner import HOST_PLAYBOOK
from gpufleet.lifecycle.ansible_step import Say, run_playbook
from gpufleet.lifecycle.environment import Environment
from gpufleet.lifecycle.outcome import StepOutcome


def configure(
    environment: Environment, hosts: Sequence[str], *, say: Say, check: bool = False
) -> list[StepOutcome]:
    """Converge `hosts` with the host configuration roles; one outcome per host."""
    return run_playbook(
        environment, hosts, step="configure", playbook=HOST_PLAYBOOK, say=say, check=check
    )
