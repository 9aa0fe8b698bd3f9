"""`layerskip bench` on tiny checkpoints and a tiny corpus: the real strategies, in seconds."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from conftest import REAL_DATA_DIR, tiny_model

from layerskip.bench import BenchSettings, lcs_length, rouge_l, run_bench, select_prompts, write_results
from layerskip.checkpoint import load_checkpoint, save_checkpoint
from layerskip.cli import main
from layerskip.config import TokenizerConfig
from layerskip.errors import ConfigError
from layerskip.thresholds import model_fingerprint

NUM_LAYERS = 4
TINY_SETTINGS = BenchSettings(
    num_prompts=3,
    prompt_tokens=8,
    new_tokens=10,
    ks=(2, 3),
    dee_thresholds=(0.3, 2.0),  # 2.0 is unreachable: DEE must then be the full model
    temperature=0.8,
    num_samples=2,
    threads=1,  # tiny matrices: one thread avoids spin-waiting on a busy machine
)


def save_tiny_checkpoints(directory: Path, tokenizer) -> tuple[Path, Path]:
    """A "LayerSkip" and a "plain" checkpoint: two tiny random 4-layer models."""
    tok_cfg = TokenizerConfig(vocab_size=tokenizer.vocab_size)
    paths = []
    for name, seed in (("layerskip", 0), ("plain", 1)):
        model = tiny_model(seed, vocab_size=tokenizer.vocab_size, num_layers=NUM_LAYERS)
        paths.append(save_checkpoint(directory / name, model, tokenizer, tokenizer_config=tok_cfg))
    return paths[0], paths[1]


def write_thresholds(path: Path, checkpoint: Path, thresholds: list[float | None], measure: str = "softmax",
                     fingerprint: str | None = None) -> Path:
    """A thresholds.json as `layerskip calibrate` writes it (the fields load_thresholds reads)."""
    record = {
        "format": "layerskip-thresholds", "version": 1, "measure": measure, "num_layers": NUM_LAYERS,
        "thresholds": thresholds, "min_exit_layer": 1, "check_every": 1, "delta": 0.1, "epsilon": 0.05,
        "risk": {"test_disagreement": 0.05},
        "model": {"fingerprint": fingerprint or model_fingerprint(load_checkpoint(checkpoint).model)},
    }
    path.write_text(json.dumps(record))
    return path


def make_tiny_results(directory: Path, corpus_dir: Path, tokenizer, settings: BenchSettings = TINY_SETTINGS) -> dict:
    """Bench both tiny checkpoints (the first with calibrated thresholds), caches under `directory`."""
    main_ckpt, baseline = save_tiny_checkpoints(directory, tokenizer)
    thresholds = write_thresholds(directory / "thresholds.json", main_ckpt, [None, 0.8, 0.8], measure="saturation")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAYERSKIP_CACHE_DIR", str(directory / "cache"))
        return run_bench(main_ckpt, baseline=baseline, thresholds=thresholds, data_dir=corpus_dir,
                         settings=settings, command=["layerskip", "bench", "(test)"], progress=False)


_SHARED: dict[Path, dict] = {}


def shared_tiny_results(tmp_path_factory, corpus_dir: Path, tokenizer) -> dict:
    """One tiny bench per test session, shared by the bench, report and browser tests (read-only)."""
    if corpus_dir not in _SHARED:
        _SHARED[corpus_dir] = make_tiny_results(tmp_path_factory.mktemp("bench"), corpus_dir, tokenizer)
    return _SHARED[corpus_dir]


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_corpus_dir, tiny_tokenizer) -> dict:
    return shared_tiny_results(tmp_path_factory, tiny_corpus_dir, tiny_tokenizer)


def configs_of(results: dict, model: int = 0) -> dict[str, dict]:
    return {c["id"]: c for c in results["models"][model]["configs"]}


# ----------------------------------------------------------------------------- the document


def test_results_are_one_strict_json_document(results, tmp_path):
    path = write_results(results, tmp_path / "results.json")
    loaded = json.loads(path.read_text())  # one document: json.loads refuses trailing data
    assert loaded == results
    json.dumps(results, allow_nan=False)  # no NaN / Infinity, which strict JSON forbids
    assert loaded["format"] == "layerskip-bench" and loaded["schema_version"] == 1
    assert loaded["command"] == ["layerskip", "bench", "(test)"]
    assert {"cpu", "cores", "torch_threads", "device", "load_average", "load_average_end"} <= set(loaded["machine"])
    assert loaded["machine"]["torch_threads"] == 1  # the run's own setting, recorded while it ran
    assert {"python", "torch", "layerskip"} <= set(loaded["versions"])
    assert loaded["settings"]["new_tokens"] == 10 and loaded["settings"]["device"] == "cpu"
    assert loaded["process_peak_rss_bytes"] > 0


def test_both_models_have_every_config(results):
    assert [m["name"] for m in results["models"]] == ["layerskip", "baseline"]
    for index in range(2):
        ids = set(configs_of(results, index))
        expected = {"ar", "ar-t0.8"}
        expected |= {f"dee-{m}-{t:g}" for m in ("softmax", "margin", "saturation") for t in (0.3, 2.0)}
        expected |= {f"ssd-E{e}-k{k}" for e in (1, 2) for k in (2, 3)}  # default spread of E for L=4
        expected |= {"ssd-E2-k3-t0.8"}
        if index == 0:
            expected.add("dee-calibrated")  # --thresholds belong to the LayerSkip model only
        assert ids == expected


def test_calibrated_dee_follows_its_thresholds(results):
    c = configs_of(results)["dee-calibrated"]
    opts = c["options"]
    assert opts["calibrated"] and opts["measure"] == "saturation" and opts["delta"] == 0.1
    assert opts["thresholds"] == [None, 0.8, 0.8]  # null: never exit at layer 1
    assert c["exit_layer_counts"][0] == 0 and sum(c["exit_layer_counts"]) == c["new_tokens"]
    assert c["label"] == "DEE calibrated (saturation, δ=0.1)"
    assert c["mean_exit_layer"] < NUM_LAYERS  # the random tiny model's hidden states saturate early


def test_several_thresholds_files_are_several_calibrated_configs(tmp_path, tiny_tokenizer):
    from layerskip.bench import build_configs

    main_ckpt, _ = save_tiny_checkpoints(tmp_path, tiny_tokenizer)
    fingerprint = model_fingerprint(load_checkpoint(main_ckpt).model)
    files = [write_thresholds(tmp_path / "a.json", main_ckpt, [0.9, 0.9, 0.9]),
             write_thresholds(tmp_path / "b.json", main_ckpt, [None, 0.7, 0.7], measure="saturation")]
    settings = BenchSettings(ks=(2,), dee_measures=("softmax",), dee_thresholds=(0.5,))
    calibrated = [c for c in build_configs(NUM_LAYERS, settings, files, fingerprint) if c.options.get("calibrated")]
    assert [c.id for c in calibrated] == ["dee-calibrated", "dee-calibrated-2"]
    assert [c.options["measure"] for c in calibrated] == ["softmax", "saturation"]
    assert [c.options["source"] for c in calibrated] == [str(f) for f in files]
    assert calibrated[1].make().thresholds == [float("inf"), 0.7, 0.7]  # null: never exit there


def test_thresholds_for_other_weights_are_refused(tmp_path, tiny_corpus_dir, tiny_tokenizer, capsys):
    main_ckpt, _ = save_tiny_checkpoints(tmp_path, tiny_tokenizer)
    thresholds = write_thresholds(tmp_path / "t.json", main_ckpt, [0.5, 0.5, 0.5], fingerprint="0123456789abcdef")
    code = main(["bench", "--checkpoint", str(main_ckpt), "--thresholds", str(thresholds), "--data-dir",
                 str(tiny_corpus_dir), "--out", str(tmp_path / "r.json"), "--quiet"])
    assert code == 2 and "calibrated for another model" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_every_config_has_its_measurements(results):
    settings = results["settings"]
    for model in results["models"]:
        for c in model["configs"]:
            assert len(c["runs"]) == settings["num_prompts"] * settings["repeats"]
            assert c["new_tokens"] == settings["num_prompts"] * settings["new_tokens"]  # no eos: full length
            assert c["tokens_per_second"] > 0 and c["ms_per_token"] > 0
            assert 0 < c["time_to_first_token"] < max(r["seconds"] for r in c["runs"]) + 1e-9
            assert c["speedup"] > 0 and c["perplexity"] > 1
            assert c["blocks_per_token"] > 0 and c["head_evals_per_token"] >= 1
            assert c["peak_memory_bytes"] is None  # CPU: per-config memory is not measurable
            assert model["peak_rss_bytes"] > 0


def test_ar_is_its_own_reference(results):
    for index in range(2):
        configs = configs_of(results, index)
        for ar in (configs["ar"], configs["ar-t0.8"]):
            assert ar["speedup"] == 1.0
            assert all(r["speedup"] == 1.0 for r in ar["runs"])
            assert ar["blocks_per_token"] == NUM_LAYERS and ar["head_evals_per_token"] == 1
        assert configs["ar"]["token_agreement"] == configs["ar"]["rouge_l"] == configs["ar"]["exact_match"] == 1.0


def test_greedy_ssd_is_exact(results):
    """SSD's greedy output is the AR greedy output, token for token, for every E and k."""
    for index in range(2):
        ssd = [c for c in configs_of(results, index).values() if c["strategy"] == "ssd" and c["greedy"]]
        assert len(ssd) == 4
        for c in ssd:
            assert c["token_agreement"] == c["rouge_l"] == c["exact_match"] == 1.0, c["id"]
            assert c["perplexity"] == configs_of(results, index)["ar"]["perplexity"]


