"""One provider call's connection to PVE: timing, login, GETs retried, tasks waited for.

The dynamic provider (provider.py) opens a `PveSession` per Pulumi call from the resource's
inputs: the endpoint, the login, the CA certificate's PEM (`ca_certificate`, written to a
private temporary file for requests, removed with the session) and the secret, which stays in
this object and never goes into a message.

    pve = PveSession(inputs, Timing())
    vms = pve.get("cluster/resources", type="vm")     # sent again if the network drops it
    pve.task("POST", "nodes/pve1/qemu/100/status/start", "pve1", timeout_s=600)

GETs and task polls are sent again when the network cuts them short (retry.py); calls that
change something are sent once here, and the provider decides whether to send them again.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import requests
from proxmoxer import ProxmoxAPI, ResourceException  # type: ignore[import-untyped]
from pulumi.runtime import rpc

from infra.proxmox import vm_config
from infra.proxmox.client import (
    ProxmoxApiError,
    ProxmoxError,
    api_get,
    connect,
    one_line,
    unreachable,
    wait_for_task,
)
from infra.proxmox.retry import Backoff

T = TypeVar("T")

_EXPIRED_TICKET = "invalid PVE ticket"


class GpuVmError(ProxmoxError):
    """Making, changing or removing the VM failed; str() says what and what PVE answered."""


@dataclass(frozen=True)
class Timing:
    """How long to wait for PVE; the tests shrink it (fakepve runs PVE's seconds faster)."""

    task_timeout_s: float = 1800.0  # a full clone of a large disk takes a while
    poll_s: float = 1.0
    shutdown_timeout_s: int = 120  # the guest's ACPI shutdown, before a hard stop
    agent_timeout_s: float = 600.0  # boot, cloud-init and the guest agent answering
    lock_retries: int = 20
    lock_retry_delay_s: float = 15.0  # 20 x 15 s: a backup of a large disk
    request_timeout_s: float = 30.0  # one HTTP request; a hung one ends after this
    network_tries: int = 5  # a call the network cut short is sent this often in all
    network_retry_delay_s: float = 0.5  # doubling between tries, up to 8x

    @property
    def backoff(self) -> Backoff:
        first = self.network_retry_delay_s
        return Backoff(self.network_tries, first_delay_s=first, max_delay_s=first * 8)


class PveSession:
    """One provider call's API connection: PVE's errors as ProxmoxError, tasks waited for.

    A password login whose ticket expired mid-call logs in again, once; an API token has no
    ticket.
    """

    def __init__(self, inputs: Mapping[str, Any], timing: Timing) -> None:
        self.timing = timing
        self._secret = _secret_of(inputs)
        self._relogged = False
        # requests reads a CA from a file only; the directory goes when this session does.
        self._ca_dir: tempfile.TemporaryDirectory[str] | None = None
        ca_file = None
        if inputs.get("ca_certificate"):
            self._ca_dir = tempfile.TemporaryDirectory(prefix="gpufleet-pve-ca-")
            ca_file = Path(self._ca_dir.name, "ca.pem")
            ca_file.write_text(str(inputs["ca_certificate"]), encoding="utf-8")
        self._cluster = vm_config.cluster_of(inputs, ca_file=ca_file)
        self.api = self._connect()

    def _connect(self) -> ProxmoxAPI:
        # ca_bundle is absolute (the file above, or an old state's path): no project root.
        timing = self.timing
        return connect(
            self._cluster,
            self._secret,
            project_root=Path.cwd(),
            timeout_s=timing.request_timeout_s,
            backoff=timing.backoff,
        )

    def run(self, action: Callable[[ProxmoxAPI], T]) -> T:
        try:
            return action(self.api)
        except ProxmoxError as error:
            if self._relogged or self._cluster.uses_token or _EXPIRED_TICKET not in str(error):
                raise
        self._relogged = True
        self.api = self._connect()
        return action(self.api)

    def get(self, path: str, **params: Any) -> Any:
        """GET, sent again when the network cuts it short."""
        backoff = self.timing.backoff
        return self.run(lambda api: api_get(api, path, backoff=backoff, **params))

    def send(self, method: str, path: str, **params: Any) -> Any:
        """POST/PUT/DELETE, sent once: a lost answer raises ProxmoxTransientError."""
        timeout = self.timing.request_timeout_s
        return self.run(lambda api: _send(api, method, path, params, timeout))

    def task(self, method: str, path: str, node: str, timeout_s: float, **params: Any) -> Any:
        """Call a method that starts a PVE task and wait for it to end OK (ProxmoxTaskError)."""
        result = self.send(method, path, **params)
        if isinstance(result, str) and result.startswith("UPID:"):
            return self.wait(node, result, timeout_s)
        return result

    def wait(self, node: str, upid: str, timeout_s: float) -> Any:
        """The task's status once it ended OK; ProxmoxTaskError otherwise."""
        poll, backoff = self.timing.poll_s, self.timing.backoff
        return self.run(
            lambda api: wait_for_task(api, node, upid, timeout_s, poll_s=poll, backoff=backoff)
        )

    def active_tasks(self, node: str, vmid: int) -> list[str]:
        """UPIDs of the tasks still running on `node` for guest `vmid` (PVE lists the newest
        first; a finished task has a `status`)."""
        tasks = self.get(f"nodes/{node}/tasks", vmid=vmid, source="active", limit=50)
        return [str(t["upid"]) for t in tasks if isinstance(t, dict) and "status" not in t]


def _send(api: ProxmoxAPI, method: str, path: str, params: dict[str, Any], timeout_s: float) -> Any:
    """POST/PUT/DELETE through proxmoxer; errors as client.py words them for GETs."""
    resource = api(path)
    call = {"POST": resource.post, "PUT": resource.put, "DELETE": resource.delete}[method]
    try:
        return call(**params)
    except ResourceException as error:
        message = one_line(str(error.content or ""))
        if isinstance(error.errors, dict) and "errors" not in error.errors:
            fields = "; ".join(f"{k}: {one_line(str(v))}" for k, v in error.errors.items())
            message = f"{message} ({fields})" if fields else message
        raise ProxmoxApiError(method, path, error.status_code, message) from None
    except requests.RequestException as error:
        raise unreachable(error, timeout_s) from None


def _secret_of(inputs: Mapping[str, Any]) -> str:
    secret = inputs.get("secret")
    if rpc.is_rpc_secret(secret):
        secret = rpc.unwrap_rpc_secret(secret)
    if not isinstance(secret, str) or not secret:
        raise GpuVmError(
            "no Proxmox secret in the resource's inputs: set it with `pulumi config set "
            "--secret gpufleet:proxmox_secret <token secret or password>`"
        )
    return secret
