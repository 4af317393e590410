import faulthandler
import sys

from .cli import main
from .dist import torchrun_env
from .workers import exit_now

if torchrun_env() is not None:  # one rank of a torchrun job: it ends the way a spawned worker does
    faulthandler.enable()
    exit_now(main())
sys.exit(main())
