"""The study's charts: each takes a record (or a table made from one) and returns a Figure."""

from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import seaborn as sns

from ..exhibits.colours import LINK_SHADES, MEDIAN_COLOUR, RUN_COLOURS as SETTING_COLOURS


def _legend_below(ax, ncol: int = 2) -> None:
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=ncol, frameon=False)


def _finish_link_chart(fig, ax, y_format: str, ncol: int) -> plt.Figure:
    """Plain numbers on a log y axis, the legend below, a tight layout."""
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: format(v, y_format)))
    _legend_below(ax, ncol=ncol)
    fig.tight_layout()
    return fig


def _plain_log_ticks(axis) -> None:
    """A log axis labelled at 1, 2 and 5 of each decade, as plain numbers."""
    axis.set_major_locator(mticker.LogLocator(subs=(1, 2, 5)))
    axis.set_major_formatter(mticker.FormatStrFormatter("%g"))
    axis.set_minor_formatter(mticker.NullFormatter())


def plot_allreduce(record: dict) -> plt.Figure:
    """All-reduce time against message size per world size, with the fitted alpha + beta * bytes."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    styles = ("-", "--", ":", "-.")  # world sizes: filled then hollow points, solid then dashed fits; all black
    for i, (w, data) in enumerate(record["world_sizes"].items()):
        sizes = np.array([int(k) for k in data["seconds"]])
        label = f"{w} ranks" + (" (oversubscribed: more ranks than cores)" if data["oversubscribed"] else "")
        ms = 1000 * np.array(list(data["seconds"].values()))
        rounds = data.get("round_medians_s")  # each round's median: the bar spans the slowest and fastest
        yerr = None if rounds is None else np.clip([ms - 1000 * np.array([min(rounds[k]) for k in data["seconds"]]),
                                                    1000 * np.array([max(rounds[k]) for k in data["seconds"]]) - ms], 0, None)
        ax.errorbar(sizes, ms, yerr=yerr, fmt="o", color="black", mfc="black" if i == 0 else "white",
                    ecolor="grey", elinewidth=1, capsize=2, label=label + ("" if rounds is None else ", rounds' range"))
        grid = np.geomspace(sizes.min(), sizes.max(), 50)
        ax.loglog(grid, 1000 * (data["alpha_s"] + data["beta_s_per_byte"] * grid), styles[i % 4], color="black", lw=1,
                  label=f"fit: {1e6 * data['alpha_s']:.0f} µs + "
                        f"{1e9 * data['beta_s_per_byte']:.2f} ns/byte")
    grad = record["gradient_bytes"]
    ax.axvline(grad, color="grey", ls=":", lw=1)
    ax.annotate(f"our gradient\n({grad / 1e6:.2f} MB)", (grad, ax.get_ylim()[1]), xytext=(-4, -4),
                textcoords="offset points", ha="right", va="top", fontsize=9, color="grey")
    ax.set(xlabel="message size (bytes)", ylabel="all-reduce time (ms, median)", title="gloo all-reduce on loopback")
    _plain_log_ticks(ax.yaxis)  # enough labels to read a point off
    _legend_below(ax)
    fig.tight_layout()
    return fig


def plot_predicted_vs_measured(table: pd.DataFrame) -> plt.Figure:
    """Cost model against measurement; cases whose batch the inputs were carried to are hatched."""
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.5 * len(table)))
    y = np.arange(len(table))
    hatch = ["" if measured else "//" for measured in table["batch measured"]]
    ax.barh(y - 0.2, table["predicted ms"], height=0.4, color="white", edgecolor="black", hatch=hatch,
            label="predicted")
    ax.barh(y + 0.2, table["measured ms"], height=0.4, color="black", label="measured")
    top = float(table[["predicted ms", "measured ms"]].max().max())
    for yi, (p, m, err) in enumerate(zip(table["predicted ms"], table["measured ms"], table["error %"])):
        ax.text(max(p, m) + 0.01 * top, yi, f"{err:+.0f}%", va="center", fontsize=9)
    ax.set_yticks(y, table.index)
    ax.invert_yaxis()
    ax.set(xlabel="milliseconds per step, 2 workers (hatched: batch not measured for the inputs)",
           title="Cost model against measurement", xlim=(0, top * 1.15))
    _legend_below(ax)
    fig.tight_layout()
    return fig


def plot_speedup(projection: pd.DataFrame, measured: float | None = None,
                 lab: pd.DataFrame | None = None) -> plt.Figure:
    """Projected throughput speedup against workers, per link; the point measured on one machine,
    and (``lab``: link, workers, speedup) points from all-reduces measured between lab nodes."""
    fig, ax = plt.subplots(figsize=(7.5, 5.6))
    def color(link: str):  # a rate takes its link's shade from notebook 06; 100 Gb/s, faster than any, the lightest
        return LINK_COLOURS.get(link.removeprefix("lab ").removesuffix(" Ethernet"), LINK_COLOURS["no limit"])

    colors = {link: color(link) for link in projection.link.unique()}
    for link, df in projection.groupby("link", sort=False):
        ax.plot(df.workers, df.speedup, "-o", color=colors[link], ms=4, label=f"projected: {link}")
    if lab is not None:
        for link, df in lab.groupby("link", sort=False):
            ax.plot(df.workers, df.speedup, "D", color=color(link), mfc="white", mew=1.8, ms=8,
                    label=f"with the all-reduce measured: {link}")
    workers = sorted(projection.workers.unique())
    ax.plot(workers, workers, ":", color="grey", lw=1, label="ideal (linear)")
    if measured is not None:
        ax.plot([2], [measured], "s", color="black", ms=8, label="measured here: 2 workers against one 1-thread worker (2 vCPUs)")
    ax.set(xscale="log", yscale="log", xlabel="workers", ylabel="speedup over 1 worker\n(samples per second)",
           title="Data-parallel speedup at batch 32 per worker")
    ax.set_xticks(workers, [str(w) for w in workers])
    low = min(projection.speedup.min(), lab.speedup.min() if lab is not None else 1.0)
    ticks = [t for t in (0.05, 0.1, 0.2, 0.5, 1, 2, 4, 8, 16, 32, 64) if t >= low / 2]
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    _legend_below(ax)
    fig.tight_layout()
    return fig


def _strategy(config: dict) -> str:
    """' (DDP)' or ' (local SGD, averaging every k steps)' for a two-worker setting; '' for one process."""
    if config["world_size"] == 1:
        return ""
    if config.get("sync") == "local_sgd":
        return f" (local SGD, averaging every {config['local_sgd_every']} steps)"
    return " (DDP)"


def plot_accuracy_vs_time(tta: dict, seed: int = 0) -> plt.Figure:
    """Validation accuracy against training seconds for the six settings of one seed."""
    fig, ax = plt.subplots(figsize=(8.5, 4.6))
    palette, first = SETTING_COLOURS, []  # one colour per pair of settings, as in notebook 08
    for i, (name, runs) in enumerate(tta["runs"].items()):
        points = next(r for r in runs if r["seed"] == seed)["points"]
        first.append(min(p["train_s"] for p in points if p["val_accuracy"] >= 0.93))  # the first point in view
        two = name.startswith("2 workers")
        ax.plot([p["train_s"] for p in points], [100 * p["val_accuracy"] for p in points], marker="o", ms=3,
                ls="--" if two else "-", color=palette[i // 2], label=name + _strategy(tta["summary"][name]["config"]))
    target = 100 * tta["method"]["target"]
    ax.axhline(target, color="grey", ls=":", lw=1)
    ax.set_xscale("log")  # the fast settings crowd the first seconds on a linear axis
    ax.set_xlim(left=0.8 * min(first))
    ax.annotate(f"target {target:g}%", (ax.get_xlim()[0], target), xytext=(4, 3), textcoords="offset points",
                fontsize=9, color="grey")  # at the left, where every curve is still below it
    _plain_log_ticks(ax.xaxis)
    ax.set(xlabel="training seconds (evaluation excluded; log scale)", ylabel="validation accuracy (%; the axis starts at 93)",
           title=f"Accuracy against training time (random seed {seed}; dashed: 2 workers)", ylim=(93, 99))
    _legend_below(ax)
    fig.tight_layout()
    return fig


def plot_tta_factors(pairs: dict) -> plt.Figure:
    """Per pair of settings: the time ratio and the three factors it is the product of. Bars: geometric
    means over the seeds, so the ratio's bar is exactly the product of the factors' bars; dots: seeds."""
    names = {"samples": "samples needed", "compute": "time per sample, no sync", "sync": "1 - sync share",
             "ratio": "ratio = product"}
    per_seed = {pair: pd.DataFrame(p["per_seed"])[list(names)] for pair, p in pairs.items()}
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width, palette = 0.2, sns.color_palette("Purples", len(names) + 1)[1:]  # the ratio, the product, darkest
    for i, (pair, seeds) in enumerate(per_seed.items()):
        for j, (column, label) in enumerate(names.items()):
            x = i + (j - 1.5) * width
            ax.bar(x, float(np.exp(np.log(seeds[column]).mean())), width * 0.95, color=palette[j],
                   label=label if i == 0 else None)
            ax.plot([x] * len(seeds), seeds[column], "o", color="black", ms=3)
    ax.set_xticks(range(len(per_seed)), list(per_seed))
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    ax.set(xlabel="", ylabel="single process ÷ two workers\n(> 1 favours two workers)", ylim=(0, 1.6),
           title="Time to 98%: where two workers gain (above 1) and lose (below 1)\n"
                 "(bars: geometric mean over seeds, so ratio = product of the bars; dots: seeds)")
    _legend_below(ax, ncol=4)
    fig.tight_layout()
    return fig


def plot_tta_runs(tta: dict) -> plt.Figure:
    """Every time-to-98% run: seconds (top) and epochs (bottom) to the target, one dot per seed, the two
    sides of a pair joined seed by seed, with each side's median as a bar."""
    fig, axes = plt.subplots(2, len(tta["pairs"]), figsize=(9, 5.6), sharey="row")
    for column, (pair, p) in enumerate(tta["pairs"].items()):
        sides = {"1 process": tta["runs"][p["single"]], "2 workers": tta["runs"][p["two_workers"]]}
        for ax, key, label in ((axes[0, column], "seconds_to_target", "seconds to 98%"),
                               (axes[1, column], "epochs_to_target", "epochs to 98%")):
            by_seed = {side: {r["seed"]: r[key] for r in runs} for side, runs in sides.items()}
            seeds = list(by_seed["1 process"])
            for k, seed in enumerate(seeds):  # each seed shifted sideways: equal values stay countable
                dx = 0.07 * (k - (len(seeds) - 1) / 2)
                ax.plot([dx, 1 + dx], [by_seed[side].get(seed) for side in sides], "-o", color="black", ms=3.5, lw=0.6,
                        alpha=0.7)
            for x, side in enumerate(sides):
                values = [v for v in by_seed[side].values() if v is not None]
                ax.plot([x - 0.18, x + 0.18], [np.median(values)] * 2, color=MEDIAN_COLOUR, lw=3)
            ax.set_xticks([0, 1], list(sides))
            ax.set_xlim(-0.5, 1.5)
            ax.set_ylabel(label if column == 0 else "")
            if key == "seconds_to_target":
                ax.set_title(pair)
    fig.suptitle("Every time-to-98% run (dots: seeds, shifted sideways; a line joins one seed's two runs; "
                 "bar: median)")
    fig.tight_layout()
    return fig


