"""GPU hosts in the StackSpec, the Ansible inventory generated from them, the host gate's parsers.

Real: stack files on disk through the loader, the inventory generator, the Typer app in-process
(bad input only: nothing here reaches a host), the nvidia_driver role's defaults file. The
nvidia-smi and /proc outputs are copies of what the real driver prints (no GPU on this machine).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from generators.ansible_inventory import InventoryError, render_inventory
from gpufleet.cli import app
from gpufleet.spec.loading import load_stack_spec
from gpufleet.spec.problems import SpecError
from gpufleet.spec.stack import StackSpec
from tests.conftest import PROJECT_ROOT
from validation.gpu_host import (
    gpu_host_targets,
    judge_gpus,
    nvidia_gpus_on_pci_bus,
    parse_driver_version,
    parse_nvidia_smi_gpus,
)

runner = CliRunner()


def azure_spec(host: str) -> StackSpec:
    """A valid azure stack with one host and no address yet (Pulumi's outputs give it)."""
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDx9Q3nZ1M0o1x9yWc7yQ9f0h0cWc0s3V0tN5m2lq4bF x"
    return StackSpec.model_validate(
        {
            "environment": "azure",
            "azure": {
                "location": "westeurope",
                "resource_group": "rg-test",
                "owner": "ml-platform",
                "ssh_source_cidrs": ["198.51.100.0/24"],
                "ssh_public_key": key,
            },
            "host_config": {"secure_boot": "signed"},
            "hosts": [{"name": host, "azure": {"size": "Standard_NC4as_T4_v3"}}],
        }
    )


def write_stack(stacks: Path, name: str, config: dict[str, object]) -> Path:
    stacks.mkdir(parents=True, exist_ok=True)
    path = stacks / f"Pulumi.{name}.yaml"
    path.write_text(yaml.safe_dump({"config": {f"gpufleet:{k}": v for k, v in config.items()}}))
    return path


def static_spec(**config: object) -> StackSpec:
    fields: dict[str, object] = {
        "environment": "static",
        "hosts": [{"name": "gpu-a", "address": "10.0.0.5", "gpus": {"model": "t4"}}],
    }
    fields.update(config)
    return StackSpec.model_validate(fields)


def test_the_lab_stack_loads_with_every_gate_and_a_host_stack_without_serving_has_one() -> None:
    spec = load_stack_spec(PROJECT_ROOT / "stacks", "lab").spec
    assert [host.name for host in spec.hosts] == ["lab-t4-1", "lab-h100-1"]
    assert spec.gates == ["host", "correctness", "load"], "lab serves: its Triton is gated"
    assert static_spec().gates == ["host"], "no serving stack, no Triton to gate"
    h100 = spec.hosts[1].gpus
    assert h100 is not None
    assert h100.has_nvswitch, "8 H100s sit on NVSwitch"
    t4 = spec.hosts[0].gpus
    assert t4 is not None
    assert not t4.has_nvswitch


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            {"environment": "static", "hosts": [{"name": "a"}]},
            "hosts[0] (a): a static host needs an address",
        ),
        ({"environment": "static"}, "a static stack lists its machines under gpufleet:hosts"),
        (
            {"environment": "static", "hosts": [{"name": "a", "address": "10.0.0.1"}] * 2},
            "host names must be unique; a repeated",
        ),
        (
            {"environment": "local", "hosts": [{"name": "a", "address": "10.0.0.1"}]},
            "a local stack is this machine and has no hosts",
        ),
        (
            {
                "environment": "static",
                "hosts": [{"name": "a", "address": "10.0.0.1"}],
                "gates": ["host", "load"],
            },
            "the correctness and load gates check each host's Triton, which runs in the serving",
        ),
        (
            {"environment": "static", "hosts": [{"name": "a", "address": "ssh://10.0.0.1:22"}]},
            "is neither an IP address nor a DNS name",
        ),
        (
            {"environment": "static", "hosts": [{"name": "A_1", "address": "10.0.0.1"}]},
            "gpufleet:hosts[0].name: String should match pattern",
        ),
        (
            {
                "environment": "static",
                "hosts": [{"name": "a", "address": "10.0.0.1", "gpus": {"model": "v100"}}],
            },
            "gpufleet:hosts[0].gpus.model: Input should be",
        ),
        (
            {
                "environment": "static",
                "hosts": [{"name": "a", "address": "10.0.0.1"}],
                "host_config": {"cuda_version": "12"},
            },
            "gpufleet:host_config.cuda_version",
        ),
    ],
)
def test_bad_host_specs_get_a_located_error(
    tmp_path: Path, config: dict[str, object], expected: str
) -> None:
    path = write_stack(tmp_path / "stacks", "bad", config)
    with pytest.raises(SpecError) as caught:
        load_stack_spec(tmp_path / "stacks", "bad")
    message = str(caught.value)
    assert expected in message
    assert str(path) in message


