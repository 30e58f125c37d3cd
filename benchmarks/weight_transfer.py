"""Weight streaming rate against the raw link rate, on loopback and through a rate-limited link.

    sudo .venv/bin/python benchmarks/weight_transfer.py [--model smollm2-135m] [--rates 1gbit,200mbit]
        [--out bench-results/weight_transfer.json]

For each link, in one run: the raw rate (one TCP stream, sendall -> recv_into, the same bytes as
the model) and hetserve's rate (the leader's WeightServer -> a host's WeightFetcher into an empty
cache, hashing included). Rate-limited links are a veth pair into a network namespace with
`tc qdisc ... tbf` on both ends (needs root and `ip netns`; skipped with the reason otherwise).
Also measured: loading a half-model slice at each precision on the host (quantizing is what
sending the original costs the host), against the transfer time that sending int8 / int4 tensors
instead would save at each link's measured raw rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NS, HOST_IP, NS_IP = "hsbench", "10.77.0.1", "10.77.0.2"


def raw_server(listener: socket.socket, nbytes: int) -> None:
    """Send nbytes to the first connection, as fast as one TCP stream goes."""
    conn, _ = listener.accept()
    with conn, listener:
        block = memoryview(bytearray(4 << 20))
        left = nbytes
        while left:
            left -= conn.send(block[: min(len(block), left)])


def raw_client(addr: str, nbytes: int) -> float:
    host, port = addr.rsplit(":", 1)
    buf = bytearray(4 << 20)
    with socket.create_connection((host, int(port))) as s:
        start, got = time.perf_counter(), 0
        while got < nbytes:
            n = s.recv_into(buf)
            if not n:
                raise RuntimeError("raw stream ended early")
            got += n
        return time.perf_counter() - start


async def serve_weights(model_dir: Path, bind: str) -> tuple[asyncio.Task, int]:
    import zmq
    import zmq.asyncio

    from hetserve.weights.manifest import load_manifest
    from hetserve.weights.server import WeightServer

    manifest, sources = load_manifest(model_dir)
    sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
    port = sock.bind_to_random_port(f"tcp://{bind}")
    return asyncio.create_task(WeightServer(sock, manifest, sources, 0).run()), port


async def fetch_all(addr: str, model_hash: str) -> tuple[float, int]:
    """Fetch every entry into an empty HETSERVE_HOME; (seconds, bytes)."""
    import zmq.asyncio

    from hetserve.weights.fetch import WeightFetcher
    from hetserve.weights.store import WeightStore

    fetcher = WeightFetcher(zmq.asyncio.Context.instance().socket(zmq.DEALER), f"tcp://{addr}", "bench",
                            asyncio.to_thread)
    manifest = await fetcher.manifest(model_hash)
    store = WeightStore(model_hash, "bench")
    start = time.perf_counter()
    got = await fetcher.fetch(store, store.missing(manifest.entries))
    seconds = time.perf_counter() - start
    fetcher.close()
    return seconds, got


def client_main(args) -> None:
    """Runs inside the namespace (or locally): the host's side of both measurements."""
    os.environ["HETSERVE_HOME"] = tempfile.mkdtemp(prefix="hs-bench-")
    raw = raw_client(args.raw, args.nbytes)
    seconds, got = asyncio.run(fetch_all(args.weights, args.model_hash))
    print(json.dumps({"raw_s": raw, "hetserve_s": seconds, "bytes": got}))


