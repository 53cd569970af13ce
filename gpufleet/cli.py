"""The `gpufleet` command line: generate Triton configs from specs, export schemas, import configs.

Exit codes: 0 ok, 1 differences found (`generate --check`), 2 bad input or could not run.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console

from generators.model_repository import (
    RepositoryPlan,
    apply_plan,
    diff_plan,
    write_atomically,
)
from generators.schemas import MODEL_SCHEMA_FILE, render_schemas
from generators.serving_stack.files import plan_generated_files
from gpufleet.rollout_cli import rollout_app
from gpufleet.spec.loading import (
    LoadedModelSpec,
    LoadedStackSpec,
    load_model_specs,
    load_stack_spec,
    select_stack_models,
)
from gpufleet.spec.problems import SpecError
from gpufleet.spec.stack import DEFAULT_MODEL_REPOSITORY, GateName

if TYPE_CHECKING:
    from generators.gateway import ModelRoute
    from gpufleet.configure.runner import ConfigureResult
    from gpufleet.local.stack_runner import LocalStack
    from validation.report import GateReport

EXIT_OK, EXIT_DIFFERENT, EXIT_BAD_INPUT = 0, 1, 2
SCHEMA_DIR = Path("schemas")

app = typer.Typer(
    help="Typed specs in, GPU model serving out: generate Triton configs from modelconfigs/*.yaml, "
    "serve a stack's models from the MLflow registry on Triton, and gate it with validation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
registry_app = typer.Typer(
    help="The stack's MLflow model registry.", no_args_is_help=True, add_completion=False
)
app.add_typer(registry_app, name="registry")
app.add_typer(rollout_app, name="rollout")
# soft_wrap: long paths and diffs must stay on one line for CI logs and grep.
# emoji=False: rich would turn `file.yaml:100:` into an emoji.
out = Console(soft_wrap=True, emoji=False)
err = Console(stderr=True, soft_wrap=True, emoji=False)

SpecsOption = Annotated[
    Path, typer.Option("--specs", help="Directory of model specs (one <model>.yaml each).")
]
StacksOption = Annotated[
    Path, typer.Option("--stacks-dir", help="Directory of Pulumi.<stack>.yaml files.")
]
StackOption = Annotated[
    str, typer.Option("--stack", help="Stack name (stacks/Pulumi.<stack>.yaml).")
]


class Gate(enum.StrEnum):
    """The gates `--only` can pick (Typer needs an Enum for a list of choices)."""

    host = "host"
    correctness = "correctness"
    load = "load"


JsonOption = Annotated[
    bool, typer.Option("--json", help="Print the gate reports as JSON (progress goes to stderr).")
]
GateOption = Annotated[
    list[Gate] | None,
    typer.Option("--only", help="Run only this gate (repeatable): host, correctness, load."),
]


class Engine(enum.StrEnum):
    """The load gate's engines (`--engine`)."""

    perf_analyzer = "perf_analyzer"
    python = "python"


EngineOption = Annotated[
    Engine | None,
    typer.Option(
        "--engine",
        help="What the load gate measures with: Triton's perf_analyzer or gpufleet's Python "
        "client (default: perf_analyzer where found and able to read Triton's statistics; the "
        "report names the engine, its version and why).",
    ),
]
OutputsOption = Annotated[
    Path | None,
    typer.Option(
        "--outputs",
        help="Proxmox and azure stacks: the JSON of `pulumi stack output --json`, where the "
        "hosts' addresses come from (default: read through Pulumi, where its CLI is installed).",
    ),
]


def _fail(problems: list[str], exit_code: int = EXIT_BAD_INPUT) -> NoReturn:
    for line in problems:
        err.print("error:", line, markup=False)
    raise typer.Exit(exit_code)


@contextlib.contextmanager
def _file_errors_exit() -> Iterator[None]:
    """A file that cannot be read or written is bad input (exit 2), not a traceback."""
    try:
        yield
    except OSError as error:
        where = error.filename or "a file"
        _fail([f"{where}: {error.strerror}; check the path and its permissions"])


def _served(
    loaded: LoadedStackSpec, specs: list[LoadedModelSpec]
) -> tuple[list[LoadedModelSpec], list[ModelRoute]]:
    """The stack's specs and gateway routes as it serves them (a model under an active rollout
    serves two versions: docs/rollout.md), so that `generate` neither reports nor undoes it."""
    from gpufleet.rollout.state import as_served

    try:
        return as_served(specs, Path(loaded.spec.resolved_state_dir(loaded.name)))
    except ValueError as error:
        _fail([str(error)])


