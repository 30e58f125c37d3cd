"""Client authentication: tokens on the line protocol and the HTTP API, loopback-only without one."""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.error
import urllib.request

import pytest

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
    try:
        refused = await client.call({"cmd": "status"})
        assert refused[-1]["error"]["code"] == "unauthorized"
        assert (await client.call({"prompt": "hi"}))[-1]["error"]["code"] == "unauthorized"
        assert (await client.call({"cmd": "auth", "token": "guess"}))[-1]["error"]["message"] == "wrong token"
        assert (await client.call({"cmd": "auth", "token": "s3cret-token"}))[-1]["event"] == "authenticated"
        assert (await client.status())["state"] == "waiting for hosts"
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
