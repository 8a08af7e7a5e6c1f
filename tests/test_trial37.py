"""trial37: ReLUs the tool might not see. Every ReLU call site is counted exactly in every torch format
(and its ONNX export), or named as unseen so that a gate never passes on what was not scanned.

Truth is computed here from the weights with plain torch ops in float64 (pre-activations written out),
never from deadrelu; each test fails on the code before the fix it names."""

from __future__ import annotations

import sys

import numpy as np
import torch
from conftest import arch_file, save_npz

SAMPLES, STEPS, FEATURES = 12, 3, 4
DATA = np.random.RandomState(37).randn(SAMPLES, STEPS, FEATURES).astype(np.float32)


def _formats(tmp_path, model, spec, trace=False, onnx=True):
    """{format: scan arguments} of one model: state_dict + --arch, .pt2, TorchScript, ONNX."""
    example = torch.from_numpy(DATA[:2])
    state = tmp_path / "m.pt"
    torch.save(model.state_dict(), state)
    found = {"eager": [state, "--arch", spec]}
    batch = torch.export.Dim("batch", min=1, max=1024)
    pt2 = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), pt2)
    found["pt2"] = [pt2]
    scripted = tmp_path / "m_ts.pt"
    with torch.no_grad():
        (torch.jit.trace(model, example, check_trace=False) if trace else torch.jit.script(model)).save(
            scripted
        )
    found["torchscript"] = [scripted]
    if onnx:
        path = tmp_path / "m.onnx"
        torch.onnx.export(
            model, (example,), path, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "b"}}
        )
        found["onnx"] = [path]
    return found


def _scan(cli, args, data, *extra) -> tuple[int, dict, str]:
    result = cli("scan", *args, "--data", data, "--json", "-", "-q", *extra)
    return result.code, (result.json() if result.out.strip() else {}), result.err


def _dead(pre: torch.Tensor) -> list[int]:
    """Units (last axis) whose pre-activation never exceeds 0 over every sample and position."""
    flat = pre.detach().double().reshape(-1, pre.shape[-1])
    return [int(i) for i in np.flatnonzero(~(flat > 0).any(dim=0).numpy())]


CLAMPS = """
import torch
from torch import nn
import torch.nn.functional as F


class Clamps(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        h = self.fc(x)
        return (
            torch.clamp(h, min=0.0) + h.clamp_min(0.0) + F.threshold(h * 2.0, 0.0, 0.0)
            + torch.clamp(h, 0.0, 6.0) + h.clamp(min=-1.0)  # the last is no ReLU: not a site
        )


def build():
    torch.manual_seed(1)
    model = Clamps()
    with torch.no_grad():
        model.fc.bias[[1, 4]] = -50.0  # planted: dead for any input of the data's range
    return model.eval()
"""


def test_relu_spelled_as_clamp_or_threshold_is_a_site_in_every_format(cli, tmp_path):
    """clamp(min=0), clamp_min(0), threshold(x, 0, 0) are ReLUs (clamp(0, 6) a ReLU6): counted as
    sites in eager, .pt2, TorchScript and ONNX (a Clip with no upper bound) alike. Before: no site at
    all in the torch formats ('the model ran no relu call'), and the ONNX Clip(x, 0) was no site."""
    model, spec = arch_file(tmp_path / "clamps.py", CLAMPS)
    data = save_npz(tmp_path / "d.npz", x=DATA)
    pre = torch.nn.functional.linear(
        torch.from_numpy(DATA).double(), model.fc.weight.double(), model.fc.bias.double()
    )
    dead = _dead(pre)
    assert dead == [1, 4]
    positives = (pre > 0).reshape(-1, 6).sum(dim=0).tolist()
    for fmt, args in _formats(tmp_path, model, spec).items():
        code, report, err = _scan(cli, args, data)
        assert code == 0, (fmt, err)
        layers = report["layers"]
        assert [layer["op"] for layer in layers] == ["relu", "relu", "relu", "relu6"], (fmt, layers)
        for layer in layers:
            assert layer["dead_indices"] == dead, (fmt, layer["name"])
            assert layer["units"] == 6 and layer["elements_per_unit"] == SAMPLES * STEPS, fmt
            assert layer["positive_counts"] == positives, (fmt, layer["name"])


