"""One whole training step captured as a CUDA graph and replayed for every full batch.

At batch 32 this MLP's step is about fifty small kernels; launched one by one from Python,
the GPU waits for the host most of the time. Captured once, the step (``engine.step``, the
function every eager step runs: zero the gradients, forward, loss, backward, the loss and
accuracy sums, fused Adam) is one launch. The
recipe is PyTorch's "whole network capture": static input buffers, a capturable
optimizer, warm-up on a side stream before capture. The warm-up steps really update the
weights, Adam's state, the metric sums and the random generator, so all of them are put
back afterwards, in place (the graph holds their addresses): training starts where the
eager path starts, a resumed run included.
"""

from __future__ import annotations

import torch

from .engine import Tally, step


def graph_supported(device: torch.device, world_size: int, accumulation_steps: int) -> tuple[bool, str]:
    """Whether this run can use a captured step, and why not when it cannot."""
    if device.type != "cuda":
        return False, "not on CUDA"
    if world_size > 1:
        return False, "DDP steps run eagerly (capturing NCCL collectives was not built or measured here)"
    if accumulation_steps > 1:
        return False, "gradient accumulation runs eagerly"
    return True, "captured"


def captured_step(wanted: bool, sync, optimizer: torch.optim.Optimizer, tally: Tally, images: torch.Tensor,
                  labels: torch.Tensor, batch_size: int, world_size: int, accumulation_steps: int,
                  autocast: torch.dtype | None = None) -> tuple["GraphedStep | None", str]:
    """The step captured for batches of ``batch_size`` (the first batch of ``images`` serves as the
    example) where it is wanted and supported; else None. With a note for the record."""
    if not wanted:
        return None, "off (config)"
    can, note = graph_supported(images.device, world_size, accumulation_steps)
    if not can:
        return None, note
    return GraphedStep(sync, optimizer, tally, images[:batch_size], labels[:batch_size], autocast=autocast), note


class GraphedStep:
    """A captured training step for batches of exactly ``batch_size`` samples."""

    def __init__(self, sync, optimizer: torch.optim.Optimizer, tally: Tally, example_x: torch.Tensor,
                 example_y: torch.Tensor, warmup: int = 3, autocast: torch.dtype | None = None):
        self.sync, self.optimizer, self.tally, self.autocast = sync, optimizer, tally, autocast
        model = sync.module
        self.x, self.y = example_x.clone(), example_y.clone()
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        moments = {p: {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
                   for p, state in optimizer.state.items()}  # empty for a new run, restored ones on resume
        tallied, rng = tally.sums.clone(), torch.cuda.get_rng_state()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):  # builds Adam's state and lets the libraries pick their kernels
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        with torch.no_grad():  # undo the warm-up: the same start as the eager path
            for key, value in model.state_dict().items():
                value.copy_(weights[key])
            for param, state in optimizer.state.items():
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and param in moments:
                        value.copy_(moments[param][key])
                    elif isinstance(value, torch.Tensor):
                        value.zero_()
            tally.sums.copy_(tallied)
        torch.cuda.set_rng_state(rng)

    def _step(self) -> None:
        step(self.sync, self.optimizer, self.x, self.y, self.tally, set_to_none=False,  # the graph holds the grads
             autocast=self.autocast)

    def fits(self, x: torch.Tensor) -> bool:
        return x.shape[0] == self.x.shape[0]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x.copy_(x)
        self.y.copy_(y)
        self.graph.replay()
