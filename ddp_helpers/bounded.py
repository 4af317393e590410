"""A store whose every call has a deadline.

A ``TCPStore`` client waits without end for a store that stopped answering while the connection
stays up (its host cut off by the network, or frozen): ``get`` and ``check`` never return, whatever
its timeout says (measured with torch 2.14: a server stopped with SIGSTOP, a client timeout of 5 s,
no answer after 300 s). A rank must not wait like that, so the calls it makes while training (the
heartbeat, the look for a stop) and while failing (its record, whom to blame) go through this
wrapper: each runs in a helper thread for at most ``seconds``; past that the store counts as lost,
the call raises ``DistStoreError`` naming it, and every later call raises at once.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any, Callable

import torch.distributed as dist


class BoundedStore:
    """``BoundedStore(store, seconds, name)``: the calls ranks use, each within ``seconds``."""

    def __init__(self, store: dist.Store, seconds: float, name: str = "the job's store"):
        self.store, self.seconds, self.name, self.lost = store, seconds, name, False

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, seconds: float | None = None) -> Any:
        if self.lost:
            raise dist.DistStoreError(f"{self.name} stopped answering earlier; {what} not tried")
        out: dict[str, Any] = {}

        def call() -> None:
            try:
                out["value"] = fn(*args)
            except BaseException as exc:  # handed to the caller below
                out["error"] = exc

        thread = threading.Thread(target=call, name=f"store-{what}", daemon=True)
        thread.start()
        seconds = self.seconds if seconds is None else seconds
        thread.join(seconds)
        if thread.is_alive():  # the thread stays blocked, and the client with it: give the store up
            self.lost = True
            raise dist.DistStoreError(f"{self.name} did not answer within {seconds:g} s ({what}): its host "
                                      f"is unreachable or stopped")
        if "error" in out:
            raise out["error"]
        return out["value"]

    def set(self, key: str, value: str) -> None:
        self._call("set", self.store.set, key, value)

    def get(self, key: str) -> bytes:
        return self._call("get", self.store.get, key)

    def check(self, keys: list[str]) -> bool:
        return self._call("check", self.store.check, keys)

    def add(self, key: str, amount: int) -> int:
        return self._call("add", self.store.add, key, amount)

    def compare_set(self, key: str, expected: str, desired: str) -> bytes:
        return self._call("compare_set", self.store.compare_set, key, expected, desired)

    def wait(self, keys: list[str], timeout: timedelta) -> None:
        """Wait for ``keys`` up to ``timeout`` (the store's answer), and a little longer at most."""
        self._call("wait", self.store.wait, keys, timeout, seconds=timeout.total_seconds() + 5)

    def set_timeout(self, timeout: timedelta) -> None:
        """The deadline of later calls (and the store's own timeout, for its waits)."""
        self.seconds = timeout.total_seconds()
        self.store.set_timeout(timeout)
