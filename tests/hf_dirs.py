"""Hugging Face model directories made by the tests: transformers' LlamaForCausalLM with random weights,
saved with save_pretrained, plus a tiny tokenizer (a tokenizers BPE as tokenizer.json, or a SentencePiece
tokenizer.model). Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_wikitext_lines

BPE_VOCAB = 300
BOS, EOS = "<s>", "</s>"

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}  # head_dim 16, theta 1e4: wavelengths kept, blended and divided
LINEAR = {"rope_type": "linear", "factor": 4.0}
SHAPES = {  # tiny LlamaConfigs: rope scaling, explicit head_dim (not hidden/heads), GQA, tied and untied
    "llama3-gqa-tied-head_dim": dict(rope=LLAMA3, head_dim=16, num_key_value_heads=2, tie_word_embeddings=True),
    "linear-untied-head_dim": dict(rope=LINEAR, head_dim=12, num_key_value_heads=4, tie_word_embeddings=False),
    "plain-gqa-untied": dict(rope=None, head_dim=None, num_key_value_heads=1, tie_word_embeddings=False),
}


def bpe_tokenizer(*, bos_template: bool = True):
    """A byte-level BPE of BPE_VOCAB tokens trained on WikiText-like lines; its post-processor adds <s> first."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(make_wikitext_lines(300, seed=5), trainer)
    if bos_template:
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    assert tok.get_vocab_size() == BPE_VOCAB and tok.token_to_id(BOS) == 0
    return tok


def hf_llama(directory: Path, *, vocab_size: int, rope=None, head_dim=None, num_key_value_heads=4,
             tie_word_embeddings=False, spelling: str = "5.x", seed: int = 0, num_layers: int = 3):
    """Save a random LlamaForCausalLM to `directory`; returns it (fp32, eval). spelling "4.x" rewrites
    config.json's rope_parameters as rope_scaling + a top-level rope_theta, as published checkpoints have it."""
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) >= 5:
        rope_kwargs = {"rope_parameters": {"rope_theta": 10000.0, **(rope or {"rope_type": "default"})}}
    else:
        rope_kwargs = {"rope_theta": 10000.0, "rope_scaling": rope}
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=num_key_value_heads, head_dim=head_dim,
        max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=tie_word_embeddings,
        initializer_range=0.15, bos_token_id=0, eos_token_id=1, **rope_kwargs,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float().eval()
    model.save_pretrained(directory)
    path = directory / "config.json"
    data = json.loads(path.read_text())
    if spelling == "4.x" and "rope_parameters" in data:
        params = data.pop("rope_parameters")
        data["rope_theta"] = params.pop("rope_theta")
        data["rope_scaling"] = params if params["rope_type"] != "default" else None
        path.write_text(json.dumps(data))
    return model


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data))
