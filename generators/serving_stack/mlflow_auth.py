"""MLflow's basic-auth configuration for the registry host's stack (`mlflow/basic_auth.ini`).

MLflow reads it through MLFLOW_AUTH_CONFIG_PATH. It holds no secret: the admin password
(MLFLOW_AUTH_ADMIN_PASSWORD) and the app's secret key come from the mlflow service's env file,
and the user store is SQLite on the `mlflow-auth` volume, so its URI carries no password.

    files = render_mlflow_auth_files(spec.serving, header)  # {"basic_auth.ini": "..."}
"""

from __future__ import annotations

import configparser
import io

from generators.serving_stack.graph import MLFLOW_AUTH_CONFIG, MLFLOW_AUTH_DB_DIR
from gpufleet.spec.serving import ServingSpec

AUTH_FILE = MLFLOW_AUTH_CONFIG.rsplit("/", 1)[-1]


def render_mlflow_auth_files(serving: ServingSpec, header: str) -> dict[str, str]:
    """Path (relative to the stack's mlflow/ directory) -> content."""
    config = configparser.ConfigParser(interpolation=None)
    config["mlflow"] = {
        # Every user the admin creates may read every experiment and model: what the model
        # repository's fill step needs. Writing needs a grant (or the admin).
        "default_permission": "READ",
        "database_uri": f"sqlite:///{MLFLOW_AUTH_DB_DIR}/basic_auth.db",
        "admin_username": serving.mlflow.admin_user,
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
        "grant_default_workspace_access": "false",
    }
    text = io.StringIO()
    config.write(text)
    return {AUTH_FILE: header + text.getvalue().rstrip("\n") + "\n"}
