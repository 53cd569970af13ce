"""Fill a Triton model repository's version directories from the MLflow registry, with lineage.

For every spec whose source is a `models:/` URI, the versions its `version_policy` wants are
downloaded, exported for the spec's backend (generators.model_export) and renamed into
`<repository>/<model>/<version>/` all at once, each with a lineage manifest
(`gpufleet-lineage.json`: which registry version, run and artifact the files came from, their
sha256, the spec and the git commit). A version whose manifest and files still match is left
alone: a second run downloads and rewrites nothing. Files that no longer match their manifest
are exported again ("repaired"). Version directories without a manifest are never touched.
Registry artifacts are weights only (gpufleet.registry.artifact): nothing in them runs here. A
spec's `source_sha256` pins each served version's artifact; a version it does not pin, or whose
artifact differs, is refused before anything of it is loaded or written.

    result = assemble_repository(registry, specs, Path("build/local/model_repository"))
    problems = verify_repository(Path("build/local/model_repository"), ["tabular_mlp"])
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from generators.model_export import (
    EXPORTABLE_BACKENDS,
    PYTHON_MODEL_SOURCE,
    ExportError,
    export_model,
)
from generators.model_repository import (
    RepositoryPlan,
    apply_plan,
    plan_repository,
    render_repository_files,
    spec_display_name,
)
from gpufleet.registry.artifact import ArtifactError, load_model_dir
from gpufleet.registry.client import (
    ModelRegistry,
    RegistryVersion,
    registered_model_name,
)
from gpufleet.spec.loading import LoadedModelSpec
from gpufleet.spec.model import ModelSpec

LINEAGE_FILE = "gpufleet-lineage.json"
LINEAGE_FORMAT = "gpufleet.lineage/v1"
# The spec fields an export depends on: when one changes, the files are exported again.
EXPORT_FIELDS = ("backend", "inputs", "outputs", "max_batch_size", "default_model_filename")
# Changes when the generated model.py or torch (which writes TorchScript and ONNX) changes.
EXPORTER_ID = hashlib.sha256(
    f"{PYTHON_MODEL_SOURCE}\ntorch {torch.__version__}".encode()
).hexdigest()[:16]
TAG_SPEC_HASH = "gpufleet.spec_hash"
TAG_ARTIFACT_SHA256 = "gpufleet.artifact_sha256"
TAG_GIT_COMMIT = "gpufleet.git_commit"
# Working directories beside the version directories (Triton ignores names that are not numbers).
_STAGING_PREFIX = ".gpufleet-staging-"
_RETIRED_PREFIX = ".gpufleet-retired-"
_VERSION_DIR = re.compile(r"[1-9][0-9]*")
# Written by Python when Triton's python backend imports model.py; not part of the export.
_IGNORED_NAMES = {"__pycache__", LINEAGE_FILE}
_HASH_CHUNK = 1 << 20

Progress = Callable[[str], None]


class AssemblyError(Exception):
    """The repository could not be filled; the message says what, where, and what to do."""


@dataclass(frozen=True)
class Lineage:
    """Where the files of one version directory came from (its `gpufleet-lineage.json`)."""

    model: str
    version: int
    registry_version: RegistryVersion
    tracking_uri: str
    artifact_sha256: str
    files: dict[str, str]
    spec_hash: str
    export_spec: dict[str, Any]
    git_commit: str
    backend: str

    def to_json(self) -> str:
        document = {
            "format": LINEAGE_FORMAT,
            "model": self.model,
            "version": self.version,
            "registry": {
                "tracking_uri": self.tracking_uri,
                "name": self.registry_version.name,
                "version": self.registry_version.version,
                "run_id": self.registry_version.run_id,
                "source": self.registry_version.source,
            },
            "artifact_sha256": self.artifact_sha256,
            "files": self.files,
            "spec_hash": self.spec_hash,
            "export_spec": self.export_spec,
            "git_commit": self.git_commit,
            "backend": self.backend,
        }
        return json.dumps(document, indent=1, sort_keys=True) + "\n"

    @classmethod
    def read(cls, version_dir: Path) -> Lineage:
        """The manifest in `version_dir`; ValueError says what is wrong with it."""
        path = version_dir / LINEAGE_FILE
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
            if document.get("format") != LINEAGE_FORMAT:
                raise ValueError(f"format is {document.get('format')!r}, not {LINEAGE_FORMAT!r}")
            registry = document["registry"]
            return cls(
                model=str(document["model"]),
                version=int(document["version"]),
                registry_version=RegistryVersion(
                    name=str(registry["name"]),
                    version=int(registry["version"]),
                    run_id=str(registry["run_id"]),
                    source=str(registry["source"]),
                ),
                tracking_uri=str(registry["tracking_uri"]),
                artifact_sha256=str(document["artifact_sha256"]),
                files={str(key): str(value) for key, value in document["files"].items()},
                spec_hash=str(document["spec_hash"]),
                export_spec=dict(document["export_spec"]),
                git_commit=str(document["git_commit"]),
                backend=str(document["backend"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{path}: not a gpufleet lineage manifest: {error}") from None

    def tags(self) -> dict[str, str]:
        """What the registry's model version is tagged with about this export."""
        return {
            TAG_SPEC_HASH: self.spec_hash,
            TAG_ARTIFACT_SHA256: self.artifact_sha256,
            TAG_GIT_COMMIT: self.git_commit,
        }


