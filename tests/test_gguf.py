"""GGUF export: every tensor and setting read back with gguf.GGUFReader, the rotary row order, number types,
refusals and safe writes; where llama_cpp is installed, its tokens, logits and greedy output match ours."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from conftest import benchmark_script, make_wikitext_lines, tiny_model

from layerskip.checkpoint import load_checkpoint, save_checkpoint
from layerskip.cli import main
from layerskip.config import ModelConfig, RopeScaling, TokenizerConfig
from layerskip.errors import CheckpointError, ConfigError
from layerskip.model import apply_rotary, rotary_tables, scaled_frequencies
from layerskip.tokenizer import WIKITEXT_UNK, Tokenizer

gguf = pytest.importorskip("gguf")
from layerskip.gguf import export_gguf  # noqa: E402  (after the skip: the package needs gguf)

TOK_CFG = TokenizerConfig(vocab_size=400)
VARIANTS = {
    "tied": {},
    "untied": {"tie_embeddings": False},
    "gqa": {"num_kv_heads": 2, "tie_embeddings": False},
    "gqa-tied-odd-settings": {"num_kv_heads": 1, "rope_theta": 500.0, "norm_eps": 1e-6, "num_layers": 3},
    # Llama 3.2's rope scaling (bands chosen so that every one is exercised at head_dim 12) and an explicit head_dim
    "llama3-rope-head_dim": {"head_dim": 12, "num_kv_heads": 2, "rope_theta": 500.0, "rope_scaling": RopeScaling(
        "llama3", 4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)},
    "linear-rope": {"rope_scaling": RopeScaling("linear", 2.0), "tie_embeddings": False},
}
# llama.cpp's names for one block's tensors, and ours (written out here, not taken from the module under test)
BLOCK_NAMES = {"attn_norm": "attn_norm", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "attn_v": "attn.v_proj",
               "attn_output": "attn.o_proj", "ffn_norm": "mlp_norm", "ffn_gate": "mlp.gate_proj",
               "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def save_tiny(path, tokenizer, *, seed=0, **overrides):
    model = tiny_model(seed, vocab_size=tokenizer.vocab_size, **overrides)
    save_checkpoint(path, model, tokenizer, tokenizer_config=TOK_CFG)
    return model


def read(path):
    """(every key's value, every tensor by name) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def values(tensor) -> np.ndarray:
    """A tensor's numbers as float32, shaped like ours (rows, columns)."""
    return np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)  # a writable copy


