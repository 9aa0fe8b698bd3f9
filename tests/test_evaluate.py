"""Per-layer evaluation against a plain loop of full forward passes, and the `eval` command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from layerskip.checkpoint import save_checkpoint
from layerskip.cli import main
from layerskip.config import TokenizerConfig
from layerskip.data import eval_windows
from layerskip.evaluation import evaluate_model


def reference_nll(model, tokens, seq_len, batch_size):
    """Summed NLL of each exit, one full forward pass per exit and window."""
    sums, count = [0.0] * model.num_layers, 0
    with torch.no_grad():
        for x, y in eval_windows(tokens, seq_len, batch_size):
            for k in range(1, model.num_layers + 1):
                logits = model(x, exit_layer=k).logits
                sums[k - 1] += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
    return sums, count


def test_every_exit_equals_a_separate_forward_pass():
    model = tiny_model()
    tokens = np.random.default_rng(0).integers(0, 97, size=300).astype(np.uint16)
    result = evaluate_model(model, tokens, split="valid", words=120, seq_len=32, batch_size=3, chunk_size=50)
    sums, count = reference_nll(model, tokens, 32, 3)
    assert result.tokens == count == 299  # every token but the first, once
    assert [r.layer for r in result.layers] == [1, 2, 3, 4]
    for r, total in zip(result.layers, sums):
        assert r.loss == pytest.approx(total / count, rel=1e-5)
        assert r.token_ppl == pytest.approx(math.exp(total / count), rel=1e-5)
        assert r.word_ppl == pytest.approx(math.exp(total / 120), rel=1e-5)
    assert len({round(r.loss, 4) for r in result.layers}) == 4  # the exits really differ
    assert result.final.layer == 4 and "word ppl" in result.table()


def test_partial_evaluation_omits_word_perplexity():
    model = tiny_model()
    tokens = np.random.default_rng(1).integers(0, 97, size=300).astype(np.uint16)
    result = evaluate_model(model, tokens, words=120, seq_len=32, batch_size=4, max_tokens=100)
    assert result.tokens == 100 and result.words is None
    assert all(r.word_ppl is None for r in result.layers)
    sums, count = reference_nll(model, tokens[:101], 32, 4)
    assert result.final.loss == pytest.approx(sums[-1] / count, rel=1e-5)


def test_eval_command_prints_table_and_writes_json(tmp_path, tiny_corpus_dir, tiny_tokenizer, capsys):
    model = tiny_model(vocab_size=tiny_tokenizer.vocab_size, max_seq_len=32)
    run = tmp_path / "run"
    save_checkpoint(run / "best", model, tiny_tokenizer, tokenizer_config=TokenizerConfig(vocab_size=400),
                    train_config={"seq_len": 32})
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run), "--split", "valid", "--json", str(out),
                 "--data-dir", str(tiny_corpus_dir), "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["split"] == "valid" and len(report["layers"]) == 4 and report["words"] > 0
    assert report["meta"]["checkpoint"].endswith("best")
    assert f"{report['layers'][-1]['word_ppl']:.2f}" in printed
    assert report["layers"][-1]["agreement"] == 1.0 and 0 <= report["layers"][0]["last_in_top4"] <= 1
    assert "agree" in printed and f"{report['layers'][0]['agreement']:6.3f}" in printed
    # a missing checkpoint and a --json that is a directory are one-line errors
    assert main(["eval", "--checkpoint", str(tmp_path / "nope"), "--data-dir", str(tiny_corpus_dir)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run), "--json", str(tmp_path), "--data-dir", str(tiny_corpus_dir)]) == 2
    assert "directory" in capsys.readouterr().err


def reference_agreement(model, tokens, seq_len):
    """Per exit: (top-1 agreement, last top-1 in top-2, in top-4), a plain loop over every predicted token."""
    hits, count = [[0, 0, 0] for _ in range(model.num_layers)], 0
    with torch.no_grad():
        for x, _ in eval_windows(tokens, seq_len, 1):
            logits = {k: model(x, exit_layer=k).logits[0] for k in range(1, model.num_layers + 1)}  # (T, V) each
            for t in range(x.shape[1]):
                last_top1 = int(logits[model.num_layers][t].argmax())
                for k in range(1, model.num_layers + 1):
                    row = logits[k][t]
                    hits[k - 1][0] += int(row.argmax()) == last_top1
                    hits[k - 1][1] += last_top1 in row.topk(2).indices.tolist()
                    hits[k - 1][2] += last_top1 in row.topk(4).indices.tolist()
                count += 1
    return [[h / count for h in row] for row in hits]


def test_agreement_equals_a_plain_loop_over_tokens():
    model = tiny_model(seed=3, vocab_size=11)  # a small vocabulary: exits often disagree yet are near misses
    tokens = np.random.default_rng(4).integers(0, 11, size=150).astype(np.uint16)
    result = evaluate_model(model, tokens, seq_len=32, batch_size=2, chunk_size=13)
    expected = reference_agreement(model, tokens, 32)
    for r, (agree, top2, top4) in zip(result.layers, expected):
        assert (r.agreement, r.last_in_top2, r.last_in_top4) == pytest.approx((agree, top2, top4), abs=1e-12)
        assert r.agreement <= r.last_in_top2 <= r.last_in_top4
    last = result.final
    assert (last.agreement, last.last_in_top2, last.last_in_top4) == (1.0, 1.0, 1.0)
    assert 0 < result.layers[0].agreement < result.layers[0].last_in_top4 < 1  # the test can tell them apart
    assert "agree" in result.table() and "top-4" in result.table()
    assert result.to_dict()["layers"][0]["last_in_top2"] == result.layers[0].last_in_top2


def test_windows_of_a_long_context_model_are_capped_so_their_logits_fit():
    from layerskip.evaluation import DEFAULT_WINDOW_CAP, default_window

    assert default_window(256) == 256  # our checkpoints: their training context
    assert default_window(131_072) == DEFAULT_WINDOW_CAP == 2048  # Llama 3.2's context
