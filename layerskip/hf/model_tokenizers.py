"""The tokenizer of a Hugging Face model directory, used the way its model reads text.

- tokenizer.model (Llama 2, Code Llama): SentencePiece, a line break spelt as the model spells it
  (its byte piece), not as layerskip's end of line;
- else tokenizer.json (Llama 3): Hugging Face's ``tokenizers`` library (the ``tokenizers`` extra).

The directory's files name the special tokens (``read_special_tokens``). A BOS starts every prompt
when tokenizer_config.json's add_bos_token says so; without that key, when tokenizer.json's
post-processor adds one (tokenizers' own behaviour), and for SentencePiece as LlamaTokenizer does
(yes, when the model has a BOS). Generation stops at the end-of-sequence ids of
generation_config.json, else config.json, else tokenizer_config.json's eos_token: at any of them
when several are listed (Llama 3 instruct models end a turn with <|eot_id|>, a text with
<|end_of_text|>); the first is the model's EOS, the one a GGUF file records. An EOS a tokenizer
would append to every text is not appended: prompts are continued, not closed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerskip.errors import CheckpointError, ConfigError
from layerskip.tokenizer import Tokenizer

TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_JSON = "tokenizer.json"


@dataclass(frozen=True)
class SpecialTokens:
    """What a directory's configs say about BOS and EOS (a token's id, or its text; None: not said)."""

    add_bos: bool | None
    bos: int | str | None
    eos: int | str | None  # the first end-of-sequence token listed
    stops: tuple[int | str, ...] = ()  # every end-of-sequence token listed, eos first

    def stop_tokens(self) -> tuple[int | str, ...]:
        return self.stops or (() if self.eos is None else (self.eos,))


def read_special_tokens(hf_dir: Path) -> SpecialTokens:
    """BOS/EOS settings from tokenizer_config.json, generation_config.json and config.json."""
    tokens, generation, config = (_json_object(hf_dir / name) for name in (TOKENIZER_CONFIG, GENERATION_CONFIG,
                                                                           "config.json"))
    add_bos = tokens.get("add_bos_token")
    stops = _all_of_first(generation.get("eos_token_id"), config.get("eos_token_id"), _content(tokens.get("eos_token")))
    return SpecialTokens(
        add_bos=add_bos if isinstance(add_bos, bool) else None,
        bos=_first(generation.get("bos_token_id"), config.get("bos_token_id"), _content(tokens.get("bos_token"))),
        eos=stops[0] if stops else None, stops=stops,
    )


def _json_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
    return value if isinstance(value, dict) else {}


def _content(token: Any) -> str | None:
    """An AddedToken as tokenizer_config.json writes it: a string, or an object with "content"."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _first(*values: Any) -> int | str | None:
    """The first value given; of a list of ids, its first."""
    for value in values:
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            return value
    return None


def _all_of_first(*values: Any) -> tuple[int | str, ...]:
    """Every id of the first value given (a list's ids, or the one id)."""
    for value in values:
        items = value if isinstance(value, list) else [value]
        found = tuple(v for v in items if isinstance(v, (int, str)) and not isinstance(v, bool))
        if found:
            return found
    return ()


def _stop_ids(specials: SpecialTokens, lookup: Any, vocab_size: int, where: Path) -> tuple[int, ...]:
    """The ids generation stops at, in the configs' order, each once."""
    return tuple(dict.fromkeys(_token_id(t, lookup, vocab_size, where) for t in specials.stop_tokens()))


class SpmModelTokenizer(Tokenizer):
    """A Llama SentencePiece model as its model reads text: its BOS, line breaks as its byte piece <0x0A>."""

    def __init__(self, model_proto: bytes, specials: SpecialTokens, where: Path) -> None:
        super().__init__(model_proto)
        bos = self.sp.bos_id()
        add_bos = specials.add_bos if specials.add_bos is not None else bos >= 0  # LlamaTokenizer's default
        self.bos_id = _token_id(specials.bos, self._piece_id, self.vocab_size, where) if add_bos else None
        if add_bos and self.bos_id is None:
            self.bos_id = bos if bos >= 0 else None
        if add_bos and self.bos_id is None:
            raise CheckpointError(f"{where}: add_bos_token is true but the tokenizer has no BOS token")
        self.eos_id = _token_id(specials.eos, self._piece_id, self.vocab_size, where)
        self.stop_ids = _stop_ids(specials, self._piece_id, self.vocab_size, where)
        newline = self.sp.piece_to_id("<0x0A>")
        self.eol_id = newline if self.sp.is_byte(newline) else None

    def _piece_id(self, piece: str) -> int | None:
        found = self.sp.piece_to_id(piece)
        return found if self.sp.id_to_piece(found) == piece else None  # unknown pieces map to <unk>'s id

    @property
    def cache_key(self) -> bytes:
        return b"sentencepiece, the model's way\0" + self.model_proto  # lines encode unlike layerskip's

    def encode(self, text: str) -> list[int]:
        return ([] if self.bos_id is None else [self.bos_id]) + self.sp.encode(text)

    def encode_lines(self, lines: Sequence[str], *, num_threads: int = 2) -> list[list[int]]:
        return self.sp.encode([line + "\n" for line in lines], num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(t) for t in ids])  # drops control tokens (BOS, EOS)

    def id_to_piece(self, token: int) -> str:
        return self.sp.id_to_piece(int(token))


