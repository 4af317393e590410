"""Helpers shared by the multi-process tests."""


def no_process_left(pids) -> bool:
    """True when none of the given process ids is alive (or a zombie) any more."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().split(") ", 1)[1][0] != "Z":
                    return False
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return True


def max_difference(a, b) -> float:
    """Largest absolute difference between two state dicts with the same keys."""
    return max((a[k] - b[k]).abs().max().item() for k in a)
