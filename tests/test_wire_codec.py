"""The generic typed msgpack codec (splitwise.wire_codec) and the length-prefixed framing."""

from __future__ import annotations

import enum
import socket
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack
import pytest

from splitwise.framing import LENGTH, pack_frame, recv_frame
from splitwise.wire_codec import MessageCodec


class CodecError(Exception):
    pass


@dataclass(frozen=True)
class Point:
    x: int
    y: int


@dataclass(frozen=True)
class Shape:
    TAG: ClassVar[str] = "shape"
    name: str
    closed: bool
    points: list[Point]
    origin: Point
    weights: list[float]
    meta: dict[str, Any]
    blob: bytes
    label: str | None = None
    scores: list[float] | None = None


@dataclass(frozen=True)
class Ping:
    TAG: ClassVar[str] = "ping"
    seq: int
    runs: list[list[int]]

    def __post_init__(self) -> None:
        if self.seq < 0:
            raise ValueError("seq must be >= 0")


@dataclass(frozen=True)
class Note:
    TYPE: ClassVar[str] = "note"
    text: str
    tags: dict[str, list[int]] = field(default_factory=dict)


FLAT = MessageCodec((Shape, Ping), schema_version=3, error=CodecError)
NESTED = MessageCodec((Note,), schema_version=1, error=CodecError, tag_attr="TYPE", fields_key="f")

SHAPE = Shape("tri", True, [Point(0, 0), Point(1, 2)], Point(5, 6), [0.5, 1.0], {"k": [1, "a"]}, b"\x00\xff")


def _flat(**fields: object) -> bytes:
    return msgpack.packb({"v": 3, "t": "ping", "seq": 1, "runs": [[0, 1]], **fields}, use_bin_type=True)


def _shape_body(**overrides: object) -> bytes:
    body = msgpack.unpackb(FLAT.encode(SHAPE))
    body.update(overrides)
    return msgpack.packb(body, use_bin_type=True)


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize(
    "message",
    [
        SHAPE,
        Shape("s", False, [], Point(-1, 2**40), [], {}, b"", label="x", scores=[0.25]),
        Ping(0, []),
        Ping(7, [[0, 4], [9, 1]]),
    ],
)
def test_flat_round_trip(message: object) -> None:
    assert FLAT.decode(FLAT.encode(message)) == message


def test_flat_envelope_puts_fields_next_to_version_and_tag_in_field_order() -> None:
    body = msgpack.unpackb(FLAT.encode(Ping(7, [[0, 4]])))
    assert list(body.items()) == [("v", 3), ("t", "ping"), ("seq", 7), ("runs", [[0, 4]])]
    assert msgpack.unpackb(FLAT.encode(SHAPE))["origin"] == {"x": 5, "y": 6}


def test_nested_envelope_round_trip_and_defaults_may_be_absent() -> None:
    note = Note("hi", {"a": [1, 2]})
    body = msgpack.unpackb(NESTED.encode(note))
    assert body == {"v": 1, "t": "note", "f": {"text": "hi", "tags": {"a": [1, 2]}}}
    assert NESTED.decode(NESTED.encode(note)) == note
    assert NESTED.decode(msgpack.packb({"v": 1, "t": "note", "f": {"text": "x"}})) == Note("x")


def test_floats_accept_ints_and_come_back_as_floats() -> None:
    message = FLAT.decode(_shape_body(weights=[1, 2.5], scores=[3]))
    assert message.weights == [1.0, 2.5] and type(message.weights[0]) is float
    assert message.scores == [3.0] and type(message.scores[0]) is float


def test_expect_accepts_a_listed_class() -> None:
    assert FLAT.decode(FLAT.encode(Ping(1, [])), expect=(Shape, Ping)) == Ping(1, [])


