"""The rebuild's parts that need no host: host key fingerprints and known_hosts edits (with the
real ssh-keygen), the registry comparison, a damaged backup found on resume, bad input.

Real: ssh-keygen (keys, hashed known_hosts, fingerprints), the gpufleet CLI in a process, files.
Not here: hosts, MLflow (tests/test_rebuild.py rebuilds a real site).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpufleet.rebuild.backup import BackupError, open_backup
from gpufleet.rebuild.host_key import HostKey, HostKeyError, accept_host_key, known_keys
from gpufleet.rebuild.registry_snapshot import compare_snapshots
from tests.conftest import PROJECT_ROOT


def make_key(directory: Path, name: str) -> tuple[HostKey, str]:
    path = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    kind, key = path.with_suffix(".pub").read_text().split()[:2]
    printed = subprocess.run(
        ["ssh-keygen", "-lf", str(path.with_suffix(".pub"))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[1]
    return HostKey(kind, key), printed


def test_fingerprints_are_the_ones_ssh_keygen_prints(tmp_path: Path) -> None:
    key, printed = make_key(tmp_path, "a")
    assert key.fingerprint == printed


def test_only_the_vouched_key_replaces_the_hosts_entries_plain_or_hashed(tmp_path: Path) -> None:
    old, _ = make_key(tmp_path, "old")
    other, _ = make_key(tmp_path, "other")
    new, new_fingerprint = make_key(tmp_path, "new")
    rogue, _ = make_key(tmp_path, "rogue")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(
        f"[192.0.2.5]:2222 {old.kind} {old.key}\n192.0.2.6 {other.kind} {other.key}\n"
    )
    subprocess.run(["ssh-keygen", "-H", "-f", str(known_hosts)], capture_output=True, check=True)
    assert "192.0.2.5" not in known_hosts.read_text(), "hashed"
    assert known_keys(known_hosts, "192.0.2.5", 2222) == [old]
    with pytest.raises(HostKeyError, match="do not go on"):
        accept_host_key(known_hosts, "192.0.2.5", 2222, [rogue], new_fingerprint)
    assert known_keys(known_hosts, "192.0.2.5", 2222) == [old], "nothing changed"
    accepted = accept_host_key(known_hosts, "192.0.2.5", 2222, [rogue, new], new_fingerprint)
    assert accepted == new
    assert known_keys(known_hosts, "192.0.2.5", 2222) == [new]
    assert known_keys(known_hosts, "192.0.2.6", 22) == [other], "other hosts kept"
    assert (tmp_path / "known_hosts.old").exists()


def test_the_registry_comparison_names_every_differing_field() -> None:
    before = {
        "models": {
            "m": {
                "aliases": {"production": "2"},
                "tags": {},
                "versions": {"1": {"run_id": "r1", "artifact_sha256": {"a": "x"}}},
            }
        },
        "runs": {},
    }
    after = json.loads(json.dumps(before))
    assert compare_snapshots(before, after) == []
    after["models"]["m"]["aliases"]["production"] = "1"
    after["models"]["m"]["versions"]["1"]["artifact_sha256"]["a"] = "y"
    after["models"]["m"]["tags"]["new"] = "t"
    assert compare_snapshots(before, after) == [
        "models.m.aliases.production: '2' -> '1'",
        "models.m.tags: {} -> missing after the rebuild",
        "models.m.tags.new: not there before -> 't'",
        "models.m.versions.1.artifact_sha256.a: 'x' -> 'y'",
    ]


def test_a_backup_damaged_since_it_was_taken_is_refused(tmp_path: Path) -> None:
    (tmp_path / "registry-postgres.dump").write_bytes(b"PGDMP dump")
    digest = hashlib.sha256(b"PGDMP dump").hexdigest()
    manifest = {"id": "x", "files": {"registry-postgres.dump": {"sha256": digest, "bytes": 10}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert open_backup(tmp_path).id == "x"
    (tmp_path / "registry-postgres.dump").write_bytes(b"PGDMP dumq")
    with pytest.raises(BackupError, match="no longer matches its sha256"):
        open_backup(tmp_path)


@pytest.mark.parametrize(
    ("stack", "host", "message"),
    [
        ("lab", "nope", "stack 'lab' has no host 'nope'"),
        ("local", "x", "stack 'local' is a local stack"),
    ],
)
def test_bad_input_exits_2_with_one_line(stack: str, host: str, message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gpufleet", "rebuild", "--stack", stack, "--host", host],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
