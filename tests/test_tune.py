"""`gpufleet tune`'s core: the search space against the spec's own checks, the write-back
keeping comments and formatting, and searches on a real Triton (a config Triton refuses is
recorded and skipped, an objective nothing meets gives the closest, the quick search finds the
exhaustive search's best on a small grid).

Real: the `tritonserver` 2.51 binary from the nvidia-pytriton wheel (CPU, python backend,
loopback) serving the seeded torch MLP of tests/data/python_models/torch_mlp.py, which sleeps
20 ms per execution so that batch size and instance count change the throughput by 2x steps,
far beyond the noise of this busy machine; candidate configs loaded through Triton's load API
with a config override; the load gate's measure_level; ruamel.yaml on a copy of the sample spec.
Not real: the host's GPU count where a test says so (HostFacts with one GPU, so that the space
holds a KIND_GPU candidate Triton on this GPU-less machine must refuse). Windows are 0.2 s.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from generators.triton_config import render_config_pbtxt
from gpufleet.spec.loading import load_model_spec_file, model_spec_hash
from gpufleet.spec.model import ModelSpec
from gpufleet.spec.model_checks import check_model_spec
from gpufleet.spec.stack import LoadGateSettings
from gpufleet.tune.command import _plan_edit
from gpufleet.tune.objective import Objective, assess_all, choose, measure_noise
from gpufleet.tune.report import pareto_front, write_reports
from gpufleet.tune.search import TritonStopped, TuneOptions, TuneResult, tune
from gpufleet.tune.space import (
    Candidate,
    HostFacts,
    SpaceError,
    SpaceLimits,
    build_space,
)
from gpufleet.tune.trial import LevelResult, Trial, TrialRequest, TritonTarget, synthetic_request
from gpufleet.tune.write_back import COMMENT_PREFIX, apply_write_back, plan_write_back
from tests.conftest import SAMPLE_SPECS
from validation.tritonserver import LocalTritonServer

PYTHON_MODELS = Path(__file__).parent / "data" / "python_models"
CPU_HOST = HostFacts(cpus=2)
SPEC: dict[str, Any] = {
    "name": "mlp",
    "backend": "python",
    "max_batch_size": 8,
    "inputs": [{"name": "features", "dtype": "fp32", "shape": [16]}],
    "outputs": [{"name": "scores", "dtype": "fp32", "shape": [4]}],
    "dynamic_batching": {"max_queue_delay_us": 1000, "preferred_batch_sizes": [8]},
    "instance_groups": [{"kind": "cpu", "count": 1}],
    "parameters": {"execute_delay_ms": "20"},
    "objectives": {"p99_latency_ms": 2000, "concurrency": [8]},
}
SETTINGS = LoadGateSettings(window_s=0.2, stable_windows=2, stability_percent=30, max_windows=6)
OPTIONS = TuneOptions(settings=SETTINGS, top=2, repeats=2)


def spec_with(**changes: Any) -> ModelSpec:
    return ModelSpec.model_validate({**SPEC, **changes})


# -- the space ---------------------------------------------------------------------------------


def test_space_holds_only_candidates_the_specs_checks_accept() -> None:
    """A warmup of batch 8 makes max_batch_size < 8 invalid: those are refused, never tried."""
    warmup = [
        {
            "name": "w",
            "batch_size": 8,
            "inputs": {"features": {"dtype": "fp32", "shape": [16], "data": "zero"}},
        }
    ]
    spec = spec_with(warmup=warmup)
    space = build_space(spec, CPU_HOST)
    grid = space.grid()
    assert grid
    assert {candidate.max_batch_size for candidate in grid} == {8, 16, 32, 64}
    refused = {item.candidate.max_batch_size for item in space.refused}
    assert refused == {1, 2, 4}
    assert all("warmup batch_size" in item.reason for item in space.refused)
    for candidate in grid:
        tuned = space.spec_for(candidate)
        assert check_model_spec(tuned) == []
        assert tuned.warmup == spec.warmup  # what the tuner does not tune stays as written


def test_dependent_settings_are_derived_so_the_specs_own_values_refuse_nothing() -> None:
    """The sample's preferred sizes 8/16 never make a max_batch_size of 1, 2 or 4 invalid
    (Model Analyzer's quick search called every such candidate illegal)."""
    spec = load_model_spec_file(SAMPLE_SPECS / "tabular_mlp.yaml").spec
    space = build_space(spec, CPU_HOST)
    assert space.refused == []
    assert {1, 2, 4} <= {candidate.max_batch_size for candidate in space.grid()}
    for candidate in space.grid():
        batching = space.spec_for(candidate).dynamic_batching
        assert batching is not None
        assert all(size <= candidate.max_batch_size for size in batching.preferred_batch_sizes)
        assert batching.default_queue_policy == spec.dynamic_batching.default_queue_policy  # type: ignore[union-attr]
    # Below the p99 objective of 50 ms every delay may be tried; a delay of 1 s never.
    assert max(space.axes["max_queue_delay_us"]) < 50_000


def test_preferred_sizes_include_the_batch_each_named_level_can_fill() -> None:
    """At c=8 no more than 8 requests wait: a batcher preferring 64 waits out its delay every
    time. The space offers the level's batch (8) beside none and max_batch_size; the sample's
    own [8, 16] snaps to it, so the quick search starts at the sample's behaviour; where 8 is
    not below max_batch_size it is max_batch_size itself, and the climb steps over it."""
    spec = load_model_spec_file(SAMPLE_SPECS / "tabular_mlp.yaml").spec
    space = build_space(spec, CPU_HOST)
    assert space.axes["preferred"] == ("none", "8", "max")
    start = space.snap(spec)
    assert (start.instance_count, start.max_batch_size, start.max_queue_delay_us) == (2, 64, 2000)
    assert start.preferred_batch_sizes == [8]
    assert space.spec_for(start).dynamic_batching.preferred_batch_sizes == [8]  # type: ignore[union-attr]
    grid = space.grid()
    assert Candidate(1, 16, 500, "8") in grid
    assert Candidate(1, 8, 500, "8") not in grid  # the same as max: tried once, as max
    assert Candidate(1, 8, 500, "max") in grid
    at_eight = Candidate(1, 8, 500, "max")
    assert space.neighbour(at_eight, "preferred", -1) == Candidate(1, 8, 500, "none")
    assert space.neighbour(at_eight, "preferred", 1) is None
    two_levels = spec_with(objectives={"p99_latency_ms": 50, "concurrency": [1, 4, 16]})
    assert build_space(two_levels, CPU_HOST).axes["preferred"] == ("none", "4", "16", "max")


def test_space_is_bounded_by_the_backend_the_host_and_the_objective() -> None:
    trt = spec_with(backend="tensorrt", max_batch_size=16, parameters={})
    with pytest.raises(SpaceError, match="runs on a GPU only and this host has no GPU"):
        build_space(trt, CPU_HOST)
    gpu_space = build_space(trt, HostFacts(cpus=2, gpus=1))
    assert gpu_space.kinds == ("gpu",)
    assert max(gpu_space.axes["max_batch_size"]) == 16  # a TensorRT plan's own bound
    assert build_space(spec_with(), CPU_HOST).kinds == ("cpu",)
    tight = spec_with(objectives={"p99_latency_ms": 0.6, "concurrency": [1]})
    assert build_space(tight, CPU_HOST).axes["max_queue_delay_us"] == (0, 100, 500)
    with pytest.raises(SpaceError, match="ensemble"):
        build_space(load_model_spec_file(SAMPLE_SPECS / "image_classifier.yaml").spec, CPU_HOST)


# -- write-back --------------------------------------------------------------------------------


def test_write_back_keeps_comments_and_formatting(tmp_path: Path) -> None:
    path = tmp_path / "tabular_mlp.yaml"
    shutil.copy(SAMPLE_SPECS / "tabular_mlp.yaml", path)
    original = path.read_text()
    spec = load_model_spec_file(path).spec
    space = build_space(spec, CPU_HOST)
    tuned = space.spec_for(Candidate(3, 4, 100, "none"))

    edit = plan_write_back(path, tuned, "2026-01-01 on testhost: 123/s", instances=True)
    apply_write_back(edit)

    text = path.read_text()
    assert load_model_spec_file(path).spec == tuned
    comments = [line for line in original.splitlines() if line.lstrip().startswith("#")]
    assert all(line in text.splitlines() for line in comments)
    assert f"{COMMENT_PREFIX}2026-01-01 on testhost: 123/s\nmax_batch_size: 4\n" in text
    removed = [x for x in edit.diff.splitlines() if x.startswith("-") and not x.startswith("---")]
    added = [x for x in edit.diff.splitlines() if x.startswith("+") and not x.startswith("+++")]
    assert removed == [
        "-max_batch_size: 64",
        "-  max_queue_delay_us: 2000",
        "-  preferred_batch_sizes: [8, 16]",
        "-    count: 2",
    ]
    assert added == [
        f"+{COMMENT_PREFIX}2026-01-01 on testhost: 123/s",
        "+max_batch_size: 4",
        "+  max_queue_delay_us: 100",
        "+    count: 3",
    ]
    # A second tuning keeps the flow style of a list it adds, and replaces the old comment.
    again = plan_write_back(
        path, space.spec_for(Candidate(1, 16, 0, "max")), "later", instances=True
    )
    apply_write_back(again)
    text = path.read_text()
    assert text.count(COMMENT_PREFIX) == 1
    assert "  preferred_batch_sizes: [16]\n" in text
    assert yaml.safe_load(text)["instance_groups"] == [{"kind": "cpu", "count": 1}]


# -- on a real Triton ----------------------------------------------------------------------------


def write_repository(root: Path) -> Path:
    spec = spec_with()
    repository = root / "model_repository"
    (repository / "mlp" / "1").mkdir(parents=True)
    config = render_config_pbtxt(spec, "mlp.yaml", model_spec_hash(spec))
    (repository / "mlp" / "config.pbtxt").write_text(config)
    shutil.copy(PYTHON_MODELS / "torch_mlp.py", repository / "mlp" / "1" / "model.py")
    return repository


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTritonServer]:
    root = tmp_path_factory.mktemp("tune")
    with LocalTritonServer(write_repository(root), root / "triton", load_models=["mlp"]) as server:
        yield server