def test_ssd_acceptance_statistics(results):
    for model in results["models"]:
        for c in model["configs"]:
            if c["strategy"] != "ssd":
                continue
            k = c["options"]["k"]
            hist = c["accepted_length_histogram"]
            assert 0 <= c["acceptance_rate"] <= 1
            assert sum(hist) == c["rounds"] and len(hist) <= k + 1
            assert c["mean_accepted_length"] == pytest.approx(sum(i * n for i, n in enumerate(hist)) / sum(hist))
            # each round commits its accepted drafts plus one full-model token
            assert c["new_tokens"] == pytest.approx(c["rounds"] * (c["mean_accepted_length"] + 1))


def test_sampled_configs_report_no_greedy_fidelity(results):
    for c in configs_of(results).values():
        if not c["greedy"]:
            assert c["token_agreement"] is None and c["rouge_l"] is None


def test_dee_with_an_unreachable_threshold_is_the_full_model(results):
    for index in range(2):
        configs = configs_of(results, index)
        for measure in ("softmax", "margin", "saturation"):
            c = configs[f"dee-{measure}-2"]
            assert c["exit_layer_counts"] == [0, 0, 0, c["new_tokens"]]
            assert c["mean_exit_layer"] == NUM_LAYERS and c["blocks_per_token"] == NUM_LAYERS
            assert c["token_agreement"] == c["rouge_l"] == 1.0


