"""WikiText-2 files -> SentencePiece tokenizer -> cached token arrays -> batches.

Where the data comes from, in order: an explicit directory (``--data-dir``), the
``LAYERSKIP_DATA_DIR`` environment variable, the per-user cache, and a download from the
Hugging Face hub into that cache. Tokenizers and encoded splits are cached under the
per-user cache too (``LAYERSKIP_CACHE_DIR``, else ``$XDG_CACHE_HOME/layerskip``, else
``~/.cache/layerskip``), keyed by what they depend on, so a second run starts in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from layerskip.config import TokenizerConfig
from layerskip.console import log
from layerskip.errors import DataError
from layerskip.tokenizer import Tokenizer

SPLITS = ("train", "valid", "test")
DATA_DIR_ENV = "LAYERSKIP_DATA_DIR"
CACHE_DIR_ENV = "LAYERSKIP_CACHE_DIR"
HUB_DATASET = "Salesforce/wikitext"
HUB_CONFIGS = {"tokens": "wikitext-2-v1", "raw": "wikitext-2-raw-v1"}
# File names by variant: the official release's, then the PyTorch example's copy.
SPLIT_FILE_NAMES = {
    "tokens": {s: (f"wiki.{s}.tokens", f"{s}.txt") for s in SPLITS},
    "raw": {s: (f"wiki.{s}.raw",) for s in SPLITS},
}


def cache_root() -> Path:
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "layerskip"


# ----------------------------------------------------------------------------- locating files


def find_split_files(directory: Path) -> dict[str, Path]:
    """The three split files in `directory`, for the first variant that has all of them."""
    if not directory.is_dir():
        raise DataError(f"{directory} is not a directory")
    best_missing: list[str] | None = None
    for names in SPLIT_FILE_NAMES.values():
        files = {s: next((directory / n for n in names[s] if (directory / n).is_file()), None) for s in SPLITS}
        missing = [s for s, path in files.items() if path is None]
        if not missing:
            return files  # type: ignore[return-value]
        if len(missing) < len(SPLITS) and (best_missing is None or len(missing) < len(best_missing)):
            best_missing = missing
    wanted = "wiki.train.tokens, wiki.valid.tokens and wiki.test.tokens (or the wiki.*.raw variant)"
    if best_missing:
        raise DataError(f"{directory} is missing the {', '.join(best_missing)} split; it needs {wanted}")
    raise DataError(f"{directory} holds no WikiText-2 files; it needs {wanted}")


def resolve_data_dir(data_dir: str | Path | None = None, *, download: bool = True) -> Path:
    """Find a directory with the three splits, downloading into the cache as a last resort."""
    if data_dir is not None:
        find_split_files(Path(data_dir))  # explicitly asked for: its problem is the error
        return Path(data_dir)
    if os.environ.get(DATA_DIR_ENV):
        env_dir = Path(os.environ[DATA_DIR_ENV]).expanduser()
        try:
            find_split_files(env_dir)
        except DataError as exc:
            raise DataError(f"{DATA_DIR_ENV}={env_dir}: {exc}") from None
        return env_dir
    cached = cache_root() / "wikitext-2"
    tried = ["--data-dir (not given)", f"${DATA_DIR_ENV} (not set)"]
    if cached.is_dir():
        try:
            find_split_files(cached)
            return cached
        except DataError as exc:
            tried.append(f"the cache {cached} ({exc})")
    else:
        tried.append(f"the cache {cached} (empty)")
    if download:
        try:
            download_wikitext(cached)
            return cached
        except DataError as exc:
            tried.append(f"a download of {HUB_DATASET} ({exc})")
    raise DataError(
        "could not find WikiText-2. Tried: " + "; ".join(tried) + ". Put wiki.train.tokens, "
        f"wiki.valid.tokens and wiki.test.tokens in a directory and pass --data-dir DIR or set {DATA_DIR_ENV}"
    )


def download_wikitext(dest: Path, variant: str = "tokens") -> None:
    """Download WikiText-2 from the Hugging Face hub and write the release's files into dest."""
    try:
        import datasets  # optional: only this function needs it
    except ImportError:
        raise DataError("the optional 'datasets' package is not installed (pip install 'layerskip[hub]')") from None
    log(f"downloading {HUB_DATASET} ({HUB_CONFIGS[variant]}) into {dest} ...")
    suffix = "tokens" if variant == "tokens" else "raw"
    try:
        ds = datasets.load_dataset(HUB_DATASET, HUB_CONFIGS[variant])
    except Exception as exc:  # network, hub and parsing errors all mean "no download"
        raise DataError(f"download failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=_ensure_dir(dest.parent)))
    for split, hub_split in (("train", "train"), ("valid", "validation"), ("test", "test")):
        # The hub's rows are the release's lines, with "" for the release's " " blank lines.
        lines = (row.rstrip("\n") or " " for row in ds[hub_split]["text"])
        (tmp / f"wiki.{split}.{suffix}").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    _replace_dir(tmp, dest)


# ----------------------------------------------------------------------------- reading text


def read_lines(path: Path) -> list[str]:
    """The lines of a split file, refusing files that are not UTF-8 text."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    if b"\x00" in raw[:65536]:
        raise DataError(f"{path} is not a text file (it contains NUL bytes); expected WikiText-2 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {exc.start}); expected WikiText-2 text") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not any(line.strip() for line in lines):
        raise DataError(f"{path} is empty; expected WikiText-2 text")
    return lines


def count_words(lines: list[str]) -> int:
    """Words as the literature counts them: whitespace-separated fields plus one end-of-line per line."""
    return sum(len(line.split()) + 1 for line in lines)


# ----------------------------------------------------------------------------- caching


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Move a finished temporary directory into place; a concurrent winner is kept."""
    if dest.exists():
        shutil.rmtree(dest, ignore_errors=True)
    try:
        os.replace(tmp, dest)
    except OSError:
        if not dest.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def _file_digest(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


def load_or_train_tokenizer(files: dict[str, Path], cfg: TokenizerConfig) -> Tokenizer:
    """The tokenizer trained on the train split with these settings, from the cache if there."""
    key = _digest(json.dumps(cfg.to_dict(), sort_keys=True).encode(), _file_digest(files["train"]))
    path = cache_root() / "tokenizers" / key / "tokenizer.model"
    if path.is_file():
        return Tokenizer.load(path)
    log(f"training a SentencePiece {cfg.model_type} tokenizer (vocabulary {cfg.vocab_size}) on {files['train']} ...")
    start = time.perf_counter()
    tokenizer = Tokenizer.train(read_lines(files["train"]), cfg)
    tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=_ensure_dir(path.parent.parent)))
    tokenizer.save(tmp / "tokenizer.model")
    _replace_dir(tmp, path.parent)
    log(f"tokenizer trained in {time.perf_counter() - start:.1f} s")
    return tokenizer


