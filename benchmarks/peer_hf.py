"""Peer benchmark: our decoders against transformers' on the same weights and prompts.

Measures ms per new token of
  - our autoregressive decoder      vs  LlamaForCausalLM.generate(do_sample=False)
  - our greedy self-speculative     vs  generate(assistant_early_exit=E), transformers'
    decoding (draft E layers, k)        self-speculative early exit, both at its defaults
                                        and at its best num_assistant_tokens /
                                        assistant_confidence_threshold (swept)
and checks that every greedy variant produces the same tokens as plain greedy. All
configurations run interleaved in one process (same threads, same prompts), after a warm-up;
medians are reported. transformers reads num_assistant_tokens and
assistant_confidence_threshold for the early-exit assistant from model.generation_config,
so that is where they are set.

    python benchmarks/peer_hf.py --checkpoint runs/layerskip --draft-layer 3 --k 4 --out peer_hf.json
    python benchmarks/peer_hf.py --random   # no checkpoint: the default d128/6 shape, random weights

With --checkpoint the model is exported with `layerskip export-hf` into a temporary
directory and transformers loads it from there. --random builds the default model shape with
random weights in which the layers after --draft-layer are switched off (their output
projections zeroed), so every draft is accepted: the best case for both implementations.
Prompts (layerskip.bench.models): with --checkpoint those `layerskip bench` decodes (seeded
test-split paragraphs from --data-dir, else $LAYERSKIP_DATA_DIR or the cache), with --random
seeded random token ids; both cut to --prompt-tokens.
One JSON document (versions, exact command, every sample, ratios) goes to --out, a summary
table to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from layerskip import __version__
from layerskip.bench.models import BenchModel, load_model
from layerskip.bench.timing import interleaved
from layerskip.console import log
from layerskip.decoding import Autoregressive, SelfSpeculative
from layerskip.device import synchronize
from layerskip.errors import run_script


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a layerskip checkpoint or run directory (LayerSkip-trained)")
    source.add_argument("--random", action="store_true", help="default model shape, random weights, every draft accepted")
    p.add_argument("--draft-layer", type=int, default=3, help="E: layers the draft runs (ours and assistant_early_exit)")
    p.add_argument("--k", type=int, default=4, help="our tokens drafted per round")
    p.add_argument("--draft-vocab", type=int, default=None,
                   help="also run our SSD drafting through the short head of this many frequent tokens")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompts are cut to this many tokens")
    p.add_argument("--prompts", type=int, default=4, help="how many prompts")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over all prompts and configurations")
    p.add_argument("--num-assistant-tokens", type=int, nargs="+", default=[2, 4, 6, 8, 12],
                   help="transformers settings swept for its best (with confidence threshold 0 and 0.4)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for both implementations (default: 1 on CPU, as `layerskip generate`)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--data-dir", default=None, help="WikiText-2 directory: prompts from its test split")
    p.add_argument("--out", default="peer_hf.json", help="where the JSON document goes")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- models and prompts


def load_models(args: argparse.Namespace, workdir: Path):
    """(ours as a BenchModel, transformers' model of the same weights): a checkpoint exported with
    `layerskip export-hf` into workdir, or the best-case random model converted in memory."""
    from transformers import AutoModelForCausalLM

    from layerskip.hf import export_hf

    bench = load_model(args.checkpoint, best_case_after=args.draft_layer)
    if bench.checkpoint is not None:
        hf_dir = export_hf(bench.checkpoint, workdir / "hf")
        return bench, AutoModelForCausalLM.from_pretrained(hf_dir).float().eval()
    return bench, random_hf_model(bench)


def random_hf_model(bench: BenchModel):
    """LlamaForCausalLM with our random model's weights, and no eos so it runs every token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from layerskip.hf import hf_config, hf_name

    model = bench.model
    config = {k: v for k, v in hf_config(model.config, eos_id=None, extra={}).items() if k != "layerskip"}
    hf = LlamaForCausalLM(LlamaConfig(**config)).float().eval()
    state = {hf_name(k): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.generation_config.eos_token_id = None
    return hf


# ----------------------------------------------------------------------------- runners


def ours(strategy, model, prompt: list[int], n: int) -> tuple[list[int], float, dict]:
    result = strategy.generate(model, prompt, n)
    return result.tokens, result.seconds, result.stats


def hf_generate(hf, prompt: list[int], n: int, **kwargs) -> tuple[list[int], float, dict]:
    """transformers' generate; its generation config has no eos, so it runs n tokens like ours."""
    ids = torch.tensor([prompt], device=hf.device)
    synchronize(hf.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          pad_token_id=0, **kwargs)
    synchronize(hf.device)
    seconds = time.perf_counter() - start
    return out[0, len(prompt):].tolist(), seconds, {}


def hf_early_exit(hf, draft_layer: int, num_tokens: int | None, threshold: float | None):
    """A runner for generate(assistant_early_exit=E) with the assistant settings on generation_config."""
    defaults = (hf.generation_config.num_assistant_tokens, hf.generation_config.assistant_confidence_threshold,
                hf.generation_config.num_assistant_tokens_schedule)

    def run(_hf, prompt: list[int], n: int):
        cfg = hf.generation_config
        cfg.num_assistant_tokens = defaults[0] if num_tokens is None else num_tokens
        cfg.assistant_confidence_threshold = defaults[1] if threshold is None else threshold
        cfg.num_assistant_tokens_schedule = defaults[2] if num_tokens is None else "constant"
        try:
            return hf_generate(hf, prompt, n, assistant_early_exit=draft_layer)
        finally:
            cfg.num_assistant_tokens, cfg.assistant_confidence_threshold, cfg.num_assistant_tokens_schedule = defaults

    return run


def assistant_defaults(hf) -> dict:
    """transformers' effective defaults for the early-exit assistant (its config stores None for them)."""
    names = ("num_assistant_tokens", "assistant_confidence_threshold", "num_assistant_tokens_schedule")
    cfg = hf.generation_config
    fallback = getattr(cfg, "_get_default_generation_params", dict)()
    return {name: getattr(cfg, name, None) if getattr(cfg, name, None) is not None else fallback.get(name)
            for name in names}


def build_configs(args, model, hf) -> dict[str, tuple]:
    """label -> (runner, model it runs, settings)."""
    E = args.draft_layer
    configs = {
        "ours_ar": (lambda m, p, n: ours(Autoregressive(), m, p, n), model, {}),
        "hf_greedy": (hf_generate, hf, {}),
        "ours_ssd": (lambda m, p, n: ours(SelfSpeculative(draft_layer=E, k=args.k), m, p, n), model,
                     {"draft_layer": E, "k": args.k}),
        **({} if args.draft_vocab is None else {"ours_ssd_short_head": (
            lambda m, p, n: ours(SelfSpeculative(draft_layer=E, k=args.k, draft_vocab=args.draft_vocab), m, p, n),
            model, {"draft_layer": E, "k": args.k, "draft_vocab": args.draft_vocab})}),
        "hf_early_exit_defaults": (hf_early_exit(hf, E, None, None), hf,
                                   {"assistant_early_exit": E, **assistant_defaults(hf)}),
    }
    for n in sorted(set(args.num_assistant_tokens) | {args.k}):
        for t in (0.0, 0.4):
            configs[f"hf_early_exit_n{n}_t{t:g}"] = (hf_early_exit(hf, E, n, t), hf, {
                "assistant_early_exit": E, "num_assistant_tokens": n, "assistant_confidence_threshold": t,
                "num_assistant_tokens_schedule": "constant"})
    return configs


def measure(configs: dict, prompts: list[list[int]], n: int, repeats: int) -> dict[str, dict]:
    """Interleaved timing (layerskip.bench.timing.interleaved) of decoders given as (run(model, ...), model, settings)."""
    bound = {label: (lambda p, k, run=run, model=model: run(model, p, k), settings)
             for label, (run, model, settings) in configs.items()}
    return interleaved(bound, prompts, n, repeats)


# ----------------------------------------------------------------------------- report


def summarize(results: dict[str, dict]) -> dict:
    greedy = {"ours": results["ours_ar"]["tokens"], "hf": results["hf_greedy"]["tokens"]}
    same = {label: entry["tokens"] == greedy["ours" if label.startswith("ours") else "hf"]
            for label, entry in results.items()}
    early = {k: v for k, v in results.items() if k.startswith("hf_early_exit")}
    best = min(early, key=lambda k: early[k]["median_ms_per_token"])
    ms = {k: v["median_ms_per_token"] for k, v in results.items()}
    ours_best = min((k for k in ms if k.startswith("ours_ssd")), key=ms.get)  # full or short draft head
    ratios = {
        "hf_greedy_over_ours_ar": ms["hf_greedy"] / ms["ours_ar"],
        "hf_early_exit_defaults_over_ours_ssd": ms["hf_early_exit_defaults"] / ms["ours_ssd"],
        "hf_early_exit_best_over_ours_ssd": ms[best] / ms["ours_ssd"],
        "hf_early_exit_best_speedup_over_hf_greedy": ms["hf_greedy"] / ms[best],
        "ours_ssd_speedup_over_ours_ar": ms["ours_ar"] / ms["ours_ssd"],
    }
    if "ours_ssd_short_head" in ms:
        ratios.update({
            "hf_early_exit_defaults_over_ours_ssd_short_head": ms["hf_early_exit_defaults"] / ms["ours_ssd_short_head"],
            "hf_early_exit_best_over_ours_ssd_short_head": ms[best] / ms["ours_ssd_short_head"],
            "ours_ssd_short_head_speedup_over_ours_ar": ms["ours_ar"] / ms["ours_ssd_short_head"],
        })
    return {
        "ratios": ratios,
        "hf_early_exit_best": best,
        "ours_ssd_best": ours_best,
        "same_tokens_as_plain_greedy": same,
        "ours_ar_equals_hf_greedy_prompts": sum(a == b for a, b in zip(greedy["ours"], greedy["hf"])),
        "targets": {"ours_ar_at_least_2x_hf_greedy": ratios["hf_greedy_over_ours_ar"] >= 2,
                    "ours_ssd_at_least_2x_hf_early_exit_best": ms[best] / ms[ours_best] >= 2},
    }


def versions(device: torch.device) -> dict:
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"layerskip": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device), "gpu": gpu}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    import transformers

    if not hasattr(transformers.GenerationConfig(), "assistant_early_exit"):
        raise SystemExit(f"transformers {transformers.__version__} has no assistant_early_exit; install 4.47 or later")
    transformers.logging.set_verbosity_error()  # deprecation chatter from inside assisted generation
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as workdir:
        bench, hf = load_models(args, Path(workdir))
    model, hf = bench.model.to(device), hf.to(device)
    cfg = model.config
    if not 1 <= args.draft_layer < cfg.num_layers:
        raise SystemExit(f"--draft-layer must be in 1..{cfg.num_layers - 1}")
    prompts = bench.prompts(args.prompts, args.prompt_tokens, data_dir=args.data_dir)
    n = min(args.max_new_tokens, cfg.max_seq_len - max(map(len, prompts)))
    results = measure(build_configs(args, model, hf), prompts, n, args.repeats)
    summary = summarize(results)
    doc = {
        "command": " ".join([sys.executable, *sys.argv]),
        "versions": versions(device),
        "model": {"source": args.checkpoint or "random (layers after draft_layer zeroed)", **cfg.to_dict()},
        "prompts": {"count": len(prompts), "tokens": [len(p) for p in prompts]},
        "max_new_tokens": n,
        "repeats": args.repeats,
        **summary,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(doc, indent=2))
    width = max(map(len, results))
    for label, entry in results.items():
        log(f"{label:<{width}}  {entry['median_ms_per_token']:8.3f} ms/token  same tokens as greedy: "
            f"{summary['same_tokens_as_plain_greedy'][label]}")
    for name, value in summary["ratios"].items():
        log(f"{name}: {value:.2f}x")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main, "peer_hf.py"))
