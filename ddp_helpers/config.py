"""The one configuration object for every run: baseline, DDP, CLI and notebooks.

Each field's help text is both its comment here and its ``--help`` line, so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

BACKENDS = ("auto", "gloo", "nccl")
DEVICES = ("auto", "cpu", "cuda")
DATASETS = ("mnist", "synthetic")
DTYPES = ("float32", "float64")
PRECISIONS = ("32", "bf16-mixed")
# The names a run may ask for; ddp_helpers.sync.STRATEGIES builds each (a test holds the two lists together).
SYNC_STRATEGIES = ("ddp", "allreduce", "fp16", "powersgd", "local_sgd", "local_sgd_overlap", "bucketed")
TRANSPORTS = ("auto", "gloo", "shm")
# Fields of older records, read and dropped: fault injection is now a test hook (ddp_helpers.faults).
RETIRED_FIELDS = ("fail_rank", "fail_step", "fail_kind")


def _field(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field whose help text documents it in code and on the CLI."""
    metadata = {"help": help, **kwargs}
    if isinstance(default, (list, dict)):  # a fresh copy for every instance
        return field(default_factory=default.copy, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Everything that defines a training run. Defaults are the seed design's."""

    # --- model -------------------------------------------------------------------
    hidden_sizes: list[int] = _field([512, 256, 128], "widths of the hidden layers of the MLP")
    dropout: float = _field(0.2, "dropout probability after each hidden ReLU", rule="[0, 1)")
    # --- optimisation --------------------------------------------------------------
    batch_size: int = _field(32, "samples per worker per step; the global batch is world_size times this", rule=">= 1")
    epochs: int = _field(5, "passes over the training set", rule=">= 1")
    lr: float = _field(1e-3, "Adam learning rate", rule="> 0")
    weight_decay: float = _field(1e-5, "Adam L2 weight decay", rule=">= 0")
    lr_step: int = _field(3, "StepLR: multiply the learning rate by lr_gamma every lr_step epochs", rule=">= 1")
    lr_gamma: float = _field(0.5, "StepLR decay factor", rule="(0, 1]")
    seed: int = _field(0, "seed for weights, shuffling and dropout (each rank adds its rank for dropout)", rule=">= 0")
    dtype: str = _field("float32", "precision of weights and data; float64 makes equivalence checks exact on any CPU",
                        choices=DTYPES)
    precision: str = _field("32", "arithmetic of the forward pass: '32' as dtype, 'bf16-mixed' in bfloat16 under "
                                  "autocast (weights, gradients, all-reduce and Adam stay in dtype)",
                            choices=PRECISIONS)
    warmup_steps: int = _field(0, "optimizer steps of linear learning-rate warm-up from lr/warmup_steps; 0 = none",
                               rule=">= 0")
    accumulation_steps: int = _field(1, "micro-batches per optimizer step; gradients sync only on the last (no_sync)",
                                     rule=">= 1")
    local_sgd_every: int = _field(8, "local_sgd(_overlap): optimizer steps between parameter averages across ranks",
                                  rule=">= 1")
    stop_at_accuracy: float = _field(0.0, "stop at the end of the epoch in which a validation pass first reaches this; "
                                            "0 = never", rule="[0, 1]")
    evals_per_epoch: int = _field(1, "validation passes per epoch at equal step intervals (the last at the epoch's "
                                     "end); time-to-accuracy resolves to this fraction of an epoch", rule=">= 1")
    # --- parallelism ---------------------------------------------------------------
    world_size: int = _field(2, "number of worker processes; 1 trains in a single process without DDP", rule=">= 1")
    sync: str = _field("ddp", "gradient synchronisation strategy", choices=SYNC_STRATEGIES)
    comm: str = _field("auto", "how all-reduces travel between the ranks of one node: 'shm' through shared memory "
                                "(across nodes: within each node, then one leader per node over gloo), 'gloo' over TCP "
                                "loopback; auto is shm where a node has several ranks on the CPU", choices=TRANSPORTS)
    backend: str = _field("auto", "process-group backend; auto is nccl when this node has a GPU per local rank "
                                  "and the device is not cpu, else gloo", choices=BACKENDS)
    device: str = _field("auto", "compute device; auto is cuda for nccl and for a single process on a GPU machine",
                         choices=DEVICES)
    threads_per_rank: int = _field(0, "torch intra-op threads per worker; 0 means $OMP_NUM_THREADS if set, else "
                                      "this node's cores // its ranks (at least 1)", rule=">= 0")
    bucket_cap_mb: float = _field(25.0, "DDP: gradient bucket size in MB (the seed's MLP has a 2.27 MB float32 "
                                        "gradient: one bucket)", rule="> 0")
    gradient_as_bucket_view: bool = _field(False, "DDP: gradients are views into the communication buckets (one "
                                                 "copy of the gradient per step fewer)")
    static_graph: bool = _field(False, "DDP: promise that the set of used parameters never changes")
    cuda_graph: bool = _field(True, "single process on CUDA: capture forward, backward and optimizer step as one "
                                    "CUDA graph (the last short batch and evaluation run eagerly)")
    master_addr: str = _field("127.0.0.1", "rendezvous address for the spawned workers")
    master_port: int = _field(0, "rendezvous TCP port; 0 picks a free one", rule="[0, 65535]")
    timeout_s: float = _field(120.0, "seconds before a stuck collective or process-group setup fails", rule="> 0")
    launch_timeout_s: float = _field(3600.0, "seconds before launch() gives up on the whole run and stops the workers",
                                     rule="> 0")
    # --- data ----------------------------------------------------------------------
    data_dir: str = _field("", "MNIST root; empty means $MNIST_DATA_DIR, else data/ in the project")
    download: bool = _field(True, "download MNIST when its files are missing (needs a network)")
    dataset: str = _field("mnist", "synthetic is random MNIST-shaped data for tests only", choices=DATASETS)
    train_subset: int = _field(0, "use only the first N training samples; 0 means all 60,000", rule=">= 0")
    test_subset: int = _field(0, "use only the first N test samples; 0 means all 10,000", rule=">= 0")
    max_steps_per_epoch: int = _field(0, "stop each epoch after this many steps per worker; 0 means no limit",
                                      rule=">= 0")
    # --- checkpoints ---------------------------------------------------------------------
    checkpoint_dir: str = _field("", "folder for a checkpoint after every epoch (rank 0 writes); empty = none")
    keep_checkpoints: int = _field(2, "how many of the newest checkpoints to keep", rule=">= 1")
    resume: bool = _field(False, "continue from the newest good checkpoint in checkpoint_dir, if there is one")
    # --- output -----------------------------------------------------------------------------
    output_dir: str = _field("results", "folder for the JSON record of a CLI run")
    run_name: str = _field("", "file name (without .json) of the record; empty derives it from the config")

    def __post_init__(self) -> None:
        self.hidden_sizes = list(self.hidden_sizes)
        self.validate()

    def validate(self) -> "TrainConfig":
        """Raise ``ValueError`` naming the first bad field and what it accepts. Values only: whether
        this machine has the GPUs a config asks for is checked when a run starts (``dist.check_devices``)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = field_default(f)
            if f.name == "hidden_sizes":
                ok, allowed = (isinstance(value, list) and len(value) > 0 and all(_is_int(h) and h > 0 for h in value),
                               "must be a non-empty list of positive integers")
            elif "choices" in f.metadata:
                ok, allowed = value in f.metadata["choices"], f"must be one of {f.metadata['choices']}"
            elif isinstance(default, (bool, str)):
                ok = type(value) is type(default)
                allowed = "must be true or false" if isinstance(default, bool) else "must be a string"
            else:
                typed = _is_int(value) if isinstance(default, int) else _is_finite(value)
                rule = f.metadata.get("rule")
                ok = typed and (rule is None or _within(value, rule))
                where = "" if rule is None else f" in {rule}" if rule[0] in "[(" else f" {rule}"
                allowed = f"must be {'an integer' if isinstance(default, int) else 'a finite number'}{where}"
            if not ok:
                raise ConfigError(f"TrainConfig.{f.name}={value!r} is invalid: {allowed}")
        problems = [("master_addr", not self.master_addr, "must be a host name or IP"),
                    ("resume", self.resume and not self.checkpoint_dir, "needs checkpoint_dir to be set"),
                    ("backend", self.backend == "nccl" and self.device == "cpu",
                     "'nccl' needs device='cuda' (or 'auto'): NCCL only moves GPU tensors"),
                    ("precision", self.precision != "32" and self.dtype != "float32",
                     "'bf16-mixed' needs dtype='float32' (autocast lowers float32 arithmetic)")]
        for name, bad, allowed in problems:
            if bad:
                raise ConfigError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid: {allowed}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Every field named; a retired field of an older record is dropped."""
        values = {k: v for k, v in values.items() if k not in RETIRED_FIELDS}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown TrainConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        """A plain TrainConfig JSON file, or any record of a run (its ``config`` block)."""
        try:
            values = json.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"--config {path}: cannot be read ({exc.strerror or exc})") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--config {path} is not valid JSON ({exc.msg} at line {exc.lineno}, column "
                              f"{exc.colno}). Fix: pass a TrainConfig JSON file or a record of a run.") from None
        if not isinstance(values, dict):
            raise ConfigError(f"--config {path} holds a JSON {type(values).__name__}, not an object of fields")
        try:
            return cls.from_dict(values.get("config", values))
        except ConfigError as exc:
            raise ConfigError(f"--config {path}: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some fields changed (``validate`` checks it)."""
        return dataclasses.replace(self, **changes)

    def default_run_name(self) -> str:
        return f"train_ws{self.world_size}" if self.world_size == 1 else f"train_ws{self.world_size}_{self.sync}"

    @property
    def record_path(self) -> Path:
        return Path(self.output_dir) / f"{self.run_name or self.default_run_name()}.json"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v: Any) -> bool:
    """A number that is not inf or nan: both pass some range checks ('inf > 0') and ruin a run later."""
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def _within(value: float, rule: str) -> bool:
    """Whether value satisfies a rule: '>= a', '> a', or an interval '[a, b)' and the like."""
    if rule[0] == ">":
        bound = float(rule.lstrip(">= "))
        return value >= bound if rule.startswith(">=") else value > bound
    low, high = (float(x) for x in rule[1:-1].split(","))
    return (low <= value if rule[0] == "[" else low < value) and (value <= high if rule[-1] == "]" else value < high)


def field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def config_fields() -> list[dataclasses.Field]:
    """The fields of TrainConfig, for building the command line."""
    return list(dataclasses.fields(TrainConfig))
