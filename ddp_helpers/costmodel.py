"""An alpha-beta cost model of data-parallel steps, fitted to this machine's benchmarks.

    all-reduce of n bytes on W ranks:   t_ar(n) = alpha + beta * n        (fitted, gloo, loopback)
    ring all-reduce on a cluster:       t_ring(n, W) = 2 (W-1) a + 2 (W-1)/W * n / B
    one W=2 step of a strategy:         t_step = t_local * c + (t_sync + t_ar(bytes)) / k

t_local is what the same step costs in one process with one thread (measured; for a
compression hook, plus the compression's computation measured with one rank), c the
measured slowdown of computing beside a second process, t_sync the measured cost of
synchronising a training step at all (a W=2 step that all-reduces one float), k how
many steps share one communication (accumulation, local SGD), and t_ar the fitted
all-reduce of the bytes the strategy sends. What the model leaves out (for example a
second all-reduce's extra wait in PowerSGD, or contention that varies over a run) shows
up as the gap between predicted and measured.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np
import pandas as pd

GRAD_BYTES = 567_434 * 4
MATRICES = [(784, 512), (512, 256), (256, 128), (128, 10)]  # the MLP's weight shapes
BIAS_BYTES = 4 * (512 + 256 + 128 + 10)


@dataclass(frozen=True)
class AlphaBeta:
    alpha_s: float          # fixed cost of one all-reduce
    beta_s_per_byte: float  # cost per byte

    def allreduce_s(self, nbytes: float) -> float:
        return self.alpha_s + self.beta_s_per_byte * nbytes

    @classmethod
    def fit(cls, sizes, seconds) -> "AlphaBeta":
        """Least squares on *relative* error (weights 1/t), so that small messages count
        as much as large ones instead of being swamped by them."""
        t = np.asarray(seconds, float)
        beta, alpha = np.polyfit(np.asarray(sizes, float), t, 1, w=1 / t)
        return cls(float(alpha), float(beta))

    @classmethod
    def from_record(cls, allreduce: dict, world_size: int = 2) -> "AlphaBeta":
        seconds = allreduce["world_sizes"][str(world_size)]["seconds"]
        return cls.fit([int(s) for s in seconds], list(seconds.values()))


def powersgd_bytes(rank: int) -> tuple[int, int]:
    """Bytes in PowerSGD's two all-reduces (P, then Q) for this MLP; biases go with P."""
    p = 4 * rank * sum(m for m, _ in MATRICES) + BIAS_BYTES
    q = 4 * rank * sum(n for _, n in MATRICES)
    return p, q


def strategy_comm_s(name: str, ab: AlphaBeta) -> float:
    """Communication seconds per communication round of a strategy (before dividing by k)."""
    if name in ("ddp", "allreduce", "local_sgd", "local_sgd_overlap"):
        return ab.allreduce_s(GRAD_BYTES)  # gradients, or the same number of parameters
    if name == "fp16":
        return ab.allreduce_s(GRAD_BYTES / 2)
    if name == "powersgd":
        p, q = powersgd_bytes(4)
        return ab.allreduce_s(p) + ab.allreduce_s(q)
    raise ValueError(name)


def contention(cores: dict | None, batch: int, throughput: dict | None = None) -> float:
    """How much slower a 1-thread process computes when a second one runs beside it.
    Taken from the throughput record's own rounds where it measured that (two compute
    floors at once against one), else from the ``cores`` record; 1.0 when not measured."""
    cases = {c["name"]: c for c in (throughput or {}).get("cases", [])}
    pair, alone = (cases.get(f"compute floor, 2 processes at once, b{batch}"),
                   cases.get(f"compute floor, 1 thread, b{batch}"))
    if pair and alone:
        return pair["step_ms_median"] / alone["step_ms_median"]
    if not cores:
        return 1.0
    rows = sorted(cores["rows"], key=lambda r: r["batch"])
    best = min(rows, key=lambda r: abs(r["batch"] - batch))
    return best["slowdown"]