@app.command()
def generate(
    stack: Annotated[
        str | None,
        typer.Option(help="Generate only what this stack (stacks/Pulumi.<stack>.yaml) serves."),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Model repository to write (default: the stack's model_repository, "
            "else build/model_repository).",
        ),
    ] = None,
    check: Annotated[
        bool,
        typer.Option(
            "--check", help="Write nothing; exit 1 and print a diff if files on disk differ."
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
    specs_dir: SpecsOption = Path("modelconfigs"),
    stacks_dir: StacksOption = Path("stacks"),
) -> None:
    """Render each model spec to <out>/<model>/config.pbtxt (only files that changed are written);
    with --stack, also each host's serving stack (compose, Prometheus, Grafana) when the stack
    has gpufleet:serving.

    Examples:

      gpufleet generate                       # every spec -> build/model_repository

      gpufleet generate --stack local --check # CI drift check of the local stack
    """
    loaded_stack: LoadedStackSpec | None = None
    routes: list[ModelRoute] = []
    try:
        specs = load_model_specs(specs_dir)
        repository = Path(DEFAULT_MODEL_REPOSITORY)
        if stack is not None:
            loaded_stack = load_stack_spec(stacks_dir, stack)
            specs, routes = _served(loaded_stack, select_stack_models(loaded_stack, specs))
            repository = Path(loaded_stack.spec.model_repository)
        with _file_errors_exit():
            plans = plan_generated_files(out_dir or repository, specs, loaded_stack, routes=routes)
    except SpecError as error:
        _fail([str(problem) for problem in error.problems])
    serving_planned = len(plans) > 1
    if not check:
        with _file_errors_exit():
            for plan in plans:
                apply_plan(plan)
    in_sync = all(plan.in_sync for plan in plans)
    if as_json:
        summary: dict[str, object] = {"ok": in_sync or not check, **_plan_summary(plans[0])}
        if serving_planned:
            summary["serving"] = _plan_summary(plans[1])
        out.print_json(json.dumps(summary))
    elif check:
        for plan in plans:
            if plan.in_sync:
                out.print(f"{len(plan.unchanged)} files in {plan.root} match their specs.")
            else:
                out.print(diff_plan(plan), end="", markup=False)
                err.print(
                    f"{len(plan.created) + len(plan.updated) + len(plan.stale)} files in "
                    f"{plan.root} differ from the specs; run `gpufleet generate` to update them."
                )
    else:
        for plan in plans:
            for verb, names in (("created", plan.created), ("updated", plan.updated)):
                for name in names:
                    out.print(f"{verb} {plan.root / name}")
            for name in plan.stale:
                out.print(f"removed {plan.root / name} (its spec is gone)")
            out.print(
                f"{len(plan.created)} created, {len(plan.updated)} updated, "
                f"{len(plan.unchanged)} unchanged, {len(plan.stale)} removed in {plan.root}"
            )
    if check and not in_sync:
        raise typer.Exit(EXIT_DIFFERENT)


def _plan_summary(plan: RepositoryPlan) -> dict[str, object]:
    return {
        "repository": str(plan.root),
        "created": plan.created,
        "updated": plan.updated,
        "unchanged": plan.unchanged,
        "stale": plan.stale,
    }


@app.command()
def schema(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Directory for the JSON Schema files.")
    ] = SCHEMA_DIR,
) -> None:
    """Write the JSON Schemas of ModelSpec and of stack files, for editor completion and checks.

    Spec files point at them with a first line such as
    `# yaml-language-server: $schema=../schemas/modelspec.schema.json`.
    """
    with _file_errors_exit():
        for name, content in render_schemas().items():
            write_atomically(out_dir / name, content)
            out.print(f"wrote {out_dir / name}")


@app.command("import-config")
def import_config(
    configs: Annotated[
        list[Path], typer.Argument(help="config.pbtxt files of an existing model repository.")
    ],
    out_dir: Annotated[
        Path, typer.Option("--out", help="Directory for the model spec YAML files.")
    ] = Path("modelconfigs"),
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite spec files that already exist.")
    ] = False,
) -> None:
    """Turn existing Triton config.pbtxt files into model specs (<out>/<name>.yaml).

    All configs are checked before anything is written. A config that uses a field the spec
    cannot express is refused with the exact field paths; nothing is dropped silently.
    """
    from generators.triton_import import (
        InvalidImportError,
        UnsupportedConfigError,
        import_config_file,
        spec_to_yaml,
    )

    problems: list[str] = []
    documents: dict[Path, str] = {}
    for config_path in configs:
        try:
            spec = import_config_file(config_path)
        except UnsupportedConfigError as error:
            problems += [
                f"{config_path}: {path}: the model spec cannot express this field; remove it "
                "from the config, or extend ModelSpec and the generator"
                for path in error.field_paths
            ]
            continue
        except InvalidImportError as error:
            problems += [f"{config_path}: {reason}" for reason in error.reasons]
            continue
        except OSError as error:
            problems.append(f"{config_path}: {error.strerror}")
            continue
        except ValueError as error:  # syntax errors and non-UTF-8 text name the file already
            problems.append(str(error))
            continue
        target = out_dir / f"{spec.name}.yaml"
        if target in documents:
            problems.append(f"{config_path}: a second config for model {spec.name!r}")
        elif target.exists() and not force:
            problems.append(f"{config_path}: {target} exists; pass --force to overwrite it")
        else:
            schema_ref = os.path.relpath(SCHEMA_DIR / MODEL_SCHEMA_FILE, out_dir)
            documents[target] = spec_to_yaml(spec, schema_ref=schema_ref)
    if problems:
        _fail(problems)
    with _file_errors_exit():
        for target, document in documents.items():
            write_atomically(target, document)
            out.print(f"wrote {target}")


