"""layerskip.costs and benchmarks/decode_costs.py: the DEE cost model's arithmetic, and real timings."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from layerskip.costs import PIECES, StepCosts, dee_estimate, measure_step_costs
from layerskip.errors import ConfigError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_costs.py"


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
    spec = importlib.util.spec_from_file_location("decode_costs", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--repeats", "3", "--exit_counts", "1,1,1,1,1,5"]) == 0
    out = capsys.readouterr().out
    for piece in PIECES:
        assert re.search(rf"{piece}\s+-?\d+\.\d us", out), piece
    assert re.search(r"mean exit layer 4\.50\): estimated \d+ us/token, \d+\.\d\dx over AR", out)
    with pytest.raises(ConfigError, match="needs 6 non-negative counts"):
        script.main(["--repeats", "1", "--exit_counts", "1,2,3"])