def plot_model_on_runs(checked: pd.DataFrame) -> plt.Figure:
    """The cost model on runs it was not fitted to: its one prediction per setting (white bar) against each
    seed's measured mean step (dots)."""
    runs = list(dict.fromkeys(checked["run"]))
    top = float(checked[["predicted ms", "measured ms"]].max().max())
    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.6 * len(runs)))
    for y, run in enumerate(runs):
        rows = checked[checked["run"] == run]
        ax.barh(y, rows["predicted ms"].iloc[0], height=0.5, color="white", edgecolor="black",
                label="predicted" if y == 0 else None)
        ax.plot(rows["measured ms"], [y] * len(rows), "o", color="black", ms=5,
                label="measured, one dot per seed" if y == 0 else None)
        errors = rows["error %"]
        ax.text(top * 1.04, y,
                f"error {errors.median():+.0f}% ({errors.min():+.0f} to {errors.max():+.0f})", va="center", fontsize=9)
    ax.set_yticks(range(len(runs)), runs)
    ax.invert_yaxis()
    ax.set(xlabel="milliseconds per step (mean over each run's epochs)", xlim=(0, top * 1.5),
           title="The cost model on the time-to-98% runs\n(error: median over the seeds, and their range)")
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


def knob_label(setting: str) -> str:
    """A knob's name as torch spells it, with the unit torch's ``bucket_cap_mb`` really takes (MiB)."""
    return f"{setting} MiB" if setting.startswith("bucket_cap_mb=") else setting


