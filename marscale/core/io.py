"""Files that are whole or absent: the one atomic writer every record of marscale goes through.

Configs, manifests, checkpoint markers, evaluation results and run plans are written
under a temporary name in the target folder, fsynced, renamed over the target and the
folder fsynced, so a reader (or a job killed mid-write) sees the old file or the whole
new one, never a half-written file that looks complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

PARTIAL_SUFFIX = ".partial"
"""Suffix of a file while it is being written (`.NAME.XXXX.partial`)."""


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=PARTIAL_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def write_json(path: str, record: Any) -> None:
    """Write `record` as indented JSON atomically: readers see the old file or the whole new one."""
    atomic_write_bytes(path, (json.dumps(record, indent=1) + "\n").encode())
