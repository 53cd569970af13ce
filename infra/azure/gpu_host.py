"""`AzureGpuHost`: one stack host's GPU VM on Azure, as a Pulumi component.

Children, named from the host's name: the NIC (`<host>-nic`, accelerated networking, in the
host's subnet), a public IP only when the spec asks (`<host>-pip`), the managed data disk for
the model repository (`<host>-data`, encrypted at rest with platform keys or the stack's disk
encryption set), and the VM (`<host>-vm`): the catalog's size, the image, Trusted Launch with
vTPM and Secure Boot as the spec resolved it, key-only SSH for the admin user, a system-assigned
managed identity, cloud-init from `cloud_init.py`, spot settings when asked, tags.

Outputs: name, private address, size and GPUs (what `gpufleet configure` and the gates need),
and the public address where there is one.

    host = AzureGpuHost(spec.name, AzureGpuHostArgs(stack=..., host=spec, ...))
    pulumi.export(spec.name, {"address": host.private_address})
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi
from pulumi_azure_native import compute, network

from gpufleet.spec.azure import AzureEnvironment, AzureVm
from gpufleet.spec.azure_sizes import GpuSize
from gpufleet.spec.hosts import HostSpec
from infra.azure.cloud_init import DATA_DISK_LUN, encode_custom_data, render_cloud_init

PLATFORM_KEY = "EncryptionAtRestWithPlatformKey"
CUSTOMER_KEY = "EncryptionAtRestWithCustomerKey"


# "Host caching is not supported for disk sizes 4 TiB and larger" (learn.microsoft.com/azure/
# virtual-machines/premium-storage-performance#disk-caching).
HOST_CACHING_LIMIT_GB = 4096


@dataclass(frozen=True)
class AzureGpuHostArgs:
    """What one host's VM is made from."""

    stack: str
    host: HostSpec
    environment: AzureEnvironment
    resource_group_name: pulumi.Input[str]
    subnet_id: pulumi.Input[str]
    tags: dict[str, str]


def gpu_facts(size: GpuSize) -> dict[str, Any]:
    """The `gpus` output: what the catalog says the size has."""
    return {
        "family": size.family,
        "model": size.gpu_model,
        "count": size.gpu_count,
        "share": str(size.gpu_share),
        "memory_gib": size.gpu_memory_gib,
        "nvswitch": size.nvswitch,
        "driver_family": size.driver_family,
    }


def _disk_encryption(environment: AzureEnvironment) -> compute.EncryptionArgs:
    if environment.disk_encryption_set_id:
        return compute.EncryptionArgs(
            type=CUSTOMER_KEY, disk_encryption_set_id=environment.disk_encryption_set_id
        )
    return compute.EncryptionArgs(type=PLATFORM_KEY)


def _spot(vm: AzureVm) -> dict[str, Any]:
    if vm.spot is None:
        return {"priority": "Regular"}
    return {
        "priority": "Spot",
        "eviction_policy": vm.spot.eviction_policy,
        "billing_profile": compute.BillingProfileArgs(max_price=vm.spot.max_price),
    }


