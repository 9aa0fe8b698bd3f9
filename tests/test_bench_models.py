"""layerskip.bench.models and .prompts: the one loader and prompt choice of benchmarks/ and `layerskip bench`."""

from __future__ import annotations

import json

from conftest import benchmark_script, tiny_config, tiny_model

from layerskip.bench import best_case, load_model, paragraph_prompts, prompt_ids, random_model, random_prompts
from layerskip.bench.prompts import FIRST_TEXT_ID, select_prompts
from layerskip.checkpoint import save_checkpoint
from layerskip.config import TokenizerConfig
from layerskip.data import read_lines
from layerskip.decoding import Autoregressive, SelfSpeculative


def test_paragraph_prompts_are_the_bench_prompts(tiny_corpus_dir, tiny_tokenizer):
    lines = read_lines(tiny_corpus_dir / "wiki.test.tokens")
    chosen = select_prompts(lines, tiny_tokenizer, num_prompts=4, prompt_tokens=8, seed=3)
    expected = [prompt_ids(p, tiny_tokenizer, 8) for p in chosen]
    assert paragraph_prompts(tiny_tokenizer, 4, 8, seed=3, data_dir=tiny_corpus_dir) == expected
    assert all(len(ids) == 8 for ids in expected)


def test_random_prompts_are_seeded_and_skip_the_special_ids():
    first = random_prompts(50, num_prompts=3, prompt_tokens=20, seed=1)
    assert first == random_prompts(50, 3, 20, seed=1) != random_prompts(50, 3, 20, seed=2)
    assert [len(p) for p in first] == [20, 20, 20]
    assert all(FIRST_TEXT_ID <= t < 50 for p in first for t in p)


def test_a_checkpoint_is_loaded_with_its_tokenizer(tmp_path, tiny_corpus_dir, tiny_tokenizer):
    model = tiny_model(0, vocab_size=tiny_tokenizer.vocab_size)
    path = save_checkpoint(tmp_path / "ckpt", model, tiny_tokenizer,
                           tokenizer_config=TokenizerConfig(vocab_size=tiny_tokenizer.vocab_size))
    bench = load_model(path, best_case_after=1)  # best case: random models only
    assert bench.checkpoint is not None and not bench.model.training
    for name, weight in model.state_dict().items():
        assert bench.model.state_dict()[name].equal(weight), name
    assert bench.prompts(2, 8, data_dir=tiny_corpus_dir) == paragraph_prompts(tiny_tokenizer, 2, 8, 0, tiny_corpus_dir)


def test_random_model_is_seeded():
    a, b = random_model(5, tiny_config()), random_model(5, tiny_config())
    assert all(x.equal(y) for x, y in zip(a.parameters(), b.parameters())) and not a.training
    bench = load_model(seed=5)
    assert bench.checkpoint is None and bench.prompts(2, 4) == random_prompts(bench.model.config.vocab_size, 2, 4)


def test_best_case_accepts_every_draft():
    model = tiny_model(0, num_layers=4)  # large weights: its own drafts are sometimes rejected
    prompt = random_prompts(model.config.vocab_size, 1, 6)[0]
    assert SelfSpeculative(draft_layer=2, k=3).generate(model, prompt, 20).stats["acceptance_rate"] < 1
    best_case(model, draft_layer=2)
    result = SelfSpeculative(draft_layer=2, k=3).generate(model, prompt, 20)
    assert result.stats["drafted_tokens"] > 0 and result.stats["accepted_tokens"] == result.stats["drafted_tokens"]
    assert result.tokens == Autoregressive().generate(model, prompt, 20).tokens


def test_decode_speed_script_on_the_best_case(tmp_path, capsys):
    script = benchmark_script("decode_speed")
    out = tmp_path / "speed.json"
    assert script.main(["--best_case", "--prompts", "2", "--warmup", "1", "--prompt_len", "8", "--new_tokens", "6",
                        "--draft_layers", "2", "--ks", "3", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [r["config"] for r in doc["results"]] == ["ar", "ssd E=2 k=3"]
    assert doc["results"][1]["acceptance_rate"] == 1.0 and doc["results"][1]["identical_to_ar"] == 1.0
    assert doc["settings"]["prompt_source"] == "random token ids" and len(doc["runs"]["ar"]) == 2
    assert "ssd E=2 k=3" in capsys.readouterr().out


def test_a_random_model_is_built_in_its_dtype_without_an_fp32_copy(monkeypatch):
    """bf16 straight from the meta device: tied heads stay tied, rotary tables and norms are right, it decodes."""
    import torch

    from layerskip.model import Transformer

    built = []
    real_init = Transformer.__init__

    def spy(self, cfg):
        real_init(self, cfg)
        built.append(self.embed_tokens.weight.device.type)

    monkeypatch.setattr(Transformer, "__init__", spy)
    cfg = tiny_config(num_kv_heads=2)
    model = random_model(0, cfg, dtype=torch.bfloat16)
    assert built == ["meta"]  # never materialised in fp32
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and not model.training
    assert model.lm_head.weight is model.embed_tokens.weight
    reference = Transformer(cfg).to(torch.bfloat16)
    assert torch.equal(model.rope_cos, reference.rope_cos) and torch.equal(model.rope_sin, reference.rope_sin)
    assert all(torch.all(b.attn_norm.weight == 1) for b in model.layers)
    std = model.layers[0].mlp.up_proj.weight.float().std().item()
    assert abs(std - cfg.init_std) < 0.1 * cfg.init_std
    untied = random_model(0, tiny_config(tie_embeddings=False), dtype=torch.bfloat16)
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    assert not torch.equal(untied.lm_head.weight, untied.embed_tokens.weight)
    prompt = [5, 6, 7]
    assert SelfSpeculative(2, 3).generate(model, prompt, 10).tokens == Autoregressive().generate(model, prompt, 10).tokens
