"""A rebuild's progress, kept in `<state_dir>/rebuild/<host>.json` so that the same command,
run again after a failure, resumes: the backup it took is reused (never taken again, never
overwritten), the machine is not replaced twice, the registry is not restored twice. A rebuild
that finished is closed; the next `gpufleet rebuild` of the host starts afresh.

    state = RebuildState.open(environment, "gpu-a")
    state.mark("backup", backup_id="20261205T031500Z")
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path
from typing import Any

from generators.model_repository import write_atomically
from gpufleet.lifecycle.environment import Environment


@dataclasses.dataclass
class RebuildState:
    path: Path
    host: str
    started: str
    backup_id: str | None = None
    data_loss_accepted: bool = False
    done: list[str] = dataclasses.field(default_factory=list)
    complete: bool = False
    resumed: bool = False
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def open(cls, environment: Environment, host: str) -> RebuildState:
        """The unfinished rebuild of `host`, or a new one."""
        path = environment.state_dir / "rebuild" / f"{host}.json"
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            record = None
        except ValueError:
            record = None  # an unreadable record starts afresh; backups are never touched
        if record and not record.get("complete"):
            return cls(
                path,
                host,
                record["started"],
                record.get("backup_id"),
                bool(record.get("data_loss_accepted")),
                list(record.get("done", [])),
                False,
                True,
                dict(record.get("notes", {})),
            )
        return cls(path, host, now)

    def mark(self, step: str, **fields: Any) -> None:
        if step not in self.done:
            self.done.append(step)
        for name, value in fields.items():
            setattr(self, name, value)
        self.save()

    def save(self) -> None:
        record = {
            "host": self.host,
            "started": self.started,
            "backup_id": self.backup_id,
            "data_loss_accepted": self.data_loss_accepted,
            "done": self.done,
            "complete": self.complete,
            "notes": self.notes,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, json.dumps(record, indent=2, sort_keys=True) + "\n")
