"""Turn a results.json from `layerskip bench` into a report directory.

Writes DIR/report.md (tables), PNG plots (per-layer perplexity LayerSkip vs plain, speed-up
vs fidelity for DEE and SSD, SSD acceptance vs draft layer, DEE exit layers) and
DIR/index.html, one self-contained page (plots embedded, no external resources) with sample
generations whose tokens are coloured by DEE exit layer or SSD accepted vs corrected.
Reads only the results file: no model, data or GPU needed.

example:
  layerskip report results.json --out report/
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", help="results.json written by `layerskip bench`")
    parser.add_argument("--out", default="report", help="directory to write the report into (default: report)")


def run(args: argparse.Namespace) -> int:
    from layerskip.report import write_report

    files = write_report(args.results, args.out)
    for name, why in files.missing_plots.items():
        print(f"layerskip report: no {name} plot: {why}", file=sys.stderr)
    print(f"layerskip report: wrote {files.markdown}, {len(files.plots)} plots and {files.html}", file=sys.stderr)
    print(files.html)
    return 0
