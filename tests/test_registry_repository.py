"""Filling a model repository from the registry: version policies, lineage, idempotence, repair.

Real: the MLflow server of tests/mlflow_fixtures.py (sqlite, 127.0.0.1) with torch models
registered weights only (gpufleet.registry.artifact), downloads over HTTP, the torch exporters,
git for the lineage's commit; artifacts armed to run code on load (a cloudpickled module, a
torch.export archive, code paths, a pickle posing as weights), each shown to run its code when
loaded the way its format loads. Nothing is mocked: `CountingRegistry` is the real client,
counting the downloads it makes.
"""

from __future__ import annotations

import io
import json
import os
import re
import runpy
import subprocess
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import mlflow.pytorch
import numpy as np
import pytest
import torch
import yaml
from mlflow.models import infer_signature

from generators.registry_repository import (
    LINEAGE_FILE,
    AssemblyError,
    AssemblyResult,
    Lineage,
    assemble_repository,
    file_sha256,
    served_versions,
    tree_sha256,
    verify_repository,
)
from gpufleet.registry.artifact import write_model_dir
from gpufleet.registry.client import ModelRegistry, RegistryVersion
from gpufleet.registry.demo import demo_network, register_torch_model
from gpufleet.spec.loading import LoadedModelSpec, load_model_spec_file
from gpufleet.spec.model import ModelSpec
from tests.conftest import write_spec
from tests.mlflow_fixtures import mlp_spec, register_directory, unique_model_name

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


class CountingRegistry(ModelRegistry):
    """The real registry client, remembering which versions it downloaded."""

    def __init__(self, tracking_uri: str) -> None:
        super().__init__(tracking_uri)
        self.downloads: list[int] = []

    def download(self, version: RegistryVersion, destination: Path) -> Path:
        self.downloads.append(version.version)
        return super().download(version, destination)


@pytest.fixture(scope="module")
def three_versions(registry: ModelRegistry) -> list[RegistryVersion]:
    """Versions 1, 2 and 3 of one registered model, each with its own weights."""
    spec = mlp_spec(unique_model_name("three_versions"))
    return [
        register_torch_model(registry, spec, demo_network(spec, seed=seed), seed=seed)
        for seed in (0, 1, 2)
    ]


@pytest.fixture
def counting(registry: ModelRegistry) -> CountingRegistry:
    return CountingRegistry(registry.tracking_uri)


