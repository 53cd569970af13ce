"""Shared fixtures: the project's paths, sample specs copied into a scratch project, Triton."""

from __future__ import annotations

import asyncio
import copy
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import settings

if TYPE_CHECKING:
    from validation.tritonserver import LocalTritonServer

pytest_plugins = [
    "tests.triton_fixtures",
    "tests.mlflow_fixtures",
    "tests.docker_hosts",
    "tests.serving_images",
    "tests.environment_site",
]

# CI (HYPOTHESIS_PROFILE=ci, set by .ci/run) draws the same examples on every run, so a red
# build is reproducible; locally every run explores new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_SPECS = PROJECT_ROOT / "modelconfigs"
GOLDEN_REPOSITORY = Path(__file__).resolve().parent / "golden" / "model_repository"


@pytest.fixture
def scratch_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the sample specs and stacks in tmp_path, which becomes the working directory."""
    shutil.copytree(SAMPLE_SPECS, tmp_path / "modelconfigs")
    shutil.copytree(PROJECT_ROOT / "stacks", tmp_path / "stacks")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (relative path -> bytes), to compare before and after."""
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def write_spec(directory: Path, name: str, text: str) -> Path:
    """Write `<directory>/<name>.yaml` (creating the directory) and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def changed_copy(base: dict[str, Any], path: list[Any], value: Any) -> dict[str, Any]:
    """A deep copy of `base` with the item at `path` set to `value` (removed when None)."""
    config = copy.deepcopy(base)
    target = config
    for part in path[:-1]:
        target = target[part]
    if value is None:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return config


@pytest.fixture
def pulumi_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A current event loop for Pulumi's mocks, which run on it: a test that used asyncio.run()
    earlier in the session leaves the thread without one."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    # A test that stopped the program early leaves Pulumi's RPCs waiting: cancel them first.
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    asyncio.set_event_loop(None)
    loop.close()


STATS_SETTLE_S = 10.0


def settled_statistics(
    server: LocalTritonServer, model: str, *, at_least_inferences: int = 0
) -> dict[str, Any]:
    """The model's statistics once they count at least ``at_least_inferences`` and two reads
    0.1 s apart agree (at most STATS_SETTLE_S). Triton's python backend reports a request's
    statistics after its response went out, so a read right after the last answer can lag:
    seen with one core kept busy, an inference_count of 0 right after one answered request."""
    deadline = time.monotonic() + STATS_SETTLE_S
    stats = server.model_statistics(model)["model_stats"][0]
    while time.monotonic() < deadline:
        time.sleep(0.1)
        again = server.model_statistics(model)["model_stats"][0]
        settled = again == stats and int(again["inference_count"]) >= at_least_inferences
        stats = again
        if settled:
            break
    return dict(stats)
