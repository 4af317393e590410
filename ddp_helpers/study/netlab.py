"""Several machines on this one: Linux network namespaces joined by rate-limited links.

Each "node" is a network namespace with its own network stack and one interface, ``eth0``,
at 10.77.0.<i+1>. Two nodes are joined by one veth pair; more by a bridge in a hub
namespace. A link's rate is a token-bucket filter (``tc ... tbf``) on both ends, so each
direction carries at most that rate. Processes started in a node see only that node's
network: a torchrun job spread over the nodes talks over the links, as on real machines
(the CPUs and the disk are still this machine's).

Everything built is removed on exit, on an error and on Ctrl-C or SIGTERM; namespaces left
by a lab whose process was killed outright are removed by the next lab.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "ddpnet"
SUBNET = "10.77.0"
RDZV_PORT = 29400  # each node has its own network stack: no other program's port to collide with


class LabUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no ``ip``/``tc``)."""


def unavailable() -> str | None:
    """Why the lab cannot be built on this machine, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, or skip the network part)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found (install iproute2)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if made.returncode != 0:
        return f"'ip netns add' failed: {made.stderr.strip()}"
    return None


def _ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")


def _limit(namespace: str, device: str, rate_mbit: float) -> None:
    """Cap a device's egress at ``rate_mbit``. The bucket holds 1 ms at the rate (at least
    64 KB) and the queue 10 ms: larger queues made a single TCP stream slower here."""
    burst = max(64_000, int(rate_mbit * 1e6 / 8 / 1000))
    _ip("netns", "exec", namespace, "tc", "qdisc", "add", "dev", device, "root", "tbf", "rate",
        f"{rate_mbit:g}mbit", "burst", str(burst), "latency", "10ms")


def remove_stale() -> list[str]:
    """Delete namespaces of earlier labs whose process is gone; return their names."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    removed = []
    for name in re.findall(rf"^({PREFIX}(\d+)-\S+)", listed, flags=re.M):
        if not Path(f"/proc/{name[1]}").exists():
            subprocess.run(["ip", "netns", "del", name[0]], capture_output=True)
            removed.append(name[0])
    return removed


@dataclass
class NodeRun:
    """What one node's command did."""

    node: int
    returncode: int
    log: str


