"""The course's colours, one meaning each: runs, ranks and settings take seaborn "deep"'s first three
(blue, orange, green); the phases of a step take others of it (sync red, waiting for it pink), so that
no colour names a phase in one chart and a run in the next."""

from __future__ import annotations

import matplotlib.colors
import seaborn as sns

_DEEP = sns.color_palette("deep")
RUN_COLOURS = _DEEP[:3]
PHASE_COLOURS = {"data": _DEEP[7], "compute": _DEEP[4], "sync": _DEEP[3], "optimizer": _DEEP[8], "wait": _DEEP[6]}


def text_colour(background) -> str:
    """Black or white, whichever reads better on ``background``."""
    r, g, b = matplotlib.colors.to_rgb(background)
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.6 else "white"