def run(
    served: LocalTritonServer,
    spec: ModelSpec,
    limits: SpaceLimits,
    *,
    exhaustive: bool,
    host: HostFacts = CPU_HOST,
) -> TuneResult:
    space = build_space(spec, host, limits)
    target = TritonTarget(served, served.grpc_url, served.model_repository, synthetic_request(spec))
    options = TuneOptions(settings=SETTINGS, top=2, repeats=2, exhaustive=exhaustive)
    return tune(spec, space, target, options)


def test_a_config_triton_refuses_is_recorded_and_skipped(
    served: LocalTritonServer, tmp_path: Path
) -> None:
    """The host is said to have a GPU, so the grid holds a KIND_GPU candidate; Triton on this
    GPU-less machine refuses to load it. The run goes on and picks a CPU config."""
    limits = SpaceLimits(
        instance_counts=(1,), max_batch_sizes=(4,), delays_us=(0,), preferred=("none",)
    )
    result = run(served, spec_with(), limits, exhaustive=True, host=HostFacts(cpus=2, gpus=1))

    refused = [trial for trial in result.trials if not trial.loaded]
    assert [trial.candidate.kind for trial in refused] == ["gpu"]
    assert "KIND_GPU" in refused[0].load_error
    assert refused[0].levels == ()
    assert result.choice.chosen is not None
    assert result.choice.chosen.candidate.kind == "cpu"
    # Triton is back on the repository's config when the run ends.
    config = served.model_config("mlp")
    assert config["max_batch_size"] == 8
    assert config["dynamic_batching"]["preferred_batch_size"] == [8]
    # The reports show every trial, the refused one included.
    paths = write_reports(result, tmp_path / "reports", diff="")
    assert paths["png"].read_bytes().startswith(b"\x89PNG")
    assert "load failed" in paths["html"].read_text()
    assert "data:image/png;base64," in paths["html"].read_text()


