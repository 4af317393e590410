"""Two diagrams for notebook 01: one DDP step on two ranks, and the system that runs it."""

from __future__ import annotations

import matplotlib.pyplot as plt
import seaborn as sns

from .colours import PHASE_COLOURS


class _Canvas:
    """An empty axes with boxes and arrows in data coordinates."""

    def __init__(self, width: float, height: float, size: tuple[float, float]):
        self.fig, self.ax = plt.subplots(figsize=size)
        self.ax.set(xlim=(0, width), ylim=(0, height))
        self.ax.axis("off")

    def box(self, x, y, w, h, text, color, fontsize=8.5, weight="normal"):
        self.ax.add_patch(plt.Rectangle((x, y), w, h, facecolor=color, alpha=0.22, edgecolor=color, lw=1.5))
        self.ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize, weight=weight)

    def arrow(self, x0, y0, x1, y1, text="", both=False, color="#333333", dashed=False):
        # the colour is explicit: seaborn's theme would draw arrows in its white patch edge colour
        self.ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                         arrowprops=dict(arrowstyle="<->" if both else "->", lw=1.3, color=color, shrinkA=0,
                                         shrinkB=0, ls="--" if dashed else "-"))
        if text:
            self.ax.text((x0 + x1) / 2, (y0 + y1) / 2, text, fontsize=8.5, ha="center", va="center",
                         color=color, bbox=dict(facecolor="white", edgecolor="none", pad=1))


def draw_ddp_step() -> plt.Figure:
    """One DDP training step on two ranks: same weights in, different data, one all-reduce, same weights out."""
    c, palette = _Canvas(11, 5.4, (11, 4.6)), sns.color_palette("deep")
    steps = [("shard of the batch\n(32 samples)", 0.2), ("forward\n(own copy)", 1.9), ("loss\n(mean of 32)", 3.6),
             ("backward\n(local gradient)", 5.3)]
    for rank, y in ((0, 3.6), (1, 0.5)):
        c.ax.text(0.2, y + 1.3, f"rank {rank} (its own process)", fontsize=9, weight="bold")
        for text, x in steps:
            c.box(x, y, 1.45, 1.0, text, palette[rank])
        for (_, x0), (_, x1) in zip(steps, steps[1:]):
            c.arrow(x0 + 1.45, y + 0.5, x1, y + 0.5)
        c.box(9.2, y, 1.6, 1.0, "Adam step\n(identical on\nevery rank)", palette[rank])
        mid = 2.75 if rank == 0 else 2.15
        c.arrow(6.75, y + 0.5, 7.3, mid)
        c.arrow(8.9, mid, 9.2, y + 0.5)
    c.box(7.3, 1.85, 1.6, 1.2, "all-reduce\nsum, / W\n(2.27 MB)", PHASE_COLOURS["sync"], fontsize=9)
    c.ax.set_title("One DDP training step: same weights in, different data, averaged gradient, same weights out",
                   fontsize=10)
    c.fig.tight_layout()
    return c.fig


def draw_system() -> plt.Figure:
    """The processes of a run and what flows between them."""
    c, palette = _Canvas(12, 6.6, (11.5, 5.8)), sns.color_palette("deep")
    c.box(4.2, 4.9, 3.6, 1.5, "parent process\n(notebook cell or CLI)\nlaunch(): checks data and folders;\n"
                              "shows the bar and epoch rows", palette[7], weight="bold")
    c.box(9.0, 4.9, 2.8, 1.5, "results/\nrecord JSON + journal\nJSONL (rows as they come)", palette[8])
    c.arrow(7.8, 5.65, 9.0, 5.65, "save")
    c.box(0.2, 5.0, 3.0, 1.3, "one pipe per rank\nstarted, progress, epoch,\nresult, error", palette[5], fontsize=8)
    c.arrow(3.2, 5.65, 4.2, 5.65, "events")
    for rank, x in ((0, 0.2), (1, 8.0)):
        c.box(x, 0.6, 3.8, 2.4, f"worker rank {rank} (spawned)\nprocess group: gloo (CPU) or NCCL (GPU)\n"
                                "fit(): its shard -> DDP step -> eval" + ("\nhosts the rendezvous store"
                                                                          if rank == 0 else ""), palette[rank])
    c.arrow(5.0, 4.9, 3.0, 3.0, "spawn")
    c.arrow(7.0, 4.9, 9.0, 3.0, "spawn")
    c.arrow(4.0, 2.3, 8.0, 2.3, "all-reduce of gradients (every step)", both=True, color=PHASE_COLOURS["sync"])
    c.arrow(4.0, 1.2, 8.0, 1.2, "TCP store: rendezvous, leaving together", both=True, color="dimgrey", dashed=True)
    c.arrow(1.2, 3.0, 1.2, 5.0, "emit", color=palette[5])
    c.arrow(8.4, 3.0, 2.6, 5.0, "emit", color=palette[5], dashed=True)
    c.ax.set_title("A 2-worker run: who runs what, and what flows where", fontsize=10)
    c.fig.tight_layout()
    return c.fig


def draw_network_lab() -> plt.Figure:
    """The network lab of notebook 06: two nodes on one cable, four on a switch, each link capped."""
    c, palette = _Canvas(12.5, 6.2, (11.5, 5.6)), sns.color_palette("deep")
    c.ax.text(0.1, 5.85, "2 nodes: one cable", fontsize=10, weight="bold")
    for i, x in enumerate((0.1, 3.6)):
        c.box(x, 3.4, 2.4, 2.1, f"node {i}: namespace\neth0 10.77.0.{i + 1}\ntorchrun agent\n+ rank {i} (1 thread)"
                                + ("\nhosts the c10d\nrendezvous" if i == 0 else ""), palette[i], fontsize=8)
    c.arrow(2.5, 4.45, 3.6, 4.45, "veth", both=True)
    c.ax.text(3.05, 3.75, "tbf on\nboth ends", fontsize=9, ha="center", color="dimgrey")
    c.ax.text(6.8, 5.85, "4 nodes: a switch", fontsize=10, weight="bold")
    c.box(8.9, 2.7, 1.6, 1.0, "bridge\n(hub namespace)", palette[7], fontsize=8)
    for i, (x, y) in enumerate(((6.8, 4.6), (10.6, 4.6), (6.8, 0.9), (10.6, 0.9))):
        c.box(x, y, 1.7, 1.0, f"node {i}\n10.77.0.{i + 1}", palette[(0, 1, 2, 5)[i]], fontsize=8)
        c.arrow(x + 0.85, y if y > 3 else y + 1.0, 9.7 + (-0.5 if x < 9 else 0.5), 3.7 if y > 3 else 2.7, both=True)
    c.ax.text(9.7, 0.25, "each cable: tbf on the node's end and on the bridge's end", fontsize=9, ha="center",
              color="dimgrey")
    c.box(0.1, 0.4, 5.9, 2.3, "shared by every node (one machine):\n2 vCPUs, memory, disk (data, records)\n\n"
                              "not shared: the network stack; ranks meet\nonly over the capped links", palette[7],
          fontsize=8.5)
    c.ax.set_title("The network lab: Linux network namespaces as nodes, veth cables capped by a token bucket",
                   fontsize=10)
    c.fig.tight_layout()
    return c.fig
