"""Choices typed as `Literal[...]`: the check for config dataclasses built in Python.

The YAML loader (`marscale.core.config`) checks `Literal` fields when it reads a file; a
dataclass built in Python calls `check_choices(self)` from `__post_init__`, so the
allowed values live only in the field's type. Kept apart from the loader so that the
model and clip configs import without PyYAML (the GPU benchmark runs on PyTorch alone).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


def _literal_choices(tp: Any) -> tuple | None:
    """The allowed values of a `Literal[...]` (or `Literal[...] | None`) field type, else None."""
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            if typing.get_origin(option) is typing.Literal:
                return typing.get_args(option) + ((None,) if type(None) in typing.get_args(tp) else ())
    return None


def check_choices(obj: Any) -> None:
    """Raise ValueError for a `Literal[...]` field of dataclass `obj` holding another value.

    The loader checks these types when it reads YAML; dataclasses built in Python call
    this from `__post_init__`, so the choices live only in the field's type.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        choices = _literal_choices(hints[f.name])
        value = getattr(obj, f.name)
        if choices is not None and value not in choices:
            raise ValueError(f"{f.name}={value!r}: use one of {', '.join(repr(c) for c in choices)}")
