"""What every study record carries: kind, date, command, method, environment, CPU-time shares."""

from __future__ import annotations

import statistics
from typing import Any, Callable, Sequence

from ..host import environment
from ..results import command_line, now_iso


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


def record(kind: str, quick: bool, method: dict[str, Any], **data: Any) -> dict[str, Any]:
    return {"kind": kind, "created": now_iso(), "command": command_line(), "quick": quick, "method": method,
            "environment": environment(), **data}


def median_item(items: Sequence, key: Callable[[Any], float]) -> Any:
    """The item whose key is the median (the lower middle one of an even count; the first such item),
    whole: a round or an epoch whose parts add up to its total, which per-part medians need not."""
    middle = statistics.median_low([key(item) for item in items])
    return next(item for item in items if key(item) == middle)