# ------------------------------------------------------------------------------ rejections


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\xc1\xc1", "not msgpack"),
        (msgpack.packb([1, 2]), "not a map"),
        (msgpack.packb({"t": "ping", "seq": 1, "runs": []}), "schema version None"),
        (_flat(v=4), "unsupported schema version 4"),
        (_flat(t="pickle"), "unknown message type 'pickle'"),
        (_flat(t=7), "unknown message type 7"),
        (msgpack.packb({"v": 3, "t": "ping", "seq": 1}), r"ping: missing fields \['runs'\]"),
        (_flat(evil=1), r"ping: unknown fields \['evil'\]"),
        (_flat(seq="1"), "ping.seq: expected int, got str"),
        (_flat(seq=True), "ping.seq: expected int, got bool"),
        (_flat(seq=1.5), "ping.seq: expected int, got float"),
        (_flat(runs=[[0, 1], [2, "x"]]), r"ping.runs\[1\]\[1\]: expected int, got str"),
        (_flat(runs=[[0, 1], 5]), r"ping.runs\[1\]: expected list\[int\], got int"),
        (_flat(runs={"a": 1}), r"ping.runs: expected list\[list\[int\]\], got dict"),
        (_flat(seq=-1), "invalid ping: seq must be >= 0"),
        (_shape_body(closed=1), "shape.closed: expected bool, got int"),
        (_shape_body(blob="text"), "shape.blob: expected bytes, got str"),
        (_shape_body(weights=[True]), r"shape.weights\[0\]: expected float, got bool"),
        (_shape_body(origin=[5, 6]), "shape.origin: fields must be a map"),
        (_shape_body(origin={"x": 5}), r"shape.origin: missing fields \['y'\]"),
        (
            _shape_body(points=[{"x": 0, "y": 0}, {"x": 1, "y": "2"}]),
            r"shape.points\[1\].y: expected int, got str",
        ),
        (_shape_body(meta={b"k": 1}), "shape.meta key b'k': expected str, got bytes"),
        (_shape_body(meta=[]), r"shape.meta: expected dict\[str, typing.Any\], got list"),
        (_shape_body(label=3), r"shape.label: expected str \| None, got int"),
        (_shape_body(scores=["x"]), r"shape.scores: expected list\[float\] \| None, got list"),
    ],
)
def test_flat_rejects(data: bytes, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        FLAT.decode(data)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (msgpack.packb({"v": 1, "t": "note"}), r"not a message envelope \{v, t, f\}"),
        (msgpack.packb({"v": 1, "t": "note", "f": {}, "x": 1}), "not a message envelope"),
        (msgpack.packb({"v": 2, "t": "note", "f": {"text": "x"}}), "unsupported schema version 2"),
        (msgpack.packb({"v": 1, "t": "note", "f": [1]}), "note: fields must be a map"),
        (
            msgpack.packb({"v": 1, "t": "note", "f": {"text": "x", "tags": {"a": ["1"]}}}),
            r"note.tags\['a'\]\[0\]: expected int, got str",
        ),
    ],
)
def test_nested_rejects(data: bytes, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        NESTED.decode(data)


def test_expect_refuses_other_classes_before_looking_at_fields() -> None:
    with pytest.raises(CodecError, match="unexpected message type 'ping' here"):
        FLAT.decode(_flat(seq="not even an int"), expect=Shape)


# ------------------------------------------------------------------------------ construction and encode


def test_encode_refuses_a_type_the_codec_does_not_know() -> None:
    with pytest.raises(TypeError, match="Note is not a message of this codec"):
        FLAT.encode(Note("x"))
    with pytest.raises(TypeError, match="Point is not a message"):
        FLAT.encode(Point(1, 2))  # compiled as a nested class, but not a message with a tag


def test_construction_refuses_bad_message_classes() -> None:
    @dataclass(frozen=True)
    class Twin:
        TAG: ClassVar[str] = "ping"
        seq: int

    @dataclass(frozen=True)
    class Clash:
        TAG: ClassVar[str] = "clash"
        v: int

    @dataclass(frozen=True)
    class Odd:
        TAG: ClassVar[str] = "odd"
        when: set[int]

    with pytest.raises(ValueError, match="already taken"):
        MessageCodec((Ping, Twin), schema_version=1, error=CodecError)
    with pytest.raises(ValueError, match="collide with the flat envelope"):
        MessageCodec((Clash,), schema_version=1, error=CodecError)
    MessageCodec((Clash,), schema_version=1, error=CodecError, fields_key="f")  # no clash when nested
    with pytest.raises(TypeError, match="unsupported field type"):
        MessageCodec((Odd,), schema_version=1, error=CodecError)


def test_checks_are_compiled_once_not_per_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    codec = MessageCodec((Shape, Ping), schema_version=3, error=CodecError)
    data = codec.encode(SHAPE)

    def forbidden(*args: object, **kwargs: object) -> typing.NoReturn:
        raise AssertionError("type hints resolved at decode time")

    monkeypatch.setattr(typing, "get_type_hints", forbidden)
    assert codec.decode(data) == SHAPE


def test_a_message_class_may_also_be_nested_in_an_earlier_one() -> None:
    @dataclass(frozen=True)
    class Wrapper:
        TAG: ClassVar[str] = "wrapper"
        inner: Ping

    codec = MessageCodec((Wrapper, Ping), schema_version=1, error=CodecError)
    for message in (Wrapper(Ping(1, [[2]])), Ping(3, [])):
        assert codec.decode(codec.encode(message)) == message


def test_by_tag_is_read_only() -> None:
    assert dict(FLAT.by_tag) == {"shape": Shape, "ping": Ping}
    with pytest.raises(TypeError):
        FLAT.by_tag["x"] = Ping  # type: ignore[index]


# ------------------------------------------------------------------------------ framing


def test_frames_round_trip_over_a_socket() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(pack_frame(b"one") + pack_frame(FLAT.encode(Ping(1, [[2, 3]]))))
        assert recv_frame(b, max_bytes=64, error=CodecError) == b"one"
        assert FLAT.decode(recv_frame(b, max_bytes=64, error=CodecError)) == Ping(1, [[2, 3]])


@pytest.mark.parametrize("length", [0, 65])
def test_frames_refuse_a_length_outside_the_limit(length: int) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(LENGTH.pack(length))
        with pytest.raises(CodecError, match=f"frame length {length} outside 1..64"):
            recv_frame(b, max_bytes=64, error=CodecError)


def test_frames_raise_connection_error_on_a_cut_frame_and_use_the_given_fill() -> None:
    a, b = socket.socketpair()
    with b:
        a.sendall(pack_frame(b"hello")[:6])
        a.close()
        with pytest.raises(ConnectionError, match="peer closed the connection"):
            recv_frame(b, max_bytes=64, error=CodecError)

    calls: list[int] = []

    def fill(sock: socket.socket, view: memoryview) -> None:
        calls.append(len(view))
        view[:] = (LENGTH.pack(2) + b"ok")[: len(view)] if len(view) == LENGTH.size else b"ok"

    with socket.socket() as unused:
        assert recv_frame(unused, max_bytes=64, error=CodecError, fill=fill) == b"ok"
    assert calls == [4, 2]


# --------------------------------------------------------------------------- tuples, enums, int keys


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True)
class Spec:
    """A nested dataclass with defaults, like the engine's SamplingParams: never registered."""

    stops: tuple[str, ...] = ()
    bias: dict[int, float] = field(default_factory=dict)
    color: Color = Color.RED

    def __post_init__(self) -> None:
        if any(not s for s in self.stops):
            raise LookupError("stop strings must be non-empty")  # not a TypeError/ValueError


