"""sites37: which call sites are ReLU layers, and what produces them. A clamp of something that holds no
units (a variance kept as [B, T, 1], a 0-d loss) is no layer in any format, while a clamp-spelled ReLU
after a Linear still is; a decomposed nn.Threshold is still a site; a PEFT LoRA layer and a fake-quant
module are looked through to the layer whose units they carry.

Truth is computed here from the weights with plain torch ops in float64 (pre-activations written out),
never from deadrelu; each test fails on the code before this branch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from arch_sources import FAKE_QUANT, lora_source
from conftest import arch_file, save_npz

SAMPLES, STEPS, FEATURES = 10, 3, 4
DATA = np.random.RandomState(3707).randn(SAMPLES, STEPS, FEATURES).astype(np.float32)


def _scan(cli, args, data, *extra) -> dict:
    result = cli("scan", *args, "--data", data, "--json", "-", "-q", *extra)
    assert result.code == 0, result.err
    return result.json()


def _dead(pre: torch.Tensor) -> list[int]:
    """Units (last axis) whose pre-activation never exceeds 0 over every sample and position."""
    flat = pre.detach().double().reshape(-1, pre.shape[-1])
    return [int(i) for i in np.flatnonzero(~(flat > 0).any(dim=0).numpy())]


def _linear(x: np.ndarray, layer: torch.nn.Linear) -> torch.Tensor:
    return torch.nn.functional.linear(
        torch.from_numpy(x).double(), layer.weight.double(), layer.bias.double()
    )


CLAMPED_NORM = """
import torch
from torch import nn


class VarNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(d))

    def forward(self, x):
        var = x.var(-1, keepdim=True, unbiased=False).clamp(min=0)  # [B, T, 1]: no units
        return x / torch.sqrt(var + 1e-5) * self.gain


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.norm = VarNorm(6)
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        h = self.norm(torch.clamp(self.fc(x), min=0.0))
        penalty = (h.mean() - 100.0).clamp(min=0.0)  # a 0-d value: no units (ONNX: a Clip of a scalar)
        value = self.head(h).clamp_min(0.0)  # a one-unit ReLU layer spelled as a clamp: counted
        return value + penalty


def build():
    torch.manual_seed(7)
    model = Net()
    with torch.no_grad():
        model.fc.bias[[0, 3]] = -40.0  # planted dead
        model.head.bias.fill_(-40.0)  # the one-unit head is dead
    return model.eval()