def test_an_objective_no_config_meets_gives_the_closest(served: LocalTritonServer) -> None:
    spec = spec_with(objectives={"p99_latency_ms": 0.001, "concurrency": [2, 8]})
    limits = SpaceLimits(
        instance_counts=(1, 2), max_batch_sizes=(4,), delays_us=(0,), preferred=("none",)
    )
    result = run(served, spec, limits, exhaustive=False)

    assert result.choice.chosen is None
    closest = result.choice.closest
    assert closest is not None
    assert closest.loaded
    assert not closest.meets
    assert closest.violation > 1
    measured = [item for item in result.assessments if item.loaded and not item.baseline]
    assert closest.violation == min(item.violation for item in measured)
    assert "no candidate meets" in result.choice.decided_by


def test_quick_search_finds_the_exhaustive_best_on_a_small_grid(served: LocalTritonServer) -> None:
    """With 20 ms per execution at concurrency 8: 1x1 ~50/s, 2x1 ~100/s, 1x4 ~200/s and
    2x4 ~400/s, steps far larger than this machine's noise."""
    limits = SpaceLimits(
        instance_counts=(1, 2), max_batch_sizes=(1, 4), delays_us=(0,), preferred=("none",)
    )
    # The spec as written serves one request per execution (~50/s): the best candidate beats it
    # far beyond the noise, so both searches must replace it, and with the same config.
    slow = spec_with(max_batch_size=1, dynamic_batching={"max_queue_delay_us": 0})
    quick = run(served, slow, limits, exhaustive=False)
    exhaustive = run(served, slow, limits, exhaustive=True)

    assert exhaustive.configs_tried == 4
    assert quick.configs_tried <= exhaustive.configs_tried
    for result in (quick, exhaustive):
        # After the first two figures of the spec as written, no config is measured twice in
        # a row (a load over itself shares that load's state), and the spec as written is
        # measured again beside the top candidates.
        order = [(trial.candidate, trial.baseline) for trial in result.trials[2:]]
        assert all(one != other for one, other in itertools.pairwise(order)), order
        assert sum(trial.baseline for trial in result.trials) > 2
    assert quick.choice.chosen is not None
    assert exhaustive.choice.chosen is not None
    assert not exhaustive.choice.chosen.baseline, exhaustive.choice.decided_by
    assert quick.choice.chosen.candidate == exhaustive.choice.chosen.candidate
    assert exhaustive.choice.chosen.candidate == Candidate(2, 4, 0, "none")
    assert exhaustive.noise.measurements >= 4  # the spec twice, the top two twice each
    assert Objective.of(spec_with()).levels == (8,)


