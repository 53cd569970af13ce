"""The MLflow model registry as gpufleet sees it: resolve model URIs, list, download, tag.

`ModelRegistry` wraps `mlflow.MlflowClient` for one tracking server and turns MLflow's errors
into `RegistryError`s of one line: what is missing, at which server, and what to do. It makes
a dead server fail within seconds (few retries, short timeouts) and keeps MLflow quiet (no INFO
logs, no "View run at" lines, no progress bars, no telemetry). Against a server with basic auth
it sends MLflow's standard MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD from the
environment; a refusal (401, 403) says so in one line.

    registry = ModelRegistry("http://127.0.0.1:15000")
    version = registry.resolve("models:/tabular_mlp@production")   # RegistryVersion
    artifact = registry.download(version, Path("/tmp/download"))   # the MLflow model directory
    examples = registry.golden_examples(version)
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlflow.artifacts
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import ErrorCode
from mlflow.telemetry.client import set_telemetry_client
from mlflow.telemetry.utils import is_telemetry_disabled

from gpufleet.registry.golden import GOLDEN_EXAMPLES_FILE, GoldenExample, read_golden_examples

# Where a logged model keeps its golden examples (the folder MLflow's log_model(extra_files=)
# uses too).
GOLDEN_EXAMPLES_ARTIFACT = f"extra_files/{GOLDEN_EXAMPLES_FILE}"
MODEL_URI = re.compile(
    r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>[1-9][0-9]*))"
)
SEED_HINT = "run `gpufleet registry seed-demo` or register the model there"
READY = "READY"

# Set unless the environment sets them already. MLflow's defaults retry for minutes (7 retries,
# exponential backoff, 120 s timeouts), which turns a typo in a URI into a hang.
_CLIENT_ENVIRONMENT = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


class RegistryError(Exception):
    """A registry request failed; the message says what, at which server, and what to do."""


@dataclass(frozen=True)
class RegistryVersion:
    """One version of a registered model. `tags` is what the registry held when it was read."""

    name: str
    version: int
    run_id: str
    source: str
    tags: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def registered_model_name(uri: str) -> str | None:
    """`tabular_mlp` for `models:/tabular_mlp@production`; None for anything else."""
    match = MODEL_URI.fullmatch(uri)
    return match["name"] if match else None


def without_credentials(uri: str) -> str:
    """The URI with no user, password, query or fragment: safe to write into files and logs."""
    parts = urllib.parse.urlsplit(uri)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def configure_mlflow_client() -> None:
    """Few retries, short timeouts, no chatter: for this process's MLflow client. Idempotent."""
    for name, value in _CLIENT_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    if is_telemetry_disabled():
        # `import mlflow` started a telemetry client; this drops it.
        set_telemetry_client()  # type: ignore[no-untyped-call]
    logging.getLogger("mlflow").setLevel(logging.WARNING)


