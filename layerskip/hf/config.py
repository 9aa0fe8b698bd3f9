"""config.json <-> our ModelConfig: writing a LlamaConfig, reading one back or refusing what we lack."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from layerskip.config import ModelConfig, RopeScaling, TokenizerConfig
from layerskip.errors import CheckpointError, ConfigError
from layerskip.hf.layout import HF_CONFIG

LAYERSKIP_KEY = "layerskip"  # our own configs, kept in config.json so the round trip is exact
EXPORT_FORMAT = "layerskip-hf-export"


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
        "rope_scaling": _rope_fields(cfg.rope_scaling) or None,  # 4.x, and preferred by 5.x when set
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}  # 5.x
        | _rope_fields(cfg.rope_scaling),
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


def _rope_fields(scaling: RopeScaling | None) -> dict[str, Any]:
    """Hugging Face's spelling of a rope scaling: rope_type and its set parameters ({} for none)."""
    if scaling is None:
        return {}
    return {k: v for k, v in dataclasses.asdict(scaling).items() if v is not None}


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    """config.json of a Hugging Face model directory, refusing what is not one."""
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


def model_config_from_hf(hf: dict[str, Any], where: Path) -> ModelConfig:
    """Our ModelConfig for a LlamaConfig dict, or a CheckpointError naming what does not fit."""
    _refuse_what_we_lack(hf, where)
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    theta, scaling = read_rope(hf, where)
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
            rope_theta=theta,
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=hf.get("initializer_range", 0.02),
            head_dim=hf.get("head_dim"),
            rope_scaling=scaling,
        )
    except ConfigError as exc:
        raise refusal(where, str(exc)) from None


def _refuse_what_we_lack(hf: dict[str, Any], where: Path) -> None:
    """A CheckpointError for the first field saying the model is not a Llama we can represent."""
    model_type = hf.get("model_type")
    if model_type != "llama":
        raise refusal(where, f"model_type is {model_type!r}, not 'llama'")
    architectures = hf.get("architectures") or ["LlamaForCausalLM"]
    if architectures != ["LlamaForCausalLM"]:
        raise refusal(where, f"architectures is {architectures}, not ['LlamaForCausalLM']")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key, False):
            raise refusal(where, f"{key} is true (our layers have no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise refusal(where, f"hidden_act is {hf.get('hidden_act')!r} (our MLP is SwiGLU with silu)")
    if hf.get("quantization_config"):
        raise refusal(where, "the weights are quantized; export them unquantized first")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if not isinstance(hf.get(k), int)]
    if missing:
        raise refusal(where, f"config.json lacks integer {missing}")


ROPE_SETTINGS = {"default": (), "linear": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def read_rope(hf: dict[str, Any], where: Path) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from transformers 4.x's fields (rope_scaling + rope_theta) or 5.x's (rope_parameters).

    Types default, linear and llama3 are read; others are refused by name, and so are the two
    spellings disagreeing (transformers 5 would silently prefer rope_scaling).
    """
    spellings = {}
    for key in ("rope_scaling", "rope_parameters"):
        value = hf.get(key)
        if value is not None and not isinstance(value, dict):
            raise refusal(where, f"{key} is {value!r}, expected an object")
        if value:
            spellings[key] = _read_rope_dict(value, hf, key, where)
    if not spellings:
        return float(hf.get("rope_theta", 10000.0)), None
    (first, rope), *rest = spellings.items()
    if rest and rest[0][1] != rope:
        raise refusal(where, f"rope_scaling and rope_parameters disagree ({hf['rope_scaling']} vs "
                             f"{hf['rope_parameters']}); remove one of them")
    return rope


def _read_rope_dict(rope: dict[str, Any], hf: dict[str, Any], key: str, where: Path
                    ) -> tuple[float, RopeScaling | None]:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_SETTINGS:
        raise refusal(where, f"{key} has rope_type {rope_type!r} (layerskip implements "
                             f"{', '.join(repr(t) for t in ROPE_SETTINGS)})")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise refusal(where, f"{key} has partial_rotary_factor {rope['partial_rotary_factor']} (only full rotary "
                             "positions are supported)")
    names = ROPE_SETTINGS[rope_type]
    extra = sorted(set(rope) - {"rope_type", "type", "rope_theta", "partial_rotary_factor", *names})
    if extra:
        raise refusal(where, f"{key} of type {rope_type!r} has settings {extra} that layerskip does not implement")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if hf.get("rope_theta") is not None and theta != hf["rope_theta"]:
        raise refusal(where, f"rope_theta {hf['rope_theta']} disagrees with {key}' {theta}")
    if rope_type == "default":
        return float(theta), None
    settings = {name: rope.get(name) for name in names}
    if rope_type == "llama3" and settings["original_max_position_embeddings"] is None:  # as transformers defaults it
        settings["original_max_position_embeddings"] = hf.get("max_position_embeddings")
    try:
        return float(theta), RopeScaling(rope_type=rope_type, **settings)
    except ConfigError as exc:
        raise refusal(where, f"{key}: {exc}") from None


def refusal(where: Path, message: str) -> CheckpointError:
    """The error for a model layerskip cannot represent exactly."""
    return CheckpointError(f"{where}: {message}; layerskip can only import Llama-architecture models it can "
                           "represent exactly")


def own_export(hf: dict[str, Any]) -> dict[str, Any] | None:
    """The section ``export_hf`` keeps in config.json (our configs and metadata); None for other models."""
    extra = hf.get(LAYERSKIP_KEY)
    return extra if isinstance(extra, dict) and extra.get("format") == EXPORT_FORMAT else None


def restore_own_config(derived: ModelConfig, own: dict[str, Any] | None) -> ModelConfig:
    """Our exported config when it agrees with the HF fields (it keeps dropout, which HF lacks)."""
    if own is None:
        return derived
    try:
        ours = ModelConfig.from_dict(own.get("model", {}))
    except (ConfigError, TypeError):
        return derived
    same = ours.to_dict() | {"dropout": 0.0, "num_kv_heads": ours.kv_heads}
    return ours if same == derived.to_dict() | {"num_kv_heads": derived.kv_heads} else derived


def own_tokenizer_config(own: dict[str, Any]) -> TokenizerConfig | None:
    """Our exported TokenizerConfig, or None when the section does not hold a valid one."""
    try:
        return TokenizerConfig.from_dict(own.get("tokenizer", {}))
    except (ConfigError, TypeError):
        return None
