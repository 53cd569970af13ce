"""`HostLifecycle`: after a host's VM, its configuration, deployment and gate as Pulumi resources.

    HostLifecycle(
        host.name,
        HostLifecycleArgs(stack, environment, host.name, addresses, vm_id, project_root),
        opts=pulumi.ResourceOptions(depends_on=[vm_component]),
    )

Three dynamic resources in dependency order (providers.py), each with the run id of the step
before it as an input, so that a step that ran again reruns the steps after it.
A stack without `gpufleet:serving` gets the configuration only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pulumi
from pulumi.dynamic import Resource

from gpufleet.lifecycle.environment import Environment
from infra.steps.fingerprints import (
    configuration_fingerprint,
    deployment_fingerprint,
    gate_fingerprint,
)
from infra.steps.providers import (
    OUTPUT_KEYS,
    EnvironmentGateProvider,
    HostConfigurationProvider,
    ServingDeploymentProvider,
    StepProvider,
)


class StepResource(Resource):
    """One lifecycle step on one host; its outputs: status, seconds and a summary."""

    status: pulumi.Output[str]
    seconds: pulumi.Output[float]
    summary: pulumi.Output[str]
    run: pulumi.Output[str]

    def __init__(
        self,
        provider: StepProvider,
        name: str,
        props: dict[str, Any],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        # Outputs are declared as None inputs so that Pulumi exposes them as attributes.
        super().__init__(provider, name, {**props, **dict.fromkeys(OUTPUT_KEYS)}, opts)


@dataclasses.dataclass(frozen=True)
class HostLifecycleArgs:
    """One host's steps: the stack, the host, every host's address (from the VMs) and the id of
    this host's VM."""

    stack: str
    environment: Environment  # the stack as the program loaded it (addresses not known yet)
    host: str
    addresses: Mapping[str, pulumi.Input[str]]
    vm_id: pulumi.Input[str]
    project_root: Path


class HostLifecycle(pulumi.ComponentResource):
    """Configuration -> deployment -> gate for one host."""

    configuration: StepResource
    deployment: StepResource | None
    gate: StepResource | None

    def __init__(
        self, name: str, args: HostLifecycleArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("gpufleet:lifecycle:HostLifecycle", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        addresses = pulumi.Output.all(**dict(args.addresses))
        common: dict[str, Any] = {
            "stack": args.stack,
            "host": args.host,
            "project_root": str(args.project_root),
            "address": args.addresses[args.host],
            "addresses": addresses,
            "vm_id": args.vm_id,
        }
        environment = args.environment
        self.configuration = StepResource(
            HostConfigurationProvider(),
            f"{name}-configuration",
            {
                **common,
                "fingerprint": configuration_fingerprint(environment, args.host),
                "after": "",
            },
            child,
        )
        self.deployment = self.gate = None
        if environment.spec.serving is not None:
            self.deployment = StepResource(
                ServingDeploymentProvider(),
                f"{name}-deployment",
                {
                    **common,
                    "fingerprint": deployment_fingerprint(environment),
                    "after": self.configuration.run,
                },
                child,
            )
            self.gate = StepResource(
                EnvironmentGateProvider(),
                f"{name}-gate",
                {
                    **common,
                    "fingerprint": gate_fingerprint(environment),
                    "after": self.deployment.run,
                },
                child,
            )
        last = self.gate or self.configuration
        self.register_outputs({"status": last.status, "summary": last.summary})
