"""Facts about this machine and this checkout, for the environment block every record carries."""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
from typing import Any

import torch

from .data import PROJECT_ROOT


def usable_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def peak_rss_mib() -> float:
    """The peak resident memory of this process's own address space so far, in MiB: ``VmHWM`` on Linux.
    Not ``ru_maxrss``: a worker started by (v)fork and exec inherits its parent's peak in it (a spawned
    rank of a 950 MB parent reported 950 MB)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux, elsewhere an estimate


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16() -> str:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16, AMX-BF16 or Arm's BF16), as its
    flags say; without, torch emulates it through float32 and mixed precision is slower, not faster."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith(("flags", "Features"))), [])
    except OSError:
        return "unknown"
    found = sorted(set(flags) & {"avx512_bf16", "amx_bf16", "bf16"})
    return "yes (" + ", ".join(found) + ")" if found else "no"


def memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            kib = int(fh.readline().split()[1])
        return round(kib / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


@functools.cache
def gpu_driver() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def code_version() -> str | None:
    """The git commit of this code (with "+changes" when the working tree differs), if in a checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "ddp_helpers"],
                               cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+changes" if dirty else "")) if sha else None


def code_label(code: str | None) -> str:
    """A record's code version in words: "+changes" (the package differed from the commit) spelt out."""
    return (code or "unknown commit").replace("+changes", ", with uncommitted changes")


def environment() -> dict[str, Any]:
    """Versions and hardware, so that a record can be understood on its own."""
    import numpy
    import torchvision

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "cpu_cores_usable": usable_cores(),
        "cpu_count": os.cpu_count(),
        "memory_gib": memory_gib(),
        "gpus": gpus,
        "cuda": torch.version.cuda if gpus else None,
        "gpu_driver": gpu_driver() if gpus else None,
        "code": code_version(),
    }