RNN = """
import torch
from torch import nn


class WithRnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(4, 5, nonlinearity="relu", batch_first=True)
        self.fc = nn.Linear(5, 3)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.fc(self.rnn(x)[0]))


def build():
    torch.manual_seed(2)
    return WithRnn().eval()
"""


def test_rnn_relu_inside_its_kernel_is_named_and_stops_the_gate(cli, tmp_path):
    """nn.RNN(nonlinearity='relu') runs its ReLU inside one kernel: no format can count it per unit. It
    is named (per module) in the report's unseen activations, and a gate fails on it unless
    --allow-unseen; the other ReLU is counted. Before: silently absent, and the gate passed."""
    model, spec = arch_file(tmp_path / "rnn.py", RNN)
    data = save_npz(tmp_path / "d.npz", x=DATA)
    with torch.no_grad():
        hidden = model.rnn(torch.from_numpy(DATA))[0].double()
        pre = torch.nn.functional.linear(hidden, model.fc.weight.double(), model.fc.bias.double())
    for fmt, args in _formats(tmp_path, model, spec).items():
        code, report, err = _scan(cli, args, data, "--max-dead", "1.0")
        assert code == 1, (fmt, err)
        assert "RNN(activation=Relu)" in err and "--allow-unseen" in err, (fmt, err)
        unseen = report["unseen_activations"]
        assert list(unseen.values()) == [1] and "RNN(activation=Relu)" in next(iter(unseen)), (fmt, unseen)
        assert [layer["dead_indices"] for layer in report["layers"]] == [_dead(pre)], fmt
        code, _, err = _scan(cli, args, data, "--max-dead", "1.0", "--allow-unseen")
        assert code == 0, (fmt, err)


RNN_CELL = """
import torch
from torch import nn


class Cells(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.RNNCell(4, 5, nonlinearity="relu")

    def forward(self, x):
        h = None
        outs = []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            outs.append(h)
        return torch.stack(outs, 1)


def build():
    torch.manual_seed(3)
    model = Cells()
    with torch.no_grad():
        model.cell.bias_ih[2] = -40.0  # planted: dead at every step
    return model.eval()
"""