@dataclass
class ModelAssembly:
    """What assembling did for one model. Version lists hold registry (= Triton) versions."""

    model: str
    resolved: RegistryVersion | None = None  # what the spec's source names
    skipped: str | None = None  # why the model is not filled from the registry
    kept: list[int] = field(default_factory=list)  # every version wanted, now in place
    exported: list[int] = field(default_factory=list)  # downloaded and exported
    repaired: list[int] = field(default_factory=list)  # of those: files had changed
    unchanged: list[int] = field(default_factory=list)  # left alone
    relabelled: list[int] = field(default_factory=list)  # of those: only the manifest updated
    pruned: list[int] = field(default_factory=list)  # removed, no longer wanted

    @property
    def changed(self) -> bool:
        """Whether the files Triton loads changed (a loaded model needs a reload)."""
        return bool(self.exported or self.pruned)


@dataclass
class AssemblyResult:
    models: list[ModelAssembly]

    @property
    def changed_models(self) -> list[str]:
        return [model.model for model in self.models if model.changed]

    def __getitem__(self, model: str) -> ModelAssembly:
        return next(item for item in self.models if item.model == model)


def assemble_repository(
    registry: ModelRegistry,
    specs: Sequence[LoadedModelSpec],
    repository: Path,
    *,
    progress: Progress | None = None,
) -> AssemblyResult:
    """Bring every registry-sourced model's version directories in line with its spec.

    Raises RegistryError (the registry cannot answer) or AssemblyError (a spec, a download or
    an export is wrong); versions finished before the error stay, nothing is half-written.
    """
    assembler = _Assembler(
        registry=registry,
        repository=repository,
        say=progress or (lambda _line: None),
        git_commit=git_commit(specs[0].path.parent if specs else Path.cwd()),
    )
    return AssemblyResult([assembler.assemble(item) for item in specs])


@dataclass(frozen=True)
class RepositoryFill:
    """What `fill_repository` changed: models whose files changed, models whose config was
    removed (no longer served), and the config plan it applied."""

    changed: set[str]
    removed: set[str]
    configs: RepositoryPlan


