import faulthandler
import os
import sys

from .cli import main
from .errors import ConfigError
from .place import launcher_place


def started_as_a_rank() -> bool:
    """Whether torchrun or srun started this process as one rank of its job."""
    try:
        return launcher_place() is not None
    except ConfigError:  # a broken SLURM variable: main() reports it
        return False


if started_as_a_rank():  # one rank of a torchrun or srun job: it ends as a spawned worker does, skipping
    faulthandler.enable()  # teardown (communication library threads may live on)
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(main())
