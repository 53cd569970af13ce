"""Load ModelSpecs from `modelconfigs/`, reporting every problem with file, line and field path.

specs = load_model_specs(Path("modelconfigs"))   # raises SpecError listing all problems
for loaded in specs:
    print(loaded.spec.name, loaded.spec_hash)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from gpufleet.spec.model import ModelSpec
from gpufleet.spec.model_checks import check_model_set, check_model_spec
from gpufleet.spec.problems import FieldPath, SpecError, SpecProblem
from gpufleet.spec.proxmox import PULUMI_ONLY_KEYS
from gpufleet.spec.stack import CONFIG_NAMESPACE, StackSpec
from gpufleet.spec.yaml_source import YamlSource, read_yaml_file, validation_problems

SPEC_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class LoadedModelSpec:
    """A valid spec, the file it came from, and the hash of its content."""

    spec: ModelSpec
    path: Path
    source: YamlSource

    @property
    def spec_hash(self) -> str:
        return model_spec_hash(self.spec)


def model_spec_hash(spec: ModelSpec) -> str:
    """sha256 of the spec's meaning: comments, key order and spelled-out defaults don't count."""
    content = spec.model_dump(mode="json", exclude_defaults=True)
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def load_model_spec_file(path: Path) -> LoadedModelSpec:
    """Load one spec file; SpecError lists all of its problems, each on its own line."""
    source = read_yaml_file(path, "model spec")
    problems: list[SpecProblem] = []
    name = source.data.get("name")
    if isinstance(name, str) and name != path.stem:
        problems.append(_name_differs(source, name))
    try:
        spec = ModelSpec.model_validate(source.data, context={"defer_cross_field_checks": True})
    except ValidationError as error:
        problems.extend(validation_problems(error, ModelSpec, source))
        raise SpecError(_by_line(problems)) from None
    if not problems and spec.name != path.stem:  # a name YAML gave as another type (!!binary)
        problems.append(_name_differs(source, spec.name))
    problems.extend(source.problem(p.path, p.message) for p in check_model_spec(spec))
    if problems:
        raise SpecError(_by_line(problems))
    return LoadedModelSpec(spec=spec, path=path, source=source)


def _name_differs(source: YamlSource, name: str) -> SpecProblem:
    path = source.path
    return source.problem(
        ("name",),
        f"name {name!r} differs from the file name {path.name!r}; "
        f"rename the file to {name}{path.suffix} or change name",
    )


def _by_line(problems: list[SpecProblem]) -> list[SpecProblem]:
    return sorted(problems, key=lambda problem: problem.line or 0)


def find_spec_files(location: Path) -> list[Path]:
    """The spec files in a directory (sorted), or the file itself."""
    if location.is_dir():
        return sorted(p for p in location.iterdir() if p.suffix in SPEC_SUFFIXES and p.is_file())
    if location.is_file():
        return [location]
    raise SpecError([SpecProblem((), "no such file or directory", file=location)])


def load_model_specs(locations: Path | Iterable[Path]) -> list[LoadedModelSpec]:
    """Load every spec under the given directories or files, checking references between them.

    All problems of all files are collected before SpecError is raised.
    """
    if isinstance(locations, Path):
        locations = [locations]
    problems: list[SpecProblem] = []
    loaded: list[LoadedModelSpec] = []
    for location in locations:
        try:
            files = find_spec_files(location)
        except SpecError as error:
            problems.extend(error.problems)
            continue
        if not files:
            # Generating from nothing would remove every generated config: refuse instead.
            problems.append(
                SpecProblem((), "no model specs (*.yaml) here; write one or pass --specs", location)
            )
        for path in files:
            try:
                loaded.append(load_model_spec_file(path))
            except SpecError as error:
                problems.extend(error.problems)
    first_file: dict[str, Path] = {}
    unique: list[LoadedModelSpec] = []
    for item in loaded:
        other = first_file.setdefault(item.spec.name, item.path)
        if other != item.path:
            problems.append(
                item.source.problem(
                    ("name",),
                    f"model name {item.spec.name!r} is already used by {other}; "
                    "model names must be unique",
                )
            )
        else:
            unique.append(item)
    by_name = {item.spec.name: item for item in unique}
    # A spec file that failed is known by its file name, the model name it must carry.
    failed = {problem.file.stem for problem in problems if problem.file is not None}
    for name, found in check_model_set([item.spec for item in unique], failed).items():
        source = by_name[name].source
        problems.extend(source.problem(p.path, p.message) for p in found)
    if problems:
        raise SpecError(problems)
    return unique


@dataclass(frozen=True)
class LoadedStackSpec:
    """A valid stack spec and the file it came from."""

    name: str
    spec: StackSpec
    source: YamlSource


def stack_file(stacks_dir: Path, stack: str) -> Path:
    return stacks_dir / f"Pulumi.{stack}.yaml"


def load_stack_spec(stacks_dir: Path, stack: str) -> LoadedStackSpec:
    """Load `<stacks_dir>/Pulumi.<stack>.yaml`; its `gpufleet:` config keys form the StackSpec."""
    path = stack_file(stacks_dir, stack)
    if not path.is_file():
        known = sorted(
            p.name[len("Pulumi.") : -len(".yaml")] for p in stacks_dir.glob("Pulumi.*.yaml")
        )
        raise SpecError(
            [
                SpecProblem(
                    (),
                    f"no stack named {stack!r} (known stacks: {', '.join(known) or 'none'})",
                    file=path,
                )
            ]
        )
    source = read_yaml_file(path, "Pulumi stack file")
    config = source.data.get("config", {})
    if not isinstance(config, dict):
        raise SpecError([source.problem(("config",), "config must be a mapping of keys to values")])
    prefix = f"{CONFIG_NAMESPACE}:"
    fields = {
        key[len(prefix) :]: value
        for key, value in config.items()
        if key.startswith(prefix) and key[len(prefix) :] not in PULUMI_ONLY_KEYS
    }
    try:
        spec = StackSpec.model_validate(fields)
    except ValidationError as error:
        raise SpecError(validation_problems(error, StackSpec, source, _in_stack_file)) from None
    return LoadedStackSpec(name=stack, spec=spec, source=source)


def _in_stack_file(path: FieldPath) -> FieldPath:
    """StackSpec's `environment` is written `config: gpufleet:environment:` in the file."""
    if not path:
        return ("config",)
    return ("config", f"{CONFIG_NAMESPACE}:{path[0]}", *path[1:])


