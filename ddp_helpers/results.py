"""Self-describing result records: what ran, where, with what, and what came out."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .data import PROJECT_ROOT

RESULTS_DIR = PROJECT_ROOT / "results"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            kib = int(fh.readline().split()[1])
        return round(kib / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


def cpu_ticks() -> dict[str, int] | None:
    """The machine's cumulative CPU time by state (Linux /proc/stat, in clock ticks)."""
    try:
        with open("/proc/stat") as fh:
            values = [int(v) for v in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return dict(zip(("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"), values))


def cpu_shares(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, float] | None:
    """Where the machine's CPU time went between two :func:`cpu_ticks` readings. A large
    ``steal`` share means the hypervisor gave our cores to someone else: timings then suffer."""
    if not before or not after:
        return None
    delta = {k: after[k] - before[k] for k in before}
    total = sum(delta.values()) or 1
    return {k: round(v / total, 4) for k, v in delta.items() if k in ("user", "system", "idle", "steal")}


def environment() -> dict[str, Any]:
    """Versions and hardware, so a record can be understood on its own."""
    import numpy
    import torch
    import torchvision

    from .dist import usable_cores

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_cores_usable": usable_cores(),
        "cpu_count": os.cpu_count(),
        "memory_gib": memory_gib(),
        "gpus": gpus,
        "cuda": torch.version.cuda if gpus else None,
    }


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def save_json(record: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a record as indented JSON (atomically: temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def load_json(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def command_line() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])
