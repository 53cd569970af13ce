"""Replace the machine of one host: what differs between static, proxmox and azure hosts.

- static: the operator reinstalls the OS; gpufleet cannot. The step waits for it: while the
  host still offers the host key known_hosts holds, it stops and says to reinstall; once the
  host offers a new key it accepts only the one the operator vouches for (host_key.py).
- proxmox: the VM is made again through the project's dynamic provider
  (infra/proxmox/provider.py): the old VM powered off and set aside, a fresh clone of the
  template with the same name, tags and GPU mapping and a new vmid started, then the old VM
  destroyed (or put back, should the new one fail). Where the Pulumi CLI is installed,
  `pulumi up --replace <the VM's URN>` through the Automation API does the same and keeps
  Pulumi's state right; without it (as on the machines this project is tested on) the provider
  is called directly and Pulumi's state still names the old VM id until `pulumi refresh`.
- azure: `pulumi up --replace` of the VM through the Automation API where the Pulumi CLI is;
  the data disk (its own resource, attached with delete_option Detach) outlives the VM and is
  attached to the new one. Without the CLI the operator runs that command, and the step waits
  for the new host key as on a static host.

    outcome = replace_machine(environment, "gpu-a", host_key_fingerprint=None, say=print)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

from generators.ansible_inventory import resolve_path
from gpufleet.lifecycle.environment import Environment
from gpufleet.rebuild.host_key import (
    HostKeyError,
    accept_host_key,
    known_hosts_file,
    known_keys,
    scan_host_keys,
)

Say = Callable[[str], None]


class AwaitingOperator(Exception):
    """The rebuild waits for the operator (reinstall the OS, vouch for a host key): exit 2,
    and the message says what to do, then to run the same command again."""


class ReplaceError(Exception):
    """The machine could not be replaced (exit 2); the message says why."""


def replace_machine(
    environment: Environment, host: str, *, say: Say, timing: Any = None
) -> dict[str, Any]:
    """Replace `host`'s machine where gpufleet can; what was done. A static host's machine is
    the operator's to reinstall, an Azure VM's (without the Pulumi CLI) to replace: nothing is
    done here, and the host key step tells whether it has been."""
    kind = environment.spec.environment
    if kind == "proxmox":
        return replace_proxmox_vm(environment, host, say, timing=timing)
    if kind == "azure":
        return replace_azure_vm(environment, host, say)
    return {"machine": "reinstalled by the operator"}


def operator_replaces(environment: Environment) -> bool:
    """Whether the operator replaces the machine (and the old host key means "not yet")."""
    kind = environment.spec.environment
    return kind == "static" or (kind == "azure" and shutil.which("pulumi") is None)


def azure_replace_command(environment: Environment, host: str) -> str:
    return (
        f"pulumi up -s {environment.name} --replace "
        f"'urn:pulumi:{environment.name}::gpufleet::gpufleet:azure:GpuHost"
        f"$azure-native:compute:VirtualMachine::{host}-vm'"
    )


def replace_azure_vm(environment: Environment, host: str, say: Say) -> dict[str, Any]:
    """`pulumi up --replace` of the host's VM through the Automation API where the Pulumi CLI
    is; the data disk (`<host>-data`, its own resource, attached with delete_option Detach) is
    kept and attached to the new VM. Without the CLI the operator runs the command."""
    command = azure_replace_command(environment, host)
    if shutil.which("pulumi") is None:
        say(f"  no Pulumi CLI here: the VM is replaced with `{command}` where it is installed")
        return {"machine": f"replaced by the operator: {command}", "data_disk": f"{host}-data"}
    say("  the Pulumi CLI is installed: replacing the VM with `pulumi up --replace`")
    return {**_replace_with_pulumi(environment, host), "data_disk": f"{host}-data"}


def replace_static(
    environment: Environment, host: str, fingerprint: str | None, say: Say
) -> dict[str, Any]:
    address = environment.host(host).address
    assert address is not None
    return trust_host_key(environment, host, address, fingerprint, say, static=True)


def trust_host_key(
    environment: Environment,
    host: str,
    address: str,
    fingerprint: str | None,
    say: Say,
    *,
    static: bool,
) -> dict[str, Any]:
    """Accept the (re)installed machine's SSH host key, never blindly."""
    port = environment.host(host).ssh_port
    path = known_hosts_file(environment)
    offered = scan_host_keys(address, port)
    if not offered:
        raise AwaitingOperator(
            f"{host} ({address}:{port}) does not answer SSH; "
            + ("reinstall its OS with the stack's SSH key authorized, " if static else "")
            + "then run this command again"
        )
    listed = ", ".join(f"{key.kind} {key.fingerprint}" for key in offered)
    known = {(key.kind, key.key) for key in known_keys(path, address, port)}
    still_known = [key for key in offered if (key.kind, key.key) in known]
    if still_known and (fingerprint is None or not static):
        if static:
            how = (
                f"replace its VM ({azure_replace_command(environment, host)}; the data disk is "
                "kept), read the new host key's fingerprint in its boot log (az vm "
                "boot-diagnostics get-boot-log)"
                if environment.spec.environment == "azure"
                else f"reinstall {host} now (Debian 12 or Ubuntu 22.04/24.04, the stack's SSH "
                "key authorized for its ssh_user), read the new host key's fingerprint on its "
                "console (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub)"
            )
            raise AwaitingOperator(
                f"{host} ({address}) still offers the host key {path} knows "
                f"({still_known[0].fingerprint}): the machine has not been replaced. The backup "
                f"is taken; {how}, then run this command again with --host-key-fingerprint "
                "SHA256:..."
            )
        say(f"  {host} offers a host key {path} already knows ({still_known[0].fingerprint})")
        return {"host_key": still_known[0].fingerprint, "host_key_changed": False}
    if fingerprint is None:
        raise AwaitingOperator(
            f"{host} ({address}) offers new host key(s): {listed}. gpufleet does not accept a new "
            "host key blindly (a machine in the middle would offer one too): read the fingerprint "
            "on the host's console (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub) or in the "
            "provisioner's output, and if it is one of these, run this command again with "
            "--host-key-fingerprint SHA256:..."
        )
    try:
        accepted = accept_host_key(path, address, port, offered, fingerprint)
    except HostKeyError as error:
        raise AwaitingOperator(str(error)) from None
    say(f"  accepted {host}'s new host key {accepted.kind} {accepted.fingerprint} into {path}")
    return {"host_key": accepted.fingerprint, "host_key_changed": True, "known_hosts": str(path)}


