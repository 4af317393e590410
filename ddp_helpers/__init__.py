"""Distributed mini-batch training of an MLP on MNIST with PyTorch DDP.

The public surface: ``TrainConfig`` describes a run, ``launch`` runs it (one process or several)
and returns a ``RunResult``. Read ``plain_ddp.py`` first (DDP in one plain function), then the
path every run takes: cli / notebook -> launch -> (spawned workers) -> run_rank -> trainer ->
engine -> results. The scaling study (``ddp_helpers.study``) and the notebooks' exhibits
(``ddp_helpers.exhibits``) sit on top of the core and are never imported by it.

Names load on first use, so that importing the model or a chart does not load the process machinery.
"""

from importlib import import_module

_WHERE = {"TrainConfig": "config", "DDPError": "errors", "MNISTDataError": "data", "ensure_mnist": "data",
          "load_datasets": "data", "resolve_data_root": "data", "launch": "launcher", "MLP": "model",
          "count_parameters": "model", "RunResult": "results", "NonFiniteLossError": "engine",
          "WorkerError": "failures"}

__all__ = sorted(_WHERE)
__version__ = "0.3.0"


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
