"""The `hetserve` command: click verbs only; the work lives in the packages they call."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from .config import DECODE_AHEAD, DEFAULT_LISTEN, DEFAULT_SERVE, HostSettings, LeaderSettings, Limits, PlannerSettings
from .model.resolve import DEFAULT_MODEL
from .settings_file import ENV_PREFIX, config_option, effective_settings

LOG_LEVELS = click.Choice(["debug", "info", "warning", "error"], case_sensitive=False)
DTYPES = click.Choice(["float32", "float16", "bfloat16"])
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}
LIMIT_HELP = {
    "max_seqs": "Requests running at once (KV-cache slots on every stage).",
    "max_context": "Prompt + completion tokens per request (KV-cache length per slot).",
    "default_max_tokens": "Completion length when a request gives no max_tokens.",
    "max_queued": "Requests waiting for a slot before new ones get 'overloaded'.",
    "max_queued_tokens": "Prompt tokens of the requests waiting for a slot, in all, before new ones get 'overloaded'.",
    "prefill_seqs": "Most requests in one prefill micro-batch.",
    "prefill_tokens": "Most prompt tokens in one prefill micro-batch; longer prompts are chunked.",
    "decode_seqs": "Most requests in one decode micro-batch.",
    "max_in_flight": "Micro-batches in the pipeline at once; 0 = chosen at runtime from measured stage times (one per "
                     "stage up). With decode-ahead one more is queued behind each.",
    "decode_ahead": "One-stage pipelines: queue each request's next decode step before its token is back (the stage "
                    "feeds it the token it sampled), so the stage never waits on the leader between steps. auto: "
                    "where the stage is a GPU (on a CPU the work beside the stage's threads slows it).",
    "mixed_batches": "Decode rows ride in prefill micro-batches where every stage runs rows at their own lengths "
                     "(GPU stages from CUDA graphs), so prompt tokens share the decode step's weight reads.",
}


LIMIT_CHOICES = {"decode_ahead": DECODE_AHEAD}  # Limits fields that take one of a few words


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise click.BadParameter(f"{text!r} is not a size like 8GiB, 512MiB or 40G")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def keys_options(holds: str):
    """--keys and --insecure, for the two daemons that talk ZeroMQ."""
    def add(func):
        func = click.option("--insecure", is_flag=True,
                            help="Allow plain text and unauthenticated hosts beyond loopback (logged loudly).")(func)
        return click.option("--keys", default=None, type=click.Path(exists=True, file_okay=False),
                            help=f"CURVE keys directory (hetserve keygen) holding {holds}. Encrypts and "
                                 "authenticates every socket between hosts; needed beyond loopback.")(func)
    return add


def token_option(help_text: str):
    return click.option("--token-file", default=None, type=click.Path(exists=True, dir_okay=False), help=help_text)


def read_token(path: str | None) -> str | None:
    """The token in a file (surrounding whitespace ignored); None without a file."""
    if path is None:
        return None
    token = Path(path).read_text().strip()
    if not token or len(token) > 4096:
        raise click.BadParameter(f"{path} must hold one token of 1..4096 characters", param_hint="--token-file")
    return token


CLIENT_TOKEN_HELP = "File holding the server's client token (when it was started with --token-file)."


def planner_options(func):
    """Live planning options shared by `leader` and `up`."""
    options = [
        click.option("--max-ppl-increase", default=None,
                     help="Plan live from the hosts' profiles with this quality target (e.g. 2%)."),
        click.option("--plan-prompt", default=256, show_default=True, type=click.IntRange(1),
                     help="Workload prompt tokens the live plan optimizes for."),
        click.option("--plan-output", default=128, show_default=True, type=click.IntRange(1),
                     help="Workload output tokens the live plan optimizes for."),
        click.option("--plan-batch", default=8, show_default=True, type=click.IntRange(1),
                     help="Requests served together in the live plan's workload."),
        click.option("--calibration-tokens", default=512, show_default=True, type=click.IntRange(16),
                     help="Calibration tokens for layer sensitivity."),
        click.option("--plan-out", default=None, type=click.Path(dir_okay=False), help="Also write the live plan here."),
        click.option("--profile-budget", default=300.0, show_default=True, type=click.FloatRange(min=0),
                     help="Seconds a joining host without a cached profile may spend measuring one; precisions "
                          "that would run past it are left out of its profile (0 = no limit)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


PLANNER_KEYS = ("max_ppl_increase", "plan_prompt", "plan_output", "plan_batch", "calibration_tokens", "plan_out",
                "profile_budget")


def planner_from(kwargs: dict) -> PlannerSettings | None:
    values = {k: kwargs.pop(k) for k in PLANNER_KEYS}
    if values["max_ppl_increase"] is None:
        return None
    return PlannerSettings(parse_fraction(values["max_ppl_increase"]), values["plan_prompt"], values["plan_output"],
                           values["plan_batch"], values["calibration_tokens"], save_to=values["plan_out"],
                           profile_budget_s=values["profile_budget"])


def limit_options(func):
    """Add one --option per `Limits` field, defaults and help from the dataclass."""
    for field in reversed(dataclasses.fields(Limits)):
        flag = "--" + field.name.replace("_", "-")
        kind = type(field.default)
        if kind is bool:
            flag = f"{flag}/--no-{flag[2:]}"
        elif kind is str:
            kind = click.Choice(LIMIT_CHOICES[field.name])
        func = click.option(flag, field.name, type=kind, default=field.default, show_default=True,
                            help=LIMIT_HELP[field.name])(func)
    return func


def limits_from(kwargs: dict) -> Limits:
    limits = Limits(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(Limits)})
    try:
        limits.check()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    return limits


def log_options(func):
    func = click.option("--log-json", is_flag=True, help="Log one JSON object per line.")(func)
    return click.option("--log-level", type=LOG_LEVELS, default="info", show_default=True,
                        help="Least severe log level written.")(func)


def apply_plan(plan_file: str, model: str, limits: Limits) -> tuple[str, int, str, Limits]:
    """A plan fixes the model, the host count, the dtype, the KV cache and the micro-batch sizes."""
    from pathlib import Path

    from .plan.planner import Plan

    plan = Plan.load(Path(plan_file))
    if model != DEFAULT_MODEL and model != plan.model:
        raise click.UsageError(f"--model {model} but the plan is for {plan.model}")
    # The plan budgeted each host's memory for this KV cache: allocate exactly that.
    limits = dataclasses.replace(limits, prefill_seqs=plan.prefill_microbatch, decode_seqs=plan.decode_microbatch,
                                 max_seqs=plan.workload.batch,
                                 max_context=plan.workload.prompt_tokens + plan.workload.output_tokens,
                                 default_max_tokens=min(limits.default_max_tokens, plan.workload.output_tokens))
    return plan.model, len(plan.stages), plan.dtype, limits


def run_daemon(main, settings, role: str, log_level: str, log_json: bool) -> None:
    """Run a daemon; a known failure prints one clear line and exits 1, never a traceback."""
    from .leader.daemon import LeaderError
    from .lifecycle import setup_logging
    from .model.resolve import ModelError
    import zmq

    from .worker.host import HostError

    setup_logging(log_level, role, log_json)
    try:
        main(settings)
    except (LeaderError, HostError, ModelError, ValueError, OSError, zmq.ZMQError) as exc:
        click.echo(f"hetserve {role}: error: {exc}", err=True)
        sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100,
                                "auto_envvar_prefix": ENV_PREFIX})
def main():
    """hetserve: serve one LLM across a heterogeneous set of hosts.

    Start a leader, join hosts to it, and talk to it with the line protocol
    (`hetserve generate`). `hetserve up` runs a whole cluster on this machine.

    Every option can also come from a TOML file (--config) or an environment
    variable HETSERVE_<COMMAND>_<OPTION>; the command line wins, then the
    environment, then the file. `hetserve config show COMMAND` prints the result.
    """


HTTP_HELP = "HOST:PORT of the OpenAI-compatible HTTP API and /metrics (off unless given)."


@main.command()
@config_option
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, help="HOST:PORT where hosts join.")
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
    from .leader.daemon import run_leader

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
        from .transport.sockets import local_ip_towards, split_hostport

        host, port = split_hostport(listen, 5555)
        wildcard = host in ("0.0.0.0", "::")
        # Other hosts push micro-batches to this stage: advertise an address they can reach.
        reachable = advertise or (local_ip_towards("192.0.2.1") if wildcard else host)
        local = spawn_child([sys.executable, "-m", "hetserve", "join", "--leader", f"127.0.0.1:{port}",
                             "--device", device, "--name", "leader-stage", "--advertise", reachable,
                             "--model", model, "--log-level", log_level,
                             *(["--keys", keys] if keys else []), *(["--insecure"] if insecure else [])])
    try:
        run_daemon(run_leader, settings, "leader", log_level, log_json)
    finally:
        if local is not None:
            stop_processes([local])


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
              help="On a GPU, int8 layers run optimum-quanto's matmuls instead of hetserve's (7-15x slower at "
                   "decode on an H200; a baseline, or a way out should ours misbehave on a GPU).")
@log_options
def join(leader, device, memory, advertise, name, threads, model, disk_limit, keys, insecure, omp_wait, cuda_graphs,
         quanto_kernels, log_level, log_json):
    """Join a cluster as a host: load the slice the leader assigns and run it."""
    if omp_wait == "active":
        # Read by libgomp when torch loads, so before the import below. A stage idles while the
        # others compute, and its OpenMP threads go to sleep; waking them costs (docs/benchmarks.md).
        os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
    from .worker.host import run_host

    settings = HostSettings(leader=leader, device=device, memory=parse_size(memory) if memory else None,
                            advertise=advertise, name=name, threads=threads, model=model,
                            disk_limit=parse_size(disk_limit) if disk_limit else None, keys=keys, insecure=insecure,
                            cuda_graphs=cuda_graphs, quanto_kernels=quanto_kernels)
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
                code = exited[0].returncode or 1
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


@main.command()
@config_option
@click.argument("prompt")
@click.option("--server", default=DEFAULT_SERVE, show_default=True, help="HOST:PORT of the leader's client port.")
@click.option("--max-tokens", default=None, type=click.IntRange(1), help="Completion length (default: the server's).")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0), help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Nucleus sampling: keep the most likely tokens up to this probability mass.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(0), help="0 = off.")
@click.option("--seed", default=None, type=click.IntRange(0), help="Same seed, same text.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--raw", is_flag=True, help="Send PROMPT as raw text instead of a chat message.")
@click.option("--wait", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Seconds to wait for the cluster to come up and serve.")
@token_option(CLIENT_TOKEN_HELP)
def generate(prompt, server, max_tokens, temperature, top_p, top_k, seed, stop, raw, wait, token_file):
    """Stream a completion of PROMPT (a chat message unless --raw)."""
    from .client import ClientError, LineClient

    body = {"prompt": prompt} if raw else {"messages": [{"role": "user", "content": prompt}]}
    body.update({"temperature": temperature, "top_p": top_p, "top_k": top_k, "stop": list(stop)})
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if seed is not None:
        body["seed"] = seed

    async def stream() -> int:
        client = await LineClient.connect(server, wait, read_token(token_file))
        try:
            if wait:
                await client.wait_serving(max(1.0, wait))
            async for event in client.request(body):
                if event["event"] == "token":
                    click.echo(event["text"], nl=False)
                elif event["event"] == "done":
                    usage = event["usage"]
                    click.echo()
                    click.echo(f"[{event['finish_reason']}: {usage['prompt_tokens']} prompt + "
                               f"{usage['completion_tokens']} completion tokens]", err=True)
                else:
                    click.echo(f"\nerror: {event['error']['code']}: {event['error']['message']}", err=True)
                    return 1
            return 0
        finally:
            await client.close()

    try:
        sys.exit(asyncio.run(stream()))
    except ClientError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


@main.command()
@config_option
@click.option("--server", default=DEFAULT_SERVE, show_default=True, help="HOST:PORT of the leader's client port.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw status object.")
@token_option(CLIENT_TOKEN_HELP)
def status(server, as_json, token_file):
    """Show the cluster: hosts, their slices and health, queue and batches."""
    from .client import ClientError, LineClient

    async def fetch() -> dict:
        client = await LineClient.connect(server, token=read_token(token_file))
        try:
            return await client.status()
        finally:
            await client.close()

    try:
        info = asyncio.run(fetch())
    except ClientError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['model']} ({info['layers']} layers, {info['dtype']}): {info['state']}, "
               f"up {info['uptime_s']} s")
    click.echo(f"requests: {info['running']} running, {info['queued']} queued, {info['free_slots']} free slots, "
               f"{info['in_flight']} micro-batches in flight; {info['generated_tokens']} tokens generated, "
               f"{info['tokens_per_s']} tokens/s now")
    if batching := info.get("batching"):
        click.echo(f"batching ({batching['regime'] or 'idle'}): prefill chunks of {batching['prefill_tokens']} tokens, "
                   f"{batching['max_in_flight']} micro-batches in flight"
                   + (" (+1 each, decode-ahead)" if batching.get("decode_ahead") else "") + ", decode round trip "
                   f"{batching['decode_round_ms']} ms, prefill {batching['prefill_ms_per_token']} ms/token"
                   + (f" (fit {fit[0]} ms + {fit[1]} ms/token)" if (fit := batching.get("prefill_ms_fit")) else ""))
    rows = [("STAGE", "HOST", "DEVICE", "MEM GiB", "LAYERS", "PRECISION", "STATE", "HEALTH", "LOAD", "STEPS",
             "PREFILL ms", "DECODE ms")]
    for h in info["hosts"]:
        layers = f"{h['layers'][0]}-{h['layers'][1] - 1}" if h["layers"] else "-"
        rows.append((str(h["stage"] if h["stage"] is not None else "-"), h["name"],
                     f"{h['device']} ({h['device_name']})", str(h["usable_gib"]), layers, h["precision"], h["state"],
                     f"{h['health']} ({h['last_seen_s']} s)", f"{h['load']:.0%}", str(h["steps"]),
                     str(h["prefill_ms"]), str(h["decode_ms"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())


@main.command()
@config_option
@click.option("--server", default=DEFAULT_SERVE, show_default=True, help="HOST:PORT of the leader's client port.")
@click.option("-c", "--concurrency", default=1, show_default=True, type=click.IntRange(1),
              help="Clients at once, each with its own connection, sending its next request when one is done.")
@click.option("--requests", default=None, type=click.IntRange(1),
              help="Stop after this many requests (default without --duration: each --prompts line once, "
                   "else 4 per client).")
@click.option("--duration", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Stop sending after this many seconds; running requests are finished.")
@click.option("--prompt-tokens", default=128, show_default=True, type=click.IntRange(1),
              help="Tokens per synthetic prompt (English text cut to this length with the model's tokenizer).")
@click.option("--output-tokens", default=128, show_default=True, type=click.IntRange(1),
              help="max_tokens of each request (of a --prompts line without its own).")
@click.option("--prompts", "prompts_file", default=None, type=click.Path(dir_okay=False),
              help='JSONL file of {"prompt": ..., "max_tokens": ...} (max_tokens optional) instead of '
                   "synthetic prompts; sent in order, cycling.")
@click.option("--model", default=None,
              help="Model for the tokenizer and the baseline (default: the model the server reports).")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0, 100),
              help="0 = greedy; above, request i samples with seed i.")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0),
              help="Short untimed requests sent first.")
@click.option("--baseline", type=click.Choice(["hf"]), default=None,
              help="Also run the same requests through transformers generate in this process (batched "
                   "by --concurrency, left-padded) and print hetserve / hf.")
@click.option("--device", default="cpu", show_default=True, help="Device of the --baseline (cpu, cuda, cuda:N).")
@click.option("--dtype", type=DTYPES, default="float32", show_default=True, help="Dtype of the --baseline.")
@click.option("--baseline-precision", type=click.Choice(["native", "int8", "int4"]), default="native",
              show_default=True,
              help="Quantize the --baseline's decoder layers with quanto as a stage would (weights only; "
                   "the embedding and head stay in --dtype): compare with a cluster serving that precision.")
@click.option("--threads", default=None, type=click.IntRange(1), help="CPU threads of the --baseline (default: torch's).")
@click.option("--json", "json_file", default=None, type=click.Path(dir_okay=False),
              help="Also write the results here as JSON.")
@click.option("--wait", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Seconds to wait for the cluster to come up and serve.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar on stderr.")
@token_option(CLIENT_TOKEN_HELP)
def bench(server, concurrency, requests, duration, prompt_tokens, output_tokens, prompts_file, model, temperature,
          warmup, baseline, device, dtype, baseline_precision, threads, json_file, wait, progress, token_file):
    """Load a cluster with concurrent clients; report tokens/s, requests/s, TTFT and TPOT."""
    from .bench.run import BenchConfig, BenchError, run_bench

    config = BenchConfig(server, concurrency, requests, duration, prompt_tokens, output_tokens, prompts_file, model,
                         temperature, warmup, baseline, device, dtype, baseline_precision, threads, wait, progress,
                         read_token(token_file))
    try:
        report = run_bench(config)
    except BenchError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    click.echo(report.table)
    for note in report.notes:
        click.echo(note, err=True)
    if json_file:
        try:
            Path(json_file).write_text(json.dumps(report.document, indent=2) + "\n")
        except OSError as exc:
            click.echo(f"error: cannot write {json_file}: {exc.strerror}", err=True)
            sys.exit(1)
        click.echo(f"wrote {json_file}", err=True)
    if report.hetserve.completed == 0:
        click.echo("error: no request completed", err=True)
        sys.exit(1)


def parse_host(text: str) -> tuple[str, int, str | None]:
    """NAME=MEMORY[@PROFILE.json] -> (name, bytes, profile path)."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise click.BadParameter(f"{text!r} is not NAME=MEMORY[@PROFILE.json]")
    memory, _, profile = rest.partition("@")
    return name, parse_size(memory), profile or None


