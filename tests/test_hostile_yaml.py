"""Hostile YAML: no spec or stack file can hang a command, and no value crashes the loader.

An alias bomb ("billion laughs"), 150,000 values written out, a file of more than 1 MiB and
nesting 200 deep, each as a model spec and as a stack file, through every command that reads
them: each exits 2 within a few seconds with a located error naming the file, and writes
nothing. Before the limits the alias bomb kept `gpufleet generate` busy for minutes. Values whose YAML constructor raised a bare
Python error (`!!int 0x10`, an integer of 5000 digits, `2026-02-30`) are located errors too.

Real: the Typer app on files on disk, the YAML loader, the Pulumi program's stack loading. Each
hostile run happens in a forked child (the app already imported, so start-up is not counted),
killed if it outlives `HANG_S`; the time it reports is the command's own.
"""

from __future__ import annotations

import importlib
import multiprocessing
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpufleet.cli import app
from gpufleet.spec.yaml_limits import MAX_BYTES, MAX_DEPTH, MAX_VALUES
from infra.program import build_stack
from tests.conftest import snapshot

# What the commands import lazily (mlflow, tritonclient, ansible-runner...), imported here once so
# that the forked children time the command, not the start-up of its libraries.
LAZY_IMPORTS = [
    "generators.ansible_inventory",
    "generators.registry_repository",
    "gpufleet.configure.runner",
    "gpufleet.local.mlflow_server",
    "gpufleet.local.stack_runner",
    "gpufleet.registry.client",
    "infra.proxmox.client",
    "infra.proxmox.preflight",
    "validation.gpu_host",
    "validation.report",
    "validation.tritonserver",
]
for module in LAZY_IMPORTS:
    importlib.import_module(module)

# The goal is well under a second; the bound is generous because other processes share the CPU.
COMMAND_S = 5.0
HANG_S = 60.0


def alias_bomb(first_line: str) -> str:
    """Nine aliases per level, eleven levels: 9**11 (about 3e10) values once expanded."""
    lines = [first_line, 'l0: &a0 ["lol"]']
    lines += [f"l{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 12)]
    return "\n".join(lines) + "\n"


def too_big(first_line: str) -> str:
    """Valid YAML, the bulk in a comment: only its size is wrong."""
    return f"{first_line}\n# {'x' * MAX_BYTES}\n"


def too_many(first_line: str) -> str:
    """No alias, under 1 MiB: 150,000 values written out."""
    return f"{first_line}\nx: [{', '.join(['1'] * 150_000)}]\n"


def too_deep(first_line: str) -> str:
    return f"{first_line}\nx: {'[' * 200}{']' * 200}\n"


HOSTILE: dict[str, tuple[Callable[[str], str], str]] = {
    "alias bomb": (alias_bomb, f"more than {MAX_VALUES:,} values, counting an alias's values"),
    "too many values": (too_many, f"more than {MAX_VALUES:,} values"),
    "too big": (too_big, f"larger than {MAX_BYTES // 1024} KiB"),
    "too deep": (too_deep, f"nests more than {MAX_DEPTH} levels deep"),
}

# Every command that reads model specs (all of them from modelconfigs/, the local stack's too).
MODEL_SPEC_COMMANDS = [
    ["generate", "--out", "out"],
    ["generate", "--stack", "local"],
    ["generate", "--stack", "local", "--check"],
    ["up", "--stack", "local"],
    ["validate", "--stack", "local"],
    ["registry", "seed-demo", "--stack", "local"],
]
# Every command that reads a stack file, here stacks/Pulumi.local.yaml.
STACK_COMMANDS = [
    *MODEL_SPEC_COMMANDS[1:],
    ["down", "--stack", "local"],
    ["configure", "--stack", "local"],
    ["configure", "--stack", "local", "--check"],
    ["preflight", "--stack", "local"],
]


def _run_cli(argv: list[str], results: Connection) -> None:
    started = time.perf_counter()
    result = CliRunner().invoke(app, argv)
    elapsed = time.perf_counter() - started
    crash = None if isinstance(result.exception, SystemExit | None) else repr(result.exception)
    results.send((result.exit_code, result.output, elapsed, crash))


def _run_pulumi_program(stack: str, results: Connection) -> None:
    started = time.perf_counter()
    try:
        build_stack(stack, Path.cwd())
        outcome = "no error"
    except Exception as error:
        outcome = f"{type(error).__name__}: {error}"
    results.send((outcome, time.perf_counter() - started))


def in_child(target: Callable[..., None], *args: object) -> tuple[object, ...]:
    """Run `target(*args, connection)` in a forked child; kill it and fail if it hangs."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=target, args=(*args, sender))
    child.start()
    try:
        if not receiver.poll(HANG_S):
            pytest.fail(f"still running after {HANG_S:.0f} s: {args}")
        return tuple(receiver.recv())
    finally:
        child.kill()
        child.join()


def check_refused(argv: list[str], hostile_file: str, reason: str) -> float:
    """`gpufleet <argv>` exits 2 in time with one located error; returns its time."""
    before = snapshot(Path.cwd())
    exit_code, output, elapsed, crash = in_child(_run_cli, argv)
    assert crash is None, crash
    assert exit_code == 2, output
    assert output.startswith(f"error: {hostile_file}:"), output
    assert reason in output, output
    assert output.count("\n") == 1, output
    assert snapshot(Path.cwd()) == before, "a refused command wrote files"
    assert isinstance(elapsed, float)
    assert elapsed < COMMAND_S, f"gpufleet {' '.join(argv)} took {elapsed:.2f} s"
    print(f"gpufleet {' '.join(argv)}: exit 2 in {elapsed * 1000:.0f} ms")  # for the record
    return elapsed


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_model_spec_is_refused_by_every_command(
    hostile: str, scratch_project: Path
) -> None:
    make, reason = HOSTILE[hostile]
    (scratch_project / "modelconfigs" / "lol.yaml").write_text(make("name: lol"))
    for argv in MODEL_SPEC_COMMANDS:
        check_refused(argv, "modelconfigs/lol.yaml", reason)


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_stack_file_is_refused_by_every_command(
    hostile: str, scratch_project: Path
) -> None:
    make, reason = HOSTILE[hostile]
    (scratch_project / "stacks" / "Pulumi.local.yaml").write_text(
        make("config: {gpufleet:environment: local}")
    )
    for argv in STACK_COMMANDS:
        check_refused(argv, "stacks/Pulumi.local.yaml", reason)


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_stack_file_stops_the_pulumi_program(hostile: str, scratch_project: Path) -> None:
    """The program's own stack loading (`pulumi up` runs it); no resource is registered."""
    make, reason = HOSTILE[hostile]
    stack_file = scratch_project / "stacks" / "Pulumi.onprem-prod.yaml"
    stack_file.write_text(make("config: {gpufleet:environment: proxmox}"))
    outcome, elapsed = in_child(_run_pulumi_program, "onprem-prod")
    assert isinstance(outcome, str)
    assert outcome.startswith(f"RunError: {stack_file}:"), outcome
    assert reason in outcome, outcome
    assert isinstance(elapsed, float)
    assert elapsed < COMMAND_S, elapsed


def test_files_near_the_limits_are_read(scratch_project: Path) -> None:
    """The limits leave room: a spec padded to just under 1 MiB, aliases that expand to a few
    thousand values and nesting 30 deep (in `parameters`, which takes anything) generate."""
    sample = (scratch_project / "modelconfigs" / "tabular_mlp.yaml").read_text()
    padding = MAX_BYTES - len(sample.encode()) - 100
    big = sample + f"# {'x' * padding}\n"
    (scratch_project / "modelconfigs" / "tabular_mlp.yaml").write_text(big)
    stack = scratch_project / "stacks" / "Pulumi.local.yaml"
    stack.write_text(
        stack.read_text()
        + "  x-anchors:\n"
        + "    shared: &shared {a: [1, 2, 3]}\n"
        + "    uses: ["
        + ", ".join(["*shared"] * 500)
        + "]\n"
        + "    deep: "
        + "[" * 30
        + "]" * 30
        + "\n"
    )
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["generate", "--stack", "local", "--out", "out"])
    elapsed = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    assert (scratch_project / "out" / "tabular_mlp" / "config.pbtxt").is_file()
    print(f"generate with a 1 MiB spec and aliases in the stack: {elapsed * 1000:.0f} ms")


