"""Continual training (--init-from): the starting checkpoint's weights, tokenizer and shape, a fresh
optimizer, refusals of shape-changing settings, and resuming such a run."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import make_wikitext_lines, tiny_model

import layerskip
from layerskip.checkpoint import TOKEN_COUNTS_FILE, load_checkpoint, save_checkpoint
from layerskip.cli import main
from layerskip.config import TokenizerConfig
from layerskip.data import cache_root, load_corpus
from layerskip.errors import ConfigError
from layerskip.tokenizer import Tokenizer
from layerskip.training import TrainConfig, Trainer, init_config, load_start, resume_config, train

TINY = dict(d_model=32, num_layers=4, num_heads=4, d_ff=64, dropout=0.0, vocab_size=400, seq_len=32,
            batch_size=8, warmup=3, lr=3e-3, precision="fp32", compile=False, eval_batch_size=8, loss_chunk=64)
SETTINGS = {k: v for k, v in TINY.items() if k not in ("d_model", "num_layers", "num_heads", "d_ff", "vocab_size")}


@pytest.fixture(scope="module")
def corpus(tiny_corpus_dir, tmp_path_factory):
    old = os.environ.get("LAYERSKIP_CACHE_DIR")
    os.environ["LAYERSKIP_CACHE_DIR"] = str(tmp_path_factory.mktemp("init-cache"))
    try:
        return load_corpus(tiny_corpus_dir, TokenizerConfig(vocab_size=400))
    finally:
        if old is None:
            del os.environ["LAYERSKIP_CACHE_DIR"]
        else:
            os.environ["LAYERSKIP_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def source(corpus, tmp_path_factory):
    """A plain run of 4 steps whose best checkpoint carries token counts of its own (not the split's)."""
    run = tmp_path_factory.mktemp("source") / "plain"
    train(TrainConfig(**TINY, max_steps=4, max_skip_prob=0.0, early_exit_scale=0.0), run, corpus=corpus,
          progress=False)
    counts = np.arange(400, dtype=np.int64)[::-1].copy()  # unlike any split's counts
    np.save(run / "best" / TOKEN_COUNTS_FILE, counts)
    return run


def state(model):
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def test_a_continual_run_starts_from_the_checkpoints_weights_with_a_fresh_optimizer(tmp_path, corpus, source):
    start = load_start(source)
    cfg = init_config(start, {**SETTINGS, "max_steps": 3, "max_skip_prob": 0.2, "early_exit_scale": 0.1})
    assert (cfg.d_model, cfg.num_layers, cfg.vocab_size, cfg.seq_len) == (32, 4, 400, 32)
    assert cfg.init_from == str((source / "best").resolve())
    trainer = Trainer(cfg, tmp_path / "run", corpus=corpus, init_checkpoint=start, progress=False)
    got, want = state(trainer.model), state(start.model)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(trainer.model.token_counts, torch.arange(399, -1, -1))  # carried over
    assert trainer.step == 0 and all(not opt.state for opt in trainer.optimizer.optimizers.values())  # fresh
    result = trainer.run()
    assert result.step == 3 and result.stopped == "max_steps"
    trained = load_checkpoint(tmp_path / "run" / "last")
    assert any(not torch.equal(trained.model.state_dict()[k], want[k]) for k in want)  # it trained
    assert trained.train_config["init_from"] == cfg.init_from and trained.train_config["max_skip_prob"] == 0.2
    record = trained.meta["init_from"]
    assert record["path"] == cfg.init_from and record["step"] == 4 and record["plain"] is True
    assert torch.equal(trained.model.token_counts, torch.arange(399, -1, -1))
    start_rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert start_rec["type"] == "start" and start_rec["init_from"] == record


def test_a_shape_changing_setting_is_refused_with_one_message(tmp_path, tiny_corpus_dir, source, capsys):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"fixes the model's shape.*d_model=32 \(given 64\), num_layers=4 \(given 2\)"):
        layerskip.train(out, init_from=source, data_dir=tiny_corpus_dir, d_model=64, num_layers=2, progress=False)
    with pytest.raises(ConfigError, match="vocab_size=400"):
        layerskip.train(out, init_from=source, data_dir=tiny_corpus_dir, vocab_size=512, progress=False)
    with pytest.raises(ConfigError, match="longer than the context"):
        layerskip.train(out, init_from=source, data_dir=tiny_corpus_dir, seq_len=64, progress=False)
    assert main(["train", "--out", str(out), "--init-from", str(source), "--d_ff", "128", "--quiet",
                 "--data-dir", str(tiny_corpus_dir)]) == 2
    err = capsys.readouterr().err
    assert "d_ff=64 (given 128)" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="does not fit its init_from"):  # a config not made by init_config
        Trainer(TrainConfig(**{**TINY, "d_model": 64}, init_from=str(source)), tmp_path / "direct", progress=False,
                data_dir=tiny_corpus_dir)