def test_a_spec_no_candidate_beats_is_kept_and_the_diff_is_empty(
    served: LocalTritonServer, tmp_path: Path
) -> None:
    """Real Triton, 20 ms per execution: the spec as written (2 instances, batches of 8, about
    800/s) against a grid of one instance without batching (about 50/s). The run keeps the
    spec, says why, and the edit `--write` would make changes nothing."""
    spec = spec_with(instance_groups=[{"kind": "cpu", "count": 2}])
    limits = SpaceLimits(
        instance_counts=(1,), max_batch_sizes=(1,), delays_us=(0,), preferred=("none",)
    )
    result = run(served, spec, limits, exhaustive=True)

    chosen = result.choice.chosen
    assert chosen is not None
    assert chosen.baseline, result.choice.decided_by
    assert result.choice.decided_by.startswith("the spec as written: the best candidate (1xcpu")
    path = tmp_path / "mlp.yaml"
    path.write_text(
        yaml.safe_dump(SPEC | {"instance_groups": spec.model_dump()["instance_groups"]})
    )
    edit = _plan_edit(load_model_spec_file(path), result, CPU_HOST)
    assert edit is not None
    assert edit.new_text == edit.old_text == path.read_text()
    assert edit.diff == ""


def test_pareto_front_keeps_points_no_other_beats() -> None:
    points = [(1.0, 10.0), (2.0, 30.0), (3.0, 20.0), (4.0, 40.0), (1.5, 5.0)]
    assert pareto_front(points) == [(1.0, 10.0), (2.0, 30.0), (4.0, 40.0)]


