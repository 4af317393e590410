"""The command line: ``python -m ddp_helpers train ...`` (also as each rank of torchrun or srun)."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from . import preemption
from .checkpoint import list_checkpoints, position
from .config import TrainConfig, config_fields, field_default
from .errors import DDPError, DiskFullError
from .place import RankPlace, launcher_place


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per TrainConfig field, with the field's own help text and choices. Flags
    that are not given stay out of the namespace, so that they do not override --config."""
    for f in config_fields():
        flag = "--" + f.name.replace("_", "-")
        default = field_default(f)
        rule = f"{f.metadata['rule']}; " if "rule" in f.metadata else ""
        common = dict(default=argparse.SUPPRESS, help=f"{f.metadata['help']} ({rule}default: {default})")
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
                                       "Under torchrun or srun the world size comes from the launcher.")
    train.add_argument("--config", metavar="FILE", help="start from this TrainConfig JSON or run record (e.g. "
                                                        "results/train_ws1.json); flags given here override it")
    train.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (the epoch rows still print)")
    train.add_argument("--tensorboard", metavar="FOLDER", help="also log every epoch's row and step split for "
                                                               "TensorBoard there (needs the tensorboard package)")
    _add_config_arguments(train)
    evaluate = sub.add_parser("evaluate", help="test accuracy and confusions of a run's saved weights",
                              description="Evaluate saved weights on MNIST's 10,000 test images: a record of a run "
                                          "(its .pt beside it) or the .pt itself.")
    evaluate.add_argument("path", metavar="RECORD_OR_WEIGHTS")
    evaluate.add_argument("--data-dir", default="", help="MNIST root; empty means the record's, $MNIST_DATA_DIR, "
                                                         "else data/")
    return parser


def resolve_config(args: argparse.Namespace, world_size: int | None = None) -> TrainConfig:
    """Defaults, then the --config file, then the flags given; the launcher's world size last."""
    values = TrainConfig.from_file(args.config).to_dict() if args.config else {}
    values.update({f.name: getattr(args, f.name) for f in config_fields() if hasattr(args, f.name)})
    if world_size is not None:
        values["world_size"] = world_size
    return TrainConfig.from_dict(values)


def mode(cfg: TrainConfig, env: RankPlace | None) -> str:
    """Who started the ranks, as the first line of output says."""
    if env:
        return "slurm (srun)" if env.launcher == "slurm" else "torchrun"
    return "single process" if cfg.world_size == 1 else "spawned workers"


def save_failed_record(cfg: TrainConfig, error: DDPError) -> Path:
    """The record of a run that failed while training, with the epochs this process heard finish."""
    from .results import failed_record, save_json, weights_path

    weights_path(cfg.record_path).unlink(missing_ok=True)  # an earlier run's weights must not sit beside this record
    return save_json(failed_record(cfg, error, getattr(error, "history", [])), cfg.record_path)


def train_command(args: argparse.Namespace, cfg: TrainConfig, env: RankPlace | None) -> int:
    from .launcher import launch
    from .rank import launch_rank

    if args.print_config:
        print(cfg.to_json())
        return 0
    is_main = env is None or env.rank == 0
    if is_main:
        print(f"training: world_size={cfg.world_size} ({mode(cfg, env)}), batch {cfg.batch_size}/worker, "
              f"{cfg.epochs} epochs, sync={'none' if cfg.world_size == 1 else cfg.sync}, precision {cfg.precision}",
              flush=True)
    journal, logs = cfg.record_path.with_suffix(".epochs.jsonl"), event_logs(cfg, args.tensorboard) if is_main else []
    live = "rows" if args.no_progress else True
    try:
        on_event = (lambda event: [log(event) for log in logs]) if logs else None
        result = launch_rank(cfg, env, live=live, journal=journal, on_event=on_event) if env else \
            launch(cfg, on_event, live=live, journal=journal, quiet_workers=False)
    except DDPError as exc:
        if is_main and hasattr(exc, "history"):  # failed while training: the record says so
            try:
                print(f"record of the failed run written to {save_failed_record(cfg, exc)}", flush=True)
            except DiskFullError:
                print("the record of the failed run could not be written either (no space left)", flush=True)
        raise
    finally:
        for log in logs:
            getattr(log, "close", lambda: None)()
    if result is None:
        return 0
    rt = result.record["runtime"]
    if "preempted" in rt:  # asked to stop by the scheduler: every rank stopped at one step
        if is_main:
            stop = rt["preempted"]
            print(f"stopped as asked (the scheduler's {preemption.SIGNAL.name}) at epoch {stop['epoch']}, step "
                  f"{stop['step']} of {stop['steps_in_epoch']}; {resume_hint(cfg, env, args.argv)}; partial "
                  f"record written to {result.save()}", flush=True)
        return preemption.PREEMPTED_EXIT
    path, weights = result.save(), result.save_weights()
    summary = result.record["summary"]
    for note in rt["notes"]:
        print(f"note: {note}")
    print(f"final validation accuracy {summary['final_val_accuracy']:.2%}; median epoch "
          f"{summary['median_epoch_time_s']:.2f} s; backend {rt['backend']}, device {rt['device']}, "
          f"{rt['threads_per_rank']} thread(s)/rank ({rt['threads_rule']}), all-reduce {rt['comm']}, {rt['optimizer']}, "
          f"CUDA graph {'on' if rt['cuda_graph'] else 'off'}, wall {rt['wall_time_s']:.1f} s")
    print(f"record written to {path} (epoch rows as they came: {journal}; as CSV: {cfg.record_path.with_suffix('.csv')}"
          + (f"; TensorBoard: {args.tensorboard}" if args.tensorboard and len(logs) > 1 else "") + ")")
    print(f"final weights written to {weights} (torch.load(path, weights_only=True) into "
          f"MLP({cfg.hidden_sizes}, {cfg.dropout}))")
    return 0


