"""Stages in one process: slices of layers with the slot KV cache equal the whole model."""

from __future__ import annotations

import pytest
import torch

from hetserve.model.kv_cache import StepLayout
from hetserve.model.precision import module_bytes
from hetserve.model.resolve import ModelError
from hetserve.model.sampling import filter_logits, row_generator, sample
from hetserve.model.stage import StageModel, StageSpec
from hetserve.wire.messages import SamplingRows

from conftest import PROMPTS


def build(model_dir, bounds, slots=4, context=256):
    return [StageModel(model_dir, StageSpec(s, e, first=s == 0, last=e == 30, max_seqs=slots, max_context=context))
            for s, e in zip(bounds[:-1], bounds[1:])]


def run(stages, slots, starts, lengths, ids):
    x = ids
    for stage in stages:
        x = stage.forward(longs(slots), longs(starts), longs(lengths), x)
    return x.tolist()


def longs(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def padded(rows: list[list[int]]) -> torch.Tensor:
    out = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, : len(r)] = torch.tensor(r)
    return out


def test_staggered_continuous_batching_matches_transformers(model_dir, reference):
    """Requests join at different steps, in arbitrary slots, beside others mid-decode."""
    stages = build(model_dir, [0, 7, 19, 30])
    tok = reference.tokenizer
    new = 12
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    slot_of = {0: 3, 1: 0, 2: 2}
    gen = {i: [] for i in range(3)}
    join_at = {0: 0, 1: 2, 2: 5}  # step at which each request is prefilled
    for step in range(new + 6):
        joining = [i for i, t in join_at.items() if t == step]
        if joining:
            out = run(stages, [slot_of[i] for i in joining], [0] * len(joining),
                      [len(prompts[i]) for i in joining], padded([prompts[i] for i in joining]))
            for i, t in zip(joining, out):
                gen[i].append(t)
        decoding = [i for i in gen if gen[i] and i not in joining and len(gen[i]) < new]
        if decoding:
            out = run(stages, [slot_of[i] for i in decoding], [len(prompts[i]) + len(gen[i]) - 1 for i in decoding],
                      [1] * len(decoding), torch.tensor([[gen[i][-1]] for i in decoding]))
            for i, t in zip(decoding, out):
                gen[i].append(t)
    for i in range(3):
        assert gen[i] == reference(prompts[i], new), PROMPTS[i]


def test_chunked_prefill_and_slot_reuse(model_dir, reference):
    stages = build(model_dir, [0, 30], slots=2)
    tok = reference.tokenizer
    # A long request fills slot 1 first, so the next owner of slot 1 sits on stale entries.
    filler = tok(" ".join(PROMPTS))["input_ids"]
    run(stages, [1], [0], [len(filler)], torch.tensor([filler]))
    prompt = tok(PROMPTS[2])["input_ids"]
    first = None
    for start in range(0, len(prompt), 4):  # prefill in chunks of 4 tokens
        chunk = prompt[start: start + 4]
        first = run(stages, [1], [start], [len(chunk)], torch.tensor([chunk]))[0]
    gen = [first]
    while len(gen) < 8:
        gen.append(run(stages, [1], [len(prompt) + len(gen) - 1], [1], torch.tensor([[gen[-1]]]))[0])
    assert gen == reference(prompt, 8)


def test_prompts_of_different_lengths_prefilled_together_over_stale_slots(model_dir, reference):
    """Rows that all start at 0 attend causally with no mask (StepLayout.causal): the shorter rows'
    padding and the stale entries past their ends must reach no real token."""
    stages = build(model_dir, [0, 12, 30], slots=3)
    tok = reference.tokenizer
    filler = tok(" ".join(PROMPTS))["input_ids"]
    for slot in range(3):  # every slot holds a longer, earlier request's entries
        run(stages, [slot], [0], [len(filler)], torch.tensor([filler]))
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    lengths = [len(p) for p in prompts]
    slots = [2, 0, 1]
    assert len(set(lengths)) == 3
    assert StepLayout(longs(slots), longs([0, 0, 0]), longs(lengths), scratch=256).causal
    assert not StepLayout(longs(slots), longs([0, 0, 1]), longs(lengths), scratch=256).causal
    assert not StepLayout(longs(slots), longs([0, 0, 0]), longs([1, 1, 1]), scratch=256).causal
    gen = [[t] for t in run(stages, slots, [0, 0, 0], lengths, padded(prompts))]
    for _ in range(5):
        out = run(stages, slots, [n + len(g) - 1 for n, g in zip(lengths, gen)], [1, 1, 1],
                  torch.tensor([[g[-1]] for g in gen]))
        for g, t in zip(gen, out):
            g.append(t)
    for prompt, g in zip(prompts, gen):
        assert g == reference(prompt, 6)