def fill_repository(
    registry: ModelRegistry,
    specs: Sequence[LoadedModelSpec],
    repository: Path,
    *,
    progress: Progress | None = None,
) -> RepositoryFill:
    """The registry's versions exported into `repository`, then the specs' `config.pbtxt`
    files written where they changed (a config whose spec is gone is removed)."""
    assembly = assemble_repository(registry, specs, repository, progress=progress)
    plan = plan_repository(repository, render_repository_files(list(specs)))
    apply_plan(plan)
    changed = set(assembly.changed_models)
    changed |= {relative.split("/", 1)[0] for relative in plan.created + plan.updated}
    removed = {relative.split("/", 1)[0] for relative in plan.stale}
    return RepositoryFill(changed, removed, plan)


def verify_repository(repository: Path, model_names: Sequence[str]) -> list[str]:
    """One line per problem in the version directories of `model_names` (models filled from
    the registry): no version, no manifest, files missing, changed or not in the manifest."""
    problems: list[str] = []
    for name in model_names:
        model_dir = repository / name
        version_dirs = _version_dirs(model_dir)
        if not version_dirs:
            problems.append(
                f"{model_dir}: no version directory, so Triton has nothing to serve; run "
                "`gpufleet up` to fill it from the registry"
            )
        for version_dir in version_dirs:
            try:
                lineage = Lineage.read(version_dir)
            except FileNotFoundError:
                problems.append(
                    f"{version_dir}: no lineage manifest ({LINEAGE_FILE}), so where its files "
                    "came from is unknown; remove it and run `gpufleet up` to export it again"
                )
                continue
            except ValueError as error:
                problems.append(f"{error}; run `gpufleet up` to export it again")
                continue
            problems.extend(file_problems(version_dir, lineage))
    return problems


def served_versions(repository: Path, model: str) -> list[Lineage]:
    """The lineage of each version directory of `model` that has one, lowest version first."""
    served = []
    for version_dir in _version_dirs(repository / model):
        with contextlib.suppress(ValueError, FileNotFoundError):
            served.append(Lineage.read(version_dir))
    return served


