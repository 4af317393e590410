"""The multilayer perceptron of the design: 784-512-256-128-10, ReLU, dropout 0.2.

Self-contained on purpose: it imports nothing else of this package.
"""

from __future__ import annotations

from torch import nn


class MLP(nn.Module):
    """Fully connected classifier; each hidden layer is Linear -> ReLU -> Dropout."""

    def __init__(self, hidden_sizes=(512, 256, 128), dropout: float = 0.2, in_features: int = 28 * 28,
                 num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x.flatten(1))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
