"""The infrastructure layer of `gpufleet drift` on an azure stack: `pulumi preview --refresh`.

Azure's resources are compared by Pulumi itself: the engine refreshes the stack's state from
Azure, runs the program and lists the steps it would take. This runs
`pulumi preview --refresh --expect-no-changes --json` through the Automation API
(`pulumi.automation`), which needs the Pulumi CLI on PATH and the stack's backend logged in.
Its exit code is 255 both when there are changes (`--expect-no-changes`) and when the preview
failed, so the verdict comes from the JSON it prints (Pulumi's `PreviewDigest`: `steps` with
`op`, `urn`, `oldState`, `newState`, `diffReasons`, `replaceReasons`, `detailedDiff`; and
`diagnostics` with a `severity`), never from the exit code.

    checks = check_azure_preview(loaded, project_root=Path.cwd())

Every step whose op is not `same` (nor the refresh's own `refresh`/`read`) is one item per
resource, attributed to the host whose name the resource's name starts with (`gpu-a-vm`,
`gpu-a-nic`: host `gpu-a`), else stack-wide; its object is `<type> <name>`, and it lists the
property paths that differ with the state's (refreshed) and the program's values. The repair
is `pulumi up --refresh -s <stack>`. Without the Pulumi CLI the layer is one stack-wide check
with the error "not checked: no Pulumi CLI".
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from gpufleet.drift.items import DriftItem, LayerCheck
from gpufleet.spec.loading import LoadedStackSpec

LAYER: Final = "infrastructure"
INSTALL_URL: Final = "https://www.pulumi.com/docs/iac/download-install/"
# Steps that change nothing: the refresh reading the cloud, a data source read.
_NO_CHANGE_OPS: Final = frozenset({"same", "refresh", "read"})
# The property Pulumi marks a secret value with in state JSON.
_SECRET_SIG: Final = "4dabf18193072939515e22adb298388d"  # noqa: S105  # a marker, no secret
_PATH_PART = re.compile(r'\.?([^.\[\]"]+)|\[(\d+)\]|\["([^"]*)"\]')
_SHOWN_CHARS = 120
_DIAGNOSTIC_CHARS = 500

# (stack, project_root) -> the JSON text `pulumi preview --json` printed.
PreviewRunner = Callable[[str, Path], str]


class PreviewError(Exception):
    """`pulumi preview` did not give a usable JSON digest; the message says why."""


def check_azure_preview(
    loaded: LoadedStackSpec, *, project_root: Path, run_preview: PreviewRunner | None = None
) -> list[LayerCheck]:
    """The azure stack's resources against its program and state, as Pulumi's preview sees
    them after a refresh. Needs no host address."""
    started = time.monotonic()
    hosts = [host.name for host in loaded.spec.hosts]
    if run_preview is None:
        if shutil.which("pulumi") is None:
            return [
                LayerCheck(
                    LAYER,
                    "",
                    error=f"not checked: no Pulumi CLI (install it from {INSTALL_URL}, log in "
                    f"to the stack's backend, then run again); the resources of {loaded.name} "
                    "were not compared",
                    seconds=time.monotonic() - started,
                )
            ]
        run_preview = preview_json
    try:
        checks = preview_checks(loaded.name, run_preview(loaded.name, project_root), hosts)
    except PreviewError as error:
        checks = [LayerCheck(LAYER, "", error=f"could not be checked: {error}")]
    for check in checks:
        check.seconds = time.monotonic() - started
    return checks


def preview_json(stack: str, project_root: Path) -> str:
    """`pulumi preview --refresh --expect-no-changes --json` on the stack, through the
    Automation API: the JSON digest it printed, whatever its exit code."""
    from pulumi import automation

    out: list[str] = []
    err: list[str] = []
    try:
        selected = automation.select_stack(stack_name=stack, work_dir=str(project_root))
        selected.preview(
            refresh=True,
            expect_no_changes=True,
            json=True,
            color="never",
            on_output=out.append,
            on_error=err.append,
        )
    except automation.errors.CommandError as error:
        # With --expect-no-changes, changes end the command with an error too: the digest
        # on stdout tells changes from failures.
        if not "".join(out).strip():
            raise PreviewError(
                f"pulumi preview -s {stack} failed: {_last_line(str(error))}"
            ) from None
    except RuntimeError as error:  # the Automation API found no summary event
        if not "".join(out).strip():
            raise PreviewError(f"pulumi preview -s {stack} failed: {error}") from None
    return "\n".join(out)


def preview_checks(stack: str, text: str, hosts: list[str]) -> list[LayerCheck]:
    """The checks a `pulumi preview --json` digest amounts to: one per host that owns a
    resource, and a stack-wide one ("" host) for the rest; every resource a checked object."""
    try:
        digest = json.loads(text)
    except ValueError as error:
        raise PreviewError(f"pulumi preview printed no JSON digest ({error})") from None
    if not isinstance(digest, dict):
        raise PreviewError("pulumi preview printed JSON that is not a preview digest")
    checks: dict[str, LayerCheck] = {"": LayerCheck(LAYER, "")}
    steps: dict[str, list[Mapping[str, Any]]] = {}
    for step in digest.get("steps") or []:
        if isinstance(step, Mapping) and isinstance(step.get("urn"), str):
            steps.setdefault(step["urn"], []).append(step)
    for urn, its_steps in steps.items():
        kind, name = _type_and_name(urn)
        host = _host_of(name, hosts)
        check = checks.setdefault(host, LayerCheck(LAYER, host))
        check.checked.append(f"{kind} {name}")
        changing = [step for step in its_steps if step.get("op") not in _NO_CHANGE_OPS]
        if changing:
            check.items.append(_item(stack, host, f"{kind} {name}", changing))
    errors = [
        _one_line(str(d.get("message", "")))
        for d in digest.get("diagnostics") or []
        if isinstance(d, Mapping) and d.get("severity") == "error"
    ]
    if errors:
        checks[
            ""
        ].error = f"could not be checked: pulumi preview -s {stack} reported: {'; '.join(errors)}"
    return list(checks.values())


def _item(stack: str, host: str, obj: str, steps: list[Mapping[str, Any]]) -> DriftItem:
    ops = [str(step.get("op")) for step in steps]
    op = "replace" if any(o.startswith(("replace", "create-replacement")) for o in ops) else ops[0]
    keys: list[str] = []
    for step in steps:
        # The detailed diff names property paths; the reasons only top-level keys.
        reasons = [*(step.get("diffReasons") or []), *(step.get("replaceReasons") or [])]
        for key in step.get("detailedDiff") or reasons:
            if str(key) not in keys:
                keys.append(str(key))
    old = _state(steps, "oldState", "outputs")
    new = _state(steps, "newState", "inputs")
    repair = f"pulumi up --refresh -s {stack}"
    if op == "create":
        expected, found = "exists, as the program declares it", "gone from Azure and the state"
    elif op == "delete":
        expected, found = "not declared by the program", "in Azure and the stack's state"
    else:
        expected = _values(keys, new) or "as the program declares it"
        found = f"{op}: {_values(keys, old) or ', '.join(keys) or 'differs'}"
        if op == "replace":
            repair += " (replaces the resource)"
    return DriftItem(LAYER, host, obj, expected=expected, found=found, repair=repair)


def _state(steps: list[Mapping[str, Any]], which: str, part: str) -> Mapping[str, Any]:
    for step in steps:
        state = step.get(which)
        if isinstance(state, Mapping) and isinstance(state.get(part), Mapping):
            return state[part]  # type: ignore[no-any-return]
    return {}


def _values(keys: list[str], props: Mapping[str, Any]) -> str:
    """`key=value` for each property path that `props` holds (secrets masked)."""
    shown = []
    for key in keys:
        found, value = _lookup(props, key)
        if found:
            shown.append(f"{key}={_show(value)}")
    return _cut("; ".join(shown))


def _lookup(props: Any, path: str) -> tuple[bool, Any]:
    """The value at a Pulumi property path (`tags.env`, `a.b[0].c`, `tags["x.y"]`)."""
    current = props
    for match in _PATH_PART.finditer(path):
        name, index, quoted = match.groups()
        if index is not None:
            if not isinstance(current, list) or int(index) >= len(current):
                return False, None
            current = current[int(index)]
            continue
        key = quoted if quoted is not None else name
        if not isinstance(current, Mapping) or key not in current:
            return False, None
        current = current[key]
    return True, current


def _show(value: Any) -> str:
    if isinstance(value, Mapping) and _SECRET_SIG in value:
        return "[secret]"
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def _type_and_name(urn: str) -> tuple[str, str]:
    """`urn:pulumi:<stack>::<project>::<parent$type>::<name>` -> (type, name)."""
    parts = urn.split("::")
    if len(parts) < 4:
        return "resource", urn
    return parts[2].rsplit("$", 1)[-1], "::".join(parts[3:])


def _host_of(name: str, hosts: list[str]) -> str:
    """The host a resource belongs to: its name is the host's, or starts with `<host>-`."""
    owners = [host for host in hosts if name == host or name.startswith(f"{host}-")]
    return max(owners, key=len) if owners else ""


def _last_line(text: str) -> str:
    """The last line of a CommandError's text (`code: ... stdout: ... stderr: <lines>`)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1].removeprefix("stderr:").strip() if lines else ""
    return _one_line(last) if last else "no output"


def _one_line(text: str) -> str:
    """A diagnostic on one line; long, but never without end (a provider's error message)."""
    line = " ".join(text.split())
    return line if len(line) <= _DIAGNOSTIC_CHARS else line[: _DIAGNOSTIC_CHARS - 3] + "..."


def _cut(text: str) -> str:
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."
