"""layerskip.thresholds: reading thresholds.json back, and refusing files that do not fit the model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import tiny_model

from layerskip.calibration import calibrate_scores, exit_scores, thresholds_record, write_json_atomic
from layerskip.errors import ConfigError
from layerskip.thresholds import load_thresholds, model_fingerprint, thresholds_from_record

NUM_LAYERS = 4  # tiny_model's


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def calibrated(model, tmp_path_factory):
    """(Calibration, path) of a thresholds file as `layerskip calibrate` writes it."""
    scores = exit_scores(model, np.random.default_rng(1).integers(0, 97, 3200), "softmax", batch_size=50)
    out = calibrate_scores(scores, delta=0.2)
    record = thresholds_record(out, data={"split": "valid", "tokens": scores.num_tokens},
                               model_info={"fingerprint": model_fingerprint(model), "num_layers": 4})
    return out, write_json_atomic(tmp_path_factory.mktemp("thresholds") / "thresholds.json", record)


def test_thresholds_file_round_trip(tmp_path, calibrated, model):
    out, path = calibrated
    record = json.loads(path.read_text())
    for key in ("thresholds", "measure", "delta", "epsilon", "data", "risk", "model", "method", "guarantee"):
        assert key in record
    assert record["data"]["split"] == "valid" and record["risk"]["test_tokens"] == out.test_tokens
    loaded = load_thresholds(path, NUM_LAYERS, "softmax", fingerprint=model_fingerprint(model))
    assert loaded.thresholds == out.thresholds and list(loaded) == out.thresholds
    assert loaded.delta == 0.2 and loaded.measure == "softmax" and loaded.record == record and loaded.path == path
    dee = loaded.strategy()
    assert dee.layer_thresholds(NUM_LAYERS) == out.thresholds and dee.exit_vocab is None
    # min_exit_layer / check_every in the file are part of the policy: unchecked layers read as inf.
    (tmp_path / "m.json").write_text(json.dumps(edit(record, thresholds=[0.5, 0.5, 0.5], min_exit_layer=2)))
    assert load_thresholds(tmp_path / "m.json", NUM_LAYERS).thresholds == [math.inf, 0.5, 0.5]


def test_a_record_never_written_reads_like_its_file(calibrated):
    _, path = calibrated
    record = json.loads(path.read_text())
    in_memory = thresholds_from_record(record, NUM_LAYERS)
    assert in_memory.path is None and in_memory.thresholds == load_thresholds(path, NUM_LAYERS).thresholds
    with pytest.raises(ConfigError, match=r"^thresholds: was made for a 4-layer model"):
        thresholds_from_record(record, 6)


def edit(record, **changes):
    record = json.loads(json.dumps(record))
    for key, value in changes.items():
        if value is KeyError:
            record.pop(key)
        else:
            record[key] = value
    return record


BAD_FILES = {
    "wrong number of layers": (lambda r: edit(r, num_layers=6), "6-layer model"),
    "wrong number of thresholds": (lambda r: edit(r, thresholds=[0.5, 0.5]), "list of 3"),
    "NaN": (lambda r: edit(r, thresholds=[0.5, float("nan"), 0.5]), "nan"),
    "above the range": (lambda r: edit(r, thresholds=[0.5, 1.5, 0.5]), "outside"),
    "below the range": (lambda r: edit(r, thresholds=[-0.1, 0.5, 0.5]), "outside"),
    "not a number": (lambda r: edit(r, thresholds=[0.5, "high", 0.5]), "must be a number"),
    "wrong measure": (lambda r: edit(r, measure="margin"), "calibrated for the 'margin' measure"),
    "unknown measure": (lambda r: edit(r, measure="entropy"), "unknown measure"),
    "missing thresholds": (lambda r: edit(r, thresholds=KeyError), "missing thresholds"),
    "not an object": (lambda r: [0.5, 0.5, 0.5], "JSON object"),
    "other format": (lambda r: edit(r, format="layerskip-bench"), "format"),
    "bad delta": (lambda r: edit(r, delta=2.0), "delta"),
    "bad check_every": (lambda r: edit(r, check_every=0), "check_every"),
    "bad exit_vocab": (lambda r: edit(r, exit_vocab=1), "exit_vocab"),
    "another model": (lambda r: edit(r, model={"fingerprint": "0123456789abcdef"}), "another model"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_malformed_or_mismatched_thresholds_file_is_refused(tmp_path, calibrated, model, case):
    _, path = calibrated
    make, match = BAD_FILES[case]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(make(json.loads(path.read_text()))))  # json writes NaN as NaN
    with pytest.raises(ConfigError, match=match):
        load_thresholds(bad, NUM_LAYERS, "softmax", fingerprint=model_fingerprint(model))


def test_unreadable_thresholds_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_thresholds(tmp_path / "missing.json", NUM_LAYERS)
    (tmp_path / "t.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_thresholds(tmp_path / "t.json", NUM_LAYERS)
