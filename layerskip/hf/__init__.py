"""Hugging Face interoperability: our checkpoints as ``LlamaForCausalLM`` directories and back.

Our model *is* a Llama (rotate-half rotary, fp32 RMSNorm, SwiGLU, no biases, optionally
tied embeddings and grouped-query attention), so weights map one-to-one by name:

    export_hf(checkpoint, out_dir)  -> a directory transformers loads with
        AutoModelForCausalLM.from_pretrained(out_dir) and AutoTokenizer.from_pretrained(out_dir)
    import_hf(hf_dir, out_dir=None) -> a layerskip Checkpoint (saved to out_dir when given),
        so DEE, SSD, calibration and bench run on any Llama-architecture HF checkpoint

Neither direction imports ``transformers``: config.json and safetensors are read and written
directly, and the tokenizer is written as a ``tokenizers`` JSON built from our SentencePiece
model. What our model cannot represent (biases, rope scaling, another activation, ...) is
refused with a ``CheckpointError`` naming the field.

The exported tokenizer is a ``PreTrainedTokenizerFast`` over a tokenizer.json built here
from our SentencePiece model (no protobuf needed), reproducing its pipeline: SentencePiece's
own precompiled NFKC map, whitespace stripping and collapsing, a "▁" dummy prefix per line,
BPE merges (or unigram scores) and byte fallback. transformers 5's ``LlamaTokenizer`` would
rebuild its own pipeline without that normalisation, hence the generic class. Our
end-of-line token (SentencePiece's eos, id 2) is the HF token "\\n": a newline encodes to
id 2 and id 2 decodes to a newline, as ``Tokenizer.encode``/``decode`` do; it is also the
``eos_token`` (so ``skip_special_tokens=True`` drops line breaks). There is no BOS and no
``unk_token`` (byte fallback makes unknowns impossible). WikiText's ``<unk>`` keeps id 1
but is spelt U+E000 in the HF vocabulary (see ``_sentinels``); it decodes to "<unk>".
Measured at vocabulary 8192: identical token for token on all of WikiText-2 (BPE, 2.9M
tokens) and on its valid and test splits (unigram). Known differences: text containing U+E000 itself, and, for
unigram models only, text spelling a byte piece ("<0x41>") or "<sp_unk>".
"""

from __future__ import annotations

import base64
import json
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from layerskip.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, write_dir_atomically
from layerskip.config import ModelConfig, TokenizerConfig
from layerskip.errors import CheckpointError, ConfigError
from layerskip.model import Transformer, rotary_tables
from layerskip.tokenizer import Tokenizer

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
LAYERSKIP_KEY = "layerskip"  # our own configs, kept in config.json so the round trip is exact
EXPORT_FORMAT = "layerskip-hf-export"

# ----------------------------------------------------------------------------- weight names

_OUR_TO_HF_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_HF_TO_OUR_BLOCK = {v: k for k, v in _OUR_TO_HF_BLOCK.items()}
_TOP_LEVEL = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "lm_head.weight": "lm_head.weight"}
_BLOCK_NAME = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
_IGNORED_HF = re.compile(r"rotary_emb\.inv_freq$")  # old checkpoints saved this buffer


def hf_name(name: str) -> str:
    """Our parameter name -> the LlamaForCausalLM one."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    match = _BLOCK_NAME.match(name)
    if match and match.group(2) in _OUR_TO_HF_BLOCK:
        return f"model.layers.{match.group(1)}.{_OUR_TO_HF_BLOCK[match.group(2)]}"
    raise KeyError(f"no Hugging Face name for parameter {name!r}")


def our_name(name: str) -> str | None:
    """A LlamaForCausalLM tensor name -> ours; None for buffers we recompute; KeyError otherwise."""
    if _IGNORED_HF.search(name):
        return None
    for ours, theirs in _TOP_LEVEL.items():
        if name == theirs:
            return ours
    match = _BLOCK_NAME.match(name)
    if match and name.startswith("model.") and match.group(2) in _HF_TO_OUR_BLOCK:
        return f"layers.{match.group(1)}.{_HF_TO_OUR_BLOCK[match.group(2)]}"
    raise KeyError(name)


# ----------------------------------------------------------------------------- configs


def hf_config(cfg: ModelConfig, *, eos_id: int | None, extra: dict[str, Any]) -> dict[str, Any]:
    """config.json for LlamaForCausalLM, readable by transformers 4.45+ and 5.x."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4.x
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # 5.x
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "torch_dtype": "float32",
        LAYERSKIP_KEY: extra,
    }


