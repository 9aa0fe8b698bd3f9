from __future__ import annotations

import pytest

from layerskip.config import ModelConfig, TokenizerConfig
from layerskip.errors import ConfigError


def test_defaults_are_the_seed_studys_model():
    cfg = ModelConfig()
    assert (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.d_ff, cfg.dropout, cfg.vocab_size) == (128, 6, 8, 512, 0.1, 8192)
    assert cfg.head_dim == 16 and cfg.kv_heads == 8


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_heads=7), "num_heads \\(7\\) must divide d_model \\(128\\)"),
        (dict(d_model=0), "d_model must be a positive integer"),
        (dict(num_layers=-1), "num_layers must be a positive integer"),
        (dict(d_model=24, num_heads=8), "must be even for rotary"),
        (dict(num_kv_heads=3), "num_kv_heads \\(3\\) must be a positive divisor"),
        (dict(dropout=1.0), "dropout must be in \\[0, 1\\)"),
        (dict(dropout=float("nan")), "dropout must be in"),
        (dict(rope_theta=0), "rope_theta must be a positive number"),
        (dict(max_seq_len=2.5), "max_seq_len must be a positive integer"),
        (dict(vocab_size=True), "vocab_size must be a positive integer"),
        (dict(head_dim=7), "head dimension \\(7\\) must be even"),
        (dict(head_dim=0), "head_dim must be a positive integer"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope scaling type 'yarn' is not supported"),
        (dict(rope_scaling={"rope_type": "linear", "factor": 0}), "factor must be a positive number"),
        (dict(rope_scaling={"rope_type": "linear", "factor": 2, "low_freq_factor": 1}), "takes only a factor"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 1,
                            "original_max_position_embeddings": 8192}), "low_freq_factor \\(4\\) < high_freq_factor"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
                            "original_max_position_embeddings": 8192.5}), "must be an integer"),
        (dict(rope_scaling={"rope_type": "linear", "factr": 2}), "unknown rope_scaling option"),
        (dict(rope_scaling=[2.0]), "rope_scaling must be null or an object"),
    ],
)
def test_impossible_model_settings_are_refused_with_the_reason(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**overrides)


def test_unknown_keys_are_errors_not_ignored():
    with pytest.raises(ConfigError, match="unknown model config option\\(s\\) \\['dropuot'\\]"):
        ModelConfig.from_dict({"d_model": 64, "dropuot": 0.2})
    with pytest.raises(ConfigError, match="must be a JSON object"):
        ModelConfig.from_dict([1, 2])


def test_round_trip_through_dict():
    cfg = ModelConfig(d_model=64, num_layers=3, num_kv_heads=2)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(vocab_size=10), "vocab_size must be an integer in"),
        (dict(model_type="wordpiece"), "model_type must be 'bpe' or 'unigram'"),
        (dict(character_coverage=0.5), "character_coverage"),
    ],
)
def test_impossible_tokenizer_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        TokenizerConfig(**overrides)


def test_both_tokenizer_model_types_are_accepted():
    assert TokenizerConfig(model_type="unigram").model_type == "unigram"
    assert TokenizerConfig(model_type="bpe").model_type == "bpe"


def test_an_explicit_head_dim_and_rope_scaling_round_trip_through_dicts():
    llama3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    cfg = ModelConfig(d_model=96, num_heads=4, head_dim=32, num_kv_heads=2, rope_scaling=llama3)
    assert cfg.head_dim == 32 and cfg.rope_scaling.rope_type == "llama3"  # heads * head_dim need not be d_model
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg and hash(cfg) == hash(ModelConfig.from_dict(cfg.to_dict()))
    assert cfg.to_dict()["rope_scaling"] == llama3
    plain = ModelConfig(head_dim=16)  # the derived value given explicitly: the same config
    assert plain == ModelConfig() and "head_dim" not in plain.to_dict() and "rope_scaling" not in plain.to_dict()
