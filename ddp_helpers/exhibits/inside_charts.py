"""Notebook 08's charts: one rank's memory by part, ZeRO-1's optimizer state per rank, and the
learning-rate schedules of the time-to-98% settings. Memory takes purples (no phase or run is drawn
in notebook 08); the settings take the run colours notebook 04 gives them."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from ..config import TrainConfig
from ..data import steps_per_epoch
from ..engine import warmup_scale
from .colours import RUN_COLOURS
from .inside import MEMORY_PARTS, MIB


def memory_shades(count: int) -> list:
    """``count`` purples, light to dark, none too pale to see."""
    return sns.color_palette("Purples", count + 2)[2:]


PART_SHADES = dict(zip(MEMORY_PARTS, memory_shades(len(MEMORY_PARTS))))  # the rest of the peak: light grey


def plot_memory_parts(rank: dict) -> plt.Figure:
    """One rank's peak PSS split into the tensors counted from the rank and the rest; below, the parts
    under 5% of the peak (the model's tensors and the activations) enlarged."""
    parts = {k: v / MIB for k, v in rank["bytes"].items()}
    parts["runtime and the rest"] = rank["peak_pss_mib"] - sum(parts.values())
    small = [k for k, v in parts.items() if v < 0.05 * rank["peak_pss_mib"]]
    shades = {**PART_SHADES, "runtime and the rest": "lightgrey"}
    fig, (whole, zoom) = plt.subplots(2, 1, figsize=(8.5, 3.8), gridspec_kw={"hspace": 1.3})
    for ax, names in ((whole, list(parts)), (zoom, small)):
        left = 0.0
        for name in names:  # neighbouring purples are close: every other part is hatched as well
            ax.barh([0], [parts[name]], left=left, color=shades[name], edgecolor="white",
                    hatch="///" if list(parts).index(name) % 2 else None, label=f"{name} ({parts[name]:.1f} MiB)")
            left += parts[name]
        ax.set_yticks([])
    whole.set(xlabel="MiB, rank 0's peak PSS",
              title="One rank's memory: the model is small, the runtime and the data are not")
    zoom.set(xlabel=f"MiB: the sliver at the left above enlarged, the parts under 5% of the peak "
                    f"({sum(parts[k] for k in small):.1f} MiB)")
    whole.legend(fontsize=10, loc="upper center", bbox_to_anchor=(0.5, -3.3), ncol=2, frameon=False)
    return fig


def plot_zero_state(zero: pd.DataFrame, full_state_bytes: int) -> plt.Figure:
    """Optimizer state per rank under ZeroRedundancyOptimizer, against a flat 1/W split and plain Adam."""
    world_sizes = sorted(zero["W"].unique())
    fig, axes = plt.subplots(1, len(world_sizes), figsize=(9, 3), sharey=True, squeeze=False)
    for ax, W in zip(axes[0], world_sizes):
        part = zero[zero["W"] == W].sort_values("rank")
        ax.bar(part["rank"].astype(str), part["state MiB"], color=PART_SHADES["Adam's two moments"],
               label="ZeroRedundancyOptimizer (whole tensors)")
        ax.axhline(full_state_bytes / MIB / W, color="black", ls="-.", label="flat split: 1/W of the state")
        ax.axhline(full_state_bytes / MIB, color="grey", ls=":", label="plain Adam, every rank")
        ax.set(title=f"W = {W}", xlabel="rank")
    axes[0][0].set_ylabel("optimizer state (MiB)")
    fig.legend(*axes[0][0].get_legend_handles_labels(), fontsize=10, loc="lower center", ncol=3,
               bbox_to_anchor=(0.5, -0.12))
    owner = zero[zero["owns"].str.contains("net.0.weight")]["share of Adam's state"].max()
    fig.suptitle(f"ZeRO-1: the owner of the first layer's weight (net.0.weight) keeps {owner:.0%} of the state")
    fig.tight_layout()
    return fig


def plot_lr_schedules(pairs: dict[str, tuple[dict, dict]], train_samples: int = 60000) -> plt.Figure:
    """Learning rate against optimizer step for each pair of time-to-98% settings, both sides drawn:
    the single process solid, the two workers dashed (their steps cover twice the samples)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    longest = 4 * steps_per_epoch(train_samples, 1, 512)
    for (name, sides), colour in zip(pairs.items(), RUN_COLOURS):
        for side, (style, width, alpha) in zip(sides, (("-", 4, 0.35), ("--", 1.5, 1.0))):
            cfg = TrainConfig(**side)
            per_epoch = steps_per_epoch(train_samples, cfg.world_size, cfg.batch_size)
            scale = warmup_scale(cfg.warmup_steps) or (lambda step: 1.0)
            steps = range(longest)
            ax.plot(list(steps), [cfg.lr * scale(s) * cfg.lr_gamma ** ((s // per_epoch) // cfg.lr_step) for s in steps],
                    style, color=colour, lw=width, alpha=alpha,  # solid wide and pale: the dashed stays seen on it
                    label=f"{name}, {'2 workers' if cfg.world_size == 2 else '1 process'}: global batch "
                          f"{cfg.batch_size * cfg.world_size}, lr {cfg.lr:g}, warm-up {cfg.warmup_steps} steps"
                          + (f", local SGD every {cfg.local_sgd_every}" if cfg.sync == "local_sgd" else ""))
    ax.set(xlabel="optimizer step", ylabel="learning rate",
           title="Learning rate against step, each setting's both sides (dashed: 2 workers)")
    fig.tight_layout()
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)  # below the axis label
    return fig
