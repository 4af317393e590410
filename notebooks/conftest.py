"""nbval runs the notebooks in smoke mode (a data subset, 1 epoch); see each parameters cell.

The environment is set here, before nbval starts a kernel, so the kernels inherit it.
The committed outputs come from full runs (`jupyter nbconvert --execute` without it).
"""

import os
from pathlib import Path

os.environ.setdefault("DDP_NOTEBOOK_SMOKE", "1")
_shared = Path(__file__).resolve().parents[2] / "shared" / "data"
if "MNIST_DATA_DIR" not in os.environ and (_shared / "MNIST" / "raw").is_dir():
    os.environ["MNIST_DATA_DIR"] = str(_shared)
