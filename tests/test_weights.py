"""Weight streaming: hosts with an empty HETSERVE_HOME fetch their slice from the leader.

Unit tests cover the manifest and the cache; the rest run a real leader and real hosts on
127.0.0.1, each host with its own HETSERVE_HOME, as separate machines would have.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
from pathlib import Path

import pytest
import torch
import zmq
import zmq.asyncio
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import PROMPTS, Daemons, wait_for
from hetserve.client import LineClient
from hetserve.model.resolve import ModelError
from hetserve.weights.fetch import WeightFetcher
from hetserve.weights.manifest import build_manifest, check_manifest, describe_mismatch, load_manifest
from hetserve.weights.server import WeightServer, weights_socket
from hetserve.weights.store import WeightStore, tensor_header
from hetserve.wire.codec import decode, encode
from hetserve.wire.messages import Chunk, GetChunk, GetManifest, Manifest, ManifestEntry

MAX_NEW = 12


def tiny_model(path: Path, seed: int = 0, shard: str | None = None) -> Path:
    torch.manual_seed(seed)
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return path


# ---- manifest and cache, no sockets

def test_manifest_hashes_content_not_files(tmp_path):
    one = build_manifest(tiny_model(tmp_path / "one"), progress=False)[0]
    sharded_dir = tiny_model(tmp_path / "sharded", shard="100KB")
    assert len(list(sharded_dir.glob("*.safetensors"))) > 1
    sharded = build_manifest(sharded_dir, progress=False)[0]
    other = build_manifest(tiny_model(tmp_path / "other", seed=1), progress=False)[0]
    assert one.model_hash == sharded.model_hash != other.model_hash
    assert "different" in describe_mismatch(other, one)
    check_manifest(one, one.model_hash)
    with pytest.raises(ModelError, match="does not match"):
        check_manifest(one, other.model_hash)
    for name, digest in (("../../etc/passwd", "0" * 64), ("w\n", "0" * 64), ("w", "0" * 64 + "\n")):
        evil = Manifest(one.model_hash, [ManifestEntry(name, "tensor", 1, digest)])
        with pytest.raises(ModelError, match="malformed"):  # a trailing newline passed `$`
            check_manifest(evil, one.model_hash)
    with pytest.raises(ModelError, match="unexpected"):
        check_manifest(Manifest("", [ManifestEntry("run.sh", "file", 1, "0" * 64)]), "")
    # what a host would write into a tensor's header or look up: checked before the hash
    config = next(e for e in one.entries if e.name == "config.json")
    for entry in (ManifestEntry("w", "tensor", 7, "0" * 64, "F32", [2]),
                  ManifestEntry("w", "tensor", 2, "0" * 64, "Q4", [2])):
        with pytest.raises(ModelError, match="malformed"):
            check_manifest(Manifest(one.model_hash, [config, entry]), one.model_hash)
    with pytest.raises(ModelError, match="has no config.json"):
        check_manifest(Manifest(one.model_hash, [ManifestEntry("w", "tensor", 8, "0" * 64, "F32", [2])]),
                       one.model_hash)


@pytest.mark.parametrize("header", [[1, 2], {"w": "x"}, {"w": {"dtype": "F32", "shape": [1]}},
                                    {"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}},
                                    {"w": {"dtype": "F32", "shape": ["1"], "data_offsets": [0, 4]}}])
def test_a_malformed_safetensors_header_is_one_clear_error(tmp_path, header):
    """Each was a TypeError, KeyError or a meaningless read error: a traceback from the leader, and
    a damaged cached file a host never deleted."""
    import json
    import struct

    from hetserve.weights.manifest import safetensors_header

    raw = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    with pytest.raises(ModelError, match="is not a safetensors file"):
        safetensors_header(path)


def test_manifest_cache_follows_the_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HETSERVE_HOME", str(tmp_path / "home"))
    model = tiny_model(tmp_path / "m")
    first, sources = load_manifest(model, progress=False)
    assert load_manifest(model, progress=False)[0] == first
    assert sources["config.json"].path == model.resolve() / "config.json"
    config = model / "config.json"
    config.write_text(config.read_text().replace("\n", "\n ", 1))
    assert load_manifest(model, progress=False)[0].model_hash != first.model_hash


def test_store_resumes_parts_and_drops_corruption(tmp_path, monkeypatch):
    monkeypatch.setenv("HETSERVE_HOME", str(tmp_path))
    data = bytes(range(256)) * 40
    entry = ManifestEntry("w", "tensor", len(data), hashlib.sha256(data).hexdigest(), "U8", [len(data)])
    store = WeightStore("abc", "h0")
    (item,) = store.missing([entry])
    assert item.offset == 0
    with store.open_part(item) as f:
        f.write(data[:1000])
    (item,) = store.missing([entry])
    assert item.offset == 1000, "a part resumes where it stopped"
    with store.open_part(item) as f:
        f.write(data[1000:])
    assert store.finish(entry) and store.missing([entry]) == []
    blob = bytearray(store.path(entry).read_bytes())
    blob[-1] ^= 0xFF
    store.path(entry).write_bytes(bytes(blob))
    assert [m.offset for m in store.missing([entry])] == [0], "a corrupted file is fetched again"
    assert not store.path(entry).exists()
    with store.open_part(store.missing([entry])[0]) as f:
        f.write(b"x" * len(data))
    assert not store.finish(entry) and not store.part(entry).exists(), "wrong data never becomes the file"
    part = store.part(entry)
    part.write_bytes(tensor_header(ManifestEntry("w", "tensor", 9, "0" * 64, "U8", [9])) + b"abc")
    assert store.missing([entry])[0].offset == 0, "a part of another tensor is discarded"


def test_hosts_sharing_a_cache_fetch_one_tensor_at_once(tmp_path, monkeypatch):
    """Two hosts of one machine (one cache folder) fetching the same tensor, their writes
    interleaved: each part is its own, and either finish leaves a whole, hash-checked file."""
    monkeypatch.setenv("HETSERVE_HOME", str(tmp_path))
    data = bytes(range(256)) * 40
    entry = ManifestEntry("w", "tensor", len(data), hashlib.sha256(data).hexdigest(), "U8", [len(data)])
    gpu0, gpu1 = WeightStore("abc", "box-gpu0"), WeightStore("abc", "box/gpu1")
    assert gpu0.part(entry) != gpu1.part(entry) and gpu1.part(entry).parent == gpu1.root
    (item0,), (item1,) = gpu0.missing([entry]), gpu1.missing([entry])
    with gpu0.open_part(item0) as f0, gpu1.open_part(item1) as f1:
        for start in range(0, len(data), 1000):
            f0.write(data[start:start + 1000])
            f1.write(data[start:start + 1000])
    assert gpu0.finish(entry) and gpu1.finish(entry)
    assert gpu0.missing([entry]) == gpu1.missing([entry]) == []
    assert not list(gpu0.root.glob("*.part"))

    # Two hosts that would share a part name (two `join --device cpu`, no --name) do not.
    first, second = WeightStore("abc", "cpu"), WeightStore("abc", "cpu")
    assert first.owner == "cpu" and second.owner == f"cpu+{os.getpid()}"
    third = WeightStore("abc", "cpu")  # one process id for two (containers each run their host as process 1)
    assert third.owner == f"cpu+{os.getpid()}-1" and third._lock is not None
    third.close()
    first.close()
    again = WeightStore("abc", "cpu")
    assert again.owner == "cpu", "a closed store's name is free again (a restarted host resumes its parts)"
    # A part of the process-named store: no later process resumes it, so once that store is gone
    # (its process ended) the next store removes it; the named owner's part stays for its restart.
    unfinished = ManifestEntry("v", "tensor", len(data), entry.sha256, "U8", [len(data)])
    second.open_part(second.missing([unfinished])[0]).close()
    again.open_part(again.missing([unfinished])[0]).close()
    WeightStore("abc", "other").close()
    assert second.part(unfinished).exists(), "its store is still open: the part is in use"
    second.close()
    WeightStore("abc", "other").close()
    assert not second.part(unfinished).exists() and again.part(unfinished).exists()
    again.close()


def test_other_models_weights_make_room_oldest_first(tmp_path, monkeypatch):
    """Under --disk-limit a cache that kept every model it held would leave a host without room
    after a model update or two: other models' weights go, least recently written first."""
    from hetserve.leader.hosts import HostRecord
    from hetserve.leader.layout import disk_shortfalls
    from hetserve.weights.store import cached_weights, disk_room, make_room, weights_root
    from hetserve.wire.messages import Inventory

    monkeypatch.setenv("HETSERVE_HOME", str(tmp_path))
    mib = 1 << 20
    for model, size, age in (("old", mib, 200), ("newer", mib, 100), ("served", mib // 2, 0)):
        (weights_root() / model).mkdir(parents=True)
        (weights_root() / model / "w.safetensors").write_bytes(b"\0" * size)
        os.utime(weights_root() / model, (os.path.getmtime(tmp_path) - age,) * 2)
    limit = 3 * mib
    assert disk_room(limit) == mib // 2
    part = weights_root() / "newer" / "x.safetensors.h0.part"  # an unfinished fetch takes room too
    part.write_bytes(b"\0" * (mib // 4))
    assert disk_room(limit) == mib // 4 and cached_weights()["newer"] == mib + mib // 4
    part.unlink()
    fetching = WeightStore("old", "h1")  # another host of this machine fetching "old": it stays
    os.utime(weights_root() / "old", (os.path.getmtime(tmp_path) - 200,) * 2)  # still the oldest
    assert make_room(mib, limit, keep="served") == 3 * mib // 2
    assert sorted(d.name for d in weights_root().iterdir()) == ["old", "served"]
    fetching.close()
    assert make_room(2 * mib, limit, keep="served") == 5 * mib // 2
    assert sorted(d.name for d in weights_root().iterdir()) == ["served"]
    assert make_room(mib, limit, keep="served") == 5 * mib // 2, "room enough: nothing more goes"

    # The leader counts what a host caches of other models as room it can make.
    config = AutoConfig.for_model("llama", hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, vocab_size=16, tie_word_embeddings=True)
    sizes = {"model.embed_tokens.weight": 2 * mib, "model.layers.0.input_layernorm.weight": mib, "model.norm.weight": 0}
    entries = [ManifestEntry(n, "tensor", size, "0" * 64, "F32", [1]) for n, size in sizes.items()]
    manifest = Manifest("this", entries)
    inventory = Inventory("cpu", "cpu", "x86", 8 << 30, 4 << 30, 4 << 30, 50.0, 2, disk_free_bytes=mib,
                          cached_weights={"this": mib, "other": 2 * mib})
    host = HostRecord("h0", b"h0", "127.0.0.1", inventory, "tcp://127.0.0.1:1", 0.0, "float32")
    assert disk_shortfalls([host], [(0, 1)], manifest, config) == {}  # 2 MiB more: 1 free + 2 of "other"
    host.inventory = Inventory("cpu", "cpu", "x86", 8 << 30, 4 << 30, 4 << 30, 50.0, 2, disk_free_bytes=mib,
                               cached_weights={"this": mib})
    assert "needs 2.0 MiB" in disk_shortfalls([host], [(0, 1)], manifest, config)["h0"]


async def test_fetch_over_sockets_and_refuse_bad_requests(tmp_path, monkeypatch):
    monkeypatch.setenv("HETSERVE_HOME", str(tmp_path / "home"))
    manifest, sources = build_manifest(tiny_model(tmp_path / "m"), progress=False)
    ctx = zmq.asyncio.Context()
    router = weights_socket(ctx)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    server = asyncio.create_task(WeightServer(router, manifest, sources, 0).run())
    fetcher = WeightFetcher(ctx.socket(zmq.DEALER), f"tcp://127.0.0.1:{port}", "h",
                            lambda fn, *a: asyncio.to_thread(fn, *a))

    async def refused(request: GetChunk) -> str:
        await fetcher.sock.send(encode(request))
        head, body = await fetcher.sock.recv_multipart()
        assert body == b""
        return decode(head, expect=(Chunk,)).error

    try:
        got = await fetcher.manifest(manifest.model_hash)
        (tmp_path / "m" / "config.json").rename(tmp_path / "config.json")  # gone before it was read
        assert "No such file" in await refused(GetChunk("h", "config.json", 0, 2))
        (tmp_path / "config.json").rename(tmp_path / "m" / "config.json")
        store = WeightStore(got.model_hash, "h")
        total = sum(e.size for e in got.entries)
        assert await fetcher.fetch(store, store.missing(got.entries)) == total
        assert store.missing(got.entries) == [] and await fetcher.fetch(store, []) == 0

        for bad in (GetChunk("h", "nope", 0, 1), GetChunk("h", "config.json", 0, 10**9),
                    GetChunk("h", "config.json", -1, 1)):
            assert await refused(bad)
        await fetcher.sock.send(b"\x93garbage")  # ignored, and the server keeps answering
        await fetcher.sock.send(encode(GetChunk("h", "config.json", 0, 2)))
        head, body = await fetcher.sock.recv_multipart()
        assert decode(head).length == 2 and body == (tmp_path / "m" / "config.json").read_bytes()[:2]

        # A source file truncated under the leader: that request fails with why, the server goes on.
        weights = tmp_path / "m" / "model.safetensors"
        tensor = next(e for e in got.entries if e.kind == "tensor" and sources[e.name].path == weights)
        weights.write_bytes(weights.read_bytes()[:sources[tensor.name].offset + 1])
        assert "ends early" in await refused(GetChunk("h", tensor.name, 0, 2))
        assert not server.done()
    finally:
        fetcher.close()
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
        router.close()
        ctx.term()


async def test_a_manifest_is_answered_while_paced_chunks_wait(tmp_path, monkeypatch):
    """With --weights-rate, chunks are sent paced; a joining host's manifest request waited behind
    every chunk queued before it (and could time out with many hosts fetching). Fetches announced
    past MAX_TRANSFERS (names are the peer's word) are not tracked."""
    from hetserve.weights import server as weights_server
    from hetserve.wire.messages import FetchStart

    manifest, sources = build_manifest(tiny_model(tmp_path / "m"), progress=False)
    embed = next(e for e in manifest.entries if e.name == "model.embed_tokens.weight")  # 64 KiB
    ctx = zmq.asyncio.Context()
    router = weights_socket(ctx)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    weights = WeightServer(router, manifest, sources, 32 << 10)  # 2 s a chunk
    server = asyncio.create_task(weights.run())
    fetching, joining = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    try:
        for sock in (fetching, joining):
            sock.connect(f"tcp://127.0.0.1:{port}")
        for _ in range(3):
            await fetching.send(encode(GetChunk("a", embed.name, 0, embed.size)))
        await joining.send(encode(GetManifest("b")))
        reply = await asyncio.wait_for(joining.recv_multipart(), 10)
        assert decode(reply[0], expect=(Manifest,)).model_hash == manifest.model_hash
        chunks = []
        while await fetching.poll(0):  # what came before the manifest: not every paced chunk
            chunks.append(await fetching.recv_multipart())
        assert len(chunks) < 3, "the manifest waited behind the paced chunks"
        while len(chunks) < 3:
            chunks.append(await asyncio.wait_for(fetching.recv_multipart(), 10))
        assert [decode(c[0]).length for c in chunks] == [embed.size] * 3, "the paced chunks still all come, in order"
        monkeypatch.setattr(weights_server, "MAX_TRANSFERS", 1)
        for name in ("a", "b", "c"):
            await joining.send(encode(FetchStart(name, 1, 10)))
        await joining.send(encode(GetManifest("b")))
        await asyncio.wait_for(joining.recv_multipart(), 10)  # the starts before it are handled
        assert list(weights.transfers) == ["a"]
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
        for sock in (fetching, joining, router):
            sock.close()
        ctx.term()


async def test_chunk_requests_their_host_gave_up_on_are_not_paced_and_sent(tmp_path):
    """With a low --weights-rate, requests a host stopped waiting for were still paced and sent:
    every retry waited behind them, and past the hosts' timeout again."""
    from hetserve.weights.fetch import REPLY_TIMEOUT_S

    manifest, sources = build_manifest(tiny_model(tmp_path / "m"), progress=False)
    embed = next(e for e in manifest.entries if e.name == "model.embed_tokens.weight")  # 64 KiB
    sent = []

    class Socket:
        async def send_multipart(self, frames, copy=True):
            sent.append(frames)

    weights = WeightServer(Socket(), manifest, sources, 32 << 10)  # 2 s a chunk
    now = asyncio.get_running_loop().time()
    for asked in (now - 10 * REPLY_TIMEOUT_S, now - 10 * REPLY_TIMEOUT_S, now):
        weights.enqueue(b"r", GetChunk("a", embed.name, 0, embed.size), asked)
    sender = asyncio.create_task(weights._send_chunks())
    try:
        for _ in range(100):
            if sent:
                break
            await asyncio.sleep(0.05)
        assert len(sent) == 1 and not weights.queued, "the fresh request was sent first, unpaced by the others"
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)


async def test_hosts_take_turns_for_chunks(tmp_path):
    """First come first served: a host that asked last waited behind every chunk the others had
    asked for (at a low --weights-rate, past its timeout). Now behind one of each."""
    manifest, sources = build_manifest(tiny_model(tmp_path / "m"), progress=False)
    embed = next(e for e in manifest.entries if e.name == "model.embed_tokens.weight")
    sent = []

    class Socket:
        async def send_multipart(self, frames, copy=True):
            sent.append(frames[0])

    weights = WeightServer(Socket(), manifest, sources, 0)
    now = asyncio.get_running_loop().time()
    for host, count in (("a", 3), ("b", 3), ("c", 1)):
        for i in range(count):
            weights.enqueue(host.encode(), GetChunk(host, embed.name, i * 1024, 1024), now)
    sender = asyncio.create_task(weights._send_chunks())
    try:
        for _ in range(100):
            if len(sent) == 7:
                break
            await asyncio.sleep(0.02)
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
    assert sent == [b"a", b"b", b"c", b"a", b"b", b"a", b"b"] and not weights.waiting and not weights.queued


# ---- real processes

async def serve_and_check(d: Daemons, reference) -> dict:
    """Greedy output equals transformers; returns the status."""
    client = await d.client()
    try:
        for prompt in PROMPTS[:2]:
            events = await client.call({"prompt": prompt, "max_tokens": MAX_NEW})
            ids = [e["token_id"] for e in events if e["event"] == "token"]
            assert ids == reference(reference.tokenizer(prompt)["input_ids"], MAX_NEW), prompt
        return await client.status()
    finally:
        await client.close()


def manifest_sizes(model_dir: Path) -> dict[str, int]:
    return {e.name: e.size for e in load_manifest(model_dir, progress=False)[0].entries}


async def test_fresh_hosts_fetch_their_slices_then_nothing(daemons, model_dir, reference, tmp_path):
    homes = [tmp_path / "a", tmp_path / "b"]
    d = daemons(model_dir, 2)
    for i, home in enumerate(homes):
        d.join(f"h{i}", home)
    status = await serve_and_check(d, reference)
    assert all(h["link_gbps"] > 0 and h["link_ms"] > 0 for h in status["hosts"]), "the leader measured its links"
    fetched = [h["fetched_bytes"] for h in status["hosts"]]
    sizes = manifest_sizes(model_dir)
    model_bytes = sum(sizes.values()) - sizes["config.json"]
    # Each host fetched only its slice and config.json: together the model once, plus the tied
    # embedding the first stage embeds with and the last stage projects with.
    assert sum(fetched) == model_bytes + sizes["model.embed_tokens.weight"] + 2 * sizes["config.json"]
    assert all(0 < f < model_bytes for f in fetched)
    d.stop()

    # Corrupt a cached tensor of h0; start everything again.
    victim = next((homes[0] / "weights").glob("*/model.layers.1.mlp.up_proj.weight.safetensors"))
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    victim.write_bytes(bytes(blob))
    d = daemons(model_dir, 2)
    logs = [tmp_path / f"h{i}.log" for i in range(2)]
    for i, home in enumerate(homes):
        d.join(f"h{i}", home, log=logs[i])
    status = await serve_and_check(d, reference)
    assert [h["fetched_bytes"] for h in status["hosts"]] == [sizes["model.layers.1.mlp.up_proj.weight"], 0]
    assert "corrupted" in logs[0].read_text()


async def test_host_killed_mid_transfer_resumes(daemons, model_dir, reference, tmp_path, monkeypatch):
    home = tmp_path / "home"
    d = daemons(model_dir, 1, "--weights-rate", "100MiB")
    host = d.join("h0", home)
    cache = home / "weights"
    total = manifest_sizes(model_dir)

    def mid_tensor() -> bool:  # into the transfer, with a tensor part-written and far from done
        try:
            sizes = {f: f.stat().st_size for f in cache.glob("*/*")}
        except FileNotFoundError:  # a part renamed as we looked
            return False
        # At least 8 MiB of the part still to come: 80 ms at the paced rate, so the kill lands
        # before it completes even on a loaded machine (small tensors finish within the poll).
        return sum(sizes.values()) > 20 << 20 and any(
            f.name.endswith(".safetensors.h0.part") and n > 1 << 20
            and total.get(f.name[:-len(".safetensors.h0.part")], 0) - n > 8 << 20 for f, n in sizes.items())

    assert wait_for(mid_tensor, 60, interval=0.01)
    host.send_signal(signal.SIGKILL)
    host.wait()
    d.stop()
    store_dir = next(cache.iterdir())
    assert list(store_dir.glob("*.part")), "the kill came in the middle of a tensor"
    sizes = manifest_sizes(model_dir)
    have = sum(f.stat().st_size for f in store_dir.glob("*.safetensors"))

    d = daemons(model_dir, 1)
    log = tmp_path / "h0.log"
    d.join("h0", home, log=log)
    status = await serve_and_check(d, reference)
    fetched = status["hosts"][0]["fetched_bytes"]
    assert 0 < fetched < sum(sizes.values()) - have, "only what was missing was fetched"
    assert "resuming" in log.read_text()
    assert not list(store_dir.glob("*.part"))
    manifest, _ = load_manifest(model_dir, progress=False)
    monkeypatch.setenv("HETSERVE_HOME", str(home))
    assert WeightStore(manifest.model_hash, "h0").missing(manifest.entries) == [], "every cached file hash-matches"


async def test_host_without_disk_room_is_left_out(daemons, model_dir, reference, tmp_path):
    d = daemons(model_dir, 2)
    d.join("h0", tmp_path / "a", "--disk-limit", "10MiB")
    d.join("h1", tmp_path / "b")
    status = await serve_and_check(d, reference)
    h0, h1 = status["hosts"]
    assert h0["state"] == "unused" and "disk" in h0["note"]
    assert h1["layers"] == [0, 30]
    assert not list((tmp_path / "a" / "weights").glob("*/*.safetensors")), "h0 fetched nothing"


def test_mismatching_local_copy_is_refused(daemons, model_dir, tmp_path):
    d = daemons(model_dir, 1)
    log = tmp_path / "h0.log"
    host = d.join("h0", tmp_path / "home", "--model", str(tiny_model(tmp_path / "tiny")), log=log)
    assert d.leader.wait(120) == 1, "the leader stops: its only host cannot serve"
    host.wait(30)
    assert "is not the leader's model" in log.read_text()


async def test_streaming_host_profiles_then_serves_a_live_plan(daemons, model_dir, tmp_path):
    """Asked for a profile, a host without the model fetches the layers the profiler times."""
    import shutil

    from hetserve.model.resolve import hetserve_home

    home = tmp_path / "home"
    if (hetserve_home() / "profiles").is_dir():  # skip the minute of measuring when it was done before
        shutil.copytree(hetserve_home() / "profiles", home / "profiles")
    d = daemons(model_dir, 1, "--max-ppl-increase", "5%", "--calibration-tokens", "128", "--plan-prompt", "64",
                "--plan-output", "32", "--plan-batch", "2")
    log = tmp_path / "h0.log"
    d.join("h0", home, log=log)
    client = await LineClient.connect(d.serve, wait=120)
    try:
        await client.wait_serving(600)
        # The plan may quantize layers (w8a8 is faster than fp32 on CPUs), so no comparison with
        # the fp32 reference here: serving works, and the slice was streamed.
        events = await client.call({"prompt": PROMPTS[0], "max_tokens": 8})
        assert events[-1]["event"] == "done"
        status = await client.status()
    finally:
        await client.close()
    assert status["plan"] is not None and status["hosts"][0]["fetched_bytes"] > 0
    text = log.read_text()
    assert text.count("slice weights:") == 2, "once for the profile (layers 0-2 and the head), once for the slice"
