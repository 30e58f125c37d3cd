"""Client authentication: tokens on the line protocol and the HTTP API, loopback-only without one."""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.error
import urllib.request

import pytest
from pathlib import Path

from conftest import free_port, hetserve_cmd
from hetserve.client import ClientError, LineClient


def test_a_public_client_port_needs_a_token():
    run = subprocess.run(hetserve_cmd() + ["leader", "--listen", f"127.0.0.1:{free_port()}", "--serve",
                                           f"0.0.0.0:{free_port()}"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "--token-file" in run.stderr and "Traceback" not in run.stderr


@pytest.fixture
def guarded_leader(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    serve, http = f"0.0.0.0:{free_port()}", f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(hetserve_cmd() + ["leader", "--listen", f"127.0.0.1:{free_port()}", "--serve", serve,
                                              "--http", http, "--token-file", str(token_file), "--log-level", "warning"])
    yield serve.replace("0.0.0.0", "127.0.0.1"), http
    proc.terminate()
    assert proc.wait(30) == 0


def http_get(url: str, token: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_line_protocol_and_http_ask_for_the_token(guarded_leader):
    serve, http = guarded_leader
    client = await LineClient.connect(serve, wait=120)
    status = await asyncio.to_thread(subprocess.run, hetserve_cmd() + ["status", "--server", serve], capture_output=True,
                                     text=True, timeout=120)
    assert status.returncode == 1 and status.stderr.startswith("error: unauthorized:"), status.stderr
    try:
        refused = await client.call({"cmd": "status"})
        assert refused[-1]["error"]["code"] == "unauthorized"
        assert (await client.call({"prompt": "hi"}))[-1]["error"]["code"] == "unauthorized"
        assert (await client.call({"cmd": "auth", "token": "guess"}))[-1]["error"]["message"] == "wrong token"
        assert (await client.call({"cmd": "auth", "token": "s3cret-token"}))[-1]["event"] == "authenticated"
        assert (await client.status())["state"] == "waiting for hosts"
        # Not served yet (its hosts may never come): refused at once, as HTTP's 503, not queued
        refused = await asyncio.wait_for(client.call({"prompt": "hi"}), 30)
        assert refused[-1]["error"]["code"] == "unavailable" and "waiting for hosts" in refused[-1]["error"]["message"]
    finally:
        await client.close()

    client = await LineClient.connect(serve)
    for _ in range(3):
        await client.call({"cmd": "auth", "token": "guess"})
    with pytest.raises(ClientError, match="closed"):  # three wrong tokens: the connection is closed
        await asyncio.wait_for(client.call({"cmd": "status"}), 10)
    await client.close()
    with pytest.raises(ClientError, match="refused the token"):
        await LineClient.connect(serve, token="guess")
    good = await LineClient.connect(serve, token="s3cret-token")
    await good.close()

    base = f"http://{http}"
    status, body = await asyncio.to_thread(http_get, f"{base}/v1/models")
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert (await asyncio.to_thread(http_get, f"{base}/v1/models", "guess"))[0] == 401
    assert (await asyncio.to_thread(http_get, f"{base}/v1/models", "s3cret-token"))[0] == 200
    assert (await asyncio.to_thread(http_get, f"{base}/health"))[0] == 503  # open, and not serving yet
    # A header byte that is not UTF-8 is a wrong token (it was a 500 and a traceback in the log)
    reader, writer = await asyncio.open_connection(*http.rsplit(":", 1))
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\r\nConnection: close\r\n\r\n")
    reply = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    assert reply.startswith(b"HTTP/1.1 401") and b"authentication_error" in reply, reply[:200]


class Relay:
    """A TCP relay that records every byte a host and the leader exchange."""

    def __init__(self, target: str):
        self.target = target
        self.seen = bytearray()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._pipe, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _pipe(self, reader, writer):
        host, port = self.target.rsplit(":", 1)
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:  # the leader is gone (the test is ending)
            writer.close()
            return

        async def copy(src, dst):
            while data := await src.read(65536):
                self.seen += data
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer), return_exceptions=True)

    def close(self):
        self.server.close()


async def joined_through_relay(daemons, model_dir, tmp_path, keys: dict[str, str], leader_args=()) -> bytes:
    """Start a leader, join host h0 through a relay; the bytes seen once h0 has joined."""
    d = daemons(model_dir, 2, *leader_args)
    relay = Relay(d.listen)
    address = await relay.start()
    host = subprocess.Popen(hetserve_cmd() + ["join", "--leader", address, "--name", "h0", "--model",
                                              str(model_dir), *keys.get("h0", ()), "--log-level", "warning"],
                            start_new_session=True)
    try:
        for _ in range(600):
            if b"inventory" in relay.seen:
                break
            await asyncio.sleep(0.1)
        return bytes(relay.seen)
    finally:
        host.terminate()
        host.wait(30)
        relay.close()


def make_keys(tmp_path, hosts: list[str]) -> dict[str, Path]:
    from hetserve.transport.security import keygen

    dirs = {name: tmp_path / f"keys-{name}" for name in ["leader", *hosts]}
    keygen(dirs["leader"], "leader")
    for name in hosts:
        public, _ = keygen(dirs[name], name)
        (dirs["leader"] / "hosts").mkdir(exist_ok=True)
        public.rename(dirs["leader"] / "hosts" / public.name)
        (dirs[name] / "leader.key").write_bytes((dirs["leader"] / "leader.key").read_bytes())
    return dirs


async def test_hosts_talk_curve_and_unknown_keys_cannot_join(daemons, model_dir, reference, tmp_path):
    plain = await joined_through_relay(daemons, model_dir, tmp_path, {})
    assert b"inventory" in plain, "without keys the Join crosses the wire readable (the check below can fail)"

    dirs = make_keys(tmp_path, ["h0", "h1"])
    stranger = tmp_path / "keys-stranger"
    from hetserve.transport.security import keygen
    keygen(stranger, "stranger")
    (stranger / "leader.key").write_bytes((dirs["leader"] / "leader.key").read_bytes())

    leader_log = tmp_path / "leader.log"
    d = daemons(model_dir, 2, "--keys", str(dirs["leader"]), leader_log=leader_log)
    relay = Relay(d.listen)
    address = await relay.start()
    hosts = [subprocess.Popen(hetserve_cmd() + ["join", "--leader", address if name == "h0" else d.listen,
                                                "--name", name, "--model", str(model_dir), "--keys", str(dirs[name]),
                                                "--threads", "1", "--log-level", "warning"], start_new_session=True)
             for name in ("h0", "h1")]
    intruder = subprocess.Popen(hetserve_cmd() + ["join", "--leader", d.listen, "--name", "intruder", "--model",
                                                  str(model_dir), "--keys", str(stranger), "--log-level", "warning"],
                                start_new_session=True)
    try:
        client = await d.client()
        prompt = "The capital of France is"
        events = await client.call({"prompt": prompt, "max_tokens": 8})
        assert [e["token_id"] for e in events if e["event"] == "token"] == \
            reference(reference.tokenizer(prompt)["input_ids"], 8), (events[-1], leader_log.read_text()[-3000:])
        names = {h["name"] for h in (await client.status())["hosts"]}
        await client.close()
        assert names == {"h0", "h1"}, "the host with an unknown key never joined"
        assert "unknown key" in leader_log.read_text()
        seen = bytes(relay.seen)
        assert b"CURVE" in seen and b"inventory" not in seen
    finally:
        relay.close()
        for proc in [*hosts, intruder]:
            proc.terminate()
            proc.wait(30)


def test_a_broken_key_file_is_named_not_a_traceback(tmp_path):
    """A key file without a key, or with a truncated one, is refused naming the file (before, the
    first raised ValueError and the second passed loading to fail in CURVE as 'Invalid argument')."""
    from hetserve.transport.security import KeysError, keygen, load_identity, load_public

    keygen(tmp_path, "leader")
    assert len(load_public(tmp_path / "leader.key")) == 40 and load_identity(tmp_path).secret
    good = (tmp_path / "leader.key").read_text()
    key = good.split('public-key = "')[1][:40]
    for broken in ("garbage\n", good.replace(key, key[:20]), good.replace(key, "\x01" * 40), good.replace(key, "#" * 40)):
        (tmp_path / "leader.key").write_text(broken)
        with pytest.raises(KeysError, match="leader.key is not a key file"):
            load_public(tmp_path / "leader.key")
    secret = (tmp_path / "leader.key_secret").read_text()
    (tmp_path / "leader.key_secret").write_text(secret.replace('secret-key = "', 'secret-key = "x'))
    with pytest.raises(KeysError, match="leader.key_secret is not a key file"):
        load_identity(tmp_path)
