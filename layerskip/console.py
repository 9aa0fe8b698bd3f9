"""Progress and log lines go to stderr, so that stdout carries only results (text, tables, paths)."""

from __future__ import annotations

import sys


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