def loaded(directory: Path, spec: ModelSpec) -> LoadedModelSpec:
    """`spec` written as `<directory>/<name>.yaml` and loaded back like any spec file."""
    text = yaml.safe_dump(spec.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
    return load_model_spec_file(write_spec(directory, spec.name, text))


def spec_for(
    versions: list[RegistryVersion], registry: ModelRegistry, alias_at: int, **fields: object
) -> ModelSpec:
    """A spec of the registered model whose alias `production` now points at `alias_at`."""
    name = versions[0].name
    registry.set_alias(name, "production", alias_at)
    return mlp_spec(name, **fields).model_copy(update={"name": "mlp"})


def assemble(
    registry: ModelRegistry, directory: Path, *specs: ModelSpec, lines: list[str] | None = None
) -> AssemblyResult:
    items = [loaded(directory / "modelconfigs", spec) for spec in specs]
    say = lines.append if lines is not None else None
    return assemble_repository(registry, items, directory / "repository", progress=say)


def version_dirs(directory: Path, model: str = "mlp") -> list[str]:
    model_dir = directory / "repository" / model
    return sorted(p.name for p in model_dir.iterdir()) if model_dir.exists() else []


def stats(root: Path) -> dict[str, tuple[int, int]]:
    """Inode and modification time of everything under `root`: what a rewrite would change."""
    return {
        path.relative_to(root).as_posix(): (path.stat().st_ino, path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
    }


# -- idempotence and lineage ---------------------------------------------------------------------


def test_a_second_run_downloads_and_rewrites_nothing(
    counting: CountingRegistry, three_versions: list[RegistryVersion], tmp_path: Path
) -> None:
    spec = spec_for(three_versions, counting, alias_at=3)
    lines: list[str] = []
    first = assemble(counting, tmp_path, spec, lines=lines)
    assert first["mlp"].resolved == three_versions[2]
    assert (first["mlp"].kept, first["mlp"].exported, first["mlp"].unchanged) == ([3], [3], [])
    assert first.changed_models == ["mlp"]
    assert counting.downloads == [3]
    version_dir = tmp_path / "repository" / "mlp" / "3"
    assert sorted(p.name for p in version_dir.iterdir()) == [LINEAGE_FILE, "model.pt", "model.py"]
    assert oct(version_dir.stat().st_mode & 0o777) == "0o755"
    assert lines[0] == (
        f"  mlp: models:/{three_versions[0].name}@production is version 3; serving version(s) 3"
    )
    before = stats(tmp_path / "repository")

    second = assemble(counting, tmp_path, spec)
    assert (second["mlp"].exported, second["mlp"].unchanged, second["mlp"].pruned) == ([], [3], [])
    assert second.changed_models == []
    assert counting.downloads == [3]  # no second download
    assert stats(tmp_path / "repository") == before


def test_the_lineage_manifest_says_where_the_files_came_from(
    counting: CountingRegistry, three_versions: list[RegistryVersion], tmp_path: Path
) -> None:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    spec = spec_for(three_versions, counting, alias_at=2)
    item = loaded(tmp_path / "modelconfigs", spec)
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "spec"], check=True)
    commit = subprocess.run(
        [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()

    assemble_repository(counting, [item], tmp_path / "repository")
    version_dir = tmp_path / "repository" / "mlp" / "2"
    document = json.loads((version_dir / LINEAGE_FILE).read_text())
    second = three_versions[1]
    assert document["registry"] == {
        "tracking_uri": counting.display_uri,
        "name": second.name,
        "version": 2,
        "run_id": second.run_id,
        "source": second.source,
    }
    assert document["files"] == {
        "model.pt": file_sha256(version_dir / "model.pt"),
        "model.py": file_sha256(version_dir / "model.py"),
    }
    with tempfile.TemporaryDirectory() as scratch:
        artifact = counting.download(second, Path(scratch))
        assert document["artifact_sha256"] == tree_sha256(artifact)
    assert (document["spec_hash"], document["git_commit"]) == (item.spec_hash, commit)
    assert (document["backend"], document["model"], document["version"]) == ("python", "mlp", 2)
    assert document["export_spec"]["inputs"][0]["name"] == "features"
    tags = counting.resolve(f"models:/{second.name}/2").tags
    assert tags["gpufleet.spec_hash"] == item.spec_hash
    assert tags["gpufleet.artifact_sha256"] == document["artifact_sha256"]
    assert tags["gpufleet.git_commit"] == commit
    (lineage,) = served_versions(tmp_path / "repository", "mlp")
    assert lineage == Lineage.read(version_dir)
    assert (lineage.version, lineage.registry_version) == (2, second)


# -- version policies ----------------------------------------------------------------------------


def test_latest_two_never_serves_a_version_above_the_alias_target(
    counting: CountingRegistry, three_versions: list[RegistryVersion], tmp_path: Path
) -> None:
    policy = {"version_policy": {"latest": 2}}
    result = assemble(counting, tmp_path, spec_for(three_versions, counting, 2, **policy))
    assert result["mlp"].kept == [1, 2]
    assert version_dirs(tmp_path) == ["1", "2"]  # not 3: Triton would serve it instead of 2

    result = assemble(counting, tmp_path, spec_for(three_versions, counting, 3, **policy))
    model = result["mlp"]
    assert (model.kept, model.exported, model.unchanged, model.pruned) == ([2, 3], [3], [2], [1])
    assert version_dirs(tmp_path) == ["2", "3"]
    assert [lineage.version for lineage in served_versions(tmp_path / "repository", "mlp")] == [
        2,
        3,
    ]


def test_specific_and_all_policies(
    counting: CountingRegistry, three_versions: list[RegistryVersion], tmp_path: Path
) -> None:
    specific = {"version_policy": {"specific": [1, 3]}}
    assemble(counting, tmp_path, spec_for(three_versions, counting, 3, **specific))
    assert version_dirs(tmp_path) == ["1", "3"]

    every = {"version_policy": {"all": True}}
    result = assemble(counting, tmp_path, spec_for(three_versions, counting, 1, **every))
    assert (result["mlp"].exported, result["mlp"].unchanged) == ([2], [1, 3])
    assert version_dirs(tmp_path) == ["1", "2", "3"]

    missing = {"version_policy": {"specific": [1, 9, 12]}}
    with pytest.raises(AssemblyError) as error:
        assemble(counting, tmp_path, spec_for(three_versions, counting, 3, **missing))
    assert str(error.value) == (
        "modelconfigs/mlp.yaml: version_policy.specific lists version(s) 9, 12, which "
        f"registered model '{three_versions[0].name}' at {counting.display_uri} does not have "
        "(its versions: 1, 2, 3); remove them or register them"
    )
    assert version_dirs(tmp_path) == ["1", "2", "3"]


def test_directories_gpufleet_did_not_write_are_never_touched(
    counting: CountingRegistry, three_versions: list[RegistryVersion], tmp_path: Path
) -> None:
    foreign = tmp_path / "repository" / "mlp" / "7"
    foreign.mkdir(parents=True)
    (foreign / "model.pt").write_bytes(b"placed by hand")
    assemble(counting, tmp_path, spec_for(three_versions, counting, 3))
    assert version_dirs(tmp_path) == ["3", "7"]
    assert (foreign / "model.pt").read_bytes() == b"placed by hand"

    in_the_way = tmp_path / "repository" / "mlp" / "2"
    in_the_way.mkdir()
    with pytest.raises(AssemblyError) as error:
        assemble(counting, tmp_path, spec_for(three_versions, counting, 2))
    assert str(error.value) == (
        f"{in_the_way} holds files gpufleet did not write (no {LINEAGE_FILE}); move them away "
        "so that mlp v2 can be exported there"
    )


def test_specs_without_a_registry_source_are_skipped(
    counting: CountingRegistry, tmp_path: Path
) -> None:
    local = ModelSpec.model_validate({"name": "local_files", "backend": "python"})
    result = assemble(counting, tmp_path, local)
    assert result["local_files"].skipped == "no source"
    assert not (tmp_path / "repository").exists()


# -- repair and change ---------------------------------------------------------------------------


def test_a_tampered_file_is_named_by_verify_and_repaired_by_assemble(
    counting: CountingRegistry, three_versions: list[RegistryVersion], tmp_path: Path
) -> None:
    spec = spec_for(three_versions, counting, 3)
    assemble(counting, tmp_path, spec)
    repository = tmp_path / "repository"
    assert verify_repository(repository, ["mlp"]) == []
    model_file = repository / "mlp" / "3" / "model.pt"
    expected = file_sha256(model_file)
    model_file.write_bytes(model_file.read_bytes() + b"tampered")
    stray = repository / "mlp" / "3" / "notes.txt"
    stray.write_text("who put this here?")
    (repository / "mlp" / "3" / "__pycache__").mkdir()  # Python's, when Triton imports model.py
    (repository / "mlp" / "3" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"")
    assert verify_repository(repository, ["mlp", "absent"]) == [
        f"{model_file}: sha256 {file_sha256(model_file)} differs from its lineage manifest "
        f"({expected}); run `gpufleet up` to re-export it, or find out who changed it",
        f"{stray}: not in its lineage manifest, so gpufleet did not write it; remove it (or run "
        "`gpufleet up`, which exports the version again)",
        f"{repository / 'absent'}: no version directory, so Triton has nothing to serve; run "
        "`gpufleet up` to fill it from the registry",
    ]

    result = assemble(counting, tmp_path, spec)
    assert (result["mlp"].exported, result["mlp"].repaired) == ([3], [3])
    assert Lineage.read(model_file.parent).files["model.pt"] == file_sha256(model_file)
    assert verify_repository(repository, ["mlp"]) == []

    (repository / "mlp" / "3" / LINEAGE_FILE).unlink()
    model_file.unlink()
    assert verify_repository(repository, ["mlp"]) == [
        f"{repository / 'mlp' / '3'}: no lineage manifest ({LINEAGE_FILE}), so where its files "
        "came from is unknown; remove it and run `gpufleet up` to export it again"
    ]


def test_a_new_spec_hash_alone_rewrites_only_the_manifest(
    counting: CountingRegistry, three_versions: list[RegistryVersion], tmp_path: Path
) -> None:
    assemble(counting, tmp_path, spec_for(three_versions, counting, 3))
    model_file = tmp_path / "repository" / "mlp" / "3" / "model.pt"
    before, old_lineage = model_file.stat(), Lineage.read(model_file.parent)
    counting.downloads.clear()

    tuned = spec_for(three_versions, counting, 3, objectives={"p99_latency_ms": 20})
    result = assemble(counting, tmp_path, tuned)
    assert (result["mlp"].relabelled, result["mlp"].exported) == ([3], [])
    assert counting.downloads == []
    after = model_file.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    lineage = Lineage.read(model_file.parent)
    assert lineage.spec_hash == loaded(tmp_path / "again", tuned).spec_hash != old_lineage.spec_hash
    assert lineage.files == old_lineage.files

    onnx = spec_for(three_versions, counting, 3, backend="onnxruntime")
    result = assemble(counting, tmp_path, onnx)
    assert result["mlp"].exported == [3]
    assert sorted(p.name for p in model_file.parent.iterdir()) == [LINEAGE_FILE, "model.onnx"]


def test_a_manifest_naming_another_run_is_exported_again(
    counting: CountingRegistry, three_versions: list[RegistryVersion], tmp_path: Path
) -> None:
    """As after the registry was rebuilt: same version number, another run behind it."""
    spec = spec_for(three_versions, counting, 3)
    assemble(counting, tmp_path, spec)
    manifest = tmp_path / "repository" / "mlp" / "3" / LINEAGE_FILE
    document = json.loads(manifest.read_text())
    document["registry"]["run_id"] = "0" * 32
    manifest.write_text(json.dumps(document))
    result = assemble(counting, tmp_path, spec)
    assert (result["mlp"].exported, result["mlp"].repaired) == ([3], [])
    assert Lineage.read(manifest.parent).registry_version.run_id == three_versions[2].run_id


def test_a_failed_export_leaves_nothing_behind(
    counting: CountingRegistry, three_versions: list[RegistryVersion], tmp_path: Path
) -> None:
    narrow = spec_for(
        three_versions, counting, 3, inputs=[{"name": "features", "dtype": "fp32", "shape": [8]}]
    )
    downloads_before = set(Path(tempfile.gettempdir()).glob("gpufleet-download-*"))
    with pytest.raises(AssemblyError) as error:
        assemble(counting, tmp_path, narrow)
    assert re.fullmatch(
        rf"modelconfigs/mlp.yaml: cannot export models:/{three_versions[0].name}/3: spec 'mlp': "
        r"exporting the module for the python backend failed: .+",
        str(error.value),
    )
    assert os.listdir(tmp_path / "repository" / "mlp") == []  # no version, no staging directory
    assert set(Path(tempfile.gettempdir()).glob("gpufleet-download-*")) == downloads_before


# -- an untrusted registry cannot run code here --------------------------------------------------


class _Armed(torch.nn.Module):
    """A module whose pickle creates `marker` when unpickled: what an attacker registers."""

    def __init__(self, marker: Path) -> None:
        super().__init__()
        self.marker = marker
        self.linear = torch.nn.Linear(16, 4)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.marker,))


