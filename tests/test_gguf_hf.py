"""GGUF export of Hugging Face Llama directories read in place (--checkpoint HF_DIR or hf:OWNER/NAME).

A tiny LlamaForCausalLM saved by transformers (GQA, llama3 rope scaling, explicit head_dim, untied head) with
(a) a Llama 3 style tokenizer.json (byte-level BPE, Llama 3's pre-tokenizer regex, ignore_merges, special tokens
after the BPE's, BOS from the post-processor) or (b) a Llama 2 style tokenizer.model (SentencePiece BPE, byte
fallback, identity normaliser, BOS/EOS). Read back with gguf.GGUFReader; where llama_cpp is installed, llama.cpp
tokenizes text exactly as the directory's tokenizer does and its logits match ours, for the full file and for
the draft file against our exit at E. Refusals name what llama.cpp cannot do alike. Nothing is downloaded."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_wikitext_lines
from hf_dirs import LLAMA3, bpe_tokenizer, hf_llama, write_json

import layerskip
from layerskip.cli import main
from layerskip.errors import CheckpointError
from layerskip.hf.model_tokenizers import JsonTokenizer, SpecialTokens

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from test_gguf import expected_tensors, llama, llama_logits, read, values  # noqa: E402  (needs gguf)

from layerskip.gguf import export_gguf, gguf_vocab  # noqa: E402

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # as Meta's tokenizer.json spells it (written out, not imported)
BPE_SIZE = 400  # the trained byte-level BPE; the special tokens come after it, as in Llama 3
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|eot_id|>"]
USER_TOKEN = "<unk>"  # a non-special added token (WikiText's): user-defined in llama.cpp
SPM_SIZE = 400
SHAPE = dict(rope=LLAMA3, head_dim=16, num_key_value_heads=2, tie_word_embeddings=False)
E = 2
TEXTS = ["The game began in 2011 .", " = Robert Boulter = ", "I'll say DON'T, we've 12345 and 3.14!", "a\nb\n\nc",
         "  two  spaces \t tab", "héllo wörld café ∑ 日本 😀", "x @-@ y <unk> z", "ends with a newline\n", " ", ""]


def llama3_json() -> tokenizers.Tokenizer:
    """A byte-level BPE shaped like Llama 3's: its pre-tokenizer, ignore_merges, specials after the BPE, BOS first."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_SIZE, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = make_wikitext_lines(300, seed=5)
    paragraphs = ["\n\n".join(lines[i:i + 4]) for i in range(0, len(lines), 4)]  # "\n\n" a token: see the control
    tok.train_from_iterator(paragraphs + ["I'll don't 2011 3.14 café"], trainer)
    tok.add_special_tokens(SPECIALS)
    tok.add_tokens([USER_TOKEN])
    tok.post_processor = processors.TemplateProcessing(single=f"{SPECIALS[0]} $A",
                                                       special_tokens=[(SPECIALS[0], BPE_SIZE)])
    assert tok.get_vocab_size() == BPE_SIZE + len(SPECIALS) + 1 and tok.token_to_id(SPECIALS[0]) == BPE_SIZE
    return tok


