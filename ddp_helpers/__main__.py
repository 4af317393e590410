import faulthandler
import sys

from .cli import main
from .cluster.env import torchrun_env
from .workers import exit_now


def started_as_a_rank() -> bool:
    """Whether torchrun or srun started this process as one rank of its job."""
    try:
        return torchrun_env() is not None
    except ValueError:  # a broken SLURM variable: main() reports it
        return False


if started_as_a_rank():  # one rank of a torchrun or srun job: it ends the way a spawned worker does
    faulthandler.enable()
    exit_now(main())
sys.exit(main())
