"""The triton layer: what one Triton serves, against what the specs and the registry say now.

For each Triton (each serving host's, or the local stack's), over gRPC:

- each spec's model: its live config (`get_model_config`) against the generated `config.pbtxt`,
  both read through Triton's ModelConfig protobuf (gpufleet/drift/triton_config.py: Triton's
  filled-in defaults are not drift, a default changed by hand is);
- its loaded versions (the repository index, a restricted API: the admin key header) against
  the versions the spec's source and version policy select in the registry now: an alias moved
  in MLflow is "registry says v3, Triton serves v2";
- models loaded that no spec names;
- where the model repository is on this machine (the local stack), its version directories'
  files against their lineage manifests' sha256.

`TritonFindings` also says which models convergence must reload or unload (`gpufleet up`, the
lifecycle's deploy step): the same check is the repair's "would you change anything?".

    served = expected_models(specs, registry)
    findings = check_triton(TritonTarget("local", "127.0.0.1:18001", headers, "gpufleet up ..."),
                            served)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from generators.model_repository import render_repository_files
from generators.registry_repository import (
    AssemblyError,
    verify_repository,
    wanted_versions,
)
from gpufleet.drift.items import DriftItem, LayerCheck
from gpufleet.drift.triton_config import (
    ConfigParseError,
    config_differences,
    generated_config_json,
)
from gpufleet.registry.client import ModelRegistry, RegistryError, registered_model_name
from gpufleet.spec.loading import LoadedModelSpec

_TIMEOUT_S = 20.0
_LOAD_TIMEOUT_S = 600.0
CONFIG_SUFFIX = "/config.pbtxt"


@dataclass(frozen=True)
class TritonTarget:
    """One Triton to check: where it answers gRPC, its admin key header, how to repair it."""

    host: str  # a host of the stack, or "local"
    grpc_url: str
    headers: Mapping[str, str] | None
    repair: str  # e.g. "gpufleet up --stack lab"
    repository: Path | None = None  # the repository Triton reads, when it is on this machine


@dataclass
class ExpectedModels:
    """What every Triton of the stack should serve: generated configs, and the versions the
    registry selects now (models whose versions could not be told are in `errors`)."""

    configs: dict[str, str]
    versions: dict[str, list[int]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # "models:/m@production is v3"
    errors: list[str] = field(default_factory=list)


def expected_models(
    specs: Sequence[LoadedModelSpec], registry: ModelRegistry | Callable[[], ModelRegistry]
) -> ExpectedModels:
    """Render the specs' configs and ask the registry which versions they select now."""
    configs = {
        relative.removesuffix(CONFIG_SUFFIX): text
        for relative, text in render_repository_files(list(specs)).items()
    }
    expected = ExpectedModels(configs)
    sourced = [item for item in specs if registered_model_name(item.spec.source or "")]
    if not sourced:
        return expected
    try:
        client = registry if isinstance(registry, ModelRegistry) else registry()
    except RegistryError as error:
        expected.errors.append(f"the registry: {error}")
        return expected
    # Each authenticated MLflow request costs a password hash on the server: the lookups of
    # every model run at once, and a model's alias and its versions are asked side by side.
    with ThreadPoolExecutor(max_workers=2 * len(sourced)) as pool:
        lookups = [
            (
                item,
                pool.submit(client.resolve, item.spec.source or ""),
                pool.submit(client.versions, registered_model_name(item.spec.source or "") or ""),
            )
            for item in sourced
        ]
        for item, resolving, listing in lookups:
            source = item.spec.source or ""
            try:
                target = resolving.result()
                wanted = wanted_versions(item, target, client, available=listing.result())
            except (RegistryError, AssemblyError) as error:
                expected.errors.append(f"model {item.spec.name} versions: {error}")
                continue
            expected.versions[item.spec.name] = [version.version for version in wanted]
            expected.sources[item.spec.name] = f"{source} is v{target.version}"
    return expected


@dataclass
class TritonFindings:
    """The layer check of one Triton, and what convergence must do about it."""

    check: LayerCheck
    target: TritonTarget
    expected: ExpectedModels
    reload: set[str] = field(default_factory=set)  # live config or versions differ
    unload: set[str] = field(default_factory=set)  # loaded, though no spec names them


def check_triton(target: TritonTarget, expected: ExpectedModels) -> TritonFindings:
    """Compare what `target` serves with `expected`; never raises for an unreachable Triton
    (the check's `error` says so, and the layer exits 2)."""
    started = time.monotonic()
    findings = TritonFindings(LayerCheck("triton", target.host), target, expected)
    check = findings.check
    try:
        _compare(target, expected, findings)
    except _Unreachable as error:
        check.error = (
            f"could not be checked: Triton at {target.grpc_url} on {target.host}: {error}; "
            f"start it with `{target.repair}`"
        )
    if expected.errors and check.error is None:
        check.error = "could not be checked: " + "; ".join(expected.errors)
    check.seconds = time.monotonic() - started
    return findings


class _Unreachable(Exception):
    pass


