"""``python -m ddp_helpers.study {part,...,all} [--quick] [--out FOLDER]``."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from ..host import peak_rss_mib
from ..results import RESULTS_DIR, save_json
from .netlab import LabUnavailable
from .records import cpu_shares, cpu_ticks

# part -> (module, function, what it measures); "all" runs the CPU parts in this order
PARTS = {
    "allreduce": ("comm", "run_allreduce", "gloo all-reduce time against message size, fitted to alpha + beta * bytes"),
    "syncstep": ("comm", "run_syncstep", "a W=2 step that synchronises 4 bytes; each DDP hook's own computation"),
    "cores": ("floors", "run_cores", "compute only: one process, two at once, one with two threads"),
    "throughput": ("throughput", "run_throughput", "step time and its split for every strategy, and the "
                                                   "original design's implementation"),
    "knobs": ("knobs", "run_knobs", "DDP's bucket_cap_mb, gradient_as_bucket_view and static_graph side by side"),
    "tta": ("tta", "run_tta", "time to 98% validation accuracy: 3 single-process against 3 two-worker settings"),
    "network": ("network", "run_network", "torchrun jobs on 2 and 4 nodes (network namespaces) over links of 10 Gb/s, "
                                          "1 Gb/s, 100 Mb/s and no limit: all-reduce, every strategy, time to 98%"),
    "transport": ("transport", "run_transport", "the same-host transport: the bare all-reduce (gloo, shared memory, "
                                                 "the memory-copy floor), training steps against the no-sync ceiling, "
                                                 "time to 98% of a declared shared-memory setting"),
    "hierarchical": ("network", "run_hierarchical_part", "2 nodes x 2 ranks (network namespaces) at each link rate: "
                                                         "flat gloo against shared memory within the nodes"),
    "precision": ("precision", "run_precision", "bf16-mixed against float32, one process and DDP W=2, and whether "
                                                 "this CPU has native bf16"),
    "gpu": ("gpu", "run_gpu", "one GPU: our loop against the CUDA-graph floor of the same step (needs a GPU)"),
}
CPU_PARTS = ["allreduce", "syncstep", "cores", "throughput", "knobs", "tta", "transport", "precision", "network",
             "hierarchical"]


def main(argv: list[str] | None = None) -> int:
    parts_help = "\n".join(f"  {name:<11} {what}" for name, (_, _, what) in PARTS.items())
    parser = argparse.ArgumentParser(prog="python -m ddp_helpers.study", formatter_class=argparse.RawTextHelpFormatter,
                                     description=f"The scaling study. Parts:\n{parts_help}\n  all         "
                                                 f"the CPU parts in order (about 55 minutes on 2 cores; network needs root)")
    parser.add_argument("part", choices=[*PARTS, "all"])
    parser.add_argument("--quick", action="store_true", help="a smoke run of seconds: few steps, a data subset")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="folder for the study_<part>.json records")
    args = parser.parse_args(argv)
    try:
        return run_parts(CPU_PARTS if args.part == "all" else [args.part], args.part, args.quick, Path(args.out))
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM inside the network lab: what it built is already removed
        print("interrupted: the study stopped; records written so far are kept", file=sys.stderr)
        return 130


def run_parts(parts: list[str], asked: str, quick: bool, out: Path) -> int:
    for part in parts:
        module, function, _ = PARTS[part]
        run = getattr(importlib.import_module(f"{__package__}.{module}"), function)
        before = cpu_ticks()
        try:
            record = run(quick, lambda line: print(line, flush=True))
        except LabUnavailable as exc:  # not root, no iproute2: one line, and "all" goes on without it
            print(f"{part}: cannot build the network lab here: {exc}", file=sys.stderr)
            if asked == part:
                return 3
            continue
        if record is None:
            continue
        record["cpu_time_shares"] = cpu_shares(before, cpu_ticks())  # steal > 0: the host took our cores
        # the study's own process so far: parts run in order, so a later part's figure covers the earlier ones
        record["study_process_peak_rss_mib"] = round(peak_rss_mib(), 1)
        suffix = "_quick" if quick else ""
        print(f"wrote {save_json(record, out / f'study_{part}{suffix}.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
