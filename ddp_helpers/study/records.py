"""What every study record carries: kind, date, command, method, environment, peak memory, CPU-time shares."""

from __future__ import annotations

from typing import Any

from ..host import environment, peak_rss_mb
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
    """``study_process_peak_rss_mb``: the study's own process so far (it runs the parts in order, so a
    later part's figure covers the earlier ones); workers' peaks are in the parts' rows."""
    return {"kind": kind, "created": now_iso(), "command": command_line(), "quick": quick, "method": method,
            "environment": environment(), "study_process_peak_rss_mb": round(peak_rss_mb(), 1), **data}
