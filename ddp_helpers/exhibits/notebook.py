"""What every notebook does first, and the small tables and code views they share."""

from __future__ import annotations

import inspect
import os
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import pandas as pd
import seaborn as sns

from ..config import TrainConfig
from ..host import code_label, code_version
from ..results import RESULTS_DIR


@dataclass
class Setup:
    smoke: bool  # CI's quick run (DDP_NOTEBOOK_SMOKE=1): a data subset, and nothing written to results/
    out: Path    # where the notebook writes its records and charts


def setup() -> Setup:
    """Plotting defaults, and where this run's outputs go."""
    sns.set_theme(style="whitegrid", context="notebook")
    pd.set_option("display.precision", 4)
    pd.set_option("display.max_colwidth", None)
    pd.set_option("display.width", 180)
    smoke = os.environ.get("DDP_NOTEBOOK_SMOKE") == "1"
    print(f"Rendered from commit {code_version() or 'unknown'}; every record below names the commit that made it.")
    return Setup(smoke, Path(tempfile.mkdtemp(prefix="nb_smoke_")) if smoke else RESULTS_DIR)


def host_line(record: dict, label: str = "Measured on") -> str:
    """One line naming where and when a record was made, from the record itself."""
    env = record["environment"]
    gpus = ", ".join(env.get("gpus") or []) or "no GPU"
    memory = f"{env['memory_gib']:.1f} GiB RAM" if env.get("memory_gib") else "RAM unknown"
    code = code_label(env.get("code"))
    return (f"{label}: {env['cpu_model']}, {env['cpu_cores_usable']} usable cores, {memory}, {gpus};\n"
            f"  Python {env['python']}, torch {env['torch']}; {record['created'][:16].replace('T', ' ')} UTC; "
            f"code {code}.")


def say(*parts, sep: str = " ", width: int = 100) -> None:
    """print(), with each line wrapped at ``width``: continuation lines are indented under a line's
    own indent, two more after a bullet ("- ")."""
    for line in sep.join(str(p) for p in parts).splitlines() or [""]:
        indent = " " * (len(line) - len(line.lstrip()))
        more = "  " if line.lstrip().startswith("- ") else ""
        print(textwrap.fill(line, width, subsequent_indent=indent + more, break_on_hyphens=False)
              if len(line) > width else line)


def environment_table(record: dict) -> pd.DataFrame:
    env, rt = record["environment"], record.get("runtime", {})
    rows = {"Python": env["python"], "torch / torchvision": f"{env['torch']} / {env['torchvision']}",
            "numpy": env.get("numpy", "not recorded"),
            "pandas / matplotlib / seaborn (this kernel)":
                f"{pd.__version__} / {matplotlib.__version__} / {sns.__version__}",
            "CPU": env["cpu_model"], "usable cores": env["cpu_cores_usable"], "RAM (GiB)": env["memory_gib"],
            "GPU": ", ".join(env["gpus"]) or "none", "CUDA / driver": f"{env['cuda']} / {env.get('gpu_driver')}"
            if env["gpus"] else "-", "platform": env["platform"]}
    if rt:
        rows.update({"backend": rt["backend"], "device": rt["device"],
                     "threads per rank (rule)": f"{rt['threads_per_rank']} ({rt.get('threads_rule', '')})"})
    return pd.DataFrame({"value": rows}).rename_axis(None)


HYPERPARAMETERS = {"hidden_sizes": "hidden layers", "dropout": "dropout", "batch_size": "batch size per worker",
                   "epochs": "epochs", "lr": "Adam learning rate", "weight_decay": "weight decay",
                   "lr_step": "StepLR step (epochs)", "lr_gamma": "StepLR factor"}


def hyperparameter_table(cfg: TrainConfig) -> pd.DataFrame:
    return pd.DataFrame({"value": {label: str(getattr(cfg, name)) for name, label in HYPERPARAMETERS.items()}})


def source(*objects, start: str | None = None, lines: int | None = None) -> str:
    """The source of functions or classes from the package, optionally from the line that
    starts with ``start`` and at most ``lines`` lines (to show the part that matters)."""
    parts = []
    for obj in objects:
        text = textwrap.dedent(inspect.getsource(obj))
        if start is not None:  # from the beginning of the line that holds ``start``
            text = text[text.rfind("\n", 0, text.index(start.strip())) + 1:]
            text = textwrap.dedent(text)
        if lines is not None:
            text = "\n".join(text.splitlines()[:lines])
        parts.append(text.rstrip())
    return "\n\n".join(parts)


def show_source(*objects, **kwargs):
    """Display package source as highlighted code in a notebook."""
    from IPython.display import Code

    return Code(source(*objects, **kwargs), language="python")


class Table:
    """A table shown as Markdown, so that long text wraps inside its cells in any viewer; as plain text,
    each row is a block of wrapped ``column: value`` lines rather than one line too wide to read."""

    def __init__(self, frame: pd.DataFrame):
        self.frame = frame.reset_index()

    @staticmethod
    def _cell(value) -> str:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    def _repr_markdown_(self) -> str:
        rows = [self.frame.columns, *self.frame.itertuples(index=False)]
        lines = ["| " + " | ".join(self._cell(v) for v in row) + " |" for row in rows]
        return "\n".join([lines[0], "|" + " --- |" * len(self.frame.columns), *lines[1:]])

    def __repr__(self) -> str:
        return "\n\n".join("\n".join(textwrap.fill(f"{column}: {self._cell(value)}", 100, subsequent_indent="    ")
                                     for column, value in zip(self.frame.columns, row))
                           for row in self.frame.itertuples(index=False))
