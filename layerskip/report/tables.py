"""The report's tables as headers and rows of cell strings, and the notes that explain them.

Shared by the markdown and the HTML page, in the order the report shows them.
"""

from __future__ import annotations

from typing import Any

from layerskip.report.featured import featured_dee, featured_ssd
from layerskip.report.format import fmt, fmt_bytes, ms


def run_rows(results: dict[str, Any]) -> list[list[str]]:
    """How the results were made: command, date, machine, versions, prompts, timing."""
    machine, versions, settings = results.get("machine", {}), results.get("versions", {}), results.get("settings", {})
    rows = [
        ["command", " ".join(results.get("command", []))],
        ["date", str(results.get("created", "–"))],
        ["machine", f"{machine.get('cpu', '–')}, {machine.get('cores', '–')} cores, "
                    f"{machine.get('torch_threads', '–')} torch threads, device {machine.get('device', '–')}"
                    + (f" ({machine['gpu']})" if machine.get("gpu") else "")
                    + (f"; load average {machine['load_average'][0]:.2f} at the start" if machine.get("load_average")
                       else "")],
        ["versions", ", ".join(f"{k} {v}" for k, v in versions.items())],
        ["prompts", f"{settings.get('num_prompts', '–')} prompts of {settings.get('prompt_tokens', '–')} tokens "
                    f"from the WikiText-2 test split (seed {settings.get('seed', '–')}), "
                    f"{settings.get('new_tokens', '–')} new tokens each, {settings.get('repeats', 1)} repeat(s), "
                    f"{settings.get('warmup', '–')} warm-up run(s) per config"],
        ["timing", str(settings.get("timing", "–"))],
    ]
    if results.get("process_peak_rss_bytes"):
        rows.append(["process peak RSS", fmt_bytes(results["process_peak_rss_bytes"])])
    return rows


HEADLINE_HEADER = ["model", "final word ppl", "AR tokens/s", "fastest greedy SSD", "SSD speed-up",
                   "SSD acceptance", "featured DEE", "DEE speed-up", "DEE ROUGE-L", "DEE mean exit"]


def headline_rows(results: dict[str, Any]) -> list[list[str]]:
    """One row per model: the numbers a README quotes."""
    rows = []
    for m in results["models"]:
        ar = next((c for c in m["configs"] if c["id"] == "ar"), {})
        ssd, dee = featured_ssd(m) or {}, featured_dee(m) or {}
        final = (m.get("per_layer") or [{}])[-1]
        rows.append([
            m["name"], fmt(final.get("word_ppl") or final.get("token_ppl"), 2), fmt(ar.get("tokens_per_second"), 1),
            ssd.get("label", "–"), fmt(ssd.get("speedup"), 2) + ("×" if ssd else ""), fmt(ssd.get("acceptance_rate"), 3),
            dee.get("label", "–"), fmt(dee.get("speedup"), 2) + ("×" if dee else ""), fmt(dee.get("rouge_l"), 3),
            fmt(dee.get("mean_exit_layer"), 2),
        ])
    return rows


def per_layer_table(models: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]] | None:
    """One row per exit layer, columns per model (loss, token and word perplexity, agreement with the
    last layer); results written before agreement was measured show a dash there."""
    with_eval = [m for m in models if m.get("per_layer")]
    if not with_eval:
        return None
    header = ["exit layer"]
    for m in with_eval:
        header += [f"{m['name']} {column}" for column in ("loss", "token ppl", "word ppl", "agree", "in top-2",
                                                          "in top-4")]
    depth = max(len(m["per_layer"]) for m in with_eval)
    rows = []
    for i in range(depth):
        layer = next(m["per_layer"][i]["exit_layer"] for m in with_eval if i < len(m["per_layer"]))
        row = [str(layer)]
        for m in with_eval:
            entry = m["per_layer"][i] if i < len(m["per_layer"]) else {}
            row += [fmt(entry.get("loss"), 3), fmt(entry.get("token_ppl"), 2), fmt(entry.get("word_ppl"), 2),
                    fmt(entry.get("agreement"), 3), fmt(entry.get("last_in_top2"), 3),
                    fmt(entry.get("last_in_top4"), 3)]
        rows.append(row)
    return header, rows


def per_layer_note(models: list[dict[str, Any]]) -> str:
    """What the per-layer table measured: the whole split, or only its first tokens."""
    m = next(m for m in models if m.get("per_layer"))
    split, tokens = m.get("per_layer_split") or "test", m.get("per_layer_tokens")
    if all(row.get("word_ppl") is not None for row in m["per_layer"]):
        return (f"Loss and perplexity of every exit on the whole WikiText-2 {split} split ({fmt(tokens)} predicted "
                "tokens); word perplexity = exp(total NLL / words), one end-of-line per line counted as a word.")
    return (f"Loss and perplexity of every exit on the first {fmt(tokens)} tokens of the WikiText-2 {split} split "
            "(word perplexity needs the whole split, so it is not given).")


COST_HEADER = ["model", "AR step µs", "block µs", "all blocks", "full head µs", "check µs", "check / block",
               "propagation µs", "rest µs"]