def predict_w2(throughput: dict, allreduce: dict, cores: dict | None = None,
               syncstep: dict | None = None) -> pd.DataFrame:
    """Predicted against measured step time for each W=2 case of a throughput record.

    local = the step measured in one process with one thread (data + compute + optimizer,
    the optimizer divided by the accumulation steps), times the measured slowdown of
    computing beside a second process (measured in the same throughput run where it
    has the two-floors-at-once cases). bytes = the fitted all-reduce of the strategy's
    bytes. sync = the measured cost of synchronising a training step at all (a W=2 step
    that all-reduces one float, minus its local part; from the ``syncstep`` record). For
    the compression hooks, local also holds the compression's own computation: the step
    through the hook minus the step through DDP's plain all-reduce hook, both with one rank
    (``hook_w1_ms`` in the ``syncstep`` record: fp16 casts, PowerSGD's matrix products),
    where the record has it.
    Both communication terms are divided by the k steps that share one communication.
    """
    ab = AlphaBeta.from_record(allreduce, 2)
    cases = {c["name"]: c for c in throughput["cases"]}
    one = cases["1 process, 1 thread, b32"]
    floor128 = cases["compute floor, 1 thread, b128"]["step_ms_median"]
    probe = {row["batch"]: row["step_ms"] for row in syncstep["rows"]} if syncstep else {}
    hook_w1 = (syncstep or {}).get("hook_w1_ms", {})
    rows = []
    for c in throughput["cases"]:
        if c["kind"] != "train" or c["world_size"] != 2:
            continue
        cfg = c["config"]
        k = cfg["local_sgd_every"] if cfg["sync"].startswith("local_sgd") else cfg["accumulation_steps"]
        if cfg["batch_size"] == 32:
            local_full = one["data_ms"] + one["compute_ms"] + one["optimizer_ms"]
            local_ms = one["data_ms"] + one["compute_ms"] + one["optimizer_ms"] / cfg["accumulation_steps"]
        else:
            local_full = local_ms = floor128  # no 1-process b128 loop in the record: its compute floor
        if cfg["sync"] in hook_w1:  # compression computation beyond the plain hook, once per optimizer step
            local_ms += max(0.0, hook_w1[cfg["sync"]] - hook_w1["ddp"]) / cfg["accumulation_steps"]
        factor = contention(cores, cfg["batch_size"], throughput)
        bytes_ms = 1000 * strategy_comm_s(cfg["sync"], ab) / k
        sync_ms = max(0.0, probe[cfg["batch_size"]] - local_full * factor) / k if probe else 0.0
        bytes_only = local_ms * factor + bytes_ms
        predicted = bytes_only + sync_ms
        rows.append({"case": c["name"], "local ms": local_ms, "contention x": factor, "bytes ms": bytes_ms,
                     "sync ms": sync_ms, "bytes-only model ms": bytes_only, "predicted ms": predicted,
                     "measured ms": c["step_ms_median"],
                     "error %": 100 * (predicted - c["step_ms_median"]) / c["step_ms_median"]})
    return pd.DataFrame(rows).set_index("case")


def two_worker_ceiling(cores: dict, batch: int = 128) -> dict:
    """The best any 2-worker strategy could do at per-worker batch ``batch`` if communication
    were free: two 1-thread processes computing side by side, against one process with
    2 threads (and with 1 thread) computing the same samples as one batch of twice the size."""
    row = next(r for r in cores["rows"] if r["batch"] == batch)
    one_thread_double = next((r["alone_ms"] for r in cores["rows"] if r["batch"] == 2 * batch), None)
    out = {"batch_per_worker": batch, "two_processes_ms": row["two_at_once_ms"],
           "one_process_2_threads_ms": row["one_process_2_threads_double_batch_ms"],
           "ceiling_vs_2_threads": row["one_process_2_threads_double_batch_ms"] / row["two_at_once_ms"]}
    if one_thread_double is not None:
        out["one_process_1_thread_ms"] = one_thread_double
        out["ceiling_vs_1_thread"] = one_thread_double / row["two_at_once_ms"]
    return out


def _global_batch(cfg: dict) -> int:
    return cfg["batch_size"] * cfg["world_size"] * cfg["accumulation_steps"]


def floor_us_per_sample(headroom: dict, pair_batch: int, two_thread_batch: int) -> tuple[float, float]:
    """One headroom measurement as compute-only microseconds per sample: two 1-thread processes
    side by side at ``pair_batch`` each, and one 2-thread process at ``two_thread_batch``."""
    return (1000 * headroom["pair_ms"][str(pair_batch)] / (2 * pair_batch),
            1000 * headroom["two_threads_ms"][str(two_thread_batch)] / two_thread_batch)


