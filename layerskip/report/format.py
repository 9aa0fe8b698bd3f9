"""Table cells and tables: numbers as the report prints them, in markdown and in HTML."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any


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
    """Bytes as MiB, or an en dash."""
    if not isinstance(value, (int, float)):
        return "–"
    return f"{value / 2**20:,.1f} MiB"


def ms(value: Any) -> Any:
    """Seconds as milliseconds, None kept."""
    return None if value is None else 1000 * value


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
