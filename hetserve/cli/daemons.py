"""Verbs that run daemons: `leader`, `join`, and `up` (a whole cluster on this machine)."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import click

from ..config import DEFAULT_LISTEN, DEFAULT_SERVE, HostSettings, LeaderSettings, Limits
from ..model.resolve import DEFAULT_MODEL
from ..settings_file import config_option
from .group import main
from .options import (DTYPES, HTTP_HELP, PLANNER_KEYS, apply_plan, keys_options, limit_options, limits_from,
                      log_options, parse_size, planner_from, planner_options, read_token, run_daemon, token_option)

log = logging.getLogger(__name__)


@main.command()
@config_option
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True,
              help="HOST:PORT where hosts join. Beyond loopback it needs --keys (or --insecure: plain text, anyone "
                   "who reaches it can join).")
@click.option("--serve", default=DEFAULT_SERVE, show_default=True, help="HOST:PORT of the client line protocol.")
@click.option("--http", default=None, help=HTTP_HELP)
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Built-in model name, Hugging Face model directory, or .gguf file.")
@click.option("--hosts", default=1, show_default=True, type=click.IntRange(1), help="Hosts to wait for before planning.")
@click.option("--device", default=None, help="Also run a stage on this machine (cpu, cuda, cuda:N); counts as one of --hosts.")
@click.option("--dtype", type=DTYPES, default="float32", show_default=True, help="Compute dtype of every stage.")
@click.option("--advertise", default=None, help="Address hosts reach the leader at (default: found per host).")
@click.option("--plan", "plan_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="A plan from `hetserve plan`: its hosts, layers, precisions and micro-batch sizes.")
@click.option("--weights-rate", default="0", show_default=True,
              help="Most bytes per second for streaming weights to hosts that lack them, all hosts together "
                   "(e.g. 200MiB), so a joining host does not starve the serving links; 0 = no limit.")
@token_option("Clients must present this token (first line, or HTTP bearer); needed when --serve or --http "
              "is not a loopback address.")
@keys_options("this leader's *.key_secret, and hosts/*.key: the public keys of the hosts allowed to join")
@planner_options
@limit_options
@log_options
def leader(listen, serve, http, model, hosts, device, dtype, advertise, plan_file, weights_rate, token_file, keys,
           insecure, log_level, log_json, **kwargs):
    """Coordinate a cluster: accept hosts, split the model over them, serve clients."""
    from ..leader.daemon import run_leader

    limits = limits_from(kwargs)
    planner = planner_from(kwargs)
    if plan_file and planner:
        raise click.UsageError("give --plan or --max-ppl-increase, not both")
    if plan_file:
        model, hosts, dtype, limits = apply_plan(plan_file, model, limits)
    settings = LeaderSettings(listen=listen, serve=serve, http=http, model=model, hosts=hosts, dtype=dtype,
                              advertise=advertise, plan=plan_file, planner=planner, limits=limits,
                              weights_rate=parse_size(weights_rate), token=read_token(token_file), keys=keys,
                              insecure=insecure)
    local = None
    if device:
        from ..transport.sockets import local_ip_towards, split_hostport

        try:
            host, port = split_hostport(listen, 5555)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--listen") from None
        wildcard = host in ("0.0.0.0", "::")
        # Other hosts push micro-batches to this stage: advertise an address they can reach.
        reachable = advertise or (local_ip_towards("192.0.2.1") if wildcard else host)
        # The leader listens on that address alone unless it is a wildcard: the stage joins it there.
        joins = "127.0.0.1" if wildcard else f"[{host}]" if ":" in host else host
        local = Supervised([sys.executable, "-m", "hetserve", "join", "--leader", f"{joins}:{port}",
                            "--device", device, "--name", "leader-stage", "--advertise", reachable,
                            "--model", model, "--log-level", log_level, *(["--log-json"] if log_json else []),
                            *(["--keys", keys] if keys else []), *(["--insecure"] if insecure else [])],
                           "the leader's stage")
    try:
        run_daemon(run_leader, settings, "leader", log_level, log_json)
    finally:
        if local is not None:
            local.stop()


@main.command()
@config_option
@click.option("--leader", required=True, help="HOST:PORT of the leader's --listen.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--memory", default=None, help="Memory this host offers (e.g. 8GiB); default: what is free.")
@click.option("--advertise", default=None, help="Address other hosts reach this one at (default: the route to the leader).")
@click.option("--name", default=None, help="Unique host name (default: hostname-pid).")
@click.option("--threads", default=None, type=click.IntRange(1), help="CPU threads for compute (default: torch's).")
@click.option("--model", default=None,
              help="This host's own copy of the model (built-in name, model directory or .gguf), used when it "
                   "matches the leader's manifest and refused when not. Default: fetch the slice's weights from "
                   "the leader into $HETSERVE_HOME/weights, verified and kept for the next start.")
@click.option("--disk-limit", default=None,
              help="Most bytes the weights cache may hold (e.g. 20GiB); default: the free disk.")
@keys_options("this host's *.key_secret, and leader.key: the leader's public key")
@click.option("--omp-wait", type=click.Choice(["active", "default"]), default="default", show_default=True,
              help="active: OpenMP threads spin between steps instead of sleeping (for CPU hosts whose cores "
                   "are their own; see docs/benchmarks.md). OMP_WAIT_POLICY in the environment wins.")
@click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
              help="On a GPU, replay decode and prefill steps from CUDA graphs (one per bucket of rows or "
                   "prompt tokens, captured at load) "
                   "through fused layers (torch.compile, Triton attention); off: launch transformers' layers "
                   "eagerly (for debugging, or where torch.compile or Triton fails).")
@click.option("--quanto-kernels", is_flag=True,
              help="On a GPU, int8 and int4 layers run optimum-quanto's matmuls instead of hetserve's (on an "
                   "H200: int8 7-15x slower at decode; int4 tinygemm 1.1x slower at batch 1, 2-7x from 16 "
                   "rows and ~11x slower prefill). A baseline, or a way out should ours misbehave on a GPU.")
@click.option("--cpu-transposed-up-to", default=None, type=click.IntRange(0), metavar="VALUES",
              help="On a CPU, float32 products whose input holds at most VALUES values (rows x in_features) run "
                   "as (W @ x^T)^T, larger ones through oneDNN's linear. Default 3072, fitted on an AMD EPYC "
                   "(docs/benchmarks.md); benchmarks/cpu_linear.py shows where a CPU crosses over; 0: oneDNN for all.")
@log_options
def join(leader, device, memory, advertise, name, threads, model, disk_limit, keys, insecure, omp_wait, cuda_graphs,
         quanto_kernels, cpu_transposed_up_to, log_level, log_json):
    """Join a cluster as a host: load the slice the leader assigns and run it."""
    if omp_wait == "active":
        # Read by libgomp when torch loads, so before the import below. A stage idles while the
        # others compute, and its OpenMP threads go to sleep; waking them costs (docs/benchmarks.md).
        os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
    from ..worker.host import run_host

    settings = HostSettings(leader=leader, device=device, memory=parse_size(memory) if memory else None,
                            advertise=advertise, name=name, threads=threads, model=model,
                            disk_limit=parse_size(disk_limit) if disk_limit else None, keys=keys, insecure=insecure,
                            cuda_graphs=cuda_graphs, quanto_kernels=quanto_kernels,
                            cpu_transposed_up_to=cpu_transposed_up_to)
    run_daemon(run_host, settings, f"host[{name or os.getpid()}]", log_level, log_json)


@main.command()
@config_option
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1), help="Local hosts (pipeline stages).")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Built-in model name, Hugging Face model directory, or .gguf file.")
@click.option("--listen", default="127.0.0.1:5555", show_default=True, help="HOST:PORT where the local hosts join.")
@click.option("--serve", default=DEFAULT_SERVE, show_default=True, help="HOST:PORT of the client line protocol.")
@click.option("--http", default=None, help=HTTP_HELP)
@click.option("--device", default="cpu", show_default=True,
              help="Device of the local hosts: cpu, cuda:N, cuda (one host per GPU of this machine, in turn), "
                   "or a comma-separated list taken in turn (cuda:0,cuda:1).")
@click.option("--dtype", type=DTYPES, default="float32", show_default=True, help="Compute dtype of every stage.")
@click.option("--memory", default=None, help="Memory each local host offers (e.g. 2GiB).")
@click.option("--threads", default=None, type=click.IntRange(1),
              help="CPU threads per host (default: this machine's cores / --workers).")
@click.option("--plan", "plan_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="A plan whose hosts are named worker-0, worker-1, ... (sets --workers).")
@token_option("Clients must present this token (as for `hetserve leader`).")
@planner_options
@limit_options
@log_options
def up(workers, model, listen, serve, http, device, dtype, memory, threads, plan_file, token_file, log_level, log_json,
       **kwargs):
    """Run a leader and N hosts on this machine (demo and development). Ctrl-C stops all."""
    limits = limits_from(kwargs)
    if plan_file:
        model, workers, dtype, _ = apply_plan(plan_file, model, limits)
    if memory:
        try:
            parse_size(memory)  # here, before any process starts: each host would exit 2 on it
        except click.BadParameter as exc:
            raise click.BadParameter(exc.message, param_hint="--memory") from None
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    leader_cmd = [sys.executable, "-m", "hetserve", "leader", "--listen", listen, "--serve", serve,
                  "--model", model, "--hosts", str(workers), "--dtype", dtype, "--log-level", log_level]
    logging_flags = ["--log-json"] if log_json else []
    leader_cmd += logging_flags + (["--http", http] if http else [])
    if plan_file:
        leader_cmd += ["--plan", plan_file]
    if token_file:
        leader_cmd += ["--token-file", token_file]
    if kwargs["max_ppl_increase"] is not None:
        for key in PLANNER_KEYS:
            if kwargs[key] is not None:
                leader_cmd += ["--" + key.replace("_", "-"), str(kwargs[key])]
    for field in dataclasses.fields(Limits):
        flag, value = field.name.replace("_", "-"), getattr(limits, field.name)
        leader_cmd += [f"--{flag}" if value else f"--no-{flag}"] if isinstance(value, bool) else [f"--{flag}", str(value)]
    procs = [spawn_child(leader_cmd)]
    gpus = 0
    if device == "cuda":
        import torch  # only here: the other verbs of this process need no torch

        gpus = torch.cuda.device_count()
    for i, host_device in enumerate(local_host_devices(device, workers, gpus)):
        cmd = [sys.executable, "-m", "hetserve", "join", "--leader", listen, "--device", host_device,
               "--name", f"worker-{i}", "--threads", str(threads), "--log-level", log_level, *logging_flags,
               "--model", model]  # the leader's own files, on this machine: nothing to stream
        if memory:
            cmd += ["--memory", memory]
        procs.append(spawn_child(cmd))
    code = 0
    try:
        while not stopping:
            exited = [p for p in procs if p.poll() is not None]
            if exited:
                code = exited[0].returncode if exited[0].returncode > 0 else 1  # a signal: -N
                click.echo(f"hetserve up: a process exited with status {exited[0].returncode}; stopping the cluster",
                           err=True)
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        stop_processes(procs)
    sys.exit(code)


def local_host_devices(device: str, hosts: int, gpus: int) -> list[str]:
    """The device of each of `hosts` hosts on one machine (`hetserve up`): a comma-separated list
    is taken in turn; a bare "cuda" spreads them over the machine's `gpus` GPUs (host i on
    cuda:i mod gpus), so that each stage of a multi-GPU box computes on a GPU of its own instead
    of all time-sharing the first; anything else is every host's."""
    listed = [d.strip() for d in device.split(",") if d.strip()]
    if len(listed) > 1:
        return [listed[i % len(listed)] for i in range(hosts)]
    if device == "cuda" and gpus > 1:
        return [f"cuda:{i % gpus}" for i in range(hosts)]
    return [device] * hosts


