"""Across machines: real torchrun jobs on nodes joined by rate-limited links (``network``).

For each (nodes, link rate) the lab (:mod:`.netlab`) is built and one torchrun job runs on
it (:func:`job`, one rank per node, 1 thread each). The job measures, in the same process
group: the bare all-reduce against message size (the link's alpha and beta), then every
strategy's step through the shared engine, in interleaved rounds (every case once per
round, the order rotated from round to round). The single-process reference is one more case of
every round: rank 0 times it with two threads while the other ranks wait, so each strategy's
ratio to one process is taken round by round, in the same kind of process, with the same warm-up
and statistic. At 1 Gb/s, the fastest two-worker strategies then train to 98% beside the single
process, for five seeds, the order rotated per seed. Finally each shaped-link case is predicted from
what was measured without shaping and the link's nominal rate, and compared with its measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ..place import launcher_place
from ..config import TrainConfig
from ..data import load_datasets
from ..dist import job_group, job_store, process_group, single_process
from ..host import usable_cores
from ..launcher import launch
from ..sync import make_sync
from ..transport import Gloo, SharedMemory
from .comm import GRAD_BYTES, allreduce_medians, fit_alpha_beta, local_strategy, timed_steps
from .costmodel import predict_allreduce_on_link, predict_step_on_link
from .netlab import NetLab
from .records import per_round, record, rotated
from .tta import TARGET, time_to_target

LINKS = {"no limit": None, "10 Gb/s": 10_000, "1 Gb/s": 1_000, "100 Mb/s": 100}  # Mbit/s
# id -> (label, config overrides); batch 32 per worker, the design's other settings
CASES = {
    "ddp": ("DDP (one 25 MiB bucket cap)", dict(sync="ddp")),
    "ddp_bucket1": ("DDP, 1 MiB buckets", dict(sync="ddp", bucket_cap_mb=1.0)),
    "ddp_bucket025": ("DDP, 0.25 MiB buckets", dict(sync="ddp", bucket_cap_mb=0.25)),
    "fp16": ("DDP fp16 compression", dict(sync="fp16")),
    "powersgd": ("DDP PowerSGD rank 4", dict(sync="powersgd")),
    "local_sgd": ("local SGD, average every 8 steps", dict(sync="local_sgd", local_sgd_every=8)),
}
FOUR_NODE_CASES = ("ddp", "local_sgd")
REFERENCE = "single"  # the single-process reference's place in a job's rotation
REFERENCE_LABEL = "1 process, 2 threads (no network)"
TTA_SEEDS = (0, 1, 2, 3, 4)  # as many as notebook 04's time-to-98% pairs
TTA_STRATEGIES = ("ddp", "fp16", "powersgd", "local_sgd")  # every-step and periodic: the best two race
SWEEP_SIZES = sorted({*(2 ** k for k in range(10, 23, 2)), GRAD_BYTES})


def plan(quick: bool) -> list[dict]:
    """The jobs: (nodes, link, cases, steps). Slower links time fewer steps (the same seconds)."""
    if quick:
        return [{"nodes": 2, "link": link, "cases": ["ddp", "local_sgd", REFERENCE], "warmup": 8, "steps": 16, "rounds": 1}
                for link in ("no limit", "1 Gb/s")]
    steps = {"no limit": 96, "10 Gb/s": 96, "1 Gb/s": 64, "100 Mb/s": 24}  # multiples of local SGD's 8
    # Whole rotations, so that every case runs in every position equally often; the fast links,
    # where a case differs from another by a few per cent, get two.
    two_nodes = [*CASES, REFERENCE]
    whole = {"no limit": 2, "10 Gb/s": 2, "1 Gb/s": 1, "100 Mb/s": 1}
    jobs = [{"nodes": 2, "link": link, "cases": two_nodes, "warmup": steps[link], "steps": steps[link],
             "rounds": whole[link] * len(two_nodes)} for link in LINKS]
    four_nodes = [*FOUR_NODE_CASES, REFERENCE]
    jobs += [{"nodes": 4, "link": link, "cases": four_nodes, "warmup": steps[link], "steps": steps[link],
              "rounds": 2 * len(four_nodes)} for link in ("no limit", "1 Gb/s", "100 Mb/s")]
    return jobs


# --- inside the lab: one rank of the torchrun job ----------------------------------------------

def job(spec: dict) -> dict | None:
    """One rank: the all-reduce sweep, then every case in interleaved rounds, the order rotated by
    one case each round (so that none always runs first); rank 0's result. The reference case is one
    process alone: rank 0 trains with two threads and no synchronisation while the others wait."""
    env = launcher_place()
    with job_group(env, 300, backend="gloo", threads=1) as ctx:
        sweep = allreduce_medians(spec["sizes"], spec["repeats"])
        train, _ = load_datasets("mnist", "", spec["train_subset"], 1, 0)
        rounds: dict[str, list[dict]] = {case: [] for case in spec["cases"]}
        for r in range(spec["rounds"]):
            for case in rotated(spec["cases"], r):
                if case == REFERENCE:
                    if env.rank == 0:
                        with single_process(torch.device("cpu"), 2):
                            rounds[case].append(timed_steps(TrainConfig(world_size=1), 0, 1, local_strategy, train,
                                                            spec["warmup"], spec["steps"]))
                    dist.barrier()  # the other ranks wait, idle, until the reference is timed
                    continue
                cfg = TrainConfig(world_size=env.world_size, **CASES[case][1])
                strategy = lambda model, opt, profiler, cfg=cfg: make_sync(  # noqa: E731
                    cfg.sync, model, opt, env.world_size, ctx.device, cfg.local_sgd_every, profiler, ctx.transport,
                    bucket_cap_mb=cfg.bucket_cap_mb)
                rounds[case].append(timed_steps(cfg, env.rank, env.world_size, strategy, train, spec["warmup"],
                                                spec["steps"]))
    if env.rank != 0:
        return None
    return {"allreduce_s": {str(size): s for size, s in sweep.items()}, "rounds": rounds}


def hierarchical_job(spec: dict) -> dict | None:
    """One rank of 2 nodes x 2 ranks: the gradient's all-reduce and a DDP step, flat over gloo (every
    rank on the links) against hierarchical (shared memory within each node, its two leaders over
    gloo), alternating which goes first from round to round; rank 0's result."""
    env = launcher_place()
    store = job_store(env, 300)
    with process_group(env.rank, env.world_size, store, backend="gloo", threads=1, timeout_s=300) as ctx:
        node_of = ctx.gather(env.node)
        transports = {"gloo": Gloo(), "shm": SharedMemory(store, env.rank, node_of, timeout_s=300)}
        train, _ = load_datasets("mnist", "", spec["train_subset"], 1, 0)
        tensor = torch.ones(GRAD_BYTES // 4)
        out: dict = {"node_of": node_of, "allreduce_ms": {"gloo": [], "shm": []}, "rounds": {"gloo": [], "shm": []}}
        for r in range(spec["rounds"]):
            for name in (("gloo", "shm") if r % 2 == 0 else ("shm", "gloo")):
                times = []
                for i in range(3 + spec["repeats"]):
                    dist.barrier()  # all start together
                    start = time.perf_counter()
                    transports[name].all_reduce_(tensor.fill_(1.0))
                    if i >= 3:
                        times.append(time.perf_counter() - start)
                out["allreduce_ms"][name].append(1000 * statistics.median(times))
                cfg = TrainConfig(world_size=env.world_size)
                strategy = lambda model, opt, profiler, t=transports[name]: make_sync(  # noqa: E731
                    "ddp", model, opt, env.world_size, ctx.device, 8, profiler, t)
                out["rounds"][name].append(timed_steps(cfg, env.rank, env.world_size, strategy, train, spec["warmup"],
                                                       spec["steps"]))
        transports["shm"].close()
    return out if env.rank == 0 else None


def job_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddp_helpers.study.network")
    parser.add_argument("--spec", required=True, help="the job as JSON")
    parser.add_argument("--out", required=True, help="rank 0 writes its result here")
    args = parser.parse_args(argv)
    spec = json.loads(args.spec)
    result = hierarchical_job(spec) if spec.get("kind") == "hierarchical" else job(spec)
    if result is not None:
        Path(args.out).write_text(json.dumps(result))
    return 0


# --- in the parent: build, run, predict --------------------------------------------------------

def summarise_case(case: str, rounds: list[dict], nodes: int, reference_ms: list[float]) -> dict:
    """A case's step time over the rounds, and its samples per second over the reference's, round by round."""
    ms = [r["ms"] for r in rounds]
    vs = [nodes * ref / m for m, ref in zip(ms, reference_ms)]  # (nodes x 32 / m) / (32 / ref)
    return {"id": case, "label": CASES[case][0], "config": CASES[case][1], "rounds_ms": ms,
            "step_ms": statistics.median(ms), "step_ms_range": [min(ms), max(ms)],
            "split_ms": {p: statistics.median(r["split_ms"][p] for r in rounds) for p in rounds[0]["split_ms"]},
            "vs_single": per_round(vs)}


def run_job(spec: dict, quick: bool, log: Callable[[str], None]) -> dict:
    """Build the lab for one job, run it, and summarise what rank 0 measured."""
    rate = LINKS[spec["link"]]
    sweep = {"sizes": SWEEP_SIZES if not quick else [2 ** 12, 2 ** 18, GRAD_BYTES], "repeats": 3 if quick else 15,
             "train_subset": 4096 if quick else 0}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ddpnet_") as tmp, NetLab(spec["nodes"], rate) as lab:
        out = Path(tmp) / "result.json"
        lab.torchrun(["-m", "ddp_helpers.study.network", "--spec", json.dumps({**spec, **sweep}), "--out", str(out)],
                     timeout_s=1800)
        result = json.loads(out.read_text())
        setup = lab.describe()
    seconds = {int(size): s for size, s in result["allreduce_s"].items()}
    alpha, beta = fit_alpha_beta(list(seconds), list(seconds.values()))
    reference = [r["ms"] for r in result["rounds"].pop(REFERENCE)]
    cases = [summarise_case(case, rounds, spec["nodes"], reference) for case, rounds in result["rounds"].items()]
    log(f"{spec['nodes']} nodes, {spec['link']:>8}: gradient all-reduce {1000 * seconds[GRAD_BYTES]:.1f} ms; "
        + ", ".join(f"{c['id']} {c['step_ms']:.1f}" for c in cases) + f" ms/step; 1 process {statistics.median(reference):.2f}")
    return {"nodes": spec["nodes"], "link": spec["link"], "rate_mbit": rate, "setup": setup,
            "oversubscribed": spec["nodes"] > usable_cores(), "warmup_steps": spec["warmup"],
            "timed_steps": spec["steps"], "rounds": spec["rounds"],
            "orders": [rotated(spec["cases"], r) for r in range(spec["rounds"])],
            "allreduce": {"sizes_bytes": sorted(seconds), "seconds": {str(s): t for s, t in seconds.items()},
                          "alpha_s": alpha, "beta_s_per_byte": beta}, "cases": cases,
            "single_process": {"label": REFERENCE_LABEL, "threads": 2, "rounds_ms": reference,
                               "step_ms": statistics.median(reference)},
            "wall_s": time.perf_counter() - start}


def predictions(runs: list[dict]) -> dict:
    """Each shaped-link measurement against its prediction from the unshaped run with as many
    nodes (same cases, same run) and the link's nominal rate: nothing measured on a shaped link."""
    base = {r["nodes"]: r for r in runs if r["rate_mbit"] is None}
    steps, sweeps = [], []
    for run in runs:
        ref = base.get(run["nodes"])
        if run["rate_mbit"] is None or ref is None:
            continue
        ab = ref["allreduce"]
        ref_cases = {c["id"]: c for c in ref["cases"]}
        for c in run["cases"]:
            p = predict_step_on_link(ref_cases[c["id"]]["step_ms"], c["config"], run["nodes"], ab["beta_s_per_byte"],
                                     run["rate_mbit"])
            steps.append({"nodes": run["nodes"], "link": run["link"], "case": c["id"], "predicted_ms": p,
                          "measured_ms": c["step_ms"], "error_pct": 100 * (p / c["step_ms"] - 1)})
        for size, measured in run["allreduce"]["seconds"].items():
            p = predict_allreduce_on_link(int(size), run["nodes"], ab["alpha_s"], ab["beta_s_per_byte"],
                                          run["rate_mbit"])
            sweeps.append({"nodes": run["nodes"], "link": run["link"], "bytes": int(size), "predicted_s": p,
                           "measured_s": measured, "error_pct": 100 * (p / measured - 1)})
    errors = [abs(s["error_pct"]) for s in steps]
    return {"steps": steps, "allreduce": sweeps,
            "mean_abs_error_pct": statistics.mean(errors) if errors else None,
            "max_abs_error_pct": max(errors) if errors else None}


def run_tta(runs: list[dict], log: Callable[[str], None]) -> dict:
    """At 1 Gb/s, the two fastest two-worker strategies of this run train to 98% (torchrun on
    two nodes), beside the single process with two threads (no network): the design's settings,
    one run of each per seed, the order rotated from seed to seed."""
    one_gig = next(r for r in runs if r["nodes"] == 2 and r["link"] == "1 Gb/s")
    by_speed = sorted((c for c in one_gig["cases"] if c["id"] in TTA_STRATEGIES), key=lambda c: c["step_ms"])
    chosen = [c["id"] for c in by_speed[:2]]
    common = dict(stop_at_accuracy=TARGET, epochs=6, evals_per_epoch=4)
    names = {None: "1 process, 2 threads", **{case: f"2 nodes at 1 Gb/s: {case}" for case in chosen}}
    out = {"strategies": chosen, "chosen_by": "step time at 1 Gb/s in this run", "seeds": list(TTA_SEEDS),
           "runs": {name: [] for name in names.values()}, "orders": {}}
    for i, seed in enumerate(TTA_SEEDS):
        order = rotated(list(names), i)
        out["orders"][str(seed)] = [names[case] for case in order]
        for case in order:
            if case is None:
                got = launch(TrainConfig(world_size=1, threads_per_rank=2, seed=seed, **common), live=False,
                             fresh_process=True)
                config, history = got.record["config"], got.history
            else:
                config, history = _tta_on_link(case, seed, common)
            out["runs"][names[case]].append({"seed": seed, "config": config, **time_to_target(history)})
    single = out["runs"][names[None]]
    out["ratios"] = {case: [s["seconds_to_target"] / t["seconds_to_target"] if s["reached"] and t["reached"] else None
                            for s, t in zip(single, out["runs"][names[case]])] for case in chosen}
    for name, seeds in out["runs"].items():
        log(f"time to 98%: {name:<32} " + ", ".join(f"{r['seconds_to_target']:.1f} s" if r["reached"] else "not reached"
                                                    for r in seeds))
    return out


def _tta_on_link(case: str, seed: int, common: dict) -> tuple[dict, list[dict]]:
    """One two-node training run at 1 Gb/s through torchrun: its config and per-epoch history."""
    with tempfile.TemporaryDirectory(prefix="ddpnet_") as tmp, NetLab(2, LINKS["1 Gb/s"]) as lab:
        cfg = TrainConfig(world_size=2, threads_per_rank=1, backend="gloo", device="cpu", output_dir=tmp,
                          run_name="tta", seed=seed, **common, **CASES[case][1])
        lab.torchrun(["-m", "ddp_helpers", "train", "--config", str(save_config(cfg, tmp)), "--no-progress"],
                     timeout_s=1800)
        rec = json.loads((Path(tmp) / "tta.json").read_text())
    return rec["config"], rec["epochs"]


def save_config(cfg: TrainConfig, folder: str) -> Path:
    path = Path(folder) / "config.json"
    path.write_text(cfg.to_json())
    return path


def run_hierarchical(quick: bool, log: Callable[[str], None]) -> list[dict]:
    """2 nodes x 2 ranks at each link rate: flat gloo against shared memory within the nodes."""
    out = []
    for link in (("no limit",) if quick else LINKS):
        spec = {"kind": "hierarchical", "rounds": 1 if quick else 5, "repeats": 2 if quick else 10,
                "warmup": 4 if quick else {"100 Mb/s": 24}.get(link, 80), "steps": 4 if quick else
                {"100 Mb/s": 24}.get(link, 80), "train_subset": 4096 if quick else 0}
        with tempfile.TemporaryDirectory(prefix="ddpnet_") as tmp, NetLab(2, LINKS[link]) as lab:
            path = Path(tmp) / "result.json"
            lab.torchrun(["-m", "ddp_helpers.study.network", "--spec", json.dumps(spec), "--out", str(path)],
                         nproc_per_node=2, timeout_s=1800)
            got = json.loads(path.read_text())
        row = {"link": link, "rate_mbit": LINKS[link], "nodes": 2, "ranks_per_node": 2, "node_of": got["node_of"],
               "rounds": spec["rounds"], "allreduce_ms": got["allreduce_ms"],
               "ddp_step_ms": {k: [r["ms"] for r in v] for k, v in got["rounds"].items()},
               "ddp_split_ms": {k: [r["split_ms"] for r in v] for k, v in got["rounds"].items()}}
        row["flat_over_hierarchical"] = {what: per_round([g / h for g, h in zip(row[what]["gloo"], row[what]["shm"])])
                                         for what in ("allreduce_ms", "ddp_step_ms")}
        log(f"2 nodes x 2 ranks, {link:>8}: gradient all-reduce flat {statistics.median(row['allreduce_ms']['gloo']):.1f}"
            f" ms, hierarchical {statistics.median(row['allreduce_ms']['shm']):.1f} ms; DDP step "
            f"{statistics.median(row['ddp_step_ms']['gloo']):.1f} and {statistics.median(row['ddp_step_ms']['shm']):.1f} ms")
        out.append(row)
    return out


def run_hierarchical_part(quick: bool, log: Callable[[str], None]) -> dict:
    """The part ``hierarchical``: 2 nodes x 2 ranks at each link rate, flat gloo against shared memory
    within the nodes and gloo between their leaders."""
    return record("study_hierarchical", quick, {
        "lab": "two Linux network namespaces joined by one veth pair, capped by tc tbf on both ends",
        "launcher": "torchrun --nnodes 2 --nproc-per-node 2 (4 ranks on the machine's cores), 1 thread each; the "
                    "nodes as torchrun numbers them (GROUP_RANK)",
        "compared": "flat = gloo among all 4 ranks; hierarchical = shared memory within each node, its first rank "
                    "(leader) all-reduces with the other node's over gloo, then shares the result within its node",
        "statistic": "order alternating per round; all-reduce of the gradient: median of repeats after a barrier; "
                     "DDP step (batch 32 per rank): mean of the timed steps after a warm-up; ratios per round",
        "cores": usable_cores()}, links=LINKS, runs=run_hierarchical(quick, log))


def run_network(quick: bool, log: Callable[[str], None]) -> dict:
    runs = [run_job(spec, quick, log) for spec in plan(quick)]
    checked = predictions(runs)
    if checked["mean_abs_error_pct"] is not None:
        log(f"model on the shaped links: mean |error| {checked['mean_abs_error_pct']:.1f}% over "
            f"{len(checked['steps'])} cases (largest {checked['max_abs_error_pct']:.1f}%)")
    tta = None if quick else run_tta(runs, log)
    return record("study_network", quick, {
        "lab": "one Linux network namespace per node; 2 nodes: one veth pair, 4 nodes: a bridge; each link capped "
               "by tc tbf on both ends (burst 1 ms at the rate, at least 64 KB; queue 10 ms)",
        "launcher": "torchrun --nnodes N --nproc-per-node 1, c10d rendezvous on node 0, gloo over eth0",
        "threads_per_rank": 1, "batch_per_rank": 32,
        "statistic": "per round: mean step time over the timed steps after the warm-up; median over rounds",
        "reference": "1 process, 2 threads, no synchronisation: one more case of every round, timed by rank 0 of the "
                     "job while the other ranks wait; each case's vs_single is taken round by round",
        "allreduce": "median of repeats per size after 5 untimed; t = alpha + beta * bytes fitted on relative error",
        "model": "shaped link = the same case measured on the unshaped link of this run, with the gradient's bytes "
                 "moved at max(unshaped beta, 2(W-1)/W x 8 / rate) instead of the unshaped beta; no overlap assumed",
        "cores": usable_cores()}, links=LINKS, runs=runs, predictions=checked, tta=tta)


if __name__ == "__main__":  # one rank of a lab job, started by torchrun
    from ..workers import exit_now

    exit_now(job_main(sys.argv[1:]))