def test_inventory_carries_connection_and_role_variables(tmp_path: Path) -> None:
    spec = static_spec(
        hosts=[
            {"name": "gpu-a", "address": "10.0.0.5", "ssh_port": 2222, "gpus": {"model": "t4"}},
            {
                "name": "hgx-1",
                "address": "hgx-1.lab",
                "ssh_user": "ubuntu",
                "gpus": {"model": "h100", "count": 8},
            },
            {"name": "cpu-1", "address": "10.0.0.7"},
        ],
        host_config={
            "package_sources": "distribution",
            "cuda_version": "12.4",
            "manage_services": False,
            "ssh_private_key_file": "keys/id_ed25519",
            "ssh_known_hosts_file": "/etc/gpufleet/known_hosts",
        },
    )
    inventory = render_inventory("lab", spec, project_root=tmp_path)["all"]
    stack_vars, hosts = inventory["vars"], inventory["hosts"]
    assert stack_vars["gpufleet_stack"] == "lab"
    assert stack_vars["ansible_ssh_private_key_file"] == str(tmp_path / "keys/id_ed25519")
    assert "StrictHostKeyChecking=yes" in stack_vars["ansible_ssh_common_args"]
    assert "UserKnownHostsFile=/etc/gpufleet/known_hosts" in stack_vars["ansible_ssh_common_args"]
    assert stack_vars["docker_engine_source"] == "distribution"
    assert stack_vars["cuda_toolkit_enabled"] is True
    assert stack_vars["cuda_toolkit_version"] == "12.4"
    assert stack_vars["docker_engine_service_manage"] is False
    assert stack_vars["nvidia_driver_branch"] == "", "empty: the role picks by GPU family"
    assert hosts["gpu-a"]["ansible_port"] == 2222
    assert hosts["gpu-a"]["ansible_become"] is False, "root needs no sudo"
    assert hosts["gpu-a"]["nvidia_driver_gpu_family"] == "t4"
    assert hosts["hgx-1"]["ansible_become"] is True
    assert hosts["hgx-1"]["nvidia_driver_nvswitch"] is True
    assert hosts["hgx-1"]["nvidia_driver_gpu_count"] == 8
    assert hosts["cpu-1"]["nvidia_driver_gpu_family"] == "default"
    assert hosts["cpu-1"]["nvidia_driver_gpu_count"] == 0


def test_vendor_sources_and_no_cuda_by_default(tmp_path: Path) -> None:
    stack_vars = render_inventory("lab", static_spec(), project_root=tmp_path)["all"]["vars"]
    assert stack_vars["docker_engine_source"] == "docker-ce"
    assert stack_vars["nvidia_container_toolkit_source"] == "vendor"
    assert stack_vars["cuda_toolkit_enabled"] is False
    assert "cuda_toolkit_version" not in stack_vars


def test_inventory_refuses_unknown_limits_and_hosts_without_address(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match=r"--limit gpu-z: stack 'lab' has no such host"):
        render_inventory("lab", static_spec(), project_root=tmp_path, limit="gpu-z")
    azure = azure_spec("az-gpu-1")
    with pytest.raises(InventoryError, match=r"az-gpu-1 .* no address yet.*pulumi up -s lab"):
        render_inventory("lab", azure, project_root=tmp_path)


def test_gate_targets_expect_the_roles_driver_branch(tmp_path: Path) -> None:
    defaults = yaml.safe_load(
        (PROJECT_ROOT / "ansible/roles/nvidia_driver/defaults/main.yml").read_text()
    )
    by_family = defaults["nvidia_driver_branch_by_family"]
    spec = static_spec(
        hosts=[
            {"name": "t4", "address": "10.0.0.5", "gpus": {"model": "t4"}},
            {
                "name": "hgx",
                "address": "10.0.0.6",
                "ssh_user": "ubuntu",
                "gpus": {"model": "h100", "count": 8},
            },
        ]
    )
    targets = gpu_host_targets("lab", spec, project_root=tmp_path)
    assert [t.driver_branch for t in targets] == [str(by_family["t4"]), str(by_family["h100"])]
    assert targets[0].hostspec == "ssh://root@10.0.0.5:22"
    assert "sudo" not in targets[0].backend_options
    assert targets[1].backend_options["sudo"] is True
    pinned = static_spec(host_config={"driver_branch": "570"})
    assert gpu_host_targets("lab", pinned, project_root=tmp_path)[0].driver_branch == "570"


