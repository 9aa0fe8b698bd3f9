"""results.json -> a report directory: markdown tables, PNG plots and one self-contained HTML page.

Reads only the results file written by ``layerskip bench`` (see ``layerskip/bench.py`` for its
schema), so a report can be redrawn anywhere without models, data or torch::

    DIR/report.md               tables (run, per-layer evaluation, speed and fidelity per config)
    DIR/per_layer_ppl.png       perplexity of every exit, LayerSkip vs the plain baseline
    DIR/frontier.png            speed-up vs fidelity (ROUGE-L against AR greedy), DEE and SSD
    DIR/acceptance_vs_e.png     SSD acceptance rate vs draft layer E, one line per draft length
    DIR/exit_layers.png         where DEE's tokens exit
    DIR/index.html              the same tables and plots (embedded as data URIs, no external
                                resources) and sample generations, each token coloured by its
                                DEE exit layer or by SSD accepted vs corrected

A plot whose data the results do not hold (no baseline, no SSD sweep, ...) is left out and the
report says so instead of drawing an empty figure.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerskip.errors import ConfigError, DataError

RESULTS_FORMAT = "layerskip-bench"
PLOT_FILES = {
    "per_layer": "per_layer_ppl.png",
    "frontier": "frontier.png",
    "acceptance": "acceptance_vs_e.png",
    "exit_layers": "exit_layers.png",
}
PLOT_TITLES = {
    "per_layer": "Perplexity of every exit",
    "frontier": "Speed-up vs fidelity",
    "acceptance": "SSD acceptance rate vs draft layer",
    "exit_layers": "DEE exit layers",
}
STRATEGY_STYLE = {"ar": ("black", "s"), "dee": ("tab:blue", "o"), "ssd": ("tab:orange", "^")}
ACCEPTED_COLOUR, CORRECTED_COLOUR = "#b7e4b0", "#f6b26b"


@dataclass
class ReportFiles:
    directory: Path
    markdown: Path
    html: Path
    plots: dict[str, Path] = field(default_factory=dict)  # plot name -> PNG path
    missing_plots: dict[str, str] = field(default_factory=dict)  # plot name -> why it is absent


# ----------------------------------------------------------------------------- loading


def load_results(path: str | Path) -> dict[str, Any]:
    """Read and sanity-check a results.json; problems become a DataError naming the fix."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; write one with `layerskip bench --out {path}`")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); re-run `layerskip bench`") from None
    check_results(results, str(path))
    return results


def check_results(results: Any, name: str = "results") -> None:
    if not isinstance(results, dict) or results.get("format") != RESULTS_FORMAT:
        raise DataError(f"{name} is not a layerskip bench results file (no \"format\": \"{RESULTS_FORMAT}\")")
    models = results.get("models")
    if not isinstance(models, list) or not models:
        raise DataError(f"{name} holds no models; re-run `layerskip bench`")
    for model in models:
        if not isinstance(model, dict) or not isinstance(model.get("configs"), list):
            raise DataError(f"{name}: every model needs a list of configs; re-run `layerskip bench`")


