"""Located spec problems and the error that carries them to the CLI.

A problem names a field path (`dynamic_batching.preferred_batch_sizes[2]`) and what is wrong;
the loader adds the file and line. `SpecError` carries every problem found, so a user fixes a
file in one pass instead of one error per run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FieldPath = tuple[str | int, ...]


def format_field_path(path: FieldPath) -> str:
    """`("inputs", 0, "shape")` -> `inputs[0].shape`."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


@dataclass(frozen=True)
class SpecProblem:
    """One thing wrong with a spec: where (field path, and file and line once known) and what."""

    path: FieldPath
    message: str
    file: Path | None = None
    line: int | None = None

    @property
    def path_text(self) -> str:
        return format_field_path(self.path)

    def __str__(self) -> str:
        where = ""
        if self.file is not None:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        field = f"{self.path_text}: " if self.path else ""
        return _printable(f"{where}{field}{self.message}")


def _printable(text: str) -> str:
    """Escape control characters (a key or name holding a newline must not split the line)."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


class FieldValueError(ValueError):
    """Raised by a validator about one of its fields (or a deeper one) rather than itself.

    pydantic locates a validator's error at the model it runs on; the loader appends `path`, so
    a model-wide check that blames `hosts[2].azure.gpu` is reported at that line.
    """

    def __init__(self, path: FieldPath, message: str) -> None:
        super().__init__(message)
        self.path = path


class SpecError(Exception):
    """Raised when specs are invalid; `problems` lists every problem found, one line each."""

    def __init__(self, problems: list[SpecProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))
