"""Notebook 05's closing table: each challenge the original design named, where this project
answers it, and what was measured, read from the records in ``results/``."""

from __future__ import annotations

import statistics
from pathlib import Path

import pandas as pd

from ..data import IMAGE_PIXELS, RAW_FILES
from ..failures import BLAME_GRACE_S
from ..host import code_label
from ..results import load_json
from ..study import costmodel


TWO_GB_MIB = 2e9 / 2 ** 20  # the design's "under 2 GB", in MiB (1,907)


def data_mib() -> float:
    """Both MNIST splits as this project holds them, float32 images and int64 labels, in MiB."""
    samples = sum(shape[0] for name, (_, shape, _) in RAW_FILES.items() if "labels" in name)
    return samples * (IMAGE_PIXELS * 4 + 8) / 2 ** 20


def memory_answer(ddp_run: dict, single_run: dict, inside: dict | None = None) -> str:
    """Peak memory against the design's "< 2 GB": the ranks' proportional set sizes and the launching
    process's (notebook 08), and the peak resident sets the two CLI training records keep (they count
    the libraries the ranks share once per rank)."""
    peaks, single = ddp_run["runtime"].get("peak_rss_mib_per_rank"), single_run["runtime"].get("peak_rss_mib_per_rank")
    if not peaks or not single:
        return "peak memory not in these records (made before records kept it)"
    rss = (f"CLI runs of 5 epochs: peak RSS per DDP rank {' + '.join(f'{mib:,.0f}' for mib in peaks)} MiB (shared "
           f"library pages counted in each), one process {single[0]:,.0f} MiB")
    if not inside:
        return rss
    memory = inside["lessons"]["memory"]
    ranks = sum(r["peak_pss_mib"] for r in memory["ranks"].values())
    both = ranks + memory["launcher_peak_pss_mib"]

    def versus(mib: float) -> str:
        return "under" if mib < TWO_GB_MIB else "over"

    gaps = [1000 * r["span_s"] / r["samples"] for r in memory["ranks"].values() if r.get("samples")]
    span = "-".join(dict.fromkeys(f"{g:.0f}" for g in (min(gaps), max(gaps)))) if gaps else ""  # "20", not "20-20"
    got = f", got one every {span} ms" if gaps else ""
    return (f"PSS, a sample asked for every {1000 * memory['interval_s']:.0f} ms{got}, over {memory['steps']} "
            f"training steps (notebook 08): the two ranks "
            f"{ranks:,.0f} MiB, "
            f"{versus(ranks)} 2 GB ({TWO_GB_MIB:,.0f} MiB); with the notebook kernel that launched them {both:,.0f} "
            f"MiB, {versus(both)}. {rss[0].upper()}{rss[1:]}")


def scaling_answer(throughput: dict, allreduce: dict, network: dict) -> str:
    """The design's 3.2x at 4 workers and 5.6x at 8, against what was measured and what the cost model
    projects (same compute per worker, one all-reduce of the gradient per step, no overlap)."""
    projection, _, one_rounds = costmodel.scaling(throughput, allreduce, network, [4, 8])
    shown = projection[projection["link"].isin(["lab 1 Gb/s", *costmodel.CLUSTER_LINKS])]
    at = {link: rows.set_index("workers")["speedup"] for link, rows in shown.groupby("link", sort=False)}
    rounds = [1 / r for r in throughput["comparisons"]["ddp_w2_vs_w1_2t_epoch"]["rounds"]]
    two_threads = statistics.median(rounds)
    return (f"measured (2 workers, study; medians of per-round ratios): {statistics.median(one_rounds):.2f}x one "
            f"1-thread worker (rounds {min(one_rounds):.2f}-{max(one_rounds):.2f}), {two_threads:.2f}x one 2-thread "
            f"process (rounds {min(rounds):.2f}-{max(rounds):.2f}). Projected at 4 / 8 workers, each with its own core: "
            + "; ".join(f"{link} {s[4]:.1f}x / {s[8]:.1f}x" for link, s in at.items())
            + ". Not measured on 4 or 8 machines")


def gpu_provenance(gpu: dict) -> str:
    """Which code and date made the GPU record: it is older than the CPU records (no device since)."""
    return f"code {code_label(gpu['environment']['code'])}, {gpu['created'][:10]}"


def platforms_answer(gpu: dict) -> str:
    one = gpu["runs"]["W=1, CUDA graph (default)"]["summary"]["median_epoch_time_s"]
    two = gpu["runs"]["W=2 over gloo on the one GPU"]["summary"]["median_epoch_time_s"]
    return (f"one GPU (Colab, an EC2 GPU instance, a local GPU): one process with the CUDA graph, {one:.2f} s per epoch "
            f"on the lent H100 (median of 5; {gpu_provenance(gpu)}); two ranks sharing it over gloo, {two:.2f} s "
            f"for their one epoch "
            f"({two / one:.0f}x slower). A cluster: "
            f"torchrun or srun (README, 'On a cluster'), tested with a stand-in srun and between network namespaces")


