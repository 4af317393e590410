"""nbval runs the notebooks in smoke mode (a data subset, 1 epoch); see each parameters cell.

The environment is set here, before nbval starts a kernel, so the kernels inherit it.
The committed outputs come from full runs (`jupyter nbconvert --execute` without it).
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("DDP_NOTEBOOK_SMOKE", "1")
# The kernels' temporary folders (smoke outputs, scratch checkpoints) go into one folder that this
# process removes when it ends: nbval stops its kernels without running their exit handlers.
_KERNEL_TMP = tempfile.mkdtemp(prefix="ddp_nbval_")
os.environ["TMPDIR"] = _KERNEL_TMP
atexit.register(shutil.rmtree, _KERNEL_TMP, ignore_errors=True)
_shared = Path(__file__).resolve().parents[2] / "shared" / "data"
if "MNIST_DATA_DIR" not in os.environ and (_shared / "MNIST" / "raw").is_dir():
    os.environ["MNIST_DATA_DIR"] = str(_shared)
