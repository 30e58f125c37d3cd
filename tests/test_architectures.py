"""Every supported family runs split into stages with output equal to transformers.

Tiny random-weight models built from each family's config (valid for equality, not quality).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hetserve.model.resolve import ModelError, resolve_model
from hetserve.model.stage import StageModel, StageSpec

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)


@pytest.mark.parametrize("model_type,extra", [
    ("llama", {}),
    ("mistral", {"sliding_window": None}),
    ("qwen2", {}),
    ("qwen3", {"head_dim": 16}),
])
def test_family_split_equals_transformers(tmp_path, model_type, extra):
    """Split into two stages, the family generates transformers' own greedy ids. Decode steps
    run both ways, side by side: through transformers' layers (forward) and through the fixed-
    shape step with the written-out layers of decode_layers.py (decode); the hidden states each
    hands to the next stage agree at every step."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **TINY, **extra)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path)
    prompt = torch.tensor([[5, 17, 99, 3, 42, 7]])
    with torch.no_grad():
        want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                              min_new_tokens=8, pad_token_id=0)[0, prompt.shape[1]:].tolist()

    def stages():
        return [StageModel(tmp_path, StageSpec(0, 1, True, False, max_seqs=2, max_context=32)),
                StageModel(tmp_path, StageSpec(1, 4, False, True, max_seqs=2, max_context=32))]

    def forward(stage, start, x):
        return stage.forward(torch.tensor([1]), torch.tensor([start]), torch.tensor([x.shape[1]]), x)

    dynamic, static = stages(), stages()
    assert all(stage.decode_layers is not None for stage in static)
    got = {"forward": [], "decode": []}
    for name, pair in (("forward", dynamic), ("decode", static)):
        got[name].append(int(forward(pair[1], 0, forward(pair[0], 0, prompt))[0]))
    while len(got["forward"]) < 8:
        start = prompt.shape[1] + len(got["forward"]) - 1
        hidden = forward(dynamic[0], start, torch.tensor([[got["forward"][-1]]]))
        got["forward"].append(int(forward(dynamic[1], start, hidden)[0]))
        decoded = static[0].decode([1], [start], torch.tensor([[got["decode"][-1]]]))
        torch.testing.assert_close(decoded, hidden, rtol=1e-5, atol=1e-5)
        got["decode"].append(int(static[1].decode([1], [start], decoded)[0]))
    assert got["forward"] == want and got["decode"] == want


def test_model_directory_and_gguf_path_specs(tmp_path, monkeypatch, model_dir):
    assert resolve_model(str(model_dir)).path == model_dir
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="unknown model"):
        resolve_model(str(tmp_path / "missing.gguf"))
