"""The tags every Azure resource of a stack carries: stack, owner, model placement, host."""

from __future__ import annotations

from gpufleet.spec.stack import StackSpec

MANAGED_BY = "gpufleet"
# Azure caps a tag value at 256 characters.
MAX_TAG_VALUE = 256


def stack_tags(stack: str, spec: StackSpec) -> dict[str, str]:
    """Tags for every resource of `stack`; hosts add `gpufleet-host`."""
    assert spec.azure is not None
    models = ",".join(spec.models) or "all"
    if len(models) > MAX_TAG_VALUE:
        models = models[: MAX_TAG_VALUE - 3] + "..."
    return {
        **spec.azure.tags,
        "gpufleet-stack": stack,
        "gpufleet-models": models,
        "owner": spec.azure.owner,
        "managed-by": MANAGED_BY,
    }