def test_stage_refuses_bad_ranges_and_rows(model_dir):
    with pytest.raises(ModelError, match="outside"):
        StageModel(model_dir, StageSpec(20, 31, first=False, last=True))
    (stage,) = build(model_dir, [0, 30], slots=2, context=16)
    with pytest.raises(ValueError, match="max_context"):
        run([stage], [0], [10], [8], torch.zeros(1, 8, dtype=torch.long))


def test_stage_loads_only_its_layers(model_dir):
    middle = StageModel(model_dir, StageSpec(10, 12, first=False, last=False, max_seqs=1, max_context=8))
    assert middle.embed is None and middle.lm_head is None and len(middle.layers) == 2
    whole = build(model_dir, [0, 30], slots=1, context=8)[0]
    assert middle.weight_bytes * 10 < whole.weight_bytes
    # SmolLM2 ties its head to the embedding: one copy held, counted once
    assert whole.lm_head.weight.data_ptr() == whole.embed.weight.data_ptr()
    parts = [sum(t.numel() * t.element_size() for t in m.state_dict().values())
             for m in (whole.layers, whole.embed, whole.norm)]
    assert whole.weight_bytes == sum(parts)


def test_a_tied_head_stays_one_copy_when_the_stage_casts_it(model_dir):
    """The stored weights are float32: a bfloat16 stage casts them, and the embedding and the
    head it ties to were cast once each (two copies held; on a GPU, two device copies)."""
    stage = StageModel(model_dir, StageSpec(0, 30, first=True, last=True, max_seqs=1, max_context=8,
                                            dtype="bfloat16"))
    assert stage.lm_head.weight is stage.embed.weight and stage.lm_head.weight.dtype == torch.bfloat16


def test_sampling_rules():
    torch.manual_seed(0)
    logits = torch.randn(3, 100)
    greedy = logits.argmax(-1)

    def rows(**overrides) -> SamplingRows:
        fields = {"temperature": [1.0] * 3, "top_k": [0] * 3, "top_p": [1.0] * 3, "seed": [1, 2, 3], "step": [0] * 3}
        return SamplingRows(**{**fields, **overrides})

    assert torch.equal(sample(logits.clone(), rows(temperature=[0.0] * 3)), greedy)
    assert torch.equal(sample(logits.clone(), rows(top_k=[1] * 3)), greedy)
    assert torch.equal(sample(logits.clone(), rows(top_p=[1e-6] * 3)), greedy)
    a = sample(logits.clone(), rows())
    assert torch.equal(a, sample(logits.clone(), rows()))  # same seeds, same tokens
    draws = {tuple(sample(logits.clone(), rows(step=[s] * 3)).tolist()) for s in range(20)}
    assert len(draws) > 1  # the step changes the stream
    kept = filter_logits(logits[0], top_k=5, top_p=1.0)
    assert torch.isfinite(kept).sum() == 5
    nucleus = filter_logits(torch.tensor([3.0, 2.0, 1.0, -5.0]), top_k=0, top_p=0.8)
    assert torch.isfinite(nucleus).tolist() == [True, True, False, False]
    # A CPU generator takes 32 bits of its seed: seeds 2**32 apart drew alike.
    apart = [torch.rand(8, generator=row_generator(seed, 0, torch.device("cpu"))) for seed in (1, 1 + 2**32)]
    assert not torch.equal(*apart)


