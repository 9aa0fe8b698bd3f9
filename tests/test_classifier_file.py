"""The classifier measure end to end: calibrate on the tiny corpus, the file, its refusals, generate and bench."""

from __future__ import annotations

import base64
import json

import pytest
import torch
from conftest import tiny_model

import layerskip
from layerskip import calibration as cal
from layerskip.bench.settings import BenchSettings, calibrated_config
from layerskip.checkpoint import load_checkpoint, save_checkpoint
from layerskip.cli import main
from layerskip.cli.calibrate import CLASSIFIER_DEFAULTS
from layerskip.config import TokenizerConfig
from layerskip.errors import ConfigError
from layerskip.thresholds import load_thresholds, model_fingerprint, thresholds_for

NUM_LAYERS = 4
SETTINGS = dict(delta=0.3, epsilon=0.1, seq_len=16, gen_prompts=2, gen_tokens=6, device="cpu")
PROMPT = " = Valkyria Chronicles = \n The game began"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer):
    model = tiny_model(seed=1, vocab_size=tiny_tokenizer.vocab_size)
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    return save_checkpoint(path, model, tiny_tokenizer, tokenizer_config=TokenizerConfig(vocab_size=400))


@pytest.fixture(scope="module")
def calibrated(checkpoint, tiny_corpus_dir, tmp_path_factory):
    """(policy, path): `calibrate --measure classifier` on the tiny corpus's validation split."""
    path = tmp_path_factory.mktemp("clf") / "thresholds.json"
    policy = cal.calibrate_checkpoint(checkpoint, output=path, data_dir=tiny_corpus_dir, measure="classifier",
                                      classifier_vocab=64, progress=False, **SETTINGS)
    return policy, path


def test_learn_then_test_runs_with_the_classifier(calibrated, checkpoint):
    policy, path = calibrated
    record = json.loads(path.read_text())
    assert record["measure"] == "classifier" and record["classifier"]["vocab"] == 64
    assert sorted(record["classifier"]["layers"]) == ["1", "2", "3"] and record["classifier"]["hidden"] == 32
    assert record["classifier"]["fit"]["learn_tokens"] == record["data"]["learn_tokens"]
    assert "exit classifier (fit on the learn half only)" in record["guarantee"]
    assert record["risk"]["test_disagreement"] <= 0.3 and record["method"]["members_tested"] >= 1
    assert record["risk"]["generated_text"]["new_tokens"] == 12
    # the file reads back to the same classifier, tensor for tensor
    model = load_checkpoint(checkpoint).model
    loaded = load_thresholds(path, NUM_LAYERS, "classifier", fingerprint=model_fingerprint(model))
    assert loaded.classifier.to_record() == policy.classifier.to_record() and loaded.thresholds == policy.thresholds
    for layer, net in policy.classifier.layers.items():
        assert all(torch.equal(a, b) for pair in zip(net, loaded.classifier.layers[layer]) for a, b in zip(*pair))
    assert loaded.strategy().classifier is loaded.classifier


def test_generate_and_evaluate_with_the_file(calibrated, checkpoint, tiny_corpus_dir):
    policy, path = calibrated
    ckpt = load_checkpoint(checkpoint)
    from_file = layerskip.generate(ckpt, PROMPT, max_new_tokens=8, mode="dee", thresholds=path)
    from_policy = layerskip.generate(ckpt, PROMPT, max_new_tokens=8, mode="dee", thresholds=policy)
    assert from_file.tokens == from_policy.tokens and from_file.stats["measure"] == "classifier"
    report = cal.evaluate_thresholds(ckpt, path, split="test", data_dir=tiny_corpus_dir, seq_len=16, gen_prompts=0,
                                     progress=False)
    assert report["measure"] == "classifier" and sum(report["exit_layer_counts"]) == report["tokens"] > 0
    with pytest.raises(ConfigError, match="only a calibration fits"):
        layerskip.generate(ckpt, PROMPT, max_new_tokens=2, mode="dee", measure="classifier", conf=0.5)
    with pytest.raises(ConfigError, match="calibrated for the 'classifier' measure, not 'softmax'"):
        layerskip.generate(ckpt, PROMPT, max_new_tokens=2, mode="dee", measure="softmax", thresholds=path)


def test_bench_reads_the_file_and_refuses_a_classifier_sweep(calibrated, checkpoint):
    _, path = calibrated
    model = load_checkpoint(checkpoint).model
    config = calibrated_config(path, NUM_LAYERS, model_fingerprint(model))
    dee = config.make()
    assert dee.classifier is not None and config.options["measure"] == "classifier"
    with pytest.raises(ConfigError, match="--thresholds FILE"):
        BenchSettings(dee_measures=("softmax", "classifier"))


