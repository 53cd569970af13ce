"""Pytest fixtures that start real tritonserver processes (see validation/tritonserver.py).

Register in a conftest.py or test module with ``pytest_plugins = ["tests.triton_fixtures"]``,
then::

    def test_repo_loads(triton_server_factory: TritonServerFactory, tmp_path: Path) -> None:
        server = triton_server_factory(repo, load_models=["my_model"])
        assert server.model_config("my_model")["backend"] == "python"

Every server the factory started is stopped at teardown, also when the test fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from validation.tritonserver import LocalTritonServer


class TritonServerFactory(Protocol):
    """Starts a LocalTritonServer (keyword arguments as its constructor) and returns it ready."""

    def __call__(self, model_repository: Path, **kwargs: Any) -> LocalTritonServer: ...


@pytest.fixture
def triton_server_factory(tmp_path: Path) -> Iterator[TritonServerFactory]:
    servers: list[LocalTritonServer] = []

    def start(model_repository: Path, **kwargs: Any) -> LocalTritonServer:
        work_dir = tmp_path / f"tritonserver-{len(servers)}"
        server = LocalTritonServer(model_repository, work_dir, **kwargs)
        servers.append(server)  # before start(): stop() is harmless if start() failed
        server.start()
        return server

    yield start
    for server in reversed(servers):
        server.stop()
