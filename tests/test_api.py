"""The front door: `import layerskip` -> load / generate / evaluate / calibrate / train."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import layerskip
from layerskip.checkpoint import save_checkpoint
from layerskip.config import TokenizerConfig
from layerskip.errors import ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"
PROMPT = "The game"


@pytest.fixture(scope="module")
def run_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    """A run directory (runs/layerskip/best) holding a tiny 4-layer model."""
    root = tmp_path_factory.mktemp("project")
    model = tiny_model(vocab_size=tiny_tokenizer.vocab_size)
    save_checkpoint(root / "runs" / "layerskip" / "best", model, tiny_tokenizer,
                    tokenizer_config=TokenizerConfig(vocab_size=400))
    return root / "runs" / "layerskip"


@pytest.fixture(scope="module")
def loaded(run_dir):
    return layerskip.load(run_dir)


def greedy_reference(ckpt, prompt: str, n: int) -> list[int]:
    """Greedy tokens from a plain uncached argmax loop over the full model."""
    ids = ckpt.tokenizer.encode(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = ckpt.model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[-n:]


def test_load_gives_model_tokenizer_config_and_path(loaded, run_dir):
    assert loaded.path == run_dir / "best"
    assert loaded.config.num_layers == loaded.model.num_layers == 4
    assert not loaded.model.training
    assert loaded.tokenizer.vocab_size == loaded.config.vocab_size


def test_readme_python_quick_start_runs_verbatim(run_dir, loaded, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README.md has no ```python block"
    monkeypatch.chdir(run_dir.parent.parent)  # the quick start reads runs/layerskip
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(blocks[0], "README.md", "exec"), {})
    expected = greedy_reference(loaded, PROMPT, 32)
    text = layerskip.api.continuation(loaded.tokenizer, loaded.tokenizer.encode(PROMPT), expected)
    assert printed.getvalue().startswith(text + "\n")  # greedy SSD prints what greedy AR would


def test_every_mode_gives_the_greedy_tokens(loaded):
    expected = greedy_reference(loaded, PROMPT, 12)
    outs = [layerskip.generate(loaded, PROMPT, max_new_tokens=12),
            layerskip.generate(loaded, PROMPT, max_new_tokens=12, mode="ssd", draft_layer=2, k=3),
            layerskip.generate(loaded, PROMPT, max_new_tokens=12, mode="dee", conf=1.5)]  # never exits early
    for out in outs:
        assert out.tokens == expected
        assert out.text == layerskip.api.continuation(loaded.tokenizer, out.prompt_tokens, expected)
    assert outs[1].stats["draft_layer"] == 2 and 0 <= outs[1].stats["acceptance_rate"] <= 1
    assert outs[2].stats["mean_exit_layer"] == loaded.model.num_layers


def test_generate_takes_a_path_and_stays_callable_after_submodule_imports(run_dir, loaded):
    first = layerskip.generate(run_dir, PROMPT, max_new_tokens=5, mode="ssd")
    for name in ("decoding", "calibration", "evaluation", "training"):
        importlib.import_module(f"layerskip.{name}")  # a submodule import must not shadow a function

    assert layerskip.generate(run_dir, PROMPT, max_new_tokens=5).tokens == first.tokens
    assert callable(layerskip.evaluate) and callable(layerskip.calibrate) and callable(layerskip.train)


def test_sampling_is_seeded(loaded):
    a, b, c = (layerskip.generate(loaded, PROMPT, max_new_tokens=10, temperature=1.0, seed=s) for s in (1, 1, 2))
    assert a.tokens == b.tokens != c.tokens


def test_python_one_liner_from_the_issue_works_on_a_run_directory(run_dir):
    code = ("import layerskip; print(layerskip.generate(layerskip.load(RUN), 'The game', max_new_tokens=16, "
            "mode='ssd', draft_layer=2, k=3).text)").replace("RUN", repr(str(run_dir)))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


@pytest.mark.parametrize("options, message", [
    (dict(mode="beam"), "unknown generation mode"),
    (dict(mode="ar", k=3), r"\['k'\] do not apply to mode 'ar'"),
    (dict(mode="ssd", conf=0.5), r"\['conf'\] do not apply to mode 'ssd'"),
    (dict(mode="ssd", draft_layers=2), "unknown generation option"),
    (dict(mode="dee", conf=0.5, thresholds="t.json"), "either conf"),
    (dict(mode="ssd", k=0), "k .* must be an integer >= 1"),
    (dict(temperature=-1.0), "temperature"),
])
def test_bad_options_are_one_clear_error(loaded, options, message):
    with pytest.raises(ConfigError, match=message):
        layerskip.generate(loaded, PROMPT, max_new_tokens=4, **options)


def test_train_evaluate_calibrate_then_generate_with_the_thresholds(tmp_path, tiny_corpus_dir):
    """The whole study through the front door, as a newcomer would write it."""
    settings = dict(d_model=32, num_layers=4, num_heads=4, d_ff=64, vocab_size=400, seq_len=32, batch_size=8,
                    warmup=1, precision="fp32", compile=False, eval_batch_size=8, max_steps=3)
    run = layerskip.train(tmp_path / "run", data_dir=tiny_corpus_dir, progress=False, **settings)
    assert run.step == 3 and (tmp_path / "run" / "metrics.jsonl").is_file()
    model = layerskip.load(run.best)
    assert model.config.num_layers == 4

    result = layerskip.evaluate(model, split="valid", data_dir=tiny_corpus_dir)
    assert [r.layer for r in result.layers] == [1, 2, 3, 4] and "word ppl" in result.table()

    thresholds = layerskip.calibrate(model, delta=0.2, epsilon=0.1, data_dir=tiny_corpus_dir, gen_prompts=0,
                                     output=tmp_path / "thresholds.json", progress=False)
    assert len(thresholds.thresholds) == 3 and (tmp_path / "thresholds.json").is_file()
    from_object = layerskip.generate(model, PROMPT, max_new_tokens=8, mode="dee", thresholds=thresholds)
    from_file = layerskip.generate(model, PROMPT, max_new_tokens=8, mode="dee", thresholds=tmp_path / "thresholds.json")
    assert from_object.tokens == from_file.tokens and len(from_object.tokens) == 8
    assert 1 <= from_object.stats["mean_exit_layer"] <= 4

    other = tiny_model(seed=7, vocab_size=model.config.vocab_size, num_layers=4)
    model.model.load_state_dict(other.state_dict())  # other weights: the guarantee does not carry over
    with pytest.raises(ConfigError, match="another model"):
        layerskip.generate(model, PROMPT, max_new_tokens=4, mode="dee", thresholds=thresholds)