def _refuse(where: Path, message: str) -> CheckpointError:
    return CheckpointError(f"{where}: {message}; layerskip can only import Llama-architecture models it can "
                           "represent exactly")


def _rope_theta(hf: dict[str, Any], where: Path) -> float:
    scaling = hf.get("rope_scaling")
    params = hf.get("rope_parameters")
    if isinstance(params, dict):  # transformers 5: {"rope_type": ..., "rope_theta": ...}
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise _refuse(where, f"rope_parameters has rope_type {rope_type!r} (only plain rotary, 'default', "
                                 "is supported)")
        extra = sorted(set(params) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"})
        if extra or params.get("partial_rotary_factor", 1.0) != 1.0:
            raise _refuse(where, f"rope_parameters has settings {extra or ['partial_rotary_factor']} "
                                 "that plain rotary positions do not have")
    elif params is not None:
        raise _refuse(where, f"rope_parameters is {params!r}, expected an object")
    if scaling is not None and not (isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type"))
                                    == "default" and set(scaling) <= {"rope_type", "type", "rope_theta"}):
        raise _refuse(where, f"rope_scaling is {scaling!r} (only none is supported)")
    theta = (params or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    if "rope_theta" in hf and theta != hf["rope_theta"]:
        raise _refuse(where, f"rope_theta {hf['rope_theta']} disagrees with rope_parameters' {theta}")
    return float(theta)


def model_config_from_hf(hf: dict[str, Any], where: Path) -> ModelConfig:
    """Our ModelConfig for a LlamaConfig dict, or a CheckpointError naming what does not fit."""
    model_type = hf.get("model_type")
    if model_type != "llama":
        raise _refuse(where, f"model_type is {model_type!r}, not 'llama'")
    architectures = hf.get("architectures") or ["LlamaForCausalLM"]
    if architectures != ["LlamaForCausalLM"]:
        raise _refuse(where, f"architectures is {architectures}, not ['LlamaForCausalLM']")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key, False):
            raise _refuse(where, f"{key} is true (our layers have no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse(where, f"hidden_act is {hf.get('hidden_act')!r} (our MLP is SwiGLU with silu)")
    if hf.get("quantization_config"):
        raise _refuse(where, "the weights are quantized; export them unquantized first")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if not isinstance(hf.get(k), int)]
    if missing:
        raise _refuse(where, f"config.json lacks integer {missing}")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * heads != hf["hidden_size"]:
        raise _refuse(where, f"head_dim {head_dim} is not hidden_size/num_attention_heads = "
                             f"{hf['hidden_size']}/{heads} (ours always is)")
    kv_heads = hf.get("num_key_value_heads") or heads
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=None if kv_heads == heads else kv_heads,
            d_ff=hf["intermediate_size"],
            dropout=0.0,
            max_seq_len=hf.get("max_position_embeddings", 2048),
            rope_theta=_rope_theta(hf, where),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=hf.get("initializer_range", 0.02),
        )
    except ConfigError as exc:
        raise _refuse(where, str(exc)) from None


def _restore_own_config(derived: ModelConfig, extra: Any) -> ModelConfig:
    """Our exported config when it agrees with the HF fields (it keeps dropout, which HF lacks)."""
    if not isinstance(extra, dict) or extra.get("format") != EXPORT_FORMAT:
        return derived
    try:
        ours = ModelConfig.from_dict(extra.get("model", {}))
    except (ConfigError, TypeError):
        return derived
    same = ours.to_dict() | {"dropout": 0.0, "num_kv_heads": ours.kv_heads}
    return ours if same == derived.to_dict() | {"num_kv_heads": derived.kv_heads} else derived


# ----------------------------------------------------------------------------- SentencePiece model


