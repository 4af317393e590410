"""Across machines: real torchrun jobs on nodes joined by rate-limited links (``network``).

For each (nodes, link rate) the lab (:mod:`.netlab`) is built and one torchrun job runs on
it (:func:`job`, one rank per node, 1 thread each). The job measures, in the same process
group: the bare all-reduce against message size (the link's alpha and beta), then every
strategy's step through the shared engine, in interleaved rounds (every case once per
round, the order rotated from round to round). The single-process reference runs in a fresh
process before every job and after the last. At 1 Gb/s, the fastest two-worker strategies then train to 98% beside the single
process. Finally each shaped-link case is predicted from what was measured without shaping
and the link's nominal rate, and compared with its measurement.
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
from ..sync import LocalSync, make_sync
from ..transport import Gloo, SharedMemory
from ..workers import run_workers
from .comm import GRAD_BYTES, allreduce_medians, fit_alpha_beta, timed_steps
from .costmodel import predict_allreduce_on_link, predict_step_on_link
from .netlab import NetLab
from .records import record
from .tta import TARGET, time_to_target

LINKS = {"no limit": None, "10 Gb/s": 10_000, "1 Gb/s": 1_000, "100 Mb/s": 100}  # Mbit/s
# id -> (label, config overrides); batch 32 per worker, the design's other settings
CASES = {
    "ddp": ("DDP (one 25 MB bucket cap)", dict(sync="ddp")),
    "ddp_bucket1": ("DDP, 1 MB buckets", dict(sync="ddp", bucket_cap_mb=1.0)),
    "ddp_bucket025": ("DDP, 0.25 MB buckets", dict(sync="ddp", bucket_cap_mb=0.25)),
    "fp16": ("DDP fp16 compression", dict(sync="fp16")),
    "powersgd": ("DDP PowerSGD rank 4", dict(sync="powersgd")),
    "local_sgd": ("local SGD, average every 8 steps", dict(sync="local_sgd", local_sgd_every=8)),
}
FOUR_NODE_CASES = ("ddp", "local_sgd")
TTA_STRATEGIES = ("ddp", "fp16", "powersgd", "local_sgd")  # every-step and periodic: the best two race
SWEEP_SIZES = sorted({*(2 ** k for k in range(10, 23, 2)), GRAD_BYTES})


def plan(quick: bool) -> list[dict]:
    """The jobs: (nodes, link, cases, steps). Slower links time fewer steps (the same seconds)."""
    if quick:
        return [{"nodes": 2, "link": link, "cases": ["ddp", "local_sgd"], "warmup": 8, "steps": 16, "rounds": 1}
                for link in ("no limit", "1 Gb/s")]
    steps = {"no limit": 96, "10 Gb/s": 96, "1 Gb/s": 64, "100 Mb/s": 24}  # multiples of local SGD's 8
    jobs = [{"nodes": 2, "link": link, "cases": list(CASES), "warmup": steps[link], "steps": steps[link], "rounds": 5}
            for link in LINKS]
    jobs += [{"nodes": 4, "link": link, "cases": list(FOUR_NODE_CASES), "warmup": steps[link], "steps": steps[link],
              "rounds": 5} for link in ("no limit", "1 Gb/s", "100 Mb/s")]
    return jobs


# --- inside the lab: one rank of the torchrun job ----------------------------------------------

def job(spec: dict) -> dict | None:
    """One rank: the all-reduce sweep, then every case in interleaved rounds, the order rotated by
    one case each round (so that none always runs first); rank 0's result."""
    env = launcher_place()
    with job_group(env, 300, backend="gloo", threads=1) as ctx:
        sweep = allreduce_medians(spec["sizes"], spec["repeats"])
        train, _ = load_datasets("mnist", "", spec["train_subset"], 1, 0)
        rounds: dict[str, list[dict]] = {case: [] for case in spec["cases"]}
        for r in range(spec["rounds"]):
            shift = r % len(spec["cases"])
            for case in spec["cases"][shift:] + spec["cases"][:shift]:
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

