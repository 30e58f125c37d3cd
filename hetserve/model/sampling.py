"""Turn last-position logits into token ids: greedy, temperature, top-k, top-p, seeded.

Sampling is stateless: the random stream of a row is seeded from (request seed, index of the
token being generated), so a row draws the same numbers whatever else shares the batch, and a
request replayed from its history draws as it would have (on the same kind of device: CPU and
CUDA generators draw differently from one seed). The logits themselves can differ in
their last bits with the batch (a CPU picks its matrix-product kernel by rows; a replay
re-prefills what was decoded), so a draw that falls on a near-tie can still differ, rarely.
"""

from __future__ import annotations

import torch

from ..wire.messages import SamplingRows

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, step) over the seed space
GREEDY_BELOW = 1e-5  # temperatures this small sample greedily (dividing by them overflows to NaN)


def row_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    mixed = (seed * _MIX + step) % (1 << 64)
    # Folded into the low 32 bits, which are all a CPU generator (mt19937) takes: seeds 2**32 apart
    # drew the same numbers there.
    generator.manual_seed((mixed ^ (mixed >> 32)) % (1 << 63))
    return generator


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [V] -> logits [V] with everything outside top-k / the top-p nucleus at -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop a token when the tokens before it already cover top_p; the first always stays.
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, rows: SamplingRows | None) -> torch.Tensor:
    """logits [B, V] float32 -> token ids [B] int64."""
    ids = logits.argmax(dim=-1)
    if rows is None:
        return ids
    for b, temperature in enumerate(rows.temperature):
        if temperature < GREEDY_BELOW:
            continue
        row = filter_logits(logits[b] / temperature, rows.top_k[b], rows.top_p[b])
        # An inf or NaN logit (a float16 overflow, say) makes NaN probabilities, on which
        # multinomial fails the whole micro-batch, and on a GPU asserts on the device, which leaves
        # the process's CUDA context unusable. Non-finite probabilities count as 0 and the greedy
        # token gets a mass too small to move any other draw (~1e-30 against at least 1/V), so such
        # a row falls back to the greedy token, with no host sync to check for it.
        probs = torch.nan_to_num(torch.softmax(row, dim=-1), nan=0.0, posinf=0.0, neginf=0.0)
        probs[ids[b]] += 1e-30
        generator = row_generator(rows.seed[b], rows.step[b], logits.device)
        ids[b] = torch.multinomial(probs, 1, generator=generator)[0]
    return ids
