"""The training loop on a tiny corpus: learning, exact resume, compile == eager, refusals, NaN stop."""

from __future__ import annotations

import json

import pytest
import torch
from torch._dynamo.utils import counters

from layerskip.checkpoint import load_checkpoint, load_trainer_state
from layerskip.cli import main
from layerskip.data import load_corpus
from layerskip.errors import ConfigError
from layerskip.losses import lr_at
from layerskip.training import TrainConfig, TrainingDiverged, resume_config, step_plan, train

TINY = dict(d_model=32, num_layers=4, num_heads=4, d_ff=64, dropout=0.1, vocab_size=400, seq_len=32,
            batch_size=8, warmup=3, lr=3e-3, precision="fp32", compile=False, eval_batch_size=8, loss_chunk=64)


def tiny_cfg(**overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, **overrides})


@pytest.fixture(scope="module")
def corpus(tiny_corpus_dir, tmp_path_factory):
    import os

    old = os.environ.get("LAYERSKIP_CACHE_DIR")
    os.environ["LAYERSKIP_CACHE_DIR"] = str(tmp_path_factory.mktemp("train-cache"))
    try:
        return load_corpus(tiny_corpus_dir, tiny_cfg().tokenizer_config())
    finally:
        if old is None:
            del os.environ["LAYERSKIP_CACHE_DIR"]
        else:
            os.environ["LAYERSKIP_CACHE_DIR"] = old


def weights(run_dir, which="last"):
    return load_checkpoint(run_dir / which).model.state_dict()


