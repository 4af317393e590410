"""What the user sees while a run goes: a progress bar and each epoch's row, in a terminal or a
notebook cell; and a journal of the rows, so that a crashed or interrupted run keeps its history.

In a notebook the bar is plain text updated in place, so a saved notebook shows its last state as
one readable line, not a widget placeholder.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from .events import Event
from .files import append_line

HEADER = (f"{'epoch':>5} {'lr':>9} {'train loss':>10} {'train acc':>9} {'val loss':>9} {'val acc':>8} "
          f"{'epoch s':>8} {'step ms':>8} | {'data':>5} {'comp':>5} {'sync':>5} {'opt':>5}")


def format_row(row: dict[str, Any]) -> str:
    ms = row["step_ms"]
    return (f"{row['epoch']:>5} {row['lr']:>9.2e} {row['train_loss']:>10.4f} {row['train_accuracy']:>9.2%} "
            f"{row['val_loss']:>9.4f} {row['val_accuracy']:>8.2%} {row['epoch_time_s']:>8.2f} "
            f"{ms['total']:>8.3f} | {ms['data']:>5.2f} {ms['compute']:>5.2f} {ms['sync']:>5.2f} "
            f"{ms['optimizer']:>5.2f}")


def in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


class LiveReport:
    """An event handler: rank 0's progress as a bar (``bar``), each epoch's row as a line (``rows``;
    the header comes with the first row, so that an early error is not preceded by an empty table)."""

    def __init__(self, rows: bool = True, bar: bool = True, out=None):
        self.rows, self.out = rows, out or sys.stdout
        self.notebook = bar and in_notebook()
        self.terminal = bar and not self.notebook and sys.stderr.isatty()
        self.started, self.header_done = time.monotonic(), False
        self.handle = self.tqdm = None
        self.last: dict | None = None

    @classmethod
    def for_mode(cls, live: bool | str) -> "LiveReport | None":
        """"auto": bar and rows in a notebook or a terminal, nothing elsewhere; True: rows always and
        a bar where one can be shown; "rows": rows only; False: nothing."""
        if live == "rows":
            return cls(rows=True, bar=False)
        if live is True or (live == "auto" and (in_notebook() or sys.stderr.isatty())):
            return cls(rows=True, bar=True)
        return None

    def __call__(self, event: Event) -> None:
        if event.rank != 0:
            return
        if event.kind == "progress":
            self.last = event.payload
            self._draw(event.payload["step"], event.payload["total_steps"], event.payload["epoch"])
        elif event.kind == "epoch":
            row = event.payload
            if self.last:  # the bar ends each epoch full
                done = row["epoch"] * self.last["steps_in_epoch"]
                self._draw(min(done, self.last["total_steps"]), self.last["total_steps"], row["epoch"])
            if self.rows:
                if not self.header_done:
                    self._write(HEADER)
                    self.header_done = True
                self._write(format_row(row))

    def _draw(self, step: int, total: int, epoch: int) -> None:
        from tqdm import tqdm

        prefix = f"epoch {epoch}"
        if self.terminal:
            if self.tqdm is None:
                self.tqdm = tqdm(total=total, unit="step", file=sys.stderr, mininterval=0.5, leave=False)
            self.tqdm.set_description(prefix, refresh=False)
            self.tqdm.update(step - self.tqdm.n)
        elif self.notebook:
            text = tqdm.format_meter(step, total, time.monotonic() - self.started, ncols=88, prefix=prefix,
                                     unit="step")
            if self.handle is None:
                from IPython.display import display

                self.handle = display({"text/plain": text}, raw=True, display_id=True)
            else:
                self.handle.update({"text/plain": text}, raw=True)

    def _write(self, line: str) -> None:
        if self.tqdm is not None:
            self.tqdm.write(line, file=self.out)
        else:
            print(line, file=self.out, flush=True)

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()


class Journal:
    """An event handler that appends each epoch's row to a JSON-lines file as it arrives. A run that
    starts from its first step starts the file anew; a resumed run (or a restarted torchrun attempt
    that resumes) adds to it."""

    def __init__(self, path: str | Path):
        self.path, self.started = Path(path), False

    def __call__(self, event: Event) -> None:
        if event.rank != 0:
            return
        if not self.started and event.kind == "progress":
            self.started = True
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if event.payload["step"] == 0:  # a new run, not a resumed one
                self.path.write_text("")
        if event.kind == "epoch":
            append_line(self.path, json.dumps(event.payload))


CSV_COLUMNS = ("epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "epoch_time_s",
               "eval_time_s", "steps_per_worker", "optimizer_steps", "samples_per_s", "sync_fraction")
PHASE_COLUMNS = ("total", "data", "compute", "sync", "optimizer")


class CsvLog:
    """An event handler: each epoch's row as a line of a CSV file, with the step's split in ms
    (``step_ms_total``, ``step_ms_data``, ...). A run that starts from its first step starts it anew."""

    def __init__(self, path: str | Path):
        self.path, self.started = Path(path), False

    def __call__(self, event: Event) -> None:
        if event.rank != 0:
            return
        if not self.started and event.kind == "progress":
            self.started = True
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if event.payload["step"] == 0 or not self.path.exists():
                self.path.write_text(",".join([*CSV_COLUMNS, *(f"step_ms_{p}" for p in PHASE_COLUMNS)]) + "\n")
        if event.kind == "epoch":
            row = event.payload
            values = [row.get(c) for c in CSV_COLUMNS] + [row["step_ms"].get(p) for p in PHASE_COLUMNS]
            append_line(self.path, ",".join("" if v is None else repr(v) for v in values), "the CSV log")


class TensorBoardLog:
    """An event handler: each epoch's losses, accuracies, learning rate, epoch time and step split as
    TensorBoard scalars (``tensorboard --logdir FOLDER``), written by torch's ``SummaryWriter``."""

    def __init__(self, folder: str | Path):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(str(folder))

    def __call__(self, event: Event) -> None:
        if event.rank != 0 or event.kind != "epoch":
            return
        row, epoch = event.payload, event.payload["epoch"]
        for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "lr", "epoch_time_s", "samples_per_s"):
            self.writer.add_scalar(key.replace("_", "/", 1), row[key], epoch)
        for phase, ms in row["step_ms"].items():
            self.writer.add_scalar(f"step_ms/{phase}", ms, epoch)
        for point in row["evals"]:  # the validation passes inside the epoch, at their fraction of it
            self.writer.add_scalar("val/accuracy_within_epoch", point["val_accuracy"],
                                   round(1000 * (epoch - 1 + point["epoch_fraction"])))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def read_journal(path: str | Path) -> list[dict]:
    """The epoch rows a journal holds (those of a run that crashed too)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
