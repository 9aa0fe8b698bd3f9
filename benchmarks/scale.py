"""Where LayerSkip pays: decoding synthetic models of public shapes, from the seed's 2.6M to Llama 2 7B.

For each shape (random weights, nothing downloaded, built directly in --dtype on the meta
device, one subprocess per shape so its peak RSS is its own):

- AR ms/token against the machine's limit: the bytes one step reads (weights, head, the KV
  cache) divided by the memory bandwidth measured in this run (a large copy, bytes read +
  written per second, and a large sum, bytes read per second, each before and after the
  shapes; the largest of the four);
- the SSD ceiling: the best-case construction (the blocks after the paper's exit layer E
  switched off, so every draft is accepted), k = --ks, through the full head and the short head
  (whose tokens are those the model emits, so its drafts are accepted too);
- the cost model's speed-up (layerskip.costs.ssd_estimate on the round's pieces timed here) at
  the acceptance rates of --acceptance (accepted / drafted; default: 0.689, the LayerSkip paper's
  Llama 2 7B on CNN/DM at E=8 and 12 drafts, and 0.55 and 0.78, the ends of the 55-78% it reports),
  and at 1.0 against the measured ceiling;
- the same weights through transformers (LlamaForCausalLM sharing our tensors): generate()
  greedy and assistant_early_exit=E with k assistant tokens, checked token for token against ours;
- peak RSS after building, after our decoding and after transformers'.

Timing: configurations interleaved per repeat, medians; decode ms/token is (T(n) - T(1)) / (n - 1)
with T(m) the time of a generate() of m tokens by the same strategy (T(1): the prefill and one
plain step), ms/token against transformers T(n) / n for both. Outputs in --out: scale.json (everything,
with the command, versions and machine), scale.md (the table) and scale.png (the plot).

    python benchmarks/scale.py --sizes seed-2.6M d256-12L --repeats 2 --new-tokens 16   # minutes
    python benchmarks/scale.py                                # every shape: an hour, 16 GB free
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from layerskip.bench.machine import load_average, machine_info, peak_rss_bytes, versions
from layerskip.bench.models import best_case, random_model
from layerskip.bench.prompts import random_prompts
from layerskip.config import ModelConfig
from layerskip.console import log
from layerskip.costs import measure_ssd_costs, ssd_estimate
from layerskip.decoding import Autoregressive, SelfSpeculative
from layerskip.device import synchronize
from layerskip.errors import ConfigError, run_script
from layerskip.jsonfile import write_json

CONTEXT = 512  # max_seq_len of every shape: enough for the prompts and drafts; rotary tables stay small
SMALL = dict(dropout=0.0, max_seq_len=CONTEXT)
# name -> (config, the draft layer E: the paper's for the public shapes, a quarter of the layers otherwise)
SIZES: dict[str, tuple[ModelConfig, int]] = {
    "seed-2.6M": (ModelConfig(**SMALL), 2),
    "d256-12L": (ModelConfig(d_model=256, num_layers=12, d_ff=1024, **SMALL), 3),
    "d512-12L": (ModelConfig(d_model=512, num_layers=12, d_ff=2048, **SMALL), 3),
    "d768-16L": (ModelConfig(d_model=768, num_layers=16, num_heads=12, d_ff=3072, **SMALL), 4),
    "d1536-16L": (ModelConfig(vocab_size=32000, d_model=1536, num_layers=16, num_heads=12, d_ff=6144, **SMALL), 4),
    # meta-llama/Llama-3.2-1B config.json (its llama3 rope scaling changes no cost)
    "llama3.2-1B": (ModelConfig(vocab_size=128256, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                                d_ff=8192, rope_theta=500000.0, tie_embeddings=True, **SMALL), 4),
    # meta-llama/Llama-2-7b-hf config.json
    "llama2-7B": (ModelConfig(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, d_ff=11008,
                              tie_embeddings=False, **SMALL), 8),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES), help="shapes (default: all)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="weights' dtype (default bfloat16)")
    p.add_argument("--threads", type=int, default=2, help="torch threads, ours and transformers' (default 2)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over every configuration (default 3)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run (default 32)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="random prompt length (default 16)")
    p.add_argument("--ks", type=int, nargs="+", default=[4, 8, 12], help="SSD draft lengths (default 4 8 12)")
    p.add_argument("--draft-vocab", type=int, default=1024, help="the short draft head's tokens (default 1024)")
    p.add_argument("--acceptance", type=float, nargs="+", default=[0.55, 0.689, 0.78],
                   help="acceptance rates for the cost model's predictions (default 0.55 0.689 0.78)")
    p.add_argument("--cost-repeats", type=int, default=10, help="timed repeats of each round piece (default 10)")
    p.add_argument("--bandwidth-mb", type=int, default=1024, help="bytes copied to measure bandwidth (default 1024)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    p.add_argument("--out", default="scale_results", help="output directory (default scale_results)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one shape, in its own process
    args = p.parse_args(argv)
    for name in ("threads", "repeats", "new_tokens", "prompt_tokens", "draft_vocab", "cost_repeats", "bandwidth_mb"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if any(k < 1 for k in args.ks) or any(not 0 <= a <= 1 for a in args.acceptance):
        raise ConfigError("--ks must be >= 1 and --acceptance rates in [0, 1]")
    if args.prompt_tokens + args.new_tokens + max(args.ks) + 1 > CONTEXT:
        raise ConfigError(f"--prompt-tokens + --new-tokens + max(--ks) must stay below {CONTEXT}")
    return args


# ----------------------------------------------------------------------------- one shape (child process)


def timed(run, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


def interleaved(configs: dict, repeats: int, device: torch.device) -> dict[str, dict]:
    """label -> {seconds: [...], tokens, stats}: every repeat runs every configuration, after a warm-up."""
    out = {label: {"seconds": [], "tokens": None, "stats": None} for label in configs}
    for run in configs.values():
        run(warmup=True)
    for _ in range(repeats):
        for label, run in configs.items():
            box = {}
            out[label]["seconds"].append(timed(lambda: box.update(result=run()), device))
            out[label]["tokens"], out[label]["stats"] = box["result"]
    for entry in out.values():
        entry["median_seconds"] = statistics.median(entry["seconds"])
    return out


def ours(model, prompt: list[int], n: int, strategy):
    def run(warmup: bool = False):
        result = strategy.generate(model, prompt, min(n, 4) if warmup else n)
        return result.tokens, {k: v for k, v in result.stats.items() if not isinstance(v, list)}
    return run


def favour_emitted_tokens(model, tokens: list[int]) -> None:
    """Token counts that rank the tokens the model emits first: the short head's best case."""
    counts = torch.zeros(model.config.vocab_size, dtype=torch.long)
    counts[torch.tensor(sorted(set(tokens)))] = 1
    model.set_token_counts(counts)


