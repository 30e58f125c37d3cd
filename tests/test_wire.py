"""Typed msgpack messages and tensor frames: round trips, and refusal of anything malformed."""

from __future__ import annotations

import msgpack
import pytest
import torch

from hetserve.wire.codec import WireError, decode, encode
from hetserve.wire.messages import Assign, Heartbeat, Inventory, Join, SamplingRows, StageStats, Step, TensorMeta
from hetserve.wire.tensors import from_frame, to_frame

INVENTORY = Inventory("cpu", "cpu", "x86_64", 8 << 30, 4 << 30, 4 << 30, 50.0, 2)


def step(**overrides) -> Step:
    fields = dict(mb=3, phase="decode", slots=[0, 2], starts=[5, 9], lengths=[1, 1],
                  sampling=SamplingRows([0.0, 0.7], [0, 40], [1.0, 0.9], [1, 2], [3, 4]),
                  tensor=TensorMeta("int64", [2, 1]))
    fields.update(overrides)
    return Step(**fields)


@pytest.mark.parametrize("msg", [
    Join("h1", INVENTORY, "tcp://127.0.0.1:4000"),
    Assign(0, 2, 0, 15, "smollm2-135m", 30, "float32", 8, 2048, "tcp://127.0.0.1:4001"),
    Heartbeat("h1", StageStats(3, 40, 0.5, 12.0, 3.0)),
    step(),
])
def test_round_trip(msg):
    assert decode(encode(msg)) == msg


def raw(body) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def body_of(msg) -> dict:
    return msgpack.unpackb(encode(msg))


@pytest.mark.parametrize("data,why", [
    (b"\xc1", "not msgpack"),
    (raw([1, 2]), "a map"),
    (raw({"type": "pickle"}), "unknown message type"),
    (raw({"hello": 1}), "unknown message type"),
    ({**body_of(step()), "evil": 1}, "unknown fields"),
    ({**body_of(step()), "evil": 1, b"bytes": 2}, "unknown fields"),  # keys that do not sort together
    ({k: v for k, v in body_of(step()).items() if k != "slots"}, "missing field"),
    ({**body_of(step()), "mb": "3"}, "expected an integer"),
    ({**body_of(step()), "mb": True}, "expected an integer"),
    ({**body_of(step()), "slots": [0, "1"]}, "expected an integer"),
    ({**body_of(step()), "slots": 7}, "expected a list"),
    ({**body_of(step()), "sampling": [1]}, "expected a map"),
    ({**body_of(step()), "tensor": {"dtype": "int64", "shape": [1], "x": 1}}, "unknown fields"),
])
def test_malformed_is_refused(data, why):
    if isinstance(data, dict):
        data = raw(data)
    with pytest.raises(WireError, match=why):
        decode(data)


def test_decode_checks_the_expected_kinds():
    with pytest.raises(WireError, match="unexpected message"):
        decode(encode(step()), expect=(Join,))


def test_tensor_frame_round_trip_and_checks():
    t = torch.randn(2, 3, 4)
    meta, frame = to_frame(t)
    assert torch.equal(from_frame(meta, bytes(frame), (2, None, 4), ("float32",), torch.device("cpu")), t)
    bf = torch.randn(2, 5).to(torch.bfloat16)
    meta_bf, frame_bf = to_frame(bf)
    assert torch.equal(from_frame(meta_bf, bytes(frame_bf), (2, 5), ("bfloat16",), torch.device("cpu")), bf)
    with pytest.raises(WireError, match="shape"):
        from_frame(meta, bytes(frame), (2, 3, 5), ("float32",), torch.device("cpu"))
    with pytest.raises(WireError, match="dtype"):
        from_frame(meta, bytes(frame), (2, 3, 4), ("float16",), torch.device("cpu"))
    with pytest.raises(WireError, match="bytes"):
        from_frame(meta, bytes(frame)[:-4], (2, 3, 4), ("float32",), torch.device("cpu"))
    with pytest.raises(WireError, match="shape"):
        from_frame(TensorMeta("float32", [-1, 3, 4]), b"", (None, 3, 4), ("float32",), torch.device("cpu"))


def test_a_small_frame_of_many_tiny_containers_is_refused_early():
    """Per-container limits bound nothing in all: 16 arrays of 2^20 empty arrays is a 16 MiB frame
    that decoded to ~1.1 GB of lists (and seconds of the leader's event loop) before failing."""
    import tracemalloc

    bomb = b"\xdc\x00\x10" + (b"\xdd\x00\x10\x00\x00" + b"\x90" * (1 << 20)) * 16
    tracemalloc.start()
    try:
        with pytest.raises(WireError, match="list items and map entries"):
            decode(bomb, expect=(Step,))
        assert tracemalloc.get_traced_memory()[1] < 64 << 20
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("text, default, want", [
    ("10.0.0.1:5555", None, ("10.0.0.1", 5555)), ("leader", 5555, ("leader", 5555)),
    ("[fd00::5]:6000", None, ("fd00::5", 6000)), ("[::1]", 5555, ("::1", 5555)),
    ("fd00::5", 5555, ValueError), ("[::1]", None, ValueError), ("[::1]x", 5, ValueError), ("h:99999", None, ValueError),
    ("h:", 5, ValueError), (":5", None, ValueError),
])
def test_host_and_port(text, default, want):
    """A bare IPv6 address was split at its last colon ('fd00::5' -> 'fd00:', port 5); '[::1]'
    with a default port was refused."""
    from hetserve.transport.sockets import split_hostport

    if want is ValueError:
        with pytest.raises(ValueError, match=r"is not (HOST|\[ADDRESS\]):PORT|IPv6 address in brackets"):
            split_hostport(text, default)
    else:
        assert split_hostport(text, default) == want
