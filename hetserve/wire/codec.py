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
MAX_ITEMS = 1 << 19  # most list items and map entries in one message, all containers together: a
#                      16 MiB frame of empty lists decodes to ~1 GB of Python objects otherwise


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
    items = 0

    def counted(container):  # msgpack calls it as each list or map is complete, inner ones first
        nonlocal items
        items += len(container) + 1
        if items > MAX_ITEMS:
            raise ValueError(f"more than {MAX_ITEMS} list items and map entries")
        return container

    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=len(data),
                               max_str_len=len(data), max_array_len=MAX_CONTAINER, max_map_len=MAX_CONTAINER,
                               list_hook=counted, object_hook=counted)
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


_SCALARS = (int, float, str, bool, bytes, type(None))


def _to_plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        # A micro-batch header is mostly lists of numbers, one per row: copied in one pass.
        if all(type(v) in _SCALARS for v in value):
            return list(value)
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
        raise WireError(f"{path}: unknown fields {sorted(map(repr, unknown))}")  # keys may be bytes too
    values = {}
    for name, field in fields.items():
        if name not in body:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise WireError(f"{path}: missing field {name!r}")
            continue
        values[name] = _check(body[name], hints[name], f"{path}.{name}")
    return cls(**values)


def _check(value, tp, path: str):
    return _checker(tp)(value, path)


_CHECKERS: dict[typing.Any, typing.Callable] = {}


def _checker(tp) -> typing.Callable:
    """The validator of annotation `tp`: (value, path) -> value as the message holds it, or
    WireError. Built once per annotation: a header's lists are checked per item, so the
    annotation must not be taken apart again for every item."""
    if tp not in _CHECKERS:
        _CHECKERS[tp] = _make_checker(tp)
    return _CHECKERS[tp]


def _make_checker(tp) -> typing.Callable:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        optional = type(None) in args
        options = [_checker(arg) for arg in args if arg is not type(None)]

        def check_union(value, path):
            if value is None and optional:
                return None
            for option in options:
                try:
                    return option(value, path)
                except WireError:
                    pass
            raise WireError(f"{path}: {type(value).__name__} is not {tp}")
        return check_union
    if origin is list:
        (item,) = typing.get_args(tp)
        check_item = _checker(item)
        exact = {int: int, float: float, str: str, bool: bool, bytes: bytes}.get(item)

        def check_list(value, path):
            if not isinstance(value, list):
                raise WireError(f"{path}: expected a list")
            if exact is not None and all(type(v) is exact for v in value):  # the common case, in one pass
                return value
            return [check_item(v, f"{path}[]") for v in value]
        return check_list
    if origin is dict:
        _, item = typing.get_args(tp)
        check_key, check_value = _checker(str), _checker(item)

        def check_dict(value, path):
            if not isinstance(value, dict):
                raise WireError(f"{path}: expected a map")
            return {check_key(k, f"{path} key"): check_value(v, f"{path}[{k!r}]") for k, v in value.items()}
        return check_dict
    if dataclasses.is_dataclass(tp):
        return lambda value, path: _build(tp, value, path)
    if tp is float:
        def check_float(value, path):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise WireError(f"{path}: expected a number")
            return float(value)
        return check_float
    if tp is int:
        def check_int(value, path):
            if isinstance(value, bool) or not isinstance(value, int):
                raise WireError(f"{path}: expected an integer")
            return value
        return check_int
    if tp in (str, bool, bytes):
        def check_exact(value, path):
            if not isinstance(value, tp):
                raise WireError(f"{path}: expected {tp.__name__}")
            return value
        return check_exact
    raise TypeError(f"unsupported annotation {tp!r}")