def test_dee_exit_statistics(results):
    for c in configs_of(results).values():
        if c["strategy"] == "dee":
            counts = c["exit_layer_counts"]
            assert len(counts) == NUM_LAYERS and sum(counts) == c["new_tokens"]
            mean = sum((i + 1) * n for i, n in enumerate(counts)) / sum(counts)
            assert c["mean_exit_layer"] == pytest.approx(mean)
            assert c["blocks_per_token"] == pytest.approx(mean)
            assert 0 <= c["token_agreement"] <= 1 and 0 <= c["rouge_l"] <= 1
    # threshold 0.3 on a random model exits early somewhere, or the sweep would show nothing
    assert any(c["mean_exit_layer"] < NUM_LAYERS for c in configs_of(results).values() if c["strategy"] == "dee")


def test_step_costs_and_the_dee_estimates_they_give(results):
    for index in range(2):
        model = results["models"][index]
        costs, configs = model["step_costs"], configs_of(results, index)
        assert all(costs[p] > 0 for p in ("ar_step", "block", "full_head", "check", "propagate"))
        assert costs["rest"] == pytest.approx(costs["ar_step"] - NUM_LAYERS * costs["block"] - costs["full_head"])
        assert costs["check_vocab"] is None  # the calibrated file and the sweep read the full head
        assert costs["position"] == TINY_SETTINGS.prompt_tokens + TINY_SETTINGS.new_tokens // 2
        for c in configs.values():
            estimated = c["strategy"] == "dee" and c["options"]["measure"] == "softmax"
            assert (c["estimated_speedup"] is not None) == estimated, c["id"]
            assert (c["estimated_speedup_free_checks"] is not None) == estimated, c["id"]
        # never exiting: with free checks it is exactly the AR step, and every check is pure cost
        full = configs["dee-softmax-2"]
        assert full["estimated_speedup_free_checks"] == pytest.approx(1.0)
        assert full["estimated_speedup"] < 1.0
        early = configs["dee-softmax-0.3"]
        assert early["estimated_speedup_free_checks"] >= full["estimated_speedup_free_checks"]


