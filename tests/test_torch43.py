"""torch43: the margin rule at rank 4 and 5 in every format; DETR-style pixel masks; LeakyReLU layers
beside ReLUs; watch() windows in merge; a resumed watch()'s trend. Truth: the tests' own torch / numpy."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from conftest import arch_file, counts_from_pre, save_npz

MARGINS = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.conv3, self.lin = nn.Conv2d(3, 6, 1), nn.Conv3d(3, 6, 1), nn.Linear(3, 6)

    def forward(self, x):
        h = self.conv(x)  # [N, 6, H, W]: units on dim 1
        g = self.lin(x.permute(0, 2, 3, 1))  # [N, H, W, 6]: units last
        k = self.conv3(x.unsqueeze(2).expand(-1, -1, 2, -1, -1))  # [N, 6, 2, H, W]
        clamped = [
            # the units summed away: one value per position, no layer
            (h.sum(-3) - 0.5).clamp(min=0),
            (g.sum(-1) - 0.5).clamp(min=0),
            (g.sum(3) - 0.5).clamp(min=0),
            (k.sum(-4) - 0.5).clamp(min=0),
            # the mean broadcast back over the units: ReLU layers of 6 units
            (h - h.mean(-3, keepdim=True)).clamp(min=0),
            (g - g.mean(3, keepdim=True)).clamp(min=0),
            (k - k.mean(1, keepdim=True)).clamp(min=0),
        ]
        return torch.stack([c.flatten(1).sum(1) for c in clamped], 1)


def build():
    return Net()
"""


def _formats(model, spec: str, example, tmp_path) -> dict:
    """MODEL as a state_dict (+ --arch), .pt2, scripted, traced and ONNX (dynamo=False)."""
    dynamic = ({0: torch.export.Dim("b", max=1024)},)
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=dynamic), tmp_path / "m.pt2")
    torch.save(model.state_dict(), tmp_path / "m.pt")
    with torch.no_grad():
        torch.jit.script(model).save(tmp_path / "s.pt")
        torch.jit.trace(model, example).save(tmp_path / "t.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            tmp_path / "m.onnx",
            dynamo=False,
            input_names=["x"],
            dynamic_axes={"x": {0: "b"}},
        )
    return {
        "eager": [tmp_path / "m.pt", "--arch", spec],
        "pt2": [tmp_path / "m.pt2"],
        "scripted": [tmp_path / "s.pt"],
        "traced": [tmp_path / "t.pt"],
        "onnx": [tmp_path / "m.onnx"],
    }


def test_margins_and_centred_clamps_of_rank_4_and_5_agree_with_the_truth_in_every_format(cli, tmp_path):
    """Clamps of a conv's [N, C, H, W], a channels-last Linear's [N, H, W, C] and a Conv3d's [N, C, D, H, W]:
    the units summed away (`(h.sum(-3) - m).clamp(min=0)`, `g.sum(-1)`, `g.sum(3)`, `k.sum(-4)`) is no
    layer; centred on the units' mean (`h - h.mean(-3, keepdim=True)`) is a ReLU layer of 6 units, counted
    on its unit axis. Truth: the three centred pre-activations computed here, counted in numpy.
    Before: TorchScript took every reduction's input as rank 3 (counted `h.sum(-3)` and `k.sum(-4)`,
    dropped the Conv3d's centred layer), eager / .pt2 / ONNX counted the channels-last margins, and
    .pt2 dropped the conv's and the Conv3d's centred layers."""
    model, spec = arch_file(tmp_path / "margins.py", MARGINS)
    x = np.random.RandomState(43).randn(7, 3, 4, 5).astype(np.float32)
    data = save_npz(tmp_path / "d.npz", x=x)
    with torch.no_grad():
        t = torch.from_numpy(x).double()
        h = torch.nn.functional.conv2d(t, model.conv.weight.double(), model.conv.bias.double())
        g = torch.nn.functional.linear(
            t.permute(0, 2, 3, 1), model.lin.weight.double(), model.lin.bias.double()
        )
        k = torch.nn.functional.conv3d(
            t.unsqueeze(2).expand(-1, -1, 2, -1, -1), model.conv3.weight.double(), model.conv3.bias.double()
        )
    truth = []
    for pre, dim in (
        (h - h.mean(1, keepdim=True), 1),
        (g - g.mean(3, keepdim=True), 3),
        (k - k.mean(1, keepdim=True), 1),
    ):
        positives, _, elements = counts_from_pre(pre, dim)
        truth.append((6, positives.tolist(), elements))
    assert all(0 < p < e for _, counts, e in truth for p in counts)  # every unit fires on some positions only
    for fmt, args in _formats(model, spec, torch.from_numpy(x[:2]), tmp_path).items():
        result = cli("scan", *args, "--data", data, "--json", "-", "-q")
        assert result.code == 0, (fmt, result.err)
        layers = result.json()["layers"]
        found = [(la["units"], la["positive_counts"], la["elements_per_unit"]) for la in layers]
        assert found == truth, (fmt, [la["name"] for la in layers])
