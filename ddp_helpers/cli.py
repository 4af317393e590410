"""The command line: ``python -m ddp_helpers train ...`` (also as each rank of torchrun)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .checkpoint import CheckpointError
from .config import TrainConfig, config_fields, field_default
from .data import MNISTDataError
from .workers import WorkerError


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per TrainConfig field, with the field's own help text and choices. Flags
    that are not given stay out of the namespace, so that they do not override --config."""
    for f in config_fields():
        flag = "--" + f.name.replace("_", "-")
        default = field_default(f)
        rule = f" {f.metadata['rule']};" if "rule" in f.metadata else ""
        help_text = f"{f.metadata['help']} ({rule} default: {default})".replace("( ", "(")
        common = dict(default=argparse.SUPPRESS, help=help_text)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif isinstance(default, list):
            parser.add_argument(flag, type=int, nargs="+", metavar="N", **common)
        else:
            parser.add_argument(flag, type=type(default), choices=f.metadata.get("choices"), **common)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ddp_helpers",
                                     description="Train the MNIST MLP on one process or with DDP.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train and write a JSON record under --output-dir",
                           description="Train the MLP; --world-size 1 is the single-process baseline. "
                                       "Under torchrun the world size comes from torchrun.")
    train.add_argument("--config", metavar="FILE", help="start from this TrainConfig JSON or run record (e.g. "
                                                        "results/train_ws1.json); flags given here override it")
    train.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (the epoch rows still print)")
    _add_config_arguments(train)
    return parser


def resolve_config(args: argparse.Namespace, world_size: int | None = None) -> TrainConfig:
    """Defaults, then the --config file, then the flags given; torchrun's world size last."""
    values = TrainConfig.from_file(args.config).to_dict() if args.config else {}
    values.update({f.name: getattr(args, f.name) for f in config_fields() if hasattr(args, f.name)})
    if world_size is not None:
        values["world_size"] = world_size
    return TrainConfig.from_dict(values)


def train_command(args: argparse.Namespace) -> int:
    from .dist import torchrun_env
    from .launch import launch, run_torchrun

    env = torchrun_env()
    cfg = resolve_config(args, env.world_size if env else None)
    if args.print_config:
        print(cfg.to_json())
        return 0
    is_main = env is None or env.rank == 0
    if is_main:
        mode = "torchrun" if env else ("single process" if cfg.world_size == 1 else "spawned workers")
        print(f"training: world_size={cfg.world_size} ({mode}), batch {cfg.batch_size}/worker, "
              f"{cfg.epochs} epochs, sync={'none' if cfg.world_size == 1 else cfg.sync}", flush=True)
    journal = cfg.record_path.with_suffix(".epochs.jsonl")
    live = "rows" if args.no_progress else True
    if env:
        result = run_torchrun(cfg, env, live=live, journal=journal)
    else:
        result = launch(cfg, live=live, journal=journal, quiet_workers=False)
    if result is None:
        return 0
    path = result.save()
    rt, summary = result.record["runtime"], result.record["summary"]
    for note in rt["notes"]:
        print(f"note: {note}")
    print(f"final validation accuracy {summary['final_val_accuracy']:.2%}; median epoch "
          f"{summary['median_epoch_time_s']:.2f} s; backend {rt['backend']}, device {rt['device']}, "
          f"{rt['threads_per_rank']} thread(s)/rank ({rt['threads_rule']}), {rt['optimizer']}, "
          f"CUDA graph {'on' if rt['cuda_graph'] else 'off'}, wall {rt['wall_time_s']:.1f} s")
    print(f"record written to {path} (epoch rows as they came: {journal})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return train_command(args)
    except (ValueError, OSError, MNISTDataError, CheckpointError, WorkerError) as exc:  # the user's to fix
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: all workers were stopped", file=sys.stderr)
        return 130
