"""Pytest fixture with locally built stand-ins for the images the generated serving stack names.

The serving stack's docker-compose file names official images (``nvcr.io/nvidia/tritonserver``,
an MLflow image with Postgres support, ``postgres``, ``prom/prometheus``, ``grafana/grafana``)
that cannot be pulled here. This plugin builds six images that honour the same interface
(command line, environment variables, ports, paths, user), so that the same compose file runs
with either set:

==============  =====================================================================================
tritonserver    stands in for ``nvcr.io/nvidia/tritonserver:<ver>-py3``: ``tritonserver`` on PATH
                (a wrapper that adds ``--backend-directory=/opt/tritonserver/backends``), the python
                backend, user ``triton-server`` (uid/gid 1000, ``USER 1000``), ports 8000/8001/8002.
mlflow          stands in for ``ghcr.io/mlflow/mlflow`` plus psycopg2 and Flask-WTF (the basic-auth
                app): ``mlflow`` on PATH, user ``mlflow`` (uid/gid 1000), ``/mlflow/artifacts`` and
                ``/mlflow/auth`` writable by it, port 5000.
postgres        stands in for ``postgres:16``: the official entrypoint's contract (POSTGRES_USER,
                POSTGRES_PASSWORD[_FILE], POSTGRES_DB, POSTGRES_HOST_AUTH_METHOD,
                POSTGRES_INITDB_ARGS, PGDATA=/var/lib/postgresql/data, /docker-entrypoint-initdb.d),
                ``pg_isready`` on PATH, the server running as ``postgres`` (uid/gid 999), port 5432.
prometheus      stands in for ``prom/prometheus``: the same ENTRYPOINT and CMD, ``USER 65534``,
                ``/prometheus`` writable by nobody, ``promtool``, ``wget``, port 9090.
grafana         stands in for ``grafana/grafana``: ENTRYPOINT ``/run.sh``, ``USER 472`` (group 0),
                its state in SQLite at ``/var/lib/grafana/grafana.db`` (mount a volume there),
                ``GF_*`` variables (and ``GF_*__FILE``), the admin user from
                ``GF_SECURITY_ADMIN_PASSWORD`` at the first start, datasources and file-provisioned
                dashboards from ``/etc/grafana/provisioning``, ``wget``, port 3000 with
                ``/api/health`` and the dashboard, search, datasource and user API it needs.
gateway         stands in for the generated ``gpufleet/gateway-nginx`` (images/gateway/Dockerfile):
                Debian 12's nginx on PATH, bash, ``/var/lib/gpufleet-gateway`` and
                ``/var/log/gpufleet-gateway``, ports 8080/8081.
==============  =====================================================================================

What is real: the Docker engine (``docker_engine``), Debian 12 packages from deb.debian.org
(postgresql, prometheus, curl, wget, python3-yaml), the PyPI wheels (nvidia-pytriton 0.7.0,
mlflow 3.17.2, psycopg2-binary, Flask-WTF), and the very Triton binary that ``validation/tritonserver.py`` runs
outside containers. What differs from the official images: they are built here, FROM the Debian 12 host
image of ``tests.docker_hosts`` (so they also carry systemd and OpenSSH, unused); CPU only;
Triton is 2.51 from the pytriton wheel with only the python backend (no onnxruntime, pytorch or
tensorrt backends, no CUDA, no ``/opt/nvidia/nvidia_entrypoint.sh``); Postgres is Debian's 15,
not 16 (a data directory is not portable between them); Prometheus is Debian's 2.42 build,
which may lack the web UI's assets (the HTTP API and ``/-/ready`` are there).
Grafana is not Grafana at all: a Python stdlib HTTP server over SQLite
(``tests/data/grafana/grafana_server.py``) with a small part of its API, its tables and no UI;
what it honours is what gpufleet relies on (the rebuild copies ``grafana.db``; the compose file
sets its user, paths, variables, health check and provisioning).

Wheels are downloaded on the test machine with its own pip (its index, proxy and certificates)
for CPython 3.11 on manylinux x86_64, and installed inside the build with ``--no-index`` in a
first stage whose layers the final image does not keep. So no build needs PyPI from inside a
container, only apt needs deb.debian.org.

Each image's tag is ``gpufleet-test/<name>:<recipe hash>``; the hash covers its Dockerfile
(which holds the base image's tag and the pip requirements) and the files copied in. After a
build the image is saved to ``${XDG_CACHE_HOME:-~/.cache}/gpufleet/images/<name>-<hash>.tar.gz``
and later sessions ``docker load`` it from there instead of building. Register with
``pytest_plugins = ["tests.docker_hosts", "tests.serving_images"]``, then::

    def test_stack(docker_engine: DockerEngine, serving_images: ServingImages) -> None:
        docker_engine.docker("run", "-d", serving_images.prometheus)

PYTEST_DONT_REWRITE: this module asserts nothing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from generators.serving_stack.graph import GATEWAY_LOG_DIR, GATEWAY_WORK_DIR
from tests.docker_hosts import (
    DockerEngine,
    _file_lock,
    _require,
    _run_logged,
    _say,
    image_cache_dir,
)

IMAGE_PREFIX = "gpufleet-test"
_STAGE_LABEL = "gpufleet.test-build-stage"  # =<image name>: a build prunes its own stage only
_RECIPE_REVISION = 1  # bump when the build or save steps below change in a way the data does not

# Wheels for the images' Python (Debian 12: CPython 3.11, glibc 2.36), whatever the test machine.
_PIP_TARGET = (
    *("--only-binary=:all:", "--implementation", "cp", "--python-version", "3.11"),
    *("--abi", "cp311"),
    # pip does not widen a PEP 600 platform to older glibcs by itself: list them all.
    *(arg for y in range(36, 16, -1) for arg in ("--platform", f"manylinux_2_{y}_x86_64")),
    *("--platform", "manylinux2014_x86_64", "--platform", "manylinux1_x86_64"),
    *("--platform", "linux_x86_64"),
)
_APT = (
    "apt-get update"
    " && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {packages}"
    " && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb"
)


def _apt(*packages: str) -> str:
    return _APT.format(packages=" ".join(packages))


def _venv_stage(name: str, venv: str, requirements: tuple[str, ...]) -> str:
    """A first stage that installs `requirements` from wheels/ into `venv` (kept: the venv)."""
    pip = f"{venv}/bin/pip install --no-cache-dir --no-index --find-links=/tmp/wheels"
    return (
        "FROM {base} AS venv\n"
        f"LABEL {_STAGE_LABEL}={name}\n"  # the stage's dangling image is pruned after the build
        f"RUN {_apt('python3-venv')}\n"
        "COPY wheels/ /tmp/wheels/\n"
        f"RUN python3 -m venv {venv} && {pip} {shlex.join(requirements)}\n\n"
    )


@dataclass(frozen=True)
class ImageRecipe:
    """One image: its Dockerfile ({base} is the base image's tag) and the files copied in."""

    name: str
    dockerfile: str
    files: Mapping[str, str] = field(default_factory=dict)  # context path -> text (mode 0755)
    requirements: tuple[str, ...] = ()  # pip requirements downloaded into the context's wheels/
    build_note: str = "apt-get install, well under a minute"

    def dockerfile_text(self, base: str) -> str:
        return self.dockerfile.replace("{base}", base)

    def recipe_hash(self, base: str) -> str:
        recipe = {
            "dockerfile": self.dockerfile_text(base),
            "files": dict(self.files),
            "requirements": self.requirements,
            "pip_target": _PIP_TARGET if self.requirements else (),
            "revision": _RECIPE_REVISION,
        }
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]

    def tag(self, base: str) -> str:
        return f"{IMAGE_PREFIX}/{self.name}:{self.recipe_hash(base)}"