def test_a_written_sample_spec_says_its_golden_file_is_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After --write on a sample spec, the golden test is told: the tuner names the stale
    golden file and `make golden`; an unchanged spec gives no such note."""
    from gpufleet.tune.command import GOLDEN_REPOSITORY, golden_notes
    from tests.conftest import GOLDEN_REPOSITORY as PROJECT_GOLDEN

    monkeypatch.chdir(tmp_path)
    golden = GOLDEN_REPOSITORY / "tabular_mlp" / "config.pbtxt"
    golden.parent.mkdir(parents=True)
    shutil.copy(PROJECT_GOLDEN / "tabular_mlp" / "config.pbtxt", golden)
    spec_path = tmp_path / "modelconfigs" / "tabular_mlp.yaml"
    spec_path.parent.mkdir()
    shutil.copy(SAMPLE_SPECS / "tabular_mlp.yaml", spec_path)
    assert golden_notes(spec_path) == []

    space = build_space(load_model_spec_file(spec_path).spec, CPU_HOST)
    tuned = space.spec_for(Candidate(1, 8, 0, "none"))
    apply_write_back(plan_write_back(spec_path, tuned, "test", instances=True))
    notes = golden_notes(spec_path)
    assert len(notes) == 1
    assert str(golden) in notes[0]
    assert "make golden" in notes[0]


def test_a_triton_that_dies_ends_the_run_at_once(tmp_path: Path) -> None:
    """A refused config is skipped, but a dead server is not a config: the run stops at the
    first trial after Triton died instead of recording every later candidate as refused (seen
    in bench/tune.py: 56 "refused" trials after Triton went away). Real: a Triton of its own,
    killed with SIGKILL by the progress callback after the first measured candidate."""
    limits = SpaceLimits(
        instance_counts=(1, 2), max_batch_sizes=(1, 4), delays_us=(0,), preferred=("none",)
    )
    spec = spec_with()
    space = build_space(spec, CPU_HOST, limits)
    with LocalTritonServer(
        write_repository(tmp_path), tmp_path / "triton", load_models=["mlp"]
    ) as server:
        target = TritonTarget(
            server, server.grpc_url, server.model_repository, synthetic_request(spec)
        )
        seen: list[str] = []

        def progress(line: str) -> None:
            seen.append(line)
            if sum("trial" in item for item in seen) == 3 and server.pid is not None:
                os.killpg(server.pid, signal.SIGKILL)  # after the spec twice and one candidate

        options = TuneOptions(settings=SETTINGS, top=2, repeats=2, exhaustive=True)
        with pytest.raises(TritonStopped, match="stopped answering during trial 4"):
            tune(spec, space, target, options, progress=progress)
    trial_lines = [line for line in seen if line.lstrip().startswith("trial")]
    assert len(trial_lines) == 4, trial_lines


def figures(
    candidate: Candidate, per_s: list[float], p99_ms: float, *, baseline: bool = False
) -> list[Trial]:
    """Trials of ``candidate`` at c=8 with these throughputs (the measurements are the input)."""
    return [
        Trial(
            number,
            candidate,
            (LevelResult(8, value, p99_ms, p99_ms / 2, 0, True),),
            baseline=baseline,
            repeat=number,
        )
        for number, value in enumerate(per_s)
    ]


@pytest.mark.parametrize(
    ("pick_per_s", "pick_p99_ms", "written_p99_ms", "kept"),
    [
        ([5000, 5100, 4900], 4.5, 4.5, True),  # within the noise on both counts
        ([6000, 6100, 5900], 4.4, 4.5, False),  # a higher throughput, beyond the noise
        ([5000, 5100, 4900], 2.5, 4.5, False),  # the same throughput, a lower p99
        ([5000, 5100, 4900], 4.4, 60.0, False),  # the spec as written misses the 50 ms p99
    ],
)
def test_the_spec_as_written_is_kept_unless_the_pick_beats_it_beyond_the_noise(
    pick_per_s: list[float], pick_p99_ms: float, written_p99_ms: float, kept: bool
) -> None:
    """The decision alone, on given figures (no server). The spec as written read 4,700-5,000/s
    (noise ±6%, the largest spread of a repeated candidate): a pick within that is no change."""
    objective = Objective((8,), 50.0, None)
    written = Candidate(2, 16, 2000, "max")
    pick = Candidate(4, 8, 2000, "max")
    trials = figures(written, [4700, 5000, 4800], written_p99_ms, baseline=True)
    trials += figures(pick, pick_per_s, pick_p99_ms)
    assessments = assess_all(objective, trials)
    choice = choose(assessments, measure_noise(assessments))

    assert choice.chosen is not None
    assert choice.chosen.baseline is kept, choice.decided_by
    if kept:
        assert choice.decided_by.startswith("the spec as written: the best candidate")
    else:
        assert choice.chosen.candidate == pick


def test_a_candidate_whose_figures_swing_blurs_only_its_own_comparisons() -> None:
    """Given figures (no server). A third candidate read 5,400/s, 2,000/s and 5,500/s (the
    swing one config showed on tabular_mlp): its spread (±65%) must not hide that the pick's
    6,000/s beats the spec's 4,800/s (each repeated within ±6%). The typical spread is the
    median over the repeated candidates, and the swinging one's own spread still applies to it."""
    objective = Objective((8,), 50.0, None)
    written = Candidate(2, 16, 2000, "max")
    pick = Candidate(4, 8, 2000, "max")
    swinging = Candidate(1, 32, 500, "max")
    trials = figures(written, [4700, 5000, 4800], 4.5, baseline=True)
    trials += figures(pick, [6000, 6100, 5900], 4.4)
    trials += figures(swinging, [5400, 2000, 5500], 4.4)
    assessments = assess_all(objective, trials)
    noise = measure_noise(assessments)
    by_candidate = {item.candidate: item for item in assessments if not item.baseline}

    assert noise.throughput == pytest.approx(0.0625, abs=1e-3)  # the written spec's 300/4800
    assert noise.between(by_candidate[pick], by_candidate[swinging]).throughput > 0.6
    choice = choose(assessments, noise)
    assert choice.chosen is not None
    assert choice.chosen.candidate == pick, choice.decided_by
    assert "the largest own spread: throughput ±64.8%" in noise.text


