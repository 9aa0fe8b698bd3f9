"""Hugging Face Llama directories loaded in place (--checkpoint HF_DIR, layerskip.load): logits equal
transformers' at every shape (rope scaling llama3 and linear in both spellings, explicit head_dim, GQA,
tied and untied), greedy SSD and DEE equal AR on them, tokenizer.json tokenizers and their BOS/EOS, hf:REPO."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_dirs import BOS, BPE_VOCAB, EOS, SHAPES, bpe_tokenizer, hf_llama, write_json

import layerskip
from layerskip.checkpoint import load_checkpoint
from layerskip.cli import main
from layerskip.errors import CheckpointError
from layerskip.hf import JsonTokenizer, read_model_tokenizer

TEXTS = [" = Robert Boulter = ", "The game began in 2011 .", "a\nb\n\nc", "héllo wörld ＡＢＣ 😀", "", " ", "\n",
         "x @-@ y <unk> z", "  two  spaces  "]


@pytest.fixture(scope="module")
def bpe():
    return bpe_tokenizer()


def make_dir(directory: Path, bpe, shape: str, *, spelling: str = "5.x", seed: int = 0):
    """An HF directory with a tokenizer.json only; returns transformers' model."""
    model = hf_llama(directory, vocab_size=BPE_VOCAB, spelling=spelling, seed=seed, **SHAPES[shape])
    bpe.save(str(directory / "tokenizer.json"))
    return model


