"""Linear layers on a CPU: each product runs one of three ways to compute it, chosen by its shape.

Why: torch computes `F.linear(x, W)` (x [M, K], W [N, K]) on a CPU with MKL's sgemm, and with few
rows (a decode step) that call can be far from what the CPU can do. On the development machine
(AMD EPYC, 2 threads, MKL 2024.2) SmolLM2's lm_head (N = 49152, K = 576) took 9.5 ms at 1 row
(single-threaded GEMV, 12 GB/s), 22 ms at 2 rows and 16 ms at 4, where the same product computed
as (W @ x^T)^T took 2.9 / 3.1 / 4.5 ms and oneDNN's linear on the same weights 3.7 / 5.0 / 5.5 ms;
a whole fp32 decode step with oneDNN's way was 1.47x faster at batch 1, 2.02x at batch 2 and
1.40x at batch 8, with each product the way measured fastest 1.88x / 2.88x / 1.46x
(docs/benchmarks.md, benchmarks/cpu_linear.py).
Stages run a rule of the shape (rule_way: transposed for a small float32 x, oneDNN's otherwise),
not the fastest measured: a choice measured in each process differs between processes (timing
noise, and the turns taken while choosing), and the ways differ in fp32 rounding, which in a
quantized plan was enough to change greedy tokens between a served pipeline and the same plan in
one process (tests/test_planner.py failed so). A rule computes a product the same way everywhere;
on the development machine it was within 7 % of the measured choice at batch 1-4 (1.39x
oneDNN-only at batch 1). oneDNN was at least as fast as torch's call for every product measured
here (SmolLM2 and Llama-3-8B shapes, 1-512 rows) and the fastest at Llama-3-8B's. `pin(None)`
turns measuring on (benchmarks/cpu_linear.py): the first calls of each (shape, dtype, row bucket)
try the ways in turn on the real weights (every layer's call is a sample) and once each has
SAMPLES timings the one of lowest median serves. The ways:
  - "mkl": torch's own F.linear (the reference; always available);
  - "onednn": oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`, what Inductor calls) on the
    plain weight tensor, no packed copy (packing would double the weights' memory);
  - "transposed": (W @ x^T)^T by torch.mm, x padded to two rows (one row would take the GEMV path).
They differ only in summation order (fp32 rounding).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SAMPLES = 6  # timed calls of each way before one is chosen for a (shape, dtype, rows) bucket
MAX_BUCKET = 4096  # rows past this share the largest bucket


def mkl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def transposed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] -> [M, N] as (W @ x^T)^T: BLAS sees the many weight rows as its M dimension."""
    rows = x.shape[0]
    if rows == 1:
        x = torch.cat((x, x))
    xt = x.t()  # [K, M'], a view
    out = torch.mm(weight, xt) if bias is None else torch.addmm(bias.unsqueeze(1), weight, xt)  # [N, M']
    return out.t()[:rows].contiguous()


WAYS = {"mkl": mkl, "onednn": onednn, "transposed": transposed}
UNAVAILABLE = (RuntimeError, AttributeError, NotImplementedError)  # a way missing from this build, or for this dtype


def bucket(rows: int) -> int:
    """Rows -> the power of two at or above them (at most MAX_BUCKET; 0 for none): products of
    similar size share one choice."""
    return min(MAX_BUCKET, 1 << (rows - 1).bit_length()) if rows else 0


@dataclass
class Selector:
    """The choice for one (shape, dtype, row bucket): which way the next call takes and, once
    every way has SAMPLES timings, the fastest. Pure bookkeeping: callers time the calls."""

    ways: list[str]
    samples: dict[str, list[float]] = field(default_factory=dict)
    chosen: str | None = None

    def next_way(self) -> str:
        if self.chosen is not None:
            return self.chosen
        return min(self.ways, key=lambda w: len(self.samples.get(w, ())))  # round robin over the ways

    def record(self, way: str, seconds: float) -> None:
        self.samples.setdefault(way, []).append(seconds)
        if all(len(self.samples.get(w, ())) >= SAMPLES for w in self.ways):
            self.chosen = min(self.ways, key=lambda w: statistics.median(self.samples[w]))

    def drop(self, way: str) -> None:
        """A way that failed on this product (e.g. an op missing from this torch build)."""
        self.ways.remove(way)
        self.samples.pop(way, None)
        if len(self.ways) == 1:
            self.chosen = self.ways[0]


_SELECTORS: dict[tuple, Selector] = {}  # (out, in, dtype, bias, bucket) -> its selector, per process
DEFAULT_WAY = "onednn" if torch.backends.mkldnn.is_available() else "mkl"
SMALL_X = 3072  # values of x (rows x in_features) up to which a float32 product runs transposed (rule_way)
RULE = "rule"  # pin(RULE): each product the way rule_way gives, what stages run
_PINNED: str | None = RULE  # RULE, a way every product takes, or None: the way measured fastest


