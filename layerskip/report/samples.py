"""Sample generations as HTML, each token coloured by its DEE exit layer or SSD accepted vs corrected."""

from __future__ import annotations

import html
from typing import Any

from layerskip.report.featured import featured_dee, featured_ssd

ACCEPTED_COLOUR, CORRECTED_COLOUR = "#b7e4b0", "#f6b26b"
PLAIN_COLOUR = "#eeeeee"  # a token the full model wrote


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
    """Black or white, whichever reads better on a #rrggbb background."""
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
    return "tok plain", PLAIN_COLOUR, "full model"


def sample_html(sample: dict[str, Any], strategy: str, num_layers: int) -> str:
    """One sample: its prompt in grey, then every generated token in its colour."""
    spans = []
    for piece, info in zip(sample["pieces"], sample.get("token_info") or [{}] * len(sample["pieces"])):
        cls, bg, tip = token_style(strategy, info or {}, num_layers)
        text = html.escape(piece_text(piece)).replace("\n", "↵<br>")
        spans.append(f'<span class="{cls}" style="background:{bg};color:{text_colour(bg)}" title="{tip}">{text}</span>')
    prompt = html.escape(sample.get("prompt_text", ""))
    return f'<p class="sample"><span class="prompt">{prompt}</span>{"".join(spans)}</p>'


def legend_html(strategy: str, num_layers: int) -> str:
    """The key to the token colours of one strategy's samples."""
    if strategy == "dee":
        items = [(exit_layer_colour(l, num_layers), f"exit {l}") for l in range(1, num_layers + 1)]
    elif strategy == "ssd":
        items = [(ACCEPTED_COLOUR, "accepted draft"), (CORRECTED_COLOUR, "corrected by the full model")]
    else:
        items = [(PLAIN_COLOUR, "full model")]
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
