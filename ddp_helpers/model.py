"""The multilayer perceptron of the seed design: 784-512-256-128-10, ReLU, dropout."""

from __future__ import annotations

from torch import nn

from .data import IMAGE_PIXELS, NUM_CLASSES


class MLP(nn.Module):
    """Fully connected classifier; each hidden layer is Linear -> ReLU -> Dropout."""

    def __init__(self, hidden_sizes=(512, 256, 128), dropout: float = 0.2,
                 in_features: int = IMAGE_PIXELS, num_classes: int = NUM_CLASSES):
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
