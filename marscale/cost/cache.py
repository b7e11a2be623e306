"""FLOP counts kept on disk, so a new process does not count the same model again.

Counting one ViT-L or ViT-H on the meta device takes one to two seconds, and the 15
models behind `marscale cost` about 9 s (2 CPU cores); read back from here they take a few
milliseconds, so the command runs in about 1.3 s instead of 11.

The cache is one JSON file, `$MARSCALE_CACHE_DIR/flop_counts.json` (default
`$XDG_CACHE_HOME/marscale` or `~/.cache/marscale`; an empty MARSCALE_CACHE_DIR switches
it off), holding counts as plain dicts under a fingerprint of the torch version and every
source file of the `marscale` package. All sources, not a list of the ones counting
reads: a list goes stale the moment code moves to a new module, and a stale count is
silently wrong, while an unrelated edit only costs one recount.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from marscale.core.io import write_json

log = logging.getLogger(__name__)

FILE_NAME = "flop_counts.json"


def cache_file() -> Path | None:
    """Where counts are kept, or None when MARSCALE_CACHE_DIR is set to an empty string."""
    root = os.environ.get("MARSCALE_CACHE_DIR")
    if root is None:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "marscale")
    return Path(root) / FILE_NAME if root else None


@functools.lru_cache(maxsize=1)
def fingerprint() -> str:
    """torch version + every `marscale` source file (names and contents)."""
    package = Path(__file__).resolve().parents[1]  # marscale/
    digest = hashlib.sha256(torch.__version__.encode())
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:20]


def read(path: Path) -> dict[str, dict]:
    """Counts stored in `path` under the current fingerprint ({} if none, unreadable or stale)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc.get("counts", {}) if doc.get("fingerprint") == fingerprint() else {}


def load(name: str) -> dict | None:
    """The stored count for key `name`, or None."""
    path = cache_file()
    return None if path is None else read(path).get(name)


def store(name: str, count: dict) -> None:
    """Add one count to the file (a no-op when the cache is switched off)."""
    path = cache_file()
    if path is None:
        return
    # Re-read and merge just before writing, and replace atomically: several ranks may
    # count at once. Counts of an older fingerprint are dropped.
    counts = read(path)
    counts[name] = count
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(str(path), {"fingerprint": fingerprint(), "counts": counts})
    except OSError as err:  # a read-only home only costs a recount next time
        log.warning("could not write the FLOP count cache %s: %s", path, err)