@dataclass
class SpmModel:
    """What a tokenizer.json needs from a SentencePiece ModelProto (read without protobuf)."""

    pieces: list[tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type)
    model_type: int = 1  # 1 unigram, 2 bpe, 3 word, 4 char
    byte_fallback: bool = False
    character_coverage: float = 0.9995
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True

    NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of a serialized protobuf message."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def read_spm(proto: bytes) -> SpmModel:
    """Parse the parts of sentencepiece_model.proto we need (field numbers from that file)."""
    spm = SpmModel()
    try:
        for number, _, value in _fields(proto):
            if number == 1:  # SentencePiece
                piece, score, kind = "", 0.0, SpmModel.NORMAL
                for n, _, v in _fields(value):
                    if n == 1:
                        piece = v.decode("utf-8")
                    elif n == 2:
                        score = struct.unpack("<f", v)[0]
                    elif n == 3:
                        kind = v
                spm.pieces.append((piece, score, kind))
            elif number == 2:  # TrainerSpec
                for n, _, v in _fields(value):
                    if n == 3:
                        spm.model_type = v
                    elif n == 35:
                        spm.byte_fallback = bool(v)
                    elif n == 10:
                        spm.character_coverage = struct.unpack("<f", v)[0]
            elif number == 3:  # NormalizerSpec
                for n, _, v in _fields(value):
                    if n == 2:
                        spm.precompiled_charsmap = bytes(v)
                    elif n == 3:
                        spm.add_dummy_prefix = bool(v)
                    elif n == 4:
                        spm.remove_extra_whitespaces = bool(v)
                    elif n == 5:
                        spm.escape_whitespaces = bool(v)
    except (IndexError, ValueError, struct.error, UnicodeDecodeError) as exc:
        raise CheckpointError(f"the SentencePiece model cannot be parsed ({exc})") from None
    return spm


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


def tokenizer_json(tokenizer: Tokenizer) -> dict[str, Any]:
    """A ``tokenizers`` JSON that encodes and decodes like ``tokenizer`` (see module docstring)."""
    spm = read_spm(tokenizer.model_proto)
    eol, unk_id = tokenizer.eol_id, tokenizer.sp.unk_id()
    sentinels = _sentinels(spm, eol)
    names = [sentinels.get(i, piece) for i, (piece, _, _) in enumerate(spm.pieces)]
    names[eol] = "\n"
    added = [{"id": eol, "content": "\n", "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}]
    if spm.model_type == 2:
        model: dict[str, Any] = {
            "type": "BPE", "dropout": None, "unk_token": names[unk_id] if unk_id >= 0 else None,
            "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
            "byte_fallback": spm.byte_fallback, "ignore_merges": False,
            "vocab": {name: i for i, name in enumerate(names)}, "merges": _bpe_merges(spm.pieces),
        }
    elif spm.model_type == 1:
        # SentencePiece's scores; its min over normal pieces sets the unknown-character penalty in both.
        vocab = [[name, score] for name, (_, score, _) in zip(names, spm.pieces)]
        model = {"type": "Unigram", "unk_id": unk_id if unk_id >= 0 else None, "vocab": vocab,
                 "byte_fallback": spm.byte_fallback}
    else:
        raise CheckpointError("only BPE and unigram SentencePiece models can be exported")
    decoders = [{"type": "Replace", "pattern": {"String": sentinels[i]}, "content": spm.pieces[i][0]}
                for i in sentinels]
    decoders += [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
                 {"type": "Fuse"}]
    if spm.add_dummy_prefix:  # each line's dummy prefix: at the start and after every newline
        decoders += [{"type": "Strip", "content": " ", "start": 1, "stop": 0},
                     {"type": "Replace", "pattern": {"String": "\n "}, "content": "\n"}]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": _normalizer(spm, sentinels),
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "never", "split": True},
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": model,
    }


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


# ----------------------------------------------------------------------------- export


