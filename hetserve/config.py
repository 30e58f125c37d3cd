"""Settings of the leader and the hosts: frozen dataclasses, every default explained beside it."""

from __future__ import annotations

from dataclasses import dataclass

from .model.resolve import DEFAULT_MODEL

DEFAULT_LISTEN = "0.0.0.0:5555"  # where hosts join (control channel)
DEFAULT_SERVE = "127.0.0.1:5556"  # client line protocol; loopback unless the operator says otherwise
MAX_LINE_BYTES = 1 << 20  # longest client line (1 MiB), newline excluded
MAX_REQUESTS_PER_CONNECTION = 256  # running on one client connection; more get `overloaded`
MAX_AUTH_FAILURES = 3  # wrong tokens on one connection before it is closed
MAX_UNSENT_REPLY_BYTES = 32 << 20  # replies queued for a client that does not read them; past this
#                                   the connection is closed (its requests cancelled), not the leader's memory filled
STEP_TIMEOUT_S = 120.0  # a micro-batch not back by then fails its requests (a stage lost it)
DECODE_AHEAD = ("auto", "on", "off")  # Limits.decode_ahead
MAX_MESSAGE_BYTES = 256 << 20  # MAXMSGSIZE on every ZeroMQ socket: the hidden states of a micro-batch
#                               (its real tokens x hidden x 4 bytes, padding not sent) fit with room to spare


class SettingsError(ValueError):
    """A setting that cannot work however often the daemon restarts (a daemon exits 2 on it, which
    systemd's units and `hetserve up` do not restart)."""


@dataclass(frozen=True)
class Limits:
    """What a running cluster accepts and how it batches. The same for every stage."""

    max_seqs: int = 8  # requests running at once: KV-cache slots on every stage
    max_context: int = 2048  # prompt + completion tokens of one request (KV length per slot)
    default_max_tokens: int = 128  # completion length when a request does not say
    max_queued: int = 256  # requests waiting for a slot; past that new ones get `overloaded`
    max_queued_tokens: int = 262144  # prompt tokens of the requests waiting for a slot, in all
    prefill_seqs: int = 4  # most requests in one prefill micro-batch
    prefill_tokens: int = 512  # most prompt tokens in one prefill micro-batch (longer prompts
    #                            are prefilled in chunks so decode keeps flowing between them;
    #                            while requests decode, the leader may choose smaller chunks)
    decode_seqs: int = 8  # most requests in one decode micro-batch
    max_in_flight: int = 0  # micro-batches in the pipeline at once; 0 = chosen at runtime from measured
    #                          stage times (leader/batching.py), from one per stage up
    decode_ahead: str = "auto"  # one-stage pipelines: send a request's next decode step before its
    #                             token is back (the stage feeds it the token it sampled), so the
    #                             stage never waits on the leader between steps; a request that
    #                             ends on EOS costs one wasted row, on a stop string two. "auto":
    #                             where the stage is a GPU (it computes queued work while the
    #                             host's threads are free; a CPU stage computes with every core,
    #                             and work beside it cost SmolLM2 11-18 % of its batch-8
    #                             throughput on 2 cores, docs/benchmarks.md);
    #                             "on"; "off"
    mixed_batches: bool = True  # decode rows ride in prefill micro-batches where every stage runs
    #                             rows at their own lengths (GPU stages from graphs): the prompt
    #                             tokens share the decode step's weight reads

    def check(self) -> None:
        for name in ("max_seqs", "max_context", "default_max_tokens", "max_queued", "max_queued_tokens",
                     "prefill_seqs", "prefill_tokens", "decode_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.decode_ahead not in DECODE_AHEAD:
            raise ValueError(f"decode_ahead must be one of {', '.join(DECODE_AHEAD)}")
        if self.max_in_flight < 0:
            raise ValueError("max_in_flight must be 0 (one per stage) or more")
        if self.default_max_tokens >= self.max_context:
            raise ValueError("default_max_tokens must be below max_context")


@dataclass(frozen=True)
class PlannerSettings:
    """Plan live from the joined hosts' profiles (`hetserve leader --max-ppl-increase`)."""

    max_ppl_increase: float  # hard quality target: 0.02 = perplexity at most 2 % above native
    prompt_tokens: int = 256  # workload the plan optimizes for
    output_tokens: int = 128
    batch: int = 8  # requests served together
    calibration_tokens: int = 512  # calibration text scored for layer sensitivity
    profile_budget_s: float = 300.0  # a host without a cached profile measures for about this
    #                                  long; precisions that would run past it are left out
    link_gbps: float = 10.0  # bandwidth between stages where the leader could not measure it
    save_to: str | None = None  # also write the plan here


@dataclass(frozen=True)
class LeaderSettings:
    listen: str = DEFAULT_LISTEN
    serve: str = DEFAULT_SERVE
    http: str | None = None  # HOST:PORT of the OpenAI-compatible HTTP API and /metrics; None = off
    model: str = DEFAULT_MODEL
    hosts: int = 1  # hosts to wait for before planning
    dtype: str = "float32"  # stage compute dtype; fp32 keeps CPU output identical to transformers
    advertise: str | None = None  # address hosts reach the leader's result socket at; None = the
    #                               leader's own address on the route to each host
    plan: str | None = None  # a plan file from `hetserve plan`; None = memory-proportional split
    planner: PlannerSettings | None = None  # plan live instead (hosts send their profiles)
    weights_rate: float = 0.0  # bytes/s for streaming weights to hosts, all together; 0 = no limit
    keys: str | None = None  # CURVE keys directory (transport/security.py); None = plain text
    insecure: bool = False  # allow plain text beyond loopback
    token: str | None = None  # clients must present it (line protocol `auth`, HTTP bearer); None =
    #                           no check, allowed only while the client ports are on loopback
    limits: Limits = Limits()


@dataclass(frozen=True)
class HostSettings:
    leader: str  # HOST:PORT of the leader's --listen
    device: str = "cpu"  # cpu | cuda | cuda:N
    memory: int | None = None  # bytes this host offers; None = what is free now
    advertise: str | None = None  # address other hosts reach this one at; None = this host's
    #                               address on the route to the leader
    name: str | None = None  # unique host name; None = hostname-pid
    threads: int | None = None  # torch CPU threads; None = torch's default
    model: str | None = None  # this host's own copy of the model, checked against the leader's
    #                           manifest; None = stream what the slice needs from the leader
    disk_limit: int | None = None  # most bytes the weights cache may hold; None = the free disk
    keys: str | None = None  # CURVE keys directory (transport/security.py); None = plain text
    insecure: bool = False  # allow plain text to a leader beyond loopback
    cuda_graphs: bool = True  # on a GPU, replay decode and prefill steps from CUDA graphs (model/static_steps.py)
    quanto_kernels: bool = False  # on a GPU, int8 / int4 layers keep quanto's matmuls (else model/weight_only.py's)
    cpu_transposed_up_to: int | None = None  # on a CPU, float32 products of x up to this many values run
    #                                           transposed (model/cpu_linear.py); None = its SMALL_X
