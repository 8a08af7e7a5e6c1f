"""review36b: bugs found reviewing the day's merges. Truth is computed here with plain torch ops
(pre-activations written out in float64), never from deadrelu; each test fails on the code before its fix."""

from __future__ import annotations

import numpy as np
import torch
from conftest import arch_file, save_npz

SCALAR_CLAMP = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        norm = h.sum().clamp(min=0)  # a clamped 0-d value (a loss, a norm): no layer of units
        return h + norm


def build():
    torch.manual_seed(3)
    return Net()
"""


def test_clamp_of_a_scalar_is_no_site_and_no_failure(cli, tmp_path):
    """`x.sum().clamp(min=0)` in a forward: before, the eager scan failed with 'tuple index out of
    range; check that --data fits the model's input' and the .pt2 scan refused ('an activation site
    produced a scalar'), since every clamp(min=0) became a ReLU site. A 0-d clamp is no site: the
    model's real ReLU is counted exactly in both formats."""
    model, spec = arch_file(tmp_path / "scalar_clamp.py", SCALAR_CLAMP)
    x = np.random.RandomState(36).randn(10, 4).astype(np.float32)
    data = save_npz(tmp_path / "d.npz", x=x)
    with torch.no_grad():
        model.fc.bias[1] = -50.0  # unit 1 never fires
    state = tmp_path / "m.pt"
    torch.save(model.state_dict(), state)
    pre = torch.from_numpy(x).double() @ model.fc.weight.detach().double().T + model.fc.bias.detach().double()
    dead = [int(i) for i in np.flatnonzero(~(pre > 0).any(dim=0).numpy())]
    assert dead == [1]
    pt2 = tmp_path / "m.pt2"
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(
        torch.export.export(model, (torch.from_numpy(x[:2]),), dynamic_shapes=({0: batch},)), pt2
    )
    for args in ([state, "--arch", spec], [pt2]):
        result = cli("scan", *args, "--data", data, "--json", "-", "-q")
        assert result.code == 0, (args, result.err)
        layers = result.json()["layers"]
        assert [(layer["units"], layer["dead_indices"]) for layer in layers] == [(3, dead)], (args, layers)
        assert layers[0]["elements_per_unit"] == 10