def test_driver_versions_are_read_from_both_kernel_module_flavours() -> None:
    proprietary = (
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01  Sun May 12 19:39:15 UTC 2024\n"
        "GCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04)\n"
    )
    open_modules = (
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.90.07  Release Build  "
        "(dvs-builder@U16-I3-B03-4-3)  Fri May 31 09:30:47 UTC 2024\n"
    )
    assert parse_driver_version(proprietary) == "535.183.01"
    assert parse_driver_version(open_modules) == "550.90.07"
    with pytest.raises(ValueError, match="no driver version"):
        parse_driver_version("")


def test_nvidia_smi_gpus_are_judged_by_family_and_count() -> None:
    hgx = parse_nvidia_smi_gpus("".join(f"{i}, NVIDIA H100 80GB HBM3, Enabled\n" for i in range(8)))
    assert len(hgx) == 8
    assert hgx[3] == {"index": "3", "name": "NVIDIA H100 80GB HBM3", "persistence_mode": "Enabled"}
    assert judge_gpus(hgx, "h100", 8)[0] == "pass"
    assert judge_gpus(hgx[:7], "h100", 8)[0] == "fail", "a GPU fell off the bus"
    a100 = parse_nvidia_smi_gpus("0, NVIDIA A100-SXM4-80GB, Disabled\n")
    status, message = judge_gpus(a100, "a10", 1)
    assert status == "fail", "an A100 is not an A10"
    assert "expected 1x A10" in message
    assert judge_gpus(parse_nvidia_smi_gpus("0, NVIDIA A10, Enabled\n"), "a10", 1)[0] == "pass"
    assert judge_gpus(parse_nvidia_smi_gpus("0, Tesla T4, Enabled\n"), "t4", 1)[0] == "pass"


def test_configure_bad_input_exits_2_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GPUFLEET_NOT_SET_HERE", raising=False)
    stacks = tmp_path / "stacks"
    write_stack(
        stacks,
        "lab",
        {
            "environment": "static",
            "hosts": [{"name": "gpu-a", "address": "10.0.0.5"}],
            "host_config": {"become_password_env": "GPUFLEET_NOT_SET_HERE"},
        },
    )
    write_stack(stacks, "empty", {"environment": "azure"})
    cases = {
        ("--stack", "lab", "--limit", "gpu-z"): "--limit gpu-z: stack 'lab' has no such host",
        ("--stack", "lab"): "become_password_env names GPUFLEET_NOT_SET_HERE, which is not set",
        ("--stack", "empty"): "config: an azure stack needs gpufleet:azure",
        ("--stack", "nope"): "no stack named 'nope'",
    }
    for arguments, expected in cases.items():
        result = runner.invoke(app, ["configure", *arguments, "--stacks-dir", str(stacks)])
        assert result.exit_code == 2, (arguments, result.output)
        assert expected in result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "build").exists(), "bad input leaves nothing behind"


def test_only_display_and_3d_controllers_of_nvidia_count_as_gpus() -> None:
    """An HGX H100 board: 8 GPUs (3D controllers) and 4 NVSwitch chips (bridges), both 10de."""
    gpus = [f"0000:{bus:02x}:00.0 0x10de 0x030200" for bus in range(0x18, 0x20)]
    switches = [f"0000:{bus:02x}:00.0 0x10de 0x068000" for bus in range(0x05, 0x09)]
    others = ["0000:00:00.0 0x8086 0x060000", "0000:03:00.0 0x1a03 0x030000"]
    found = nvidia_gpus_on_pci_bus("\n".join(switches + gpus + others) + "\n")
    assert len(found) == 8
    assert found[0] == "0000:18:00.0"
    assert nvidia_gpus_on_pci_bus("0000:00:1e.0 0x10de 0x030000\n") == ["0000:00:1e.0"], "a T4"
    assert nvidia_gpus_on_pci_bus("") == []


def test_gate_targets_bracket_ipv6_and_refuse_what_cannot_be_checked(tmp_path: Path) -> None:
    spec = static_spec(hosts=[{"name": "v6", "address": "2001:db8::7", "ssh_port": 2222}])
    (target,) = gpu_host_targets("lab", spec, project_root=tmp_path)
    assert target.hostspec == "ssh://root@[2001:db8::7]:2222"
    azure = azure_spec("az-1")
    with pytest.raises(InventoryError, match="no address yet"):
        gpu_host_targets("cloud", azure, project_root=tmp_path)
    local = StackSpec.model_validate({"environment": "local"})
    with pytest.raises(InventoryError, match="is a local stack"):
        gpu_host_targets("local", local, project_root=tmp_path)
    # The spec refuses a hostless azure stack; the inventory refuses one on its own too.
    empty = StackSpec.model_construct(environment="azure", hosts=[])
    with pytest.raises(InventoryError, match="lists no hosts"):
        gpu_host_targets("empty", empty, project_root=tmp_path)