def llama_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Expected row order: in each head, row 2j is our row j and row 2j + 1 our row j + D/2."""
    d = weight.shape[0] // heads
    order = [h * d + j + half * (d // 2) for h in range(heads) for j in range(d // 2) for half in (0, 1)]
    return weight[order]


def expected_tensors(model, num_blocks: int) -> dict[str, torch.Tensor]:
    cfg, state = model.config, model.state_dict()
    out = {"token_embd.weight": state["embed_tokens.weight"], "output_norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    if cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "llama3":  # llama.cpp divides by these
        plain = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
        out["rope_freqs.weight"] = plain / scaled_frequencies(plain, cfg.rope_scaling)
    for i in range(num_blocks):
        for theirs, ours in BLOCK_NAMES.items():
            w = state[f"layers.{i}.{ours}.weight"]
            heads = {"attn_q": cfg.num_heads, "attn_k": cfg.kv_heads}.get(theirs)
            out[f"blk.{i}.{theirs}.weight"] = w if heads is None else llama_rows(w, heads)
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


@pytest.fixture
def checkpoint(tmp_path, tokenizer):
    model = save_tiny(tmp_path / "ckpt", tokenizer)
    return model, tmp_path / "ckpt"


# ----------------------------------------------------------------------------- what the file holds


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_tensor_and_setting_is_the_checkpoints(variant, tmp_path, tokenizer):
    model = save_tiny(tmp_path / "ckpt", tokenizer, **VARIANTS[variant])
    cfg = model.config
    export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    keys, tensors = read(tmp_path / "m.gguf")
    expected = expected_tensors(model, cfg.num_layers)
    assert sorted(tensors) == sorted(expected)
    for name, tensor in expected.items():
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(values(tensors[name]), tensor.numpy(), err_msg=name)  # exact, f32
    llama = {k.removeprefix("llama."): v for k, v in keys.items() if k.startswith("llama.")}
    assert llama == {
        "vocab_size": cfg.vocab_size, "context_length": cfg.max_seq_len, "embedding_length": cfg.d_model,
        "block_count": cfg.num_layers, "feed_forward_length": cfg.d_ff, "attention.head_count": cfg.num_heads,
        "attention.head_count_kv": cfg.kv_heads, "attention.key_length": cfg.head_dim,
        "attention.value_length": cfg.head_dim, "rope.dimension_count": cfg.head_dim,
        "rope.freq_base": pytest.approx(cfg.rope_theta), "attention.layer_norm_rms_epsilon": pytest.approx(cfg.norm_eps),
        **({"rope.scaling.type": "linear", "rope.scaling.factor": pytest.approx(cfg.rope_scaling.factor)}
           if cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "linear" else {}),
    }
    assert keys["general.architecture"] == "llama"
    assert keys["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert keys["layerskip.block_count_full"] == cfg.num_layers
    assert ("output.weight" in tensors) == (not cfg.tie_embeddings)  # llama.cpp ties a missing head to the embedding


def test_the_vocabulary_is_ours_with_a_newline_for_end_of_line(checkpoint, tmp_path, tokenizer):
    export_gguf(checkpoint[1], tmp_path / "m.gguf")
    keys, _ = read(tmp_path / "m.gguf")
    sp, eol = tokenizer.sp, tokenizer.eol_id
    assert keys["tokenizer.ggml.model"] == "llama"
    tokens = keys["tokenizer.ggml.tokens"]
    assert len(tokens) == tokenizer.vocab_size
    assert tokens[eol] == "\n"
    assert [t for i, t in enumerate(tokens) if i != eol] == [sp.id_to_piece(i) for i in range(len(tokens)) if i != eol]
    assert keys["tokenizer.ggml.scores"] == pytest.approx([sp.get_score(i) for i in range(len(tokens))])
    T = gguf.TokenType

    def kind(i):
        if i == eol or sp.id_to_piece(i) == WIKITEXT_UNK:
            return T.USER_DEFINED  # split out of the text before tokenizing, as SentencePiece does
        return T.UNKNOWN if sp.is_unknown(i) else T.BYTE if sp.is_byte(i) else T.CONTROL if sp.is_control(i) \
            else T.NORMAL
    assert keys["tokenizer.ggml.token_type"] == [kind(i) for i in range(len(tokens))]
    assert sum(t == T.BYTE for t in keys["tokenizer.ggml.token_type"]) == 256  # byte fallback
    assert keys["tokenizer.ggml.eos_token_id"] == eol
    assert keys["tokenizer.ggml.unknown_token_id"] == sp.unk_id()
    assert keys["tokenizer.ggml.add_bos_token"] is False and keys["tokenizer.ggml.add_eos_token"] is False
    assert "tokenizer.ggml.bos_token_id" not in keys
    assert keys["tokenizer.ggml.add_space_prefix"] is True


@torch.no_grad()
def test_adjacent_pair_rotary_on_the_files_rows_gives_our_attention_scores(checkpoint, tmp_path):
    """Adjacent-pair rotary (llama.cpp's llama) on the file's q/k rows == our rotate-half on ours."""
    model, ckpt = checkpoint
    export_gguf(ckpt, tmp_path / "m.gguf")
    _, tensors = read(tmp_path / "m.gguf")
    cfg, block = model.config, model.layers[1].attn
    d, t = cfg.head_dim, 9
    x = torch.randn(t, cfg.d_model, generator=torch.Generator().manual_seed(3))
    cos, sin = rotary_tables(d, t, cfg.rope_theta)

    def ours(w, heads):  # (heads, T, D)
        return apply_rotary((x @ w.t()).view(t, heads, d).transpose(0, 1), cos, sin)

    def theirs(name, heads):
        y = (x @ torch.from_numpy(values(tensors[name])).t()).view(t, heads, d // 2, 2)
        angle = torch.arange(t)[:, None] * cfg.rope_theta ** (-torch.arange(0, d, 2) / d)  # (T, D/2)
        c, s = angle.cos()[None], angle.sin()[None]
        y = y.transpose(0, 1)
        return torch.stack((y[..., 0] * c - y[..., 1] * s, y[..., 0] * s + y[..., 1] * c), -1).flatten(-2)

    q, k = ours(block.q_proj.weight, cfg.num_heads), ours(block.k_proj.weight, cfg.kv_heads)
    q2, k2 = theirs("blk.1.attn_q.weight", cfg.num_heads), theirs("blk.1.attn_k.weight", cfg.kv_heads)
    scores = q @ k.transpose(1, 2)
    assert scores.abs().max() > 1
    np.testing.assert_allclose((q2 @ k2.transpose(1, 2)).numpy(), scores.numpy(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(q2, q, atol=1e-3)  # the rows did move


@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_the_draft_file_is_the_first_E_blocks_with_the_shared_norm_and_head(variant, tmp_path, tokenizer):
    model = save_tiny(tmp_path / "ckpt", tokenizer, **VARIANTS[variant])
    result = export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", draft_layer=2, draft_out=tmp_path / "d.gguf")
    assert (result.path, result.draft_path, result.draft_layer) == (tmp_path / "m.gguf", tmp_path / "d.gguf", 2)
    keys, tensors = read(tmp_path / "d.gguf")
    full_keys, full_tensors = read(tmp_path / "m.gguf")
    expected = expected_tensors(model, 2)
    assert sorted(tensors) == sorted(expected)
    assert any(name.startswith("blk.3.") for name in full_tensors)
    for name, tensor in expected.items():
        np.testing.assert_array_equal(values(tensors[name]), tensor.numpy(), err_msg=name)
    assert keys["llama.block_count"] == 2 and full_keys["llama.block_count"] == 4
    assert keys["layerskip.block_count_full"] == 4
    same = {k: v for k, v in full_keys.items() if k not in ("llama.block_count", "general.description")
            and not k.startswith("GGUF.")}
    assert {k: keys[k] for k in same} == same  # tokenizer, shape and rotary settings: the full model's


# ----------------------------------------------------------------------------- number types


def test_f16_and_bf16_round_each_weight_and_keep_norms_f32(checkpoint, tmp_path):
    model, ckpt = checkpoint
    expected = expected_tensors(model, model.config.num_layers)
    for dtype, torch_dtype, ftype in (("f16", torch.float16, gguf.LlamaFileType.MOSTLY_F16),
                                      ("bf16", torch.bfloat16, gguf.LlamaFileType.MOSTLY_BF16)):
        result = export_gguf(ckpt, tmp_path / f"{dtype}.gguf", dtype=dtype)
        keys, tensors = read(tmp_path / f"{dtype}.gguf")
        assert keys["general.file_type"] == ftype
        for name, tensor in expected.items():
            want = dtype.upper() if tensor.dim() == 2 else "F32"
            assert tensors[name].tensor_type.name == want == result.tensor_types[name]
            rounded = tensor.to(torch_dtype).float() if tensor.dim() == 2 else tensor
            np.testing.assert_array_equal(values(tensors[name]), rounded.numpy(), err_msg=f"{dtype} {name}")


def test_q8_0_stays_within_half_a_step_and_keeps_rows_it_cannot_pack_f16(tmp_path, tokenizer):
    model = save_tiny(tmp_path / "ckpt", tokenizer, d_model=48, num_heads=4, d_ff=64)  # rows of 48: not packable
    result = export_gguf(tmp_path / "ckpt", tmp_path / "q.gguf", dtype="q8_0")
    keys, tensors = read(tmp_path / "q.gguf")
    assert keys["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    for name, tensor in expected_tensors(model, model.config.num_layers).items():
        want = "F32" if tensor.dim() == 1 else "Q8_0" if tensor.shape[1] % 32 == 0 else "F16"
        assert tensors[name].tensor_type.name == want == result.tensor_types[name], name
        got, w = values(tensors[name]), tensor.numpy()
        if want == "Q8_0":  # per block of 32: a step of max|w|/127, stored as f16
            blocks = np.abs(w).reshape(w.shape[0], -1, 32).max(-1, keepdims=True)
            bound = np.repeat(blocks * 0.6 / 127, 32, axis=-1).reshape(w.shape) + 1e-7
            assert (np.abs(got - w) <= bound).all(), name
            assert not np.array_equal(got, w)
        else:
            np.testing.assert_array_equal(got, tensor.to(torch.float16).float().numpy() if want == "F16" else w)
    assert "Q8_0" in result.tensor_types.values() and "F16" in result.tensor_types.values()


# ----------------------------------------------------------------------------- refusals


def tokenizer_of(**settings) -> Tokenizer:
    return Tokenizer.train(make_wikitext_lines(400, 0), TokenizerConfig(vocab_size=300, **settings))


@pytest.mark.parametrize("settings, message", [
    ({"model_type": "unigram"}, "unigram model"),
    ({"byte_fallback": False}, "no byte fallback"),
])
def test_tokenizers_llama_cpp_would_split_differently_are_refused(settings, message, tmp_path):
    save_tiny(tmp_path / "ckpt", tokenizer_of(**settings))
    with pytest.raises(CheckpointError, match=message):
        export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == [tmp_path / "ckpt"]  # nothing written


def test_model_settings_the_export_does_not_know_are_refused(tmp_path, tokenizer):
    """A setting added to ModelConfig later (say a sliding window) is refused unless it is at its default."""
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class ScaledConfig(ModelConfig):
        sliding_window: dict | None = None

    save_tiny(tmp_path / "ckpt", tokenizer)
    ckpt = load_checkpoint(tmp_path / "ckpt")
    base = ckpt.model.config.to_dict()
    ckpt.model.config = ScaledConfig(**base)  # at its default: written as before
    export_gguf(ckpt, tmp_path / "m.gguf")
    ckpt.model.config = ScaledConfig(**base, sliding_window={"size": 8})
    with pytest.raises(CheckpointError, match=r"sliding_window=\{'size': 8\}.*cannot write"):
        export_gguf(ckpt, tmp_path / "s.gguf")
    assert not (tmp_path / "s.gguf").exists()


def test_weights_gguf_cannot_hold_are_refused(checkpoint, tmp_path):
    ckpt = load_checkpoint(checkpoint[1])
    with torch.no_grad():
        ckpt.model.layers[1].mlp.up_proj.weight[0, 0] = 1e6
    with pytest.raises(CheckpointError, match=r"blk\.1\.ffn_up\.weight .* beyond f16's range.*bf16 or f32"):
        export_gguf(ckpt, tmp_path / "m.gguf", dtype="f16")
    export_gguf(ckpt, tmp_path / "m.gguf", dtype="bf16")  # bf16 has the range
    with torch.no_grad():
        ckpt.model.norm.weight[3] = math.nan
    with pytest.raises(CheckpointError, match="output_norm.weight holds NaN"):
        export_gguf(ckpt, tmp_path / "n.gguf")


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "q4_0"}, "--dtype must be one of f32, f16, bf16, q8_0"),
    ({"draft_layer": 2}, "go together"),
    ({"draft_out": "d.gguf"}, "go together"),
    ({"draft_layer": 0, "draft_out": "d.gguf"}, r"--draft_layer must be in 1\.\.3"),
    ({"draft_layer": 4, "draft_out": "d.gguf"}, r"--draft_layer must be in 1\.\.3"),
    ({"draft_layer": 2, "draft_out": "m.gguf"}, "the same file"),
])
def test_bad_options_are_refused_before_writing(kwargs, message, checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        export_gguf(checkpoint[1], "m.gguf", **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_without_the_gguf_package_the_error_says_how_to_install_it(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[gguf\]"'):
        export_gguf(checkpoint[1], tmp_path / "m.gguf")


# ----------------------------------------------------------------------------- safe writes


def test_only_a_gguf_file_is_ever_replaced(checkpoint, tmp_path):
    ckpt = checkpoint[1]
    precious = tmp_path / "notes.gguf"
    precious.write_text("not a model")
    for out, draft in ((precious, None), (tmp_path / "m.gguf", precious)):
        with pytest.raises(ConfigError, match="exists and is not a GGUF file"):
            export_gguf(ckpt, out, draft_layer=None if draft is None else 2, draft_out=draft)
    assert precious.read_text() == "not a model" and not (tmp_path / "m.gguf").exists()
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(ConfigError, match="is a directory"):
        export_gguf(ckpt, tmp_path / "dir.gguf")
    export_gguf(ckpt, tmp_path / "m.gguf", dtype="f16")
    export_gguf(ckpt, tmp_path / "m.gguf", dtype="f32")  # an earlier export is replaced
    assert read(tmp_path / "m.gguf")[0]["general.file_type"] == gguf.LlamaFileType.ALL_F32


def test_an_interrupted_export_leaves_the_old_files_and_no_temporary_ones(checkpoint, tmp_path, monkeypatch):
    import layerskip.gguf.export as export

    ckpt = checkpoint[1]
    export_gguf(ckpt, tmp_path / "m.gguf", draft_layer=2, draft_out=tmp_path / "d.gguf")
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.gguf")}
    calls = []

    def failing(name, tensor, dtype):
        calls.append(name)
        if len(calls) > 50:  # inside the second (draft) file: the first one is already complete
            raise OSError("disk full")
        return real(name, tensor, dtype)

    real = export.encode
    monkeypatch.setattr(export, "encode", failing)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(ckpt, tmp_path / "m.gguf", dtype="f16", draft_layer=2, draft_out=tmp_path / "d.gguf")
    assert len(calls) > 38  # the full model's 38 tensors were written before the failure
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.gguf")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "d.gguf", "m.gguf"]


def test_cli_writes_both_files_and_reports_errors_in_one_line(checkpoint, tmp_path, capsys):
    ckpt = str(checkpoint[1])
    assert main(["export-gguf", "--checkpoint", ckpt, "--out", str(tmp_path / "m.gguf"), "--dtype", "q8_0",
                 "--draft-layer", "3", "--draft_out", str(tmp_path / "d.gguf")]) == 0
    out, err = capsys.readouterr()
    assert out.split() == [str(tmp_path / "m.gguf"), str(tmp_path / "d.gguf")]
    assert "q8_0" in err and "first 3 blocks" in err
    assert read(tmp_path / "d.gguf")[0]["llama.block_count"] == 3
    assert main(["export-gguf", "--checkpoint", ckpt, "--out", str(tmp_path / "m.gguf"), "--draft_layer", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--draft_layer and --draft_out go together" in err
    with pytest.raises(SystemExit):
        main(["export-gguf", "--checkpoint", ckpt, "--out", str(tmp_path / "m.gguf"), "--quantize"])


# ----------------------------------------------------------------------------- llama.cpp itself


def llama(path, **kwargs):
    """llama.cpp with an f32 KV cache (its default, f16, rounds keys and values; ours is f32)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    f32 = llama_cpp.GGML_TYPE_F32
    return llama_cpp.Llama(model_path=str(path), n_threads=1, n_threads_batch=1, type_k=f32, type_v=f32,
                           verbose=False, **kwargs)


def llama_logits(path, tokens: list[int], n_ctx: int) -> np.ndarray:
    """llama.cpp's logits at every position of tokens: (T, V)."""
    model = llama(path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True)
    model.eval(tokens)
    return np.array(model.scores[:len(tokens)])


def llama_greedy(path, prompt: list[int], n: int, n_ctx: int) -> list[int]:
    """Greedy continuation with llama-cpp-python's eval loop, one token at a time."""
    import llama_cpp

    model = llama(path, n_ctx=n_ctx, n_batch=n_ctx)
    model.eval(prompt)
    out = []
    for _ in range(n):  # eval keeps no logits without logits_all: read the newest row from the context
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(model.ctx, -1), shape=(model.n_vocab(),))
        out.append(int(logits.argmax()))
        model.eval([out[-1]])
    return out


