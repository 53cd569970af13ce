"""`gpufleet tune MODEL --stack NAME`: the run behind the CLI command, on a local stack.

Loads the stack and the model's spec, builds the space for this host, tunes on the stack's
running Triton (locked against a concurrent `gpufleet up`), writes the reports, plans the spec's
edit and, with ``write``, applies it. The CLI (gpufleet/cli.py) only parses and prints.

    outcome = run_tune(TuneRequest("tabular_mlp", "local", Path("modelconfigs"), Path("stacks")))
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from generators.model_repository import render_repository_files
from gpufleet.spec.loading import (
    LoadedModelSpec,
    load_model_spec_file,
    load_model_specs,
    load_stack_spec,
    select_stack_models,
)
from gpufleet.tune.search import TritonStopped, TuneOptions, TuneResult, tune
from gpufleet.tune.space import HostFacts, SpaceError, SpaceLimits, build_space
from gpufleet.tune.trial import TritonTarget, synthetic_request
from gpufleet.tune.write_back import WriteBack, apply_write_back, plan_write_back

Say = Callable[[str], None]
GOLDEN_REPOSITORY = Path("tests") / "golden" / "model_repository"


class TuneError(Exception):
    """Bad input, or the run could not start (exit 2); the message says what to do."""


@dataclass(frozen=True)
class TuneRequest:
    model: str
    stack: str
    specs_dir: Path
    stacks_dir: Path
    exhaustive: bool = False
    write: bool = False
    out_dir: Path | None = None
    window_s: float | None = None
    limits: SpaceLimits = field(default_factory=SpaceLimits)
    repeats: int = 3


@dataclass(frozen=True)
class TuneOutcome:
    result: TuneResult
    reports: dict[str, Path]
    edit: WriteBack | None  # None: nothing meets the objective
    written: bool
    notes: list[str]

    @property
    def exit_code(self) -> int:
        return 0 if self.result.choice.chosen is not None else 1


def run_tune(request: TuneRequest, say: Say) -> TuneOutcome:
    from gpufleet.local.stack_runner import LocalStack

    stack = load_stack_spec(request.stacks_dir, request.stack)
    specs = select_stack_models(stack, load_model_specs(request.specs_dir))
    loaded = next((item for item in specs if item.spec.name == request.model), None)
    if loaded is None:
        served = ", ".join(item.spec.name for item in specs) or "none"
        raise TuneError(
            f"stack {request.stack!r} does not serve {request.model!r} (it serves {served}); "
            f"add it to gpufleet:models in {stack.source.path} or pick another model"
        )
    spec = loaded.spec
    settings = stack.spec.load_gate
    if request.window_s is not None:
        settings = settings.model_copy(update={"window_s": request.window_s})
    host = HostFacts.this_machine()
    try:
        space = build_space(spec, host, request.limits)
        inputs = synthetic_request(spec)
    except (SpaceError, ValueError) as error:
        raise TuneError(str(error)) from None
    mode = "exhaustive" if request.exhaustive else "quick"
    say(
        f"tuning {spec.name} on stack {request.stack} ({mode} search of a grid of "
        f"{len(space.grid())}, {len(space.refused)} refused by the spec's checks)"
    )
    local = LocalStack(stack, specs, say=say)
    with local.serving_triton() as control:
        target = TritonTarget(control, control.grpc_url, control.model_repository, inputs)
        try:
            result = tune(
                spec,
                space,
                target,
                TuneOptions(
                    exhaustive=request.exhaustive, settings=settings, repeats=request.repeats
                ),
                progress=say,
            )
        except (SpaceError, TritonStopped) as error:
            raise TuneError(str(error)) from None
    edit = _plan_edit(loaded, result, host)
    out_dir = request.out_dir or local.paths.root / "tune" / spec.name
    from gpufleet.tune.report import write_reports

    reports = write_reports(result, out_dir, diff=edit.diff if edit else "")
    notes: list[str] = []
    written = False
    if edit is not None and request.write and edit.changes:
        apply_write_back(edit)
        written = True
        notes.append(
            f"wrote {edit.path}; `gpufleet generate --check --stack {request.stack}` shows the "
            "config.pbtxt change, `gpufleet up` serves it"
        )
        notes.extend(golden_notes(edit.path))
    return TuneOutcome(result, reports, edit, written, notes)


def _plan_edit(loaded: LoadedModelSpec, result: TuneResult, host: HostFacts) -> WriteBack | None:
    chosen = result.choice.chosen
    if chosen is None:
        return None
    if chosen.baseline:
        text = loaded.path.read_text(encoding="utf-8")
        return WriteBack(loaded.path, text, text)
    tuned = result.space.spec_for(chosen.candidate)
    levels = result.objective.levels
    p99 = "/".join(f"{value:.1f}" for value in chosen.p99_ms)
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    comment = (
        f"{date} on {host.name or 'this host'} ({host.cpus} CPUs), {result.mode} search, "
        f"{len(result.trials)} trials: {chosen.throughput_per_s:.0f}/s at c={levels[-1]}, "
        f"p99 {p99} ms at c={'/'.join(map(str, levels))}, noise "
        f"±{result.noise.throughput:.0%}"
    )
    try:
        return plan_write_back(loaded.path, tuned, comment, instances=result.space.tunes_instances)
    except Exception as error:
        raise TuneError(str(error)) from None


def golden_notes(path: Path) -> list[str]:
    """Whether the project's golden config of this spec is now stale (sample specs only)."""
    written = load_model_spec_file(path)
    relative = f"{written.spec.name}/config.pbtxt"
    golden = GOLDEN_REPOSITORY / relative
    if not golden.is_file():
        return []
    rendered = render_repository_files([replace(written)])[relative]
    if rendered == golden.read_text(encoding="utf-8"):
        return []
    return [
        f"{golden} no longer matches the spec: tests/test_golden.py fails until you run "
        "`make golden` (gpufleet generate --out tests/golden/model_repository) and commit it"
    ]
