"""Dynamic early exit (DEE): each new token leaves at the first layer confident enough.

Policy. For every new token the blocks run one at a time. After block l (``exit_layer=l``,
"after l blocks") for a *checked* layer l, a confidence in [0, 1] is computed and the
token exits when it reaches that layer's threshold lambda_l; after the last block L the
token always exits. The exit's hidden state goes through the one shared final norm + LM
head (``model.unembed``), and the next token is the argmax (greedy) or a sample drawn
through ``sampling_probs`` (temperature / top-k / top-p) from those exit logits.

Checked layers are l = min_exit_layer, min_exit_layer + check_every, ... below L whose
threshold is finite; an infinite threshold (``None`` in a thresholds file) means "never
exit here" and costs nothing. Thresholds above 1 are unreachable, so the output is the
full model's; threshold 0 exits every token at min_exit_layer.

Confidence measures (all in [0, 1]):

- ``softmax``: the exit distribution's largest probability (the seed study's measure).
- ``margin``: top-1 minus top-2 probability.
- ``saturation``: cosine similarity of the hidden states after blocks l-1 and l (after 0
  blocks: the embedding), clamped to [0, 1]. It needs no LM head, so a token costs one
  head evaluation (at its exit) whatever the number of checked layers; with the other two
  measures every checked layer costs a head evaluation (vocabulary x d_model, about one
  block's wall time at d_model 128), which ``stats["head_evals_per_token"]`` shows.

Short exit head (``exit_vocab=N``). With a vocabulary of 8192 at d_model 128 the shared
head reads as many weights as four blocks, so an early exit that still pays the whole head
saves little. With ``exit_vocab`` the checks and the early exits use the short head (the
shared head's rows of the N most frequent tokens, ``Transformer.unembed_short``): the
confidence is measured over those N tokens and an early-exiting token is one of them. A
token that reaches the last layer uses the full head. Calibration runs this exact policy,
so its guarantee covers the restriction.

Skipped layers' keys and values: **CALM-style propagation**. A token that exits after
block e has no K/V in layers [e, L), yet later tokens attend to it there. Right after it
exits, its exited hidden state h_e is copied up to every skipped layer j and that layer's
K/V are computed from it: ``k, v = layers[j].attn.project_kv(layers[j].attn_norm(h_e))``
at the token's rotary position, written with ``cache.write(j, pos, k, v)``. Every layer's
cache therefore holds every position after each step (``cache.lengths`` all equal); the
cost is two d_model x d_model projections per skipped layer, counted in
``stats["kv_projections_per_token"]``, done for all skipped layers in one batched matmul
(``FusedPropagation``, equal to the per-layer ``propagate_kv`` up to float rounding).

Prompt handling. The prompt except its last token is prefilled through all L blocks
(exact K/V); the last prompt token then goes through the same per-token exit loop as
every generated token, so every new token, the first included, has an exit layer and
follows the same rule.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from layerskip.cache import KVCache
from layerskip.config import MEASURES, check_measure
from layerskip.errors import ConfigError
from layerskip.model import decoding, normalize
from layerskip.generate.base import (
    GenerationResult,
    OnTokens,
    SamplingConfig,
    check_prompt,
    sample_token,
    sampling_probs,
)

def logit_confidence(logits: torch.Tensor, measure: str) -> torch.Tensor:
    """Confidence of exit logits (..., V) -> (...): softmax maximum or top-1 minus top-2."""
    if measure not in ("softmax", "margin"):
        raise ConfigError(f"measure {measure!r} is not computed from logits")
    probs = torch.softmax(logits.float(), dim=-1)  # one kernel: cheaper per check than logsumexp
    if measure == "softmax":
        return probs.amax(dim=-1)
    top2 = torch.topk(probs, 2, dim=-1).values  # (..., 2)
    return top2[..., 0] - top2[..., 1]


def saturation_confidence(hidden: torch.Tensor, prev_hidden: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of consecutive layers' hidden states (..., C) -> (...), clamped to [0, 1]."""
    cos = torch.nn.functional.cosine_similarity(hidden.float(), prev_hidden.float(), dim=-1)
    return cos.clamp(0.0, 1.0)