# --- Triton ------------------------------------------------------------------------------------

_TRITON_VENV = "/opt/tritonserver/venv"
_TRITON_PACKAGE = f"{_TRITON_VENV}/lib/python3.11/site-packages/pytriton/tritonserver"
_TRITON_LIBS = f"{_TRITON_VENV}/lib/python3.11/site-packages/nvidia_pytriton.libs"
_TRITON_WRAPPER = f"""\
#!/bin/sh
# tritonserver as in NVIDIA's image, from the nvidia-pytriton wheel: its bundled libraries, the
# venv's python3 first on PATH (the python backend stub imports numpy and the models' modules
# through it) and the python backend assembled in /opt/tritonserver/backends.
export LD_LIBRARY_PATH="{_TRITON_LIBS}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}"
export PATH="{_TRITON_VENV}/bin:$PATH"
exec {_TRITON_PACKAGE}/bin/tritonserver --backend-directory=/opt/tritonserver/backends "$@"
"""
_TRITON_BACKEND_FILES = (
    f"{_TRITON_PACKAGE}/backends/python/libtriton_python.so",
    f"{_TRITON_PACKAGE}/backends/python/triton_python_backend_utils.py",
    f"{_TRITON_PACKAGE}/python_backend_stubs/3.11/triton_python_backend_stub",
)
_TRITON_REQUIREMENTS = ("nvidia-pytriton==0.7.0", "numpy<2")


