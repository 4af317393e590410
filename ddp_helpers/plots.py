"""The charts and tables the notebooks show. Each function returns a Figure or DataFrame."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .data import MNIST_MEAN, MNIST_STD
from .engine import PHASES

Runs = dict[str, list[dict]]  # label -> per-epoch history


def history_frame(history: list[dict]) -> pd.DataFrame:
    """One row per epoch with the metrics, times and per-step split (ms) as columns."""
    rows = []
    for row in history:
        flat = {k: v for k, v in row.items() if k != "step_ms"}
        flat.update({f"{phase}_ms": ms for phase, ms in row["step_ms"].items()})
        rows.append(flat)
    return pd.DataFrame(rows).set_index("epoch")


def epoch_table(history: list[dict]) -> pd.DataFrame:
    """The per-epoch table shown in the notebooks: accuracies in %, times in s and ms."""
    df = history_frame(history)
    table = pd.DataFrame({
        "lr": df["lr"],
        "train loss": df["train_loss"].round(4),
        "train acc %": (100 * df["train_accuracy"]).round(2),
        "val loss": df["val_loss"].round(4),
        "val acc %": (100 * df["val_accuracy"]).round(2),
        "epoch s": df["epoch_time_s"].round(2),
        "step ms": df["total_ms"].round(3),
    })
    return table


def plot_training_curves(runs: Runs) -> plt.Figure:
    """Loss and validation accuracy per epoch, one line per run."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 3.8))
    for (label, history), color in zip(runs.items(), sns.color_palette("deep")):
        df = history_frame(history)
        ax_loss.plot(df.index, df["train_loss"], "-o", color=color, label=f"{label}: train")
        ax_loss.plot(df.index, df["val_loss"], "--s", color=color, label=f"{label}: validation")
        ax_acc.plot(df.index, 100 * df["val_accuracy"], "-o", color=color, label=label)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy (%)", title="Validation accuracy")
    ax_acc.axhline(98, color="grey", lw=0.8, ls=":")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_epoch_times(runs: Runs) -> plt.Figure:
    """Training seconds per epoch (evaluation excluded), grouped bars per run."""
    frames = [history_frame(h).assign(run=label) for label, h in runs.items()]
    df = pd.concat(frames).reset_index()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    sns.barplot(data=df, x="epoch", y="epoch_time_s", hue="run", ax=ax)
    ax.set(ylabel="training time per epoch (s)", title="Time per epoch")
    fig.tight_layout()
    return fig


def plot_step_breakdown(runs: Runs) -> plt.Figure:
    """Median per-step milliseconds by phase, one stacked bar per run."""
    medians = pd.DataFrame({label: history_frame(h)[[f"{p}_ms" for p in PHASES]].median()
                            for label, h in runs.items()}).T
    return plot_phase_bars(medians, "milliseconds per step (median over epochs)")


def plot_phase_bars(phases: pd.DataFrame, xlabel: str = "milliseconds per step",
                    title: str = "Where a training step's time goes") -> plt.Figure:
    """Stacked horizontal bars: one row per label, columns '<phase>_ms'."""
    labels = list(phases.index)
    fig, ax = plt.subplots(figsize=(8.5, 1.2 + 0.5 * len(labels)))
    left = np.zeros(len(labels))
    widest = phases[[f"{p}_ms" for p in PHASES]].sum(axis=1).max()
    for phase, color in zip(PHASES, sns.color_palette("deep")):
        values = phases[f"{phase}_ms"].to_numpy(dtype=float)
        ax.barh(labels, values, left=left, color=color, label=phase)
        for y, (x0, v) in enumerate(zip(left, values)):
            if v > 0.07 * widest:
                ax.text(x0 + v / 2, y, f"{v:.2f}", ha="center", va="center", color="white", fontsize=8)
        left += values
    for y, total in enumerate(left):
        ax.text(total + 0.01 * widest, y, f"{total:.2f} ms", va="center", fontsize=8)
    ax.set(xlabel=xlabel, xlim=(0, widest * 1.17))
    ax.set_title(title, pad=22)
    ax.invert_yaxis()
    ax.legend(ncol=4, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def plot_allreduce(record: dict, fits: dict) -> plt.Figure:
    """All-reduce time against message size per world size, with the fitted alpha-beta line."""
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for (w, data), color in zip(record["world_sizes"].items(), sns.color_palette("deep")):
        sizes = np.array([int(k) for k in data["seconds"]])
        ax.loglog(sizes, 1000 * np.array(list(data["seconds"].values())), "o", color=color,
                  label=f"W={w}" + (" (oversubscribed: 4 ranks on 2 cores)" if data.get("oversubscribed") else ""))
        grid = np.geomspace(sizes.min(), sizes.max(), 50)
        ab = fits[w]
        ax.loglog(grid, 1000 * (ab.alpha_s + ab.beta_s_per_byte * grid), "-", color=color, lw=1,
                  label=f"fit W={w}: {1e6 * ab.alpha_s:.0f} us + {1e9 * ab.beta_s_per_byte:.2f} ns/B")
    ax.axvline(567_434 * 4, color="grey", ls=":", lw=1)
    ax.text(567_434 * 4, ax.get_ylim()[0] * 1.1, " our gradient", color="grey", fontsize=8)
    ax.set(xlabel="message size (bytes)", ylabel="all-reduce time (ms, median)", title="gloo all-reduce on loopback")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_predicted_vs_measured(table: pd.DataFrame) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.45 * len(table)))
    y = np.arange(len(table))
    ax.barh(y - 0.2, table["predicted ms"], height=0.4, label="predicted (model)", color=sns.color_palette("deep")[0])
    ax.barh(y + 0.2, table["measured ms"], height=0.4, label="measured", color=sns.color_palette("deep")[1])
    for yi, err in zip(y, table["error %"]):
        ax.text(max(table.loc[table.index[yi], ["predicted ms", "measured ms"]]) * 1.02, yi, f"{err:+.0f}%",
                va="center", fontsize=8)
    ax.set_yticks(y, table.index)
    ax.invert_yaxis()
    top = float(table[["predicted ms", "measured ms"]].max().max())
    ax.set(xlabel="milliseconds per step (W=2)", title="Cost model against measurement", xlim=(0, top * 1.15))
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


