"""The Pulumi program (infra/program.py) on the onprem stacks, under `pulumi.runtime.set_mocks`.

Real: the program and the Pulumi SDK (resource registration, secrets, outputs), the stack
files through gpufleet's loader. Not real: the Pulumi engine and the provider are mocked (no
engine can run here); the preflight is switched off by config, as it would reach PVE (its own
tests run against fakepve, tests/test_proxmox_preflight.py), except in the test that proves a
failing preflight stops the program.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pulumi
import pytest
from pulumi.runtime import rpc

from gpufleet.spec.loading import load_stack_spec
from tests.conftest import PROJECT_ROOT

SECRET = "tok-3f9a-not-for-outputs"  # noqa: S105  # a marker to look for
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIB-the-clusters-ca\n-----END CERTIFICATE-----\n"


class RecordingMocks(pulumi.runtime.Mocks):
    """Records every registered resource; the dynamic VM answers with a vmid and an address."""

    def __init__(self) -> None:
        self.resources: list[pulumi.runtime.MockResourceArgs] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.resources.append(args)
        outputs = dict(args.inputs)
        if "fingerprint" in args.inputs:  # a lifecycle step (infra/steps): a run id per step
            outputs["run"] = f"run-of-{args.name}"
        elif args.typ.startswith("pulumi-python:dynamic"):
            number = len(self.resources)
            outputs.update(
                vmid=100 + number,
                address=f"10.20.0.{20 + number}",
                gpus=[
                    device.get("mapping", device.get("address")) for device in args.inputs["pci"]
                ],
                pending_restart=[],
                drift=[],
            )
        return f"{args.name}-id", outputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], list[Any]]:
        return {}, []


@pytest.fixture
def mocks(pulumi_loop: asyncio.AbstractEventLoop) -> Iterator[RecordingMocks]:
    recording = RecordingMocks()
    pulumi.runtime.set_mocks(recording, project="gpufleet", stack="onprem-prod", preview=False)
    pulumi.runtime.set_all_config(
        {"gpufleet:proxmox_secret": SECRET, "gpufleet:preflight": "false"},
        ["gpufleet:proxmox_secret"],
    )
    yield recording
    pulumi.runtime.set_all_config({}, [])


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The project's stack files and model specs, and the CA bundle they name (a checkout
    keeps its own)."""
    shutil.copytree(PROJECT_ROOT / "stacks", tmp_path / "stacks")
    shutil.copytree(PROJECT_ROOT / "modelconfigs", tmp_path / "modelconfigs")
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs/pve-root-ca.pem").write_text(CA_PEM)
    return tmp_path


def resolve(output: pulumi.Output[Any]) -> Any:
    """The value of an output once every registration has settled (mocks run on this loop);
    raises what produced it raised."""
    loop = asyncio.get_event_loop()
    return loop.run_until_complete(asyncio.wait_for(output.future(), 30))


@pytest.mark.parametrize("stack", ["onprem-prod", "onprem-staging"])
def test_every_host_becomes_a_gpu_vm_with_the_specs_inputs(
    mocks: RecordingMocks, stack: str, project: Path
) -> None:
    from infra.program import build_stack

    spec = load_stack_spec(PROJECT_ROOT / "stacks", stack).spec
    hosts = build_stack(stack, project)
    assert sorted(hosts) == sorted(host.name for host in spec.hosts)
    for name, component in hosts.items():
        assert resolve(component.address).startswith("10.20.0.")
        assert resolve(component.name) == name
    components = [r for r in mocks.resources if r.typ == "gpufleet:proxmox:GpuHost"]
    vms = [r for r in mocks.resources if r.name.endswith("-vm")]
    assert len(components) == len(vms) == len(spec.hosts)
    for host in spec.hosts:
        assert host.proxmox is not None
        (vm,) = [r for r in vms if r.name == f"{host.name}-vm"]
        inputs = vm.inputs
        assert inputs["node"] == host.proxmox.node
        assert inputs["template_vmid"] == 9000
        assert inputs["cores"] == host.proxmox.cores
        assert inputs["memory_mb"] == host.proxmox.memory_mb
        assert inputs["pci"] == [{"mapping": d.mapping} for d in host.proxmox.pci]
        assert inputs["tags"] == [f"gpufleet-{stack}", f"gpufleet-host-{host.name}"]
        assert inputs["ca_certificate"] == CA_PEM  # the certificate, not where it lies
        assert "ca_bundle" not in inputs


def test_the_token_secret_stays_secret(mocks: RecordingMocks, project: Path) -> None:
    from infra.program import build_stack

    hosts = build_stack("onprem-prod", project)
    vm = hosts["gpu-prod-1"].vm
    assert asyncio.get_event_loop().run_until_complete(vm.secret.is_secret()) is True
    (registered,) = [r for r in mocks.resources if r.name == "gpu-prod-1-vm"]
    wire = registered.inputs["secret"]  # what the engine would store: marked secret
    assert wire[rpc._special_sig_key] == rpc._special_secret_sig
    assert wire["value"] == SECRET, "the provider gets the real secret"
    assert SECRET not in repr({k: v for k, v in registered.inputs.items() if k != "secret"})
    for component in hosts.values():
        for output in (component.name, component.address, component.gpus):
            assert SECRET not in repr(resolve(output))