# ----------------------------------------------------------------------------- formatting


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: numbers rounded, missing values as an en dash."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 1e7:  # a degenerate generation's perplexity: digits nobody reads
            return f"{value:.1e}"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def fmt_bytes(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    return f"{value / 2**20:,.1f} MiB"


def ms(value: Any) -> Any:
    return None if value is None else 1000 * value


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


# ----------------------------------------------------------------------------- tables


CONFIG_HEADER = [
    "config", "tokens/s", "ms/token", "TTFT ms", "speed-up", "accept rate", "mean accepted",
    "mean exit layer", "blocks/token", "head evals/token", "short head evals/token", "token agreement", "ROUGE-L", "gen. ppl",
    "peak memory", "est. speed-up (free checks)",
]


def config_rows(model: dict[str, Any]) -> list[list[str]]:
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
    est, free = config.get("estimated_speedup"), config.get("estimated_speedup_free_checks")
    return "–" if est is None or free is None else f"{est:.2f}× ({free:.2f}×)"


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
    c = next(m["step_costs"] for m in models if m.get("step_costs"))
    head = "the full head" if c.get("check_vocab") is None else f"the short head of {c['check_vocab']:,} tokens"
    return (f"One token's decoding step at position {c['position']}, each piece timed {c['repeats']} times "
            f"interleaved with the others ({c['threads']} thread(s)), medians. A check is DEE's softmax-maximum "
            f"confidence through {head}; rest is the step minus its blocks and head. A softmax DEE config's "
            "estimated speed-up charges its exit histogram these costs (l blocks, the checks up to l, "
            "propagation or the full head); in brackets, the same with free checks: the most a cheaper "
            "confidence measure could give at those exits.")


def per_layer_table(models: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]] | None:
    """One row per exit layer, columns per model (token and word perplexity)."""
    with_eval = [m for m in models if m.get("per_layer")]
    if not with_eval:
        return None
    header = ["exit layer"]
    for m in with_eval:
        header += [f"{m['name']} loss", f"{m['name']} token ppl", f"{m['name']} word ppl"]
    depth = max(len(m["per_layer"]) for m in with_eval)
    rows = []
    for i in range(depth):
        layer = next(m["per_layer"][i]["exit_layer"] for m in with_eval if i < len(m["per_layer"]))
        row = [str(layer)]
        for m in with_eval:
            entry = m["per_layer"][i] if i < len(m["per_layer"]) else {}
            row += [fmt(entry.get("loss"), 3), fmt(entry.get("token_ppl"), 2), fmt(entry.get("word_ppl"), 2)]
        rows.append(row)
    return header, rows


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


