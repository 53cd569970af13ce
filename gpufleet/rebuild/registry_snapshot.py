"""The registry as data, to compare before and after a rebuild field by field: every
registered model with its tags and aliases, every version with its run id, source, status and
tags, each run's experiment, parameters and metrics, and the sha256 of every file of each
version's artifacts (downloaded through MLflow, as the fill step reads them).

    before = snapshot_registry(environment.registry())
    differences = compare_snapshots(before, after)   # [] when equal
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from generators.registry_repository import TAG_ARTIFACT_SHA256, TAG_GIT_COMMIT, TAG_SPEC_HASH
from gpufleet.registry.client import ModelRegistry, RegistryError, RegistryVersion

Snapshot = dict[str, Any]
LINEAGE_TAGS = (TAG_SPEC_HASH, TAG_ARTIFACT_SHA256, TAG_GIT_COMMIT)


def snapshot_registry(registry: ModelRegistry) -> Snapshot:
    """Everything the registry holds, as JSON-able data. Raises RegistryError."""
    client = registry.client
    models: dict[str, Any] = {}
    runs: dict[str, Any] = {}
    with registry.mlflow_errors("the registered models"):
        registered = _all_pages(lambda token: client.search_registered_models(page_token=token))
    for model in sorted(registered, key=lambda item: item.name):
        versions: dict[str, Any] = {}
        with registry.mlflow_errors(f"the versions of {model.name!r}"):
            found = _all_pages(
                lambda token, name=model.name: client.search_model_versions(
                    f"name = '{name}'", page_token=token
                )
            )
        for version in sorted(found, key=lambda item: int(item.version)):
            versions[str(version.version)] = {
                "run_id": version.run_id,
                "source": version.source,
                "status": version.status,
                "description": version.description or "",
                "tags": dict(sorted((version.tags or {}).items())),
                "artifact_sha256": _artifact_hashes(
                    registry,
                    RegistryVersion(
                        model.name, int(version.version), version.run_id, version.source
                    ),
                ),
            }
            if version.run_id and version.run_id not in runs:
                runs[version.run_id] = _run(registry, version.run_id)
        models[model.name] = {
            "description": model.description or "",
            "tags": dict(sorted((model.tags or {}).items())),
            "aliases": {alias: str(number) for alias, number in sorted(model.aliases.items())},
            "versions": versions,
        }
    return {"models": models, "runs": runs}


def compare_snapshots(before: Snapshot, after: Snapshot) -> list[str]:
    """One line per field that differs (`models.m.versions.2.tags.k: 'a' -> 'b'`); [] if equal."""
    left, right = _flatten(before), _flatten(after)
    differences = []
    for key in sorted(set(left) | set(right)):
        if key not in right:
            differences.append(f"{key}: {left[key]!r} -> missing after the rebuild")
        elif key not in left:
            differences.append(f"{key}: not there before -> {right[key]!r}")
        elif left[key] != right[key]:
            differences.append(f"{key}: {left[key]!r} -> {right[key]!r}")
    return differences


def counts(snapshot: Snapshot) -> dict[str, int]:
    models = snapshot.get("models", {})
    return {
        "models": len(models),
        "versions": sum(len(model["versions"]) for model in models.values()),
        "aliases": sum(len(model["aliases"]) for model in models.values()),
        "runs": len(snapshot.get("runs", {})),
        "artifact_files": sum(
            len(version["artifact_sha256"])
            for model in models.values()
            for version in model["versions"].values()
        ),
    }


def lineage_tag_additions(differences: list[str]) -> tuple[list[str], list[str]]:
    """(the differences that are lineage tags the fill step added to a version it exported,
    the others). Filling the model repository tags each version it exports with its lineage
    (generators/registry_repository.py); a rebuild's fill step does that for the versions the
    aliases name now, which nobody had deployed yet. Anything else is a real difference."""
    added, others = [], []
    for line in differences:
        key, _, change = line.partition(": ")
        tag = key.rpartition(".tags.")[2] if ".versions." in key and ".tags." in key else ""
        if tag in LINEAGE_TAGS and change.startswith("not there before"):
            added.append(line)
        else:
            others.append(line)
    return added, others


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves by dotted path; an empty mapping has no leaves (its keys, added or removed,
    are the differences)."""
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _all_pages(search: Any) -> list[Any]:
    found: list[Any] = []
    token = None
    while True:
        page = search(token)
        found.extend(page)
        token = page.token
        if not token:
            return found


def _run(registry: ModelRegistry, run_id: str) -> dict[str, Any]:
    try:
        run = registry.client.get_run(run_id)
    except MlflowException as error:
        return {"missing": str(error).splitlines()[0]}
    return {
        "experiment_id": run.info.experiment_id,
        "status": run.info.status,
        "params": dict(sorted(run.data.params.items())),
        "metrics": dict(sorted(run.data.metrics.items())),
    }


def _artifact_hashes(registry: ModelRegistry, version: RegistryVersion) -> dict[str, str]:
    with tempfile.TemporaryDirectory(prefix="gpufleet-rebuild-") as directory:
        try:
            root = registry.download(version, Path(directory))
        except RegistryError as error:
            return {"<unreadable>": str(error).splitlines()[0]}
        files = sorted(path for path in root.rglob("*") if path.is_file())
        return {str(path.relative_to(root)): _sha256(path) for path in files}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
