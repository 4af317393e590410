"""Distributed mini-batch training of an MLP on MNIST with PyTorch DDP.

The public surface: ``TrainConfig`` describes a run, ``launch`` runs it (one process or
several) and returns a ``RunResult``. Underneath, one reading path:
cli / notebook -> launch -> workers -> trainer -> engine -> results. The scaling study
(``ddp_helpers.study``) and the notebooks' exhibits (``ddp_helpers.exhibits``) sit on
top of the core and are never imported by it.
"""

from .config import TrainConfig
from .data import MNISTDataError, ensure_mnist, load_datasets, resolve_data_root
from .launch import launch, run_single_process
from .model import MLP, count_parameters
from .results import RunResult
from .engine import NonFiniteLossError
from .workers import WorkerError

__all__ = ["MLP", "MNISTDataError", "NonFiniteLossError", "RunResult", "TrainConfig", "WorkerError", "count_parameters",
           "ensure_mnist", "launch", "load_datasets", "resolve_data_root", "run_single_process"]
__version__ = "0.2.0"
