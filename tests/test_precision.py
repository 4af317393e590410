"""Mixed precision (``--precision bf16-mixed``): the forward pass in bfloat16 under autocast, held to a
bound derived from bfloat16's precision, not read off one machine's output."""

import json
import subprocess
import sys

import torch

from ddp_helpers.model import MLP

U = 2.0 ** -9  # bfloat16 keeps 8 significant bits: rounding to nearest is off by at most half a unit, 2**-9 relative


def forward_bound(model: MLP, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact logits (float64) and a bound on how far autocast's may be from them. Each linear layer
    rounds its input, weight and bias to bfloat16 (each off by at most U relative), multiplies with
    K-term sums kept in float32 (off by at most K * 2**-24 relative to the sum of the terms' sizes),
    and rounds its output to bfloat16; the error it received is carried through |W| (a ReLU does
    not enlarge it)."""
    h, err = x.double(), torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for layer in model.net:
        if isinstance(layer, torch.nn.Linear):
            w, b = layer.weight.double(), layer.bias.double()
            k = w.shape[1]
            terms = h.abs() @ w.abs().T
            out = h @ w.T + b
            carried = err @ w.abs().T + ((1 + U) ** 2 - 1 + k * 2.0 ** -24) * terms + U * b.abs()
            err = carried + U * (out.abs() + carried)  # and the output rounded to bfloat16
            h = out
        elif isinstance(layer, torch.nn.ReLU):
            h = h.clamp(min=0)
    return h, err


def test_the_bf16_forward_pass_stays_within_its_derived_bound(mnist):
    torch.manual_seed(0)
    model = MLP().eval()  # dropout off: the same function in both precisions
    x = mnist[1].images[:256]
    exact, bound = forward_bound(model, x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(x).double()
    assert mixed.dtype == torch.float64 and (bound > 0).all()
    assert ((mixed - exact).abs() <= bound).all()
    assert (mixed - exact).abs().max() > 0  # bfloat16 really was used (float32 would be far closer)


def test_a_mixed_precision_run_says_so_and_learns(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ddp_helpers", "train", "--world-size", "1", "--precision",
                          "bf16-mixed", "--dataset", "mnist", "--train-subset", "4096", "--test-subset", "1000",
                          "--epochs", "1", "--no-progress", "--output-dir", str(tmp_path), "--run-name", "bf16"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "precision bf16-mixed" in out.stdout.splitlines()[0]
    record = json.loads((tmp_path / "bf16.json").read_text())
    assert record["config"]["precision"] == "bf16-mixed" and "native bfloat16" in record["runtime"]["precision"]
    assert record["epochs"][0]["val_accuracy"] > 0.8  # 128 steps of real digits: well above chance (10%)
