"""A GPU host's cloud-init (Azure custom data), rendered from `cloud-init.yaml.j2` with jinja2.

It prepares what the host-configuration roles expect to find: the admin user with key-only
login and sudo, and the managed data disk partitioned, formatted and mounted for the model
repository. Everything rendered comes from the spec; nothing secret goes in (custom data is
readable on the VM and through Azure's API).

    text = render_cloud_init(stack="azure-prod", host="az-prod-a10-1", admin_user="gpufleet")
    custom_data = encode_custom_data(text)
"""

from __future__ import annotations

import base64
from pathlib import Path

import jinja2

from gpufleet.spec.azure import DATA_DISK_MOUNT

TEMPLATE = Path(__file__).with_name("cloud-init.yaml.j2")
DATA_DISK_LUN = 0
# Azure's udev rules (walinuxagent, azure-vm-utils) link each data disk by LUN.
DATA_DISK_DEVICE = f"/dev/disk/azure/scsi1/lun{DATA_DISK_LUN}"
DATA_DISK_LABEL = "gpufleet-data"
MOUNT_POINT = DATA_DISK_MOUNT
# Azure refuses custom data above 64 KiB once base64-encoded.
MAX_CUSTOM_DATA_BYTES = 65536

_ENVIRONMENT = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATE.parent),
    undefined=jinja2.StrictUndefined,  # a missing value is an error, not an empty string
    autoescape=False,  # noqa: S701  # YAML, not HTML; every value comes from a validated spec
    keep_trailing_newline=True,
)


def render_cloud_init(*, stack: str, host: str, admin_user: str) -> str:
    """The `#cloud-config` document for one host."""
    return _ENVIRONMENT.get_template(TEMPLATE.name).render(
        stack=stack,
        host=host,
        admin_user=admin_user,
        data_disk_lun=DATA_DISK_LUN,
        data_disk_device=DATA_DISK_DEVICE,
        data_disk_label=DATA_DISK_LABEL,
        mount_point=MOUNT_POINT,
    )


def encode_custom_data(text: str) -> str:
    """Base64, as the VM's `osProfile.customData` wants it; refuses what Azure would."""
    encoded = base64.b64encode(text.encode("utf-8")).decode("ascii")
    if len(encoded) > MAX_CUSTOM_DATA_BYTES:
        raise ValueError(f"custom data is {len(encoded)} bytes encoded; Azure takes 64 KiB")
    return encoded
