"""Shapes of real models met by trial42 (Hugging Face vision and speech architectures, built here with
random weights). Truth: plain forward hooks on the models' own modules, counted in numpy here."""

import importlib.util

import numpy as np
import torch

# A ConvNeXt block (Hugging Face ConvNext/ConvNextV2, torchvision's convnext_*, timm): the pointwise
# convolutions are nn.Linear on the channels-last [N, H, W, C] image, so the ReLU's units are on the
# last axis of a rank-4 tensor. Units 1, 5, 9 of pw1 are planted dead.
CONVNEXT_BLOCK = """
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pw1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.pw2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.stem(x).permute(0, 2, 3, 1)
        h = self.pw2(self.act(self.pw1(h)))
        return self.head(h.permute(0, 3, 1, 2).mean((2, 3)))


def build():
    torch.manual_seed(0)
    model = Block().eval()
    with torch.no_grad():
        model.pw1.bias[[1, 5, 9]] = -100.0
    return model
"""


def _convnext(tmp_path):
    source = tmp_path / "convnext_block.py"
    source.write_text(CONVNEXT_BLOCK)
    spec = importlib.util.spec_from_file_location("convnext_block", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(), f"{source}:build"


def _act_counts(model, x: torch.Tensor) -> tuple[np.ndarray, int]:
    """Per unit of `model.act`: how many of its values are > 0, and values per unit; units are what
    pw1's rows make (its out_features, the last axis), read from the hook's tensor."""
    seen = []
    handle = model.act.register_forward_hook(lambda _m, _a, out: seen.append(out.detach().numpy()))
    with torch.no_grad():
        model(x)
    handle.remove()
    out = np.concatenate([a.reshape(-1, model.pw1.out_features) for a in seen])
    assert seen[0].shape[-1] == model.pw1.out_features and seen[0].ndim == 4
    return (out > 0).sum(0), out.shape[0]


def test_a_linear_on_channels_last_images_has_its_units_on_the_last_axis(cli, tmp_path):
    """A ConvNeXt's ReLU after `nn.Linear` on [N, H, W, C] was counted on axis 1 (the image rows: 5
    "units", 0 dead) in every torch format (state_dict, TorchScript, .pt2), so its 3 dead channels
    passed `--max-dead` silently; the ONNX export was right. A Linear's units are its last axis at any
    rank; `fix` then finds pw1 as the producer."""
    model, arch = _convnext(tmp_path)
    x = torch.randn(6, 3, 5, 7, generator=torch.Generator().manual_seed(1))
    np.savez(tmp_path / "d.npz", x=x.numpy())
    positive, per_unit = _act_counts(model, x)
    assert np.flatnonzero(positive == 0).tolist() == [1, 5, 9]
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    torch.jit.trace(model, x).save(str(tmp_path / "m.ts"))
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "m.pt2")
    for given in (["sd.pt", "--arch", arch], ["m.ts"], ["m.pt2"]):
        path = tmp_path / given[0]
        res = cli("scan", path, *given[1:], "--data", tmp_path / "d.npz", "--json", "-", "--max-dead", "0.1")
        assert res.code == 1, (given, res.err)  # 3/16 dead > 10%: the gate fails
        (layer,) = res.json()["layers"]
        assert layer["positive_counts"] == positive.tolist(), given
        assert layer["elements_per_unit"] == per_unit, given
        assert layer["dead_indices"] == [1, 5, 9], given
    res = cli("fix", tmp_path / "sd.pt", "--arch", arch, "--data", tmp_path / "d.npz", "--strategy", "reinit",
              "--output", tmp_path / "fixed.pt")  # fmt: skip
    assert res.code == 0, res.err
    fixed, _ = _convnext(tmp_path)
    fixed.load_state_dict(torch.load(tmp_path / "fixed.pt", weights_only=True))
    assert (_act_counts(fixed, x)[0] > 0).all()  # the planted units fire (my hook)
    with torch.no_grad():
        assert torch.equal(fixed(x), model(x))  # reinit keeps the outputs


def test_watch_counts_a_channels_last_linear_on_its_last_axis(tmp_path):
    """The same under `watch()` in a training loop (the probe the Lightning and Trainer callbacks use):
    each window's counts equal my hooks' over that step's forward."""
    from deadrelu_cli import watch

    model, _ = _convnext(tmp_path)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(4, 3, 6, 6, generator=g) for _ in range(4)]
    seen = {}  # step -> the act's output on that step's training forward (my hook)
    now = {}

    def hook(_module, _args, out):
        seen.setdefault(now["step"], out.detach().numpy())

    model.act.register_forward_hook(hook)
    with watch(model, every=2, window=1, config=False) as w:
        for step, x in enumerate(batches):
            w.step(step)
            now["step"] = step
            loss = model(x).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    truth = [seen[s].reshape(-1, 16) for s in (0, 2)]
    assert len(w.reports) == 2
    for report, out in zip(w.reports, truth, strict=True):
        (layer,) = report.layers
        assert np.asarray(layer.positive_counts).tolist() == (out > 0).sum(0).tolist()
        assert layer.elements_per_unit == out.shape[0]
        assert np.flatnonzero(layer.positive_counts == 0).tolist() == [1, 5, 9]
