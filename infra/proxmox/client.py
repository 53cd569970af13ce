"""A verified connection to a Proxmox VE API, and its failures as one-line messages.

    cluster = spec.proxmox
    api = connect(cluster, secret_from_environment(cluster), project_root=Path.cwd())
    nodes = api_get(api, "nodes")                 # ProxmoxApiError or ProxmoxUnreachable
    status = wait_for_task(api, "pve1", upid, timeout_s=600)   # ProxmoxTaskError unless OK

TLS is always verified: against the stack's `ca_bundle` when it names one, else against the
CA bundle requests uses by default (certifi's), named explicitly so that REQUESTS_CA_BUNDLE or
CURL_CA_BUNDLE in the environment cannot swap the trust root. Errors carry PVE's own words
(status code, message, per-field errors) on one line, never a traceback; the secret never
appears in them.

A GET (and a password login) whose connection dropped or whose answer did not come in time is
sent again with bounded backoff (retry.py); when that fails too, the error is a
ProxmoxTransientError, which says so instead of blaming the endpoint.
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import time
import urllib.parse
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests
from proxmoxer import ProxmoxAPI, ResourceException  # type: ignore[import-untyped]
from proxmoxer.core import AuthenticationError  # type: ignore[import-untyped]

from gpufleet.spec.proxmox import ProxmoxCluster
from infra.proxmox.retry import Backoff, TransientFault, retried

DEFAULT_PORT = 8006
DEFAULT_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 15
_LOG_PAGE = 500
_LOG_MAX_PAGES = 200
_UNAUTHORIZED = 401
# GETs and logins cut short by the network are sent again this often (about 7.5 s of waiting).
DEFAULT_BACKOFF = Backoff(tries=5, first_delay_s=0.5, max_delay_s=4.0)


class ProxmoxError(Exception):
    """Something about the Proxmox API went wrong; str() is one line: what, and what to do."""


class MissingSecretError(ProxmoxError):
    """The environment variable that should hold the token secret or password is not set."""


class ProxmoxUnreachable(ProxmoxError):
    """The API cannot be used at all: no connection, TLS not verified, or the login refused."""


class ProxmoxTransientError(ProxmoxUnreachable, TransientFault):
    """The connection was made, then lost before the answer came (reset, closed, timed out):
    a fault of the network, not of the API's settings; sending again may cure it."""

    def __init__(self, call: str, what: str) -> None:
        self.call = call
        self.what = what
        super().__init__(call, what)

    def __str__(self) -> str:
        times = f", {self.tries} times in a row" if self.tries > 1 else ""
        return (
            f"{self.call}: {self.what}{times}: a transient network fault between here and the "
            "API, not its settings; run again once the network is steady"
        )


class ProxmoxApiError(ProxmoxError):
    """The API answered one call with an error (PVE's status code and message)."""

    def __init__(self, method: str, path: str, status_code: int, pve_message: str) -> None:
        self.method = method
        self.path = path
        self.status_code = status_code
        self.pve_message = pve_message
        super().__init__(f"{method} /{path}: {self.reason}")

    @property
    def reason(self) -> str:
        """PVE's words: `403 Permission check failed (/vms, VM.Audit)`."""
        return f"{self.status_code} {self.pve_message}"


class ProxmoxTaskError(ProxmoxError):
    """A PVE task (clone, start, ...) ended with an exit status other than OK, or ran too long."""

    def __init__(
        self, upid: str, exitstatus: str | None, log_tail: list[str], *, timeout_s: float = 0
    ) -> None:
        self.upid = upid
        self.exitstatus = exitstatus
        self.log_tail = log_tail
        task = describe_upid(upid)
        if exitstatus is None:
            what = f"{task} still running after {timeout_s:g}s (it may yet finish; see its log)"
        else:
            what = f"{task} failed: {one_line(exitstatus)}"
        log = f"; log: {' | '.join(log_tail)}" if log_tail else ""
        super().__init__(what + log)


def secret_from_environment(
    cluster: ProxmoxCluster, environ: Mapping[str, str] | None = None
) -> str:
    """The token secret or password from the variable `cluster.secret_env` names."""
    value = (os.environ if environ is None else environ).get(cluster.secret_env, "")
    if not value:
        if cluster.token_id is not None:
            what = f"the secret of API token {cluster.token_id}"
        else:
            what = f"the password of {cluster.user}"
        raise MissingSecretError(
            f"{cluster.secret_env} is not set: export {what} in it (the value of the "
            "gpufleet:proxmox_secret Pulumi secret) and run again"
        )
    return value


def tls_verify_setting(cluster: ProxmoxCluster, project_root: Path) -> str:
    """The CA file requests verifies the API's certificate with: the stack's, else certifi's.

    Always a path: requests replaces `verify=True` by $REQUESTS_CA_BUNDLE or $CURL_CA_BUNDLE
    when either is set, a path it keeps.
    """
    if cluster.ca_bundle is None:
        return str(requests.utils.DEFAULT_CA_BUNDLE_PATH)
    return str(ca_bundle_path(cluster, project_root))


