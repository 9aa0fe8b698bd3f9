"""layerskip.costs and benchmarks/decode_costs.py: the DEE and SSD cost models' arithmetic, and real timings."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import benchmark_script, tiny_model

from layerskip.costs import (
    PIECES,
    SsdCosts,
    StepCosts,
    dee_estimate,
    exit_share_needed,
    measure_ssd_costs,
    measure_step_costs,
    ssd_estimate,
)
from layerskip.errors import ConfigError


def costs(num_layers: int = 3) -> StepCosts:
    return StepCosts(ar_step=20 + num_layers * 100 + 50, block=100, full_head=50, check=10, propagate=5, rest=20,
                     num_layers=num_layers, position=8, check_vocab=None, repeats=1, threads=1)


def test_dee_estimate_charges_blocks_checks_head_and_propagation():
    full = dee_estimate(costs(), [0, 0, 4])  # every token runs 3 blocks, the head, checks at layers 1 and 2
    assert (full.us_per_token, full.us_per_token_free_checks, full.mean_exit_layer) == (390, 370, 3.0)
    assert full.speedup == pytest.approx(370 / 390) and full.speedup_free_checks == 1.0
    first = dee_estimate(costs(), [2, 0, 0])  # 1 block, 1 check, propagation, no full head
    assert (first.us_per_token, first.us_per_token_free_checks) == (135, 125)
    mixed = dee_estimate(costs(), [1, 1, 2])
    assert mixed.us_per_token == pytest.approx((135 + (20 + 200 + 5 + 20) + 2 * 390) / 4)
    assert mixed.mean_exit_layer == pytest.approx(2.25)


def test_dee_estimate_counts_only_the_checked_layers():
    only_second = dee_estimate(costs(), [0, 1, 1], checked_layers=[2])
    assert only_second.us_per_token == pytest.approx(((20 + 200 + 5 + 10) + (370 + 10)) / 2)


@pytest.mark.parametrize("counts", [[1, 2], [1, -1, 3], [0, 0, 0]])
def test_dee_estimate_refuses_a_bad_histogram(counts):
    with pytest.raises(ConfigError, match="needs 3 non-negative counts"):
        dee_estimate(costs(), counts)


def test_exit_share_needed_inverts_the_estimate():
    needed = exit_share_needed(costs(), 1.2)  # 308.3 us per token allowed; the full path costs 390
    assert needed[1] == pytest.approx((390 - 370 / 1.2) / (390 - 135))
    assert needed[2] == pytest.approx((390 - 370 / 1.2) / (390 - 245))
    for layer, share in needed.items():  # that share exiting at the layer, the rest at the top, gives 1.2x
        histogram = [0.0, 0.0, 1 - share]
        histogram[layer - 1] += share
        assert dee_estimate(costs(), histogram).speedup == pytest.approx(1.2)
    free = exit_share_needed(costs(), 1.2, free_checks=True)
    assert free[1] == pytest.approx((370 - 370 / 1.2) / (370 - 125)) and free[1] < needed[1]


def test_exit_share_needed_says_when_a_target_is_out_of_reach_or_free():
    assert exit_share_needed(costs(), 3.0) == {1: None, 2: None}  # 123 us allowed; one block alone costs more
    assert exit_share_needed(costs(), 0.9) == {1: 0.0, 2: 0.0}  # the full path with checks already fits
    with pytest.raises(ConfigError, match="target speed-up must be a positive number"):
        exit_share_needed(costs(), 0)


def test_measured_costs_are_positive_and_leave_the_cache_usable():
    model = tiny_model(0, num_layers=4).eval()
    measured = measure_step_costs(model, check_vocab=16, position=8, repeats=3)
    assert all(getattr(measured, p) > 0 for p in PIECES if p != "rest")
    assert measured.rest == pytest.approx(measured.ar_step - 4 * measured.block - measured.full_head)
    assert (measured.num_layers, measured.position, measured.check_vocab) == (4, 8, 16)
    assert measured.threads == torch.get_num_threads()
    with pytest.raises(ConfigError, match="position must be in 1.."):
        measure_step_costs(model, position=model.config.max_seq_len)


def test_script_measures_a_random_model(capsys):
    script = benchmark_script("decode_costs")
    assert script.main(["--repeats", "3", "--exit_counts", "1,1,1,1,1,5"]) == 0
    out = capsys.readouterr().out
    for piece in PIECES:
        assert re.search(rf"{piece}\s+-?\d+\.\d us", out), piece
    assert re.search(r"mean exit layer 4\.50\): estimated \d+ us/token, \d+\.\d\dx over AR", out)
    with pytest.raises(ConfigError, match="needs 6 non-negative counts"):
        script.main(["--repeats", "1", "--exit_counts", "1,2,3"])
    assert script.main(["--repeats", "3", "--target", "1.3"]) == 0
    shares = re.findall(r"l=(\d): +(\d+%|out of reach) with checks, +(\d+%|out of reach) if checks were free",
                        capsys.readouterr().out)
    assert [layer for layer, _, _ in shares] == ["1", "2", "3", "4", "5"]


def ssd_costs(batched: bool) -> SsdCosts:
    return SsdCosts(ar_step=10, draft_step=3, tail=2.5, verify_blocks=8, head_rows=2, head_row=1, batched_head=batched,
                    draft_layer=1, k=4, draft_vocab=None, position=8, repeats=1, threads=1)


def test_ssd_estimate_is_the_rounds_arithmetic():
    # every draft accepted: 5 tokens a round for 4 draft steps, the tail, verification and the head
    assert ssd_estimate(ssd_costs(batched=True), 1.0) == pytest.approx(50 / (12 + 2.5 + 8 + 2))
    assert ssd_estimate(ssd_costs(batched=False), 1.0) == pytest.approx(50 / (12 + 2.5 + 8 + 5 * 1))
    # none accepted: one token a round; row by row the head reads one row only
    assert ssd_estimate(ssd_costs(batched=False), 0.0) == pytest.approx(10 / (12 + 2.5 + 8 + 1))
    assert ssd_estimate(ssd_costs(batched=True), 0.5) == pytest.approx(30 / 24.5)
    for bad in (-0.1, 1.5, "0.7"):
        with pytest.raises(ConfigError, match="acceptance"):
            ssd_estimate(ssd_costs(True), bad)


def test_measured_ssd_costs_are_positive_and_share_the_common_pieces():
    model = tiny_model(num_kv_heads=2)
    measured = measure_ssd_costs(model, 2, (1, 3), draft_vocabs=(None, 10), position=20, repeats=3)
    assert set(measured) == {(1, None), (1, 10), (3, None), (3, 10)}
    for (k, vocab), c in measured.items():
        assert min(c.ar_step, c.draft_step, c.tail, c.verify_blocks, c.head_rows, c.head_row) > 0
        assert (c.k, c.draft_layer, c.draft_vocab, c.batched_head) == (k, 2, vocab, False)
        assert ssd_estimate(c, 1.0) > ssd_estimate(c, 0.0)
        assert c.ar_step == measured[1, None].ar_step and c.draft_step == measured[1, vocab].draft_step
    with pytest.raises(ConfigError, match="draft layer"):
        measure_ssd_costs(model, 4, (3,))
    with pytest.raises(ConfigError, match="context"):
        measure_ssd_costs(model, 2, (3,), position=62)
