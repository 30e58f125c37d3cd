"""Every message that crosses a ZeroMQ socket between hosts, as frozen typed dataclasses.

Control channel (leader ROUTER <-> host DEALER): Join, Refused, ProfileRequest, ProfileReport,
Assign, Ready, Failed, Heartbeat, Shutdown. Data path (PUSH -> PULL, leader -> stage 0 -> ... -> last stage -> leader):
a `Step` header frame followed by one raw tensor frame; `StepResult` from the last stage; a
`StepFailed` travels the rest of the pipeline in place of a step that a stage could not run.
"""

from __future__ import annotations

from dataclasses import field

from ..plan.device_profile import DeviceProfile
from .codec import message

PROTOCOL_VERSION = 1


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


# ---- control: host -> leader

@message("join")
class Join:
    host: str  # unique host name
    inventory: Inventory
    data_addr: str  # tcp://ADDR:PORT where this host receives micro-batches from upstream
    version: int = PROTOCOL_VERSION


@message("ready")
class Ready:
    host: str
    stage: int
    weight_bytes: int
    kv_bytes: int
    load_seconds: float


@message("failed")
class Failed:
    host: str
    reason: str


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
    input_scales: list[dict[str, float]] = field(default_factory=list)  # per layer: w8a8 activation scales, else {}


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
    tensor: TensorMeta  # token ids [B, T] int64 into stage 0, hidden [B, T, H] after
    stage_ms: list[float] = field(default_factory=list)  # compute time of each stage so far


@message("step_result")
class StepResult:
    mb: int
    tokens: list[int]  # one sampled id per row [B]
    stage_ms: list[float]


@message("step_failed")
class StepFailed:
    mb: int
    stage: int
    error: str