def test_step_costs_can_be_skipped(tmp_path, tiny_corpus_dir, tiny_tokenizer):
    settings = BenchSettings(num_prompts=1, prompt_tokens=8, new_tokens=4, ks=(2,), dee_measures=("softmax",),
                             dee_thresholds=(0.5,), temperature=0, eval_tokens=0, threads=1, cost_repeats=0)
    results = make_tiny_results(tmp_path, tiny_corpus_dir, tiny_tokenizer, settings)
    assert results["models"][0]["step_costs"] is None
    assert configs_of(results)["dee-softmax-0.5"]["estimated_speedup"] is None


def test_per_layer_evaluation(results):
    for model in results["models"]:
        rows = model["per_layer"]
        assert [r["exit_layer"] for r in rows] == list(range(1, NUM_LAYERS + 1))
        for r in rows:
            assert r["token_ppl"] > 1 and r["word_ppl"] > 1 and r["loss"] > 0
            assert 0 <= r["agreement"] <= r["last_in_top2"] <= r["last_in_top4"] <= 1
        assert rows[-1]["agreement"] == rows[-1]["last_in_top4"] == 1.0  # the last layer agrees with itself


def test_prompts_and_samples(results):
    prompts = results["prompts"]
    assert len(prompts) == 3 and len({p["paragraph"] for p in prompts}) == 3
    samples = results["models"][0]["samples"]
    assert {s["prompt_index"] for s in samples} == {0, 1}
    assert {s["config"] for s in samples} == set(configs_of(results))
    for s in samples:
        assert len(s["tokens"]) == len(s["pieces"]) == len(s["token_info"]) == 10
        assert s["prompt_text"] and isinstance(s["text"], str)
        if s["config"].startswith("ssd"):
            assert all(isinstance(i["accepted"], bool) for i in s["token_info"])
        if s["config"].startswith("dee"):
            assert all(1 <= i["exit_layer"] <= NUM_LAYERS for i in s["token_info"])


def test_prompt_choice_is_seeded(tiny_corpus_dir, tiny_tokenizer):
    from layerskip.data import read_lines

    lines = read_lines(tiny_corpus_dir / "wiki.test.tokens")
    first = select_prompts(lines, tiny_tokenizer, num_prompts=5, prompt_tokens=8, seed=0)
    again = select_prompts(lines, tiny_tokenizer, num_prompts=5, prompt_tokens=8, seed=0)
    other = select_prompts(lines, tiny_tokenizer, num_prompts=5, prompt_tokens=8, seed=1)
    assert first == again and first != other
    for p in first:
        assert not p.text.strip().startswith("=") and len(tiny_tokenizer.encode(p.text)) > 8


@pytest.mark.skipif(not REAL_DATA_DIR, reason="LAYERSKIP_DATA_DIR is not set")
def test_prompts_from_the_real_test_split_are_paragraphs(tiny_tokenizer):
    from layerskip.data import find_split_files, read_lines

    lines = read_lines(find_split_files(Path(REAL_DATA_DIR))["test"])
    prompts = select_prompts(lines, tiny_tokenizer, num_prompts=16, prompt_tokens=32, seed=0)
    assert len(prompts) == 16 and len({p.paragraph for p in prompts}) == 16
    for p in prompts:
        assert lines[p.paragraph] == p.text and p.text.strip() and not p.text.strip().startswith("= ")


# ----------------------------------------------------------------------------- fidelity maths


def brute_lcs(a, b) -> int:
    """The longest common subsequence by trying every subsequence of a (tiny inputs only)."""
    best = 0
    for r in range(len(a) + 1):
        for idx in itertools.combinations(range(len(a)), r):
            sub, it = [a[i] for i in idx], iter(b)
            if all(any(x == y for y in it) for x in sub):
                best = max(best, r)
    return best


def test_lcs_matches_brute_force():
    import random

    rng = random.Random(0)
    for _ in range(200):
        a = [rng.randrange(3) for _ in range(rng.randrange(7))]
        b = [rng.randrange(3) for _ in range(rng.randrange(7))]
        assert lcs_length(a, b) == brute_lcs(a, b)


