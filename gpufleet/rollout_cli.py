"""`gpufleet rollout ...`: parse, call gpufleet.rollout.controller, print.

A local stack's rollout acts on this machine's processes (gpufleet/rollout/local_backend.py); a
static, proxmox or azure stack's on every host, over SSH (gpufleet/rollout/hosts_backend.py).

Exit codes: 0 done (or within limits), 1 stopped by the correctness gate or a limit (the
rollout was rolled back), 2 bad input or could not run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from gpufleet.rollout.backend import RolloutBackend
    from gpufleet.rollout.controller import RolloutController, RolloutOutcome

rollout_app = typer.Typer(
    help="Safe model delivery through the stack's gateway: canary, shadow, blue/green "
    "(docs/rollout.md).",
    no_args_is_help=True,
    add_completion=False,
)

ModelOption = Annotated[str, typer.Option("--model", help="The model whose rollout this is.")]
StackOption = Annotated[
    str, typer.Option("--stack", help="Stack name (a local stack, or one with hosts).")
]
SpecsOption = Annotated[Path, typer.Option("--specs", help="Directory of model specs.")]
StacksOption = Annotated[
    Path, typer.Option("--stacks-dir", help="Directory of Pulumi.<stack>.yaml files.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the outcome as JSON.")]


def _run(
    verb: Callable[[RolloutController], RolloutOutcome],
    stack: str,
    model: str,
    specs_dir: Path,
    stacks_dir: Path,
    as_json: bool,
) -> None:
    from gpufleet.cli import _could_not_run, _environment_kind, _fail, _say, _say_to_stderr, out
    from gpufleet.rollout.backend import RolloutError

    say = _say_to_stderr if as_json else _say
    with _could_not_run():
        try:
            backend: RolloutBackend = (
                _local_backend(stack, specs_dir, stacks_dir, as_json)
                if _environment_kind(stack, stacks_dir) == "local"
                else _hosts_backend(stack, specs_dir, stacks_dir, say)
            )
            from gpufleet.rollout.controller import RolloutController

            outcome = verb(RolloutController(backend, model, say=say))
        except RolloutError as error:
            _fail([str(error)])
    if as_json:
        out.print_json(json.dumps(outcome.to_json()))
    else:
        for version, traffic in sorted(outcome.details.get("gateway", {}).items()):
            _say(
                f"  v{version} via gateway: {traffic['requests']} requests, "
                f"{traffic['failures']} failed, p50 {traffic['p50_ms']} ms, "
                f"p99 {traffic['p99_ms']} ms"
            )
        for version, counts in sorted(outcome.details.get("triton", {}).items()):
            _say(f"  v{version} in Triton: {counts['success']} ok, {counts['fail']} failed")
        _say(outcome.message)
        _say(f"history: {backend.state_dir / 'rollout' / f'{model}.json'}")
    raise typer.Exit(outcome.exit_code)


def _local_backend(stack: str, specs_dir: Path, stacks_dir: Path, as_json: bool) -> RolloutBackend:
    from gpufleet.cli import _load_local_stack
    from gpufleet.rollout.local_backend import LocalRolloutBackend

    return LocalRolloutBackend(_load_local_stack(stack, specs_dir, stacks_dir, as_json=as_json))


def _hosts_backend(
    stack: str, specs_dir: Path, stacks_dir: Path, say: Callable[[str], None]
) -> RolloutBackend:
    from gpufleet.cli import err
    from gpufleet.environment_cli import open_environment
    from gpufleet.rollout.hosts_backend import HostsRolloutBackend

    environment = open_environment(
        stack, specs_dir=specs_dir, stacks_dir=stacks_dir, outputs_file=None, err=err
    )
    return HostsRolloutBackend(environment, say=say)


@rollout_app.command()
def start(
    model: ModelOption,
    stack: StackOption = "local",
    as_json: JsonOption = False,
    specs_dir: SpecsOption = Path("modelconfigs"),
    stacks_dir: StacksOption = Path("stacks"),
) -> None:
    """Load the spec's rollout candidate beside the stable version, gate it, open the gateway."""
    _run(lambda c: c.start(), stack, model, specs_dir, stacks_dir, as_json)


@rollout_app.command()
def status(
    model: ModelOption,
    stack: StackOption = "local",
    as_json: JsonOption = False,
    check_only: Annotated[
        bool, typer.Option("--check-only", help="Report a breached limit without rolling back.")
    ] = False,
    specs_dir: SpecsOption = Path("modelconfigs"),
    stacks_dir: StacksOption = Path("stacks"),
) -> None:
    """Per-version traffic, errors and p99; a breached limit rolls the rollout back."""
    _run(lambda c: c.status(act=not check_only), stack, model, specs_dir, stacks_dir, as_json)


@rollout_app.command()
def watch(
    model: ModelOption,
    stack: StackOption = "local",
    interval_s: Annotated[float, typer.Option("--interval", min=0.1)] = 5.0,
    duration_s: Annotated[float, typer.Option("--duration", min=0.0)] = 600.0,
    as_json: JsonOption = False,
    specs_dir: SpecsOption = Path("modelconfigs"),
    stacks_dir: StacksOption = Path("stacks"),
) -> None:
    """Check the limits every --interval seconds for --duration; roll back on a breach."""
    _run(
        lambda c: c.watch(interval_s=interval_s, duration_s=duration_s),
        stack,
        model,
        specs_dir,
        stacks_dir,
        as_json,
    )


@rollout_app.command()
def switch(
    model: ModelOption,
    stack: StackOption = "local",
    as_json: JsonOption = False,
    specs_dir: SpecsOption = Path("modelconfigs"),
    stacks_dir: StacksOption = Path("stacks"),
) -> None:
    """blue_green: send every request to the candidate (green)."""
    _run(lambda c: c.switch(), stack, model, specs_dir, stacks_dir, as_json)


@rollout_app.command()
def promote(
    model: ModelOption,
    stack: StackOption = "local",
    as_json: JsonOption = False,
    specs_dir: SpecsOption = Path("modelconfigs"),
    stacks_dir: StacksOption = Path("stacks"),
) -> None:
    """All traffic to the candidate, the source's alias moved to it, the old version drained."""
    _run(lambda c: c.promote(), stack, model, specs_dir, stacks_dir, as_json)


@rollout_app.command()
def rollback(
    model: ModelOption,
    stack: StackOption = "local",
    as_json: JsonOption = False,
    specs_dir: SpecsOption = Path("modelconfigs"),
    stacks_dir: StacksOption = Path("stacks"),
) -> None:
    """All traffic back to the stable version, the candidate unloaded; safe under load."""
    _run(lambda c: c.rollback(), stack, model, specs_dir, stacks_dir, as_json)
