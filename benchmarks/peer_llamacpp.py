"""Peer benchmark: our decoders against llama.cpp's on the same weights and prompts.

Measures ms per new token (prefill included) of
  - our autoregressive decoder        vs  llama.cpp greedy, one token per llama_decode call
  - our greedy self-speculative           (llama-cpp-python's low-level loop)
    decoding (draft E layers, k)      vs  llama.cpp greedy speculative decoding whose draft model
                                          is the LayerSkip model's first E blocks + shared head
                                          (`layerskip export-gguf --draft_layer E`), k drafts a round
and checks every greedy output against our autoregressive one, token for token. All
configurations run interleaved in one process and one thread (same prompts), after a warm-up;
medians are reported.

llama.cpp's speculative decoding here is a small greedy loop of this script's own over two
llama.cpp contexts (the full model and the draft model) driven through llama-cpp-python:
the draft proposes up to k tokens, the full model scores them in one batch, the longest
prefix agreeing with its argmax is kept plus its own next token, and both caches are cut back
to what was kept. llama-cpp-python's own `draft_model` interface takes a callable proposing
tokens, not a second GGUF file; layerskip.gguf.GGUFDraft is such a callable over the draft
file, and --high-level also times Llama.generate with it (and without it), whose per-token
sampler and generator overhead the low-level loops above do not have. llama.cpp's own
`llama-speculative-simple` program is not part of llama-cpp-python; README shows how to run it.

    python benchmarks/peer_llamacpp.py --checkpoint runs/layerskip --draft-layer 4 --k 2 --out peer_llamacpp.json

With --synthetic SHAPE (one of benchmarks/scale.py's), the weights are random ones of that
shape, with the checkpoint's tokenizer and vocabulary, in bfloat16 and built as SSD's best
case (the blocks after --draft-layer switched off, so every draft is accepted, ours and
llama.cpp's alike): where self-speculation pays at all, on a model far larger than the study's:

    python benchmarks/peer_llamacpp.py --checkpoint runs/layerskip --synthetic llama3.2-1B --draft-layer 4 \
        --k 8 --dtype bf16 --threads 2 --prompts 4 --max-new-tokens 48 --repeats 2

The checkpoint is exported with layerskip.gguf.export_gguf (f32 unless --dtype) into a
temporary directory (or --keep-gguf DIR). Prompts are those `layerskip bench` decodes
(layerskip.bench.models: seeded test-split paragraphs from --data-dir, else
$LAYERSKIP_DATA_DIR or the cache), cut to --prompt-tokens. Needs llama-cpp-python and gguf:
pip install -e ".[llamacpp]". One JSON document (versions, machine, exact command, every
sample, ratios) goes to --out, a summary table to stderr.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from layerskip.bench.machine import load_average, machine_info, versions
from layerskip.bench.models import BenchModel, best_case, load_model, random_model
from layerskip.bench.timing import interleaved
from layerskip.console import log
from layerskip.decoding import Autoregressive, SelfSpeculative
from layerskip.errors import ConfigError, run_script

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import SIZES  # noqa: E402 (benchmarks/ is the script's directory)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a layerskip checkpoint or run directory (LayerSkip-trained)")
    p.add_argument("--draft-layer", type=int, default=3, help="E: blocks in our draft and in llama.cpp's draft model")
    p.add_argument("--k", type=int, default=4, help="tokens drafted per round (ours and llama.cpp's)")
    p.add_argument("--draft-vocab", type=int, default=None,
                   help="also run our SSD drafting through the short head of this many frequent tokens")
    p.add_argument("--synthetic", default=None, choices=list(SIZES),
                   help="random best-case weights of this shape (benchmarks/scale.py) with the checkpoint's "
                        "tokenizer, in bfloat16")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"], help="GGUF weight type")
    p.add_argument("--kv-cache", default="f32", choices=["f32", "f16"],
                   help="llama.cpp's KV cache type (its own default is f16, which rounds keys and values; ours is f32)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompts are cut to this many tokens")
    p.add_argument("--prompts", type=int, default=12, help="how many prompts")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over all prompts and configurations")
    p.add_argument("--threads", type=int, default=1, help="threads for torch and for llama.cpp")
    p.add_argument("--data-dir", default=None, help="WikiText-2 directory: prompts from its test split")
    p.add_argument("--high-level", action="store_true",
                   help="also time llama-cpp-python's Llama.generate, plain and with the draft file as its draft_model")
    p.add_argument("--keep-gguf", default=None, metavar="DIR", help="write the GGUF files here and keep them")
    p.add_argument("--out", default="peer_llamacpp.json", help="where the JSON document goes")
    args = p.parse_args(argv)
    if args.synthetic is not None and args.draft_vocab is not None:
        raise ConfigError("--draft-vocab with --synthetic: random weights rarely emit the checkpoint's frequent "
                          "tokens, so a short head would only measure rejected drafts; drop one of them")
    return args


# ----------------------------------------------------------------------------- llama.cpp


class LlamaContext:
    """One GGUF model in one llama.cpp context: decode tokens after the cache, read logits, cut the cache.

    Uses the Llama object's own batch and context wrappers (what Llama.eval uses) so that each
    call asks llama.cpp for exactly the logits rows it needs.
    """

    def __init__(self, path: Path, settings: dict) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(path), **settings)
        self.vocab = self.llm.n_vocab()
        self.n_past = 0

    def decode(self, tokens: list[int], all_rows: bool = False) -> np.ndarray:
        """Logits (rows, V) of the last token, or of every token with all_rows, at positions n_past...."""
        self.llm._batch.set_batch(batch=tokens, n_past=self.n_past, logits_all=all_rows)
        self.llm._ctx.decode(self.llm._batch)
        self.n_past += len(tokens)
        rows = len(tokens) if all_rows else 1
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(rows, self.vocab))

    def cut(self, n: int) -> None:
        """Keep the cache of positions [0, n) only."""
        if n < self.n_past:
            self.llm._ctx.kv_cache_seq_rm(-1, n, -1)
        self.n_past = n


def llama_settings(n_ctx: int, threads: int, kv_cache: str) -> dict:
    """llama_cpp.Llama keyword arguments shared by every llama.cpp configuration."""
    import llama_cpp

    kv = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}[kv_cache]
    return {"n_ctx": n_ctx, "n_batch": n_ctx, "n_ubatch": n_ctx, "n_threads": threads, "n_threads_batch": threads,
            "type_k": kv, "type_v": kv, "verbose": False}


def llamacpp_generate(llm, draft, prompt: list[int], n: int) -> tuple[list[int], float, dict]:
    """llama-cpp-python's high-level greedy generator (Llama.generate), with or without its draft_model."""
    llm.reset()  # no prompt reuse between runs
    if draft is not None:
        draft.reset()
    start = time.perf_counter()
    out = [int(t) for t in itertools.islice(llm.generate(prompt, temp=0.0), n)]
    return out, time.perf_counter() - start, {}