def llama2_spm(**settings) -> bytes:
    """A SentencePiece BPE trained like Llama 2's tokenizer.model: identity normaliser, byte fallback, <unk> <s> </s>."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(make_wikitext_lines(300, seed=5)), model_writer=model, vocab_size=SPM_SIZE,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True,
        allow_whitespace_only_pieces=True, character_coverage=1.0, num_threads=1, minloglevel=2,
        **{"normalization_rule_name": "identity", "remove_extra_whitespaces": False, **settings})
    return model.getvalue()


def make_hf_dir(directory: Path, kind: str):
    """The tiny Llama with one of the two tokenizers and its config files; returns (transformers' model, tokenizer)."""
    if kind == "tokenizer.json":
        tok = llama3_json()
        size, bos, eos = tok.get_vocab_size(), tok.token_to_id(SPECIALS[0]), tok.token_to_id(SPECIALS[1])
        tokenizer_config = {"bos_token": SPECIALS[0], "eos_token": SPECIALS[1]}  # Llama 3's: no add_bos_token
    else:
        tok, size, bos, eos = llama2_spm(), SPM_SIZE, 1, 2
        tokenizer_config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>"}
    model = hf_llama(directory, vocab_size=size, **SHAPE)
    if kind == "tokenizer.json":
        tok.save(str(directory / "tokenizer.json"))
    else:
        (directory / "tokenizer.model").write_bytes(tok)
    for name in ("config.json", "generation_config.json"):
        data = json.loads((directory / name).read_text())
        write_json(directory / name, {**data, "bos_token_id": bos, "eos_token_id": eos})
    write_json(directory / "tokenizer_config.json", tokenizer_config)
    return model, tok


@pytest.fixture(scope="module", params=["tokenizer.json", "tokenizer.model"])
def exported(request, tmp_path_factory):
    """(kind, transformers' model, the tokenizer library's tokenizer, our checkpoint, full file, draft file)."""
    directory = tmp_path_factory.mktemp(request.param.replace(".", "-"))
    hf, tok = make_hf_dir(directory, request.param)
    out = tmp_path_factory.mktemp("gguf")
    export_gguf(directory, out / "m.gguf", draft_layer=E, draft_out=out / "d.gguf")
    ckpt = layerskip.load(directory, device="cpu", dtype="float32")
    return request.param, hf, tok, ckpt, out / "m.gguf", out / "d.gguf"


# ----------------------------------------------------------------------------- what the files hold


def test_every_setting_and_tensor_is_the_directorys_in_both_files(exported):
    _, hf, _, ckpt, full, draft = exported
    c = hf.config
    for path, blocks in ((full, c.num_hidden_layers), (draft, E)):
        keys, tensors = read(path)
        llama = {k.removeprefix("llama."): v for k, v in keys.items() if k.startswith("llama.")}
        assert llama == {  # from transformers' config, not ours
            "vocab_size": c.vocab_size, "context_length": c.max_position_embeddings,
            "embedding_length": c.hidden_size, "block_count": blocks, "feed_forward_length": c.intermediate_size,
            "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_key_value_heads,
            "attention.key_length": c.head_dim, "attention.value_length": c.head_dim,
            "rope.dimension_count": c.head_dim, "rope.freq_base": pytest.approx(10000.0),
            "attention.layer_norm_rms_epsilon": pytest.approx(c.rms_norm_eps)}
        assert c.head_dim * c.num_attention_heads != c.hidden_size and c.num_key_value_heads < c.num_attention_heads
        assert keys["layerskip.block_count_full"] == c.num_hidden_layers
        expected = expected_tensors(ckpt.model, blocks)
        assert sorted(tensors) == sorted(expected) and "output.weight" in tensors  # untied
        for name, tensor in expected.items():
            np.testing.assert_array_equal(values(tensors[name]), tensor.numpy(), err_msg=name)
        np.testing.assert_array_equal(values(tensors["token_embd.weight"]),
                                      hf.model.embed_tokens.weight.detach().numpy())
        d = c.head_dim  # llama.cpp divides its plain frequencies by rope_freqs: transformers' llama3 ones come out
        plain = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        np.testing.assert_allclose(plain.numpy() / values(tensors["rope_freqs.weight"]),
                                   hf.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)


def test_a_tokenizer_json_is_llama_cpps_byte_level_bpe_with_llama3s_pre_tokenizer(exported):
    kind, _, tok, _, full, draft = exported
    if kind != "tokenizer.json":
        pytest.skip("tokenizer.json only")
    keys = read(full)[0]
    T, size = gguf.TokenType, tok.get_vocab_size()
    assert (keys["tokenizer.ggml.model"], keys["tokenizer.ggml.pre"]) == ("gpt2", "llama-bpe")
    assert keys["tokenizer.ggml.tokens"] == [tok.id_to_token(i) for i in range(size)]  # byte-level text, id order
    merges = json.loads(tok.to_str())["model"]["merges"]
    assert len(merges) > 50 and keys["tokenizer.ggml.merges"] == [" ".join(pair) for pair in merges]
    assert keys["tokenizer.ggml.token_type"] == [T.NORMAL] * BPE_SIZE + [T.CONTROL] * len(SPECIALS) + [T.USER_DEFINED]
    assert keys["tokenizer.ggml.bos_token_id"] == tok.token_to_id(SPECIALS[0]) == BPE_SIZE
    assert keys["tokenizer.ggml.eos_token_id"] == tok.token_to_id(SPECIALS[1])
    assert keys["tokenizer.ggml.add_bos_token"] is True  # the post-processor's BOS (no add_bos_token in the configs)
    assert keys["tokenizer.ggml.add_eos_token"] is False
    for absent in ("scores", "unknown_token_id", "add_space_prefix"):
        assert f"tokenizer.ggml.{absent}" not in keys
    draft_keys = read(draft)[0]
    assert {k: v for k, v in draft_keys.items() if k.startswith("tokenizer.")} == \
        {k: v for k, v in keys.items() if k.startswith("tokenizer.")}


def test_a_tokenizer_model_is_written_as_it_is_with_the_models_bos_and_eos(exported):
    kind, _, proto, ckpt, full, draft = exported
    if kind != "tokenizer.model":
        pytest.skip("tokenizer.model only")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=proto)
    keys, T = read(full)[0], gguf.TokenType
    size = sp.get_piece_size()
    assert keys["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.pre" not in keys
    assert keys["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(size)]  # no newline token made up
    assert keys["tokenizer.ggml.scores"] == pytest.approx([sp.get_score(i) for i in range(size)])

    def kind_of(i):
        return T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else T.BYTE if sp.is_byte(i) \
            else T.NORMAL
    assert keys["tokenizer.ggml.token_type"] == [kind_of(i) for i in range(size)]
    assert sum(t == T.BYTE for t in keys["tokenizer.ggml.token_type"]) == 256
    assert (keys["tokenizer.ggml.bos_token_id"], keys["tokenizer.ggml.eos_token_id"]) == (1, 2) == \
        (ckpt.tokenizer.bos_id, ckpt.tokenizer.eos_id)
    assert keys["tokenizer.ggml.unknown_token_id"] == sp.unk_id() == 0
    assert keys["tokenizer.ggml.add_bos_token"] is True and keys["tokenizer.ggml.add_eos_token"] is False
    assert keys["tokenizer.ggml.add_space_prefix"] is True and "tokenizer.ggml.merges" not in keys
    assert read(draft)[0]["tokenizer.ggml.tokens"] == keys["tokenizer.ggml.tokens"]


# ----------------------------------------------------------------------------- llama.cpp itself


def test_llama_cpp_tokenizes_text_exactly_as_the_directorys_tokenizer(exported):
    kind, _, tok, ckpt, full, _ = exported
    model = llama(full, vocab_only=True)
    if kind == "tokenizer.json":
        theirs = [tok.encode(text).ids for text in TEXTS]  # the tokenizers library itself, BOS included
    else:
        import sentencepiece as spm

        theirs = [[1] + spm.SentencePieceProcessor(model_proto=tok).encode(text) for text in TEXTS]
    assert [ckpt.tokenizer.encode(text) for text in TEXTS] == theirs
    assert [model.tokenize(text.encode(), add_bos=True, special=False) for text in TEXTS] == theirs
    assert model.token_bos() == ckpt.tokenizer.bos_id and model.token_eos() == ckpt.tokenizer.eos_id
    assert sum(len(ids) for ids in theirs) > 2 * len(TEXTS)


def test_the_texts_tell_llama3s_pre_tokenizer_from_gpt2s(exported, tmp_path, monkeypatch):
    """Control: under llama.cpp's GPT-2 pre-tokenizer the same vocabulary splits some of TEXTS differently."""
    kind, _, tok, ckpt, _, _ = exported
    if kind != "tokenizer.json":
        pytest.skip("tokenizer.json only")
    import layerskip.gguf.hf_vocab as hf_vocab

    monkeypatch.setattr(hf_vocab, "LLAMA3_PRE", "gpt-2")
    export_gguf(ckpt, tmp_path / "gpt2.gguf")
    model = llama(tmp_path / "gpt2.gguf", vocab_only=True)
    assert any(model.tokenize(text.encode(), add_bos=True, special=False) != tok.encode(text).ids for text in TEXTS)


@torch.no_grad()
def test_llama_cpp_logits_match_ours_and_the_draft_matches_our_exit(exported):
    _, hf, _, ckpt, full, draft = exported
    n_ctx = hf.config.max_position_embeddings
    idx = torch.randint(0, hf.config.vocab_size, (1, n_ctx), generator=torch.Generator().manual_seed(1))
    ours, exit_e = ckpt.model(idx).logits[0].numpy(), ckpt.model(idx, exit_layer=E).logits[0].numpy()
    assert np.abs(ours).max() > 1 and not np.allclose(ours, exit_e, atol=1e-2)
    tokens = idx[0].tolist()  # every position, past original_max_position_embeddings (32): all rope bands count
    np.testing.assert_allclose(llama_logits(full, tokens, n_ctx), ours, rtol=0, atol=5e-5)
    np.testing.assert_allclose(llama_logits(full, tokens, n_ctx), hf(idx).logits[0].numpy(), rtol=0, atol=5e-5)
    np.testing.assert_allclose(llama_logits(draft, tokens, n_ctx), exit_e, rtol=0, atol=5e-5)