def plot_knobs(record: dict) -> plt.Figure:
    """Each DDP setting's step time relative to the default, per round (dots) and median (bar, from 1)."""
    rows = record["rows"]
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.45 * len(rows)))
    for y, row in enumerate(rows):  # bars grow from 1 (the default) to the median ratio
        ax.barh(y, row["vs_default_median"] - 1, left=1, color=MEDIAN_COLOUR)
        ax.plot(row["vs_default_rounds"], [y] * len(row["vs_default_rounds"]), "o", color="black", ms=3)
    ax.axvline(1.0, color="grey", ls=":", lw=1)
    ax.set_yticks(range(len(rows)), [knob_label(r["setting"]) for r in rows])
    ax.invert_yaxis()
    ax.set(xlabel="step time / default's in the same round (below 1 = faster; dots: rounds; bar: their median)",
           title="DDP's knobs at the design's settings", xlim=(0.7, 1.3))
    fig.tight_layout()
    return fig


def _round_dots(ax, x, values, size: float) -> None:
    """One dot per round, shaded in the order the rounds ran: dark (first) to light (last), greys, the
    one ramp no other chart uses for data."""
    ax.scatter(x, values, color=sns.color_palette("Greys_r", len(values) + 2)[:len(values)], edgecolor="black",
               linewidth=0.4, s=size, zorder=3)


