"""The lifecycle resources of `pulumi up` (infra/steps/) in the program, under Pulumi's mocks.

Real: the program (infra/program.py) and the Pulumi SDK, the stack files through the loader,
the fingerprints computed from the real roles and specs. Not real: the Pulumi engine and the
providers are mocked (tests/azure_mocks.py, and the Proxmox VM's answers in
tests/test_pulumi_program.py); a step resource answers with a run id, as its provider would.
What the step providers do against real hosts is tested in tests/test_lifecycle_steps.py.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pulumi
import pytest

from gpufleet.spec.loading import load_stack_spec
from tests.azure_mocks import run_program, walk
from tests.conftest import PROJECT_ROOT
from tests.test_pulumi_program import CA_PEM, SECRET, RecordingMocks, resolve

STEP_TYPE = "pulumi-python:dynamic:Resource"
STEPS = ("configuration", "deployment", "gate")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The project's stacks and model specs, and the CA bundle the onprem stacks name."""
    shutil.copytree(PROJECT_ROOT / "stacks", tmp_path / "stacks")
    shutil.copytree(PROJECT_ROOT / "modelconfigs", tmp_path / "modelconfigs")
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs/pve-root-ca.pem").write_text(CA_PEM)
    return tmp_path


def _settle(loop: asyncio.AbstractEventLoop) -> None:
    for _ in range(100):
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
        if not pending:
            return
        loop.run_until_complete(asyncio.wait(pending, timeout=60))


def _steps(resources: list[pulumi.runtime.MockResourceArgs], host: str) -> dict[str, Any]:
    return {
        step: resource.inputs
        for step in STEPS
        for resource in resources
        if resource.name == f"{host}-{step}"
    }


def _proxmox_program(
    loop: asyncio.AbstractEventLoop,
    project_root: Path,
    stack: str,
    config: dict[str, str] | None = None,
) -> tuple[RecordingMocks, dict[str, str]]:
    from infra.program import build_stack

    mocks = RecordingMocks()
    pulumi.runtime.set_mocks(mocks, project="gpufleet", stack=stack, preview=False)
    pulumi.runtime.set_all_config(
        {"gpufleet:proxmox_secret": SECRET, "gpufleet:preflight": "false", **(config or {})},
        ["gpufleet:proxmox_secret"],
    )
    try:
        hosts = build_stack(stack, project_root)
        addresses = {name: resolve(host.address) for name, host in hosts.items()}
        _settle(loop)
    finally:
        pulumi.runtime.set_all_config({}, [])
    return mocks, addresses


def _assert_chain(
    resources: list[pulumi.runtime.MockResourceArgs], stack: str, addresses: dict[str, str]
) -> None:
    spec = load_stack_spec(PROJECT_ROOT / "stacks", stack).spec
    assert spec.serving is not None, f"{stack} serves: every host gets all three steps"
    for host in spec.hosts:
        steps = _steps(resources, host.name)
        assert set(steps) == set(STEPS), host.name
        for inputs in steps.values():
            assert inputs["stack"] == stack
            assert inputs["host"] == host.name
            assert inputs["address"] == addresses[host.name], "the VM's own address"
            assert inputs["addresses"] == addresses, "every host's, for the registry's"
            assert len(inputs["fingerprint"]) == 64
        # In dependency order: each step's input is the run of the step before it.
        assert steps["configuration"]["after"] == ""
        assert steps["deployment"]["after"] == f"run-of-{host.name}-configuration"
        assert steps["gate"]["after"] == f"run-of-{host.name}-deployment"


def test_onprem_prod_chains_vm_configuration_deployment_and_gate_per_host(
    pulumi_loop: asyncio.AbstractEventLoop, project: Path
) -> None:
    mocks, addresses = _proxmox_program(pulumi_loop, project, "onprem-prod")
    assert addresses
    assert all(address.startswith("10.20.0.") for address in addresses.values())
    _assert_chain(mocks.resources, "onprem-prod", addresses)
    vmids = {_steps(mocks.resources, host)["configuration"]["vm_id"] for host in addresses}
    assert len(vmids) == len(addresses), "each host's steps follow its own VM's id"


def test_azure_prod_chains_vm_configuration_deployment_and_gate_per_host(
    pulumi_loop: asyncio.AbstractEventLoop,
) -> None:
    mocks, outputs = run_program("azure-prod", pulumi_loop)
    _settle(pulumi_loop)
    addresses = {host: values["private_address"] for host, values in outputs.items()}
    assert all(address.startswith("10.99.") for address in addresses.values())
    _assert_chain(mocks.resources, "azure-prod", addresses)


@pytest.mark.parametrize("stack", ["onprem-prod", "azure-prod"])
def test_no_secret_is_a_step_input_or_output(
    pulumi_loop: asyncio.AbstractEventLoop,
    monkeypatch: pytest.MonkeyPatch,
    project: Path,
    stack: str,
) -> None:
    """The serving stack's secrets, set in the environment as an operator would, and the
    Proxmox token appear in no step's inputs (the mocks' outputs are the inputs)."""
    secrets = {
        "GPUFLEET_POSTGRES_PASSWORD": "pg-not-an-input-71f2",
        "GPUFLEET_GRAFANA_ADMIN_PASSWORD": "graf-not-an-input-9d0e",
        "GPUFLEET_TRITON_ADMIN_KEY": "key-not-an-input-44ab",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    if stack == "onprem-prod":
        mocks, _ = _proxmox_program(pulumi_loop, project, stack)
        resources = mocks.resources
    else:
        azure_mocks, _ = run_program(stack, pulumi_loop)
        resources = azure_mocks.resources
    steps = [r for r in resources if r.typ == STEP_TYPE and "fingerprint" in r.inputs]
    assert steps, "the program registered its lifecycle steps"
    for resource in steps:
        values = [value for value in walk(dict(resource.inputs)) if isinstance(value, str)]
        for secret in [SECRET, *secrets.values()]:
            assert not any(secret in value for value in values), (resource.name, secret)
        assert "secret" not in resource.inputs


def test_lifecycle_false_provisions_the_vms_only(
    pulumi_loop: asyncio.AbstractEventLoop, project: Path
) -> None:
    config = {"gpufleet:lifecycle": "false"}
    mocks, addresses = _proxmox_program(pulumi_loop, project, "onprem-prod", config)
    assert addresses
    assert [r.name for r in mocks.resources if "fingerprint" in r.inputs] == []
    assert [r for r in mocks.resources if r.name.endswith("-vm")]
