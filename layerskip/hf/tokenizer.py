"""Our SentencePiece tokenizer as Hugging Face tokenizer files, and the tokenizer of an HF directory.

The export is a ``PreTrainedTokenizerFast`` over a tokenizer.json built here from our
SentencePiece model (no protobuf needed); see ``tokenizer_json`` for what it reproduces.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from layerskip.config import TokenizerConfig
from layerskip.errors import CheckpointError, ConfigError
from layerskip.hf.layout import SPM_MODEL
from layerskip.hf.spm import SpmModel, read_spm
from layerskip.tokenizer import Tokenizer


def tokenizer_files(tokenizer: Tokenizer, max_len: int) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    special = {"bos_token": None, "eos_token": "\n", "unk_token": None, "pad_token": None}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # loads tokenizer.json as written, in 4.x and 5.x
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "padding_side": "left",
    }
    return {
        "tokenizer.json": json.dumps(tokenizer_json(tokenizer), ensure_ascii=False, indent=2),
        "tokenizer_config.json": json.dumps(config, indent=2),
        "special_tokens_map.json": json.dumps({k: v for k, v in special.items() if v is not None}, indent=2),
    }


def tokenizer_json(tokenizer: Tokenizer) -> dict[str, Any]:
    """A ``tokenizers`` JSON that encodes and decodes like ``tokenizer``.

    It reproduces our SentencePiece pipeline: SentencePiece's own precompiled NFKC map,
    whitespace stripping and collapsing, a "▁" dummy prefix per line, BPE merges (or unigram
    scores) and byte fallback; transformers 5's ``LlamaTokenizer`` would rebuild its own pipeline
    without that normalisation, hence ``PreTrainedTokenizerFast``. Our end-of-line token
    (SentencePiece's eos, id 2) is the HF token "\\n": a newline encodes to id 2 and id 2 decodes
    to a newline, as ``Tokenizer.encode``/``decode`` do; it is also the ``eos_token`` (so
    ``skip_special_tokens=True`` drops line breaks). There is no BOS and no ``unk_token`` (byte
    fallback makes unknowns impossible). WikiText's ``<unk>`` keeps id 1 but is spelt U+E000 in
    the HF vocabulary (see ``_sentinels``); it decodes to "<unk>". Identical token for token
    to SentencePiece on all of WikiText-2 (BPE) and on its valid and test splits (unigram). Known
    differences: text containing U+E000 itself, and, for unigram models only, text spelling a byte
    piece ("<0x41>") or "<sp_unk>".
    """
    spm = read_spm(tokenizer.model_proto)
    eol, unk_id = tokenizer.eol_id, tokenizer.sp.unk_id()
    sentinels = _sentinels(spm, eol)
    names = [sentinels.get(i, piece) for i, (piece, _, _) in enumerate(spm.pieces)]
    names[eol] = "\n"
    added = [{"id": eol, "content": "\n", "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": _normalizer(spm, sentinels),
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "never", "split": True},
        "post_processor": None,
        "decoder": _decoder(spm, sentinels),
        "model": _model(spm, names, unk_id),
    }


def _model(spm: SpmModel, names: list[str], unk_id: int) -> dict[str, Any]:
    """The BPE or unigram model section, under the HF names of the pieces."""
    if spm.model_type == 2:
        return {
            "type": "BPE", "dropout": None, "unk_token": names[unk_id] if unk_id >= 0 else None,
            "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
            "byte_fallback": spm.byte_fallback, "ignore_merges": False,
            "vocab": {name: i for i, name in enumerate(names)}, "merges": _bpe_merges(spm.pieces),
        }
    if spm.model_type == 1:
        # SentencePiece's scores; its min over normal pieces sets the unknown-character penalty in both.
        vocab = [[name, score] for name, (_, score, _) in zip(names, spm.pieces)]
        return {"type": "Unigram", "unk_id": unk_id if unk_id >= 0 else None, "vocab": vocab,
                "byte_fallback": spm.byte_fallback}
    raise CheckpointError("only BPE and unigram SentencePiece models can be exported")


def _bpe_merges(pieces: list[tuple[str, float, int]]) -> list[list[str]]:
    """Merges reproducing SentencePiece BPE: a pair's rank is its merged piece's rank by score."""
    normal = {p: i for i, (p, _, kind) in enumerate(pieces) if kind == SpmModel.NORMAL}
    order = sorted(normal, key=lambda p: (-pieces[normal[p]][1], normal[p]))
    merges: list[list[str]] = []
    for piece in order:
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        splits = [s for s in splits if s[0] in normal and s[1] in normal]
        merges.extend([a, b] for a, b in sorted(splits, key=lambda s: (normal[s[0]], normal[s[1]])))
    return merges


def _decoder(spm: SpmModel, sentinels: dict[int, str]) -> dict[str, Any]:
    """Back to text: symbols from their sentinels, "▁" as spaces, bytes fused, dummy prefixes dropped."""
    decoders = [{"type": "Replace", "pattern": {"String": sentinels[i]}, "content": spm.pieces[i][0]}
                for i in sentinels]
    decoders += [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
                 {"type": "Fuse"}]
    if spm.add_dummy_prefix:  # each line's dummy prefix: at the start and after every newline
        decoders += [{"type": "Strip", "content": " ", "start": 1, "stop": 0},
                     {"type": "Replace", "pattern": {"String": "\n "}, "content": "\n"}]
    return {"type": "Sequence", "decoders": decoders}


def _sentinels(spm: SpmModel, eol: int) -> dict[int, str]:
    """id -> the one private-use character standing for a user-defined symbol such as <unk>.

    SentencePiece treats a user-defined symbol as one frozen unit that never merges with its
    neighbours. The HF pipeline gets the same by replacing the symbol's text with one
    character early in normalisation: the BPE/unigram model then sees a single character
    whose vocabulary entry is that symbol's id, and the decoder turns it back into text.
    (Matching the symbol as an added token instead would swallow the "▁" before it.)
    """
    user = [i for i, (_, _, kind) in enumerate(spm.pieces) if kind == SpmModel.USER_DEFINED and i != eol]
    if len(user) > 0x1900:
        raise CheckpointError("the SentencePiece model has too many user-defined symbols to export")
    return {i: chr(0xE000 + k) for k, i in enumerate(user)}


def _normalizer(spm: SpmModel, sentinels: dict[int, str]) -> dict[str, Any] | None:
    """SentencePiece's normalisation: its NFKC map, symbols to sentinels, whitespace, the dummy prefix."""
    steps: list[dict[str, Any]] = []
    if spm.precompiled_charsmap:
        steps.append({"type": "Precompiled",
                      "precompiled_charsmap": base64.b64encode(spm.precompiled_charsmap).decode("ascii")})
    # Longest symbols first, so one that contains another wins, as SentencePiece's matcher does.
    for i in sorted(sentinels, key=lambda i: -len(spm.pieces[i][0])):
        steps.append({"type": "Replace", "pattern": {"String": spm.pieces[i][0]}, "content": sentinels[i]})
    if spm.remove_extra_whitespaces:
        steps.append({"type": "Strip", "strip_left": True, "strip_right": True})
        steps.append({"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "})
    if spm.escape_whitespaces:
        steps.append({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})
    if spm.add_dummy_prefix:
        steps.append({"type": "Prepend", "prepend": "▁"})  # tokenizers skips empty strings
    return {"type": "Sequence", "normalizers": steps} if steps else None


def spm_tokenizer_config(tokenizer: Tokenizer) -> TokenizerConfig:
    """Our TokenizerConfig describing an existing SentencePiece model."""
    spm = read_spm(tokenizer.model_proto)
    try:
        return TokenizerConfig(
            vocab_size=tokenizer.vocab_size,
            model_type="unigram" if spm.model_type == 1 else "bpe",
            character_coverage=min(1.0, max(0.9, round(spm.character_coverage, 6))),
            byte_fallback=spm.byte_fallback,
        )
    except ConfigError as exc:
        raise CheckpointError(f"the tokenizer cannot be described by layerskip: {exc}") from None


def read_hf_tokenizer(hf_dir: Path) -> Tokenizer:
    """The directory's tokenizer.model, used the layerskip way (its eos is our end of line)."""
    path = hf_dir / SPM_MODEL
    if not path.is_file():
        raise CheckpointError(f"{hf_dir} has no tokenizer.model; a layerskip checkpoint needs the SentencePiece model "
                              "the weights were trained with. A tokenizer.json-only model (such as Llama 3) loads "
                              "directly: pass the directory itself as --checkpoint")
    tokenizer = Tokenizer.load(path)
    if tokenizer.eol_id < 0:
        raise CheckpointError(f"{path} has no end-of-sentence piece, which layerskip uses as its end-of-line token")
    return tokenizer
