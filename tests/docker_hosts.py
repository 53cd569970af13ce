"""Pytest fixtures with real Debian 12 hosts to converge with Ansible and check with testinfra.

What is real: a Docker engine, either a dockerd these fixtures start in a temporary directory
(as its own process group, stopped at the end of the session) or the running one that
GPUFLEET_TEST_DOCKER_HOST names (neither started nor stopped); a Debian 12 image built with
debootstrap from deb.debian.org (nothing is pulled; the root filesystem is cached as a tarball
under ${XDG_CACHE_HOME:-~/.cache}/gpufleet/images, named by its recipe's hash); containers with
systemd as PID 1 and OpenSSH, reached on 127.0.0.1 with strict host key checking against each
container's own host keys. Nothing is mocked or skipped: a missing tool is an error that says
what to install.

Register with ``pytest_plugins = ["tests.docker_hosts"]``, then::

    def test_converge(container_hosts: ContainerHostFactory) -> None:
        (host,) = container_hosts(1)
        inventory = {host.name: host.ansible_vars()}  # converge with ansible-playbook
        assert host.testinfra().service("ssh").is_running

Every container and its volume is removed at teardown, also when the test failed.

PYTEST_DONT_REWRITE: this module asserts nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import functools
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

import pytest

from validation.loopback import LOOPBACK, die_with_parent, stop_process_group

if TYPE_CHECKING:
    from testinfra.host import Host  # type: ignore[import-untyped]

DOCKER_HOST_ENV = "GPUFLEET_TEST_DOCKER_HOST"
NAME_PREFIX = "gpufleet-test-"
_LABEL = "gpufleet.test-host=1"
_log = logging.getLogger(__name__)

# The image recipe. Everything below goes into its hash, so a change rebuilds the image.
_SUITE = "bookworm"
_MIRROR = "http://deb.debian.org/debian"
_PACKAGES = (
    *("python3", "openssh-server", "ca-certificates", "iproute2", "procps"),
    *("systemd", "systemd-sysv", "dbus"),
)
_COMPONENTS = "main contrib non-free non-free-firmware"
_FILES = {
    "etc/apt/sources.list": (
        f"deb {_MIRROR} bookworm {_COMPONENTS}\n"
        f"deb {_MIRROR} bookworm-updates {_COMPONENTS}\n"
        f"deb http://deb.debian.org/debian-security bookworm-security {_COMPONENTS}\n"
    ),
    "etc/ssh/sshd_config.d/gpufleet-test.conf": (
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
    ),
    # The image has no host keys: each container makes its own when ssh starts.
    "etc/systemd/system/ssh.service.d/host-keys.conf": (
        "[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\n"
        "ExecStartPre=/usr/sbin/sshd -t\n"
    ),
    "etc/machine-id": "",  # empty: systemd gives each container an id of its own
}
_SYMLINKS = {
    "etc/systemd/system/multi-user.target.wants/ssh.service": "/lib/systemd/system/ssh.service",
    "etc/systemd/system/sshd.service": "/lib/systemd/system/ssh.service",
    "var/lib/dbus/machine-id": "/etc/machine-id",
}
# Leftovers of the build host and of the build (debootstrap copies resolv.conf and hostname).
_REMOVE = ("etc/resolv.conf", "etc/hostname", "etc/ssh/ssh_host_*", "var/cache/apt/archives/*.deb")
_IMPORT_CHANGES = ('CMD ["/sbin/init"]', "ENV container=docker")
_RECIPE_REVISION = 1  # bump when _build_rootfs changes in a way the data above does not show


def _recipe_hash() -> str:
    recipe = {
        "suite": _SUITE,
        "mirror": _MIRROR,
        "packages": _PACKAGES,
        "files": _FILES,
        "symlinks": _SYMLINKS,
        "remove": _REMOVE,
        "import": _IMPORT_CHANGES,
        "revision": _RECIPE_REVISION,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


RECIPE_HASH = _recipe_hash()
IMAGE_TAG = f"gpufleet-test/debian12-host:{RECIPE_HASH}"

# For "unsupported OS" tests: a Debian 12 host that says it is Debian 11, with
# container_hosts(1, os_release=DEBIAN_11_OS_RELEASE, debian_version=DEBIAN_11_VERSION).
# Ansible reads distribution_release from /etc/os-release but distribution_(major_)version
# from /etc/debian_version (the more precise one), so the disguise replaces both.
DEBIAN_11_OS_RELEASE = """\
PRETTY_NAME="Debian GNU/Linux 11 (bullseye)"
NAME="Debian GNU/Linux"
VERSION_ID="11"
VERSION="11 (bullseye)"
VERSION_CODENAME=bullseye
ID=debian
HOME_URL="https://www.debian.org/"
SUPPORT_URL="https://www.debian.org/support"
BUG_REPORT_URL="https://bugs.debian.org/"
"""
DEBIAN_11_VERSION = "11.11\n"


class CommandFailed(RuntimeError):
    """A command exited non-zero or ran past its timeout; the message has its output."""


def _require(tool: str, package: str) -> str:
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    path = shutil.which(tool, path=search)
    if path is None:
        raise RuntimeError(f"{tool} not found: install {package} (.ci/run does)")
    return path


def _run(
    argv: Sequence[str],
    *,
    check: bool = True,
    input: str | None = None,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(f"{shlex.join(argv)} did not finish in {timeout:g} s") from exc
    if check and result.returncode != 0:
        output = (result.stderr.strip() or result.stdout.strip())[-4000:]
        raise CommandFailed(f"{shlex.join(argv)} exited {result.returncode}:\n{output}")
    return result


def _say(config: pytest.Config, message: str) -> None:
    """Progress on the terminal, also while pytest captures output."""
    _log.info(message)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        return
    suspended = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
    with suspended:
        reporter.write_line(f"[docker_hosts] {message}")


def _tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --- Docker engine ------------------------------------------------------------------------


@dataclass(frozen=True)
class DockerEngine:
    """A Docker engine: its DOCKER_HOST url and the docker CLI pointed at it."""

    docker_host: str

    def docker(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "DOCKER_HOST": self.docker_host}
        env.pop("DOCKER_CONTEXT", None)
        cli = _require("docker", "docker.io")
        return _run([cli, *args], check=check, input=input, timeout=timeout, env=env)

    def cgroup_version(self) -> str:
        return self.docker("info", "--format", "{{.CgroupVersion}}").stdout.strip()


class OwnDockerd:
    """A dockerd of this session in `root`, its own process group; stop() removes `root` (the
    log, elsewhere, stays)."""

    def __init__(self, root: Path, log_path: Path) -> None:
        self.root = root
        self.log_path = log_path
        self.engine = DockerEngine(f"unix://{root / 'docker.sock'}")
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        dockerd = _require("dockerd", "docker.io")
        argv = [dockerd, "--host", self.engine.docker_host, "--ip", LOOPBACK]
        for option, name in (("--data-root", "data"), ("--exec-root", "exec")):
            argv += [option, str(self.root / name)]
        argv += ["--pidfile", str(self.root / "dockerd.pid")]
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,  # dockerd stops when pytest dies
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self._process.poll() is not None:
                raise self._failure(f"dockerd exited with status {self._process.returncode}")
            if self.engine.docker("info", check=False, timeout=10).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise self._failure(f"dockerd did not answer `docker info` in {timeout_s:g} s")
            time.sleep(0.5)

    def _failure(self, what: str) -> RuntimeError:
        return RuntimeError(
            f"{what}; the last lines of {self.log_path}:\n{_tail(self.log_path)}\n"
            f"(a second dockerd clashes with one already running on this machine: set "
            f"{DOCKER_HOST_ENV} to that engine's socket, e.g. unix:///run/docker.sock)"
        )

    def stop(self) -> None:
        if self._process is not None:
            stop_process_group(self._process, timeout_s=30.0)
        _remove_tree(self.root)


@contextlib.contextmanager
def engine_for_script(docker_host: str | None, work: Path) -> Iterator[DockerEngine]:
    """For scripts (the benches): the engine `docker_host` names, else a dockerd of their own
    (log in `work`), stopped on the way out."""
    if docker_host:
        yield DockerEngine(docker_host)
        return
    dockerd = OwnDockerd(Path(tempfile.mkdtemp(prefix="gpufleet-dockerd-")), work / "dockerd.log")
    dockerd.start()
    try:
        yield dockerd.engine
    finally:
        dockerd.stop()


def _mounts_under(directory: Path) -> list[str]:
    prefix = str(directory.resolve())
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4])
        if point == prefix or point.startswith(prefix + "/"):
            mounts.append(point)
    return mounts


def _remove_tree(directory: Path) -> None:
    """rm -r that first unmounts what is mounted below (it would delete the mounted files)."""
    for point in sorted(_mounts_under(directory), reverse=True):
        _run(["umount", "--lazy", point], check=False)
    if left := _mounts_under(directory):
        raise RuntimeError(f"not removing {directory}: still mounted there: {left}")
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def docker_engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DockerEngine]:
    """The engine GPUFLEET_TEST_DOCKER_HOST names, else a dockerd started for this session."""
    if url := os.environ.get(DOCKER_HOST_ENV):
        engine = DockerEngine(url)
        if (info := engine.docker("info", check=False, timeout=30)).returncode != 0:
            raise RuntimeError(f"{DOCKER_HOST_ENV}={url}: `docker info` failed: {info.stderr}")
        yield engine
        return
    # A short path of its own: unix socket paths (containerd's below it) hold 107 bytes at most.
    root = Path(tempfile.mkdtemp(prefix="gpufleet-dockerd-"))
    dockerd = OwnDockerd(root, tmp_path_factory.mktemp("dockerd") / "dockerd.log")
    _say(request.config, f"starting dockerd in {dockerd.root} (log: {dockerd.log_path})")
    try:
        dockerd.start()
        yield dockerd.engine
    finally:
        dockerd.stop()


# --- Image --------------------------------------------------------------------------------


def image_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gpufleet" / "images"


@contextlib.contextmanager
def _file_lock(path: Path, on_wait: Callable[[], None]) -> Iterator[None]:
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _inside(rootfs: Path, relative: str) -> Path:
    path = rootfs / relative
    if not path.parent.resolve().is_relative_to(rootfs.resolve()):
        raise RuntimeError(f"{path} lies outside {rootfs}")
    return path


def _customize_rootfs(rootfs: Path) -> None:
    for pattern in _REMOVE:
        matching = _inside(rootfs, pattern)
        for path in matching.parent.iterdir():
            if fnmatch.fnmatch(path.name, matching.name):
                path.unlink()
    for relative, text in _FILES.items():
        path = _inside(rootfs, relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # never write through a symlink
        path.write_text(text)
        path.chmod(0o644)
    for relative, target in _SYMLINKS.items():
        path = _inside(rootfs, relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        path.symlink_to(target)
    rootfs.chmod(0o755)  # the container's /


def _run_logged(
    argv: Sequence[str], log: Path, timeout: float, own_log: Path | None = None
) -> None:
    """Run `argv` with its output appended to `log` (and, on failure, `own_log`'s text)."""
    with log.open("a") as handle:
        handle.write(f"$ {shlex.join(argv)}\n")
        handle.flush()
        try:
            status = subprocess.run(
                argv, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            status = -1
        if status != 0 and own_log is not None and own_log.exists():
            handle.write(f"--- {own_log.name}:\n{_tail(own_log, 60)}\n")
    if status != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({status}); end of {log}:\n{_tail(log)}")


def _build_tarball(tarball: Path) -> None:
    """debootstrap in a mount namespace of its own (its bind mounts die with it), then tar."""
    if os.geteuid() != 0:
        raise RuntimeError("building the host image needs root (debootstrap, device nodes)")
    argv = [_require("unshare", "util-linux"), "--mount", "--propagation", "private"]
    argv += [_require("debootstrap", "debootstrap"), "--variant=minbase"]
    argv += [f"--include={','.join(_PACKAGES)}", _SUITE]
    log = tarball.with_name(f"{tarball.name}.build.log")
    log.write_text("")
    work = Path(tempfile.mkdtemp(prefix="gpufleet-rootfs-"))
    partial = tarball.with_name(f".{tarball.name}.{os.getpid()}.partial")
    try:
        rootfs = work / "rootfs"
        rootfs.mkdir()
        own_log = rootfs / "debootstrap" / "debootstrap.log"
        _run_logged([*argv, str(rootfs), _MIRROR], log, timeout=1800, own_log=own_log)
        if mounts := _mounts_under(rootfs):
            raise RuntimeError(f"debootstrap left mounts behind: {mounts}")
        _customize_rootfs(rootfs)
        tar = ["tar", "--numeric-owner", "-I", "gzip -1", "-C", str(rootfs), "-cf", str(partial)]
        _run_logged([*tar, "."], log, timeout=600)
        partial.replace(tarball)
    finally:
        partial.unlink(missing_ok=True)
        _remove_tree(work)


def host_image_tarball(say: Callable[[str], None]) -> Path:
    """The cached root filesystem tarball, built first when missing (one builder at a time)."""
    cache = image_cache_dir()
    tarball = cache / f"debian12-host-{RECIPE_HASH}.tar.gz"
    if tarball.exists():
        return tarball
    cache.mkdir(parents=True, exist_ok=True)
    waiting = f"waiting for another session that builds {tarball.name} ..."
    with _file_lock(cache / f".{tarball.name}.lock", lambda: say(waiting)):
        if not tarball.exists():
            say(
                "building the Debian 12 host image with debootstrap "
                f"(about a minute, cached afterwards in {tarball}) ..."
            )
            started = time.monotonic()
            _build_tarball(tarball)
            say(f"built {tarball.name} in {time.monotonic() - started:.0f} s")
    return tarball


def import_host_image(engine: DockerEngine, say: Callable[[str], None]) -> str:
    """The tag of the Debian 12 host image, imported into `engine` when it lacks it."""
    if engine.docker("image", "inspect", IMAGE_TAG, check=False).returncode != 0:
        tarball = host_image_tarball(say)
        say(f"importing {tarball.name} as {IMAGE_TAG} ...")
        changes = [arg for change in _IMPORT_CHANGES for arg in ("--change", change)]
        engine.docker("import", *changes, str(tarball), IMAGE_TAG, timeout=600)
    return IMAGE_TAG


@pytest.fixture(scope="session")
def debian_host_image(request: pytest.FixtureRequest, docker_engine: DockerEngine) -> str:
    """The tag of the Debian 12 host image, imported into the engine when it lacks it."""
    return import_host_image(docker_engine, functools.partial(_say, request.config))


# --- SSH client key -----------------------------------------------------------------------


@dataclass(frozen=True)
class SshKeyPair:
    private_key: Path
    public_key: Path


@pytest.fixture(scope="session")
def ssh_client_key(tmp_path_factory: pytest.TempPathFactory) -> SshKeyPair:
    """An ed25519 key pair without passphrase (private key 0600) that the hosts authorize."""
    directory = tmp_path_factory.mktemp("ssh-client")
    directory.chmod(0o700)
    key = directory / "id_ed25519"
    keygen = _require("ssh-keygen", "openssh-client")
    _run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", "gpufleet-test", "-f", str(key)])
    key.chmod(0o600)
    return SshKeyPair(private_key=key, public_key=key.with_name(f"{key.name}.pub"))


# --- Host containers ----------------------------------------------------------------------


@dataclass(frozen=True)
class ContainerHost:
    """A running host container, reachable as user@address:ssh_port with strict host keys."""

    name: str
    container_id: str
    ssh_port: int
    private_key: Path
    known_hosts: Path  # this container's own host keys, for [127.0.0.1]:<ssh_port>
    engine: DockerEngine = field(repr=False)
    address: str = LOOPBACK
    user: str = "root"

    def exec(
        self, command: str, *, check: bool = True, input: str | None = None, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """`sh -c command` in the container with docker exec (as root; not over SSH)."""
        interactive = ["-i"] if input is not None else []
        argv = ["exec", *interactive, self.name, "sh", "-c", command]
        return self.engine.docker(*argv, check=check, input=input, timeout=timeout)

    def ssh_options(self, known_hosts: Path | None = None) -> list[str]:
        """ssh options for this host: key only, no prompts, strict host key checking."""
        options = self._ssh_config(known_hosts)
        return [arg for key, value in options.items() for arg in ("-o", f"{key}={value}")]

    def _ssh_config(self, known_hosts: Path | None = None) -> dict[str, str]:
        return {
            "BatchMode": "yes",
            "StrictHostKeyChecking": "yes",
            "UserKnownHostsFile": str(known_hosts or self.known_hosts),
            "GlobalKnownHostsFile": "/dev/null",
            "IdentitiesOnly": "yes",
            "IdentityFile": str(self.private_key),
            "Port": str(self.ssh_port),
            "User": self.user,
            "ConnectTimeout": "10",
        }

    def ssh(
        self,
        command: str,
        *,
        check: bool = True,
        timeout: float = 120.0,
        known_hosts: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `command` over a real SSH connection (see ssh_options)."""
        ssh = _require("ssh", "openssh-client")
        argv = [ssh, *self.ssh_options(known_hosts), self.address, command]
        return _run(argv, check=check, timeout=timeout)

    def ansible_vars(self) -> dict[str, str | int]:
        """Inventory variables to reach this host with Ansible, host keys checked."""
        strict = ["-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={self.known_hosts}"]
        strict += ["-o", "GlobalKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes"]
        return {
            "ansible_host": self.address,
            "ansible_port": self.ssh_port,
            "ansible_user": self.user,
            "ansible_ssh_private_key_file": str(self.private_key),
            "ansible_ssh_common_args": shlex.join(strict),
            "ansible_python_interpreter": "/usr/bin/python3",
        }

    def testinfra(self) -> Host:
        """A testinfra host over the ssh backend, with the same options as ssh()."""
        import testinfra  # type: ignore[import-untyped]

        options = self._ssh_config()
        extra = [
            f"-o{key}={value}" for key, value in options.items() if key not in ("Port", "User")
        ]
        return testinfra.get_host(
            f"ssh://{self.user}@{self.address}:{self.ssh_port}", ssh_extra_args=shlex.join(extra)
        )


class ContainerHostFactory(Protocol):
    """Starts `count` hosts; /etc/os-release and /etc/debian_version replaced when given."""

    def __call__(
        self, count: int = 1, *, os_release: str | None = None, debian_version: str | None = None
    ) -> list[ContainerHost]: ...


def _slug(text: str, limit: int = 24) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "host"


class HostPool:
    """Starts host containers; close() removes them and their volumes (also after errors)."""

    def __init__(
        self, engine: DockerEngine, image: str, key: SshKeyPair, work_dir: Path, hint: str
    ) -> None:
        self.engine, self.image, self.key, self.work_dir = engine, image, key, work_dir
        self.hint = _slug(hint)
        self._names: list[str] = []

    def __enter__(self) -> HostPool:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(
        self,
        count: int = 1,
        *,
        os_release: str | None = None,
        debian_version: str | None = None,
        timeout_s: float = 120.0,
    ) -> list[ContainerHost]:
        """Start `count` hosts at once and return them when each answers over SSH."""
        deadline = time.monotonic() + timeout_s
        names = [f"{NAME_PREFIX}{self.hint}-{uuid.uuid4().hex[:8]}" for _ in range(count)]
        cgroup_args = _cgroup_args(self.engine.cgroup_version())
        for name in names:
            self._launch(name, cgroup_args)
        replace = {"/etc/os-release": os_release, "/etc/debian_version": debian_version}
        files = {path: text for path, text in replace.items() if text is not None}
        return [self._ready(name, files, deadline) for name in names]

    def _launch(self, name: str, cgroup_args: list[str]) -> None:
        self._names.append(name)  # first: close() removes what a failed launch left
        self.engine.docker("volume", "create", "--label", _LABEL, f"{name}-docker")
        self.engine.docker(
            *("run", "--detach", "--name", name, "--hostname", name, "--label", _LABEL),
            *("--cap-add", "SYS_ADMIN", "--cap-add", "NET_ADMIN"),
            *("--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined"),
            *("--tmpfs", "/run", "--tmpfs", "/run/lock", *cgroup_args),
            *("--volume", f"{name}-docker:/var/lib/docker", "--publish", f"{LOOPBACK}::22"),
            *(self.image, "/sbin/init"),
        )

    def _ready(self, name: str, files: dict[str, str], deadline: float) -> ContainerHost:
        container_id = self.engine.docker("inspect", "--format", "{{.Id}}", name).stdout.strip()
        authorize = "install -d -m 700 /root/.ssh && cat > /root/.ssh/authorized_keys"
        self.engine.docker(
            *("exec", "-i", name, "sh", "-c", f"{authorize} && chmod 600 /root/.ssh/*"),
            input=self.key.public_key.read_text(),
        )
        for path, text in files.items():  # a plain file, also where a symlink was
            replace = f"rm -f {path} && cat > {path}"
            self.engine.docker("exec", "-i", name, "sh", "-c", replace, input=text)
        self._wait_for_systemd(name, deadline)
        port = self._published_ssh_port(name)
        host = ContainerHost(
            name=name,
            container_id=container_id,
            ssh_port=port,
            private_key=self.key.private_key,
            known_hosts=self._write_known_hosts(name, port),
            engine=self.engine,
        )
        _wait_for_ssh(host, deadline)
        return host

    def _wait_for_systemd(self, name: str, deadline: float) -> None:
        state = ""
        while time.monotonic() < deadline:
            running = self.engine.docker("inspect", "--format", "{{.State.Running}}", name)
            if running.stdout.strip() != "true":
                logs = self.engine.docker("logs", "--tail", "40", name, check=False)
                raise RuntimeError(f"host container {name} stopped:\n{logs.stdout}{logs.stderr}")
            status = ("exec", name, "systemctl", "is-system-running")
            state = self.engine.docker(*status, check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.5)
        jobs = self.engine.docker("exec", name, "systemctl", "list-jobs", check=False).stdout
        raise RuntimeError(f"systemd in {name} still {state!r} at the deadline; jobs:\n{jobs}")

    def _published_ssh_port(self, name: str) -> int:
        lines = self.engine.docker("port", name, "22/tcp").stdout.split()
        ports = {int(line.rsplit(":", 1)[1]) for line in lines if line.startswith(LOOPBACK)}
        if len(ports) != 1:
            raise RuntimeError(f"{name}: expected one port published on {LOOPBACK}: {lines}")
        return ports.pop()

    def _write_known_hosts(self, name: str, port: int) -> Path:
        keys = self.engine.docker("exec", name, "sh", "-c", "cat /etc/ssh/ssh_host_*_key.pub")
        entries = [line.split()[:2] for line in keys.stdout.splitlines() if line.strip()]
        if not entries:
            raise RuntimeError(f"{name} has no SSH host keys")
        path = self.work_dir / f"{name}.known_hosts"
        path.write_text("".join(f"[{LOOPBACK}]:{port} {kind} {key}\n" for kind, key in entries))
        return path

    def close(self) -> None:
        """Remove every container started here and its volume; raise if one stays."""
        errors = []
        for name in reversed(self._names):
            removed = self.engine.docker("rm", "--force", "--volumes", name, check=False)
            if removed.returncode != 0 and "No such container" not in removed.stderr:
                errors.append(removed.stderr.strip())
            volume = self.engine.docker("volume", "rm", "--force", f"{name}-docker", check=False)
            if volume.returncode != 0:
                errors.append(volume.stderr.strip())
        self._names.clear()
        if errors:
            raise RuntimeError("removing host containers failed:\n" + "\n".join(errors))


def _cgroup_args(version: str) -> list[str]:
    if version == "2":  # systemd needs to write its cgroup subtree
        return ["--cgroupns", "host", "--volume", "/sys/fs/cgroup:/sys/fs/cgroup:rw"]
    return ["--volume", "/sys/fs/cgroup:/sys/fs/cgroup:ro"]


def _wait_for_ssh(host: ContainerHost, deadline: float) -> None:
    while True:
        attempt = host.ssh("true", check=False, timeout=30)
        if attempt.returncode == 0:
            return
        if time.monotonic() > deadline:
            status = host.exec("systemctl status ssh --no-pager", check=False).stdout
            raise RuntimeError(
                f"{host.name}: ssh -p {host.ssh_port} root@{host.address} still fails at the "
                f"deadline: {attempt.stderr.strip()}\n{status}"
            )
        time.sleep(0.5)


def leftover_test_containers(engine: DockerEngine) -> list[str]:
    """Containers named gpufleet-test-* on the engine, running or not (a leak check)."""
    names = engine.docker("ps", "--all", "--format", "{{.Names}}").stdout.split()
    return sorted(name for name in names if name.startswith(NAME_PREFIX))


def leftover_test_volumes(engine: DockerEngine) -> list[str]:
    """Volumes named gpufleet-test-* on the engine (a leak check)."""
    names = engine.docker("volume", "ls", "--quiet").stdout.split()
    return sorted(name for name in names if name.startswith(NAME_PREFIX))


@pytest.fixture
def container_hosts(
    request: pytest.FixtureRequest,
    docker_engine: DockerEngine,
    debian_host_image: str,
    ssh_client_key: SshKeyPair,
    tmp_path: Path,
) -> Iterator[ContainerHostFactory]:
    """Starts hosts for one test; they are removed after it."""
    with HostPool(
        docker_engine, debian_host_image, ssh_client_key, tmp_path, request.node.name
    ) as pool:
        yield pool.start


@pytest.fixture(scope="module")
def module_container_hosts(
    request: pytest.FixtureRequest,
    docker_engine: DockerEngine,
    debian_host_image: str,
    ssh_client_key: SshKeyPair,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ContainerHostFactory]:
    """Starts hosts that the tests of one module share (converge once, check many times)."""
    work_dir = tmp_path_factory.mktemp("hosts")
    hint = request.module.__name__.rsplit(".", 1)[-1]
    with HostPool(docker_engine, debian_host_image, ssh_client_key, work_dir, hint) as pool:
        yield pool.start