class JsonTokenizer:
    """A tokenizer.json through Hugging Face's ``tokenizers``: encodes as ``tokenizers`` does, BOS as configured."""

    def __init__(self, text: str, specials: SpecialTokens, where: Path) -> None:
        try:
            from tokenizers import Tokenizer as Backend
        except ImportError:
            raise ConfigError(f"{where} has only a tokenizer.json, which needs Hugging Face's tokenizers library: "
                              'pip install -e ".[tokenizers]"') from None
        try:
            self._backend = Backend.from_str(text)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # bare Exceptions for malformed files; a Rust panic is a BaseException
            raise CheckpointError(f"{where / TOKENIZER_JSON} is not a tokenizer tokenizers can read ({exc})") from None
        self.cache_key = b"tokenizers\0" + text.encode("utf-8")
        self.text = text  # the tokenizer.json itself (layerskip.gguf writes its vocabulary and merges)
        added = self._bos_the_post_processor_adds()
        add_bos = specials.add_bos if specials.add_bos is not None else added is not None
        bos = _token_id(specials.bos, self._backend.token_to_id, self.vocab_size, where)
        self.bos_id = (bos if bos is not None else added) if add_bos else None
        if add_bos and self.bos_id is None:
            raise CheckpointError(f"{where}: add_bos_token is true but no BOS token is named")
        self.eos_id = _token_id(specials.eos, self._backend.token_to_id, self.vocab_size, where)
        self.stop_ids = _stop_ids(specials, self._backend.token_to_id, self.vocab_size, where)
        newline = self._body("\n")
        self.eol_id = newline[0] if len(newline) == 1 else None

    def _body(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def _bos_the_post_processor_adds(self) -> int | None:
        """The id tokenizer.json's post-processor puts before a text, if it puts one."""
        body, full = self._body("a"), self._backend.encode("a").ids
        return full[0] if len(full) > len(body) and full[1 : len(body) + 1] == body else None

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return ([] if self.bos_id is None else [self.bos_id]) + self._body(text)

    def encode_lines(self, lines: Sequence[str], *, num_threads: int = 2) -> list[list[int]]:
        batch = self._backend.encode_batch([line + "\n" for line in lines], add_special_tokens=False)
        return [encoding.ids for encoding in batch]

    def decode(self, ids: Sequence[int]) -> str:
        return self._backend.decode([int(t) for t in ids], skip_special_tokens=True)

    def id_to_piece(self, token: int) -> str:
        return self._backend.id_to_token(int(token)) or ""


def _token_id(token: int | str | None, lookup: Any, vocab_size: int, where: Path) -> int | None:
    """A special token's id from its id or its text; a CheckpointError when the tokenizer lacks it."""
    if token is None:
        return None
    found = token if isinstance(token, int) else lookup(token)
    if found is None or not 0 <= found < vocab_size:
        raise CheckpointError(f"{where}: the special token {token!r} is not in the tokenizer's vocabulary "
                              f"of {vocab_size}")
    return found


def read_model_tokenizer(hf_dir: Path) -> SpmModelTokenizer | JsonTokenizer:
    """tokenizer.model when there is one, else tokenizer.json, with the directory's BOS/EOS settings."""
    specials = read_special_tokens(hf_dir)
    if (hf_dir / "tokenizer.model").is_file():
        return SpmModelTokenizer(Tokenizer.load(hf_dir / "tokenizer.model").model_proto, specials, hf_dir)
    if (hf_dir / TOKENIZER_JSON).is_file():
        try:
            text = (hf_dir / TOKENIZER_JSON).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{hf_dir / TOKENIZER_JSON} cannot be read ({exc})") from None
        return JsonTokenizer(text, specials, hf_dir)
    raise CheckpointError(f"{hf_dir} has neither tokenizer.model nor tokenizer.json; a model needs its tokenizer")