def _load_local_stack(
    stack: str, specs_dir: Path, stacks_dir: Path, *, as_json: bool = False, models: bool = True
) -> LocalStack:
    """The stack, ready to run; with `as_json` its progress goes to stderr, keeping stdout JSON.

    Without `models` the model specs are not read: `down` must work while a spec is broken.
    """
    from gpufleet.local.stack_runner import LocalStack, StackRunError

    try:
        loaded_stack = load_stack_spec(stacks_dir, stack)
        specs = select_stack_models(loaded_stack, load_model_specs(specs_dir)) if models else []
        return LocalStack(loaded_stack, specs, say=_say_to_stderr if as_json else _say)
    except SpecError as error:
        _fail([str(problem) for problem in error.problems])
    except StackRunError as error:
        _fail([str(error)])


def _gate_names(only: list[Gate] | None) -> list[GateName] | None:
    return [gate.value for gate in only] if only else None


def _engine_name(engine: Engine | None) -> str | None:
    return engine.value if engine else None


def _say(line: str) -> None:
    out.print(line, markup=False, highlight=False)


def _say_to_stderr(line: str) -> None:
    err.print(line, markup=False, highlight=False)


def _finish_with_gates(reports: list[GateReport], reports_dir: Path, as_json: bool) -> NoReturn:
    from validation.report import exit_code, print_report

    code = exit_code(reports)
    verdict = {0: "all gates passed", 1: "a gate failed", 2: "a gate could not run"}[code]
    if as_json:
        summary = {
            "exit_code": code,
            "verdict": verdict,
            "reports_dir": str(reports_dir),
            "gates": [report.to_json() for report in reports],
        }
        out.print_json(json.dumps(summary))
        raise typer.Exit(code)
    for report in reports:
        print_report(report, out)
    out.print(f"{verdict}; reports in {reports_dir}/ (JSON and JUnit XML)", markup=False)
    raise typer.Exit(code)


@contextlib.contextmanager
def _could_not_run() -> Iterator[None]:
    """Errors of servers and the registry are 'could not run' (exit 2), one message each."""
    from generators.registry_repository import AssemblyError
    from gpufleet.local.mlflow_server import MlflowServerError
    from gpufleet.local.stack_runner import StackRunError
    from gpufleet.registry.client import RegistryError
    from validation.tritonserver import TritonError

    try:
        with _file_errors_exit():
            yield
    except (AssemblyError, StackRunError, RegistryError, MlflowServerError, TritonError) as error:
        _fail([str(error)])
    except SpecError as error:
        _fail([str(problem) for problem in error.problems])


