"""Follow an Ansible run's events: a progress line per host and task, then a per-host summary.

ansible-runner calls `EventTracker.handle` with each event (the same JSON it keeps under
`artifacts/<ident>/job_events/`); the tracker prints what happened to each host in each task and
remembers every failure with its task and reason, for the summary at the end.

    tracker = EventTracker(say=print)
    ansible_runner.run(..., event_handler=tracker.handle)
    outcomes = tracker.outcomes(runner.stats)
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

HostStatus = Literal["ok", "changed", "failed", "unreachable"]
Say = Callable[[str], None]
_MAX_REASON_CHARS = 400
_MAX_DIFF_CHARS = 4000
_DEBUG_ACTIONS = {"debug", "ansible.builtin.debug"}


@dataclass
class HostOutcome:
    """What one Ansible run did to one host: Ansible's own counters and the reasons it failed."""

    host: str
    ok: int = 0
    changed: int = 0
    failed: int = 0
    skipped: int = 0
    unreachable: int = 0
    problems: list[str] = field(default_factory=list)
    changes: list[tuple[str, str]] = field(default_factory=list)  # (task, its diff) per change

    @property
    def status(self) -> HostStatus:
        if self.unreachable:
            return "unreachable"
        if self.failed:
            return "failed"
        return "changed" if self.changed else "ok"

    def counters(self) -> str:
        return (
            f"ok={self.ok} changed={self.changed} failed={self.failed} "
            f"skipped={self.skipped} unreachable={self.unreachable}"
        )


class EventTracker:
    """Turns ansible-runner events into progress lines and remembers each host's problems."""

    def __init__(self, say: Say) -> None:
        self._say = say
        self._problems: dict[str, list[str]] = {}
        self._changes: dict[str, list[tuple[str, str]]] = {}
        self._play = ""

    def handle(self, event: Mapping[str, Any]) -> bool:
        """ansible-runner's event_handler; True keeps the event in the run's artifacts."""
        kind = event.get("event", "")
        data = event.get("event_data") or {}
        if kind == "playbook_on_play_start":
            self._play = str(data.get("play", ""))
            self._say(f"play: {self._play}")
        elif kind.startswith("runner_on_") and "host" in data:
            self._host_result(kind.removeprefix("runner_on_"), data)
        return True

    def outcomes(self, stats: Mapping[str, Mapping[str, int]] | None) -> list[HostOutcome]:
        """Ansible's per-host counters (runner.stats) joined with the problems seen in events."""
        stats = stats or {}
        hosts = sorted(
            {host for counts in stats.values() for host in counts}
            | set(self._problems)
            | set(self._changes)
        )
        return [
            HostOutcome(
                host=host,
                ok=stats.get("ok", {}).get(host, 0),
                changed=stats.get("changed", {}).get(host, 0),
                failed=stats.get("failures", {}).get(host, 0),
                skipped=stats.get("skipped", {}).get(host, 0),
                unreachable=stats.get("dark", {}).get(host, 0),
                problems=self._problems.get(host, []),
                changes=self._changes.get(host, []),
            )
            for host in hosts
        ]

    def _host_result(self, result: str, data: Mapping[str, Any]) -> None:
        host = str(data["host"])
        task = _task_title(data)
        res = data.get("res") or {}
        if result == "ok":
            status = "changed" if res.get("changed") else "ok"
            if res.get("changed"):
                self._changes.setdefault(host, []).append((task, task_diff(res)))
            if data.get("task_action") in _DEBUG_ACTIONS and res.get("msg"):
                task = f"{task}: {_one_line(res['msg'])}"
        elif result == "failed" and data.get("ignore_errors"):
            status = "failed (ignored)"
        elif result in ("failed", "unreachable"):
            status = result
            reason = _reason(res)
            self._problems.setdefault(host, []).append(f"{result} at task {task!r}: {reason}")
            task = f"{task}: {reason}"
        elif result == "skipped":
            status = "skipped"
        else:  # runner_on_start, runner_on_async_*: not a result yet
            return
        self._say(f"  {host:<20} {status:<9} {task}")


def task_diff(res: Mapping[str, Any]) -> str:
    """A changed task's diff (Ansible's `--diff`) as unified diff text; a no_log task's result
    is censored by Ansible, and so is its diff here."""
    if res.get("censored"):
        return "(hidden: the task is no_log)"
    diffs = res.get("diff") or []
    if isinstance(diffs, Mapping):
        diffs = [diffs]
    chunks: list[str] = []
    for diff in diffs:
        if not isinstance(diff, Mapping):
            continue
        if diff.get("prepared"):
            chunks.append(str(diff["prepared"]))
            continue
        before, after = diff.get("before", ""), diff.get("after", "")
        if isinstance(before, Mapping) or isinstance(after, Mapping):
            before = json.dumps(before, indent=1, sort_keys=True) + "\n"
            after = json.dumps(after, indent=1, sort_keys=True) + "\n"
        chunks.extend(
            difflib.unified_diff(
                str(before).splitlines(keepends=True),
                str(after).splitlines(keepends=True),
                fromfile=str(diff.get("before_header", "before")),
                tofile=str(diff.get("after_header", "after")),
            )
        )
    text = "".join(chunks)
    if len(text) > _MAX_DIFF_CHARS:
        text = text[:_MAX_DIFF_CHARS] + "\n... (cut)"
    return text or "(changed; Ansible gave no diff)"


def _task_title(data: Mapping[str, Any]) -> str:
    role = data.get("role")
    task = str(data.get("task", "")).strip()
    return f"{role} : {task}" if role else task


def _reason(res: Mapping[str, Any]) -> str:
    """Ansible's own words for a failure: msg, else stderr, else the module's stderr."""
    for key in ("msg", "stderr", "module_stderr", "module_stdout"):
        value = res.get(key)
        if value:
            return _one_line(value)
    return "no reason given (see the run's events)"


def _one_line(value: Any) -> str:
    text = " ".join(str(value).split())
    if len(text) > _MAX_REASON_CHARS:
        return text[: _MAX_REASON_CHARS - 3] + "..."
    return text
