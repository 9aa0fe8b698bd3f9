"""Export a checkpoint as a llama.cpp GGUF file, optionally with its first E blocks as a draft model.

  layerskip export-gguf --checkpoint CKPT --out model.gguf
  layerskip export-gguf --checkpoint CKPT --out model.gguf --draft_layer 3 --draft_out draft.gguf

writes architecture llama (rotary and norm settings, tied or untied head) and our tokenizer
(SentencePiece BPE with byte fallback; a newline is our end-of-line token, which is also the
end-of-sequence token; no BOS). The draft file holds blocks [0, E) with the shared final norm
and head, a Llama of E layers for llama.cpp's speculative decoding:

  llama-speculative-simple -m model.gguf -md draft.gguf -p "The game" -n 64 --spec-draft-n-max 4 --temp 0 --ignore-eos

(--ignore-eos: our end-of-sequence token is the end of a line, where llama.cpp would stop).
A Hugging Face Llama directory or hf:OWNER/NAME is written with its own tokenizer (Llama 2
tokenizer.model, Llama 3 tokenizer.json), BOS and EOS.

--dtype f32 (default), f16, bf16 or q8_0 (1-D norm weights stay f32; q8_0 tensors whose rows are
not a multiple of 32 are written as f16). Files are written atomically; an existing file is
replaced only if it is a GGUF file. Needs the gguf package: pip install -e ".[gguf]".
The written paths are printed on stdout.
"""

from __future__ import annotations

import argparse
import sys

from layerskip.cli.common import add_checkpoint_arg, add_flag

DTYPE_CHOICES = ("f32", "f16", "bf16", "q8_0")  # layerskip.gguf.DTYPES, without importing torch for --help


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arg(parser)
    parser.add_argument("--out", required=True, metavar="FILE.gguf",
                        help="the GGUF file to write (replaced only if it is a GGUF file)")
    parser.add_argument("--dtype", default="f32", choices=DTYPE_CHOICES, help="number type of the weights")
    add_flag(parser, "draft_layer", type=int, default=None, metavar="E",
             help="also write a draft model of the first E blocks with the shared final norm and head")
    add_flag(parser, "draft_out", default=None, metavar="DRAFT.gguf", help="where the draft model goes")


def run(args: argparse.Namespace) -> int:
    from layerskip.gguf import export_gguf

    result = export_gguf(args.checkpoint, args.out, dtype=args.dtype, draft_layer=args.draft_layer,
                         draft_out=args.draft_out)
    kinds = sorted(set(result.tensor_types.values()))
    print(f"exported {args.checkpoint} as a llama GGUF file ({args.dtype}; tensor types {', '.join(kinds)})",
          file=sys.stderr)
    print(result.path)
    if result.draft_path is not None:
        print(f"draft model: the first {result.draft_layer} blocks with the shared final norm and head",
              file=sys.stderr)
        print(result.draft_path)
    return 0