def test_cli_calibrate_generate_and_flags(calibrated, checkpoint, tiny_corpus_dir, tmp_path, capsys):
    out = tmp_path / "clf.json"
    base = ["calibrate", "--checkpoint", str(checkpoint), "--data-dir", str(tiny_corpus_dir), "--seq_len", "16",
            "--delta", "0.3", "--epsilon", "0.1", "--gen_prompts", "0", "--device", "cpu"]
    assert main([*base, "--output", str(out), "--measure", "classifier", "--classifier_vocab", "64",
                 "--classifier_hidden", "3"]) == 0, capsys.readouterr().err
    record = json.loads(out.read_text())
    assert record["classifier"]["hidden"] == 3 and "--classifier_hidden 3" in record["command"]
    assert "--classifier_vocab 64" in record["command"]
    capsys.readouterr()
    assert main([*base, "--output", str(tmp_path / "x.json"), "--classifier_hidden", "3"]) == 2
    assert "only apply when calibrating with --measure classifier" in capsys.readouterr().err
    assert main([*base, "--output", str(tmp_path / "x.json"), "--measure", "classifier",
                 "--classifier_vocab", "1"]) == 2
    assert "classifier_vocab must be an integer >= 2" in capsys.readouterr().err
    gen = ["generate", "--checkpoint", str(checkpoint), "--prompt", PROMPT, "--max_length", "6", "--mode", "dee"]
    assert main([*gen, "--thresholds", str(out)]) == 0
    capsys.readouterr()
    assert main([*gen, "--measure", "classifier"]) == 2
    err = capsys.readouterr().err
    assert "--thresholds FILE" in err and len(err.strip().splitlines()) == 1
    assert main([*gen, "--measure", "classifier", "--conf", "0.5"]) == 2
    assert "a global --conf cannot use this measure" in capsys.readouterr().err


def test_cli_defaults_are_the_modules():
    from layerskip.calibration.classifier import DEFAULT_HIDDEN, FIT_TOKENS
    from layerskip.decoding.measures import CLASSIFIER_VOCAB

    assert CLASSIFIER_DEFAULTS == {"classifier_vocab": CLASSIFIER_VOCAB, "classifier_hidden": DEFAULT_HIDDEN,
                                   "classifier_fit_tokens": FIT_TOKENS}


# ----------------------------------------------------------------------------- refused files


def edit(record, change):
    record = json.loads(json.dumps(record))
    record["thresholds"] = [0.5, 0.5, 0.5]  # every layer checked, so every layer needs its weights
    change(record)
    return record


def tensor(values) -> dict:
    t = torch.tensor(values, dtype=torch.float32)
    return {"shape": list(t.shape), "float32_base64": base64.b64encode(t.numpy().tobytes()).decode()}


def first_linear(record) -> dict:
    return record["classifier"]["layers"]["1"][0]


BAD_FILES = {
    "no weights": (lambda r: r.pop("classifier"), "no classifier weights"),
    "no fingerprint": (lambda r: r["model"].pop("fingerprint"), "no model fingerprint"),
    "another model": (lambda r: r["model"].update(fingerprint="0123456789abcdef"), "another model"),
    "weights on softmax": (lambda r: r.update(measure="softmax"), "its measure is 'softmax'"),
    "missing layer": (lambda r: r["classifier"]["layers"].pop("2"), r"no weights for layer\(s\) \[2\]"),
    "layer out of range": (lambda r: r["classifier"]["layers"].update({"4": r["classifier"]["layers"]["1"]}),
                           "not an exit layer"),
    "bias shape": (lambda r: first_linear(r).update(bias=tensor([0.0, 1.0])), "do not form a linear layer"),
    "two outputs": (lambda r: r["classifier"]["layers"]["1"][-1].update(weight=tensor([[0.0] * 32] * 2),
                                                                        bias=tensor([0.0, 0.0])),
                    "must have one output"),
    "layers do not chain": (lambda r: first_linear(r).update(weight=tensor([[0.0] * 34] * 5), bias=tensor([0.0] * 5)),
                            "reads 32 inputs, the layer before gives 5"),
    "truncated": (lambda r: first_linear(r)["weight"].update(shape=[1, 35]), "do not hold a float32 tensor"),
    "not base64": (lambda r: first_linear(r)["weight"].update(float32_base64="***"), "not base64"),
    "NaN": (lambda r: first_linear(r).update(bias=tensor([float("nan")])), "NaN"),
    "bad vocab": (lambda r: r["classifier"].update(vocab=1), "vocab"),
    "no layers": (lambda r: r.update(classifier={"vocab": 64}), "must be an object"),
    "too deep": (lambda r: r["classifier"]["layers"].update({"1": r["classifier"]["layers"]["1"] * 3}),
                 "list of 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_classifier_files_are_refused(calibrated, checkpoint, tmp_path, case):
    _, path = calibrated
    change, match = BAD_FILES[case]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(edit(json.loads(path.read_text()), change)))
    model = load_checkpoint(checkpoint).model
    with pytest.raises(ConfigError, match=match):
        thresholds_for(model, bad)


def test_a_classifier_for_another_width_is_refused(calibrated, checkpoint, tmp_path):
    _, path = calibrated
    record = json.loads(path.read_text())
    for net in record["classifier"]["layers"].values():
        net[0]["weight"] = tensor([[0.1] * 20] * 32)  # 32 hidden units, as the file's MLP has
    bad = tmp_path / "narrow.json"
    bad.write_text(json.dumps(record))
    model = load_checkpoint(checkpoint).model
    with pytest.raises(ConfigError, match=r"narrow.json: the exit classifier reads 20 features"):
        thresholds_for(model, bad)
