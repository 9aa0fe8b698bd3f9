"""Shared fixtures: tiny fp32 models, a tiny WikiText-like corpus, an isolated cache."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from layerskip.config import ModelConfig, TokenizerConfig
from layerskip.model import Transformer
from layerskip.tokenizer import Tokenizer

REAL_DATA_DIR = os.environ.get("LAYERSKIP_DATA_DIR")

WORDS = (
    "the of and in to a was is for on as by with he at from that his it an were are which this "
    "be or has had first new one two three after also its their but not they city game season "
    "film song album river war army ship church team species"
).split()


def make_wikitext_lines(num_lines: int, seed: int) -> list[str]:
    """Lines shaped like the release: headings, paragraphs, blank ' ' lines, <unk> and @-@."""
    rng = random.Random(seed)
    lines = [" "]
    for i in range(num_lines):
        if i % 7 == 0:
            lines += [f" = {rng.choice(WORDS).title()} {rng.choice(WORDS)} = ", " "]
        words = [rng.choice(WORDS + ["<unk>", "@-@", "1", "@,@", "2"]) for _ in range(rng.randint(5, 40))]
        lines += [" " + " ".join(words) + " . ", " "]
    return lines


def write_corpus(directory: Path, *, suffix: str = "tokens", sizes=(400, 60, 60)) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split, n, seed in zip(("train", "valid", "test"), sizes, (0, 1, 2)):
        text = "".join(line + "\n" for line in make_wikitext_lines(n, seed))
        (directory / f"wiki.{split}.{suffix}").write_text(text, encoding="utf-8")
    return directory


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads; on 2 shared cores they lose a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets a cache of its own, so no test sees another's tokenizers."""
    monkeypatch.setenv("LAYERSKIP_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def tiny_corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("wikitext"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus_dir) -> Tokenizer:
    from layerskip.data import read_lines

    lines = read_lines(tiny_corpus_dir / "wiki.train.tokens")
    return Tokenizer.train(lines, TokenizerConfig(vocab_size=400))


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, num_layers=4, num_heads=4, d_ff=64, dropout=0.0, max_seq_len=64)
    base.update(overrides)
    return ModelConfig(**base)


def benchmark_script(name: str):
    """benchmarks/NAME.py as a module (the scripts are not a package), to call its main() in-process."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_tokens(batch: int, length: int, vocab: int = 97, seed: int = 1) -> torch.Tensor:
    """(batch, length) token ids drawn from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_config(**overrides))
    # Larger-than-init weights make logits spread out, so equality tests are not trivially met.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model.eval()
