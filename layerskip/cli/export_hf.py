"""Export a checkpoint as a Hugging Face LlamaForCausalLM directory, or import one.

  layerskip export-hf --checkpoint CKPT --out DIR
      writes DIR with config.json, model.safetensors, generation_config.json and the
      tokenizer (tokenizer.json, tokenizer_config.json, tokenizer.model), which
      transformers loads with AutoModelForCausalLM / AutoTokenizer.from_pretrained(DIR).

  layerskip export-hf --import-from HF_DIR --out CKPT
      the reverse: reads a Llama-architecture HF directory (config.json, model.safetensors
      or a sharded model.safetensors.index.json, and tokenizer.model) and writes a layerskip
      checkpoint. Every other command (generate, eval, calibrate, bench) also reads HF_DIR
      itself (--checkpoint HF_DIR, tokenizer.json-only ones too); importing is for keeping a
      layerskip checkpoint.

Neither direction needs transformers; --check (export only) loads the result with
transformers and compares its logits with ours (pip install -e ".[hf]").
The output directory is written atomically; the path is printed on stdout.
"""

from __future__ import annotations

import argparse
import sys

from layerskip.cli.common import add_checkpoint_arg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    add_checkpoint_arg(source, required=False)
    source.add_argument("--import-from", "--import_from", dest="import_from", metavar="HF_DIR", default=None,
                        help="import this Hugging Face Llama directory into a layerskip checkpoint instead")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="the directory to write (replaced if it holds an earlier output of the same kind)")
    parser.add_argument("--check", action="store_true",
                        help="after exporting, load DIR with transformers and compare logits with ours")


def run(args: argparse.Namespace) -> int:
    from layerskip.errors import ConfigError
    from layerskip.hf import export_hf, import_hf

    if args.import_from is not None:
        if args.check:
            raise ConfigError("--check applies to exports; an import is checked by loading the checkpoint")
        ckpt = import_hf(args.import_from, args.out)
        cfg = ckpt.model_config
        print(f"imported {args.import_from}: {cfg.num_layers} layers, d_model {cfg.d_model}, "
              f"{ckpt.model.num_parameters():,} parameters", file=sys.stderr)
        print(ckpt.path)
        return 0
    out = export_hf(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} as a LlamaForCausalLM directory", file=sys.stderr)
    if args.check:
        diff = _check(args.checkpoint, out)
        print(f"transformers logits match ours: max |difference| {diff:.3g}", file=sys.stderr)
    print(out)
    return 0


def _check(checkpoint: str, out) -> float:
    """Largest logit difference between our model and transformers' load of the export."""
    import torch

    from layerskip.checkpoint import load_checkpoint
    from layerskip.errors import CheckpointError, ConfigError

    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ConfigError('--check needs transformers: pip install -e ".[hf]"') from None
    ours = load_checkpoint(checkpoint).model
    theirs = AutoModelForCausalLM.from_pretrained(out).float().eval()
    cfg = ours.config
    idx = torch.randint(0, cfg.vocab_size, (2, min(cfg.max_seq_len, 64)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(idx).logits, theirs(idx).logits
    diff = float((a - b).abs().max())
    if not diff <= 1e-4 * max(1.0, float(a.abs().max())):
        raise CheckpointError(f"transformers' logits differ from ours by up to {diff:.3g}; the export is wrong")
    return diff
