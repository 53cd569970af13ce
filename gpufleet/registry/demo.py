"""Demo models for a registry that has none: small seeded torch MLPs, one per spec, logged with
their golden examples, registered, and pointed at by the spec's alias.

Same seed, same weights, same golden outputs. The building block `register_torch_model` logs a
torch module of an architecture gpufleet defines, weights only (gpufleet/registry/artifact.py:
no pickle, no code); its golden examples may come from another module (a test's "version whose
weights differ from its golden examples").

    versions = seed_demo(ModelRegistry("http://127.0.0.1:15000"), [spec])  # one per spec
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import numpy.typing as npt
import torch
from mlflow.models import infer_signature

from gpufleet.registry.artifact import ArtifactError, architecture_of, write_model_dir
from gpufleet.registry.client import (
    GOLDEN_EXAMPLES_ARTIFACT,
    MODEL_URI,
    ModelRegistry,
    RegistryError,
    RegistryVersion,
)
from gpufleet.registry.golden import GoldenExample, write_golden_examples
from gpufleet.spec.model import ModelSpec

DEMO_EXPERIMENT = "gpufleet-demo"
GOLDEN_EXAMPLE_COUNT = 8
HIDDEN_SIZE = 32

Request = dict[str, npt.NDArray[Any]]  # input name -> tensor


class DemoModelError(RegistryError):
    """The demo builder cannot build a model for this spec; the message says why."""


def seed_demo(
    registry: ModelRegistry, specs: list[ModelSpec], *, seed: int = 0
) -> list[RegistryVersion]:
    """Register a demo model for every spec whose source is a `models:/` URI.

    For `models:/<name>@<alias>` the alias is pointed at the new version; a `models:/<name>/<n>`
    source just gets a new version. Every spec is checked before anything is logged.
    """
    sourced = [spec for spec in specs if spec.source and MODEL_URI.fullmatch(spec.source)]
    networks = [demo_network(spec, seed=seed) for spec in sourced]
    return [
        register_torch_model(registry, spec, network, seed=seed, tags={"gpufleet.demo": "true"})
        for spec, network in zip(sourced, networks, strict=True)
    ]


def demo_network(spec: ModelSpec, *, seed: int = 0) -> torch.nn.Module:
    """A seeded MLP from the spec's input features to its output features, in eval mode."""
    in_features, out_features = _mlp_features(spec)
    with _seeded(seed):
        network = torch.nn.Sequential(
            torch.nn.Linear(in_features, HIDDEN_SIZE),
            torch.nn.ReLU(),
            torch.nn.Linear(HIDDEN_SIZE, out_features),
        )
    return network.eval()


def golden_inputs(spec: ModelSpec, *, seed: int = 0) -> list[Request]:
    """GOLDEN_EXAMPLE_COUNT seeded fp32 requests, each with a batch dim of 1 when batching."""
    _mlp_features(spec)
    tensor = spec.inputs[0]
    shape = ([1] if spec.max_batch_size > 0 else []) + list(tensor.shape)
    generator = np.random.default_rng(seed)
    return [
        {tensor.name: generator.standard_normal(shape).astype(np.float32)}
        for _ in range(GOLDEN_EXAMPLE_COUNT)
    ]


def golden_examples(
    module: torch.nn.Module, spec: ModelSpec, inputs: list[Request]
) -> list[GoldenExample]:
    """The module's outputs for each request: what a served version must answer."""
    output_name = spec.outputs[0].name
    examples = []
    for request in inputs:
        (tensor,) = request.values()
        with torch.no_grad():
            result = module(torch.from_numpy(tensor)).numpy().astype(np.float32)
        examples.append(GoldenExample(inputs=request, outputs={output_name: result}))
    return examples