def llamacpp_ar(target: LlamaContext, prompt: list[int], n: int) -> tuple[list[int], float, dict]:
    target.cut(0)
    start = time.perf_counter()
    logits = target.decode(prompt)
    out: list[int] = []
    while True:
        out.append(int(logits[-1].argmax()))
        if len(out) == n:
            break
        logits = target.decode(out[-1:])
    return out, time.perf_counter() - start, {}


def llamacpp_speculative(target: LlamaContext, draft: LlamaContext, k: int, prompt: list[int],
                         n: int) -> tuple[list[int], float, dict]:
    """Greedy speculative decoding; both caches hold every token but the newest between rounds."""
    target.cut(0)
    draft.cut(0)
    start = time.perf_counter()
    seq, out, drafted, accepted = list(prompt), [], 0, 0
    if len(prompt) > 1:
        target.decode(prompt[:-1])
        draft.decode(prompt[:-1])
    while len(out) < n:
        proposals = propose(draft, seq, min(k, n - len(out) - 1))
        base = target.n_past  # the newest token's position
        preds = target.decode([seq[-1], *proposals], all_rows=True).argmax(-1)
        kept = 0
        while kept < len(proposals) and proposals[kept] == preds[kept]:
            kept += 1
        new = [*proposals[:kept], int(preds[kept])]
        target.cut(base + 1 + kept)
        draft.cut(min(draft.n_past, base + 1 + kept))
        drafted, accepted = drafted + len(proposals), accepted + kept
        seq += new
        out += new
    stats = {"drafted": drafted, "accepted": accepted, "acceptance_rate": accepted / drafted if drafted else 0.0}
    return out[:n], time.perf_counter() - start, stats


