"""GGUF export of Hugging Face Llama directories read in place (--checkpoint HF_DIR or hf:OWNER/NAME).

A tiny LlamaForCausalLM saved by transformers (GQA, llama3 rope scaling, explicit head_dim, untied head) with
(a) a Llama 3 style tokenizer.json (byte-level BPE, Llama 3's pre-tokenizer regex, ignore_merges, special tokens
after the BPE's, BOS from the post-processor) or (b) a Llama 2 style tokenizer.model (SentencePiece BPE, byte
fallback, identity normaliser, BOS/EOS). Read back with gguf.GGUFReader; where llama_cpp is installed, llama.cpp
tokenizes text exactly as the directory's tokenizer does and its logits match ours, for the full file and for
the draft file against our exit at E. Refusals name what llama.cpp cannot do alike. Nothing is downloaded."""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import pytest
import torch
from conftest import make_wikitext_lines, tiny_model
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
    return tokenizers.Tokenizer.from_str(trained_llama3_json())


@functools.cache
def trained_llama3_json() -> str:
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
    return tok.to_str()


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


def export(kind: str, tmp_path_factory) -> tuple:
    """(kind, transformers' model, the tokenizer library's tokenizer, our checkpoint, full file, draft file)."""
    directory = tmp_path_factory.mktemp(kind.replace(".", "-"))
    hf, tok = make_hf_dir(directory, kind)
    out = tmp_path_factory.mktemp("gguf")
    export_gguf(directory, out / "m.gguf", draft_layer=E, draft_out=out / "d.gguf")
    return kind, hf, tok, layerskip.load(directory, device="cpu", dtype="float32"), out / "m.gguf", out / "d.gguf"


@pytest.fixture(scope="module")
def json_export(tmp_path_factory):
    return export("tokenizer.json", tmp_path_factory)


@pytest.fixture(scope="module")
def spm_export(tmp_path_factory):
    return export("tokenizer.model", tmp_path_factory)


@pytest.fixture(params=["json_export", "spm_export"])
def exported(request):
    return request.getfixturevalue(request.param)


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


def test_a_tokenizer_json_is_llama_cpps_byte_level_bpe_with_llama3s_pre_tokenizer(json_export):
    _, _, tok, _, full, draft = json_export
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


def test_a_tokenizer_model_is_written_as_it_is_with_the_models_bos_and_eos(spm_export):
    _, _, proto, ckpt, full, draft = spm_export
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


def test_special_tokens_text_is_read_as_tokenizers_does_when_llama_cpp_parses_special_tokens(json_export):
    _, _, tok, ckpt, full, _ = json_export
    model = llama(full, vocab_only=True)
    for text in (f"a{SPECIALS[3]}b", f"x {SPECIALS[1]} y{USER_TOKEN}z"):
        ids = tok.encode(text).ids
        assert {tok.token_to_id(s) for s in SPECIALS} & set(ids) and ckpt.tokenizer.encode(text) == ids
        assert model.tokenize(text.encode(), add_bos=True, special=True) == ids
        assert model.tokenize(text.encode(), add_bos=True, special=False) != ids  # the special text spelt out


def test_the_texts_tell_llama3s_pre_tokenizer_from_gpt2s(json_export, tmp_path, monkeypatch):
    """Control: under llama.cpp's GPT-2 pre-tokenizer the same vocabulary splits some of TEXTS differently."""
    _, _, tok, ckpt, _, _ = json_export
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


def test_a_llama3_sized_vocabulary_is_written_whole_and_llama_cpp_tokenizes_with_it_alike():
    """128,000 BPE tokens and 256 special ones, as Llama 3 has (a synthetic BPE: every merge joins a token and a
    byte character); the export reads it in one pass (measured: about 0.3 s for the vocabulary)."""
    from layerskip.checkpoint import Checkpoint

    text = synthetic_llama3_json(128_000, 256)
    tok = JsonTokenizer(text, SpecialTokens(add_bos=True, bos=SPECIALS[0], eos=SPECIALS[1]), Path("synthetic"))
    vocab = gguf_vocab(tok)
    data = json.loads(text)
    assert len(vocab.tokens) == tok.vocab_size == 128_256 and len(vocab.merges) == len(data["model"]["merges"])
    assert [vocab.tokens[i] for i in (0, 255, 70_000, 127_999)] == [tok.id_to_piece(i) for i in (0, 255, 70_000,
                                                                                                  127_999)]
    assert vocab.types.count(gguf.TokenType.CONTROL) == 256 == len(vocab.types) - vocab.types.count(1)
    assert vocab.merges[70_000] == " ".join(data["model"]["merges"][70_000])
    pytest.importorskip("llama_cpp")
    model = tiny_model(vocab_size=tok.vocab_size, num_layers=1)
    with TemporaryDirectory() as out:
        export_gguf(Checkpoint(model=model, tokenizer=tok, model_config=model.config, tokenizer_config=None),
                    Path(out) / "m.gguf")
        cpp = llama(Path(out) / "m.gguf", vocab_only=True)
        for line in TEXTS:
            assert cpp.tokenize(line.encode(), add_bos=True, special=False) == tok.encode(line), line


