"""`hetserve join`: a host registers with the leader, loads its slice and runs its stage.

Lifecycle: bind the data socket (where upstream will push micro-batches) -> send Join with the
inventory -> receive Assign -> get the slice's weights (its own `--model` copy checked against the
leader's manifest, or the cache, fetching from the leader what it lacks) -> load only the assigned
layers -> connect downstream -> send Ready -> run the stage loop; Heartbeat every second
throughout. A Shutdown from the leader, SIGINT or SIGTERM ends the process cleanly.

Faults: a device that fails for good (stage_loop.DeviceLost: a poisoned CUDA context) is reported
to the leader, which re-plans without this host, and the process exits with status 1, so that a
service manager restarts it with a fresh device context. A later Assign (the leader rebuilt the
pipeline after losing a host, or to use a new one) replaces the stage, keeping the loaded weights
when the slice is unchanged; a Release (a layout left this host out) drops it. A leader that
answered and then fell silent for LEADER_DEAD_S (it sends Alive every second) is presumed gone:
the host keeps its weights and joins again on a fresh connection (ZeroMQ reconnects with backoff
until a leader listens), telling the new leader which slice it holds so that it can be adopted.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch
import zmq
import zmq.asyncio

from ..config import HostSettings, SettingsError
from ..lifecycle import run_until_signal
from ..model import cpu_linear
from ..model.resolve import ModelError, resolve_model
from ..model.stage import StageModel, StageSpec, load_config, stage_tensor_names
from ..transport.security import (KeyRing, KeysError, as_client, as_server, load_identity, load_public,
                                  start_authenticator)
from ..transport.sockets import bind_tcp, is_loopback, local_ip_towards, make_socket, receive, split_hostport, tcp
from ..wire.codec import WireError, decode, encode
from ..plan.profile import PROFILE_LAYERS, cached_profile
from ..wire.messages import (Alive, Assign, Failed, Heartbeat, Join, Probe, ProbeReply, ProfileReport, ProfileRequest,
                             Ready, Refused, Release, Shutdown)
from ..weights.fetch import WeightFetcher
from ..weights.manifest import describe_mismatch, load_manifest
from ..weights.store import WeightStore, cached_weights, disk_room, make_room
from .inventory import take_inventory
from .stage_loop import DeviceLost, StageLoop

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0
LEADER_DEAD_S = 10.0  # no message from the leader for this long: rejoin (longer than a host's 3 s:
#                       a leader busy planning must not make every host rejoin)
RECONNECT_MAX_MS = 10_000  # ZeroMQ's reconnect interval doubles up to this while no leader listens


def release_memory() -> None:
    """Give back what a dropped stage held before the next one loads: objects in reference cycles
    (compiled functions, module hooks) wait for a full collection otherwise, and the CUDA caching
    allocator keeps freed blocks for this process until emptied."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def same_slice(a: Assign, b: Assign) -> bool:
    """Would b load exactly the weights and cache a holds? Then the loaded stage is kept."""
    def key(m: Assign):
        return (m.start, m.end, m.stage == 0, m.stage == m.num_stages - 1, m.dtype, m.max_seqs, m.max_context,
                tuple(m.precisions), m.model_hash, tuple(tuple(sorted(s.items())) for s in m.input_scales))
    return key(a) == key(b)


class HostError(Exception):
    """The host cannot take part; the message says why (exit status 1)."""


