"""One typed msgpack codec for every boundary's dataclass messages (transfer, rdma, scheduler).

Each boundary declares its frozen dataclasses and builds one ``MessageCodec`` over them, with its
own schema version, its own error class and its own envelope layout::

    fields_key=None   {"v": version, "t": tag, field: value, ...}     transfer, rdma
    fields_key="f"    {"v": version, "t": tag, "f": {field: value}}   scheduler

Decoding checks, in this order, msgpack, the envelope, the version, the tag (and ``expect``), the
field set (fields with a default may be absent) and each field's type, so garbage or a peer of
another schema version raises the boundary's error with the reason, never a half-built message.

Field checks are compiled once per class from its type hints: a LayerWrite lists thousands of
ints, so plain values (bool/int/str/bytes/Any/None and lists, dicts, unions of them) are checked
with one predicate and kept as they are; only nested dataclasses, floats (an int becomes a float),
tuples (``tuple[X, ...]``, a list on the wire) and enums (their value on the wire) are rebuilt. A
failed predicate is re-walked to name the exact bad element in the error. A nested dataclass needs
no registration: any frozen dataclass of supported field types (e.g. the engine's SamplingParams)
travels as a map of its fields, so a field added to it travels with no converter to edit.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Union

import msgpack

Check = Callable[[Any], bool]
Convert = Callable[[Any, str], Any]


class _Compiled(NamedTuple):
    """A type hint compiled once. ``check`` is a pure predicate when the value is kept as it is,
    None when ``convert`` must rebuild it; ``convert`` validates, raises with the path, returns."""

    check: Check | None
    convert: Convert


@dataclass(frozen=True)
class _ClassSpec:
    tag: str
    names: tuple[str, ...]  # dataclass order: the order fields go on the wire
    name_set: frozenset[str]
    required: frozenset[str]  # fields without a default
    converts: tuple[tuple[str, Convert], ...]


class MessageCodec:
    """Encode/decode the dataclasses ``message_types`` (each carries its tag in the class attribute
    ``tag_attr``). Every rejection raises ``error(reason)``; encoding an unregistered type is a
    bug of the caller and raises TypeError."""

    def __init__(
        self,
        message_types: Iterable[type],
        *,
        schema_version: int,
        error: type[Exception],
        tag_attr: str = "TAG",
        fields_key: str | None = None,
    ) -> None:
        self.schema_version = schema_version
        self.error = error
        self.fields_key = fields_key
        self._envelope_keys = frozenset({"v", "t", fields_key}) if fields_key is not None else frozenset()
        self._specs: dict[type, _ClassSpec] = {}
        self._hints: dict[Any, _Compiled] = {}
        by_tag: dict[str, type] = {}
        for cls in message_types:
            tag = getattr(cls, tag_attr)
            if not isinstance(tag, str) or not tag or tag in by_tag:
                raise ValueError(f"{cls.__name__}.{tag_attr}: {tag!r} is empty, not a str or already taken")
            by_tag[tag] = cls
            spec = self._specs[cls] = dataclasses.replace(
                self._spec(cls, tag), tag=tag
            )  # also if met nested first
            if fields_key is None and {"v", "t"} & spec.name_set:
                raise ValueError(f"{cls.__name__}: fields 'v' and 't' collide with the flat envelope")
        self.by_tag: Mapping[str, type] = types.MappingProxyType(by_tag)  # read-only tag table

    # ------------------------------------------------------------------------------ encode

    def encode(self, message: Any) -> bytes:
        spec = self._specs.get(type(message))
        if spec is None or self.by_tag.get(spec.tag) is not type(message):
            raise TypeError(f"{type(message).__name__} is not a message of this codec")
        fields = {name: getattr(message, name) for name in spec.names}
        if self.fields_key is None:
            body = {"v": self.schema_version, "t": spec.tag, **fields}
        else:
            body = {"v": self.schema_version, "t": spec.tag, self.fields_key: fields}
        packed: bytes = msgpack.packb(body, use_bin_type=True, default=_dataclass_to_map)
        return packed

    # ------------------------------------------------------------------------------ decode

    def decode(self, data: bytes, expect: type | tuple[type, ...] | None = None) -> Any:
        """Parse one message; ``expect`` restricts the accepted classes (checked before the fields)."""
        try:
            # Non-str map keys are allowed (e.g. dict[int, float]); every key is type-checked below.
            body = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises several unrelated types on garbage
            raise self.error(f"not msgpack, undecodable ({type(exc).__name__}: {exc})") from None
        if not isinstance(body, dict):
            raise self.error(f"not a message envelope: a {type(body).__name__}, not a map")
        if self.fields_key is None:
            version, tag, fields = body.pop("v", None), body.pop("t", None), body
        elif body.keys() != self._envelope_keys:
            raise self.error(
                f"not a message envelope {{v, t, {self.fields_key}}}: keys {sorted(map(str, body))}"
            )
        else:
            version, tag, fields = body["v"], body["t"], body[self.fields_key]
        if version != self.schema_version:
            raise self.error(
                f"unsupported schema version {version!r} (this side speaks {self.schema_version})"
            )
        cls = self.by_tag.get(tag) if isinstance(tag, str) else None
        if cls is None:
            raise self.error(f"unknown message type {tag!r}")
        if expect is not None and not issubclass(cls, expect):
            raise self.error(f"unexpected message type {tag!r} here")
        return self._build(cls, fields, tag)

    def _build(self, cls: type, data: Any, where: str) -> Any:
        spec = self._specs[cls]
        if not isinstance(data, dict):
            raise self.error(f"{where}: fields must be a map, got {type(data).__name__}")
        if data.keys() != spec.name_set:
            unknown = sorted(map(str, data.keys() - spec.name_set))
            missing = sorted(spec.required - data.keys())
            if unknown or missing:
                problem = f"unknown fields {unknown}" if unknown else f"missing fields {missing}"
                raise self.error(f"{where}: {problem} (expected fields {sorted(spec.names)})")
        values = {
            name: convert(data[name], f"{where}.{name}") for name, convert in spec.converts if name in data
        }
        try:
            return cls(**values)
        except Exception as exc:  # __post_init__ validation of a decoded value (any error type)
            raise self.error(f"invalid {where}: {exc}") from None

    # ------------------------------------------------------------------------------ compile

    def _spec(self, cls: type, tag: str) -> _ClassSpec:
        """Compile ``cls`` (and the dataclasses nested in it) once; ``tag`` names it in errors."""
        if cls in self._specs:
            return self._specs[cls]
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} is not a dataclass")
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        names = tuple(f.name for f in fields)
        required = frozenset(
            f.name
            for f in fields
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        # Registered before its fields compile, so a class may refer to itself.
        spec = _ClassSpec(tag, names, frozenset(names), required, ())
        self._specs[cls] = spec
        converts = tuple((name, self._compile(hints[name]).convert) for name in names)
        spec = dataclasses.replace(spec, converts=converts)
        self._specs[cls] = spec
        return spec

    def _compile(self, hint: Any) -> _Compiled:
        compiled = self._hints.get(hint)
        if compiled is None:
            compiled = self._hints[hint] = self._compile_new(hint)
        return compiled

    def _compile_new(self, hint: Any) -> _Compiled:
        origin = typing.get_origin(hint)
        if hint is Any:
            return _Compiled(_anything, _keep)
        if hint is type(None):
            return self._leaf(hint, lambda v: v is None)
        if hint is bool:
            return self._leaf(hint, lambda v: isinstance(v, bool))
        if hint is int:
            return self._leaf(hint, lambda v: isinstance(v, int) and not isinstance(v, bool))
        if hint in (str, bytes):
            return self._leaf(hint, lambda v: isinstance(v, hint))
        if hint is float:
            return _Compiled(None, self._to_float)
        if origin is list:
            return self._list(hint, self._compile(typing.get_args(hint)[0]))
        if origin is tuple:
            args = typing.get_args(hint)
            if len(args) == 2 and args[1] is Ellipsis:
                as_list = self._list(hint, self._compile(args[0])).convert
                return _Compiled(None, lambda v, where: tuple(as_list(v, where)))
            if not args or Ellipsis in args:
                raise TypeError(f"unsupported field type {hint} (tuple[X, ...] or tuple[A, B, ...])")
            return self._fixed_tuple(hint, [self._compile(arg) for arg in args])
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            return _Compiled(None, lambda v, where: self._to_enum(hint, v, where))
        if origin is dict:
            key_hint, value_hint = typing.get_args(hint)
            return self._dict(hint, self._compile(key_hint), self._compile(value_hint))
        if origin in (Union, types.UnionType):
            return self._union(hint, [self._compile(option) for option in typing.get_args(hint)])
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            self._spec(hint, hint.__name__)
            return _Compiled(None, lambda v, where: self._build(hint, v, where))
        raise TypeError(f"unsupported field type {hint}")  # a bug in a message class, not in a payload

    def _fail(self, hint: Any, value: Any, where: str) -> typing.NoReturn:
        raise self.error(f"{where}: expected {_hint_name(hint)}, got {type(value).__name__}")

    def _leaf(self, hint: Any, check: Check) -> _Compiled:
        def convert(value: Any, where: str) -> Any:
            if not check(value):
                self._fail(hint, value, where)
            return value

        return _Compiled(check, convert)

    def _to_enum(self, hint: type[enum.Enum], value: Any, where: str) -> enum.Enum:
        try:
            return hint(value)
        except ValueError:
            raise self.error(
                f"{where}: {value!r} is not one of {[m.value for m in hint]} ({hint.__name__})"
            ) from None

    def _to_float(self, value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self._fail(float, value, where)
        return float(value)

    def _fixed_tuple(self, hint: Any, items: list[_Compiled]) -> _Compiled:
        """``tuple[A, B]``: a list of exactly that many elements, each of its own type."""

        def convert(value: Any, where: str) -> Any:
            if not isinstance(value, list) or len(value) != len(items):
                raise self.error(f"{where}: expected {_hint_name(hint)}, got {value!r}")
            return tuple(
                item.convert(v, f"{where}[{i}]") for i, (item, v) in enumerate(zip(items, value, strict=True))
            )

        return _Compiled(None, convert)

    def _list(self, hint: Any, item: _Compiled) -> _Compiled:
        item_check = item.check
        if item_check is not None:

            def check(value: Any) -> bool:
                return isinstance(value, list) and all(map(item_check, value))

            def convert(value: Any, where: str) -> Any:
                if not check(value):
                    if not isinstance(value, list):
                        self._fail(hint, value, where)
                    bad = next(i for i, v in enumerate(value) if not item_check(v))
                    item.convert(value[bad], f"{where}[{bad}]")  # raises with the exact element
                return value

            return _Compiled(check, convert)

        def rebuild(value: Any, where: str) -> Any:
            if not isinstance(value, list):
                self._fail(hint, value, where)
            return [item.convert(v, f"{where}[{i}]") for i, v in enumerate(value)]

        return _Compiled(None, rebuild)

    def _dict(self, hint: Any, key: _Compiled, val: _Compiled) -> _Compiled:
        def rebuild(value: Any, where: str) -> Any:
            if not isinstance(value, dict):
                self._fail(hint, value, where)
            return {
                key.convert(k, f"{where} key {k!r}"): val.convert(v, f"{where}[{k!r}]")
                for k, v in value.items()
            }

        key_check, val_check = key.check, val.check
        if key_check is not None and val_check is not None:

            def check(value: Any) -> bool:
                return (
                    isinstance(value, dict)
                    and all(map(key_check, value))
                    and (val_check is _anything or all(map(val_check, value.values())))
                )

            def convert(value: Any, where: str) -> Any:
                if not check(value):
                    rebuild(value, where)  # raises with the exact key or value
                return value

            return _Compiled(check, convert)

        return _Compiled(None, rebuild)

    def _union(self, hint: Any, options: list[_Compiled]) -> _Compiled:
        checks = [option.check for option in options]
        if all(c is not None for c in checks):
            plain = typing.cast(list[Check], checks)

            def check(value: Any) -> bool:
                return any(c(value) for c in plain)

            def convert(value: Any, where: str) -> Any:
                if not check(value):
                    self._fail(hint, value, where)
                return value

            return _Compiled(check, convert)

        def rebuild(value: Any, where: str) -> Any:
            for option in options:
                try:
                    return option.convert(value, where)
                except self.error:
                    continue
            self._fail(hint, value, where)

        return _Compiled(None, rebuild)


def _anything(value: Any) -> bool:
    return True


def _keep(value: Any, where: str) -> Any:
    return value


def _hint_name(hint: Any) -> str:
    if hint is type(None):
        return "nil"
    return hint.__name__ if isinstance(hint, type) and typing.get_origin(hint) is None else str(hint)


def _dataclass_to_map(value: Any) -> Any:
    """msgpack ``default``: a nested dataclass goes on the wire as a map of its fields, in order
    (what ``dataclasses.asdict`` gives, without copying the plain values)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(f"cannot serialize {type(value).__name__}")