def propagate_kv(model: torch.nn.Module, hidden: torch.Tensor, start: int, pos: int, cache: KVCache) -> int:
    """CALM propagation: K/V of layers [start, L) for hidden (1, T, C) at positions [pos, pos+T).

    Each skipped layer j sees the exited hidden state as its input: its keys and values
    are ``project_kv(attn_norm_j(hidden))``. Returns the number of layers written.
    """
    cos, sin = model.rotary(pos, hidden.shape[1])
    for j in range(start, model.num_layers):
        block = model.layers[j]
        k, v = block.attn.project_kv(block.attn_norm(hidden), cos, sin)
        cache.write(j, pos, k, v)
    return model.num_layers - start


class FusedPropagation:
    """``propagate_kv`` in one batched product for all skipped layers (the same K/V up to rounding).

    attn_norm_j(h) = w_j * n(h) with n the weightless RMS normalisation, so layer j's keys
    and values are (W_kv_j diag(w_j)) n(h): exactly the key, value and rotated-key columns
    of the blocks' ``DecodingWeights``, which already fold the norm weights in. Stacked over
    the layers, they give every skipped layer's K/V from one product, rotary as one
    multiply-add, and one copy into the cache.
    """

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> FusedPropagation:
        """The model's FusedPropagation, built once and rebuilt only when a weight it folds changes.

        Stacking the weights costs milliseconds, which per generation of 64 tokens was ~5% of DEE's time.
        """
        def sources() -> tuple[torch.Tensor, ...]:
            return tuple(w for b in model.layers for w in (b.attn.k_proj.weight, b.attn.v_proj.weight,
                                                           b.attn_norm.weight))

        return model.derived.get("propagation", sources, lambda: cls(model)) or cls(model)

    def __init__(self, model: torch.nn.Module) -> None:
        attn = model.layers[0].attn
        self.eps = model.layers[0].eps
        self.kv_heads, self.head_dim = attn.kv_heads, attn.head_dim
        self.num_layers = len(model.layers)
        q, kv = attn.num_heads * attn.head_dim, attn.kv_heads * attn.head_dim  # column widths in qkv_rot
        keys, values, rotated_keys = slice(q, q + kv), slice(q + kv, q + 2 * kv), slice(2 * q + 2 * kv, None)
        self.weight = torch.stack([
            torch.cat((w.qkv_rot[:, keys], w.qkv_rot[:, rotated_keys], w.qkv_rot[:, values]), dim=1)
            for w in (block.decoding_weights() for block in model.layers)
        ])  # (L, C, 3 * H_kv * D): keys | rotated keys | values

    def __call__(self, model: torch.nn.Module, hidden: torch.Tensor, start: int, pos: int, cache: KVCache) -> int:
        """K/V of layers [start, L) for the exited hidden (1, 1, C) at position pos."""
        count = self.num_layers - start
        kv = torch.matmul(normalize(hidden.reshape(1, -1), self.eps), self.weight[start:])  # (count, 1, 3 * H_kv * D)
        kv = kv.view(count, 1, 3, self.kv_heads, 1, self.head_dim)  # (count, B=1, k|rot k|v, H_kv, T=1, D)
        cos, sin = model.rotary(pos, 1)
        keys = torch.addcmul(kv[:, :, 0] * cos, kv[:, :, 1], sin)
        cache.write_layers(start, pos, keys, kv[:, :, 2])
        return count


@dataclass
class StepResult:
    logits: torch.Tensor  # (V,) exit logits of the token fed at this step (-inf outside a short head)
    exit_layer: int
    head_evals: int  # full-head evaluations
    kv_projections: int
    short_head_evals: int = 0