def test_one_outlier_among_four_measurements_of_the_spec_does_not_hide_a_faster_pick() -> None:
    """Given figures (no server), as sleepy_mlp read on a quiet machine: the spec as written at
    1,382-1,490/s and once 2,067/s, a candidate at 1,949-2,073/s. From four measurements on, the
    one farthest from the median is left out of the spread: the spec's spread is 7.5%, not 47%,
    and the pick replaces it. With three measurements nothing is left out."""
    objective = Objective((8,), 50.0, None)
    written = Candidate(1, 32, 1000, "8")
    pick = Candidate(3, 32, 500, "8")
    trials = figures(written, [1400, 1382, 2067, 1490], 7.0, baseline=True)
    trials += figures(pick, [1949, 2073, 2033], 6.0)
    assessments = assess_all(objective, trials)
    noise = measure_noise(assessments)
    by_key = {item.key: item for item in assessments}

    assert noise.own[(written, True)].throughput == pytest.approx(108 / 1445, abs=1e-3)
    assert noise.own[(pick, False)].throughput == pytest.approx(124 / 2033, abs=1e-3)
    assert noise.between(by_key[(pick, False)], by_key[(written, True)]).throughput < 0.08
    choice = choose(assessments, noise)
    assert choice.chosen is not None
    assert choice.chosen.candidate == pick, choice.decided_by
    assert not choice.chosen.baseline


@pytest.mark.parametrize(
    ("written_per_s", "kept"),
    [
        ([2122, 2022, 1960, 1459], False),  # two steady states: taken at its lower one
        ([2100, 2060, 2120, 2090], True),  # steady, within the noise of the pick
    ],
)
def test_a_spec_as_written_with_two_steady_states_is_taken_at_its_lower_state(
    written_per_s: list[float], kept: bool
) -> None:
    """Given figures (no server): sleepy_mlp's quick search 1 of run F, as measured on a quiet
    machine. The spec as written read high three times and 1,459/s once; the rule before kept
    it against 4 instances at 2,075-2,121/s (side by side later: 1,446/s against 2,213/s). A
    span of more than three typical spreads is more than one steady state, and such a spec is
    taken at its lowest reading against a steady pick. A spec as steady as the candidates is
    still kept when the pick is within the noise."""
    objective = Objective((8,), 50.0, None)
    written = Candidate(1, 32, 500, "8")
    trials = figures(written, written_per_s, 6.0, baseline=True)
    trials += figures(Candidate(2, 32, 500, "8"), [2089, 2096, 1917], 6.0)
    trials += figures(Candidate(3, 32, 500, "8"), [2132, 2104, 2056], 6.0)
    trials += figures(Candidate(4, 32, 500, "8"), [2107, 2121, 2075], 6.0)
    assessments = assess_all(objective, trials)
    noise = measure_noise(assessments)
    choice = choose(assessments, noise)

    assert choice.chosen is not None
    assert choice.chosen.baseline is kept, choice.decided_by
    if kept:
        assert choice.decided_by.startswith("the spec as written: the best candidate")
    else:
        assert choice.chosen.candidate == Candidate(4, 32, 500, "8")
        assert "read 1459-2122/s, more than one steady state" in choice.decided_by


def two_level_figures(
    candidate: Candidate, readings: list[tuple[float, float]], *, baseline: bool = False
) -> list[Trial]:
    """Trials at c=1 and c=8: each reading is (p99 at c=1 in ms, throughput at c=8 per s)."""
    return [
        Trial(
            number,
            candidate,
            (
                LevelResult(1, per_s / 7, p99_ms, p99_ms / 2, 0, True),
                LevelResult(8, per_s, 5.0, 2.5, 0, True),
            ),
            baseline=baseline,
            repeat=number,
        )
        for number, (p99_ms, per_s) in enumerate(readings)
    ]


