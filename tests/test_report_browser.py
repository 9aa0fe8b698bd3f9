"""The report's index.html in a real browser: headless Chromium loads it without script
errors, decodes every plot and shows the coloured tokens.

Needs Debian's ``chromium`` package (``apt-get install -y chromium``, done by .ci/run); the
tests are skipped, saying so, only when no Chromium binary is installed.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_bench import shared_tiny_results

from layerskip.report import PLOT_FILES, write_report

CHROMIUM = next(
    (p for p in (os.environ.get("CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium",
                 shutil.which("chromium-browser"), shutil.which("google-chrome")) if p and Path(p).is_file()),
    None,
)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary (apt-get install -y chromium)")


def chromium(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run headless Chromium on a local page, isolated, with no network features."""
    args = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", *extra, page.resolve().as_uri(),
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def status_of(dom: str) -> dict[str, str]:
    """The data-* attributes the page's script wrote on #status after rendering."""
    tag = re.search(r'<p id="status"([^>]*)>', dom)
    assert tag, "the #status element is missing from the rendered DOM"
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', tag.group(1)))
    return {k: html.unescape(v) for k, v in attrs.items()}


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_corpus_dir, tiny_tokenizer):
    results = shared_tiny_results(tmp_path_factory, tiny_corpus_dir, tiny_tokenizer)
    return write_report(results, tmp_path_factory.mktemp("browser") / "report")


def test_page_renders_plots_and_tokens_without_errors(report, tmp_path):
    result = chromium(report.html, tmp_path / "profile", "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    assert re.search(r'<body[^>]*data-ready="1"', dom), "the page's script did not finish"
    status = status_of(dom)
    assert status["errors"] == "0", status
    assert status["images"] == status["images-ok"] == str(len(PLOT_FILES)), status  # every plot decoded
    page = report.html.read_text()
    assert int(status["tokens"]) == page.count('<span class="tok') > 0
    assert "rendered: 4/4 plots" in dom


def test_a_broken_page_is_caught(report, tmp_path):
    """The check above can fail: a script error and an undecodable image are both reported."""
    page = report.html.read_text()
    page = page.replace('src="data:image/png;base64,', 'src="data:image/png;base64,AAAA', 1)
    page = page.replace("</body>", "<script>undefinedFunction();</script></body>")
    broken = tmp_path / "broken.html"
    broken.write_text(page)
    result = chromium(broken, tmp_path / "profile", "--dump-dom")
    status = status_of(result.stdout)
    assert status["errors"] == "1" and "undefinedFunction" in result.stdout
    assert int(status["images-ok"]) == len(PLOT_FILES) - 1


def test_screenshot_shows_coloured_tokens(report, tmp_path):
    import matplotlib.image
    import numpy as np

    shot = tmp_path / "shot.png"
    result = chromium(report.html, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,6000",
                      "--hide-scrollbars")
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    pixels = (matplotlib.image.imread(shot)[..., :3] * 255).round().astype(np.int16)
    colours = {tuple(c) for c in pixels.reshape(-1, 3)[:: 7].tolist()}
    # the SSD legend/tokens' green and orange, and the DEE ramp's dark end, are on screen
    for hex_colour in ("#b7e4b0", "#f6b26b", "#440154"):
        rgb = tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
        assert any(max(abs(a - b) for a, b in zip(rgb, c)) <= 3 for c in colours), hex_colour