def plot_throughput_rounds(record: dict) -> plt.Figure:
    """Every throughput case's rounds (dots, dark = first) and its median round (bar), on a log axis."""
    cases = record["cases"]
    fig, ax = plt.subplots(figsize=(8.5, 0.28 * len(cases) + 1.2))
    for y, case in enumerate(cases):
        _round_dots(ax, case["rounds_ms"], [y] * len(case["rounds_ms"]), 22)
        ax.plot([case["step_ms"]], [y], "|", color=MEDIAN_COLOUR, ms=14, mew=2.5)
    ax.set_yticks(range(len(cases)), [c["label"] for c in cases])
    ax.invert_yaxis()
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis)
    ax.set(xlabel="ms per step (dots: the rounds, dark = first; bar: the median round)",
           title="Every throughput configuration, round by round")
    fig.tight_layout()
    return fig


def plot_cores_rounds(record: dict) -> plt.Figure:
    """The compute-only ceiling's slots per batch: each slot's rounds (dots) and median (bar)."""
    rows = record["rows"]
    fig, axes = plt.subplots(1, len(rows) + 1, figsize=(12.5, 3.8),
                             gridspec_kw={"width_ratios": [1] * len(rows) + [0.8]})
    ceiling_ax = axes[-1]
    for x, row in enumerate(rows):  # the ratio the section is about, taken within each round
        _round_dots(ceiling_ax, [x] * len(row["ceiling_rounds"]), row["ceiling_rounds"], 18)
        ceiling_ax.plot([x - 0.25, x + 0.25], [row["ceiling_median"]] * 2, color=MEDIAN_COLOUR, lw=2.5)
    ceiling_ax.axhline(1.0, color="grey", ls=":", lw=1)
    ceiling_ax.set_xticks(range(len(rows)), [f"b{row['batch']}" for row in rows], fontsize=10)
    ceiling_ax.set_title("the ceiling, per round\n(2-thread step at 2B ÷ pair's)", fontsize=10)
    for ax, row in zip(axes[:-1], rows):
        for x, values in enumerate(row["rounds_ms"].values()):
            _round_dots(ax, [x] * len(values), values, 18)
            ax.plot([x - 0.25, x + 0.25], [np.median(values)] * 2, color=MEDIAN_COLOUR, lw=2.5)
        names = [textwrap.fill(k.replace("_", " "), 12) for k in row["rounds_ms"]]
        ax.set_xticks(range(len(names)), names, fontsize=10)
        ax.set_title(f"batch {row['batch']}")
    fig.supylabel("ms per compute-only step", fontsize=10)
    fig.suptitle("The compute-only ceiling's slot rounds (dots: rounds, dark = first; bar: median)")
    fig.tight_layout()
    return fig