def _triton_dockerfile(name: str, requirements: tuple[str, ...]) -> str:
    return (
        _venv_stage(name, _TRITON_VENV, requirements)
        + "FROM {base}\n"
        + f"RUN {_apt('libpython3.11', 'curl')}\n"
        + f"COPY --from=venv {_TRITON_VENV} {_TRITON_VENV}\n"
        + "COPY tritonserver /usr/local/bin/tritonserver\n"
        + "RUN set -eu"
        + " && install -d /opt/tritonserver/backends/python /opt/tritonserver/bin"
        + f" && cp {' '.join(_TRITON_BACKEND_FILES)} /opt/tritonserver/backends/python/"
        + " && chmod 0755 /opt/tritonserver/backends/python/triton_python_backend_stub"
        + " && ln -s /usr/local/bin/tritonserver /opt/tritonserver/bin/tritonserver"
        + " && groupadd --gid 1000 triton-server"
        + " && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash triton-server"
        # Fail the build, not the first test, when a library the binaries need is missing.
        + f" && for binary in {_TRITON_PACKAGE}/bin/tritonserver"
        + " /opt/tritonserver/backends/python/triton_python_backend_stub"
        + " /opt/tritonserver/backends/python/libtriton_python.so; do"
        + f' if LD_LIBRARY_PATH={_TRITON_LIBS} ldd "$binary" | grep "not found"; then exit 1; fi;'
        + " done\n"
        + "ENV PATH=/opt/tritonserver/bin:$PATH\n"
        + "USER 1000\n"
        + "WORKDIR /\n"
        + "EXPOSE 8000 8001 8002\n"
        + "ENTRYPOINT []\n"
        + 'CMD ["/bin/bash"]\n'
    )


TRITON = ImageRecipe(
    name="tritonserver",
    requirements=_TRITON_REQUIREMENTS,
    build_note="pip install nvidia-pytriton, about 1 min",
    files={"tritonserver": _TRITON_WRAPPER},
    dockerfile=_triton_dockerfile("tritonserver", _TRITON_REQUIREMENTS),
)
# With torch (the CPU build on this machine's disk) for the python-backend models that the
# registry's versions are exported to (TorchScript run by torch in model.py), as a site would
# build its own Triton image for them. Used where a test serves registry models on hosts.
_TRITON_TORCH_REQUIREMENTS = (*_TRITON_REQUIREMENTS, "torch==2.13.0+cpu")
TRITON_TORCH = ImageRecipe(
    name="tritonserver-torch",
    requirements=_TRITON_TORCH_REQUIREMENTS,
    build_note="pip install nvidia-pytriton and torch, about 2 min",
    files={"tritonserver": _TRITON_WRAPPER},
    dockerfile=_triton_dockerfile("tritonserver-torch", _TRITON_TORCH_REQUIREMENTS),
)

# --- MLflow ------------------------------------------------------------------------------------

