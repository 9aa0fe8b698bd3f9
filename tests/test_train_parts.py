"""The training package's parts, without a run: config validation, a step's plan, the
sub-sampled early-exit loss, the Muon + AdamW optimizer group."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from layerskip.errors import ConfigError
from layerskip.losses import (
    CURRICULA,
    LAYER_DROPOUT_SCHEDULES,
    TIME_RAMPS,
    distill_loss_reference,
    exit_loss_reference,
    exit_weights,
)
from layerskip.model import Transformer, rms_norm
from layerskip.training import (
    ExitLossModel,
    OptimizerGroup,
    TrainConfig,
    flat_positions,
    make_optimizer,
    sample_early_positions,
    step_plan,
)

# the same tiny settings as test_train.py's runs
TINY = dict(d_model=32, num_layers=4, num_heads=4, d_ff=64, dropout=0.1, vocab_size=400, seq_len=32,
            batch_size=8, warmup=3, lr=3e-3, precision="fp32", compile=False, eval_batch_size=8, loss_chunk=64)


def tiny_cfg(**overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, **overrides})


# ----------------------------------------------------------------------------- config


def test_train_config_refuses_unknown_and_impossible_settings():
    with pytest.raises(ConfigError, match="unknown"):
        TrainConfig.from_dict({"max_skip_prop": 0.1})
    for bad in (dict(max_skip_prob=1.5), dict(lr=0.0), dict(batch_size=0), dict(num_heads=5),
                dict(early_exit_curriculum="random"), dict(precision="fp16"), dict(time_budget=-1.0),
                dict(early_exit_scale=-1.0), dict(layer_dropout_schedule="cosine"), dict(max_steps=0),
                dict(early_exit_tokens=0.0), dict(early_exit_tokens=1.5), dict(optimizer="sgd"),
                dict(early_exit_weighting="linear")):
        with pytest.raises(ConfigError):
            tiny_cfg(**bad)
    assert tiny_cfg(max_skip_prob=0, early_exit_scale=0).plain and not tiny_cfg().plain


@pytest.mark.parametrize("curriculum", CURRICULA)
@pytest.mark.parametrize("schedule", LAYER_DROPOUT_SCHEDULES)
@pytest.mark.parametrize("ramp", TIME_RAMPS)
def test_every_schedule_and_curriculum_is_reachable(curriculum, schedule, ramp):
    cfg = tiny_cfg(early_exit_curriculum=curriculum, layer_dropout_schedule=schedule, layer_dropout_ramp=ramp,
                   max_skip_prob=0.4)
    plans = [step_plan(cfg, s, 10) for s in range(10)]
    assert all(exits[-1] == 4 and sum(w) == pytest.approx(1.0) for exits, w, _ in plans)
    assert all(p[0] == 0.0 and max(p) <= 0.4 + 1e-12 for _, _, p in plans)
    assert plans[-1][2][-1] == pytest.approx(0.4)
    if ramp == "exp":
        assert plans[0][2] == [0.0] * 4  # the paper's ramp starts with no skipping
    if curriculum == "none":
        assert all(exits == [1, 2, 3, 4] for exits, _, _ in plans)
    plain = step_plan(tiny_cfg(early_exit_curriculum=curriculum, early_exit_scale=0, max_skip_prob=0), 3, 10)
    assert plain == ([4], [1.0], [0.0] * 4)


def test_step_plan_uses_the_configured_exit_weighting():
    exits, weights, _ = step_plan(tiny_cfg(early_exit_curriculum="none", early_exit_weighting="uniform"), 0, 10)
    assert exits == [1, 2, 3, 4] and weights == pytest.approx([0.25] * 4)
    _, depth, _ = step_plan(tiny_cfg(early_exit_curriculum="none", early_exit_weighting="depth"), 0, 10)
    assert depth == pytest.approx([0.05, 0.15, 0.3, 0.5])


# ----------------------------------------------------------------------------- sub-sampled early exits


def test_sample_early_positions_is_a_seeded_subset_of_every_row():
    assert sample_early_positions(3, 100, 1.0, torch.Generator().manual_seed(0)) is None
    a = sample_early_positions(3, 100, 0.25, torch.Generator().manual_seed(0))
    b = sample_early_positions(3, 100, 0.25, torch.Generator().manual_seed(0))
    c = sample_early_positions(3, 100, 0.25, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (3, 25) and a.min() >= 0 and a.max() < 100
    assert all(len(set(row.tolist())) == 25 for row in a) and torch.equal(a, a.sort(dim=1).values)
    flat = flat_positions(a, 100)
    assert flat.tolist() == [int(p) + 100 * r for r in range(3) for p in a[r]]


def test_early_exit_loss_on_a_token_subset_matches_the_reference_and_its_gradients():
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(dropout=0.0).model_config(50))
    idx, targets = torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))
    targets[0, :4] = -100  # ignored targets stay ignored in both estimates
    exits, weights = [1, 3, 4], exit_weights([1, 3, 4], 4, 1.0)
    positions = flat_positions(sample_early_positions(3, 16, 0.4, torch.Generator().manual_seed(3)), 16)
    loss, per_exit, kl = ExitLossModel(model, chunk_size=7)(idx, targets, exits, weights, None, positions)
    assert kl.shape == (0,)  # no distillation
    grads = torch.autograd.grad(loss, list(model.parameters()))

    out = model(idx, exits=exits, compute_logits=False)
    pick = lambda h: h.flatten(0, 1)[positions].unsqueeze(0)  # noqa: E731
    early = exit_loss_reference({k: pick(out.exit_hidden[k]) for k in exits[:-1]}, model.unembed,
                                targets.flatten()[positions].unsqueeze(0), weights[:-1])
    last = exit_loss_reference({4: out.exit_hidden[4]}, model.unembed, targets, weights[-1:])
    reference = early + last
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, torch.autograd.grad(reference, list(model.parameters()))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    full_loss, full_per_exit, _ = ExitLossModel(model, chunk_size=7)(idx, targets, exits, weights, None, None)
    assert per_exit[-1] == pytest.approx(float(full_per_exit[-1]), rel=1e-5)  # the last exit sees every token
    assert not torch.allclose(per_exit[:-1], full_per_exit[:-1])  # the early ones a subset


@pytest.mark.parametrize("fraction", [0.4, 1.0])
def test_distilled_step_loss_matches_the_reference_and_the_last_exit_keeps_cross_entropy(fraction):
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(dropout=0.0).model_config(50))
    idx, targets = torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))
    exits, weights = [1, 3, 4], exit_weights([1, 3, 4], 4, 1.0)
    keep = torch.ones(4, 3, dtype=torch.bool)
    keep[2, 1] = False  # layer dropout: the teacher is the last exit of the same (dropped) forward
    rows = sample_early_positions(3, 16, fraction, torch.Generator().manual_seed(3))
    positions = None if rows is None else flat_positions(rows, 16)
    step_model = ExitLossModel(model, chunk_size=5, distill=0.6, temperature=2.0)
    loss, per_exit, kl = step_model(idx, targets, exits, weights, keep, positions)
    grads = torch.autograd.grad(loss, list(model.parameters()))

    out = model(idx, exits=exits, layer_keep=keep, compute_logits=False)
    chosen = torch.arange(48) if positions is None else positions
    pick = lambda h: h.flatten(0, 1)[chosen].unsqueeze(0)  # noqa: E731
    early = distill_loss_reference({k: pick(out.exit_hidden[k]) for k in exits[:-1]}, pick(out.exit_hidden[4]),
                                   model.unembed, targets.flatten()[chosen].unsqueeze(0), weights[:-1], 0.6, 2.0)
    last = exit_loss_reference({4: out.exit_hidden[4]}, model.unembed, targets, weights[-1:])  # plain CE
    torch.testing.assert_close(loss, early + last, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, torch.autograd.grad(early + last, list(model.parameters()))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert per_exit.shape == (3,) and kl.shape == (2,) and (kl > 0).all()
    plain = ExitLossModel(model, chunk_size=5)(idx, targets, exits, weights, keep, positions)
    torch.testing.assert_close(per_exit, plain.exit_nll)  # exit_losses stay cross-entropy, comparable across W
    only_last = step_model(idx, targets, [4], [1.0], keep, positions)  # a step with no early exit
    assert only_last.exit_kl.shape == (0,) and torch.equal(only_last.exit_nll, plain.exit_nll[-1:])


def test_distillation_settings_are_validated():
    for bad in (dict(early_exit_distill=-0.1), dict(early_exit_distill=1.5), dict(early_exit_distill=float("nan")),
                dict(early_exit_distill_temperature=0.0), dict(early_exit_distill_temperature=float("inf"))):
        with pytest.raises(ConfigError, match="early_exit_distill"):
            tiny_cfg(**bad)
    plain = tiny_cfg(early_exit_scale=0.0, max_skip_prob=0.0)  # the default distillation has no exit to act on
    assert plain.plain and step_plan(plain, 0, 10)[:2] == ([4], [1.0])
    cfg = tiny_cfg(early_exit_distill=1.0, early_exit_distill_temperature=0.5)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert tiny_cfg().early_exit_distill == 0.9 and tiny_cfg().early_exit_distill_temperature == 1.0
    assert tiny_cfg().early_exit_weighting == "uniform"  # the recipe search's winner (docs/results.md)


def test_the_early_exit_scale_moves_linearly_to_its_end_value_over_the_schedule():
    cfg = tiny_cfg(early_exit_curriculum="none", early_exit_weighting="uniform", early_exit_scale_end=0.2)
    at = lambda step: step_plan(cfg, step, 11)[1]  # noqa: E731
    assert at(0) == pytest.approx(exit_weights([1, 2, 3, 4], 4, 1.0, "uniform"))
    assert at(5) == pytest.approx(exit_weights([1, 2, 3, 4], 4, 0.6, "uniform"))
    assert at(10) == pytest.approx(exit_weights([1, 2, 3, 4], 4, 0.2, "uniform"))
    assert at(50) == at(10)  # past the schedule's end it stays at the end value
    constant = tiny_cfg(early_exit_curriculum="none", early_exit_weighting="uniform")
    assert step_plan(constant, 0, 11)[1] == step_plan(constant, 10, 11)[1]
    to_zero = tiny_cfg(early_exit_curriculum="none", early_exit_scale_end=0.0, max_skip_prob=0.0)
    assert step_plan(to_zero, 10, 11)[:2] == ([4], [1.0])  # at scale 0 only the last exit has a loss
    assert step_plan(to_zero, 9, 11)[0] == [1, 2, 3, 4]
    rising = tiny_cfg(early_exit_scale=0.0, early_exit_scale_end=1.0, max_skip_prob=0.0)
    assert not rising.plain and step_plan(rising, 0, 11)[0] == [4]
    assert tiny_cfg(early_exit_scale=0.0, early_exit_scale_end=0.0, max_skip_prob=0.0).plain
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="early_exit_scale_end"):
            tiny_cfg(early_exit_scale_end=bad)
    with pytest.raises(ConfigError, match="early_exit_trains_head"):
        tiny_cfg(early_exit_trains_head="no")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_only_the_chosen_early_exits_get_a_loss_and_the_last_one_always_does():
    cfg = tiny_cfg(early_exit_layers=[2, 1], early_exit_weighting="uniform")  # rotation 2: {1, 3, 4}, {2, 4}
    assert cfg.early_exit_layers == (1, 2)
    assert [step_plan(cfg, s, 10)[:2] for s in (0, 1)] == [([1, 4], [0.5, 0.5]), ([2, 4], [0.5, 0.5])]
    every = tiny_cfg(early_exit_layers=[3], early_exit_curriculum="none")
    assert step_plan(every, 0, 10)[0] == [3, 4]
    for bad in ([], [4], [0], [1.5], "1,2"):
        with pytest.raises(ConfigError, match="early_exit_layers"):
            tiny_cfg(early_exit_layers=bad)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("distill, fraction, tied", [(0.0, 1.0, True), (0.0, 0.4, False), (0.6, 0.4, True)])
def test_early_exits_that_do_not_train_the_head_leave_its_gradient_to_the_last_layer(distill, fraction, tied):
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(tiny_cfg(dropout=0.0).model_config(50), tie_embeddings=tied))
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)  # a gain that is not 1, so its gradient shows
    idx, targets = torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))
    exits, weights = [1, 3, 4], exit_weights([1, 3, 4], 4, 1.0, "uniform")
    rows = sample_early_positions(3, 16, fraction, torch.Generator().manual_seed(3))
    positions = None if rows is None else flat_positions(rows, 16)
    params = dict(model.named_parameters())
    frozen = ExitLossModel(model, chunk_size=5, distill=distill, trains_head=False)
    loss = frozen(idx, targets, exits, weights, None, positions).loss
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))

    trained = ExitLossModel(model, chunk_size=5, distill=distill)(idx, targets, exits, weights, None, positions).loss
    torch.testing.assert_close(loss, trained)  # the same loss; only where its gradient goes differs
    out = model(idx, exits=exits, compute_logits=False)
    chosen = torch.arange(48) if positions is None else positions
    pick = lambda h: h.flatten(0, 1)[chosen].unsqueeze(0)  # noqa: E731
    constant_head = lambda h: F.linear(rms_norm(h, model.norm.weight.detach(), model.norm.eps),  # noqa: E731
                                       model.lm_head.weight.detach())
    early = distill_loss_reference({k: pick(out.exit_hidden[k]) for k in exits[:-1]}, pick(out.exit_hidden[4]),
                                   constant_head, targets.flatten()[chosen].unsqueeze(0), weights[:-1], distill, 1.0)
    last = exit_loss_reference({4: out.exit_hidden[4]}, model.unembed, targets, weights[-1:])
    reference = dict(zip(params, torch.autograd.grad(early + last, list(params.values()), retain_graph=True)))
    for name in params:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)
    last_only = dict(zip(params, torch.autograd.grad(last, list(params.values()), allow_unused=True)))
    for name in ["norm.weight"] + ([] if tied else ["lm_head.weight"]):  # tied, the embeddings learn as inputs
        torch.testing.assert_close(grads[name], last_only[name], rtol=1e-4, atol=1e-6, msg=name)
    assert not torch.allclose(grads["layers.0.attn.q_proj.weight"], last_only["layers.0.attn.q_proj.weight"])


@pytest.mark.parametrize("distill", [0.0, 0.6])
def test_a_focused_step_weighs_each_early_exit_token_by_the_last_layers_confidence(distill):
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(dropout=0.0).model_config(50))
    idx, targets = torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))
    targets[1, :3] = -100
    exits, weights = [1, 3, 4], exit_weights([1, 3, 4], 4, 1.0, "uniform")
    positions = flat_positions(sample_early_positions(3, 16, 0.5, torch.Generator().manual_seed(3)), 16)
    focused = ExitLossModel(model, chunk_size=5, distill=distill, focus=1.5)
    loss, per_exit, _ = focused(idx, targets, exits, weights, None, positions)
    grads = torch.autograd.grad(loss, list(model.parameters()))

    out = model(idx, exits=exits, compute_logits=False)
    pick = lambda h: h.flatten(0, 1)[positions].unsqueeze(0)  # noqa: E731
    early_targets = targets.flatten()[positions]
    confidence = torch.softmax(model.unembed(pick(out.exit_hidden[4])).detach().flatten(0, 1), -1).max(-1).values
    valid = early_targets != -100
    token_weights = confidence**1.5 * valid
    token_weights = token_weights * valid.sum() / token_weights.sum()  # mean 1 over the counted tokens
    early = distill_loss_reference({k: pick(out.exit_hidden[k]) for k in exits[:-1]}, pick(out.exit_hidden[4]),
                                   model.unembed, early_targets.unsqueeze(0), weights[:-1], distill, 1.0,
                                   token_weights)
    last = exit_loss_reference({4: out.exit_hidden[4]}, model.unembed, targets, weights[-1:])  # unweighted
    torch.testing.assert_close(loss, early + last, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, torch.autograd.grad(early + last, list(model.parameters()))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    unfocused = ExitLossModel(model, chunk_size=5, distill=distill)(idx, targets, exits, weights, None, positions)
    torch.testing.assert_close(per_exit, unfocused.exit_nll)  # the logged exit losses stay unweighted
    assert not torch.allclose(loss, unfocused.loss)


def test_focus_is_validated_and_off_by_default():
    assert tiny_cfg().early_exit_focus == 0.0
    for bad in (-1.0, float("nan"), float("inf"), True):
        with pytest.raises(ConfigError, match="early_exit_focus"):
            tiny_cfg(early_exit_focus=bad)
    cfg = tiny_cfg(early_exit_focus=2.0)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ----------------------------------------------------------------------------- optimizer


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    cfg = tiny_cfg(optimizer="muon")
    model = Transformer(cfg.model_config(400))
    opt = make_optimizer(model, cfg)
    assert isinstance(opt, OptimizerGroup) and isinstance(opt.optimizers["muon"], torch.optim.Muon)
    held = {name: {id(p) for g in o.param_groups for p in g["params"]} for name, o in opt.optimizers.items()}
    block_matrices = {id(p) for p in model.layers.parameters() if p.dim() == 2}
    assert held["muon"] == block_matrices and len(block_matrices) == 4 * 7
    assert held["adamw"] == {id(p) for p in model.parameters()} - block_matrices
    assert id(model.embed_tokens.weight) in held["adamw"]
    for group in opt.param_groups:  # the trainer sets the LR of all of them at once
        group["lr"] = 1e-3
    assert all(g["lr"] == 1e-3 for o in opt.optimizers.values() for g in o.param_groups)
    with pytest.raises(ConfigError, match="resume with the optimizer the run started with"):
        opt.load_state_dict({"adamw": opt.optimizers["adamw"].state_dict()})
