"""Hugging Face export/import: transformers loads our exports with equal logits and an agreeing
tokenizer; ours -> HF -> ours is exact; what we cannot represent is refused."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import benchmark_script, make_wikitext_lines, tiny_model
from safetensors.torch import load_file, save_file

from layerskip.checkpoint import load_checkpoint, save_checkpoint
from layerskip.cli import main
from layerskip.config import TokenizerConfig
from layerskip.errors import CheckpointError
from layerskip.hf import export_hf, import_hf, read_spm

TOK_CFG = TokenizerConfig(vocab_size=400)
VARIANTS = {
    "tied": {},
    "untied": {"tie_embeddings": False},
    "gqa": {"num_kv_heads": 2, "tie_embeddings": False},
    "gqa-tied-odd-settings": {"num_kv_heads": 1, "rope_theta": 500.0, "norm_eps": 1e-6, "num_layers": 3},
    "llama3-head_dim": {"num_kv_heads": 2, "head_dim": 12, "rope_theta": 500.0,
                        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
    "linear-untied": {"tie_embeddings": False, "rope_scaling": {"rope_type": "linear", "factor": 3.0}},
}


def transformers_or_skip():
    return pytest.importorskip("transformers")


def save_tiny(path, tokenizer, *, seed=0, **overrides):
    model = tiny_model(seed, vocab_size=tokenizer.vocab_size, **overrides)
    save_checkpoint(path, model, tokenizer, tokenizer_config=TOK_CFG, train_config={"lr": 3e-4},
                    meta={"note": "tiny"})
    return model


def load_hf(directory):
    transformers = transformers_or_skip()
    return transformers.AutoModelForCausalLM.from_pretrained(directory).float().eval()  # fp32 in transformers 4 and 5


@pytest.fixture
def exported(tmp_path, tiny_tokenizer):
    model = save_tiny(tmp_path / "ckpt", tiny_tokenizer)
    return model, export_hf(tmp_path / "ckpt", tmp_path / "hf")


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformers_loads_the_export_as_llama_with_our_logits(variant, tmp_path, tiny_tokenizer):
    model = save_tiny(tmp_path / "ckpt", tiny_tokenizer, **VARIANTS[variant])
    hf = load_hf(export_hf(tmp_path / "ckpt", tmp_path / "hf"))
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.config.tie_word_embeddings == model.config.tie_embeddings
    assert hf.config.num_key_value_heads == model.config.kv_heads
    idx = torch.randint(0, model.config.vocab_size, (2, model.config.max_seq_len),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx).logits, hf(idx).logits
    assert ours.abs().max() > 1  # logits spread out, so agreement is not trivial
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)  # every position, whole tensor


def test_transformers_greedy_generate_continues_like_our_greedy(exported):
    model, directory = exported
    hf = load_hf(directory)
    ids = torch.tensor([[5, 17, 2, 40, 41]])
    ours = ids
    with torch.no_grad():
        for _ in range(12):  # plain greedy with full forward passes: the reference
            ours = torch.cat([ours, model(ours).logits[:, -1:].argmax(-1)], dim=1)
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
        plain = hf.generate(ids, max_new_tokens=12)  # no mask: the end-of-line token 2 must not read as padding
    assert theirs.tolist() == ours.tolist()  # the exported generation config does not stop at end of line
    assert plain.tolist() == ours.tolist()


def test_export_is_written_atomically_and_replaces_only_an_earlier_export(exported, tmp_path, tiny_tokenizer):
    _, directory = exported
    names = {p.name for p in directory.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "tokenizer.model"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left over
    save_tiny(tmp_path / "other", tiny_tokenizer, seed=1)
    export_hf(tmp_path / "other", directory)  # an earlier export is replaced
    assert torch.equal(load_file(directory / "model.safetensors")["model.norm.weight"],
                       load_checkpoint(tmp_path / "other").model.norm.weight)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a Hugging Face Llama directory"):
        export_hf(tmp_path / "other", tmp_path / "precious")
    with pytest.raises(CheckpointError, match="not a Hugging Face Llama directory"):
        export_hf(tmp_path / "other", tmp_path / "ckpt")  # a layerskip checkpoint is not overwritten
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_tied_export_stores_the_embedding_once(exported):
    _, directory = exported
    state = load_file(directory / "model.safetensors")
    assert "lm_head.weight" not in state and "model.embed_tokens.weight" in state


# ----------------------------------------------------------------------------- tokenizer


def test_autotokenizer_encodes_and_decodes_like_ours(exported, tiny_tokenizer):
    transformers = transformers_or_skip()
    _, directory = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
    lines = make_wikitext_lines(150, seed=11)
    texts = lines + [
        "\n".join(lines[:40]) + "\n",
        " a <unk> b ", "<unk> b", "x<unk>y", "a<unk><unk>b", "a  b\tc", "  = The city =  ", "", "   ",
        "a\n\nb\n", "\n", " \n ", "héllo wörld ＡＢＣ ① ﬁ", "emoji 😀 ok", "中文", "nbsp\u00a0here",
        "</s>", "<0x41>", "<sp_unk>", "@-@ @,@ @.@",
    ]
    for text in texts:
        ids = tiny_tokenizer.encode(text)
        assert hf_tok.encode(text) == ids, text
        assert hf_tok.decode(ids) == tiny_tokenizer.decode(ids), text
    assert hf_tok.eos_token_id == tiny_tokenizer.eol_id == 2
    assert hf_tok.convert_ids_to_tokens(tiny_tokenizer.eol_id) == "\n"
    assert hf_tok.bos_token is None


def test_sentencepiece_model_is_read_without_protobuf(tiny_tokenizer):
    spm = read_spm(tiny_tokenizer.model_proto)
    sp = tiny_tokenizer.sp
    assert [p for p, _, _ in spm.pieces] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert [s for _, s, _ in spm.pieces] == pytest.approx([sp.get_score(i) for i in range(sp.get_piece_size())])
    assert (spm.model_type, spm.byte_fallback, spm.add_dummy_prefix, spm.remove_extra_whitespaces) == (2, True, True, True)
    assert spm.precompiled_charsmap  # nmt_nfkc
    with pytest.raises(CheckpointError, match="cannot be parsed"):
        read_spm(b"\x0a\xff\xff")


# ----------------------------------------------------------------------------- import


@pytest.mark.parametrize("variant", ["tied", "gqa", "llama3-head_dim", "linear-untied"])
def test_round_trip_ours_hf_ours_is_exact(variant, tmp_path, tiny_tokenizer):
    model = save_tiny(tmp_path / "ckpt", tiny_tokenizer, **VARIANTS[variant])
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    back = import_hf(tmp_path / "hf", tmp_path / "back")
    reloaded = load_checkpoint(tmp_path / "back")
    direct = load_checkpoint(tmp_path / "hf")  # the export itself, read in place
    for ckpt in (back, reloaded, direct):
        ours, theirs = model.state_dict(), ckpt.model.state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in ours)
        assert ckpt.model_config == model.config  # dropout included, which HF has no field for
        assert ckpt.tokenizer_config == TOK_CFG
        assert ckpt.tokenizer.model_proto == tiny_tokenizer.model_proto
        assert (ckpt.train_config, ckpt.meta) == ({"lr": 3e-4}, {"note": "tiny"})
        idx = torch.randint(0, model.config.vocab_size, (2, 30))
        with torch.no_grad():
            assert torch.equal(ckpt.model(idx).logits, model(idx).logits)
        if model.config.tie_embeddings:
            assert ckpt.model.lm_head.weight.data_ptr() == ckpt.model.embed_tokens.weight.data_ptr()
        assert not any(t.is_meta for t in [*ckpt.model.parameters(), *ckpt.model.buffers()])
        assert not ckpt.model.training


def test_a_build_that_leaves_state_unset_is_an_error_not_a_meta_model(exported, monkeypatch):
    from layerskip.model import Transformer

    _, directory = exported
    monkeypatch.setattr(Transformer, "reset_rotary", lambda self, device=None, dtype=None: None)
    with pytest.raises(RuntimeError, match="rope_cos"):
        import_hf(directory)


def test_imports_a_directory_transformers_wrote_sharded(tmp_path, tiny_tokenizer):
    transformers = transformers_or_skip()
    config = transformers.LlamaConfig(
        vocab_size=tiny_tokenizer.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40, rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    tiny_tokenizer.save(tmp_path / "hf" / "tokenizer.model")
    ckpt = import_hf(tmp_path / "hf")
    cfg = ckpt.model_config
    assert (cfg.num_layers, cfg.kv_heads, cfg.d_ff, cfg.max_seq_len, cfg.norm_eps) == (3, 2, 48, 40, 1e-6)
    assert ckpt.tokenizer_config.model_type == "bpe" and ckpt.meta["imported_from"] == str(tmp_path / "hf")
    idx = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model(idx).logits, hf(idx).logits, rtol=0, atol=1e-5)
        # Early exits work on it: after k blocks, through the shared final norm and head.
        hidden = hf(idx, output_hidden_states=True).hidden_states[2]  # after 2 blocks
        torch.testing.assert_close(ckpt.model(idx, exit_layer=2).logits, hf.lm_head(hf.model.norm(hidden)),
                                   rtol=0, atol=1e-5)


def edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


REFUSALS = {
    "mistral": ({"model_type": "mistral"}, "model_type is 'mistral'"),
    "architecture": ({"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
    "attention bias": ({"attention_bias": True}, "attention_bias is true"),
    "mlp bias": ({"mlp_bias": True}, "mlp_bias is true"),
    "yarn rope (4.x)": ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_scaling has rope_type 'yarn'"),
    "dynamic rope (5.x)": ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
                           "rope_parameters has rope_type 'dynamic'"),
    "partial rotary": ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
                       "partial_rotary_factor 0.5"),
    "llama3 missing setting": ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}},
                               "needs a positive high_freq_factor"),
    "unknown rope setting": ({"rope_scaling": {"rope_type": "linear", "factor": 8.0, "mscale": 1.0}},
                               r"settings \['mscale'\]"),
    "spellings disagree": ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "disagree"),
    "theta disagrees": ({"rope_theta": 5e5}, "rope_theta 500000.0 disagrees"),
    "odd head_dim": ({"head_dim": 7}, "must be even"),
    "head_dim unlike the weights": ({"head_dim": 16}, "do not match config.json.*q_proj"),
    "activation": ({"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
    "quantized": ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantized"),
    "missing size": ({"hidden_size": ...}, "lacks integer"),
    "bad kv heads": ({"num_key_value_heads": 3}, "num_kv_heads"),
    "vocab": ({"vocab_size": 512}, "tokenizer.model has 400 tokens but the model has 512"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_unsupported_configs_are_refused_with_the_reason(case, exported):
    _, directory = exported
    changes, message = REFUSALS[case]
    edit_config(directory, **changes)
    with pytest.raises(CheckpointError, match=message):
        import_hf(directory)


def test_unsupported_files_are_refused_with_the_reason(exported, tmp_path):
    _, directory = exported
    state = load_file(directory / "model.safetensors")
    save_file(state | {"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match="q_proj.bias"):
        import_hf(directory)
    save_file({k: v for k, v in state.items() if "layers.1.mlp" not in k}, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing.*layers.1.mlp"):
        import_hf(directory)
    save_file(state | {"model.norm.weight": torch.ones(16)}, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match="shapes.*norm.weight"):
        import_hf(directory)
    (directory / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(CheckpointError, match="corrupt"):
        import_hf(directory)
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="safetensors"):
        import_hf(directory)
    (directory / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.model"):
        import_hf(directory)
    with pytest.raises(CheckpointError, match="no config.json"):
        import_hf(tmp_path)
    with pytest.raises(CheckpointError, match="already a layerskip checkpoint"):
        import_hf(tmp_path / "ckpt")


# ----------------------------------------------------------------------------- CLI


def test_cli_exports_checks_and_imports(tmp_path, tiny_tokenizer, capsys):
    transformers_or_skip()
    model = save_tiny(tmp_path / "run" / "best", tiny_tokenizer, tie_embeddings=False)
    assert main(["export-hf", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--check"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "hf") and "match ours" in err
    assert main(["export-hf", "--import-from", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "back")
    back = load_checkpoint(tmp_path / "back")
    assert all(torch.equal(v, back.model.state_dict()[k]) for k, v in model.state_dict().items())


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["export-hf", "--import-from", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("layerskip export-hf: error:") and "not a directory" in err and "\n" not in err
    with pytest.raises(SystemExit):  # exactly one of --checkpoint / --import-from
        main(["export-hf", "--out", str(tmp_path / "x")])


def test_peer_benchmark_runs_and_checks_tokens(tmp_path, tiny_tokenizer):
    transformers = transformers_or_skip()
    if not hasattr(transformers.GenerationConfig(), "assistant_early_exit"):
        pytest.skip("transformers before 4.47 has no assistant_early_exit")
    peer_hf = benchmark_script("peer_hf")
    save_tiny(tmp_path / "ckpt", tiny_tokenizer)
    out = tmp_path / "peer.json"
    threads = torch.get_num_threads()
    try:
        assert peer_hf.main(["--checkpoint", str(tmp_path / "ckpt"), "--draft-layer", "2", "--k", "3",
                             "--max-new-tokens", "6", "--prompt-tokens", "8", "--prompts", "1", "--repeats", "1",
                             "--num-assistant-tokens", "2", "--threads", "1", "--draft-vocab", "20",
                             "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # the script sets it for the whole process
    doc = json.loads(out.read_text())
    assert doc["versions"]["transformers"] == __import__("transformers").__version__
    assert all(doc["same_tokens_as_plain_greedy"].values())  # greedy SSD / early exit == greedy
    assert doc["ours_ar_equals_hf_greedy_prompts"] == 1
    assert set(doc["ratios"]) >= {"hf_greedy_over_ours_ar", "hf_early_exit_best_over_ours_ssd",
                                  "hf_early_exit_best_over_ours_ssd_short_head"}
    assert doc["results"]["ours_ssd_short_head"]["settings"]["draft_vocab"] == 20
