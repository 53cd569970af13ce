"""The one model format gpufleet reads from a registry: weights only, no code.

A registry version is an MLflow model directory whose MLmodel names the `gpufleet` flavor: an
architecture this project defines (`ARCHITECTURES`) and a safetensors file holding its weights.
Loading builds that architecture from the project's own code and copies the tensors in. Nothing
in the artifact is unpickled, imported, compiled or evaluated: MLmodel is read with
`yaml.safe_load`, the weights with safetensors (a JSON header and raw bytes).

Why not MLflow's own pytorch flavor: its `pickle` format is `torch.save` of the whole module
(cloudpickle: code runs on load), and its `pt2` format is a `torch.export` archive, whose loader
unpickles sample inputs and any tensor subclass, and passes the graph's symbolic shape strings to
`sympy.sympify`, which evaluates them as Python (tests/test_registry_repository.py shows both).
TorchScript archives run their own `__setstate__` code on load, code that may call any operator
torch registers. An MLmodel that names a pickle module, code paths or cloudpickle is refused
with that reason; anything else without the gpufleet flavor is refused too.

    write_model_dir(Path("scratch/model"), module, signature)   # what register_torch_model logs
    module = load_model_dir(Path("download/model"))             # raises ArtifactError
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import yaml
from mlflow.models import Model
from mlflow.models.signature import ModelSignature

MLMODEL_FILE = "MLmodel"
FLAVOR = "gpufleet"
FORMAT = "gpufleet.weights/v1"
WEIGHTS_FILE = "data/model.safetensors"
_MLMODEL_MAX_BYTES = 1 << 20  # an MLmodel is a few kB; refuse to parse megabytes of YAML

StateDict = dict[str, torch.Tensor]


class ArtifactError(Exception):
    """The artifact is not a gpufleet weights-only model; the message says why (no location:
    the caller names the registry version)."""


# -- architectures -------------------------------------------------------------------------------


def _is_mlp(module: torch.nn.Module) -> bool:
    """`Sequential(Linear, ReLU, Linear, ..., Linear)`: what `demo_network` builds."""
    layers = list(module.children()) if isinstance(module, torch.nn.Sequential) else []
    if not layers or len(layers) % 2 == 0:
        return False
    return all(
        isinstance(layer, torch.nn.Linear if index % 2 == 0 else torch.nn.ReLU)
        and (index % 2 == 1 or layer.bias is not None)
        for index, layer in enumerate(layers)
    )


def _build_mlp(weights: StateDict) -> torch.nn.Module:
    """The MLP whose Linear layers have these weights (`<2i>.weight`, `<2i>.bias`)."""
    count = len(weights) // 2
    expected = {f"{2 * i}.{part}" for i in range(count) for part in ("weight", "bias")}
    if count == 0 or set(weights) != expected:
        raise ArtifactError(
            f"its weights {sorted(weights)[:6]} are not those of architecture 'mlp' "
            "(0.weight, 0.bias, 2.weight, 2.bias, ...)"
        )
    layers: list[torch.nn.Module] = []
    previous_out: int | None = None
    for index in range(count):
        weight, bias = weights[f"{2 * index}.weight"], weights[f"{2 * index}.bias"]
        if weight.ndim != 2 or tuple(bias.shape) != (weight.shape[0],):
            raise ArtifactError(
                f"layer {2 * index} of architecture 'mlp' has weight shape "
                f"{list(weight.shape)} and bias shape {list(bias.shape)}, which do not fit"
            )
        if previous_out is not None and weight.shape[1] != previous_out:
            raise ArtifactError(
                f"layer {2 * index} of architecture 'mlp' takes {weight.shape[1]} features, "
                f"the layer before gives {previous_out}"
            )
        layers.append(torch.nn.Linear(weight.shape[1], weight.shape[0]))
        if index < count - 1:
            layers.append(torch.nn.ReLU())
        previous_out = weight.shape[0]
    network = torch.nn.Sequential(*layers)
    network.load_state_dict(weights, strict=True)
    return network.eval()


# Architecture name -> (does a module have it?, build one from its weights). Add a model family
# here, in the project's own code, to serve it from the registry.
ARCHITECTURES: dict[
    str, tuple[Callable[[torch.nn.Module], bool], Callable[[StateDict], torch.nn.Module]]
] = {
    "mlp": (_is_mlp, _build_mlp),
}


def architecture_of(module: torch.nn.Module) -> str:
    """The name of the architecture `module` has; ArtifactError when it has none gpufleet knows."""
    for name, (has_it, _build) in ARCHITECTURES.items():
        if has_it(module):
            return name
    raise ArtifactError(
        f"a {type(module).__name__} is none of the architectures gpufleet can log without code "
        f"({', '.join(ARCHITECTURES)}); add it to gpufleet/registry/artifact.py"
    )


# -- writing -------------------------------------------------------------------------------------


def write_model_dir(directory: Path, module: torch.nn.Module, signature: ModelSignature) -> None:
    """Write `module` as a gpufleet weights-only MLflow model directory."""
    architecture = architecture_of(module)
    weights_path = directory / WEIGHTS_FILE
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().contiguous() for name, tensor in module.state_dict().items()}
    safetensors.torch.save_file(tensors, str(weights_path), metadata={"format": FORMAT})
    model = Model()
    model.signature = signature
    model.add_flavor(FLAVOR, format=FORMAT, architecture=architecture, weights=WEIGHTS_FILE)
    model.save(str(directory / MLMODEL_FILE))


# -- reading -------------------------------------------------------------------------------------


def load_model_dir(directory: Path) -> torch.nn.Module:
    """The module a gpufleet weights-only model directory describes, built by this project.

    Raises ArtifactError saying why the directory is refused (a pickle, code, another format).
    """
    flavor = gpufleet_flavor(read_mlmodel(directory))
    architecture = flavor.get("architecture")
    if architecture not in ARCHITECTURES:
        raise ArtifactError(
            f"its architecture {architecture!r} is none gpufleet defines "
            f"({', '.join(ARCHITECTURES)})"
        )
    weights = _read_weights(directory, flavor.get("weights"))
    _has_it, build = ARCHITECTURES[str(architecture)]
    return build(weights)


def read_mlmodel(directory: Path) -> dict[str, Any]:
    """The artifact's MLmodel as plain data (YAML's safe loader: no objects are constructed)."""
    path = directory / MLMODEL_FILE
    if not path.is_file() or path.is_symlink():
        raise ArtifactError(f"it has no {MLMODEL_FILE} file, so it is not an MLflow model")
    if path.stat().st_size > _MLMODEL_MAX_BYTES:
        raise ArtifactError(f"its {MLMODEL_FILE} is over {_MLMODEL_MAX_BYTES} bytes")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ArtifactError(f"its {MLMODEL_FILE} is not YAML ({type(error).__name__})") from None
    if not isinstance(document, dict):
        raise ArtifactError(f"its {MLMODEL_FILE} is not a mapping")
    return document


def gpufleet_flavor(mlmodel: dict[str, Any]) -> dict[str, Any]:
    """The MLmodel's gpufleet flavor; ArtifactError naming the pickle or code it carries instead."""
    flavors = mlmodel.get("flavors")
    if not isinstance(flavors, dict):
        raise ArtifactError(f"its {MLMODEL_FILE} lists no flavors")
    reason = code_or_pickle(flavors)
    if reason is not None:
        raise ArtifactError(f"{reason}, and gpufleet never runs code from a registry")
    flavor = flavors.get(FLAVOR)
    if not isinstance(flavor, dict) or flavor.get("format") != FORMAT:
        raise ArtifactError(
            f"it is not a gpufleet weights-only model (its {MLMODEL_FILE} has flavors "
            f"{', '.join(map(str, flavors)) or 'none'}, not {FLAVOR} {FORMAT})"
        )
    return flavor