@dataclass(frozen=True)
class Job:
    TAG: ClassVar[str] = "job"
    spec: Spec
    color: Color


TYPED = MessageCodec((Job,), schema_version=1, error=CodecError)


def test_tuples_enums_and_int_keyed_maps_round_trip() -> None:
    job = Job(Spec(("a", "b"), {5: -1.5, 7: 2}, Color.BLUE), Color.RED)
    decoded = TYPED.decode(TYPED.encode(job))
    assert decoded == job
    assert isinstance(decoded.spec.stops, tuple) and decoded.spec.bias == {5: -1.5, 7: 2.0}


def test_a_nested_dataclass_may_omit_defaulted_fields() -> None:
    data = msgpack.packb({"v": 1, "t": "job", "spec": {}, "color": "blue"}, use_bin_type=True)
    assert TYPED.decode(data) == Job(Spec(), Color.BLUE)


@pytest.mark.parametrize(
    ("spec", "color", "match"),
    [
        ({"stops": ["a", 1]}, "red", r"job.spec.stops\[1\]: expected str"),
        ({"bias": {"x": 1.0}}, "red", "job.spec.bias key 'x': expected int"),
        ({}, "green", r"'green' is not one of \['red', 'blue'\] \(Color\)"),
        ({"stops": [""]}, "red", "invalid job.spec: stop strings must be non-empty"),
        ({"stops": "ab"}, "red", "job.spec.stops: expected"),
    ],
)
def test_typed_fields_are_checked_on_decode(spec: dict[str, Any], color: str, match: str) -> None:
    data = msgpack.packb({"v": 1, "t": "job", "spec": spec, "color": color}, use_bin_type=True)
    with pytest.raises(CodecError, match=match):
        TYPED.decode(data)


@dataclass(frozen=True)
class Pairs:
    TAG: ClassVar[str] = "pairs"
    bias: tuple[tuple[int, float], ...] = ()


PAIRS = MessageCodec((Pairs,), schema_version=1, error=CodecError)


def test_fixed_length_tuples_round_trip_and_are_checked() -> None:
    """``tuple[int, float]`` (SamplingParams.logit_bias' pairs): exact length, each its own type."""
    decoded = PAIRS.decode(PAIRS.encode(Pairs(((5, -1.5), (7, 2.0)))))
    assert decoded == Pairs(((5, -1.5), (7, 2.0))) and isinstance(decoded.bias[0], tuple)
    for bad, match in (
        ([[5]], r"pairs.bias\[0\]: expected"),
        ([["x", 1.0]], r"pairs.bias\[0\]\[0\]: expected int"),
    ):
        data = msgpack.packb({"v": 1, "t": "pairs", "bias": bad}, use_bin_type=True)
        with pytest.raises(CodecError, match=match):
            PAIRS.decode(data)
