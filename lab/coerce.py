"""Parsed YAML <-> typed config dataclasses, collecting every problem with its key path.

`convert` never raises for a user mistake: it appends 'key.path: reason' to `problems` and returns
`MISSING` for that field, so the caller can report every problem of a file at once. A float must
be finite (`.inf` and `.nan` are never a meaningful setting) and an integer must fit 64 bits.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

MISSING = object()
# No count, size or seed of the lab goes near this; beyond it numpy and torch overflow.
INT_LIMIT = 2**63 - 1


def convert(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    """Convert parsed YAML `value` into type `tp`; append problems instead of raising."""
    where = path or "<top>"
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            problems.append(f"{where}: expected a mapping, got {_kind(value)}")
            return MISSING
        fields = {f.name: f for f in dataclasses.fields(tp)}
        hints = typing.get_type_hints(tp)
        for key in value:
            if key not in fields:
                shown = str(key) if str(key).isprintable() and len(str(key)) <= 40 else _show(key, 40)
                near = [k for k in fields if k.startswith(str(key)[:3])]
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                problems.append(f"{_join(path, shown)}: unknown key{hint}; "
                                f"known: {', '.join(sorted(fields))}")
        kwargs = {}
        for name in fields:
            if name in value:
                converted = convert(hints[name], value[name], _join(path, name), problems)
                if converted is not MISSING:
                    kwargs[name] = converted
        try:
            return tp(**kwargs)
        except TypeError as exc:  # only reachable when a nested conversion failed
            problems.append(f"{where}: {exc}")
            return MISSING
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed and type(value) is type(allowed[allowed.index(value)]):
            return value
        problems.append(f"{where}: {_show(value)} is not one of {', '.join(map(repr, allowed))}")
        return MISSING
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            trial: list[str] = []
            out = convert(option, value, path, trial)
            if not trial:
                return out
            if option in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
                problems.extend(trial)  # a number of the right kind, but not a usable one (inf, too large)
                return MISSING
        names = " or ".join(_type_name(o) for o in options)
        problems.append(f"{where}: expected {names}, got {_kind(value)} {_show(value)}")
        return MISSING
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            problems.append(f"{where}: expected a list, got {_kind(value)}")
            return MISSING
        items = [convert(args[0], v, f"{where}[{i}]", problems) for i, v in enumerate(value)]
        return MISSING if MISSING in items else tuple(items)
    if origin in (Mapping, dict) or tp is Mapping:
        if not isinstance(value, Mapping):
            problems.append(f"{where}: expected a mapping, got {_kind(value)}")
            return MISSING
        return dict(value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, int) and abs(value) > INT_LIMIT or not math.isfinite(value):
                problems.append(f"{where}: expected a finite number, got {_show(value)}")
                return MISSING
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > INT_LIMIT:
                problems.append(f"{where}: {_show(value)} is too large for a 64-bit integer")
                return MISSING
            return value
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    elif tp is Any:
        return value
    else:  # pragma: no cover - a schema bug, not a user mistake
        raise TypeError(f"unsupported config type {tp!r} at {where}")
    problems.append(f"{where}: expected {_type_name(tp)}, got {_kind(value)} {_show(value)}")
    return MISSING


def _show(value: Any, limit: int = 60) -> str:
    """repr of a user's value, cut to `limit` characters (a pasted blob stays one readable line)."""
    try:
        text = repr(value)
    except ValueError:  # an integer too long to print
        text = f"<a {type(value).__name__} too long to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", type(None): "nothing"}.get(type(value), type(value).__name__)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + "/".join(map(repr, typing.get_args(tp)))
    if typing.get_origin(tp) is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def to_dict(cfg: Any) -> Any:
    """Plain YAML-ready data for a config dataclass (tuples become lists)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    return cfg