def last_exit_losses(run_dir) -> list[float]:
    """The last layer's cross-entropy per step (the objective adds the early exits' distillation terms)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["exit_losses"][-1] for r in records if r["type"] == "train"]


# ----------------------------------------------------------------------------- learning, resume


def test_tiny_model_loss_decreases_and_run_dir_is_complete(tmp_path, corpus):
    result = train(tiny_cfg(max_steps=40, val_every=20), tmp_path / "run", corpus=corpus, progress=False)
    assert result.step == 40 and result.stopped == "max_steps"
    last_exit = last_exit_losses(tmp_path / "run")
    first, last = last_exit[0], sum(last_exit[-5:]) / 5
    assert first > 5.5 and last < first - 1.0, (first, last)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result.losses == [r["loss"] for r in records if r["type"] == "train"]
    vals = [r for r in records if r["type"] == "val"]
    assert [v["step"] for v in vals] == [20, 40] and len(vals[0]["layers"]) == 4
    assert vals[1]["layers"][-1]["loss"] < vals[0]["layers"][-1]["loss"]
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, 41))
    best = load_checkpoint(tmp_path / "run")  # a run directory means its best checkpoint
    assert best.path.name == "best" and best.meta["val_loss"] == pytest.approx(vals[1]["layers"][-1]["loss"])
    assert best.train_config["max_steps"] == 40
    assert load_trainer_state(tmp_path / "run" / "last")["step"] == 40


@pytest.mark.parametrize("curriculum,ramp,tokens", [("rotational", "exp", 1.0), ("gradual", "constant", 0.3)])
def test_resume_after_stopping_gives_the_same_losses(tmp_path, corpus, curriculum, ramp, tokens):
    cfg = tiny_cfg(max_steps=12, max_skip_prob=0.5, early_exit_curriculum=curriculum, layer_dropout_ramp=ramp,
                   early_exit_rotation=3, val_every=4, save_every=3, early_exit_tokens=tokens)
    whole = train(cfg, tmp_path / "whole", corpus=corpus, progress=False)
    first = train(cfg, tmp_path / "split", corpus=corpus, progress=False, stop_at_step=7)
    assert first.stopped == "stop_at_step" and first.step == 7
    state = load_trainer_state(tmp_path / "split" / "last")
    assert state["step"] == 7 and state["total_steps"] == 12
    assert state["curriculum"]["next_exits"] == step_plan(cfg, 7, 12)[0]
    second = train(resume_config(tmp_path / "split"), tmp_path / "split", corpus=corpus, progress=False, resume=True)
    assert first.losses + second.losses == whole.losses  # exactly, step for step
    for name, w in weights(tmp_path / "whole").items():
        assert torch.equal(w, weights(tmp_path / "split")[name]), name
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    exits = [json.loads(x)["exits"] for x in lines if json.loads(x)["type"] == "train"]
    assert exits == [step_plan(cfg, s, 12)[0] for s in range(12)]


def test_muon_run_learns_and_resumes_exactly(tmp_path, corpus):
    cfg = tiny_cfg(max_steps=10, optimizer="muon", val_every=5, save_every=3)
    whole = train(cfg, tmp_path / "whole", corpus=corpus, progress=False)
    last_exit = last_exit_losses(tmp_path / "whole")
    assert sum(last_exit[-3:]) / 3 < last_exit[0] - 0.2  # it learns
    first = train(cfg, tmp_path / "split", corpus=corpus, progress=False, stop_at_step=4)
    second = train(resume_config(tmp_path / "split"), tmp_path / "split", corpus=corpus, progress=False, resume=True)
    assert first.losses + second.losses == whole.losses
    saved = load_trainer_state(tmp_path / "split" / "last")["optimizer"]
    assert set(saved) == {"adamw", "muon"} and saved["muon"]["state"]  # Muon's momentum buffers were saved
    with pytest.raises(ConfigError, match="optimizer"):  # the optimizer is part of what a run is
        resume_config(tmp_path / "split", {"optimizer": "adamw"})


def test_a_run_saved_before_the_optimizer_setting_resumes_with_adamw(tmp_path, corpus):
    cfg = tiny_cfg(max_steps=6, optimizer="adamw", save_every=2, val_every=100)
    whole = train(cfg, tmp_path / "whole", corpus=corpus, progress=False)
    first = train(cfg, tmp_path / "old", corpus=corpus, progress=False, stop_at_step=3)
    config_file = tmp_path / "old" / "last" / "config.json"
    saved = json.loads(config_file.read_text())
    del saved["train"]["optimizer"]  # as written before the setting existed (AdamW was all there was)
    config_file.write_text(json.dumps(saved))
    resumed_cfg = resume_config(tmp_path / "old")
    assert resumed_cfg.optimizer == "adamw"
    second = train(resumed_cfg, tmp_path / "old", corpus=corpus, progress=False, resume=True)
    assert first.losses + second.losses == whole.losses


def test_compiled_blocks_match_eager_while_the_exit_set_changes(tmp_path, corpus):
    cfg = tiny_cfg(max_steps=4, dropout=0.0, max_skip_prob=0.0, early_exit_rotation=2, val_every=100)
    eager = train(cfg, tmp_path / "eager", corpus=corpus, progress=False)
    counters.clear()
    compiled = train(cfg.replace(compile=True), tmp_path / "compiled", corpus=corpus, progress=False)
    assert not counters["graph_break"], dict(counters["graph_break"])  # each block is one whole graph
    assert [step_plan(cfg, s, 4)[0] for s in range(4)] == [[1, 3, 4], [2, 4], [1, 3, 4], [2, 4]]
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(eager.losses), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled.val.final.loss, eager.val.final.loss, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_trains(tmp_path, corpus):
    result = train(tiny_cfg(max_steps=6, precision="bf16"), tmp_path / "run", corpus=corpus, progress=False)
    fp32 = train(tiny_cfg(max_steps=6), tmp_path / "run32", corpus=corpus, progress=False)
    assert all(abs(a - b) < 0.05 for a, b in zip(result.losses, fp32.losses))


def test_time_budget_stops_the_run(tmp_path, corpus):
    result = train(tiny_cfg(time_budget=0.05, epochs=1000), tmp_path / "run", corpus=corpus, progress=False)
    assert result.stopped == "time_budget" and 13 <= result.step < 1000 * 56
    assert (tmp_path / "run" / "best").is_dir()


def test_time_budget_schedule_follows_a_slowing_pace(tmp_path, corpus, monkeypatch):
    """Steps slow down 4x after the first timing: the cosine decay must still reach (nearly) its end
    when the budget runs out, not stop where the first steps' pace predicted."""
    import time

    from layerskip.training import loop, pacing

    monkeypatch.setattr(pacing, "PACE_STEPS", 5)
    original = loop.Trainer.train_step

    def slowing(self, step):
        time.sleep(0.01 if step < 20 else 0.04)
        return original(self, step)

    monkeypatch.setattr(loop.Trainer, "train_step", slowing)
    cfg = tiny_cfg(time_budget=0.06, epochs=1000, min_lr_ratio=0.0)
    result = train(cfg, tmp_path / "run", corpus=corpus, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last_lr = [r["lr"] for r in rows if r["type"] == "train"][-1]
    assert result.stopped == "time_budget" and result.step > 25  # well past the slow-down at step 20
    assert last_lr < 0.1 * cfg.lr, f"the schedule ended at lr {last_lr:.2e} of {cfg.lr:.0e}: it was cut short"


# ----------------------------------------------------------------------------- refusals, failures


def test_existing_run_needs_resume_or_overwrite(tmp_path, corpus):
    out = tmp_path / "run"
    train(tiny_cfg(max_steps=2), out, corpus=corpus, progress=False)
    before = (out / "last" / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="--resume .* or --overwrite"):
        train(tiny_cfg(max_steps=2), out, corpus=corpus, progress=False)
    assert (out / "last" / "model.safetensors").read_bytes() == before
    with pytest.raises(ConfigError, match="contradict"):
        train(tiny_cfg(max_steps=2), out, corpus=corpus, progress=False, resume=True, overwrite=True)
    with pytest.raises(ConfigError, match="differ"):
        resume_config(out, {"d_model": 64})
    assert resume_config(out, {"max_steps": 3}).max_steps == 3
    result = train(tiny_cfg(max_steps=3), out, corpus=corpus, progress=False, resume=True)
    assert result.step == 3 and len(result.losses) == 1
    result = train(tiny_cfg(max_steps=1), out, corpus=corpus, progress=False, overwrite=True)
    assert result.step == 1
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        train(tiny_cfg(max_steps=1), tmp_path / "file", corpus=corpus, progress=False)
    with pytest.raises(ConfigError, match="no resumable run"):
        train(tiny_cfg(max_steps=1), tmp_path / "new", corpus=corpus, progress=False, resume=True)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, corpus, monkeypatch):
    from layerskip.training import step as step_module

    real = step_module.exit_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, per_exit = real(*args, **kwargs)
        return (loss * float("nan"), per_exit) if calls["n"] > 4 else (loss, per_exit)

    monkeypatch.setattr(step_module, "exit_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="step 5: the loss became nan.*last good checkpoint"):
        # every token in every exit's loss: one exit_loss call per step
        train(tiny_cfg(max_steps=10, save_every=2, early_exit_tokens=1.0), out, corpus=corpus, progress=False)
    assert load_trainer_state(out / "last")["step"] == 4
    for w in weights(out).values():
        assert torch.isfinite(w).all()


def test_cli_train_then_eval_seed_form(tmp_path, tiny_corpus_dir, capsys):
    out = tmp_path / "run"
    args = ["train", "--train", "--eval", "--out", str(out), "--data-dir", str(tiny_corpus_dir), "--quiet",
            "--d_model", "32", "--num-layers", "2", "--num_heads", "4", "--d-ff", "64", "--vocab_size", "400",
            "--seq_len", "32", "--batch_size", "8", "--max_steps", "3", "--max_skip_prob", "0.2",
            "--precision", "fp32", "--no-compile", "--early_exit_curriculum", "none"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "word ppl" in printed and "trained 3 steps" in printed
    report = json.loads((out / "eval_test.json").read_text())
    assert report["split"] == "test" and [r["layer"] for r in report["layers"]] == [1, 2]
    assert main(args) == 2  # the run exists: refused
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "--max_steps", "4", "--quiet",
                 "--data-dir", str(tiny_corpus_dir)]) == 0
    assert load_trainer_state(out / "last")["step"] == 4
    assert main(["train", "--out", str(out), "--resume", "--d_model", "64", "--data-dir", str(tiny_corpus_dir)]) == 2


