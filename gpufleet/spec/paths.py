"""Checks for spec values that become file names, directories or command-line arguments.

A spec is data that anyone with a pull request can change, so a value that ends up in a path
must not climb out of where it belongs (`../../x`), name a system directory (`/etc`), or read as
an option to the command it reaches (`--privileged`).

    FileName            a plain file name (default_model_filename, label_file, data_file)
    check_directory()   a directory that gpufleet writes into (model_repository, state_dir...)
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Annotated

from pydantic import AfterValidator, WithJsonSchema

# Letters, digits, '_', '.', '-', starting with a letter, digit or '_': no '/', no '..', no
# leading '-' (an option to any tool it reaches) and no leading '.' (hidden, or '.' itself).
FILE_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}$"

# Directories (and, for these, everything under them) that a stack must never write into.
_SYSTEM_TREES = (
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/proc",
    "/run",
    "/sbin",
    "/sys",
    "/usr",
    "/var/lib/containerd",
    "/var/lib/docker",
    "/var/run",
)
# Directories that hold other things: a stack may live under them, never be them.
_SHARED_ROOTS = (
    "/",
    "/home",
    "/mnt",
    "/media",
    "/opt",
    "/root",
    "/srv",
    "/tmp",  # noqa: S108  # a directory refused, not one used
    "/var",
    "/var/lib",
)


def check_file_name(name: str) -> str:
    """A plain file name, or ValueError saying why not."""
    if not re.fullmatch(FILE_NAME_PATTERN, name) or ".." in name:
        raise ValueError(
            f"{name!r} is not a plain file name; use letters, digits, '_', '.' and '-' "
            "(no '/', no '..', not starting with '-' or '.'): the file lives in the model's "
            "own directory"
        )
    return name


FileName = Annotated[
    str,
    AfterValidator(check_file_name),
    WithJsonSchema({"type": "string", "pattern": FILE_NAME_PATTERN}),
]


def check_directory(path: str, *, absolute: bool = False) -> str:
    """A directory gpufleet writes into: no '.' or '..' part, no leading '-', not a system
    directory; `absolute` when it is a path on a host. ValueError says why not."""
    if not path or "\x00" in path:
        raise ValueError("give a directory")
    if path.startswith("-"):
        raise ValueError(f"{path!r} starts with '-', which commands read as an option")
    if absolute and not path.startswith("/"):
        raise ValueError(f"{path!r} is not an absolute path; write /srv/gpufleet/serving or so")
    parts = path.split("/")
    if any(part in (".", "..") for part in parts) or path in (".", "./"):
        raise ValueError(
            f"{path!r} has a '.' or '..' part; write the directory itself (without '.' or "
            "'..'), so that what gpufleet writes and removes stays inside it"
        )
    normal = str(PurePosixPath(path))
    if normal.startswith("/"):
        if normal in _SHARED_ROOTS:
            raise ValueError(
                f"{path!r} is a directory other things live in; use a directory of its own "
                "such as /srv/gpufleet"
            )
        for tree in _SYSTEM_TREES:
            if normal == tree or normal.startswith(tree + "/"):
                raise ValueError(
                    f"{path!r} is inside the system directory {tree}; use a directory of its "
                    "own such as /srv/gpufleet"
                )
    return path


def is_within(inner: str, outer: str) -> bool:
    """Whether `inner` is `outer` or below it (both checked by check_directory)."""
    inner_path, outer_path = PurePosixPath(inner), PurePosixPath(outer)
    return inner_path == outer_path or outer_path in inner_path.parents
