"""The local MLflow server, the registry client and the demo models, against a real registry.

Real: `mlflow server` 3.17 (sqlite, proxied artifacts, 127.0.0.1, one per test session), the
MLflow client over HTTP, torch models logged weights only (gpufleet.registry.artifact) and
downloaded again.
A second server runs MLflow's basic-auth app. Nothing is mocked; the "dead server" is a
loopback port nobody listens on.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.models import infer_signature

from gpufleet.local.credentials import (
    CREDENTIALS_FILE,
    PASSWORD_VARIABLE,
    USERNAME_VARIABLE,
    BasicCredentials,
    CredentialsError,
    stack_credentials,
)
from gpufleet.local.mlflow_server import LocalMlflowServer, MlflowServerError
from gpufleet.registry.artifact import load_model_dir, read_mlmodel, write_model_dir
from gpufleet.registry.client import ModelRegistry, RegistryError, RegistryVersion
from gpufleet.registry.demo import (
    GOLDEN_EXAMPLE_COUNT,
    DemoModelError,
    demo_network,
    golden_examples,
    golden_inputs,
    register_torch_model,
    seed_demo,
)
from gpufleet.spec.model import ModelSpec
from tests.mlflow_fixtures import mlp_spec, register_directory, unique_model_name
from validation.loopback import http_request


@pytest.fixture(scope="module")
def two_versions(registry: ModelRegistry) -> list[RegistryVersion]:
    """A registered model with versions 1 and 2 (alias production -> 2), different weights."""
    spec = mlp_spec(unique_model_name("two_versions"))
    return [
        register_torch_model(registry, spec, demo_network(spec, seed=seed), seed=seed)
        for seed in (0, 1)
    ]


# -- the server ----------------------------------------------------------------------------------


def test_server_runs_as_its_own_process_group_on_loopback(
    mlflow_server: LocalMlflowServer,
) -> None:
    assert mlflow_server.pid is not None
    assert os.getpgid(mlflow_server.pid) == mlflow_server.pid  # others stop it with os.killpg
    assert mlflow_server.url == f"http://127.0.0.1:{mlflow_server.port}"
    assert "Uvicorn running on http://127.0.0.1:" in mlflow_server.log_path.read_text()


def test_a_busy_port_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = LocalMlflowServer(tmp_path, port)
        with pytest.raises(MlflowServerError) as error:
            server.start()
    assert str(error.value) == (
        f"cannot start the MLflow server on 127.0.0.1:{port}: Address already in use; "
        "stop what listens there or choose another port"
    )
    assert server.pid is None
    server.stop()  # harmless: nothing was started


def test_a_server_that_does_not_come_up_is_stopped_and_reported_with_its_log(
    tmp_path: Path,
) -> None:
    # sqlite cannot open a directory as its database; MLflow retries for minutes.
    (tmp_path / "mlflow.db").mkdir()
    server = LocalMlflowServer(tmp_path, startup_timeout_s=3)
    with pytest.raises(MlflowServerError) as error:
        server.start()
    message = str(error.value)
    assert message.startswith(
        f"the MLflow server on {server.url} did not answer GET /health within 3 s "
        f"(log: {tmp_path / 'mlflow-server.log'}); its last lines:\n  "
    )
    assert server.pid is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(server.pid, 0)  # nothing of it is left


# -- resolving -----------------------------------------------------------------------------------


def test_resolve_by_alias_and_by_version(
    registry: ModelRegistry, two_versions: list[RegistryVersion]
) -> None:
    first, second = two_versions
    name = first.name
    assert (first.version, second.version) == (1, 2)
    assert registry.resolve(f"models:/{name}@production") == second
    assert registry.resolve(f"models:/{name}/1") == first
    assert first.run_id != second.run_id
    assert registry.versions(name) == [first, second]
    assert registry.has_registered_model(name)
    assert not registry.has_registered_model(unique_model_name("absent"))


def test_each_missing_thing_has_its_own_message(
    registry: ModelRegistry, two_versions: list[RegistryVersion]
) -> None:
    name, url = two_versions[0].name, registry.display_uri
    missing = unique_model_name("missing")
    expected = {
        f"models:/{name}/7": f"version 7 of registered model '{name}' does not exist at {url} "
        "(its versions: 1, 2); use one of its versions",
        f"models:/{name}@staging": f"alias 'staging' of registered model '{name}' does not exist "
        f"at {url} (its versions: 1, 2); point the alias at a version",
        f"models:/{missing}@production": f"registered model '{missing}' does not exist at {url}; "
        "run `gpufleet registry seed-demo` or register the model there",
        f"models:/{missing}/1": f"registered model '{missing}' does not exist at {url}; "
        "run `gpufleet registry seed-demo` or register the model there",
        "runs:/abc/model": "'runs:/abc/model' is not a registry model URI; write "
        "models:/<name>@<alias> or models:/<name>/<version>",
    }
    for uri, message in expected.items():
        with pytest.raises(RegistryError) as error:
            registry.resolve(uri)
        assert str(error.value) == message


def test_an_alias_whose_version_was_deleted_no_longer_resolves(
    registry: ModelRegistry, model_name: str
) -> None:
    spec = mlp_spec(model_name)
    register_torch_model(registry, spec, demo_network(spec))
    second = register_torch_model(registry, spec, demo_network(spec, seed=1))
    registry.client.delete_model_version(model_name, str(second.version))
    with pytest.raises(RegistryError) as error:
        registry.resolve(spec.source or "")
    assert str(error.value) == (
        f"alias 'production' of registered model '{model_name}' does not exist at "
        f"{registry.display_uri} (its versions: 1); point the alias at a version"
    )
    with pytest.raises(RegistryError) as error:
        registry.set_alias(model_name, "production", 2)  # MLflow refuses a missing version
    assert str(error.value).startswith(
        f"pointing alias 'production' of '{model_name}' at version 2 at {registry.display_uri}: "
        "MLflow answered RESOURCE_DOES_NOT_EXIST: "
    )


def test_a_dead_server_fails_within_seconds() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    registry = ModelRegistry(f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(RegistryError) as error:
        registry.resolve("models:/tabular_mlp@production")
    assert time.monotonic() - started < 6
    assert str(error.value) == (
        f"cannot reach the MLflow tracking server at http://127.0.0.1:{port} (connection "
        "refused) for alias 'production' of registered model 'tabular_mlp'; start it "
        "(`gpufleet up` starts a local stack's server) or fix the stack's mlflow_tracking_uri"
    )


def test_credentials_never_appear_in_messages() -> None:
    registry = ModelRegistry("http://user:secret@127.0.0.1:1/mlflow?token=abc")
    assert registry.display_uri == "http://127.0.0.1:1/mlflow"


# -- artifacts and tags --------------------------------------------------------------------------


def test_each_version_carries_its_own_golden_examples(
    registry: ModelRegistry, two_versions: list[RegistryVersion]
) -> None:
    spec = mlp_spec(two_versions[0].name)
    for version, seed in zip(two_versions, (0, 1), strict=True):
        examples = registry.golden_examples(version)
        expected = golden_examples(
            demo_network(spec, seed=seed), spec, golden_inputs(spec, seed=seed)
        )
        assert len(examples) == GOLDEN_EXAMPLE_COUNT
        for got, want in zip(examples, expected, strict=True):
            assert got.inputs["features"].shape == (1, 16)  # the batch dimension is kept
            np.testing.assert_array_equal(got.inputs["features"], want.inputs["features"])
            np.testing.assert_array_equal(got.outputs["scores"], want.outputs["scores"])


def test_download_gives_the_model_mlflow_logged(
    registry: ModelRegistry, two_versions: list[RegistryVersion], tmp_path: Path
) -> None:
    version = two_versions[1]
    artifact = registry.download(version, tmp_path / "download")
    assert (artifact / "MLmodel").is_file()
    assert (artifact / "extra_files" / "golden_examples.json").is_file()
    assert read_mlmodel(artifact)["flavors"] == {
        "gpufleet": {
            "format": "gpufleet.weights/v1",
            "architecture": "mlp",
            "weights": "data/model.safetensors",
        }
    }
    files = sorted(path.relative_to(artifact).as_posix() for path in artifact.rglob("*.*"))
    assert files == ["data/model.safetensors", "extra_files/golden_examples.json"]
    loaded = load_model_dir(artifact)
    example = registry.golden_examples(version)[0]
    with torch.no_grad():
        result = loaded(torch.from_numpy(example.inputs["features"])).numpy()
    np.testing.assert_allclose(result, example.outputs["scores"], rtol=1e-6, atol=1e-6)


def test_golden_examples_may_come_from_another_module(
    registry: ModelRegistry, model_name: str
) -> None:
    spec = mlp_spec(model_name)
    served, reference = demo_network(spec, seed=5), demo_network(spec, seed=0)
    version = register_torch_model(registry, spec, served, golden_module=reference)
    examples = registry.golden_examples(version)
    inputs = torch.from_numpy(examples[0].inputs["features"])
    with torch.no_grad():
        np.testing.assert_array_equal(examples[0].outputs["scores"], reference(inputs).numpy())
        assert not np.allclose(examples[0].outputs["scores"], served(inputs).numpy())


def test_a_version_without_golden_examples_says_so(
    registry: ModelRegistry, model_name: str, tmp_path: Path
) -> None:
    spec = mlp_spec(model_name)
    network = demo_network(spec)
    inputs = np.zeros((2, 16), np.float32)
    signature = infer_signature(inputs, network(torch.from_numpy(inputs)).detach().numpy())
    write_model_dir(tmp_path / "model", network, signature)
    version = register_directory(registry, model_name, tmp_path / "model")
    with pytest.raises(RegistryError) as error:
        registry.golden_examples(version)
    assert str(error.value) == (
        f"models:/{model_name}/1 at {registry.display_uri} has no "
        "extra_files/golden_examples.json in its artifact; log golden examples with the model "
        "(gpufleet.registry.demo.register_torch_model does)"
    )


def test_set_tags_writes_only_what_changed(
    registry: ModelRegistry, two_versions: list[RegistryVersion]
) -> None:
    name = two_versions[0].name
    tags = {"gpufleet.spec_hash": "abc", "gpufleet.git_commit": "unknown"}
    assert registry.set_tags(registry.resolve(f"models:/{name}/1"), tags) == tags
    again = registry.resolve(f"models:/{name}/1")
    assert again.tags == tags
    assert registry.set_tags(again, {**tags, "gpufleet.spec_hash": "def"}) == {
        "gpufleet.spec_hash": "def"
    }


# -- demo models ---------------------------------------------------------------------------------


def test_seed_demo_registers_each_registry_spec_and_points_its_alias(
    registry: ModelRegistry, model_name: str
) -> None:
    pinned = unique_model_name("pinned")
    specs = [
        mlp_spec(model_name),
        mlp_spec(pinned, alias=None, max_batch_size=0),  # models:/<pinned>/1: no alias to set
        ModelSpec.model_validate({"name": "local_files", "backend": "python"}),  # no source
    ]
    versions = seed_demo(registry, specs, seed=3)
    assert [(v.name, v.version) for v in versions] == [(model_name, 1), (pinned, 1)]
    assert registry.resolve(f"models:/{model_name}@production") == versions[0]
    assert versions[0].tags == {"gpufleet.demo": "true"}
    assert registry.resolve(f"models:/{model_name}/1").tags == {"gpufleet.demo": "true"}
    unbatched = registry.golden_examples(versions[1])[0]
    assert unbatched.inputs["features"].shape == (16,)  # max_batch_size 0: no batch dimension
    assert unbatched.outputs["scores"].shape == (4,)


def test_demo_models_are_deterministic() -> None:
    spec = mlp_spec("deterministic")
    first, second = demo_network(spec, seed=7), demo_network(spec, seed=7)
    for (name, a), (_, b) in zip(
        first.state_dict().items(), second.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    same = golden_examples(second, spec, golden_inputs(spec, seed=7))
    for got, want in zip(
        golden_examples(first, spec, golden_inputs(spec, seed=7)), same, strict=True
    ):
        np.testing.assert_array_equal(got.outputs["scores"], want.outputs["scores"])
    other = golden_examples(demo_network(spec, seed=8), spec, golden_inputs(spec, seed=7))
    assert not np.allclose(other[0].outputs["scores"], same[0].outputs["scores"])
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    demo_network(spec, seed=7)
    assert torch.equal(torch.rand(1), expected_next)  # the caller's random state is untouched


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (
            {
                "inputs": [
                    {"name": "a", "dtype": "fp32", "shape": [4]},
                    {"name": "b", "dtype": "fp32", "shape": [4]},
                ]
            },
            "it has 2 inputs and 1 outputs, not 1 and 1",
        ),
        (
            {"inputs": [{"name": "ids", "dtype": "int64", "shape": [16]}]},
            "tensor 'ids' is int64, not fp32",
        ),
        (
            {"inputs": [{"name": "tokens", "dtype": "fp32", "shape": [-1, 16]}]},
            "tensor 'tokens' has a variable dimension (shape [-1, 16])",
        ),
        (
            {"inputs": [{"name": "image", "dtype": "fp32", "shape": [3, 16]}]},
            "shapes [3, 16] and [4] differ before the last dimension, so one MLP cannot map "
            "one to the other",
        ),
    ],
)
def test_the_demo_builder_refuses_what_it_cannot_build(change: dict[str, object], why: str) -> None:
    spec = mlp_spec("unbuildable", **change)
    with pytest.raises(DemoModelError) as error:
        seed_demo(ModelRegistry("http://127.0.0.1:1"), [spec])  # refused before any request
    assert str(error.value) == (
        f"spec 'unbuildable': the demo builder cannot build a model for it: {why}; "
        "register a model of your own instead"
    )


# -- authentication --------------------------------------------------------------------------------


def test_credentials_come_from_the_environment_or_are_generated_once_at_0600(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(USERNAME_VARIABLE, raising=False)
    monkeypatch.delenv(PASSWORD_VARIABLE, raising=False)
    generated = stack_credentials(tmp_path)
    path = tmp_path / CREDENTIALS_FILE
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert stack_credentials(tmp_path) == generated  # kept, not generated again
    assert generated.password not in repr(generated)

    monkeypatch.setenv(USERNAME_VARIABLE, "operator")
    monkeypatch.setenv(PASSWORD_VARIABLE, "from-the-environment")
    assert stack_credentials(tmp_path) == BasicCredentials("operator", "from-the-environment")

    monkeypatch.delenv(PASSWORD_VARIABLE)
    with pytest.raises(CredentialsError, match="MLFLOW_TRACKING_USERNAME is set but "):
        stack_credentials(tmp_path)
    monkeypatch.delenv(USERNAME_VARIABLE)
    path.chmod(0o644)
    with pytest.raises(CredentialsError) as error:
        stack_credentials(tmp_path)
    assert str(error.value).startswith(f"{path}: readable by others (mode 644); `chmod 600 ")


def test_an_authenticated_server_answers_401_without_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = BasicCredentials("gpufleet", "a-password-long-enough-for-mlflow")
    monkeypatch.setenv(PASSWORD_VARIABLE, "not-for-the-server")  # the server must not get it
    with LocalMlflowServer(tmp_path / "store", credentials=credentials) as server:
        status, _ = http_request("GET", f"{server.url}/api/2.0/mlflow/registered-models/search", 10)
        assert status == 401
        assert http_request("GET", f"{server.url}/health", 10)[0] == 200  # probes need none
        monkeypatch.setenv(USERNAME_VARIABLE, "gpufleet")
        monkeypatch.setenv(PASSWORD_VARIABLE, "a-wrong-password-of-length")
        with pytest.raises(RegistryError, match=r"refused the request .+ \(UNAUTHENTICATED\)"):
            ModelRegistry(server.url).has_registered_model("anything")
        monkeypatch.setenv(PASSWORD_VARIABLE, credentials.password)
        assert ModelRegistry(server.url).has_registered_model("anything") is False
        assert server.pid is not None
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{server.pid}/environ").read_bytes()
    assert credentials.password.encode() not in cmdline
    assert b"MLFLOW_TRACKING_PASSWORD" not in environ
    for path in (tmp_path / "store").rglob("*"):
        if path.is_file():
            assert credentials.password.encode() not in path.read_bytes(), path