@pytest.mark.parametrize(
    ("low_p99_readings", "low_p99_wins"),
    [
        ([(3.517, 2088.6)], False),  # as measured: once, its p99 never confirmed
        ([(3.517, 2088.6), (3.6, 2160.0), (3.4, 2150.0)], True),  # confirmed twice
    ],
)
def test_only_candidates_measured_again_are_told_apart_by_their_p99(
    low_p99_readings: list[tuple[float, float]], low_p99_wins: bool
) -> None:
    """Given figures (no server): sleepy_mlp's quick search 3 of run H, as measured on a quiet
    machine. Within the throughput noise of the best (3 instances, batch 16: 2,142-2,199/s, p99
    at c=1 6.1-6.6 ms), one candidate measured once read a p99 of 3.5 ms at c=1. The rule before
    picked it; side by side it served 0.91 of the exhaustive pick, its p99 not lower. One p99
    reading at c=1 is a draw from a wide spread (typical ±33% to ±80% in run H): it tells apart only
    candidates measured more than once. Measured three times and still low, it wins."""
    objective = Objective((1, 8), 50.0, None)
    best = Candidate(3, 16, 0, "max")
    low_p99 = Candidate(3, 32, 500, "8")
    trials = two_level_figures(
        Candidate(1, 32, 500, "8"),
        [(7.717, 2067.2), (4.375, 1466.6), (8.346, 1269.1), (7.774, 1531.7)],
        baseline=True,
    )
    trials += two_level_figures(best, [(6.107, 2142.0), (6.623, 2190.4), (6.621, 2199.2)])
    trials += two_level_figures(
        Candidate(4, 8, 0, "max"), [(6.604, 2151.5), (4.823, 2291.7), (3.835, 2165.4)]
    )
    trials += two_level_figures(
        Candidate(3, 8, 0, "max"), [(3.317, 2193.4), (8.031, 2146.3), (5.174, 2113.4)]
    )
    trials += two_level_figures(low_p99, low_p99_readings)
    assessments = assess_all(objective, trials)
    choice = choose(assessments, measure_noise(assessments))

    assert low_p99 in {item.candidate for item in choice.within_noise}, choice.decided_by
    assert choice.chosen is not None
    assert choice.chosen.candidate == (low_p99 if low_p99_wins else best), choice.decided_by
    assert choice.decided_by.startswith(
        "p99 at the lowest level" if low_p99_wins else "throughput: "
    ), choice.decided_by


# tabular_mlp's quick search 1 of run J, as measured on a quiet machine, in trial order: the
# configuration (None: the spec as written), then throughput at c=8 and p99 there.
RUN_J_QUICK_1: list[tuple[Candidate | None, float, float]] = [
    (None, 4405.1, 5.11),
    (None, 4089.4, 5.748),
    (Candidate(2, 64, 2000, "8"), 4451.1, 4.272),
    (Candidate(3, 64, 2000, "8"), 3874.5, 3.49),
    (Candidate(4, 64, 2000, "8"), 4417.1, 2.994),
    (Candidate(1, 64, 2000, "8"), 4187.5, 2.97),
    (Candidate(2, 32, 2000, "8"), 2940.1, 7.523),
    (Candidate(2, 16, 2000, "8"), 3485.5, 5.529),
    (Candidate(2, 64, 500, "8"), 3501.1, 7.206),
    (Candidate(2, 64, 0, "8"), 3920.9, 5.597),
    (Candidate(2, 64, 2000, "max"), 2091.6, 7.399),
    (Candidate(2, 64, 2000, "none"), 2218.3, 4.784),
    (Candidate(2, 64, 2000, "8"), 5058.4, 2.868),
    (Candidate(4, 64, 2000, "8"), 4518.0, 2.685),
    (Candidate(1, 64, 2000, "8"), 4774.4, 2.9),
    (None, 3993.7, 5.934),
    (Candidate(2, 64, 2000, "8"), 3743.5, 6.397),
    (Candidate(4, 64, 2000, "8"), 3639.9, 3.178),
    (Candidate(1, 64, 2000, "8"), 5354.0, 2.288),
    (None, 5107.7, 2.301),
]