def register_torch_model(
    registry: ModelRegistry,
    spec: ModelSpec,
    module: torch.nn.Module,
    *,
    golden_module: torch.nn.Module | None = None,
    seed: int = 0,
    tags: dict[str, str] | None = None,
) -> RegistryVersion:
    """Log `module` with golden examples computed by `golden_module` (default: `module`),
    register it under the spec's registered model, tag it, and point the spec's alias at it.

    The spec must be one the demo builder can build (one fp32 input, one fp32 output), and the
    module of an architecture gpufleet defines (gpufleet.registry.artifact.ARCHITECTURES).
    """
    match = MODEL_URI.fullmatch(spec.source or "")
    if match is None:
        raise DemoModelError(f"spec {spec.name!r}: source {spec.source!r} is not a models:/ URI")
    try:
        architecture_of(module)
    except ArtifactError as error:
        raise DemoModelError(f"spec {spec.name!r}: {error}") from None
    inputs = golden_inputs(spec, seed=seed)
    examples = golden_examples(golden_module or module, spec, inputs)
    tensors = [request[spec.inputs[0].name] for request in inputs]
    # All requests as one batch; without batching, one request: the model takes no batch dim.
    batch = np.concatenate(tensors) if spec.max_batch_size > 0 else tensors[0]
    with torch.no_grad():
        outputs = module(torch.from_numpy(batch)).numpy()
    with (
        tempfile.TemporaryDirectory(prefix="gpufleet-demo-") as scratch,
        registry.mlflow_errors(f"logging a model for {spec.name!r}"),
        _tracking(registry.tracking_uri),
        mlflow.start_run(
            experiment_id=_experiment_id(registry), run_name=f"{spec.name}-demo"
        ) as run,
    ):
        model_dir = Path(scratch) / "model"
        write_model_dir(model_dir, module, infer_signature(batch, outputs))
        golden_file = model_dir / GOLDEN_EXAMPLES_ARTIFACT
        golden_file.parent.mkdir()
        write_golden_examples(golden_file, examples)
        mlflow.log_artifacts(str(model_dir), artifact_path="model")
        model_uri = f"{run.info.artifact_uri}/model"
    version = registry.register(match["name"], model_uri, run.info.run_id)
    if tags:
        registry.set_tags(version, tags)
        version = dataclasses.replace(version, tags={**version.tags, **tags})
    if match["alias"] is not None:
        registry.set_alias(version.name, match["alias"], version.version)
    return version


def _mlp_features(spec: ModelSpec) -> tuple[int, int]:
    """(in, out) features of the spec's MLP, or DemoModelError saying why it has none."""

    def refuse(why: str) -> DemoModelError:
        return DemoModelError(
            f"spec {spec.name!r}: the demo builder cannot build a model for it: {why}; "
            "register a model of your own instead"
        )

    if len(spec.inputs) != 1 or len(spec.outputs) != 1:
        raise refuse(
            f"it has {len(spec.inputs)} inputs and {len(spec.outputs)} outputs, not 1 and 1"
        )
    source, target = spec.inputs[0], spec.outputs[0]
    for tensor in (source, target):
        if tensor.dtype != "fp32":
            raise refuse(f"tensor {tensor.name!r} is {tensor.dtype}, not fp32")
        if -1 in tensor.shape:
            raise refuse(f"tensor {tensor.name!r} has a variable dimension (shape {tensor.shape})")
    if source.shape[:-1] != target.shape[:-1]:
        raise refuse(
            f"shapes {source.shape} and {target.shape} differ before the last dimension, "
            "so one MLP cannot map one to the other"
        )
    return source.shape[-1], target.shape[-1]


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch inside the block only: the caller's random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _tracking(uri: str) -> Iterator[None]:
    """MLflow's fluent API (log_model) logs to the global tracking URI; borrow it."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def _experiment_id(registry: ModelRegistry) -> str:
    experiment = registry.client.get_experiment_by_name(DEMO_EXPERIMENT)
    if experiment is not None:
        return str(experiment.experiment_id)
    return str(registry.client.create_experiment(DEMO_EXPERIMENT))
