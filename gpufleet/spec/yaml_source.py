"""Read a YAML spec file so that every later problem can point at its file and line, and write
one that reads back as written (`SpecDumper`).

PyYAML silently keeps the last of two equal keys and forgets line numbers once it builds
Python objects; `read_yaml_file` refuses duplicate keys and returns a `YamlSource` whose
`line_of(path)` finds the line of any field path (or of its nearest parent that exists).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, ClassVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from gpufleet.spec.problems import FieldPath, FieldValueError, SpecError, SpecProblem
from gpufleet.spec.yaml_limits import MAX_BYTES, check_yaml_shape, check_yaml_size

_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


_BOOL_TAG, _INT_TAG = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_MAX_INT_DIGITS = 4300  # Python's own limit on converting text to int (sys.int_info)
_DECIMAL = re.compile(r"^[-+]?[0-9]+$")
# What PyYAML's scalar constructors raise on a value they cannot read (`!!float ''`: IndexError,
# `!!timestamp soon`: AttributeError, `!!bool maybe`: KeyError).
_CONSTRUCTOR_CRASHES = (ValueError, KeyError, IndexError, AttributeError, TypeError, OverflowError)


class _StrictLoader(_BaseLoader):  # type: ignore[misc]
    """Safe loader that refuses a key given twice in one mapping, with YAML 1.2 scalars.

    PyYAML follows YAML 1.1, where `no` is false, `010` is 8 and `1:30` is 90: a Triton
    parameter written `no` would silently become "false". Here only true/false are booleans
    and only plain decimal digits are integers; anything else stays the string written.
    """

    yaml_implicit_resolvers: ClassVar[dict[str, list[tuple[str, re.Pattern[str]]]]] = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL_TAG, _INT_TAG)]
        for first, resolvers in _BaseLoader.yaml_implicit_resolvers.items()
    }

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        digits = str(self.construct_scalar(node))
        if not _DECIMAL.fullmatch(digits):  # `!!int 0x10`, `!!int ''`
            raise ValueError("not decimal digits")
        if len(digits.lstrip("+-")) > _MAX_INT_DIGITS:  # int() would refuse with advice for coders
            raise ValueError(f"more than {_MAX_INT_DIGITS} digits")
        return int(digits, 10)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """PyYAML's constructors raise bare errors on some tagged or date-like values (`!!int
        0x10`, `2026-02-30`, `!!bool maybe`): turn them into a located YAML error."""
        try:
            return super().construct_object(node, deep=deep)
        except _CONSTRUCTOR_CRASHES as error:
            raise yaml.constructor.ConstructorError(
                None, None, _unreadable_value(node, error), node.start_mark
            ) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, yaml.MappingNode):  # e.g. `!!map x`: let PyYAML say why
            return super().construct_mapping(node, deep=deep)
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    "a key must be a plain value, not a list or mapping",
                    key_node.start_mark,
                ) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice (first on line {seen[key].start_mark.line + 1}); "
                    "remove one",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)  # type: ignore[no-any-return]


def _unreadable_value(node: yaml.Node, error: Exception) -> str:
    """Why a value could not be built, and what to do, in one line."""
    kind = node.tag.rsplit(":", 1)[-1]
    value = str(node.value) if isinstance(node, yaml.ScalarNode) else ""
    shown = repr(value) if len(value) <= 40 else f"{value[:20]!r}... ({len(value)} characters)"
    # The int and date constructors' own reasons are worth showing; the others repeat the value.
    shows_reason = isinstance(error, ValueError) and node.tag in (_INT_TAG, _TIMESTAMP_TAG)
    reason = f" ({error})" if shows_reason else ""
    what_to_do = {
        _INT_TAG: "write a whole number in decimal digits",
        _TIMESTAMP_TAG: "write a real date, or quote the value to keep it as text",
    }.get(node.tag, f"correct the value or remove the !!{kind} tag")
    return f"{shown} is not a valid {kind}{reason}; {what_to_do}"


_StrictLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_StrictLoader.add_implicit_resolver(_INT_TAG, _DECIMAL, list("-+0123456789"))
_StrictLoader.add_constructor(_INT_TAG, _StrictLoader.construct_yaml_int)


class SpecDumper(yaml.SafeDumper):
    """Safe dumper whose output the spec loader reads back as written: a string the loader
    would read as a number is quoted. PyYAML's own resolvers follow YAML 1.1, where `08` is
    text (not octal), so it wrote the tensor name "08" plain, and the loader read the integer
    8. Its YAML 1.1 booleans (`no`, `on`) stay quoted too, which the loader reads as text."""


SpecDumper.add_implicit_resolver(_INT_TAG, _DECIMAL, list("-+0123456789"))


@dataclass
class YamlSource:
    """A parsed YAML file: its data, and the line of each field path on demand."""

    path: Path
    text: str
    data: Any

    @cached_property
    def _line_index(self) -> dict[tuple[str, ...], int]:
        index: dict[tuple[str, ...], int] = {}
        root = yaml.compose(self.text, Loader=_BaseLoader)
        if root is not None:
            _index_node(root, (), index)
        return index

    def line_of(self, path: FieldPath) -> int | None:
        """Line (1-based) of the deepest existing node along `path`."""
        keys = tuple(str(part) for part in path)
        try:
            index = self._line_index
        except RecursionError:  # an alias that contains itself: no lines, the message stays
            return None
        for end in range(len(keys), -1, -1):
            line = index.get(keys[:end])
            if line is not None:
                return line
        return None

    def problem(self, path: FieldPath, message: str) -> SpecProblem:
        return SpecProblem(path, message, file=self.path, line=self.line_of(path))


def _index_node(node: yaml.Node, path: tuple[str, ...], index: dict[tuple[str, ...], int]) -> None:
    index.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*path, str(key_node.value))
            index[child] = key_node.start_mark.line + 1
            _index_node(value_node, child, index)
    elif isinstance(node, yaml.SequenceNode):
        for position, item in enumerate(node.value):
            _index_node(item, (*path, str(position)), index)


def read_yaml_file(path: Path, what: str) -> YamlSource:
    """Read and parse `path`, or raise SpecError saying why it is not a YAML mapping.

    A file too big, too deep or expanding too far through aliases is refused before it is built
    (see `yaml_limits`).
    """
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_BYTES + 1)  # never more, whatever the file is
    except OSError as error:
        raise SpecError([SpecProblem((), f"cannot read: {error.strerror}", file=path)]) from None
    check_yaml_size(len(raw), path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise SpecError(
            [
                SpecProblem(
                    (),
                    f"not UTF-8 text (byte {error.start} is {raw[error.start]:#04x}); "
                    "save the file as UTF-8",
                    file=path,
                    line=line,
                )
            ]
        ) from None
    check_yaml_shape(text, path, _BaseLoader)
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a safe loader subclass
    except RecursionError:
        raise SpecError(
            [SpecProblem((), "the YAML nests too deeply or refers to itself", file=path)]
        ) from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        reason = " ".join(part for part in (error.context, error.problem) if part)
        reason = " ".join(reason.split())  # PyYAML's messages may span lines
        if not isinstance(error, yaml.constructor.ConstructorError):
            reason += "; fix the syntax"
        raise SpecError(
            [
                SpecProblem(
                    (),
                    f"invalid YAML: {reason}",
                    file=path,
                    line=mark.line + 1 if mark else None,
                )
            ]
        ) from None
    except yaml.YAMLError as error:
        raise SpecError([SpecProblem((), f"invalid YAML: {error}", file=path)]) from None
    if data is None:
        raise SpecError([SpecProblem((), f"the file is empty; write a {what} in it", file=path)])
    if not isinstance(data, dict):
        raise SpecError(
            [
                SpecProblem(
                    (),
                    f"a {what} is a YAML mapping of keys to values, not a {type(data).__name__}",
                    file=path,
                    line=1,
                )
            ]
        )
    return YamlSource(path=path, text=text, data=data)


# What to do about pydantic's most common complaints (its messages say only what is wrong).
_WHAT_TO_DO = {
    "literal_error": "use one of these",
    "enum": "use one of these",
    "too_short": "add the missing values",
    "too_long": "remove values",
    "greater_than": "raise it",
    "greater_than_equal": "raise it",
    "less_than": "lower it",
    "less_than_equal": "lower it",
    "int_parsing": "write a whole number",
    "int_type": "write a whole number",
    "int_from_float": "write a whole number",
    "float_parsing": "write a number",
    "float_type": "write a number",
    "bool_parsing": "write true or false",
    "bool_type": "write true or false",
    "string_type": "write a text value (quote it in YAML)",
    "list_type": "write a list, e.g. [1, 2]",
    "dict_type": "write a mapping of keys to values",
    "model_type": "write a mapping of keys to values",
    "model_attributes_type": "write a mapping of keys to values",
    "string_pattern_mismatch": "use letters, digits, '_', '.' and '-' only",
}


def validation_problems(
    error: ValidationError,
    model: type[BaseModel],
    source: YamlSource,
    to_file_path: Callable[[FieldPath], FieldPath] = lambda path: path,
) -> list[SpecProblem]:
    """Turn pydantic's errors into located, one-line problems.

    `to_file_path` maps a field path of `model` to where that field is written in the file.
    """
    problems = []
    for detail in error.errors(include_url=False):
        loc = tuple(part for part in detail["loc"] if part != "[key]")
        raised = detail.get("ctx", {}).get("error")
        if isinstance(raised, FieldValueError):
            loc = (*loc, *raised.path)
        kind = detail["type"]
        if kind == "extra_forbidden":
            key = str(loc[-1])
            allowed = _field_names_at(model, loc[:-1])
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(allowed)}"
            message = f"unknown key {key!r}; {hint}"
        elif kind == "missing":
            message = "required key is missing; add it"
        else:
            message = detail["msg"].removeprefix("Value error, ")
            if not isinstance(detail["input"], dict | list):
                message += f" (got {detail['input']!r})"
            what_to_do = _WHAT_TO_DO.get(kind)
            if kind == "string_pattern_mismatch":
                what_to_do = _field_description(model, loc) or what_to_do
            if what_to_do:
                message += f"; {what_to_do}"
        problems.append(source.problem(to_file_path(loc), message))
    return problems


def _field_names_at(model: type[BaseModel], path: FieldPath) -> list[str]:
    """Field names of the (nested) model found at `path`, for "did you mean" hints."""
    found = _model_at(model, path)
    return list(found.model_fields) if found else []


def _field_description(model: type[BaseModel], path: FieldPath) -> str | None:
    """The description of the field at `path`: it says what a pattern-checked value looks like."""
    parent = _model_at(model, path[:-1]) if path else None
    info = parent.model_fields.get(str(path[-1])) if parent else None
    return info.description if info else None


def _model_at(model: type[BaseModel], path: FieldPath) -> type[BaseModel] | None:
    """The (nested) model class found at `path`, through lists and dicts; None if not a model."""
    current: Any = model
    for part in path:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            info = current.model_fields.get(str(part))
            current = info.annotation if info else None
        elif get_origin(current) in (list, dict):
            current = get_args(current)[-1]  # the item type of a list or the value type of a dict
        else:
            return None
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return current
    return None


def _unwrap(annotation: Any) -> Any:
    """Strip `Annotated[...]` and `X | None` down to X."""
    while True:
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
        elif get_origin(annotation) in (Union, UnionType):
            members = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation
