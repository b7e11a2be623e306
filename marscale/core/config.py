"""Typed YAML configs: build a tree of dataclasses from YAML files, dicts and `--set` overrides.

The dataclasses are the schema. Every YAML key must be a field; every value must have the
field's type. Mistakes fail at load time with the full dotted key, the expected type and
the nearest valid key, instead of surfacing hours later as an `AttributeError`::

    unknown key 'optim.lrr' (did you mean 'optim.lr'?)
    'data.batch_size' expects int, got '16' (str)
    missing required key 'model.num_classes'

Supported field types: int, float (ints, `.inf` and `inf` accepted), bool, str,
`X | None` / `Optional[X]`, `tuple[X, ...]`, `tuple[X, Y]`, bare `tuple`, `list[X]`,
`dict[str, X]`, `Literal[...]`, and nested dataclasses.

A YAML file may start from another one with a top-level `defaults: base.yaml` (path
relative to the file); the file's own keys are merged over the base section by section.
One level only, so a preset can be read with at most one other file beside it.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import yaml

from marscale.core.io import atomic_write_bytes

T = TypeVar("T")

DEFAULTS_KEY = "defaults"


class ConfigError(ValueError):
    """A config file, dict or override does not match the dataclass schema."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` / `5e8` as floats.

    PyYAML follows YAML 1.1, where a float needs a dot (`1.0e-4`); `1e-4` would silently
    become the string "1e-4" and fail the type check far from where it was written.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """`yaml.safe_load` with scientific notation read as floats."""
    return yaml.load(text, Loader=_Loader)


# ---------------------------------------------------------------------------------------
# dict -> dataclass


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    return str(tp).replace("typing.", "")