def parse_fraction(text: str) -> float:
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a fraction like 2% or 0.02") from None


@main.command()
@config_option
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model to profile.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--dtype", type=DTYPES, default="float32", show_default=True, help="Compute dtype to profile.")
@click.option("--remeasure", is_flag=True, help="Measure again even if a cached profile exists.")
@click.option("--validate", is_flag=True, help="Measure held-out points and print the cost model's error.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Also write the profile here (JSON).")
def profile(model, device, dtype, remeasure, validate, out):
    """Measure per-layer time and memory of each precision on this device (cached)."""
    from pathlib import Path

    from .model.resolve import resolve_model
    from .plan.profile import cached_profile
    from .plan.validate import validate_cost_model

    files = resolve_model(model)
    prof, path = cached_profile(files.path, device, dtype, remeasure=remeasure)
    click.echo(f"profile of {prof.device_name} for {model} ({dtype}): {path}")
    if out:
        prof.save(Path(out))
    click.echo(f"{'precision':10} {'layer MiB':>9}  prefill ms/layer (batch x prompt)      decode ms/layer (batch x context)")
    for p, nbytes in prof.layer_bytes.items():
        pre = " ".join(f"{b}x{t}:{prof.layer_ms['prefill'][p][i][j]:.2f}" for i, b in enumerate(prof.prefill.batches)
                       for j, t in enumerate(prof.prefill.tokens))
        dec = " ".join(f"{b}x{t}:{prof.layer_ms['decode'][p][i][j]:.2f}" for i, b in enumerate(prof.decode.batches)
                       for j, t in enumerate(prof.decode.tokens))
        click.echo(f"{p:10} {nbytes / 2**20:9.2f}  {pre}   {dec}")
    if validate:
        rows = validate_cost_model(files.path, prof)
        for phase, precision, batch, tokens, predicted, measured in rows:
            click.echo(f"held out {phase:7} {precision:6} batch {batch:2} tokens {tokens:4}: "
                       f"predicted {predicted:7.3f} ms, measured {measured:7.3f} ms ({predicted / measured - 1:+.0%})")
        errors = [abs(r[4] / r[5] - 1) for r in rows]
        click.echo(f"cost model error on {len(rows)} held-out points: mean {sum(errors) / len(errors):.1%}, "
                   f"max {max(errors):.1%}")