def _pickled_pytorch_flavor(directory: Path, marker: Path) -> Path:
    """MLflow's pytorch flavor, pickle format: `torch.save` of the whole module (cloudpickle)."""
    mlflow.pytorch.save_model(
        _Armed(marker), str(directory), serialization_format="pickle", pip_requirements=["torch"]
    )
    return directory / "data" / "model.pth"


def _pt2_with_an_evaluated_shape(directory: Path, marker: Path) -> Path:
    """MLflow's pytorch flavor, pt2 format (torch.export, no pickle in the graph) whose symbolic
    batch size is a Python expression: torch.export.load hands it to sympy.sympify, an eval."""
    network = demo_network(mlp_spec("pt2"))
    example = np.zeros((4, 16), np.float32)
    signature = infer_signature(example, network(torch.from_numpy(example)).detach().numpy())
    mlflow.pytorch.save_model(
        network, str(directory), serialization_format="pt2", input_example=example,
        signature=signature, pip_requirements=["torch"],
    )  # fmt: skip
    # Only the pytorch flavor, as an attacker would leave it (MLflow adds a pyfunc one).
    mlmodel = yaml.safe_load((directory / "MLmodel").read_text())
    del mlmodel["flavors"]["python_function"]
    (directory / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    archive = directory / "data" / "model.pt2"
    with zipfile.ZipFile(archive) as original:
        members = [(info, original.read(info)) for info in original.infolist()]
    with zipfile.ZipFile(archive, "w") as rewritten:
        for info, data in members:
            if info.filename.endswith("models/model.json"):
                text = data.decode()
                symbol = re.search(r'"expr_str": "([^"]+)"', text)
                assert symbol is not None
                touch = f"__import__('pathlib').Path('{marker}').touch()"
                payload = f"{symbol[1]} + 0*({touch} or 0)"
                data = text.replace(symbol[0], f'"expr_str": "{payload}"', 1).encode()
            rewritten.writestr(info, data)
    return archive


def _code_paths_beside_the_weights(directory: Path, marker: Path) -> Path:
    """A gpufleet artifact whose MLmodel also ships a python_function flavor with code."""
    spec = mlp_spec("code")
    network = demo_network(spec)
    example = np.zeros((2, 16), np.float32)
    signature = infer_signature(example, network(torch.from_numpy(example)).detach().numpy())
    write_model_dir(directory, network, signature)
    (directory / "code").mkdir()
    loader = directory / "code" / "armed_loader.py"
    loader.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    mlmodel = yaml.safe_load((directory / "MLmodel").read_text())
    mlmodel["flavors"]["python_function"] = {"loader_module": "armed_loader", "code": "code"}
    (directory / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    return loader


def _pickle_as_the_weights(directory: Path, marker: Path) -> Path:
    """The gpufleet flavor, but its weights file is a pickle."""
    spec = mlp_spec("weights")
    network = demo_network(spec)
    example = np.zeros((2, 16), np.float32)
    signature = infer_signature(example, network(torch.from_numpy(example)).detach().numpy())
    write_model_dir(directory, network, signature)
    weights = directory / "data" / "model.safetensors"
    torch.save(_Armed(marker), weights)
    return weights


ARMED_ARTIFACTS = {
    "pickled module": (
        _pickled_pytorch_flavor,
        "its python_function flavor names pickle module 'mlflow.pytorch.pickle_module', and "
        "gpufleet never runs code from a registry",
    ),
    "torch.export archive": (
        _pt2_with_an_evaluated_shape,
        "it is MLflow's pytorch flavor (a pickled module, or a torch.export archive whose loader "
        "unpickles and evaluates what the file says), and gpufleet never runs code from a "
        "registry",
    ),
    "code paths": (
        _code_paths_beside_the_weights,
        "its python_function flavor ships code paths (code: 'code'), and gpufleet never runs "
        "code from a registry",
    ),
    "pickle as weights": (
        _pickle_as_the_weights,
        "its weights file data/model.safetensors is not safetensors: ",
    ),
}


def _arm(load: Callable[[Path], object], armed: Path, marker: Path) -> None:
    """Show the artifact is armed: loading it the way its format loads creates the marker."""
    if armed.suffix == ".py":
        runpy.run_path(str(armed))
    elif armed.suffix == ".pt2":
        load(armed)
    else:
        torch.load(
            io.BytesIO(armed.read_bytes()), weights_only=False
        )  # a pickle, whatever its name
    assert marker.exists(), "the test's artifact should run code when loaded"


@pytest.mark.parametrize("case", ARMED_ARTIFACTS)
def test_an_artifact_that_would_run_code_on_load_is_refused_and_nothing_runs(
    registry: ModelRegistry, model_name: str, tmp_path: Path, case: str
) -> None:
    build, reason = ARMED_ARTIFACTS[case]
    marker = tmp_path / "marker"
    armed = build(tmp_path / "artifact", marker)
    version = register_directory(registry, model_name, tmp_path / "artifact")
    spec = mlp_spec(model_name, alias=None)  # models:/<name>/1

    with pytest.raises(AssemblyError) as error:
        assemble(registry, tmp_path / "project", spec)
    message = str(error.value)
    assert message.startswith(
        f"models:/{model_name}/{version.version} at {registry.display_uri} is refused: {reason}"
    ), message
    assert message.endswith(
        "; log models weights only (gpufleet.registry.demo.register_torch_model, "
        "docs/local-stack.md)"
    )
    assert "\n" not in message
    assert not marker.exists(), "code from the registry ran"
    assert version_dirs(tmp_path / "project", model_name) == []

    _arm(torch.export.load, armed, marker)  # the same file, loaded as its format loads it


# -- pinned artifacts ----------------------------------------------------------------------------


def test_a_pinned_artifact_that_matches_is_served(
    registry: ModelRegistry, three_versions: list[RegistryVersion], tmp_path: Path
) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        found = tree_sha256(registry.download(three_versions[1], Path(scratch)))
    spec = spec_for(three_versions, registry, 2, source_sha256={2: found})
    result = assemble(registry, tmp_path, spec)
    assert result["mlp"].exported == [2]
    assert Lineage.read(tmp_path / "repository" / "mlp" / "2").artifact_sha256 == found


def test_a_pin_mismatch_is_refused_before_anything_is_loaded_or_written(
    registry: ModelRegistry, three_versions: list[RegistryVersion], tmp_path: Path
) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        found = tree_sha256(registry.download(three_versions[1], Path(scratch)))
    expected = "0" * 64
    spec = spec_for(three_versions, registry, 2, source_sha256={2: expected})
    with pytest.raises(AssemblyError) as error:
        assemble(registry, tmp_path, spec)
    assert str(error.value) == (
        f"modelconfigs/mlp.yaml: models:/{three_versions[0].name}/2 at {registry.display_uri}: "
        f"the artifact's sha256 is {found}, source_sha256 pins {expected}: these are not the "
        "files that were reviewed; find out who changed them, or review them and pin the new "
        "sha256"
    )
    assert os.listdir(tmp_path / "repository" / "mlp") == []


def test_an_alias_moved_to_a_version_the_spec_does_not_pin_is_refused(
    registry: ModelRegistry, three_versions: list[RegistryVersion], tmp_path: Path
) -> None:
    """The attack the old tag check missed: register a new version, move the alias to it."""
    with tempfile.TemporaryDirectory() as scratch:
        pinned = tree_sha256(registry.download(three_versions[1], Path(scratch)))
        found = tree_sha256(registry.download(three_versions[2], Path(scratch) / "3"))
    spec = spec_for(three_versions, registry, 2, source_sha256={2: pinned})
    assert assemble(registry, tmp_path, spec)["mlp"].kept == [2]

    moved = spec_for(three_versions, registry, 3, source_sha256={2: pinned})
    with pytest.raises(AssemblyError) as error:
        assemble(registry, tmp_path, moved)
    assert str(error.value) == (
        f"modelconfigs/mlp.yaml: the spec serves models:/{three_versions[0].name}/3 at "
        f"{registry.display_uri}, which source_sha256 does not pin (it pins version(s) 2); "
        f"review that version and add `3: {found}` (its artifact's sha256 now) to source_sha256"
    )
    assert version_dirs(tmp_path) == ["2"]  # what was served stays; nothing of 3 was written


def test_a_served_version_is_checked_again_when_its_pin_changes(
    counting: CountingRegistry, three_versions: list[RegistryVersion], tmp_path: Path
) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        found = tree_sha256(counting.download(three_versions[1], Path(scratch)))
    assemble(counting, tmp_path, spec_for(three_versions, counting, 2, source_sha256={2: found}))
    before = stats(tmp_path / "repository")
    counting.downloads.clear()

    repinned = spec_for(three_versions, counting, 2, source_sha256={2: "1" * 64})
    with pytest.raises(
        AssemblyError, match=f"the artifact's sha256 is {found}, source_sha256 pins"
    ):
        assemble(counting, tmp_path, repinned)
    assert counting.downloads == [2]  # the pin, not the local manifest, decided
    assert stats(tmp_path / "repository") == before  # the served version stays as it was