def our_runs(model, prompt: list[int], args, e: int, device: torch.device) -> dict[str, dict]:
    n = args.new_tokens
    # each strategy's first token (the prefill, then one plain step), to take off the n-token runs
    configs = {"ar_first": ours(model, prompt, 1, Autoregressive()), "ar": ours(model, prompt, n, Autoregressive()),
               "ssd_first": ours(model, prompt, 1, SelfSpeculative(e, 1))}
    for k in args.ks:
        configs[f"ssd_k{k}_full"] = ours(model, prompt, n, SelfSpeculative(e, k))
        configs[f"ssd_k{k}_short"] = ours(model, prompt, n, SelfSpeculative(e, k, draft_vocab=args.draft_vocab))
    return interleaved(configs, args.repeats, device)


def hf_twin(model):
    """LlamaForCausalLM on our model's own tensors (no copy), without eos so it runs every token."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from layerskip.hf import hf_config, hf_name

    config = LlamaConfig(**{k: v for k, v in hf_config(model.config, eos_id=None, extra={}).items()
                            if k != "layerskip"})
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    state = {hf_name(k): v for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")
    hf.load_state_dict(state, strict=False, assign=True)
    hf.tie_weights()
    hf.model.rotary_emb = LlamaRotaryEmbedding(config=config).to(model.lm_head.weight.device)
    hf.generation_config.eos_token_id = None
    return hf.eval()


def hf_runs(hf, prompt: list[int], args, e: int, device: torch.device) -> dict[str, dict]:
    ids = torch.tensor([prompt], device=device)

    def generate(**kwargs):
        def run(warmup: bool = False):
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
                                  max_new_tokens=min(args.new_tokens, 4) if warmup else args.new_tokens, **kwargs)
            return out[0, len(prompt):].tolist(), {}
        return run

    def early_exit(k: int):
        greedy = generate(assistant_early_exit=e)

        def run(warmup: bool = False):
            cfg = hf.generation_config
            cfg.num_assistant_tokens, cfg.assistant_confidence_threshold = k, 0.0
            cfg.num_assistant_tokens_schedule = "constant"
            return greedy(warmup)
        return run

    configs = {"hf_greedy": generate(), **{f"hf_early_exit_k{k}": early_exit(k) for k in args.ks}}
    return interleaved(configs, args.repeats, device)


def step_bytes(model, position: int) -> int:
    """Bytes one AR step reads at `position`: every weight but the embedding (one row), and the KV cache."""
    cfg = model.config
    size = model.lm_head.weight.element_size()
    weights = sum(p.numel() for name, p in model.named_parameters() if name != "embed_tokens.weight")
    if cfg.tie_embeddings:
        weights += model.lm_head.weight.numel()  # named_parameters lists the tied head once, as the embedding
    kv = 2 * cfg.num_layers * cfg.kv_heads * position * cfg.head_dim
    return (weights + cfg.d_model + kv) * size


def ssd_costs(model, args, e: int) -> list[dict]:
    measured = measure_ssd_costs(model, e, args.ks, draft_vocabs=(None, args.draft_vocab),
                                 position=args.prompt_tokens + args.new_tokens // 2, repeats=args.cost_repeats)
    return [{**c.to_dict(), "predicted": {str(a): ssd_estimate(c, a) for a in args.acceptance},
             "predicted_ceiling": ssd_estimate(c, 1.0)} for c in measured.values()]


def run_child(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config, e = SIZES[args.child]
    started = time.perf_counter()
    model = best_case(random_model(0, config, dtype=dtype), e).to(device)
    record = {"size": args.child, "config": config.to_dict(), "draft_layer": e, "dtype": args.dtype,
              "num_parameters": model.num_parameters(),
              "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
              "step_bytes": step_bytes(model, args.prompt_tokens + args.new_tokens // 2),
              "build_seconds": time.perf_counter() - started, "rss_after_build": peak_rss_bytes()}
    prompt = random_prompts(config.vocab_size, 1, args.prompt_tokens, seed=0)[0]
    favour_emitted_tokens(model, Autoregressive().generate(model, prompt, args.new_tokens).tokens)
    record["ours"] = our_runs(model, prompt, args, e, device)
    record["costs"] = ssd_costs(model, args, e)
    record["rss_after_ours"] = peak_rss_bytes()
    if not args.no_hf:
        record["hf"] = hf_runs(hf_twin(model), prompt, args, e, device)
        record["rss_after_hf"] = peak_rss_bytes()
    if device.type == "cuda":
        record["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
    return record


# ----------------------------------------------------------------------------- the run (parent process)


def read_bandwidth(nbytes: int, device: torch.device, repeats: int = 5) -> float:
    """Bytes per second a large float32 sum reads, the median of `repeats`."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    src.sum()  # first touch
    return src.numel() * 4 / statistics.median(timed(src.sum, device) for _ in range(repeats))


