"""llama.cpp interoperability: our checkpoints as GGUF files (architecture ``llama``), with a truncated draft.

    export_gguf(checkpoint, "model.gguf", dtype="f32", draft_layer=E, draft_out="draft.gguf")

A LayerSkip model's first E blocks plus its shared final norm and head are themselves a Llama
of E layers, trained to predict the next token: written as a second file, they serve llama.cpp's
speculative decoding as the draft model of the full file. Weights, rotary and norm settings and
the tokenizer (ours, or a Hugging Face directory's own: ``layerskip.gguf.hf_vocab``) are written
with the ``gguf`` package (llama.cpp's own writer), imported inside the functions that need it
(pip install -e ".[gguf]"); what llama.cpp would compute or tokenize differently is refused with
a ``CheckpointError``. ``GGUFDraft`` makes the draft file the draft model of llama-cpp-python's
speculative decoding.
"""

from layerskip.gguf.draft import GGUFDraft
from layerskip.gguf.export import GGUFExport, check_replaceable, export_gguf, is_gguf
from layerskip.gguf.tensors import DTYPES, gguf_name, llama_tensors, rope_rows
from layerskip.gguf.vocab import Vocab, gguf_vocab

__all__ = ["DTYPES", "GGUFDraft", "GGUFExport", "Vocab", "check_replaceable", "export_gguf", "gguf_name", "gguf_vocab",
           "is_gguf", "llama_tensors", "rope_rows"]
