"""The Pulumi program (infra/program.py, infra/azure/) on the azure stacks, under mocks.

Real: the program, pulumi-azure-native's resource classes and the Pulumi SDK (registration,
outputs), the stack files through gpufleet's loader, the cloud-init template through jinja2
and its output against cloud-init's own JSON Schema.
Mocked: the Pulumi engine and Azure (`pulumi.runtime.set_mocks`, tests/azure_mocks.py): a
resource's outputs are its inputs, plus the NIC's private address and a public IP's address.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import pulumi
import pytest
import yaml

from gpufleet.spec.loading import load_stack_spec
from infra.azure.cloud_init import render_cloud_init
from tests.azure_mocks import AzureMocks, run_program
from tests.conftest import PROJECT_ROOT

CLOUD_INIT_SCHEMA = PROJECT_ROOT / "tests/data/cloud-init/schema-cloud-config-v1.json"
KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDx9Q3nZ1M0o1x9yWc7yQ9f0h0cWc0s3V0tN5m2lq4bF ops@gpufleet"
)


@pytest.fixture
def prod(pulumi_loop: asyncio.AbstractEventLoop) -> tuple[AzureMocks, dict[str, Any]]:
    return run_program("azure-prod", pulumi_loop)


@pytest.fixture
def dev(pulumi_loop: asyncio.AbstractEventLoop) -> tuple[AzureMocks, dict[str, Any]]:
    return run_program("azure-dev", pulumi_loop)


def vm_of(mocks: AzureMocks, host: str) -> dict[str, Any]:
    return mocks.named(f"{host}-vm").inputs


def test_prod_registers_the_group_network_and_one_vm_nic_and_disk_per_host(
    prod: tuple[AzureMocks, dict[str, Any]],
) -> None:
    mocks, _ = prod
    kinds = sorted(
        r.typ for r in mocks.resources if r.typ.startswith(("azure-native:", "gpufleet:azure"))
    )
    assert kinds == sorted(
        [
            "azure-native:resources:ResourceGroup",
            "gpufleet:azure:Network",
            "azure-native:network:NetworkSecurityGroup",
            "azure-native:network:VirtualNetwork",
            "azure-native:network:Subnet",
            "azure-native:network:Subnet",
            "azure-native:network:PublicIPAddress",  # the NAT gateway's, outbound only
            "azure-native:network:NatGateway",
            *["gpufleet:azure:GpuHost"] * 3,
            *["azure-native:network:NetworkInterface"] * 3,
            *["azure-native:compute:Disk"] * 3,
            *["azure-native:compute:VirtualMachine"] * 3,
        ]
    )
    group = mocks.of_type("resources:ResourceGroup")[0].inputs
    assert (group["resourceGroupName"], group["location"]) == ("gpufleet-prod", "westeurope")
    vnet = mocks.named("azure-prod-vnet").inputs
    assert vnet["addressSpace"] == {"addressPrefixes": ["10.40.0.0/16"]}
    subnets = {r.inputs["subnetName"]: r.inputs for r in mocks.of_type("network:Subnet")}
    assert subnets["serving"]["addressPrefix"] == "10.40.2.0/24"
    nsg_id = "/subscriptions/0000/resourceGroups/rg/providers/azure-native:network:NetworkSecurityGroup/azure-prod-nsg"
    for subnet in subnets.values():
        assert subnet["networkSecurityGroup"]["id"] == nsg_id
        assert subnet["defaultOutboundAccess"] is False
        assert subnet["natGateway"]["id"].endswith("/azure-prod-nat")
    a10_nic = mocks.named("az-prod-a10-1-nic").inputs
    assert a10_nic["ipConfigurations"][0]["subnet"]["id"].endswith("azure-prod-subnet-serving")
    assert "publicIPAddress" not in a10_nic["ipConfigurations"][0]
    assert a10_nic["enableAcceleratedNetworking"] is True


def test_nd_h100_host_is_the_8_gpu_nvswitch_size_on_gen2_with_secure_boot(
    prod: tuple[AzureMocks, dict[str, Any]],
) -> None:
    mocks, outputs = prod
    vm = vm_of(mocks, "az-prod-h100x8")
    assert vm["hardwareProfile"] == {"vmSize": "Standard_ND96isr_H100_v5"}
    assert vm["storageProfile"]["imageReference"] == {
        "publisher": "Canonical",
        "offer": "ubuntu-24_04-lts",
        "sku": "server",
        "version": "latest",
    }
    assert vm["securityProfile"]["securityType"] == "TrustedLaunch"
    assert vm["securityProfile"]["uefiSettings"] == {"secureBootEnabled": True, "vTpmEnabled": True}
    assert vm["zones"] == ["1"]
    assert vm["priority"] == "Regular"
    assert "evictionPolicy" not in vm
    assert vm["identity"] == {"type": "SystemAssigned"}
    assert vm["storageProfile"]["osDisk"]["diskSizeGB"] == 256
    disk = mocks.named("az-prod-h100x8-data").inputs
    assert disk["diskSizeGB"] == 2048
    assert disk["zones"] == ["1"]
    assert outputs["az-prod-h100x8"]["gpus"] == {
        "family": "h100",
        "model": "NVIDIA H100 80GB SXM",
        "count": 8,
        "share": "1",
        "memory_gib": 640,
        "nvswitch": True,
        "driver_family": "datacenter",
    }


def test_nc_h100_host_has_its_exact_size_jammy_gen2_and_encryption_at_host(
    prod: tuple[AzureMocks, dict[str, Any]],
) -> None:
    mocks, outputs = prod
    vm = vm_of(mocks, "az-prod-h100-1")
    assert vm["hardwareProfile"]["vmSize"] == "Standard_NC40ads_H100_v5"
    assert vm["storageProfile"]["imageReference"]["sku"] == "22_04-lts-gen2"
    assert vm["securityProfile"]["encryptionAtHost"] is True
    assert outputs["az-prod-h100-1"]["size"] == "Standard_NC40ads_H100_v5"
    assert outputs["az-prod-h100-1"]["gpus"]["count"] == 1


def test_full_a10_host_runs_with_secure_boot_off_for_the_grid_driver(
    prod: tuple[AzureMocks, dict[str, Any]],
) -> None:
    mocks, outputs = prod
    vm = vm_of(mocks, "az-prod-a10-1")
    assert vm["hardwareProfile"]["vmSize"] == "Standard_NV36ads_A10_v5"
    assert vm["securityProfile"]["uefiSettings"] == {
        "secureBootEnabled": False,
        "vTpmEnabled": True,
    }
    assert outputs["az-prod-a10-1"]["gpus"]["share"] == "1"
    assert outputs["az-prod-a10-1"]["gpus"]["driver_family"] == "grid"


def test_dev_t4_is_a_spot_vm_with_max_price_and_the_only_public_ip(
    dev: tuple[AzureMocks, dict[str, Any]],
) -> None:
    mocks, outputs = dev
    vm = vm_of(mocks, "az-dev-t4-1")
    assert vm["hardwareProfile"]["vmSize"] == "Standard_NC4as_T4_v3"
    assert (vm["priority"], vm["evictionPolicy"], vm["billingProfile"]) == (
        "Spot",
        "Deallocate",
        {"maxPrice": 0.35},
    )
    assert vm["securityProfile"]["uefiSettings"]["secureBootEnabled"] is True
    nic = mocks.named("az-dev-t4-1-nic").inputs
    pip_id = nic["ipConfigurations"][0]["publicIPAddress"]["id"]
    assert pip_id.endswith("/az-dev-t4-1-pip")
    pip = mocks.named("az-dev-t4-1-pip").inputs
    assert pip["sku"] == {"name": "Standard"}
    assert outputs["az-dev-t4-1"]["public_address"].startswith("203.0.113.")
    assert outputs["az-dev-a10-frac"]["public_address"] is None
    disk = mocks.named("az-dev-t4-1-data").inputs
    assert (disk["diskSizeGB"], disk["sku"]) == (128, {"name": "StandardSSD_LRS"})


def test_dev_fractional_a10_is_the_sixth_spot_deleted_on_eviction_secure_boot_off(
    dev: tuple[AzureMocks, dict[str, Any]],
) -> None:
    mocks, outputs = dev
    vm = vm_of(mocks, "az-dev-a10-frac")
    assert vm["hardwareProfile"]["vmSize"] == "Standard_NV6ads_A10_v5"
    assert (vm["priority"], vm["evictionPolicy"], vm["billingProfile"]) == (
        "Spot",
        "Delete",
        {"maxPrice": -1},
    )
    assert vm["securityProfile"]["uefiSettings"]["secureBootEnabled"] is False
    gpus = outputs["az-dev-a10-frac"]["gpus"]
    assert (gpus["share"], gpus["memory_gib"], gpus["driver_family"]) == ("1/6", 4, "grid")


@pytest.mark.parametrize("stack", ["azure-prod", "azure-dev"])
def test_disks_login_and_cloud_init_of_every_vm(
    pulumi_loop: asyncio.AbstractEventLoop, stack: str
) -> None:
    mocks, _ = run_program(stack, pulumi_loop)
    for vm_args in mocks.of_type("compute:VirtualMachine"):
        vm = vm_args.inputs
        host = vm["vmName"]
        os_disk = vm["storageProfile"]["osDisk"]
        assert (os_disk["createOption"], os_disk["deleteOption"]) == ("FromImage", "Delete")
        (data,) = vm["storageProfile"]["dataDisks"]
        assert (data["lun"], data["createOption"], data["deleteOption"]) == (0, "Attach", "Detach")
        assert data["managedDisk"]["id"].endswith(f"/{host}-data")
        profile = vm["osProfile"]
        assert profile["adminUsername"] == "gpufleet"
        linux = profile["linuxConfiguration"]
        assert linux["disablePasswordAuthentication"] is True
        assert linux["ssh"]["publicKeys"] == [
            {"path": "/home/gpufleet/.ssh/authorized_keys", "keyData": KEY}
        ]
        assert "adminPassword" not in profile
        cloud_config = base64.b64decode(profile["customData"]).decode()
        assert cloud_config.startswith("#cloud-config\n")
        assert f"host {host} of stack {stack}" in cloud_config
        document = yaml.safe_load(cloud_config)
        assert document["ssh_pwauth"] is False
        assert document["users"] == ["default"]
        assert "/dev/disk/azure/scsi1/lun0" in document["disk_setup"]
        assert document["mounts"][0][:2] == ["LABEL=gpufleet-data", "/srv/gpufleet"]
        sudoers = next(
            f for f in document["write_files"] if f["path"] == "/etc/sudoers.d/90-gpufleet"
        )
        assert sudoers["content"].strip() == "gpufleet ALL=(ALL) NOPASSWD:ALL"
        sshd = next(f for f in document["write_files"] if f["path"].startswith("/etc/ssh/"))
        assert "PasswordAuthentication no" in sshd["content"]


@pytest.mark.parametrize("stack", ["azure-prod", "azure-dev"])
def test_tags_name_the_stack_models_owner_and_host(
    pulumi_loop: asyncio.AbstractEventLoop, stack: str
) -> None:
    mocks, _ = run_program(stack, pulumi_loop)
    models = {"azure-prod": "resnet50,bert_encoder", "azure-dev": "resnet50"}[stack]
    for resource in mocks.resources:
        tags = resource.inputs.get("tags")
        if tags is None:
            continue
        assert tags["gpufleet-stack"] == stack
        assert tags["gpufleet-models"] == models
        assert tags["owner"] == "ml-platform"
    vm = vm_of(mocks, mocks.of_type("compute:VirtualMachine")[0].inputs["vmName"])
    assert vm["tags"]["gpufleet-host"] == vm["vmName"]
    if stack == "azure-prod":
        assert vm["tags"]["cost-center"] == "ml-4711"


def test_outputs_per_host_are_exported_with_private_addresses(
    prod: tuple[AzureMocks, dict[str, Any]],
) -> None:
    _, outputs = prod
    assert sorted(outputs) == ["az-prod-a10-1", "az-prod-h100-1", "az-prod-h100x8"]
    for name, values in outputs.items():
        assert values["name"] == name
        assert values["private_address"].startswith("10.99.")
        assert values["public_address"] is None


def test_a_bad_azure_spec_stops_the_program_before_any_resource(
    pulumi_loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    from infra.program import build_stack

    stacks = tmp_path / "stacks"
    stacks.mkdir()
    source = (PROJECT_ROOT / "stacks" / "Pulumi.azure-dev.yaml").read_text()
    (stacks / "Pulumi.azure-dev.yaml").write_text(
        source.replace("ssh_source_cidrs: [198.51.100.0/24]", "ssh_source_cidrs: [0.0.0.0/0]")
    )
    mocks = AzureMocks()
    pulumi.runtime.set_mocks(mocks, project="gpufleet", stack="azure-dev", preview=False)
    with pytest.raises(
        pulumi.RunError,
        match=r"Pulumi.azure-dev.yaml:\d+: config.gpufleet:azure.ssh_source_cidrs\[0\]: "
        r"'0.0.0.0/0' opens SSH to the whole internet",
    ):
        build_stack("azure-dev", project_root=tmp_path)
    assert mocks.resources == []


def test_the_program_logs_the_specs_warnings_located_in_the_stack_file(
    pulumi_loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pulumi's log is replaced by a recorder (without an engine it only prints)."""
    logged: list[str] = []
    monkeypatch.setattr(pulumi.log, "warn", lambda message, *args, **kwargs: logged.append(message))
    run_program("azure-dev", pulumi_loop)
    stack_file = PROJECT_ROOT / "stacks" / "Pulumi.azure-dev.yaml"
    line = next(
        number
        for number, text in enumerate(stack_file.read_text().splitlines(), start=1)
        if "name: az-dev-a10-frac" in text
    )
    assert len(logged) == 2
    for message in logged:
        assert message.startswith(f"{stack_file}:{line + 1}: config.gpufleet:hosts[1].azure: ")
    assert "az-dev-a10-frac: Secure Boot is off" in logged[0]
    assert "install the GRID driver on Standard_NV6ads_A10_v5" in logged[1]