_MLFLOW_VENV = "/opt/mlflow/venv"
# Flask-WTF: MLflow's `auth` extra, which its basic-auth app (--app-name basic-auth) needs.
_MLFLOW_REQUIREMENTS = ("mlflow==3.17.2", "psycopg2-binary", "Flask-WTF==1.2.2")
MLFLOW = ImageRecipe(
    name="mlflow",
    requirements=_MLFLOW_REQUIREMENTS,
    build_note="pip install mlflow, about 2 min",
    dockerfile=_venv_stage("mlflow", _MLFLOW_VENV, _MLFLOW_REQUIREMENTS)
    + "FROM {base}\n"
    + f"RUN {_apt('curl')}\n"
    + f"COPY --from=venv {_MLFLOW_VENV} {_MLFLOW_VENV}\n"
    + "RUN groupadd --gid 1000 mlflow"
    + " && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash mlflow"
    + " && install -d -o 1000 -g 1000 /mlflow /mlflow/artifacts /mlflow/auth\n"
    + f"ENV PATH={_MLFLOW_VENV}/bin:$PATH\n"
    + "USER 1000\n"
    + "WORKDIR /mlflow\n"
    + "VOLUME /mlflow/artifacts\n"
    + "EXPOSE 5000\n"
    + "ENTRYPOINT []\n"
    + 'CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]\n',
)

# --- Postgres ----------------------------------------------------------------------------------

_PG_BIN = "/usr/lib/postgresql/15/bin"
# The official image's entrypoint contract (docker-library/postgres), for Debian's Postgres 15.
_POSTGRES_ENTRYPOINT = r"""#!/bin/bash
# Stands in for the official postgres image's docker-entrypoint.sh: initialise an empty PGDATA
# from POSTGRES_* variables, then run the server as the postgres user. Never set -x here: the
# password must not reach the logs.
set -Eeuo pipefail

# POSTGRES_PASSWORD_FILE etc.: the variable's value read from a file (docker secrets).
file_env() {
	local var="$1" file_var="${1}_FILE" default="${2:-}"
	if [ -n "${!var:-}" ] && [ -n "${!file_var:-}" ]; then
		echo >&2 "error: both $var and $file_var are set (but are exclusive)"
		exit 1
	fi
	local value="$default"
	if [ -n "${!var:-}" ]; then
		value="${!var}"
	elif [ -n "${!file_var:-}" ]; then
		value="$(< "${!file_var}")"
	fi
	export "$var"="$value"
	unset "$file_var"
}

if [ "${1:0:1}" = '-' ]; then
	set -- postgres "$@"
fi

if [ "$1" = 'postgres' ] && [ "$(id -u)" = '0' ]; then
	mkdir -p "$PGDATA"
	chown postgres:postgres "$PGDATA"
	chmod 700 "$PGDATA"
	install -d -o postgres -g postgres -m 3775 /var/run/postgresql
	exec setpriv --reuid=postgres --regid=postgres --init-groups "$BASH_SOURCE" "$@"
fi

if [ "$1" = 'postgres' ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
	file_env POSTGRES_PASSWORD
	file_env POSTGRES_USER postgres
	file_env POSTGRES_DB "$POSTGRES_USER"
	file_env POSTGRES_INITDB_ARGS
	auth="${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}"
	if [ -z "$POSTGRES_PASSWORD" ] && [ "$auth" != 'trust' ]; then
		echo >&2 'Error: Database is uninitialized and superuser password is not specified.'
		echo >&2 '  You must specify POSTGRES_PASSWORD to a non-empty value for the superuser,'
		echo >&2 '  or POSTGRES_HOST_AUTH_METHOD=trust to allow all connections without one.'
		exit 1
	fi
	mkdir -p "$PGDATA"
	chmod 700 "$PGDATA"
	run_initdb() {
		# shellcheck disable=SC2086
		initdb --username="$POSTGRES_USER" --auth-local=trust --auth-host="$auth" -D "$PGDATA" \
			"$@" $POSTGRES_INITDB_ARGS
	}
	if [ -n "$POSTGRES_PASSWORD" ]; then  # through a pipe: never on disk, nor on a command line
		run_initdb --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD")
	else
		run_initdb
	fi
	printf "\nlisten_addresses = '*'\n" >> "$PGDATA/postgresql.conf"
	printf 'host all all all %s\n' "$auth" >> "$PGDATA/pg_hba.conf"

	# A server on a private unix socket while the database is created and init scripts run:
	# neither clients nor `pg_isready` (the health check) see it before it is ready for them.
	export PGHOST=/tmp/postgres-init
	mkdir -p "$PGHOST"
	pg_ctl -D "$PGDATA" -w start \
		-o "-c listen_addresses='' -c unix_socket_directories=$PGHOST -p ${PGPORT:-5432}"
	psql=(psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --no-password --no-psqlrc)
	if [ "$POSTGRES_DB" != 'postgres' ]; then
		"${psql[@]}" --dbname postgres --set db="$POSTGRES_DB" <<-'EOSQL'
			CREATE DATABASE :"db" ;
		EOSQL
	fi
	for f in /docker-entrypoint-initdb.d/*; do
		case "$f" in
			*.sh) echo "running $f"; . "$f" ;;
			*.sql) echo "running $f"; "${psql[@]}" --dbname "$POSTGRES_DB" -f "$f" ;;
			*.sql.gz) echo "running $f"; gunzip -c "$f" | "${psql[@]}" --dbname "$POSTGRES_DB" ;;
			*) [ -e "$f" ] && echo "ignoring $f" ;;
		esac
	done
	pg_ctl -D "$PGDATA" -m fast -w stop
	unset POSTGRES_PASSWORD PGHOST
	echo 'PostgreSQL init process complete; ready for start up.'
fi

exec "$@"
"""
POSTGRES = ImageRecipe(
    name="postgres",
    files={"docker-entrypoint.sh": _POSTGRES_ENTRYPOINT},
    dockerfile="FROM {base}\n"
    # The official image's uid/gid, before the package makes a postgres user of its own.
    # (The host image's systemd-journal group, unused here, has gid 999: it moves aside.)
    + "RUN groupmod --gid 990 systemd-journal"
    + " && groupadd --system --gid 999 postgres"
    + " && useradd --system --uid 999 --gid 999 --home-dir /var/lib/postgresql"
    + " --shell /bin/bash postgres"
    + " && install -d -o postgres -g postgres /var/lib/postgresql"
    # No cluster of Debian's own (/var/lib/postgresql/15/main): the entrypoint makes PGDATA.
    + " && install -d /etc/postgresql-common/createcluster.d"
    + " && echo 'create_main_cluster = false'"
    + " > /etc/postgresql-common/createcluster.d/gpufleet.conf"
    + f" && {_apt('postgresql-15', 'postgresql-client-15')}"
    + " && install -d -o postgres -g postgres -m 3775 /var/run/postgresql\n"
    + "COPY docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh\n"
    # LANG: UTF8 databases (the official image has en_US.utf8; C.UTF-8 needs no locales package)
    + f"ENV PATH={_PG_BIN}:$PATH PGDATA=/var/lib/postgresql/data LANG=C.UTF-8\n"
    + "RUN install -d -o postgres -g postgres -m 700 /var/lib/postgresql/data\n"
    + "VOLUME /var/lib/postgresql/data\n"
    + "STOPSIGNAL SIGINT\n"
    + "EXPOSE 5432\n"
    + 'ENTRYPOINT ["docker-entrypoint.sh"]\n'
    + 'CMD ["postgres"]\n',
)

