"""Back up what only a host holds into the stack's state directory, with sha256 checksums
verified after writing; never overwrite a backup.

A backup is a directory `<state_dir>/backups/<host>/<id>/` (id: the UTC time it was started):

    registry-postgres.dump   pg_dump -Fc of MLflow's database, run inside the Postgres container
    registry-artifacts.tar   MLflow's artifacts volume, as tar
    mlflow-auth.tar          MLflow's user store (basic auth)
    registry-before.json     the registry read through MLflow: what the rebuild must give back
    grafana.db               Grafana's database (when the host runs Grafana)
    prometheus.tar           Prometheus' time series (only with --keep-prometheus)
    manifest.json            every file's sha256 and size, and how it was verified

It is written into `<id>.partial/` and renamed only once every file is verified: the dump read
back by `pg_restore --list` in the container, each artifact's sha256 inside the tar equal to
the host's, every file's sha256 on disk equal to that of the bytes the host sent. A backup that
fails leaves nothing behind and raises BackupError.

    backup = take_backup(environment, "gpu-a", holdings, keep_prometheus=False, say=print)
    backup = open_backup(directory)           # a backup taken before, its checksums checked again
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import shutil
import sqlite3
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from generators.model_repository import write_atomically
from generators.serving_stack.graph import POSTGRES_DB, POSTGRES_USER
from gpufleet.lifecycle.environment import Environment
from gpufleet.rebuild.holdings import Holdings, compose_project, container_of
from gpufleet.rebuild.registry_snapshot import Snapshot, counts, snapshot_registry
from gpufleet.rebuild.remote import HostShell, RemoteError
from gpufleet.registry.client import RegistryError

Say = Callable[[str], None]
MANIFEST = "manifest.json"
SNAPSHOT = "registry-before.json"
POSTGRES_DUMP = "registry-postgres.dump"
ARTIFACTS_TAR = "registry-artifacts.tar"
AUTH_TAR = "mlflow-auth.tar"
GRAFANA_DB = "grafana.db"
PROMETHEUS_TAR = "prometheus.tar"
ARTIFACTS_DIR, AUTH_DIR = "/mlflow/artifacts", "/mlflow/auth"
GRAFANA_DB_PATH, PROMETHEUS_DIR = "/var/lib/grafana/grafana.db", "/prometheus"
# Tables a dump of MLflow's database must hold for the registry to come back.
REGISTRY_TABLES = ("registered_models", "model_versions", "registered_model_aliases", "runs")


class BackupError(Exception):
    """The backup could not be taken or verified (exit 2 unless --accept-data-loss)."""


@dataclasses.dataclass(frozen=True)
class Backup:
    """A verified backup on this machine."""

    directory: Path
    manifest: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.manifest["id"])

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        files: dict[str, dict[str, Any]] = self.manifest["files"]
        return files

    def path(self, name: str) -> Path | None:
        return self.directory / name if name in self.files else None

    def snapshot(self) -> Snapshot | None:
        path = self.path(SNAPSHOT)
        if path is None:
            return None
        loaded: Snapshot = json.loads(path.read_text(encoding="utf-8"))
        return loaded

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "directory": str(self.directory), "files": self.files}


def backups_dir(environment: Environment, host: str) -> Path:
    return environment.state_dir / "backups" / host


def take_backup(
    environment: Environment,
    host: str,
    holdings: Holdings,
    *,
    keep_prometheus: bool,
    say: Say,
) -> Backup:
    """Back up what `host` alone holds; the verified Backup, or BackupError (nothing left)."""
    base = backups_dir(environment, host)
    backup_id = _new_id(base)
    partial = base / f"{backup_id}.partial"
    try:
        partial.mkdir(parents=True)
        files = _write_files(environment, host, holdings, partial, keep_prometheus, say)
        manifest = {
            "id": backup_id,
            "stack": environment.name,
            "host": host,
            "address": environment.host(host).address,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "holdings": holdings.listed(),
            "files": files,
        }
        write_atomically(partial / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        final = base / backup_id
        partial.rename(final)
    except (RemoteError, RegistryError, OSError, BackupError) as error:
        shutil.rmtree(partial, ignore_errors=True)
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        where = f" ({error.filename})" if isinstance(error, OSError) and error.filename else ""
        raise BackupError(f"backup of {host} failed: {reason}{where}") from None
    say(f"  backup {backup_id} verified in {final}")
    return Backup(final, manifest)


def open_backup(directory: Path) -> Backup:
    """A backup taken before, every file's sha256 checked again; BackupError when one differs."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise BackupError(f"backup {directory} has no readable {MANIFEST}: {error}") from None
    for name, entry in manifest["files"].items():
        try:
            digest, size = _hash_file(directory / name)
        except OSError as error:
            raise BackupError(f"backup {directory}: {name}: {error.strerror}") from None
        if digest != entry["sha256"] or size != entry["bytes"]:
            raise BackupError(
                f"backup {directory}: {name} no longer matches its sha256 (the backup is damaged; "
                "restore it by hand from a copy, see docs/rebuild.md)"
            )
    return Backup(directory, manifest)


