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


MIXTURE = """
import torch
from torch import nn


class Mixture(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(4, 2)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(4, 3), nn.ReLU()) for _ in range(2)])

    def forward(self, x):
        choice = self.gate(x).argmax(-1)
        out = x.new_zeros(x.shape[0], 3)
        for i, expert in enumerate(self.experts):
            rows = choice == i
            if rows.any():
                out[rows] = expert(x[rows])
        return out


def build():
    torch.manual_seed(5)
    return Mixture()
"""


def test_experts_that_see_routed_rows_are_not_refused_as_a_missing_sample_axis(cli, tmp_path):
    """A mixture of experts routing each row to one expert: every ReLU sees fewer rows than samples.
    Before, the scan refused ('the model saw 6 value(s) per unit where 8 samples were read … one sample
    without the sample axis?'), whatever the batch size. The sample-axis check now fires only when every
    site saw exactly one value per unit per forward; each expert is counted on its rows (plain hooks)."""
    model, spec = arch_file(tmp_path / "mixture.py", MIXTURE)
    x = np.random.RandomState(8).randn(8, 4).astype(np.float32)
    data = save_npz(tmp_path / "d.npz", x=x)
    state = tmp_path / "m.pt"
    torch.save(model.state_dict(), state)
    seen: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    for i, expert in enumerate(model.experts):
        expert[0].register_forward_hook(lambda _m, _a, out, i=i: seen[i].append(out.detach()))
    with torch.no_grad():
        model(torch.from_numpy(x))
    pre = {i: torch.cat(v) for i, v in seen.items()}
    assert 0 < len(pre[0]) < 8 and 0 < len(pre[1]) < 8  # each expert saw some rows only
    for batch in ("8", "1"):
        result = cli("scan", state, "--arch", spec, "--data", data, "-b", batch, "--json", "-", "-q")
        assert result.code == 0, (batch, result.err)
        layers = {layer["name"]: layer for layer in result.json()["layers"]}
        for i in (0, 1):
            layer = layers[f"experts.{i}.1"]
            assert layer["elements_per_unit"] == len(pre[i]), batch
            assert layer["positive_counts"] == (pre[i] > 0).sum(dim=0).tolist(), batch
