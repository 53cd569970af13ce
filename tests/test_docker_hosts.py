"""The Debian 12 host containers of tests/docker_hosts.py, all real: a Docker engine, systemd as
PID 1, OpenSSH reached over 127.0.0.1 with strict host key checking, and teardown."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.docker_hosts import (
    DEBIAN_11_OS_RELEASE,
    DEBIAN_11_VERSION,
    ContainerHost,
    ContainerHostFactory,
    DockerEngine,
    HostPool,
    SshKeyPair,
    leftover_test_containers,
    leftover_test_volumes,
)


@pytest.fixture(scope="module")
def host(module_container_hosts: ContainerHostFactory) -> ContainerHost:
    (started,) = module_container_hosts(1)
    return started


def test_ssh_with_strict_host_key_checking(host: ContainerHost) -> None:
    """A real ssh session, its host key checked against the container's own keys, gets in."""
    assert host.ssh("hostname").stdout.strip() == host.name
    assert host.known_hosts.read_text().startswith(f"[127.0.0.1]:{host.ssh_port} ")


def test_a_wrong_host_key_is_refused(host: ContainerHost, tmp_path: Path) -> None:
    """Another key listed for [127.0.0.1]:<port>: ssh refuses, so checking is really on."""
    keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "impostor")]
    subprocess.run(keygen, check=True, capture_output=True)
    kind, key = (tmp_path / "impostor.pub").read_text().split()[:2]
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{host.ssh_port} {kind} {key}\n")
    refused = host.ssh("true", check=False, known_hosts=wrong)
    assert refused.returncode == 255
    assert "Host key verification failed" in refused.stderr


def test_systemd_is_pid_1(host: ContainerHost) -> None:
    """Seen by testinfra over SSH: PID 1 is systemd, which finished booting and runs ssh."""
    remote = host.testinfra()
    assert remote.file("/proc/1/comm").content_string.strip() == "systemd"
    assert remote.run("systemctl is-system-running").stdout.strip() in ("running", "degraded")
    assert remote.service("ssh").is_running


def test_apt_sources_include_contrib_and_non_free(host: ContainerHost) -> None:
    components = "main contrib non-free non-free-firmware"
    assert host.exec("cat /etc/apt/sources.list").stdout.splitlines() == [
        f"deb http://deb.debian.org/debian bookworm {components}",
        f"deb http://deb.debian.org/debian bookworm-updates {components}",
        f"deb http://deb.debian.org/debian-security bookworm-security {components}",
    ]


def test_teardown_leaves_no_container_or_volume(
    docker_engine: DockerEngine, debian_host_image: str, ssh_client_key: SshKeyPair, tmp_path: Path
) -> None:
    """A test that fails while its host runs still leaves nothing behind. The host also shows
    the Debian 11 disguise: its /etc/os-release and /etc/debian_version are bullseye's."""
    names: list[str] = []

    def failing_test() -> None:
        pool = HostPool(docker_engine, debian_host_image, ssh_client_key, tmp_path, "teardown")
        with pool:
            (started,) = pool.start(
                1, os_release=DEBIAN_11_OS_RELEASE, debian_version=DEBIAN_11_VERSION
            )
            names.append(started.name)
            release = started.ssh("cat /etc/os-release /etc/debian_version").stdout
            assert "VERSION_CODENAME=bullseye" in release
            assert release.endswith("\n11.11\n")
            assert f"{started.name}-docker" in leftover_test_volumes(docker_engine)
            raise RuntimeError("the test failed")

    with pytest.raises(RuntimeError, match="the test failed"):
        failing_test()
    assert names[0] not in leftover_test_containers(docker_engine)
    assert f"{names[0]}-docker" not in leftover_test_volumes(docker_engine)