# Values PyYAML's constructors raised bare Python errors on (a traceback and exit 1).
UNREADABLE_VALUES = {
    "!!int 0x10": "'0x10' is not a valid int (not decimal digits); write a whole number",
    "1" * 5000: "(5000 characters) is not a valid int (more than 4300 digits)",
    "!!int ''": "'' is not a valid int (not decimal digits)",
    "2026-02-30": "'2026-02-30' is not a valid timestamp (day is out of range for month); write",
    "2026-01-01 25:00:00": "is not a valid timestamp (hour must be in 0..23)",
    "!!timestamp soon": "'soon' is not a valid timestamp; write a real date",
    "!!bool maybe": "'maybe' is not a valid bool; correct the value or remove the !!bool tag",
    "!!float many": "'many' is not a valid float; correct the value or remove the !!float tag",
    "!!float": "'' is not a valid float; correct the value or remove the !!float tag",
}


@pytest.mark.parametrize("value", UNREADABLE_VALUES, ids=lambda value: value[:20])
def test_unreadable_values_are_located_errors(value: str, scratch_project: Path) -> None:
    """In a model spec (generate) and in a stack file (validate), on the value's own line."""
    spec = scratch_project / "modelconfigs" / "tabular_mlp.yaml"
    spec.write_text(spec.read_text().replace("torch_threads: 1", f"torch_threads: {value}"))
    line = spec.read_text().splitlines().index(f"  torch_threads: {value}") + 1
    result = CliRunner().invoke(app, ["generate", "--out", "out"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: modelconfigs/tabular_mlp.yaml:{line}: invalid YAML: ")
    assert UNREADABLE_VALUES[value] in result.output
    assert "Traceback" not in result.output

    stack = scratch_project / "stacks" / "Pulumi.local.yaml"
    stack.write_text(stack.read_text() + f"  gpufleet:note: {value}\n")
    line = len(stack.read_text().splitlines())
    result = CliRunner().invoke(app, ["validate", "--stack", "local"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: stacks/Pulumi.local.yaml:{line}: invalid YAML: ")
    assert UNREADABLE_VALUES[value] in result.output