def event_logs(cfg: TrainConfig, tensorboard: str | None) -> list:
    """The logs people already read, written from the run's events: a CSV beside the record, and
    TensorBoard's event files where asked (a line says why not when the package is missing)."""
    from .report import CsvLog, TensorBoardLog

    logs: list = [CsvLog(cfg.record_path.with_suffix(".csv"))]
    if tensorboard:
        try:
            logs.append(TensorBoardLog(tensorboard))
        except ImportError:
            print("note: --tensorboard needs the tensorboard package (pip install tensorboard); the CSV log is "
                  "written", flush=True)
    return logs


def evaluate_command(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_file

    got = evaluate_file(args.path, args.data_dir)
    print(f"test accuracy {got['accuracy']:.2%} on {got['test_samples']:,} images ({got['weights']})")
    print("per digit: " + "  ".join(f"{d}: {a:.1%}" for d, a in enumerate(got["per_class_accuracy"])))
    print("most confused: " + ", ".join(f"{t} taken for {p} ({n}x)" for n, t, p in got["most_confused"]))
    return 0


def one_line(exc: DDPError, cfg: TrainConfig | None, env: RankPlace | None, argv: Sequence[str]) -> str:
    """What to print for one of our errors. A full disk (in this process or in a rank) says what was kept
    and how to continue; the others say it themselves."""
    full = isinstance(exc, DiskFullError) or str(exc).startswith("rank ") and "DiskFullError: " in str(exc)
    if not full:
        return f"error: {exc}"
    reason = str(exc).split("DiskFullError: ", 1)[-1].splitlines()[0].split(". All ")[0]
    kept = resume_hint(cfg, env, argv) if cfg else "no run had started"
    return (f"error: {reason}: the run stopped; every file written before is intact (each is replaced only once "
            f"its new version is complete); {kept}")


# --- stopped from outside: Ctrl-C, or a scheduler's SIGTERM ---------------------------------------

class Terminated(BaseException):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt, so that every
    finally-block on the way out runs: the workers are stopped and their run folder removed."""


@contextmanager
def sigterm_raises(enabled: bool = True) -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` while the body runs; the previous handler is restored after.
    Not in a rank of torchrun or srun: a rank blocked in a collective would run the handler only
    when the collective returns (or times out), and its launcher stops it anyway."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a repeated SIGTERM must not cut the cleanup short
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)  # None: not set from Python


def resume_hint(cfg: TrainConfig, env: RankPlace | None, argv: Sequence[str]) -> str:
    """Where the run can continue from, and the command that continues it."""
    if not cfg.checkpoint_dir:
        return "no checkpoint was kept (pass --checkpoint-dir to keep them)"
    kept = list_checkpoints(cfg.checkpoint_dir)
    if not kept:
        return f"no checkpoint in {cfg.checkpoint_dir} yet (the first is written after epoch 1)"
    again = [a for a in argv if a not in ("--resume", "--no-resume")] + ["--resume"]
    how = "start the job again with --resume" if env else \
        f"run the same command with --resume: python -m ddp_helpers {shlex.join(again)}"
    epoch, step = position(kept[0])
    where = f"epoch {epoch}" + (f" and {step} steps of epoch {epoch + 1}" if step else "")
    return f"last checkpoint {kept[0]} ({where}); to continue, {how}"



def stopped_line(how: str, cfg: TrainConfig | None, env: RankPlace | None, argv: Sequence[str]) -> str:
    """The one line a run stopped from outside leaves: what was stopped, and how to continue."""
    if cfg is None:
        return f"stopped by {how} before the run started"
    if env:
        what = f"the {mode(cfg, env)} job was stopped"
    elif cfg.world_size == 1:
        what = "the single-process run was stopped"
    else:
        what = f"all workers were stopped ({cfg.world_size} ranks)"
    return f"stopped by {how}: {what}; {resume_hint(cfg, env, argv)}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # what the user typed: a hint to continue repeats it
    cfg = env = None
    try:
        if args.command == "evaluate":
            return evaluate_command(args)
        env = launcher_place()
        cfg = resolve_config(args, env.world_size if env else None)
        with sigterm_raises(enabled=env is None), preemption.listening():
            return train_command(args, cfg, env)
    except DDPError as exc:  # ours: the message says what to fix
        print(one_line(exc, cfg, env, argv), file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as exc:
        if env is None or env.rank == 0:
            print(stopped_line("Ctrl-C" if isinstance(exc, KeyboardInterrupt) else "SIGTERM", cfg, env, argv),
                  file=sys.stderr)
        return 130 if isinstance(exc, KeyboardInterrupt) else 128 + signal.SIGTERM
