"""`layerskip report`: tables, plots and the HTML page from a real tiny bench's results.json."""

from __future__ import annotations

import copy
import json
import re

import pytest
from test_bench import shared_tiny_results

from layerskip.bench import write_results
from layerskip.cli import main
from layerskip.errors import DataError
from layerskip.report import PLOT_FILES, load_results, write_report
from layerskip.report.featured import featured_dee
from layerskip.report.format import fmt
from layerskip.report.samples import featured_samples

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_corpus_dir, tiny_tokenizer) -> dict:
    return shared_tiny_results(tmp_path_factory, tiny_corpus_dir, tiny_tokenizer)


@pytest.fixture(scope="module")
def report(results, tmp_path_factory):
    return write_report(results, tmp_path_factory.mktemp("report") / "out")


def markdown_section_rows(markdown: str, heading: str) -> list[list[str]]:
    """Body rows of the first table after `heading` (a line starting with it)."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    table = []
    for line in lines[start + 1 :]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            table.append([cell.strip() for cell in line.strip("|").split(" | ")])
    assert len(table) >= 2 and set(table[1]) == {"---"}, "a table with a header row"
    return table[2:]


def test_every_file_is_written(report):
    assert report.markdown.is_file() and report.html.is_file()
    assert set(report.plots) == set(PLOT_FILES) and not report.missing_plots
    for name, path in report.plots.items():
        assert path.name == PLOT_FILES[name]


def test_plots_are_valid_pngs(report):
    import matplotlib.image

    for path in report.plots.values():
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
        assert image.std() > 0.01  # not a blank canvas


def test_markdown_tables_have_the_right_rows(report, results):
    md = report.markdown.read_text()
    per_layer = markdown_section_rows(md, "## Per-layer evaluation")
    assert [row[0] for row in per_layer] == ["1", "2", "3", "4"]
    assert len(per_layer[0]) == 1 + 6 * 2  # loss, token ppl, word ppl, agree, in top-2, in top-4 for both models
    last = results["models"][0]["per_layer"][-1]
    assert per_layer[-1][4:7] == [fmt(last["agreement"], 3), "1.000", "1.000"]
    assert "**agree, in top-2, in top-4**" in md  # the glossary explains them
    for model in results["models"]:
        rows = markdown_section_rows(md, f"## {model['name']} (")
        assert [row[0] for row in rows] == [c["label"] for c in model["configs"]]
        ar = rows[0]
        assert ar[4] == "1.00×"  # AR's speed-up column
        ssd = [row for row, c in zip(rows, model["configs"]) if c["strategy"] == "ssd" and c["greedy"]]
        assert ssd and all(row[11] == "1.000" for row in ssd)  # greedy SSD's ROUGE-L
        dee_softmax = [row for row, c in zip(rows, model["configs"]) if c["id"] == "dee-softmax-2"]
        assert re.fullmatch(r"0\.\d\d× \(1\.00×\)", dee_softmax[0][-1])  # estimated (free checks)
    costs = markdown_section_rows(md, "## Where a decoding step's time goes")
    assert [row[0] for row in costs] == ["layerskip", "baseline"]
    assert all(row[3].endswith("% of the step") for row in costs)
    headline = markdown_section_rows(md, "## Headline")
    assert [row[0] for row in headline] == ["layerskip", "baseline"]
    assert headline[0][6] == "DEE calibrated (saturation, δ=0.1)"  # calibrated DEE is featured when run
    assert headline[0][3].startswith("SSD E=") and headline[0][4].endswith("×")
    run = markdown_section_rows(md, "# layerskip benchmark report")
    assert run[0] == ["command", "layerskip bench (test)"]
    for name in PLOT_FILES.values():
        assert f"]({name})" in md


def test_html_is_self_contained(report):
    page = report.html.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page), "only data: URIs may be referenced"
    assert "http://" not in page and "https://" not in page and "@import" not in page
    images = re.findall(r'<img class="plot"[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == len(PLOT_FILES)
    import base64

    assert all(base64.b64decode(data)[:8] == PNG_SIGNATURE for data in images)


def test_html_colours_every_sample_token(report, results):
    page = report.html.read_text()
    model = results["models"][0]
    featured = featured_samples(model)
    strategies = [c["strategy"] for c, _ in featured]
    assert strategies[0] == "ar" and "dee" in strategies and strategies.count("ssd") == 2  # greedy and sampled
    expected = sum(len(s["pieces"]) for m in results["models"] for _, samples in featured_samples(m) for s in samples)
    assert page.count('<span class="tok') == expected
    assert re.search(r'class="tok exit-\d" style="background:#[0-9a-f]{6}', page)
    assert 'class="tok accepted"' in page and 'class="tok corrected"' in page
    assert "accepted draft" in page and "corrected by the full model" in page  # the SSD legend
    assert all(f">exit {l}<" in page for l in range(1, 5))  # the DEE legend


def test_featured_dee_prefers_calibrated_then_early_and_faithful(results):
    main, baseline = results["models"]
    assert featured_dee(main)["id"] == "dee-calibrated"
    chosen = featured_dee(baseline)  # no calibration: never the unreachable-threshold (full model) config
    assert chosen["mean_exit_layer"] < baseline["num_layers"]
    early = [c for c in baseline["configs"] if c["strategy"] == "dee" and c["mean_exit_layer"] < 4]
    faithful = [c for c in early if c["rouge_l"] >= 0.9]
    if faithful:
        assert chosen["speedup"] == max(c["speedup"] for c in faithful)
    else:
        assert chosen["mean_exit_layer"] == min(c["mean_exit_layer"] for c in early)


def test_missing_data_leaves_plots_out_and_says_why(results, tmp_path):
    trimmed = copy.deepcopy(results)
    trimmed["models"] = trimmed["models"][:1]
    trimmed["models"][0]["per_layer"] = None
    trimmed["models"][0]["configs"] = [c for c in trimmed["models"][0]["configs"] if c["strategy"] != "ssd"]
    files = write_report(trimmed, tmp_path)
    assert set(files.missing_plots) == {"per_layer", "acceptance"}
    assert not (tmp_path / PLOT_FILES["per_layer"]).exists()
    md = files.markdown.read_text()
    assert "not drawn (no per-layer evaluation in the results)" in md
    assert "not drawn (no greedy SSD configs in the results)" in md


def test_load_results_rejects_what_is_not_a_results_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_results(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "layerskip-bench"}{"second": "document"}')
    with pytest.raises(DataError, match="not valid JSON"):
        load_results(bad)
    bad.write_text(json.dumps({"models": []}))
    with pytest.raises(DataError, match="not a layerskip bench results file"):
        load_results(bad)


def test_cli_report(results, tmp_path, capsys):
    path = write_results(results, tmp_path / "results.json")
    assert main(["report", str(path), "--out", str(tmp_path / "rep")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "rep" / "index.html")
    assert (tmp_path / "rep" / "report.md").is_file()
    assert main(["report", str(tmp_path / "nope.json"), "--out", str(tmp_path / "rep2")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_partial_evaluation_is_labelled(results, tmp_path):
    partial = copy.deepcopy(results)
    for model in partial["models"]:
        model["per_layer_tokens"] = 1000
        for row in model["per_layer"]:
            row["word_ppl"] = None
    md = write_report(partial, tmp_path).markdown.read_text()
    assert "on the first 1,000 tokens of the WikiText-2 test split" in md
    assert markdown_section_rows(md, "## Per-layer evaluation")[0][3] == "–"  # no word perplexity
    full = markdown_section_rows(write_report(results, tmp_path / "full").markdown.read_text(), "## Per-layer evaluation")
    assert full[0][3] != "–"


def test_results_written_before_agreement_was_measured_still_read(results, tmp_path):
    old = copy.deepcopy(results)
    for model in old["models"]:
        for row in model["per_layer"]:
            for key in ("agreement", "last_in_top2", "last_in_top4"):
                del row[key]
    path = write_results(old, tmp_path / "old.json")
    rows = markdown_section_rows(write_report(load_results(path), tmp_path / "rep").markdown.read_text(),
                                 "## Per-layer evaluation")
    assert all(row[4:7] == ["–", "–", "–"] and row[10:13] == ["–", "–", "–"] for row in rows)
    assert rows[0][2] == fmt(results["models"][0]["per_layer"][0]["token_ppl"], 2)  # perplexity still shown


def test_an_output_path_that_is_a_file_is_one_clear_error(results, tmp_path, capsys):
    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps(results))
    taken = tmp_path / "report.txt"
    taken.write_text("keep me")
    assert main(["report", str(results_path), "--out", str(taken)]) == 2
    assert "is a file; give a directory" in capsys.readouterr().err
    assert taken.read_text() == "keep me"


def test_table_cells_round_and_keep_huge_values_readable():
    assert (fmt(None), fmt(float("nan")), fmt(True), fmt(12345)) == ("–", "–", "yes", "12,345")
    assert (fmt(3.14159), fmt(1234.5), fmt(9_999_999.0)) == ("3.14", "1,234", "9,999,999")
    assert fmt(3.196e18) == "3.2e+18"  # a degenerate generation's perplexity, not 19 digits
