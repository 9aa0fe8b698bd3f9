"""The recipe search's runs on disk and what their files say: the layout, each run's record, the tables.

OUT/seedS/RECIPE is a run (a continual recipe's first stage: OUT/seedS/RECIPE.start); a run's
eval_test.json, exit_shares.json and results.json (recipe_search.py's measure and decode
phases) make its record, and the records the summary's markdown tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SHARE_LAYER = 3  # the target: tokens that can exit by layer 3 at <= 1% disagreement
DECODE_MEASURES = ["softmax", "saturation", "classifier"]
DECODE_DELTAS = ["0.01", "0.05"]  # decode's calibrations by default (--deltas)
MIN_ROUGE = 0.8  # the fidelity bar of the fastest DEE sweep config
PACE_SKIP = 5  # a run's first steps compile; its pace is read after them


def run_dir(out: Path, seed: int, recipe: str) -> Path:
    return out / f"seed{seed}" / recipe


def first_stage_of(directory: Path) -> Path:
    """Where a continual recipe's first run lives, beside the run itself."""
    return directory.with_name(f"{directory.name}.start")


def first_stage_dir(out: Path, seed: int, recipe: str) -> Path:
    return first_stage_of(run_dir(out, seed, recipe))


def decode_record(results: dict) -> dict:
    """Speed-ups and fidelity of the LayerSkip model's decoding configs in one bench results.json."""
    configs = results["models"][0]["configs"]
    record: dict = {}
    for c in configs:
        opts = c["options"]
        if opts.get("calibrated"):
            record[f"{opts['measure']} d{opts['delta']:g}"] = {
                "speedup": c["speedup"], "rouge_l": c["rouge_l"], "mean_exit_layer": c["mean_exit_layer"],
                "heldout_disagreement": opts.get("calibration_test_disagreement")}
    sweep = [c for c in configs if c["strategy"] == "dee" and not c["options"].get("calibrated")
             and (c["rouge_l"] or 0) >= MIN_ROUGE]
    best_dee = max(sweep, key=lambda c: c["speedup"] or 0, default=None)
    ssd = [c for c in configs if c["strategy"] == "ssd" and c["greedy"]]
    best_ssd = max(ssd, key=lambda c: c["speedup"] or 0, default=None)
    record["dee sweep"] = best_dee and {"label": best_dee["label"], "speedup": best_dee["speedup"],
                                        "rouge_l": best_dee["rouge_l"]}
    record["ssd"] = best_ssd and {"label": best_ssd["label"], "speedup": best_ssd["speedup"],
                                  "acceptance_rate": best_ssd["acceptance_rate"]}
    return record


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def steps_trained(directory: Path) -> int | None:
    """The run's optimizer steps, a continual run's first run's included."""
    stages = [first_stage_of(directory), directory]
    steps = [end_step(d) for d in stages if (d / "metrics.jsonl").is_file()]
    return None if not steps or None in steps else sum(steps)


def median_step_seconds(directory: Path) -> float | None:
    """The run's median seconds per step (past compilation): the machine's pace, which drifts
    between runs here, so that a run that trained fewer steps shows why."""
    path = directory / "metrics.jsonl"
    if not path.is_file():
        return None
    records = (json.loads(line) for line in path.read_text().splitlines())
    seconds = [r["step_seconds"] for r in records if r.get("type") == "train"][PACE_SKIP:]
    return float(np.median(seconds)) if seconds else None


def end_step(directory: Path) -> int | None:
    lines = (directory / "metrics.jsonl").read_text().splitlines()
    ends = [json.loads(line) for line in lines if '"end"' in line]
    return ends[-1]["step"] if ends else None


def run_record(directory: Path) -> dict | None:
    """What one finished, measured run gives the table (None if not measured yet)."""
    evaluation = read_json(directory / "eval_test.json")
    if evaluation is None:
        return None
    layers = evaluation["layers"]
    record = {"last_word_ppl": layers[-1]["word_ppl"], "agreement": [x["agreement"] for x in layers[:-1]],
              "last_in_top2": [x["last_in_top2"] for x in layers[:-1]], "steps": steps_trained(directory),
              "step_seconds": median_step_seconds(directory)}
    shares = read_json(directory / "exit_shares.json")
    if shares is not None:
        for name, r in shares["results"].items():
            for delta in r["ranked"]:
                record[f"ranked {name} d{delta}"] = r["ranked"][delta]
                record[f"calibrated {name} d{delta}"] = r["calibrated"][delta]["exit_by_layer"]
    results = read_json(directory / "results.json")
    if results is not None:
        record["decode"] = decode_record(results)
    return record


