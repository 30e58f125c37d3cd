"""Every message that crosses a ZeroMQ socket between hosts, as frozen typed dataclasses.

Control channel (leader ROUTER <-> host DEALER): Join, Refused, Probe, ProbeReply, ProfileRequest,
ProfileReport, Assign, Ready, Failed, Heartbeat, Release, Shutdown.
Weights channel (leader ROUTER <-> host DEALER, hetserve/weights/): GetManifest -> Manifest;
FetchStart; GetChunk -> a `Chunk` header frame followed by one raw bytes frame. Data path (PUSH -> PULL, leader -> stage 0 -> ... -> last stage -> leader):
a `Step` header frame followed by one raw tensor frame; `StepResult` from the last stage; a
`StepFailed` travels the rest of the pipeline in place of a step that a stage could not run.
"""

from __future__ import annotations

from dataclasses import field

from ..plan.device_profile import DeviceProfile
from .codec import message

PROTOCOL_VERSION = 4  # 2: Step.feeds (decode-ahead); 3: Failed.epoch; 4: hidden states packed [tokens, H].
#                      Hosts of another version are refused at join


@message("inventory")
class Inventory:
    device: str  # "cpu", "cuda:0", ...
    kind: str  # "cpu" | "cuda"
    name: str  # CPU model or GPU name
    total_bytes: int  # device memory (host RAM for cpu)
    free_bytes: int  # free now
    usable_bytes: int  # what the host offers: min(free, --memory)
    gflops: float  # quick measured fp32 matmul speed
    threads: int  # CPU threads the host computes with
    disk_free_bytes: int = -1  # room for streamed weights in its cache; -1 = it has its own copy (--model)
    cached_weights: dict[str, int] = field(default_factory=dict)  # model hash -> bytes already cached


# ---- control: host -> leader

@message("join")
class Join:
    host: str  # unique host name
    inventory: Inventory
    data_addr: str  # tcp://ADDR:PORT where this host receives micro-batches from upstream
    version: int = PROTOCOL_VERSION
    current: Assign | None = None  # the slice it still holds when rejoining (a leader restart can adopt it)
    public_key: str = ""  # its CURVE key (z85) when the cluster runs with --keys; must be the one it connected with


@message("ready")
class Ready:
    host: str
    stage: int
    weight_bytes: int
    kv_bytes: int
    load_seconds: float
    fetched_bytes: int = 0  # weights streamed from the leader for this slice (0 = all were here)
    epoch: int = 0  # of the Assign it answers
    flat_tokens: int = 0  # most tokens of a micro-batch it runs one row per token, each row at its own
    #                       length (GPU graphs); 0 = it pads rows to the longest (no mixed micro-batches)


@message("failed")
class Failed:
    host: str
    reason: str
    epoch: int = -1  # of the Assign whose slice or stage failed; -1: not a slice's (profiling)


@message("stage_stats")
class StageStats:
    steps: int = 0  # micro-batches computed
    tokens: int = 0  # tokens (rows x new tokens) computed
    busy_seconds: float = 0.0  # time spent computing
    prefill_ms: float = 0.0  # mean compute time of a prefill micro-batch
    decode_ms: float = 0.0  # mean compute time of a decode micro-batch


@message("heartbeat")
class Heartbeat:
    host: str
    stats: StageStats = field(default_factory=StageStats)


@message("probe_reply")
class ProbeReply:
    host: str
    nonce: int


@message("profile_report")
class ProfileReport:
    host: str
    profile: DeviceProfile


# ---- control: leader -> host

@message("profile_request")
class ProfileRequest:
    """Measure (or load the cached) profile of this model on the host's device; the leader plans."""

    model: str
    dtype: str
    model_hash: str = ""  # as in Assign: a host without the model fetches what profiling needs
    weights_addr: str = ""
    budget_s: float = 0.0  # measuring may take about this long; precisions past it are left out


@message("probe")
class Probe:
    """Answered at once with ProbeReply: the leader times round trips to measure the link."""

    nonce: int
    payload: bytes = b""  # a few MiB when measuring bandwidth


@message("alive")
class Alive:
    """The leader's heartbeat to each host; a host that hears nothing for a while rejoins."""