def ca_bundle_path(cluster: ProxmoxCluster, project_root: Path) -> Path:
    """The stack's `ca_bundle` as an existing file (relative to the project root)."""
    assert cluster.ca_bundle is not None
    path = Path(cluster.ca_bundle).expanduser()
    if not path.is_absolute():
        path = project_root / path
    if not path.is_file():
        raise ProxmoxError(
            f"proxmox.ca_bundle {cluster.ca_bundle} ({path}) is not a file: save the PEM of the "
            "CA that signed the API's certificate there (PVE: /etc/pve/pve-root-ca.pem)"
        )
    return path


def connect(
    cluster: ProxmoxCluster,
    secret: str,
    *,
    project_root: Path,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    backoff: Backoff = DEFAULT_BACKOFF,
) -> ProxmoxAPI:
    """A proxmoxer ProxmoxAPI over HTTPS with TLS verified, logged in with the token or password.

    A token login sends nothing yet; a password login asks for a ticket at once (sent again
    when the network drops it), so an unreachable API or a refused password raises
    ProxmoxUnreachable here.
    """
    url = urllib.parse.urlsplit(cluster.endpoint)
    options: dict[str, Any] = {
        "host": url.hostname,
        "port": url.port or DEFAULT_PORT,
        "backend": "https",
        "service": "PVE",
        "verify_ssl": tls_verify_setting(cluster, project_root),
        "timeout": timeout_s,
    }
    prefix = url.path.strip("/").removesuffix("api2/json").strip("/")
    if prefix:
        options["path_prefix"] = prefix
    if cluster.token_id is not None:
        user, _, token_name = cluster.token_id.partition("!")
        options.update(user=user, token_name=token_name, token_value=secret)
    else:
        options.update(user=cluster.user, password=secret)
    return retried(lambda: _login(cluster, options, timeout_s), backoff)


def _login(cluster: ProxmoxCluster, options: dict[str, Any], timeout_s: float) -> ProxmoxAPI:
    try:
        return ProxmoxAPI(**options)
    except AuthenticationError:
        raise ProxmoxUnreachable(
            f"{cluster.endpoint} refused the password login of {cluster.user}: check the user "
            f"and the password in {cluster.secret_env}"
        ) from None
    except requests.RequestException as error:
        raise unreachable(error, timeout_s) from None


def api_get(
    api: ProxmoxAPI, path: str, /, *, backoff: Backoff = DEFAULT_BACKOFF, **params: Any
) -> Any:
    """GET `path` (e.g. `nodes/pve1/qemu`): the answer's data, or a ProxmoxError.

    A GET the network cut short is sent again (`backoff`); it changes nothing on PVE.
    """
    return retried(lambda: _get_once(api, path, params), backoff)


def _get_once(api: ProxmoxAPI, path: str, params: Mapping[str, Any]) -> Any:
    try:
        return api(path).get(**params)
    except ResourceException as error:
        pve_message = one_line(str(error.content or ""))
        if isinstance(error.errors, dict):
            fields = "; ".join(
                f"{key}: {one_line(str(value))}" for key, value in error.errors.items()
            )
            if fields and "errors" not in error.errors:
                pve_message = f"{pve_message} ({fields})"
        if error.status_code == _UNAUTHORIZED:
            raise ProxmoxUnreachable(
                f"the API refused the login: {error.status_code} {pve_message}; check the token "
                "id or user and its secret (a password login's ticket may have expired)"
            ) from None
        raise ProxmoxApiError("GET", path, error.status_code, pve_message) from None
    except requests.RequestException as error:
        raise unreachable(error) from None


def wait_for_task(
    api: ProxmoxAPI,
    node: str,
    upid: str,
    timeout_s: float,
    *,
    poll_s: float = 1.0,
    backoff: Backoff = DEFAULT_BACKOFF,
) -> dict[str, Any]:
    """Poll the task until it stops; its status, or ProxmoxTaskError unless it ended OK (or
    OK with warnings). A poll the network cut short is sent again (`backoff`).

    Unlike proxmoxer's Tasks.blocking_status this never returns None: a task still running at
    the timeout raises too, and the exit status is checked.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        status = api_get(api, f"nodes/{node}/tasks/{upid}/status", backoff=backoff)
        if not isinstance(status, dict):
            raise ProxmoxTaskError(upid, f"unexpected task status {status!r}", [])
        if status.get("status") == "stopped":
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            tail = task_log_tail(api, node, upid, backoff=backoff)
            raise ProxmoxTaskError(upid, None, tail, timeout_s=timeout_s)
        time.sleep(min(poll_s, remaining))
    exitstatus = str(status.get("exitstatus", ""))
    # "WARNINGS: <n>" is how PVE ends a task that did its work and logged warnings.
    if exitstatus != "OK" and not exitstatus.startswith("WARNINGS:"):
        tail = task_log_tail(api, node, upid, backoff=backoff)
        raise ProxmoxTaskError(upid, exitstatus or "no exit status", tail)
    return status


def task_log_tail(
    api: ProxmoxAPI,
    node: str,
    upid: str,
    lines: int = LOG_TAIL_LINES,
    *,
    backoff: Backoff = DEFAULT_BACKOFF,
) -> list[str]:
    """The last lines of a task's log (paged through, as PVE hands it out 50 lines at a time)."""
    tail: deque[str] = deque(maxlen=lines)
    try:
        for page in range(_LOG_MAX_PAGES):
            entries = api_get(
                api,
                f"nodes/{node}/tasks/{upid}/log",
                backoff=backoff,
                start=page * _LOG_PAGE,
                limit=_LOG_PAGE,
            )
            if not isinstance(entries, list):
                break
            tail.extend(one_line(str(e.get("t", ""))) for e in entries if isinstance(e, dict))
            if len(entries) < _LOG_PAGE:
                break
    except ProxmoxError as error:
        tail.append(f"(log unavailable: {error})")
    return [line for line in tail if line]


