"""Pulumi mocks for the Azure program: every registered resource is recorded, and Azure's
answers that the program reads back (a NIC's private address, a public IP's address) are made
up the way Azure would fill them in."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator
from typing import Any

import pulumi

AZURE_PREFIX = "azure-native:"


class AzureMocks(pulumi.runtime.Mocks):
    """Records `args.typ`, `args.name` and `args.inputs` of every resource the program makes."""

    def __init__(self) -> None:
        self.resources: list[pulumi.runtime.MockResourceArgs] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.resources.append(args)
        outputs = copy.deepcopy(dict(args.inputs))
        number = len(self.resources)
        if args.typ == "azure-native:network:NetworkInterface":
            for index, configuration in enumerate(outputs.get("ipConfigurations", [])):
                configuration["privateIPAddress"] = f"10.99.{number}.{4 + index}"
        if args.typ == "azure-native:network:PublicIPAddress":
            outputs["ipAddress"] = f"203.0.113.{number}"
        if "fingerprint" in args.inputs:  # a lifecycle step (infra/steps): a run id per step
            outputs["run"] = f"run-of-{args.name}"
        outputs.setdefault("name", args.name)
        resource_id = f"/subscriptions/0000/resourceGroups/rg/providers/{args.typ}/{args.name}"
        outputs["id"] = resource_id
        return resource_id, outputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], list[Any]]:
        return {}, []

    def of_type(self, suffix: str) -> list[pulumi.runtime.MockResourceArgs]:
        return [r for r in self.resources if r.typ == f"{AZURE_PREFIX}{suffix}"]

    def named(self, name: str) -> pulumi.runtime.MockResourceArgs:
        (found,) = [r for r in self.resources if r.name == name]
        return found


def run_program(
    stack: str, loop: asyncio.AbstractEventLoop, project_root: Any = None
) -> tuple[AzureMocks, dict[str, Any]]:
    """Run the real program for `stack` under mocks until every registration has settled;
    returns the mocks and the hosts' resolved outputs."""
    from infra.program import build_stack

    mocks = AzureMocks()
    pulumi.runtime.set_mocks(mocks, project="gpufleet", stack=stack, preview=False)
    kwargs = {} if project_root is None else {"project_root": project_root}
    hosts = build_stack(stack, **kwargs)
    outputs = {}
    for name, host in hosts.items():
        combined = pulumi.Output.all(
            name=host.name,
            private_address=host.private_address,
            size=host.size,
            gpus=host.gpus,
            public_address=host.public_address,
        )
        outputs[name] = loop.run_until_complete(asyncio.wait_for(combined.future(), 60))
    # Registrations that no output waits for (the VMs, the NAT gateway) settle too; settling
    # one may start another, hence the loop.
    for _ in range(100):
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
        if not pending:
            break
        loop.run_until_complete(asyncio.wait(pending, timeout=60))
    return mocks, outputs


def walk(value: Any) -> Iterator[Any]:
    """Every nested value of a resource's inputs (dicts and lists)."""
    yield value
    if isinstance(value, dict):
        for item in value.values():
            yield from walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from walk(item)