def test_outputs_name_address_and_gpus_per_host(mocks: RecordingMocks, project: Path) -> None:
    from infra.program import build_stack

    hosts = build_stack("onprem-prod", project)
    assert resolve(hosts["gpu-prod-2"].gpus) == ["a10-pve2-0"]
    assert resolve(hosts["gpu-prod-1"].vmid) > 100


def test_a_failing_preflight_stops_the_program_before_any_vm(tmp_path: Any) -> None:
    """The preflight runs for real here: the CA bundle named in the stack does not exist."""
    from infra.program import _passed_preflight

    spec = load_stack_spec(PROJECT_ROOT / "stacks", "onprem-prod").spec
    with pytest.raises(pulumi.RunError) as caught:
        _passed_preflight("onprem-prod", spec, SECRET, tmp_path)
    message = str(caught.value)
    assert "preflight of stack 'onprem-prod' found 1 problem(s)" in message
    assert "ca_bundle certs/pve-root-ca.pem" in message
    assert SECRET not in message


def test_a_stack_that_is_not_proxmox_is_refused(mocks: RecordingMocks) -> None:
    from infra.program import build_stack

    with pytest.raises(pulumi.RunError, match="stack 'lab' is a static stack"):
        build_stack("lab")


def test_the_program_waits_for_the_preflight_and_stops_when_it_fails(
    mocks: RecordingMocks, monkeypatch: pytest.MonkeyPatch, project: Path
) -> None:
    """The preflight is on; its answer is replaced by a failure (no PVE here): no VM is made."""
    import infra.program

    pulumi.runtime.set_all_config(
        {"gpufleet:proxmox_secret": SECRET, "gpufleet:preflight": "true"},
        ["gpufleet:proxmox_secret"],
    )
    calls = []

    def failing_preflight(*args: Any, **kwargs: Any) -> list[str]:
        calls.append(kwargs["stack"])
        return ["node pve1 is offline: bring it back or move gpu-prod-1"]

    monkeypatch.setattr(infra.program, "check_stack", failing_preflight)
    hosts = infra.program.build_stack("onprem-prod", project)
    with pytest.raises(pulumi.RunError, match=r"found 1 problem\(s\):\n  - node pve1 is offline"):
        resolve(hosts["gpu-prod-1"].address)
    assert calls == ["onprem-prod"]
    assert not [r for r in mocks.resources if r.typ.startswith("pulumi-python:dynamic")]


def test_allow_restart_comes_from_the_stack_config(mocks: RecordingMocks, project: Path) -> None:
    from infra.program import build_stack

    pulumi.runtime.set_all_config(
        {
            "gpufleet:proxmox_secret": SECRET,
            "gpufleet:preflight": "false",
            "gpufleet:allow_restart": "true",
        },
        ["gpufleet:proxmox_secret"],
    )
    resolve(build_stack("onprem-staging", project)["gpu-staging-1"].address)
    (vm,) = [r for r in mocks.resources if r.name.endswith("-vm")]
    assert vm.inputs["allow_restart"] is True


def test_pulumi_yaml_declares_every_stack_key_and_marks_the_secret() -> None:
    """The project file is where `pulumi config` learns the keys: every StackSpec field, and the
    program's own keys, each with a description; the API secret marked secret."""
    import yaml

    from gpufleet.spec.proxmox import PULUMI_ONLY_KEYS
    from gpufleet.spec.stack import StackSpec

    declared = yaml.safe_load((PROJECT_ROOT / "Pulumi.yaml").read_text())["config"]
    for name in [*StackSpec.model_fields, *PULUMI_ONLY_KEYS]:
        assert declared[f"gpufleet:{name}"]["description"], name
    assert declared["gpufleet:proxmox_secret"]["secret"] is True
    for stack_file in (PROJECT_ROOT / "stacks").glob("Pulumi.*.yaml"):
        for key in yaml.safe_load(stack_file.read_text())["config"]:
            assert key in declared, f"{stack_file.name}: {key} is not declared in Pulumi.yaml"


def test_a_missing_ca_bundle_stops_the_program_with_one_line(
    mocks: RecordingMocks, project: Path
) -> None:
    """The component reads the CA bundle the stack names; without it, no VM is registered."""
    from infra.program import build_stack

    (project / "certs/pve-root-ca.pem").unlink()
    with pytest.raises(pulumi.RunError) as caught:
        build_stack("onprem-prod", project)
    assert str(caught.value).startswith("proxmox.ca_bundle certs/pve-root-ca.pem (")
    assert "is not a file: save the PEM of the CA" in str(caught.value)
    assert not [r for r in mocks.resources if r.typ.startswith("pulumi-python:dynamic")]