class NetLab:
    """``with NetLab(nodes, rate_mbit) as lab: lab.torchrun([...])``; ``rate_mbit=None``: no limit."""

    def __init__(self, nodes: int, rate_mbit: float | None):
        if nodes < 2:
            raise ValueError(f"a network lab needs at least 2 nodes, got {nodes}")
        self.nodes, self.rate_mbit = nodes, rate_mbit
        tag = f"{PREFIX}{os.getpid()}"
        self.names = [f"{tag}-n{i}" for i in range(nodes)]
        self.hub = f"{tag}-hub" if nodes > 2 else None
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(nodes)]
        self.made: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self._sigterm = None

    # --- build and remove ------------------------------------------------------------------

    def __enter__(self) -> "NetLab":
        reason = unavailable()
        if reason:
            raise LabUnavailable(reason)
        remove_stale()
        self._sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)  # SIGTERM cleans up as Ctrl-C does
        try:
            self._build()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self.made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        for name in self.names:
            self._add_namespace(name)
        if self.hub is None:  # two nodes: one cable
            _ip("link", "add", "eth0", "netns", self.names[0], "type", "veth", "peer", "name", "eth0",
                "netns", self.names[1])
        else:  # a switch: a bridge in the hub, one cable per node
            self._add_namespace(self.hub)
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            for i, name in enumerate(self.names):
                _ip("link", "add", "eth0", "netns", name, "type", "veth", "peer", "name", f"port{i}",
                    "netns", self.hub)
                _ip("-n", self.hub, "link", "set", f"port{i}", "master", "br0")
                _ip("-n", self.hub, "link", "set", f"port{i}", "up")
                if self.rate_mbit:
                    _limit(self.hub, f"port{i}", self.rate_mbit)  # towards the node
        for name, address in zip(self.names, self.addresses):
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
            if self.rate_mbit:
                _limit(name, "eth0", self.rate_mbit)  # from the node

    def __exit__(self, *exc) -> None:
        self.stop()
        for name in reversed(self.made):  # deleting a namespace deletes its end of every cable
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.made = []
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None

    def stop(self) -> None:
        """Stop every command still running in the nodes: its process group, and every process below it
        (torchrun starts each rank in a session of its own)."""
        for proc in self.procs:
            if proc.poll() is None:
                below = descendants(proc.pid)
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                for pid in below:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            proc.wait()
        self.procs = []

    # --- run ----------------------------------------------------------------------------------

    def start(self, args: list[str], logs: Path, nproc_per_node: int = 1, env: dict[str, str] | None = None,
              torchrun_args: tuple[str, ...] = (), rdzv_conf: str = "") -> list[subprocess.Popen]:
        """Start ``torchrun ... ARGS`` on every node (c10d rendezvous hosted by node 0), node i's output
        in ``logs/node{i}.log``; return the agents' processes (each leads its process group)."""
        run_id = f"lab{os.getpid()}_{time.monotonic_ns()}"
        environment = {**os.environ, **(env or {}), "GLOO_SOCKET_IFNAME": "eth0", "PYTHONUNBUFFERED": "1"}
        for i, (name, address) in enumerate(zip(self.names, self.addresses)):
            conf = f"is_host={int(i == 0)}" + (f",{rdzv_conf}" if rdzv_conf else "")  # no hostnames here
            command = ["ip", "netns", "exec", name, sys.executable, "-m", "torch.distributed.run",
                       "--nnodes", str(self.nodes), "--nproc-per-node", str(nproc_per_node),
                       "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{self.addresses[0]}:{RDZV_PORT}",
                       "--rdzv-id", run_id, "--rdzv-conf", conf, "--local-addr", address, *torchrun_args, *args]
            with open(Path(logs) / f"node{i}.log", "w") as log:
                self.procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment,
                                                   start_new_session=True))
        return self.procs

    def cut(self, node: int) -> None:
        """Take a node's link down: its processes run on, cut off from every other node."""
        _ip("-n", self.names[node], "link", "set", "eth0", "down")

    def torchrun(self, args: list[str], nproc_per_node: int = 1, timeout_s: float = 600,
                 env: dict[str, str] | None = None) -> list[NodeRun]:
        """Run ``torchrun ... ARGS`` on every node at once (c10d rendezvous hosted by node 0)
        and wait for all; raise naming the node when one fails or the time runs out."""
        with tempfile.TemporaryDirectory(prefix="ddpnet_logs_") as logs:
            procs = self.start(args, Path(logs), nproc_per_node, env)
            try:
                deadline = time.monotonic() + timeout_s
                while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                    if any(p.poll() not in (None, 0) for p in procs):
                        break  # one node failed: the others get a few seconds to fail too and say why
                    time.sleep(0.2)
                timed_out = time.monotonic() >= deadline
                self.stop_after(0 if timed_out else 5)
                runs = [NodeRun(i, p.returncode, (Path(logs) / f"node{i}.log").read_text(errors="replace"))
                        for i, p in enumerate(procs)]
            finally:
                self.stop()
        failed = [r for r in runs if r.returncode != 0]
        if failed:
            what = "did not finish in time" if timed_out else f"exited with code {failed[0].returncode}"
            tail = "\n".join(failed[0].log.splitlines()[-25:])
            raise RuntimeError(f"node {failed[0].node} of the network lab {what} "
                               f"({self.describe()}):\n{tail}")
        return runs

    def stop_after(self, seconds: float) -> None:
        """Give the remaining nodes ``seconds`` to end by themselves, then stop them."""
        deadline = time.monotonic() + seconds
        while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.stop()

    def describe(self) -> str:
        link = "no limit" if not self.rate_mbit else f"{self.rate_mbit:g} Mb/s"
        return f"{self.nodes} nodes, {'veth pair' if self.hub is None else 'bridge'}, {link}"


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, children first."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as fh:
                children = [int(c) for c in fh.read().split()]
        except OSError:
            children = []
        found += children
        todo += children
    return found


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