def file_problems(version_dir: Path, lineage: Lineage) -> list[str]:
    """How the files in `version_dir` differ from what its manifest lists (empty: they match)."""
    problems = []
    for relative, expected in sorted(lineage.files.items()):
        path = version_dir / relative
        if not path.is_file():
            problems.append(
                f"{path}: missing, though its lineage manifest lists it; run `gpufleet up` to "
                "export it again"
            )
        elif (actual := file_sha256(path)) != expected:
            problems.append(
                f"{path}: sha256 {actual} differs from its lineage manifest ({expected}); run "
                "`gpufleet up` to re-export it, or find out who changed it"
            )
    for path in sorted(_files(version_dir)):
        if path.relative_to(version_dir).as_posix() not in lineage.files:
            problems.append(
                f"{path}: not in its lineage manifest, so gpufleet did not write it; remove it "
                "(or run `gpufleet up`, which exports the version again)"
            )
    return problems


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tree_sha256(root: Path) -> str:
    """sha256 over every file's relative path and content under `root`, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(root).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def export_spec(spec: ModelSpec) -> dict[str, Any]:
    """What the exported files depend on: the spec's export fields and the exporter itself
    (the generated model.py template and torch's version), so an upgrade re-exports."""
    fields = spec.model_dump(mode="json", include=set(EXPORT_FIELDS), exclude_defaults=True)
    return {**fields, "exporter": EXPORTER_ID}


def git_commit(directory: Path) -> str:
    """The commit checked out in the git work tree holding `directory`, or "unknown"."""
    try:
        completed = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return completed.stdout.strip() or "unknown"


# -- assembling one model --------------------------------------------------------------------


@dataclass(frozen=True)
class _Assembler:
    registry: ModelRegistry
    repository: Path
    say: Progress
    git_commit: str

    def assemble(self, item: LoadedModelSpec) -> ModelAssembly:
        spec, source = item.spec, item.spec.source or ""
        result = ModelAssembly(spec.name)
        if registered_model_name(source) is None:
            result.skipped = "its source is not a models:/ URI" if source else "no source"
            self.say(f"  {spec.name}: not from the registry ({result.skipped}); skipped")
            return result
        if spec.backend not in EXPORTABLE_BACKENDS:
            raise AssemblyError(
                f"{spec_display_name(item.path)}: backend {spec.backend or spec.platform!r} "
                "cannot be filled from a torch model in the registry; use python, pytorch or "
                "onnxruntime, or fill the version directories yourself (no models:/ source)"
            )
        result.resolved = self.registry.resolve(source)
        wanted = wanted_versions(item, result.resolved, self.registry)
        if result.resolved not in wanted:
            self.say(
                f"  {spec.name}: note: {source} (version {result.resolved.version}) is not among "
                "the versions the spec's version_policy serves; serving those (a rollback?)"
            )
        self.say(
            f"  {spec.name}: {source} is version {result.resolved.version}; serving "
            f"version(s) {', '.join(str(version.version) for version in wanted)}"
        )
        self._refuse_unpinned(item, wanted)
        model_dir = self.repository / spec.name
        _remove_leftovers(model_dir)
        for version in wanted:
            self._bring(item, version, model_dir, result)
        result.kept = [version.version for version in wanted]
        for number in _prune(model_dir, set(result.kept)):
            self.say(f"  {spec.name} v{number}: removed (the version policy no longer wants it)")
            result.pruned.append(number)
        return result

    def _bring(
        self,
        item: LoadedModelSpec,
        version: RegistryVersion,
        model_dir: Path,
        result: ModelAssembly,
    ) -> None:
        """Make `<model_dir>/<version>` hold this registry version's export for the spec."""
        version_dir = model_dir / str(version.version)
        label = f"{item.spec.name} v{version.version}"
        present = self._present_lineage(version_dir, label)
        if present is None:
            repair = version_dir.exists()  # its manifest could not be read
        elif present.registry_version != version:
            self.say(
                f"  {label}: exported from run {present.registry_version.run_id}, not from "
                f"{version.run_id}, the registry's; replacing it"
            )
            repair = False
        elif version.version in item.spec.source_sha256 and (
            item.spec.source_sha256[version.version] != present.artifact_sha256
        ):
            self.say(f"  {label}: source_sha256 pins another artifact; checking the registry's")
            repair = False
        elif present.export_spec != export_spec(item.spec):
            self.say(
                f"  {label}: the spec's {', '.join(EXPORT_FIELDS)} or the exporter changed; "
                "exporting again"
            )
            repair = False
        else:
            problems = file_problems(version_dir, present)
            if not problems:
                self._keep(item, version, version_dir, present, result)
                return
            self.say(f"  {label}: {problems[0]}; repairing it")
            repair = True
        if repair:
            result.repaired.append(version.version)
        lineage = self._export(item, version, model_dir)
        self.registry.set_tags(version, lineage.tags())
        result.exported.append(version.version)

    def _present_lineage(self, version_dir: Path, label: str) -> Lineage | None:
        if not version_dir.exists():
            return None
        if not (version_dir / LINEAGE_FILE).is_file():
            raise AssemblyError(
                f"{version_dir} holds files gpufleet did not write (no {LINEAGE_FILE}); move "
                f"them away so that {label} can be exported there"
            )
        try:
            return Lineage.read(version_dir)
        except ValueError as error:
            self.say(f"  {label}: {error}; exporting it again")
            return None

    def _keep(
        self,
        item: LoadedModelSpec,
        version: RegistryVersion,
        version_dir: Path,
        present: Lineage,
        result: ModelAssembly,
    ) -> None:
        lineage = present
        if present.spec_hash != item.spec_hash:
            lineage = dataclasses.replace(present, spec_hash=item.spec_hash)
            _write_manifest(version_dir, lineage)
            result.relabelled.append(version.version)
        self.registry.set_tags(version, lineage.tags())
        result.unchanged.append(version.version)
        self.say(f"  {item.spec.name} v{version.version}: up to date")

    def _export(self, item: LoadedModelSpec, version: RegistryVersion, model_dir: Path) -> Lineage:
        """Download, export into a staging directory, then rename it into place."""
        spec = item.spec
        self.say(
            f"  {spec.name} v{version.version}: downloading {version.uri} and exporting it "
            f"for the {spec.backend} backend"
        )
        model_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="gpufleet-download-") as scratch:
            artifact = self.registry.download(version, Path(scratch))
            artifact_sha256 = tree_sha256(artifact)
            pinned = spec.source_sha256.get(version.version)
            if pinned is not None and pinned != artifact_sha256:
                raise AssemblyError(
                    f"{spec_display_name(item.path)}: {version.uri} at "
                    f"{self.registry.display_uri}: the artifact's sha256 is {artifact_sha256}, "
                    f"source_sha256 pins {pinned}: these are not the files that were reviewed; "
                    "find out who changed them, or review them and pin the new sha256"
                )
            recorded = version.tags.get(TAG_ARTIFACT_SHA256)
            if recorded is not None and recorded != artifact_sha256:
                raise AssemblyError(
                    f"{version.uri} at {self.registry.display_uri}: the artifact's sha256 "
                    f"{artifact_sha256} differs from the {recorded} recorded when it was first "
                    "exported (tag gpufleet.artifact_sha256): the registry's files changed after "
                    "registration; register a new version instead of editing one"
                )
            module = self._load(artifact, version)
            with _staging(model_dir) as staging:
                try:
                    files = export_model(module, spec, staging)
                except ExportError as error:
                    raise AssemblyError(
                        f"{spec_display_name(item.path)}: cannot export {version.uri}: {error}"
                    ) from None
                lineage = Lineage(
                    model=spec.name,
                    version=version.version,
                    registry_version=version,
                    tracking_uri=self.registry.display_uri,
                    artifact_sha256=artifact_sha256,
                    files={f.relative_to(staging).as_posix(): file_sha256(f) for f in files},
                    spec_hash=item.spec_hash,
                    export_spec=export_spec(spec),
                    git_commit=self.git_commit,
                    backend=str(spec.backend),
                )
                _write_manifest(staging, lineage)
                _move_into_place(staging, model_dir / str(version.version))
        return lineage

    def _refuse_unpinned(self, item: LoadedModelSpec, wanted: list[RegistryVersion]) -> None:
        """A spec that pins artifacts serves pinned versions only (an alias move is no bypass)."""
        pins = item.spec.source_sha256
        unpinned = [version for version in wanted if version.version not in pins]
        if not pins or not unpinned:
            return
        version = unpinned[0]
        with tempfile.TemporaryDirectory(prefix="gpufleet-download-") as scratch:
            found = tree_sha256(self.registry.download(version, Path(scratch)))
        raise AssemblyError(
            f"{spec_display_name(item.path)}: the spec serves {version.uri} at "
            f"{self.registry.display_uri}, which source_sha256 does not pin (it pins version(s) "
            f"{', '.join(map(str, sorted(pins)))}); review that version and add "
            f"`{version.version}: {found}` (its artifact's sha256 now) to source_sha256"
        )

    def _load(self, artifact: Path, version: RegistryVersion) -> torch.nn.Module:
        """The version's model, built by gpufleet from its weights; nothing in it runs."""
        try:
            return load_model_dir(artifact)
        except ArtifactError as error:
            raise AssemblyError(
                f"{version.uri} at {self.registry.display_uri} is refused: {error}; log models "
                "weights only (gpufleet.registry.demo.register_torch_model, docs/local-stack.md)"
            ) from None


