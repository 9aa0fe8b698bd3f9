from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REAL_DATA_DIR, write_corpus

from layerskip import data
from layerskip.config import TokenizerConfig
from layerskip.data import (
    count_words,
    eval_windows,
    find_split_files,
    load_corpus,
    read_lines,
    resolve_data_dir,
)
from layerskip.errors import DataError
from layerskip.tokenizer import Tokenizer

SMALL_TOK = TokenizerConfig(vocab_size=400)


def test_finds_the_tokens_release(tiny_corpus_dir):
    files = find_split_files(tiny_corpus_dir)
    assert {s: p.name for s, p in files.items()} == {
        "train": "wiki.train.tokens",
        "valid": "wiki.valid.tokens",
        "test": "wiki.test.tokens",
    }


def test_finds_the_raw_release(tmp_path):
    write_corpus(tmp_path, suffix="raw")
    assert find_split_files(tmp_path)["test"].name == "wiki.test.raw"


def test_missing_split_is_named(tmp_path):
    write_corpus(tmp_path)
    (tmp_path / "wiki.valid.tokens").unlink()
    with pytest.raises(DataError, match="missing the valid split"):
        find_split_files(tmp_path)


def test_empty_and_missing_directories(tmp_path):
    with pytest.raises(DataError, match="holds no WikiText-2 files"):
        find_split_files(tmp_path)
    with pytest.raises(DataError, match="is not a directory"):
        find_split_files(tmp_path / "nope")


def test_non_text_and_empty_split_files_are_refused(tmp_path):
    binary = tmp_path / "bin.tokens"
    binary.write_bytes(b"\x00\x01\x02PK\x03\x04" * 10)
    with pytest.raises(DataError, match="not a text file"):
        read_lines(binary)
    latin1 = tmp_path / "latin1.tokens"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_lines(latin1)
    empty = tmp_path / "empty.tokens"
    empty.write_text(" \n \n")
    with pytest.raises(DataError, match="is empty"):
        read_lines(empty)


def test_word_count_follows_the_literature():
    assert count_words([" a b c ", " ", " d @-@ e "]) == (3 + 1) + (0 + 1) + (3 + 1)


def test_resolution_order_explicit_then_env_then_cache(tmp_path, monkeypatch, tiny_corpus_dir):
    monkeypatch.setenv("LAYERSKIP_DATA_DIR", str(tiny_corpus_dir))
    explicit = write_corpus(tmp_path / "explicit", sizes=(5, 2, 2))
    assert resolve_data_dir(explicit) == explicit
    assert resolve_data_dir(None) == tiny_corpus_dir
    monkeypatch.delenv("LAYERSKIP_DATA_DIR")
    cached = write_corpus(data.cache_root() / "wikitext-2", sizes=(5, 2, 2))
    assert resolve_data_dir(None, download=False) == cached


def test_bad_env_dir_is_reported_as_coming_from_the_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERSKIP_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="LAYERSKIP_DATA_DIR=.*nowhere"):
        resolve_data_dir(None)


def test_when_nothing_works_the_error_lists_every_place_tried(monkeypatch):
    monkeypatch.delenv("LAYERSKIP_DATA_DIR", raising=False)

    def offline(dest: Path, variant: str = "tokens") -> None:
        raise DataError("download failed: no network")

    monkeypatch.setattr(data, "download_wikitext", offline)
    with pytest.raises(DataError) as info:
        resolve_data_dir(None)
    message = str(info.value)
    for place in ("--data-dir (not given)", "$LAYERSKIP_DATA_DIR (not set)", "the cache", "no network", "--data-dir DIR"):
        assert place in message


def test_download_writes_the_release_files(monkeypatch, tmp_path):
    """The hub path, with a stand-in for the `datasets` package (tests never touch the network)."""
    import sys
    import types

    rows = {"train": ["", " = A = \n", " w x <unk> \n"], "validation": ["", " v \n"], "test": [" t \n"]}
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, config: {k: {"text": v} for k, v in rows.items()}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    dest = tmp_path / "wikitext-2"
    data.download_wikitext(dest)
    assert (dest / "wiki.train.tokens").read_text() == " \n = A = \n w x <unk> \n"
    assert find_split_files(dest)["valid"].read_text() == " \n v \n"


def test_tokenizer_keeps_unk_as_one_symbol_and_ends_lines(tiny_tokenizer: Tokenizer):
    ids = tiny_tokenizer.encode(" the <unk> city\n game")
    unk = tiny_tokenizer.sp.piece_to_id("<unk>")
    assert ids.count(unk) == 1
    assert ids.count(tiny_tokenizer.eol_id) == 1
    assert tiny_tokenizer.decode(ids) == "the <unk> city\ngame"


def test_tokenizer_encodes_characters_it_never_saw(tiny_tokenizer: Tokenizer):
    text = "日本 ✓ é"
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.sp.unk_id() not in ids
    assert tiny_tokenizer.decode(ids) == text


def test_corpus_is_cached_and_memory_mapped(tiny_corpus_dir):
    first = load_corpus(tiny_corpus_dir, SMALL_TOK)
    start = time.perf_counter()
    second = load_corpus(tiny_corpus_dir, SMALL_TOK)
    assert time.perf_counter() - start < 1.0
    assert second.tokenizer.model_proto == first.tokenizer.model_proto
    for split in ("train", "valid", "test"):
        assert isinstance(second.tokens[split], np.memmap)
        assert np.array_equal(second.tokens[split], first.tokens[split])
    lines = read_lines(tiny_corpus_dir / "wiki.test.tokens")
    assert second.words["test"] == count_words(lines)
    assert int((first.tokens["test"] == first.tokenizer.eol_id).sum()) == len(lines)


def test_different_tokenizer_settings_get_different_caches(tiny_corpus_dir):
    a = load_corpus(tiny_corpus_dir, SMALL_TOK)
    b = load_corpus(tiny_corpus_dir, TokenizerConfig(vocab_size=320, model_type="unigram"))
    assert a.splits.directory != b.splits.directory
    assert b.tokenizer.vocab_size == 320


def test_a_vocabulary_too_large_for_the_text_is_a_clear_error(tiny_corpus_dir):
    with pytest.raises(DataError, match="too small for a vocabulary of 5000.*lower the tokenizer vocab_size"):
        load_corpus(tiny_corpus_dir, TokenizerConfig(vocab_size=5000, model_type="unigram"))


def test_eval_windows_cover_every_target_once():
    tokens = np.arange(103, dtype=np.uint16)
    targets = [y for _, ys in eval_windows(tokens, seq_len=10, batch_size=4) for y in ys.reshape(-1).tolist()]
    assert targets == list(range(1, 103))
    for x, y in eval_windows(tokens, seq_len=10, batch_size=4):
        assert (y == x + 1).all()


@pytest.mark.skipif(not REAL_DATA_DIR, reason="LAYERSKIP_DATA_DIR not set")
def test_real_wikitext2_word_counts_match_the_literature():
    files = find_split_files(Path(REAL_DATA_DIR))
    assert count_words(read_lines(files["test"])) == 245_569
    assert count_words(read_lines(files["valid"])) == 217_646
