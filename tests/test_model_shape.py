"""Model shapes from configs alone, against published parameter counts and a measured profile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hetserve.plan.device_profile import DeviceProfile
from hetserve.plan.model_shape import (ModelConfigError, builtin_configs, config_shape, kv_bytes_per_token,
                                       layer_weight_bytes, load_model_config)

PROFILES = Path(__file__).resolve().parent.parent / "examples" / "profiles"

# Published totals (model cards / papers), in parameters.
PUBLISHED = {"opt-30b": 30e9, "opt-66b": 66e9, "bloom-176b": 176.247e9, "llama-3-8b": 8.03e9, "llama-3-70b": 70.6e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_published_totals(name):
    shape = config_shape(*load_model_config(name))
    assert shape.total_params == pytest.approx(PUBLISHED[name], rel=0.02)


def test_builtin_configs_are_the_five_published_shapes():
    assert builtin_configs() == sorted(PUBLISHED)


def test_layer_bytes_match_the_measured_h100_llama_3_8b_profile():
    """quanto's storage, measured by `hetserve profile`: every precision to within 64 bytes a layer."""
    measured = DeviceProfile.load(PROFILES / "h100-llama-3-8b-bf16.json")
    shape = config_shape(*load_model_config("llama-3-8b"))
    for precision, nbytes in measured.layer_bytes.items():
        assert abs(layer_weight_bytes(shape, precision, 2) - nbytes) <= 64, precision
    assert kv_bytes_per_token(shape, 2) == measured.kv_bytes_per_token
    assert shape.hidden_size == measured.hidden_size


def test_families_differ_where_they_should():
    opt, bloom = config_shape(*load_model_config("opt-66b")), config_shape(*load_model_config("bloom-176b"))
    llama = config_shape(*load_model_config("llama-3-70b"))
    assert opt.linear_params == 12 * 9216 ** 2 and bloom.linear_params == 12 * 14336 ** 2  # 4h MLP
    assert opt.kv_dim == 9216 and llama.kv_dim == 8 * 128  # MHA vs GQA
    assert opt.tied and bloom.tied and not llama.tied
    assert llama.num_layers == 80 and bloom.num_layers == 70 and opt.num_layers == 64


def test_config_paths_and_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**load_model_config("llama-3-8b")[1], "_name_or_path": "x/y"}))
    name, config = load_model_config(str(tmp_path))
    assert name == "x/y" and config_shape(name, config).num_layers == 32
    with pytest.raises(ModelConfigError, match="opt-66b"):  # names the built-ins
        load_model_config("opt-67b")
    with pytest.raises(ModelConfigError, match="no shape formula for architecture 'gpt2'"):
        config_shape("g", {"model_type": "gpt2", "hidden_size": 8, "num_hidden_layers": 1,
                           "num_attention_heads": 1, "vocab_size": 8})
    with pytest.raises(ModelConfigError, match="no intermediate_size"):
        config_shape("l", {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1,
                           "num_attention_heads": 1, "vocab_size": 8})