@main.command()
@config_option
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model to plan for.")
@click.option("--model-config", default=None,
              help="Plan offline from a config alone, no weights (needs --cluster): a built-in name (opt-30b, "
                   "opt-66b, bloom-176b, llama-3-8b, llama-3-70b) or a config.json; quality is then a prior.")
@click.option("--host", "host_specs", multiple=True,
              help="NAME=MEMORY[@PROFILE.json], once per host (default profile: this device's).")
@click.option("--cluster", "cluster_file", default=None, type=click.Path(dir_okay=False),
              help="A cluster file (examples/clusters/*.toml) instead of --host: hosts by device kind, with "
                   "predicted profiles, and the workload unless given here.")
@click.option("--device", default="cpu", show_default=True, help="Device profiled for hosts without @PROFILE.")
@click.option("--link-gbps", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Bandwidth of the links between stages.")
@click.option("--prompt", default=256, show_default=True, type=click.IntRange(1), help="Workload prompt tokens.")
@click.option("--output", default=128, show_default=True, type=click.IntRange(1), help="Workload output tokens.")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(1), help="Requests served together.")
@click.option("--max-ppl-increase", default="2%", show_default=True, help="Quality target: most perplexity increase.")
@click.option("--precisions", default=None,
              help="Comma-separated precisions the plan may use, e.g. native,int8 (default: all the hosts run).")
