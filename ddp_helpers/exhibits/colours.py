"""The course's colours, one meaning each: runs, ranks and settings take seaborn "deep"'s first three
(blue, orange, green); the phases of a step take others of it (sync red, the waiting within it pale red), so that
no colour names a phase in one chart and a run in the next. Links between nodes take shades of teal, a hue no
other meaning uses, dark for slow and light for fast. Measurements without a run to tell apart are black
(predictions beside them white); grey is kept for reference lines and annotations."""

from __future__ import annotations

import matplotlib.colors
import seaborn as sns

_DEEP = sns.color_palette("deep")
RUN_COLOURS = _DEEP[:3]
MEDIAN_COLOUR = _DEEP[9]  # a bar that stands for the median of rounds drawn as dots
PHASE_COLOURS = {"data": _DEEP[5], "compute": _DEEP[4], "sync": _DEEP[3], "optimizer": _DEEP[8]}
PHASE_COLOURS["wait"] = tuple(1 - 0.4 * (1 - c) for c in PHASE_COLOURS["sync"])  # part of sync: its red, paler
LINK_SHADES = ("#022c2b", "#127a74", "#40bca6", "#93d9ca")  # links, slowest first


def text_colour(background) -> str:
    """Black or white, whichever reads better on ``background``."""
    r, g, b = matplotlib.colors.to_rgb(background)
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.6 else "white"