def propose(draft: LlamaContext, seq: list[int], m: int) -> list[int]:
    """m greedy draft tokens after seq, first catching the draft's cache up with seq."""
    proposals: list[int] = []
    if m == 0:
        return proposals
    logits = draft.decode(seq[draft.n_past:])
    while True:
        proposals.append(int(logits[-1].argmax()))
        if len(proposals) == m:
            return proposals
        logits = draft.decode(proposals[-1:])


# ----------------------------------------------------------------------------- ours, and the measurement


def synthetic_twin(bench: BenchModel, shape: str, draft_layer: int) -> BenchModel:
    """Random bf16 weights of `shape` with bench's tokenizer and vocabulary, every block after draft_layer off."""
    config = replace(SIZES[shape][0], vocab_size=bench.model.config.vocab_size)
    if not 1 <= draft_layer < config.num_layers:
        raise ConfigError(f"--draft-layer must be in 1..{config.num_layers - 1} for --synthetic {shape}")
    model = best_case(random_model(0, config, dtype=torch.bfloat16), draft_layer)
    if bench.model.token_counts is not None:
        model.set_token_counts(bench.model.token_counts)
    return BenchModel(model, replace(bench.checkpoint, model=model, model_config=config, path=None))


def ours(strategy, model, prompt: list[int], n: int) -> tuple[list[int], float, dict]:
    result = strategy.generate(model, prompt, n)
    return result.tokens, result.seconds, result.stats


def build_configs(args, model, files, settings: dict) -> dict[str, tuple]:
    """label -> (runner(prompt, n), settings)."""
    E, k = args.draft_layer, args.k
    target, draft = LlamaContext(files.path, settings), LlamaContext(files.draft_path, settings)
    configs = {
        "ours_ar": (lambda p, n: ours(Autoregressive(), model, p, n), {}),
        "ours_ssd": (lambda p, n: ours(SelfSpeculative(draft_layer=E, k=k), model, p, n),
                     {"draft_layer": E, "k": k}),
        "llamacpp_ar": (lambda p, n: llamacpp_ar(target, p, n), {}),
        "llamacpp_speculative": (lambda p, n: llamacpp_speculative(target, draft, k, p, n),
                                 {"draft_model": f"first {E} blocks + shared norm and head", "k": k}),
    }
    if args.high_level:
        configs.update(high_level_configs(files, settings, k))
    if args.draft_vocab is not None:
        configs["ours_ssd_short_head"] = (
            lambda p, n: ours(SelfSpeculative(draft_layer=E, k=k, draft_vocab=args.draft_vocab), model, p, n),
            {"draft_layer": E, "k": k, "draft_vocab": args.draft_vocab})
    return configs


def high_level_configs(files, settings: dict, k: int) -> dict[str, tuple]:
    """Llama.generate plain, and with the draft file behind its draft_model interface (layerskip.gguf.GGUFDraft)."""
    import llama_cpp

    from layerskip.gguf import GGUFDraft

    plain = llama_cpp.Llama(model_path=str(files.path), **settings)
    drafter = GGUFDraft(files.draft_path, num_tokens=k, **settings)
    with_draft = llama_cpp.Llama(model_path=str(files.path), draft_model=drafter, **settings)
    return {
        "llamacpp_generate": (lambda p, n: llamacpp_generate(plain, None, p, n), {"api": "Llama.generate"}),
        "llamacpp_generate_draft_model": (lambda p, n: llamacpp_generate(with_draft, drafter, p, n),
                                          {"api": "Llama.generate(draft_model=GGUFDraft)", "k": k}),
    }




