"""Parameter names, ours <-> LlamaForCausalLM's: the same tensors, one-to-one."""

from __future__ import annotations

import re

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

