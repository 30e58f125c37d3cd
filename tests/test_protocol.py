"""The line protocol against a real 2-stage cluster: streaming, sampling, stop, bad input,
cancel, disconnect and overload."""

from __future__ import annotations

import asyncio
import json

import pytest
import pytest_asyncio

from conftest import connect
from hetserve.client import LineClient
from hetserve.wire.client import ProtocolError

pytestmark = pytest.mark.asyncio(loop_scope="module")

SLOTS = 4  # the shared cluster runs with --max-seqs 4 --max-queued 4


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(shared_cluster):
    c = await connect(shared_cluster)
    yield c
    await c.close()


async def tokens_and_done(client, body):
    events = await client.call(body)
    return [e for e in events if e["event"] == "token"], events[-1]


async def wait_idle(client, timeout=30.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        status = await client.status()
        if status["running"] == 0 and status["queued"] == 0 and status["free_slots"] == SLOTS:
            return status
        await asyncio.sleep(0.1)
    raise AssertionError(f"slots not freed: {status}")


async def test_stream_pieces_concatenate_to_text(client):
    tokens, done = await tokens_and_done(client, {"messages": [{"role": "user", "content": "Say hello in Japanese and French."}],
                                                  "max_tokens": 40})
    assert done["event"] == "done" and done["finish_reason"] in ("stop", "length")
    assert "".join(t["text"] for t in tokens) == done["text"]
    assert done["usage"]["completion_tokens"] == len(tokens)
    assert all(isinstance(t["token_id"], int) for t in tokens)


async def test_not_streaming_gives_only_done(client):
    events = await client.call({"prompt": "Hello", "max_tokens": 5, "stream": False})
    assert [e["event"] for e in events] == ["done"]
    assert events[0]["finish_reason"] == "length" and events[0]["usage"]["completion_tokens"] == 5


async def test_stop_string_cuts_text(client):
    body = {"prompt": "Count: one, two, three, four, five,", "max_tokens": 24}
    _, full = await tokens_and_done(client, body)
    text = full["text"]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), text
    tokens, done = await tokens_and_done(client, {**body, "stop": [stop]})
    assert done["finish_reason"] == "stop"
    assert done["text"] == text[: text.index(stop)]
    assert "".join(t["text"] for t in tokens) == done["text"]


async def test_seed_reproduces_sampling(client):
    body = {"prompt": "My favourite animal is", "max_tokens": 16, "temperature": 1.0, "top_p": 0.95, "top_k": 50}
    a = (await tokens_and_done(client, {**body, "seed": 7}))[1]["text"]
    b = (await tokens_and_done(client, {**body, "seed": 7}))[1]["text"]
    others = {(await tokens_and_done(client, {**body, "seed": s}))[1]["text"] for s in (8, 9, 10)}
    assert a == b
    assert others - {a}, "different seeds should give different samples"


async def test_status_command(client):
    events = await client.call({"cmd": "status"})
    status = events[0]
    assert status["event"] == "status" and status["state"] == "serving"
    assert [h["stage"] for h in status["hosts"]] == [0, 1]
    assert all(h["health"] == "ok" for h in status["hosts"])
    assert status["queued"] == 0 and "stage_ms" in status