def tta_decomposition(record: dict, target_ratio: float = 1.2) -> dict:
    """Why the best 2-worker strategy is as fast as it is against the best 2-thread process,
    seed by seed. Time to 98% is samples needed x seconds per sample, so the ratio factors
    exactly into four measured parts:

        ratio = samples x headroom x loop x sync

    * samples: training samples the 2-thread process needed / the 2-worker strategy needed;
    * headroom: compute-only time per sample of one 2-thread process / of two 1-thread
      processes side by side, at the batches the two runs used, measured before and after
      the seed's runs (mean of the two);
    * loop: how close the 2-thread loop is to its floor / how close the 2-worker loop,
      without its synchronisation, is to its floor;
    * sync: the 2-worker step's share not spent synchronising (1 - sync fraction).

    headroom x loop = ``compute_ratio``: the 2-thread time per sample against the 2-worker
    time per sample without its synchronisation, both measured in the runs themselves. The
    split of it into headroom and loop rests on floors measured minutes away from the runs,
    on a host whose speed moves.

    ``needed_compute_ratio`` is the compute ratio that would have given ``target_ratio``
    with the samples and sync factors as measured."""
    ratios = tta_ratios(record)
    two_name, one_name = ratios.get("best_2_workers"), ratios.get("best_2_threads")
    summary = {s["name"]: s for s in record.get("summary", [])}
    headroom, runs = record.get("headroom"), record.get("runs", {})
    if not (two_name and one_name and headroom):
        return {"applies": False, "why": "the record has no headroom rounds or no complete pair of strategies"}
    two_cfg, one_cfg = summary[two_name]["config"], summary[one_name]["config"]
    pair_key, one_key = str(two_cfg["batch_size"]), str(one_cfg["batch_size"])
    if any(pair_key not in h.get("pair_ms", {}) or one_key not in h.get("two_threads_ms", {})
           for rounds in headroom.values() for h in rounds):
        return {"applies": False, "why": f"the headroom rounds did not measure a pair at b{pair_key} and a 2-thread "
                                         f"process at b{one_key}"}
    one_by_seed = {r["seed"]: r for r in runs[one_name]}
    rows = []
    for two in runs[two_name]:
        one, seed = one_by_seed[two["seed"]], two["seed"]
        steps_two = two["epochs_to_target"] * two["steps_per_epoch"]
        samples_two = steps_two * _global_batch(two_cfg)
        samples_one = one["epochs_to_target"] * one["steps_per_epoch"] * _global_batch(one_cfg)
        us_two, us_one = 1e6 * two["seconds_to_target"] / samples_two, 1e6 * one["seconds_to_target"] / samples_one
        used = range(math.ceil(two["epochs_to_target"]))  # the epochs (partly) run before the target
        sync_fraction = (sum(two["sync_fraction"][i] * two["epoch_time_s"][i] for i in used)
                         / sum(two["epoch_time_s"][i] for i in used))
        floors = [floor_us_per_sample(h, two_cfg["batch_size"], one_cfg["batch_size"]) for h in headroom[str(seed)]]
        floor_pair = statistics.mean(pair for pair, _ in floors)
        floor_2t = statistics.mean(two_threads for _, two_threads in floors)
        factors = {"samples": samples_one / samples_two, "headroom": floor_2t / floor_pair,
                   "loop": (us_one / floor_2t) / (us_two * (1 - sync_fraction) / floor_pair), "sync": 1 - sync_fraction}
        rows.append({"seed": seed, "ratio": one["seconds_to_target"] / two["seconds_to_target"], **factors,
                     "compute_ratio": factors["headroom"] * factors["loop"],
                     "needed_compute_ratio": target_ratio / (factors["samples"] * factors["sync"]),
                     "headroom_rounds": [two_threads / pair for pair, two_threads in floors],
                     "us_per_sample_2_workers": us_two, "us_per_sample_2_threads": us_one,
                     "sync_ms_per_step": 1000 * two["seconds_to_target"] / steps_two * sync_fraction,
                     "floor_us_per_sample_pair": floor_pair, "floor_us_per_sample_2_threads": floor_2t})
    return {"applies": True, "two_workers": two_name, "two_threads": one_name, "target_ratio": target_ratio, "seeds": rows}