def close(api: ProxmoxAPI) -> None:
    """Close the connections the API's HTTP session keeps open (proxmoxer has no close)."""
    session = getattr(api, "_store", {}).get("session")
    if isinstance(session, requests.Session):
        session.close()


def describe_upid(upid: str) -> str:
    """`task qmclone 9000 on pve1` from a UPID (UPID:node:pid:pstart:start:type:id:user:)."""
    parts = upid.split(":")
    if len(parts) >= 8 and parts[0] == "UPID":
        what = f"{parts[5]} {parts[6]}".strip()
        return f"task {what} on {parts[1]}"
    return f"task {upid}"


def unreachable(error: Exception, timeout_s: float | None = None) -> ProxmoxUnreachable:
    """A requests failure as one line: which endpoint, what went wrong underneath, what to do."""
    request = getattr(error, "request", None)
    url = urllib.parse.urlsplit(str(getattr(request, "url", "") or ""))
    where = f"https://{url.netloc}" if url.netloc else "the Proxmox API"
    cause = root_cause(error)
    if _cut_short(error, cause):
        method = str(getattr(request, "method", "") or "").upper()
        call = f"{method} {url.path}".strip() if url.path else where
        if isinstance(error, requests.exceptions.ReadTimeout):
            limit = f" within {timeout_s:g}s" if timeout_s else ""
            what = f"{where} took the request but sent no answer{limit}"
        else:
            detail = getattr(cause, "strerror", None) or one_line(str(cause)) or "closed"
            what = f"the connection to {where} was lost before the answer came ({detail})"
        return ProxmoxTransientError(call, what)
    if isinstance(cause, ssl.SSLCertVerificationError) or isinstance(
        error, requests.exceptions.SSLError
    ):
        detail = getattr(cause, "verify_message", None) or one_line(str(cause))
        return ProxmoxUnreachable(
            f"TLS verification of {where} failed ({detail}): set proxmox.ca_bundle to the PEM of "
            "the CA that signed the API's certificate, and use the host name it was issued for"
        )
    if isinstance(error, requests.exceptions.Timeout):
        limit = f" within {timeout_s:g}s" if timeout_s else ""
        return ProxmoxUnreachable(
            f"{where} did not answer{limit}: check the endpoint and that pveproxy runs there"
        )
    detail = getattr(cause, "strerror", None) or one_line(str(cause))
    return ProxmoxUnreachable(
        f"cannot reach {where} ({detail}): check proxmox.endpoint (host and port) and that "
        "pveproxy runs there"
    )


def _cut_short(error: Exception, cause: BaseException) -> bool:
    """The connection was made and then lost (reset, closed, no answer in time): transient.

    Refused connections, names that do not resolve, connect timeouts and TLS verification
    failures are not: they point at the endpoint or the CA, and retrying would only hide that.
    """
    if isinstance(cause, ssl.SSLCertVerificationError):
        return False
    if isinstance(
        error, requests.exceptions.ReadTimeout | requests.exceptions.ChunkedEncodingError
    ):
        return True
    if isinstance(error, requests.exceptions.ConnectTimeout):
        return False
    if not isinstance(error, requests.exceptions.ConnectionError):
        return False
    if isinstance(cause, ConnectionRefusedError | socket.gaierror):
        return False
    return isinstance(
        cause,
        ConnectionResetError
        | ConnectionAbortedError
        | BrokenPipeError
        | http.client.RemoteDisconnected
        | http.client.IncompleteRead
        | ssl.SSLEOFError
        | ssl.SSLZeroReturnError,
    )


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception under requests' and urllib3's wrappers."""
    seen: set[int] = set()
    current = error
    while id(current) not in seen:
        seen.add(id(current))
        reason = getattr(current, "reason", None)
        inner = reason if isinstance(reason, BaseException) else None
        if inner is None:
            inner = next((arg for arg in current.args if isinstance(arg, BaseException)), None)
        inner = inner or current.__cause__ or current.__context__
        # A request made while handling one of our own errors (a failed create's cleanup)
        # has that error as its context: it is not what went wrong underneath.
        if inner is None or isinstance(inner, ProxmoxError):
            break
        current = inner
    return current


def one_line(text: str) -> str:
    """Whitespace, newlines included, collapsed to single spaces."""
    return " ".join(text.split())
