"""`gpufleet rebuild`: the steps in order, each printed as it starts and ends, under the
environment's lock; progress recorded so that the same command resumes after a failure.

    report = rebuild_host(environment, "gpu-a", RebuildOptions(), say=print)
    report.exit_code   # 0 green and the registry as before, 1 a gate failed or the registry
                       # differs, 2 could not run or waits for the operator
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from gpufleet.lifecycle.configure import configure
from gpufleet.lifecycle.deploy import deploy
from gpufleet.lifecycle.environment import Environment
from gpufleet.lifecycle.gate import gate
from gpufleet.lifecycle.lock import environment_lock
from gpufleet.lifecycle.outcome import StepOutcome
from gpufleet.lifecycle.outputs import with_addresses
from gpufleet.rebuild.backup import (
    PROMETHEUS_TAR,
    Backup,
    BackupError,
    backups_dir,
    open_backup,
    take_backup,
)
from gpufleet.rebuild.holdings import Holdings, compose_project, container_of, host_holdings
from gpufleet.rebuild.registry_snapshot import (
    compare_snapshots,
    counts,
    lineage_tag_additions,
    snapshot_registry,
)
from gpufleet.rebuild.remote import HostShell, RemoteError
from gpufleet.rebuild.replace import (
    AwaitingOperator,
    ReplaceError,
    operator_replaces,
    replace_machine,
    trust_host_key,
)
from gpufleet.rebuild.report import RebuildReport, StepRecord
from gpufleet.rebuild.restore import restore_backup
from gpufleet.rebuild.state import RebuildState
from gpufleet.registry.client import RegistryError

Say = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class RebuildOptions:
    accept_data_loss: bool = False
    keep_prometheus: bool = False
    host_key_fingerprint: str | None = None
    proxmox_timing: Any = None  # the Proxmox provider's timing (tests pass a fast one)


class _Stop(Exception):
    """Ends the rebuild at the current step with its status and reasons."""

    def __init__(self, status: str, reasons: list[str], details: dict[str, Any] | None = None):
        super().__init__("; ".join(reasons))
        self.status, self.reasons, self.details = status, reasons, details or {}


def rebuild_host(
    environment: Environment, host: str, options: RebuildOptions, *, say: Say
) -> RebuildReport:
    """Every step on `host`, stopping at the first that does not succeed; the report is written
    to `<state_dir>/reports/rebuild-<host>.json` whatever happens."""
    environment.host(host)  # LifecycleError for a host the stack lacks
    with environment_lock(environment.state_dir, environment.name, "rebuild"):
        state = RebuildState.open(environment, host)
        report = RebuildReport(environment.name, host, state.resumed)
        rebuild = _Rebuild(environment, host, options, state, report, say)
        try:
            rebuild.run()
        finally:
            report.write(environment.reports_dir)
    return report


class _Rebuild:
    def __init__(
        self,
        environment: Environment,
        host: str,
        options: RebuildOptions,
        state: RebuildState,
        report: RebuildReport,
        say: Say,
    ) -> None:
        self.host, self.options, self.state, self.report, self.say = (
            host,
            options,
            state,
            report,
            say,
        )
        address = state.notes.get("address")  # a replaced VM's new address
        self.environment = _with_address(environment, host, address) if address else environment
        self.holdings: Holdings = host_holdings(self.environment, host)
        self.backup: Backup | None = None

    def run(self) -> None:
        if self.state.resumed:
            self.say(
                f"[rebuild] resuming the rebuild of {self.host} started {self.state.started} "
                f"(done: {', '.join(self.state.done) or 'nothing'})"
            )
        steps: list[tuple[str, Callable[[], tuple[str, list[str], dict[str, Any]]]]] = [
            ("check", self.check),
            ("backup", self.take_backup),
            ("replace", self.replace),
            ("configure", self.configure),
            ("deploy", self.deploy),
            ("restore", self.restore),
            ("fill", self.fill),
            ("gate", self.gate),
            ("verify", self.verify),
        ]
        for name, step in steps:
            self.say(f"[{name}] {self.host}: started")
            started = time.monotonic()
            try:
                status, reasons, details = step()
            except _Stop as stop:
                status, reasons, details = stop.status, stop.reasons, stop.details
            seconds = time.monotonic() - started
            self.report.steps.append(StepRecord(name, status, seconds, reasons, details))
            self.say(f"[{name}] {self.host}: {status} in {seconds:.1f} s")
            for reason in reasons:
                self.say(f"[{name}] {self.host}: {reason}")
            if status not in ("ok", "changed", "skipped"):
                return
            self.state.mark(name)
        self.state.complete = True
        self.state.save()

    # -- steps -----------------------------------------------------------------------------

    def check(self) -> tuple[str, list[str], dict[str, Any]]:
        environment = self.environment
        reachable, why = _reachable(environment, self.host)
        others = {}
        for name in environment.host_names:
            if name != self.host:
                ok, reason = _reachable(environment, name)
                others[name] = "reachable" if ok else f"unreachable: {reason}"
        details: dict[str, Any] = {
            "reachable": reachable,
            "holds": self.holdings.listed(),
            "other_hosts": others,
        }
        self.say(f"  {self.host}: {'reachable' if reachable else 'unreachable: ' + why}")
        self.say(f"  {self.host} alone holds: {', '.join(self.holdings.listed()) or 'nothing'}")
        for name, status in others.items():
            self.say(f"  {name}: {status} (keeps serving; not touched)")
        if self.holdings.prometheus and reachable:
            details["prometheus_bytes"] = self._prometheus_size()
        if not reachable:
            details["unreachable"] = why
        return "ok", [], details

    def _prometheus_size(self) -> int | None:
        shell = HostShell.for_host(self.environment, self.host)
        try:
            container = container_of(shell, compose_project(self.environment), "prometheus")
            # -k, not GNU's -b: prom/prometheus has busybox's du.
            output = shell.run(f"docker exec {container} du -sk /prometheus", timeout=120).stdout
            size = int(output.split()[0]) * 1024
        except (RemoteError, ValueError, IndexError):
            self.say("  Prometheus history: size unknown (Prometheus not running)")
            return None
        kept = (
            "kept (--keep-prometheus)"
            if self.options.keep_prometheus
            else ("not kept; pass --keep-prometheus to keep it")
        )
        self.say(f"  Prometheus history on {self.host}: {size / 2**20:.1f} MiB, {kept}")
        return size

    def _lacks_prometheus(self, backup: Backup) -> bool:
        """--keep-prometheus asked for, and `backup` (taken by an earlier run) has no history."""
        wanted = self.options.keep_prometheus and self.holdings.prometheus
        return wanted and backup.path(PROMETHEUS_TAR) is None

    def take_backup(self) -> tuple[str, list[str], dict[str, Any]]:
        state = self.state
        if state.backup_id is not None:
            directory = backups_dir(self.environment, self.host) / state.backup_id
            try:
                self.backup = open_backup(directory)
            except BackupError as error:
                raise _Stop("error", [str(error)]) from None
            if not self._lacks_prometheus(self.backup):
                self.report.backup = self.backup.to_json()
                self.say(
                    f"  reusing backup {state.backup_id} (checksums verified again): {directory}"
                )
                return "skipped", [], {"reused": True, **self.backup.to_json()}
            # Another backup only of the machine the first was taken of: gpufleet has not
            # remade it, and it still answers SSH with its known host key (strict checking).
            untouched = "replace" not in state.done and (
                "replace" not in state.notes or operator_replaces(self.environment)
            )
            if not (untouched and _reachable(self.environment, self.host)[0]):
                raise _Stop(
                    "error",
                    [
                        f"--keep-prometheus, but backup {state.backup_id} was taken without "
                        f"Prometheus' history and {self.host} may have been replaced since (or "
                        "does not answer with its known host key): its history cannot be taken "
                        "now. Run again without --keep-prometheus to go on with that backup"
                    ],
                )
            self.say(
                f"  backup {state.backup_id} lacks Prometheus' history (taken without "
                "--keep-prometheus) and nothing was replaced yet: a new backup with it"
            )
            self.backup = None
        if state.data_loss_accepted:
            return "skipped", ["no backup: data loss was accepted"], {}
        if "replace" in state.done:
            raise _Stop("error", ["the machine was replaced without a backup record; see docs"])
        try:
            self.backup = take_backup(
                self.environment,
                self.host,
                self.holdings,
                keep_prometheus=self.options.keep_prometheus,
                say=self.say,
            )
        except BackupError as error:
            if not self.options.accept_data_loss:
                raise _Stop(
                    "error",
                    [
                        f"{error}; nothing was destroyed. Fix the cause and run again, or pass "
                        "--accept-data-loss to rebuild without it"
                    ],
                ) from None
            state.mark("backup", data_loss_accepted=True)
            return "skipped", [f"{error}; going on without it (--accept-data-loss)"], {}
        self.report.backup = self.backup.to_json()
        state.mark("backup", backup_id=self.backup.id)
        return "ok", [], {"reused": False, **self.backup.to_json()}

    def replace(self) -> tuple[str, list[str], dict[str, Any]]:
        if "replace" in self.state.done:
            return "skipped", [], {"resumed": True, **self.state.notes.get("replace", {})}
        notes = dict(self.state.notes)
        try:
            if "replace" not in notes:  # the machine once, even when its key is vouched later
                notes["replace"] = replace_machine(
                    self.environment, self.host, say=self.say, timing=self.options.proxmox_timing
                )
                address = notes["replace"].get("address")
                if address and address != self.environment.host(self.host).address:
                    notes["address"] = address
                    self.environment = _with_address(self.environment, self.host, address)
                self.state.notes = notes
                self.state.save()
            address = self.environment.host(self.host).address
            assert address is not None
            key = trust_host_key(
                self.environment,
                self.host,
                address,
                self.options.host_key_fingerprint,
                self.say,
                static=operator_replaces(self.environment),
            )
        except AwaitingOperator as waiting:
            raise _Stop("waiting", [str(waiting)], notes.get("replace")) from None
        except (ReplaceError, OSError) as error:
            raise _Stop("error", [str(error)]) from None
        notes["replace"] = {**notes["replace"], **key}
        self.state.mark("replace", notes=notes)
        return "changed", [], notes["replace"]

    def configure(self) -> tuple[str, list[str], dict[str, Any]]:
        return self._lifecycle(configure(self.environment, [self.host], say=self.say))

    def deploy(self) -> tuple[str, list[str], dict[str, Any]]:
        # The registry host serves its registry: deploy what this machine's repository holds,
        # restore, then fill from the restored registry.
        fill = not self.holdings.registry
        return self._lifecycle(deploy(self.environment, [self.host], say=self.say, fill=fill))

    def restore(self) -> tuple[str, list[str], dict[str, Any]]:
        if "restore" in self.state.done:
            return "skipped", [], {"resumed": True}
        if self.backup is None or not self.backup.files:
            return "skipped", [], {"note": "nothing to restore"}
        try:
            restored = restore_backup(self.environment, self.host, self.backup, say=self.say)
        except (RemoteError, OSError) as error:
            raise _Stop("error", [f"restore failed: {error}"]) from None
        details: dict[str, Any] = {"restored": restored, "backup": self.backup.id}
        before = self.backup.snapshot()
        if before is not None:  # the restored registry, before the fill step tags anything
            try:
                differences = compare_snapshots(
                    before, snapshot_registry(self.environment.registry())
                )
            except RegistryError as error:
                raise _Stop(
                    "error", [f"the restored registry could not be read: {error}"]
                ) from None
            self.state.notes = {**self.state.notes, "restored_differences": differences}
            details["registry_equal_after_restore"] = not differences
            if differences:
                reasons = [f"restored registry differs: {line}" for line in differences[:20]]
                raise _Stop("failed", reasons, details)
            self.say("  the restored registry equals the backed-up one, field by field")
        return "changed", [], details

    def fill(self) -> tuple[str, list[str], dict[str, Any]]:
        if not self.holdings.registry:
            return "skipped", [], {"note": "filled from the registry by the deploy step"}
        return self._lifecycle(deploy(self.environment, [self.host], say=self.say, fill=True))

    def gate(self) -> tuple[str, list[str], dict[str, Any]]:
        return self._lifecycle(gate(self.environment, [self.host], say=self.say))

    def verify(self) -> tuple[str, list[str], dict[str, Any]]:
        before = self.backup.snapshot() if self.backup else None
        if before is None:
            self.report.registry = {"compared": False}
            return "skipped", ["no registry snapshot from before: nothing to compare"], {}
        try:
            after = snapshot_registry(self.environment.registry())
        except RegistryError as error:
            reason = f"the registry after the rebuild could not be read: {error}"
            raise _Stop("error", [reason]) from None
        lineage, differences = lineage_tag_additions(compare_snapshots(before, after))
        restored = self.state.notes.get("restored_differences")
        self.report.registry = {
            "compared": True,
            "equal": not differences and not restored,
            "before": counts(before),
            "after": counts(after),
            "differences": differences,
            "right_after_restore": restored if restored is not None else "not read",
            "lineage_tags_added_by_fill": lineage,
        }
        self.say(f"  registry before {counts(before)}, after {counts(after)}")
        for line in lineage:
            self.say(f"  lineage tag added by the fill step (not a loss): {line}")
        if differences or restored:
            lines = differences + [f"right after the restore: {line}" for line in restored or []]
            return "failed", [f"registry differs: {line}" for line in lines[:20]], {}
        self.say("  the registry is the same as before, field by field")
        return "ok", [], {"fields_compared": len(_leaves(before))}

    def _lifecycle(self, outcomes: list[StepOutcome]) -> tuple[str, list[str], dict[str, Any]]:
        (outcome,) = outcomes
        details = outcome.to_json()["details"]
        return outcome.status, list(outcome.reasons), details


def _reachable(environment: Environment, host: str) -> tuple[bool, str]:
    try:
        return HostShell.for_host(environment, host).reachable()
    except RemoteError as error:
        return False, str(error)


def _with_address(environment: Environment, host: str, address: str) -> Environment:
    spec = with_addresses(environment.spec, {host: address})
    return dataclasses.replace(
        environment, loaded=dataclasses.replace(environment.loaded, spec=spec)
    )


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _leaves(item)]
    return [value]