def test_a_row_with_non_finite_logits_falls_back_to_greedy_and_spares_the_others():
    """An inf logit (a float16 overflow) made NaN probabilities: multinomial failed the whole
    micro-batch (on a GPU, a device-side assert that leaves the CUDA context unusable)."""
    torch.manual_seed(0)
    logits = torch.randn(3, 100)
    rows = SamplingRows([1.0] * 3, [0] * 3, [1.0] * 3, [1, 2, 3], [0] * 3)
    fine = sample(logits.clone(), rows)
    broken = logits.clone()
    broken[1, 42] = float("inf")
    broken[2, :] = float("nan")
    ids = sample(broken, rows)
    assert ids[0] == fine[0] and ids[1] == 42  # the other rows draw exactly as before
    assert 0 <= ids[2] < 100


def test_w8a8_quantizes_the_requested_layers_only(model_dir):
    """Layers 10-13 as native, int8, w8a8, w8a8 on real hidden states: only the w8a8 layers
    quantize activations (with the shipped scales, outputs in float), int8 and w8a8 weights take
    the same bytes, and the output stays close to the native stage's without equalling it."""
    from optimum.quanto.nn import QLinear
    from transformers import AutoTokenizer

    from hetserve.model.w8a8 import input_scales
    from hetserve.plan.quality import activation_scales

    scales = activation_scales(model_dir)[10:14]
    precisions = ("native", "int8", "w8a8", "w8a8")
    prompt = AutoTokenizer.from_pretrained(model_dir)(PROMPTS[2])["input_ids"]
    rows = longs([0]), longs([0]), longs([len(prompt)])
    embed = StageModel(model_dir, StageSpec(0, 10, first=True, last=False, max_seqs=1, max_context=32))
    hidden = embed.forward(*rows, torch.tensor([prompt]))  # [1, T, H]: what layer 10 sees
    native, mixed = (StageModel(model_dir, StageSpec(10, 14, first=False, last=False, max_seqs=1, max_context=32,
                                                     precisions=p, input_scales=tuple(scales)))
                     for p in ((), precisions))

    for layer, precision in zip(mixed.layers, precisions):
        linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) == 7
        if precision == "native":
            assert not any(isinstance(m, QLinear) for m in linears)
            continue
        assert all(isinstance(m, QLinear) for m in linears)
        assert all((m.activation_qtype is not None) == (precision == "w8a8") for m in linears)
    assert input_scales(mixed.layers[2]) == pytest.approx(scales[2], rel=1e-6)
    assert not mixed.layers[2].mlp.down_proj._forward_hooks, "w8a8 outputs must stay float"
    layer_bytes = [module_bytes(layer) for layer in mixed.layers]
    assert layer_bytes[1] == layer_bytes[2] == layer_bytes[3] < layer_bytes[0] / 3

    want, got = native.forward(*rows, hidden), mixed.forward(*rows, hidden)
    error = float((got - want).norm() / want.norm())
    assert 1e-4 < error < 0.05, error


def test_w8a8_refuses_to_run_without_its_scales(model_dir):
    with pytest.raises(ModelError, match="activation scales"):
        StageModel(model_dir, StageSpec(3, 5, first=False, last=False, max_seqs=1, max_context=8,
                                        precisions=("int8", "w8a8")))
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj")
    for bad in (0.0, -1.0, float("nan"), float("inf")):  # each made the layer's outputs inf or NaN, silently
        with pytest.raises(ModelError, match="finite and > 0"):
            StageModel(model_dir, StageSpec(3, 4, first=False, last=False, max_seqs=1, max_context=8,
                                            precisions=("w8a8",), input_scales=({**dict.fromkeys(names, 0.1),
                                                                                 "mlp.up_proj": bad},)))


def test_consecutive_slots_attend_through_a_view_others_through_a_gather():
    from hetserve.model.kv_cache import SlotKVCache

    cache = SlotKVCache(num_layers=1, slots=6, kv_heads=2, head_dim=4, max_context=16, dtype=torch.float32,
                        device=torch.device("cpu"))
    cache.keys[0].normal_()
    cache.values[0].normal_()
    for slots, run_ in (([2, 3, 4], (2, 3)), ([5], (5, 1)), ([0, 2], None), ([3, 2], None)):
        layout = StepLayout(longs(slots), longs([7] * len(slots)), longs([1] * len(slots)), cache.scratch)
        assert layout.slot_run == run_
        cache.begin(layout)
        new_k, new_v = torch.randn(len(slots), 2, 1, 4), torch.randn(len(slots), 2, 1, 4)
        keys, values = cache.update(new_k, new_v, 0)
        assert keys.shape == (len(slots), 2, 8, 4)
        torch.testing.assert_close(keys, cache.keys[0][longs(slots), :, :8], rtol=0, atol=0)
        torch.testing.assert_close(values[:, :, 7:8], new_v, rtol=0, atol=0)  # this step's K/V included
        shares = keys.untyped_storage().data_ptr() == cache.keys[0].untyped_storage().data_ptr()
        assert shares == (run_ is not None)  # a view of the cache, or a gathered copy


