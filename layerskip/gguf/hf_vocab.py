"""A Hugging Face model's own tokenizer as a llama.cpp vocabulary, so llama.cpp tokenizes text as the model does.

- tokenizer.model (Llama 2): tokenizer model ``llama`` (SentencePiece BPE with byte fallback), the
  model's pieces, scores and types as they are; its BOS, added when its tokenizer config says so;
  its EOS. llama.cpp does not normalise text, so a model whose normaliser changes text (NFKC,
  collapsing spaces) is refused; Llama 2's is the identity.
- tokenizer.json (Llama 3): tokenizer model ``gpt2`` (byte-level BPE) with pre-tokenizer
  ``llama-bpe``, llama.cpp's implementation of Llama 3's pre-tokenizer regex, which also takes a
  pre-token the vocabulary holds whole as one token (tokenizers' ``ignore_merges``). Tokens in id
  order, as byte-level text (the 256 byte characters are ordinary tokens in llama.cpp's BPE; its
  "byte" type is SentencePiece's <0xXX>); merges in rank order as "left right"; added special
  tokens as control tokens, other added tokens as user-defined ones. Any other pre-tokenizer,
  normaliser, decoder or BPE option is refused with what was found.

Special tokens' text in a prompt (``<|eot_id|>``): ``tokenizers`` always reads it as the special
token, llama.cpp when asked to parse special tokens (its command-line tools do; llama-cpp-python's
``tokenize(..., special=True)``). SentencePiece never does, like llama.cpp with ``special=False``.
Everything here is linear in the vocabulary and the merges (a Llama 3 vocabulary has 128,256 tokens).
"""

from __future__ import annotations

import json
from typing import Any

from layerskip.errors import CheckpointError
from layerskip.gguf.vocab import Vocab, refuse_unlike_llamacpp_bpe
from layerskip.hf.model_tokenizers import JsonTokenizer, SpmModelTokenizer
from layerskip.hf.spm import SpmModel, read_spm

# Llama 3's pre-tokenizer regex exactly as its tokenizer.json spells it (llama.cpp's "llama-bpe" implements it)
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PRE = "llama-bpe"
_JSON = "tokenizer.json"


# ----------------------------------------------------------------------------- tokenizer.model (Llama 2)


def spm_model_vocab(tokenizer: SpmModelTokenizer) -> Vocab:
    """A Llama 2 style tokenizer.model as it is, with the model's BOS (if it adds one) and EOS."""
    spm = read_spm(tokenizer.model_proto)
    refuse_unlike_llamacpp_bpe(spm)
    _refuse_normalisation(spm)
    if len(spm.pieces) != tokenizer.vocab_size:
        raise CheckpointError(f"the tokenizer.model lists {len(spm.pieces)} pieces but has {tokenizer.vocab_size} "
                              "tokens; it cannot be read")
    own_bos, unk = tokenizer.sp.bos_id(), tokenizer.sp.unk_id()
    bos = tokenizer.bos_id if tokenizer.bos_id is not None else own_bos if own_bos >= 0 else None
    return Vocab(model="llama", tokens=[piece for piece, _, _ in spm.pieces],
                 scores=[float(score) for _, score, _ in spm.pieces],
                 types=[int(kind) for _, _, kind in spm.pieces],  # SentencePiece's numbering is gguf.TokenType's
                 eos_id=_eos(tokenizer), unk_id=unk if unk >= 0 else None, add_space_prefix=spm.add_dummy_prefix,
                 bos_id=bos, add_bos=tokenizer.bos_id is not None)


def _refuse_normalisation(spm: SpmModel) -> None:
    """llama.cpp's SentencePiece tokenizer only turns spaces into "▁": refuse a model that changes text otherwise."""
    if spm.precompiled_charsmap:
        raise CheckpointError("the tokenizer.model normalises text (NFKC or a custom rule) before splitting it; "
                              "llama.cpp does not, so it would tokenize some text differently (Llama 2's "
                              "tokenizer.model uses the identity normaliser)")
    if spm.remove_extra_whitespaces:
        raise CheckpointError("the tokenizer.model strips outer spaces and collapses repeated ones before "
                              "splitting text; llama.cpp does not, so it would tokenize such text differently")
    if not spm.escape_whitespaces:
        raise CheckpointError("the tokenizer.model keeps spaces as they are; llama.cpp's SentencePiece tokenizer "
                              "always writes them as '▁', so it would tokenize text differently")


