"""Value-preserving nodes (Identity, inference-mode Dropout, a float Cast) between a producer and its
Relu, or between the Relu and its consumer, change nothing: `fix` patches the same tensors the same
way and `--explain` names the same causes as on the graph without them (paddle2onnx writes
Conv -> Add(bias) -> Identity -> Relu)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx_graphs import stored_tensors

from deadrelu_cli.wiring.onnx import passes_values
from deadrelu_cli.wiring.onnx_index import GraphIndex

BUILDS = {
    "paddle": (lambda p: __import__("onnx_graphs").paddle_conv_bn(passthrough=p), (40, 3, 8, 8)),
    "gemm": (lambda p: __import__("onnx_graphs").gemm_relu(passthrough=p), (60, 4)),
}


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _pair(tmp_path, build):
    make, shape = BUILDS[build]
    paths = {}
    for passing in (False, True):
        paths[passing] = tmp_path / f"{build}_{'pass' if passing else 'plain'}.onnx"
        onnx.save(make(passing), str(paths[passing]))
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    return paths, x


def _dead_units(path, x, relu_names):
    """Dead units of each named Relu, from its input captured with onnxruntime and counted in numpy."""
    from onnx_graphs import relu_inputs_ground_truth

    truth = relu_inputs_ground_truth(onnx.load(str(path)), {"x": x}, dict.fromkeys(relu_names, 1))
    return {name: np.flatnonzero(positives == 0).tolist() for name, (positives, _m, _n) in truth.items()}


@pytest.mark.parametrize(
    "build,strategies",
    [
        ("paddle", ["bias-shift", "reinit", "kick", "prune"]),
        ("gemm", ["bias-shift", "reinit", "kick", "prune"]),
    ],
)
def test_fix_is_the_same_through_value_preserving_nodes(cli, tmp_path, build, strategies):
    paths, x = _pair(tmp_path, build)
    relus = ["relu1", "relu2"] if build == "paddle" else ["relu1"]
    dead = _dead_units(paths[True], x, relus)
    assert dead == _dead_units(paths[False], x, relus) and any(dead.values())
    for strategy in strategies:
        results, outs = {}, {}
        for passing, path in paths.items():
            outs[passing] = tmp_path / f"{build}_{strategy}_{passing}.onnx"
            # kick far enough to revive the planted units (bias -40): fix refuses a kick that revives none
            extra = ("--kick-scale", "200") if strategy == "kick" else ()
            results[passing] = cli(
                "fix", path, "--data", tmp_path / "d.npz", "--strategy", strategy, "--output", outs[passing],
                *extra,
            )  # fmt: skip
        if build == "paddle" and strategy == "prune":  # the graph re-shapes the first bias: skipped on both
            assert "re-shapes its bias" in results[True].out and "re-shapes its bias" in results[False].out
        assert results[True].code == 0, (strategy, results[True].err, results[True].out)
        assert results[False].code == 0, (strategy, results[False].err)
        before, plain, passing = (
            stored_tensors(paths[False]),
            stored_tensors(outs[False]),
            stored_tensors(outs[True]),
        )
        assert set(plain) <= set(passing)
        for name in plain:  # the same tensors patched, to the same values
            assert plain[name].shape == passing[name].shape, (strategy, name)
            np.testing.assert_array_equal(plain[name], passing[name], err_msg=f"{strategy} {name}")
        # and the patched rows are the dead units found with onnxruntime + numpy
        first = "w1" if build == "paddle" else "w"
        if strategy in ("reinit", "kick"):
            changed = np.flatnonzero(
                np.any((passing[first] != before[first]).reshape(len(before[first]), -1), 1)
            )
            assert changed.tolist() == dead["relu1"], strategy
        if strategy == "prune" and build == "paddle":  # the Conv -> BatchNormalization layer narrowed
            assert passing["w2"].shape[0] == passing["shift"].shape[0] == 5 - len(dead["relu2"])
            np.testing.assert_allclose(_run(outs[True], x), _run(paths[True], x), rtol=1e-5, atol=1e-5)
        elif strategy == "prune":
            assert passing["w"].shape[0] == 8 - len(dead["relu1"])
            np.testing.assert_allclose(_run(outs[True], x), _run(paths[True], x), rtol=1e-5, atol=1e-5)
        if strategy == "bias-shift":
            bias = "b1" if build == "paddle" else "b"
            assert np.flatnonzero(passing[bias] != before[bias]).tolist() == dead["relu1"]
            if build == "paddle":
                assert np.flatnonzero(passing["shift"] != before["shift"]).tolist() == dead["relu2"]


@pytest.mark.parametrize("build", ["paddle", "gemm"])
def test_explain_is_the_same_through_value_preserving_nodes(cli, tmp_path, build):
    paths, x = _pair(tmp_path, build)
    causes = {}
    for passing, path in paths.items():
        result = cli("scan", path, "--data", tmp_path / "d.npz", "--explain", "--json", "-")
        assert result.code == 0, result.err
        causes[passing] = [layer["extra"].get("causes") for layer in json.loads(result.out)["layers"]]
    assert causes[True] == causes[False]
    if build == "paddle":  # as planted: b1[1] = -40, the BatchNorm's B[2] = -40
        assert causes[True] == [{"1": "negative bias"}, {"2": "batchnorm shift"}]
    else:  # b = [.., -8, .., -10, .., -15, ..] with weights of norm ~0.6 on data of std 1
        assert causes[True] == [dict.fromkeys(("2", "4", "6"), "negative bias")]


def test_which_nodes_pass_values():
    """Exact only: a narrowing or non-float Cast and a Dropout in training mode are not walked through."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT16, [2])
    nodes = [
        helper.make_node("Cast", ["x"], ["a"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["x"], ["b"], to=TensorProto.DOUBLE),
        helper.make_node("Cast", ["x"], ["c"], to=TensorProto.FLOAT16),
        helper.make_node("Cast", ["x"], ["d"], to=TensorProto.INT32),
        helper.make_node("Cast", ["h"], ["e"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["unknown"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Dropout", ["x", "", "yes"], ["g"]),
        helper.make_node("Dropout", ["x", "", "no"], ["i"]),
        helper.make_node("Dropout", ["x"], ["j"]),
        helper.make_node("Dropout", ["x", "", "unknown"], ["k"]),
        helper.make_node("Identity", ["x"], ["l"]),
        helper.make_node("Relu", ["x"], ["m"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [x, h],
        [],
        initializer=[
            onnx.numpy_helper.from_array(np.array(True), "yes"),
            onnx.numpy_helper.from_array(np.array(False), "no"),
        ],
    )
    index = GraphIndex(graph)
    passing = [node.output[0] for node in nodes if passes_values(index, node)]
    assert passing == ["a", "b", "e", "i", "j", "l"]


def test_a_quantize_after_an_identity_is_still_the_relu(cli, tmp_path):
    """QDQ: a QuantizeLinear with zero point 0 (uint8) clamps at 0 — the folded ReLU — also when an
    Identity sits between the Gemm and it; counted on the dequantized output (onnxruntime + numpy)."""
    rng = np.random.default_rng(1)
    b = np.array([0.2, -30, 0.1, 0.0, -30, 0.3], np.float32)
    inits = [
        onnx.numpy_helper.from_array((rng.standard_normal((4, 6)) * 0.5).astype(np.float32), "w"),
        onnx.numpy_helper.from_array(b, "b"),
        onnx.numpy_helper.from_array(np.array(0.02, np.float32), "s"),
        onnx.numpy_helper.from_array(np.array(0, np.uint8), "z"),
        onnx.numpy_helper.from_array(rng.standard_normal((6, 2)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc"),
        helper.make_node("Identity", ["h"], ["h_id"], name="id"),
        helper.make_node("QuantizeLinear", ["h_id", "s", "z"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"], name="dq"),
        helper.make_node("MatMul", ["dq", "w2"], ["y"], name="out"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "qdq.onnx"))
    x = rng.standard_normal((30, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    exposed = onnx.load(str(tmp_path / "qdq.onnx"))
    exposed.graph.output.append(helper.make_tensor_value_info("dq", TensorProto.FLOAT, None))
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    dq = session.run(["dq"], {"x": x})[0]
    result = cli("scan", tmp_path / "qdq.onnx", "--data", tmp_path / "d.npz", "--json", "-")
    assert result.code == 0, result.err
    (layer,) = json.loads(result.out)["layers"]
    assert layer["implicit"] == "quantize" and layer["weight"] == "w"
    assert layer["positive_counts"] == (dq > 0).sum(axis=0).tolist()
    assert layer["dead_indices"] == np.flatnonzero((dq > 0).sum(axis=0) == 0).tolist() == [1, 4]