def sh(cmd: str) -> None:
    subprocess.run(cmd, shell=True, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def make_link(rate: str) -> None:
    sh(f"ip netns add {NS}")
    sh(f"ip link add hsb0 type veth peer name hsb1 && ip link set hsb1 netns {NS}")
    sh(f"ip addr add {HOST_IP}/30 dev hsb0 && ip link set hsb0 up")
    sh(f"ip netns exec {NS} ip addr add {NS_IP}/30 dev hsb1 && ip netns exec {NS} ip link set hsb1 up")
    sh(f"ip netns exec {NS} ip link set lo up")
    for prefix, dev in (("", "hsb0"), (f"ip netns exec {NS} ", "hsb1")):
        sh(f"{prefix}tc qdisc add dev {dev} root tbf rate {rate} burst 256kb latency 50ms")


def drop_link() -> None:
    subprocess.run(f"ip link del hsb0; ip netns del {NS}", shell=True, stderr=subprocess.DEVNULL)


def measure_link(model_dir: Path, rate: str | None) -> dict:
    """One link: raw vs hetserve, both measured by a client process on the far side."""
    from hetserve.weights.manifest import load_manifest

    manifest, _ = load_manifest(model_dir)
    nbytes = sum(e.size for e in manifest.entries)
    bind = HOST_IP if rate else "127.0.0.1"

    async def run() -> dict:
        task, wport = await serve_weights(model_dir, bind)
        listener = socket.create_server((bind, 0))
        rport = listener.getsockname()[1]
        raw = asyncio.get_running_loop().run_in_executor(None, raw_server, listener, nbytes)
        prefix = ["ip", "netns", "exec", NS] if rate else []
        cmd = prefix + [sys.executable, __file__, "--client", "--raw", f"{bind}:{rport}",
                        "--weights", f"{bind}:{wport}", "--model-hash", manifest.model_hash, "--nbytes", str(nbytes)]
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                    env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
        out, _ = await proc.communicate()
        if proc.returncode != 0 or not out.strip():
            listener.shutdown(socket.SHUT_RDWR)  # wakes the raw server's accept(): no client is coming
            listener.close()
            task.cancel()
            raise SystemExit(f"the measuring client failed (exit {proc.returncode}); its errors are above")
        await raw
        task.cancel()
        return json.loads(out.decode().strip().splitlines()[-1])

    result = asyncio.run(run())
    mib = nbytes / 2**20
    return {"link": rate or "loopback", "MiB": round(mib, 1), "raw_MiB_s": round(mib / result["raw_s"], 1),
            "hetserve_MiB_s": round(result["bytes"] / 2**20 / result["hetserve_s"], 1),
            "ratio": round(result["raw_s"] / result["hetserve_s"], 3)}


def quantize_cost(model_dir: Path) -> dict:
    """Seconds to load half the model's layers at each precision on this host, and their bytes."""
    from hetserve.model.stage import StageModel, StageSpec, load_config

    layers = load_config(model_dir).num_hidden_layers // 2
    out = {}
    for precision in ("native", "int8", "int4"):
        times = []
        for _ in range(3):  # best of 3: the first pays page-cache misses and quanto's one-time set-up
            start = time.perf_counter()
            stage = StageModel(model_dir, StageSpec(0, layers, False, False, precisions=(precision,) * layers))
            times.append(time.perf_counter() - start)
        out[precision] = {"load_s": round(min(times), 3), "MiB": round(stage.weight_bytes / 2**20, 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rates", default="1gbit,200mbit", help="tc tbf rates of the limited links ('' = none)")
    parser.add_argument("--out", default="bench-results/weight_transfer.json")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--raw", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--model-hash", help=argparse.SUPPRESS)
    parser.add_argument("--nbytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        return client_main(args)

    from hetserve.model.resolve import resolve_model

    model_dir = resolve_model(args.model).path
    rows = [measure_link(model_dir, None)]
    for rate in filter(None, args.rates.split(",")):
        try:
            make_link(rate)
        except subprocess.CalledProcessError as exc:
            print(f"skipping the {rate} link: cannot create a namespace ({exc.stderr.decode().strip()})")
            drop_link()
            continue
        try:
            rows.append(measure_link(model_dir, rate))
        finally:
            drop_link()
    print(f"{'link':>10} {'MiB':>7} {'raw MiB/s':>10} {'hetserve MiB/s':>15} {'hetserve/raw':>13}")
    for r in rows:
        print(f"{r['link']:>10} {r['MiB']:>7} {r['raw_MiB_s']:>10} {r['hetserve_MiB_s']:>15} {r['ratio']:>13}")
    quant = quantize_cost(model_dir)
    print("\nhalf the layers on this host: load time and weight bytes by precision")
    for p, q in quant.items():
        saved = ", ".join(f"{r['link']}: {(quant['native']['MiB'] - q['MiB']) / r['raw_MiB_s']:.2f} s"
                          for r in rows)
        print(f"  {p:>6}: load {q['load_s']:.2f} s, {q['MiB']} MiB; sending it pre-quantized would save {saved}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"links": rows, "quantize": quant}, indent=2))


if __name__ == "__main__":
    main()
