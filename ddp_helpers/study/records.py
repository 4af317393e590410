"""What every study record carries: the header of every record (``results.header``), whether it was
a quick run, its method; and the machine's CPU-time shares while it ran."""

from __future__ import annotations

import statistics
from typing import Any, Sequence, TypeVar

from ..results import header


def cpu_ticks() -> dict[str, int] | None:
    """The machine's cumulative CPU time by state (Linux /proc/stat, in clock ticks)."""
    try:
        with open("/proc/stat") as fh:
            values = [int(v) for v in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return dict(zip(("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"), values))


def cpu_shares(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, float] | None:
    """Where the machine's CPU time went between two readings; a large ``steal`` share means the
    hypervisor gave our cores to someone else, and the timings suffer."""
    if not before or not after:
        return None
    delta = {k: after[k] - before[k] for k in before}
    total = sum(delta.values()) or 1
    return {k: round(v / total, 4) for k, v in delta.items() if k in ("user", "system", "idle", "steal")}


T = TypeVar("T")


def rotated(items: Sequence[T], r: int) -> list[T]:
    """Round r's order: the items rotated by r places, so that each goes first in turn."""
    shift = r % len(items)
    return [*items[shift:], *items[:shift]]


def per_round(ratios: list[float]) -> dict[str, Any]:
    """A ratio taken round by round, as the records quote it: the median of the rounds, their range, and the rounds."""
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": ratios}


def record(kind: str, quick: bool, method: dict[str, Any], **data: Any) -> dict[str, Any]:
    return header(kind, quick=quick, method=method, **data)
