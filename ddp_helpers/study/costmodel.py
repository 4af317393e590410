"""A cost model of a two-worker step, built from one study run's measurements of its parts, and
checked on that run's other batch sizes and on other runs (time to accuracy; the network lab's links).

    t_step = t_local(b) * c(b) + t_compress + (t_sync(b) + t_bytes) / k

* t_local(b): the same step in one process with one thread (data + compute + optimizer; the
  optimizer once per k micro-steps), from the throughput record;
* c(b): how much slower one process computes beside a second one (two compute floors at once
  against one), from the same record;
* t_sync(b): what it costs to synchronise a step at all: a W=2 step that all-reduces 4 bytes,
  minus its local part (the ``syncstep`` record). It holds one message's fixed cost (alpha)
  and the wait for the slower rank;
* t_bytes = beta * bytes + (messages - 1) * alpha: the strategy's bytes, and the fixed cost of
  each message beyond the one already inside t_sync (alpha, beta fitted in ``allreduce``);
* t_compress: a compression hook's own computation (one rank through the hook against one
  through the plain hook); k: the steps that share one communication.

The inputs are measured at batches 32 and 128 and taken as linear in the batch in between and
beyond, so a prediction at batch 64 or 256 uses no measurement at that batch.
"""

from __future__ import annotations

import pandas as pd

from .comm import GRAD_BYTES, WEIGHT_SHAPES

LOCAL, PAIRS = {32: "w1_1t_b32", 128: "w1_1t_b128"}, {32: "pair_b32", 128: "pair_b128"}
ALONE = {32: "floor_1t_b32", 128: "floor_1t_b128"}


def strategy_bytes(sync: str, powersgd_rank: int = 4) -> tuple[float, int]:
    """(bytes, messages) one communication round of a strategy all-reduces, from the model itself."""
    if sync in ("ddp", "allreduce", "local_sgd", "local_sgd_overlap"):
        return GRAD_BYTES, 1  # gradients, or as many weights
    if sync == "fp16":
        return GRAD_BYTES / 2, 1
    if sync == "powersgd":  # biases uncompressed, then P (out x r) and Q (in x r) per weight matrix
        biases = 4 * sum(out for out, _ in WEIGHT_SHAPES)
        return biases + 4 * powersgd_rank * sum(out + inp for out, inp in WEIGHT_SHAPES), 3
    raise ValueError(sync)


def _linear(values: dict[int, float], batch: int) -> float:
    (b0, v0), (b1, v1) = sorted(values.items())
    return v0 + (v1 - v0) * (batch - b0) / (b1 - b0)


def cases_by_id(throughput: dict) -> dict[str, dict]:
    """The throughput record's cases by their id ("ddp_b32", "w1_1t_b32", ...)."""
    return {c["id"]: c for c in throughput["cases"]}


def inputs_at(batch: int, throughput: dict, syncstep: dict) -> dict:
    """The model's inputs at ``batch``, each linear in the batch through its values at 32 and 128."""
    cases = cases_by_id(throughput)
    split = {b: cases[i]["split_ms"] for b, i in LOCAL.items()}
    local = _linear({b: s["data"] + s["compute"] + s["sync"] for b, s in split.items()}, batch)
    optimizer = _linear({b: s["optimizer"] for b, s in split.items()}, batch)
    contention = _linear({b: cases[PAIRS[b]]["step_ms"] / cases[ALONE[b]]["step_ms"] for b in PAIRS}, batch)
    probe = {int(b): ms for b, ms in syncstep["probe_step_ms"].items()}
    sync = _linear({b: probe[b] - (split[b]["data"] + split[b]["compute"] + split[b]["sync"] + split[b]["optimizer"])
                    * cases[PAIRS[b]]["step_ms"] / cases[ALONE[b]]["step_ms"] for b in probe}, batch)
    return {"local_ms": local, "optimizer_ms": optimizer, "contention": contention, "sync_ms": max(sync, 0.0)}