# ----------------------------------------------------------------------------- kills, processes

KILLER = '''
import os, signal, sys
import layerskip.checkpoint as ck
import layerskip.training.loop as tr

mode, at, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if mode == "step":  # in the middle of training, nothing being written
    real_step = tr.Trainer.train_step
    tr.Trainer.train_step = lambda self, s: die() if s == at else real_step(self, s)
elif mode == "write":  # while the at-th checkpoint's weights are half written
    real_save, n = ck.save_file, [0]
    def save_file(state, path):
        n[0] += 1
        if n[0] == at:
            open(path, "wb").write(b"\\x00" * 100)
            die()
        real_save(state, path)
    ck.save_file = save_file
elif mode == "swap":  # between the two renames that put the at-th last/ checkpoint in place
    real_replace, n = os.replace, [0]
    def replace(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(".last.old"):
            n[0] += 1
            if n[0] == at:
                die()
    ck.os.replace = replace
from layerskip.cli import main
sys.exit(main(argv))
'''

CLI_TINY = ["--d_model", "32", "--num_layers", "2", "--num_heads", "4", "--d_ff", "64", "--vocab_size", "400",
            "--seq_len", "32", "--batch_size", "8", "--precision", "fp32", "--no-compile", "--quiet",
            "--lr", "3e-3", "--warmup", "2", "--early_exit_rotation", "2"]


