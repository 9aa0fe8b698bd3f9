"""benchmarks/recipe_search.py and recipe_runs.py: the interleaved order, the training commands, the summary
tables."""

import argparse
import json

import pytest
from conftest import benchmark_script

from layerskip.cli import train as train_cli
from layerskip.errors import ConfigError
from layerskip.training import TrainConfig

search = benchmark_script("recipe_search")
runs = benchmark_script("recipe_runs")


def test_training_order_runs_every_pair_once_and_rotates_positions():
    recipes, seeds = ["a", "b", "c"], [0, 1, 2]
    order = search.training_order(recipes, seeds)
    assert sorted(order) == sorted((s, r) for s in seeds for r in recipes)
    assert [r for s, r in order if s == 0] == ["a", "b", "c"]
    firsts = [next(r for s, r in order if s == seed) for seed in seeds]
    assert firsts == ["a", "b", "c"]  # no recipe always starts a seed


def recipe_config(flags):
    """The training config `layerskip train` builds from a recipe's flags, through its own parser."""
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    return TrainConfig(**train_cli.explicit_settings(parser.parse_args(flags)))


def test_every_recipe_is_a_valid_training_config():
    for name, flags in search.RECIPES.items():
        assert recipe_config(flags).plain == (name == "plain"), name
    assert not recipe_config(search.RECIPES["default-headfree-e1to0.2"]).early_exit_trains_head
    assert recipe_config(search.RECIPES["default-e1to0.2"]).early_exit_scale_end == 0.2
    assert recipe_config(search.RECIPES["default-focus3"]).early_exit_focus == 3.0
    for name, (first, share) in search.CONTINUAL.items():
        assert first in search.RECIPES and 0 < share < 1 and not recipe_config(search.RECIPES[name]).plain


def test_train_argv_resumes_an_interrupted_run_and_overwrites_one_that_never_saved(tmp_path):
    args = search.parse_args(["train", "--out", str(tmp_path), "--minutes", "1.5", "--train_flags", "--d_model", "64"])
    [(directory, argv)] = search.training_stages(args, 1, "distill0.5")
    assert directory == tmp_path / "seed1" / "distill0.5"
    assert argv[:7] == ["train", "--out", str(directory), "--time_budget", "1.5", "--seed", "1"]
    assert argv[-2:] == ["--d_model", "64"] and "--early_exit_distill" in argv
    directory.mkdir(parents=True)
    assert search.training_stages(args, 1, "distill0.5")[0][1][-1] == "--overwrite"
    (directory / "last").mkdir()
    (directory / "last" / "config.json").write_text("{}")
    assert search.training_stages(args, 1, "distill0.5")[0][1][-1] == "--resume"
    with pytest.raises(ConfigError, match="parallel"):
        search.parse_args(["train", "--out", str(tmp_path), "--parallel", "0"])


def test_a_continual_recipe_trains_its_first_recipe_then_continues_from_it_inside_the_same_minutes(tmp_path):
    args = search.parse_args(["train", "--out", str(tmp_path), "--minutes", "8"])
    (first, first_argv), (directory, argv) = search.training_stages(args, 0, "plain75-then-default")
    assert first == tmp_path / "seed0" / "plain75-then-default.start"
    assert directory == search.run_dir(tmp_path, 0, "plain75-then-default")
    assert first_argv[first_argv.index("--time_budget") + 1] == "6"
    assert recipe_config(first_argv[first_argv.index("--max_skip_prob"):]).plain
    assert argv[argv.index("--time_budget") + 1] == "2"
    assert argv[argv.index("--init-from") + 1] == str(first)
    assert recipe_config(argv[argv.index("--max_skip_prob"):argv.index("--init-from")]).early_exit_distill == 0.9