def test_one_token_rows_at_the_newest_position_need_no_mask():
    def layout(starts, lengths):
        return StepLayout(longs(range(len(starts))), longs(starts), longs(lengths), 16)

    assert layout([7], [1]).sees_all and layout([7, 7], [1, 1]).sees_all
    assert not layout([7, 3], [1, 1]).sees_all  # the shorter row must not see the longer row's keys
    assert not layout([0], [5]).sees_all  # prompt tokens attend causally
    static = StepLayout(longs([0]), longs([7]), longs([1]), 16, steps=1, kv_len=12)
    assert not static.sees_all  # a graph's fixed kv_len holds keys past the row's own


def test_a_dropped_stage_is_freed_at_once(model_dir):
    """A host drops its stage before loading the next slice: no reference cycle may keep the old
    one (weights, KV cache, graphs) alive until a full garbage collection."""
    import gc
    import weakref

    gc.disable()
    try:
        stage = StageModel(model_dir, StageSpec(0, 2, first=True, last=False, max_seqs=2, max_context=64))
        stage.run([0], [0], [3], torch.tensor([[1, 2, 3]]))
        dropped = weakref.ref(stage)
        del stage
        assert dropped() is None
    finally:
        gc.enable()


def tiny_stage(path, **spec) -> StageModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                  **spec.pop("config", {}))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return StageModel(path, StageSpec(0, 2, first=spec.pop("first", False), last=spec.pop("last", False), max_seqs=2,
                                      max_context=64, **spec))


def test_padding_positions_do_not_rescale_dynamic_rotary(tmp_path):
    """A row's padding once took positions past its end (here 64-69 of a 64-token model): dynamic
    rotary scaling re-scaled every row's frequencies from them, and a prompt's K/V changed with
    the rows beside it (1.3e-5 here, before)."""
    stage = tiny_stage(tmp_path, first=True, last=True, config={
        "max_position_embeddings": 64, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}})
    ids = torch.randint(0, 256, (1, 80))
    alone = stage.hidden_states(longs([1]), longs([0]), longs([8]), ids[:, :8])
    stage.hidden_states(longs([0]), longs([0]), longs([62]), ids[:, 10:72])
    beside = padded([ids[0, 60:62].tolist(), ids[0, :8].tolist()])  # 2 tokens at 62-63, then 8 from 0
    together = stage.hidden_states(longs([0, 1]), longs([62, 0]), longs([2, 8]), beside)
    assert (alone[0] - together[1]).abs().max() < 1e-6


def test_a_float16_overflow_does_not_poison_the_slots_next_owner(tmp_path):
    """Masked keys still enter attention with weight 0, and 0 * inf = NaN: a request whose K/V
    overflowed float16 left every later owner of its slot attending to NaN beside longer rows."""
    stage = tiny_stage(tmp_path, dtype="float16")
    torch.manual_seed(1)
    hidden = torch.randn(1, 70, 64, dtype=torch.float16)
    alone = stage.hidden_states(longs([1]), longs([0]), longs([8]), hidden[:, :8])
    stage.hidden_states(longs([1]), longs([0]), longs([50]), torch.full((1, 50, 64), float("inf"),
                                                                          dtype=torch.float16))
    stage.hidden_states(longs([0]), longs([0]), longs([62]), hidden[:, 8:70])
    beside = torch.zeros(2, 8, 64, dtype=torch.float16)
    beside[0, :1], beside[1] = hidden[0, 69:70], hidden[0, :8]
    together = stage.hidden_states(longs([0, 1]), longs([62, 0]), longs([1, 8]), beside)
    assert torch.isfinite(together).all()
    assert (alone[0].float() - together[1].float()).abs().max() < 1e-2
