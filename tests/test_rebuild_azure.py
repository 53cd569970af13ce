"""The rebuild of an Azure host: the VM replaced, its data disk kept and attached to the new
VM. Under Pulumi's mocks (the engine and Azure are not here), the real program for azure-prod.

Real: the program (infra/program.py, infra/azure/), pulumi-azure-native's classes, the Pulumi
SDK's URNs, the rebuild's replace step (gpufleet/rebuild/replace.py) choosing what to do.
Mocked: the Pulumi engine and Azure (tests/azure_mocks.py); no Pulumi CLI is installed here, so
the replacement itself (`pulumi up --replace` through the Automation API) is not run.
"""

from __future__ import annotations

import asyncio
import shutil

import pulumi

from gpufleet.lifecycle.environment import load_environment
from gpufleet.rebuild.replace import azure_replace_command, operator_replaces, replace_machine
from tests.azure_mocks import AzureMocks, walk
from tests.conftest import PROJECT_ROOT

STACK = "azure-prod"


def test_the_replaced_vm_leaves_its_data_disk_which_the_new_vm_attaches(
    pulumi_loop: asyncio.AbstractEventLoop,
) -> None:
    """`pulumi up --replace <the VM's URN>` replaces the VM alone: the data disk is a resource of
    its own whose inputs owe nothing to the VM, attached by id with delete_option Detach, and
    cloud-init never formats a disk that has a filesystem (overwrite: false)."""
    from infra.program import build_stack

    mocks = AzureMocks()
    pulumi.runtime.set_mocks(mocks, project="gpufleet", stack=STACK, preview=False)
    hosts = build_stack(STACK)
    urns = {
        name: pulumi_loop.run_until_complete(asyncio.wait_for(host.vm.urn.future(), 60))
        for name, host in hosts.items()
    }
    for _ in range(100):  # the registrations no output waits for settle too
        pending = [task for task in asyncio.all_tasks(pulumi_loop) if not task.done()]
        if not pending:
            break
        pulumi_loop.run_until_complete(asyncio.wait(pending, timeout=60))
    environment = load_environment(
        STACK, project_root=PROJECT_ROOT, addresses={"unused": "192.0.2.1"}
    )
    for host in environment.host_names:
        vm = mocks.named(f"{host}-vm")
        disk = mocks.named(f"{host}-data")
        assert disk.typ == "azure-native:compute:Disk"
        assert not any(
            isinstance(value, str) and f"{host}-vm" in value for value in walk(disk.inputs)
        ), "the disk's inputs do not depend on the VM: replacing the VM leaves it"
        (attached,) = vm.inputs["storageProfile"]["dataDisks"]
        assert attached["createOption"] == "Attach"
        assert attached["deleteOption"] == "Detach"
        assert attached["managedDisk"]["id"].endswith(f"/{host}-data")
        # The command the rebuild gives names this very VM.
        assert f"'{urns[host]}'" in azure_replace_command(environment, host)
    template = (PROJECT_ROOT / "infra/azure/cloud-init.yaml.j2").read_text()
    assert template.count("overwrite: false") == 2


def test_without_the_pulumi_cli_the_operator_replaces_the_vm_with_the_command_given() -> None:
    assert shutil.which("pulumi") is None, "this test describes machines without the CLI"
    environment = load_environment(
        STACK, project_root=PROJECT_ROOT, addresses={"unused": "192.0.2.1"}
    )
    host = environment.host_names[0]
    lines: list[str] = []
    done = replace_machine(environment, host, say=lines.append)
    assert done["data_disk"] == f"{host}-data"
    assert "pulumi up -s azure-prod --replace" in done["machine"]
    assert operator_replaces(environment), "the host key step waits for the new key"
    assert any("no Pulumi CLI here" in line for line in lines)
