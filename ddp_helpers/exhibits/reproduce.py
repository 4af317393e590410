"""One command that reproduces the deliverable on this host, in order:

    python -m ddp_helpers.exhibits.reproduce [--study]

1. the main job's records through the CLI: ``results/train_ws1.json`` and ``train_ws2_ddp.json``;
2. with ``--study`` only, the study's records (about 55 minutes on 2 cores): ``results/study_*.json``;
3. notebooks 01-08 executed in full, in order (05 last: it reads 08's record), in place; their records and charts land in
   ``results/`` (the study's charts from the study's records).

Nothing else should run on the machine meanwhile: the notebooks and the study time things.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from ..data import PROJECT_ROOT
from ..results import RESULTS_DIR

NOTEBOOKS = PROJECT_ROOT / "notebooks"


def run(command: list[str]) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def execute_notebook(path: Path, timeout_s: int = 3600) -> float:
    import nbformat
    from nbclient import NotebookClient

    start = time.perf_counter()
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=timeout_s, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
                   ).execute()
    nbformat.write(nb, path)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddp_helpers.exhibits.reproduce",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", action="store_true", help="also re-run the study first (about 55 minutes)")
    args = parser.parse_args(argv)
    os.environ.pop("DDP_NOTEBOOK_SMOKE", None)  # full runs only
    python = sys.executable
    for world_size, name in ((1, "train_ws1"), (2, "train_ws2_ddp")):
        run([python, "-m", "ddp_helpers", "train", "--world-size", str(world_size), "--epochs", "5",
             "--output-dir", str(RESULTS_DIR), "--run-name", name, "--no-progress"])
    if args.study:
        run([python, "-m", "ddp_helpers.study", "all"])
    # 05's table of the design's challenges reads the records of 02, 03 and 08: it runs last
    for path in sorted(NOTEBOOKS.glob("0*.ipynb"), key=lambda p: (p.name.startswith("05"), p.name)):
        print(f"executing {path.name} ...", flush=True)
        print(f"  done in {execute_notebook(path):.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
