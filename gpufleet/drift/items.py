"""What a drift check finds: one item per difference, one layer check per (layer, host).

Every layer (``files``, ``triton``, ``hosts``, ``containers``, ``infrastructure``) returns
``LayerCheck`` objects. A check lists the objects it compared (one JUnit test case each), the
differences it found, and, when it could not compare, why (``error``): that is never a silent
skip, and it makes ``gpufleet drift`` exit 2 while the other layers are still reported.

    LayerCheck("triton", "gpu-node-1", checked=["model tabular_mlp config"],
               items=[DriftItem("triton", "gpu-node-1", "model tabular_mlp config",
                                expected="max_batch_size: 64", found="max_batch_size: 8",
                                repair="gpufleet up --stack onprem-prod")])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Layer = Literal["files", "triton", "hosts", "containers", "infrastructure"]
LAYERS: tuple[Layer, ...] = ("files", "triton", "hosts", "containers", "infrastructure")


@dataclass(frozen=True)
class DriftItem:
    """One difference between what the specs ask for and what is there."""

    layer: Layer
    host: str  # a host of the stack, "local" for the local stack, "" for stack-wide objects
    object: str  # what differs, e.g. "model tabular_mlp config", "vm gpu-node-1 memory"
    expected: str
    found: str
    repair: str  # the command that repairs it

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LayerCheck:
    """The result of checking one layer on one host (or stack-wide)."""

    layer: Layer
    host: str
    checked: list[str] = field(default_factory=list)
    items: list[DriftItem] = field(default_factory=list)
    error: str | None = None  # "could not be checked: <why>, <what to do>"
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "host": self.host,
            "checked": list(self.checked),
            "items": [item.to_json() for item in self.items],
            "error": self.error,
            "seconds": round(self.seconds, 3),
        }
