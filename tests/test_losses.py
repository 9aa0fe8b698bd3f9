"""Layer dropout, exit weights, curricula and the vectorised early-exit loss against plain loops."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from layerskip.losses import (
    CURRICULA,
    IGNORE_INDEX,
    distill_exit_loss,
    distill_loss_reference,
    enabled_exits,
    exit_loss,
    exit_loss_reference,
    exit_nll_sums,
    exit_weights,
    focus_weights,
    layer_dropout_probs,
    lr_at,
    sample_layer_keep,
    time_ramp,
)

# ----------------------------------------------------------------------------- layer dropout


def test_schedule_values_linear_and_exp():
    lin = layer_dropout_probs(5, 0.2, "linear")
    assert lin == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2], abs=1e-12)
    ex = layer_dropout_probs(5, 0.2, "exp")
    assert ex == pytest.approx([0.2 * (2 ** (l / 4) - 1) for l in range(5)], abs=1e-12)
    assert ex[0] == 0.0 and ex[-1] == pytest.approx(0.2)
    assert all(a < b for a, b in zip(ex[1:], lin[1:-1]))  # exp stays below linear in between
    assert layer_dropout_probs(1, 0.5, "linear") == [0.0]
    with pytest.raises(ValueError):
        layer_dropout_probs(4, 0.1, "cosine")


def test_time_ramp_constant_and_paper_exp():
    assert [time_ramp(t, 11, "constant") for t in (0, 5, 10)] == [1.0, 1.0, 1.0]
    assert time_ramp(0, 11, "exp") == 0.0
    assert time_ramp(5, 11, "exp") == pytest.approx(math.sqrt(2) - 1)
    assert time_ramp(10, 11, "exp") == pytest.approx(1.0)
    assert time_ramp(50, 11, "exp") == pytest.approx(1.0)  # clamped after the end
    probs = layer_dropout_probs(3, 0.4, "linear", step=5, total_steps=11, ramp="exp")
    assert probs == pytest.approx([0.0, 0.2 * (math.sqrt(2) - 1), 0.4 * (math.sqrt(2) - 1)])


def test_keep_mask_extremes_and_per_sample_independence():
    g = torch.Generator().manual_seed(0)
    keep = sample_layer_keep([0.0, 1.0, 0.5], 4000, g)
    assert keep.shape == (3, 4000) and keep.dtype == torch.bool
    assert keep[0].all() and not keep[1].any()
    frac = keep[2].float().mean().item()
    assert 0.47 < frac < 0.53
    # per sample, not per batch: samples differ within one step
    assert 0 < keep[2, :10].sum() < 10
    # independence between samples: P(both kept) ~ P(kept)^2 for neighbouring samples
    both = (keep[2, :-1] & keep[2, 1:]).float().mean().item()
    assert abs(both - frac * frac) < 0.03
    # deterministic from the generator
    assert torch.equal(sample_layer_keep([0.0, 1.0, 0.5], 4000, torch.Generator().manual_seed(0)), keep)


def test_layer_dropout_p0_equals_no_dropout_exactly():
    model = tiny_model()
    idx = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
    keep = sample_layer_keep(layer_dropout_probs(4, 0.0, "linear"), 3, torch.Generator().manual_seed(0))
    assert keep.all()
    with torch.no_grad():
        a = model(idx, layer_keep=keep).logits
        b = model(idx).logits
    assert torch.equal(a, b)


def test_layer_dropout_p1_skips_every_droppable_block():
    model = tiny_model()
    idx = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
    L = model.num_layers
    keep = sample_layer_keep([1.0] * L, 3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(idx, layer_keep=keep)
        assert torch.equal(out.hidden, model.embed(idx))  # every block skipped
        # schedule with max_skip_prob=1: the last block is always skipped, the first never
        probs = layer_dropout_probs(L, 1.0, "linear")
        keep = sample_layer_keep(probs, 64, torch.Generator().manual_seed(0))
        assert keep[0].all() and not keep[-1].any()
        idx2 = idx[:1]
        mask = torch.tensor([[True]] * (L - 1) + [[False]])
        out = model(idx2, layer_keep=mask, exits=[L - 1])
        assert torch.equal(out.hidden, out.exit_hidden[L - 1])


def test_skipped_sample_is_untouched_and_kept_sample_matches_full():
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    L = model.num_layers
    keep = torch.ones(L, 2, dtype=torch.bool)
    keep[2, 1] = False  # skip block 2 for sample 1 only
    with torch.no_grad():
        out = model(idx, layer_keep=keep, exits=[2])
        full = model(idx[:1])
        torch.testing.assert_close(out.logits[0], full.logits[0], rtol=1e-5, atol=1e-5)
        h = model.run_blocks(out.exit_hidden[2][1:], 3, L)  # sample 1 skipped block 2
        torch.testing.assert_close(out.hidden[1:], h, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- weights, curricula


def test_exit_weights_normalised_and_shaped():
    w = exit_weights([1, 2, 3, 4], 4, 1.0)
    assert sum(w) == pytest.approx(1.0)
    assert w == pytest.approx([1 / 20, 3 / 20, 6 / 20, 10 / 20])
    w = exit_weights([2, 4], 4, 0.5)
    assert w == pytest.approx([1.5 / 11.5, 10 / 11.5]) and sum(w) == pytest.approx(1.0)
    assert exit_weights([1, 2, 3, 4], 4, 0.0) == pytest.approx([0, 0, 0, 1])
    with pytest.raises(ValueError):
        exit_weights([1, 2], 4, 0.0)


def test_uniform_exit_weights_count_every_early_exit_alike():
    assert exit_weights([1, 3, 5, 6], 6, 0.5, "uniform") == pytest.approx([0.2, 0.2, 0.2, 0.4])
    assert exit_weights([6], 6, 1.0, "uniform") == [1.0]
    assert exit_weights([1, 2, 3, 4], 4, 0.0, "uniform") == pytest.approx([0, 0, 0, 1])
    with pytest.raises(ValueError, match="weighting"):
        exit_weights([1, 4], 4, 1.0, "linear")


@pytest.mark.parametrize("curriculum", CURRICULA)
def test_curricula_always_include_the_last_exit(curriculum):
    for step in range(12):
        exits = enabled_exits(curriculum, step, 6, rotation=3, gradual_steps=10)
        assert exits[-1] == 6 and exits == sorted(set(exits)) and all(1 <= k <= 6 for k in exits)


def test_curricula_enable_the_right_exits():
    assert enabled_exits("none", 17, 6) == [1, 2, 3, 4, 5, 6]
    rot = [enabled_exits("rotational", t, 6, rotation=3) for t in range(4)]
    assert rot == [[1, 4, 6], [2, 5, 6], [3, 6], [1, 4, 6]]
    assert enabled_exits("rotational", 1, 6, rotation=2) == [2, 4, 6]
    assert enabled_exits("rotational", 5, 6, rotation=1) == [1, 2, 3, 4, 5, 6]
    grad = [enabled_exits("gradual", t, 6, gradual_steps=10) for t in (0, 1, 2, 4, 5, 6, 8, 9, 10, 99)]
    assert grad == [
        [6],
        [5, 6],  # 5*10 > 5*9
        [5, 6],  # 4*10 > 5*8 is false
        [4, 5, 6],
        [3, 4, 5, 6],
        [3, 4, 5, 6],
        [2, 3, 4, 5, 6],  # 2*10 > 5*2 but 1*10 > 5*2 is false
        [1, 2, 3, 4, 5, 6],
        [1, 2, 3, 4, 5, 6],
        [1, 2, 3, 4, 5, 6],
    ]
    with pytest.raises(ValueError):
        enabled_exits("random", 0, 6)


def test_lr_warmup_then_cosine():
    lrs = [lr_at(s, base_lr=1.0, warmup=4, total_steps=14) for s in range(16)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[9] == pytest.approx(0.55)
    assert lrs[14] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


# ----------------------------------------------------------------------------- the loss


def _hidden_and_targets(seed=0, ignore_some=True):
    model = tiny_model(seed).train()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 97, (3, 20), generator=g)
    targets = torch.randint(0, 97, (3, 20), generator=g)
    if ignore_some:
        targets[0, :5] = IGNORE_INDEX
    return model, idx, targets


@pytest.mark.parametrize("exits,chunk", [([1, 2, 3, 4], 7), ([2, 4], 1000), ([4], 16)])
def test_vectorised_exit_loss_equals_plain_loop(exits, chunk):
    model, idx, targets = _hidden_and_targets()
    weights = exit_weights(exits, 4, 0.7)

    out = model(idx, exits=exits, compute_logits=False)
    ref = exit_loss_reference(out.exit_hidden, model.unembed, targets, weights)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    out = model(idx, exits=exits, compute_logits=False)
    stacked = torch.stack([out.exit_hidden[k] for k in exits])  # (E, B, T, C)
    normed = model.norm(stacked).flatten(1, 2)  # (E, N, C)
    loss, per_exit = exit_loss(normed, model.lm_head.weight, targets.flatten(), weights, chunk_size=chunk)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    for e, k in enumerate(exits):
        logits = model.unembed(out.exit_hidden[k]).detach()
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        torch.testing.assert_close(per_exit[e], expected, rtol=1e-5, atol=1e-6)
    sums = exit_nll_sums(normed.detach(), model.lm_head.weight.detach(), targets.flatten(), chunk_size=chunk)
    torch.testing.assert_close(sums / (targets != IGNORE_INDEX).sum(), per_exit, rtol=1e-5, atol=1e-6)


def test_exit_loss_with_every_target_ignored_is_zero_not_nan():
    model, idx, targets = _hidden_and_targets()
    targets[:] = IGNORE_INDEX
    out = model(idx, exits=[2, 4], compute_logits=False)
    normed = model.norm(torch.stack([out.exit_hidden[2], out.exit_hidden[4]])).flatten(1, 2)
    loss, per_exit = exit_loss(normed, model.lm_head.weight, targets.flatten(), [0.5, 0.5], chunk_size=8)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(per_exit, torch.zeros(2))
    assert all(torch.isfinite(p.grad).all() and not p.grad.any() for p in model.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------- self-distillation


def _students_and_teacher(exits=(1, 2, 3)):
    """(model, idx, targets, early exits' hidden {k: (B, T, C)}, the last exit's hidden (B, T, C))."""
    model, idx, targets = _hidden_and_targets(seed=1)
    out = model(idx, exits=[*exits, 4], compute_logits=False)
    return model, idx, targets, {k: out.exit_hidden[k] for k in exits}, out.exit_hidden[4]


def _chunked_distill(model, hidden, teacher_hidden, targets, weights, distill, temperature, chunk):
    normed = model.norm(torch.stack([hidden[k] for k in sorted(hidden)])).flatten(1, 2)  # (E, N, C)
    teacher = model.norm(teacher_hidden).flatten(0, 1)  # (N, C)
    return distill_exit_loss(normed, model.lm_head.weight, targets.flatten(), teacher, weights, distill=distill,
                             temperature=temperature, chunk_size=chunk)


@pytest.mark.parametrize("distill,temperature,chunk", [(0.5, 1.0, 7), (1.0, 2.5, 1000), (0.3, 0.5, 16)])
def test_distillation_loss_equals_plain_loop(distill, temperature, chunk):
    model, _, targets, hidden, last = _students_and_teacher()
    weights = exit_weights([1, 2, 3], 4, 0.7)[:3]
    params = list(model.parameters())
    ref = distill_loss_reference(hidden, last, model.unembed, targets, weights, distill, temperature)
    ref_grads = torch.autograd.grad(ref, params, retain_graph=True, allow_unused=True)
    loss, nll, kl = _chunked_distill(model, hidden, last, targets, weights, distill, temperature, chunk)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for got, want, (name, _) in zip(grads, ref_grads, model.named_parameters()):
        assert (got is None) == (want is None), name
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
    valid = (targets != IGNORE_INDEX).flatten()
    log_p = torch.log_softmax(model.unembed(last).detach().flatten(0, 1) / temperature, -1)
    for e, k in enumerate(sorted(hidden)):
        logits = model.unembed(hidden[k]).detach().flatten(0, 1)
        torch.testing.assert_close(nll[e], torch.nn.functional.cross_entropy(logits, targets.flatten(),
                                                                             ignore_index=IGNORE_INDEX))
        log_q = torch.log_softmax(logits / temperature, -1)
        per_token = sum(log_p[:, v].exp() * (log_p[:, v] - log_q[:, v]) for v in range(log_p.shape[1]))  # (N,)
        torch.testing.assert_close(kl[e], per_token[valid].mean(), rtol=1e-4, atol=1e-6)
        assert kl[e] > 0.01  # the exits differ from the last layer: the KL term is not trivially zero


def test_distillation_gradient_never_reaches_the_teacher():
    model, _, targets, hidden, last = _students_and_teacher(exits=(2,))
    teacher = model.norm(last).flatten(0, 1).detach().requires_grad_()  # the last layer's normed hidden, a leaf
    normed = model.norm(hidden[2]).flatten(0, 1).unsqueeze(0)
    loss, _, _ = distill_exit_loss(normed, model.lm_head.weight, targets.flatten(), teacher, [1.0], distill=1.0,
                                   temperature=2.0, chunk_size=9)
    assert torch.autograd.grad(loss, teacher, retain_graph=True, allow_unused=True) == (None,)
    # the head's gradient is the student's alone: the same as with the teacher's logits computed as a constant
    with torch.no_grad():
        log_p = torch.log_softmax(model.unembed(last).flatten(0, 1) / 2.0, -1)
    log_q = torch.log_softmax(model.unembed(hidden[2]).flatten(0, 1) / 2.0, -1)
    valid = (targets != IGNORE_INDEX).flatten()
    student_only = 4.0 * (torch.nn.functional.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)[valid]
                          ).mean()
    torch.testing.assert_close(loss, student_only, rtol=1e-5, atol=1e-6)
    got, want = (torch.autograd.grad(x, model.lm_head.weight, retain_graph=True)[0] for x in (loss, student_only))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    last_grads = torch.autograd.grad(loss, list(model.layers[2:].parameters()), allow_unused=True)
    assert all(g is None for g in last_grads)  # blocks 3 and 4 only make the teacher: untouched


def test_distillation_weight_zero_is_the_plain_loss_bit_for_bit():
    model, _, targets, hidden, last = _students_and_teacher()
    weights = exit_weights([1, 2, 3], 4, 0.5)[:3]
    normed = model.norm(torch.stack([hidden[k] for k in (1, 2, 3)])).flatten(1, 2)
    teacher = model.norm(last).flatten(0, 1)
    inputs = [normed, model.lm_head.weight]
    plain, plain_nll = exit_loss(normed, model.lm_head.weight, targets.flatten(), weights, chunk_size=11)
    plain_grads = torch.autograd.grad(plain, inputs, retain_graph=True)
    loss, nll, kl = distill_exit_loss(normed, model.lm_head.weight, targets.flatten(), teacher, weights, distill=0.0,
                                      temperature=3.0, chunk_size=11)
    assert torch.equal(loss, plain) and torch.equal(nll, plain_nll) and (kl > 0).all()
    for got, want in zip(torch.autograd.grad(loss, inputs), plain_grads):
        assert torch.equal(got, want)


# ----------------------------------------------------------------------------- focus on confident tokens


@pytest.mark.parametrize("power", [0.5, 1.0, 3.0])
def test_focus_weights_are_the_last_layers_confidence_to_a_power_with_mean_one(power):
    model, _, targets, _, last = _students_and_teacher()
    teacher = model.norm(last).flatten(0, 1)
    weights = focus_weights(teacher, model.lm_head.weight, targets.flatten(), power, chunk_size=7)
    assert not weights.requires_grad
    valid = (targets != IGNORE_INDEX).flatten()
    confidence = torch.softmax(model.unembed(last).detach().float().flatten(0, 1), -1).max(-1).values  # direct
    expected = confidence**power * valid
    expected = expected * valid.sum() / expected.sum()
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-7)
    assert weights[~valid].eq(0).all() and weights[valid].mean() == pytest.approx(1.0, rel=1e-5)
    order = confidence[valid].argsort()
    assert (weights[valid][order].diff() >= 0).all()  # the surer the last layer, the heavier the token
    flat = focus_weights(teacher, model.lm_head.weight, targets.flatten(), 0.0)
    assert torch.equal(flat, valid.float())  # power 0: every counted token alike


@pytest.mark.parametrize("distill", [0.0, 0.6])
def test_token_weighted_exit_losses_equal_the_plain_loop_and_report_unweighted_means(distill):
    model, _, targets, hidden, last = _students_and_teacher()
    weights = exit_weights([1, 2, 3], 4, 0.7)[:3]
    normed = model.norm(torch.stack([hidden[k] for k in (1, 2, 3)])).flatten(1, 2)
    teacher = model.norm(last).flatten(0, 1)
    token_weights = focus_weights(teacher, model.lm_head.weight, targets.flatten(), 2.0)
    params = [p for p in model.parameters()]
    ref = distill_loss_reference(hidden, last, model.unembed, targets, weights, distill, 1.0, token_weights)
    ref_grads = torch.autograd.grad(ref, params, retain_graph=True, allow_unused=True)
    if distill:
        loss, nll, _ = distill_exit_loss(normed, model.lm_head.weight, targets.flatten(), teacher, weights,
                                         distill=distill, chunk_size=9, token_weights=token_weights)
        _, unweighted_nll, _ = distill_exit_loss(normed, model.lm_head.weight, targets.flatten(), teacher, weights,
                                                 distill=distill, chunk_size=9)
    else:
        loss, nll = exit_loss(normed, model.lm_head.weight, targets.flatten(), weights, chunk_size=9,
                              token_weights=token_weights)
        unweighted_nll = exit_loss(normed, model.lm_head.weight, targets.flatten(), weights, chunk_size=9)[1]
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for got, want, (name, _) in zip(torch.autograd.grad(loss, params, allow_unused=True), ref_grads,
                                    model.named_parameters()):
        assert (got is None) == (want is None), name
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(nll, unweighted_nll)  # logged exit losses stay comparable with unfocused runs
    unfocused = distill_loss_reference(hidden, last, model.unembed, targets, weights, distill, 1.0)
    assert not torch.allclose(loss, unfocused)  # the weights do change the loss


def test_focus_power_zero_is_the_unweighted_loss_bit_for_bit():
    model, _, targets, hidden, last = _students_and_teacher()
    weights = exit_weights([1, 2, 3], 4, 0.5)[:3]
    normed = model.norm(torch.stack([hidden[k] for k in (1, 2, 3)])).flatten(1, 2)
    teacher = model.norm(last).flatten(0, 1)
    flat = focus_weights(teacher, model.lm_head.weight, targets.flatten(), 0.0)
    inputs = [normed, model.lm_head.weight]
    for fn, extra in ((exit_loss, {}), (distill_exit_loss, dict(teacher=teacher, distill=0.9))):
        plain = fn(normed, model.lm_head.weight, targets.flatten(), weights=weights, chunk_size=11, **extra)
        flat_loss = fn(normed, model.lm_head.weight, targets.flatten(), weights=weights, chunk_size=11,
                       token_weights=flat, **extra)
        assert all(torch.equal(a, b) for a, b in zip(plain, flat_loss))
        grads = [torch.autograd.grad(loss[0], inputs, retain_graph=True) for loss in (flat_loss, plain)]
        assert all(torch.equal(got, want) for got, want in zip(*grads))
