"""Pytest fixtures with a real MLflow tracking server (see gpufleet/local/mlflow_server.py).

Register with ``pytest_plugins = ["tests.mlflow_fixtures"]`` (in the root conftest.py, or in a
test module). One server runs per test session, on a free loopback port in a temporary
directory; it is stopped at the end of the session. Tests share it, so each test registers
models under names of its own::

    def test_resolve(registry: ModelRegistry, model_name: str) -> None:
        spec = mlp_spec(model_name)
        register_torch_model(registry, spec, demo_network(spec))

PYTEST_DONT_REWRITE: this module asserts nothing, and test modules import its helpers before
pytest loads it as a plugin (which would otherwise warn that it cannot rewrite it).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from gpufleet.local.mlflow_server import LocalMlflowServer
from gpufleet.registry.client import ModelRegistry, RegistryVersion
from gpufleet.spec.model import ModelSpec


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMlflowServer]:
    server = LocalMlflowServer(tmp_path_factory.mktemp("mlflow"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def registry(mlflow_server: LocalMlflowServer) -> ModelRegistry:
    return ModelRegistry(mlflow_server.url)


@pytest.fixture
def model_name(request: pytest.FixtureRequest) -> str:
    """A registered model name no other test uses."""
    return unique_model_name(request.node.name)


def register_directory(registry: ModelRegistry, name: str, directory: Path) -> RegistryVersion:
    """`directory` logged as a run's `model` artifact and registered as a new version of `name`:
    any files at all, as an attacker with write access to the registry could register."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(registry.tracking_uri)
    try:
        with mlflow.start_run() as run:
            mlflow.log_artifacts(str(directory), artifact_path="model")
    finally:
        mlflow.set_tracking_uri(previous)
    return registry.register(name, f"{run.info.artifact_uri}/model", run.info.run_id)


def unique_model_name(hint: str) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', hint)[:40]}_{uuid.uuid4().hex[:8]}"


def mlp_spec(
    name: str,
    *,
    backend: str = "python",
    alias: str | None = "production",
    max_batch_size: int = 8,
    **fields: object,
) -> ModelSpec:
    """A spec of a 16 -> 4 fp32 model whose source is `name` in the registry."""
    source = f"models:/{name}@{alias}" if alias else f"models:/{name}/1"
    return ModelSpec.model_validate(
        {
            "name": name,
            "backend": backend,
            "source": source,
            "max_batch_size": max_batch_size,
            "inputs": [{"name": "features", "dtype": "fp32", "shape": [16]}],
            "outputs": [{"name": "scores", "dtype": "fp32", "shape": [4]}],
            **fields,
        }
    )