def test_a_zone_redundant_data_disk_gets_no_zone(
    pulumi_loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    stacks = tmp_path / "stacks"
    stacks.mkdir()
    source = (PROJECT_ROOT / "stacks" / "Pulumi.azure-prod.yaml").read_text()
    changed = source.replace(
        "        data_disk_gb: 512\n",
        "        data_disk_gb: 512\n        data_disk_sku: Premium_ZRS\n",
    )
    assert changed != source
    (stacks / "Pulumi.azure-prod.yaml").write_text(changed)
    shutil.copytree(PROJECT_ROOT / "modelconfigs", tmp_path / "modelconfigs")
    mocks, _ = run_program("azure-prod", pulumi_loop, project_root=tmp_path)
    disk = mocks.named("az-prod-a10-1-data").inputs
    assert disk["sku"] == {"name": "Premium_ZRS"}
    assert "zones" not in disk
    assert vm_of(mocks, "az-prod-a10-1")["zones"] == ["2"]


@pytest.mark.parametrize("stack", ["azure-prod", "azure-dev"])
def test_every_hosts_cloud_init_is_valid_for_cloud_inits_own_schema(
    pulumi_loop: asyncio.AbstractEventLoop, stack: str
) -> None:
    """cloud-init's JSON Schema (tests/data/cloud-init, from Debian's cloud-init 22.4), with
    jsonschema; the same validator refuses a document with a wrong partition table type."""
    schema = json.loads((CLOUD_INIT_SCHEMA).read_text())
    validator = jsonschema.Draft4Validator(schema)
    mocks, _ = run_program(stack, pulumi_loop)
    for vm in mocks.of_type("compute:VirtualMachine"):
        document = yaml.safe_load(base64.b64decode(vm.inputs["osProfile"]["customData"]))
        assert [error.message for error in validator.iter_errors(document)] == []
        document["disk_setup"]["/dev/disk/azure/scsi1/lun0"]["table_type"] = "dos"
        assert [e.message for e in validator.iter_errors(document)] == [
            "'dos' is not one of ['mbr', 'gpt']"
        ]


def test_host_caching_is_read_only_below_4_tib_and_off_from_4_tib(
    pulumi_loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    """Azure refuses host caching on data disks of 4 TiB and more."""
    stacks = tmp_path / "stacks"
    stacks.mkdir()
    source = (PROJECT_ROOT / "stacks" / "Pulumi.azure-prod.yaml").read_text()
    changed = source.replace("        data_disk_gb: 512\n", "        data_disk_gb: 8192\n", 1)
    assert changed != source
    (stacks / "Pulumi.azure-prod.yaml").write_text(changed)
    shutil.copytree(PROJECT_ROOT / "modelconfigs", tmp_path / "modelconfigs")
    mocks, _ = run_program("azure-prod", pulumi_loop, project_root=tmp_path)
    caching = {
        vm.inputs["vmName"]: vm.inputs["storageProfile"]["dataDisks"][0]["caching"]
        for vm in mocks.of_type("compute:VirtualMachine")
    }
    assert caching["az-prod-a10-1"] == "None"
    assert set(caching.values()) == {"None", "ReadOnly"}


def test_the_serving_stack_of_an_azure_host_lives_on_its_data_disk() -> None:
    """cloud-init mounts the data disk where the serving_stack role puts stack and models."""
    spec = load_stack_spec(PROJECT_ROOT / "stacks", "azure-prod").spec
    document = yaml.safe_load(render_cloud_init(stack="s", host="h", admin_user="gpufleet"))
    mounts = [mount[1] for mount in document["mounts"]]
    assert spec.serving_directory().startswith(f"{mounts[0]}/")
    assert spec.model_copy(update={"environment": "static"}).serving_directory() == (
        "/opt/gpufleet/serving"
    )
