"""Profiling within a time budget (plan/profile.py)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hetserve.plan.device_profile import Grid
from hetserve.plan.profile import measure_profile


def test_precisions_past_the_budget_are_left_out(tmp_path):
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    grids = (Grid([1], [8]), Grid([1], [16]))
    full = measure_profile(tmp_path, precisions=["native", "int8"], repeats=1, progress=False, grids=grids)
    assert set(full.layer_bytes) == {"native", "int8"}
    short = measure_profile(tmp_path, precisions=["native", "int8"], repeats=1, progress=False, grids=grids,
                            budget_s=1e-9)
    assert set(short.layer_bytes) == {"native"}, "native is always measured; int8 would end past the budget"
    assert set(short.layer_ms["decode"]) == {"native"}
