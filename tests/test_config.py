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