"""


def test_clamp_of_a_variance_or_scalar_is_no_layer_but_a_clamp_after_a_linear_is(cli, tmp_path):
    """`x.var(-1, keepdim=True).clamp(min=0)` inside a custom norm and a 0-d clamp are no ReLU layers in
    eager, .pt2 (as exported and decomposed), TorchScript and ONNX; the clamps after a Linear are, the
    one-unit head included. Before: the variance clamp was a 1-unit layer in every format (a dead unit
    wherever the variance is 0), and ONNX counted the 0-d Clip as a 1-unit layer."""
    model, spec = arch_file(tmp_path / "norm.py", CLAMPED_NORM)
    data = save_npz(tmp_path / "d.npz", x=DATA)
    pre_fc = _linear(DATA, model.fc)
    relu = pre_fc.clamp(min=0)
    var = relu.var(-1, keepdim=True, unbiased=False)
    normed = relu / torch.sqrt(var + 1e-5) * model.norm.gain.double()
    pre_head = torch.nn.functional.linear(normed, model.head.weight.double(), model.head.bias.double())
    assert _dead(pre_fc) == [0, 3] and _dead(pre_head) == [0]
    # the variance is 0 nowhere here, but is exactly 0 on a constant row: a "dead" unit it is not
    assert (var > 0).all()

    example = torch.from_numpy(DATA[:2])
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    torch.export.save(program, tmp_path / "m.pt2")
    torch.export.save(program.run_decompositions(), tmp_path / "m_dec.pt2")
    torch.jit.script(model).save(tmp_path / "m_ts.pt")
    torch.onnx.export(
        model, (example,), tmp_path / "m.onnx", dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "b"}}
    )
    formats = {
        "eager": [tmp_path / "m.pt", "--arch", spec],
        "pt2": [tmp_path / "m.pt2"],
        "pt2 decomposed": [tmp_path / "m_dec.pt2"],
        "torchscript": [tmp_path / "m_ts.pt"],
        "onnx": [tmp_path / "m.onnx"],
    }
    positives = (pre_fc > 0).reshape(-1, 6).sum(dim=0).tolist()
    names = {}
    for fmt, args in formats.items():
        layers = _scan(cli, args, data)["layers"]
        names[fmt] = [layer["name"] for layer in layers]
        assert [(layer["units"], layer["dead_indices"]) for layer in layers] == [(6, [0, 3]), (1, [0])], (
            fmt,
            [(layer["name"], layer["units"]) for layer in layers],
        )
        assert layers[0]["positive_counts"] == positives, fmt
        assert all(layer["elements_per_unit"] == SAMPLES * STEPS for layer in layers), fmt
    # names agree across the torch formats: the 0-d clamp before the head keeps its number (relu()#2) in
    # all of them (TorchScript's code cannot tell it from a layer before it runs)
    assert names["eager"] == names["pt2"] == names["torchscript"] == ["relu()", "relu()#3"], names
    # TorchScript's code has no shapes: `inspect` lists its clamps and says which are decided in a scan
    listed = cli("inspect", tmp_path / "m_ts.pt")
    text = " ".join((listed.out + listed.err).split())
    assert listed.code == 0 and "note: norm.relu(), relu()#2: a clamp no layer feeds" in text, text


def test_inspect_of_an_onnx_graph_lists_no_clip_of_a_scalar(cli, tmp_path):
    """A hand-built ONNX graph: Relu after a Gemm (4 units), and Clip(min=0) of a ReduceMean over
    everything (0-d) and of a ReduceSumSquare kept as [B, 1]. Only the Relu is a layer; onnxruntime's
    own outputs say which units are dead. Before: both Clips were 1-unit layers."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.RandomState(5)
    weight = rng.randn(3, 4).astype(np.float32)
    bias = np.array([0.1, -30.0, 0.2, -30.0], np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["pre"], name="fc"),
        helper.make_node("Relu", ["pre"], ["h"], name="act"),
        helper.make_node("ReduceMean", ["h"], ["m"], name="mean", keepdims=0),
        helper.make_node("Clip", ["m", "zero"], ["loss"], name="clip_scalar"),
        helper.make_node("ReduceSumSquare", ["h"], ["ss"], name="norm", keepdims=1, axes=[1]),
        helper.make_node("Clip", ["ss", "zero"], ["den"], name="clip_norm"),
        helper.make_node("Div", ["h", "den"], ["y"], name="div"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4]),
            helper.make_tensor_value_info("loss", TensorProto.FLOAT, []),
        ],
        [
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(bias, "b"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    x = rng.randn(16, 3).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # truth: the Relu's output from onnxruntime (a graph output added for the test)
    model.graph.output.append(helper.make_tensor_value_info("pre", TensorProto.FLOAT, ["b", 4]))
    probe_path = tmp_path / "probe.onnx"
    onnx.save(model, probe_path)
    pre = ort.InferenceSession(str(probe_path), providers=["CPUExecutionProvider"]).run(["pre"], {"x": x})[0]
    assert session.run(["y"], {"x": x})[0].shape == (16, 4)
    dead = [int(i) for i in np.flatnonzero(~(pre > 0).any(axis=0))]
    assert dead == [1, 3]

    data = save_npz(tmp_path / "d.npz", x=x)
    layers = _scan(cli, [path], data)["layers"]
    assert [(layer["name"], layer["units"], layer["dead_indices"]) for layer in layers] == [("act", 4, dead)]
    listed = cli("inspect", path)
    assert listed.code == 0 and "clip_scalar" not in listed.out and "clip_norm" not in listed.out, listed.out


THRESHOLD = """
import torch
from torch import nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.act = nn.Threshold(0.0, 0.0)
        self.fc2 = nn.Linear(6, 5)

    def forward(self, x):
        return F.threshold(self.fc2(self.act(self.fc(x))), 0.0, 0.0) + F.threshold(x.sum(-1, True), 0.5, 0.5)


def build():
    torch.manual_seed(3)
    model = Net()
    with torch.no_grad():
        model.fc.bias[2] = -40.0
        model.fc2.bias[[1, 4]] = -40.0
    return model.eval()
"""


def test_threshold_of_a_decomposed_program_is_still_a_site(tmp_path, cli):
    """A .pt2 saved after run_decompositions() writes threshold(x, 0, 0) as where(x <= 0, 0, x): before,
    both ReLUs (nn.Threshold and F.threshold) were missing, silently. Now they are the same sites, with
    the same counts, as in the program before the decomposition; threshold(x, 0.5, 0.5) is still none."""
    model, _ = arch_file(tmp_path / "thr.py", THRESHOLD)
    data = save_npz(tmp_path / "d.npz", x=DATA)
    pre1 = _linear(DATA, model.fc)
    pre2 = torch.nn.functional.linear(pre1.clamp(min=0), model.fc2.weight.double(), model.fc2.bias.double())
    example = torch.from_numpy(DATA[:2])
    program = torch.export.export(model, (example,)).run_decompositions()
    assert "threshold" not in str(program.graph)  # the decomposition this test is about
    torch.export.save(program, tmp_path / "dec.pt2")
    layers = _scan(cli, [tmp_path / "dec.pt2"], data, "--batch-size", "2")["layers"]
    assert [(layer["name"], layer["units"], layer["dead_indices"]) for layer in layers] == [
        ("act", 6, _dead(pre1)),
        ("relu()", 5, _dead(pre2)),
    ]
    assert _dead(pre1) == [2] and {1, 4} <= set(_dead(pre2))  # planted (and any others)
    assert layers[1]["positive_counts"] == (pre2 > 0).reshape(-1, 5).sum(dim=0).tolist()
    # the rewrite keeps the program's values
    from deadrelu_cli.probe.hidden import prepare_graph

    module = program.module()
    before = module(torch.from_numpy(DATA[:2]))
    prepare_graph(module)
    assert "threshold" in module.code
    assert torch.equal(module(torch.from_numpy(DATA[:2])), before)


LORA = lora_source(inner=False)


def test_lora_and_fake_quant_are_looked_through_to_the_producer(cli, tmp_path):
    """A LoRA-wrapped Linear (peft) before a ReLU: its base layer makes the units and its bias still adds
    to each; a FakeQuantize between a Linear and its ReLU keeps the Linear's units. Before: no producer
    and no bias in the report, and reinit refused both ("no single Linear/Conv …")."""
    pytest.importorskip("peft", reason="peft is not installed (the test extra installs it)")
    data = save_npz(tmp_path / "d.npz", x=DATA)
    for stem, source, producer in (
        ("lora", LORA, "base_model.model.fc.base_layer"),
        ("fq", FAKE_QUANT, "fc"),
    ):
        model, spec = arch_file(tmp_path / f"{stem}.py", source)
        torch.save(model.state_dict(), tmp_path / f"{stem}.pt")
        layer = model.get_submodule(producer)
        seen = {}
        target = model.get_submodule(producer.rsplit(".", 1)[0] if stem == "lora" else "fq")
        hook = target.register_forward_hook(lambda m, a, out, seen=seen: seen.setdefault("pre", out.detach()))
        with torch.no_grad():
            model(torch.from_numpy(DATA))
        hook.remove()
        dead = _dead(seen["pre"])  # the ReLU's own input, from a plain hook
        assert dead == [2], stem
        (found,) = _scan(cli, [tmp_path / f"{stem}.pt", "--arch", spec], data)["layers"]
        assert found["dead_indices"] == dead, stem
        assert found["producer"] == producer, (stem, found["producer"])
        assert np.allclose(found["bias"], layer.bias.detach().numpy()), stem
        out = tmp_path / f"{stem}_fixed.pt"
        fixed = cli(
            "fix",
            tmp_path / f"{stem}.pt",
            "--arch",
            spec,
            "--data",
            data,
            "--strategy",
            "reinit",
            "--output",
            out,
        )
        assert fixed.code == 0, (stem, fixed.err)
        state = torch.load(out, weights_only=True)
        key = f"{producer}.weight"
        assert not torch.equal(state[key][2], layer.weight.detach()[2]), stem  # the dead unit's row redrawn
        assert torch.equal(state[key][[0, 1, 3, 4, 5]], layer.weight.detach()[[0, 1, 3, 4, 5]]), stem


REPEATED = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(6, 5)

    def forward(self, x):
        h = self.fc(x)
        g = self.fc2(self.act(h) + self.act(h))  # one ReLU module applied twice to one tensor
        return torch.relu(g) * torch.relu(g)  # relu(g) called twice


def build():
    torch.manual_seed(2)
    model = Net()
    with torch.no_grad():
        model.fc.bias[2] = -40.0
        model.fc2.bias[0] = -40.0
    return model.eval()
"""


def test_identical_calls_on_one_tensor_are_two_sites_in_torchscript_as_in_eager(cli, tmp_path):
    """relu(g) twice and one nn.ReLU applied twice to h: eager and .pt2 count each call (act, act#2,
    relu(), relu()#2); TorchScript (scripted or traced) now does too. Before, its optimizer merged the
    identical calls at run time and the scan refused ("ran 2 activations but its code has 4")."""
    model, spec = arch_file(tmp_path / "rep.py", REPEATED)
    data = save_npz(tmp_path / "d.npz", x=DATA)
    pre1 = _linear(DATA, model.fc)
    pre2 = torch.nn.functional.linear(
        2 * pre1.clamp(min=0), model.fc2.weight.double(), model.fc2.bias.double()
    )
    expected = [
        ("act", 6, _dead(pre1)),
        ("act#2", 6, _dead(pre1)),
        ("relu()", 5, _dead(pre2)),
        ("relu()#2", 5, _dead(pre2)),
    ]
    assert 2 in _dead(pre1) and 0 in _dead(pre2)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    example = torch.from_numpy(DATA[:2])
    with torch.no_grad():
        torch.jit.script(model).save(tmp_path / "scripted.pt")
        torch.jit.trace(model, example).save(tmp_path / "traced.pt")
    for args in ([tmp_path / "m.pt", "--arch", spec], [tmp_path / "scripted.pt"], [tmp_path / "traced.pt"]):
        layers = _scan(cli, args, data)["layers"]
        assert [(layer["name"], layer["units"], layer["dead_indices"]) for layer in layers] == expected, args
        assert layers[3]["positive_counts"] == (pre2 > 0).reshape(-1, 5).sum(dim=0).tolist()