def summarise_case(case: str, rounds: list[dict]) -> dict:
    ms = [r["ms"] for r in rounds]
    return {"id": case, "label": CASES[case][0], "config": CASES[case][1], "rounds_ms": ms,
            "step_ms": statistics.median(ms), "step_ms_range": [min(ms), max(ms)],
            "split_ms": {p: statistics.median(r["split_ms"][p] for r in rounds) for p in rounds[0]["split_ms"]}}


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
    cases = [summarise_case(case, rounds) for case, rounds in result["rounds"].items()]
    log(f"{spec['nodes']} nodes, {spec['link']:>8}: gradient all-reduce {1000 * seconds[GRAD_BYTES]:.1f} ms; "
        + ", ".join(f"{c['id']} {c['step_ms']:.1f}" for c in cases) + " ms/step")
    return {"nodes": spec["nodes"], "link": spec["link"], "rate_mbit": rate, "setup": setup,
            "oversubscribed": spec["nodes"] > usable_cores(), "warmup_steps": spec["warmup"],
            "timed_steps": spec["steps"], "rounds": spec["rounds"],
            "allreduce": {"sizes_bytes": sorted(seconds), "seconds": {str(s): t for s, t in seconds.items()},
                          "alpha_s": alpha, "beta_s_per_byte": beta}, "cases": cases,
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
    two nodes), beside the single process with two threads (no network): the design's settings."""
    one_gig = next(r for r in runs if r["nodes"] == 2 and r["link"] == "1 Gb/s")
    by_speed = sorted((c for c in one_gig["cases"] if c["id"] in TTA_STRATEGIES), key=lambda c: c["step_ms"])
    chosen = [c["id"] for c in by_speed[:2]]
    common = dict(stop_at_accuracy=TARGET, epochs=6, evals_per_epoch=4)
    out = {"strategies": chosen, "chosen_by": "step time at 1 Gb/s in this run", "runs": {}}
    single = launch(TrainConfig(world_size=1, threads_per_rank=2, **common), live=False)
    out["runs"]["1 process, 2 threads"] = {"config": single.record["config"], **time_to_target(single.history)}
    for case in chosen:
        with tempfile.TemporaryDirectory(prefix="ddpnet_") as tmp, NetLab(2, LINKS["1 Gb/s"]) as lab:
            cfg = TrainConfig(world_size=2, threads_per_rank=1, backend="gloo", device="cpu", output_dir=tmp,
                              run_name="tta", **common, **CASES[case][1])
            lab.torchrun(["-m", "ddp_helpers", "train", "--config", str(save_config(cfg, tmp)), "--no-progress"],
                         timeout_s=1800)
            rec = json.loads((Path(tmp) / "tta.json").read_text())
        out["runs"][f"2 nodes at 1 Gb/s: {case}"] = {"config": rec["config"], **time_to_target(rec["epochs"])}
    for name, r in out["runs"].items():
        log(f"time to 98%: {name:<32} " + (f"{r['seconds_to_target']:.1f} s (epoch {r['epochs_to_target']:.2f})"
                                          if r["reached"] else "not reached"))
    return out


def save_config(cfg: TrainConfig, folder: str) -> Path:
    path = Path(folder) / "config.json"
    path.write_text(cfg.to_json())
    return path


def _single_job(place, emit, steps: int, train_subset: int, threads: int) -> None:
    train, _ = load_datasets("mnist", "", train_subset, 1, 0)
    with single_process(torch.device("cpu"), threads):
        emit("result", timed_steps(TrainConfig(world_size=1), 0, 1, lambda model, opt, profiler: LocalSync(model, opt),
                                   train, steps, steps))


def single_process_ms(quick: bool, steps: int = 96, threads: int = 2) -> dict:
    """The reference: one process with two threads, no network, in a fresh process as the lab's ranks
    are, through the same engine and the same statistic (warm-up, then the mean over the timed steps).
    A smoke run (``quick``) times it in this process: it checks the record's shape, not the number."""
    if quick:
        return _single_in_this_process(16, 4096, threads)
    return run_workers(_single_job, 1, (steps, 0, threads), launch_timeout_s=600)[0]


def _single_in_this_process(steps: int, train_subset: int, threads: int) -> dict:
    out = {}
    _single_job(None, lambda kind, payload: out.update(payload), steps, train_subset, threads)
    return out


def run_hierarchical(quick: bool, log: Callable[[str], None]) -> list[dict]:
    """2 nodes x 2 ranks at each link rate: flat gloo against shared memory within the nodes."""
    out = []
    for link in (("no limit",) if quick else LINKS):
        spec = {"kind": "hierarchical", "rounds": 1 if quick else 4, "repeats": 2 if quick else 10,
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
        row["flat_over_hierarchical"] = {
            what: {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": ratios}
            for what in ("allreduce_ms", "ddp_step_ms")
            for ratios in [[g / h for g, h in zip(row[what]["gloo"], row[what]["shm"])]]}
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
    single, runs = [], []
    for i, spec in enumerate(plan(quick)):  # the reference before every lab job and after the last: the drift shows
        if i == 0 or not quick:  # (a smoke run: before the first and after the last only)
            single.append(single_process_ms(quick))
        runs.append(run_job(spec, quick, log))
    single.append(single_process_ms(quick))
    reference = {"threads": 2, "rounds_ms": [r["ms"] for r in single],
                 "step_ms": statistics.median(r["ms"] for r in single),
                 "process": "the study's own process (a smoke run)" if quick else
                   "a fresh spawned process, before every lab job and after the last"}
    log(f"1 process, 2 threads, no network: {reference['step_ms']:.2f} ms/step "
        f"(before each lab job and after the last: {', '.join(f'{v:.2f}' for v in reference['rounds_ms'])})")
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
        "allreduce": "median of repeats per size after 5 untimed; t = alpha + beta * bytes fitted on relative error",
        "model": "shaped link = the same case measured on the unshaped link of this run, with the gradient's bytes "
                 "moved at max(unshaped beta, 2(W-1)/W x 8 / rate) instead of the unshaped beta; no overlap assumed",
        "cores": usable_cores()}, links=LINKS, single_process=reference, runs=runs, predictions=checked, tta=tta)


if __name__ == "__main__":  # one rank of a lab job, started by torchrun
    from ..workers import exit_now

    exit_now(job_main(sys.argv[1:]))