@click.option("--max-orders", default=None, type=click.IntRange(0),
              help="Most distinct host orders (of every subset of the hosts) searched exactly (default 120); past "
                   "it, only all hosts by memory, largest first, and the reverse, and the plan states its gap to "
                   "an order-free lower bound.")
@click.option("--layer-group", default=1, show_default=True, type=click.IntRange(1),
              help="Plan in groups of this many consecutive layers (one host and precision each): a smaller, "
                   "coarser search.")
@click.option("--calibration-tokens", default=512, show_default=True, type=click.IntRange(16),
              help="Tokens of calibration text for layer sensitivity and --verify.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write the plan here (JSON).")
@click.option("--verify", is_flag=True, help="Measure the planned precisions' perplexity.")
@click.option("--show", default=None, type=click.Path(dir_okay=False),
              help="Draw the plan into this PNG (needs matplotlib).")
@click.pass_context
def plan(ctx, model, model_config, host_specs, cluster_file, device, link_gbps, prompt, output, batch, max_ppl_increase,
         precisions, max_orders, layer_group, calibration_tokens, out, verify, show):
    """Plan layers, precisions and micro-batch sizes for hosts under a quality target."""
    from dataclasses import replace
    from pathlib import Path

    from .model.precision import PRECISIONS
    from .plan.grouping import make_grouped_plan
    from .plan.planner import PlanningError, Workload
    from .plan.quality import measure_ppl

    if bool(host_specs) == bool(cluster_file):
        raise click.UsageError("give the hosts with --host (once per host) or --cluster FILE, one of the two")
    if model_config and not cluster_file:
        raise click.UsageError("--model-config plans for device kinds: give the hosts with --cluster")
    if model_config and (verify or model != DEFAULT_MODEL):
        raise click.UsageError("--model-config plans without weights: --model and --verify need a model's weights")
    allowed = [p.strip() for p in precisions.split(",")] if precisions else None
    if allowed and (set(allowed) - set(PRECISIONS) or "native" not in allowed):
        raise click.BadParameter(f"{precisions!r}: give native and any of {', '.join(PRECISIONS[1:])}",
                                 param_hint="--precisions")
    target = parse_fraction(max_ppl_increase)
    if cluster_file:
        inputs = cluster_plan_inputs(ctx, cluster_file, model, model_config, allowed, calibration_tokens,
                                     dict(prompt=prompt, output=output, batch=batch))
    else:
        inputs = host_plan_inputs(model, host_specs, device, link_gbps, calibration_tokens, allowed,
                                  dict(prompt=prompt, output=output, batch=batch))
    name, hosts, sens, workload, allowed, notes, prior = inputs
    if layer_group > 1:
        notes = notes + [f"search: layers planned in groups of {layer_group} (--layer-group)"]
    if max_orders is not None:
        notes = notes + [f"search: at most {max_orders} host orders searched exactly, else all hosts by memory "
                         "and the reverse (--max-orders)"]
    workload = Workload(workload["prompt"], workload["output"], workload["batch"])
    try:
        result = make_grouped_plan(name, hosts, sens, workload, target, allowed, layer_group, max_orders)
    except (PlanningError, ValueError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    result = replace(result, notes=notes + result.notes)
    click.echo(f"plan for {name} ({result.dtype}; {workload.batch} requests of {workload.prompt_tokens} prompt + "
               f"{workload.output_tokens} output tokens): {len(result.stages)} stages, prefill micro-batch "
               f"{result.prefill_microbatch}, decode micro-batch {result.decode_microbatch}, solved in "
               f"{result.solve_seconds:.2f} s")
    for s in result.stages:
        mix = ", ".join(f"{s.precisions.count(p)} {p}" for p in dict.fromkeys(s.precisions))
        click.echo(f"  {s.host}: layers {s.start}-{s.end - 1} ({mix}); prefill {s.prefill_ms:.1f} ms, decode "
                   f"{s.decode_ms:.1f} ms per micro-batch; {s.memory_bytes / 2**20:.0f} of {s.capacity_bytes / 2**20:.0f} MiB")
    if prior:
        click.echo(f"perplexity: predicted +{result.predicted_ppl - 1:.2%} (target +{target:.1%}), from a prior, "
                   "not measured")
    else:
        click.echo(f"perplexity: base {result.base_ppl:.3f}, predicted {result.predicted_ppl:.3f} "
                   f"(target +{target:.1%}: at most {result.base_ppl * (1 + target):.3f})")
    click.echo(f"predicted throughput: {result.predicted_tokens_per_s:.1f} tokens/s")
    for baseline, speed in result.baselines.items():
        ratio = f"{result.predicted_tokens_per_s / speed:.2f}x" if speed else "does not fit"
        click.echo(f"  baseline {baseline}: {speed:.1f} tokens/s -> plan speed-up {ratio}")
    for note in result.notes:
        click.echo(f"note: {note}")
    if verify:
        files = resolve_model_or_exit(model)
        chosen = [p for s in result.stages for p in s.precisions]
        measured = measure_ppl(files.path, chosen, calibration_tokens)
        within = measured <= result.base_ppl * (1 + target)
        click.echo(f"verify: measured perplexity {measured:.3f} vs predicted {result.predicted_ppl:.3f} "
                   f"({'within' if within else 'OUTSIDE'} the target)")
    if out:
        result.save(Path(out))
        click.echo(f"wrote {out}")
    if show:
        from .plan.draw import draw_plan

        try:
            draw_plan(result, Path(show))
        except ImportError:
            click.echo("error: --show needs matplotlib: pip install matplotlib", err=True)
            sys.exit(1)
        click.echo(f"drew {show}")


def resolve_model_or_exit(model: str):
    from .model.resolve import ModelError, resolve_model

    try:
        return resolve_model(model)
    except ModelError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


def host_plan_inputs(model, host_specs, device, link_gbps, calibration_tokens, allowed, workload):
    """--host: profiles measured (this device's) or given; sensitivity measured on the model's weights."""
    from pathlib import Path

    from .plan.planner import HostInput
    from .plan.profile import DeviceProfile, cached_profile
    from .plan.quality import sensitivity

    files = resolve_model_or_exit(model)
    hosts, local = [], None
    for spec in host_specs:
        name, memory, profile_path = parse_host(spec)
        if profile_path:
            prof = DeviceProfile.load(Path(profile_path))
        else:
            local = local or cached_profile(files.path, device)[0]
            prof = local
        hosts.append(HostInput(name, memory, prof, link_gbps))
    quantized = sorted({p for h in hosts for p in h.profile.layer_bytes if p != "native" and p in (allowed or [p])})
    sens = sensitivity(files.path, quantized, calibration_tokens, device if device == "cpu" else "cpu")
    return model, hosts, sens, workload, allowed, [], False


def cluster_plan_inputs(ctx, cluster_file, model, model_config, allowed, calibration_tokens, given):
    """--cluster: profiles predicted for the device kinds; quality a prior (--model-config) or
    measured on the model's weights. The workload: the command line, else the file, else defaults."""
    from .model.precision import GPU_ONLY
    from .plan.cluster import ClusterError, load_cluster
    from .plan.model_shape import ModelConfigError, config_shape, load_model_config
    from .plan.offline import load_references, offline_hosts, speed_note
    from .plan.prior import PRIOR_NOTE, depth_prior, source_sensitivity
    from .plan.quality import sensitivity

    try:
        cluster = load_cluster(cluster_file)
        if model_config:
            name, config = load_model_config(model_config)
        else:
            files = resolve_model_or_exit(model)
            name, config = model, load_model_config(str(files.path))[1]
        shape = config_shape(name, config)
    except (ClusterError, ModelConfigError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    workload = {k: cluster.workload[k] if k in cluster.workload
                and ctx.get_parameter_source(k) is click.core.ParameterSource.DEFAULT else v for k, v in given.items()}
    hosts = offline_hosts(cluster, shape, load_references())
    run = sorted({p for h in hosts for p in h.profile.layer_bytes}, key=["native", "int8", "fp8", "int4"].index)
    allowed = [p for p in run if p in (allowed or run)]
    notes = [speed_note(cluster)]
    if model_config:
        sens = depth_prior(source_sensitivity(), shape.num_layers, allowed)
        notes = [f"model: {name} from its config alone, no weights"] + notes + [PRIOR_NOTE]
    else:
        # quanto's fp8 runs only on CUDA and sensitivity is measured on this CPU: fp8 is left out.
        allowed = [p for p in allowed if p not in GPU_ONLY]
        sens = sensitivity(files.path, [p for p in allowed if p != "native"], calibration_tokens, "cpu")
    return name, hosts, sens, workload, allowed, notes, bool(model_config)


@main.group()
def config():
    """Inspect settings."""


@config.command("show", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("command", type=click.Choice(["leader", "join", "up", "generate", "status", "bench"]))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def config_show(ctx, command, args):
    """Print COMMAND's effective settings and where each came from.

    ARGS are COMMAND's own options, e.g. `hetserve config show leader --config /etc/hetserve/leader.toml`.
    """
    cmd = main.commands[command]
    with cmd.make_context(command, list(args), parent=ctx.find_root()) as sub:
        rows = effective_settings(sub)
    width = max(len(name) for name, _, _ in rows)
    for name, value, where in rows:
        click.echo(f"{name.ljust(width)}  {json.dumps(value)!s:24}  {where}")


@main.command()
@click.argument("src", type=click.Path(exists=True, dir_okay=False))
@click.argument("dst", type=click.Path())
def convert(src, dst):
    """Convert a GGUF file SRC into a safetensors model directory DST (once; loads ~100x faster)."""
    from .model.resolve import ModelError, convert_gguf

    try:
        convert_gguf(Path(src), Path(dst))
    except ModelError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"wrote {dst}")


if __name__ == "__main__":
    main()


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", required=True, help="Whose keys: `leader`, or a host's name (files NAME.key, NAME.key_secret).")
def keygen(directory, name):
    """Make a CURVE key pair for --keys: NAME.key (public, to share) and NAME.key_secret (keep it here).

    On the leader: its leader.key_secret, and every host's public key in DIRECTORY/hosts/.
    On a host: its own NAME.key_secret and the leader's leader.key."""
    from .transport.security import keygen as make_keys

    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise click.BadParameter("use letters, digits, '.', '_' or '-'", param_hint="--name")
    public, secret = make_keys(Path(directory), name)
    click.echo(f"public key: {public} (give it to the peers)\nsecret key: {secret} (keep it here, mode 0600)")
