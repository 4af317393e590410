"""What every study record carries: the header of every record (``results.header``), whether it was
a quick run, its method; and the machine's CPU-time shares while it ran."""

from __future__ import annotations

from typing import Any

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


def record(kind: str, quick: bool, method: dict[str, Any], **data: Any) -> dict[str, Any]:
    return header(kind, quick=quick, method=method, **data)