def collect(out: Path, recipes: list[str], seeds: list[int]) -> dict[str, dict[int, dict]]:
    """recipe -> seed -> run_record, for the runs measured so far."""
    runs: dict[str, dict[int, dict]] = {}
    for recipe in recipes:
        for seed in seeds:
            record = run_record(run_dir(out, seed, recipe))
            if record is not None:
                runs.setdefault(recipe, {})[seed] = record
    return runs


def mean_of(records: dict[int, dict], key: str, index: int | None = None) -> float | None:
    values = [r[key] if index is None else r[key][index] for r in records.values() if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


# The exit-share columns: a layer's own ranked share, and the calibrated policy's share exiting by it.
SHARE_COLUMNS = {"ranked softmax d0.01": f"layer {SHARE_LAYER} alone could exit (ranked, 1%)",
                 "calibrated softmax d0.01": f"exit by layer {SHARE_LAYER} (calibrated, 1%)"}


def summary_table(runs: dict[str, dict[int, dict]], reference: str = "current") -> str:
    """Means over seeds, and seed by seed: the last layer's word perplexity against the same seed's
    plain run, the mean agreement at exits 1-3 against the same seed's `reference` recipe."""
    exits = len(next(iter(next(iter(runs.values())).values()))["agreement"])
    plain_runs, paired_with = runs.get("plain", {}), runs.get(reference, {})
    plain = mean_of(plain_runs, "last_word_ppl")
    head = (["recipe", "seeds", "steps", "s/step", "last word ppl", "vs plain", "vs plain (per seed)"]
            + [f"agree {k}" for k in range(1, exits + 1)]
            + [f"agree 1-3 vs {reference} (points, per seed)", *SHARE_COLUMNS.values()])
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for recipe, records in runs.items():
        ppl = mean_of(records, "last_word_ppl")
        per_seed = [r["last_word_ppl"] / plain_runs[s]["last_word_ppl"] - 1 for s, r in records.items()
                    if s in plain_runs and recipe != "plain"]
        paired = [np.mean(r["agreement"][:3]) - np.mean(paired_with[s]["agreement"][:3])
                  for s, r in records.items() if s in paired_with and recipe != reference]
        row = [recipe, str(len(records)), cell(mean_of(records, "steps"), ".0f"),
               cell(mean_of(records, "step_seconds"), ".3f"), cell(ppl, ".1f"),
               "-" if plain is None or ppl is None else f"{ppl / plain - 1:+.1%}",
               " ".join(f"{d:+.1%}" for d in per_seed) or "-"]
        row += [cell(mean_of(records, "agreement", k), ".3f") for k in range(exits)]
        row.append(" ".join(f"{100 * d:+.1f}" for d in paired) or "-")
        row += [cell(mean_of(records, key, SHARE_LAYER - 1) if all(key in r for r in records.values()) else None, ".1%")
                for key in SHARE_COLUMNS]
        rows.append("| " + " | ".join(row) + " |")
    return "\n".join(rows)


def decode_table(runs: dict[str, dict[int, dict]]) -> str:
    """One row per decoded run: calibrated DEE (speed-up / ROUGE-L / held-out disagreement), sweep, SSD."""
    found = {k for records in runs.values() for r in records.values() for k in r.get("decode", {})}
    deltas = sorted({float(k.split(" d")[1]) for k in found if k.split(" d")[0] in DECODE_MEASURES}
                    | {float(d) for d in DECODE_DELTAS})
    keys = [f"{m} d{d:g}" for m in DECODE_MEASURES for d in deltas]
    head = ["run", *(f"DEE {k}" for k in keys), f"fastest DEE, ROUGE-L >= {MIN_ROUGE}", "best greedy SSD"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for recipe, records in runs.items():
        for seed, r in records.items():
            d = r.get("decode")
            if d is None:
                continue
            row = [f"{recipe} (seed {seed})"]
            for k in keys:
                c = d.get(k)
                row.append("-" if c is None else f"{c['speedup']:.2f}x / {c['rouge_l']:.2f} / "
                           + cell(c["heldout_disagreement"], ".2%"))
            sweep, ssd = d["dee sweep"], d["ssd"]
            row.append("-" if sweep is None else f"{sweep['speedup']:.2f}x ({sweep['label']}, {sweep['rouge_l']:.2f})")
            row.append("-" if ssd is None else f"{ssd['speedup']:.2f}x ({ssd['label']}, accept "
                       f"{ssd['acceptance_rate']:.2f})")
            rows.append("| " + " | ".join(row) + " |")
    return "\n".join(rows) if len(rows) > 2 else ""
