"""review41a: findings of the review of robust41 and torchsites41, each a test that failed before its fix.

Truth comes from the test's own float64 torch ops on the weights, never from deadrelu."""

from __future__ import annotations

import numpy as np
import torch
from conftest import arch_file, save_npz

DATA = np.random.RandomState(41).randn(12, 4).astype(np.float32)

CHANGED_ZEROS = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 6)
        self.fc3 = nn.Linear(6, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        h = self.fc1(x)
        floor = torch.zeros_like(h)
        floor += 0.5  # zeros made by the code, then changed in place: maximum(h, 0.5) is no ReLU
        h = torch.maximum(h, floor)
        g = self.fc2(h)
        keep = g > 0
        keep.logical_not_()  # the mask of x > 0, then inverted in place: min(g, 0), no ReLU
        h = torch.where(keep, g, 0.0)
        return self.head(torch.maximum(self.fc3(h), torch.zeros(5)))  # the one ReLU


def build():
    torch.manual_seed(7)
    return Net().eval()
"""


def test_zeros_or_a_mask_changed_in_place_make_no_spelled_relu_in_eager(cli, tmp_path):
    """A zero tensor (or an `x > 0` mask) changed in place before the maximum (select) is not what a ReLU
    is made of: eager counted `maximum(h, zeros + 0.5)` and `where(~(g > 0), g, 0)` as ReLU sites (the
    .pt2 and TorchScript scans did not). Only the genuine maximum(fc3(h), zeros) is a site, with its
    counts."""
    model, spec = arch_file(tmp_path / "changed.py", CHANGED_ZEROS)
    data = save_npz(tmp_path / "d.npz", x=DATA)
    x = torch.from_numpy(DATA).double()

    def lin(v, layer):
        return torch.nn.functional.linear(v, layer.weight.double(), layer.bias.double())

    h = lin(x, model.fc1).clamp(min=0.5)
    g = lin(h, model.fc2)
    pre = lin(torch.where(g > 0, 0.0, g), model.fc3)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    result = cli("scan", tmp_path / "m.pt", "--arch", spec, "--data", data, "--json", "-", "-q")
    assert result.code == 0, result.err
    layers = result.json()["layers"]
    assert [(la["name"], la["units"], la["producer"]) for la in layers] == [("relu()", 5, "fc3")]
    assert layers[0]["positive_counts"] == (pre > 0).sum(dim=0).tolist()
    # the same outside inference mode (a training loop's watch(), an export tracing the probe), where
    # the tensors' version counters tell a write in place
    from deadrelu_cli.probe.base import ProbeSettings
    from deadrelu_cli.probe.eager import EagerProbe

    probe = EagerProbe(model, ProbeSettings())
    with torch.no_grad(), probe.attached():
        probe.run((torch.from_numpy(DATA),))
    assert list(probe.registry.sites) == ["relu()"]
    assert probe.registry.sites["relu()"].positive.tolist() == (pre > 0).sum(dim=0).tolist()
