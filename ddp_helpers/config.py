"""The one configuration object for every run: baseline, DDP, CLI and notebooks.

Each field is declared with :func:`_field`, whose text is both the field's comment
and its ``--help`` line on the command line, so the two can never drift apart.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BACKENDS = ("auto", "gloo", "nccl")
DEVICES = ("auto", "cpu", "cuda")
DATASETS = ("mnist", "synthetic")
DTYPES = ("float32", "float64")
# Gradient-synchronisation strategies the engine knows (see ddp_helpers.sync).
SYNC_STRATEGIES = ("ddp", "allreduce", "fp16", "powersgd", "local_sgd", "local_sgd_overlap")
FAULT_KINDS = ("raise", "exit", "hang")


def _field(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field whose help text documents it in code and on the CLI."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: list(value) if isinstance(value, list) else dict(value),
                     metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    """Everything that defines a training run. Defaults are the seed design's."""

    # --- model -------------------------------------------------------------------
    hidden_sizes: list[int] = _field([512, 256, 128], "widths of the hidden layers of the MLP")
    dropout: float = _field(0.2, "dropout probability after each hidden ReLU, in [0, 1)")
    # --- optimisation --------------------------------------------------------------
    batch_size: int = _field(32, "samples per worker per step; the global batch is world_size times this")
    epochs: int = _field(5, "passes over the training set")
    lr: float = _field(1e-3, "Adam learning rate")
    weight_decay: float = _field(1e-5, "Adam L2 weight decay")
    lr_step: int = _field(3, "StepLR: multiply the learning rate by lr_gamma every lr_step epochs")
    lr_gamma: float = _field(0.5, "StepLR decay factor, in (0, 1]")
    seed: int = _field(0, "seed for weights, shuffling and dropout (each rank adds its rank for dropout)")
    dtype: str = _field("float32", "precision of weights and data; float64 makes equivalence checks exact on any CPU",
                        choices=DTYPES)
    warmup_steps: int = _field(0, "optimizer steps of linear learning-rate warm-up from lr/warmup_steps; 0 = none")
    accumulation_steps: int = _field(1, "micro-batches per optimizer step; gradients sync only on the last (no_sync)")
    local_sgd_every: int = _field(8, "local_sgd(_overlap): optimizer steps between parameter averages across ranks")
    stop_at_accuracy: float = _field(0.0, "stop at the end of the epoch in which a validation pass first reaches this; "
                                            "0 = never")
    evals_per_epoch: int = _field(1, "validation passes per epoch at equal step intervals (the last at the epoch's "
                                     "end); time-to-accuracy resolves to this fraction of an epoch")
    # --- parallelism ---------------------------------------------------------------
    world_size: int = _field(2, "number of worker processes; 1 trains in a single process without DDP")
    sync: str = _field("ddp", "gradient synchronisation strategy", choices=SYNC_STRATEGIES)
    backend: str = _field("auto", "process-group backend; auto is nccl when this node has a GPU per local rank, "
                                  "else gloo", choices=BACKENDS)
    device: str = _field("auto", "compute device; auto is cuda for nccl and for a single process on a GPU machine",
                         choices=DEVICES)
    threads_per_rank: int = _field(0, "torch intra-op threads per worker; 0 means $OMP_NUM_THREADS if set, else "
                                      "this node's cores // its ranks (at least 1)")
    bucket_cap_mb: float = _field(25.0, "DDP: gradient bucket size in MB (this model's gradient is 2.27 MB)")
    gradient_as_bucket_view: bool = _field(False, "DDP: gradients are views into the communication buckets (one "
                                                 "copy of the gradient per step fewer)")
    static_graph: bool = _field(False, "DDP: promise that the set of used parameters never changes")
    cuda_graph: bool = _field(True, "single process on CUDA: capture forward, backward and optimizer step as one "
                                    "CUDA graph (the last short batch and evaluation run eagerly)")
    master_addr: str = _field("127.0.0.1", "rendezvous address for the spawned workers")
    master_port: int = _field(0, "rendezvous TCP port; 0 picks a free one")
    timeout_s: float = _field(120.0, "seconds before a stuck collective or process-group setup fails")
    launch_timeout_s: float = _field(3600.0, "seconds before launch() gives up on the whole run and stops the workers")
    # --- data ----------------------------------------------------------------------
    data_dir: str = _field("", "MNIST root; empty means $MNIST_DATA_DIR, else data/ in the project")
    download: bool = _field(True, "download MNIST when its files are missing (needs a network)")
    dataset: str = _field("mnist", "synthetic is random MNIST-shaped data for tests only", choices=DATASETS)
    train_subset: int = _field(0, "use only the first N training samples; 0 means all 60,000")
    test_subset: int = _field(0, "use only the first N test samples; 0 means all 10,000")
    max_steps_per_epoch: int = _field(0, "stop each epoch after this many steps per worker; 0 means no limit")
    # --- checkpoints ---------------------------------------------------------------------
    checkpoint_dir: str = _field("", "folder for a checkpoint after every epoch (rank 0 writes); empty = none")
    keep_checkpoints: int = _field(2, "how many of the newest checkpoints to keep")
    resume: bool = _field(False, "continue from the newest good checkpoint in checkpoint_dir, if there is one")
    # --- output and fault injection ---------------------------------------------------
    output_dir: str = _field("results", "folder for the JSON record of a CLI run")
    run_name: str = _field("", "file name (without .json) of the record; empty derives it from the config")
    fail_rank: int = _field(-1, "fault injection for tests and demos: the rank that fails; -1 disables it")
    fail_step: int = _field(0, "fault injection: the global step (0-based) at which fail_rank fails")
    fail_kind: str = _field("raise", "fault injection: 'raise' an exception, 'exit' hard with os._exit, or 'hang' "
                                     "(sleep, so the other ranks' collective times out); fires on a first attempt only",
                            choices=FAULT_KINDS)

    def __post_init__(self) -> None:
        self.hidden_sizes = list(self.hidden_sizes)
        self.validate()

    # ------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Raise ``ValueError`` naming the first bad field and what it accepts."""

        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid: {allowed}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        need(len(self.hidden_sizes) > 0 and all(is_int(h) and h > 0 for h in self.hidden_sizes),
             "hidden_sizes", "must be a non-empty list of positive integers")
        need(is_num(self.dropout) and 0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        need(is_int(self.batch_size) and self.batch_size >= 1, "batch_size", "must be an integer >= 1")
        need(is_int(self.epochs) and self.epochs >= 1, "epochs", "must be an integer >= 1")
        need(is_num(self.lr) and self.lr > 0, "lr", "must be > 0")
        need(is_num(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(is_int(self.lr_step) and self.lr_step >= 1, "lr_step", "must be an integer >= 1")
        need(is_num(self.lr_gamma) and 0 < self.lr_gamma <= 1, "lr_gamma", "must be in (0, 1]")
        need(is_int(self.seed) and self.seed >= 0, "seed", "must be an integer >= 0")
        need(is_int(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps", "must be an integer >= 0")
        need(is_int(self.accumulation_steps) and self.accumulation_steps >= 1, "accumulation_steps",
             "must be an integer >= 1")
        need(is_int(self.local_sgd_every) and self.local_sgd_every >= 1, "local_sgd_every", "must be an integer >= 1")
        need(is_num(self.stop_at_accuracy) and 0 <= self.stop_at_accuracy <= 1, "stop_at_accuracy",
             "must be in [0, 1] (0 = train all epochs)")
        need(is_int(self.evals_per_epoch) and self.evals_per_epoch >= 1, "evals_per_epoch", "must be an integer >= 1")
        need(is_int(self.world_size) and self.world_size >= 1, "world_size", "must be an integer >= 1")
        need(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        need(self.sync in SYNC_STRATEGIES, "sync", f"must be one of {SYNC_STRATEGIES}")
        need(self.backend in BACKENDS, "backend", f"must be one of {BACKENDS}")
        need(self.device in DEVICES, "device", f"must be one of {DEVICES}")
        need(is_int(self.threads_per_rank) and self.threads_per_rank >= 0, "threads_per_rank",
             "must be an integer >= 0 (0 = automatic)")
        need(is_num(self.bucket_cap_mb) and self.bucket_cap_mb > 0, "bucket_cap_mb", "must be > 0")
        for name in ("gradient_as_bucket_view", "static_graph", "cuda_graph"):
            need(isinstance(getattr(self, name), bool), name, "must be true or false")
        need(isinstance(self.master_addr, str) and self.master_addr != "", "master_addr", "must be a host name or IP")
        need(is_int(self.master_port) and 0 <= self.master_port <= 65535, "master_port",
             "must be in [0, 65535] (0 = pick a free port)")
        need(is_num(self.timeout_s) and self.timeout_s > 0, "timeout_s", "must be > 0 seconds")
        need(is_num(self.launch_timeout_s) and self.launch_timeout_s > 0, "launch_timeout_s", "must be > 0 seconds")
        need(isinstance(self.data_dir, str), "data_dir", "must be a path string ('' = default)")
        need(isinstance(self.download, bool), "download", "must be true or false")
        need(self.dataset in DATASETS, "dataset", f"must be one of {DATASETS}")
        need(is_int(self.train_subset) and self.train_subset >= 0, "train_subset", "must be an integer >= 0 (0 = all)")
        need(is_int(self.test_subset) and self.test_subset >= 0, "test_subset", "must be an integer >= 0 (0 = all)")
        need(is_int(self.max_steps_per_epoch) and self.max_steps_per_epoch >= 0, "max_steps_per_epoch",
             "must be an integer >= 0 (0 = no limit)")
        need(is_int(self.fail_rank) and -1 <= self.fail_rank < self.world_size, "fail_rank",
             f"must be -1 (off) or a rank in [0, {self.world_size - 1}]")
        need(is_int(self.fail_step) and self.fail_step >= 0, "fail_step", "must be an integer >= 0")
        need(self.fail_kind in FAULT_KINDS, "fail_kind", f"must be one of {FAULT_KINDS}")
        need(isinstance(self.checkpoint_dir, str), "checkpoint_dir", "must be a path string ('' = no checkpoints)")
        need(is_int(self.keep_checkpoints) and self.keep_checkpoints >= 1, "keep_checkpoints",
             "must be an integer >= 1")
        need(isinstance(self.resume, bool), "resume", "must be true or false")
        need(not self.resume or bool(self.checkpoint_dir), "resume", "needs checkpoint_dir to be set")
        if self.backend == "nccl" or self.device == "cuda":
            from .dist import ranks_on_this_node  # local: keeps `import ddp_helpers.config` light

            check_gpus(self.backend, self.device, ranks_on_this_node(self.world_size))
        if self.backend == "nccl" and self.device == "cpu":
            raise ValueError("TrainConfig.backend='nccl' needs device='cuda' (or 'auto'): NCCL only moves GPU tensors")
        return self

    # ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        """A plain TrainConfig JSON file, or any record of a run (its ``config`` block)."""
        values = json.loads(Path(path).read_text())
        return cls.from_dict(values.get("config", values) if isinstance(values, dict) else values)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> "TrainConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def default_run_name(self) -> str:
        return f"train_ws{self.world_size}" if self.world_size == 1 else f"train_ws{self.world_size}_{self.sync}"

    @property
    def record_path(self) -> Path:
        return Path(self.output_dir) / f"{self.run_name or self.default_run_name()}.json"


def check_gpus(backend: str, device: str, local_ranks: int) -> None:
    """NCCL needs one GPU per rank on *this* node (a 2 x 8-GPU torchrun job has 8 local ranks, not 16)."""
    import torch  # local: keeps `import ddp_helpers.config` light

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend == "nccl" and have < local_ranks:
        raise ValueError(
            f"TrainConfig.backend='nccl' needs one CUDA device per worker on this node: {local_ranks} local rank(s) "
            f"but {have} CUDA device(s) are visible. Use backend='gloo' (or 'auto') on this machine."
        )
    if device == "cuda" and have == 0:
        raise ValueError("TrainConfig.device='cuda' but no CUDA device is visible; use device='cpu' or 'auto'")


def config_fields() -> list[dataclasses.Field]:
    """The fields of TrainConfig, for building the command line."""
    return list(dataclasses.fields(TrainConfig))