def stack_config_path(path: FieldPath) -> FieldPath:
    """Where a StackSpec field path is written in the stack file (to locate warnings)."""
    return _in_stack_file(path)


def select_stack_models(
    stack: LoadedStackSpec, specs: list[LoadedModelSpec]
) -> list[LoadedModelSpec]:
    """The specs a stack serves, in the stack's order; unknown names are located problems."""
    if not stack.spec.models:
        return specs
    by_name = {item.spec.name: item for item in specs}
    selected = stack.spec.models
    problems: list[SpecProblem] = []
    for index, name in enumerate(selected):
        where = ("config", f"{CONFIG_NAMESPACE}:models", index)
        if name in selected[:index]:
            problems.append(stack.source.problem(where, f"{name!r} is listed twice; remove one"))
        elif name not in by_name:
            known = ", ".join(sorted(by_name)) or "none"
            problems.append(
                stack.source.problem(where, f"no model spec named {name!r} (known: {known})")
            )
        else:
            problems.extend(
                stack.source.problem(
                    where,
                    f"ensemble {name!r} calls {step.model!r}, which this stack does not serve; "
                    f"add {step.model} to {CONFIG_NAMESPACE}:models",
                )
                for step in by_name[name].spec.ensemble_steps
                if step.model not in selected
            )
    if problems:
        raise SpecError(problems)
    return [by_name[name] for name in stack.spec.models]