# --- Prometheus --------------------------------------------------------------------------------

# The official image's default configuration: Prometheus scrapes itself.
_PROMETHEUS_CONFIG = """\
global:
  scrape_interval: 15s
  evaluation_interval: 15s
scrape_configs:
  - job_name: prometheus
    static_configs:
      - targets: ["localhost:9090"]
"""
PROMETHEUS = ImageRecipe(
    name="prometheus",
    files={"prometheus.yml": _PROMETHEUS_CONFIG},
    dockerfile="FROM {base}\n"
    + f"RUN {_apt('prometheus', 'wget')}"
    + " && install -d -o 65534 -g 65534 /prometheus\n"
    + "COPY prometheus.yml /etc/prometheus/prometheus.yml\n"
    + "RUN chmod 0644 /etc/prometheus/prometheus.yml\n"
    + "USER 65534\n"
    + "WORKDIR /prometheus\n"
    + "VOLUME /prometheus\n"
    + "EXPOSE 9090\n"
    + 'ENTRYPOINT ["/usr/bin/prometheus"]\n'
    + 'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]\n',
)

# --- Grafana -----------------------------------------------------------------------------------

# The official image's entrypoint is /run.sh; here it starts the stand-in server, a Python
# stdlib HTTP server over SQLite (tests/data/grafana/grafana_server.py says what it honours).
_GRAFANA_RUN = """\
#!/bin/sh
# Stands in for grafana/grafana's /run.sh: the server as the image's user (472), configured by
# GF_* variables (GF_<SECTION>_<KEY>, or GF_<SECTION>_<KEY>__FILE naming a file with the value).
exec python3 /usr/share/grafana/bin/grafana_server.py "$@"
"""
_GRAFANA_SERVER = (Path(__file__).parent / "data" / "grafana" / "grafana_server.py").read_text()
GRAFANA = ImageRecipe(
    name="grafana",
    files={"run.sh": _GRAFANA_RUN, "grafana_server.py": _GRAFANA_SERVER},
    dockerfile="FROM {base}\n"
    + f"RUN {_apt('python3-yaml', 'wget')}"
    # The official image's user: grafana, uid 472, group root (gid 0).
    + " && useradd --system --uid 472 --gid 0 --home-dir /usr/share/grafana --no-create-home"
    + " --shell /bin/false grafana"
    + " && install -d -o 472 -g 0 /var/lib/grafana /var/lib/grafana/plugins /var/log/grafana"
    + " /etc/grafana /usr/share/grafana /usr/share/grafana/bin"
    + " && install -d -o 472 -g 0 /etc/grafana/provisioning/datasources"
    + " /etc/grafana/provisioning/dashboards /etc/grafana/provisioning/plugins"
    + " /etc/grafana/provisioning/alerting\n"
    + "COPY run.sh /run.sh\n"
    + "COPY grafana_server.py /usr/share/grafana/bin/grafana_server.py\n"
    + "ENV GF_PATHS_CONFIG=/etc/grafana/grafana.ini GF_PATHS_DATA=/var/lib/grafana"
    + " GF_PATHS_HOME=/usr/share/grafana GF_PATHS_LOGS=/var/log/grafana"
    + " GF_PATHS_PLUGINS=/var/lib/grafana/plugins GF_PATHS_PROVISIONING=/etc/grafana/provisioning\n"
    + "WORKDIR /usr/share/grafana\n"
    + "USER 472\n"
    + "EXPOSE 3000\n"
    + 'ENTRYPOINT ["/run.sh"]\n',
)

