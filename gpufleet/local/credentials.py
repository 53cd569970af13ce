"""The MLflow credentials of a local stack: from the environment, else generated once per stack.

MLflow's client authenticates with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD from
the environment, and the local stack's MLflow server (basic-auth app) makes that user its admin
the first time it starts. When the environment sets both, they are used; otherwise a password is
generated once and kept in `<state_dir>/mlflow-credentials.json` (mode 0600, under build/,
which git ignores). The password never goes on a command line, into a log or into git.

    credentials = stack_credentials(Path("build/local"))
    use_for_mlflow_client(credentials)   # this process's MLflow client now sends them
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

USERNAME_VARIABLE = "MLFLOW_TRACKING_USERNAME"
PASSWORD_VARIABLE = "MLFLOW_TRACKING_PASSWORD"  # noqa: S105  (a variable's name, not a secret)
CREDENTIALS_FILE = "mlflow-credentials.json"
GENERATED_USERNAME = "gpufleet"


class CredentialsError(Exception):
    """The credentials cannot be read or written; the message says where and what to do."""


@dataclass(frozen=True)
class BasicCredentials:
    username: str
    password: str = field(repr=False)


def from_environment() -> BasicCredentials | None:
    """The MLflow credentials the environment sets, None when it sets neither."""
    username = os.environ.get(USERNAME_VARIABLE, "")
    password = os.environ.get(PASSWORD_VARIABLE, "")
    if bool(username) != bool(password):
        missing = PASSWORD_VARIABLE if username else USERNAME_VARIABLE
        raise CredentialsError(
            f"{USERNAME_VARIABLE if username else PASSWORD_VARIABLE} is set but {missing} is "
            "not; set both (or neither, and a local stack generates its own)"
        )
    return BasicCredentials(username, password) if username else None


def stack_credentials(state_dir: Path) -> BasicCredentials:
    """The environment's credentials, else the stack's own (generated on first use)."""
    found = from_environment()
    if found is not None:
        return found
    path = state_dir / CREDENTIALS_FILE
    if path.exists():
        return _read(path)
    generated = BasicCredentials(GENERATED_USERNAME, secrets.token_urlsafe(32))
    _write(path, generated)
    return generated


def use_for_mlflow_client(credentials: BasicCredentials) -> None:
    """Make this process's MLflow client send `credentials` (MLflow reads them per request)."""
    os.environ[USERNAME_VARIABLE] = credentials.username
    os.environ[PASSWORD_VARIABLE] = credentials.password


@contextlib.contextmanager
def kept_from_children() -> Iterator[None]:
    """Inside the block, the MLflow client's credentials are out of the environment, so that
    servers started there (Triton) do not inherit them; restored afterwards."""
    saved = {name: os.environ.pop(name, None) for name in (USERNAME_VARIABLE, PASSWORD_VARIABLE)}
    try:
        yield
    finally:
        os.environ.update({name: value for name, value in saved.items() if value is not None})


def _read(path: Path) -> BasicCredentials:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise CredentialsError(
            f"{path}: readable by others (mode {mode:o}); `chmod 600 {path}`, and change the "
            "password if someone else may have read it"
        )
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        return BasicCredentials(str(document["username"]), str(document["password"]))
    except (ValueError, KeyError, TypeError) as error:
        raise CredentialsError(
            f"{path}: not a gpufleet credentials file ({type(error).__name__}); remove it and "
            "the stack's MLflow user database (mlflow/basic_auth.db) to start afresh"
        ) from None


def _write(path: Path, credentials: BasicCredentials) -> None:
    """Create the file 0600 from the start (never briefly readable by others), then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    document = {"username": credentials.username, "password": credentials.password}
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            json.dump(document, stream)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