def _compare(target: TritonTarget, expected: ExpectedModels, findings: TritonFindings) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    check = findings.check

    def item(object_: str, wanted: str, found: str) -> None:
        check.items.append(DriftItem("triton", target.host, object_, wanted, found, target.repair))

    try:
        client = grpcclient.InferenceServerClient(target.grpc_url)
    except InferenceServerException as error:
        raise _Unreachable(_message(error)) from None
    try:
        headers = dict(target.headers or {})
        try:
            if not client.is_server_live(client_timeout=_TIMEOUT_S):
                raise _Unreachable("not live")
            index = client.get_model_repository_index(
                headers=headers, as_json=True, client_timeout=_TIMEOUT_S
            )
        except InferenceServerException as error:
            raise _Unreachable(_message(error)) from None
        loaded = _loaded_versions(index)
        for name, generated in sorted(expected.configs.items()):
            check.checked.append(f"model {name} config")
            if name not in loaded:
                item(f"model {name} config", "loaded", "not loaded")
                findings.reload.add(name)
                continue
            try:
                live = client.get_model_config(name, as_json=True, client_timeout=_TIMEOUT_S)
                differences = config_differences(generated, live.get("config", {}))
            except InferenceServerException as error:
                item(f"model {name} config", "readable", _message(error))
                findings.reload.add(name)
                continue
            except ConfigParseError as error:
                item(f"model {name} config", "a Triton ModelConfig", str(error))
                findings.reload.add(name)
                continue
            for path, wanted, found in differences:
                item(f"model {name} config", f"{path}: {wanted}", f"{path}: {found}")
            if differences:
                findings.reload.add(name)
        for name, versions in sorted(expected.versions.items()):
            check.checked.append(f"model {name} versions")
            served = loaded.get(name, [])
            if served != versions:
                item(
                    f"model {name} versions",
                    f"registry says {_versions(versions)} ({expected.sources[name]})",
                    f"Triton serves {_versions(served)}" if served else "Triton serves none",
                )
                findings.reload.add(name)
        for name in sorted(set(loaded) - set(expected.configs)):
            check.checked.append(f"model {name}")
            item(
                f"model {name}", "not loaded: no spec names it", f"loaded {_versions(loaded[name])}"
            )
            findings.unload.add(name)
    finally:
        client.close()
    if target.repository is not None:
        _check_files(target, expected, findings)


def _check_files(target: TritonTarget, expected: ExpectedModels, findings: TritonFindings) -> None:
    """The repository's version directories against their lineage manifests' sha256."""
    assert target.repository is not None
    for name in sorted(expected.versions):
        findings.check.checked.append(f"model {name} files")
        for problem in verify_repository(target.repository, [name]):
            findings.check.items.append(
                DriftItem(
                    "triton",
                    target.host,
                    f"model {name} files",
                    "files as their lineage manifest lists them (sha256)",
                    problem,
                    target.repair,
                )
            )
            findings.reload.add(name)


def _loaded_versions(index: Any) -> dict[str, list[int]]:
    """Model -> versions Triton serves (READY), from the repository index."""
    loaded: dict[str, list[int]] = {}
    for entry in index.get("models", []) if isinstance(index, dict) else []:
        if entry.get("state") == "READY" and str(entry.get("version", "")).isdigit():
            loaded.setdefault(entry["name"], []).append(int(entry["version"]))
    return {name: sorted(versions) for name, versions in loaded.items()}


def _versions(numbers: Sequence[int]) -> str:
    return ", ".join(f"v{number}" for number in numbers) or "no version"


def _message(error: Exception) -> str:
    text = getattr(error, "message", None)
    message = text() if callable(text) else str(error)
    return str(message).splitlines()[0] if message else type(error).__name__


class ConvergeError(Exception):
    """Triton refused to load or unload a model while converging; the message says which."""


def converge_triton(
    target: TritonTarget,
    expected: ExpectedModels,
    *,
    reload: Sequence[str],
    unload: Sequence[str],
    say: Callable[[str], None],
) -> None:
    """Bring `target` back to the specs without a file change: each of `reload` is loaded with
    its generated config given explicitly (Triton does not reload an unchanged repository
    directory, so a config loaded with an override or a version loaded by hand would stay),
    each of `unload` (loaded, though no spec names it) is unloaded. Raises ConvergeError."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    if not reload and not unload:
        return
    client = grpcclient.InferenceServerClient(target.grpc_url)
    headers = dict(target.headers or {})
    try:
        for name in unload:
            try:
                client.unload_model(name, headers=headers, client_timeout=_LOAD_TIMEOUT_S)
            except InferenceServerException as error:
                raise ConvergeError(
                    f"Triton at {target.grpc_url} ({target.host}) would not unload model "
                    f"{name!r}, which no spec names: {_message(error)}"
                ) from None
            say(f"  unloaded {name} on {target.host}: no spec names it")
        for name in reload:
            config = generated_config_json(expected.configs[name])
            try:
                client.load_model(
                    name, headers=headers, config=config, client_timeout=_LOAD_TIMEOUT_S
                )
            except InferenceServerException as error:
                raise ConvergeError(
                    f"Triton at {target.grpc_url} ({target.host}) would not reload model "
                    f"{name!r} with its generated config: {_message(error)}"
                ) from None
            say(f"  reloaded {name} on {target.host}: its live config or versions had drifted")
    finally:
        client.close()