def normal_form_text() -> str:
    """Lines as SentencePiece normalises them (no outer or repeated spaces), <unk> only at a line's end
    (see layerskip.gguf.vocab), plus characters outside the vocabulary (byte fallback) and empty lines."""
    lines = [" ".join(line.replace(WIKITEXT_UNK, "x").split()) for line in make_wikitext_lines(30, 5)]
    lines += ["The game was café ∑ 日本 ok", "the river <unk>", "", "= Heading =", "a <unk>"]
    return "\n".join(lines) + "\n"


def test_llama_cpp_tokenizes_text_in_normal_form_exactly_as_we_do(checkpoint, tmp_path, tokenizer):
    export_gguf(checkpoint[1], tmp_path / "m.gguf")
    model = llama(tmp_path / "m.gguf", vocab_only=True)
    text = normal_form_text()
    ours = tokenizer.encode(text)
    assert ours.count(tokenizer.eol_id) == text.count("\n") and ours.count(1) == 2
    assert any(3 <= t < 259 for t in ours)  # byte-fallback pieces are in there
    assert model.tokenize(text.encode(), add_bos=False, special=False) == ours
    assert model.tokenize(text.encode(), add_bos=True, special=False) == ours  # add_bos_token is false
    first = next(line for line in text.split("\n") if line)
    assert model.detokenize(tokenizer.encode(first)).decode() == " " + first  # llama-cpp-python keeps the "▁" prefix
    assert model.token_eos() == tokenizer.eol_id


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_llama_cpp_logits_and_greedy_tokens_match_ours_and_the_draft_matches_our_exit(variant, tmp_path, tokenizer):
    model = save_tiny(tmp_path / "ckpt", tokenizer, **VARIANTS[variant])
    E = 2
    export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", draft_layer=E, draft_out=tmp_path / "d.gguf")
    idx = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    tokens = idx[0].tolist()
    with torch.no_grad():
        full, exit_e = model(idx).logits[0].numpy(), model(idx, exit_layer=E).logits[0].numpy()
    assert np.abs(full).max() > 1
    n_ctx = model.config.max_seq_len
    # every position, whole tensors; f32 round-off only (measured: up to 5e-6 on logits up to 5)
    np.testing.assert_allclose(llama_logits(tmp_path / "m.gguf", tokens, n_ctx), full, rtol=0, atol=5e-5)
    np.testing.assert_allclose(llama_logits(tmp_path / "d.gguf", tokens, n_ctx), exit_e, rtol=0, atol=5e-5)
    assert not np.allclose(full, exit_e, atol=1e-2)  # the draft really is a shorter model
    ours = idx[:, :8]
    with torch.no_grad():
        for _ in range(24):  # plain greedy with full forward passes: the reference
            ours = torch.cat([ours, model(ours).logits[:, -1:].argmax(-1)], dim=1)
    assert llama_greedy(tmp_path / "m.gguf", tokens[:8], 24, n_ctx) == ours[0, 8:].tolist()