def _new_id(base: Path) -> str:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    candidate, number = stamp, 1
    while (base / candidate).exists() or (base / f"{candidate}.partial").exists():
        number += 1
        candidate = f"{stamp}-{number}"
    return candidate


def _write_files(
    environment: Environment,
    host: str,
    holdings: Holdings,
    directory: Path,
    keep_prometheus: bool,
    say: Say,
) -> dict[str, dict[str, Any]]:
    files: dict[str, dict[str, Any]] = {}
    needs_host = holdings.registry or holdings.grafana or (holdings.prometheus and keep_prometheus)
    if not needs_host:
        say(f"  {host} holds nothing that lives nowhere else")
        return files
    shell = HostShell.for_host(environment, host)
    project = compose_project(environment)
    if holdings.registry:
        say("  reading the registry (models, versions, aliases, tags, runs, artifact sha256)")
        snapshot = snapshot_registry(environment.registry())
        text = json.dumps(snapshot, indent=2, sort_keys=True) + "\n"
        (directory / SNAPSHOT).write_text(text, encoding="utf-8")
        files[SNAPSHOT] = _entry(directory / SNAPSHOT, _digest(text.encode()), "read back")
        say(f"  registry: {counts(snapshot)}")
        files[POSTGRES_DUMP] = _dump_postgres(shell, project, directory, say)
        files[ARTIFACTS_TAR] = _tar_volume(
            shell, project, "mlflow", ARTIFACTS_DIR, directory / ARTIFACTS_TAR, say
        )
        files[AUTH_TAR] = _tar_volume(shell, project, "mlflow", AUTH_DIR, directory / AUTH_TAR, say)
    if holdings.grafana:
        files[GRAFANA_DB] = _copy_grafana(shell, project, directory / GRAFANA_DB, say)
    if holdings.prometheus and keep_prometheus:
        files[PROMETHEUS_TAR] = _tar_prometheus(shell, project, directory / PROMETHEUS_TAR, say)
    return files


def _dump_postgres(shell: HostShell, project: str, directory: Path, say: Say) -> dict[str, Any]:
    postgres = container_of(shell, project, "postgres")
    path = directory / POSTGRES_DUMP
    say(f"  pg_dump of {POSTGRES_DB} in {shell.name}'s Postgres container")
    sent = shell.stream_to_file(
        f"docker exec {postgres} pg_dump -U {POSTGRES_USER} -d {POSTGRES_DB} --format=custom", path
    )
    entry = _verified_copy(path, sent)
    listing = shell.stream_from_file(f"docker exec -i {postgres} pg_restore --list", path)
    missing = [table for table in REGISTRY_TABLES if f"TABLE DATA public {table} " not in listing]
    if missing:
        raise BackupError(
            f"the dump of {shell.name}'s registry lacks the data of table(s) {', '.join(missing)}"
        )
    entry["verified"] += "; pg_restore --list reads it, registry tables present"
    return entry


def _tar_volume(
    shell: HostShell, project: str, service: str, source: str, path: Path, say: Say
) -> dict[str, Any]:
    container = container_of(shell, project, service)
    say(f"  {source} of {shell.name}'s {service} container as {path.name}")
    return _tar_verified(shell, f"docker exec {container}", source, path)


def _tar_prometheus(shell: HostShell, project: str, path: Path, say: Say) -> dict[str, Any]:
    """Prometheus' TSDB as tar, read while Prometheus is stopped: a running one writes its WAL
    at every scrape and rule evaluation, so no copy of it would match its own checksums. It
    is stopped (its WAL flushed and closed), read through a throwaway container of its image
    with its volumes, and started again whatever happens."""
    prometheus = container_of(shell, project, "prometheus")
    say(f"  stopping {shell.name}'s Prometheus to read {PROMETHEUS_DIR} as {path.name}")
    shell.run(f"docker stop --time 60 {prometheus}", timeout=120)
    try:
        entry = _tar_verified(shell, stopped_volumes(shell, prometheus), PROMETHEUS_DIR, path)
    finally:
        shell.run(f"docker start {prometheus}", timeout=120)
    say(f"  {shell.name}'s Prometheus started again")
    return entry