@app.command()
def up(
    stack: StackOption = "local",
    only: GateOption = None,
    as_json: JsonOption = False,
    outputs: OutputsOption = None,
    specs_dir: SpecsOption = Path("modelconfigs"),
    stacks_dir: StacksOption = Path("stacks"),
    engine: EngineOption = None,
) -> None:
    """Bring a stack to its spec, then gate it.

    Local stacks: MLflow registry -> model repository -> Triton on this machine -> gates;
    servers keep running after the command (`gpufleet down --stack NAME` stops them).
    Static, proxmox and azure stacks: on every host, configure (Ansible) -> deploy (the model
    repository from the environment's registry, the serving stack) -> gate (host, correctness,
    load). A host stops at its first failed step; the others go on. Only what differs from the
    specs and the registry is changed.

    Exit codes: 0 all gates passed, 1 a step or gate failed, 2 bad input or could not run.
    """
    if _environment_kind(stack, stacks_dir) != "local":
        _run_on_hosts("up", stack, only, as_json, outputs, specs_dir, stacks_dir, engine)
    local_stack = _load_local_stack(stack, specs_dir, stacks_dir, as_json=as_json)
    with _could_not_run():
        reports = local_stack.up(_gate_names(only), load_engine=_engine_name(engine))
    _finish_with_gates(reports, local_stack.paths.reports, as_json)


@app.command()
def validate(
    stack: StackOption = "local",
    only: GateOption = None,
    as_json: JsonOption = False,
    outputs: OutputsOption = None,
    specs_dir: SpecsOption = Path("modelconfigs"),
    stacks_dir: StacksOption = Path("stacks"),
    engine: EngineOption = None,
) -> None:
    """Run the stack's validation gates against what runs now; write JSON and JUnit reports.

    Gates: host (processes, loopback-only ports, repository, disk, file checksums),
    correctness (the registry's golden examples replayed through Triton), load (Triton's
    perf_analyzer, or gpufleet's Python client with its method, against the specs' service
    objectives; see --engine).
    """
    if _environment_kind(stack, stacks_dir) != "local":
        _run_on_hosts("validate", stack, only, as_json, outputs, specs_dir, stacks_dir, engine)
    local_stack = _load_local_stack(stack, specs_dir, stacks_dir, as_json=as_json)
    with _could_not_run():
        reports = local_stack.validate(_gate_names(only), load_engine=_engine_name(engine))
    _finish_with_gates(reports, local_stack.paths.reports, as_json)


def _environment_kind(stack: str, stacks_dir: Path) -> str:
    try:
        return load_stack_spec(stacks_dir, stack).spec.environment
    except SpecError as error:
        _fail([str(problem) for problem in error.problems])


def _run_on_hosts(
    command: str,
    stack: str,
    only: list[Gate] | None,
    as_json: bool,
    outputs: Path | None,
    specs_dir: Path,
    stacks_dir: Path,
    engine: Engine | None = None,
) -> NoReturn:
    """`up` or `validate` on a static, proxmox or azure stack (gpufleet/lifecycle/)."""
    from gpufleet.environment_cli import open_environment, run_environment_command

    environment = open_environment(
        stack, specs_dir=specs_dir, stacks_dir=stacks_dir, outputs_file=outputs, err=err
    )
    run_environment_command(
        command,
        environment,
        gates=_gate_names(only),
        as_json=as_json,
        out=out,
        err=err,
        load_engine=_engine_name(engine),
    )


