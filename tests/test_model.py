import torch

from ddp_helpers.model import MLP, count_parameters


def test_default_mlp_has_seed_architecture_and_parameter_count():
    model = MLP()
    widths = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [(784, 512), (512, 256), (256, 128), (128, 10)]
    assert count_parameters(model) == 567_434
    dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts == [0.2, 0.2, 0.2]


def test_forward_accepts_images_and_flat_vectors():
    model = MLP().eval()
    x = torch.randn(5, 1, 28, 28)
    assert model(x).shape == (5, 10)
    assert torch.equal(model(x), model(x.reshape(5, 784)))
