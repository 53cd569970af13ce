"""The files layer: the generated files on disk against what the specs generate now, exactly
what `gpufleet generate --check` compares (the same plans: `plan_generated_files`).

One checked object per generated file; a file missing, different (its diff is the item's
`found`) or stale (its spec is gone) is one item, repaired by `gpufleet generate --stack NAME`.

    check = check_files(loaded_stack, specs, repository=Path("build/local/model_repository"))
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from generators.gateway import ModelRoute
from generators.model_repository import RepositoryPlan, diff_plan
from generators.serving_stack.files import plan_generated_files
from gpufleet.drift.items import DriftItem, LayerCheck
from gpufleet.spec.loading import LoadedModelSpec, LoadedStackSpec
from gpufleet.spec.problems import SpecError


def check_files(
    loaded: LoadedStackSpec,
    models: list[LoadedModelSpec],
    *,
    repository: Path,
    project_root: Path = Path(),
    routes: Sequence[ModelRoute] = (),
) -> LayerCheck:
    """Compare the stack's generated files on this machine with what its specs generate (the
    gateway routing `routes`)."""
    started = time.monotonic()
    check = LayerCheck("files", "")
    repair = f"gpufleet generate --stack {loaded.name}"
    try:
        plans = plan_generated_files(repository, models, loaded, project_root, routes)
    except SpecError as error:
        check.error = "could not be checked: " + "; ".join(map(str, error.problems))
    except OSError as error:
        check.error = (
            f"could not be checked: {error.filename or 'a file'}: {error.strerror}; check the "
            "path and its permissions"
        )
    else:
        for plan in plans:
            _compare(plan, check, repair)
    check.seconds = time.monotonic() - started
    return check


def _compare(plan: RepositoryPlan, check: LayerCheck, repair: str) -> None:
    for relative in sorted(set(plan.files) | set(plan.stale)):
        path = f"file {plan.root / relative}"
        check.checked.append(path)
        if relative in plan.created:
            found, expected = "missing", "generated from the specs"
        elif relative in plan.updated:
            single = RepositoryPlan(plan.root, plan.files, updated=[relative])
            found, expected = diff_plan(single), "as generated from the specs"
        elif relative in plan.stale:
            found, expected = "present", "absent: no spec generates it any more"
        else:
            continue
        check.items.append(DriftItem("files", "", path, expected, found, repair))
