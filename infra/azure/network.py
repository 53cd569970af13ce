"""`AzureNetwork`: a stack's VNet, subnets and network security group, as a Pulumi component.

The NSG is the stack's one inbound policy, attached to every subnet: SSH (22) only from the
spec's `ssh_source_cidrs`; Triton (8000-8002), MLflow (5000), Grafana (3000) and Prometheus
(9090) only from the stack's own `address_space`; then a deny of every source and port, ahead
of Azure's default rules. Those defaults matter: `AllowVnetInBound` (65000) allows every port
from the `VirtualNetwork` tag, which also holds peered VNets and VPN-connected ranges, and
`AllowAzureLoadBalancerInBound` (65001) the platform's load balancer; the final deny keeps
both from ever being reached (the stack uses no load balancer). Hosts without a public IP
reach package mirrors through a NAT gateway (outbound only) unless the spec says `outbound:
none`.

    network = AzureNetwork("azure-prod", AzureNetworkArgs(resource_group_name=rg.name, ...))
    network.subnet_ids["gpu"]
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
from pulumi_azure_native import network

from gpufleet.spec.azure import AzureEnvironment

SSH_PORT = "22"
# The serving stack's ports: Triton HTTP/gRPC/metrics, MLflow, Grafana, Prometheus.
SERVING_PORTS = ["8000-8002", "5000", "3000", "9090"]
# Below Azure's default rules (65000 and up), above every allow of ours.
DENY_ALL_PRIORITY = 4096


@dataclass(frozen=True)
class AzureNetworkArgs:
    """What the network is made from: the stack's Azure environment and its tags."""

    resource_group_name: pulumi.Input[str]
    environment: AzureEnvironment
    tags: dict[str, str]


def security_rules(environment: AzureEnvironment) -> list[network.SecurityRuleArgs]:
    """The NSG's rules, lowest priority number first (Azure evaluates them in that order)."""
    stack_addresses = list(environment.address_space)
    return [
        network.SecurityRuleArgs(
            name="allow-ssh-from-listed-networks",
            description="SSH from the spec's ssh_source_cidrs only",
            priority=100,
            direction="Inbound",
            access="Allow",
            protocol="Tcp",
            source_address_prefixes=list(environment.ssh_source_cidrs),
            source_port_range="*",
            destination_address_prefixes=stack_addresses,
            destination_port_range=SSH_PORT,
        ),
        network.SecurityRuleArgs(
            name="allow-serving-inside-stack",
            description="Triton, MLflow, Grafana and Prometheus from the stack's address space",
            priority=200,
            direction="Inbound",
            access="Allow",
            protocol="Tcp",
            source_address_prefixes=stack_addresses,
            source_port_range="*",
            destination_address_prefixes=stack_addresses,
            destination_port_ranges=list(SERVING_PORTS),
        ),
        network.SecurityRuleArgs(
            name="deny-all-inbound",
            description="Nothing else from anywhere: ahead of Azure's AllowVnetInBound, which "
            "would open every port to peered and VPN-connected networks",
            priority=DENY_ALL_PRIORITY,
            direction="Inbound",
            access="Deny",
            protocol="*",
            source_address_prefix="*",
            source_port_range="*",
            destination_address_prefix="*",
            destination_port_range="*",
        ),
    ]


class AzureNetwork(pulumi.ComponentResource):
    """VNet, one NSG on every subnet, and the NAT gateway for outbound traffic."""

    vnet_id: pulumi.Output[str]
    subnet_ids: dict[str, pulumi.Output[str]]

    def __init__(
        self, name: str, args: AzureNetworkArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("gpufleet:azure:Network", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        environment = args.environment
        self.nsg = network.NetworkSecurityGroup(
            f"{name}-nsg",
            network_security_group_name=f"{name}-nsg",
            resource_group_name=args.resource_group_name,
            location=environment.location,
            security_rules=security_rules(environment),
            tags=args.tags,
            opts=child,
        )
        self.vnet = network.VirtualNetwork(
            f"{name}-vnet",
            virtual_network_name=f"{name}-vnet",
            resource_group_name=args.resource_group_name,
            location=environment.location,
            address_space=network.AddressSpaceArgs(
                address_prefixes=list(environment.address_space)
            ),
            tags=args.tags,
            opts=child,
        )
        nat_gateway: network.SubResourceArgs | None = None
        self.nat_gateway: network.NatGateway | None = None
        if environment.outbound == "nat_gateway":
            # Outbound only: a NAT gateway's address accepts no inbound connections.
            self.nat_address = network.PublicIPAddress(
                f"{name}-nat-ip",
                public_ip_address_name=f"{name}-nat-ip",
                resource_group_name=args.resource_group_name,
                location=environment.location,
                sku=network.PublicIPAddressSkuArgs(name="Standard"),
                public_ip_allocation_method="Static",
                tags={**args.tags, "gpufleet-purpose": "nat-gateway-outbound"},
                opts=child,
            )
            self.nat_gateway = network.NatGateway(
                f"{name}-nat",
                nat_gateway_name=f"{name}-nat",
                resource_group_name=args.resource_group_name,
                location=environment.location,
                sku=network.NatGatewaySkuArgs(name="Standard"),
                public_ip_addresses=[network.SubResourceArgs(id=self.nat_address.id)],
                tags=args.tags,
                opts=child,
            )
            nat_gateway = network.SubResourceArgs(id=self.nat_gateway.id)
        self.subnet_ids = {}
        for subnet in environment.subnets:
            # Subnets take no tags in Azure's API (the VNet carries them).
            resource = network.Subnet(
                f"{name}-subnet-{subnet.name}",
                subnet_name=subnet.name,
                virtual_network_name=self.vnet.name,
                resource_group_name=args.resource_group_name,
                address_prefix=subnet.prefix,
                network_security_group=network.NetworkSecurityGroupArgs(id=self.nsg.id),
                nat_gateway=nat_gateway,
                default_outbound_access=False,  # no implicit public egress address
                opts=child,
            )
            self.subnet_ids[subnet.name] = resource.id
        self.vnet_id = self.vnet.id
        self.register_outputs({"vnet_id": self.vnet_id, "subnet_ids": self.subnet_ids})
