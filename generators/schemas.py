"""JSON Schemas of the specs, for editors (yaml-language-server) and for CI.

`modelspec.schema.json` describes a `modelconfigs/<name>.yaml` file. `stackspec.schema.json`
describes a whole `stacks/Pulumi.<stack>.yaml` file: the StackSpec fields appear under
`config:` with their `gpufleet:` prefix, beside other providers' keys.
"""

from __future__ import annotations

import json
from typing import Any

from gpufleet.spec.model import ModelSpec
from gpufleet.spec.stack import CONFIG_NAMESPACE, StackSpec

MODEL_SCHEMA_FILE = "modelspec.schema.json"
STACK_SCHEMA_FILE = "stackspec.schema.json"
DRAFT = "https://json-schema.org/draft/2020-12/schema"


def model_spec_schema() -> dict[str, Any]:
    return {"$schema": DRAFT, **ModelSpec.model_json_schema()}


def stack_file_schema() -> dict[str, Any]:
    stack = StackSpec.model_json_schema()
    prefix = f"{CONFIG_NAMESPACE}:"
    config = {
        "type": "object",
        "description": f"Pulumi stack configuration; gpufleet's keys carry the '{prefix}' prefix.",
        "properties": {f"{prefix}{key}": value for key, value in stack["properties"].items()},
        "required": [f"{prefix}{key}" for key in stack.get("required", [])],
        # Keys of other namespaces (azure-native:, proxmox:...) belong to other tools.
        "additionalProperties": True,
    }
    schema: dict[str, Any] = {
        "$schema": DRAFT,
        "title": "Pulumi stack file with a gpufleet StackSpec",
        "type": "object",
        "properties": {"config": config},
        "required": ["config"],
    }
    if "$defs" in stack:
        schema["$defs"] = stack["$defs"]
    return schema


def render_schemas() -> dict[str, str]:
    """File name -> JSON text, stable for identical specs."""
    return {
        MODEL_SCHEMA_FILE: json.dumps(model_spec_schema(), indent=2, sort_keys=True) + "\n",
        STACK_SCHEMA_FILE: json.dumps(stack_file_schema(), indent=2, sort_keys=True) + "\n",
    }
