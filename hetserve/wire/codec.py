"""Typed messages <-> msgpack, validated field by field. Nothing is ever unpickled.

Every message is a frozen dataclass registered with `@message("name")`. On the wire it is a
msgpack map `{"type": name, field: value, ...}`. Decoding checks the type tag, that the fields
are exactly the declared ones, and each value against its annotation (int, float, str, bool,
bytes, list[X], dict[str, X], X | None, nested dataclasses), so a malformed or hostile peer
message raises `WireError` instead of reaching the code that uses it.
"""

from __future__ import annotations

import dataclasses
import types
import typing

import msgpack

MAX_CONTAINER = 1 << 20  # most items in one list/map we accept from a peer


class WireError(ValueError):
    """A peer sent something that is not a valid message."""


_REGISTRY: dict[str, type] = {}
_HINTS: dict[type, dict[str, typing.Any]] = {}


def message(name: str):
    def register(cls):
        cls = dataclasses.dataclass(frozen=True)(cls) if not dataclasses.is_dataclass(cls) else cls
        if name in _REGISTRY:
            raise RuntimeError(f"message type {name!r} registered twice")
        _REGISTRY[name] = cls
        cls.WIRE_TYPE = name
        return cls
    return register


def encode(msg) -> bytes:
    body = {"type": msg.WIRE_TYPE}
    body.update({f.name: _to_plain(getattr(msg, f.name)) for f in dataclasses.fields(msg)})
    return msgpack.packb(body, use_bin_type=True)


def decode(data: bytes, expect: tuple[type, ...] | None = None):
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=len(data),
                               max_str_len=len(data), max_array_len=MAX_CONTAINER, max_map_len=MAX_CONTAINER)
    except Exception as exc:
        raise WireError(f"not msgpack: {exc}") from None
    if not isinstance(body, dict):
        raise WireError("a message must be a map")
    name = body.pop("type", None)
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise WireError(f"unknown message type {name!r}")
    if expect is not None and cls not in expect:
        raise WireError(f"unexpected message {name!r} here")
    return _build(cls, body, name)


def _to_plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def _hints(cls) -> dict[str, typing.Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _build(cls, body, path: str):
    if not isinstance(body, dict):
        raise WireError(f"{path}: expected a map")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(body) - set(fields)
    if unknown:
        raise WireError(f"{path}: unknown fields {sorted(unknown)}")
    values = {}
    for name, field in fields.items():
        if name not in body:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise WireError(f"{path}: missing field {name!r}")
            continue
        values[name] = _check(body[name], hints[name], f"{path}.{name}")
    return cls(**values)


def _check(value, tp, path: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(value, arg, path)
            except WireError:
                pass
        raise WireError(f"{path}: {type(value).__name__} is not {tp}")
    if origin is list:
        if not isinstance(value, list):
            raise WireError(f"{path}: expected a list")
        (item,) = typing.get_args(tp)
        return [_check(v, item, f"{path}[]") for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise WireError(f"{path}: expected a map")
        _, item = typing.get_args(tp)
        return {_check(k, str, f"{path} key"): _check(v, item, f"{path}[{k!r}]") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise WireError(f"{path}: expected a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise WireError(f"{path}: expected an integer")
        return value
    if tp in (str, bool, bytes):
        if not isinstance(value, tp):
            raise WireError(f"{path}: expected {tp.__name__}")
        return value
    raise TypeError(f"{path}: unsupported annotation {tp!r}")
