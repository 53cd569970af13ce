"""Find Triton's perf_analyzer and run it with the libraries it needs.

Where it comes from, first found wins:

1. ``GPUFLEET_PERF_ANALYZER``: a path, for a host that keeps it somewhere else;
2. ``perf_analyzer`` on ``PATH``: Triton's SDK image, a GPU box with the SDK installed;
3. the project's ``.venv-perf``, which ``make demo`` and ``make test`` build from
   scripts/perf-analyzer-requirements.txt: the ``tritonclient`` wheel ships ``bin/perf_analyzer``,
   which links ``libcudart.so.12`` (from the ``nvidia-cuda-runtime-cu12`` wheel beside it, loaded
   without a GPU) and Debian's ``libb64-0d``. Its ``LD_LIBRARY_PATH`` gets the wheel's directory.

A candidate counts only when ``perf_analyzer --version`` runs; its version is what the load gate
reports. As a command this module is the launcher::

    python -m validation.perf_analyzer -m tabular_mlp -u 127.0.0.1:18001 -i grpc
    python -m validation.perf_analyzer --which     # path, version and where it was found

    analyzer = find_perf_analyzer()            # None when there is none
    subprocess.run(analyzer.command(["-m", "mlp"]), env=analyzer.environment())
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PERF_VENV = PROJECT_ROOT / ".venv-perf"
OVERRIDE_VARIABLE = "GPUFLEET_PERF_ANALYZER"
EXECUTABLE = "perf_analyzer"
_VERSION_LINE = re.compile(r"Perf Analyzer Version (\S+)")
_VERSION_TIMEOUT_S = 20.0
INSTALL_HINT = (
    "run `make test` or `make demo` (they build .venv-perf), or put perf_analyzer on PATH"
)


@dataclass(frozen=True)
class PerfAnalyzer:
    """A perf_analyzer binary that runs here, the library directories it needs, its version."""

    path: Path
    version: str
    found_in: str  # "GPUFLEET_PERF_ANALYZER", "PATH" or ".venv-perf"
    library_dirs: tuple[Path, ...] = ()

    def command(self, arguments: Sequence[str]) -> list[str]:
        return [str(self.path), *arguments]

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """``base`` (this process's environment) with the library directories first."""
        environment = dict(os.environ if base is None else base)
        if self.library_dirs:
            entries = [str(directory) for directory in self.library_dirs]
            current = environment.get("LD_LIBRARY_PATH")
            environment["LD_LIBRARY_PATH"] = os.pathsep.join(
                [*entries, current] if current else entries
            )
        return environment

    def describe(self) -> str:
        return f"perf_analyzer {self.version} ({self.path}, from {self.found_in})"


def venv_candidate(venv: Path = PERF_VENV) -> tuple[Path, tuple[Path, ...]] | None:
    """The venv's perf_analyzer and the wheel's libcudart directory, when the venv has them."""
    binary = venv / "bin" / EXECUTABLE
    if not binary.is_file():
        return None
    libraries = sorted(venv.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib"))
    return binary, tuple(libraries)


def find_perf_analyzer(
    *, venv: Path = PERF_VENV, environ: Mapping[str, str] | None = None
) -> PerfAnalyzer | None:
    """The first perf_analyzer that runs (see the module docstring), or None."""
    environ = os.environ if environ is None else environ
    candidates: list[tuple[Path, tuple[Path, ...], str]] = []
    override = environ.get(OVERRIDE_VARIABLE)
    if override:
        candidates.append((Path(override), (), OVERRIDE_VARIABLE))
    on_path = shutil.which(EXECUTABLE, path=environ.get("PATH"))
    if on_path:
        candidates.append((Path(on_path), (), "PATH"))
    in_venv = venv_candidate(venv)
    if in_venv is not None:
        candidates.append((*in_venv, venv.name))
    for path, library_dirs, found_in in candidates:
        analyzer = PerfAnalyzer(path, "", found_in, library_dirs)
        version = perf_analyzer_version(analyzer, environ)
        if version:
            return PerfAnalyzer(path, version, found_in, library_dirs)
    return None


def perf_analyzer_version(analyzer: PerfAnalyzer, environ: Mapping[str, str]) -> str:
    """What ``perf_analyzer --version`` says ("2.51.0"), "" when it does not run."""
    try:
        result = subprocess.run(
            analyzer.command(["--version"]),
            env=analyzer.environment(environ),
            capture_output=True,
            text=True,
            timeout=_VERSION_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    match = _VERSION_LINE.search(result.stdout + result.stderr)
    return match.group(1) if result.returncode == 0 and match else ""


def main(argv: Sequence[str]) -> int:
    analyzer = find_perf_analyzer()
    if analyzer is None:
        print(f"error: no perf_analyzer that runs here; {INSTALL_HINT}", file=sys.stderr)
        return 2
    if list(argv) == ["--which"]:
        print(analyzer.describe())
        return 0
    # The binary found above, with the arguments as given: no shell in between.
    os.execve(analyzer.path, analyzer.command(argv), analyzer.environment())  # noqa: S606
    return 0  # not reached: exec replaces this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
