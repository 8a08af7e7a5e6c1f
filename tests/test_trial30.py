"""Deployed ONNX graphs as people ship them (trial30): ReLUs folded into quantizations after any op,
onnxruntime's NHWC layout, fused activations inside If branches, Relu in a transposed layout, and `fix`
through a Keras global max pool (Transpose + ReduceMax).

Ground truth: onnxruntime runs the graph with the tensors that hold each activation added as graph
outputs (the Relu outputs, or the quantized tensors whose zero point is their type's minimum, where
quantization removed the Relu), counted per unit in numpy here.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
from torch import nn

from tests.truth import onnx_relu_io

SPATIAL = 7  # no layer below has 7 units, so a rank-4 tensor's unit axis is the one that is not 7


class _FoldedNet(nn.Module):
    """ReLUs after a BatchNormalization of a concatenation (not foldable into a Conv), after a Mul + Add,
    after a Mul, and after a Conv: 10, 9, 12 and 5 units."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.c3, self.c4 = nn.Conv2d(10, 9, 3, padding=1), nn.Conv2d(9, 12, 1)
        self.c5 = nn.Conv2d(12, 5, 3, padding=1)
        self.fc = nn.Linear(5 * SPATIAL * SPATIAL, 3)

    def forward(self, x):
        a = torch.relu(self.bn(torch.cat([self.c1(x), self.c2(x)], 1)))
        b = torch.relu(self.c3(a) * 0.5 + 0.1)
        c = torch.relu(self.c4(b) * 2.0)
        return self.fc(torch.relu(self.c5(c)).flatten(1))


class _Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray):
        self.batches = iter([{"input": x[i : i + 8]} for i in range(0, len(x), 8)])

    def get_next(self):
        return next(self.batches, None)


def _optimize(src, dst, level) -> None:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    root = tmp_path_factory.mktemp("folded")
    torch.manual_seed(0)
    model = _FoldedNet().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.bias.uniform_(-2, 0.5)  # some BN channels never fire
        model.c5.bias[:2] = -20.0  # two dead conv units
    x = np.random.default_rng(0).standard_normal((24, 3, SPATIAL, SPATIAL)).astype(np.float32)
    torch.onnx.export(
        model,
        torch.from_numpy(x[:1]),
        str(root / "float.onnx"),
        input_names=["input"],
        dynamic_axes={"input": {0: "batch"}},
        dynamo=False,
        opset_version=17,
    )
    np.savez(root / "calib.npz", input=x)
    quantize_static(root / "float.onnx", root / "qdq.onnx", _Reader(x), quant_format=QuantFormat.QDQ)
    quantize_static(root / "float.onnx", root / "qop.onnx", _Reader(x), quant_format=QuantFormat.QOperator)
    # a QDQ graph that keeps its Relus between DequantizeLinear and QuantizeLinear (other quantizers write
    # them so; the quantize before each Relu then clamps at 0 as well), and onnxruntime's extended level,
    # which removes those Relus
    quantize_static(
        root / "float.onnx",
        root / "qdq_kept.onnx",
        _Reader(x),
        quant_format=QuantFormat.QDQ,
        extra_options={"QDQKeepRemovableActivations": True},
    )
    levels = ort.GraphOptimizationLevel
    _optimize(root / "qdq_kept.onnx", root / "qdq_kept.ext.onnx", levels.ORT_ENABLE_EXTENDED)
    # ORT_ENABLE_ALL turns QDQ Convs into com.microsoft QLinearConv(channels_last=1): NHWC tensors
    _optimize(root / "qdq.onnx", root / "qdq.all.onnx", levels.ORT_ENABLE_ALL)
    _optimize(root / "qop.onnx", root / "qop.all.onnx", levels.ORT_ENABLE_ALL)
    return root, x


# where each op keeps its output zero point (ONNX and com.microsoft QOperator ops)
_OUTPUT_ZERO = {
    "QuantizeLinear": 2,
    "QLinearConv": 7,
    "QLinearMatMul": 7,
    "QLinearAdd": 7,
    "QLinearMul": 7,
    "QLinearConcat": 1,
    "QGemm": 8,
}


