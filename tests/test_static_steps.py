"""Fixed-shape steps (what a CUDA graph replays) equal the dynamic path: decode with rows and
context padded, and prefill run as one row per prompt token.

Capture itself needs a GPU; on CPU the same fixed-shape step runs eagerly, so these tests check
everything a graph would replay: padding rows, the context bucket, the cache writes.
"""

from __future__ import annotations

import pytest
import torch

from hetserve.model.stage import StageModel, StageSpec
from hetserve.model.static_steps import (BATCH_BUCKETS, CONTEXT_STEP, MAX_GRAPH_TOKENS, BucketKey, batch_bucket,
                                         batch_buckets, context_bucket, token_bucket)

from conftest import PROMPTS


def test_buckets():
    assert batch_bucket(1, 8) == 1 and batch_bucket(3, 8) == 4 and batch_bucket(5, 6) == 6
    assert batch_bucket(9, 64) == 16 and all(b in BATCH_BUCKETS for b in (1, 2, 4, 8, 16, 32, 64))
    assert context_bucket(1, 2048) == CONTEXT_STEP and context_bucket(CONTEXT_STEP + 1, 2048) == 2 * CONTEXT_STEP
    assert context_bucket(2000, 1000) == 1000
    assert batch_buckets(6) == [1, 2, 4, 6] and batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert token_bucket(2) == 2 and token_bucket(129) == 192 and token_bucket(MAX_GRAPH_TOKENS) == MAX_GRAPH_TOKENS
    assert token_bucket(MAX_GRAPH_TOKENS + 1) is None


def pair(model_dir, first: bool, last: bool, start: int, end: int, slots: int = 6):
    spec = StageSpec(start, end, first=first, last=last, max_seqs=slots, max_context=600)
    return StageModel(model_dir, spec), StageModel(model_dir, spec)


def longs(values):
    return torch.tensor(values, dtype=torch.long)


@pytest.mark.parametrize("slots, buckets", [
    (16, [(4, 256, False, False), (4, 512, False, False)]),  # 3 rows of 16 slots: padded to 4 rows, K/V gathered
    (6, [(6, 256, True, False), (6, 512, True, False)]),  # 3 rows of 6 slots: one row per slot, K/V in place
])
def test_static_decode_equals_dynamic_with_padding_and_buckets(model_dir, reference, slots, buckets):
    """Three requests in scattered slots decode past a context bucket boundary (256): the fixed-
    shape step (rows padded, context padded to 256 then 512) gives the dynamic outputs."""
    dynamic, static = pair(model_dir, first=True, last=True, start=0, end=30, slots=slots)
    assert not static.static_steps.capture  # CPU: the fixed-shape step runs eagerly
    tok = reference.tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:2]] + [tok(" ".join(PROMPTS) * 8)["input_ids"][:250]]
    slots = [5, 1, 3]  # scattered, within 6 slots
    for model in (dynamic, static):
        for slot, ids in zip(slots, prompts):
            model.forward(longs([slot]), longs([0]), longs([len(ids)]), longs([ids]))
    starts = [len(p) for p in prompts]
    ids = [[p[-1]] for p in prompts]
    assert len(prompts[2]) == 250
    crossed = False
    for _ in range(10):
        want = dynamic.forward(longs(slots), longs(starts), longs([1, 1, 1]), longs(ids))
        got = static.decode(slots, starts, longs(ids))
        assert got.tolist() == want.tolist()
        crossed |= max(starts) + 1 > CONTEXT_STEP
        starts = [s + 1 for s in starts]
        ids = [[t] for t in got.tolist()]
    assert crossed
    assert sorted(static.static_steps.buckets) == buckets


def test_static_decode_of_a_middle_stage_matches_hidden_states(model_dir):
    """A middle stage (hidden states in and out): the fixed-shape step writes the same K/V and
    returns the same hidden states as the dynamic path."""
    dynamic, static = pair(model_dir, first=False, last=False, start=10, end=14)
    torch.manual_seed(0)
    prompt = torch.randn(2, 20, dynamic.hidden_size)
    for model in (dynamic, static):
        model.forward(longs([0, 2]), longs([0, 0]), longs([20, 13]), prompt)
    x = torch.randn(2, 1, dynamic.hidden_size)
    want = dynamic.forward(longs([0, 2]), longs([20, 13]), longs([1, 1]), x)
    got = static.decode([0, 2], [20, 13], x)
    # Within float32 rounding: the step runs one row per slot (6, not 2), so matmuls block differently.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for k_dyn, k_static in zip(dynamic.cache.keys, static.cache.keys):
        torch.testing.assert_close(k_static[:, :, :600], k_dyn[:, :, :600], rtol=1e-4, atol=1e-4)