def silent_answer(faults: pd.DataFrame, timeout_s: float) -> str:
    """How soon a rank that went silent (hung, frozen) was named, from section 2's table."""
    after = faults["reported after (s)"]
    named = [f"a {what} rank reported {after[kind]} s after it stopped" for kind, what in
             (("hangs", "hung"), ("is frozen", "frozen")) if kind in after]
    return (f"{'; '.join(named)} (the timeout, {timeout_s:g} s, then {BLAME_GRACE_S:g} s for other ranks to fail too); "
            f"workers left: {int(faults['workers left'].sum())}")


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def design_results_answer(main: dict, single: dict, pairs: dict, sync_share: float) -> str:
    """The design's epoch time, speedup and communication share against this project's records."""
    two, one = (r["summary"]["median_epoch_time_s"] for r in (main, single))
    shm = pairs["summary"]["DDP, shared memory"]
    return (f"2 workers {two:.2f} s per epoch, 1 process {one:.2f} s (CLI, 5 epochs each, medians; run one after "
            f"the other); interleaved rounds: 2 workers take {shm['median']:.2f}x one process's epoch time (range "
            f"{shm['min']:.2f}-{shm['max']:.2f}), so no 1.8x speedup here; synchronising is "
            f"{100 * sync_share:.0f}% of a DDP step, not ~10%")


def challenges_table(results: Path, faults: pd.DataFrame, resumed_exactly: bool, restarted: bool,
                     timeout_s: float) -> pd.DataFrame:
    """One row per challenge: (where and how it is answered, what was measured)."""
    base, ddp = load_json(results / "02_baseline.json"), load_json(results / "03_ddp.json")
    throughput, allreduce = load_json(results / "study_throughput.json"), load_json(results / "study_allreduce.json")
    gpu, network = load_json(results / "gpu" / "study_gpu.json"), load_json(results / "study_network.json")
    data = data_mib()
    data_share = statistics.median(r["step_ms"]["data"] / r["step_ms"]["total"] for r in base["epochs"])
    study_ddp = costmodel.cases_by_id(throughput)["ddp_b32"]  # the all-reduce's host and run
    allreduce_ms = 1000 * allreduce["world_sizes"]["2"]["seconds"][str(allreduce["gradient_bytes"])]
    sync_share = statistics.median(r["sync_fraction"] for r in ddp["epochs"])
    main, single = load_json(results / "train_ws2_ddp.json"), load_json(results / "train_ws1.json")
    rows = [
        ("6.1 data preprocessing is CPU-bound", "data.py: images preloaded as tensors; a batch is an index",
         f"data handling {100 * data_share:.0f}% of a baseline step (notebook 02)"),
        ("6.1 memory", f"nothing to manage: both splits as tensors are {data:.0f} MiB (from their shapes)",
         memory_answer(main, single,
                       load_json(results / "08_inside.json") if (results / "08_inside.json").exists() else None)),
        ("6.1 CPU training is slow", "cuda_graph.py: the whole step as one CUDA graph on a GPU",
         f"{gpu['runs']['W=1, CUDA graph (default)']['summary']['median_epoch_time_s']:.2f} s/epoch on one H100, "
         f"{gpu['ours_vs_graph_floor']:.2f}x its floor (lent machine; {gpu_provenance(gpu)})"),
        ("6.2 Horovod on macOS", "not used: PyTorch DDP only; nothing to install beyond requirements.txt",
         "run and tested on Linux only (this host, and the lent GPU machine); macOS not tried"),
        ("6.2 NCCL needs GPUs; ports conflict", "dist.py: backend and GPU check per node; free port picked, busy one "
         "named", "nccl without GPUs and a busy --master-port refused with a fix (section 4)"),
        ("6.3 gradient synchronisation costs", "sync/: DDP, manual all-reduce, fp16, PowerSGD, local SGD; notebook 04",
         f"sync (all-reduce + waiting) over shared memory {100 * sync_share:.0f}% of a DDP step (notebook 03's run); "
         f"over gloo {100 * study_ddp['sync_fraction']:.0f}% (the study, notebook 04), the bare all-reduce of the "
         f"gradient alone {allreduce_ms:.1f} ms, {100 * allreduce_ms / study_ddp['step_ms']:.0f}% of that step"),
        ("6.3 starting and stopping together", "dist.py: timeouts on every wait; ranks leave together via the store",
         silent_answer(faults, timeout_s)),
        ("6.3 collecting metrics", "trainer.py: loss and accuracy sums all-reduced; each test sample counted once",
         "not a measurement: a test checks that every test sample counts once"),
        ("6.4 the download can fail", "data.py: no dummy data; a clear error naming the folder and the fix",
         "missing, truncated and corrupt files refused (section 4)"),
        ("6.4 memory-efficient data handling", "data.py: decoded once into tensors, shards are index lists",
         f"each rank holds its own copy of both splits ({data:.0f} MiB), counted in its memory by notebook 08; "
         f"its shard is a list of indices"),
        ("6.5 worker failure and lost progress", "resume.py, checkpoint.py, workers.py, torchrun --max-restarts",
         f"resume bit-identical: {yes_no(resumed_exactly)}; torchrun restart finished: {yes_no(restarted)}"),
        ("7 the design's results: 7.94 s per epoch, ~1.8x, ~10% communication",
         "measured on this host by the CLI (main job), notebook 03's interleaved rounds and its run",
         design_results_answer(main, single, load_json(results / "03_pairs.json"), sync_share)),
        ("7 scaling: 3.2x at 4 workers, 5.6x at 8", "study: cost model (notebook 04), network lab (notebook 06)",
         scaling_answer(throughput, allreduce, network)),
        ("5.2 other platforms: Colab, AWS EC2, a local GPU", "the same code: device and backend chosen per node",
         platforms_answer(gpu)),
        ("5.3 CUDA and cuML", "CUDA through PyTorch (CUDA graphs on one GPU; NCCL chosen when each rank has a GPU, never run with two ranks here); cuML not used: it speeds up classical models behind "
         "scikit-learn's interface, and this model is a network trained by backpropagation, which PyTorch runs on "
         "the GPU itself", "the GPU path: row 6.1 above"),
    ]
    return pd.DataFrame(rows, columns=["challenge (design section)", "where and how", "measured"]
                        ).set_index("challenge (design section)")
