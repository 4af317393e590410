import faulthandler
import sys

from .cli import main
from .launch import exit_now, under_torchrun

if under_torchrun():  # one rank of a torchrun job: it ends the way a spawned worker does
    faulthandler.enable()
    exit_now(main())
sys.exit(main())