def fake_run(out, seed, recipe, word_ppl, agreement, share=None, steps=100, step_seconds=(0.5, 0.6, 0.7)):
    directory = search.run_dir(out, seed, recipe)
    directory.mkdir(parents=True)
    layers = [{"layer": k + 1, "word_ppl": None, "agreement": a, "last_in_top2": a, "last_in_top4": 1.0}
              for k, a in enumerate(agreement)]
    layers.append({"layer": len(agreement) + 1, "word_ppl": word_ppl, "agreement": 1.0, "last_in_top2": 1.0,
                   "last_in_top4": 1.0})
    (directory / "eval_test.json").write_text(json.dumps({"layers": layers}))
    compiling = [{"type": "train", "step_seconds": 9.0}] * runs.PACE_SKIP
    train = [{"type": "train", "step_seconds": t} for t in step_seconds]
    records = [*compiling, *train, {"type": "end", "step": steps}]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if share is not None:
        by_layer = [0.0, 0.0, share, 0.5]
        result = {"ranked": {"0.01": by_layer}, "calibrated": {"0.01": {"exit_by_layer": by_layer}}}
        (directory / "exit_shares.json").write_text(json.dumps({"results": {"softmax": result}}))


def test_summary_compares_with_plain_and_pairs_seeds_with_the_current_recipe(tmp_path, capsys):
    for seed in (0, 1):
        fake_run(tmp_path, seed, "plain", 100.0 + seed * 20, [0.3] * 4)
        fake_run(tmp_path, seed, "current", 130.0, [0.5, 0.6, 0.7, 0.8], share=0.10)
        fake_run(tmp_path, seed, "distill0.5", 121.0, [0.5 + 0.1 * seed, 0.6, 0.7, 0.8], share=0.20 + 0.1 * seed)
    search.main(["summary", "--out", str(tmp_path), "--recipes", "plain", "current", "distill0.5"])
    text = (tmp_path / "summary.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    assert rows["current"][3] == "0.600"  # the median pace past the compiling steps
    assert rows["current"][5] == "+18.2%"  # 130 against the plain seeds' mean of 110
    assert rows["current"][6] == "+30.0% +8.3%"  # and against each seed's own plain run
    assert rows["distill0.5"][4] == "121.0" and rows["distill0.5"][7] == "0.550"
    assert rows["distill0.5"][-3] == "+0.0 +3.3"  # seed by seed against current: exits 1-3 mean
    assert rows["distill0.5"][-2] == "25.0%" and rows["distill0.5"][-1] == "25.0% |" and rows["plain"][-1] == "- |"
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["runs"]["current"]["1"]["steps"] == 100
    assert "distill0.5" in capsys.readouterr().out
    search.main(["summary", "--out", str(tmp_path), "--recipes", "plain", "current", "distill0.5",
                 "--reference", "distill0.5"])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")
            for line in (tmp_path / "summary.md").read_text().splitlines() if line.startswith("| ")}
    assert rows["current"][-3] == "+0.0 -3.3" and rows["distill0.5"][-3] == "-"


def bench_config(strategy, speedup, rouge, label, **options):
    return {"strategy": strategy, "speedup": speedup, "rouge_l": rouge, "label": label, "options": options,
            "greedy": True, "mean_exit_layer": 3.0, "acceptance_rate": 0.5 if strategy == "ssd" else None}


def test_a_continual_runs_steps_count_its_first_runs_too(tmp_path):
    fake_run(tmp_path, 0, "plain75-then-default", 130.0, [0.5, 0.6, 0.7], steps=40)
    first = search.first_stage_dir(tmp_path, 0, "plain75-then-default")
    first.mkdir()
    (first / "metrics.jsonl").write_text(json.dumps({"type": "end", "step": 300}) + "\n")
    assert runs.steps_trained(runs.run_dir(tmp_path, 0, "plain75-then-default")) == 340