def synthetic_llama3_json(num_bpe: int, num_special: int) -> str:
    """A tokenizer.json shaped like Llama 3's with num_bpe BPE tokens: the 256 byte characters, then each earlier
    token joined with each byte character in turn (one merge each), then num_special special tokens."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab, merges, k = {c: i for i, c in enumerate(alphabet)}, [], 0
    tokens = list(alphabet)
    while len(vocab) < num_bpe:
        left, right = tokens[k // len(alphabet)], alphabet[k % len(alphabet)]
        k += 1
        if left + right not in vocab:
            vocab[left + right] = len(vocab)
            tokens.append(left + right)
            merges.append([left, right])
    specials = SPECIALS + [f"<|reserved_special_token_{i}|>" for i in range(1, num_special - len(SPECIALS) + 1)]
    added = [{"id": num_bpe + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, s in enumerate(specials)]
    base = json.loads(llama3_json().to_str())
    return json.dumps({**base, "added_tokens": added, "post_processor": None,
                       "model": {**base["model"], "vocab": vocab, "merges": merges}})


@pytest.mark.parametrize("kind", ["tokenizer.json", "tokenizer.model"])
def test_a_model_whose_tokenizer_config_says_no_bos_gets_none_from_llama_cpp(kind, json_export, spm_export, tmp_path):
    """llama.cpp's llama-bpe (and SentencePiece) add a BOS unless the file says not to: the file says so."""
    from layerskip.checkpoint import Checkpoint
    from layerskip.hf.model_tokenizers import SpmModelTokenizer

    _, _, tok, ckpt, _, _ = json_export if kind == "tokenizer.json" else spm_export
    no_bos = SpecialTokens(add_bos=False, bos=None, eos=ckpt.tokenizer.eos_id)
    ours = JsonTokenizer(tok.to_str(), no_bos, Path("hf")) if kind == "tokenizer.json" else \
        SpmModelTokenizer(tok, no_bos, Path("hf"))
    assert ours.bos_id is None
    export_gguf(Checkpoint(model=ckpt.model, tokenizer=ours, model_config=ckpt.config, tokenizer_config=None),
                tmp_path / "m.gguf")
    keys = read(tmp_path / "m.gguf")[0]
    assert keys["tokenizer.ggml.add_bos_token"] is False
    assert keys.get("tokenizer.ggml.bos_token_id") == (None if kind == "tokenizer.json" else 1)  # the model's <s>
    model = llama(tmp_path / "m.gguf", vocab_only=True)
    assert [model.tokenize(t.encode(), add_bos=True, special=False) for t in TEXTS] == [ours.encode(t) for t in TEXTS]


# ----------------------------------------------------------------------------- the command, hf:, our own exports


def test_the_command_exports_an_hf_hub_id_with_its_draft(json_export, tmp_path, monkeypatch, capsys):
    hub = pytest.importorskip("huggingface_hub")
    _, _, _, ckpt, full, _ = json_export
    monkeypatch.setattr(hub, "snapshot_download", lambda repo_id, revision=None, allow_patterns=None: str(ckpt.path))
    assert main(["export-gguf", "--checkpoint", "hf:someone/tiny-llama3@main", "--out", str(tmp_path / "m.gguf"),
                 "--draft_layer", str(E), "--draft_out", str(tmp_path / "d.gguf"), "--dtype", "bf16"]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "m.gguf"), str(tmp_path / "d.gguf")]
    keys, tensors = read(tmp_path / "m.gguf")
    assert keys["general.name"] == "tiny-llama3"  # the repository, not the cache's snapshot directory
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    vocabulary = {k: v for k, v in read(full)[0].items() if k.startswith("tokenizer.")}
    assert {k: v for k, v in keys.items() if k.startswith("tokenizer.")} == vocabulary
    assert read(tmp_path / "d.gguf")[0]["llama.block_count"] == E


