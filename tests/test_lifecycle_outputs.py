"""Hosts' addresses from the provisioner's outputs, the environment lock, and the CLI's exits.

Real: the stack files through the loader, the outputs JSON as `pulumi stack output --json`
writes it, the CLI in-process (Typer's CliRunner) and as a separate process for the lock, an
flock held by this process. Not real: no Pulumi CLI is installed here, so the Automation API
path is shown refusing with the command to run instead; no host is reached.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpufleet.cli import app
from gpufleet.lifecycle.environment import load_environment
from gpufleet.lifecycle.lock import EnvironmentLocked, environment_lock
from gpufleet.lifecycle.outputs import OutputsError, host_addresses
from gpufleet.spec.loading import load_stack_spec
from tests.conftest import PROJECT_ROOT

ONPREM_OUTPUTS = {
    "gpu-prod-1": {"name": "gpu-prod-1", "address": "192.0.2.21", "gpus": ["a10-pve1-0"]},
    "gpu-prod-2": {"name": "gpu-prod-2", "address": "192.0.2.22", "gpus": ["a10-pve2-0"]},
}


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the project's stacks and specs; the CLI runs in it."""
    for name in ("stacks", "modelconfigs"):
        shutil.copytree(PROJECT_ROOT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_addresses_come_from_the_outputs_per_environment_kind() -> None:
    onprem = load_stack_spec(PROJECT_ROOT / "stacks", "onprem-prod").spec
    assert host_addresses("onprem-prod", onprem, ONPREM_OUTPUTS) == {
        "gpu-prod-1": "192.0.2.21",
        "gpu-prod-2": "192.0.2.22",
    }
    azure = load_stack_spec(PROJECT_ROOT / "stacks", "azure-dev").spec
    outputs = {host.name: {"private_address": f"10.50.1.{n}"} for n, host in enumerate(azure.hosts)}
    assert set(host_addresses("azure-dev", azure, outputs).values()) == set(
        f"10.50.1.{n}" for n in range(len(azure.hosts))
    )


def test_a_missing_or_bad_output_names_the_host_and_the_command() -> None:
    onprem = load_stack_spec(PROJECT_ROOT / "stacks", "onprem-prod").spec
    with pytest.raises(OutputsError) as missing:
        host_addresses("onprem-prod", onprem, {"gpu-prod-1": ONPREM_OUTPUTS["gpu-prod-1"]})
    assert "give no address for host(s) gpu-prod-2" in str(missing.value)
    assert "pulumi stack output --stack onprem-prod --json" in str(missing.value)
    secret = {**ONPREM_OUTPUTS, "gpu-prod-2": {"address": "[secret]"}}
    with pytest.raises(OutputsError, match="gpu-prod-2"):
        host_addresses("onprem-prod", onprem, secret)
    bad = {**ONPREM_OUTPUTS, "gpu-prod-2": {"address": "ssh://x y"}}
    with pytest.raises(OutputsError, match=r"gpu-prod-2.address: 'ssh://x y' is neither"):
        host_addresses("onprem-prod", onprem, bad)


def test_the_environment_takes_the_outputs_addresses(project: Path) -> None:
    outputs = project / "outputs.json"
    outputs.write_text(json.dumps(ONPREM_OUTPUTS))
    environment = load_environment("onprem-prod", project_root=project, outputs_file=outputs)
    assert {host.name: host.address for host in environment.spec.hosts} == {
        "gpu-prod-1": "192.0.2.21",
        "gpu-prod-2": "192.0.2.22",
    }


@pytest.mark.parametrize("command", ["configure", "validate", "up"])
def test_cli_without_outputs_exits_2_with_the_command_that_makes_them(
    project: Path, command: str
) -> None:
    assert shutil.which("pulumi") is None, "this machine has no Pulumi CLI"
    result = CliRunner().invoke(app, [command, "--stack", "onprem-prod"])
    assert result.exit_code == 2, result.output
    assert "no Pulumi CLI is installed here" in result.output
    assert "pulumi stack output --stack onprem-prod --json > outputs-onprem-prod.json" in (
        result.output
    )
    assert not (project / "build").exists(), "nothing is written"


@pytest.mark.parametrize("command", ["configure", "validate", "up"])
def test_cli_with_bad_outputs_exits_2_naming_the_file(project: Path, command: str) -> None:
    broken = project / "outputs.json"
    broken.write_text("{not json")
    result = CliRunner().invoke(app, [command, "--stack", "onprem-prod", "--outputs", str(broken)])
    assert result.exit_code == 2, result.output
    assert f"{broken}: not JSON" in result.output
    partial = project / "partial.json"
    partial.write_text(json.dumps({"gpu-prod-1": ONPREM_OUTPUTS["gpu-prod-1"]}))
    result = CliRunner().invoke(app, [command, "--stack", "onprem-prod", "--outputs", str(partial)])
    assert result.exit_code == 2
    assert "no address for host(s) gpu-prod-2" in result.output
    result = CliRunner().invoke(app, [command, "--stack", "lab", "--outputs", str(partial)])
    assert result.exit_code == 2
    assert "Pulumi does not provision" in result.output
    assert "Traceback" not in result.output


def test_the_lock_refuses_a_second_holder_naming_the_first(tmp_path: Path) -> None:
    with environment_lock(tmp_path, "lab", "up"):
        script = (
            "from pathlib import Path; from gpufleet.lifecycle.lock import environment_lock\n"
            f"with environment_lock(Path({str(tmp_path)!r}), 'lab', 'up'): pass\n"
        )
        second = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=False
        )
        assert second.returncode == 1
        assert f"stack 'lab' is locked by `gpufleet up` (pid {os.getpid()}" in second.stderr
    # Released: taken again; and a second holder in the same process is refused too.
    with environment_lock(tmp_path, "lab", "up"), pytest.raises(EnvironmentLocked):  # noqa: SIM117
        with environment_lock(tmp_path, "lab", "validate"):
            pass