def replace_proxmox_vm(
    environment: Environment, host: str, say: Say, *, timing: Any = None
) -> dict[str, Any]:
    """Make the host's VM again through the dynamic provider: the old one powered off and set
    aside, a new one cloned (same name, tags, GPU mapping; a new vmid) and started, then the
    old one destroyed. `timing`: the provider's (tests pass a fast one)."""
    # infra is imported here only: the rebuild sits above infra, the lifecycle below it.
    from infra.proxmox.provider import GpuVmProvider
    from infra.proxmox.vm_config import vm_inputs

    cluster = environment.spec.proxmox
    if cluster is None:
        raise ReplaceError(f"stack {environment.name!r} has no gpufleet:proxmox block")
    secret = os.environ.get(cluster.secret_env)
    if not secret:
        raise ReplaceError(
            f"set {cluster.secret_env} to the Proxmox API token's secret (or the password) to "
            "replace the VM"
        )
    ca_certificate = None
    if cluster.ca_bundle:
        ca_certificate = resolve_path(cluster.ca_bundle, environment.project_root).read_text()
    spec_host = environment.host(host)
    inputs = vm_inputs(environment.name, spec_host, cluster, ca_certificate=ca_certificate)
    if shutil.which("pulumi") is not None:
        say(
            "  the Pulumi CLI is installed: replacing the VM with `pulumi up --replace` through "
            "the Automation API"
        )
        return _replace_with_pulumi(environment, host)
    say(
        "  no Pulumi CLI here: replacing the VM through the dynamic provider directly; run "
        f"`pulumi refresh -s {environment.name}` where the CLI is, so that its state names the "
        "new VM"
    )
    provider = GpuVmProvider(timing) if timing is not None else GpuVmProvider()
    props = {**inputs, "secret": secret}
    old = provider.find_vm(props)
    if old is not None:
        # Set aside, not destroyed yet: the new VM gets a new vmid, and should it fail to come
        # up, the old one is put back as it was.
        say(f"  powering VM {old[0]} ({spec_host.name}) off and setting it aside")
        provider.set_aside(str(old[0]), props)
    try:
        created = provider.create(props)
    except Exception as error:
        if old is not None:
            provider.set_aside(str(old[0]), props, tagged=True)
        raise ReplaceError(
            f"the new VM for {host} could not be made: {error}"
            + (f"; VM {old[0]} is back as it was" if old else "")
        ) from None
    if old is not None:
        say(f"  destroying the old VM {old[0]}")
        provider.delete(str(old[0]), props)
    outs = created.outs or {}
    say(f"  created VM {created.id} ({outs.get('name')}) at {outs.get('address')}")
    return {
        "old_vmid": old[0] if old else None,
        "vmid": int(created.id or 0),
        "name": outs.get("name"),
        "address": outs.get("address"),
        "gpus": outs.get("gpus"),
    }


def _replace_with_pulumi(environment: Environment, host: str) -> dict[str, Any]:
    """`pulumi up --replace` of the host's VM resource (untested here: no Pulumi CLI)."""
    from pulumi import automation

    stack = automation.select_stack(
        stack_name=environment.name, work_dir=str(environment.project_root)
    )
    deployment = stack.export_stack().deployment or {}
    resources = deployment.get("resources", [])
    vm_urns = [
        str(resource["urn"])
        for resource in resources
        if str(resource.get("urn", "")).endswith(f"::{host}-vm")
    ]
    if len(vm_urns) != 1:
        raise ReplaceError(f"no single VM resource named {host}-vm in stack {environment.name}")
    result = stack.up(replace=vm_urns, on_output=print)
    outputs = {name: item.value for name, item in result.outputs.items()}
    host_outputs = outputs.get(host) or {}
    address = host_outputs.get("address") or host_outputs.get("private_address")
    return {"pulumi": result.summary.result, "address": address}