def bandwidths(nbytes: int, device: torch.device) -> dict[str, float]:
    """A copy's (read + written) and a sum's (read) bytes per second: the limit takes the larger."""
    return {"copy": copy_bandwidth(nbytes, device), "read": read_bandwidth(nbytes, device)}


def copy_bandwidth(nbytes: int, device: torch.device, repeats: int = 5) -> float:
    """Bytes per second a large copy moves (read + written), the median of `repeats`."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults are not bandwidth
    seconds = statistics.median(timed(lambda: dst.copy_(src), device) for _ in range(repeats))
    return 2 * src.numel() * 4 / seconds


def run_size(size: str, argv: list[str], workdir: Path) -> dict:
    """One shape in its own process; its record, or what went wrong."""
    out = workdir / f"{size}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", size, "--out", str(out)]
    log(f"scale: {size} ...")
    started = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0 or not out.exists():
        log(f"scale: {size} failed (status {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        return {"size": size, "error": f"status {proc.returncode}", "stderr_tail": proc.stderr[-4000:]}
    record = json.loads(out.read_text())
    record["wall_seconds"] = time.perf_counter() - started
    return record


def child_argv(argv: list[str]) -> list[str]:
    """The command's own options minus --sizes and --out, which the parent sets per shape."""
    kept, skip = [], False
    for arg in argv:
        if arg.startswith(("--sizes=", "--out=")):
            continue
        if arg in ("--sizes", "--out"):
            skip = True
            continue
        if skip and arg.startswith("--"):
            skip = False
        if not skip:
            kept.append(arg)
    return kept


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        write_json(args.out, run_child(args))
        return 0
    from scale_report import summarize, write_outputs  # noqa: I001 (benchmarks/ is the script's directory)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bandwidth_start = bandwidths(args.bandwidth_mb * 2**20, device)
    doc = {"command": [sys.executable, *sys.argv], "versions": {**versions(), **hf_version()},
           "machine": machine_info(device), "settings": vars(args), "sizes": []}
    with tempfile.TemporaryDirectory() as workdir:
        for size in args.sizes:
            doc["sizes"].append(run_size(size, child_argv(argv), Path(workdir)))
    doc["bandwidth_bytes_per_second"] = {"start": bandwidth_start, "end": bandwidths(args.bandwidth_mb * 2**20, device)}
    doc["machine"]["load_average_end"] = load_average()
    doc["summary"] = summarize(doc)
    for path in write_outputs(doc, Path(args.out)):
        log(f"scale: wrote {path}")
    return 0


def hf_version() -> dict:
    try:
        import transformers
    except ImportError:
        return {}
    return {"transformers": transformers.__version__}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(run_script(main, "scale.py"))
