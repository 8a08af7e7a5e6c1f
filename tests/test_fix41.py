"""`deadrelu fix` on every format, checked on the written file: a single shifted layer settles (a value
the cut rounds across), reinit/kick/prune/bias-shift act on a TorchScript archive's own parameters and
write TorchScript, a TorchScript archive is not written under another format's name, and a failed
exact check says why (--threshold > 0) and, with -q, in the error line.

Truth: plain torch on the written files (torch.load, torch.jit.load; the pre-activations recomputed
here with torch.nn.functional from the written parameters) and onnxruntime with the Relu input exposed,
never the tool's report."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from conftest import arch_file, save_npz
from onnx import TensorProto, helper

WIDE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(1024, 16)
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        return self.out(torch.relu(self.fc(x)))


def build():
    torch.manual_seed(5)
    net = Net()
    with torch.no_grad():
        net.fc.bias[:] = -1e6  # every unit dead; its values are -1e6 + a dot product over 1024 inputs
    return net
"""


def _wide_data() -> np.ndarray:
    return (np.random.default_rng(5).standard_normal((64, 1024)) * 3).astype(np.float32)


def _onnx_pre(path, x: np.ndarray) -> np.ndarray:
    """The (single) Relu's input of the ONNX file at `path` (onnxruntime, the tensor exposed)."""
    model = onnx.load(str(path))
    (relu,) = [n for n in model.graph.node if n.op_type == "Relu"]
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info(relu.input[0], TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_a_single_shifted_layer_settles_on_a_rescan(cli, tmp_path):
    """--target-rate 0: each unit is moved to fire on exactly its largest value. The cut sits between
    two values ~1e-3 apart at -1e6, and the shifted bias sums the long dot product in another order, so
    a top value can round to the other side of it: main left such a unit dead (state_dict: exit 1,
    nothing written) or firing on two values (ONNX); a rescan of the shifted layer moves it again."""
    x = _wide_data()
    model, spec = arch_file(tmp_path / "arch.py", WIDE)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    save_npz(tmp_path / "calib.npz", input=x)
    out = tmp_path / "out.pt"
    result = cli(
        "fix", tmp_path / "model.pt", "--arch", spec, "--data", tmp_path / "calib.npz",
        "--strategy", "bias-shift", "--target-rate", "0", "--output", out,
    )  # fmt: skip
    assert result.code == 0, result.out + result.err
    state = torch.load(out, weights_only=True)
    with torch.no_grad():
        pre = F.linear(torch.from_numpy(x), state["fc.weight"], state["fc.bias"])
    assert (pre > 0).sum(0).tolist() == [1] * 16

    torch.onnx.export(
        model, (torch.from_numpy(x[:2]),), str(tmp_path / "model.onnx"), input_names=["input"],
        dynamic_axes={"input": {0: "b"}}, dynamo=False, opset_version=17,
    )  # fmt: skip
    out2 = tmp_path / "out.onnx"
    result = cli(
        "fix", tmp_path / "model.onnx", "--data", tmp_path / "calib.npz", "--strategy", "bias-shift",
        "--target-rate", "0", "--output", out2,
    )  # fmt: skip
    assert result.code == 0, result.out + result.err
    assert (_onnx_pre(out2, x) > 0).sum(0).tolist() == [1] * 16


CNN = """
import torch
import torch.nn.functional as F
from torch import nn


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = self.fc(x.flatten(1))
        x.relu_()  # in place: the head reads the tensor the relu_ activated
        return self.head(x)


def build():
    torch.manual_seed(0)
    net = CNN()
    with torch.no_grad():
        net.bn.bias[[1, 4]] = -30.0
        net.conv2.bias[[0, 5]] = -30.0
        net.fc.bias[2] = -30.0
        net.bn.running_mean.uniform_(-0.1, 0.1)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net
"""
DEAD = [[1, 4], [0, 5], [1, 2]]  # (fc unit 1 is dead on this data without help)


def _pres(m, x: torch.Tensor) -> list[torch.Tensor]:
    """The three ReLU inputs of CNN, recomputed here from a module's parameters (units on the last axis)."""
    with torch.no_grad():
        h = F.conv2d(x, m.conv.weight, m.conv.bias, padding=1)
        h = F.batch_norm(h, m.bn.running_mean, m.bn.running_var, m.bn.weight, m.bn.bias, False, 0.0, 1e-5)
        first = h
        h = F.conv2d(F.relu(h), m.conv2.weight, m.conv2.bias, padding=1)
        second = h
        h = F.linear(F.max_pool2d(F.relu(h), 2).flatten(1), m.fc.weight, m.fc.bias)
    return [
        first.movedim(1, -1).reshape(-1, first.shape[1]),
        second.movedim(1, -1).reshape(-1, second.shape[1]),
        h,
    ]


def _scripted(tmp_path, traced: bool = False):
    model, _ = arch_file(tmp_path / "arch.py", CNN)
    x = np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32)
    save_npz(tmp_path / "calib.npz", input=x)
    ts = torch.jit.trace(model, torch.from_numpy(x[:2])) if traced else torch.jit.script(model)
    torch.jit.save(ts, tmp_path / "model.ts")
    assert [
        (p.amax(0) <= 0).nonzero().reshape(-1).tolist() for p in _pres(model, torch.from_numpy(x))
    ] == DEAD
    return model, torch.from_numpy(x)


def _fix(cli, tmp_path, strategy: str, *extra: str):
    out = tmp_path / f"{strategy}.ts"
    result = cli(
        "fix", tmp_path / "model.ts", "--data", tmp_path / "calib.npz", "--strategy", strategy,
        "--output", out, *extra,
    )  # fmt: skip
    return result, out