def code_or_pickle(flavors: dict[str, Any]) -> str | None:
    """What in the MLmodel's flavors would run code on load, in words; None when nothing does."""
    described = [flavor for flavor in flavors.items() if isinstance(flavor[1], dict)]
    for name, flavor in described:
        for key in ("code", "code_paths"):
            if flavor.get(key):
                return f"its {name} flavor ships code paths ({key}: {flavor[key]!r})"
    for name, flavor in described:
        if flavor.get("pickle_module_name"):
            return f"its {name} flavor names pickle module {flavor['pickle_module_name']!r}"
        for key in ("serialization_format", "serialization"):
            if "pickle" in str(flavor.get(key, "")).lower():
                return f"its {name} flavor is serialized with {flavor[key]!r}"
    for name, flavor in described:
        if name == "python_function" and flavor.get("loader_module"):
            return f"its python_function flavor runs loader module {flavor['loader_module']!r}"
        if name == "pytorch":
            return (
                "it is MLflow's pytorch flavor (a pickled module, or a torch.export archive "
                "whose loader unpickles and evaluates what the file says)"
            )
    return None


def _read_weights(directory: Path, relative: object) -> StateDict:
    inside = isinstance(relative, str) and not Path(relative).is_absolute()
    if not isinstance(relative, str) or not inside or ".." in Path(relative).parts:
        raise ArtifactError(f"its weights path {relative!r} is not a path inside the model")
    path = directory / relative
    if not path.is_file() or path.is_symlink():
        raise ArtifactError(f"its weights file {relative} is missing")
    try:
        weights = safetensors.torch.load_file(str(path), device="cpu")
    except (safetensors.SafetensorError, OSError, ValueError, json.JSONDecodeError) as error:
        raise ArtifactError(f"its weights file {relative} is not safetensors: {error}") from None
    not_float = sorted(name for name, tensor in weights.items() if tensor.dtype != torch.float32)
    if not_float:
        raise ArtifactError(f"its weights {', '.join(not_float[:3])} are not fp32")
    return weights