@pytest.fixture(scope="module", params=[(shape, spelling) for shape in SHAPES for spelling in ("4.x", "5.x")
                                        if not (shape.startswith("plain") and spelling == "4.x")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def hf_dir(request, bpe, tmp_path_factory):
    shape, spelling = request.param
    directory = tmp_path_factory.mktemp(f"hf-{shape}-{spelling}")
    return directory, make_dir(directory, bpe, shape, spelling=spelling), shape


# ----------------------------------------------------------------------------- equal to transformers


def test_logits_equal_transformers_at_every_position(hf_dir):
    directory, hf, shape = hf_dir
    ckpt = layerskip.load(directory, device="cpu", dtype="float32")
    cfg = ckpt.config
    assert cfg.head_dim == (hf.config.head_dim or 8) and cfg.kv_heads == hf.config.num_key_value_heads
    assert cfg.tie_embeddings == hf.config.tie_word_embeddings
    idx = torch.randint(0, BPE_VOCAB, (2, cfg.max_seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = ckpt.model(idx).logits, hf(idx).logits
    assert ours.abs().max() > 1  # spread-out logits: agreement is not trivial
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)
    if cfg.rope_scaling is not None:  # the scaling matters here: without it the logits differ
        plain = layerskip.load(directory, device="cpu", dtype="float32")
        plain.model.config = cfg.__class__(**{**cfg.to_dict(), "rope_scaling": None})
        plain.model.reset_rotary()
        with torch.no_grad():
            assert (plain.model(idx).logits - theirs).abs().max() > 1e-2


def test_greedy_ssd_and_unreachable_dee_equal_greedy_ar(hf_dir):
    directory, _, _ = hf_dir
    ckpt = layerskip.load(directory, device="cpu")
    ar = layerskip.generate(ckpt, "The game", max_new_tokens=24)
    assert len(ar.tokens) > 0 and ar.prompt_tokens[0] == ckpt.tokenizer.bos_id
    for draft_layer in (1, 2):
        for k in (2, 4):
            ssd = layerskip.generate(ckpt, "The game", max_new_tokens=24, mode="ssd", draft_layer=draft_layer, k=k)
            assert ssd.tokens == ar.tokens, (draft_layer, k)
    dee = layerskip.generate(ckpt, "The game", max_new_tokens=24, mode="dee", conf=2.0)
    assert dee.tokens == ar.tokens and dee.text == ar.text


def test_the_config_carries_rope_scaling_and_head_dim_both_spellings_alike(bpe, tmp_path):
    loaded = {}
    for spelling in ("4.x", "5.x"):
        make_dir(tmp_path / spelling, bpe, "llama3-gqa-tied-head_dim", spelling=spelling)
        loaded[spelling] = layerskip.load(tmp_path / spelling, device="cpu").config
    assert loaded["4.x"] == loaded["5.x"]
    scaling = loaded["5.x"].rope_scaling
    assert (scaling.rope_type, scaling.factor, scaling.original_max_position_embeddings) == ("llama3", 8.0, 32)
    assert loaded["5.x"].head_dim == 16 and loaded["5.x"].d_model == 32


# ----------------------------------------------------------------------------- tokenizer.json


def test_a_tokenizer_json_tokenizer_encodes_exactly_like_tokenizers(bpe, tmp_path):
    bpe.save(str(tmp_path / "tokenizer.json"))
    tok = read_model_tokenizer(tmp_path)
    assert isinstance(tok, JsonTokenizer) and tok.vocab_size == BPE_VOCAB
    for text in TEXTS:
        assert tok.encode(text) == bpe.encode(text).ids, text  # the post-processor's BOS included
        assert tok.decode(tok.encode(text)) == bpe.decode(bpe.encode(text).ids), text
    assert tok.bos_id == bpe.token_to_id(BOS) and tok.eos_id is None
    assert tok.eol_id == bpe.encode("\n", add_special_tokens=False).ids[0]
    lines = ["a b", " = Heading = ", ""]
    assert tok.encode_lines(lines) == [bpe.encode(line + "\n", add_special_tokens=False).ids for line in lines]
    assert tok.id_to_piece(tok.bos_id) == BOS


def test_bos_and_eos_follow_the_directory_configs(tmp_path):
    plain = bpe_tokenizer(bos_template=False)
    plain.save(str(tmp_path / "tokenizer.json"))
    assert read_model_tokenizer(tmp_path).encode("a b") == plain.encode("a b").ids  # no BOS said, none added
    write_json(tmp_path / "tokenizer_config.json", {"add_bos_token": True, "bos_token": {"content": BOS}})
    write_json(tmp_path / "generation_config.json", {"eos_token_id": [plain.token_to_id(EOS), 5]})
    tok = read_model_tokenizer(tmp_path)
    assert tok.encode("a b") == [plain.token_to_id(BOS)] + plain.encode("a b").ids
    assert tok.eos_id == plain.token_to_id(EOS)  # the first of the listed stop tokens
    assert tok.stop_ids == (plain.token_to_id(EOS), 5)  # generation stops at any of them
    bpe_tokenizer().save(str(tmp_path / "tokenizer.json"))  # a post-processor adding <s> ...
    write_json(tmp_path / "tokenizer_config.json", {"add_bos_token": False})  # ... overruled by the config
    assert read_model_tokenizer(tmp_path).encode("a b") == plain.encode("a b").ids
    write_json(tmp_path / "tokenizer_config.json", {"add_bos_token": True, "bos_token": "<nope>"})
    with pytest.raises(CheckpointError, match="'<nope>' is not in the tokenizer's vocabulary"):
        read_model_tokenizer(tmp_path)


def test_generation_stops_at_the_models_eos(bpe, tmp_path):
    make_dir(tmp_path, bpe, "plain-gqa-untied")
    ckpt = layerskip.load(tmp_path, device="cpu")
    assert ckpt.tokenizer.eos_id == 1 and ckpt.tokenizer.stop_ids == (1,)  # generation_config.json's
    ckpt.tokenizer.stop_ids = ()
    free = layerskip.generate(ckpt, "The game", max_new_tokens=20)
    assert len(free.tokens) == 20
    ckpt.tokenizer.stop_ids = (1, free.tokens[5])  # make a token the greedy continuation meets a stop token
    for mode, options in (("ar", {}), ("ssd", {"draft_layer": 1, "k": 3}), ("dee", {"conf": 2.0})):
        out = layerskip.generate(ckpt, "The game", max_new_tokens=20, mode=mode, **options)
        assert out.tokens == free.tokens[: free.tokens.index(free.tokens[5]) + 1], mode
        assert out.stats["stop_reason"] == "eos"


def test_a_tokenizer_model_is_used_the_models_way(tiny_tokenizer, tmp_path):
    hf_llama(tmp_path, vocab_size=tiny_tokenizer.vocab_size)
    tiny_tokenizer.save(tmp_path / "tokenizer.model")
    write_json(tmp_path / "generation_config.json", {"eos_token_id": 2})
    tok = layerskip.load(tmp_path, device="cpu").tokenizer
    sp = tiny_tokenizer.sp
    assert tok.encode("a b\nc d") == sp.encode("a b\nc d")  # no BOS in this model; a newline is not its eos
    assert tok.eol_id == sp.piece_to_id("<0x0A>") and tok.eos_id == 2 and tok.bos_id is None
    assert tok.cache_key != tiny_tokenizer.cache_key  # it encodes WikiText differently from layerskip's way


# ----------------------------------------------------------------------------- commands and API


def test_every_command_takes_the_directory(bpe, tmp_path, tiny_corpus_dir, capsys):
    make_dir(tmp_path / "hf", bpe, "llama3-gqa-tied-head_dim")
    hf = str(tmp_path / "hf")
    assert main(["generate", "--checkpoint", hf, "--prompt", "The game", "--max_length", "6", "--dtype", "bfloat16",
                 "--json", str(tmp_path / "g.json")]) == 0
    doc = json.loads((tmp_path / "g.json").read_text())
    assert doc["dtype"] == "bfloat16" and doc["summary"]["new_tokens"] >= 1
    assert main(["eval", "--checkpoint", hf, "--data_dir", str(tiny_corpus_dir), "--max_tokens", "200",
                 "--batch_size", "2", "--json", str(tmp_path / "e.json")]) == 0
    rows = json.loads((tmp_path / "e.json").read_text())["layers"]
    assert len(rows) == 3 and all(row["token_ppl"] > 1 for row in rows)
    assert main(["calibrate", "--checkpoint", hf, "--data_dir", str(tiny_corpus_dir), "--max_tokens", "300",
                 "--seq_len", "32", "--gen_prompts", "1", "--gen_tokens", "4", "--output",
                 str(tmp_path / "t.json")]) == 0
    assert json.loads((tmp_path / "t.json").read_text())["num_layers"] == 3
    assert main(["bench", "--checkpoint", hf, "--data_dir", str(tiny_corpus_dir), "--num_prompts", "1",
                 "--prompt_tokens", "8", "--new_tokens", "4", "--ks", "2", "--draft_layers", "1", "--dee_measures",
                 "softmax", "--dee_thresholds", "2.0", "--temperature", "0", "--eval_tokens", "0", "--cost_repeats",
                 "0", "--threads", "1", "--quiet", "--dtype", "bfloat16", "--out", str(tmp_path / "b.json")]) == 0
    bench = json.loads((tmp_path / "b.json").read_text())
    assert bench["models"][0]["dtype"] == "torch.bfloat16" and bench["settings"]["dtype"] == "bfloat16"
    assert {c["id"] for c in bench["models"][0]["configs"]} >= {"ar", "ssd-E1-k2"}
    capsys.readouterr()


def test_export_hf_refuses_a_model_that_already_is_a_hugging_face_directory(bpe, tmp_path, capsys):
    make_dir(tmp_path / "hf", bpe, "plain-gqa-untied")
    assert main(["export-hf", "--checkpoint", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 2
    assert "use that directory as it is" in capsys.readouterr().err
    assert main(["export-hf", "--import-from", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 2
    assert "loads directly" in capsys.readouterr().err  # no tokenizer.model to write a layerskip checkpoint with


def test_hub_ids_go_through_huggingface_hub(bpe, tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    make_dir(tmp_path / "snapshot", bpe, "plain-gqa-untied")
    asked = []

    def fake_download(repo_id, revision=None, allow_patterns=None):  # the cache, as if downloaded already
        asked.append((repo_id, revision))
        assert "tokenizer.json" in allow_patterns and "model.safetensors" in allow_patterns
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(hub, "snapshot_download", fake_download)
    ckpt = layerskip.load("hf:someone/tiny-llama@main", device="cpu")
    assert asked == [("someone/tiny-llama", "main")] and ckpt.meta["loaded_from"] == "hf:someone/tiny-llama@main"
    with pytest.raises(CheckpointError, match="not a Hugging Face repository id"):
        layerskip.load("hf:no-slash")


def test_a_hub_id_offline_fails_in_one_line(tmp_path):
    pytest.importorskip("huggingface_hub")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"),
           "HF_ENDPOINT": "http://127.0.0.1:9",  # should offline mode be ignored, nothing outside is reached
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-m", "layerskip", "generate", "--checkpoint",
                           "hf:facebook/layerskip-llama3.2-1B", "--prompt", "x"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "not in the local Hugging Face cache" in done.stderr
    assert done.stderr.startswith("layerskip generate: error: hf:facebook/layerskip-llama3.2-1B")


def test_a_config_whose_shapes_disagree_with_the_weights_is_refused_from_the_header(bpe, tmp_path):
    make_dir(tmp_path, bpe, "plain-gqa-untied")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 1_000_000_000}))
    with pytest.raises(CheckpointError, match="do not match config.json"):
        load_checkpoint(tmp_path)


class FakePanic(BaseException):
    """What tokenizers raises when its Rust code panics (pyo3's PanicException is a BaseException)."""


@pytest.mark.parametrize("failure", [Exception("data did not match any variant"), FakePanic("index out of bounds")])
def test_an_unreadable_tokenizer_json_is_one_clear_error(tmp_path, monkeypatch, failure):
    import tokenizers

    def refuse(text):
        raise failure

    bpe_tokenizer().save(str(tmp_path / "tokenizer.json"))
    monkeypatch.setattr(tokenizers.Tokenizer, "from_str", staticmethod(refuse))
    with pytest.raises(CheckpointError, match=f"is not a tokenizer tokenizers can read .{failure}"):
        read_model_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": ')  # and the real library on a truncated file
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="is not a tokenizer tokenizers can read"):
        read_model_tokenizer(tmp_path)
