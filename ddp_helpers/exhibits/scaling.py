"""Notebook 04's tables, built from the study's records (each function takes records and returns a frame)."""

from __future__ import annotations

import statistics

import pandas as pd

from ..study.costmodel import cases_by_id
from ..study.throughput import ratio
from ..study.tta import pair_verdict
from ..transport import name_of


def made(rec: dict) -> str:
    """When a record was made (UTC, month-day hour:minute)."""
    return rec["created"][5:16].replace("T", " ")


def origin(rec: dict) -> str:
    """Where and by which code a record was made."""
    return f"{rec['environment']['cpu_model']}, code {rec['environment'].get('code')}"


def spread(values: list[float], digits: int = 2, unit: str = "") -> str:
    """'median (min-max)' of a list of per-round values; ``unit`` follows the median: '1.86x (1.41-1.89)'."""
    return f"{statistics.median(values):.{digits}f}{unit} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def epoch_ratio(throughput: dict, a: str, b: str) -> dict:
    """Case a's epoch time over case b's, round by round, from the throughput record."""
    return ratio(cases_by_id(throughput), a, b)


def ways(nb02: dict, nb03: dict, cli1: dict, cli2: dict, pairs03: dict, throughput: dict) -> pd.DataFrame:
    """DDP's epoch time over one process's, as each part of the project measured it: medians, of per-round
    ratios where there are rounds (the study's steps projected to an epoch). Host and code get a column
    only where the records differ in them (see ``common_origin``)."""
    def epoch_s(rec: dict) -> float:
        return rec["summary"]["median_epoch_time_s"]

    def comm(rec: dict) -> str:
        return name_of(rec["runtime"].get("comm", "gloo"))

    one_after = "5 epochs each, one run after the other"
    rows = [(who, comm(two), one_after, f"{epoch_s(two) / epoch_s(one):.2f} (n = 1)", made(two))
            for who, one, two in (("notebooks 02 and 03", nb02, nb03), ("main job (CLI)", cli1, cli2))]
    runs = pairs03["method"].get("runs", 1)
    rows += [(f"03's rounds: {name.split(', ', 1)[-1]}", name.split(", ")[-1].replace("shared memory", "shm"),
              f"1 epoch, {len(s['rounds'])} rounds ({runs} runs), rotated", spread(s["rounds"]), made(pairs03))
             for name, s in pairs03["summary"].items()]
    case = cases_by_id(throughput)["ddp_b32"]
    study = throughput["comparisons"]["ddp_w2_vs_w1_2t_epoch"]["rounds"]
    rows.append(("study (throughput)", "gloo", f"{case['timed_steps']} steps after {case['warmup_steps']}, "
                 f"{len(study)} rounds, rotated", spread(study), made(throughput)))
    table = pd.DataFrame(rows, columns=["measured by", "all-reduce", "what was timed", "DDP ÷ 1 process (range)",
                                        "made (UTC)"]).set_index("measured by")
    if common_origin(nb02, nb03, cli1, cli2, pairs03, throughput):  # one host and code: the caller says it once
        return table

    def both(a: dict, b: dict) -> str:
        return " / ".join(dict.fromkeys((origin(a), origin(b))))

    per_row = [both(nb02, nb03), both(cli1, cli2), *[origin(pairs03)] * len(pairs03["summary"]), origin(throughput)]
    return table.assign(**{"host, code": per_row})


def common_origin(*records: dict) -> str | None:
    """The host and code of all the records, if they share one; else None."""
    origins = {origin(rec) for rec in records}
    return origins.pop() if len(origins) == 1 else None


def _round_range(sweep: dict, nbytes: int) -> str:
    """' (rounds a-b ms)' from a sweep's per-round medians, where the record has them."""
    rounds = sweep.get("round_medians_s", {}).get(str(nbytes))
    return f" (rounds {1000 * min(rounds):.1f}-{1000 * max(rounds):.1f} ms)" if rounds else ""


def tta_settings(tta: dict) -> pd.DataFrame:
    """Each time-to-98% setting: how many seeds got there, after how many epochs and seconds."""
    rows = []
    for name, s in tta["summary"].items():
        sec = s["seconds"]
        rows.append({"setting": name, "seeds at 98%": f"{s['reached']}/{s['seeds']}",
                     "epochs to 98% (mean)": statistics.mean(r["epochs_to_target"] for r in tta["runs"][name]),
                     "seconds to 98%, mean": sec and sec["mean"], "sd": sec and sec["sd"],
                     "min-max": sec and f"{sec['min']:.1f}-{sec['max']:.1f}"})
    return pd.DataFrame(rows).set_index("setting").round(2)