def plot_speedup(projection: pd.DataFrame, measured: dict[int, float] | None = None) -> plt.Figure:
    """Projected speedup against workers per link (and measured points on this machine)."""
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for (link, df), color in zip(projection.groupby("link", sort=False), sns.color_palette("deep")):
        ax.plot(df.workers, df.speedup, "-o", color=color, label=f"projected: {link}")
    top = projection.workers.max()
    ax.plot([1, top], [1, top], ":", color="grey", lw=1, label="ideal (linear)")
    if measured:
        ax.plot(list(measured), list(measured.values()), "s", color="black", ms=8, label="measured on this machine")
    ax.set(xscale="log", yscale="log", xlabel="workers", ylabel="speedup over 1 worker (throughput)",
           title="Data-parallel speedup at batch 32 per worker")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_accuracy_vs_time(tta: dict, seed: int = 0) -> plt.Figure:
    """Validation accuracy against cumulative training seconds, one line per strategy."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    palette = sns.color_palette("tab10" if len(tta["runs"]) <= 10 else "tab20", len(tta["runs"]))
    workers = {s["name"]: s["config"]["world_size"] for s in tta.get("summary", [])}
    for (name, runs), color in zip(tta["runs"].items(), palette):
        points = next(r for r in runs if r["seed"] == seed)["points"]  # 4 validation passes per epoch
        ax.plot([p["train_s"] for p in points], [100 * p["val_accuracy"] for p in points], ms=3, marker="o",
                ls="--" if workers.get(name, 1) > 1 else "-", color=color, label=name)  # dashed: 2 workers
    ax.axhline(98, color="grey", ls=":", lw=1)
    ax.set(xlabel="training seconds (cumulative, evaluation excluded)", ylabel="validation accuracy (%)",
           title=f"Accuracy against wall time (seed {seed})", ylim=(95, 99))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def plot_vcpu(record: dict) -> plt.Figure:
    """Compute rate per short window relative to one process alone: alone, and each of two at once."""
    fig, ax = plt.subplots(figsize=(8, 3.6))
    alone = [r for o in record["rounds"] for r in o["alone_relative"]]
    together = [r for o in record["rounds"] for r in o["together_relative"]]
    bins = np.arange(0.3, 1.45, 0.05)
    ax.hist(alone, bins=bins, alpha=0.6, label=f"one process alone ({len(alone)} windows)")
    ax.hist(together, bins=bins, alpha=0.6, label=f"each of two at once ({len(together)} windows)")
    ax.axvline(1.0, color="grey", ls=":", lw=1)
    ax.set(xlabel=f"compute rate per {record['method']['window_s']} s window / median rate alone",
           ylabel="windows", title="Do the two virtual cores compute independently?")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_tta_factors(decomposition: dict) -> plt.Figure:
    """The 2-worker vs 2-thread time-to-98% ratio per seed and the three factors it is the product of."""
    rows = pd.DataFrame(decomposition["seeds"]).set_index("seed")
    view = rows[["samples", "compute_ratio", "sync", "ratio"]].rename(columns={
        "samples": "samples needed", "compute_ratio": "compute (per sample, without sync)",
        "sync": "sync (1 - sync share)", "ratio": "ratio = product"})
    fig, ax = plt.subplots(figsize=(8, 3.6))
    view.plot.bar(ax=ax, rot=0, width=0.8)
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    ax.axhline(decomposition["target_ratio"], color="red", ls="--", lw=1, label=f"target {decomposition['target_ratio']}x")
    ax.set(xlabel="seed", ylabel="2-thread / 2-worker",
           title="Time to 98%: where the 2-worker strategy wins and loses", ylim=(0, 1.5))
    ax.legend(fontsize=7, ncol=3, loc="upper center")
    fig.tight_layout()
    return fig


def plot_confusion(labels: Sequence[int], predictions: Sequence[int]) -> plt.Figure:
    matrix = pd.crosstab(pd.Series(labels, name="true digit"), pd.Series(predictions, name="predicted digit"))
    fig, ax = plt.subplots(figsize=(6.2, 5))
    sns.heatmap(matrix, annot=True, fmt="d", cmap="Blues", cbar=False, ax=ax, annot_kws={"fontsize": 7})
    ax.set_title("Confusion matrix on the 10,000 test images")
    fig.tight_layout()
    return fig


def image_of(flat_normalised) -> np.ndarray:
    """Undo the normalisation of one 784-vector for display."""
    return (np.asarray(flat_normalised).reshape(28, 28) * MNIST_STD + MNIST_MEAN).clip(0, 1)


def plot_digits(images, titles: Sequence[str], columns: int = 8, title: str = "") -> plt.Figure:
    rows = -(-len(titles) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.25 * columns, 1.45 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, text in zip(axes.flat, images, titles):
        ax.imshow(image_of(image), cmap="gray_r")
        ax.set_title(text, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_shard_assignment(shards: Sequence[Sequence[int]], n_show: int = 24) -> plt.Figure:
    """The first n_show positions of an epoch's shuffled order: which rank gets each sample."""
    world = len(shards)
    palette = sns.color_palette("deep", world)
    fig, ax = plt.subplots(figsize=(12, 1.9))
    for pos in range(n_show):
        rank = pos % world
        ax.add_patch(plt.Rectangle((pos, 0), 0.92, 1, color=palette[rank]))
        ax.text(pos + 0.46, 0.5, str(shards[rank][pos // world]), ha="center", va="center", fontsize=7,
                color="white", rotation=90)
    ax.set(xlim=(0, n_show), ylim=(0, 1), yticks=[], xlabel="position in the epoch's shuffled order "
           "(the number in each cell is the training-sample index)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette[r]) for r in range(world)]
    ax.legend(handles, [f"rank {r}" for r in range(world)], ncol=world, fontsize=8, loc="lower center",
              bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def draw_ddp_step() -> plt.Figure:
    """A diagram of one DDP training step on two ranks."""
    fig, ax = plt.subplots(figsize=(11, 4.6))
    ax.set(xlim=(0, 11), ylim=(0, 5.4))
    ax.axis("off")
    palette = sns.color_palette("deep")

    def box(x, y, w, h, text, color, fontsize=8.5):
        ax.add_patch(plt.Rectangle((x, y), w, h, facecolor=color, alpha=0.25, edgecolor=color, lw=1.5))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize)

    def arrow(x0, y0, x1, y1):
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="->", lw=1.2))

    steps = [("shard of batch\n(32 samples)", 0.2), ("forward\nMLP copy", 1.9), ("loss\n(mean of 32)", 3.6),
             ("backward\nlocal gradient", 5.3)]
    for rank, y in ((0, 3.6), (1, 0.5)):
        ax.text(0.2, y + 1.3, f"rank {rank}  (its own process and thread)", fontsize=9,
                weight="bold")
        for text, x in steps:
            box(x, y, 1.45, 1.0, text, palette[rank])
        for (_, x0), (_, x1) in zip(steps, steps[1:]):
            arrow(x0 + 1.45, y + 0.5, x1, y + 0.5)
        box(9.2, y, 1.6, 1.0, "Adam step\n(identical on\nevery rank)", palette[rank])
        arrow(6.75, y + 0.5, 7.3, 2.7 if rank == 0 else 2.2)
        arrow(8.9, 2.7 if rank == 0 else 2.2, 9.2, y + 0.5)
    box(7.3, 1.85, 1.6, 1.2, "all-reduce\nsum / W\n(2.27 MB)", palette[2], fontsize=9)
    ax.text(5.5, 5.25, "One DDP training step: same weights in, different data, averaged gradient, same weights out",
            ha="center", fontsize=10)
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, folder: str | Path, name: str) -> Path:
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