class Host:
    def __init__(self, settings: HostSettings):
        self.settings = settings
        self.name = settings.name or f"{socket.gethostname()}-{os.getpid()}"
        self.stage_loop: StageLoop | None = None
        self.stage_task: asyncio.Task | None = None
        self.model: StageModel | None = None
        self.current: Assign | None = None  # the slice loaded now
        self.downstream: str | None = None
        self.control: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task] = []
        self._device_failed = asyncio.Event()  # set once the leader has been told DeviceLost
        self.device_failure = ""
        # Every torch call of this host runs on this one thread: a second thread doing torch
        # work brings a second OpenMP team and made decode ~1.6x slower on a 2-core CPU.
        self.torch_thread = ThreadPoolExecutor(1, thread_name_prefix="torch")

    async def run(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        if s.threads:
            await loop.run_in_executor(self.torch_thread, torch.set_num_threads, s.threads)
        if s.cpu_transposed_up_to is not None:
            cpu_linear.transpose_up_to(s.cpu_transposed_up_to)
            log.info("CPU float32 products of x up to %d values run transposed", s.cpu_transposed_up_to)
        leader_host, leader_port = split_hostport(s.leader, 5555)
        leader_ip = socket.getaddrinfo(leader_host, leader_port, proto=socket.IPPROTO_TCP)[0][4][0]
        advertise = s.advertise or local_ip_towards(leader_ip)
        self.identity = self.leader_key = None
        if s.keys:
            try:
                self.identity = load_identity(Path(s.keys))
                self.leader_key = load_public(Path(s.keys) / "leader.key")
            except KeysError as exc:
                raise HostError(str(exc)) from None
        elif not (is_loopback(leader_ip) and is_loopback(advertise)):
            if not s.insecure:
                raise SettingsError(f"the leader {s.leader} is on another machine: give --keys DIR (hetserve keygen) to "
                                    "encrypt and authenticate the traffic, or --insecure")
            log.warning("INSECURE: talking to the leader and other hosts in plain text (--insecure)")
        inventory = await loop.run_in_executor(self.torch_thread, take_inventory, s.device, s.memory)
        if s.model is None:
            inventory = replace(inventory, disk_free_bytes=disk_room(s.disk_limit), cached_weights=cached_weights())
        log.info("host %s: %s (%s), %.1f GiB usable, %.0f GFLOP/s", self.name, inventory.device,
                 inventory.name, inventory.usable_bytes / 2**30, inventory.gflops)

        ctx = self.ctx = zmq.asyncio.Context()
        # Only the upstream stage the leader names may push micro-batches here.
        self.keyring = KeyRing(set(), "this host's data socket")
        authenticator = start_authenticator(ctx, self.keyring) if self.identity else None
        self.data_in = make_socket(ctx, zmq.PULL)
        self.data_out = make_socket(ctx, zmq.PUSH)
        if self.identity:
            as_server(self.data_in, self.identity)
        try:
            port = bind_tcp(self.data_in, advertise)
            log.info("joining leader %s:%d; receiving micro-batches on %s:%d", leader_host, leader_port, advertise, port)
            self._tasks.append(asyncio.create_task(self._heartbeat()))
            while True:
                self.control = self._to_leader(zmq.DEALER)
                self.control.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_MAX_MS)
                self.control.connect(tcp(leader_ip, leader_port))
                # Queued until a leader listens, then delivered: joining needs no retry loop.
                await self._send(Join(self.name, inventory, tcp(advertise, port), current=self.current,
                                      public_key=self.identity.public.decode() if self.identity else ""))
                if not await self._session():
                    return
                self.control.close()
                self.control = None
                log.warning("no word from the leader for %.0f s: joining again%s", LEADER_DEAD_S,
                            f" (keeping layers {self.current.start}-{self.current.end - 1})" if self.current else "")
        finally:
            for task in [*self._tasks, *([self.stage_task] if self.stage_task else [])]:
                task.cancel()
            await asyncio.gather(*self._tasks, *([self.stage_task] if self.stage_task else []), return_exceptions=True)
            for sock in (self.data_in, self.data_out, self.control):
                if sock is not None:
                    sock.close()
            if authenticator is not None:
                authenticator.stop()
            ctx.term()
            self.torch_thread.shutdown(wait=False, cancel_futures=True)

    async def _session(self) -> bool:
        """_control_loop, unless the device fails for good first: then HostError (exit status 1)."""
        session = asyncio.create_task(self._control_loop())
        failed = asyncio.create_task(self._device_failed.wait())
        try:
            await asyncio.wait({session, failed}, return_when=asyncio.FIRST_COMPLETED)
            if not session.done():
                raise HostError(f"{self.device_failure}; exiting so that the host restarts with a fresh device "
                                "context")
            return session.result()
        finally:
            for task in (session, failed):
                task.cancel()
            # Awaited: a fetch's sockets close in its own `finally` before run()'s ends the context,
            # and a cancellation of this task repeated after a signal reaches them too.
            await asyncio.gather(session, failed, return_exceptions=True)

    async def _control_loop(self) -> bool:
        """Serve one leader session: False when told to shut down, True when the leader, having
        answered, fell silent. Before its first word there is no deadline (it may not be up yet)."""
        heard = False
        while True:
            try:
                raw, *_ = await asyncio.wait_for(receive(self.control), LEADER_DEAD_S if heard else None)
            except asyncio.TimeoutError:
                return True
            heard = True
            try:
                msg = decode(raw, expect=(Alive, Assign, Probe, ProfileRequest, Refused, Release, Shutdown))
            except WireError as exc:
                log.warning("ignored a malformed control message: %s", exc)
                continue
            if isinstance(msg, Alive):
                continue
            if isinstance(msg, Refused):
                raise HostError(f"the leader refused this host: {msg.reason}")
            if isinstance(msg, Shutdown):
                log.info("leader asked to shut down: %s", msg.reason)
                return False
            if isinstance(msg, Probe):
                await self._send(ProbeReply(self.name, msg.nonce))
                continue
            if isinstance(msg, ProfileRequest):
                await self._profile(msg)
                continue
            if isinstance(msg, Release):
                await self._release(msg.reason)
                continue
            await self._assign(msg)

    async def _profile(self, msg: ProfileRequest) -> None:
        started = time.perf_counter()
        # The profiler times the first PROFILE_LAYERS layers and the head (plan/profile.py).
        spec = StageSpec(0, PROFILE_LAYERS, first=False, last=True, dtype=msg.dtype)
        try:
            model_dir, _ = await self._weights(msg.model_hash, msg.weights_addr, spec)
            profile = await self._offload(
                lambda: cached_profile(model_dir, self.settings.device, msg.dtype, budget_s=msg.budget_s)[0])
        except Exception as exc:  # the leader must hear it rather than wait for a profile
            log.error("cannot profile %s: %s", msg.model, exc)
            await self._send(Failed(self.name, f"profiling failed: {exc}"))
            return
        log.info("profile of %s on %s ready in %.1f s", msg.model, profile.device_name, time.perf_counter() - started)
        await self._send(ProfileReport(self.name, profile))

    async def _assign(self, msg: Assign) -> None:
        log.info("assigned stage %d/%d: layers %d-%d of %s (epoch %d)", msg.stage + 1, msg.num_stages, msg.start,
                 msg.end - 1, msg.model, msg.epoch)
        started = time.perf_counter()
        if self.identity:  # at once: the upstream stage may finish loading before this one
            self.keyring.allowed = {msg.upstream_key.encode()}
        await self._stop_stage()
        fetched = 0
        if self.model is not None and self.current is not None and same_slice(self.current, msg):
            log.info("keeping the loaded slice: it is unchanged")
        else:
            self.model = self.current = None  # free the old slice before loading the new one
            release_memory()
            spec = StageSpec(msg.start, msg.end, first=msg.stage == 0, last=msg.stage == msg.num_stages - 1,
                             dtype=msg.dtype, max_seqs=msg.max_seqs, max_context=msg.max_context,
                             precisions=tuple(msg.precisions), input_scales=tuple(msg.input_scales))
            try:
                model_dir, fetched = await self._weights(msg.model_hash, msg.weights_addr, spec)
                self.model = await self._offload(self._load, model_dir, msg, spec)
            except Exception as exc:  # whatever went wrong, the leader must hear it rather than wait
                log.error("cannot load the slice: %s: %s", type(exc).__name__, exc)
                await self._send(Failed(self.name, f"{type(exc).__name__}: {exc}", msg.epoch))
                return
        model, self.current = self.model, msg
        seconds = time.perf_counter() - started
        if self.downstream != msg.downstream:
            if self.downstream is not None:
                self.data_out.disconnect(self.downstream)
            if self.identity:
                as_client(self.data_out, self.identity, msg.downstream_key.encode())
            self.data_out.connect(msg.downstream)
            self.downstream = msg.downstream
        self.stage_loop = StageLoop(model, msg.stage, self.data_in, self.data_out, self.torch_thread, msg.epoch)
        self.stage_task = asyncio.create_task(self.stage_loop.run())
        self.stage_task.add_done_callback(functools.partial(self._stage_ended, epoch=msg.epoch))
        log.info("stage %d ready in %.1f s: %.0f MiB weights, %.0f MiB KV cache", msg.stage, seconds,
                 model.weight_bytes / 2**20, model.cache.nbytes / 2**20)
        await self._send(Ready(self.name, msg.stage, model.weight_bytes, model.cache.nbytes, round(seconds, 3),
                               fetched, msg.epoch, model.static_steps.flat_tokens))

    async def _release(self, reason: str) -> None:
        """Stop the stage and free its weights and KV cache; nobody may push micro-batches here
        until the next Assign names an upstream."""
        held = self.current
        await self._stop_stage()
        self.model = self.current = None
        release_memory()
        if self.identity:
            self.keyring.allowed = set()
        if self.downstream is not None:
            self.data_out.disconnect(self.downstream)
            self.downstream = None
        if held is not None:
            log.info("released layers %d-%d: %s", held.start, held.end - 1, reason)

    def _stage_ended(self, task: asyncio.Task, epoch: int = -1) -> None:
        """A stage loop ends only when cancelled: anything else means this stage no longer serves.
        Say so, and tell the leader, which re-plans and replays the requests at once instead of
        waiting out its step timeout for micro-batches nobody reads."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        log.error("the stage loop stopped", exc_info=exc)
        self._tasks.append(asyncio.create_task(self._report_stage_end(exc, epoch)))

    async def _report_stage_end(self, exc: BaseException, epoch: int) -> None:
        if not isinstance(exc, DeviceLost):
            await self._send(Failed(self.name, f"the stage loop stopped: {type(exc).__name__}: {exc}", epoch))
            return
        self.device_failure = f"its device failed: {exc}"
        await self._send(Failed(self.name, self.device_failure, epoch))
        self._device_failed.set()

    async def _stop_stage(self) -> None:
        """Stop serving micro-batches. Cancelling the loop does not stop a step running on the torch
        thread, which holds the old stage: wait for it, so that the memory released next is freed."""
        if self.stage_task is not None:
            self.stage_task.cancel()
            await asyncio.gather(self.stage_task, return_exceptions=True)
            self.stage_task = self.stage_loop = None
            await self._offload(lambda: None)

    def _to_leader(self, kind: int) -> zmq.asyncio.Socket:
        """A socket for talking to the leader: CURVE with the leader's key pinned, when keyed."""
        sock = make_socket(self.ctx, kind)
        if self.identity:
            as_client(sock, self.identity, self.leader_key)
        return sock

    async def _offload(self, fn, *args):
        """Run blocking work (torch, hashing, file reads) on the host's torch thread."""
        return await asyncio.get_running_loop().run_in_executor(self.torch_thread, fn, *args)

    async def _weights(self, model_hash: str, weights_addr: str, spec: StageSpec) -> tuple[Path, int]:
        """The directory to load stage `spec` from, and the bytes fetched from the leader for it."""
        if not model_hash or not weights_addr:
            raise ModelError("the leader did not say which weights to load (an older leader?)")
        fetcher = WeightFetcher(self._to_leader(zmq.DEALER), weights_addr, self.name, self._offload)
        store = None
        try:
            manifest = await fetcher.manifest(model_hash)
            if self.settings.model is not None:
                files = await self._offload(resolve_model, self.settings.model)
                local, _ = await self._offload(load_manifest, files.path)
                if local.model_hash != manifest.model_hash:
                    raise ModelError(f"--model {self.settings.model} is not the leader's model: "
                                     f"{describe_mismatch(local, manifest)}")
                log.info("using this host's own copy %s (it matches the leader's manifest)", files.path)
                return files.path, 0
            # Part files are named for --name, else the device: stable across restarts, so a restarted
            # host resumes its parts (the default name carries the pid).
            store = WeightStore(manifest.model_hash, self.settings.name or self.settings.device)
            entries = {e.name: e for e in manifest.entries}
            fetched = await fetcher.fetch(store, await self._offload(store.missing, [entries["config.json"]]), False)
            config = await self._offload(load_config, store.root)
            tensors = [n for n, e in entries.items() if e.kind == "tensor"]
            needed = [entries[n] for n in dict.fromkeys(stage_tensor_names(config, tensors, spec).values())]
            missing = await self._offload(store.missing, needed)  # hashes every cached tensor it needs
            need = sum(m.entry.size - m.offset for m in missing)
            room = await self._offload(make_room, need, self.settings.disk_limit, manifest.model_hash)
            if need > room:
                raise ModelError(f"the slice needs {need / 2**20:.1f} MiB more of weights on disk, but this host's "
                                 f"cache ({store.root.parent}) has room for {room / 2**20:.1f} MiB")
            log.info("slice weights: %d of %d tensors already cached and verified", len(needed) - len(missing),
                     len(needed))
            fetched += await fetcher.fetch(store, missing)
            await self._offload(store.write_index)
            return store.root, fetched
        finally:
            fetcher.close()
            if store is not None:
                store.close()

    def _load(self, model_dir: Path, msg: Assign, spec: StageSpec) -> StageModel:
        layers = load_config(model_dir).num_hidden_layers
        if layers != msg.num_layers:
            raise ModelError(f"{msg.model} here has {layers} layers, the leader's has {msg.num_layers}: not the same model")
        model = StageModel(model_dir, spec, self.settings.device, self.settings.cuda_graphs,
                           self.settings.quanto_kernels)
        started = time.perf_counter()
        try:
            captured = model.static_steps.warm_up()
        except Exception:  # torch.compile or Triton failing on this device must not stop the host
            log.exception("fused steps failed to compile or capture; running transformers' layers")
            model.use_transformers_layers()
            captured = []
        if captured:
            log.info("captured %d step graphs (decode up to %d rows, prefill up to %d tokens) in %.1f s",
                     len(captured), max(k.rows for k in captured if not k.prefill),
                     max(k.rows for k in captured if k.prefill), time.perf_counter() - started)
        return model

    async def _send(self, msg) -> None:
        if self.control is not None:  # None between a lost leader and the next rejoin
            await self.control.send(encode(msg))

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            stats = self.stage_loop.stats if self.stage_loop else Heartbeat(self.name).stats
            await self._send(Heartbeat(self.name, stats))


def run_host(settings: HostSettings) -> None:
    """Run until Shutdown or a signal."""
    asyncio.run(run_until_signal(Host(settings).run()))