class DynamicEarlyExit:
    """The DEE strategy; see the module docstring for the policy and the cache handling.

    thresholds: one global threshold for layers 1..L-1, or a sequence of L-1 per-layer
        thresholds (index 0 is layer 1); ``math.inf`` (or None) means never exit there.
    """

    name = "dee"

    def __init__(
        self,
        thresholds: float | Sequence[float | None],
        measure: str = "softmax",
        min_exit_layer: int = 1,
        check_every: int = 1,
        exit_vocab: int | None = None,
    ) -> None:
        self.measure = check_measure(measure)
        if exit_vocab is not None and not (isinstance(exit_vocab, int) and not isinstance(exit_vocab, bool)
                                           and exit_vocab >= 2):
            raise ConfigError(f"exit_vocab must be an integer >= 2 (tokens the short exit head holds; None: the "
                              f"full head), got {exit_vocab!r}")
        self.exit_vocab = exit_vocab
        if not (isinstance(min_exit_layer, int) and min_exit_layer >= 1):
            raise ConfigError(f"min_exit_layer must be an integer >= 1, got {min_exit_layer!r}")
        if not (isinstance(check_every, int) and check_every >= 1):
            raise ConfigError(f"check_every must be an integer >= 1, got {check_every!r}")
        self.min_exit_layer = min_exit_layer
        self.check_every = check_every
        if isinstance(thresholds, numbers.Real) and not isinstance(thresholds, bool):
            self.thresholds: float | list[float] = _check_threshold(thresholds, "the threshold")
        else:
            self.thresholds = [
                _check_threshold(math.inf if t is None else t, f"threshold {i + 1}") for i, t in enumerate(thresholds)
            ]

    def layer_thresholds(self, num_layers: int) -> list[float]:
        """Thresholds of layers 1..L-1 (index l-1), whatever form they were given in."""
        if isinstance(self.thresholds, float):
            return [self.thresholds] * (num_layers - 1)
        if len(self.thresholds) != num_layers - 1:
            raise ConfigError(
                f"{len(self.thresholds)} per-layer thresholds were given but the model has {num_layers} "
                f"layers; give {num_layers - 1} (layers 1..{num_layers - 1}; the last layer always exits)"
            )
        return list(self.thresholds)

    def checked_layers(self, num_layers: int) -> dict[int, float]:
        """Layer -> threshold for every layer where an exit is possible (never the last)."""
        if self.min_exit_layer > num_layers:
            raise ConfigError(f"min_exit_layer {self.min_exit_layer} is beyond the model's {num_layers} layers")
        lams = self.layer_thresholds(num_layers)
        return {
            layer: lams[layer - 1]
            for layer in range(self.min_exit_layer, num_layers, self.check_every)
            if math.isfinite(lams[layer - 1])
        }

    def step(self, model: torch.nn.Module, token: torch.Tensor, pos: int, cache: KVCache, checks: dict[int, float],
             propagate=propagate_kv) -> StepResult:
        """Feed one token (1, 1) at position pos; exit, fill the skipped layers' K/V with `propagate`."""
        num_layers = model.num_layers
        h = model.embed(token)  # (1, 1, C)
        rope = model.rotary(pos, 1)
        exit_layer, counts = num_layers, {"full": 0, "short": 0}
        checked = None  # (logits, ids) of the last checked layer
        for layer in range(1, num_layers + 1):
            prev, h = h, model.run_blocks(h, layer - 1, layer, cache=cache, pos=pos, rope=rope)
            threshold = checks.get(layer)
            if threshold is None:
                continue
            if self.measure == "saturation":
                checked, conf = None, saturation_confidence(h, prev)
            else:
                checked = self.exit_head(model, h, counts)
                conf = logit_confidence(checked[0], self.measure)
            if conf.item() >= threshold:
                exit_layer = layer
                break
        if exit_layer == num_layers:
            logits, counts["full"] = model.unembed(h).reshape(-1), counts["full"] + 1
        else:
            logits, ids = checked if checked is not None else self.exit_head(model, h, counts)
            logits = logits.reshape(-1)
            if ids is not None:  # the short head's columns -> the whole vocabulary, -inf elsewhere
                logits = logits.new_full((model.config.vocab_size,), -math.inf).index_copy_(0, ids, logits)
        kv = propagate(model, h, exit_layer, pos, cache) if exit_layer < num_layers else 0
        return StepResult(logits=logits, exit_layer=exit_layer, head_evals=counts["full"], kv_projections=kv,
                          short_head_evals=counts["short"])

    def exit_head(self, model: torch.nn.Module, h: torch.Tensor,
                  counts: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Early-exit logits of h: the full head's (..., V) and None, or the short head's (..., N) and their ids."""
        if self.exit_vocab is None:
            counts["full"] += 1
            return model.unembed(h), None
        counts["short"] += 1
        return model.unembed_short(h, self.exit_vocab)

    @decoding()
    def generate(
        self,
        model: torch.nn.Module,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        *,
        sampling: SamplingConfig = SamplingConfig(),
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        on_tokens: OnTokens | None = None,
        cache: KVCache | None = None,
    ) -> GenerationResult:
        """Generate up to max_new_tokens; `cache` (empty) may be passed in to inspect it afterwards."""
        if model.training:
            raise ValueError("generation needs the model in eval mode (dropout off); call model.eval() first")
        num_layers = model.num_layers
        n = check_prompt(prompt_ids, max_new_tokens, model.config.max_seq_len)
        checks = self.checked_layers(num_layers)
        start = time.perf_counter()
        propagate = FusedPropagation.for_model(model)
        device = model.embed_tokens.weight.device
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)  # (1, P)
        if cache is None:
            cache = model.new_cache()
        elif any(cache.lengths):
            raise ValueError("DynamicEarlyExit.generate needs an empty cache")
        prompt_len = ids.shape[1]
        if prompt_len > 1:
            model(ids[:, :-1], cache=cache, pos=0, compute_logits=False)  # exact K/V for the prompt
        token, pos = ids[:, -1:], prompt_len - 1
        tokens: list[int] = []
        info: list[dict[str, int]] = []
        head_evals = kv_projections = short_head_evals = 0
        ttft, stop_reason = 0.0, "length"
        for i in range(n):
            step = self.step(model, token, pos, cache, checks, propagate)
            if sampling.greedy:
                next_id = int(step.logits.argmax())
            else:
                next_id = sample_token(sampling_probs(step.logits, sampling), generator)
            if i == 0:
                ttft = time.perf_counter() - start
            tokens.append(next_id)
            info.append({"exit_layer": step.exit_layer})
            head_evals += step.head_evals
            short_head_evals += step.short_head_evals
            kv_projections += step.kv_projections
            if on_tokens is not None:
                on_tokens([next_id])
            if eos_id is not None and next_id == eos_id:
                stop_reason = "eos"
                break
            token, pos = torch.tensor([[next_id]], dtype=torch.long, device=device), pos + 1
        if stop_reason == "length" and n < max_new_tokens:
            stop_reason = "context"
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        exits = [t["exit_layer"] for t in info]
        return GenerationResult(
            tokens=tokens,
            prompt_len=prompt_len,
            strategy=self.name,
            seconds=seconds,
            time_to_first_token=ttft,
            stop_reason=stop_reason,
            stats=self._stats(exits, head_evals, kv_projections, num_layers, seconds, checks, short_head_evals),
            token_info=info,
        )

    def _stats(self, exits: list[int], head_evals: int, kv: int, num_layers: int, seconds: float,
               checks: dict[int, float], short_head_evals: int = 0) -> dict:
        count = max(len(exits), 1)
        return {
            "measure": self.measure,
            "num_layers": num_layers,
            "min_exit_layer": self.min_exit_layer,
            "check_every": self.check_every,
            "checked_layers": sorted(checks),
            "thresholds": [None if not math.isfinite(t) else t for t in self.layer_thresholds(num_layers)],
            "exit_layers": exits,
            "exit_histogram": {layer: exits.count(layer) for layer in range(1, num_layers + 1)},
            "mean_exit_layer": sum(exits) / count,
            # Decode blocks per token (the prompt prefill is not counted): a token exiting
            # after block l ran exactly l blocks.
            "blocks_per_token": sum(exits) / count,
            "head_evals_per_token": head_evals / count,
            "exit_vocab": self.exit_vocab,
            "short_head_evals_per_token": short_head_evals / count,
            "kv_projections_per_token": kv / count,
            "tokens_per_second": len(exits) / seconds if seconds > 0 else 0.0,
        }


def _check_threshold(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or value < 0:
        raise ConfigError(
            f"{what} must be a number >= 0 (confidences lie in [0, 1]; above 1 means never exit), got {value!r}"
        )
    return float(value)