@dataclass
class EncodedSplits:
    tokens: dict[str, np.ndarray]  # split -> 1-D token ids (memory-mapped from the cache)
    words: dict[str, int]  # split -> word count (literature convention)
    directory: Path


def encode_splits(tokenizer: Tokenizer, files: dict[str, Path]) -> EncodedSplits:
    """Every split encoded with `tokenizer`, cached as .npy files keyed by tokenizer and data."""
    key = _digest(tokenizer.cache_key, *(_file_digest(files[s]) for s in SPLITS))
    directory = cache_root() / "encoded" / key
    if not (directory / "meta.json").is_file():
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=".enc-", dir=_ensure_dir(directory.parent)))
        meta: dict[str, dict[str, int]] = {"words": {}, "tokens": {}}
        dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.int32
        for split in SPLITS:
            lines = read_lines(files[split])
            ids = np.fromiter(
                (t for line in tokenizer.encode_lines(lines) for t in line), dtype=dtype
            )
            np.save(tmp / f"{split}.npy", ids)
            meta["words"][split] = count_words(lines)
            meta["tokens"][split] = int(ids.size)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        _replace_dir(tmp, directory)
        log(f"encoded WikiText-2 in {time.perf_counter() - start:.1f} s: " + ", ".join(
            f"{s} {n:,} tokens" for s, n in meta["tokens"].items()))
    meta = json.loads((directory / "meta.json").read_text())
    tokens = {s: np.load(directory / f"{s}.npy", mmap_mode="r") for s in SPLITS}
    return EncodedSplits(tokens=tokens, words=meta["words"], directory=directory)


@dataclass
class Corpus:
    """Everything training and evaluation read: the tokenizer and the encoded splits."""

    tokenizer: Tokenizer
    splits: EncodedSplits
    data_dir: Path

    @property
    def tokens(self) -> dict[str, np.ndarray]:
        return self.splits.tokens

    @property
    def words(self) -> dict[str, int]:
        return self.splits.words


def load_corpus(
    data_dir: str | Path | None = None,
    tokenizer_config: TokenizerConfig | None = None,
    tokenizer: Tokenizer | None = None,
    *,
    download: bool = True,
) -> Corpus:
    """Locate WikiText-2 and encode it, training a tokenizer unless one is given (a checkpoint's)."""
    directory = resolve_data_dir(data_dir, download=download)
    files = find_split_files(directory)
    if tokenizer is None:
        tokenizer = load_or_train_tokenizer(files, tokenizer_config or TokenizerConfig())
    return Corpus(tokenizer=tokenizer, splits=encode_splits(tokenizer, files), data_dir=directory)


# ----------------------------------------------------------------------------- batches


def eval_windows(tokens: np.ndarray, seq_len: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping (input, target) windows covering every token but the first once.

    The last window is shorter when the split does not divide evenly, so no token is
    dropped and total NLL / word count is the literature's word-level perplexity.
    """
    n = len(tokens) - 1
    starts = list(range(0, n, seq_len))
    full = [s for s in starts if s + seq_len <= n]
    for i in range(0, len(full), batch_size):
        chunk = full[i : i + batch_size]
        x = np.stack([tokens[s : s + seq_len] for s in chunk]).astype(np.int64)
        y = np.stack([tokens[s + 1 : s + seq_len + 1] for s in chunk]).astype(np.int64)
        yield torch.from_numpy(x), torch.from_numpy(y)
    tail = starts[len(full) :]
    if tail:
        s = tail[0]
        yield (
            torch.from_numpy(tokens[s:n].astype(np.int64)).unsqueeze(0),
            torch.from_numpy(tokens[s + 1 : n + 1].astype(np.int64)).unsqueeze(0),
        )
