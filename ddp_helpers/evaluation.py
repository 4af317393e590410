"""Use a trained model: ``python -m ddp_helpers evaluate RECORD_OR_WEIGHTS`` prints the test accuracy of
saved weights and where they go wrong.

A record (``results/train_ws2_ddp.json``) names its config and has its weights beside it (``.pt``);
weights alone are read as a state_dict of this project's MLP, whose hidden widths their shapes give.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .data import load_datasets
from .engine import evaluate
from .errors import ConfigError
from .model import MLP


def load_model(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """The MLP saved at ``path`` (a record or its weights) in eval mode, and what is known of its run."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file. Fix: pass a record of a run (.json) or its weights (.pt)")
    config: dict = {}
    if path.suffix == ".json":
        from .results import load_json, weights_path

        try:
            record = load_json(path)
            config = record["config"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{path} is not a record of this project (no config in it)") from None
        if record.get("status") == "failed":
            raise ConfigError(f"{path} is the record of a failed run: it kept no weights")
        path = weights_path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: the record's weights are not beside it. Fix: pass the .pt file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        widths = [state[f"net.{3 * i}.weight"].shape[0] for i in range(len(state) // 2 - 1)]
        model = MLP(widths, 0.0).to(state["net.0.weight"].dtype)
        model.load_state_dict(state)
    except Exception:
        raise ConfigError(f"{path} is not the weights of this project's MLP (a state_dict saved by a run)") from None
    return model.eval(), config


def evaluate_file(path: str | Path, data_dir: str = "") -> dict:
    """Test accuracy and the confusion summary of the saved model on MNIST's 10,000 test images."""
    model, config = load_model(path)
    _, test = load_datasets("mnist", data_dir or config.get("data_dir", ""))
    test = test.to("cpu", next(model.parameters()).dtype)
    out = evaluate(model, test, torch.arange(len(test)), return_predictions=True)
    predicted, truth = out["predictions"], test.labels
    confusion = torch.zeros(10, 10, dtype=torch.long)
    confusion.index_put_((truth, predicted), torch.ones_like(truth), accumulate=True)
    per_class = (confusion.diag() / confusion.sum(1)).tolist()
    mistakes = [(int(confusion[t, p]), t, p) for t in range(10) for p in range(10) if t != p and confusion[t, p]]
    return {"weights": str(path), "test_samples": len(test), "accuracy": float((predicted == truth).float().mean()),
            "per_class_accuracy": per_class, "most_confused": sorted(mistakes, reverse=True)[:5],
            "confusion": confusion.tolist()}