def spawn_child(cmd: list[str]) -> subprocess.Popen:
    """Start a child daemon that gets SIGTERM if this process dies, so none is left orphaned."""
    def die_with_parent():
        if sys.platform == "linux":
            import ctypes

            PR_SET_PDEATHSIG = 1
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    return subprocess.Popen(cmd, preexec_fn=die_with_parent)


class Supervised:
    """A child daemon started again after it fails, as systemd does for a host: status 1 (its
    device failed for good, DeviceLost, or its stage broke) or a signal. Not after status 0 (the
    leader told it to stop: the leader is ending) or 2 (bad settings: a restart would not mend them)."""

    RESTART_AFTER_S = 5.0

    def __init__(self, cmd: list[str], what: str):
        self.cmd, self.what = cmd, what
        self._lock = threading.Lock()  # a restart never races stop()
        self._stopping = threading.Event()
        self.proc = spawn_child(cmd)
        # Children started from here get their parent-death signal when this thread ends: it lives
        # until stop(), which ends the child first.
        self._watcher = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while True:
            status = self.proc.wait()
            if self._stopping.is_set() or status in (0, 2):
                if status == 2:
                    log.error("%s exited with status 2 (its settings): not starting it again", self.what)
                return
            log.warning("%s exited with status %d: starting it again in %.0f s", self.what, status,
                        self.RESTART_AFTER_S)
            if self._stopping.wait(self.RESTART_AFTER_S):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self.proc = spawn_child(self.cmd)

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
            stop_processes([self.proc])
        self._watcher.join(timeout=5)


def stop_processes(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL whatever has not exited after `grace` seconds."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
