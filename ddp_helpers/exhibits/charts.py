"""The notebooks' charts and tables of training runs. Each function returns a Figure or DataFrame."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ..data import MNIST_MEAN, MNIST_STD, ceil_div
from ..results import median_item
from .colours import PHASE_COLOURS, RUN_COLOURS, text_colour

Runs = dict[str, list[dict]]  # label -> per-epoch history

PHASE_NAMES = {"sync": "sync (all-reduce + waiting)"}  # the phase includes waiting for the slower rank


def history_frame(history: list[dict]) -> pd.DataFrame:
    """One row per epoch with the metrics, times and per-step split (ms) as columns."""
    rows = []
    for row in history:
        flat = {k: v for k, v in row.items() if k != "step_ms"}
        flat.update({f"{phase}_ms": ms for phase, ms in row["step_ms"].items()})
        rows.append(flat)
    return pd.DataFrame(rows).set_index("epoch")


def plot_training_curves(runs: Runs, target: float = 98.0, marks: dict[float, str] | None = None) -> plt.Figure:
    """Loss and validation accuracy per epoch, one colour per run; legends below the axes. Runs after
    the first have hollow, larger markers, so a run that lies on another stays visible around it.
    ``marks``: {epoch position: label} drawn as vertical lines (a crash, say)."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.4))
    for i, ((label, history), color) in enumerate(zip(runs.items(), RUN_COLOURS)):
        df = history_frame(history)
        style = {"color": color, "lw": 1.8 if i == 0 else 1.0, "ms": 5 if i == 0 else 5 + 4 * i,
                 "mfc": color if i == 0 else "none", "mew": 1.5}
        ax_loss.plot(df.index, df["train_loss"], "-o", label=f"{label}: training", **style)
        ax_loss.plot(df.index, df["val_loss"], "--s", label=f"{label}: validation", **style)
        ax_acc.plot(df.index, 100 * df["val_accuracy"], "-o", label=label, **style)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy (%)", title="Validation accuracy")
    ax_acc.axhline(target, color="grey", lw=0.8, ls=":")
    ax_acc.annotate(f"{target:g}%", (0, target), xytext=(4, 3), textcoords="offset points", fontsize=9,
                    color="grey", xycoords=("axes fraction", "data"), ha="left")
    for ax in (ax_loss, ax_acc):
        for x, text in (marks or {}).items():
            ax.axvline(x, color="crimson", lw=1, ls="--")
            ax.annotate(text, (x, 1), xytext=(3, -3), textcoords="offset points", xycoords=("data", "axes fraction"),
                        fontsize=9, color="crimson", va="top")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


def plot_epoch_times(runs: Runs) -> plt.Figure:
    """Training seconds of every epoch (evaluation excluded) per run, and each run's median and range
    over its epochs: one epoch is one measurement, and the epochs show how much they vary."""
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for (label, history), color in zip(runs.items(), RUN_COLOURS):
        df = history_frame(history)
        median = df["epoch_time_s"].median()
        ax.plot(df.index, df["epoch_time_s"], "o-", color=color, lw=1,
                label=f"{label}: median {median:.2f} s (range {df['epoch_time_s'].min():.2f}-"
                      f"{df['epoch_time_s'].max():.2f})")
        ax.axhline(median, color=color, ls=":", lw=1)
    ax.set(xlabel="epoch", ylabel="training time per epoch (s)", ylim=(0, None),
           title="Time per epoch (dots: epochs; dotted: each run's median)")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    fig.tight_layout()
    return fig


def plot_step_breakdown(runs: Runs) -> plt.Figure:
    """Per-step milliseconds by phase in each run's median epoch (the lower middle one of an even
    count), one stacked bar per run: the phases of one epoch add up to its step time."""
    epochs = {label: median_item(history, key=lambda row: row["step_ms"]["total"])["step_ms"]
              for label, history in runs.items()}
    medians = pd.DataFrame({label: {f"{p}_ms": v for p, v in ms.items() if p != "total"}
                            for label, ms in epochs.items()}).T
    totals = pd.Series({label: ms["total"] for label, ms in epochs.items()})
    return plot_phase_bars(medians, "milliseconds per step (each run's median epoch)", totals=totals)