def wanted_versions(
    item: LoadedModelSpec,
    target: RegistryVersion,
    registry: ModelRegistry,
    available: Sequence[RegistryVersion] | None = None,
) -> list[RegistryVersion]:
    """The registry versions the spec's version_policy serves, given the source's `target`
    (and the registered model's READY versions, when the caller fetched them already).

    `latest: N` (and no policy, Triton's `latest: 1`) counts down from the target, never above
    it: Triton serves the highest numbers, and a version above the alias target would win.
    """
    policy = item.spec.version_policy
    available = list(available) if available is not None else registry.versions(target.name)
    if target not in available:  # e.g. registered between the two requests
        available = sorted([*available, target], key=lambda version: version.version)
    if policy is None or policy.latest is not None:
        count = policy.latest if policy is not None and policy.latest is not None else 1
        below = [version for version in available if version.version < target.version]
        return [*below[max(0, len(below) - (count - 1)) :], target]
    if policy.all:
        return available
    numbers = {version.version: version for version in available}
    wanted = sorted(set(policy.specific or []))
    missing = [number for number in wanted if number not in numbers]
    if missing:
        raise AssemblyError(
            f"{spec_display_name(item.path)}: version_policy.specific lists version(s) "
            f"{', '.join(map(str, missing))}, which registered model {target.name!r} at "
            f"{registry.display_uri} does not have (its versions: "
            f"{', '.join(map(str, numbers)) or 'none'}); remove them or register them"
        )
    return [numbers[number] for number in wanted]


