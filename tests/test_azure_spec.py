"""Azure stacks in the StackSpec and the GPU size catalog: sizes picked from requests, and the
mistakes refused before any resource exists, each located at its file, line and field.

Real: stack files on disk through gpufleet's loader and pydantic; the CLI (`gpufleet
configure`, which loads the stack first) in-process for the exit code. Nothing talks to Azure.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from gpufleet.cli import app
from gpufleet.spec.azure import azure_warnings
from gpufleet.spec.azure_sizes import CATALOG, closest_sizes, find_size, smallest_size
from gpufleet.spec.loading import load_stack_spec
from gpufleet.spec.problems import SpecError
from tests.conftest import PROJECT_ROOT, changed_copy

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDx9Q3nZ1M0o1x9yWc7yQ9f0h0cWc0s3V0tN5m2lq4bF ops@x"
BASE: dict[str, Any] = {
    "gpufleet:environment": "azure",
    "gpufleet:azure": {
        "location": "westeurope",
        "resource_group": "gpufleet-test",
        "owner": "ml-platform",
        "address_space": ["10.50.0.0/16"],
        "subnets": [{"name": "gpu", "prefix": "10.50.1.0/24"}],
        "ssh_source_cidrs": ["198.51.100.0/24"],
        "ssh_public_key": KEY,
    },
    "gpufleet:host_config": {"secure_boot": "signed"},
    "gpufleet:hosts": [{"name": "gpu-1", "azure": {"gpu": {"model": "h100", "count": 1}}}],
}


def write(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "Pulumi.x.yaml"
    path.write_text(yaml.safe_dump({"config": config}, sort_keys=False))
    return path


def load(tmp_path: Path, config: dict[str, Any]) -> Any:
    write(tmp_path, config)
    return load_stack_spec(tmp_path, "x").spec


def changed(path: list[Any], value: Any) -> dict[str, Any]:
    return changed_copy(BASE, path, value)


def host_vm(value: dict[str, Any]) -> dict[str, Any]:
    return changed(["gpufleet:hosts", 0, "azure"], value)


# --- the catalog --------------------------------------------------------------------------


def test_the_catalog_covers_t4_a10_and_both_h100_series_with_a_source_each() -> None:
    series = {size.series for size in CATALOG}
    assert series == {"NCasT4_v3", "NVadsA10_v5", "NCads_H100_v5", "ND_H100_v5"}
    for size in CATALOG:
        assert size.source.startswith("https://learn.microsoft.com/azure/virtual-machines/sizes/")
    assert len({size.name for size in CATALOG}) == len(CATALOG)


def test_catalog_facts_of_the_sizes_the_stacks_use() -> None:
    nd = find_size("standard_nd96isr_h100_v5")  # Azure's names are case-insensitive
    assert nd is not None
    assert (nd.gpu_count, nd.gpu_memory_gib, nd.nvswitch, nd.infiniband_gbps_per_gpu) == (
        8,
        640,
        True,
        400,
    )
    assert nd.generations == {2}
    assert (nd.local_nvme, nd.temp_storage_gib) == (True, 28000)
    nc = find_size("Standard_NC40ads_H100_v5")
    assert nc is not None
    assert (nc.gpu_count, nc.gpu_memory_gib, nc.generations, nc.max_data_disks) == (1, 94, {2}, 8)
    sixth = find_size("Standard_NV6ads_A10_v5")
    assert sixth is not None
    assert sixth.fractional
    assert str(sixth.gpu_share) == "1/6"
    assert sixth.gpu_memory_gib == 4
    assert sixth.driver_family == "grid"
    assert not sixth.secure_boot_allowed
    t4 = find_size("Standard_NC64as_T4_v3")
    assert t4 is not None
    assert (t4.gpu_count, t4.gpu_memory_gib, t4.generations, t4.driver_family) == (
        4,
        64,
        {1, 2},
        "datacenter",
    )


@pytest.mark.parametrize(
    ("family", "count", "fraction", "memory", "expected"),
    [
        ("t4", 1, False, 0, "Standard_NC4as_T4_v3"),
        ("t4", 4, False, 0, "Standard_NC64as_T4_v3"),
        ("a10", 1, False, 0, "Standard_NV36ads_A10_v5"),  # the smaller of the two full ones
        ("a10", 2, False, 0, "Standard_NV72ads_A10_v5"),
        ("a10", 1, True, 0, "Standard_NV6ads_A10_v5"),
        ("a10", 1, True, 8, "Standard_NV12ads_A10_v5"),
        ("a10", 1, True, 12, "Standard_NV18ads_A10_v5"),
        ("h100", 1, False, 0, "Standard_NC40ads_H100_v5"),
        ("h100", 2, False, 0, "Standard_NC80adis_H100_v5"),
        ("h100", 8, False, 0, "Standard_ND96isr_H100_v5"),
    ],
)
def test_a_request_gets_the_smallest_matching_size(
    family: Any, count: int, fraction: bool, memory: int, expected: str
) -> None:
    size = smallest_size(family, count, allow_fraction=fraction, min_gpu_memory_gib=memory)
    assert size is not None
    assert size.name == expected


def test_no_size_for_three_h100s_and_the_closest_are_the_h100_sizes() -> None:
    assert smallest_size("h100", 3) is None
    assert [size.name for size in closest_sizes("h100", 3)] == [
        "Standard_NC80adis_H100_v5",
        "Standard_NC40ads_H100_v5",
        "Standard_ND96isr_H100_v5",
    ]


# --- the stack files ----------------------------------------------------------------------


def test_the_azure_stacks_load_and_derive_gpus_and_login_from_the_catalog() -> None:
    prod = load_stack_spec(PROJECT_ROOT / "stacks", "azure-prod").spec
    by_name = {host.name: host for host in prod.hosts}
    nd = by_name["az-prod-h100x8"]
    assert nd.azure.resolved_size.name == "Standard_ND96isr_H100_v5"
    assert (nd.gpus.model, nd.gpus.count, nd.gpus.has_nvswitch) == ("h100", 8, True)
    assert nd.ssh_user == "gpufleet"  # the admin user: what Ansible logs in as
    assert by_name["az-prod-a10-1"].azure.resolved_size.name == "Standard_NV36ads_A10_v5"
    dev = load_stack_spec(PROJECT_ROOT / "stacks", "azure-dev").spec
    fraction = dev.hosts[1]
    assert fraction.azure.resolved_size.name == "Standard_NV6ads_A10_v5"
    assert (fraction.gpus.model, fraction.gpus.count) == ("a10", 1)
    assert fraction.azure.secure_boot_enabled is False
    assert dev.hosts[0].azure.secure_boot_enabled is True


def test_defaults_are_gen2_ubuntu_no_public_ip_regular_priority(tmp_path: Path) -> None:
    vm = load(tmp_path, BASE).hosts[0].azure
    image = vm.resolved_image
    assert (image.publisher, image.offer, image.sku, image.generation) == (
        "Canonical",
        "ubuntu-24_04-lts",
        "server",
        2,
    )
    assert vm.public_ip is False
    assert vm.spot is None
    assert vm.secure_boot_enabled is True


def test_a_stack_file_carries_no_private_key_or_secret() -> None:
    for stack in ("azure-prod", "azure-dev"):
        text = (PROJECT_ROOT / "stacks" / f"Pulumi.{stack}.yaml").read_text()
        assert "PRIVATE KEY" not in text
        assert "secure:" not in text
        assert not re.search(r"password|client_secret|subscription", text, re.IGNORECASE)


def test_secure_boot_off_is_warned_with_its_reason_and_the_grid_limit() -> None:
    loaded = load_stack_spec(PROJECT_ROOT / "stacks", "azure-dev")
    warnings = azure_warnings(loaded.spec)
    assert [path for path, _ in warnings] == [("hosts", 1, "azure")] * 2
    messages = " ".join(message for _, message in warnings)
    assert (
        "az-dev-a10-frac: Secure Boot is off: Standard_NV6ads_A10_v5 needs NVIDIA's GRID"
        in messages
    )
    assert "installs datacenter drivers only" in messages
    assert "az-dev-t4-1" not in messages


@pytest.mark.parametrize(
    ("config", "line_holds", "field", "expected"),
    [
        (
            host_vm({"gpu": {"model": "h100", "count": 3}}),
            "gpu:",
            "config.gpufleet:hosts[0].azure.gpu",
            "no Azure size in the catalog has 3 h100 GPU(s); closest: Standard_NC80adis_H100_v5 "
            "(2x NVIDIA H100 NVL, 188 GiB), Standard_NC40ads_H100_v5 (1x NVIDIA H100 NVL, 94 GiB), "
            "Standard_ND96isr_H100_v5 (8x NVIDIA H100 80GB SXM, 640 GiB); ask for one of those",
        ),
        (
            host_vm(
                {"gpu": {"model": "a10", "count": 1, "allow_fraction": True}, "secure_boot": True}
            ),
            "secure_boot: true",
            "config.gpufleet:hosts[0].azure.secure_boot",
            "Standard_NV6ads_A10_v5 needs NVIDIA's GRID driver, which does not load with Secure "
            "Boot on; set secure_boot: false or leave it out",
        ),
        (
            host_vm({"size": "Standard_ND96isr_H100_v5", "image": "ubuntu-22.04-gen1"}),
            "image: ubuntu-22.04-gen1",
            "config.gpufleet:hosts[0].azure.image",
            "Standard_ND96isr_H100_v5 supports Gen2 images only and this image is Gen1; use "
            "ubuntu-22.04 or ubuntu-24.04",
        ),
        (
            changed(["gpufleet:azure", "ssh_source_cidrs"], ["198.51.100.0/24", "0.0.0.0/0"]),
            "- 0.0.0.0/0",
            "config.gpufleet:azure.ssh_source_cidrs[1]",
            "'0.0.0.0/0' opens SSH to the whole internet; list the networks that may connect",
        ),
        (
            changed(
                ["gpufleet:azure", "subnets"],
                [
                    {"name": "gpu", "prefix": "10.50.1.0/24"},
                    {"name": "b", "prefix": "10.50.1.128/25"},
                ],
            ),
            "prefix: 10.50.1.128/25",
            "config.gpufleet:azure.subnets[1].prefix",
            "subnet b (10.50.1.128/25) overlaps subnet gpu (10.50.1.0/24); give each its own prefix",
        ),
    ],
)
def test_the_issues_spec_errors_are_located_and_exit_2(
    tmp_path: Path, config: dict[str, Any], line_holds: str, field: str, expected: str
) -> None:
    """One problem, at the line of the field to change, with what to do."""
    path = write(tmp_path, config)
    with pytest.raises(SpecError) as caught:
        load_stack_spec(tmp_path, "x")
    (problem,) = caught.value.problems
    assert problem.line is not None
    assert line_holds in path.read_text().splitlines()[problem.line - 1]
    assert str(problem).startswith(f"{path}:{problem.line}: {field}: "), str(problem)
    assert expected in str(problem)
    result = CliRunner().invoke(app, ["configure", "--stack", "x", "--stacks-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert expected in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("source", ["*", "Internet", "any", "::/0", "0.0.0.0/0"])
def test_every_spelling_of_anywhere_is_refused_as_ssh_source(tmp_path: Path, source: str) -> None:
    with pytest.raises(
        SpecError, match=r"ssh_source_cidrs\[0\]: .*(opens SSH to the whole internet)"
    ):
        load(tmp_path, changed(["gpufleet:azure", "ssh_source_cidrs"], [source]))


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (
            ["gpufleet:azure", "ssh_public_key"],
            "-----BEGIN OPENSSH PRIVATE KEY-----",
            "that is a private key",
        ),
        (["gpufleet:azure", "ssh_public_key"], "AAAA nope", "is not an OpenSSH public key"),
        (["gpufleet:azure", "ssh_source_cidrs"], ["10.0.0.1/8"], "not a network in CIDR notation"),
        # Two halves of the internet are the internet; public ranges must be /8 or narrower.
        (
            ["gpufleet:azure", "ssh_source_cidrs"],
            ["0.0.0.0/1", "128.0.0.0/1"],
            "0.0.0.0/1 spans 2,147,483,648 public addresses",
        ),
        (["gpufleet:azure", "ssh_source_cidrs"], ["2001:db8::/32"], "is IPv6"),
        (["gpufleet:azure", "admin_user"], "admin", "Azure does not allow 'admin' as admin user"),
        (
            ["gpufleet:azure", "address_space"],
            ["10.50.0.0/16", "10.50.128.0/17"],
            "10.50.128.0/17 overlaps address_space[0] 10.50.0.0/16",
        ),
        (
            ["gpufleet:azure", "subnets"],
            [{"name": "gpu", "prefix": "10.60.0.0/24"}],
            "10.60.0.0/24 is outside the address space (10.50.0.0/16)",
        ),
        (["gpufleet:azure"], None, "an azure stack needs gpufleet:azure"),
        (["gpufleet:hosts", 0, "azure"], None, "gpu-1: an azure host needs an azure block"),
        (["gpufleet:hosts", 0, "azure", "gpu"], None, "give either gpu: {model, count} or size:"),
        (
            ["gpufleet:hosts", 0, "azure", "size"],
            "Standard_NC40ads_H100_v5",
            "give either gpu: {model, count} or size:",
        ),
        (
            ["gpufleet:hosts", 0, "azure"],
            {"size": "Standard_NC4as_T4"},
            "'Standard_NC4as_T4' is not in gpufleet's GPU size catalog; did you mean "
            "Standard_NC4as_T4_v3",
        ),
        (
            ["gpufleet:hosts", 0, "azure"],
            {"size": "Standard_NC4as_T4_v3", "image": "ubuntu-22.04-gen1"},
            "Trusted Launch (Secure Boot, vTPM) needs a Gen2 image",
        ),
        (
            ["gpufleet:hosts", 0, "azure"],
            {"size": "Standard_NC4as_T4_v3", "secure_boot": False},
            "Standard_NC4as_T4_v3 runs the datacenter driver, which Ubuntu ships signed: Secure "
            "Boot stays on",
        ),
        (
            ["gpufleet:hosts", 0, "gpus"],
            {"model": "h100", "count": 2},
            "Standard_NC40ads_H100_v5 (1x NVIDIA H100 NVL, 94 GiB) has 1 h100 GPU(s), not what "
            "gpus says",
        ),
        (["gpufleet:hosts", 0, "ssh_user"], "ubuntu", "Azure VMs have one login"),
        (["gpufleet:hosts", 0, "azure", "subnet"], "nope", "no subnet named 'nope' (subnets: gpu)"),
        (
            ["gpufleet:host_config", "secure_boot"],
            "fail",
            "gpu-1 boots with Secure Boot on (Standard_NC40ads_H100_v5), where the driver role "
            "stops unless it installs Ubuntu's signed modules; set "
            "gpufleet:host_config.secure_boot: signed",
        ),
        (
            ["gpufleet:hosts", 0, "azure", "spot"],
            {"max_price": 0},
            "use -1 (up to the regular price)",
        ),
    ],
)
def test_bad_azure_specs_get_a_located_error(
    tmp_path: Path, path: list[Any], value: Any, expected: str
) -> None:
    with pytest.raises(SpecError) as caught:
        load(tmp_path, changed(path, value))
    assert expected in str(caught.value)
    assert re.match(rf"{re.escape(str(tmp_path))}/Pulumi\.x\.yaml:\d+: config", str(caught.value))


def test_azure_settings_are_refused_outside_azure_stacks(tmp_path: Path) -> None:
    config = {
        "gpufleet:environment": "static",
        "gpufleet:hosts": [
            {"name": "gpu-1", "address": "10.0.0.5", "azure": {"size": "Standard_NC4as_T4_v3"}}
        ],
    }
    with pytest.raises(SpecError, match="azure settings belong to azure stacks only"):
        load(tmp_path, config)
