"""A reinstalled host's new SSH host key, accepted only when the operator vouches for it.

After a reinstall the host offers a key that known_hosts does not hold, which is exactly what a
machine in the middle would offer too. So gpufleet never accepts it blindly: it prints the
fingerprints the host offers and stops until the operator passes the one they read on the
host's console (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`) or in the provisioner's
outputs, with --host-key-fingerprint SHA256:... . Only the key with that fingerprint replaces
the host's old entries in the stack's known_hosts file (`ssh-keygen -R`, which keeps the old
file as known_hosts.old).

    offered = scan_host_keys("10.0.0.5", 22)
    accept_host_key(known_hosts, "10.0.0.5", 22, offered, "SHA256:...")
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import subprocess
from pathlib import Path

from generators.ansible_inventory import resolve_path
from gpufleet.lifecycle.environment import Environment


class HostKeyError(Exception):
    """The host's key cannot be accepted (exit 2); the message says what to do."""


@dataclasses.dataclass(frozen=True)
class HostKey:
    kind: str  # ssh-ed25519, ecdsa-sha2-nistp256, ssh-rsa
    key: str  # base64

    @property
    def fingerprint(self) -> str:
        """As `ssh-keygen -l` prints it: SHA256:<base64 without padding>."""
        digest = hashlib.sha256(base64.b64decode(self.key)).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_hosts_file(environment: Environment) -> Path:
    configured = environment.spec.host_config.ssh_known_hosts_file
    if configured:
        return resolve_path(configured, environment.project_root)
    return Path("~/.ssh/known_hosts").expanduser()


def host_pattern(address: str, port: int) -> str:
    return address if port == 22 else f"[{address}]:{port}"


def scan_host_keys(address: str, port: int, *, timeout_s: int = 10) -> list[HostKey]:
    """The host keys the host offers now (ssh-keyscan); [] when nothing answers."""
    result = subprocess.run(
        ["ssh-keyscan", "-T", str(timeout_s), "-p", str(port), address],
        capture_output=True,
        text=True,
        timeout=timeout_s * 4 + 10,
        check=False,
    )
    keys = []
    for line in result.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 3 and not line.startswith("#"):
            keys.append(HostKey(fields[1], fields[2]))
    return keys


def known_keys(path: Path, address: str, port: int) -> list[HostKey]:
    """The keys known_hosts holds for the host, plain or hashed entries."""
    pattern = host_pattern(address, port)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    keys = []
    for line in lines:
        fields = line.split()
        if len(fields) < 3 or line.startswith("#") or fields[0].startswith("@"):
            continue
        if _matches(fields[0], pattern):
            keys.append(HostKey(fields[1], fields[2]))
    return keys


def accept_host_key(
    path: Path, address: str, port: int, offered: list[HostKey], fingerprint: str
) -> HostKey:
    """Replace the host's entries in `path` by the offered key with `fingerprint`."""
    chosen = [key for key in offered if key.fingerprint == fingerprint.strip()]
    if not chosen:
        listed = ", ".join(f"{key.kind} {key.fingerprint}" for key in offered)
        raise HostKeyError(
            f"{address} offers {listed or 'no key'}, none of them {fingerprint}; do not go on: "
            "the machine answering may not be the one you reinstalled. Read the fingerprint on "
            "its console (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub) and try again"
        )
    pattern = host_pattern(address, port)
    if path.exists():
        subprocess.run(
            ["ssh-keygen", "-R", pattern, "-f", str(path)],
            capture_output=True,
            check=True,
            timeout=30,
        )
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if text and not text.endswith("\n"):
        text += "\n"
    path.write_text(text + f"{pattern} {chosen[0].kind} {chosen[0].key}\n", encoding="utf-8")
    return chosen[0]


def _matches(field: str, pattern: str) -> bool:
    if field.startswith("|1|"):  # hashed: |1|salt|HMAC-SHA1(salt, name)
        try:
            _, _, salt, hashed = field.split("|")
            mac = hmac.new(base64.b64decode(salt), pattern.encode(), hashlib.sha1).digest()
        except ValueError:
            return False
        return hmac.compare_digest(base64.b64encode(mac).decode(), hashed)
    return pattern in field.split(",")
