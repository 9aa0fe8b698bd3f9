"""Is the autoregressive baseline as fast as a minimal loop? Paired comparison, same process.

    python benchmarks/ar_baseline.py

The minimal loop is the throwaway the SSD issue quotes: a full forward per token with the KV
cache, the model's lm_head, argmax. Random default-size model (layerskip.bench.models), one
thread, 15 interleaved pairs of 100-token generations; prints both medians and the median of
the paired ratios.
"""

from __future__ import annotations

import statistics
import time

import torch

from layerskip.bench.models import load_model
from layerskip.decoding import Autoregressive
from layerskip.model import Transformer


@torch.inference_mode()
def minimal_loop(model: Transformer, prompt: list[int], n: int) -> float:
    """ms/token of the throwaway loop (prefill included)."""
    start = time.perf_counter()
    cache = model.new_cache()
    h = model(torch.tensor([prompt]), cache=cache, pos=0, compute_logits=False).hidden
    token = model.lm_head(model.norm(h[:, -1])).argmax(-1, keepdim=True)
    for i in range(n - 1):
        h = model(token, cache=cache, pos=len(prompt) + i, compute_logits=False).hidden
        token = model.lm_head(model.norm(h[:, -1])).argmax(-1, keepdim=True)
        token.item()
    return (time.perf_counter() - start) / n * 1000


def main() -> None:
    torch.set_num_threads(1)
    bench = load_model()
    model, prompt = bench.model, bench.prompts(1, 20)[0]
    loop, ours = [], []
    for _ in range(15):
        loop.append(minimal_loop(model, prompt, 100))
        ours.append(Autoregressive().generate(model, prompt, 100).ms_per_token)
    ratio = statistics.median(a / b for a, b in zip(loop, ours))
    print(f"minimal loop {statistics.median(loop):.2f} ms/token, Autoregressive {statistics.median(ours):.2f} "
          f"ms/token: ours is {ratio:.2f}x the loop's speed (median of paired ratios)")


if __name__ == "__main__":
    main()