def summarize(results: dict[str, dict]) -> dict:
    reference = results["ours_ar"]["tokens"]
    same = {label: [a == b for a, b in zip(entry["tokens"], reference)] for label, entry in results.items()}
    ms = {k: v["median_ms_per_token"] for k, v in results.items()}
    spec = results["llamacpp_speculative"]["stats"]
    ratios = {
        "llamacpp_ar_speedup_over_ours_ar": ms["ours_ar"] / ms["llamacpp_ar"],
        "ours_ssd_speedup_over_ours_ar": ms["ours_ar"] / ms["ours_ssd"],
        "llamacpp_speculative_speedup_over_llamacpp_ar": ms["llamacpp_ar"] / ms["llamacpp_speculative"],
        "llamacpp_speculative_speedup_over_ours_ssd": ms["ours_ssd"] / ms["llamacpp_speculative"],
    }
    if "llamacpp_generate_draft_model" in ms:
        ratios["llamacpp_generate_draft_model_speedup_over_llamacpp_generate"] = (
            ms["llamacpp_generate"] / ms["llamacpp_generate_draft_model"])
    if "ours_ssd_short_head" in ms:
        ratios["ours_ssd_short_head_speedup_over_ours_ar"] = ms["ours_ar"] / ms["ours_ssd_short_head"]
    return {
        "ratios": ratios,
        "same_tokens_as_ours_ar": {label: all(flags) for label, flags in same.items()},
        "prompts_with_same_tokens_as_ours_ar": {label: sum(flags) for label, flags in same.items()},
        "llamacpp_speculative_same_as_llamacpp_ar": results["llamacpp_speculative"]["tokens"]
        == results["llamacpp_ar"]["tokens"],
        "acceptance_rate": {
            "ours_ssd": _mean(s["acceptance_rate"] for s in results["ours_ssd"]["stats"]),
            "llamacpp_speculative": sum(s["accepted"] for s in spec) / max(1, sum(s["drafted"] for s in spec)),
        },
        "targets": {  # issue 18's
            "llamacpp_speculative_faster_than_llamacpp_ar": ms["llamacpp_speculative"] < ms["llamacpp_ar"],
            "ours_ar_within_1.3x_of_llamacpp_ar": ms["ours_ar"] <= 1.3 * ms["llamacpp_ar"],
        },
    }


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def all_versions() -> dict:
    from importlib.metadata import version

    import llama_cpp

    return {**versions(), "llama_cpp_python": llama_cpp.__version__, "gguf": version("gguf")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise ConfigError('this benchmark needs llama-cpp-python: pip install -e ".[llamacpp]" (it compiles '
                          "llama.cpp, several minutes)") from None
    from layerskip.gguf import export_gguf

    torch.set_num_threads(args.threads)
    load_before = load_average()
    bench = load_model(args.checkpoint)
    if args.synthetic is not None:
        bench = synthetic_twin(bench, args.synthetic, args.draft_layer)
    model, cfg = bench.model, bench.model.config
    if not 1 <= args.draft_layer < cfg.num_layers:
        raise ConfigError(f"--draft-layer must be in 1..{cfg.num_layers - 1}")
    prompts = bench.prompts(args.prompts, args.prompt_tokens, data_dir=args.data_dir)
    n = min(args.max_new_tokens, cfg.max_seq_len - max(map(len, prompts)))
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(args.keep_gguf or tmp)
        exported = export_gguf(bench.checkpoint, where / "model.gguf", dtype=args.dtype,
                               draft_layer=args.draft_layer, draft_out=where / "draft.gguf")
        sizes = {p.name: p.stat().st_size for p in (exported.path, exported.draft_path)}
        settings = llama_settings(cfg.max_seq_len, args.threads, args.kv_cache)
        results = interleaved(build_configs(args, model, exported, settings), prompts, n, args.repeats)
    summary = summarize(results)
    doc = {
        "command": " ".join([sys.executable, *sys.argv]),
        "versions": all_versions(),
        "machine": {**machine_info(torch.device("cpu")), "load_average_end": load_average(),
                    "load_average_start": load_before, "llamacpp_threads": args.threads},
        "model": {"source": args.checkpoint, "synthetic": args.synthetic,
                  "torch_dtype": str(model.lm_head.weight.dtype).removeprefix("torch."), **cfg.to_dict()},
        "gguf": {"dtype": args.dtype, "draft_layer": args.draft_layer, "bytes": sizes, "kv_cache": args.kv_cache},
        "llamacpp_speculative_implementation": "this script's greedy loop over two llama.cpp contexts (full and "
                                               "draft GGUF) through llama-cpp-python",
        "prompts": {"source": bench.prompt_source, "count": len(prompts), "tokens": [len(p) for p in prompts]},
        "max_new_tokens": n,
        "repeats": args.repeats,
        **summary,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(doc, indent=2))
    width = max(map(len, results))
    for label, entry in results.items():
        log(f"{label:<{width}}  {entry['median_ms_per_token']:8.3f} ms/token  same tokens as ours_ar on "
            f"{summary['prompts_with_same_tokens_as_ours_ar'][label]}/{len(prompts)} prompts")
    for name, value in summary["ratios"].items():
        log(f"{name}: {value:.2f}x")
    log(f"acceptance: {summary['acceptance_rate']}")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main, "peer_llamacpp.py"))