def test_a_captured_step_keeps_no_autograd_graph(model_dir):
    """What a graph capture keeps (its output) must not hold an autograd graph: that would keep
    every activation and dequantized weight of the step alive with the graph."""
    model = StageModel(model_dir, StageSpec(0, 2, first=True, last=True, dtype="float32", max_seqs=4,
                                            max_context=64), "cpu")
    assert not any(p.requires_grad for m in (model.layers, model.embed, model.norm, model.lm_head)
                   for p in m.parameters())
    with torch.enable_grad():  # as warm_up runs: outside any no_grad of the caller
        out = model.static_step(longs([0]), longs([0]), longs([1]), torch.zeros(1, 1, dtype=torch.int64), 64)
    assert out.grad_fn is None and not out.requires_grad


def test_grouped_decode_attention_equals_sdpa_with_repeated_heads():
    """The GPU decode attention (query heads grouped per K/V head) equals transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from hetserve.model.attention import grouped_decode_attention

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    query, key, value = torch.randn(4, 9, 1, 16), torch.randn(4, 3, 40, 16), torch.randn(4, 3, 40, 16)
    mask = torch.arange(40)[None, None, None, :] <= torch.tensor([5, 39, 0, 17])[:, None, None, None]
    got, _ = grouped_decode_attention(module, query, key, value, mask, scaling=0.25)
    want, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert got.shape == want.shape == (4, 1, 9, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_falling_back_to_transformers_layers_decodes_the_same(model_dir):
    """use_transformers_layers (the host's fallback where compile or Triton fails) keeps serving:
    a middle stage's decode through transformers' layers equals the written-out layers'."""
    spec = StageSpec(10, 14, first=False, last=False, max_seqs=4, max_context=64)
    fused, fallback = StageModel(model_dir, spec), StageModel(model_dir, spec)
    fallback.use_transformers_layers()
    assert fused.decode_layers is not None and fallback.decode_layers is None
    torch.manual_seed(0)
    prompt, step = torch.randn(2, 9, fused.hidden_size), torch.randn(2, 1, fused.hidden_size)
    outs = []
    for model in (fused, fallback):
        model.forward(longs([1, 3]), longs([0, 0]), longs([9, 5]), prompt)
        outs.append(model.decode([1, 3], [9, 5], step))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("continued", [5, 1])
@pytest.mark.parametrize("first, last, start, end", [(True, False, 0, 6), (False, False, 10, 14), (False, True, 26, 30)])
def test_prefill_as_one_row_per_token_equals_forward(model_dir, first, last, start, end, continued):
    """A prefill micro-batch of three prompts, one continuing an earlier chunk by `continued`
    tokens (1: a decode row riding in a mixed micro-batch), run as one row per token (rows sharing
    slots, every K/V written before any row attends): the same hidden states or sampled tokens,
    and the same K/V, as forward(); padding positions come back zero."""
    dynamic, static = pair(model_dir, first=first, last=last, start=start, end=end)
    torch.manual_seed(0)
    vocab = dynamic.config.vocab_size

    def inputs(rows, steps):
        if first:
            return torch.randint(0, vocab, (rows, steps))
        return torch.randn(rows, steps, dynamic.hidden_size)

    earlier = inputs(1, 7)
    for model in (dynamic, static):
        model.forward(longs([4]), longs([0]), longs([7]), earlier)
    slots, starts, lengths = [4, 0, 2], [7, 0, 0], [continued, 9, 2]
    batch = inputs(3, 9)
    want = dynamic.forward(longs(slots), longs(starts), longs(lengths), batch)
    got = static.prefill(slots, starts, lengths, batch)
    assert sorted(static.static_steps.buckets) == [BucketKey(16, 256, False, True)]  # 16 tokens
    if last:
        assert got.tolist() == want.tolist()
    else:
        for row, n in enumerate(lengths):
            torch.testing.assert_close(got[row, :n], want[row, :n], rtol=1e-4, atol=1e-4)
            assert not got[row, n:].any()
    for k_dyn, k_static in zip(dynamic.cache.keys, static.cache.keys):
        torch.testing.assert_close(k_static[:, :, :600], k_dyn[:, :, :600], rtol=1e-4, atol=1e-4)