def test_rnn_cell_relu_is_one_site_per_step_in_every_format(cli, tmp_path):
    """nn.RNNCell(nonlinearity='relu') is one ReLU call per step: eager and .pt2 now count it as
    TorchScript and ONNX do (ATen's own steps written out). Before: eager and .pt2 had no site."""
    model, spec = arch_file(tmp_path / "cells.py", RNN_CELL)
    data = save_npz(tmp_path / "d.npz", x=DATA)
    w_ih, w_hh = model.cell.weight_ih.double(), model.cell.weight_hh.double()
    b_ih, b_hh = model.cell.bias_ih.double(), model.cell.bias_hh.double()
    x = torch.from_numpy(DATA).double()
    h = torch.zeros(SAMPLES, 5, dtype=torch.float64)
    truth = []
    for t in range(STEPS):
        pre = x[:, t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh
        truth.append((_dead(pre), (pre > 0).sum(dim=0).tolist()))
        h = pre.clamp(min=0)
    assert all(2 in dead for dead, _ in truth)
    for fmt, args in _formats(tmp_path, model, spec, trace=True).items():
        code, report, err = _scan(cli, args, data)
        assert code == 0, (fmt, err)
        layers = report["layers"]
        assert len(layers) == STEPS, (fmt, [layer["name"] for layer in layers])
        for layer, (dead, positives) in zip(layers, truth, strict=True):
            assert layer["dead_indices"] == dead, (fmt, layer["name"])
            assert layer["positive_counts"] == positives, (fmt, layer["name"])


ENCODER = """
import torch
from torch import nn


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, activation="relu", batch_first=True)

    def forward(self, x):
        return self.layer(x)


def build():
    torch.manual_seed(4)
    model = Encoder()
    with torch.no_grad():
        model.layer.linear1.bias[[0, 5]] = -30.0
    return model.eval()
"""


def test_transformer_encoder_fast_path_is_counted_or_named(cli, tmp_path):
    """TransformerEncoderLayer(activation='relu') in eval runs its FFN ReLU inside one fused kernel
    (torch's fast path). Eager and .pt2 count it exactly (the probe takes the slow path, the same
    values); a TorchScript traced on the fast path holds the fused op, which is named as unseen and
    stops a gate. Before: the traced model said 'no relu call' and nothing named the FFN."""
    model, spec = arch_file(tmp_path / "enc.py", ENCODER)
    data = save_npz(tmp_path / "d.npz", x=DATA)
    captured = []
    handle = model.layer.linear1.register_forward_hook(lambda m, a, out: captured.append(out.double()))
    model.train()  # dropout 0: the training forward is the slow path, linear1's output the pre-activation
    with torch.no_grad():
        model(torch.from_numpy(DATA))
    model.eval()
    handle.remove()
    pre = captured[0]
    dead = _dead(pre)
    assert {0, 5} <= set(dead)
    files = _formats(tmp_path, model, spec, trace=True, onnx=False)
    for fmt in ("eager", "pt2"):
        code, report, err = _scan(cli, files[fmt], data)
        assert code == 0, (fmt, err)
        [layer] = report["layers"]
        assert layer["dead_indices"] == dead, fmt
        assert layer["positive_counts"] == (pre > 0).reshape(-1, 6).sum(dim=0).tolist(), fmt
    assert "_transformer_encoder_layer_fwd" in str(torch.jit.load(files["torchscript"][0]).inlined_graph)
    code, report, err = _scan(cli, files["torchscript"], data, "--max-dead", "1.0")
    assert code == 1 and "transformer encoder fast path(activation=Relu)" in err, err
    assert report["unseen_activations"] == {"layer: transformer encoder fast path(activation=Relu)": 1}


SCRIPTED = """
import torch
from torch import nn
import torch.nn.functional as F


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return F.relu(self.fc(x))


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.jit.script(Inner())
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return F.relu(self.fc(self.inner(x)))


def build():
    torch.manual_seed(5)
    return Outer().eval()
"""


def test_scripted_submodule_of_an_eager_model_is_named_not_a_crash(cli, tmp_path):
    """A torch.jit.script'ed submodule inside an eager model: its code runs in C++, out of the probe's
    sight. The eager ReLU is counted, the scripted one named as unseen (gate fails). Before: an
    internal error (register_forward_pre_hook is not supported on ScriptModules), exit 3."""
    model, spec = arch_file(tmp_path / "outer.py", SCRIPTED)
    data = save_npz(tmp_path / "d.npz", x=DATA)
    state = tmp_path / "m.pt"
    torch.save(model.state_dict(), state)
    x = torch.from_numpy(DATA).double()
    inner = torch.relu(x @ model.inner.fc.weight.double().T + model.inner.fc.bias.double())
    pre = inner @ model.fc.weight.double().T + model.fc.bias.double()
    code, report, err = _scan(cli, [state, "--arch", spec], data, "--max-dead", "1.0")
    assert code == 1, err
    assert report["unseen_activations"] == {"inner: TorchScript code(activation=Relu)": 1}
    [layer] = report["layers"]
    assert layer["positive_counts"] == (pre > 0).reshape(-1, 3).sum(dim=0).tolist()


COND = """
import torch
from torch import nn


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        return torch.cond(h.sum() > -1e9, lambda t: torch.relu(t), lambda t: torch.relu(-t), (h,))


def build():
    torch.manual_seed(6)
    return Branchy().eval()
"""


def test_relu_inside_torch_cond_is_named_in_eager_and_pt2(cli, tmp_path, monkeypatch):
    """torch.cond runs its branches where no probe sees: eager (its branch compiled by dynamo) and
    .pt2 (a subgraph) name the ReLUs inside as unseen, and a gate fails on them. Before: eager failed
    with 'No module named deadrelu_arch_…' blamed on the data (the --arch module was not importable by
    name), and the .pt2 said 'no relu call'."""
    _, spec = arch_file(tmp_path / "branchy.py", COND)
    data = save_npz(tmp_path / "d.npz", x=DATA)
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("t37_branchy", tmp_path / "branchy.py")
    module = importlib.util.module_from_spec(module_spec)
    monkeypatch.setitem(sys.modules, "t37_branchy", module)  # dynamo (export of torch.cond) imports it
    module_spec.loader.exec_module(module)
    model = module.build()
    state = tmp_path / "m.pt"
    torch.save(model.state_dict(), state)
    pt2 = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (torch.from_numpy(DATA[:2]),)), pt2)
    code, report, err = _scan(cli, [state, "--arch", spec], data, "--max-dead", "1.0")
    assert code == 1, err
    assert report["unseen_activations"] == {"<model>: torch.cond(activation=Relu)": 1}, report
    code, report, err = _scan(cli, [pt2], data, "--max-dead", "1.0", "--trust-pickle", "--limit", "2")
    assert code == 1, err
    assert report["unseen_activations"] == {"<model>: torch.cond(activation=Relu)": 2}, report