def predict(cfg: dict, throughput: dict, syncstep: dict, allreduce: dict) -> dict:
    """Predicted milliseconds per (micro-)step of a W=2 configuration, with its terms."""
    ab = allreduce["world_sizes"]["2"]
    x = inputs_at(cfg["batch_size"], throughput, syncstep)
    k = cfg["local_sgd_every"] if cfg["sync"].startswith("local_sgd") else cfg["accumulation_steps"]
    hooks = syncstep["hook_step_ms_b32"]
    compress = max(0.0, hooks[cfg["sync"]] - hooks["ddp"]) / cfg["accumulation_steps"] if cfg["sync"] in hooks else 0.0
    nbytes, messages = strategy_bytes(cfg["sync"])
    bytes_ms = 1000 * (ab["beta_s_per_byte"] * nbytes + (messages - 1) * ab["alpha_s"])
    local = (x["local_ms"] + x["optimizer_ms"] / cfg["accumulation_steps"]) * x["contention"]
    return {"local ms": local, "compression ms": compress, "sync ms": x["sync_ms"] / k, "bytes ms": bytes_ms / k,
            "predicted ms": local + compress + (x["sync_ms"] + bytes_ms) / k}


def check_throughput(throughput: dict, syncstep: dict, allreduce: dict) -> pd.DataFrame:
    """Every W=2 case of the throughput record, predicted and measured. ``batch measured``:
    whether the model's inputs were measured at that case's batch (32, 128) or carried to it."""
    rows = []
    for c in throughput["cases"]:
        if c["kind"] == "train" and c["world_size"] == 2:
            p = predict(c["config"], throughput, syncstep, allreduce)
            rows.append({"case": c["label"], "id": c["id"], **p, "measured ms": c["step_ms"],
                         "error %": 100 * (p["predicted ms"] / c["step_ms"] - 1),
                         "batch measured": c["batch_per_rank"] in LOCAL})
    return pd.DataFrame(rows).set_index("case")


def check_other_runs(tta: dict, throughput: dict, syncstep: dict, allreduce: dict) -> pd.DataFrame:
    """The two-worker runs of the time-to-accuracy record (other runs, another time, other batch
    sizes), predicted from the throughput run's inputs: mean step time over the epochs, per seed."""
    rows = []
    for name, s in tta["summary"].items():
        if s["config"]["world_size"] != 2:
            continue
        p = predict(s["config"], throughput, syncstep, allreduce)
        for run in tta["runs"][name]:
            measured = 1000 * sum(run["epoch_time_s"]) / (run["steps_per_epoch"] * len(run["epoch_time_s"]))
            rows.append({"run": name, "seed": run["seed"], "predicted ms": p["predicted ms"], "measured ms": measured,
                         "error %": 100 * (p["predicted ms"] / measured - 1)})
    return pd.DataFrame(rows)


# --- on a link: the same case with the link's rate in place of this machine's bytes cost ---------

def ring_factor(world_size: int) -> float:
    """Bytes each rank sends (and receives) per byte of an all-reduced tensor, ring or halving-doubling."""
    return 2 * (world_size - 1) / world_size


def link_beta(world_size: int, beta_unshaped: float, rate_mbit: float) -> float:
    """Seconds per all-reduced byte on a link of ``rate_mbit``: the slower of the link and of
    what the same all-reduce costs without the limit (copies, the reduction, the kernel)."""
    return max(beta_unshaped, ring_factor(world_size) * 8 / (rate_mbit * 1e6))


def predict_allreduce_on_link(nbytes: int, world_size: int, alpha: float, beta_unshaped: float,
                              rate_mbit: float) -> float:
    return alpha + link_beta(world_size, beta_unshaped, rate_mbit) * nbytes