def tta_pairs(tta: dict) -> pd.DataFrame:
    """One process's time to 98% over two workers', seed by seed, for each pair of settings."""
    return pd.DataFrame([{"pair of settings": pair, "1 process / 2 workers, mean of seeds": p["ratio"]["mean"],
                          "sd": p["ratio"]["sd"], "per seed": ", ".join(f"{v:.2f}" for v in p["ratio"]["values"])}
                         for pair, p in tta["pairs"].items()]).set_index("pair of settings").round(2)


def gpu_runs(gpu: dict) -> pd.DataFrame:
    """The lent GPU's runs: seconds per epoch, device and whether the step was a CUDA graph."""
    names = {"W=1 on this machine's CPU cores": "W=1 on the GPU host's 16 CPU cores"}
    return pd.DataFrame([{"run": names.get(name, name), "s per epoch": r["summary"]["median_epoch_time_s"],
                          "epochs run": len(r["epochs"]),
                          "val. accuracy after epoch 1 %": 100 * r["epochs"][0]["val_accuracy"],
                          "device": r["runtime"]["device"], "CUDA graph": r["runtime"]["cuda_graph"]}
                         for name, r in gpu["runs"].items()]).set_index("run").round(3)


def gpu_floor(gpu: dict) -> str:
    """The GPU step against its floor (the same step captured and replayed back to back) and against eager."""
    eager, graphed = (gpu["runs"][k]["summary"]["median_epoch_time_s"]
                      for k in ("W=1, eager", "W=1, CUDA graph (default)"))
    floor = gpu["floor_epoch_s"]
    return (f"the same step captured and replayed back to back (the floor): {min(floor):.3f}-{max(floor):.3f} s per "
            f"epoch; our loop with the graph is {gpu['ours_vs_graph_floor']:.2f}x that, and {eager / graphed:.1f}x "
            f"faster than the same loop launching kernel by kernel")


def bare_allreduce(transport: dict) -> pd.DataFrame:
    """The gradient's all-reduce alone over gloo and over shared memory, against the memory-copy floor."""
    floor = statistics.median(transport["memcopy_floor_ms"])
    rows = []
    for w, b in transport["bare_allreduce"].items():
        ms = b["median_ms"]
        rows.append({"ranks": f"{w}{' (oversubscribed)' if b['oversubscribed'] else ''}",
                     "gloo, ms": ms["gloo"], "shared memory, ms": ms["shm"],
                     "gloo ÷ shm, median (rounds)": spread(b["gloo_over_shm_rounds"], 1),
                     "shm ÷ floor": ms["shm"] / floor,
                     "back to back: gloo, shm ms": f"{ms['gloo_back_to_back']:.2f}, {ms['shm_back_to_back']:.2f}"})
    return pd.DataFrame(rows).set_index("ranks").round(2)


def hierarchical(hier: dict) -> pd.DataFrame:
    """Two nodes of two ranks at each link rate: flat gloo against shared memory within the nodes."""
    def cell(r: dict, what: str) -> str:
        s = r["flat_over_hierarchical"][what]
        return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"

    table = pd.DataFrame([{("link", ""): r["link"],
                           ("all-reduce", "flat ms"): statistics.median(r["allreduce_ms"]["gloo"]),
                           ("all-reduce", "hierarchical ms"): statistics.median(r["allreduce_ms"]["shm"]),
                           ("all-reduce", "flat ÷ hier. (rounds)"): cell(r, "allreduce_ms"),
                           ("DDP step", "flat ms"): statistics.median(r["ddp_step_ms"]["gloo"]),
                           ("DDP step", "hierarchical ms"): statistics.median(r["ddp_step_ms"]["shm"]),
                           ("DDP step", "flat ÷ hier. (rounds)"): cell(r, "ddp_step_ms")}
                          for r in hier["runs"]]).set_index(("link", "")).round(1)
    table.index.name, table.columns = "link", pd.MultiIndex.from_tuples(table.columns)
    return table


def precision(prec: dict) -> pd.DataFrame:
    """bf16-mixed against float32: step time per round and the accuracy after the timed steps."""
    rows = [{"case": r["case"], "step ms, median (rounds)": spread(r["rounds_ms"]),
             "val. accuracy after the timed steps %": 100 * statistics.median(r["val_accuracy_after_timed_steps"])}
            for r in prec["rows"]]
    return pd.DataFrame(rows).set_index("case").round(2)


def provenance(records: dict[str, dict]) -> str:
    """One line: whether every record came from one host, when, and by which code."""
    hosts = {(r["environment"]["cpu_model"], r["environment"]["hostname"]) for r in records.values()}
    created = sorted(r["created"][:16].replace("T", " ") for r in records.values())
    codes = sorted({r["environment"].get("code") or "?" for r in records.values()})
    return (f"all {len(records)} study records from one host: {len(hosts) == 1}; made between {created[0]} and "
            f"{created[-1]} UTC, by code {', '.join(codes)}")