def test_a_directory_export_hf_wrote_keeps_layerskips_vocabulary(tmp_path, tiny_tokenizer):
    """Loaded from its Hugging Face export, a layerskip model keeps its own tokenizer, so its GGUF vocabulary is the
    one the layerskip checkpoint gives (end of line as "\\n"), not a Llama 2 model's."""
    from layerskip.checkpoint import save_checkpoint
    from layerskip.config import TokenizerConfig
    from layerskip.hf import export_hf

    save_checkpoint(tmp_path / "ckpt", tiny_model(vocab_size=tiny_tokenizer.vocab_size), tiny_tokenizer,
                    tokenizer_config=TokenizerConfig(vocab_size=400))
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    export_gguf(tmp_path / "ckpt", tmp_path / "ours.gguf")
    export_gguf(tmp_path / "hf", tmp_path / "hf.gguf")
    ours, theirs = read(tmp_path / "ours.gguf")[0], read(tmp_path / "hf.gguf")[0]
    assert ours["tokenizer.ggml.tokens"][tiny_tokenizer.eol_id] == "\n"
    assert {k: v for k, v in theirs.items() if k.startswith("tokenizer.")} == \
        {k: v for k, v in ours.items() if k.startswith("tokenizer.")}


# ----------------------------------------------------------------------------- refusals


def json_tokenizer(edit) -> JsonTokenizer:
    """The Llama 3 style tokenizer with its tokenizer.json changed by edit(data)."""
    data = json.loads(llama3_json().to_str())
    edit(data)
    return JsonTokenizer(json.dumps(data), SpecialTokens(add_bos=None, bos=None, eos=SPECIALS[1]), Path("hf"))


def gpt2_pre(data):
    data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def other_regex(data):
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {"Regex": r"\p{N}{1,2}|\S+|\s+"}


@pytest.mark.parametrize("edit, message", [
    (gpt2_pre, r"pre-tokenizer \(ByteLevel with GPT-2's regex\) is not Llama 3's"),
    (other_regex, r"pre-tokenizer \(Split on \{\"Regex\": \"\\\\p\{N\}\{1,2\}.*is not Llama 3's"),
    (lambda d: d["model"].update(ignore_merges=False), "ignore_merges false"),
    (lambda d: d.update(normalizer={"type": "NFC"}), r"normalises text \(NFC\)"),
    (lambda d: d.update(decoder=None), "decoder is none, not ByteLevel"),
    (lambda d: d["model"].update(dropout=0.1), r"drops merges at random \(dropout 0.1\)"),
    (lambda d: d["model"].update(byte_fallback=True), "falls back to <0xXX> byte tokens"),
    (lambda d: d["added_tokens"][-1].update(lstrip=True), "'<unk>' is matched with lstrip"),
])
def test_tokenizer_json_settings_llama_cpp_cannot_follow_are_refused_with_the_reason(edit, message):
    with pytest.raises(CheckpointError, match=message):
        gguf_vocab(json_tokenizer(edit))


def test_a_model_without_an_end_of_sequence_token_is_refused():
    tok = json_tokenizer(lambda d: None)
    tok.eos_id = None
    with pytest.raises(CheckpointError, match="name no end-of-sequence token.*generation_config.json"):
        gguf_vocab(tok)


@pytest.mark.parametrize("settings, message", [
    ({"normalization_rule_name": "nmt_nfkc"}, r"normalises text \(NFKC"),
    ({"remove_extra_whitespaces": True}, "collapses repeated ones"),
])
def test_tokenizer_models_that_change_text_before_splitting_it_are_refused(settings, message):
    from layerskip.hf.model_tokenizers import SpmModelTokenizer

    tok = SpmModelTokenizer(llama2_spm(**settings), SpecialTokens(add_bos=True, bos=None, eos=2), Path("hf"))
    with pytest.raises(CheckpointError, match=message):
        gguf_vocab(tok)


def test_a_directory_whose_tokenizer_is_refused_gets_no_file(tmp_path):

    hf_llama(tmp_path / "hf", vocab_size=300)
    bpe_tokenizer().save(str(tmp_path / "hf" / "tokenizer.json"))  # GPT-2's pre-tokenizer
    with pytest.raises(CheckpointError, match="ByteLevel with GPT-2's regex"):
        export_gguf(tmp_path / "hf", tmp_path / "m.gguf", draft_layer=1, draft_out=tmp_path / "d.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_merges_written_as_strings_by_older_tokenizers_are_read_alike():
    pairs = gguf_vocab(json_tokenizer(lambda d: None)).merges
    strings = gguf_vocab(json_tokenizer(lambda d: d["model"].update(merges=[" ".join(m) for m in d["model"]["merges"]])))
    assert strings.merges == pairs and len(pairs) > 50 and all(m.count(" ") == 1 for m in pairs)
