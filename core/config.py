"""Dataclass configs from TOML files plus `--section.key=value` command-line overrides.

A run's config is a dataclass whose fields are sections (dataclasses) or values. TOML tables map to sections,
overrides are applied on top, every value is checked against its field's type, and any unknown key is an error that
names the file (or flag) and the closest valid key. Nothing else: no registries, no interpolation.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or flag that does not fit the config dataclass; the message names where and how to fix it."""


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, (_, tp) in _fields(cls).items():
        if dataclasses.is_dataclass(tp):
            keys.append(prefix + name)
            keys += _all_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _unknown(key: str, root: type, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys(root), n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{where}: unknown key '{key}'{hint}")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it loses nothing (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: '{key}' = {value!r} does not fit type {tp}")
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: '{key}' must be a list, got {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return origin(_coerce(v, item, key, where) for v in value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a table, got {value!r}")
        return dict(value)
    if tp is int and isinstance(value, bool) or tp in (int, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: '{key}' must be {tp.__name__}, got {value!r}")
    if tp is float and not isinstance(value, float):
        raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
    return value


def _set_nested(tree: dict, cls: type, path: list[str], value: Any, root: type, where: str,
                prefix: str = "") -> None:
    """Set tree[path...] = value, checking each name against the dataclass `cls` (full dotted key in errors)."""
    fields = _fields(cls)
    name = path[0]
    key = prefix + ".".join(path)
    if name not in fields:
        raise _unknown(prefix + name if len(path) == 1 else key, root, where)
    _, tp = fields[name]
    if dataclasses.is_dataclass(tp):
        if len(path) == 1:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{prefix + name}' is a section; set its keys, "
                                  f"e.g. '{prefix + name}.<key>'")
            for k, v in value.items():
                _set_nested(tree.setdefault(name, {}), tp, [k], v, root, where, prefix + name + ".")
        else:
            _set_nested(tree.setdefault(name, {}), tp, path[1:], value, root, where, prefix + name + ".")
        return
    if len(path) > 1:
        raise ConfigError(f"{where}: '{prefix + name}' is a value, not a section; cannot set '{key}'")
    tree[name] = (_coerce(value, tp, prefix + name, where), where)


def _build(cls: type[T], tree: dict) -> T:
    kwargs = {}
    for name, (_, tp) in _fields(cls).items():
        if name not in tree:
            continue
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, tree[name])
        else:
            kwargs[name] = tree[name][0]
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        sources = sorted({v[1] for v in tree.values() if isinstance(v, tuple)})
        raise ConfigError(f"{', '.join(sources) or cls.__name__}: {e}") from None


def parse_value(text: str) -> Any:
    """A command-line value: a TOML literal when it is one (3, 1e-4, true, [1, 2], "s"), else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build `cls` from the TOML file at `path` (optional) and `--section.key=value` overrides, in that order."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        for key, value in raw.items():
            _set_nested(tree, cls, [key], value, cls, str(path))
    for flag in overrides:
        if not flag.startswith("--") or "=" not in flag:
            raise ConfigError(f"command line: expected --section.key=value, got {flag!r}")
        key, text = flag[2:].split("=", 1)
        _set_nested(tree, cls, key.split("."), parse_value(text), cls, f"flag --{key}")
    return _build(cls, tree)


def parse_args(cls: type[T], argv: Sequence[str] | None = None, *, default_config: str | None = None) -> T:
    """`--config FILE [--section.key=value ...]` -> a config. `--help` lists every key with the value it would
    take (the defaults, or the given file and flags applied)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    wants_help = "-h" in argv or "--help" in argv
    path = default_config
    rest = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("command line: --config needs a file")
            path, i = argv[i + 1], i + 2
            continue
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a not in ("-h", "--help"):
            rest.append(a)
        i += 1
    cfg = load_config(cls, path, rest)
    if wants_help:
        print(f"usage: --config FILE [--section.key=value ...]\nkeys of {cls.__name__} ({path or 'defaults'}):")
        for key, value in flatten(cfg).items():
            print(f"  --{key}={value!r}")
        raise SystemExit(0)
    return cfg


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """A config as {'section.key': value}, for logging and for the metrics file."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out.update(flatten(v, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = v
    return out
