"""`make test` and `make demo` check the Debian packages they need before anything runs.

Real: scripts/system-packages.sh run by bash, this machine's dpkg database (first test), make's
dry run of the Makefile. Not real: in the other tests `dpkg-query`, `id` and `apt-get` are
stand-ins first on PATH (answers chosen by the test; apt-get only records its arguments), so a
missing package and a non-root user can be shown without changing this machine.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "scripts" / "system-packages.sh"


def stand_in(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(0o755)


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """apt-get that records its arguments in apt-get.log and succeeds."""
    directory = tmp_path / "bin"
    directory.mkdir()
    stand_in(directory, "apt-get", f'echo "$*" >> {tmp_path / "apt-get.log"}')
    return directory


def fake_system(directory: Path, *, uid: int, statuses: dict[str, str]) -> None:
    """`id -u` answers `uid`; dpkg-query knows the packages in `statuses`, others are installed."""
    stand_in(directory, "id", f'[[ "$1" == -u ]] && echo {uid}')
    cases = "".join(f'    {name}) echo -n "{status}" ;;\n' for name, status in statuses.items())
    stand_in(
        directory, "dpkg-query", f'case "${{@: -1}}" in\n{cases}    *) echo -n installed ;;\nesac'
    )


def run_script(fake_bin: Path, what: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}"}
    return subprocess.run(
        [str(SCRIPT), what], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def apt_calls(fake_bin: Path) -> list[str]:
    log = fake_bin.parent / "apt-get.log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("what", ["test", "demo"])
def test_on_this_machine_everything_is_installed_and_apt_is_not_called(
    fake_bin: Path, what: str
) -> None:
    """The real dpkg database: `make test` itself ran this check before the suite started."""
    result = run_script(fake_bin, what)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("system packages for gpufleet's ")
    assert " installed" in result.stdout
    assert apt_calls(fake_bin) == []


def test_missing_packages_without_root_print_the_apt_line_and_exit_2(fake_bin: Path) -> None:
    fake_system(
        fake_bin,
        uid=1000,
        statuses={"docker.io": "not-installed", "prometheus": "config-files"},
    )
    result = run_script(fake_bin, "test")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: system packages for gpufleet's tests missing here: docker.io prometheus; "
        "install them as root with:",
        "sudo apt-get install -y docker.io prometheus",
    ]
    assert apt_calls(fake_bin) == []


def test_missing_packages_as_root_are_installed_after_one_update(fake_bin: Path) -> None:
    fake_system(fake_bin, uid=0, statuses={"docker.io": "", "git": "half-installed"})
    result = run_script(fake_bin, "test")
    assert result.returncode == 0, result.stderr
    assert "installing git docker.io" in result.stdout
    assert apt_calls(fake_bin) == ["update -qq", "install -y -qq git docker.io"]


def test_the_demo_needs_fewer_packages_than_the_tests(fake_bin: Path) -> None:
    fake_system(fake_bin, uid=1000, statuses={"docker.io": "not-installed"})
    assert run_script(fake_bin, "demo").returncode == 0
    assert run_script(fake_bin, "test").returncode == 2
    fake_system(fake_bin, uid=1000, statuses={"python3-venv": "not-installed"})
    demo = run_script(fake_bin, "demo")
    assert demo.returncode == 2
    assert demo.stderr.splitlines()[-1] == "sudo apt-get install -y python3-venv"


def test_the_demo_needs_nginx_for_its_gateway(fake_bin: Path) -> None:
    fake_system(fake_bin, uid=1000, statuses={"nginx": "not-installed"})
    for what in ("demo", "test"):
        result = run_script(fake_bin, what)
        assert result.returncode == 2
        assert result.stderr.splitlines()[-1] == "sudo apt-get install -y nginx"


@pytest.mark.parametrize(
    ("target", "check", "then"),
    [
        ("test", "scripts/system-packages.sh test", ".venv/bin/python -m pytest"),
        ("demo", "scripts/system-packages.sh demo", ".venv/bin/gpufleet up --stack local"),
        ("setup", "scripts/system-packages.sh demo", None),
    ],
)
def test_make_checks_the_packages_before_anything_else(
    target: str, check: str, then: str | None, tmp_path: Path
) -> None:
    """make's dry run (-n: nothing is executed) on a fresh copy of the Makefile: no .venv yet."""
    (tmp_path / "Makefile").write_text((PROJECT_ROOT / "Makefile").read_text())
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "perf-analyzer-requirements.txt").write_text("")
    # As a top-level make: under `make test` the parent's MAKEFLAGS and MAKELEVEL would make
    # this one a sub-make that prints "Entering directory" first.
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")
    }
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", target],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0] == check, lines
    assert "python3 -m venv" in result.stdout  # the venv is built after the check
    if then is not None:
        assert lines[-1] == then
        # perf_analyzer's own venv (the load gate's engine) is set up before demo and test run.
        perf = lines.index("test -x .venv-perf/bin/python || python3 -m venv .venv-perf")
        assert lines[perf + 1] == (
            ".venv-perf/bin/python -m pip install --quiet -r scripts/perf-analyzer-requirements.txt"
        )
        assert perf < len(lines) - 1
    else:
        assert ".venv-perf" not in result.stdout


@pytest.mark.parametrize("what", ["demo", "test"])
def test_perf_analyzers_libb64_is_in_the_demo_and_test_sets(fake_bin: Path, what: str) -> None:
    """perf_analyzer (the load gate's engine, from the tritonclient wheel) links libb64."""
    fake_system(fake_bin, uid=1000, statuses={"libb64-0d": "not-installed"})
    result = run_script(fake_bin, what)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == "sudo apt-get install -y libb64-0d"
