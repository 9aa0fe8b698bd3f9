"""LayerSkip's training-time pieces, as pure functions of (config, step).

- Layer dropout: block l (0-indexed) is skipped for a sample with probability
  ``p_l = max_skip_prob * D(l) * S(t)``: ``D`` grows with depth (``linear``: l/(L-1), the seed
  study's; ``exp``: 2^(l/(L-1)) - 1, the paper's), ``S`` over training time (``constant``: 1;
  ``exp``: 2^(t/(T-1)) - 1, the paper's ramp for training from scratch). The first block is
  never skipped. The keep mask (L, B) is drawn from an explicit ``torch.Generator``.
- Early-exit loss: cross-entropy at the exits enabled by a curriculum, through the one
  shared final norm + head, weighted by ``e_scale * k(k+1)/2`` for exit k (after k blocks)
  and 1 * L(L+1)/2 for the last exit, normalised over the enabled exits (the paper's
  ``sum_{i<=l} i`` weighting; ``e_scale = 0`` is plain training).
- Curricula (which exits get a loss at step t): ``none`` (all), ``rotational`` (every R-th
  exit, rotating by one each step), ``gradual`` (from the last exit down to the first over
  ``T_grad`` steps). The last exit is always included.
- ``exit_loss``: the weighted loss of all enabled exits in one vectorised, chunked pass
  that never materialises the (E, B, T, V) logits: each chunk's gradient is computed in the
  forward pass (the scalar loss is the only output that needs one), so memory stays
  O(chunk * V) and the work is the same three matmuls as a plain head.
- ``distill_exit_loss``: the same for early exits trained toward the last layer too
  (self-distillation): each exit's loss is (1 - W) x cross-entropy + W x T^2 x KL(last
  layer's distribution at temperature T, a constant || the exit's at T); the teacher costs one
  more matmul per chunk and gets no gradient.
- ``focus_weights``: per-token weights of the early exits' loss, the last layer's top-1
  probability to a power, normalised to mean 1: the exits' share of the trunk is spent on
  the tokens the last layer is sure of, where an early exit can ever be confident enough to
  exit, and less on the hard ones only the full depth gets right. (Measured, it made the exits
  and the last layer worse; docs/results.md, the eleventh round.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

LAYER_DROPOUT_SCHEDULES = ("linear", "exp")
TIME_RAMPS = ("constant", "exp")
CURRICULA = ("none", "rotational", "gradual")
EXIT_WEIGHTINGS = ("depth", "uniform")
IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- layer dropout


def depth_shape(layer: int, num_layers: int, schedule: str) -> float:
    """D(l) in [0, 1] for 0-indexed block `layer`: 0 for the first block, 1 for the last."""
    if schedule not in LAYER_DROPOUT_SCHEDULES:
        raise ValueError(f"layer dropout schedule must be one of {LAYER_DROPOUT_SCHEDULES}, got {schedule!r}")
    if num_layers == 1:
        return 0.0
    x = layer / (num_layers - 1)
    return x if schedule == "linear" else 2.0**x - 1.0


def time_ramp(step: int, total_steps: int, ramp: str) -> float:
    """S(t) in [0, 1]: 1 throughout (`constant`) or 2^(t/(T-1)) - 1 (`exp`, the paper's ramp)."""
    if ramp not in TIME_RAMPS:
        raise ValueError(f"time ramp must be one of {TIME_RAMPS}, got {ramp!r}")
    if ramp == "constant":
        return 1.0
    frac = min(max(step, 0), max(total_steps - 1, 1)) / max(total_steps - 1, 1)
    return 2.0**frac - 1.0


def layer_dropout_probs(
    num_layers: int,
    max_skip_prob: float,
    schedule: str = "linear",
    *,
    step: int = 0,
    total_steps: int = 1,
    ramp: str = "constant",
) -> list[float]:
    """Skip probability of each block at training step `step`."""
    scale = max_skip_prob * time_ramp(step, total_steps, ramp)
    return [scale * depth_shape(layer, num_layers, schedule) for layer in range(num_layers)]


def sample_layer_keep(probs: Sequence[float], batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """(L, B) bool: True keeps block l for sample b. p=0 always keeps, p=1 always skips.

    Always draws L*B numbers, so the generator advances the same whatever the probabilities.
    """
    p = torch.tensor(list(probs), dtype=torch.float64).unsqueeze(1)  # (L, 1)
    u = torch.rand(len(probs), batch_size, generator=generator, dtype=torch.float64)  # in [0, 1)
    return u >= p


# ----------------------------------------------------------------------------- curricula


def enabled_exits(
    curriculum: str,
    step: int,
    num_layers: int,
    *,
    rotation: int = 2,
    gradual_steps: int = 1,
) -> list[int]:
    """Exits (1..L, 'after k blocks') that get a loss at `step`; L is always among them."""
    L = num_layers
    if curriculum == "none":
        exits = set(range(1, L + 1))
    elif curriculum == "rotational":
        if rotation < 1:
            raise ValueError(f"rotation must be >= 1, got {rotation}")
        exits = {k for k in range(1, L + 1) if (k - 1 - step) % rotation == 0}
    elif curriculum == "gradual":
        # Exit k is on once (L-1) * (1 - t/T) < k, i.e. k*T > (L-1)*(T - t): at t=0 only L,
        # by t=T every exit. Integer arithmetic, so the boundary never wobbles.
        t, T = min(max(step, 0), gradual_steps), max(gradual_steps, 1)
        exits = {k for k in range(1, L + 1) if k * T > (L - 1) * (T - t)}
    else:
        raise ValueError(f"early-exit curriculum must be one of {CURRICULA}, got {curriculum!r}")
    exits.add(L)
    return sorted(exits)


def exit_weights(exits: Sequence[int], num_layers: int, e_scale: float, weighting: str = "depth") -> list[float]:
    """Normalised loss weight of each exit.

    depth (the paper's): e_scale * k(k+1)/2 for exit k < L, L(L+1)/2 for the last exit L;
    uniform: e_scale for every early exit, 1 for the last (the early exits count as much as
    the deep ones, which depth weighting makes up to L(L+1)/2 times heavier).
    """
    if weighting not in EXIT_WEIGHTINGS:
        raise ValueError(f"exit weighting must be one of {EXIT_WEIGHTINGS}, got {weighting!r}")
    if weighting == "depth":
        raw = [(1.0 if k == num_layers else e_scale) * k * (k + 1) / 2 for k in exits]
    else:
        raw = [1.0 if k == num_layers else e_scale for k in exits]
    total = sum(raw)
    if total <= 0:
        raise ValueError(f"exit weights sum to {total}; include the last exit or use e_scale > 0")
    return [w / total for w in raw]


# ----------------------------------------------------------------------------- the loss


def _chunk_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (x @ weight.t()).float()  # (E, n, V) in fp32


def exit_nll_sums(
    normed: torch.Tensor,  # (E, N, C) final-normed hidden states of E exits
    weight: torch.Tensor,  # (V, C) the LM head
    targets: torch.Tensor,  # (N,) token ids, IGNORE_INDEX for none
    chunk_size: int = 2048,
) -> torch.Tensor:
    """Summed NLL of each exit over the non-ignored targets, (E,) fp32; no gradient."""
    E, N, _ = normed.shape
    sums = torch.zeros(E, dtype=torch.float32, device=normed.device)
    with torch.no_grad():
        for s in range(0, N, chunk_size):
            t = targets[s : s + chunk_size]
            logits = _chunk_logits(normed[:, s : s + chunk_size], weight)  # (E, n, V)
            # classes along the last, contiguous dimension: cross_entropy over a transposed (E, V, n) view is slow
            nll = F.cross_entropy(logits.flatten(0, 1), t.repeat(E), ignore_index=IGNORE_INDEX, reduction="none")
            sums += nll.view(E, -1).sum(-1)
    return sums


def chunk_nll_and_grads(
    x: torch.Tensor,  # (E, n, C) normed hidden states of one chunk of tokens
    weight: torch.Tensor,  # (V, C)
    targets: torch.Tensor,  # (n,) ids, clamped to >= 0
    valid: torch.Tensor,  # (n,) 1.0 where the target counts, else 0.0
    scales: torch.Tensor,  # (E,) multiplier of each exit's summed (weighted) NLL in the loss
    token_weights: torch.Tensor,  # (n,) each token's weight in the loss, 0 where it does not count
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(NLL sum per exit (E,), token-weighted NLL sum (E,), d loss/d x (E, n, C), d loss/d weight
    (V, C) fp32) of one chunk; the loss is sum_e scales[e] * weighted NLL sum_e.

    A pure function of tensors, so it can be handed to torch.compile as is.
    """
    E = x.shape[0]
    logits = (x @ weight.t()).float()  # (E, n, V)
    lse = torch.logsumexp(logits, dim=-1)  # (E, n)
    idx = targets.view(1, -1, 1).expand(E, -1, 1)
    token_nll = lse - logits.gather(-1, idx).squeeze(-1)  # (E, n)
    nll, weighted_nll = (token_nll * valid).sum(-1), (token_nll * token_weights).sum(-1)  # (E,)
    # d(scaled weighted NLL)/d(logits) = (softmax - onehot) * token weight * scale
    grad = logits.sub_(lse.unsqueeze(-1)).exp_()  # softmax, in place of the logits
    grad.scatter_add_(-1, idx, torch.full(idx.shape, -1.0, dtype=grad.dtype, device=grad.device))
    grad = grad.mul_((token_weights.view(1, -1) * scales.view(-1, 1)).unsqueeze(-1)).to(x.dtype)
    grad_x = grad @ weight  # (E, n, C)
    grad_w = (grad.flatten(0, 1).t() @ x.flatten(0, 1)).float()  # (V, C)
    return nll, weighted_nll, grad_x, grad_w


def focus_weights(
    teacher: torch.Tensor,  # (N, C) the last exit's final-normed hidden states
    weight: torch.Tensor,  # (V, C) the LM head
    targets: torch.Tensor,  # (N,) token ids, IGNORE_INDEX for none
    power: float,
    chunk_size: int = 2048,
) -> torch.Tensor:
    """(N,) fp32 weights, no gradient: p_max^power of the last layer's distribution at each token,
    normalised to mean 1 over the non-ignored tokens (0 at ignored ones); power 0 weighs all alike."""
    valid = targets != IGNORE_INDEX
    confidence = torch.empty(teacher.shape[0], dtype=torch.float32, device=teacher.device)
    with torch.no_grad():
        for s in range(0, teacher.shape[0], chunk_size):
            logits = (teacher[s : s + chunk_size] @ weight.t()).float()  # (n, V)
            confidence[s : s + chunk_size] = (logits.max(-1).values - torch.logsumexp(logits, -1)).exp()
        raw = confidence.pow(power) * valid
        return raw * (valid.sum().clamp(min=1) / raw.sum().clamp(min=torch.finfo(raw.dtype).tiny))


def _over_chunks(
    normed: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int, num_sums: int,
    chunk: Callable[[slice, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]],
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(d loss/d normed, d loss/d weight in fp32, per-exit sums) of chunk(tokens, safe targets, valid,
    token weights) run over chunks of tokens; chunk returns its num_sums per-exit (E,) sums, then its
    two gradients. Without token_weights (N,), each counted token weighs 1."""
    E, N, _ = normed.shape
    valid = (targets != IGNORE_INDEX).float()  # (N,)
    weighted = valid if token_weights is None else valid * token_weights.float()
    safe = targets.clamp(min=0)
    grad_x = torch.empty_like(normed)
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    sums = [torch.zeros(E, dtype=torch.float32, device=normed.device) for _ in range(num_sums)]
    for s in range(0, N, chunk_size):
        part = slice(s, s + chunk_size)
        *chunk_sums, gx, gw = chunk(part, safe[part], valid[part], weighted[part])
        for total, value in zip(sums, chunk_sums):
            total += value
        grad_x[:, part] = gx
        grad_w += gw
    return grad_x, grad_w, sums


class _ChunkedExitLoss(torch.autograd.Function):
    """sum_e scales[e] * (token-weighted) NLL_e for exits sharing one head; gradients chunk by chunk."""

    @staticmethod
    def forward(ctx, normed, weight, targets, scales, chunk_size, chunk_fn, token_weights):  # type: ignore[override]
        grad_x, grad_w, (nll_sums, weighted_sums) = _over_chunks(
            normed, weight, targets, chunk_size, 2,
            lambda part, safe, valid, weights: chunk_fn(normed[:, part], weight, safe, valid, scales, weights),
            token_weights)
        ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        ctx.mark_non_differentiable(nll_sums)
        return (weighted_sums * scales).sum(), nll_sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums):  # type: ignore[override]
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss, grad_w * grad_loss, None, None, None, None, None


def exit_loss(
    normed: torch.Tensor,  # (E, N, C) final-normed hidden states of the enabled exits
    weight: torch.Tensor,  # (V, C) the shared LM head
    targets: torch.Tensor,  # (N,)
    weights: Sequence[float],  # (E,) exit weights, normally from `exit_weights`
    *,
    chunk_size: int = 2048,
    chunk_fn=chunk_nll_and_grads,
    token_weights: torch.Tensor | None = None,  # (N,) from `focus_weights`; None: every token alike
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted mean-NLL loss, per-exit mean NLL (E,) detached) of E exits in one pass.

    The loss is sum_e weights[e] * mean NLL of exit e over the non-ignored targets (each token's
    NLL times its token weight, when given; the per-exit means returned stay unweighted); with
    every target ignored it is 0 (and so are its gradients), never NaN. chunk_fn may be a
    compiled ``chunk_nll_and_grads``.
    """
    count = (targets != IGNORE_INDEX).sum().clamp(min=1).float()
    scales = torch.tensor(list(weights), dtype=torch.float32, device=normed.device) / count
    loss, sums = _ChunkedExitLoss.apply(normed, weight, targets, scales, chunk_size, chunk_fn, token_weights)
    return loss, sums / count


def chunk_distill_and_grads(
    x: torch.Tensor,  # (E, n, C) normed hidden states of one chunk of tokens (the students)
    weight: torch.Tensor,  # (V, C)
    targets: torch.Tensor,  # (n,) ids, clamped to >= 0
    valid: torch.Tensor,  # (n,) 1.0 where the token counts, else 0.0
    teacher: torch.Tensor,  # (n, C) the last exit's normed hidden states at the same tokens
    ce_scales: torch.Tensor,  # (E,) multiplier of each exit's summed NLL in the loss
    kd_scales: torch.Tensor,  # (E,) multiplier of each exit's summed KL in the loss
    temperature: float,
    token_weights: torch.Tensor,  # (n,) each token's weight in the loss, 0 where it does not count
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(NLL sum (E,), KL sum (E,), their token-weighted sums (E,) and (E,), d loss/d x (E, n, C),
    d loss/d weight (V, C) fp32) of one chunk, KL(p || q_e) with p = softmax(teacher logits / T)
    and q_e = softmax(exit e's logits / T); the loss is sum_e ce_scales[e] * weighted NLL sum_e +
    kd_scales[e] * weighted KL sum_e.

    The cross-entropy part is chunk_nll_and_grads' arithmetic, step for step: with kd_scales 0
    the results are bit for bit its results. A pure function of tensors, compilable as is.
    """
    E = x.shape[0]
    logits = (x @ weight.t()).float()  # (E, n, V)
    lse = torch.logsumexp(logits, dim=-1)  # (E, n)
    idx = targets.view(1, -1, 1).expand(E, -1, 1)
    token_nll = lse - logits.gather(-1, idx).squeeze(-1)  # (E, n)
    nll, weighted_nll = (token_nll * valid).sum(-1), (token_nll * token_weights).sum(-1)  # (E,)
    log_p = torch.log_softmax((teacher @ weight.t()).float() / temperature, dim=-1)  # (n, V), a constant
    p = log_p.exp()
    # at T = 1 the student's tempered distribution is the softmax the cross-entropy needs anyway
    scaled = logits if temperature == 1.0 else logits / temperature  # (E, n, V)
    lse_t = lse if temperature == 1.0 else torch.logsumexp(scaled, dim=-1)  # (E, n)
    # KL(p || q) = sum p log p - sum p log q, and log q = scaled - lse_t with sum p = 1
    token_kl = (p * log_p).sum(-1) - (scaled * p).sum(-1) + lse_t  # (E, n)
    kl, weighted_kl = (token_kl * valid).sum(-1), (token_kl * token_weights).sum(-1)  # (E,)
    # d(kd_scale * weighted KL)/d(logits) = token weight * kd_scale / T * (q - p)
    kd_coef = (token_weights.view(1, -1) * (kd_scales / temperature).view(-1, 1)).unsqueeze(-1)  # (E, n, 1)
    if temperature != 1.0:
        kd = scaled.sub_(lse_t.unsqueeze(-1)).exp_().sub_(p).mul_(kd_coef)
    grad = logits.sub_(lse.unsqueeze(-1)).exp_()  # softmax, in place of the logits
    if temperature == 1.0:
        kd = (grad - p).mul_(kd_coef)
    grad.scatter_add_(-1, idx, torch.full(idx.shape, -1.0, dtype=grad.dtype, device=grad.device))
    grad = grad.mul_((token_weights.view(1, -1) * ce_scales.view(-1, 1)).unsqueeze(-1)).add_(kd).to(x.dtype)
    grad_x = grad @ weight  # (E, n, C)
    grad_w = (grad.flatten(0, 1).t() @ x.flatten(0, 1)).float()  # (V, C)
    return nll, kl, weighted_nll, weighted_kl, grad_x, grad_w


class _ChunkedDistillLoss(torch.autograd.Function):
    """sum_e ce_scales[e] * NLL_e + kd_scales[e] * KL_e (token-weighted); gradients chunk by chunk,
    none to the teacher."""

    @staticmethod
    def forward(ctx, normed, weight, targets, teacher, ce_scales, kd_scales, temperature, chunk_size,  # type: ignore[override]
                chunk_fn, token_weights):
        grad_x, grad_w, (nll_sums, kl_sums, weighted_nll, weighted_kl) = _over_chunks(
            normed, weight, targets, chunk_size, 4,
            lambda part, safe, valid, weights: chunk_fn(normed[:, part], weight, safe, valid, teacher[part],
                                                        ce_scales, kd_scales, temperature, weights), token_weights)
        ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        ctx.mark_non_differentiable(nll_sums, kl_sums)
        return (weighted_nll * ce_scales + weighted_kl * kd_scales).sum(), nll_sums, kl_sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_nll, _grad_kl):  # type: ignore[override]
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss, grad_w * grad_loss, None, None, None, None, None, None, None, None


def distill_exit_loss(
    normed: torch.Tensor,  # (E, N, C) final-normed hidden states of E early exits
    weight: torch.Tensor,  # (V, C) the shared LM head
    targets: torch.Tensor,  # (N,)
    teacher: torch.Tensor,  # (N, C) the last exit's final-normed hidden states at the same tokens
    weights: Sequence[float],  # (E,) exit weights
    *,
    distill: float,  # W in [0, 1]
    temperature: float = 1.0,
    chunk_size: int = 2048,
    chunk_fn=chunk_distill_and_grads,
    token_weights: torch.Tensor | None = None,  # (N,) from `focus_weights`; None: every token alike
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, per-exit mean NLL (E,), per-exit mean KL (E,), both detached) with self-distillation.

    loss = sum_e weights[e] * ((1 - W) * mean NLL_e + W * T^2 * mean KL(p_T || q_e,T)) over the
    non-ignored tokens (each token's terms times its token weight, when given; the per-exit means
    returned stay unweighted); the teacher distribution is a constant (no gradient reaches
    `teacher`, nor the head through it). T^2 keeps the KL's gradient on the cross-entropy's scale
    (Hinton et al.).
    """
    count = (targets != IGNORE_INDEX).sum().clamp(min=1).float()
    scales = torch.tensor(list(weights), dtype=torch.float32, device=normed.device) / count
    ce_scales, kd_scales = scales * (1.0 - distill), scales * (distill * temperature**2)
    loss, nll, kl = _ChunkedDistillLoss.apply(normed, weight, targets, teacher.detach(), ce_scales, kd_scales,
                                              float(temperature), chunk_size, chunk_fn, token_weights)
    return loss, nll / count, kl / count


def exit_loss_reference(
    hidden: dict[int, torch.Tensor],  # exit k -> (B, T, C)
    unembed,
    targets: torch.Tensor,  # (B, T)
    weights: Sequence[float],
    token_weights: torch.Tensor | None = None,  # (B*T,)
) -> torch.Tensor:
    """The plain loop the vectorised loss must equal (used by the tests)."""
    valid = (targets != IGNORE_INDEX).flatten()
    per_token = valid.float() if token_weights is None else token_weights * valid
    total = torch.zeros((), dtype=torch.float32)
    for (k, h), w in zip(sorted(hidden.items()), weights):
        logits = unembed(h).float().flatten(0, 1)
        nll = F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
        total = total + w * (nll * per_token).sum() / valid.sum().clamp(min=1)
    return total


def distill_loss_reference(
    hidden: dict[int, torch.Tensor],  # early exit k -> (B, T, C)
    teacher_hidden: torch.Tensor,  # (B, T, C) the last exit's
    unembed,
    targets: torch.Tensor,  # (B, T)
    weights: Sequence[float],
    distill: float,
    temperature: float,
    token_weights: torch.Tensor | None = None,  # (B*T,)
) -> torch.Tensor:
    """The plain loop the chunked distillation loss must equal (used by the tests)."""
    valid = (targets != IGNORE_INDEX).flatten()
    per_token = valid.float() if token_weights is None else token_weights * valid
    count = valid.sum().clamp(min=1)
    log_p = F.log_softmax(unembed(teacher_hidden).float().detach().flatten(0, 1) / temperature, dim=-1)
    total = torch.zeros((), dtype=torch.float32)
    for (k, h), w in zip(sorted(hidden.items()), weights):
        logits = unembed(h).float().flatten(0, 1)
        nll = F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
        log_q = F.log_softmax(logits / temperature, dim=-1)
        kl_per_token = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)  # KL(p || q)
        ce, kl = (nll * per_token).sum() / count, (kl_per_token * per_token).sum() / count
        total = total + w * ((1 - distill) * ce + distill * temperature**2 * kl)
    return total


def lr_at(step: int, *, base_lr: float, warmup: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up for `warmup` steps, then cosine decay to min_ratio * base_lr at total_steps."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(total_steps - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