def test_peer_benchmark_runs_all_four_decoders_and_checks_their_tokens(tmp_path, tokenizer, tiny_corpus_dir):
    pytest.importorskip("llama_cpp")
    import json

    peer = benchmark_script("peer_llamacpp")
    save_tiny(tmp_path / "ckpt", tokenizer)
    out = tmp_path / "peer.json"
    threads = torch.get_num_threads()
    try:
        assert peer.main(["--checkpoint", str(tmp_path / "ckpt"), "--draft-layer", "2", "--k", "3",
                          "--max-new-tokens", "12", "--prompt-tokens", "8", "--prompts", "2", "--repeats", "1",
                          "--draft-vocab", "50", "--high-level", "--data-dir", str(tiny_corpus_dir), "--keep-gguf",
                          str(tmp_path / "gguf"), "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # the script sets it for the whole process
    doc = json.loads(out.read_text())
    labels = {"ours_ar", "ours_ssd", "ours_ssd_short_head", "llamacpp_ar", "llamacpp_speculative",
              "llamacpp_generate", "llamacpp_generate_draft_model"}
    assert set(doc["results"]) == labels
    assert all(doc["same_tokens_as_ours_ar"].values())  # every greedy decoder, llama.cpp's included
    assert doc["prompts_with_same_tokens_as_ours_ar"]["llamacpp_speculative"] == 2
    assert all(len(t) == 12 for entry in doc["results"].values() for t in entry["tokens"])
    assert 0 <= doc["acceptance_rate"]["llamacpp_speculative"] <= 1
    assert doc["versions"]["llama_cpp_python"] and doc["gguf"]["draft_layer"] == 2
    assert set(doc["ratios"]) >= {"llamacpp_ar_speedup_over_ours_ar", "llamacpp_speculative_speedup_over_llamacpp_ar"}
    assert read(tmp_path / "gguf" / "draft.gguf")[0]["llama.block_count"] == 2


def test_peer_benchmark_synthetic_twin_keeps_the_tokenizer_and_accepts_every_draft(tmp_path, tokenizer):
    """--synthetic: random bf16 weights of a scale.py shape behind the checkpoint's tokenizer, best case after E."""
    peer = benchmark_script("peer_llamacpp")
    save_tiny(tmp_path / "ckpt", tokenizer)
    bench = peer.load_model(tmp_path / "ckpt")
    twin = peer.synthetic_twin(bench, "seed-2.6M", draft_layer=2)
    cfg = twin.model.config
    assert (cfg.d_model, cfg.num_layers, cfg.vocab_size) == (128, 6, bench.model.config.vocab_size)
    assert twin.model.lm_head.weight.dtype == torch.bfloat16 and twin.checkpoint.tokenizer is bench.checkpoint.tokenizer
    assert twin.checkpoint.model is twin.model and twin.checkpoint.model_config == cfg
    off = [float(b.mlp.down_proj.weight.detach().abs().max()) for b in twin.model.layers]
    assert off[2:] == [0.0] * 4 and min(off[:2]) > 0
    with pytest.raises(ConfigError, match="--draft-layer must be in 1..5"):
        peer.synthetic_twin(bench, "seed-2.6M", draft_layer=6)
    with pytest.raises(ConfigError, match="--draft-vocab with --synthetic"):
        peer.parse_args(["--checkpoint", "x", "--synthetic", "seed-2.6M", "--draft-vocab", "64"])


def test_llama_cpp_python_speculative_decoding_with_the_draft_file_is_plain_greedy(tmp_path, tokenizer):
    from itertools import islice

    from layerskip.gguf import GGUFDraft

    model = save_tiny(tmp_path / "ckpt", tokenizer)
    export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", draft_layer=2, draft_out=tmp_path / "d.gguf")
    prompt = torch.randint(0, 400, (8,), generator=torch.Generator().manual_seed(2)).tolist()
    ours, exit_2 = torch.tensor([prompt]), torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(20):
            ours = torch.cat([ours, model(ours).logits[:, -1:].argmax(-1)], dim=1)
        for _ in range(3):  # what the draft should propose: greedy through our exit after 2 blocks
            exit_2 = torch.cat([exit_2, model(exit_2, exit_layer=2).logits[:, -1:].argmax(-1)], dim=1)
    f32 = pytest.importorskip("llama_cpp").GGML_TYPE_F32
    draft = GGUFDraft(tmp_path / "d.gguf", num_tokens=3, n_ctx=64, type_k=f32, type_v=f32, n_threads=1)
    calls = []
    proposer = lambda ids: calls.append(len(ids)) or draft(ids)  # noqa: E731
    llm = llama(tmp_path / "m.gguf", n_ctx=64, draft_model=proposer)
    for _ in range(2):  # the second time the draft's cache of the first run is reused or cut back
        assert list(islice(llm.generate(prompt, temp=0.0), 20)) == ours[0, 8:].tolist()
    assert len(calls) > 2
    draft.reset()
    assert draft(np.array(prompt)).tolist() == exit_2[0, 8:].tolist()