@app.command()
def rebuild(
    stack: StackOption,
    host: Annotated[str, typer.Option("--host", help="The host of the stack to rebuild.")],
    accept_data_loss: Annotated[
        bool,
        typer.Option(
            "--accept-data-loss",
            help="Go on when what only the host holds cannot be backed up (it is then lost).",
        ),
    ] = False,
    keep_prometheus: Annotated[
        bool,
        typer.Option("--keep-prometheus", help="Back up and restore Prometheus' history too."),
    ] = False,
    host_key_fingerprint: Annotated[
        str | None,
        typer.Option(
            "--host-key-fingerprint",
            help="SHA256:... of the reinstalled host's SSH host key, read on its console "
            "(ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub): the only new key accepted.",
        ),
    ] = None,
    as_json: JsonOption = False,
    outputs: OutputsOption = None,
    specs_dir: SpecsOption = Path("modelconfigs"),
    stacks_dir: StacksOption = Path("stacks"),
) -> None:
    """Rebuild one host from scratch with nothing lost (docs/rebuild.md).

    check -> back up (what only the host holds: the registry, Grafana; verified checksums) ->
    replace the machine (static: you reinstall the OS; proxmox: a new VM) -> configure ->
    deploy -> restore -> fill the model repository -> gate -> verify (the registry equals the
    one before, field by field). Run it again after a failure: it resumes from its backup.

    Exit codes: 0 rebuilt and green, 1 a gate failed or the registry differs, 2 could not run
    or waits for you (the message says what to do).
    """
    from gpufleet.environment_cli import open_environment
    from gpufleet.rebuild.run import RebuildOptions
    from gpufleet.rebuild_cli import run_rebuild

    if _environment_kind(stack, stacks_dir) == "local":
        _fail([f"stack {stack!r} is a local stack: it has no hosts to rebuild"])
    environment = open_environment(
        stack, specs_dir=specs_dir, stacks_dir=stacks_dir, outputs_file=outputs, err=err
    )
    options = RebuildOptions(
        accept_data_loss=accept_data_loss,
        keep_prometheus=keep_prometheus,
        host_key_fingerprint=host_key_fingerprint,
    )
    run_rebuild(environment, host, options, as_json=as_json, out=out, err=err)


@app.command()
def down(
    stack: StackOption = "local",
    specs_dir: SpecsOption = Path("modelconfigs"),
    stacks_dir: StacksOption = Path("stacks"),
) -> None:
    """Stop the servers `gpufleet up` started for the stack (and nothing else)."""
    local_stack = _load_local_stack(stack, specs_dir, stacks_dir, models=False)
    with _could_not_run():
        lines = local_stack.down()
    for line in lines or [f"nothing of stack {stack!r} is running"]:
        _say(line)


@registry_app.command("seed-demo")
def seed_demo_command(
    stack: StackOption = "local",
    specs_dir: SpecsOption = Path("modelconfigs"),
    stacks_dir: StacksOption = Path("stacks"),
) -> None:
    """Build small seeded torch models for the stack's specs, log them with golden examples,
    register them and point their alias (e.g. production) at the new versions.

    Starts the stack's local MLflow server if it is not running (`gpufleet down` stops it).
    """
    local_stack = _load_local_stack(stack, specs_dir, stacks_dir)
    with _could_not_run():
        for version in local_stack.seed_demo():
            _say(f"registered {version.name} version {version.version}")


