"""export_hf: a layerskip checkpoint as a LlamaForCausalLM directory that transformers loads."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from layerskip.checkpoint import Checkpoint, load_checkpoint, write_dir_atomically
from layerskip.errors import CheckpointError
from layerskip.hf.config import EXPORT_FORMAT, hf_config
from layerskip.hf.layout import HF_CONFIG, HF_GENERATION_CONFIG, HF_WEIGHTS, SPM_MODEL, checked_out_dir
from layerskip.hf.names import hf_name
from layerskip.hf.tokenizer import tokenizer_files
from layerskip.tokenizer import Tokenizer


def export_hf(checkpoint: Checkpoint | str | Path, out_dir: str | Path) -> Path:
    """Write ``checkpoint`` as a LlamaForCausalLM directory (written to a temp dir, then renamed)."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    out_dir = Path(out_dir)
    if ckpt.path is not None and out_dir.resolve() == Path(ckpt.path).resolve():
        raise CheckpointError(f"--out {out_dir} is the checkpoint itself; choose another directory")
    checked_out_dir(out_dir, hf=True)
    cfg, tokenizer = ckpt.model.config, ckpt.tokenizer
    if type(tokenizer) is not Tokenizer or ckpt.tokenizer_config is None:
        raise CheckpointError(f"{ckpt.path} was loaded from a Hugging Face directory with its own tokenizer; "
                              "export-hf writes layerskip checkpoints: use that directory as it is")
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
        (tmp / HF_GENERATION_CONFIG).write_text(json.dumps(generation, indent=2))
        save_file(state, tmp / HF_WEIGHTS, metadata={"format": "pt"})
        tokenizer.save(tmp / SPM_MODEL)
        for name, text in tokenizer_files(tokenizer, cfg.max_seq_len).items():
            (tmp / name).write_text(text, encoding="utf-8")

    return write_dir_atomically(out_dir, write)
