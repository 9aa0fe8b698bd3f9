"""The report's four PNG plots; each returns None when drawn, else why its data is missing.

matplotlib is imported only when a plot is drawn, so the rest of the report needs none.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from layerskip.report.featured import featured_dee

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


def _pyplot():
    """pyplot on the Agg backend: plots are drawn headless, straight to files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax, path: Path, title: str, xlabel: str, ylabel: str, *, grid: dict[str, Any] | None = None,
            legend: dict[str, Any] | None = None) -> None:
    """Label a plot, add its grid and legend, and save it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3, **(grid or {}))
    ax.legend(**({"fontsize": 8} if legend is None else legend))
    _save(fig, path)


def _save(fig, path: Path) -> None:
    """Write the figure as a PNG and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)


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
    _finish(fig, ax, path, "Perplexity of every exit", "exit layer (blocks run)",
            ("word" if use_word else "token") + "-level perplexity (log scale)", grid={"which": "both"},
            legend={})
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
    """A frontier point's annotation: draft layer and k for SSD, measure and thresholds for DEE."""
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
    _finish(fig, ax, path, "Speed-up vs fidelity (greedy)", "speed-up over the same model's AR (median, ×)",
            "ROUGE-L vs AR greedy output")
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
    ax.set_ylim(0, 1.02)
    _finish(fig, ax, path, "SSD acceptance rate vs draft layer", "draft layer E (blocks the draft runs)",
            "acceptance rate of drafted tokens")
    return None


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
    _finish(fig, ax, path, "Where DEE's tokens exit", "exit layer", "fraction of generated tokens",
            grid={"axis": "y"})
    return None


PLOTTERS: dict[str, Callable[[dict[str, Any], Path], str | None]] = {
    "per_layer": plot_per_layer,
    "frontier": plot_frontier,
    "acceptance": plot_acceptance,
    "exit_layers": plot_exit_layers,
}