def plot_knob_rounds(record: dict) -> plt.Figure:
    """Every DDP setting's step time, round by round: the default thick, the others by marker."""
    rows = record["rows"]
    fig, ax = plt.subplots(figsize=(8, 4))
    for row, marker in zip(rows, "osD^vP"):
        default = row["setting"].startswith("default")
        ax.plot(range(1, len(row["rounds_ms"]) + 1), row["rounds_ms"], "-" + marker, color="black",
                lw=2.5 if default else 0.8, mfc="black" if default else "white", ms=6,
                label=knob_label(row["setting"]))
    ax.set(xlabel="round", ylabel="ms per step\n(mean of the timed steps)",
           title="DDP's knobs, round by round (thick: the default)")
    ax.xaxis.set_major_locator(mticker.MaxNLocator(integer=True))
    _legend_below(ax)
    fig.tight_layout()
    return fig


# --- across machines: the network part's record --------------------------------------------------

LINK_ORDER = ("100 Mb/s", "1 Gb/s", "10 Gb/s", "no limit")
LINK_COLOURS = dict(zip(LINK_ORDER, LINK_SHADES))  # one shade per link in every chart, dark (slow) to light (fast)


def case_markers(case_ids) -> dict[str, str]:
    """One marker shape per strategy, the same in every chart of the lab: by the case ids' sorted order."""
    return dict(zip(sorted(case_ids), "osD^vP"))


def runs_of(network: dict, nodes: int) -> list[dict]:
    """The runs with ``nodes`` nodes, slowest link first."""
    runs = [r for r in network["runs"] if r["nodes"] == nodes]
    return sorted(runs, key=lambda r: LINK_ORDER.index(r["link"]))


def plot_link_allreduce(network: dict, nodes: int = 2) -> plt.Figure:
    """All-reduce time against message size on each link (points), and the prediction from the
    unshaped link's fit and the link's nominal rate (lines)."""
    fig, ax = plt.subplots(figsize=(8, 4.6))
    predicted = pd.DataFrame(network["predictions"]["allreduce"])
    for run in runs_of(network, nodes):
        color = LINK_COLOURS[run["link"]]
        seconds = run["allreduce"]["seconds"]
        sizes = np.array([int(s) for s in seconds])
        # circles only: in the lab's other charts a marker's shape names a strategy; the colour is the link
        ax.loglog(sizes, [1000 * seconds[str(s)] for s in sizes], "o", color=color, ms=6, mec="black", mew=0.4,
                  label=f"{run['link']}")
        mine = predicted[(predicted.nodes == nodes) & (predicted.link == run["link"])] if len(predicted) else []
        if len(mine):
            ax.loglog(mine["bytes"], 1000 * mine["predicted_s"], "--", color=color, lw=1)
    ax.plot([], [], "--", color="grey", lw=1, label="predicted: unshaped fit, link's rate")
    ax.set(xlabel="message size (bytes)", ylabel="all-reduce time (ms, median)",
           title=f"gloo all-reduce between {nodes} nodes, per link")
    return _finish_link_chart(fig, ax, "g", ncol=3)