@message("refused")
class Refused:
    reason: str


@message("assign")
class Assign:
    stage: int
    num_stages: int
    start: int  # first decoder layer, inclusive
    end: int  # last decoder layer, exclusive
    model: str  # model spec the host resolves locally
    num_layers: int  # the model's layer count as the leader sees it (a cross-check)
    dtype: str
    max_seqs: int
    max_context: int
    downstream: str  # next stage's data address, or the leader's result address
    precisions: list[str] = field(default_factory=list)  # per layer of the slice; [] = all native
    model_hash: str = ""  # the leader's manifest hash: the weights the host must load
    weights_addr: str = ""  # the leader's weights socket, where the host fetches what it lacks
    epoch: int = 0  # pipeline generation: stages drop micro-batches of another epoch
    upstream_key: str = ""  # CURVE: the only key allowed to push into this host's data socket
    downstream_key: str = ""  # CURVE: the key the next stage (or the leader's results socket) must hold
    input_scales: list[dict[str, float]] = field(default_factory=list)  # per layer: w8a8 activation scales, else {}


@message("release")
class Release:
    """Drop the slice held (weights, KV cache, stage loop): a new layout left this host out. Its
    memory is free for the next Assign, and a leader that restarts is not offered the old slice.
    (A host of before this message logs it as malformed and keeps its slice, as it used to.)"""

    reason: str


@message("shutdown")
class Shutdown:
    reason: str


# ---- data path

@message("tensor_meta")
class TensorMeta:
    dtype: str
    shape: list[int]


@message("sampling_rows")
class SamplingRows:
    """Per-row sampling parameters (lists of length B), applied by the last stage."""

    temperature: list[float]  # 0 = greedy
    top_k: list[int]  # 0 = off
    top_p: list[float]  # 1.0 = off
    seed: list[int]
    step: list[int]  # index of the token being generated (0 for the first)


@message("step")
class Step:
    mb: int  # micro-batch id, unique per leader run
    phase: str  # "prefill" | "decode"
    slots: list[int]  # KV slot per row [B]
    starts: list[int]  # tokens already cached per row [B]
    lengths: list[int]  # new tokens per row [B]; rows right-padded to max(lengths)
    sampling: SamplingRows
    # token ids [B, T] int64 into stage 0; after it the real tokens' hidden states [sum(lengths), H]
    tensor: TensorMeta
    stage_ms: list[float] = field(default_factory=list)  # compute time of each stage so far
    epoch: int = 0  # the pipeline it was sent into (Assign.epoch)
    # Rows whose token id is the one their slot sampled last on this stage, still on its way to
    # the leader (decode-ahead: a stage that is first and last keeps them; their ids are 0 here).
    feeds: list[int] = field(default_factory=list)


@message("step_result")
class StepResult:
    mb: int
    tokens: list[int]  # one sampled id per row [B]
    stage_ms: list[float]
    epoch: int = 0


@message("step_failed")
class StepFailed:
    mb: int
    stage: int
    error: str
    epoch: int = 0


# ---- weights (leader ROUTER <-> host DEALER)

@message("manifest_entry")
class ManifestEntry:
    """One fetchable item: a tensor (raw little-endian data as stored) or a small file."""

    name: str  # tensor name, or a file name such as config.json
    kind: str  # "tensor" | "file"
    size: int  # bytes of data
    sha256: str  # hex digest of those bytes
    dtype: str = ""  # safetensors dtype (F32, BF16, ...) of a tensor
    shape: list[int] = field(default_factory=list)


@message("manifest")
class Manifest:
    model_hash: str  # sha256 over the entries (weights/manifest.py: model_hash)
    entries: list[ManifestEntry]


@message("get_manifest")
class GetManifest:
    host: str


@message("fetch_start")
class FetchStart:
    """The host is about to fetch this much (for the leader's progress bar and log)."""

    host: str
    entries: int
    total_bytes: int


@message("get_chunk")
class GetChunk:
    host: str
    name: str  # a manifest entry
    offset: int
    length: int


@message("chunk")
class Chunk:
    """Header of a reply to GetChunk; the bytes follow as the next frame. `error` set = no bytes."""

    name: str
    offset: int
    length: int
    error: str = ""
