"""Hostile input against real daemons: 10 000 generated client lines, 10 000 malformed messages on
the control, weights and data sockets, and 256 clients at once against a small admission limit.
After each, the daemons are alive and a good request still succeeds."""

from __future__ import annotations

import asyncio
import json
import random

import msgpack
import psutil
import pytest
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import Cluster, connect
from hetserve.wire.client import GENERATE_FIELDS, ProtocolError, parse_line
from hetserve.wire.codec import _REGISTRY, encode
from hetserve.wire.messages import SamplingRows, Step, TensorMeta

LINES = 10_000
MESSAGES = 10_000


def generated(strategy, n: int) -> list:
    """n examples drawn by hypothesis (generation only: no shrinking, no example database)."""
    drawn = []

    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(example):
        drawn.append(example)

    collect()
    return drawn


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False)
                           | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=4), max_leaves=8)
field_names = st.sampled_from(sorted(GENERATE_FIELDS | {"cmd", "target", "token"})) | st.text(max_size=10)
client_lines = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(field_names, json_values, max_size=6).map(lambda d: json.dumps(d).encode()),
    st.fixed_dictionaries({"id": st.text(min_size=1, max_size=5)}, optional={
        "prompt": json_values, "max_tokens": json_values, "temperature": json_values, "stop": json_values,
        "top_p": json_values, "seed": json_values, "messages": json_values, "cmd": json_values,
    }).map(lambda d: json.dumps(d).encode()),
)


def is_bad_line(line: bytes) -> bool:
    """A non-blank line without a newline that the protocol rejects."""
    if b"\n" in line or not line.strip():
        return False
    try:
        parse_line(line)
    except ProtocolError:
        return True
    return False


@pytest.fixture(scope="module")
def small_cluster(model_dir):
    cluster = Cluster(1, "--max-seqs", "2", "--max-queued", "4")
    yield cluster
    assert cluster.stop() == 0


async def good_request_succeeds(cluster: Cluster) -> None:
    client = await connect(cluster)
    try:
        events = await client.call({"prompt": "The capital of France is", "max_tokens": 4})
        assert events[-1]["event"] == "done" and events[-1]["usage"]["completion_tokens"] >= 1
    finally:
        await client.close()


async def test_generated_client_lines_each_get_an_error(small_cluster):
    lines = [line for line in generated(client_lines, LINES * 3 // 2) if is_bad_line(line)][:LINES]
    assert len(lines) == LINES
    client = await connect(small_cluster)
    try:
        await client.send_raw(b"".join(line + b"\n" for line in lines))
        for _ in range(LINES):
            event = await asyncio.wait_for(next_event(client), 120)
            assert event["event"] == "error", event
    finally:
        await client.close()
    await good_request_succeeds(small_cluster)


async def next_event(client) -> dict:
    """The next reply on a connection whose lines carried no usable id (or ids of their own)."""
    while True:
        for key, queue in list(client._queues.items()):
            if not queue.empty():
                event = queue.get_nowait()
                if event is None:
                    raise AssertionError("the server closed the connection")
                return event
        await asyncio.sleep(0.001)


def malformed_messages(n: int) -> list[list[bytes]]:
    """Messages a broken or hostile peer might send: noise, unknown or half-filled typed maps,
    and well-formed Steps whose header disagrees with its tensor."""
    rng = random.Random(0)
    names = sorted(_REGISTRY)
    noise = generated(st.binary(max_size=300), n // 3)
    maps = generated(st.dictionaries(st.sampled_from(["type", "host", "mb", "slots", "tensor", "name", "epoch"])
                                     | st.text(max_size=6), json_values, max_size=6), n // 3)
    out = [[raw] for raw in noise]
    for body in maps:
        body = dict(body)
        body.setdefault("type", rng.choice(names))
        out.append([msgpack.packb(body, use_bin_type=True)])
    while len(out) < n:
        rows = rng.randint(1, 3)
        length = rng.randint(1, 4)
        step = Step(mb=rng.randint(-5, 10**9), phase=rng.choice(["prefill", "decode", "x"]),
                    slots=[rng.randint(-2, 9) for _ in range(rows)], starts=[rng.randint(-2, 600) for _ in range(rows)],
                    lengths=[length] * rows, sampling=SamplingRows([0.0] * rows, [0] * rows, [1.0] * rows,
                                                                   [1] * rows, [0] * rows),
                    tensor=TensorMeta(rng.choice(["int64", "float32", "bogus"]),
                                      [rows, length] + ([576] if rng.random() < 0.5 else [])), epoch=1)
        out.append([encode(step), rng.randbytes(rng.choice([0, 8, rows * length * 8]))])
    rng.shuffle(out)
    return out


async def test_malformed_messages_on_every_socket_are_survived(small_cluster):
    client = await connect(small_cluster)
    status = await client.status()
    await client.close()
    control = small_cluster.listen
    data = status["hosts"][0]["data_addr"]
    messages = malformed_messages(MESSAGES)
    ctx = zmq.asyncio.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(f"tcp://{control}")
        push = ctx.socket(zmq.PUSH)
        push.connect(data)
        for i, frames in enumerate(messages):
            await (dealer if i % 2 else push).send_multipart(frames)
        for sock in (dealer, push):
            sock.close(linger=2000)
    finally:
        ctx.term()
    await asyncio.sleep(1.0)
    client = await connect(small_cluster)
    status = await client.status()
    await client.close()
    assert status["state"] == "serving" and status["hosts"][0]["state"] == "ready"
    await good_request_succeeds(small_cluster)


async def test_256_clients_against_a_small_admission_limit(small_cluster):
    leader = next(p for p in psutil.Process(small_cluster.proc.pid).children() if "leader" in " ".join(p.cmdline()))
    before = leader.memory_info().rss

    async def one(i: int) -> str:
        client = await connect(small_cluster)
        try:
            events = await client.call({"prompt": f"Count to {i}:", "max_tokens": 4})
            last = events[-1]
            return last["event"] if last["event"] == "done" else last["error"]["code"]
        finally:
            await client.close()

    outcomes = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(256))), 600)
    counts = {o: outcomes.count(o) for o in set(outcomes)}
    assert set(counts) <= {"done", "overloaded"}, counts
    assert counts.get("overloaded", 0) > 0 and counts.get("done", 0) >= 6, counts
    assert leader.memory_info().rss - before < 200 << 20, "memory stays bounded"
    await good_request_succeeds(small_cluster)
