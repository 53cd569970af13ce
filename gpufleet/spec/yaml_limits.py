"""Refuse a YAML file that would take absurd time or memory to build, before building it.

Aliases let a few lines stand for billions of values ("billion laughs"): PyYAML builds them
cheaply as shared objects, but everything after it (validation, line lookup) walks each
reference. So the file's events are read first, counting the values each alias stands for, and
a file is refused when it is too big, nests too deeply or expands beyond `MAX_VALUES`:

    check_yaml_size(len(raw), path)                    # raise SpecError naming the file
    check_yaml_shape(text, path, yaml.CSafeLoader)     # ... and the line
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gpufleet.spec.problems import SpecError, SpecProblem

# Far above any real spec or stack file (a few KiB, a few hundred values, nesting under 10),
# far below what takes a second to read.
MAX_BYTES = 1024 * 1024
MAX_VALUES = 20_000
MAX_DEPTH = 64


@dataclass
class _Open:
    """A sequence or mapping whose end has not been read yet."""

    anchor: str | None
    values_before: int  # values counted before it started
    depth: int  # how many open collections, itself included
    deepest: int  # the deepest nesting seen inside it so far


def check_yaml_shape(text: str, path: Path, loader: Any) -> None:
    """Raise SpecError if `text` expands to more than MAX_VALUES values or nests deeper than
    MAX_DEPTH, aliases expanded. `loader` (a PyYAML loader class) only parses: nothing is built.
    Syntax errors are left for the loader that builds the document to report."""
    values = 0
    expanded: dict[str, tuple[int, int]] = {}  # anchor -> (values, nesting levels)
    open_nodes: list[_Open] = []
    try:
        for event in yaml.parse(text, Loader=loader):
            if isinstance(event, yaml.CollectionStartEvent):
                values += 1
                depth = len(open_nodes) + 1
                open_nodes.append(_Open(event.anchor, values - 1, depth, depth))
                reached = depth
            elif isinstance(event, yaml.CollectionEndEvent):
                node = open_nodes.pop()
                if node.anchor is not None:
                    levels = node.deepest - node.depth + 1
                    expanded[node.anchor] = (values - node.values_before, levels)
                reached = node.deepest
            elif isinstance(event, yaml.AliasEvent):
                if any(node.anchor == event.anchor for node in open_nodes):
                    _refuse(
                        path,
                        event,
                        f"alias *{event.anchor} is used inside the node it names, which makes "
                        "that node endless; remove the alias",
                    )
                # An unknown alias counts as one value: the loader reports it with its line.
                count, levels = expanded.get(event.anchor or "", (1, 0))
                values += count
                reached = len(open_nodes) + levels
            elif isinstance(event, yaml.ScalarEvent):
                values += 1
                if event.anchor is not None:
                    expanded[event.anchor] = (1, 0)
                reached = len(open_nodes)
            else:
                continue
            if open_nodes:
                open_nodes[-1].deepest = max(open_nodes[-1].deepest, reached)
            if values > MAX_VALUES:
                _refuse(
                    path,
                    event,
                    f"the YAML holds more than {MAX_VALUES:,} values, counting an alias's values "
                    "each time it is used; spec and stack files hold a few hundred: shorten it",
                )
            if reached > MAX_DEPTH:
                _refuse(
                    path,
                    event,
                    f"the YAML nests more than {MAX_DEPTH} levels deep; flatten it",
                )
    except yaml.YAMLError:
        return  # the loader reads the file again and reports the error with its line


def check_yaml_size(size: int, path: Path) -> None:
    """Raise SpecError if a file of `size` bytes is too big to be a spec or stack file."""
    if size > MAX_BYTES:
        raise SpecError(
            [
                SpecProblem(
                    (),
                    f"the file is larger than {MAX_BYTES // 1024} KiB, too big for a spec or "
                    "stack file; is it the right file?",
                    file=path,
                )
            ]
        )


def _refuse(path: Path, event: yaml.Event, message: str) -> None:
    mark = event.start_mark
    line = mark.line + 1 if mark is not None else None
    raise SpecError([SpecProblem((), message, file=path, line=line)])