def test_torchscript_reinit_and_prune_keep_outputs_and_write_torchscript(cli, tmp_path):
    """reinit: every dead unit of the scripted CNN (conv→BatchNorm, conv, linear; a max-pool and a
    flatten before the consumers; an in-place relu_ whose tensor the head reads) gets a fresh row and fires, outputs bit-equal; prune: the dead units
    are gone from the written archive's parameters, outputs within 1e-5. main refused both."""
    model, x = _scripted(tmp_path)
    with torch.no_grad():
        want = model(x)
    result, out = _fix(cli, tmp_path, "reinit")
    assert result.code == 0, result.out + result.err
    fixed = torch.jit.load(out)
    with torch.no_grad():
        assert torch.equal(fixed(x), want)
    for pre, units in zip(_pres(fixed, x), DEAD, strict=True):
        assert ((pre[:, units] > 0).sum(0) > 0).all(), units
    assert torch.all(fixed.bn.bias[[1, 4]] == 0) and torch.all(fixed.head.weight[:, 2] == 0)

    result, out = _fix(cli, tmp_path, "prune")
    assert result.code == 0, result.out + result.err
    pruned = torch.jit.load(out)
    assert [pruned.conv.weight.shape[0], pruned.bn.running_mean.shape[0], pruned.conv2.weight.shape] == [
        4,
        4,
        (6, 4, 3, 3),
    ]
    assert list(pruned.fc.weight.shape) == [3, 6 * 16] and list(pruned.head.weight.shape) == [2, 3]
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), want, rtol=1e-5, atol=1e-6)


def test_torchscript_bias_shift_and_kick_revive_units(cli, tmp_path):
    """bias-shift moves the BatchNorm beta / biases of a traced archive so each dead unit fires on ~1% of
    its values; kick pushes the rows of the Linear (--layers) until it fires. Other units untouched."""
    model, x = _scripted(tmp_path, traced=True)
    result, out = _fix(cli, tmp_path, "bias-shift")
    assert result.code == 0, result.out + result.err
    fixed = torch.jit.load(out)
    for pre, units in zip(_pres(fixed, x), DEAD, strict=True):
        fired = (pre[:, units] > 0).sum(0)
        assert (fired >= 1).all() and (fired <= 0.03 * pre.shape[0] + 1).all(), (units, fired)
    keep = [u for u in range(6) if u not in DEAD[0]]
    assert torch.equal(fixed.bn.bias[keep], model.bn.bias[keep])

    result, out = _fix(cli, tmp_path, "kick", "--layers", "relu()#3", "--kick-scale", "50")
    assert result.code == 0, result.out + result.err
    kicked = torch.jit.load(out)
    assert ((_pres(kicked, x)[2][:, DEAD[2]] > 0).sum(0) > 0).any()  # (a random push: one of two)
    assert torch.equal(kicked.conv2.bias, model.conv2.bias) and torch.equal(
        kicked.fc.weight[[0, 3, 4]], model.fc.weight[[0, 3, 4]]
    )


def test_torchscript_is_not_written_under_another_format_name(cli, tmp_path):
    """main wrote the TorchScript zip as OUT.onnx (exit 0); onnx could not open it."""
    _scripted(tmp_path)
    result, _ = _fix(cli, tmp_path, "leaky", "--output", tmp_path / "fixed.onnx")
    assert result.code == 2 and "TorchScript archive" in result.err, result.err
    assert not (tmp_path / "fixed.onnx").exists()


EIGHT = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.relu(self.fc(x)))


def build():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.fc.bias[:4] = torch.tensor([-0.9, -1.0, -1.1, -30.0])  # 0-2 peak in (0, 0.5]; 3 never > 0
    return net
"""


def test_an_exact_fix_that_changes_outputs_says_why(cli, tmp_path, monkeypatch):
    """--threshold 0.5: units that peak in (0, 0.5] are dead at the threshold, but the next layer reads
    them, so prune/reinit change the outputs. The verification fails (as on main), and the message now
    says why and what to do, in the error line with -q (main: "verification failed" and nothing else)."""
    x = np.random.default_rng(0).uniform(-1, 1, (64, 4)).astype(np.float32)
    model, spec = arch_file(tmp_path / "arch.py", EIGHT)
    with torch.no_grad():
        pre = model.fc(torch.from_numpy(x))
    peaks = pre.amax(0)
    positive = [u for u in range(8) if 0 < peaks[u] <= 0.5]
    assert positive and peaks[3] < 0  # the model is what the test says
    torch.save(model.state_dict(), tmp_path / "model.pt")
    save_npz(tmp_path / "calib.npz", input=x)
    monkeypatch.chdir(tmp_path)  # short paths: the error line is capped at 400 characters
    for strategy, out in (("prune", "out.pt2"), ("reinit", "out.pt")):
        result = cli(
            "fix", "model.pt", "--arch", spec, "--data", "calib.npz", "--strategy", strategy,
            "--threshold", "0.5", "--output", out, "-q", "--json", f"{strategy}.json",
        )  # fmt: skip
        assert result.code == 1, result.err
        assert not (tmp_path / out).exists()
        line = " ".join(result.err.split())
        assert f"{len(positive)} of the" in line and "dead only at --threshold 0.5" in line, line
        assert f"positive up to {float(peaks[positive].max()):.3g}" in line and "--threshold 0 " in line, line
        assert not line.endswith("…"), line  # the whole reason fits the one error line
        (failure,) = json.loads((tmp_path / f"{strategy}.json").read_text())["failures"]
        assert failure in line and "dead only at --threshold 0.5" in failure