def plot_phase_bars(phases: pd.DataFrame, xlabel: str = "milliseconds per step",
                    title: str = "Where a training step's time goes", totals: pd.Series | None = None,
                    ranges: dict[str, tuple[float, float]] | None = None) -> plt.Figure:
    """Stacked horizontal bars: one row per label, columns '<phase>_ms'; ``totals`` labels each
    bar with the step time its phases add up to; ``ranges`` (label: slowest and fastest round's step
    ms) draws a whisker at each bar's end. Empty phases are left out."""
    labels, names = list(phases.index), [c[:-len("_ms")] for c in phases.columns if c.endswith("_ms")]
    fig, ax = plt.subplots(figsize=(8.5, 1.2 + 0.5 * len(labels)))
    left = np.zeros(len(labels))
    widest = phases[[f"{p}_ms" for p in names]].sum(axis=1).max()
    if ranges:
        widest = max(widest, *(hi for _, hi in ranges.values()))
    for phase in names:
        color, values = PHASE_COLOURS[phase], phases[f"{phase}_ms"].to_numpy(dtype=float)
        if values.max() < 0.005 * widest:  # nothing to draw (a single process synchronises nothing)
            ax.barh(labels[:1], [0], color=color, label=f"{PHASE_NAMES.get(phase, phase)} (≈ 0 here)")
            continue
        ax.barh(labels, values, left=left, color=color, label=PHASE_NAMES.get(phase, phase))
        for y, (x0, v) in enumerate(zip(left, values)):
            if v > 0.11 * widest:  # narrower segments would run their labels together
                ax.text(x0 + v / 2, y, f"{v:.2f}", ha="center", va="center", color=text_colour(color), fontsize=8)
        left += values
    for y, (label, end) in enumerate(zip(labels, left)):
        total, text_at = (end if totals is None else totals[label]), end
        if ranges and label in ranges:
            lo, hi = ranges[label]
            ax.errorbar(total, y, xerr=[[max(total - lo, 0)], [max(hi - total, 0)]], color="black", capsize=3, lw=1)
            text_at = max(end, hi)
        ax.text(text_at + 0.01 * widest, y, f"{total:.2f} ms", va="center", fontsize=9)
    ax.set(xlabel=xlabel + ("; whiskers: the slowest and fastest round" if ranges else ""), xlim=(0, widest * 1.25))
    ax.set_title(title, pad=22)
    ax.invert_yaxis()
    ax.legend(ncol=4, fontsize=9, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def plot_confusion(labels: Sequence[int], predictions: Sequence[int]) -> plt.Figure:
    matrix = pd.crosstab(pd.Series(labels, name="true digit"), pd.Series(predictions, name="predicted digit"))
    fig, ax = plt.subplots(figsize=(6.2, 5))
    sns.heatmap(matrix, annot=True, fmt="d", cmap="Blues", cbar=False, ax=ax, annot_kws={"fontsize": 8})
    ax.set_title("Confusion matrix on the 10,000 test images")
    fig.tight_layout()
    return fig


def image_of(flat_normalised) -> np.ndarray:
    """Undo the normalisation of one 784-vector for display."""
    return (np.asarray(flat_normalised).reshape(28, 28) * MNIST_STD + MNIST_MEAN).clip(0, 1)


def plot_digits(images, titles: Sequence[str], columns: int = 8, title: str = "") -> plt.Figure:
    rows = ceil_div(len(titles), columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.25 * columns, 1.45 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, text in zip(axes.flat, images, titles):
        ax.imshow(image_of(image), cmap="gray_r")
        ax.set_title(text, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_pair_rounds(pairs: dict, colours: dict | None = None) -> plt.Figure:
    """Each interleaved round's epoch-time ratio to the reference (dots; runs side by side, split by
    thin grey lines) and each configuration's pooled median (a line of its colour)."""
    names, rows = list(pairs["summary"]), pairs["rows"]
    colours = colours or dict(zip(names, RUN_COLOURS[1:]))
    fig, ax = plt.subplots(figsize=(8.5, 3.6))
    x = np.arange(1, len(rows) + 1)
    for name in names:
        ax.plot(x, [row["ratios"][name] for row in rows], "o", color=colours[name], ms=6, label=name)
        ax.axhline(pairs["summary"][name]["median"], color=colours[name], ls="-", lw=1.2)
    for i in range(1, len(rows)):
        if rows[i]["run"] != rows[i - 1]["run"]:
            ax.axvline(i + 0.5, color="grey", lw=0.6)
    ax.axhline(1.0, color="black", ls=":", lw=2.5, alpha=0.35, zorder=0)  # wide and pale: a median on it stays seen
    ax.set_xticks(x, [str(row["round"]) for row in rows])
    ax.set(xlabel="round (runs separated by thin lines)", ylabel="epoch time ÷ 1 process's\n(below 1: DDP faster)",
           title=f"Each round's ratio to {pairs['reference']} in the same round (lines: median of all rounds)")
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=len(names), frameon=False)
    fig.tight_layout()
    return fig


def plot_shard_assignment(shards: Sequence[Sequence[int]], n_show: int = 24) -> plt.Figure:
    """The first n_show positions of an epoch's shuffled order: which rank gets each sample."""
    world = len(shards)
    palette = RUN_COLOURS if world <= len(RUN_COLOURS) else sns.color_palette("deep", world)
    fig, ax = plt.subplots(figsize=(12, 2.3))
    for pos in range(n_show):
        rank = pos % world
        ax.add_patch(plt.Rectangle((pos, 0), 0.92, 1, color=palette[rank]))
        ax.text(pos + 0.46, 0.5, str(shards[rank][pos // world]), ha="center", va="center", fontsize=9.5,
                color="white", rotation=90)
    ax.set_title(f"Epoch 0, the first {n_show} positions: rank r takes positions r, r + {world}, r + {2 * world}, ...",
                 fontsize=10, pad=24)
    ax.set(xlim=(0, n_show), ylim=(0, 1), yticks=[], xlabel="position in the epoch's shuffled order "
           "(the number in each cell is the training-sample index)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette[r]) for r in range(world)]
    ax.legend(handles, [f"rank {r}" for r in range(world)], ncol=world, fontsize=9, loc="lower center",
              bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, folder: str | Path, name: str) -> Path:
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
