"""Our SentencePiece tokenizer as llama.cpp's ``llama`` (SentencePiece BPE) vocabulary.

llama.cpp's SentencePiece tokenizer merges the adjacent pair whose merged piece scores best,
exactly as SentencePiece's BPE does, with byte fallback through the ``<0xXX>`` pieces. The
vocabulary keeps our ids, pieces and scores, with two changes:

- our end-of-line token (SentencePiece's end-of-sentence piece, id 2) is written as the text
  "\\n" of type user-defined: llama.cpp splits user-defined text out of the input before
  tokenizing, so a newline becomes our end-of-line id, and that id prints as a newline; it is
  also the end-of-sequence token (llama.cpp stops there unless told to ignore it);
- there is no BOS (``add_bos_token`` false; llama.cpp still reports id 1 as its default BOS).

WikiText's ``<unk>`` stays one user-defined token. What llama.cpp does not do is SentencePiece's
normalisation (NFKC; stripping each line's outer spaces and collapsing repeated ones), and it puts
its dummy "▁" in front of each stretch of text after a user-defined token rather than in front of
each line. So llama.cpp tokenizes a text exactly as we do when its lines are in SentencePiece's
normal form (no leading, trailing or repeated spaces; NFKC-invariant) and ``<unk>`` appears only
at the end of a line. Raw WikiText lines are not (they start and end with a space, and most hold
``<unk>``): give llama.cpp their token ids instead.

A Hugging Face model's own tokenizer (read in place: ``layerskip.hf.model_tokenizers``) is
written by ``layerskip.gguf.hf_vocab``: a Llama 2 tokenizer.model as it is, a Llama 3
tokenizer.json as llama.cpp's byte-level BPE.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from layerskip.errors import CheckpointError
from layerskip.hf.spm import SpmModel, read_spm
from layerskip.tokenizer import Tokenizer

EOL_TEXT = "\n"
SPM_BPE = 2  # SentencePiece's model_type for BPE


@dataclass
class Vocab:
    """Everything the tokenizer.ggml.* keys hold."""

    model: str  # tokenizer.ggml.model: "llama" is SentencePiece BPE, "gpt2" byte-level BPE
    tokens: list[str]
    scores: list[float] | None  # None: not written (byte-level BPE ranks merges, not tokens)
    types: list[int]  # gguf.TokenType values
    eos_id: int
    unk_id: int | None
    add_space_prefix: bool | None  # None: not written (llama.cpp's BPE has no dummy prefix)
    pre: str | None = None  # tokenizer.ggml.pre: which pre-tokenizer llama.cpp applies to a BPE's text
    merges: list[str] = field(default_factory=list)  # "left right", highest priority first
    bos_id: int | None = None
    add_bos: bool = False

    def write(self, writer: Any) -> None:
        """Add the tokenizer keys to a gguf.GGUFWriter."""
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        if self.merges:
            writer.add_token_merges(self.merges)
        if self.bos_id is not None:
            writer.add_bos_token_id(self.bos_id)
        writer.add_eos_token_id(self.eos_id)
        if self.unk_id is not None:
            writer.add_unk_token_id(self.unk_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(False)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)


def gguf_vocab(tokenizer: Any) -> Vocab:
    """The vocabulary for a checkpoint's tokenizer, or a CheckpointError saying why llama.cpp cannot have it."""
    from layerskip.hf.model_tokenizers import JsonTokenizer, SpmModelTokenizer

    if isinstance(tokenizer, SpmModelTokenizer):  # before Tokenizer, its base: a Llama 2 model's own way
        from layerskip.gguf.hf_vocab import spm_model_vocab

        return spm_model_vocab(tokenizer)
    if isinstance(tokenizer, JsonTokenizer):
        from layerskip.gguf.hf_vocab import json_vocab

        return json_vocab(tokenizer)
    if not isinstance(tokenizer, Tokenizer):
        raise CheckpointError(f"export-gguf can write layerskip's SentencePiece tokenizer, a Hugging Face model's "
                              f"tokenizer.model or its byte-level BPE tokenizer.json, not a {type(tokenizer).__name__}")
    return sentencepiece_vocab(tokenizer)


def sentencepiece_vocab(tokenizer: Tokenizer) -> Vocab:
    """Our pieces, scores and types, with the end-of-line token as user-defined "\\n" (see the module docstring)."""
    import gguf

    spm = read_spm(tokenizer.model_proto)
    _refuse_what_llamacpp_tokenizes_differently(spm, tokenizer)
    eol = tokenizer.eol_id
    tokens = [piece for piece, _, _ in spm.pieces]
    types = [int(kind) for _, _, kind in spm.pieces]
    tokens[eol], types[eol] = EOL_TEXT, int(gguf.TokenType.USER_DEFINED)
    unk = tokenizer.sp.unk_id()
    return Vocab(model="llama", tokens=tokens, scores=[float(score) for _, score, _ in spm.pieces], types=types,
                 eos_id=eol, unk_id=unk if unk >= 0 else None, add_space_prefix=spm.add_dummy_prefix)


def _refuse_what_llamacpp_tokenizes_differently(spm: SpmModel, tokenizer: Tokenizer) -> None:
    refuse_unlike_llamacpp_bpe(spm)
    if len(spm.pieces) != tokenizer.vocab_size:
        raise CheckpointError(f"the tokenizer model lists {len(spm.pieces)} pieces but has {tokenizer.vocab_size} "
                              "tokens; it cannot be read")
    if tokenizer.eol_id < 0:
        raise CheckpointError("the tokenizer has no end-of-sentence piece, which layerskip uses as its end-of-line "
                              "token")
    clash = [i for i, (piece, _, _) in enumerate(spm.pieces) if piece == EOL_TEXT and i != tokenizer.eol_id]
    if clash:
        raise CheckpointError(f"piece {clash[0]} of the tokenizer is a newline, which the GGUF vocabulary needs for "
                              "the end-of-line token")


def refuse_unlike_llamacpp_bpe(spm: SpmModel) -> None:
    """A CheckpointError for a SentencePiece model llama.cpp's tokenizer (BPE, byte fallback) would split differently."""
    if spm.model_type != SPM_BPE:
        kind = {1: "unigram", 3: "word", 4: "char"}.get(spm.model_type, f"type {spm.model_type}")
        raise CheckpointError(f"the tokenizer is a SentencePiece {kind} model; llama.cpp's SentencePiece tokenizer "
                              "(tokenizer.ggml.model 'llama') is BPE and would split text differently. Export a "
                              "model whose tokenizer was trained with model_type bpe")
    if not spm.byte_fallback:
        raise CheckpointError("the tokenizer has no byte fallback; llama.cpp's SentencePiece tokenizer needs the "
                              "<0xXX> byte pieces for characters outside the vocabulary. Export a model whose "
                              "tokenizer was trained with byte_fallback")
