"""The plain DDP listing (ddp_helpers/plain_ddp.py) is the truth of the engine: the same weights."""

import torch

from ddp_helpers import MLP, TrainConfig, launch
from ddp_helpers.exhibits.demos import run_plain_listing
from processes import EXACT, max_difference

# Real MNIST, dropout on (so each rank's dropout masks must be drawn as the engine draws them),
# the learning rate halved after each epoch, and 1000 samples: 500 per rank, so each epoch
# ends on a short batch of 20. float64 so that "the same" holds to 1e-9 on any CPU.
CONFIG = TrainConfig(world_size=2, sync="ddp", dataset="mnist", device="cpu", dtype="float64", train_subset=1000,
                     test_subset=256, epochs=2, batch_size=32, lr_step=1, dropout=0.2, seed=5, timeout_s=60,
                     launch_timeout_s=120)


def test_the_plain_listing_ends_with_the_engines_weights():
    engine = launch(CONFIG, live=False).state_dict
    plain = run_plain_listing(CONFIG, timeout_s=120)  # spawned ranks that read their place as under torchrun
    torch.manual_seed(CONFIG.seed)
    initial = MLP(CONFIG.hidden_sizes, CONFIG.dropout).double().state_dict()
    assert plain.keys() == engine.keys() == initial.keys()
    assert all(t.dtype == torch.float64 for t in plain.values())
    assert min((plain[k] - initial[k]).abs().max().item() for k in initial) > 1e-3  # every tensor trained
    assert max_difference(plain, engine) < EXACT