def rule_way(rows: int, in_features: int, dtype: torch.dtype) -> str:
    """The way a stage's product takes: transposed where x is small (float32, rows x in_features <=
    SMALL_X: SmolLM2's products of K = 576 at 1-4 rows and K = 1536 at 1-2), oneDNN's otherwise.
    Fixed by the shape, never by timing, so every process computes a product the same way. Where
    SMALL_X comes from (2 threads of the development machine's AMD EPYC, benchmarks/cpu_linear.py,
    docs/benchmarks.md): with x that small the transposed way was the fastest of the three for
    every SmolLM2 product, 1.3-1.9x oneDNN's at 1-2 rows, and at the first row counts past it
    (K = 1536 at 4 rows, K = 576 at 8; Llama-3-8B's K = 4096 at 1) oneDNN's was as fast or faster.
    bf16 products stay with oneDNN (torch sends them there anyway)."""
    if dtype == torch.float32 and rows * in_features <= SMALL_X:
        return "transposed"
    return DEFAULT_WAY


def transpose_up_to(values: int) -> None:
    """Set SMALL_X for this process (`hetserve join --cpu-transposed-up-to`): a CPU whose crossover
    lies elsewhere (benchmarks/cpu_linear.py shows it); 0 sends every product to oneDNN."""
    global SMALL_X
    if values < 0:
        raise ValueError(f"values must be >= 0, not {values}")
    SMALL_X = values


def pin(way: str | None) -> None:
    """Run every product `way` from now on, RULE (rule_way, the default), or (None) the way measured
    fastest: for benchmarks."""
    global _PINNED
    if way is not None and way != RULE and way not in WAYS:
        raise ValueError(f"unknown way {way!r}: {RULE!r} or one of {sorted(WAYS)}")
    _PINNED = way


def choices() -> dict[str, str]:
    """What each bucket settled on, e.g. {"576x1536 float32 rows<=4": "transposed"}."""
    return {f"{n}x{k} {str(dtype).removeprefix('torch.')}{' +bias' if b else ''} rows<={r}": s.chosen
            for (n, k, dtype, b, r), s in _SELECTORS.items() if s.chosen is not None}


class CpuLinear(torch.nn.Linear):
    """nn.Linear whose product runs the pinned way, or the way measured fastest for its shape and
    rows. Stages make their plain CPU linears this class in place (`adopt`), so every holder of the
    module keeps it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # [M, K]
        if _PINNED is not None:
            way = rule_way(flat.shape[0], self.in_features, self.weight.dtype) if _PINNED == RULE else _PINNED
            try:
                out = WAYS[way](flat, self.weight, self.bias)
            except UNAVAILABLE:  # e.g. oneDNN without this dtype: torch's call serves
                out = F.linear(flat, self.weight, self.bias)
            return out.view(*x.shape[:-1], self.out_features)
        key = (self.out_features, self.in_features, self.weight.dtype, self.bias is not None, bucket(flat.shape[0]))
        selector = _SELECTORS.get(key)
        if selector is None:
            ways = [w for w in WAYS if w != "onednn" or torch.backends.mkldnn.is_available()]
            selector = _SELECTORS[key] = Selector(ways)
        way = selector.next_way()
        if selector.chosen is not None:
            out = WAYS[way](flat, self.weight, self.bias)
        else:
            out = self._timed(selector, way, flat)
        return out.view(*x.shape[:-1], self.out_features)

    def _timed(self, selector: Selector, way: str, flat: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        try:
            out = WAYS[way](flat, self.weight, self.bias)
        except UNAVAILABLE as exc:
            log.info("%s cannot compute a %dx%d %s product here (%s); not used for it", way, self.out_features,
                     self.in_features, self.weight.dtype, exc)
            selector.drop(way)
            return F.linear(flat, self.weight, self.bias)
        selector.record(way, time.perf_counter() - start)
        if selector.chosen is not None:
            medians = {w: round(statistics.median(t) * 1000, 3) for w, t in selector.samples.items()}
            log.debug("%dx%d %s products of <= %d rows: %s (median ms %s)", self.out_features, self.in_features,
                      self.weight.dtype, bucket(flat.shape[0]), selector.chosen, medians)
        return out


def adopt(modules) -> int:
    """Make every plain nn.Linear among `modules` a CpuLinear, in place (the same objects: fused
    projections and transformers' layers keep referring to them). Returns how many."""
    count = 0
    for module in modules:
        if type(module) is torch.nn.Linear and module.weight.device.type == "cpu":
            module.__class__ = CpuLinear
            count += 1
    return count