def test_sigkill_anywhere_then_resume_reaches_the_same_weights(tmp_path, tiny_corpus_dir):
    """Killed while writing weights, between a checkpoint's two renames, and mid-training."""
    import signal
    import subprocess
    import sys

    args = CLI_TINY + ["--data-dir", str(tiny_corpus_dir), "--max_steps", "8", "--save_every", "2",
                       "--val_every", "4", "--max_skip_prob", "0.3"]
    assert main(["train", "--out", str(tmp_path / "whole")] + args) == 0
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    killed = tmp_path / "killed"
    resume = ["train", "--out", str(killed), "--resume", "--data-dir", str(tiny_corpus_dir), "--quiet"]
    # (how to die, when, command line, the step last/ must hold afterwards)
    plan = [("write", 2, ["train", "--out", str(killed)] + args, 2),  # the best/ write at step 4
            ("swap", 1, resume, 2),  # last/ of step 4 half swapped: step 2's comes back
            ("step", 5, resume, 4)]  # killed in step 6, last/ from step 4
    for mode, at, argv, expected_step in plan:
        run = subprocess.run([sys.executable, str(script), mode, str(at)] + argv, capture_output=True, text=True)
        assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
        assert load_trainer_state(killed / "last")["step"] == expected_step, mode
    run = subprocess.run([sys.executable, "-m", "layerskip"] + resume, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert load_trainer_state(killed / "last")["step"] == 8
    for name, w in weights(tmp_path / "whole").items():
        assert torch.equal(w, weights(killed)[name]), name
    assert not list(killed.glob(".*"))  # no temporary or stale checkpoint left behind


def test_torchrun_two_processes_match_one_process(tmp_path, tiny_corpus_dir):
    import subprocess
    import sys

    # AdamW: Muon's orthogonalisation amplifies the sum-order differences below (1.5e-4 in the
    # weights after 4 steps), while DDP's part, the all-reduced gradients, is the same for both.
    args = CLI_TINY + ["--data-dir", str(tiny_corpus_dir), "--max_steps", "4", "--dropout", "0",
                       "--max_skip_prob", "0.5", "--early_exit_tokens", "0.5", "--val_every", "4", "--optimizer", "adamw"]
    assert main(["train", "--out", str(tmp_path / "one")] + args) == 0
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "layerskip", "train", "--out", str(tmp_path / "two")] + args,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    def losses(out):
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in lines if json.loads(x)["type"] == "train"]

    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 4  # rank 0 alone wrote the metrics
    # Stated tolerance: the same global batch and layer-dropout masks; only the order of
    # floating-point sums differs, so losses and weights agree to 1e-5.
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=1e-5)
    assert load_checkpoint(tmp_path / "two" / "last").meta["world_size"] == 2
    for name, w in weights(tmp_path / "one").items():
        torch.testing.assert_close(weights(tmp_path / "two")[name], w, rtol=0, atol=1e-5, msg=name)


def test_cli_schedule_and_optimizer_flags_reach_the_config(tmp_path, tiny_corpus_dir):
    out = tmp_path / "run"
    args = CLI_TINY + ["--data-dir", str(tiny_corpus_dir), "--max_steps", "6", "--min_lr_ratio", "0", "--beta2", "0.9",
                       "--optimizer", "muon"]
    assert main(["train", "--out", str(out)] + args) == 0
    saved = load_checkpoint(out / "last").train_config
    assert saved["min_lr_ratio"] == 0.0 and saved["beta2"] == 0.9 and saved["optimizer"] == "muon"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if r["type"] == "train"]
    expected = [lr_at(s, base_lr=3e-3, warmup=2, total_steps=6, min_ratio=0.0) for s in range(6)]
    assert lrs == pytest.approx(expected)
    assert lrs[-1] < lr_at(5, base_lr=3e-3, warmup=2, total_steps=6, min_ratio=0.1)  # the default ends higher