# --- Gateway -----------------------------------------------------------------------------------

# What the generated stack's gateway service expects (generators/serving_stack/graph.py): `nginx`
# on PATH (the command names the configuration), bash for the health check, and the working
# and log directories. The generated Dockerfile (images/gateway/) builds the same on a host
# that reaches Debian's archive; test hosts reach none, so this one ships as an archive.
GATEWAY = ImageRecipe(
    name="gateway",
    dockerfile="FROM {base}\n"
    + f"RUN {_apt('nginx')}"
    + f" && mkdir -p {GATEWAY_WORK_DIR} {GATEWAY_LOG_DIR}\n"
    + "EXPOSE 8080 8081\n"
    + "ENTRYPOINT []\n"
    + 'CMD ["nginx", "-g", "daemon off;"]\n',
)

RECIPES = (TRITON, MLFLOW, POSTGRES, PROMETHEUS, GRAFANA, GATEWAY)


# --- Build, save, load -------------------------------------------------------------------------


def _docker_argv(engine: DockerEngine, *args: str) -> list[str]:
    """A docker command line for `engine` that needs no environment (for _run_logged)."""
    # DOCKER_BUILDKIT=0: the classic builder, also with a CLI that would default to buildx.
    env = [_require("env", "coreutils"), "DOCKER_BUILDKIT=0"]
    return [*env, _require("docker", "docker.io"), "--host", engine.docker_host, *args]


def _download_wheels(requirements: tuple[str, ...], directory: Path, log: Path) -> None:
    """pip download on this machine, with its index, proxy and certificates (the build has no
    PyPI of its own: pip in a container would not trust a TLS-intercepting proxy's CA)."""
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(directory)]
    argv = [*pip, *_PIP_TARGET, *requirements]
    _run_logged(argv, log, timeout=1200)