def host_summary(cores: dict, throughput: dict, tta: dict) -> dict:
    """What one host's records say about a second worker process: how much two processes
    compute side by side, the pair against one 2-thread process at b256 (from the cores
    part when it measured that, else the 2-thread training step of the throughput part),
    and the best 2-worker time to 98% against the best single processes."""
    row = next(r for r in cores["rows"] if r["batch"] == 128)
    two_threads_ms = row.get("one_process_2_threads_double_batch_ms") or next(
        c["step_ms_median"] for c in throughput["cases"] if c["name"] == "1 process, 2 threads, b256")
    ratios = tta_ratios(tta)
    return {"measured": cores["created"][:10], "two processes vs one, b128": row["two_process_throughput_vs_one"],
            "pair vs 2-thread process (ceiling)": two_threads_ms / row["two_at_once_ms"],
            "time to 98% vs 1-thread process": ratios.get("speedup_vs_1_thread"),
            "time to 98% vs 2-thread process": ratios.get("speedup_vs_2_threads")}


def ring_allreduce_s(nbytes: float, world_size: int, link_latency_s: float, link_bytes_per_s: float) -> float:
    if world_size == 1:
        return 0.0
    return 2 * (world_size - 1) * link_latency_s + 2 * (world_size - 1) / world_size * nbytes / link_bytes_per_s


def project_speedup(compute_s: float, nbytes: float, world_sizes: list[int], links: dict[str, tuple[float, float]],
                    steps_per_sync: int = 1) -> pd.DataFrame:
    """Throughput speedup over one worker at a fixed per-worker batch (weak scaling):
    S(W) = W * t_c / (t_c + t_ring(W) / steps_per_sync), with no overlap of compute and
    communication (true for this model: one bucket)."""
    rows = []
    for name, (latency, bandwidth) in links.items():
        for w in world_sizes:
            comm = ring_allreduce_s(nbytes, w, latency, bandwidth) / steps_per_sync
            rows.append({"link": name, "workers": w, "comm ms": 1000 * comm,
                         "speedup": w * compute_s / (compute_s + comm), "efficiency %": 100 * compute_s / (compute_s + comm)})
    return pd.DataFrame(rows)


# Stated assumptions for the projections: per-hop latency and usable bandwidth of the links.
CLUSTER_LINKS = {
    "10 Gb/s Ethernet": (30e-6, 10e9 / 8 * 0.9),
    "100 Gb/s (RoCE/InfiniBand)": (5e-6, 100e9 / 8 * 0.9),
}


def tta_table(record: dict) -> pd.DataFrame:
    rows = []
    for s in record["summary"]:
        rows.append({"strategy": s["name"], "workers": s["config"]["world_size"],
                     "threads/rank": s["config"]["threads_per_rank"] or None, "reached 98%": f"{s['reached']}/{s['seeds']}",
                     "epochs to 98%": ", ".join("-" if e is None else f"{e:.2f}" for e in s["epochs"]),
                     "seconds per seed": ", ".join(f"{x:.1f}" for x in s.get("seconds", [])),
                     "seconds mean": s["seconds_mean"], "seconds sd": s["seconds_stdev"]})
    return pd.DataFrame(rows).set_index("strategy")


def tta_ratios(record: dict) -> dict:
    """Best 2-worker strategy against the best single process with 1 and with 2 threads,
    counting only strategies that reached 98% on every seed: the ratio of mean times, and
    the ratio seed by seed (same seed, run back to back) when the record has the runs."""
    ok = [s for s in record["summary"] if s["reached"] == s["seeds"] and s["seconds_mean"] is not None]

    def best(pred):
        cands = [s for s in ok if pred(s["config"])]
        return min(cands, key=lambda s: s["seconds_mean"]) if cands else None

    two = best(lambda c: c["world_size"] == 2)
    one1 = best(lambda c: c["world_size"] == 1 and c["threads_per_rank"] == 1)
    one2 = best(lambda c: c["world_size"] == 1 and c["threads_per_rank"] == 2)
    out = {"best_2_workers": two and two["name"], "best_1_thread": one1 and one1["name"],
           "best_2_threads": one2 and one2["name"]}
    runs = record.get("runs", {})
    for key, one in (("speedup_vs_1_thread", one1), ("speedup_vs_2_threads", one2)):
        if two and one:
            out[key] = one["seconds_mean"] / two["seconds_mean"]
            if two["name"] in runs and one["name"] in runs:
                secs = lambda r: r.get("seconds_to_target", r.get("seconds_to_98"))  # noqa: E731 (older records)
                mine = {r["seed"]: secs(r) for r in runs[two["name"]]}
                out[key + "_per_seed"] = [secs(r) / mine[r["seed"]] for r in runs[one["name"]]]
    return out
