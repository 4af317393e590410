"""What a rank said, as the parent's handlers receive it: the live report, the journal and the
caller's ``on_event`` take an :class:`Event` whoever started the rank (this process, spawn,
torchrun), so it lives apart from the code that starts workers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Event:
    rank: int
    kind: str
    payload: Any


Handler = Callable[[Event], None]  # what receives the events
