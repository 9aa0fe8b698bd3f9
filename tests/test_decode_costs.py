"""benchmarks/decode_costs.py: the DEE cost model's arithmetic, and the script end to end."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from layerskip.errors import ConfigError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_costs.py"


@pytest.fixture(scope="module")
def decode_costs():
    spec = importlib.util.spec_from_file_location("decode_costs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COSTS = {"block": 100.0, "check": 10.0, "full_head": 50.0, "propagate": 5.0, "rest": 20.0}


def test_dee_estimate_charges_blocks_checks_head_and_propagation(decode_costs):
    # every token runs all 3 layers: 3 blocks, the head, checks at layers 1 and 2
    assert decode_costs.dee_estimate(COSTS, [0, 0, 4]) == (20 + 300 + 50 + 20, 20 + 300 + 50, 3.0)
    # every token exits after block 1: 1 block, 1 check, propagation, no full head
    assert decode_costs.dee_estimate(COSTS, [2, 0, 0]) == (20 + 100 + 5 + 10, 20 + 100 + 5, 1.0)
    mixed = decode_costs.dee_estimate(COSTS, [1, 1, 2])
    assert mixed[0] == pytest.approx((135 + (20 + 200 + 5 + 20) + 2 * 390) / 4)
    assert mixed[2] == pytest.approx(2.25)


def test_script_measures_a_random_model(decode_costs, capsys):
    assert decode_costs.main(["--repeats", "3", "--exit_counts", "1,1,1,1,1,5"]) == 0
    out = capsys.readouterr().out
    for piece in ("ar_step", "block", "full_head", "check", "propagate", "rest"):
        assert re.search(rf"{piece}\s+-?\d+\.\d us", out), piece
    assert re.search(r"mean exit layer 4\.50\): estimated \d+ us/token, \d+\.\d\dx over AR", out)


def test_script_refuses_a_histogram_of_the_wrong_length(decode_costs):
    with pytest.raises(ConfigError, match="needs 6 non-negative counts"):
        decode_costs.main(["--repeats", "1", "--exit_counts", "1,2,3"])