GLOSSARY = [
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


def per_layer_note(models: list[dict[str, Any]]) -> str:
    m = next(m for m in models if m.get("per_layer"))
    split, tokens = m.get("per_layer_split") or "test", m.get("per_layer_tokens")
    if all(row.get("word_ppl") is not None for row in m["per_layer"]):
        return (f"Loss and perplexity of every exit on the whole WikiText-2 {split} split ({fmt(tokens)} predicted "
                "tokens); word perplexity = exp(total NLL / words), one end-of-line per line counted as a word.")
    return (f"Loss and perplexity of every exit on the first {fmt(tokens)} tokens of the WikiText-2 {split} split "
            "(word perplexity needs the whole split, so it is not given).")


def run_rows(results: dict[str, Any]) -> list[list[str]]:
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


# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_per_layer(results: dict[str, Any], path: Path) -> str | None:
    models = [m for m in results["models"] if m.get("per_layer")]
    if not models:
        return "no per-layer evaluation in the results"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    use_word = all(e.get("word_ppl") is not None for m in models for e in m["per_layer"])
    key = "word_ppl" if use_word else "token_ppl"
    for m in models:
        layers = [e["exit_layer"] for e in m["per_layer"]]
        ax.plot(layers, [e[key] for e in m["per_layer"]], marker="o", label=m["name"])
    ax.set_yscale("log")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("exit layer (blocks run)")
    ax.set_ylabel(("word" if use_word else "token") + "-level perplexity (log scale)")
    ax.set_title("Perplexity of every exit")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    _save(fig, path)
    return None


def pareto_front(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Configs no other config beats on both speed-up and ROUGE-L, fastest first."""
    front, best = [], -1.0
    for c in sorted(configs, key=lambda c: (-c["speedup"], -c["rouge_l"])):
        if c["rouge_l"] > best:
            front.append(c)
            best = c["rouge_l"]
    return front


def short_label(config: dict[str, Any]) -> str:
    opts = config.get("options", {})
    if config["strategy"] == "ssd":
        return f"E{opts.get('draft_layer')} k{opts.get('k')}"
    if opts.get("calibrated"):
        return "calibrated"
    return f"{str(opts.get('measure', ''))[:3]} {opts.get('thresholds')}"


def plot_frontier(results: dict[str, Any], path: Path) -> str | None:
    points = [
        (m["name"], c) for m in results["models"] for c in m["configs"]
        if c.get("greedy", True) and c.get("speedup") is not None and c.get("rouge_l") is not None
        and c["strategy"] in ("dee", "ssd")
    ]
    if not points:
        return "no greedy DEE or SSD configs with speed-up and fidelity in the results"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    names = list(dict.fromkeys(name for name, _ in points))
    fills = {name: i == 0 for i, name in enumerate(names)}
    for name in names:
        for strategy in ("dee", "ssd"):
            cs = [c for n, c in points if n == name and c["strategy"] == strategy]
            if not cs:
                continue
            colour, marker = STRATEGY_STYLE[strategy]
            ax.scatter([c["speedup"] for c in cs], [c["rouge_l"] for c in cs], marker=marker,
                       facecolors=colour if fills[name] else "none", edgecolors=colour,
                       label=f"{name}: {strategy.upper()}")
            front = pareto_front(cs)
            ax.plot([c["speedup"] for c in front], [c["rouge_l"] for c in front], color=colour, lw=0.8,
                    ls="-" if fills[name] else ":")
            if fills[name]:  # label the main model's frontier configs
                for c in front:
                    ax.annotate(short_label(c), (c["speedup"], c["rouge_l"]), fontsize=6, xytext=(3, -8),
                                textcoords="offset points")
    calibrated = [c for _, c in points if c.get("options", {}).get("calibrated")]
    if calibrated:
        ax.scatter([c["speedup"] for c in calibrated], [c["rouge_l"] for c in calibrated], marker="*", s=160,
                   color="tab:red", zorder=3, label="DEE calibrated")
    ax.scatter([1.0], [1.0], marker="s", color="black", label="AR (reference)")
    ax.set_ylim(max(0.0, min(c["rouge_l"] for _, c in points) - 0.05), 1.02)
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("speed-up over the same model's AR (median, ×)")
    ax.set_ylabel("ROUGE-L vs AR greedy output")
    ax.set_title("Speed-up vs fidelity (greedy)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return None


def plot_acceptance(results: dict[str, Any], path: Path) -> str | None:
    lines: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for m in results["models"]:
        for c in m["configs"]:
            if c["strategy"] == "ssd" and c.get("greedy", True) and c.get("acceptance_rate") is not None:
                opts = c.get("options", {})
                lines.setdefault((m["name"], opts.get("k")), []).append((opts.get("draft_layer"), c["acceptance_rate"]))
    if not lines:
        return "no greedy SSD configs in the results"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = ["-", "--", ":", "-."]
    names = list(dict.fromkeys(name for name, _ in lines))
    ks = sorted({k for _, k in lines}, key=lambda k: k or 0)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (name, k), pts in sorted(lines.items(), key=lambda kv: (names.index(kv[0][0]), kv[0][1] or 0)):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colours[ks.index(k) % len(colours)],
                ls=styles[names.index(name) % len(styles)], label=f"{name}, k={k}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("draft layer E (blocks the draft runs)")
    ax.set_ylabel("acceptance rate of drafted tokens")
    ax.set_ylim(0, 1.02)
    ax.set_title("SSD acceptance rate vs draft layer")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return None


def featured_dee(model: dict[str, Any]) -> dict[str, Any] | None:
    """The DEE config a reader most wants to see: calibrated if run, else the fastest that exits early
    with ROUGE-L >= 0.9, else the one that exits earliest."""
    dee = [c for c in model["configs"] if c["strategy"] == "dee" and c.get("exit_layer_counts")]
    if not dee:
        return None
    calibrated = [c for c in dee if c.get("options", {}).get("calibrated")]
    if calibrated:
        return calibrated[0]
    depth = model.get("num_layers") or len(dee[0]["exit_layer_counts"])
    faithful = [c for c in dee if (c.get("rouge_l") or 0) >= 0.9 and (c.get("mean_exit_layer") or depth) < depth]
    if faithful:
        return max(faithful, key=lambda c: c.get("speedup") or 0)
    return min(dee, key=lambda c: (c.get("mean_exit_layer") or depth, -(c.get("speedup") or 0)))


def featured_ssd(model: dict[str, Any], greedy: bool = True) -> dict[str, Any] | None:
    ssd = [c for c in model["configs"] if c["strategy"] == "ssd" and c.get("greedy", True) == greedy]
    return max(ssd, key=lambda c: c.get("speedup") or 0) if ssd else None


def plot_exit_layers(results: dict[str, Any], path: Path) -> str | None:
    chosen = [(m, featured_dee(m)) for m in results["models"]]
    chosen = [(m, c) for m, c in chosen if c is not None]
    if not chosen:
        return "no DEE configs with exit layers in the results"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    width = 0.8 / len(chosen)
    for i, (m, c) in enumerate(chosen):
        counts = c["exit_layer_counts"]  # index l-1 holds tokens that exited after l blocks
        total = sum(counts) or 1
        layers = [l + 1 + (i - (len(chosen) - 1) / 2) * width for l in range(len(counts))]
        ax.bar(layers, [n / total for n in counts], width=width, label=f"{m['name']}: {c.get('label') or c['id']}")
    depth = max(len(c["exit_layer_counts"]) for _, c in chosen)
    ax.set_xticks(range(1, depth + 1))
    ax.set_xlabel("exit layer")
    ax.set_ylabel("fraction of generated tokens")
    ax.set_title("Where DEE's tokens exit")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return None


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)


PLOTTERS: dict[str, Callable[[dict[str, Any], Path], str | None]] = {
    "per_layer": plot_per_layer,
    "frontier": plot_frontier,
    "acceptance": plot_acceptance,
    "exit_layers": plot_exit_layers,
}


# ----------------------------------------------------------------------------- samples


def piece_text(piece: str) -> str:
    """A SentencePiece piece as displayed text ('▁' is a space; EOL is a newline)."""
    return piece.replace("\u2581", " ")


def exit_layer_colour(layer: int, num_layers: int) -> str:
    """Early exits light yellow, the full model dark blue (a viridis-like ramp)."""
    stops = [(253, 231, 37), (94, 201, 98), (33, 145, 140), (59, 82, 139), (68, 1, 84)]
    t = 0.0 if num_layers <= 1 else (layer - 1) / (num_layers - 1)
    x = t * (len(stops) - 1)
    i = min(int(x), len(stops) - 2)
    f = x - i
    rgb = [round(a + (b - a) * f) for a, b in zip(stops[i], stops[i + 1])]
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def text_colour(background: str) -> str:
    r, g, b = (int(background[i : i + 2], 16) for i in (1, 3, 5))
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"


def token_style(strategy: str, info: dict[str, Any], num_layers: int) -> tuple[str, str, str]:
    """(css class, background colour, tooltip) for one generated token."""
    if strategy == "dee" and "exit_layer" in info:
        layer = int(info["exit_layer"])
        return f"tok exit-{layer}", exit_layer_colour(layer, num_layers), f"exit layer {layer}"
    if strategy == "ssd" and "accepted" in info:
        if info["accepted"]:
            return "tok accepted", ACCEPTED_COLOUR, "draft accepted"
        return "tok corrected", CORRECTED_COLOUR, "corrected by the full model"
    return "tok plain", "#eeeeee", "full model"


def sample_html(sample: dict[str, Any], strategy: str, num_layers: int) -> str:
    spans = []
    for piece, info in zip(sample["pieces"], sample.get("token_info") or [{}] * len(sample["pieces"])):
        cls, bg, tip = token_style(strategy, info or {}, num_layers)
        text = html.escape(piece_text(piece)).replace("\n", "↵<br>")
        spans.append(f'<span class="{cls}" style="background:{bg};color:{text_colour(bg)}" title="{tip}">{text}</span>')
    prompt = html.escape(sample.get("prompt_text", ""))
    return f'<p class="sample"><span class="prompt">{prompt}</span>{"".join(spans)}</p>'


def legend_html(strategy: str, num_layers: int) -> str:
    if strategy == "dee":
        items = [(exit_layer_colour(l, num_layers), f"exit {l}") for l in range(1, num_layers + 1)]
    elif strategy == "ssd":
        items = [(ACCEPTED_COLOUR, "accepted draft"), (CORRECTED_COLOUR, "corrected by the full model")]
    else:
        items = [("#eeeeee", "full model")]
    keys = "".join(
        f'<span class="key" style="background:{bg};color:{text_colour(bg)}">{html.escape(label)}</span>'
        for bg, label in items
    )
    return f'<div class="legend">prompt in grey italics; {keys}</div>'


def featured_samples(model: dict[str, Any]) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(config, its samples) for AR, the featured DEE and the fastest greedy and sampled SSD."""
    by_config: dict[str, list[dict[str, Any]]] = {}
    for s in model.get("samples", []):
        by_config.setdefault(s["config"], []).append(s)
    ar = next((c for c in model["configs"] if c["strategy"] == "ar" and c.get("greedy", True)), None)
    chosen = [ar, featured_dee(model), featured_ssd(model, True), featured_ssd(model, False)]
    seen, out = set(), []
    for c in chosen:
        if c is not None and c["id"] not in seen and by_config.get(c["id"]):
            seen.add(c["id"])
            out.append((c, by_config[c["id"]]))
    return out


# ----------------------------------------------------------------------------- writers


def write_markdown(results: dict[str, Any], files: ReportFiles) -> str:
    parts = ["# layerskip benchmark report", "", markdown_table(["", ""], run_rows(results)), "",
             "## Headline", "", markdown_table(HEADLINE_HEADER, headline_rows(results)), "",
             "Featured DEE: the calibrated thresholds if benchmarked, else the fastest sweep config that exits "
             "early with ROUGE-L ≥ 0.9, else the one exiting earliest. Column definitions are at the end.", ""]
    table = per_layer_table(results["models"])
    parts += ["## Per-layer evaluation", ""]
    if table:
        parts += [per_layer_note(results["models"]), "", markdown_table(*table), ""]
    else:
        parts += ["Not in the results.", ""]
    costs = cost_rows(results["models"])
    if costs:
        parts += ["## Where a decoding step's time goes", "", cost_note(results["models"]), "",
                  markdown_table(COST_HEADER, costs), ""]
    for m in results["models"]:
        parts += [f"## {m['name']} ({m.get('checkpoint', '')})", "",
                  f"{m.get('num_layers', '–')} layers, {fmt(m.get('num_parameters'))} parameters. "
                  "Medians over prompts; speed-up is the median of per-prompt ratios to the same model's "
                  "AR at the same temperature; fidelity is against AR greedy output.", "",
                  markdown_table(CONFIG_HEADER, config_rows(m)), ""]
    parts += ["## Plots", ""]
    for name, path in files.plots.items():
        parts += [f"![{PLOT_TITLES[name]}]({path.name})", ""]
    for name, why in files.missing_plots.items():
        parts += [f"- {PLOT_TITLES[name]}: not drawn ({why}).", ""]
    parts += ["## Columns", ""] + [f"- **{term}**: {text}." for term, text in GLOSSARY] + [""]
    return "\n".join(parts)


HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
table.run td { text-align: left; }
figure { display: inline-block; margin: 0.5em; }
figure img { max-width: 560px; border: 1px solid #ddd; }
.sample { font-family: ui-monospace, monospace; font-size: 0.9em; line-height: 1.7; }
.prompt { color: #777; font-style: italic; }
.tok, .key { border-radius: 3px; padding: 1px 1px; white-space: pre-wrap; }
.key { margin: 0 3px; padding: 1px 5px; font-size: 0.85em; }
.legend { margin: 0.3em 0; font-size: 0.9em; }
#status { color: #999; font-size: 0.8em; }
"""

# Runs after every image has loaded: records which plots decoded and any script error, so a
# headless browser's --dump-dom shows whether the page rendered.
HTML_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.querySelectorAll("img.plot"));
  var ok = imgs.filter(function (im) { return im.complete && im.naturalWidth > 0; }).length;
  var status = document.getElementById("status");
  status.dataset.images = String(imgs.length);
  status.dataset.imagesOk = String(ok);
  status.dataset.tokens = String(document.querySelectorAll("span.tok").length);
  status.dataset.errors = String(window.__reportErrors.length);
  status.textContent = "rendered: " + ok + "/" + imgs.length + " plots, " + status.dataset.tokens +
    " tokens" + (window.__reportErrors.length ? ", errors: " + window.__reportErrors.join("; ") : "");
  document.body.dataset.ready = "1";
});
"""

ERROR_HOOK = """
window.__reportErrors = [];
window.addEventListener("error", function (e) { window.__reportErrors.push(String(e.message || e)); });
"""


def write_html(results: dict[str, Any], files: ReportFiles) -> str:
    body = ["<h1>layerskip benchmark report</h1>", html_table(["", ""], run_rows(results), "run"),
            "<h2>Headline</h2>", html_table(HEADLINE_HEADER, headline_rows(results), "headline")]
    body.append("<h2>Plots</h2>")
    for name, path in files.plots.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        body.append(f'<figure><img class="plot" id="plot-{name}" alt="{PLOT_TITLES[name]}" '
                    f'src="data:image/png;base64,{data}"><figcaption>{PLOT_TITLES[name]}</figcaption></figure>')
    for name, why in files.missing_plots.items():
        body.append(f"<p>{PLOT_TITLES[name]}: not drawn ({html.escape(why)}).</p>")
    table = per_layer_table(results["models"])
    if table:
        body += ["<h2>Per-layer evaluation</h2>", f"<p>{html.escape(per_layer_note(results['models']))}</p>",
                 html_table(*table, "per-layer")]
    costs = cost_rows(results["models"])
    if costs:
        body += ["<h2>Where a decoding step's time goes</h2>", f"<p>{html.escape(cost_note(results['models']))}</p>",
                 html_table(COST_HEADER, costs, "costs")]
    for m in results["models"]:
        body += [f"<h2>{html.escape(m['name'])}</h2>",
                 f"<p>{html.escape(str(m.get('checkpoint', '')))}: {m.get('num_layers', '–')} layers, "
                 f"{fmt(m.get('num_parameters'))} parameters.</p>",
                 html_table(CONFIG_HEADER, config_rows(m), "configs"), "<h3>Sample generations</h3>"]
        for config, samples in featured_samples(m):
            body += [f"<h4>{html.escape(config.get('label') or config['id'])}</h4>",
                     legend_html(config["strategy"], m.get("num_layers", 1))]
            body += [sample_html(s, config["strategy"], m.get("num_layers", 1)) for s in samples]
    body.append("<h2>Columns</h2><ul>" + "".join(
        f"<li><b>{html.escape(term)}</b>: {html.escape(text)}.</li>" for term, text in GLOSSARY) + "</ul>")
    body.append('<p id="status">not rendered</p>')
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<title>layerskip benchmark report</title>"
        f"<style>{HTML_STYLE}</style><script>{ERROR_HOOK}</script></head>\n<body>\n"
        + "\n".join(body)
        + f"\n<script>{HTML_SCRIPT}</script>\n</body></html>\n"
    )


def write_report(results: dict[str, Any] | str | Path, out_dir: str | Path) -> ReportFiles:
    """Write report.md, the PNG plots and index.html into out_dir (created if needed)."""
    if not isinstance(results, dict):
        results = load_results(results)
    check_results(results)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory for the report")
    out.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(directory=out, markdown=out / "report.md", html=out / "index.html")
    for name, plotter in PLOTTERS.items():
        path = out / PLOT_FILES[name]
        why = plotter(results, path)
        if why is None:
            files.plots[name] = path
        else:
            files.missing_plots[name] = why
            path.unlink(missing_ok=True)  # a stale plot from an earlier report would mislead
    files.markdown.write_text(write_markdown(results, files), encoding="utf-8")
    files.html.write_text(write_html(results, files), encoding="utf-8")
    return files