# ----------------------------------------------------------------------------- self-distillation


class _ZeroButOn(float):
    """0.0 that takes the distillation branch: W = 0 through the distillation code path."""

    def __bool__(self) -> bool:
        return True


def test_distillation_at_weight_zero_reproduces_the_plain_run_bit_for_bit(tmp_path, corpus, monkeypatch):
    from layerskip.training import build

    cfg = tiny_cfg(max_steps=6, max_skip_prob=0.3, early_exit_curriculum="none", val_every=100, early_exit_distill=0.0)
    plain = train(cfg, tmp_path / "plain", corpus=corpus, progress=False)

    class ForcedDistillation(build.ExitLossModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.distill = _ZeroButOn(0.0)

    monkeypatch.setattr(build, "ExitLossModel", ForcedDistillation)
    forced = train(cfg, tmp_path / "forced", corpus=corpus, progress=False)
    assert forced.losses == plain.losses  # exactly, step for step
    for name, w in weights(tmp_path / "plain").items():
        assert torch.equal(w, weights(tmp_path / "forced")[name]), name


def test_distilled_run_logs_kl_resumes_exactly_and_refuses_another_weight(tmp_path, corpus):
    cfg = tiny_cfg(max_steps=8, early_exit_distill=0.5, early_exit_distill_temperature=2.0, val_every=4,
                   save_every=3, early_exit_tokens=0.5)
    whole = train(cfg, tmp_path / "whole", corpus=corpus, progress=False)
    plain = train(cfg.replace(early_exit_distill=0.0), tmp_path / "plain", corpus=corpus, progress=False)
    assert whole.losses[0] != plain.losses[0]  # the distillation term is in the loss
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["type"] == "train"]
    assert all(len(r["exit_kl"]) == len(r["exits"]) - 1 and all(v > 0 for v in r["exit_kl"]) for r in steps)
    vals = [r for r in rows if r["type"] == "val"]
    assert vals[-1]["layers"][-1]["agreement"] == 1.0 and 0 <= vals[-1]["layers"][0]["agreement"] <= 1
    first = train(cfg, tmp_path / "split", corpus=corpus, progress=False, stop_at_step=5)
    with pytest.raises(ConfigError, match="early_exit_distill=0.5"):
        resume_config(tmp_path / "split", {"early_exit_distill": 0.25})
    second = train(resume_config(tmp_path / "split"), tmp_path / "split", corpus=corpus, progress=False, resume=True)
    assert first.losses + second.losses == whole.losses


def test_a_run_saved_before_distillation_resumes_without_it(tmp_path, corpus):
    cfg = tiny_cfg(max_steps=4, save_every=2, val_every=100, early_exit_distill=0.0, early_exit_weighting="depth")
    train(cfg, tmp_path / "old", corpus=corpus, progress=False, stop_at_step=2)
    config_file = tmp_path / "old" / "last" / "config.json"
    saved = json.loads(config_file.read_text())
    for key in ("early_exit_distill", "early_exit_distill_temperature", "early_exit_weighting"):
        del saved["train"][key]  # as written before the settings existed
    config_file.write_text(json.dumps(saved))
    resumed = resume_config(tmp_path / "old")
    assert resumed.early_exit_distill == 0.0 and resumed.early_exit_distill_temperature == 1.0
    assert resumed.early_exit_weighting == "depth"
    assert train(resumed, tmp_path / "old", corpus=corpus, progress=False, resume=True).step == 4


def test_cli_distillation_flags_reach_the_config(tmp_path, tiny_corpus_dir, capsys):
    out = tmp_path / "run"
    args = CLI_TINY + ["--data-dir", str(tiny_corpus_dir), "--max_steps", "2"]
    assert main(["train", "--out", str(out), "--early-exit-distill", "0.3",
                 "--early_exit_distill_temperature", "1.5"] + args) == 0
    saved = load_checkpoint(out / "last").train_config
    assert saved["early_exit_distill"] == 0.3 and saved["early_exit_distill_temperature"] == 1.5
    assert main(["train", "--out", str(tmp_path / "bad"), "--early_exit_distill", "2"] + args) == 2
    assert "early_exit_distill must be a weight in [0, 1]" in capsys.readouterr().err