def _type_error(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"'{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _init_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


MOVED_KEYS_ATTR = "MOVED_KEYS"
"""A config dataclass may map retired key names to their new dotted home
(`MOVED_KEYS: ClassVar[dict[str, str]] = {"num_frames": "clip.num_frames"}`): a file that
still uses an old key gets an error that names the new one."""


MOVED_SCALAR_ATTR = "MOVED_SCALAR"
"""A config dataclass that replaced a plain value may name the field that value now sets
(`decoder: true` became `decoder: {enabled: true}`; `MOVED_SCALAR: ClassVar[str] = "enabled"`):
a file that still gives the plain value gets an error that names the field."""


RETIRED_KEYS_ATTR = "RETIRED_KEYS"
"""A config dataclass may name keys that are no longer settings, with why
(`RETIRED_KEYS: ClassVar[dict[str, str]] = {"load_universal": "resuming ... converts itself"}`):
a file that still sets one gets an error that says so."""


def drop_retired(cls: type, data: Mapping[str, Any], path: str = "") -> tuple[dict[str, Any], list[str]]:
    """A config stored by an earlier version (in a checkpoint or an exported file), without
    the keys that are no longer settings: (cleaned copy, dotted keys dropped).

    A file a user writes gets an error for such a key (they can remove it); a stored
    config cannot be edited, and a run saved before a setting was retired must still
    evaluate and export. Keys that moved stay: their new home may mean something else."""
    retired = getattr(cls, RETIRED_KEYS_ATTR, {})
    hints = typing.get_type_hints(cls)
    out, dropped = {}, []
    for key, value in data.items():
        if str(key) in retired:
            dropped.append(_join(path, str(key)))
            continue
        tp = hints.get(str(key))
        if tp is not None and _is_dataclass_type(tp) and isinstance(value, Mapping):
            value, inner = drop_retired(tp, value, _join(path, str(key)))
            dropped += inner
        out[key] = value
    return out, dropped


def _unknown_key(path: str, key: str, valid: list[str], cls: type | None = None) -> ConfigError:
    moved = getattr(cls, MOVED_KEYS_ATTR, {}) if cls is not None else {}
    if str(key) in moved:
        return ConfigError(f"'{_join(path, str(key))}' has moved: set '{moved[str(key)]}' instead")
    retired = getattr(cls, RETIRED_KEYS_ATTR, {}) if cls is not None else {}
    if str(key) in retired:
        return ConfigError(f"'{_join(path, str(key))}' is no longer a setting: {retired[str(key)]}; remove it")
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    if close:
        hint = f"did you mean '{_join(path, close[0])}'?"
    else:
        hint = f"valid keys{' of ' + repr(path) if path else ''}: {', '.join(valid)}"
    return ConfigError(f"unknown key '{_join(path, str(key))}' ({hint})")


def _is_structured(tp: Any) -> bool:
    """Dataclasses and containers: types whose errors can name a key inside the value."""
    return _is_dataclass_type(tp) or tp in (tuple, list, dict) or typing.get_origin(tp) in (tuple, list, dict)


_INFINITY = ("inf", "+inf", "-inf", "infinity", "+infinity", "-infinity")
"""Text a float field reads as infinity (beside YAML's `.inf`)."""


def _convert(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against (and, for containers, converted to) type `tp`."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _type_error(key, tp, value)
        options = [a for a in args if a is not type(None)]
        if len(options) == 1 and _is_structured(options[0]):
            return _convert(value, options[0], key)  # its own errors point inside the value
        for option in options:
            try:
                return _convert(value, option, key)
            except ConfigError:
                continue
        raise _type_error(key, tp, value)

    if origin is typing.Literal:
        if value in args:
            return value
        raise _type_error(key, tp, value)

    if _is_dataclass_type(tp):
        return from_dict(tp, value, key)

    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        # `5e8` reads as a float; accept it where it is a whole number.
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)
        raise _type_error(key, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML spells infinity `.inf`; `inf` (as Python and `--set x=inf` write it) reads
        # as text. Either is a float here; the field's own check says whether it fits.
        if isinstance(value, str) and value.strip().lower() in _INFINITY:
            return float(value)
        raise _type_error(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, tp, value)

    if tp is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value)
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"'{key}' expects {len(args)} values ({_type_name(tp)}), got {list(value)!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value)
        item = args[0] if args else Any
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise _type_error(key, tp, value)
        k_tp, v_tp = args if args else (Any, Any)
        return {_convert(k, k_tp, key): _convert(v, v_tp, _join(key, str(k))) for k, v in value.items()}

    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _type_error(key, tp, value)
    raise ConfigError(f"'{key}': field type {tp!r} is not supported by the config loader")


def from_dict(cls: type[T], data: Mapping[str, Any] | T | None, path: str = "") -> T:
    """Build dataclass `cls` (and its nested dataclasses) from a plain dict.

    `path` is the dotted key of `data` inside the whole tree, used in error messages.
    Errors raised by a dataclass's `__post_init__` are re-raised as `ConfigError` with
    that path in front.
    """
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        moved = getattr(cls, MOVED_SCALAR_ATTR, None)
        if moved is not None and path and not isinstance(data, (list, tuple)):
            raise ConfigError(
                f"'{path}' is a section now, not a value: set '{path}.{moved}: {_yaml_scalar(data)}' instead"
            )
        where = f"'{path}'" if path else "the config"
        raise ConfigError(f"{where} must be a mapping of keys to values ({cls.__name__}), got {data!r}")

    hints = typing.get_type_hints(cls)
    fields = _init_fields(cls)
    names = [f.name for f in fields]
    for key in data:
        if key not in names:
            raise _unknown_key(path, key, names, cls)
    missing = [_join(path, f.name) for f in fields if f.name not in data and not _has_default(f)]
    if missing:
        plural = "s" if len(missing) > 1 else ""
        raise ConfigError(f"missing required key{plural} {', '.join(repr(m) for m in missing)}")

    kwargs = {name: _convert(value, hints[name], _join(path, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError, AssertionError) as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from e


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


# ---------------------------------------------------------------------------------------
# dataclass -> dict / YAML


def to_dict(cfg: Any) -> Any:
    """Plain YAML-safe data (dicts, lists, scalars) for a dataclass tree, in field order."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in _init_fields(type(cfg))}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=100)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the effective config as YAML; readers see the old file or the whole new one."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, dump_config(cfg).encode())


# ---------------------------------------------------------------------------------------
# files and overrides


def _read_yaml(path: str) -> dict[str, Any]:
    with open(path) as f:
        try:
            data = parse_yaml(f.read())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else in `update` replaces."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The raw dict of a YAML config, with its `defaults:` base merged underneath."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    data = _read_yaml(path)
    base_name = data.pop(DEFAULTS_KEY, None)
    if base_name is None:
        return data
    if not isinstance(base_name, str):
        raise ConfigError(f"{path}: '{DEFAULTS_KEY}' must name one YAML file, got {base_name!r}")
    base_path = os.path.join(os.path.dirname(path), base_name)
    if not os.path.isfile(base_path):
        raise ConfigError(f"{path}: '{DEFAULTS_KEY}: {base_name}' not found (looked for {base_path})")
    base = _read_yaml(base_path)
    if DEFAULTS_KEY in base:
        raise ConfigError(
            f"{base_path}: a defaults file cannot itself have '{DEFAULTS_KEY}' (one level of inheritance); "
            f"merge the two base files"
        )
    return merge(base, data)


def _field_type(cls: type, dotted: str) -> Any:
    """Type of the field at `dotted` below dataclass `cls`; ConfigError if a key is unknown.

    Walks only through dataclass fields; below a dict/list field anything goes (the
    value is checked when the tree is built).
    """
    tp: Any = cls
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        path = ".".join(parts[:i])
        if not _is_dataclass_type(tp):
            return Any
        hints = typing.get_type_hints(tp)
        names = [f.name for f in _init_fields(tp)]
        if part not in names:
            raise _unknown_key(path, part, names, tp)
        tp = hints[part]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            options = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = options[0] if len(options) == 1 else Any
    return tp


def _accepts_str(tp: Any) -> bool:
    if tp is str:
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return str in typing.get_args(tp)
    return False


def apply_overrides(raw: dict[str, Any], overrides: list[str], cls: type | None = None) -> dict[str, Any]:
    """Apply `key.sub=value` overrides to a raw config dict (returns a new dict).

    Values are parsed as YAML (`1e-4`, `true`, `null`, `[1, 2]`, `{a: 1}`). With `cls`,
    keys are checked against the schema first, and a value for a `str` field stays the
    literal text (so `run.name=2024` is the string "2024").
    """
    out = merge({}, raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.subkey=value")
        try:
            tp = _field_type(cls, key) if cls is not None else Any
        except ConfigError as e:
            raise ConfigError(f"--set {item}: {e}") from None
        try:
            value = parse_yaml(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item}: the value is not valid YAML ({e})") from None
        if _accepts_str(tp) and value is not None and not isinstance(value, str):
            value = text
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {item}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
            else:
                child = node[part] = dict(child)
            node = child
        node[parts[-1]] = value
    return out


def load_config(cls: type[T], yaml_path: str | os.PathLike, overrides: list[str] | None = None) -> T:
    """Read `yaml_path` (with its `defaults:` base), apply `--set` overrides, build `cls`.

    Overrides are applied to the raw dict before typing, so a bad override fails with
    the same messages as a bad file.
    """
    raw = read_config_file(yaml_path)
    raw = apply_overrides(raw, list(overrides or []), cls)
    try:
        return from_dict(cls, raw)
    except ConfigError as e:
        raise ConfigError(f"{os.fspath(yaml_path)}: {e}") from e
