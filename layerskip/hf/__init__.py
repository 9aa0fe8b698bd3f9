"""Hugging Face interoperability: our checkpoints as ``LlamaForCausalLM`` directories and back.

Our model *is* a Llama (rotate-half rotary, fp32 RMSNorm, SwiGLU, no biases, optionally tied
embeddings and grouped-query attention), so weights map one-to-one by name. Neither direction
imports ``transformers``; what our model cannot represent is refused with a ``CheckpointError``.

    export_hf(checkpoint, out_dir)  -> a directory AutoModelForCausalLM/AutoTokenizer.from_pretrained load
    load_hf(hf_dir, dtype=...)      -> a layerskip Checkpoint read in place (what --checkpoint HF_DIR does)
    import_hf(hf_dir, out_dir=None) -> a layerskip Checkpoint (saved to out_dir when given)
"""

from layerskip.hf.config import EXPORT_FORMAT, LAYERSKIP_KEY, hf_config, model_config_from_hf, read_hf_config
from layerskip.hf.export import export_hf
from layerskip.hf.layout import HF_CONFIG, HF_INDEX, HF_WEIGHTS
from layerskip.hf.load import import_hf, load_hf
from layerskip.hf.model_tokenizers import JsonTokenizer, SpmModelTokenizer, read_model_tokenizer, read_special_tokens
from layerskip.hf.names import hf_name, our_name
from layerskip.hf.spm import SpmModel, read_spm
from layerskip.hf.tokenizer import read_hf_tokenizer, spm_tokenizer_config, tokenizer_files, tokenizer_json
from layerskip.hf.weights import read_hf_weights

__all__ = [
    "EXPORT_FORMAT", "HF_CONFIG", "HF_INDEX", "HF_WEIGHTS", "LAYERSKIP_KEY", "JsonTokenizer", "SpmModel",
    "SpmModelTokenizer", "export_hf", "hf_config", "hf_name", "import_hf", "load_hf", "model_config_from_hf",
    "our_name", "read_hf_config", "read_hf_tokenizer", "read_hf_weights", "read_model_tokenizer",
    "read_special_tokens", "read_spm", "spm_tokenizer_config", "tokenizer_files", "tokenizer_json",
]
