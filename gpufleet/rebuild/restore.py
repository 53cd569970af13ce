"""Restore a backup into a host's freshly deployed serving stack.

The registry: MLflow's artifacts and user store untarred into its volumes through its running
container, then MLflow stopped, the dump restored into the new Postgres with
`pg_restore --clean --if-exists --single-transaction` (all or nothing), and MLflow started
again and waited for. Grafana's database is staged in its volume, its sha256 checked against the
backup's, moved over the live one and Grafana restarted. Prometheus' history, when it was kept,
replaces the new Prometheus' (stopped meanwhile), every file's sha256 checked.

    restored = restore_backup(environment, "gpu-a", backup, say=print)   # names restored
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from generators.serving_stack.graph import POSTGRES_DB, POSTGRES_USER
from gpufleet.lifecycle.environment import Environment
from gpufleet.rebuild.backup import (
    ARTIFACTS_DIR,
    ARTIFACTS_TAR,
    AUTH_DIR,
    AUTH_TAR,
    GRAFANA_DB,
    GRAFANA_DB_PATH,
    POSTGRES_DUMP,
    PROMETHEUS_DIR,
    PROMETHEUS_TAR,
    Backup,
    stopped_volumes,
    tar_hashes,
    volume_hashes,
)
from gpufleet.rebuild.holdings import compose_project, container_of
from gpufleet.rebuild.remote import HostShell, RemoteError

Say = Callable[[str], None]
HEALTH_PROBE = (
    'python3 -c "import urllib.request; '
    "urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)\""
)


def restore_backup(environment: Environment, host: str, backup: Backup, *, say: Say) -> list[str]:
    """Put every file of `backup` back on `host`; the names restored. Raises RemoteError."""
    shell = HostShell.for_host(environment, host)
    project = compose_project(environment)
    restored: list[str] = []
    dump = backup.path(POSTGRES_DUMP)
    if dump is not None:
        _restore_registry(shell, project, backup, dump, say)
        restored += [POSTGRES_DUMP, ARTIFACTS_TAR, AUTH_TAR]
    grafana_db = backup.path(GRAFANA_DB)
    if grafana_db is not None:
        _restore_grafana(shell, project, grafana_db, backup.files[GRAFANA_DB]["sha256"], say)
        restored.append(GRAFANA_DB)
    prometheus_tar = backup.path(PROMETHEUS_TAR)
    if prometheus_tar is not None:
        _restore_prometheus(shell, project, prometheus_tar, say)
        restored.append(PROMETHEUS_TAR)
    return restored


def _restore_prometheus(shell: HostShell, project: str, path: Path, say: Say) -> None:
    """Prometheus stopped, its (new, nearly empty) TSDB emptied and the backup's untarred in its
    place through a throwaway container of its image, every file's sha256 there checked
    against the tar's, then Prometheus started again: it replays the restored WAL. Untarring
    under a running Prometheus would mix its own WAL segments into the restored ones."""
    prometheus = container_of(shell, project, "prometheus")
    expected = tar_hashes(path)
    say(f"  stopping {shell.name}'s Prometheus to put its history back ({len(expected)} files)")
    shell.run(f"docker stop --time 60 {prometheus}", timeout=120)
    try:
        prefix = stopped_volumes(shell, prometheus)
        shell.run(
            f"{prefix} find {PROMETHEUS_DIR} -mindepth 1 -maxdepth 1 -exec rm -rf {{}} +",
            timeout=600,
        )
        shell.stream_from_file(
            f"{stopped_volumes(shell, prometheus, stdin=True)} tar -C {PROMETHEUS_DIR} -xf -", path
        )
        found = volume_hashes(shell, prefix, PROMETHEUS_DIR)
        if found != expected:
            differing = sorted(set(found.items()) ^ set(expected.items()))
            raise RemoteError(
                f"{shell.name}: {PROMETHEUS_DIR} does not hold what {path.name} holds after "
                f"untarring it (first difference: {differing[0][0]})"
            )
    finally:
        shell.run(f"docker start {prometheus}", timeout=120)


def _restore_grafana(shell: HostShell, project: str, path: Path, sha256: str, say: Say) -> None:
    """grafana.db staged beside the live one in Grafana's volume, its sha256 checked there, then
    moved over it (with the journal of the database it replaces) and Grafana restarted."""
    grafana = container_of(shell, project, "grafana")
    staged = f"{GRAFANA_DB_PATH}.restored"
    say(f"  Grafana's database back into {shell.name}")
    shell.stream_from_file(f"docker exec -i {grafana} sh -c 'cat > {staged}'", path)
    found = shell.run(f"docker exec {grafana} sha256sum {staged}", timeout=120).stdout.split()
    if found[:1] != [sha256]:
        shell.run(f"docker exec {grafana} rm -f {staged}", check=False, timeout=60)
        raise RemoteError(
            f"{shell.name}: {staged} has sha256 {(found or ['nothing'])[0][:12]}..., not the "
            f"backup's {sha256[:12]}...; Grafana's database was left as it was"
        )
    # A journal or WAL beside the path belongs to the database being replaced: SQLite would
    # replay it into the restored one.
    journals = " ".join(f"{GRAFANA_DB_PATH}{suffix}" for suffix in ("-journal", "-wal", "-shm"))
    shell.run(f"docker exec {grafana} sh -c 'rm -f {journals} && mv -f {staged} {GRAFANA_DB_PATH}'")
    shell.run(f"docker restart {grafana}")


def _restore_registry(shell: HostShell, project: str, backup: Backup, dump: Path, say: Say) -> None:
    mlflow = container_of(shell, project, "mlflow")
    postgres = container_of(shell, project, "postgres")
    for name, target in ((ARTIFACTS_TAR, ARTIFACTS_DIR), (AUTH_TAR, AUTH_DIR)):
        archive = backup.path(name)
        if archive is None:
            raise RemoteError(f"backup {backup.id} has a database dump but no {name}")
        say(f"  {name} into {shell.name}'s {target}")
        shell.stream_from_file(f"docker exec -i {mlflow} tar -C {target} -xf -", archive)
    say(f"  stopping MLflow, restoring {POSTGRES_DB} with pg_restore in one transaction")
    shell.run(f"docker stop --time 20 {mlflow}")
    try:
        shell.stream_from_file(
            f"docker exec -i {postgres} pg_restore -U {POSTGRES_USER} -d {POSTGRES_DB} "
            "--clean --if-exists --no-owner --single-transaction --exit-on-error",
            dump,
        )
    finally:
        shell.run(f"docker start {mlflow}")
    _wait_for_mlflow(shell, mlflow)
    say(f"  MLflow on {shell.name} answers again with the restored registry")


def _wait_for_mlflow(shell: HostShell, mlflow: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        probe = shell.run(f"docker exec {mlflow} {HEALTH_PROBE}", check=False, timeout=60)
        if probe.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RemoteError(
                f"{shell.name}: MLflow did not answer /health {timeout_s:.0f} s after the restore"
            )
        time.sleep(2)