def plot_link_throughput(network: dict, nodes: int = 2) -> plt.Figure:
    """Samples per second of each strategy on each link, against one process with two threads timed
    in the same job's rounds."""
    runs = runs_of(network, nodes)
    fig, ax = plt.subplots(figsize=(8, 4.6))
    ids = [c["id"] for c in runs[0]["cases"]]
    labels = {c["id"]: c["label"] for c in runs[0]["cases"]}
    x = np.arange(len(runs))
    markers = case_markers(ids)  # shape: the strategy; solid lines (dashed means "predicted" in notebook 06)
    for i, case in enumerate(ids):  # (colours name links in notebook 06; grey: the reference)
        style, color = "-" + markers[case], "black"
        rounds = [next(c["rounds_ms"] for c in r["cases"] if c["id"] == case) for r in runs]
        rate = np.array([nodes * 32 * 1000 / np.median(ms) for ms in rounds])
        low = rate - [nodes * 32 * 1000 / max(ms) for ms in rounds]   # the slowest round
        high = [nodes * 32 * 1000 / min(ms) for ms in rounds] - rate  # the fastest round
        shift = 0.06 * (i - (len(ids) - 1) / 2)  # the three DDP bucket settings coincide: side by side, all visible
        ax.errorbar(x + shift, rate, yerr=[low, high], fmt=style, color=color, label=labels[case], mfc="white",
                    ms=7, capsize=2, elinewidth=0.8)
    reference = [[32 * 1000 / ms for ms in r["single_process"]["rounds_ms"]] for r in runs]
    ax.fill_between(x, [min(v) for v in reference], [max(v) for v in reference], color="silver", alpha=0.35, lw=0,
                    zorder=0)
    ax.plot(x, [32 * 1000 / r["single_process"]["step_ms"] for r in runs], "-", color="silver", lw=4, zorder=0,
            label="1 process, 2 threads, no network (timed in the same rounds; band: its rounds)")
    ax.set_xticks(x, [r["link"] for r in runs])
    ax.set(yscale="log", xlabel="link between the nodes (series shifted sideways, so that equal values stay visible)",
           ylabel="samples per second (all ranks)",
           title=f"{nodes} nodes sharing this machine's 2 vCPUs: throughput per link\n"
                 "(median of the rounds; bars: slowest to fastest round)")
    return _finish_link_chart(fig, ax, ",.0f", ncol=2)


def plot_link_model(network: dict, band_pct: float = 15) -> plt.Figure:
    """Each shaped-link step predicted (from the unshaped run and the nominal rate) against measured."""
    steps = pd.DataFrame(network["predictions"]["steps"])
    labels = {c["id"]: c["label"] for r in network["runs"] for c in r["cases"]}
    fig, ax = plt.subplots(figsize=(6.5, 5))
    markers = case_markers(steps.case.unique())
    colors = LINK_COLOURS
    for (case, link, nodes), row in steps.groupby(["case", "link", "nodes"]):
        ax.plot(row.measured_ms, row.predicted_ms, markers[case], color=colors[link], ms=7 if nodes == 2 else 5,
                mfc=colors[link] if nodes == 2 else "none")
    low, high = 0.8 * steps[["measured_ms", "predicted_ms"]].min().min(), \
        1.25 * steps[["measured_ms", "predicted_ms"]].max().max()
    grid = np.geomspace(low, high, 20)
    ax.plot(grid, grid, color="grey", lw=1)
    ax.fill_between(grid, grid * (1 - band_pct / 100), grid * (1 + band_pct / 100), color="grey", alpha=0.15, lw=0)
    for case, m in markers.items():  # shape: the strategy; colour: the link; filled or hollow: 2 or 4 nodes
        ax.plot([], [], m, color="dimgrey", label=labels.get(case, case))
    for link in [l for l in LINK_ORDER if l in set(steps.link)]:
        ax.plot([], [], "-", lw=6, color=colors[link], label=link)  # a swatch, not a marker: shapes are strategies
    if len(set(steps.nodes)) > 1:  # no glyph of its own: every marker shape already names a strategy
        ax.plot([], [], " ", label="filled: 2 nodes, hollow: 4 nodes")
    ax.set(xscale="log", yscale="log", xlim=(low, high), ylim=(low, high), xlabel="measured ms per step",
           ylabel="predicted ms per step", title=f"Link model against measurement\n(band: ±{band_pct:g}%)")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.tight_layout()
    return fig
