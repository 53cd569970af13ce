"""StackSpec: one environment, read from the `gpufleet:` keys of `stacks/Pulumi.<stack>.yaml`.

Pulumi keeps a stack's configuration under `config:` with namespaced keys; the keys in the
`gpufleet` namespace (`gpufleet:environment`, `gpufleet:models`, ...) are this spec's fields.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from gpufleet.spec.model import MODEL_NAME_PATTERN, SpecModel

CONFIG_NAMESPACE = "gpufleet"
DEFAULT_MODEL_REPOSITORY = "build/model_repository"


class StackSpec(SpecModel):
    """What an environment runs and where its generated files go."""

    environment: Literal["local", "proxmox", "azure"] = Field(
        description="Where the stack runs: this machine, Proxmox VMs or Azure VMs."
    )
    models: list[Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]] = Field(
        default_factory=list,
        description="Names of the model specs (modelconfigs/<name>.yaml) this stack serves; "
        "empty means every spec.",
    )
    model_repository: str = Field(
        default=DEFAULT_MODEL_REPOSITORY,
        description="Directory of the generated Triton model repository, relative to the "
        "directory gpufleet runs in (the project root).",
    )