def predict_step_on_link(unshaped_ms: float, cfg: dict, world_size: int, beta_unshaped: float,
                         rate_mbit: float) -> float:
    """A step on the link = the same step measured without the limit + the extra time its bytes
    take on the link (per step: a strategy that communicates every k steps pays 1/k of it)."""
    nbytes, _ = strategy_bytes(cfg.get("sync", "ddp"))
    k = cfg.get("local_sgd_every", 8) if cfg.get("sync", "ddp").startswith("local_sgd") else 1
    extra = (link_beta(world_size, beta_unshaped, rate_mbit) - beta_unshaped) * nbytes / k
    return unshaped_ms + 1000 * extra


# --- beyond this machine: a ring all-reduce over real links (stated assumptions) ----------------

CLUSTER_LINKS = {  # per-hop latency (s) and usable bandwidth (bytes/s)
    "10 Gb/s Ethernet": (30e-6, 10e9 / 8 * 0.9),
    "100 Gb/s (RoCE/InfiniBand)": (5e-6, 100e9 / 8 * 0.9),
}


def ring_allreduce_s(nbytes: float, world_size: int, latency_s: float, bytes_per_s: float) -> float:
    if world_size == 1:
        return 0.0
    return 2 * (world_size - 1) * latency_s + 2 * (world_size - 1) / world_size * nbytes / bytes_per_s


def lab_links(network: dict) -> dict[str, tuple[float, float]]:
    """The lab's shaped links as projection links: the unshaped 2-node fit's alpha split over
    the ring's two hops, and the nominal rate."""
    alpha = next(r for r in network["runs"] if r["nodes"] == 2 and r["rate_mbit"] is None)["allreduce"]["alpha_s"]
    return {f"lab {r['link']}": (alpha / 2, r["rate_mbit"] * 1e6 / 8)
            for r in network["runs"] if r["nodes"] == 2 and r["rate_mbit"] and r["rate_mbit"] <= 1000}


def lab_speedups(network: dict, compute_s: float, nbytes: int) -> pd.DataFrame:
    """The projection's speedup with its communication replaced by the gradient's all-reduce
    measured between the lab's nodes (2 and 4), on the links of :func:`lab_links`."""
    rows = [{"link": f"lab {r['link']}", "workers": r["nodes"],
             "speedup": r["nodes"] * compute_s / (compute_s + r["allreduce"]["seconds"][str(nbytes)])}
            for r in network["runs"] if r["rate_mbit"] and r["rate_mbit"] <= 1000]
    return pd.DataFrame(rows)


def scaling(throughput: dict, allreduce: dict, network: dict, world_sizes: list[int]
            ) -> tuple[pd.DataFrame, pd.DataFrame, list[float]]:
    """Speedup over one 1-thread worker: projected on the stated and the lab's links, computed from the
    all-reduce measured between the lab's nodes, and measured here with 2 workers, round by round (the
    rounds are paired: the same moment)."""
    cases = cases_by_id(throughput)
    one, ddp = cases[LOCAL[32]], cases["ddp_b32"]
    step_s, nbytes = one["step_ms"] / 1000, allreduce["gradient_bytes"]
    projection = project_speedup(step_s, nbytes, world_sizes, {**CLUSTER_LINKS, **lab_links(network)})
    measured = [2 * x / y for x, y in zip(one["rounds_ms"], ddp["rounds_ms"])]
    return projection, lab_speedups(network, step_s, nbytes), measured


def project_speedup(compute_s: float, nbytes: float, world_sizes: list[int], links: dict[str, tuple[float, float]],
                    steps_per_sync: int = 1) -> pd.DataFrame:
    """Throughput over one worker at a fixed batch per worker: S(W) = W t_c / (t_c + t_ring(W) / k),
    with no overlap of compute and communication (true for this model at DDP's default bucket)."""
    rows = []
    for name, (latency, bandwidth) in links.items():
        for w in world_sizes:
            comm = ring_allreduce_s(nbytes, w, latency, bandwidth) / steps_per_sync
            rows.append({"link": name, "workers": w, "comm ms": 1000 * comm,
                         "speedup": w * compute_s / (compute_s + comm),
                         "efficiency %": 100 * compute_s / (compute_s + comm)})
    return pd.DataFrame(rows)