# ----------------------------------------------------------------------------- tokenizer.json (Llama 3)


def json_vocab(tokenizer: JsonTokenizer) -> Vocab:
    """A Llama 3 style tokenizer.json as llama.cpp's byte-level BPE ("gpt2", pre-tokenizer "llama-bpe")."""
    import gguf

    data = _parse(tokenizer.text)
    pre = _llama_cpp_pre_tokenizer(data)
    model = _byte_level_bpe(data)
    vocab = model["vocab"]
    tokens, types = _tokens_in_id_order(vocab, data.get("added_tokens") or [], tokenizer.vocab_size, gguf.TokenType)
    unk = model.get("unk_token")
    return Vocab(model="gpt2", pre=pre, tokens=tokens, scores=None, types=types,
                 merges=_merges(model.get("merges") or []), eos_id=_eos(tokenizer),
                 unk_id=vocab.get(unk) if isinstance(unk, str) else None, add_space_prefix=None,
                 bos_id=tokenizer.bos_id, add_bos=tokenizer.bos_id is not None)


def _parse(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"the {_JSON} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"the {_JSON} is not a JSON object")
    return data


def _llama_cpp_pre_tokenizer(data: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer: only Llama 3's (a Split on its regex, then ByteLevel) has one here."""
    pre = data.get("pre_tokenizer")
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    if isinstance(steps, list) and len(steps) == 2 and _is_llama3_split(steps[0]) and _is_bare_byte_level(steps[1]):
        return LLAMA3_PRE
    raise CheckpointError(f"the {_JSON}'s pre-tokenizer ({_describe(pre)}) is not Llama 3's, the only one "
                          f"export-gguf can name for llama.cpp (tokenizer.ggml.pre {LLAMA3_PRE!r}: a Split on Llama "
                          "3's regex, then ByteLevel without a prefix space or regex of its own); llama.cpp would "
                          "split text differently")


def _is_llama3_split(step: Any) -> bool:
    return (isinstance(step, dict) and step.get("type") == "Split" and step.get("pattern") == {"Regex": LLAMA3_REGEX}
            and step.get("behavior") == "Isolated" and step.get("invert") is False)


def _is_bare_byte_level(step: Any) -> bool:
    """ByteLevel that only maps bytes to characters (its own defaults add a prefix space and split with GPT-2's regex)."""
    return (isinstance(step, dict) and step.get("type") == "ByteLevel" and step.get("add_prefix_space") is False
            and step.get("use_regex") is False)


def _describe(step: Any) -> str:
    """A short account of a pre-tokenizer for an error message."""
    if not isinstance(step, dict):
        return "none" if step is None else type(step).__name__
    kind = step.get("type", "of no type")
    if kind == "Sequence" and isinstance(step.get("pretokenizers"), list):
        return ", then ".join(_describe(s) for s in step["pretokenizers"]) or "an empty Sequence"
    if kind == "Split":
        pattern = json.dumps(step.get("pattern"), ensure_ascii=False)
        return f"Split on {pattern if len(pattern) <= 60 else pattern[:57] + '...'}, {step.get('behavior')}"
    if kind == "ByteLevel":
        said = [what for key, what in (("add_prefix_space", "a prefix space"), ("use_regex", "GPT-2's regex"))
                if step.get(key, True)]
        return "ByteLevel" + (f" with {' and '.join(said)}" if said else "")
    return str(kind)


def _byte_level_bpe(data: dict[str, Any]) -> dict[str, Any]:
    """tokenizer.json's model, refused unless it is plain byte-level BPE as llama.cpp's "gpt2" tokenizer works."""
    model = data.get("model")
    kind = model.get("type") if isinstance(model, dict) else None
    if kind != "BPE":
        raise CheckpointError(f"the {_JSON}'s model is {kind or 'missing'}, not BPE; llama.cpp's byte-level "
                              "tokenizer (gpt2) is BPE")
    if data.get("normalizer") is not None:
        raise CheckpointError(f"the {_JSON} normalises text ({_describe(data['normalizer'])}) before splitting it; "
                              "llama.cpp's byte-level BPE does not")
    for key, why in (("byte_fallback", "falls back to <0xXX> byte tokens"), ("dropout", "drops merges at random"),
                     ("continuing_subword_prefix", "marks word continuations"),
                     ("end_of_word_suffix", "marks word ends")):
        if model.get(key):
            raise CheckpointError(f"the {_JSON}'s BPE {why} ({key} {model[key]!r}); llama.cpp's byte-level BPE "
                                  "does not")
    if model.get("ignore_merges") is not True:
        raise CheckpointError(f"the {_JSON}'s BPE merges even a pre-token its vocabulary holds whole (ignore_merges "
                              f"false); llama.cpp's {LLAMA3_PRE!r} takes such a pre-token as one token, as Llama 3's "
                              "tokenizer.json does (ignore_merges true)")
    decoder = data.get("decoder")
    if not (isinstance(decoder, dict) and decoder.get("type") == "ByteLevel"):
        raise CheckpointError(f"the {_JSON}'s decoder is {_describe(decoder)}, not ByteLevel; llama.cpp turns "
                              "byte-level tokens back into bytes")
    if not isinstance(model.get("vocab"), dict):
        raise CheckpointError(f"the {_JSON}'s BPE has no vocab object")
    return model


def _tokens_in_id_order(vocab: dict[str, Any], added: list[Any], size: int,
                        kinds: Any) -> tuple[list[str], list[int]]:
    """Every id's text and gguf.TokenType (``kinds``): the BPE's tokens normal, added ones control or user-defined."""
    tokens: list[str | None] = [None] * size
    types = [int(kinds.NORMAL)] * size
    for text, token in vocab.items():
        _place(tokens, token, text)
    for entry in added:
        token, text, special = _added_token(entry)
        if tokens[_checked_id(token, text, size)] not in (None, text):
            raise CheckpointError(f"the {_JSON} gives id {token} to both {tokens[token]!r} and the added token {text!r}")
        tokens[token] = text
        types[token] = int(kinds.CONTROL if special else kinds.USER_DEFINED)
    missing = next((i for i, text in enumerate(tokens) if text is None), None)
    if missing is not None:
        raise CheckpointError(f"the {_JSON} has no token with id {missing} of its {size}; llama.cpp needs every id")
    return tokens, types  # type: ignore[return-value]  (no None left)


def _place(tokens: list[str | None], token: Any, text: str) -> None:
    if tokens[_checked_id(token, text, len(tokens))] is not None:
        raise CheckpointError(f"the {_JSON} gives id {token} to both {tokens[token]!r} and {text!r}")
    tokens[token] = text


def _checked_id(token: Any, text: str, size: int) -> int:
    if not (isinstance(token, int) and not isinstance(token, bool) and 0 <= token < size):
        raise CheckpointError(f"the {_JSON} gives {text!r} the id {token!r}, outside 0..{size - 1}")
    return token


def _added_token(entry: Any) -> tuple[Any, str, bool]:
    """(id, text, special) of one of tokenizer.json's added_tokens, refused if llama.cpp cannot match it the same way."""
    if not (isinstance(entry, dict) and isinstance(entry.get("content"), str) and entry["content"]):
        raise CheckpointError(f"the {_JSON} lists an added token without text: {entry!r}")
    flags = [flag for flag in ("lstrip", "rstrip", "single_word") if entry.get(flag)]
    if flags:
        raise CheckpointError(f"the {_JSON}'s added token {entry['content']!r} is matched with {flags[0]}, which "
                              "llama.cpp cannot express for one token")
    return entry.get("id"), entry["content"], bool(entry.get("special"))


def _merges(merges: list[Any]) -> list[str]:
    """Merges as llama.cpp reads them, "left right" (tokenizer.json writes "left right" or, lately, [left, right])."""
    out = []
    for merge in merges:
        if isinstance(merge, str):
            left, _, right = merge.partition(" ")
        elif isinstance(merge, list) and len(merge) == 2 and all(isinstance(part, str) for part in merge):
            left, right = merge
        else:
            left = right = ""
        if not left or not right or " " in left or " " in right:
            raise CheckpointError(f"the {_JSON}'s merge {merge!r} is not two tokens without spaces; llama.cpp "
                                  "writes a merge as 'left right'")
        out.append(f"{left} {right}")
    return out


def _eos(tokenizer: SpmModelTokenizer | JsonTokenizer) -> int:
    if tokenizer.eos_id is None:
        raise CheckpointError("the model's files name no end-of-sequence token (eos_token_id in "
                              "generation_config.json or config.json, or tokenizer_config.json's eos_token); a GGUF "
                              "file needs one, or llama.cpp would stop at a default id of its own. Add eos_token_id "
                              "to generation_config.json")
    return tokenizer.eos_id
