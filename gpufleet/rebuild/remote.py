"""Commands on one host of an environment over SSH, as Ansible reaches it: the stack's key and
known_hosts, strict host key checking, never a prompt; `sudo -n` for users other than root.

Streams go to and from files without passing through memory, with the sha256 of what was
received, so a backup's checksum is that of the bytes the host sent.

    shell = HostShell.for_host(environment, "gpu-a")
    shell.run("docker ps -q")                      # CompletedProcess, text
    digest = shell.stream_to_file("pg_dump ...", Path("registry.dump"))
"""

from __future__ import annotations

import dataclasses
import hashlib
import shlex
import subprocess
from pathlib import Path

from generators.ansible_inventory import resolve_path, ssh_arguments
from gpufleet.lifecycle.environment import Environment

CHUNK = 1 << 20
SSH_UNREACHABLE = 255  # ssh's own failure: no route, refused, host key mismatch


class RemoteError(Exception):
    """A command on the host failed or the host could not be reached; the message says which."""


@dataclasses.dataclass(frozen=True)
class HostShell:
    """Runs commands on one host over SSH."""

    name: str
    address: str
    argv: tuple[str, ...]  # ssh and its options, up to and including the destination
    sudo: bool

    @classmethod
    def for_host(cls, environment: Environment, host: str) -> HostShell:
        spec = environment.host(host)
        config = environment.spec.host_config
        if spec.address is None:
            raise RemoteError(f"host {host} has no address; provision it first")
        options = shlex.split(ssh_arguments(config, environment.project_root))
        options += ["-o", "ConnectTimeout=15", "-o", "ServerAliveInterval=15"]
        if config.ssh_private_key_file:
            key = resolve_path(config.ssh_private_key_file, environment.project_root)
            options += ["-o", "IdentitiesOnly=yes", "-i", str(key)]
        destination = f"{spec.ssh_user}@{spec.address}"
        argv = ("ssh", *options, "-p", str(spec.ssh_port), destination, "--")
        return cls(host, spec.address, argv, spec.ssh_user != "root")

    def _command(self, command: str) -> list[str]:
        wrapped = f"sudo -n sh -c {shlex.quote(command)}" if self.sudo else command
        return [*self.argv, wrapped]

    def run(
        self, command: str, *, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        try:
            result = subprocess.run(
                self._command(command),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise RemoteError(
                f"{self.name}: `{_short(command)}` ran past {timeout:.0f} s"
            ) from None
        if check and result.returncode != 0:
            raise RemoteError(self._failure(command, result.returncode, result.stderr))
        return result

    def reachable(self) -> tuple[bool, str]:
        """(True, "") when `true` runs over SSH, else (False, ssh's last line)."""
        try:
            result = self.run("true", timeout=60, check=False)
        except RemoteError as error:
            return False, str(error)
        if result.returncode == 0:
            return True, ""
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        return False, lines[-1] if lines else f"ssh exited {result.returncode}"

    def stream_to_file(self, command: str, path: Path, *, timeout: float = 3600) -> tuple[str, int]:
        """The command's stdout into `path`; (sha256, bytes) of what arrived. RemoteError when
        the command fails; OSError when `path` cannot be written (disk full)."""
        digest = hashlib.sha256()
        size = 0
        with (
            path.open("wb") as out,
            subprocess.Popen(
                self._command(command),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
            ) as process,
        ):
            assert process.stdout is not None
            assert process.stderr is not None
            try:
                while chunk := process.stdout.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
            except OSError:
                process.kill()
                raise
            stderr = process.stderr.read().decode(errors="replace")
            code = process.wait(timeout=timeout)
        if code != 0:
            raise RemoteError(self._failure(command, code, stderr))
        return digest.hexdigest(), size

    def stream_from_file(self, command: str, path: Path, *, timeout: float = 3600) -> str:
        """Feed `path` to the command's stdin; its stdout (text). RemoteError when it fails."""
        with path.open("rb") as source:
            try:
                result = subprocess.run(
                    self._command(command),
                    stdin=source,
                    capture_output=True,
                    timeout=timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise RemoteError(
                    f"{self.name}: `{_short(command)}` ran past {timeout:.0f} s"
                ) from None
        if result.returncode != 0:
            raise RemoteError(
                self._failure(command, result.returncode, result.stderr.decode(errors="replace"))
            )
        return result.stdout.decode(errors="replace")

    def _failure(self, command: str, code: int, stderr: str) -> str:
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else "no message"
        if code == SSH_UNREACHABLE:
            return f"{self.name} ({self.address}) could not be reached over SSH: {last}"
        return f"{self.name}: `{_short(command)}` exited {code}: {last}"


def _short(command: str, limit: int = 80) -> str:
    return command if len(command) <= limit else command[: limit - 3] + "..."
