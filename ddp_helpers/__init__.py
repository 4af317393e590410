"""Distributed mini-batch training of an MLP on MNIST with PyTorch DDP.

The public surface: ``TrainConfig`` describes a run, ``launch`` runs it (one
process or several) and returns a ``RunResult``; the pieces underneath (data,
model, engine, sync strategies, process-group plumbing) are importable for the
notebooks and tests.
"""

from .config import TrainConfig
from .data import MNISTDataError, ensure_mnist, load_datasets, resolve_data_root
from .launch import RunResult, WorkerError, launch, run_single_process
from .model import MLP, count_parameters

__all__ = ["MLP", "MNISTDataError", "RunResult", "TrainConfig", "WorkerError", "count_parameters",
           "ensure_mnist", "launch", "load_datasets", "resolve_data_root", "run_single_process"]
__version__ = "0.1.0"