RRELU = """
import torch
from torch import nn


class Randomized(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.act = nn.RReLU()

    def forward(self, x):
        return self.act(self.fc(x))


def build():
    torch.manual_seed(7)
    model = Randomized()
    with torch.no_grad():
        model.fc.bias[3] = -40.0
    return model.eval()
"""


def test_rrelu_is_a_leaky_relu_site_in_every_format(cli, tmp_path):
    """nn.RReLU (in eval: a leaky ReLU of slope (lower + upper) / 2) is counted with --ops leaky_relu in
    eager, .pt2, TorchScript and ONNX (a LeakyRelu there). Before: no site in the torch formats."""
    model, spec = arch_file(tmp_path / "rrelu.py", RRELU)
    data = save_npz(tmp_path / "d.npz", x=DATA)
    pre = torch.from_numpy(DATA).double() @ model.fc.weight.double().T + model.fc.bias.double()
    for fmt, args in _formats(tmp_path, model, spec).items():
        code, report, err = _scan(cli, args, data, "--ops", "leaky_relu")
        assert code == 0, (fmt, err)
        [layer] = report["layers"]
        assert layer["op"] == "leaky_relu" and layer["dead_indices"] == _dead(pre) == [3], (fmt, layer)
        assert layer["positive_counts"] == (pre > 0).reshape(-1, 5).sum(dim=0).tolist(), fmt


def test_int8_relus_of_a_quantized_torchscript_are_named(cli, tmp_path):
    """A torch.ao model converted to int8 runs `quantized::linear_relu` (the ReLU inside the kernel) and
    nn.ReLU on a quantized tensor (no float pre-activation): both are named as unseen, and a gate fails.
    Before: the scan failed with 'check that --data fits the model's input' (exit 2)."""
    import torch.ao.nn.intrinsic as nni
    import torch.ao.quantization as tq

    class Quantized(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
            self.block = nni.LinearReLU(torch.nn.Linear(4, 5), torch.nn.ReLU())
            self.fc = torch.nn.Linear(5, 3)
            self.act = torch.nn.ReLU()
            self.qconfig = tq.get_default_qconfig("fbgemm")

        def forward(self, x):
            return self.dequant(self.act(self.fc(self.block(self.quant(x)))))

    torch.manual_seed(8)
    model = Quantized().eval()
    tq.prepare(model, inplace=True)
    model(torch.from_numpy(DATA))
    tq.convert(model, inplace=True)
    path = tmp_path / "int8_ts.pt"
    torch.jit.trace(model, torch.from_numpy(DATA[:2])).save(path)
    data = save_npz(tmp_path / "d.npz", x=DATA)
    code, report, err = _scan(cli, [path], data, "--trust-pickle", "--max-dead", "1.0")
    assert code == 1, err
    assert report["unseen_activations"] == {
        "block: quantized.linear_relu(activation=Relu)": 1,
        "act: activation on a quantized tensor(activation=Relu)": 1,
    }, report


ATEN = """
import torch
from torch import nn


class MyReLU(torch.autograd.Function):  # PyTorch's tutorial ReLU: a clamp inside a custom Function
    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        return grad


class Direct(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        h = self.fc(x)
        return torch.ops.aten.relu(h) + torch.ops.aten.relu.default(h * 2.0) + MyReLU.apply(h - 1.0)


def build():
    torch.manual_seed(9)
    model = Direct()
    with torch.no_grad():
        model.fc.bias[1] = -40.0
    return model.eval()
"""


def test_aten_relu_called_directly_and_custom_function_relu_are_sites(cli, tmp_path):
    """`torch.ops.aten.relu(x)` called as it is, and a ReLU written as a clamp in an autograd.Function,
    are sites in eager as in .pt2. Before: eager had no site at all ("the model ran no relu call")."""
    model, spec = arch_file(tmp_path / "direct.py", ATEN)
    data = save_npz(tmp_path / "d.npz", x=DATA)
    pre = torch.from_numpy(DATA).double() @ model.fc.weight.double().T + model.fc.bias.double()
    truth = [pre, pre * 2.0, pre - 1.0]
    state = tmp_path / "m.pt"
    torch.save(model.state_dict(), state)
    pt2 = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (torch.from_numpy(DATA[:2]),)), pt2)
    for fmt, args in {"eager": [state, "--arch", spec], "pt2": [pt2]}.items():
        code, report, err = _scan(cli, args, data)
        assert code == 0, (fmt, err)
        layers = report["layers"]
        assert len(layers) == 3, (fmt, [layer["name"] for layer in layers])
        for layer, values in zip(layers, truth, strict=True):
            assert layer["dead_indices"] == _dead(values), (fmt, layer["name"])
            assert layer["positive_counts"] == (values > 0).reshape(-1, 5).sum(dim=0).tolist(), fmt


