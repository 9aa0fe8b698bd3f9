"""config.json <-> our ModelConfig: writing a LlamaConfig, reading one back or refusing what we lack."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from layerskip.config import ModelConfig, TokenizerConfig
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
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * heads != hf["hidden_size"]:
        raise refusal(where, f"head_dim {head_dim} is not hidden_size/num_attention_heads = "
                             f"{hf['hidden_size']}/{heads} (ours always is)")


def _rope_theta(hf: dict[str, Any], where: Path) -> float:
    """Rotary theta from the 4.x or 5.x fields; scaled or partial rotary positions are refused."""
    scaling = hf.get("rope_scaling")
    params = hf.get("rope_parameters")
    if isinstance(params, dict):  # transformers 5: {"rope_type": ..., "rope_theta": ...}
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise refusal(where, f"rope_parameters has rope_type {rope_type!r} (only plain rotary, 'default', "
                                 "is supported)")
        extra = sorted(set(params) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"})
        if extra or params.get("partial_rotary_factor", 1.0) != 1.0:
            raise refusal(where, f"rope_parameters has settings {extra or ['partial_rotary_factor']} "
                                 "that plain rotary positions do not have")
    elif params is not None:
        raise refusal(where, f"rope_parameters is {params!r}, expected an object")
    if scaling is not None and not (isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type"))
                                    == "default" and set(scaling) <= {"rope_type", "type", "rope_theta"}):
        raise refusal(where, f"rope_scaling is {scaling!r} (only none is supported)")
    theta = (params or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    if "rope_theta" in hf and theta != hf["rope_theta"]:
        raise refusal(where, f"rope_theta {hf['rope_theta']} disagrees with rope_parameters' {theta}")
    return float(theta)


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