# (line, error code, id the error line carries: None where the line's id cannot be read)
BAD_LINES = [
    (b"{not json", "bad_request", None),
    (b"[1, 2]", "bad_request", None),
    (b'{"prompt": "hi"}', "bad_request", None),  # no id
    (b'{"id": 5, "prompt": "hi"}', "bad_request", None),
    (b'{"id": "b1", "prompt": 5}', "bad_request", "b1"),
    (b'{"id": "b2", "prompt": "hi", "colour": "red"}', "bad_request", "b2"),
    (b'{"id": "b3", "prompt": "hi", "messages": [{"role": "user", "content": "x"}]}', "bad_request", "b3"),
    (b'{"id": "b4"}', "bad_request", "b4"),
    (b'{"id": "b5", "prompt": ""}', "bad_request", "b5"),
    (b'{"id": "b6", "prompt": "hi", "max_tokens": 0}', "bad_request", "b6"),
    (b'{"id": "b7", "prompt": "hi", "max_tokens": 100000}', "bad_request", "b7"),
    (b'{"id": "b8", "prompt": "hi", "temperature": -1}', "bad_request", "b8"),
    (b'{"id": "b9", "prompt": "hi", "top_p": 0}', "bad_request", "b9"),
    (b'{"id": "b10", "prompt": "hi", "stop": [1]}', "bad_request", "b10"),
    (b'{"id": "b11", "prompt": "hi", "stream": "yes"}', "bad_request", "b11"),
    (b'{"id": "b12", "messages": [{"role": "robot", "content": "x"}]}', "bad_request", "b12"),
    (b'{"id": "b13", "cmd": "reboot"}', "bad_request", "b13"),
    (b'{"id": "b14", "cmd": "cancel", "target": "nothing-running"}', "bad_request", "b14"),
    (b'{"id": "b15", "prompt": "hi", "seed": -1}', "bad_request", "b15"),
    (b'\xff\xfe{"id": "b16"}', "bad_request", None),
    (json.dumps({"id": "b17", "prompt": "word " * 600}).encode(), "too_long", "b17"),  # > 512-token context
    (b'{"id": "b18", "prompt": "' + b"a" * (1 << 20) + b'"}', "too_long", None),  # line over 1 MiB
    (b'{"id": "\\ud800", "prompt": "hi"}', "bad_request", None),  # no UTF-8 can carry the id back
    (b'{"id": "b20", "prompt": "a\\udc00b"}', "bad_request", "b20"),
    (b'{"id": "b21", "prompt": "hi", "top_k": 18446744073709551616}', "bad_request", "b21"),  # past msgpack's ints
    (b'{"id": "b22", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", "bad_request", None),  # past 4300 digits
    (b"[" * 100_000 + b"]" * 100_000, "bad_request", None),  # nested past the parser's stack
    (b'{"id": "b23", "prompt": "hi", "temperature": 1' + b"0" * 400 + b"}", "bad_request", "b23"),  # past floats
]


@pytest.mark.parametrize("line,code,reply_id", BAD_LINES, ids=[f"bad{i}" for i in range(len(BAD_LINES))])
async def test_bad_input_gets_error_and_connection_survives(shared_cluster, line, code, reply_id):
    client = await connect(shared_cluster)  # serving: the check after the error needs the hosts up
    try:
        queue = client._queues.setdefault(reply_id, asyncio.Queue())
        await client.send_raw(line + b"\n")
        error = await asyncio.wait_for(queue.get(), 30)
        assert error["event"] == "error" and error["error"]["code"] == code, error
        assert error["id"] == reply_id and error["error"]["message"]
        # The same connection still serves.
        events = await client.call({"prompt": "Hi", "max_tokens": 2})
        assert events[-1]["event"] == "done", events
    finally:
        await client.close()


async def test_duplicate_id_is_refused_while_running(client):
    queue = client._queues.setdefault("dup", asyncio.Queue())
    try:
        await client.send_raw(b'{"id": "dup", "prompt": "Once upon a time", "max_tokens": 200}\n')
        await client.send_raw(b'{"id": "dup", "prompt": "again"}\n')
        events = []
        while not events or events[-1]["event"] != "done":
            events.append(await asyncio.wait_for(queue.get(), 60))
    finally:
        client._queues.pop("dup", None)
    errors = [e for e in events if e["event"] == "error"]
    assert len(errors) == 1 and errors[0]["error"]["code"] == "bad_request"
    assert "already running" in errors[0]["error"]["message"]
    # The first request is unaffected.
    tokens = [e for e in events if e["event"] == "token"]
    assert events[-1]["usage"]["completion_tokens"] == len(tokens)


async def test_cancel_frees_slot(client):
    stream = client.request({"id": "long1", "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 400})
    first = await stream.__anext__()
    assert first["event"] == "token"
    reply = await client.call({"id": "c-long1", "cmd": "cancel", "target": "long1"})
    assert reply[-1] == {"id": "c-long1", "event": "cancelled", "target": "long1"}
    events = [e async for e in stream]
    done = events[-1]
    assert done["event"] == "done" and done["finish_reason"] == "cancelled"
    assert done["usage"]["completion_tokens"] < 400
    await wait_idle(client)


async def test_disconnect_cancels_requests(shared_cluster, client):
    other = await LineClient.connect(shared_cluster.serve)
    streams = [other.request({"prompt": f"{i}, {i + 1}, {i + 2},", "max_tokens": 400}) for i in range(2)]
    for s in streams:
        assert (await s.__anext__())["event"] == "token"
    assert (await client.status())["running"] == 2
    await other.close()
    await wait_idle(client)


async def test_a_request_the_caller_stops_reading_is_cancelled_and_its_replies_dropped(client):
    """Breaking out of client.request() used to leave the request generating on the server (its KV
    slot held) and its replies piling up unread in the client."""
    cancelled = (await client.status())["outcomes"].get("cancelled", 0)
    stream = client.request({"id": "left", "prompt": "1, 2, 3,", "max_tokens": 400})
    assert (await stream.__anext__())["event"] == "token"
    await stream.aclose()
    await wait_idle(client)
    assert (await client.status())["outcomes"].get("cancelled", 0) == cancelled + 1
    events = await client.call({"id": "left", "prompt": "Hi", "max_tokens": 2})  # the id and connection serve on
    assert events[-1]["event"] == "done"
    assert None not in client._queues and not client._abandoned

    short = client.request({"id": "short", "prompt": "Hi", "max_tokens": 2})  # left with its last reply in: no cancel
    assert (await short.__anext__())["event"] == "token"
    for _ in range(300):  # its second token and done
        if client._queues["short"].qsize() == 2:
            break
        await asyncio.sleep(0.1)
    await short.aclose()
    assert not client._abandoned


async def test_a_client_that_ends_its_input_still_gets_its_answers(shared_cluster, client):
    """`printf '...' | nc -N`: the requests run to the end, then the leader closes the connection."""
    from hetserve.transport.sockets import split_hostport

    reader, writer = await asyncio.open_connection(*split_hostport(shared_cluster.serve, 0))
    try:
        writer.write(b'{"id": "e1", "prompt": "1, 2, 3,", "max_tokens": 12}\n'
                     b'{"id": "e2", "prompt": "a, b, c,", "max_tokens": 12, "stream": false}\n')
        await writer.drain()
        writer.write_eof()
        replies = [json.loads(line) for line in (await asyncio.wait_for(reader.read(), 120)).splitlines()]
    finally:
        writer.close()
    done = {r["id"]: r for r in replies if r["event"] == "done"}
    assert set(done) == {"e1", "e2"}, replies
    assert all(d["finish_reason"] == "length" and d["usage"]["completion_tokens"] == 12 for d in done.values())
    await wait_idle(client)


async def test_a_client_that_reads_no_replies_is_closed(shared_cluster, client):
    """Status lines sent by a client that never reads: the leader queues replies up to
    MAX_UNSENT_REPLY_BYTES, then closes the connection (and cancels what ran on it) rather than
    filling its memory; others are served throughout."""
    from hetserve.config import MAX_UNSENT_REPLY_BYTES
    from hetserve.transport.sockets import split_hostport

    reply = len(json.dumps(await client.status())) + 1
    lines = 2 * MAX_UNSENT_REPLY_BYTES // reply + 1
    reader, writer = await asyncio.open_connection(*split_hostport(shared_cluster.serve, 0))
    flood = b'{"id": "s", "cmd": "status"}\n' * lines
    closed = False
    try:
        writer.write(flood)
        await writer.drain()
        # Unread, until the leader hangs up: a later line's send then fails. A fixed wait raced a
        # slow leader, whose backlog drained once the test began reading.
        for _ in range(600):
            await asyncio.sleep(0.1)
            writer.write(b'{"id": "s", "cmd": "status"}\n')
            await writer.drain()
    except ConnectionError:
        closed = True
    assert closed, "the leader kept the connection of a client that reads nothing for 60 s"
    received = 0
    try:
        while chunk := await asyncio.wait_for(reader.read(1 << 20), 60):
            received += len(chunk)
    except ConnectionError:
        pass
    writer.close()
    assert received < lines * reply, "every reply arrived: the connection was never closed"
    await wait_idle(client)


async def test_overload_refuses_excess_and_completes_the_rest(shared_cluster, client):
    """4 slots + 4 queue places: of 16 requests at once, 8 are accepted and all 8 complete."""
    conn = await LineClient.connect(shared_cluster.serve)
    try:
        results = await asyncio.gather(*(conn.call({"prompt": f"Item {i}:", "max_tokens": 8}) for i in range(16)))
    finally:
        await conn.close()
    finals = [r[-1] for r in results]
    refused = [f for f in finals if f["event"] == "error"]
    completed = [f for f in finals if f["event"] == "done"]
    assert all(f["error"]["code"] == "overloaded" for f in refused)
    assert len(completed) == 8 and len(refused) == 8
    assert all(f["usage"]["completion_tokens"] == 8 or f["finish_reason"] == "stop" for f in completed)
    await wait_idle(client)


async def test_tiny_temperature_is_greedy_not_a_failure(client):
    greedy = (await client.call({"prompt": "The sky is", "max_tokens": 6}))[-1]
    tiny = (await client.call({"prompt": "The sky is", "max_tokens": 6, "temperature": 1e-39, "seed": 1}))[-1]
    assert tiny["event"] == "done" and tiny["text"] == greedy["text"]


async def test_chat_template_refusal_is_a_bad_request(model_dir, monkeypatch):
    """Templates raise on messages they refuse (roles that do not alternate, say); SmolLM2's takes
    any roles, so its template is made to refuse here: the client gets bad_request with its id."""
    from hetserve.leader.tokens import TextCodec
    from hetserve.wire.client import GenerateRequest

    codec = TextCodec(model_dir, 512)

    def refuses(*args, **kwargs):
        raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")

    monkeypatch.setattr(codec.tokenizer, "apply_chat_template", refuses)
    request = GenerateRequest("r1", None, (("user", "a"), ("user", "b")), 2, 0.0, 1.0, 0, None, (), False)
    with pytest.raises(ProtocolError) as refused:
        codec.encode(request)
    assert refused.value.code == "bad_request" and refused.value.request_id == "r1"
    assert "chat template refused the messages: Conversation roles must alternate" in str(refused.value)


class SilentWriter:
    """A connection's sending side that takes everything (the client needs no server here)."""

    def __init__(self):
        self.sent = b""

    def write(self, data: bytes) -> None:
        self.sent += data

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        pass

    async def wait_closed(self) -> None:
        pass


async def test_the_line_client_refuses_what_would_never_be_answered_and_survives_a_cut_line():
    """Ids the server cannot name in its reply (too long, empty, one already running) hung the
    request forever (the error came back as `"id": null`); text no UTF-8 can carry raised
    UnicodeEncodeError; a reply line cut off by the connection's end killed the reader task with
    JSONDecodeError instead of telling the waiting request."""
    from hetserve.client import ClientError

    reader = asyncio.StreamReader()
    client = LineClient(reader, SilentWriter())
    for body, why in (({"id": "x" * 300, "prompt": "hi"}, "1-256 characters"), ({"id": "", "prompt": "hi"}, "1-256"),
                      ({"id": 7, "prompt": "hi"}, "must be a string"), ({"prompt": "a\ud800"}, "not valid Unicode")):
        with pytest.raises(ClientError, match=why):
            await asyncio.wait_for(client.call(body), 5)
    running = asyncio.create_task(client.call({"id": "r1", "prompt": "hi"}))
    await asyncio.sleep(0.05)
    with pytest.raises(ClientError, match="already running"):
        await client.call({"id": "r1", "prompt": "again"})
    reader.feed_data(b'{"id": "r1", "event": "token", "text": "a"}\n{"id": "r1", "event": "to')
    reader.feed_eof()
    with pytest.raises(ClientError, match="closed"):
        await asyncio.wait_for(running, 5)
    await asyncio.sleep(0)
    assert client._reader_task.done() and client._reader_task.exception() is None
    await client.close()