class ModelRegistry:
    """The model registry of one MLflow tracking server."""

    def __init__(self, tracking_uri: str) -> None:
        configure_mlflow_client()
        self.tracking_uri = tracking_uri
        self.display_uri = without_credentials(tracking_uri)
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    # -- reading -----------------------------------------------------------------------------

    def resolve(self, uri: str) -> RegistryVersion:
        """The version `models:/<name>@<alias>` or `models:/<name>/<version>` names."""
        match = MODEL_URI.fullmatch(uri)
        if match is None:
            raise RegistryError(
                f"{uri!r} is not a registry model URI; write models:/<name>@<alias> or "
                "models:/<name>/<version>"
            )
        name, alias, number = match["name"], match["alias"], match["version"]
        if alias is not None:
            what = f"alias {alias!r} of registered model {name!r}"
            hint = "point the alias at a version"
        else:
            what = f"version {number} of registered model {name!r}"
            hint = "use one of its versions"
        with self.mlflow_errors(what):
            found = self._find(name, alias, number)
            if found is None:
                raise self._missing(name, what, hint)
        version = _registry_version(found)
        if found.status != READY:
            raise RegistryError(
                f"{what} at {self.display_uri} is {found.status}, not READY: "
                f"{found.status_message or 'no reason given'}; register it again"
            )
        return version

    def versions(self, name: str) -> list[RegistryVersion]:
        """Every READY version of a registered model, lowest version first."""
        if "'" in name:
            raise RegistryError(f"registered model name {name!r} must not contain a quote")
        found: list[ModelVersion] = []
        with self.mlflow_errors(f"the versions of registered model {name!r}"):
            token: str | None = None
            while True:
                page = self.client.search_model_versions(f"name = '{name}'", page_token=token)
                found.extend(page)
                token = page.token
                if not token:
                    break
        ready = [_registry_version(item) for item in found if item.status == READY]
        return sorted(ready, key=lambda version: version.version)

    def has_registered_model(self, name: str) -> bool:
        with self.mlflow_errors(f"registered model {name!r}"):
            return self._registered_model(name) is not None

    def download(self, version: RegistryVersion, destination: Path) -> Path:
        """Download the model's artifact (the MLflow model directory) into `destination`."""
        destination.mkdir(parents=True, exist_ok=True)
        with self.mlflow_errors(f"the artifact of {version.uri}"):
            location = self._artifact_location(version)
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=location, dst_path=str(destination), tracking_uri=self.tracking_uri
            )
        return Path(path)

    def golden_examples(self, version: RegistryVersion) -> list[GoldenExample]:
        """The golden examples logged with the version (`extra_files/golden_examples.json`)."""
        what = f"the golden examples of {version.uri}"
        with tempfile.TemporaryDirectory(prefix="gpufleet-golden-") as scratch:
            with self.mlflow_errors(what):
                location = f"{self._artifact_location(version)}/{GOLDEN_EXAMPLES_ARTIFACT}"
                try:
                    path = mlflow.artifacts.download_artifacts(
                        artifact_uri=location, dst_path=scratch, tracking_uri=self.tracking_uri
                    )
                except (MlflowException, OSError) as error:
                    if not _is_missing_file(error):
                        raise
                    raise RegistryError(
                        f"{version.uri} at {self.display_uri} has no {GOLDEN_EXAMPLES_ARTIFACT} "
                        "in its artifact; log golden examples with the model "
                        "(gpufleet.registry.demo.register_torch_model does)"
                    ) from None
            try:
                return read_golden_examples(Path(path))
            except ValueError as error:
                reason = str(error).replace(path, GOLDEN_EXAMPLES_ARTIFACT)  # not the scratch copy
                raise RegistryError(f"{what} at {self.display_uri}: {reason}") from None

    # -- writing -----------------------------------------------------------------------------

    def set_tags(self, version: RegistryVersion, tags: dict[str, str]) -> dict[str, str]:
        """Set the tags whose value differs from `version.tags`; return those written."""
        changed = {key: value for key, value in tags.items() if version.tags.get(key) != value}
        with self.mlflow_errors(f"the tags of {version.uri}"):
            for key, value in changed.items():
                self.client.set_model_version_tag(version.name, str(version.version), key, value)
        return changed

    def register(
        self, name: str, model_uri: str, run_id: str, model_id: str | None = None
    ) -> RegistryVersion:
        """Register a logged model as a new version of `name` (created when missing)."""
        with self.mlflow_errors(f"registering {model_uri} as {name!r}"):
            if not self.has_registered_model(name):
                self.client.create_registered_model(name)
            created = self.client.create_model_version(
                name, source=model_uri, run_id=run_id, model_id=model_id
            )
        return _registry_version(created)

    def set_alias(self, name: str, alias: str, version: int) -> None:
        with self.mlflow_errors(f"pointing alias {alias!r} of {name!r} at version {version}"):
            self.client.set_registered_model_alias(name, alias, str(version))

    @contextlib.contextmanager
    def mlflow_errors(self, what: str) -> Iterator[None]:
        """Turn MLflow's exceptions about `what` into a RegistryError of one line."""
        try:
            yield
        except MlflowException as error:
            raise RegistryError(self._failure(what, error)) from None

    # -- internals ---------------------------------------------------------------------------

    def _find(self, name: str, alias: str | None, number: str | None) -> ModelVersion | None:
        # Through the registered model's aliases: a missing alias is then simply absent, where
        # get_model_version_by_alias answers INVALID_PARAMETER_VALUE with a sentence.
        if alias is not None:
            model = self._registered_model(name)
            if model is None or alias not in model.aliases:
                return None
            number = str(model.aliases[alias])
        try:
            return self.client.get_model_version(name, str(number))
        except MlflowException as error:
            if error.error_code != _NOT_FOUND:
                raise
            return None

    def _registered_model(self, name: str) -> RegisteredModel | None:
        try:
            return self.client.get_registered_model(name)
        except MlflowException as error:
            if error.error_code != _NOT_FOUND:
                raise
            return None

    def _artifact_location(self, version: RegistryVersion) -> str:
        return self.client.get_model_version_download_uri(version.name, str(version.version))

    def _missing(self, name: str, what: str, hint: str) -> RegistryError:
        if not self.has_registered_model(name):
            return RegistryError(
                f"registered model {name!r} does not exist at {self.display_uri}; {SEED_HINT}"
            )
        numbers = ", ".join(str(version.version) for version in self.versions(name))
        return RegistryError(
            f"{what} does not exist at {self.display_uri} (its versions: {numbers or 'none'}); "
            f"{hint}"
        )

    def _failure(self, what: str, error: MlflowException) -> str:
        message = _first_line(error.message).replace(self.tracking_uri, self.display_uri)
        if "API request to" in message and "failed with exception" in message:
            return (
                f"cannot reach the MLflow tracking server at {self.display_uri} "
                f"({_connection_reason(message)}) for {what}; start it (`gpufleet up` starts a "
                "local stack's server) or fix the stack's mlflow_tracking_uri"
            )
        if error.error_code in _AUTHENTICATION_FAILED:
            return (
                f"the MLflow tracking server at {self.display_uri} refused the request for "
                f"{what} ({error.error_code}); set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD to a user of that server with access (a local stack "
                "keeps its own in <state_dir>/mlflow-credentials.json)"
            )
        return f"{what} at {self.display_uri}: MLflow answered {error.error_code}: {message}"


_NOT_FOUND = ErrorCode.Name(ErrorCode.RESOURCE_DOES_NOT_EXIST)
_AUTHENTICATION_FAILED = {
    ErrorCode.Name(ErrorCode.UNAUTHENTICATED),
    ErrorCode.Name(ErrorCode.PERMISSION_DENIED),
}


def _registry_version(found: ModelVersion) -> RegistryVersion:
    return RegistryVersion(
        name=found.name,
        version=int(found.version),
        run_id=found.run_id or "",
        source=found.source or "",
        tags=dict(found.tags or {}),
    )


def _is_missing_file(error: Exception) -> bool:
    if isinstance(error, MlflowException):
        return error.error_code == _NOT_FOUND or "404" in error.message
    return isinstance(error, FileNotFoundError)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "(no message)"


def _connection_reason(message: str) -> str:
    """'Connection refused' out of requests' long 'Max retries exceeded ...' text."""
    for reason in ("Connection refused", "timed out", "Name or service not known"):
        if reason in message:
            return reason.lower()
    return message[:200]