def test_rouge_l():
    assert rouge_l([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert rouge_l([1, 2, 3, 4], [1, 3, 4, 5]) == pytest.approx(0.75)
    assert rouge_l([1, 2], [1, 2, 3, 4]) == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert rouge_l([1, 2], [3, 4]) == 0.0
    assert rouge_l([], [1]) == 0.0 and rouge_l([], []) == 1.0


# ----------------------------------------------------------------------------- settings and CLI


def test_bad_settings_fail_loudly():
    with pytest.raises(ConfigError, match="num_prompts"):
        BenchSettings(num_prompts=0)
    with pytest.raises(ConfigError, match="measure"):
        BenchSettings(dee_measures=("entropy",))
    with pytest.raises(ConfigError, match="ks"):
        BenchSettings(ks=(0,))
    with pytest.raises(ConfigError, match="outside 1..3"):
        BenchSettings(draft_layers=(4,)).draft_layers_for(4)
    assert BenchSettings().draft_layers_for(6) == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="draft_vocab"):
        BenchSettings(draft_vocab=0)
    with pytest.raises(ConfigError, match="exit_vocab"):
        BenchSettings(exit_vocab=0)


def test_short_heads_reach_the_strategies():
    from layerskip.bench import build_configs

    configs = build_configs(4, BenchSettings(ks=(2,), draft_vocab=64, exit_vocab=32, dee_measures=("softmax",),
                                             dee_thresholds=(0.5,)))
    ssd = [c for c in configs if c.strategy == "ssd"]
    dee = [c for c in configs if c.strategy == "dee"]
    assert ssd and all(c.options["draft_vocab"] == 64 and c.make().draft_vocab == 64 for c in ssd)
    assert dee and all(c.options["exit_vocab"] == 32 and c.make().exit_vocab == 32 for c in dee)
    assert all("head 64" in c.label for c in ssd) and all("head 32" in c.label for c in dee)


def test_cli_bench_writes_results(tmp_path, tiny_corpus_dir, tiny_tokenizer, capsys):
    main_ckpt, _ = save_tiny_checkpoints(tmp_path, tiny_tokenizer)
    out = tmp_path / "out" / "results.json"
    code = main([
        "bench", "--checkpoint", str(main_ckpt), "--data-dir", str(tiny_corpus_dir), "--out", str(out),
        "--num_prompts", "2", "--prompt-tokens", "6", "--new_tokens", "4", "--draft_layers", "2", "--ks", "2",
        "--dee_measures", "softmax", "--dee_thresholds", "0.5", "--temperature", "0.7", "--eval_tokens", "0",
        "--sample_draft_layer", "3", "--sample-k", "1",
        "--warmup", "0", "--threads", "1", "--quiet",
    ])
    assert code == 0
    assert capsys.readouterr().out.strip() == str(out)
    results = json.loads(out.read_text())
    assert [c["id"] for c in results["models"][0]["configs"]] == [
        "ar", "ar-t0.7", "dee-softmax-0.5", "ssd-E2-k2", "ssd-E3-k1-t0.7"]
    assert results["models"][0]["per_layer"] is None and len(results["models"]) == 1


def test_cli_summary_line_picks_the_fastest_greedy_config(results):
    from layerskip.cli.bench import summary_line

    model = results["models"][0]
    line = summary_line(model)
    greedy = [c for c in model["configs"] if c["strategy"] != "ar" and c["greedy"]]
    best = max(greedy, key=lambda c: c["speedup"])
    assert line.startswith("layerskip: AR greedy ") and f"fastest greedy: {best['label']} " in line
    only_ar = {"name": "m", "configs": [c for c in model["configs"] if c["strategy"] == "ar" or not c["greedy"]]}
    assert "fastest" not in summary_line(only_ar)  # sampled configs have no ROUGE-L to quote


def test_cli_bench_reports_a_missing_checkpoint(tmp_path, capsys):
    code = main(["bench", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "r.json")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("layerskip bench: error:") and "does not exist" in err and "\n" not in err
    assert not (tmp_path / "r.json").exists()


def test_fewer_paragraphs_than_prompts_are_recorded(tmp_path, tiny_corpus_dir, tiny_tokenizer, capsys):
    main_ckpt, _ = save_tiny_checkpoints(tmp_path, tiny_tokenizer)
    settings = BenchSettings(num_prompts=1000, prompt_tokens=30, new_tokens=2, ks=(2,), draft_layers=(2,),
                             dee_measures=("softmax",), dee_thresholds=(0.5,), temperature=0, eval_tokens=0,
                             warmup=0, threads=1)
    results = run_bench(main_ckpt, data_dir=tiny_corpus_dir, settings=settings, progress=False)
    n = results["settings"]["num_prompts"]
    assert 0 < n < 1000 and results["settings"]["num_prompts_requested"] == 1000
    assert len(results["prompts"]) == n and len(results["models"][0]["configs"][0]["runs"]) == n
    assert f"using {n} prompts instead of 1000" in capsys.readouterr().err
