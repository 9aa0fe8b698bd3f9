"""index.html: the report's tables, its plots as data URIs and coloured samples, in one self-contained page."""

from __future__ import annotations

import base64
import html
from typing import Any

from layerskip.report.files import ReportFiles
from layerskip.report.format import fmt, html_table
from layerskip.report.plots import PLOT_TITLES
from layerskip.report.samples import featured_samples, legend_html, sample_html
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

# Runs first, in <head>: collects script errors for HTML_SCRIPT to report.
ERROR_HOOK = """
window.__reportErrors = [];
window.addEventListener("error", function (e) { window.__reportErrors.push(String(e.message || e)); });
"""


def plots_html(files: ReportFiles) -> list[str]:
    """Each drawn plot as a figure with its PNG inline, then a line for each plot left out."""
    body = ["<h2>Plots</h2>"]
    for name, path in files.plots.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        body.append(f'<figure><img class="plot" id="plot-{name}" alt="{PLOT_TITLES[name]}" '
                    f'src="data:image/png;base64,{data}"><figcaption>{PLOT_TITLES[name]}</figcaption></figure>')
    for name, why in files.missing_plots.items():
        body.append(f"<p>{PLOT_TITLES[name]}: not drawn ({html.escape(why)}).</p>")
    return body


def model_html(model: dict[str, Any]) -> list[str]:
    """One model's config table and its featured sample generations, tokens coloured."""
    num_layers = model.get("num_layers", 1)
    body = [f"<h2>{html.escape(model['name'])}</h2>",
            f"<p>{html.escape(str(model.get('checkpoint', '')))}: {model.get('num_layers', '–')} layers, "
            f"{fmt(model.get('num_parameters'))} parameters.</p>",
            html_table(CONFIG_HEADER, config_rows(model), "configs"), "<h3>Sample generations</h3>"]
    for config, samples in featured_samples(model):
        body += [f"<h4>{html.escape(config.get('label') or config['id'])}</h4>",
                 legend_html(config["strategy"], num_layers)]
        body += [sample_html(s, config["strategy"], num_layers) for s in samples]
    return body


def write_html(results: dict[str, Any], files: ReportFiles) -> str:
    """The whole page, with no external resources."""
    body = ["<h1>layerskip benchmark report</h1>", html_table(["", ""], run_rows(results), "run"),
            "<h2>Headline</h2>", html_table(HEADLINE_HEADER, headline_rows(results), "headline")]
    body += plots_html(files)
    table = per_layer_table(results["models"])
    if table:
        body += ["<h2>Per-layer evaluation</h2>", f"<p>{html.escape(per_layer_note(results['models']))}</p>",
                 html_table(*table, "per-layer")]
    costs = cost_rows(results["models"])
    if costs:
        body += ["<h2>Where a decoding step's time goes</h2>", f"<p>{html.escape(cost_note(results['models']))}</p>",
                 html_table(COST_HEADER, costs, "costs")]
    for m in results["models"]:
        body += model_html(m)
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
