"""The tuned settings written into the model's spec file, its comments and formatting kept.

The file is edited as round-trip YAML (ruamel.yaml): only ``max_batch_size``,
``dynamic_batching.max_queue_delay_us`` and ``preferred_batch_sizes`` and the instance group's
``kind`` and ``count`` change. One comment line above ``max_batch_size`` says where the values
came from (``# gpufleet tune: <date> on <host>: ...``); a later run replaces it. Before anything
is written, the file must survive a round trip unchanged (an indentation ruamel cannot
reproduce is refused, with the diff to apply by hand) and the edited text must load as exactly
the tuned spec. The write is atomic.

    edit = plan_write_back(path, tuned_spec, comment)
    print(edit.diff); apply_write_back(edit)
"""

from __future__ import annotations

import difflib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from generators.model_repository import write_atomically
from gpufleet.spec.loading import model_spec_hash
from gpufleet.spec.model import ModelSpec

COMMENT_PREFIX = "# gpufleet tune: "
# (mapping, sequence, offset) indentations tried, the project's own style first.
INDENTS = ((2, 4, 2), (2, 2, 0), (4, 6, 4), (4, 4, 0), (4, 4, 2))


class WriteBackError(Exception):
    """The spec file cannot be edited safely; the message says why and what to do."""


@dataclass(frozen=True)
class WriteBack:
    path: Path
    old_text: str
    new_text: str

    @property
    def diff(self) -> str:
        return "".join(
            difflib.unified_diff(
                self.old_text.splitlines(keepends=True),
                self.new_text.splitlines(keepends=True),
                fromfile=f"{self.path} (now)",
                tofile=f"{self.path} (tuned)",
            )
        )

    @property
    def changes(self) -> bool:
        return self.old_text != self.new_text


def plan_write_back(path: Path, tuned: ModelSpec, comment: str, *, instances: bool) -> WriteBack:
    """The edited text of ``path`` holding ``tuned``'s batching (and instances, when tuned)."""
    old_text = path.read_text(encoding="utf-8")
    yaml = _round_trip_yaml(old_text, path)
    data = yaml.load(old_text)
    if not isinstance(data, CommentedMap):
        raise WriteBackError(f"{path}: the spec is not a YAML mapping")
    _set_batching(data, tuned)
    if instances and tuned.instance_groups:
        _set_instances(data, tuned)
    stream = io.StringIO()
    yaml.dump(data, stream)
    new_text = _with_comment(stream.getvalue(), comment)
    written = ModelSpec.model_validate(YAML(typ="safe").load(new_text))
    if model_spec_hash(written) != model_spec_hash(tuned):
        raise WriteBackError(
            f"{path}: the edited file would not hold the tuned settings exactly; apply the diff "
            "by hand"
        )
    return WriteBack(path, old_text, new_text)


def apply_write_back(edit: WriteBack) -> None:
    write_atomically(edit.path, edit.new_text)


def _round_trip_yaml(text: str, path: Path) -> YAML:
    for mapping, sequence, offset in INDENTS:
        yaml = YAML(typ="rt")
        yaml.preserve_quotes = True
        yaml.width = 4096
        yaml.indent(mapping=mapping, sequence=sequence, offset=offset)
        stream = io.StringIO()
        yaml.dump(yaml.load(text), stream)
        if stream.getvalue() == text:
            return yaml
    raise WriteBackError(
        f"{path}: its indentation cannot be kept by a YAML round trip; apply the printed diff "
        "by hand, or reformat the file with two-space indentation"
    )


def _set_batching(data: CommentedMap, tuned: ModelSpec) -> None:
    _set(data, "max_batch_size", tuned.max_batch_size, after="source")
    if tuned.dynamic_batching is None:
        return
    batching = data.get("dynamic_batching")
    if not isinstance(batching, CommentedMap):
        batching = CommentedMap()
        _set(data, "dynamic_batching", batching, after="outputs")
    _set(batching, "max_queue_delay_us", tuned.dynamic_batching.max_queue_delay_us, at=0)
    sizes = tuned.dynamic_batching.preferred_batch_sizes
    if sizes:
        _set(batching, "preferred_batch_sizes", _flow_list(sizes), after="max_queue_delay_us")
    elif "preferred_batch_sizes" in batching:
        del batching["preferred_batch_sizes"]


def _set_instances(data: CommentedMap, tuned: ModelSpec) -> None:
    group = tuned.instance_groups[0]
    groups = data.get("instance_groups")
    if not isinstance(groups, CommentedSeq) or not groups:
        groups = CommentedSeq([CommentedMap()])
        _set(data, "instance_groups", groups, after="dynamic_batching")
    first = groups[0]
    _set(first, "kind", group.kind, at=0)
    _set(first, "count", group.count, after="kind")
    if group.kind != "gpu" and "gpus" in first:
        del first["gpus"]


def _set(
    mapping: CommentedMap, key: str, value: Any, *, after: str | None = None, at: int | None = None
) -> None:
    """Set ``key`` in place when present, else insert it after ``after`` (or at ``at``)."""
    if key in mapping:
        mapping[key] = value
        return
    keys = list(mapping)
    position = len(keys) if at is None else at
    if after is not None and after in keys:
        position = keys.index(after) + 1
    mapping.insert(position, key, value)


def _flow_list(values: list[int]) -> CommentedSeq:
    sequence = CommentedSeq(values)
    sequence.fa.set_flow_style()
    return sequence


def _with_comment(text: str, comment: str) -> str:
    """One provenance line above the top-level ``max_batch_size`` (an older one removed)."""
    lines = [line for line in text.splitlines(keepends=True) if not line.startswith(COMMENT_PREFIX)]
    marker = re.compile(r"^max_batch_size\s*:")
    for index, line in enumerate(lines):
        if marker.match(line):
            lines.insert(index, f"{COMMENT_PREFIX}{comment}\n")
            break
    return "".join(lines)