def test_the_corpus_is_encoded_with_the_checkpoints_own_tokenizer(tmp_path, tiny_corpus_dir):
    """A tokenizer trained on other text, a model with settings TrainConfig does not have: both kept."""
    tokenizer = Tokenizer.train(make_wikitext_lines(300, seed=7), TokenizerConfig(vocab_size=350))
    model = tiny_model(vocab_size=tokenizer.vocab_size, max_seq_len=32, num_kv_heads=2, rope_theta=5000.0)
    src = save_checkpoint(tmp_path / "src", model, tokenizer, tokenizer_config=TokenizerConfig(vocab_size=350),
                          train_config={"seq_len": 32}, meta={"step": 7})
    result = layerskip.train(tmp_path / "run", init_from=src, data_dir=tiny_corpus_dir, progress=False,
                             **{**SETTINGS, "seq_len": 16, "max_steps": 2, "batch_size": 4})
    assert result.step == 2
    assert not (cache_root() / "tokenizers").exists()  # no tokenizer was trained
    trained = load_checkpoint(result.last)
    assert trained.tokenizer.model_proto == tokenizer.model_proto
    assert trained.tokenizer_config == TokenizerConfig(vocab_size=350)
    mc = trained.model_config
    assert (mc.num_kv_heads, mc.rope_theta, mc.max_seq_len, mc.vocab_size) == (2, 5000.0, 32, tokenizer.vocab_size)
    assert trained.train_config["seq_len"] == 16 and trained.train_config["vocab_size"] == tokenizer.vocab_size
    other_corpus = load_corpus(tiny_corpus_dir, TokenizerConfig(vocab_size=400))
    start = load_start(src)
    with pytest.raises(ConfigError, match="another tokenizer"):  # a corpus encoded otherwise is refused
        train(init_config(start, {**SETTINGS, "max_steps": 1, "batch_size": 4, "seq_len": 16}), tmp_path / "bad",
              corpus=other_corpus, init_checkpoint=start, progress=False)


def test_a_continual_run_resumes_without_starting_over(tmp_path, corpus, source, tiny_corpus_dir):
    start = load_start(source)
    cfg = init_config(start, {**SETTINGS, "max_steps": 6, "max_skip_prob": 0.2, "save_every": 2, "val_every": 3,
                              "early_exit_distill": 0.5})
    whole = train(cfg, tmp_path / "whole", corpus=corpus, init_checkpoint=start, progress=False)
    first = train(cfg, tmp_path / "split", corpus=corpus, init_checkpoint=start, progress=False, stop_at_step=4)
    second = train(resume_config(tmp_path / "split"), tmp_path / "split", corpus=corpus, progress=False, resume=True)
    assert first.losses + second.losses == whole.losses  # continued from step 4, not from the start again
    assert load_checkpoint(tmp_path / "split" / "last").meta["init_from"]["path"] == cfg.init_from
    # naming the same start again (as a run directory) is accepted; another start is refused
    again = layerskip.train(tmp_path / "split", resume=True, init_from=source, max_steps=7, data_dir=tiny_corpus_dir,
                            progress=False)
    assert again.step == 7 and len(again.losses) == 1
    with pytest.raises(ConfigError, match="init_from"):
        layerskip.train(tmp_path / "split", resume=True, init_from=tmp_path / "whole", data_dir=tiny_corpus_dir,
                        progress=False)


def test_cli_init_from_trains_and_resumes(tmp_path, tiny_corpus_dir, source):
    common = ["--data-dir", str(tiny_corpus_dir), "--quiet", "--no-compile", "--precision", "fp32",
              "--batch_size", "8", "--seq_len", "32"]
    out = tmp_path / "continual"
    assert main(["train", "--out", str(out), "--init-from", str(source), "--max_steps", "2", "--max_skip_prob", "0.1",
                 "--layer_dropout_schedule", "exp", "--early_exit_scale", "0.1"] + common) == 0
    saved = load_checkpoint(out / "last").train_config
    assert saved["init_from"] == str((source / "best").resolve()) and saved["layer_dropout_schedule"] == "exp"
    assert main(["train", "--out", str(out), "--resume", "--max_steps", "3"] + common) == 0
    assert load_checkpoint(out / "last").meta["step"] == 3