@app.command()
def configure(
    stack: StackOption = "local",
    limit: Annotated[
        str | None, typer.Option("--limit", help="Configure only this host of the stack.")
    ] = None,
    check: Annotated[
        bool,
        typer.Option(
            "--check", help="Report what would change (exit 1 if anything); change nothing."
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the per-host summary as JSON.")
    ] = False,
    outputs: OutputsOption = None,
    stacks_dir: StacksOption = Path("stacks"),
) -> None:
    """Converge the stack's hosts with Ansible: base packages, NVIDIA driver, CUDA (when asked),
    Docker engine, NVIDIA container runtime (ansible/site.yml, through ansible-runner).

    Exit codes: 0 every host converged (with --check: nothing would change), 1 a host failed or
    was unreachable (with --check: or would change), 2 bad input or Ansible could not run. The
    run's events are kept under build/<stack>/ansible/artifacts/.
    """
    from generators.ansible_inventory import InventoryError
    from gpufleet.configure.runner import ConfigureError, configure_hosts
    from gpufleet.lifecycle.outputs import OutputsError, resolve_addresses

    try:
        spec = load_stack_spec(stacks_dir, stack).spec
        if spec.environment != "local":
            spec = resolve_addresses(stack, spec, outputs_file=outputs, project_root=Path.cwd())
    except SpecError as error:
        _fail([str(problem) for problem in error.problems])
    except OutputsError as error:
        _fail([str(error)])
    say = _say_to_stderr if as_json else _say
    try:
        with _file_errors_exit():
            result = configure_hosts(
                stack, spec, project_root=Path.cwd(), say=say, limit=limit, check=check
            )
    except (InventoryError, ConfigureError) as error:
        _fail([str(error)])
    if as_json:
        out.print_json(json.dumps(result.to_json()))
        raise typer.Exit(result.exit_code)
    _print_configure_summary(result)
    raise typer.Exit(result.exit_code)


def _print_configure_summary(result: ConfigureResult) -> None:
    from rich.table import Table

    mode = " (check mode: nothing was changed)" if result.check else ""
    table = Table(title=f"configure{mode}", title_justify="left")
    for column in ("host", "status", "ok", "changed", "failed", "skipped", "unreachable"):
        table.add_column(column, no_wrap=True)
    colours = {"ok": "green", "changed": "yellow", "failed": "red", "unreachable": "red"}
    for host in result.hosts:
        status = f"[{colours[host.status]}]{host.status}[/]"
        counts = (host.ok, host.changed, host.failed, host.skipped, host.unreachable)
        table.add_row(host.host, status, *(str(count) for count in counts))
    out.print(table)
    for host in result.hosts:
        for problem in host.problems:
            out.print(f"{host.host}: {problem}", markup=False)
    out.print(f"events and output in {result.artifact_dir}/", markup=False)


@app.command()
def preflight(
    stack: StackOption,
    as_json: Annotated[
        bool, typer.Option("--json", help='Print {"ok": ..., "problems": [...]} as JSON.')
    ] = False,
    stacks_dir: StacksOption = Path("stacks"),
) -> None:
    """Check a Proxmox stack's cluster before `pulumi up`: nodes online, the template, room on
    the storage, the GPUs (mappings, IOMMU groups, not passed to other VMs) and the login's
    privileges. Reads only; TLS is always verified.

    The token secret or password comes from the environment variable that
    gpufleet:proxmox.secret_env names (default GPUFLEET_PROXMOX_SECRET). Exit codes: 0 ready,
    2 problems found (all of them are listed) or the check could not run.
    """
    from infra.proxmox.client import MissingSecretError, secret_from_environment
    from infra.proxmox.preflight import check_stack

    try:
        spec = load_stack_spec(stacks_dir, stack).spec
    except SpecError as error:
        _fail([str(problem) for problem in error.problems])
    if spec.proxmox is None:
        _fail(
            [
                f"stack {stack} is a {spec.environment} stack; preflight checks proxmox stacks "
                "(gpufleet:environment: proxmox)"
            ]
        )
    try:
        secret = secret_from_environment(spec.proxmox)
    except MissingSecretError as error:
        _fail([str(error)])
    problems = check_stack(spec, secret, project_root=Path.cwd(), stack=stack)
    if as_json:
        out.print_json(json.dumps({"ok": not problems, "problems": problems}))
        raise typer.Exit(EXIT_BAD_INPUT if problems else EXIT_OK)
    if problems:
        _fail(problems)
    nodes = ", ".join(sorted({host.proxmox.node for host in spec.hosts if host.proxmox}))
    out.print(
        f"preflight passed: {spec.proxmox.endpoint} is ready for {len(spec.hosts)} host(s) on "
        f"node(s) {nodes} (template {spec.proxmox.template_vmid}, storage "
        f"{spec.proxmox.storage})",
        markup=False,
    )


def _numbers(text: str | None, option: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        _fail([f"{option} {text!r}: give whole numbers separated by commas, like 1,2,4"])
    if not values or min(values) < 0:
        _fail([f"{option} {text!r}: give at least one number, none below 0"])
    return values


@app.command("tune")
def tune_command(
    model: Annotated[str, typer.Argument(help="The model to tune (its spec's name).")],
    stack: StackOption = "local",
    exhaustive: Annotated[
        bool, typer.Option("--exhaustive", help="Walk the whole grid instead of climbing.")
    ] = False,
    write: Annotated[
        bool,
        typer.Option("--write", help="Write the chosen settings into the spec (comments kept)."),
    ] = False,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Reports folder (default: <state_dir>/tune/<model>)."),
    ] = None,
    window_s: Annotated[
        float | None,
        typer.Option("--window-s", min=0.05, help="Measurement window (default: the stack's)."),
    ] = None,
    instances: Annotated[
        str | None, typer.Option(help="Instance counts to try, e.g. 1,2,4 (default: by host).")
    ] = None,
    batch_sizes: Annotated[
        str | None, typer.Option(help="max_batch_size values to try, e.g. 1,8,32.")
    ] = None,
    delays_us: Annotated[
        str | None, typer.Option(help="max_queue_delay_us values to try, e.g. 0,500,2000.")
    ] = None,
    repeats: Annotated[
        int,
        typer.Option(min=2, max=10, help="Measurements of each top candidate (the noise)."),
    ] = 3,
    specs_dir: SpecsOption = Path("modelconfigs"),
    stacks_dir: StacksOption = Path("stacks"),
) -> None:
    """Find the batching and instance settings that meet the spec's objectives, on the stack's
    running Triton (configs swapped by explicit load, no restart), and show the spec's diff.

    Objective: the highest throughput whose p99 meets the spec at every concurrency level, then
    the lowest p99 at the lowest level among those within noise and measured again. Reports
    (JSON, PNG, HTML) go to --out. Exit codes: 0 found, 1 no config meets the objectives (the
    closest is shown), 2 bad input or could not run. Local stacks only.
    """
    from gpufleet.tune.command import TuneError, TuneRequest, run_tune
    from gpufleet.tune.report import decision_lines, trial_table
    from gpufleet.tune.space import SpaceLimits

    if _environment_kind(stack, stacks_dir) != "local":
        _fail([f"stack {stack!r}: `gpufleet tune` runs on local stacks only for now"])
    limits = SpaceLimits(
        instance_counts=_numbers(instances, "--instances"),
        max_batch_sizes=_numbers(batch_sizes, "--batch-sizes"),
        delays_us=_numbers(delays_us, "--delays-us"),
    )
    request = TuneRequest(
        model, stack, specs_dir, stacks_dir, exhaustive, write, out_dir, window_s, limits, repeats
    )
    with _could_not_run():
        try:
            outcome = run_tune(request, _say)
        except TuneError as error:
            _fail([str(error)])
    out.print(trial_table(outcome.result))
    for line in decision_lines(outcome.result):
        out.print(line, markup=False, highlight=False)
    if outcome.edit is not None:
        out.print(
            outcome.edit.diff or "the spec's settings are already the best found", markup=False
        )
    for line in outcome.notes:
        out.print(line, markup=False, highlight=False)
    reports = ", ".join(str(path) for path in outcome.reports.values())
    out.print(f"reports: {reports}", markup=False, highlight=False)
    if outcome.exit_code:
        err.print("error: no config meets the objectives; the closest is shown above", markup=False)
    raise typer.Exit(outcome.exit_code)


class DriftLayer(enum.StrEnum):
    """The layers `gpufleet drift --layer` can pick (gpufleet.drift.items.LAYERS)."""

    files = "files"
    triton = "triton"
    hosts = "hosts"
    containers = "containers"
    infrastructure = "infrastructure"


@app.command()
def drift(
    stack: StackOption,
    layer: Annotated[
        list[DriftLayer] | None,
        typer.Option("--layer", help="Check only this layer (repeatable; default: all)."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report as JSON (schemas/drift-report...).")
    ] = False,
    junit: Annotated[
        Path | None,
        typer.Option("--junit", help="Write JUnit XML here: one test case per checked object."),
    ] = None,
    outputs: OutputsOption = None,
    specs_dir: SpecsOption = Path("modelconfigs"),
    stacks_dir: StacksOption = Path("stacks"),
) -> None:
    """Compare the whole environment with its specs and the registry; change nothing.

    Layers: files (what `generate --check` finds), triton (live configs, loaded versions against
    the registry, models no spec names, model files against their lineage), hosts (Ansible check
    mode), containers (running containers against the generated compose), infrastructure (VMs
    against the spec). Every difference is one item naming its layer, host, object, what was
    expected, what was found and the command that repairs it. See docs/drift.md.

    Exit codes: 0 no drift, 1 drift found, 2 something could not be checked (named; the other
    layers are still checked) or bad input.
    """
    from gpufleet.drift.report import table_lines, write_junit
    from gpufleet.drift.run import run_drift
    from gpufleet.lifecycle.environment import LifecycleError
    from gpufleet.lifecycle.outputs import OutputsError

    try:
        report = run_drift(
            stack,
            project_root=Path.cwd(),
            layers=[item.value for item in layer] if layer else None,
            specs_dir=specs_dir,
            stacks_dir=stacks_dir,
            outputs_file=outputs,
        )
    except SpecError as error:
        _fail([str(problem) for problem in error.problems])
    except (OutputsError, LifecycleError) as error:
        _fail([str(error)])
    if junit is not None:
        with _file_errors_exit():
            write_junit(report, junit)
    if as_json:
        out.print_json(json.dumps(report.to_json()))
    else:
        for line in table_lines(report):
            out.print(line, markup=False, highlight=False)
    raise typer.Exit(report.exit_code)
