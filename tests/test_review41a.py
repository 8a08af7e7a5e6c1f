"""review41a: findings of the review of robust41 and torchsites41, each a test that failed before its fix.

Truth comes from the test's own float64 torch ops on the weights, never from deadrelu."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import arch_file, relu_onnx, save_npz
from onnx import TensorProto, helper, numpy_helper

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


def test_a_settings_path_refused_is_overridden_by_its_flag_as_the_message_says(cli, tmp_path, monkeypatch):
    """A settings file naming a baseline (or a JUnit file) outside its folder is refused with "…or give
    --baseline on the command line" — and giving it on the command line was refused the same way (the
    file's value was checked though the flag replaces it). Now the flag's run reads the flag's baseline
    (the gate fails on data that kill every unit: so it was read) and writes the flag's JUnit file."""
    model = relu_onnx(tmp_path / "m.onnx", 4)
    np.savez(tmp_path / "d.npz", x=np.ones((8, 4), np.float32))
    np.savez(tmp_path / "dead.npz", x=np.full((8, 4), -1.0, np.float32))
    base = tmp_path / "base.json"
    assert cli("scan", model, "--data", tmp_path / "d.npz", "--json", base, "-q").code == 0
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    monkeypatch.chdir(checkout)
    (checkout / "deadrelu.toml").write_text(
        f'baseline = {str(base)!r}\njunit = "../outside.xml"\nmax-increase = 0\n'
    )
    refused = cli("scan", model, "--data", tmp_path / "dead.npz", "-q")
    assert refused.code == 2 and "give --baseline on the command line" in refused.err, refused.err
    result = cli(
        "scan",
        model,
        "--data",
        tmp_path / "dead.npz",
        "-q",
        "--baseline",
        base,
        "--junit",
        checkout / "j.xml",
    )
    assert result.code == 1 and "grew from 0.0% to 100.0%" in result.err, result.err
    assert (checkout / "j.xml").is_file() and not (tmp_path / "outside.xml").exists()


def test_the_private_weights_copy_is_removed_when_its_writing_is_interrupted(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM, raised as an exception by the CLI) while the scan writes its private copy of a
    large model file: the copy was left in $TMPDIR (only OSError removed it; its cleanup was registered
    after the write), gigabytes per interrupted run of a large model. Now nothing is left. A completed
    copy holds the file's bytes, and goes with the model."""
    import gc
    import tempfile

    from deadrelu_cli.loaders import onnx_model
    from deadrelu_cli.loaders.model import LoadOptions

    weight = np.arange(40_000, dtype=np.float32)  # 160 KB: released (RELEASE_MIN_BYTES)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["pre"]), helper.make_node("Relu", ["pre"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", weight.size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", weight.size])],
        [numpy_helper.from_array(weight, "w")],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))

    class Interrupted:
        def __init__(self, *args):
            self.handle = open(*args)  # noqa: SIM115 - closed in __exit__

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, raw):
            self.handle.write(raw[: len(raw) // 2])
            raise KeyboardInterrupt

    loaded = onnx_model.load_onnx(LoadOptions(path=str(path)))
    monkeypatch.setattr(onnx_model, "open", Interrupted, raising=False)
    with pytest.raises(KeyboardInterrupt):
        onnx_model.release_weights(loaded)
    assert list(temp.iterdir()) == []
    monkeypatch.delattr(onnx_model, "open")
    loaded = onnx_model.load_onnx(LoadOptions(path=str(path)))
    assert onnx_model.release_weights(loaded)
    (copy,) = temp.glob("*/" + onnx_model.WEIGHTS_COPY)
    assert copy.read_bytes() == path.read_bytes()
    del loaded
    gc.collect()
    assert list(temp.iterdir()) == []


WIDENED = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        spread = torch.maximum(self.fc1(x), torch.zeros(3, 1, 6))  # [3, N, 6]: widened, no ReLU
        h = spread.mean(0)
        return self.head(torch.maximum(self.fc2(h), torch.zeros(5)))  # the one ReLU


def build():
    torch.manual_seed(3)
    return Net().eval()
"""


def test_a_maximum_whose_zeros_widen_x_is_no_site_in_torchscript_either(cli, tmp_path):
    """maximum(fc1(x), zeros(3, 1, 6)) is no ReLU (its zeros widen x); the TorchScript walk lists it
    (shapes are known only at run time) and the run passed it by as an ordinary op without taking its
    place, so every scripted or traced scan of the model failed: "ran 0 activations but its code has 2"
    (eager and .pt2 scanned it). Now the listed site is withdrawn as a clamp that is no layer is, and the
    genuine maximum(fc2(h), zeros) is counted with its producer."""
    model, _ = arch_file(tmp_path / "widened.py", WIDENED)
    data = save_npz(tmp_path / "d.npz", x=DATA)
    x = torch.from_numpy(DATA)
    with torch.no_grad():
        torch.jit.script(model).save(tmp_path / "s.pt")
        torch.jit.trace(model, x[:2]).save(tmp_path / "t.pt")
    w = x.double()
    h = torch.nn.functional.linear(w, model.fc1.weight.double(), model.fc1.bias.double()).clamp(min=0)
    pre = torch.nn.functional.linear(h, model.fc2.weight.double(), model.fc2.bias.double())
    for saved in ("s.pt", "t.pt"):
        result = cli("scan", tmp_path / saved, "--data", data, "--json", "-", "-q")
        assert result.code == 0, (saved, result.err)
        layers = result.json()["layers"]
        assert [(la["units"], la["producer"]) for la in layers] == [(5, "fc2")], saved
        assert layers[0]["positive_counts"] == (pre > 0).sum(dim=0).tolist(), saved