@pytest.mark.parametrize(
    ("last_written_p99_ms", "kept"),
    [
        (2.301, True),  # as measured: once the spec read as low a p99 as the pick
        (5.301, False),  # never as low: the pick's lower p99 stands
    ],
)
def test_a_pick_better_on_p99_alone_must_beat_the_specs_best_reading(
    last_written_p99_ms: float, kept: bool
) -> None:
    """Given figures (no server): tabular_mlp's quick search 1 of run J, as measured on a quiet
    machine. The pick (1 instance, batch 64, 2 ms, preferred 8) read the spec's throughput within
    the noise, and a p99 of 2.3-3.0 ms against the spec's 5.1-5.9 ms three times and 2.3 ms once.
    The rule before let it replace the spec on the lower median p99; side by side it served 0.81
    of the spec's throughput at a higher p99. A spec that once read as low a p99 is kept; where
    it never did, the pick replaces it."""
    objective = Objective((8,), 50.0, 100.0)  # the sample spec's objectives
    written = Candidate(2, 64, 2000, "8")
    readings = [*RUN_J_QUICK_1[:-1], (None, 5107.7, last_written_p99_ms)]
    trials = [
        Trial(
            number,
            written if candidate is None else candidate,
            (LevelResult(8, per_s, p99_ms, p99_ms / 2, 0, True),),
            baseline=candidate is None,
        )
        for number, (candidate, per_s, p99_ms) in enumerate(readings, start=1)
    ]
    assessments = assess_all(objective, trials)
    choice = choose(assessments, measure_noise(assessments))

    assert choice.chosen is not None
    assert choice.chosen.baseline is kept, choice.decided_by
    if kept:
        assert choice.decided_by.endswith(
            "its p99 is lower than the spec's median, not than its best reading (2.30 ms)"
        )
    else:
        assert choice.chosen.candidate == Candidate(1, 64, 2000, "8"), choice.decided_by


def plateau_figures(candidate: Candidate, baseline: bool, repeat: int) -> float:
    """Throughput at c=8 of a made-up model: 2 to 4 instances on a plateau within the noise
    (2,000-2,060/s) at a 500 us delay; no delay is worse at 1 to 3 instances and 2,400/s at 4.
    The spec as written reads 1,000 and 1,060/s in turn: a first noise figure of 5.8%."""
    if baseline:
        return 1000.0 + 60 * (repeat % 2)
    per_s = {1: 1000.0, 2: 2000.0, 3: 2040.0, 4: 2060.0}[candidate.instance_count]
    if candidate.max_queue_delay_us == 0:
        per_s = 2400.0 if candidate.instance_count == 4 else per_s - 100
    return per_s - (10 if candidate.preferred == "none" else 0)


class MadeUpTarget:
    """Stands in for Triton (TuningTarget): each trial reads ``plateau_figures``."""

    address = "the made-up target"

    def run_trial(self, request: TrialRequest) -> Trial:
        per_s = plateau_figures(request.candidate, request.baseline, request.repeat)
        return request.trial((LevelResult(8, per_s, 5.0, 2.5, 0, True),))

    def live(self) -> bool:
        return True

    def restore(self, spec: ModelSpec) -> None:
        return None


def climb_on_made_up_figures(options: TuneOptions) -> tuple[TuneResult, list[str]]:
    spec = spec_with(objectives={"p99_latency_ms": 50, "concurrency": [8]})
    limits = SpaceLimits(instance_counts=(1, 2, 3, 4), max_batch_sizes=(8,), delays_us=(0, 500))
    space = build_space(spec, CPU_HOST, limits)
    lines: list[str] = []
    return tune(spec, space, MadeUpTarget(), options, progress=lines.append), lines


def test_the_climb_goes_on_from_the_measured_top_of_a_plateau() -> None:
    """The quick search's own code on made-up figures (the measurement is a stand-in, no
    server). 2, 3 and 4 instances lie within the noise of each other; only at 4 does dropping
    the queue delay pay (2,400/s), as sleepy_mlp read on a quiet machine. The climb used to
    stay at 2 instances, the first step beyond the noise, walk the delay axis there, and end at
    0.86 of the best; it now goes on from 4 instances, the plateau's measured top."""
    result, lines = climb_on_made_up_figures(TuneOptions(top=2, repeats=2))

    assert "  moved along instance_count: 4xcpu, mbs 8, delay 500 us, pref 8" in lines
    assert result.choice.chosen is not None
    assert result.choice.chosen.candidate == Candidate(4, 8, 0, "max"), result.choice.decided_by
    assert result.choice.chosen.throughput_per_s == 2400.0


def test_the_quick_search_keeps_to_its_trial_budget() -> None:
    """Made-up figures as above (stand-in measurement, no server). With 8 trials, 3 are kept for
    the re-measurement (the top 2 and the spec as written, once more each): the climb stops at
    5 and the run at 8, and the pick still stands on two measurements."""
    result, lines = climb_on_made_up_figures(TuneOptions(top=2, repeats=2, max_trials=8))

    assert "  the climb stops at 5 trials (its budget)" in lines
    assert len(result.trials) == 8
    assert result.choice.chosen is not None
    assert len(result.choice.chosen.trials) == 2