def _stored(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


LAYERS = (10, 9, 12, 5)  # units of the four ReLUs of _FoldedNet, each at SPATIAL x SPATIAL


def _activation_truth(path, x: np.ndarray, layers: tuple[int, ...] = LAYERS) -> dict[int, list[int]]:
    """{units: per-unit count of positive activations} of the ReLUs (by their unit counts, `layers`) of a
    model such as _FoldedNet in any form of it: the [N, C, 7, 7] (or NHWC) tensor that holds each, either a Relu node's output (> 0) or a
    quantized tensor whose zero point is its type's minimum (quantized value > zero point, i.e.
    dequantized > 0) that is neither the quantization of a Relu's output nor dequantized into a Relu."""
    model = onnx.load(str(path))
    graph = model.graph
    stored = _stored(graph)
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    dequantized = {node.input[0]: node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    zero_of: dict[str, float] = {}
    types: dict[str, int] = {}
    for node in graph.node:
        if node.op_type == "Relu":
            zero_of[node.output[0]], types[node.output[0]] = 0.0, TensorProto.FLOAT
        at = _OUTPUT_ZERO.get(node.op_type)
        if at is None or len(node.input) <= at or node.input[at] not in stored:
            continue
        zero = stored[node.input[at]]
        source = producer.get(node.input[0])
        if zero.dtype.kind in "iu" and np.all(zero == np.iinfo(zero.dtype).min):
            of_relu = node.op_type == "QuantizeLinear" and source is not None and source.op_type == "Relu"
            into_relu = readers.get(dequantized.get(node.output[0]), []) == ["Relu"]  # the Relu kept after
            if not (of_relu or into_relu):
                zero_of[node.output[0]] = float(zero.reshape(-1)[0])
                types[node.output[0]] = helper.np_dtype_to_tensor_dtype(zero.dtype)
    del graph.output[:]
    for name in zero_of:
        graph.output.append(helper.make_tensor_value_info(name, types[name], None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    truth: dict[int, list[int]] = {}
    for name, value in zip(zero_of, session.run(list(zero_of), {"input": x}), strict=True):
        if value.ndim != 4 or value.shape[1:].count(SPATIAL) != 2:
            continue  # a constant, a flattened or pooled tensor: not one of the four layers
        axis = next(a for a in (1, 2, 3) if value.shape[a] != SPATIAL)
        units = value.shape[axis]
        counts = (np.moveaxis(value, axis, -1).reshape(-1, units).astype(np.float64) > zero_of[name]).sum(0)
        assert units in layers and units not in truth, f"{name}: {value.shape}"
        truth[units] = counts.tolist()
    assert sorted(truth) == sorted(layers), sorted(truth)  # the form holds every ReLU
    return truth


def _scan(cli, path, data, *extra) -> dict:
    result = cli("scan", str(path), "--data", str(data), "--json", "-", *extra)
    assert result.code in (0, 1), result.err
    return result.json()


@pytest.mark.parametrize("form", ["qdq", "qop", "qdq_kept", "qdq_kept.ext", "qdq.all", "qop.all"])
def test_every_relu_folded_into_a_quantization_is_counted(cli, folded, form):
    """quantize_static removes a Relu after any op it can re-route (a BatchNormalization, a Mul, …), not
    only after a Conv/Gemm/MatMul/Add; each such layer silently vanished from the report (and a graph
    that kept its Relus after the clamp counted each ReLU twice). ORT_ENABLE_ALL graphs hold NHWC
    tensors (com.microsoft QLinearConv with channels_last): their units are on the last axis, where the
    scan used to read the rows of the image as units."""
    root, x = folded
    report = _scan(cli, root / f"{form}.onnx", root / "calib.npz")
    got = {layer["units"]: layer["positive_counts"] for layer in report["layers"]}
    assert {units: got.get(units) for units in LAYERS} == _activation_truth(root / f"{form}.onnx", x)
    # each once, and besides them at most the logits' quantization (3 units), a real clamp at 0 there
    assert sorted(layer["units"] for layer in report["layers"] if layer["units"] != 3) == sorted(LAYERS)
    assert all(layer["ran"] for layer in report["layers"])


def test_int8_forms_report_the_float_graphs_dead_units(cli, folded):
    """The float export (its Relu nodes, read by onnx_relu_io) and every int8 form name the same dead
    units in each of the four layers, found by their unit counts."""
    root, x = folded
    model = onnx.load(str(root / "float.onnx"))
    relus = [n.name for n in model.graph.node if n.op_type == "Relu"]
    dead = {
        site.post.shape[1]: np.flatnonzero(
            (np.moveaxis(site.post, 1, -1).reshape(-1, site.post.shape[1]) > 0).sum(0) == 0
        ).tolist()
        for site in onnx_relu_io(model, {"input": x}, relus).values()
    }
    assert sorted(dead) == [5, 9, 10, 12] and dead[5] == [0, 1] and dead[10]
    for form in ("float", "qdq", "qop", "qdq.all", "qop.all"):
        report = _scan(cli, root / f"{form}.onnx", root / "calib.npz")
        (root / f"{form}.json").write_text(json.dumps(report))
        found = {layer["units"]: layer["dead_indices"] for layer in report["layers"]}
        assert {units: found.get(units) for units in dead} == dead, form
    # the QDQ layers pair with the float ones: by weight, or (the BatchNorm's ReLU) by the tensor the
    # float Relu wrote, whose name quantize_static gives to the tensor it quantizes
    result = cli("gate", root / "qdq.json", "--baseline", root / "float.json", "--max-increase", "0")
    assert result.code == 0, result.err
    assert "could not be paired" not in result.err and "baseline layer" not in result.err


class _ConcatNet(nn.Module):
    """A ReLU right after a Concat of two Convs (10 units), then a Conv + ReLU (5 units)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)
        self.c3 = nn.Conv2d(10, 5, 1)

    def forward(self, x):
        return torch.relu(self.c3(torch.relu(torch.cat([self.c1(x), self.c2(x)], 1)))).mean((2, 3))


def test_relu_after_a_concat_in_an_nhwc_qoperator_graph(cli, tmp_path):
    """QOperator folds the Relu into com.microsoft QLinearConcat; ORT_ENABLE_ALL makes it an NHWC
    QLinearConcat between channels-last QLinearConvs. The unit axis was taken as 1: 7 "units" (the image
    rows), every count wrong. The walk back now passes the concatenation to the Convs' layout."""
    torch.manual_seed(0)
    model = _ConcatNet().eval()
    with torch.no_grad():
        model.c2.bias[:3] = -30.0
    x = np.random.default_rng(2).standard_normal((16, 3, SPATIAL, SPATIAL)).astype(np.float32)
    torch.onnx.export(
        model,
        torch.from_numpy(x[:1]),
        str(tmp_path / "float.onnx"),
        input_names=["input"],
        dynamic_axes={"input": {0: "batch"}},
        dynamo=False,
        opset_version=13,
    )
    np.savez(tmp_path / "x.npz", input=x)
    quantize_static(
        tmp_path / "float.onnx", tmp_path / "qop.onnx", _Reader(x), quant_format=QuantFormat.QOperator
    )
    _optimize(tmp_path / "qop.onnx", tmp_path / "qop.all.onnx", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    ops = {n.domain + "." + n.op_type for n in onnx.load(str(tmp_path / "qop.all.onnx")).graph.node}
    assert "com.microsoft.QLinearConcat" in ops and "com.microsoft.QLinearConv" in ops, ops
    for form in ("qop", "qop.all"):
        report = _scan(cli, tmp_path / f"{form}.onnx", tmp_path / "x.npz")
        got = {layer["units"]: layer["positive_counts"] for layer in report["layers"]}
        assert got == _activation_truth(tmp_path / f"{form}.onnx", x, (10, 5)), form
        assert report["layers"][0]["dead_indices"] == [4, 5, 6], form


# -- hand-built QDQ graphs: which zero-point clamps are ReLUs ---------------------------------------------


def _q(name: str, source: str, zero: int, scale: float = 0.05) -> list[onnx.NodeProto]:
    """QuantizeLinear (uint8, the given zero point) + DequantizeLinear of `source`; output `name`."""
    return [
        helper.make_node(
            "Constant",
            [],
            [f"{name}_s"],
            value=helper.make_tensor(f"{name}_s", TensorProto.FLOAT, [], [scale]),
        ),
        helper.make_node(
            "Constant",
            [],
            [f"{name}_z"],
            value=helper.make_tensor(f"{name}_z", TensorProto.UINT8, [], [zero]),
        ),
        helper.make_node(
            "QuantizeLinear", [source, f"{name}_s", f"{name}_z"], [f"{name}_q"], name=f"{name}_Q"
        ),
        helper.make_node(
            "DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [name], name=f"{name}_DQ"
        ),
    ]


def test_zero_point_clamps_are_relus_only_where_the_value_can_be_negative(cli, tmp_path):
    """Conv -> Q(zp 0) and Concat(conv, conv) -> Q(zp 0) clamp negative values: ReLUs (the Concat one was
    missed). A Q(zp 0) after a max pool of a ReLU, after a Sigmoid, or of the input scaled by 1/255 clamps
    nothing: no layer (a sign analysis, not a list of producer ops, decides)."""
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((6, 3, 1, 1)).astype(np.float32)
    b1 = np.array([0.5, -40, 0.2, 0.1, -30, 0.3], np.float32)
    w2 = rng.standard_normal((4, 3, 1, 1)).astype(np.float32)
    b2 = np.array([-50, 0.1, 0.2, 0.3], np.float32)
    nodes = [
        helper.make_node("Div", ["input", "k255"], ["scaled"]),
        *_q("xq", "scaled", 0, 1 / 255),  # the input's quantization: not a ReLU
        helper.make_node("Conv", ["xq", "w1", "b1"], ["conv1"], name="conv1"),
        *_q("relu1", "conv1", 0),  # a folded ReLU, 6 units
        helper.make_node("MaxPool", ["relu1"], ["pooled"], kernel_shape=[2, 2], name="pool"),
        *_q("pooledq", "pooled", 0),  # max pool of a ReLU: never negative
        helper.make_node("Conv", ["xq", "w2", "b2"], ["conv2"], name="conv2"),
        helper.make_node("Concat", ["conv1", "conv2"], ["both"], axis=1, name="cat"),
        *_q("relu2", "both", 0),  # a folded ReLU after a Concat, 10 units
        helper.make_node("Sigmoid", ["relu2"], ["gate"], name="sigmoid"),
        *_q("gateq", "gate", 0),  # a Sigmoid: never negative
        helper.make_node("ReduceMean", ["pooledq"], ["m1"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("ReduceMean", ["gateq"], ["m2"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Add", ["m1", "m2"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 3, 6, 6])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None])],
        [
            numpy_helper.from_array(np.array(255, np.float32), "k255"),
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(b1, "b1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(b2, "b2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "clamps.onnx"
    onnx.save(model, path)
    x = (rng.random((16, 3, 6, 6)) * 255).astype(np.float32)
    np.savez(tmp_path / "x.npz", input=x)
    report = _scan(cli, path, tmp_path / "x.npz")
    assert [(layer["name"], layer["units"]) for layer in report["layers"]] == [("conv1", 6), ("both", 10)]
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.extend(
        [helper.make_tensor_value_info(n, TensorProto.UINT8, None) for n in ("relu1_q", "relu2_q")]
    )
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    q1, q2 = session.run(["relu1_q", "relu2_q"], {"input": x})
    for layer, q in zip(report["layers"], (q1, q2), strict=True):
        assert layer["positive_counts"] == (np.moveaxis(q, 1, -1).reshape(-1, q.shape[1]) > 0).sum(0).tolist()
        assert layer["implicit"] == "quantize"
    assert report["layers"][0]["dead_indices"] == [1, 4]
    assert {1, 4, 6} <= set(report["layers"][1]["dead_indices"])


# -- fused activations inside If branches ------------------------------------------------------------------


def _branch(name: str, weight: np.ndarray, bias: np.ndarray) -> onnx.GraphProto:
    """Conv(x, W, b) -> Relu -> ReduceMean, reading the outer graph's x (a 1x1 conv: units = channels)."""
    return helper.make_graph(
        [
            helper.make_node("Conv", ["x", f"{name}_w", f"{name}_b"], [f"{name}_pre"], name=f"{name}_conv"),
            helper.make_node("Relu", [f"{name}_pre"], [f"{name}_act"], name=f"{name}_relu"),
            helper.make_node("ReduceMean", [f"{name}_act"], [f"{name}_out"], axes=[2, 3], keepdims=0),
        ],
        name,
        [],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [None, 6])],
        [numpy_helper.from_array(weight, f"{name}_w"), numpy_helper.from_array(bias, f"{name}_b")],
    )


def test_fused_activations_inside_if_branches_are_scanned(cli, tmp_path):
    """onnxruntime's optimizer fuses Conv+Relu inside If/Loop bodies too (silero-vad's branches, saved at
    ORT_ENABLE_EXTENDED, hold 18 FusedConv): the scan named them 'unseen' and counted none of them. The
    main graph has a fused Conv+Relu as well (its rewrite must not drop the branches' one)."""
    rng = np.random.default_rng(3)
    weights = {b: rng.standard_normal((6, 3, 1, 1)).astype(np.float32) for b in ("then", "else")}
    biases = {b: np.array([0.1, -30, 0.2, -25, 0.3, 0.0], np.float32) for b in ("then", "else")}
    stem_w = rng.standard_normal((3, 3, 1, 1)).astype(np.float32)
    stem_b = np.array([2.0, 0.5, -40.0], np.float32)
    nodes = [
        helper.make_node("Conv", ["x0", "stem_w", "stem_b"], ["stem"], name="stem_conv"),
        helper.make_node("Relu", ["stem"], ["x"], name="stem_relu"),
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["cond"]),
        helper.make_node(
            "If",
            ["cond"],
            ["y"],
            name="branch",
            then_branch=_branch("then", weights["then"], biases["then"]),
            else_branch=_branch("else", weights["else"], biases["else"]),
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [None, 3, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 6])],
        [
            numpy_helper.from_array(np.array(0, np.float32), "zero"),
            numpy_helper.from_array(stem_w, "stem_w"),
            numpy_helper.from_array(stem_b, "stem_b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "float.onnx")
    _optimize(tmp_path / "float.onnx", tmp_path / "opt.onnx", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
    optimized = onnx.load(str(tmp_path / "opt.onnx"))
    in_branches = [n.op_type for a in optimized.graph.node[-1].attribute for n in a.g.node]
    assert "FusedConv" in in_branches and "Relu" not in in_branches, in_branches
    assert [n.op_type for n in optimized.graph.node][0] == "FusedConv"
    x0 = rng.random((12, 3, 5, 5)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x0=x0)
    stem = onnx_relu_io(model, {"x0": x0}, ["stem_relu"])["stem_relu"].post
    x = stem.astype(np.float32)  # what the branch reads; every batch sums > 0: the then branch runs
    stem_counts = (np.moveaxis(stem, 1, -1).reshape(-1, 3) > 0).sum(0).tolist()
    # truth: the then branch as a graph of its own, its Relu output exposed (onnx_relu_io)
    alone = helper.make_model(
        helper.make_graph(
            list(_branch("then", weights["then"], biases["then"]).node),
            "then",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 5, 5])],
            [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [None, 6])],
            [
                numpy_helper.from_array(weights["then"], "then_w"),
                numpy_helper.from_array(biases["then"], "then_b"),
            ],
        ),
        opset_imports=[helper.make_opsetid("", 13)],
    )
    post = onnx_relu_io(alone, {"x": x}, ["then_relu"])["then_relu"].post
    counts = (np.moveaxis(post, 1, -1).reshape(-1, 6) > 0).sum(0).tolist()
    for name in ("float", "opt"):
        result = cli(
            "scan",
            tmp_path / f"{name}.onnx",
            "--data",
            tmp_path / "x.npz",
            "--json",
            "-",
            "--max-dead",
            "0.5",
        )
        assert result.code == 0, result.err  # nothing hidden: the gate decides on the counts
        report = result.json()
        ran = [layer for layer in report["layers"] if layer["ran"]]
        assert [layer["positive_counts"] for layer in ran] == [stem_counts, counts], name
        assert ran[0]["dead_indices"] == [2] and ran[1]["dead_indices"] == [1, 3]
        assert not report.get("unseen_activations"), report.get("unseen_activations")
    assert any("FusedConv" in note for note in report["notes"])  # scanned unfused, and said so


# -- a Relu in a transposed layout ---------------------------------------------------------------------------


def test_relu_between_transposes_counts_units_on_the_moved_axis(cli, tmp_path):
    """Exporters that keep a TensorFlow layout write Conv -> Transpose(NHWC) -> Relu -> Transpose(NCHW) ->
    Conv: the Relu's units are on its last axis. The scan took axis 1 (the image rows) as units."""
    rng = np.random.default_rng(4)
    w1 = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    b1 = np.array([0.2, -40, 0.1, -35, 0.0, 0.3], np.float32)
    w2 = rng.standard_normal((4, 6, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Transpose", ["c1"], ["nhwc"], perm=[0, 2, 3, 1], name="to_nhwc"),
        helper.make_node("Relu", ["nhwc"], ["act"], name="relu"),
        helper.make_node("Transpose", ["act"], ["nchw"], perm=[0, 3, 1, 2], name="to_nchw"),
        helper.make_node("Conv", ["nchw", "w2"], ["y"], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 9, 9])],
        [numpy_helper.from_array(a, n) for n, a in (("w1", w1), ("b1", b1), ("w2", w2))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "t.onnx")
    x = rng.standard_normal((10, 3, 9, 9)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    post = onnx_relu_io(model, {"x": x}, ["relu"])["relu"].post  # [N, 9, 9, 6]
    counts = (post.reshape(-1, 6) > 0).sum(0)
    report = _scan(cli, tmp_path / "t.onnx", tmp_path / "x.npz")
    (layer,) = report["layers"]
    assert layer["units"] == 6 and layer["positive_counts"] == counts.tolist()
    assert layer["dead_indices"] == [1, 3]
    # fix reaches the Conv's rows through the first Transpose and the next Conv's columns through the
    # second (it refused: "not produced by a Conv…"): outputs unchanged, the two units fire again
    out = tmp_path / "fixed.onnx"
    result = cli(
        "fix", tmp_path / "t.onnx", "--data", tmp_path / "x.npz", "--strategy", "reinit", "--output", out
    )
    assert result.code == 0, result.err + result.out
    fixed = onnx.load(str(out))
    before = ort.InferenceSession(str(tmp_path / "t.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )
    after = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(after[0], before[0], rtol=1e-5, atol=1e-5)
    revived = onnx_relu_io(fixed, {"x": x}, ["relu"])["relu"].post.reshape(-1, 6)
    assert (revived[:, [1, 3]] > 0).any(axis=0).all()
    w2_fixed = next(numpy_helper.to_array(t) for t in fixed.graph.initializer if t.name == "w2")
    np.testing.assert_array_equal(w2_fixed[:, [1, 3]], 0)


# -- fix through a Keras global max pool (tf2onnx: Transpose + ReduceMax) -------------------------------------


def _global_max_pool_model(path, reduce_axes: list[int]) -> dict[str, np.ndarray]:
    """Reshape(x, [-1, 3, 8, 6]) -> Conv -> Relu -> Transpose(NHWC) -> ReduceMax(axes) -> MatMul + bias:
    the tail of DNSMOS sig_bak_ovr (a Keras GlobalMaxPooling2D before the dense layer). The Reshape by
    a stored shape is what hid the activation's rank from shape inference there."""
    rng = np.random.default_rng(5)
    arrays = {
        "shape": np.array([-1, 3, 8, 6], np.int64),
        "w": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "b": np.array([0.1, -40, 0.2, 0.3, -45, 0.0, 0.1, 0.2], np.float32),
        "dense": rng.standard_normal((8, 4)).astype(np.float32),
        "dense_b": rng.standard_normal(4).astype(np.float32),
    }
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["image"], name="reshape"),
        helper.make_node("Conv", ["image", "w", "b"], ["pre"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["pre"], ["act"], name="relu"),
        helper.make_node("Transpose", ["act"], ["nhwc"], perm=[0, 2, 3, 1], name="push_transpose"),
        helper.make_node("ReduceMax", ["nhwc"], ["pooled"], axes=reduce_axes, keepdims=0, name="global_max"),
        helper.make_node("MatMul", ["pooled", "dense"], ["mm"], name="dense/MatMul"),
        helper.make_node("Add", ["mm", "dense_b"], ["y"], name="dense/BiasAdd"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 144])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        [numpy_helper.from_array(a, n) for n, a in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    model.ir_version = 7
    onnx.save(model, path)
    return arrays


def _outputs_and_relu(path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    model = onnx.load(str(path))
    site = onnx_relu_io(model, {"x": x}, ["relu"])["relu"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0], site.post


@pytest.mark.parametrize("strategy", ["reinit", "prune"])
def test_fix_follows_transpose_and_reduce_max_to_the_dense_layer(cli, tmp_path, strategy):
    """reinit/prune skipped the last conv ReLU of DNSMOS sig_bak_ovr ("its output does not go to exactly
    one Conv/Gemm/MatMul"): the dense layer reads it through Transpose + ReduceMax over the positions.
    Both keep each unit in its own slot, so the dense rows of the dead units can be zeroed or removed."""
    source = tmp_path / "m.onnx"
    arrays = _global_max_pool_model(source, [1, 2])
    x = np.random.default_rng(6).standard_normal((16, 144)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    before, relu = _outputs_and_relu(source, x)
    assert np.flatnonzero((relu > 0).sum((0, 2, 3)) == 0).tolist() == [1, 4]
    out = tmp_path / f"{strategy}.onnx"
    result = cli("fix", source, "--data", tmp_path / "x.npz", "--strategy", strategy, "--output", out)
    assert result.code == 0, result.err + result.out
    after, relu_after = _outputs_and_relu(out, x)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    fixed = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    if strategy == "reinit":
        assert (relu_after[:, [1, 4]] > 0).any(axis=(0, 2, 3)).all()  # both revived
        np.testing.assert_array_equal(fixed["dense"][[1, 4]], 0)
        np.testing.assert_array_equal(fixed["dense"][[0, 2, 3, 5, 6, 7]], arrays["dense"][[0, 2, 3, 5, 6, 7]])
    else:
        assert fixed["w"].shape[0] == 6 and relu_after.shape[1] == 6
        np.testing.assert_array_equal(fixed["dense"], arrays["dense"][[0, 2, 3, 5, 6, 7]])

    # the same graph reducing over the channel axis (3 after the Transpose) mixes the units: refused
    # (its dense layer then reads the 8 rows of the image; a [N, 8] x [8, 4] MatMul still runs)
    mixed = tmp_path / "mixed.onnx"
    _global_max_pool_model(mixed, [2, 3])
    out = tmp_path / f"mixed_{strategy}.onnx"
    result = cli("fix", mixed, "--data", tmp_path / "x.npz", "--strategy", strategy, "--output", out)
    assert result.code == 2 and not out.exists()
    assert "does not go to exactly one Conv/Gemm/MatMul" in result.out + result.err


def _qlinear_branch(name: str, weight: np.ndarray, bias: np.ndarray) -> onnx.GraphProto:
    """QuantizeLinear(x) -> QLinearConv (1x1, output zero point 0: a folded ReLU) -> QLinearGlobalAveragePool
    -> DequantizeLinear: a QOperator chain whose ReLU output has no DequantizeLinear of its own."""
    scale = 0.05
    wq = np.clip(np.round(weight / scale), -127, 127).astype(np.int8)
    bq = np.round(bias / (0.02 * scale)).astype(np.int32)
    stored = {
        f"{name}_xs": np.array(0.02, np.float32),
        f"{name}_xz": np.array(128, np.uint8),
        f"{name}_w": wq,
        f"{name}_ws": np.array(scale, np.float32),
        f"{name}_wz": np.array(0, np.int8),
        f"{name}_ys": np.array(0.03, np.float32),
        f"{name}_yz": np.array(0, np.uint8),
        f"{name}_b": bq,
        f"{name}_ps": np.array(0.03, np.float32),
        f"{name}_pz": np.array(0, np.uint8),
    }
    n = name
    return helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", f"{n}_xs", f"{n}_xz"], [f"{n}_xq"]),
            helper.make_node(
                "QLinearConv",
                [
                    f"{n}_xq",
                    f"{n}_xs",
                    f"{n}_xz",
                    f"{n}_w",
                    f"{n}_ws",
                    f"{n}_wz",
                    f"{n}_ys",
                    f"{n}_yz",
                    f"{n}_b",
                ],
                [f"{n}_act"],
                name=f"{n}_conv",
            ),
            helper.make_node(
                "QLinearGlobalAveragePool",
                [f"{n}_act", f"{n}_ys", f"{n}_yz", f"{n}_ps", f"{n}_pz"],
                [f"{n}_pooled"],
                domain="com.microsoft",
                channels_last=0,
            ),
            helper.make_node("DequantizeLinear", [f"{n}_pooled", f"{n}_ps", f"{n}_pz"], [f"{n}_out"]),
        ],
        name,
        [],
        [helper.make_tensor_value_info(f"{n}_out", TensorProto.FLOAT, [None, 6, 1, 1])],
        [numpy_helper.from_array(a, k) for k, a in stored.items()],
    )


def test_quantized_relu_inside_an_if_branch_is_counted(cli, tmp_path):
    """A QOperator ReLU (QLinearConv with its output zero point at the minimum) inside an If branch got no
    DequantizeLinear for the statistics (only the main graph got them), so it was silently left out."""
    rng = np.random.default_rng(7)
    weights = {b: rng.standard_normal((6, 3, 1, 1)).astype(np.float32) for b in ("then", "else")}
    bias = np.array([0.1, -3, 0.2, -2.5, 0.3, 0.0], np.float32)
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["cond"]),
        helper.make_node(
            "If",
            ["cond"],
            ["y"],
            name="branch",
            then_branch=_qlinear_branch("then", weights["then"], bias),
            else_branch=_qlinear_branch("else", weights["else"], bias),
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 6, 1, 1])],
        [numpy_helper.from_array(np.array(0, np.float32), "zero")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 8
    onnx.save(model, tmp_path / "q.onnx")
    x = rng.random((12, 3, 5, 5)).astype(np.float32)  # sums > 0: the then branch runs
    np.savez(tmp_path / "x.npz", x=x)
    # truth: the then branch as a graph of its own, the QLinearConv's quantized output exposed
    branch = _qlinear_branch("then", weights["then"], bias)
    alone = helper.make_model(
        helper.make_graph(
            list(branch.node),
            "then",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 5, 5])],
            [helper.make_tensor_value_info("then_act", TensorProto.UINT8, None)],
            list(branch.initializer),
        ),
        opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)],
    )
    session = ort.InferenceSession(alone.SerializeToString(), providers=["CPUExecutionProvider"])
    act = session.run(["then_act"], {"x": x})[0]
    counts = (np.moveaxis(act, 1, -1).reshape(-1, 6) > 0).sum(0).tolist()
    report = _scan(cli, tmp_path / "q.onnx", tmp_path / "x.npz")
    ran = [layer for layer in report["layers"] if layer["ran"]]
    assert [(layer["units"], layer["positive_counts"]) for layer in ran] == [(6, counts)]
    assert ran[0]["implicit"] == "quantize" and 0 in counts