class AzureGpuHost(pulumi.ComponentResource):
    """A stack host's GPU VM with its NIC, data disk and (when asked) public IP."""

    name: pulumi.Output[str]
    private_address: pulumi.Output[str]
    public_address: pulumi.Output[str | None]
    size: pulumi.Output[str]
    gpus: pulumi.Output[dict[str, Any]]

    def __init__(
        self, name: str, args: AzureGpuHostArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("gpufleet:azure:GpuHost", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        host, environment = args.host, args.environment
        assert host.azure is not None  # the spec's own check for azure stacks
        vm = host.azure
        size = vm.resolved_size
        image = vm.resolved_image
        tags = {**args.tags, "gpufleet-host": host.name}
        zones = [vm.zone] if vm.zone else None
        common: dict[str, Any] = {
            "resource_group_name": args.resource_group_name,
            "location": environment.location,
            "tags": tags,
        }

        self.public_ip: network.PublicIPAddress | None = None
        public_ip_ref: network.PublicIPAddressArgs | None = None
        if vm.public_ip:
            self.public_ip = network.PublicIPAddress(
                f"{name}-pip",
                public_ip_address_name=f"{host.name}-pip",
                sku=network.PublicIPAddressSkuArgs(name="Standard"),  # closed until the NSG opens
                public_ip_allocation_method="Static",
                zones=zones,
                opts=child,
                **common,
            )
            public_ip_ref = network.PublicIPAddressArgs(id=self.public_ip.id)
        self.nic = network.NetworkInterface(
            f"{name}-nic",
            network_interface_name=f"{host.name}-nic",
            enable_accelerated_networking=True,
            ip_configurations=[
                network.NetworkInterfaceIPConfigurationArgs(
                    name="primary",
                    primary=True,
                    subnet=network.SubnetArgs(id=args.subnet_id),
                    private_ip_allocation_method="Dynamic",
                    public_ip_address=public_ip_ref,
                )
            ],
            opts=child,
            **common,
        )
        self.data_disk = compute.Disk(
            f"{name}-data",
            disk_name=f"{host.name}-data",
            creation_data=compute.CreationDataArgs(create_option="Empty"),
            disk_size_gb=vm.data_disk_gb,
            sku=compute.DiskSkuArgs(name=vm.data_disk_sku),
            encryption=_disk_encryption(environment),
            public_network_access="Disabled",
            network_access_policy="DenyAll",  # no SAS export or import of the disk
            # A zone-redundant disk spans the zones: Azure refuses a zone on it.
            zones=None if vm.data_disk_sku.endswith("_ZRS") else zones,
            opts=child,
            **common,
        )
        os_disk_set = (
            compute.DiskEncryptionSetParametersArgs(id=environment.disk_encryption_set_id)
            if environment.disk_encryption_set_id
            else None
        )
        admin = environment.admin_user
        self.vm = compute.VirtualMachine(
            f"{name}-vm",
            vm_name=host.name,
            hardware_profile=compute.HardwareProfileArgs(vm_size=size.name),
            storage_profile=compute.StorageProfileArgs(
                image_reference=compute.ImageReferenceArgs(
                    publisher=image.publisher,
                    offer=image.offer,
                    sku=image.sku,
                    version=image.version,
                ),
                os_disk=compute.OSDiskArgs(
                    name=f"{host.name}-os",
                    create_option="FromImage",
                    caching=compute.CachingTypes.READ_WRITE,
                    disk_size_gb=vm.os_disk_gb,
                    delete_option="Delete",
                    managed_disk=compute.ManagedDiskParametersArgs(
                        storage_account_type="Premium_LRS", disk_encryption_set=os_disk_set
                    ),
                ),
                data_disks=[
                    compute.DataDiskArgs(
                        lun=DATA_DISK_LUN,
                        create_option="Attach",
                        # The model repository is read far more often than written; Azure
                        # refuses host caching on disks of 4 TiB and more.
                        caching=(
                            compute.CachingTypes.READ_ONLY
                            if vm.data_disk_gb < HOST_CACHING_LIMIT_GB
                            else compute.CachingTypes.NONE
                        ),
                        delete_option="Detach",  # the models outlive a rebuilt VM
                        managed_disk=compute.ManagedDiskParametersArgs(id=self.data_disk.id),
                    )
                ],
            ),
            os_profile=compute.OSProfileArgs(
                computer_name=host.name,
                admin_username=admin,
                custom_data=encode_custom_data(
                    render_cloud_init(stack=args.stack, host=host.name, admin_user=admin)
                ),
                linux_configuration=compute.LinuxConfigurationArgs(
                    disable_password_authentication=True,
                    provision_vm_agent=True,
                    ssh=compute.SshConfigurationArgs(
                        public_keys=[
                            compute.SshPublicKeyArgs(
                                path=f"/home/{admin}/.ssh/authorized_keys",
                                key_data=environment.ssh_public_key,
                            )
                        ]
                    ),
                ),
            ),
            network_profile=compute.NetworkProfileArgs(
                network_interfaces=[
                    compute.NetworkInterfaceReferenceArgs(
                        id=self.nic.id, primary=True, delete_option="Detach"
                    )
                ]
            ),
            security_profile=compute.SecurityProfileArgs(
                security_type="TrustedLaunch",
                uefi_settings=compute.UefiSettingsArgs(
                    secure_boot_enabled=vm.secure_boot_enabled, v_tpm_enabled=True
                ),
                encryption_at_host=vm.encryption_at_host,
            ),
            identity=compute.VirtualMachineIdentityArgs(
                type=compute.ResourceIdentityType.SYSTEM_ASSIGNED
            ),
            diagnostics_profile=compute.DiagnosticsProfileArgs(
                boot_diagnostics=compute.BootDiagnosticsArgs(enabled=True)  # managed storage
            ),
            zones=zones,
            opts=child,
            **_spot(vm),
            **common,
        )
        self.name = pulumi.Output.from_input(host.name)
        self.size = pulumi.Output.from_input(size.name)
        self.gpus = pulumi.Output.from_input(gpu_facts(size))
        self.private_address = self.nic.ip_configurations.apply(_private_address)
        self.public_address = (
            self.public_ip.ip_address
            if self.public_ip is not None
            else pulumi.Output.from_input(None)
        )
        self.register_outputs(
            {
                "name": self.name,
                "private_address": self.private_address,
                "size": self.size,
                "gpus": self.gpus,
            }
        )


def _private_address(configurations: Any) -> str:
    """The primary IP configuration's private address, once Azure has assigned it."""
    for configuration in configurations or []:
        if configuration.primary and configuration.private_ip_address:
            return str(configuration.private_ip_address)
    raise pulumi.RunError("the NIC came back without a private address on its primary config")
