"""The command line: ``python -m ddp_helpers train ...`` (also under torchrun)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Sequence

from .config import TrainConfig, config_fields


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per TrainConfig field, with the field's own help text."""
    for f in config_fields():
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        help_text = f"{f.metadata['help']} (default: {default})"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif isinstance(default, list):
            parser.add_argument(flag, type=int, nargs="+", default=default, metavar="N", help=help_text)
        else:
            parser.add_argument(flag, type=type(default), default=default, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ddp_helpers",
                                     description="Train the MNIST MLP on one process or with DDP.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train and write a JSON record under --output-dir",
                           description="Train the MLP; --world-size 1 is the single-process baseline. "
                                       "Under torchrun the world size comes from torchrun.")
    _add_config_arguments(train)
    train.add_argument("--no-progress", action="store_true", help="hide rank 0's per-step progress bar")
    return parser


HEADER = (f"{'epoch':>5} {'lr':>9} {'train loss':>10} {'train acc':>9} {'val loss':>9} {'val acc':>8} "
          f"{'epoch s':>8} {'step ms':>8} | {'data':>5} {'comp':>5} {'sync':>5} {'opt':>5}")


def format_row(row: dict[str, Any]) -> str:
    ms = row["step_ms"]
    return (f"{row['epoch']:>5} {row['lr']:>9.2e} {row['train_loss']:>10.4f} {row['train_accuracy']:>9.2%} "
            f"{row['val_loss']:>9.4f} {row['val_accuracy']:>8.2%} {row['epoch_time_s']:>8.2f} "
            f"{ms['total']:>8.3f} | {ms['data']:>5.2f} {ms['compute']:>5.2f} {ms['sync']:>5.2f} "
            f"{ms['optimizer']:>5.2f}")


def train_command(args: argparse.Namespace) -> int:
    from .launch import launch, run_torchrun, under_torchrun

    values = {f.name: getattr(args, f.name) for f in config_fields()}
    torchrun = under_torchrun()
    if torchrun:
        import os

        values["world_size"] = int(os.environ["WORLD_SIZE"])
        is_main = int(os.environ["RANK"]) == 0
    else:
        is_main = True
    cfg = TrainConfig.from_dict(values)

    def show(row: dict[str, Any]) -> None:
        print(format_row(row), flush=True)

    if is_main:
        mode = "torchrun" if torchrun else ("single process" if cfg.world_size == 1 else "spawned workers")
        print(f"training: world_size={cfg.world_size} ({mode}), batch {cfg.batch_size}/worker, "
              f"{cfg.epochs} epochs, sync={'none' if cfg.world_size == 1 else cfg.sync}", flush=True)
        print(HEADER, flush=True)
    progress = not args.no_progress and sys.stderr.isatty()
    if torchrun:
        result = run_torchrun(cfg, on_epoch_end=show, progress=progress)
    else:
        result = launch(cfg, on_epoch_end=show, progress=progress, quiet_workers=False)
    if result is None:
        return 0
    path = result.save()
    rt, summary = result.record["runtime"], result.record["summary"]
    for note in rt["notes"]:
        print(f"note: {note}")
    print(f"final validation accuracy {summary['final_val_accuracy']:.2%}; median epoch "
          f"{summary['median_epoch_time_s']:.2f} s; backend {rt['backend']}, {rt['threads_per_rank']} "
          f"thread(s)/rank, {rt['optimizer']}, wall {rt['wall_time_s']:.1f} s")
    print(f"record written to {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return train_command(args)
    except (ValueError, OSError, RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: all workers were stopped", file=sys.stderr)
        return 130