# -- files -----------------------------------------------------------------------------------


def _version_dirs(model_dir: Path) -> list[Path]:
    if not model_dir.is_dir():
        return []
    found = [p for p in model_dir.iterdir() if p.is_dir() and _VERSION_DIR.fullmatch(p.name)]
    return sorted(found, key=lambda path: int(path.name))


def _files(version_dir: Path) -> Iterator[Path]:
    """Every file under `version_dir` except the manifest and Python's bytecode caches."""
    for path in version_dir.rglob("*"):
        relative = path.relative_to(version_dir)
        if path.is_file() and not _IGNORED_NAMES.intersection(relative.parts):
            yield path


def _write_manifest(version_dir: Path, lineage: Lineage) -> None:
    temporary = version_dir / f".{LINEAGE_FILE}.{uuid.uuid4().hex}.tmp"
    temporary.write_text(lineage.to_json(), encoding="utf-8")
    os.replace(temporary, version_dir / LINEAGE_FILE)


@contextlib.contextmanager
def _staging(model_dir: Path) -> Iterator[Path]:
    """A fresh directory beside the version directories; removed unless renamed away."""
    staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=_STAGING_PREFIX))
    staging.chmod(0o755)  # mkdtemp makes it 0700; Triton may run as another user
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging: Path, version_dir: Path) -> None:
    """Rename `staging` to `version_dir`, replacing what is there (restored if that fails)."""
    if not version_dir.exists():
        os.rename(staging, version_dir)
        return
    retired = version_dir.with_name(f"{_RETIRED_PREFIX}{version_dir.name}-{uuid.uuid4().hex}")
    os.rename(version_dir, retired)
    try:
        os.rename(staging, version_dir)
    except BaseException:
        os.rename(retired, version_dir)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _prune(model_dir: Path, wanted: set[int]) -> list[int]:
    """Remove version directories with a manifest that are not wanted; return their numbers."""
    pruned = []
    for version_dir in _version_dirs(model_dir):
        number = int(version_dir.name)
        if number not in wanted and (version_dir / LINEAGE_FILE).is_file():
            shutil.rmtree(version_dir)
            pruned.append(number)
    return pruned


def _remove_leftovers(model_dir: Path) -> None:
    """Staging and retired directories an interrupted run left behind."""
    if not model_dir.is_dir():
        return
    for path in model_dir.iterdir():
        if path.is_dir() and path.name.startswith((_STAGING_PREFIX, _RETIRED_PREFIX)):
            shutil.rmtree(path, ignore_errors=True)
