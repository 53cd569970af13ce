"""The serving stack's env files: each service's secrets as `VAR=value` text, from the
environment of the machine that runs `gpufleet configure`.

The text goes to the serving_stack role as a (0600, emptied after the run) extra var and is
written on the host as `<secrets_dir>/<service>.env`, on the hosts whose compose file names it
(Postgres's and MLflow's on the registry host only); it is never generated into the repository
or logged.

    texts = render_env_files(spec.serving, os.environ, runs_registry=True)
    texts["postgres"]  # "POSTGRES_PASSWORD=..."
"""

from __future__ import annotations

import hashlib
import hmac
import urllib.parse
from collections.abc import Mapping

from generators.serving_stack.graph import POSTGRES_DB, POSTGRES_PORT, POSTGRES_USER
from gpufleet.spec.serving import ServingSpec

_COMPOSE_SPECIAL = frozenset("'\"\\$`")
MLFLOW_MIN_PASSWORD_LENGTH = 12  # mlflow.utils.validation._validate_password
_FLASK_KEY_LABEL = b"gpufleet: MLflow basic-auth app secret key"


class MissingSecretError(ValueError):
    """A secret's environment variable is unset, empty or not one line."""


def render_env_files(
    serving: ServingSpec, environ: Mapping[str, str], *, runs_registry: bool
) -> dict[str, str]:
    """Service name -> env file text (one `VAR=value` line each, no trailing newline).

    `runs_registry`: a host of the stack runs MLflow and Postgres (gpufleet:registry host);
    their secrets are read, and required, only then.
    """
    names = serving.secrets_env
    files: dict[str, str] = {}
    if runs_registry:
        files.update(_registry_env_files(serving, environ))
    if serving.triton.restricted_apis:
        key = _secret(environ, names.triton_admin_key, "Triton's admin key")
        files["triton"] = f"TRITON_ADMIN_KEY={key}"
    if serving.monitoring.grafana and serving.monitoring.prometheus:
        password = _secret(environ, names.grafana_admin_password, "Grafana's admin password")
        files["grafana"] = f"GF_SECURITY_ADMIN_PASSWORD={password}"
    return files


def _registry_env_files(serving: ServingSpec, environ: Mapping[str, str]) -> dict[str, str]:
    names = serving.secrets_env
    postgres_password = _secret(environ, names.postgres_password, "the Postgres password")
    store_uri = (
        # +psycopg2: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, which MLflow's
        # images do not carry.
        f"postgresql+psycopg2://{POSTGRES_USER}:{urllib.parse.quote(postgres_password, safe='')}"
        f"@postgres:{POSTGRES_PORT}/{POSTGRES_DB}"
    )
    admin_password = _secret(environ, names.mlflow_admin_password, "MLflow's admin password")
    if len(admin_password) < MLFLOW_MIN_PASSWORD_LENGTH:
        # MLflow refuses it at its first start, which would surface as a container that never
        # becomes healthy; say so before anything is deployed.
        raise MissingSecretError(
            f"{names.mlflow_admin_password} is shorter than {MLFLOW_MIN_PASSWORD_LENGTH} "
            "characters, which MLflow refuses for its admin user; choose a longer password"
        )
    # The basic-auth app signs its sessions and CSRF tokens with a key that must be the same in
    # every worker and across restarts: derived from the admin password, so there is no
    # fourth secret to keep, and it changes when that password does.
    flask_key = hmac.new(admin_password.encode(), _FLASK_KEY_LABEL, hashlib.sha256).hexdigest()
    mlflow_lines = (
        f"MLFLOW_BACKEND_STORE_URI={store_uri}",
        f"MLFLOW_AUTH_ADMIN_PASSWORD={admin_password}",
        f"MLFLOW_FLASK_SERVER_SECRET_KEY={flask_key}",
    )
    return {
        "postgres": f"POSTGRES_PASSWORD={postgres_password}",
        "mlflow": "\n".join(mlflow_lines),
    }


def _secret(environ: Mapping[str, str], variable: str, what: str) -> str:
    value = environ.get(variable, "")
    if not value:
        raise MissingSecretError(
            f"{variable} is not set: export {what} in it (serving.secrets_env names it)"
        )
    if "\n" in value or "\r" in value or "\0" in value:
        raise MissingSecretError(f"{variable} holds a line break; {what} must be one line")
    # Compose v1 takes env-file values as written; v2 strips quotes and expands $VARIABLES.
    if odd := sorted({char for char in value if char in _COMPOSE_SPECIAL or char.isspace()}):
        raise MissingSecretError(
            f"{variable} holds {' '.join(repr(char) for char in odd)}, which Compose v1 and "
            f"v2 read differently in an env file; choose {what} without quotes, backslashes, "
            "$, backticks or whitespace"
        )
    return value
