"""Golden files: the sample specs render to exactly the committed config.pbtxt files.

Real: the sample specs, the generator, Triton's protobuf schema. Nothing mocked.
"""

from __future__ import annotations

import difflib

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from generators.model_repository import render_repository_files
from gpufleet.spec.loading import load_model_specs
from tests.conftest import GOLDEN_REPOSITORY, SAMPLE_SPECS

REGENERATE = "make golden   (runs: gpufleet generate --out tests/golden/model_repository)"
RENDERED = render_repository_files(load_model_specs(SAMPLE_SPECS))


@pytest.mark.parametrize("relative", sorted(RENDERED))
def test_sample_matches_golden_file(relative: str) -> None:
    golden = GOLDEN_REPOSITORY / relative
    assert golden.exists(), f"no golden file {golden}; create it with: {REGENERATE}"
    expected = golden.read_text(encoding="utf-8")
    if RENDERED[relative] != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                RENDERED[relative].splitlines(keepends=True),
                fromfile=f"golden/{relative}",
                tofile=f"generated/{relative}",
            )
        )
        pytest.fail(f"{relative} differs from its golden file:\n{diff}\nIf intended: {REGENERATE}")


def test_every_golden_file_has_a_sample() -> None:
    golden = {
        p.relative_to(GOLDEN_REPOSITORY).as_posix() for p in GOLDEN_REPOSITORY.rglob("*.pbtxt")
    }
    assert golden == set(RENDERED), f"stale golden files; regenerate with: {REGENERATE}"


@pytest.mark.parametrize("relative", sorted(RENDERED))
def test_golden_file_parses_as_a_triton_config(relative: str) -> None:
    """The committed golden file itself is valid protobuf text for Triton's ModelConfig, and it
    parses to the same message as the render (a golden file Triton could not read fails here,
    even if `make golden` wrote it)."""
    golden = (GOLDEN_REPOSITORY / relative).read_text(encoding="utf-8")
    try:
        message = text_format.Parse(golden, pb.ModelConfig())
    except text_format.ParseError as error:
        pytest.fail(f"golden/{relative} is not a valid Triton config: {error}")
    assert message.name == relative.split("/")[0]
    assert message == text_format.Parse(RENDERED[relative], pb.ModelConfig())
    # Printing the parsed message again gives the same text below the header comment.
    body = "".join(line for line in golden.splitlines(keepends=True) if not line.startswith("#"))
    assert text_format.MessageToString(message) == body