def stopped_volumes(shell: HostShell, container: str, *, stdin: bool = False) -> str:
    """The prefix of a command run in a throwaway container of `container`'s image with its
    volumes (for a container that is stopped: `docker exec` needs a running one)."""
    image = shell.run(f"docker inspect --format '{{{{.Image}}}}' {container}", timeout=60)
    interactive = " --interactive" if stdin else ""
    return (
        f"docker run --rm{interactive} --network none --volumes-from {container} "
        f"--entrypoint '' {image.stdout.strip()}"
    )


def volume_hashes(shell: HostShell, prefix: str, source: str) -> dict[str, str]:
    """Every file under `source` (run with `prefix`), by its path relative to it: its sha256."""
    listing = shell.run(
        f"{prefix} sh -c 'cd {source} && find . -type f -exec sha256sum {{}} +'", timeout=600
    ).stdout
    hashes = {}
    for line in listing.splitlines():
        digest, _, name = line.partition("  ")
        hashes[name.removeprefix("./")] = digest
    return hashes


def _tar_verified(shell: HostShell, prefix: str, source: str, path: Path) -> dict[str, Any]:
    """`source` as tar into `path`, each file in it with the sha256 the host computed for it."""
    expected = volume_hashes(shell, prefix, source)
    sent = shell.stream_to_file(f"{prefix} tar -C {source} -cf - .", path)
    entry = _verified_copy(path, sent)
    found = tar_hashes(path)
    if found != expected:
        differing = sorted(set(found.items()) ^ set(expected.items()))
        raise BackupError(
            f"{path.name}: the tar does not hold what {shell.name} has in {source} "
            f"(first difference: {differing[0][0]}); was something writing to it?"
        )
    entry["verified"] += f"; {len(found)} file(s) in the tar match the host's sha256"
    return entry


def _copy_grafana(shell: HostShell, project: str, path: Path, say: Say) -> dict[str, Any]:
    grafana = container_of(shell, project, "grafana")
    say(f"  Grafana's database from {shell.name}")
    sent = shell.stream_to_file(f"docker exec {grafana} cat {GRAFANA_DB_PATH}", path)
    entry = _verified_copy(path, sent)
    result = _sqlite_integrity(path)
    if result != "ok":
        raise BackupError(
            f"{path.name} from {shell.name}'s Grafana ({GRAFANA_DB_PATH}) is not a sound SQLite "
            f"database: {result}"
        )
    entry["verified"] += "; SQLite integrity_check ok"
    return entry


def _sqlite_integrity(path: Path) -> str:
    """SQLite's integrity check of the file ("ok"), or what SQLite says is wrong with it (a file
    that is not a database at all is refused here too, not raised past the backup)."""
    try:
        database = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = database.execute("PRAGMA integrity_check").fetchall()
        finally:
            database.close()
    except sqlite3.Error as error:
        return str(error)
    return "; ".join(str(row[0]) for row in rows[:3]) or "no answer"


def _verified_copy(path: Path, sent: tuple[str, int]) -> dict[str, Any]:
    """The file read back from disk: its sha256 and size equal to what the host sent."""
    digest, size = _hash_file(path)
    if (digest, size) != sent:
        raise BackupError(
            f"{path.name}: {size} bytes on disk with sha256 {digest[:12]}..., but the host sent "
            f"{sent[1]} bytes with {sent[0][:12]}...; the disk did not keep what was written"
        )
    if size == 0:
        raise BackupError(f"{path.name}: the host sent nothing")
    return _entry(path, (digest, size), "sha256 read back equals the bytes received")


def _entry(path: Path, hashed: tuple[str, int], verified: str) -> dict[str, Any]:
    return {"sha256": hashed[0], "bytes": hashed[1], "verified": verified}


def _digest(data: bytes) -> tuple[str, int]:
    return hashlib.sha256(data).hexdigest(), len(data)


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def tar_hashes(path: Path) -> dict[str, str]:
    hashes = {}
    try:
        with tarfile.open(path) as archive:
            for member in archive:
                if not member.isfile():
                    continue
                extracted = archive.extractfile(member)
                assert extracted is not None
                digest = hashlib.sha256()
                while chunk := extracted.read(1 << 20):
                    digest.update(chunk)
                hashes[member.name.removeprefix("./")] = digest.hexdigest()
    except tarfile.TarError as error:
        raise BackupError(f"{path.name} is not a readable tar: {error}") from None
    return hashes