def test_summary_tabulates_calibrated_dee_the_faithful_sweep_and_ssd(tmp_path):
    fake_run(tmp_path, 0, "current", 130.0, [0.5, 0.6, 0.7, 0.8], share=0.1)
    configs = [bench_config("ar", 1.0, 1.0, "AR greedy"),
               bench_config("dee", 1.10, 0.95, "DEE calibrated", calibrated=True, measure="softmax", delta=0.01,
                            calibration_test_disagreement=0.008),
               bench_config("dee", 1.40, 0.70, "DEE softmax >= 0.3"),  # faster, but below the ROUGE-L bar
               bench_config("dee", 1.20, 0.85, "DEE softmax >= 0.6"),
               bench_config("ssd", 0.90, 1.0, "SSD E=2 k=2"), bench_config("ssd", 1.05, 1.0, "SSD E=3 k=4")]
    results = {"models": [{"configs": configs}]}
    (search.run_dir(tmp_path, 0, "current") / "results.json").write_text(json.dumps(results))
    search.main(["summary", "--out", str(tmp_path), "--recipes", "current", "--seeds", "0"])
    row = next(line for line in (tmp_path / "summary.md").read_text().splitlines()
               if line.startswith("| current (seed 0)")).split(" | ")
    assert row[1] == "1.10x / 0.95 / 0.80%" and row[2] == "-"  # softmax at delta 1%; delta 5% not benchmarked
    assert row[-2] == "1.20x (DEE softmax >= 0.6, 0.85)" and row[-1] == "1.05x (SSD E=3 k=4, accept 0.50) |"


def test_summary_without_measured_runs_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="measure"):
        search.main(["summary", "--out", str(tmp_path)])


def test_the_demo_trains_the_recipe_the_search_chose():
    from layerskip.demo import LAYERSKIP_FLAGS

    assert recipe_config(LAYERSKIP_FLAGS) == recipe_config(search.RECIPES["default-exits123-p0.8-t0.125"])
    assert recipe_config(search.DEFAULT) == recipe_config(search.RECIPES["uniform-distill0.9"])  # the one before


def trained(out, seed, *recipes):
    """Runs that look finished to the search (a best checkpoint's config, done.json)."""
    for recipe in recipes:
        directory = search.run_dir(out, seed, recipe)
        (directory / "best").mkdir(parents=True)
        (directory / "best" / "config.json").write_text("{}")
        (directory / "done.json").write_text("{}")


def test_decode_calibrates_every_measure_and_delta_then_benches_with_all_the_files(tmp_path, capsys):
    trained(tmp_path, 0, "plain", "current")
    search.main(["decode", "--out", str(tmp_path), "--recipes", "plain", "current", "--seeds", "0", "--dry_run"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]
    calibrations = [line for line in lines if " calibrate " in line]
    assert len(calibrations) == len(search.DECODE_MEASURES) * len(search.DECODE_DELTAS)
    assert all("--exit_vocab 1024" in line and "seed0/current" in line for line in calibrations)
    bench = lines[-1]
    assert bench.startswith("$ layerskip bench") and f"--baseline {tmp_path / 'seed0' / 'plain'}" in bench
    assert all(str(search.thresholds_file(search.run_dir(tmp_path, 0, "current"), m, d)) in bench
               for m in search.DECODE_MEASURES for d in search.DECODE_DELTAS)


def test_decode_calibrates_at_the_deltas_asked_and_the_summary_shows_them(tmp_path, capsys):
    trained(tmp_path, 0, "plain", "current")
    search.main(["decode", "--out", str(tmp_path), "--recipes", "plain", "current", "--seeds", "0", "--dry_run",
                 "--deltas", "0.02", "0.03"])
    calibrations = [line for line in capsys.readouterr().out.splitlines() if " calibrate " in line]
    assert sorted(line.split("--delta ")[1].split()[0] for line in calibrations) == ["0.02"] * 3 + ["0.03"] * 3
    record = {"softmax d0.03": {"speedup": 1.2, "rouge_l": 0.8, "heldout_disagreement": 0.02},
              "dee sweep": None, "ssd": None}
    table = runs.decode_table({"current": {0: {"decode": record}}})
    head, row = table.splitlines()[0].split(" | "), table.splitlines()[2].split(" | ")
    assert row[head.index("DEE softmax d0.03")] == "1.20x / 0.80 / 2.00%"
    assert row[head.index("DEE softmax d0.01")] == "-"  # the default deltas keep their columns