def _checked_out_dir(out_dir: Path, *, hf: bool) -> None:
    """Refuse to replace a non-empty directory unless it is an earlier output of the same kind."""
    if out_dir.is_file():
        raise CheckpointError(f"--out {out_dir} is a file; give a directory path")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    try:
        config = json.loads((out_dir / HF_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        config = None
    same_kind = isinstance(config, dict) and (
        config.get("model_type") == "llama" if hf else config.get("format") == "layerskip-checkpoint"
    )
    if not same_kind:
        what = "a Hugging Face Llama directory" if hf else "a layerskip checkpoint"
        raise CheckpointError(f"--out {out_dir} exists and is not {what}, so it will not be replaced; "
                              "choose a new directory")


def export_hf(checkpoint: Checkpoint | str | Path, out_dir: str | Path) -> Path:
    """Write ``checkpoint`` as a LlamaForCausalLM directory (written to a temp dir, then renamed)."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    out_dir = Path(out_dir)
    if ckpt.path is not None and out_dir.resolve() == Path(ckpt.path).resolve():
        raise CheckpointError(f"--out {out_dir} is the checkpoint itself; choose another directory")
    _checked_out_dir(out_dir, hf=True)
    cfg, tokenizer = ckpt.model.config, ckpt.tokenizer
    state = {hf_name(k): v.detach().to("cpu").contiguous() for k, v in ckpt.model.state_dict().items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")  # transformers ties it to the embedding
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    extra = {"format": EXPORT_FORMAT, "model": cfg.to_dict(), "tokenizer": ckpt.tokenizer_config.to_dict(),
             "train": ckpt.train_config, "meta": ckpt.meta}
    config = hf_config(cfg, eos_id=tokenizer.eol_id, extra=extra) | {"torch_dtype": dtype}
    # generate() continues across line ends like `layerskip generate`; pass eos_token_id=2 to stop at one.
    generation = {"_from_model_config": False, "bos_token_id": None, "eos_token_id": None,
                  "pad_token_id": None, "do_sample": False}

    def write(tmp: Path) -> None:
        (tmp / HF_CONFIG).write_text(json.dumps(config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        save_file(state, tmp / HF_WEIGHTS, metadata={"format": "pt"})
        tokenizer.save(tmp / "tokenizer.model")
        for name, text in tokenizer_files(tokenizer, cfg.max_seq_len).items():
            (tmp / name).write_text(text, encoding="utf-8")

    return write_dir_atomically(out_dir, write)


# ----------------------------------------------------------------------------- import


def _read_hf_config(hf_dir: Path) -> dict[str, Any]:
    if not hf_dir.is_dir():
        raise CheckpointError(f"{hf_dir} is not a directory; pass a Hugging Face model directory "
                              "(config.json + *.safetensors)")
    path = hf_dir / HF_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{hf_dir} has no {HF_CONFIG}; it is not a Hugging Face model directory")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    if config.get("format") == "layerskip-checkpoint":
        raise CheckpointError(f"{hf_dir} is already a layerskip checkpoint; use it directly")
    return config


def _weight_files(hf_dir: Path) -> list[Path]:
    if (hf_dir / HF_INDEX).is_file():
        try:
            weight_map = json.loads((hf_dir / HF_INDEX).read_text())["weight_map"]
            files = sorted({hf_dir / name for name in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{hf_dir / HF_INDEX} is not a valid safetensors index ({exc})") from None
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{hf_dir} lacks weight shards {absent[:3]} listed in {HF_INDEX}")
        return files
    if (hf_dir / HF_WEIGHTS).is_file():
        return [hf_dir / HF_WEIGHTS]
    if any(hf_dir.glob("pytorch_model*.bin")):
        raise CheckpointError(f"{hf_dir} holds pickled pytorch_model*.bin weights, which layerskip does not load; "
                              "re-save them as safetensors (model.save_pretrained(dir, safe_serialization=True))")
    raise CheckpointError(f"{hf_dir} has neither {HF_WEIGHTS} nor {HF_INDEX}")


def read_hf_weights(hf_dir: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """All tensors under our names, checked against what ``cfg`` expects."""
    state: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for path in _weight_files(hf_dir):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    try:
                        ours = our_name(name)
                    except KeyError:
                        unknown.append(name)
                        continue
                    if ours is not None:
                        state[ours] = f.get_tensor(name).to(torch.float32)  # our model is fp32
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is truncated or corrupt ({exc})") from None
    if unknown:
        raise _refuse(hf_dir, f"the weights hold tensors a Llama without biases does not have: {unknown[:4]}")
    if cfg.tie_embeddings:
        head = state.pop("lm_head.weight", None)  # some exports save the tied head too
        if head is not None and not torch.equal(head, state.get("embed_tokens.weight", head)):
            raise _refuse(hf_dir, "tie_word_embeddings is true but lm_head.weight differs from the embedding")
    expected = {k: tuple(v.shape) for k, v in _meta_shapes(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(state))
    wrong = [f"{k}: {tuple(state[k].shape)} vs {expected[k]}" for k in expected
             if k in state and tuple(state[k].shape) != expected[k]]
    extra = sorted(set(state) - set(expected))
    if missing or wrong or extra:
        raise CheckpointError(f"{hf_dir}: the weights do not match config.json (missing {[hf_name(k) for k in missing][:4]}, "
                              f"unexpected {[hf_name(k) for k in extra][:4]}, shapes {wrong[:4]})")
    return state


def _meta_shapes(cfg: ModelConfig) -> Transformer:
    """The model's parameter names and shapes, without allocating or initialising weights."""
    with torch.device("meta"):
        return Transformer(cfg)


def _build_model(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> Transformer:
    """Our model holding ``state``, built without a random initialisation first (fast at 7B)."""
    model = _meta_shapes(cfg)
    model.load_state_dict(state, strict=False, assign=True)  # a tied lm_head is absent on purpose
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope_cos, model.rope_sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model = Transformer(cfg)  # the model has state this shortcut does not know: the plain way
        model.load_state_dict(state, strict=False)
    return model.eval()


def _read_hf_tokenizer(hf_dir: Path) -> Tokenizer:
    path = hf_dir / "tokenizer.model"
    if not path.is_file():
        raise CheckpointError(f"{hf_dir} has no tokenizer.model; layerskip needs the SentencePiece model the weights "
                              "were trained with (tokenizer.json-only tokenizers such as Llama 3's are not supported)")
    tokenizer = Tokenizer.load(path)
    if tokenizer.eol_id < 0:
        raise CheckpointError(f"{path} has no end-of-sentence piece, which layerskip uses as its end-of-line token")
    return tokenizer


def import_hf(hf_dir: str | Path, out_dir: str | Path | None = None) -> Checkpoint:
    """Load a LlamaForCausalLM directory (config.json + safetensors, sharded or not) as our model.

    With ``out_dir``, also save it as a layerskip checkpoint there (what every command loads).
    A directory written by ``export_hf`` comes back exactly: weights, configs, tokenizer, metadata.
    Weights are loaded into an fp32 model. The tokenizer is the directory's tokenizer.model used
    the layerskip way: no BOS, and its eos stands for a line break (Llama 2's own tokenizer
    adds a BOS and spells a newline as <0x0A>), so give such models single-line prompts.
    """
    hf_dir = Path(hf_dir)
    hf = _read_hf_config(hf_dir)
    cfg = _restore_own_config(model_config_from_hf(hf, hf_dir), hf.get(LAYERSKIP_KEY))
    tokenizer = _read_hf_tokenizer(hf_dir)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{hf_dir}: tokenizer.model has {tokenizer.vocab_size} pieces but the model only "
                              f"{cfg.vocab_size} embeddings")
    if tokenizer.vocab_size != cfg.vocab_size:
        raise CheckpointError(f"{hf_dir}: tokenizer.model has {tokenizer.vocab_size} pieces but the model has "
                              f"{cfg.vocab_size} embeddings (padded vocabularies are not supported)")
    state = read_hf_weights(hf_dir, cfg)
    extra = hf.get(LAYERSKIP_KEY) if isinstance(hf.get(LAYERSKIP_KEY), dict) else {}
    ours = extra.get("format") == EXPORT_FORMAT
    tokenizer_config = _own_tokenizer_config(extra) if ours else None
    tokenizer_config = tokenizer_config or spm_tokenizer_config(tokenizer)
    model = _build_model(cfg, state)
    meta = extra.get("meta", {}) if ours else {"imported_from": str(hf_dir)}
    train = extra.get("train", {}) if ours else {}
    ckpt = Checkpoint(model=model, tokenizer=tokenizer, model_config=cfg, tokenizer_config=tokenizer_config,
                      train_config=train, meta=meta)
    if out_dir is not None:
        out_dir = Path(out_dir)
        if out_dir.resolve() == hf_dir.resolve():
            raise CheckpointError(f"--out {out_dir} is the Hugging Face directory itself; choose another")
        _checked_out_dir(out_dir, hf=False)
        ckpt.path = save_checkpoint(out_dir, model, tokenizer, tokenizer_config=tokenizer_config,
                                    train_config=train, meta=meta)
    return ckpt


def _own_tokenizer_config(extra: dict[str, Any]) -> TokenizerConfig | None:
    try:
        return TokenizerConfig.from_dict(extra.get("tokenizer", {}))
    except (ConfigError, TypeError):
        return None
