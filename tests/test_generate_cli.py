"""`layerskip generate` end to end on a tiny saved checkpoint."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model

from layerskip.checkpoint import save_checkpoint
from layerskip.cli import main
from layerskip.config import TokenizerConfig
from layerskip.decoding import Autoregressive

PROMPT = " = Valkyria Chronicles = \n The game began"


@pytest.fixture(scope="module")
def checkpoint(tiny_tokenizer, tmp_path_factory):
    model = tiny_model(vocab_size=tiny_tokenizer.vocab_size, tie_embeddings=False)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(path, model, tiny_tokenizer, tokenizer_config=TokenizerConfig(vocab_size=400))
    return path, model, tiny_tokenizer


def generate(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["generate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_ar_streams_the_prompt_then_the_greedy_continuation(checkpoint, capsys, tmp_path):
    path, model, tok = checkpoint
    code, out, err = generate(capsys, "--checkpoint", str(path), "--prompt", PROMPT, "--max_length", "20",
                              "--json", str(tmp_path / "ar.json"))
    assert code == 0
    ids = tok.encode(PROMPT)
    expected = Autoregressive().generate(model, ids, 20).tokens
    assert out == tok.decode(ids + expected) + "\n"
    assert "tokens/s" in err and "ms/token" in err
    doc = json.loads((tmp_path / "ar.json").read_text())
    assert doc["tokens"] == expected and doc["summary"]["new_tokens"] == 20
    assert out.startswith(tok.decode(ids)) and out.rstrip("\n").endswith(doc["text"])


def test_ssd_prints_exactly_what_ar_prints_and_reports_acceptance(checkpoint, capsys, tmp_path):
    path, _, _ = checkpoint
    base = ["--checkpoint", str(path), "--prompt", PROMPT, "--max_length", "25"]
    _, ar_out, _ = generate(capsys, *base)
    code, out, err = generate(capsys, *base, "--mode", "ssd", "--draft_layer", "2", "--k", "3",
                              "--json", str(tmp_path / "ssd.json"))
    assert code == 0 and out == ar_out
    assert "acceptance" in err and "mean accepted length" in err
    summary = json.loads((tmp_path / "ssd.json").read_text())["summary"]
    assert summary["draft_layer"] == 2 and summary["k"] == 3
    assert 0 <= summary["acceptance_rate"] <= 1 and sum(summary["accepted_length_histogram"]) == summary["rounds"]


def test_sampling_is_reproducible_by_seed(checkpoint, capsys):
    path, _, _ = checkpoint
    base = ["--checkpoint", str(path), "--prompt", PROMPT, "--max_length", "15", "--temperature", "1.0", "--top_k", "50"]
    outs = [generate(capsys, *base, "--seed", seed)[1] for seed in ("1", "1", "2")]
    assert outs[0] == outs[1] and outs[0] != outs[2]
    code, greedy_out, _ = generate(capsys, *base, "--greedy")
    assert code == 0 and greedy_out == generate(capsys, *base[:6])[1]
    ssd = [generate(capsys, *base, "--mode", "ssd", "--seed", "3")[1] for _ in range(2)]
    assert ssd[0] == ssd[1]


def test_prompt_problems_are_one_line_errors(checkpoint, capsys, tmp_path):
    path, model, tok = checkpoint
    code, _, err = generate(capsys, "--checkpoint", str(path), "--prompt", "")
    assert code == 2 and "prompt is empty" in err and "Traceback" not in err
    long_prompt = " the" * (model.config.max_seq_len + 5)
    code, _, err = generate(capsys, "--checkpoint", str(path), "--prompt", long_prompt)
    assert code == 2 and "shorten the prompt" in err
    near = " the" * (model.config.max_seq_len - 3)
    room = model.config.max_seq_len - len(tok.encode(near))
    for mode in ("ar", "ssd"):
        code, _, err = generate(capsys, "--checkpoint", str(path), "--prompt", near, "--max_length", "50",
                                "--mode", mode, "--json", str(tmp_path / "ctx.json"))
        doc = json.loads((tmp_path / "ctx.json").read_text())
        assert code == 0 and doc["summary"]["stop_reason"] == "context" and len(doc["tokens"]) == room


def test_bad_settings_are_one_line_errors(checkpoint, capsys):
    path, _, _ = checkpoint
    base = ["--checkpoint", str(path), "--prompt", PROMPT]
    for extra, message in (
        (["--mode", "ssd", "--draft_layer", "4"], "draft_layer must be in 1..3"),
        (["--mode", "ssd", "--k", "0"], "k (tokens drafted per round)"),
        (["--max_length", "0"], "--max_length must be >= 1"),
        (["--temperature", "-1"], "temperature"),
        (["--top_p", "1.5"], "top_p"),
    ):
        code, _, err = generate(capsys, *base, *extra)
        assert code == 2 and message in err, err


def test_dee_mode(checkpoint, capsys):
    path, _, _ = checkpoint
    base = ["--checkpoint", str(path), "--prompt", PROMPT, "--max_length", "12"]
    _, ar_out, _ = generate(capsys, *base)
    code, out, _ = generate(capsys, *base, "--mode", "dee", "--conf", "2.0")  # unreachable: the full model
    assert code == 0 and out == ar_out


def test_help_lists_the_seed_spellings(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    for flag in ("--max_length", "--temperature", "--top_k", "--top_p", "--mode", "--draft_layer", "--k", "--json"):
        assert flag in out


def test_text_stream_prints_each_new_suffix_once_and_holds_back_partial_characters():
    from io import StringIO

    from layerskip.cli.generate import TextStream

    class Bytes:  # a tokenizer whose ids are UTF-8 bytes
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    out = StringIO()
    stream = TextStream(Bytes(), list(b"a "), out)
    stream.flush(final=False)
    for chunk in (b"\xe2", b"\x80", b"\x94", b" b"):  # an em dash arrives one byte at a time
        stream.write(list(chunk))
        assert "\ufffd" not in out.getvalue()
    stream.flush()
    assert out.getvalue() == "a \u2014 b"


def test_stop_at_eol(checkpoint, capsys, tmp_path):
    path, model, tok = checkpoint
    ids = tok.encode(PROMPT)
    full = Autoregressive().generate(model, ids, 20).tokens
    code, _, _ = generate(capsys, "--checkpoint", str(path), "--prompt", PROMPT, "--max_length", "20",
                          "--stop_at_eol", "--mode", "ssd", "--json", str(tmp_path / "eol.json"))
    doc = json.loads((tmp_path / "eol.json").read_text())
    expected = full[: full.index(tok.eol_id) + 1] if tok.eol_id in full else full
    assert code == 0 and doc["tokens"] == expected
    assert doc["summary"]["stop_reason"] == ("eos" if tok.eol_id in full else "length")


def test_threads_follow_the_models_size_unless_given(checkpoint, capsys, monkeypatch):
    import torch

    from layerskip import device

    path, model, _ = checkpoint
    asked = []

    def rule(num_parameters, where):
        asked.append((num_parameters, torch.device(where).type))
        return 2

    monkeypatch.setattr(device, "decoding_threads", rule)
    try:
        assert generate(capsys, "--checkpoint", str(path), "--prompt", PROMPT, "--max_length", "2")[0] == 0
        assert asked == [(model.num_parameters(), "cpu")] and torch.get_num_threads() == 2
        assert generate(capsys, "--checkpoint", str(path), "--prompt", PROMPT, "--max_length", "2", "--threads", "1",
                        "--device", "cpu")[0] == 0
        assert len(asked) == 1 and torch.get_num_threads() == 1  # --threads wins
    finally:
        torch.set_num_threads(1)
