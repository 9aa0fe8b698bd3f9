"""Tokenizers: the interface every model's tokenizer offers, and layerskip's own SentencePiece one.

``TextTokenizer`` is what the rest of layerskip uses: this module's ``Tokenizer`` (layerskip's
checkpoints) and the Hugging Face directories' tokenizers (``layerskip.hf.model_tokenizers``).

layerskip's SentencePiece tokenizer for WikiText: `<unk>` is one symbol, every line ends in EOL.

The end-of-line token is SentencePiece's end-of-sentence piece (`</s>`), appended to each
line; WikiText's own `<unk>` word is a user-defined symbol, so it stays one token and
decodes back to itself. SentencePiece's internal unknown piece is renamed so the two never
clash, and byte fallback turns characters never seen in training into byte tokens, so any
text can be encoded.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import sentencepiece as spm

from layerskip.config import TokenizerConfig
from layerskip.errors import CheckpointError, DataError

WIKITEXT_UNK = "<unk>"
SP_UNK = "<sp_unk>"  # SentencePiece's own unknown piece, renamed out of WikiText's way


class TextTokenizer(Protocol):
    """What layerskip asks of a tokenizer."""

    cache_key: bytes  # the bytes that define how it encodes (the cache of encoded WikiText is keyed by them)
    eol_id: int | None  # the end-of-line token (--stop_at_eol); None when a line break is not one token
    eos_id: int | None  # the model's end of sequence (the first of stop_ids); None: it has none
    stop_ids: tuple[int, ...]  # every token that ends generation (eos_id first); (): it never stops early
    bos_id: int | None  # the token encode() puts first; None: no BOS

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]:
        """A prompt's ids (after the BOS when there is one)."""

    def encode_lines(self, lines: Sequence[str], *, num_threads: int = 2) -> list[list[int]]:
        """Each line followed by its line break, no BOS (WikiText for evaluation and calibration)."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids (BOS and EOS tokens dropped)."""

    def id_to_piece(self, token: int) -> str: ...


class Tokenizer:
    """layerskip's SentencePiece tokenizer: no BOS, and its eos is the end of a line, so no token stops generation."""

    bos_id: int | None = None
    eos_id: int | None = None
    stop_ids: tuple[int, ...] = ()

    def __init__(self, model_proto: bytes) -> None:
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError variants
            raise CheckpointError(f"the tokenizer model is corrupt or not a SentencePiece model ({exc})") from None
        self.model_proto = model_proto
        self.eol_id = self.sp.eos_id()

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"tokenizer model {path} is missing; re-save the checkpoint with its tokenizer")
        return cls(path.read_bytes())

    @property
    def cache_key(self) -> bytes:
        return self.model_proto

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.model_proto)

    @classmethod
    def train(cls, lines: Iterable[str], cfg: TokenizerConfig, *, num_threads: int = 2) -> Tokenizer:
        """Train on text lines (the train split)."""
        model = io.BytesIO()
        try:
            cls._train_into(model, lines, cfg, num_threads)
        except RuntimeError as exc:
            too_high = re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", str(exc))
            if too_high:
                raise DataError(
                    f"the training text is too small for a vocabulary of {too_high.group(1)}: SentencePiece "
                    f"can make at most {too_high.group(2)} pieces from it; lower the tokenizer vocab_size"
                ) from None
            raise DataError(f"SentencePiece could not train on this text: {exc}") from None
        return cls(model.getvalue())

    @staticmethod
    def _train_into(model: io.BytesIO, lines: Iterable[str], cfg: TokenizerConfig, num_threads: int) -> None:
        spm.SentencePieceTrainer.train(
            sentence_iterator=(line for line in lines if line.strip()),
            model_writer=model,
            vocab_size=cfg.vocab_size,
            model_type=cfg.model_type,
            character_coverage=cfg.character_coverage,
            byte_fallback=cfg.byte_fallback,
            user_defined_symbols=[WIKITEXT_UNK],
            unk_piece=SP_UNK,
            bos_id=-1,
            eos_id=2,
            pad_id=-1,
            num_threads=num_threads,
            max_sentence_length=1 << 16,
            minloglevel=2,
        )

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Encode text; every newline becomes the EOL token (a trailing partial line gets none)."""
        lines = text.split("\n")
        ids: list[int] = []
        for i, line in enumerate(lines):
            ids.extend(self.sp.encode(line))
            if i < len(lines) - 1:
                ids.append(self.eol_id)
        return ids

    def encode_lines(self, lines: Sequence[str], *, num_threads: int = 2) -> list[list[int]]:
        """Encode whole lines (each followed by EOL), batched inside SentencePiece."""
        encoded = self.sp.encode(list(lines), num_threads=num_threads)
        for ids in encoded:
            ids.append(self.eol_id)
        return encoded

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text, EOL tokens as newlines."""
        pieces: list[str] = []
        line: list[int] = []
        for token in ids:
            if token == self.eol_id:
                pieces.append(self.sp.decode(line) + "\n")
                line = []
            else:
                line.append(int(token))
        pieces.append(self.sp.decode(line))
        return "".join(pieces)

    def id_to_piece(self, token: int) -> str:
        return "\n" if token == self.eol_id else self.sp.id_to_piece(int(token))
