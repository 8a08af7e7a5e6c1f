"""onnxspell41: ReLUs spelled without a Relu node in ONNX, as exporters write them. torch.maximum(x,
torch.zeros_like(x)) exports as Max(x, ConstantOfShape(Shape(x))) and torch.where(x > 0, x, 0) as
Where(Greater(x, 0), x, 0); tf2onnx / jax2onnx write Where(Less(x, 0), 0, x). Each is the same site with
the same per-unit counts as in the torch formats (tests/test_sites41.py), on the same terms: zeros the graph
makes (not a parameter or buffer of zeros), x from a layer, x not widened.

Truth: the source model's weights in float64 torch ops, or onnxruntime with the activation's input exposed
as a graph output and counted in numpy; never deadrelu. Each test fails on the code before this branch."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from conftest import arch_file, save_npz
from onnx import TensorProto, helper, numpy_helper
from test_sites41 import DATA, SPELLED, _dead, _linear, _positives


def _scan(cli, path, data, *extra) -> list[dict]:
    result = cli("scan", path, "--data", data, "--json", "-", "-q", *extra)
    assert result.code == 0, result.err
    return result.json()["layers"]


def test_torch_onnx_export_of_spelled_relus_counts_the_torch_sites(cli, tmp_path):
    """tests/test_sites41.py's model (maximum with tensor(0.), zeros_like, zeros(C) first, new_zeros(()),
    where(x > 0, x, 0), the maximum of a matmul; none for a variance, a select on another tensor's sign, a
    maximum of two tensors, a maximum with a zero buffer) exported by torch.onnx.export: the six sites, with
    the torch formats' units and per-unit counts, with dynamo=False and dynamo=True (whose optimizer merges
    the code's torch.zeros(5) with the equal zero buffer: the node's fx_node metadata tells them apart).
    Before: four (no zeros_like, no where) plus the buffer."""
    model, _ = arch_file(tmp_path / "spelled.py", SPELLED)
    data = save_npz(tmp_path / "d.npz", x=DATA)
    x = torch.from_numpy(DATA)
    pres, h = [], x
    for layer in (model.fc1, model.fc2, model.fc3, model.fc4, model.fc5):
        pres.append(_linear(h, layer))
        h = pres[-1].clamp(min=0)
    pres.append(h @ model.w.double() - 0.2)
    expected = [(pre.shape[-1], _dead(pre), _positives(pre)) for pre in pres]
    assert any(dead for _, dead, _ in expected) and all(len(d) < u for u, d, _ in expected)
    for dynamo in (False, True):  # the TorchScript-based exporter and torch.export's (onnxscript)
        path = tmp_path / f"m{int(dynamo)}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            options = (
                {"dynamic_shapes": ({0: torch.export.Dim("batch", min=1, max=1024)},)}
                if dynamo
                else {"dynamic_axes": {"x": {0: "batch"}}}
            )
            torch.onnx.export(model, (x[:2],), path, dynamo=dynamo, input_names=["x"], **options)
        kinds = {n.op_type for n in onnx.load(path).graph.node}
        assert {"Where", "Max"} <= kinds and "Relu" not in kinds, dynamo  # the spellings under test
        assert "ConstantOfShape" in kinds or "Expand" in kinds, dynamo  # zeros_like
        layers = _scan(cli, path, data)
        found = [(la["units"], la["dead_indices"], la["positive_counts"]) for la in layers]
        assert found == expected, (dynamo, [(la["name"], la["units"]) for la in layers])
        assert [la["op"] for la in layers] == ["relu"] * 6
        # the first five after their Linear (the matmul with a parameter has none, as in the torch formats)
        assert [la["producer"] is not None for la in layers] == [True] * 5 + [False], dynamo
    # a simplifier (onnxsim) may store the TorchScript-based export's Constant nodes as initializers named
    # after their outputs: still the code's zeros, unlike `floor` (a state_dict key)
    simplified = onnx.load(tmp_path / "m0.onnx")
    constants = [n for n in simplified.graph.node if n.op_type == "Constant"]
    for node in constants:
        simplified.graph.initializer.append(
            numpy_helper.from_array(numpy_helper.to_array(node.attribute[0].t), node.output[0])
        )
        simplified.graph.node.remove(node)
    onnx.save(simplified, tmp_path / "sim.onnx")
    layers = _scan(cli, tmp_path / "sim.onnx", data)
    assert [(la["units"], la["dead_indices"], la["positive_counts"]) for la in layers] == expected
    # prune cannot narrow a layer whose spelled ReLU takes zeros of their own shape (zeros(6), zeros_like(h)
    # of the previous layer's h): refused with the reason, not written broken
    pruned = cli("fix", tmp_path / "m0.onnx", "--data", data, "--strategy", "prune",
                 "--output", tmp_path / "p.onnx")  # fmt: skip
    assert (
        pruned.code != 0 and "/Max_1: skipped: the Max that spells this ReLU takes zeros whose" in pruned.err
    )
    assert not (tmp_path / "p.onnx").exists()


def _graph(signature: str | None = None) -> onnx.ModelProto:
    """x [N, 4] -> Gemm a (6) -> Where(Less(a, 0), 0, a) -> Gemm b (5) -> Where(Greater(0, b)…)
    spelled `Where(LessOrEqual(b, 0), zeros, b)` with zeros = Expand(0, Shape(b)) -> Gemm c (5) ->
    Max(c, floor) with `floor` a zero buffer (per the torch.export signature: no ReLU) -> output.
    Planted dead units: a 1, b 0 and 3."""
    r = np.random.default_rng(41)
    ba, bb = np.zeros(6, np.float32), np.zeros(5, np.float32)
    ba[1], bb[[0, 3]] = -40, -40
    inits = {
        "Wa": r.standard_normal((4, 6)).astype(np.float32),
        "ba": ba,
        "Wb": r.standard_normal((6, 5)).astype(np.float32),
        "bb": bb,
        "Wc": r.standard_normal((5, 5)).astype(np.float32),
        "zero": np.array(0.0, np.float32),
        "floor": np.zeros(5, np.float32),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "Wa", "ba"], ["a"], name="fca"),
        helper.make_node("Less", ["a", "zero"], ["neg"]),
        helper.make_node("Where", ["neg", "zero", "a"], ["ha"], name="relu_a"),
        helper.make_node("Gemm", ["ha", "Wb", "bb"], ["b"], name="fcb"),
        helper.make_node("Shape", ["b"], ["bshape"]),
        helper.make_node("Expand", ["zero", "bshape"], ["bzeros"]),
        helper.make_node("LessOrEqual", ["b", "zero"], ["nonpos"]),
        helper.make_node("Where", ["nonpos", "bzeros", "b"], ["hb"], name="relu_b"),
        helper.make_node("Gemm", ["hb", "Wc"], ["c"], name="fcc"),
        helper.make_node("Max", ["c", "floor"], ["y"], name="floored"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if signature is not None:
        helper.set_metadata_props(graph, {"pkg.torch.export.ExportedProgram.graph_signature": signature})
        model.graph.CopyFrom(graph)
    return model


def _exposed(model: onnx.ModelProto, feeds: dict, names: list[str]) -> list[np.ndarray]:
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    for name in names:
        exposed.graph.output.append(helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(names, feeds)


def _np_dead(pre: np.ndarray) -> list[int]:
    return np.flatnonzero(~(pre > 0).any(0)).tolist()


SIGNATURE = (
    "\n# inputs\np_w: PARAMETER target='Wa'\nb_floor: BUFFER target='floor' persistent=True\nx: USER_INPUT\n"
)


def test_where_spelled_relus_are_sites_and_fix_patches_them(cli, tmp_path):
    """Where(Less(x, 0), 0, x) and Where(x <= 0, Expand(0, Shape(x)), x) after a Gemm are ReLU sites with
    onnxruntime's own per-unit counts; Max(x, floor) with a buffer of zeros (torch.export's signature says
    so) is none. bias-shift revives their units; leaky rewrites them as LeakyRelu(x), which onnxruntime
    runs. Before: no site but the Max with the buffer."""
    model = _graph(SIGNATURE)
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((24, 4)).astype(np.float32)
    data = save_npz(tmp_path / "d.npz", x=x)
    a, b, ha, hb = _exposed(model, {"x": x}, ["a", "b", "ha", "hb"])
    assert np.array_equal(ha, np.maximum(a, 0)) and np.array_equal(hb, np.maximum(b, 0))
    layers = _scan(cli, tmp_path / "m.onnx", data)
    assert [la["name"] for la in layers] == ["relu_a", "relu_b"]
    for layer, pre in zip(layers, (a, b), strict=True):
        assert layer["dead_indices"] == _np_dead(pre) and layer["dead_indices"]
        assert layer["positive_counts"] == (pre > 0).sum(0).tolist()
        assert np.allclose(layer["max_preactivation"], pre.max(0), rtol=1e-6)
        assert np.allclose(layer["sum_abs"], np.maximum(pre, 0).sum(0), rtol=1e-5)
    # --certify bounds both from x in [-1, 1]^4 (interval arithmetic in numpy) through the spelled ReLUs
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    upper_a = weights["ba"] + np.abs(weights["Wa"]).sum(0)
    upper_b = weights["bb"] + (np.clip(weights["Wb"], 0, None) * np.maximum(upper_a, 0)[:, None]).sum(0)
    certified = _scan(cli, tmp_path / "m.onnx", data, "--input-range", "-1", "1")
    for layer, upper in zip(certified, (upper_a, upper_b), strict=True):
        assert np.allclose(layer["upper_bound"], upper, rtol=1e-5), layer["name"]
        assert layer["certified_dead_indices"] == np.flatnonzero(upper <= 0).tolist() != []
    # without the signature (another exporter), a stored zero tensor is a constant: Max(c, floor) counts
    onnx.save(_graph(), tmp_path / "plain.onnx")
    plain = _scan(cli, tmp_path / "plain.onnx", data)
    (c,) = _exposed(_graph(), {"x": x}, ["c"])
    assert [la["name"] for la in plain] == ["relu_a", "relu_b", "floored"]
    assert plain[2]["positive_counts"] == (c > 0).sum(0).tolist()

    shifted = cli("fix", tmp_path / "m.onnx", "--data", data, "--strategy", "bias-shift",
                  "--output", tmp_path / "shift.onnx")  # fmt: skip
    assert shifted.code == 0, shifted.err
    for pre in _exposed(onnx.load(tmp_path / "shift.onnx"), {"x": x}, ["a", "b"]):
        assert _np_dead(pre) == []
    pruned = cli("fix", tmp_path / "m.onnx", "--data", data, "--strategy", "prune",
                 "--output", tmp_path / "prune.onnx")  # fmt: skip
    assert pruned.code == 0, pruned.err
    narrow = onnx.load(tmp_path / "prune.onnx")
    widths = {init.name: list(init.dims) for init in narrow.graph.initializer}
    assert widths["Wa"] == [4, 6 - len(_np_dead(a))] and widths["Wb"][1] == 5 - len(_np_dead(b))
    # dead units output exact zeros: the narrowed model computes what the model did
    outputs = [
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        for m in (model, narrow)
    ]
    assert np.allclose(outputs[0], outputs[1], atol=1e-5)
    leaky = cli("fix", tmp_path / "m.onnx", "--data", data, "--strategy", "leaky",
                "--output", tmp_path / "leaky.onnx")  # fmt: skip
    assert leaky.code == 0, leaky.err
    # the outcome names the node it replaced
    assert "Where → LeakyRelu(0.01)" in leaky.out and "Relu →" not in leaky.out, leaky.out
    fixed = onnx.load(tmp_path / "leaky.onnx")
    onnx.checker.check_model(fixed, full_check=True)
    a2, ha2 = _exposed(fixed, {"x": x}, ["a", "ha"])
    assert np.allclose(ha2, np.where(a2 > 0, a2, 0.01 * a2))
