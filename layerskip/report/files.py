"""What one report directory holds: the paths written and the plots left out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ReportFiles:
    """The paths one report wrote, and the plots it left out."""

    directory: Path
    markdown: Path
    html: Path
    plots: dict[str, Path] = field(default_factory=dict)  # plot name -> PNG path
    missing_plots: dict[str, str] = field(default_factory=dict)  # plot name -> why it is absent
