"""``perturb_zero_inits`` fills exactly the all-zero parameters, reproducibly."""
from __future__ import annotations

import torch
from torch import nn

from fs3d_accel.model.random_weights import perturb_zero_inits


def test_fills_all_zero_parameters_only_and_reproducibly():
    def make():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        with torch.no_grad():
            net[1].weight.zero_()
            net[1].bias.zero_()
            net[0].bias.zero_()
            net[0].bias[0] = 1.0  # not all zero: kept
        return net

    a, b = make(), make()
    kept = {k: v.clone() for k, v in a.state_dict().items()}
    assert perturb_zero_inits(a) == ["1.weight", "1.bias"]
    assert perturb_zero_inits(b) == ["1.weight", "1.bias"]
    for k in ("0.weight", "0.bias"):
        assert torch.equal(a.state_dict()[k], kept[k])
    assert float(a[1].weight.detach().abs().min()) > 0 and torch.equal(a[1].weight, b[1].weight)
    assert perturb_zero_inits(a) == []  # nothing is zero any more
