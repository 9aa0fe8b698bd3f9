"""Dtypes: --dtype / load(dtype=) for layerskip checkpoints and HF directories, the default rule, and loading's
memory: one copy of the weights in the target dtype."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from hf_dirs import BPE_VOCAB, bpe_tokenizer, hf_llama

import layerskip
import layerskip.dtypes as dtypes
import layerskip.loading as loading
from layerskip.checkpoint import save_checkpoint
from layerskip.cli import main
from layerskip.config import ModelConfig, TokenizerConfig
from layerskip.errors import ConfigError
from layerskip.model import Transformer


@pytest.fixture
def ckpt_dir(tmp_path, tiny_tokenizer):
    model = tiny_model(vocab_size=tiny_tokenizer.vocab_size, tie_embeddings=False)
    save_checkpoint(tmp_path / "ckpt", model, tiny_tokenizer, tokenizer_config=TokenizerConfig(vocab_size=400))
    return tmp_path / "ckpt", model


def tensors_of(model: Transformer) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_load_has_half_weights_and_generates(ckpt_dir, dtype):
    path, model = ckpt_dir
    ckpt = layerskip.load(path, device="cpu", dtype=str(dtype).removeprefix("torch."))
    assert {t.dtype for t in tensors_of(ckpt.model)} == {dtype}
    assert all(torch.equal(ckpt.model.state_dict()[k], v.to(dtype)) for k, v in model.state_dict().items())
    out = layerskip.generate(ckpt, "The game", max_new_tokens=12)
    assert len(out.tokens) == 12
    ssd = layerskip.generate(ckpt, "The game", max_new_tokens=12, mode="ssd", draft_layer=2, k=3)
    assert ssd.tokens == out.tokens  # greedy SSD is exact in any dtype
    idx = torch.randint(0, model.config.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model(idx).logits.float(), model(idx).logits, rtol=0.05, atol=0.25)


def test_auto_is_float32_for_small_models_on_the_cpu_and_bfloat16_from_the_threshold(ckpt_dir, monkeypatch):
    path, model = ckpt_dir
    assert layerskip.load(path, device="cpu").model.lm_head.weight.dtype == torch.float32
    monkeypatch.setattr(dtypes, "cpu_bf16_min_parameters", lambda: model.num_parameters())
    assert layerskip.load(path, device="cpu").model.lm_head.weight.dtype == torch.bfloat16
    assert layerskip.load(path, device="cpu", dtype="float32").model.lm_head.weight.dtype == torch.float32
    monkeypatch.setattr(dtypes, "cpu_bf16_min_parameters", lambda: model.num_parameters() + 1)
    assert layerskip.load(path, device="cpu", dtype="auto").model.lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize("kernels_run", [True, False])
def test_the_rule_and_the_names(kernels_run, monkeypatch):
    """bfloat16 pays from a far smaller size where layerskip's bf16 kernels run."""
    monkeypatch.setattr(dtypes.kernels, "available", lambda: kernels_run)
    threshold = dtypes.CPU_BF16_KERNELS_MIN_PARAMETERS if kernels_run else dtypes.CPU_BF16_MIN_PARAMETERS
    assert dtypes.CPU_BF16_KERNELS_MIN_PARAMETERS < dtypes.CPU_BF16_MIN_PARAMETERS
    cpu = torch.device("cpu")
    assert dtypes.default_dtype(cpu, threshold - 1) == torch.float32
    assert dtypes.default_dtype(cpu, threshold) == torch.bfloat16
    assert dtypes.default_dtype(torch.device("mps"), 10**10) == torch.float32
    assert dtypes.parse_dtype("auto") is None and dtypes.parse_dtype(torch.float16) == torch.float16
    for bad in ("fp32", "int8", torch.int8):
        with pytest.raises(ConfigError, match="dtype must be one of auto, float32, bfloat16, float16"):
            dtypes.parse_dtype(bad)
    tiny = ModelConfig(vocab_size=97, d_model=32, num_layers=2, num_heads=4, d_ff=64)
    assert loading.num_parameters(tiny) == Transformer(tiny).num_parameters()


def test_an_hf_directory_loads_in_each_dtype_from_its_stored_one(tmp_path):
    bpe = bpe_tokenizer()
    hf = hf_llama(tmp_path, vocab_size=BPE_VOCAB, tie_word_embeddings=True)
    hf.to(torch.bfloat16).save_pretrained(tmp_path)  # stored in bf16, as the published checkpoints are
    bpe.save(str(tmp_path / "tokenizer.json"))
    as_stored = layerskip.load(tmp_path, device="cpu", dtype="bfloat16").model
    wider = layerskip.load(tmp_path, device="cpu", dtype="float32").model
    assert as_stored.embed_tokens.weight.dtype == torch.bfloat16 and wider.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(wider.embed_tokens.weight, as_stored.embed_tokens.weight.float())  # bf16 -> fp32 is exact
    assert wider.lm_head.weight is wider.embed_tokens.weight
    assert len(layerskip.generate(layerskip.load(tmp_path, device="cpu", dtype="bfloat16"), "a", max_new_tokens=5,
                                  mode="ssd", draft_layer=1).tokens) >= 1


def test_the_cli_flag(ckpt_dir, capsys, tmp_path):
    path, _ = ckpt_dir
    assert main(["generate", "--checkpoint", str(path), "--prompt", "The game", "--max_length", "4", "--dtype",
                 "float16", "--json", str(tmp_path / "out.json")]) == 0
    assert json.loads((tmp_path / "out.json").read_text())["dtype"] == "float16"
    with pytest.raises(SystemExit):
        main(["generate", "--checkpoint", str(path), "--prompt", "x", "--dtype", "int8"])
    capsys.readouterr()


def peak_rss_growth(load) -> int:
    """Bytes the process's peak RSS grows by while `load()` runs (Linux: the peak is reset first)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pytest.skip("cannot reset the peak RSS here")

    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    before = status("VmRSS:")
    result = load()
    growth = status("VmHWM:") - before
    del result
    return growth


def test_loading_holds_about_one_copy_of_the_weights_in_the_target_dtype(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tiny_tokenizer.vocab_size, d_model=512, num_layers=8, num_heads=8, d_ff=2048,
                      dropout=0.0)
    model = Transformer(cfg)
    save_checkpoint(tmp_path / "big", model, tiny_tokenizer, tokenizer_config=TokenizerConfig(vocab_size=400))
    fp32_bytes = model.num_parameters() * 4  # 100 MB
    del model
    same = peak_rss_growth(lambda: layerskip.load(tmp_path / "big", device="cpu", dtype="float32"))
    half = peak_rss_growth(lambda: layerskip.load(tmp_path / "big", device="cpu", dtype="bfloat16"))
    assert same < 0.2 * fp32_bytes  # the fp32 weights are the file's pages, read when used
    assert half < 1.3 * fp32_bytes / 2  # converted copies only, each file mapping released as it goes


def test_the_help_states_the_rule_the_code_applies():
    import argparse

    from layerskip.cli.common import add_dtype_arg

    parser = argparse.ArgumentParser()
    add_dtype_arg(parser)
    text = " ".join(parser.format_help().split())
    assert f"float32 below {dtypes.CPU_BF16_KERNELS_MIN_PARAMETERS // 10**6}M parameters where" in text
    assert f"else below {dtypes.CPU_BF16_MIN_PARAMETERS // 10**6}M" in text
