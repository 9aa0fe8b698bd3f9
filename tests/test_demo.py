"""`layerskip demo` end to end on a tiny configuration, and its resume behaviour."""

from __future__ import annotations

import json

import pytest

from layerskip.cli import main
from layerskip.demo import DemoSettings, plan_stages

TINY = ["--d_model", "32", "--num_layers", "3", "--num_heads", "2", "--d_ff", "64", "--seq_len", "64",
        "--vocab_size", "400", "--batch_size", "4"]


def demo_argv(out, data_dir) -> list[str]:
    return ["demo", "--out", str(out), "--data-dir", str(data_dir), "--budget", "2", "--max_steps", "4",
            "--num_prompts", "2", "--new_tokens", "6", "--device", "cpu", "--smoke", *TINY]


def test_demo_runs_every_stage_then_skips_them(tmp_path, tiny_corpus_dir, capsys):
    out = tmp_path / "demo"
    assert main(demo_argv(out, tiny_corpus_dir)) == 0
    report = out / "report" / "index.html"
    assert report.is_file() and "<img" in report.read_text()
    results = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["layerskip", "baseline"]
    calibrated = [c["options"]["measure"] for c in results["models"][0]["configs"] if c["options"].get("calibrated")]
    assert calibrated == ["softmax", "classifier"]  # the featured policy first
    state = json.loads((out / "demo.json").read_text())
    names = [s.name for s in plan_stages(DemoSettings(out=out))]
    assert set(state["stages"]) == set(names)
    assert all(state["stages"][n]["command"].startswith("layerskip ") for n in names)
    # Equal training time for both models.
    budgets = {n: state["stages"][n]["command"].split("--time_budget ")[1].split()[0] for n in names if n.startswith("train-")}
    assert len(set(budgets.values())) == 1

    # Re-running skips every finished stage.
    capsys.readouterr()
    assert main(demo_argv(out, tiny_corpus_dir)) == 0
    err = capsys.readouterr().err
    assert err.count("done before, skipped") == len(names)

    # A stage whose output disappeared runs again; the others stay skipped.
    (out / "report" / "index.html").unlink()
    assert main(demo_argv(out, tiny_corpus_dir)) == 0
    err = capsys.readouterr().err
    assert err.count("done before, skipped") == len(names) - 1 and "$ layerskip report" in err
    assert report.is_file()


def test_demo_refuses_an_output_path_that_is_a_file(tmp_path, tiny_corpus_dir, capsys):
    out = tmp_path / "afile"
    out.write_text("x")
    assert main(demo_argv(out, tiny_corpus_dir)) == 2
    assert "is a file" in capsys.readouterr().err


def test_demo_refuses_a_non_positive_budget(tmp_path):
    with pytest.raises(Exception, match="--budget must be a positive"):
        DemoSettings(out=tmp_path, budget_minutes=0)


def test_smoke_alone_means_a_tiny_model_and_short_runs(tmp_path):
    from layerskip.cli import build_parser
    from layerskip.cli.demo import demo_settings

    def settings(*flags: str):
        return demo_settings(build_parser().parse_args(["demo", "--out", str(tmp_path), *flags]))

    smoke = settings("--smoke")
    assert smoke.model_flags[:2] == ["--d_model", "32"] and "--no-compile" in smoke.model_flags
    assert (smoke.max_steps, smoke.num_prompts, smoke.new_tokens) == (20, 2, 8)
    sized = settings("--smoke", "--d_model", "64", "--max_steps", "5", "--num_prompts", "3")
    assert sized.model_flags[:2] == ["--d_model", "64"] and "--num_layers" not in sized.model_flags
    assert (sized.max_steps, sized.num_prompts, sized.new_tokens) == (5, 3, 8)
    full = settings()
    assert (full.model_flags, full.max_steps, full.num_prompts, full.new_tokens) == ([], None, 16, 64)


@pytest.mark.parametrize("num_layers, exits", [(None, (1, 2, 3)), (3, (1,)), (2, (1,)), (1, None)])
def test_the_demo_gives_the_first_half_of_a_models_exits_the_early_exit_loss(tmp_path, num_layers, exits):
    import argparse

    from layerskip.cli import train as train_cli
    from layerskip.training import TrainConfig

    depth = [] if num_layers is None else ["--num_layers", str(num_layers)]
    [stage] = [s for s in plan_stages(DemoSettings(out=tmp_path, model_flags=depth)) if s.name == "train-layerskip"]
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    cfg = TrainConfig(**train_cli.explicit_settings(parser.parse_args(stage.argv[1:])))  # a valid config
    assert cfg.num_layers == (num_layers or 6) and cfg.early_exit_layers == exits
    assert cfg.max_skip_prob == 0.8 and cfg.early_exit_tokens == 0.125
