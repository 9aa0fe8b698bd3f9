"""report.md: the run, headline, per-layer, step-cost and per-config tables, plots and glossary."""

from __future__ import annotations

from typing import Any

from layerskip.report.files import ReportFiles
from layerskip.report.format import fmt, markdown_table
from layerskip.report.plots import PLOT_TITLES
from layerskip.report.tables import (
    CONFIG_HEADER,
    COST_HEADER,
    GLOSSARY,
    HEADLINE_HEADER,
    config_rows,
    cost_note,
    cost_rows,
    headline_rows,
    per_layer_note,
    per_layer_table,
    run_rows,
)


def write_markdown(results: dict[str, Any], files: ReportFiles) -> str:
    """The whole report.md: tables, links to the drawn plots, why any were left out, the glossary."""
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