def cost_rows(models: list[dict[str, Any]]) -> list[list[str]]:
    """One row per model with step costs: what each piece of one decoding step costs."""
    rows = []
    for m in models:
        c = m.get("step_costs")
        if not c:
            continue
        rows.append([m["name"], fmt(c["ar_step"], 1), fmt(c["block"], 1),
                     f"{c['num_layers'] * c['block'] / c['ar_step']:.0%} of the step", fmt(c["full_head"], 1),
                     fmt(c["check"], 1), fmt(c["check"] / c["block"], 2), fmt(c["propagate"], 1), fmt(c["rest"], 1)])
    return rows


def cost_note(models: list[dict[str, Any]]) -> str:
    """How the step costs were timed and what the estimated speed-up charges."""
    c = next(m["step_costs"] for m in models if m.get("step_costs"))
    head = "the full head" if c.get("check_vocab") is None else f"the short head of {c['check_vocab']:,} tokens"
    return (f"One token's decoding step at position {c['position']}, each piece timed {c['repeats']} times "
            f"interleaved with the others ({c['threads']} thread(s)), medians. A check is DEE's softmax-maximum "
            f"confidence through {head}; rest is the step minus its blocks and head. A softmax DEE config's "
            "estimated speed-up charges its exit histogram these costs (l blocks, the checks up to l, "
            "propagation or the full head); in brackets, the same with free checks: the most a cheaper "
            "confidence measure could give at those exits.")


CONFIG_HEADER = [
    "config", "tokens/s", "ms/token", "TTFT ms", "speed-up", "accept rate", "mean accepted",
    "mean exit layer", "blocks/token", "head evals/token", "short head evals/token", "token agreement", "ROUGE-L", "gen. ppl",
    "peak memory", "est. speed-up (free checks)",
]


def config_rows(model: dict[str, Any]) -> list[list[str]]:
    """One row per benchmarked config of one model, in CONFIG_HEADER's columns."""
    rows = []
    for c in model["configs"]:
        rows.append([
            c.get("label") or c["id"],
            fmt(c.get("tokens_per_second"), 1),
            fmt(c.get("ms_per_token"), 2),
            fmt(ms(c.get("time_to_first_token")), 1),
            fmt(c.get("speedup"), 2) + ("×" if c.get("speedup") is not None else ""),
            fmt(c.get("acceptance_rate"), 3),
            fmt(c.get("mean_accepted_length"), 2),
            fmt(c.get("mean_exit_layer"), 2),
            fmt(c.get("blocks_per_token"), 2),
            fmt(c.get("head_evals_per_token"), 2),
            fmt(c.get("short_head_evals_per_token"), 2),
            fmt(c.get("token_agreement"), 3),
            fmt(c.get("rouge_l"), 3),
            fmt(c.get("perplexity"), 2),
            fmt_bytes(c.get("peak_memory_bytes")),
            estimate_cell(c),
        ])
    return rows


def estimate_cell(config: dict[str, Any]) -> str:
    """Estimated speed-up, with free checks in brackets."""
    est, free = config.get("estimated_speedup"), config.get("estimated_speedup_free_checks")
    return "–" if est is None or free is None else f"{est:.2f}× ({free:.2f}×)"


GLOSSARY = [  # (column, what it means), the report's last section
    ("agree, in top-2, in top-4", "per-layer evaluation, teacher-forced: the share of predicted tokens whose "
     "exit's top-1 is the last layer's top-1 (what DEE's and SSD's gains depend on; 1 at the last layer), and "
     "the share whose last-layer top-1 is within the exit's two or four highest-scoring tokens"),
    ("tokens/s, ms/token", "median over prompts of new tokens / wall time of the whole generate() call "
     "(prefill included)"),
    ("TTFT", "time to first token (median), from the call to the first committed token"),
    ("speed-up", "median over prompts of (same model's AR ms/token) / (this config's ms/token), AR at the "
     "same temperature, so AR is 1.00× by definition"),
    ("accept rate, mean accepted", "SSD: accepted / drafted tokens over all rounds; accepted drafts per round"),
    ("mean exit layer", "DEE: blocks run per generated token, on average (AR: all L)"),
    ("blocks/token", "block evaluations per new token (SSD counts drafted and verified positions: "
     "L × (drafted + rounds) / tokens)"),
    ("head evals/token", "LM-head evaluations per new token (DEE's confidence checks, SSD's drafts and "
     "verified positions)"),
    ("token agreement, ROUGE-L", "greedy configs only: against the same model's AR greedy output on the "
     "same prompt (agreement pooled over tokens; ROUGE-L F1 over tokens, mean over prompts)"),
    ("gen. ppl", "perplexity of the generated tokens under the full model, given their prompt"),
    ("est. speed-up (free checks)", "softmax DEE only: the speed-up the step-cost table predicts for the "
     "config's exit layers, and in brackets the same with confidence checks that cost nothing"),
    ("peak memory", "GPU: torch.cuda.max_memory_allocated during the config's runs; on CPU only the "
     "process's peak RSS is measurable (shown above)"),
]
