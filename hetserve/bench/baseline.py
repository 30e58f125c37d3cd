"""The same requests through transformers `generate` in this process: the baseline hetserve is measured against.

Requests go in batches of the benchmark's concurrency, left-padded, one batch after the other:
static batching, which is what `generate` does. A batch runs until its longest request is done;
each request is counted only up to its own `max_tokens` and its first end-of-sequence token,
exactly what hetserve would have sent for it. Every decoding step is timed through a streamer, so
each request gets the same timings as over the line protocol (first token, last token) and
stats.summarize works on both alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .load import WARMUP_TOKENS, LoadResult
from .stats import RequestResult
from .workload import RequestSpec


@dataclass(frozen=True)
class BaselineSpec:
    model_dir: Path
    device: str  # cpu, cuda, cuda:N
    dtype: str  # float32 | float16 | bfloat16
    temperature: float = 0.0
    threads: int | None = None  # torch CPU threads; None = torch's default
    precision: str = "native"  # decoder layers quantized by quanto as a stage quantizes them (model/precision.py)


def check_device(device: str) -> None:
    """ValueError unless torch can run on `device` here: checked before the load, not after it."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device like cpu, cuda or cuda:1") from None
    kind = parsed.type
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA device for the baseline")
    if kind == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: the baseline runs on cpu or cuda")


def row_lengths(generated: list[list[int]], eos_ids: set[int], max_tokens: list[int]) -> list[tuple[int, bool]]:
    """Per row: tokens that count (up to its own limit, through its first EOS) and whether EOS ended it."""
    out = []
    for row, limit in zip(generated, max_tokens):
        row = row[:limit]
        stop = next((i for i, token in enumerate(row) if token in eos_ids), None)
        out.append((len(row), False) if stop is None else (stop + 1, True))
    return out


class _StepClock:
    """A `generate` streamer that only notes when each decoding step's tokens exist."""

    def __init__(self):
        self.prompt_seen = False
        self.stamps: list[float] = []

    def put(self, value) -> None:
        if self.prompt_seen:
            self.stamps.append(time.perf_counter())
        self.prompt_seen = True  # the first call hands over the prompt ids

    def end(self) -> None:
        pass


def _eos_ids(model, tokenizer) -> set[int]:
    # What generate stops on, and what hetserve's leader stops on (leader/tokens.py).
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class HFBaseline:
    """transformers on `spec.device`, loaded and warmed up on creation; `run` times a list of requests."""

    def __init__(self, spec: BaselineSpec, warmup_prompt: str, warmup_rows: int = 1):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the benchmark's own bar is the one to watch
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.spec, self.torch = spec, torch
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=getattr(torch, spec.dtype))
        self.model = model.to(spec.device).eval()
        if spec.precision != "native":
            from ..model.precision import apply_precisions

            layers = self.model.model.layers
            apply_precisions(layers, [spec.precision] * len(layers), torch.device(spec.device))
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        # Only the sampling asked for: a model's own generation_config may add work hetserve does
        # not do (a repetition penalty, n-gram bans, a minimum length), and other text.
        own = self.model.generation_config
        self.model.generation_config = GenerationConfig(bos_token_id=own.bos_token_id, eos_token_id=own.eos_token_id,
                                                        pad_token_id=own.pad_token_id)
        self.sampling = ({"do_sample": True, "temperature": spec.temperature, "top_p": 1.0, "top_k": 0}
                         if spec.temperature > 0 else {"do_sample": False})
        # Untimed, at the batch the run uses: the first call of a shape pays one-off costs (kernel
        # choices, allocations) that a short run's few batches would otherwise carry.
        self._generate([RequestSpec(warmup_prompt, WARMUP_TOKENS)] * warmup_rows, None)

    def _generate(self, batch: list[RequestSpec], clock: _StepClock | None) -> tuple[list[list[int]], list[int]]:
        enc = self.tokenizer([r.prompt for r in batch], return_tensors="pt", padding=True).to(self.spec.device)
        with self.torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=max(r.max_tokens for r in batch),
                                      pad_token_id=self.tokenizer.pad_token_id, streamer=clock, **self.sampling)
        return out[:, enc["input_ids"].shape[1]:].tolist(), enc["attention_mask"].sum(dim=1).tolist()

    def run(self, requests: list[tuple[int, RequestSpec]], batch_size: int,
            on_result: Callable[[RequestResult], None] = lambda r: None) -> LoadResult:
        """Generate every (index, request), `batch_size` per `generate` call (the benchmark's concurrency).

        Times are on one clock that runs only inside `generate` calls.
        """
        results: list[RequestResult] = []
        elapsed = 0.0
        for start in range(0, len(requests), batch_size):
            batch = requests[start:start + batch_size]
            clock = _StepClock()
            began = time.perf_counter()
            generated, prompt_tokens = self._generate([r for _, r in batch], clock)
            took = time.perf_counter() - began
            lengths = row_lengths(generated, self.eos_ids, [r.max_tokens for _, r in batch])
            for (index, _), (n, stopped), prompt in zip(batch, lengths, prompt_tokens):
                first, last = clock.stamps[0] - began, clock.stamps[n - 1] - began
                result = RequestResult(index, elapsed, elapsed + first, elapsed + last, elapsed + last, n, prompt,
                                       "stop" if stopped else "length")
                results.append(result)
                on_result(result)
            elapsed += took
        return LoadResult(results, elapsed)
