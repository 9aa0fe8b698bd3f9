"""results.json -> a report directory: markdown tables, PNG plots and one self-contained HTML page.

Reads only the results file written by ``layerskip bench`` (see ``docs/results_schema.md`` for its
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

Where things live: load (read and check results.json), featured (the configs worth showing),
format and tables (cells, rows, notes), plots, samples (coloured tokens), and the two writers,
markdown_page and html_page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from layerskip.errors import ConfigError
from layerskip.report.featured import featured_dee, featured_ssd
from layerskip.report.files import ReportFiles
from layerskip.report.format import fmt
from layerskip.report.html_page import write_html
from layerskip.report.load import RESULTS_FORMAT, check_results, load_results
from layerskip.report.markdown_page import write_markdown
from layerskip.report.plots import PLOT_FILES, PLOT_TITLES, PLOTTERS
from layerskip.report.samples import featured_samples

__all__ = [
    "PLOT_FILES", "PLOT_TITLES", "RESULTS_FORMAT", "ReportFiles", "check_results", "featured_dee",
    "featured_samples", "featured_ssd", "fmt", "load_results", "write_html", "write_markdown", "write_report",
]


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