def test_watch_names_an_rnn_relu_and_its_limits_fail_on_it(tmp_path):
    """watch() on a model with nn.RNN(nonlinearity='relu'): each window's report names the kernel's ReLU
    as unseen and a limit fails on it (stop_on_gate), unless allow_unseen=True; the nn.ReLU after it is
    counted. Before: the report had no unseen activations and the limit passed."""
    from deadrelu_cli import watch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.RNN(4, 5, nonlinearity="relu", batch_first=True)
            self.act = torch.nn.ReLU()

        def forward(self, x):
            return self.act(self.rnn(x)[0])

    torch.manual_seed(10)
    model = Net()
    x = torch.from_numpy(DATA)
    for allow, stops in ((False, True), (True, False)):
        w = watch(model, every=1, config=False, max_dead=1.0, stop_on_gate=True, allow_unseen=allow)
        with w:
            for _ in range(2):
                w.step()
                model(x).sum().backward()
        report = w.reports[0]
        assert report.unseen == {"rnn: RNN(activation=Relu)": 1}
        assert [layer.name for layer in report.layers] == ["act"]
        positives = (model.rnn(x)[0] > 0).reshape(-1, 5).sum(dim=0).tolist()
        assert report.layers[0].positive_counts.tolist() == positives
        assert w.should_stop is stops


def test_fix_leaky_patches_the_rnn_cell_steps_of_a_pt2(cli, tmp_path):
    """`fix --strategy leaky` on a .pt2 with nn.RNNCell(relu): the steps' ReLUs the scan counts are the
    ones patched (the written program runs leaky_relu at each step, as computed here). Before: the scan
    saw no site, so there was nothing to fix."""
    model, _ = arch_file(tmp_path / "cells.py", RNN_CELL)
    data = save_npz(tmp_path / "d.npz", x=DATA)
    pt2 = tmp_path / "m.pt2"
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(
        torch.export.export(model, (torch.from_numpy(DATA[:2]),), dynamic_shapes=({0: batch},)), pt2
    )
    out = tmp_path / "fixed.pt2"
    result = cli("fix", pt2, "--data", data, "--strategy", "leaky", "--output", out)
    assert result.code == 0, result.err
    fixed = torch.export.load(str(out)).module()
    x = torch.from_numpy(DATA).double()
    w_ih, w_hh = model.cell.weight_ih.double(), model.cell.weight_hh.double()
    b_ih, b_hh = model.cell.bias_ih.double(), model.cell.bias_hh.double()
    h = torch.zeros(SAMPLES, 5, dtype=torch.float64)
    steps = []
    for t in range(STEPS):
        h = torch.nn.functional.leaky_relu(x[:, t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh, 0.01)
        steps.append(h)
    expected = torch.stack(steps, 1)
    with torch.no_grad():
        got = fixed(torch.from_numpy(DATA)).double()
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