def _error_groups(check: pd.DataFrame, other: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The cost model's checks in three groups: the fit's own batches, other batches, other runs."""
    return check[check["batch measured"]], check[~check["batch measured"]], other


def _mean_abs(df: pd.DataFrame) -> float:
    return df["error %"].abs().mean()


def model_errors(check: pd.DataFrame, other: pd.DataFrame) -> list[str]:
    """The cost model's mean |error| on the fit's own rounds, at other batches and on other runs."""
    def signed(df: pd.DataFrame) -> str:
        return ", ".join(f"{v:+.0f}%" for v in df["error %"])

    inside, outside, other = _error_groups(check, other)
    return [f"1. the fit's own rounds, batches 32 and 128 ({len(inside)} cases): mean |error| "
            f"{_mean_abs(inside):.0f}% ({signed(inside)})",
            f"2. the same rounds, batches 64 and 256 ({len(outside)} cases): mean |error| "
            f"{_mean_abs(outside):.0f}% ({signed(outside)})",
            f"3. other runs (the {len(other)} two-worker time-to-accuracy runs): mean |error| "
            f"{_mean_abs(other):.0f}% (from {other['error %'].min():+.0f}% to {other['error %'].max():+.0f}%)"]


def summary(R: dict, pairs03: dict, check: pd.DataFrame, other: pd.DataFrame) -> list[str]:
    """Notebook 04's findings, each a line computed from the records (R: the study's records by part)."""
    transport, prec = R["transport"], R["precision"]
    cases = cases_by_id(R["throughput"])
    ddp, per_round = cases["ddp_b32"], R["throughput"]["comparisons"]["ddp_w2_vs_w1_2t_epoch"]["rounds"]
    w2, nbytes = R["allreduce"]["world_sizes"]["2"], R["allreduce"]["gradient_bytes"]
    pooled = "; ".join(f"{n} {s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})" for n, s in pairs03["summary"].items())
    fitted, carried, runs = (f"{_mean_abs(group):.0f}%" for group in _error_groups(check, other))
    bare, tcases = transport["bare_allreduce"]["2"]["median_ms"], {c["id"]: c for c in transport["cases"]}
    lines = [f"- DDP, 2 workers, the design's settings: {spread(per_round, unit='x')} the epoch time of one 2-thread process in "
             f"this study, over gloo (median of per-round ratios, range); over notebook 03's interleaved rounds "
             f"{pooled}. In the study, sync (all-reduce + waiting) is {100 * ddp['sync_fraction']:.0f}% of a DDP step.",
             f"- The all-reduce of the gradient alone: {1000 * w2['seconds'][str(nbytes)]:.1f} ms{_round_range(w2, nbytes)}; "
             f"a DDP step's "
             f"synchronisation: {ddp['split_ms']['sync']:.1f} ms.",
             "- Compute-only ceiling of two processes against one 2-thread process: "
             + ", ".join(f"{r['ceiling_median']:.2f}x at b{r['batch']}" for r in R["cores"]["rows"]) + ".",
             f"- Cost model: mean |error| {fitted} where its inputs were measured, {carried} at other batches, {runs} "
             f"on other runs; biased low.",
             f"- The gradient's all-reduce, W=2: gloo {bare['gloo']:.2f} ms, shared memory {bare['shm']:.2f} ms; DDP over "
             f"shared memory {tcases['ddp_shm']['vs_ceiling']['median']:.2f} of the no-sync ceiling's samples per "
             f"second, the from-scratch module {tcases['bucketed_shm']['vs_ceiling']['median']:.2f}."]
    best = R["tta"]["best"]
    if "ratio" in best:
        values = best["ratio"]["values"]
        runs = R["tta"]["runs"]
        verdict = {"two_workers": "the two workers win", "single": "the single process wins",
                   "tie": "a tie"}[pair_verdict(runs[best["single"]], runs[best["two_workers"]])]
        lines.append(f"- Time to 98%: best two-worker setting against best single process {best['ratio']['mean']:.2f}x "
                     f"(per seed {min(values):.2f}-{max(values):.2f}): {verdict} at {len(values)} seeds "
                     f"(a win needs every seed ahead by more than one validation interval).")
    lines.append(f"- bf16-mixed on this CPU (native bf16: {prec['method']['native_bf16']}): "
                 + ", ".join(f"{n} {spread(v['rounds'], unit='x')} float32's step time" for n, v in prec["bf16_over_float32"].items())
                 + ".")
    return lines
