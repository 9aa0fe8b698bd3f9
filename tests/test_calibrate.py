"""Calibration: exit scores, the Learn-then-Test choice, the record, calibrate_checkpoint and the CLI.

The statistics are tested in test_calibrate_stats.py, reading the file back in test_thresholds.py.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_model

from layerskip import calibration as cal
from layerskip.checkpoint import save_checkpoint
from layerskip.cli import main
from layerskip.config import GLOBAL_MEASURES, TokenizerConfig
from layerskip.decoding.dee import DynamicEarlyExit
from layerskip.errors import ConfigError
from layerskip.thresholds import load_thresholds, model_fingerprint

NUM_LAYERS = 4  # tiny_model's


def random_text(n: int, seed: int) -> np.ndarray:
    """Independent uniform tokens: calibration and held-out sets from one distribution."""
    return np.random.default_rng(seed).integers(0, 97, n)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def scores(model):
    return cal.exit_scores(model, random_text(12800, 1), "softmax", batch_size=50)


@pytest.fixture(scope="module")
def held_out(model):
    return cal.exit_scores(model, random_text(12800, 2), "softmax", batch_size=50)


# ----------------------------------------------------------------------------- scores and the policy


@pytest.mark.parametrize("measure", GLOBAL_MEASURES)
def test_exit_scores_for_every_measure(model, measure):
    s = cal.exit_scores(model, random_text(640, 3), measure, seq_len=32, batch_size=8)
    assert s.confidence.shape == (NUM_LAYERS - 1, 640) and s.agree.shape == (NUM_LAYERS - 1, 640)
    assert np.all((s.confidence >= 0) & (s.confidence <= 1))
    assert 0 < s.agree.mean() < 1  # the exits agree only partly: calibration has work to do
    out = cal.calibrate_scores(s, delta=0.3, epsilon=0.1)
    assert len(out.thresholds) == NUM_LAYERS - 1


@pytest.fixture(scope="module")
def counted_model():
    """A model whose token counts make a 20-token short head of scattered ids."""
    model = tiny_model(seed=0)
    model.set_token_counts(torch.from_numpy(np.random.default_rng(5).integers(0, 1000, 97)))
    return model


@pytest.mark.parametrize("measure", GLOBAL_MEASURES)
@pytest.mark.parametrize("exit_vocab", [None, 20])
def test_offline_policy_matches_dee_first_token(model, counted_model, measure, exit_vocab):
    """The calibrated policy is the one DEE runs: for a prompt, DEE's first token (exact
    context) exits where the teacher-forced scores say, with the same top-1 (also when
    early exits read the short head)."""
    if exit_vocab is not None:
        model = counted_model
    text = random_text(24 * 6, 4)
    s = cal.exit_scores(model, text, measure, seq_len=24, batch_size=6, exit_vocab=exit_vocab)
    assert s.exit_vocab == exit_vocab
    lam = float(np.median(s.confidence))
    thresholds = [lam, math.inf, lam]  # layer 2 never exits
    exits = cal.policy_exit_layers(s.confidence, thresholds)
    dee = DynamicEarlyExit(thresholds, measure=measure, exit_vocab=exit_vocab)
    seen = set()
    for w in range(6):
        prompt = [int(t) for t in text[w * 24 : (w + 1) * 24]]
        result = dee.generate(model, prompt, 1)
        last = w * 24 + 23
        assert result.token_info[0]["exit_layer"] == exits[last]
        heads = cal.head_evals(exits[last : last + 1], thresholds, measure)[0]
        stats = result.stats
        assert stats["head_evals_per_token"] + stats["short_head_evals_per_token"] == heads
        full = model(torch.tensor([prompt])).logits[0, -1].argmax()
        agrees = exits[last] == NUM_LAYERS or bool(s.agree[exits[last] - 1, last])
        assert (result.tokens[0] == int(full)) == agrees
        seen.add(int(exits[last]))
    assert 2 not in seen


# ----------------------------------------------------------------------------- the guarantee


def held_out_rejects(wrong: int, n: int, delta: float) -> bool:
    """Does the held-out set give strong evidence (p < 0.001) that the risk exceeds delta?"""
    return 1 - cal.binomial_cdf(wrong - 1, n, delta) < 1e-3


@pytest.mark.parametrize("method", cal.METHODS)
@pytest.mark.parametrize("delta", [0.05, 0.2])
def test_calibrated_thresholds_meet_the_bound_on_held_out_text(scores, held_out, method, delta):
    out = cal.calibrate_scores(scores, delta=delta, epsilon=0.05, method=method)
    assert out.chosen_index >= 0 and any(math.isfinite(t) for t in out.thresholds)
    assert out.test_risk <= delta and out.p_value <= 0.05
    wrong, exits = cal.policy_disagreements(held_out, out.thresholds)
    assert exits.mean() < NUM_LAYERS - 0.1, "thresholds too conservative to mean anything"
    assert not held_out_rejects(wrong, held_out.num_tokens, delta), (wrong / held_out.num_tokens, delta)
    # The check can fail: uncalibrated thresholds (the seed study's 0.0) are far off the bound.
    zero_wrong, _ = cal.policy_disagreements(held_out, [0.0] * (NUM_LAYERS - 1))
    assert held_out_rejects(zero_wrong, held_out.num_tokens, delta)


@pytest.mark.parametrize("method", cal.METHODS)
def test_thresholds_rise_as_delta_falls(scores, method):
    deltas = [0.4, 0.2, 0.1, 0.05, 0.02]
    runs = [cal.calibrate_scores(scores, delta=d, epsilon=0.05, method=method).thresholds for d in deltas]
    for looser, tighter in zip(runs, runs[1:]):
        assert all(b >= a for a, b in zip(looser, tighter)), (looser, tighter)
    assert any(b > a for a, b in zip(runs[0], runs[-1]))


def test_nothing_passes_means_the_full_model(scores):
    out = cal.calibrate_scores(scores, delta=1e-4, epsilon=0.01, method="global")
    assert out.chosen_index == -1 and all(t == math.inf for t in out.thresholds)
    assert out.test_disagreements == 0 and out.mean_exit_layer == NUM_LAYERS


def test_min_exit_layer_and_check_every_are_respected(scores):
    out = cal.calibrate_scores(scores, delta=0.3, min_exit_layer=2, check_every=2, method="global")
    assert out.thresholds[0] == math.inf and out.thresholds[2] == math.inf
    assert math.isfinite(out.thresholds[1])


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(delta=0.0), "delta"), (dict(epsilon=1.0), "epsilon"), (dict(method="best"), "method"),
     (dict(min_exit_layer=0), "min_exit_layer")],
)
def test_bad_calibration_settings(scores, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        cal.calibrate_scores(scores, **kwargs)


# ----------------------------------------------------------------------------- the file


def write_file(tmp_path, scores, model, delta=0.2):
    out = cal.calibrate_scores(scores, delta=delta)
    record = cal.thresholds_record(out, data={"split": "valid", "tokens": scores.num_tokens},
                                   model_info={"fingerprint": model_fingerprint(model), "num_layers": 4})
    return out, cal.write_json_atomic(tmp_path / "thresholds.json", record)


def test_record_states_the_policy_and_its_guarantee(scores, model):
    out = cal.calibrate_scores(scores, delta=0.3, min_exit_layer=2, check_every=2, method="global")
    record = cal.thresholds_record(out, data={"split": "valid"}, model_info={}, command="layerskip calibrate")
    assert record["thresholds"] == [None, out.thresholds[1], None]  # never-exit layers are null
    assert record["method"]["name"] == "global" and record["method"]["p_value"] == out.p_value
    assert record["risk"]["definition"] == cal.RISK_DEFINITION
    assert f"at most {0.3:g}" in record["guarantee"] and f"{out.test_tokens} held-out" in record["guarantee"]
    assert record["data"]["test_tokens"] == out.test_tokens and record["command"] == "layerskip calibrate"
    _, test = cal.split_scores(scores, 0.5, seed=0)
    _, exits = cal.policy_disagreements(test, out.thresholds)
    counts = record["risk"]["exit_layer_counts_teacher_forced"]
    assert counts == [int((exits == layer).sum()) for layer in range(1, NUM_LAYERS + 1)] and sum(counts[:-1]) > 0


def test_short_head_calibration_is_recorded_and_restored(tmp_path, counted_model):
    s = cal.exit_scores(counted_model, random_text(3200, 6), "softmax", batch_size=50, exit_vocab=20)
    out = cal.calibrate_scores(s, delta=0.2)
    assert out.exit_vocab == 20
    record = cal.thresholds_record(out, data={}, model_info={"fingerprint": model_fingerprint(counted_model)})
    path = cal.write_json_atomic(tmp_path / "short.json", record)
    assert json.loads(path.read_text())["exit_vocab"] == 20
    loaded = load_thresholds(path, NUM_LAYERS, fingerprint=model_fingerprint(counted_model))
    assert loaded.exit_vocab == 20 and loaded.strategy().exit_vocab == 20
    # the token counts choose the short head, so they are part of the model's fingerprint
    assert model_fingerprint(counted_model) != model_fingerprint(tiny_model(seed=0))


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_tokenizer):
    model = tiny_model(seed=1, vocab_size=tiny_tokenizer.vocab_size)
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    return save_checkpoint(path, model, tiny_tokenizer, tokenizer_config=TokenizerConfig(vocab_size=400))


def test_cli_calibrate_end_to_end(tmp_path, tiny_checkpoint, tiny_corpus_dir, capsys):
    out = tmp_path / "thresholds.json"
    rc = main(["calibrate", "--checkpoint", str(tiny_checkpoint), "--output", str(out), "--data-dir",
               str(tiny_corpus_dir), "--delta", "0.3", "--epsilon", "0.1", "--seq_len", "16",
               "--gen_prompts", "2", "--gen-tokens", "6", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip() == str(out)
    record = json.loads(out.read_text())
    assert record["data"]["split"] == "valid" and record["data"]["tokens"] > 0
    assert record["delta"] == 0.3 and record["epsilon"] == 0.1 and record["num_layers"] == NUM_LAYERS
    assert record["risk"]["generated_text"]["new_tokens"] == 12
    assert "--delta 0.3" in record["command"]
    from layerskip.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint)
    loaded = load_thresholds(out, NUM_LAYERS, "softmax", fingerprint=model_fingerprint(ckpt.model))
    assert len(loaded.thresholds) == NUM_LAYERS - 1
    # The file, measured afterwards on the test split.
    rc = main(["calibrate", "--checkpoint", str(tiny_checkpoint), "--evaluate", str(out), "--split", "test",
               "--data-dir", str(tiny_corpus_dir), "--seq_len", "16", "--gen_prompts", "0", "--device", "cpu"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["split"] == "test" and report["tokens"] > 0
    assert 0 <= report["teacher_forced_disagreement"] <= 1
    assert sum(report["exit_layer_counts"]) == report["tokens"]


def test_cli_calibrate_errors_are_one_line(tmp_path, tiny_checkpoint, tiny_corpus_dir, capsys):
    rc = main(["calibrate", "--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path / "t.json"),
               "--data-dir", str(tiny_corpus_dir), "--delta", "1.5"])
    assert rc == 2 and "delta must be in (0, 1)" in capsys.readouterr().err
    rc = main(["calibrate", "--checkpoint", str(tiny_checkpoint), "--data-dir", str(tiny_corpus_dir)])
    assert rc == 2 and "--output FILE" in capsys.readouterr().err
    rc = main(["calibrate", "--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path / "t.json"),
               "--data-dir", str(tiny_corpus_dir), "--split", "test"])
    assert rc == 2 and "reads only the validation split" in capsys.readouterr().err
    rc = main(["calibrate", "--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path / "t.json"),
               "--data-dir", str(tiny_corpus_dir), "--gen_prompts", "-1"])
    assert rc == 2 and "--gen_prompts must be >= 0, got -1" in capsys.readouterr().err


def test_cli_calibrate_records_the_layer_selection_and_refuses_an_unused_check_cost(tmp_path, tiny_checkpoint,
                                                                                   tiny_corpus_dir, capsys):
    out = tmp_path / "t.json"
    common = ["calibrate", "--checkpoint", str(tiny_checkpoint), "--data-dir", str(tiny_corpus_dir), "--delta", "0.3",
              "--seq_len", "16", "--gen_prompts", "0", "--device", "cpu", "--output", str(out)]
    assert main([*common, "--check_cost", "0.2"]) == 0, capsys.readouterr().err
    record = json.loads(out.read_text())
    selection = record["method"]["layer_selection"]
    assert selection["selection"] == "cost" and selection["costs_in_blocks"]["check"] == 0.2
    assert set(selection["selected_layers"]) <= set(selection["allowed_layers"]) == {1, 2, 3}
    unchecked = [layer for layer in selection["allowed_layers"] if layer not in selection["selected_layers"]]
    assert all(record["thresholds"][layer - 1] is None for layer in unchecked)
    assert "--select_layers cost --check_cost 0.2" in record["command"]
    assert "checked layers chosen by cost: " in capsys.readouterr().err
    assert main([*common, "--select_layers", "all"]) == 0
    assert json.loads(out.read_text())["method"]["layer_selection"] == {"selection": "all"}
    capsys.readouterr()
    assert main([*common, "--select_layers", "all", "--check_cost", "0.2"]) == 2
    assert "--check_cost" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the Python entry points

CLI_SETTINGS = dict(delta=0.3, epsilon=0.1, seq_len=16, gen_prompts=2, gen_tokens=6, device="cpu")


def test_calibrate_checkpoint_writes_what_the_cli_writes(tmp_path, tiny_checkpoint, tiny_corpus_dir, capsys):
    by_cli = tmp_path / "cli.json"
    assert main(["calibrate", "--checkpoint", str(tiny_checkpoint), "--output", str(by_cli), "--data-dir",
                 str(tiny_corpus_dir), "--delta", "0.3", "--epsilon", "0.1", "--seq_len", "16",
                 "--gen_prompts", "2", "--gen-tokens", "6", "--device", "cpu"]) == 0
    cli_record = json.loads(by_cli.read_text())
    capsys.readouterr()
    by_api = tmp_path / "api.json"
    policy = cal.calibrate_checkpoint(tiny_checkpoint, output=by_api, data_dir=tiny_corpus_dir,
                                      command=cli_record["command"], progress=False, **CLI_SETTINGS)
    assert "exit scores" not in capsys.readouterr().err  # progress=False: quiet
    assert by_api.read_text() == by_cli.read_text()  # byte for byte (the command is the CLI's)
    assert policy.path == by_api and policy.record == json.loads(by_api.read_text())
    assert policy.strategy().layer_thresholds(NUM_LAYERS) == policy.thresholds


def test_calibrate_checkpoint_takes_a_loaded_checkpoint_and_writes_nothing(tmp_path, tiny_checkpoint,
                                                                          tiny_corpus_dir, capsys):
    from layerskip.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint)
    policy = cal.calibrate_checkpoint(ckpt, data_dir=tiny_corpus_dir, **CLI_SETTINGS)
    assert policy.path is None and not list(tmp_path.iterdir())
    assert "calibrate: " in capsys.readouterr().err  # progress=True logs as the CLI does
    record = policy.record
    assert record["command"] is None and record["model"]["device"] == "cpu"
    assert record["model"]["fingerprint"] == model_fingerprint(ckpt.model)
    assert [None if math.isinf(t) else t for t in policy.thresholds] == record["thresholds"]
    # The returned policy is ready for DEE and for evaluate_thresholds.
    report = cal.evaluate_thresholds(ckpt, policy, split="test", data_dir=tiny_corpus_dir, seq_len=16,
                                     gen_prompts=0, progress=False)
    assert report["thresholds_file"] is None and report["split"] == "test" and report["generated_text"] == {}
    assert sum(report["exit_layer_counts"]) == report["tokens"] > 0
    with pytest.raises(ConfigError, match="another model"):
        other = dataclasses.replace(ckpt, model=tiny_model(seed=5, vocab_size=ckpt.model.config.vocab_size))
        cal.evaluate_thresholds(other, policy, data_dir=tiny_corpus_dir, progress=False)


def test_evaluate_thresholds_reports_what_the_cli_prints(tmp_path, tiny_checkpoint, tiny_corpus_dir, capsys):
    path = tmp_path / "t.json"
    cal.calibrate_checkpoint(tiny_checkpoint, output=path, data_dir=tiny_corpus_dir, progress=False, **CLI_SETTINGS)
    assert main(["calibrate", "--checkpoint", str(tiny_checkpoint), "--evaluate", str(path), "--split", "test",
                 "--data-dir", str(tiny_corpus_dir), "--seq_len", "16", "--gen_prompts", "1", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    report = cal.evaluate_thresholds(tiny_checkpoint, path, split="test", data_dir=tiny_corpus_dir, seq_len=16,
                                     gen_prompts=1, device="cpu", command=printed["command"], progress=False)
    assert report == printed


def test_entry_points_refuse_bad_settings(tiny_checkpoint, tiny_corpus_dir):
    with pytest.raises(ConfigError, match=r"^seq_len must be >= 1, got 0$"):
        cal.calibrate_checkpoint(tiny_checkpoint, data_dir=tiny_corpus_dir, seq_len=0)
    with pytest.raises(ConfigError, match="epsilon must be in"):
        cal.calibrate_checkpoint(tiny_checkpoint, data_dir=tiny_corpus_dir, epsilon=0.0)
    with pytest.raises(ConfigError, match="unknown calibration method 'best'"):
        cal.calibrate_checkpoint("no/such/checkpoint", method="best")  # refused before anything is loaded
    with pytest.raises(ConfigError, match="split must be valid or test"):
        cal.evaluate_thresholds(tiny_checkpoint, "t.json", split="train")


def test_dee_args_build_the_strategy(tmp_path, scores, model):
    import argparse

    from layerskip.cli.dee_args import add_dee_arguments, build_dee

    parser = argparse.ArgumentParser()
    add_dee_arguments(parser)
    dee = build_dee(parser.parse_args(["--conf", "0.7", "--measure", "margin", "--min-exit-layer", "2"]), model)
    assert (dee.thresholds, dee.measure, dee.min_exit_layer, dee.check_every) == (0.7, "margin", 2, 1)
    assert build_dee(parser.parse_args([]), model).thresholds == 0.9
    out, path = write_file(tmp_path, scores, model)
    dee = build_dee(parser.parse_args(["--lam_file", str(path)]), model)
    assert dee.layer_thresholds(NUM_LAYERS) == out.thresholds
    with pytest.raises(ConfigError, match="not both"):
        build_dee(parser.parse_args(["--conf", "0.5", "--thresholds", str(path)]), model)
    with pytest.raises(ConfigError, match="measure"):
        build_dee(parser.parse_args(["--thresholds", str(path), "--measure", "saturation"]), model)
    with pytest.raises(ConfigError, match="another model"):
        build_dee(parser.parse_args(["--thresholds", str(path)]), tiny_model(seed=5))