def _build(engine: DockerEngine, recipe: ImageRecipe, base: str, tag: str, log: Path) -> None:
    context = Path(tempfile.mkdtemp(prefix=f"gpufleet-{recipe.name}-image-"))
    try:
        (context / "Dockerfile").write_text(recipe.dockerfile_text(base))
        for relative, text in recipe.files.items():
            path = context / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            path.chmod(0o755)
        if recipe.requirements:
            (context / "wheels").mkdir()
            _download_wheels(recipe.requirements, context / "wheels", log)
        build = ["build", "--rm", "--force-rm", "--tag", tag, str(context)]
        _run_logged(_docker_argv(engine, *build), log, timeout=1800)
    finally:
        # The first stage's image (the wheels and the venv) is of no use once the build is over.
        stage = f"label={_STAGE_LABEL}={recipe.name}"
        engine.docker("image", "prune", "--force", "--filter", stage, check=False)
        shutil.rmtree(context, ignore_errors=True)


def _save(engine: DockerEngine, tag: str, tarball: Path) -> None:
    """docker save | gzip -1 into `tarball`, atomically (a partial file renamed at the end)."""
    partial = tarball.with_name(f".{tarball.name}.{os.getpid()}.partial")
    try:
        with partial.open("wb") as out:
            save = subprocess.Popen(_docker_argv(engine, "save", tag), stdout=subprocess.PIPE)
            assert save.stdout is not None
            gzip = subprocess.run(["gzip", "-1"], stdin=save.stdout, stdout=out, check=False)
            save.stdout.close()
            if save.wait(timeout=600) != 0 or gzip.returncode != 0:
                raise RuntimeError(f"docker save {tag} | gzip -1 > {partial} failed")
        partial.rename(tarball)
    finally:
        partial.unlink(missing_ok=True)


def _has_image(engine: DockerEngine, tag: str) -> bool:
    return engine.docker("image", "inspect", tag, check=False).returncode == 0


def ensure_image(
    engine: DockerEngine, recipe: ImageRecipe, base: str, say: Callable[[str], None]
) -> str:
    """The tag of `recipe`'s image in `engine`: already there, loaded from the cache, or built
    (and then saved to the cache)."""
    tag = recipe.tag(base)
    if _has_image(engine, tag):
        return tag
    cache = image_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"{recipe.name}-{recipe.recipe_hash(base)}.tar.gz"
    waiting = f"waiting for another session that builds {tarball.name} ..."
    with _file_lock(cache / f".{tarball.name}.lock", lambda: say(waiting)):
        if _has_image(engine, tag):  # the other session built it into this engine
            return tag
        started = time.monotonic()
        if tarball.exists():
            say(f"loading {tag} from {tarball} ...")
            load = ["load", "--quiet", "--input", str(tarball)]
            engine.docker(*load, timeout=900)
            say(f"loaded {tag} in {time.monotonic() - started:.0f} s")
        else:
            log = tarball.with_name(f"{tarball.name}.build.log")
            log.write_text("")
            say(f"building {tag} ({recipe.build_note}, cached afterwards in {tarball}) ...")
            _build(engine, recipe, base, tag, log)
            built = time.monotonic() - started
            _save(engine, tag, tarball)
            size = tarball.stat().st_size / 2**20
            say(f"built {tag} in {built:.0f} s, saved ({size:.0f} MiB) to {tarball}")
    if not _has_image(engine, tag):
        raise RuntimeError(f"{tag} is not in the engine after loading {tarball}")
    return tag


@dataclass(frozen=True)
class ServingImages:
    """Tags of the six stand-in images, all present in the session's engine."""

    tritonserver: str
    mlflow: str
    postgres: str
    prometheus: str
    grafana: str
    gateway: str


def ensure_serving_images(
    engine: DockerEngine, base: str, say: Callable[[str], None]
) -> ServingImages:
    """Every stand-in image, one after another (each build uses both cores)."""
    tags = {recipe.name: ensure_image(engine, recipe, base, say) for recipe in RECIPES}
    return ServingImages(**tags)


@pytest.fixture(scope="session")
def serving_images(
    request: pytest.FixtureRequest, docker_engine: DockerEngine, debian_host_image: str
) -> ServingImages:
    """The stand-in images' tags, built or loaded into the engine when it lacks them."""
    say = functools.partial(_say, request.config)
    return ensure_serving_images(docker_engine, debian_host_image, say)
