"""ONNX position masks where the old scan counted padding, or gated for nothing (onnxmask43).

The truth: onnxruntime runs the plain graph with the Relus' inputs and outputs exposed (truth.onnx_relu_io),
and the test masks them in numpy; a speech encoder's real frames by the conv arithmetic written out here."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from conftest import save_npz
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from truth import onnx_relu_io

FEATURES, SAMPLES, FRAMES = 4, 6, 17
LENGTHS = np.array([17, 12, 9, 5, 14, 3])  # real input frames per sample


class Subsampler(nn.Module):
    """A speech encoder's shape: features [B, T, F] -> strided Conv1d (k5 s2 p2) + ReLU -> strided Conv1d
    (k3 s2 p1), plus wav2vec2's positional conv (k4 p2, its extra last frame sliced off) -> [B, T2, C] ->
    Linear + ReLU (rows) -> flattened [B*T2, C] rows -> Linear + ReLU."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(43)
        self.c1 = nn.Conv1d(FEATURES, 6, 5, stride=2, padding=2)
        self.c2 = nn.Conv1d(6, 6, 3, stride=2, padding=1)
        self.pos = nn.Conv1d(6, 6, 4, padding=2)
        self.fc = nn.Linear(6, 5)
        self.rows = nn.Linear(5, 4)
        with torch.no_grad():  # unit 0 of the first ReLU fires on the padding's large values only
            self.c1.weight[0] = 0.2
            self.c1.bias[0] = -20.0

    def forward(self, input_features):
        h = torch.relu(self.c1(input_features.transpose(1, 2)))
        h = self.c2(h)
        h = h + self.pos(h)[..., :-1]
        h = torch.relu(self.fc(h.transpose(1, 2)))
        return torch.relu(self.rows(h.reshape(-1, h.shape[-1])))


def _speech(tmp_path):
    model = Subsampler().eval()
    rng = np.random.RandomState(5)
    x = rng.randn(SAMPLES, FRAMES, FEATURES).astype(np.float32) * 0.5
    path = tmp_path / "speech.onnx"
    axes = {0: "batch", 1: "frames"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.from_numpy(x[:2]),), str(path), input_names=["input_features"],
            dynamic_axes={"input_features": axes}, opset_version=17, dynamo=False,
        )  # fmt: skip
    return onnx.load(path), path, x


def _frames(lengths):
    """Real frames after each conv, as Speech2Text's `_get_feat_extract_output_lengths` writes them."""
    first = (lengths + 2 * 2 - 5) // 2 + 1
    return first, (first + 2 * 1 - 3) // 2 + 1


def _relu_nodes(model) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == "Relu"]


@pytest.mark.parametrize("batch_size", [2, 6])
def test_a_conv_subsampled_encoder_counts_its_real_frames(cli, tmp_path, batch_size):
    """Each ReLU after the strided convs ([B, C, T1], [B, T2, C] and [B*T2, C] rows) counts the frames
    the real positions make, exactly (onnxruntime + numpy), `applied`; the gate passes. Before: every
    frame counted (padding included: unit 0, alive on padding only, passed as alive), 'no token axis',
    a note only."""
    model, path, x = _speech(tmp_path)
    keep = np.arange(FRAMES)[None, :] < LENGTHS[:, None]
    x[~keep] = 9.0  # padding the units 0 fire on
    data = save_npz(tmp_path / "d.npz", input_features=x, attention_mask=keep.astype(np.int64))
    c1, c2, rows = _relu_nodes(model)
    truth = onnx_relu_io(model, {"input_features": x}, [c1, c2, rows])
    first, second = _frames(LENGTHS)
    kept = {
        c1: np.moveaxis(truth[c1].pre, 1, -1)[np.arange(truth[c1].pre.shape[2])[None] < first[:, None]],
        c2: truth[c2].pre[np.arange(truth[c2].pre.shape[1])[None] < second[:, None]],
        rows: truth[rows].pre.reshape(SAMPLES, -1, 4)[
            np.arange(truth[c2].pre.shape[1])[None] < second[:, None]
        ],
    }
    args = (
        "scan",
        path,
        "--data",
        data,
        "--json",
        "-",
        "-q",
        "--batch-size",
        batch_size,
        "--max-dead",
        "0.5",
    )
    result = cli(*args)
    assert result.code == 0, result.err
    layers = {layer["name"]: layer for layer in result.json()["layers"]}
    for name, pre in kept.items():
        layer = layers[name]
        assert layer["positive_counts"] == (pre > 0).sum(0).tolist(), name
        assert layer["elements_per_unit"] == pre.shape[0], name
        np.testing.assert_allclose(layer["max_preactivation"], pre.max(0), rtol=1e-6, err_msg=name)
        assert layer["extra"]["position_mask"] == "applied", name
    assert layers[c1]["positive_counts"][0] == 0 < (truth[c1].pre[:, 0] > 0).sum()  # alive on padding only


def test_a_subsampled_encoder_fed_left_padded_features_is_marked_and_gated(cli, tmp_path):
    """Padding first: the frames' real lengths (the convention they rest on) do not say which frames
    are real; the layers after the convs count every frame, say 'frames not told', and a gate fails
    unless --allow-unseen. Before: counted every frame, a note only, the gate passed."""
    model, path, x = _speech(tmp_path)
    keep = np.arange(FRAMES)[None, :] >= (FRAMES - LENGTHS)[:, None]
    data = save_npz(tmp_path / "d.npz", input_features=x, attention_mask=keep.astype(np.int64))
    args = ("scan", path, "--data", data, "--json", "-", "-q", "--max-dead", "1.0")
    gated = cli(*args)
    assert gated.code == 1, gated.err
    assert "pad every sample at its end" in gated.err, gated.err
    report = gated.json()
    c1, c2, rows = _relu_nodes(model)
    truth = onnx_relu_io(model, {"input_features": x}, [c1, c2, rows])
    for layer in report["layers"]:
        pre = truth[layer["name"]].pre
        pre = np.moveaxis(pre, 1, -1) if layer["name"] == c1 else pre
        pre = pre.reshape(-1, pre.shape[-1])  # every frame, as the mark says
        assert layer["extra"]["position_mask"] == "frames not told"
        assert layer["positive_counts"] == (pre > 0).sum(0).tolist()
        assert layer["elements_per_unit"] == pre.shape[0]
    assert any("frames not told" not in n and "conv subsampler" in n for n in report["notes"]), report[
        "notes"
    ]
    assert cli(*args, "--allow-unseen").code == 0


B = T = 4  # a graph whose batch is fixed at the mask's token count
UNITS = 3


def _square_graph():
    rng = np.random.default_rng(43)
    w = rng.standard_normal((2, UNITS)).astype(np.float32)
    b = np.array([0.1, -0.3, 0.2], np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
            helper.make_node("Add", ["m", "b"], ["pre"], name="add"),
            helper.make_node("Relu", ["pre"], ["y"], name="relu"),
        ],
        "square",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, T, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, T, UNITS])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("padded", [False, True], ids=["all-ones", "padded"])
def test_a_square_fixed_batch_of_identical_samples_with_an_all_ones_mask_is_exact(cli, tmp_path, padded):
    """Batch fixed at T, the first batch four identical samples of one vector: reordering cannot tell
    [B, T] from [T, B]. With every mask all ones every position is kept under either reading: exact, `applied`,
    the gate passes (before: 'layout ambiguous', the gate failed for nothing). With padding on a later
    batch and every batch one vector (onnxmask44: a later batch that tells is read) it stays 'layout
    ambiguous' and gated."""
    model = _square_graph()
    path = tmp_path / "sq.onnx"
    onnx.save(model, path)
    rng = np.random.RandomState(1)
    x = rng.randn(8, T, 2).astype(np.float32)
    x[:B] = x[0, 0]  # one vector at every position of the first batch: no reordering tells anything
    keep = np.ones((8, T), bool)
    if padded:
        keep[6, 2:] = False
        x[:] = x[0, 0]  # nor on any later batch
    data = save_npz(tmp_path / "d.npz", x=x, attention_mask=keep.astype(np.int64))
    pre = onnx_relu_io(model, {"x": x[:B]}, ["relu"])["relu"].pre, onnx_relu_io(model, {"x": x[B:]}, ["relu"])
    pre = np.concatenate([pre[0], pre[1]["relu"].pre]).reshape(-1, UNITS)  # every position
    args = ("scan", path, "--data", data, "--json", "-", "-q", "--max-dead", "1.0")
    result = cli(*args)
    (layer,) = result.json()["layers"]
    assert layer["positive_counts"] == (pre > 0).sum(0).tolist()
    assert layer["elements_per_unit"] == 8 * T
    if padded:
        assert result.code == 1 and layer["extra"]["position_mask"] == "layout ambiguous", result.err
    else:
        assert result.code == 0, result.err
        assert layer["extra"]["position_mask"] == "applied"


def _reverse_scan():
    """x [B, T, 2] scanned on axis 1 (the tokens) last token first, a running sum as its state: the body's
    Relu sees one token's [B, 3] per step, h_t = Relu(x_t @ W + b + 0.1 * s_t), s_t the sum of the later
    tokens' x_t @ W (a backward RNN's shape)."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((2, UNITS)).astype(np.float32)
    w[:, 0] = 1.0
    b = np.array([-9.0, -0.4, 0.0], np.float32)  # unit 0: fires on the padding's 5.0 only
    f32 = TensorProto.FLOAT
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["x_t", "w"], ["xw"], name="step_mm"),
            helper.make_node("Add", ["s_in", "xw"], ["s_out"], name="step_state"),
            helper.make_node("Mul", ["s_in", "tenth"], ["carry"], name="step_carry"),
            helper.make_node("Add", ["xw", "carry"], ["xc"], name="step_add"),
            helper.make_node("Add", ["xc", "b"], ["pre"], name="step_bias"),
            helper.make_node("Relu", ["pre"], ["y_t"], name="step_relu"),
        ],
        "body",
        [helper.make_tensor_value_info("s_in", f32, [None, UNITS]), helper.make_tensor_value_info("x_t", f32, [None, 2])],
        [helper.make_tensor_value_info("s_out", f32, [None, UNITS]), helper.make_tensor_value_info("y_t", f32, [None, UNITS])],
        initializer=[numpy_helper.from_array(np.float32(0.1), "tenth")],
    )  # fmt: skip
    graph = helper.make_graph(
        [
            helper.make_node("Shape", ["x"], ["xshape"], name="shape"),
            helper.make_node("Slice", ["xshape", "zero", "one"], ["batch"], name="batch"),
            helper.make_node("Concat", ["batch", "units"], ["sshape"], name="sshape", axis=0),
            helper.make_node("ConstantOfShape", ["sshape"], ["s0"], name="s0", value=numpy_helper.from_array(np.zeros(1, np.float32))),
            helper.make_node(
                "Scan", ["s0", "x"], ["s_last", "ys"], name="scan", body=body, num_scan_inputs=1,
                scan_input_axes=[1], scan_input_directions=[1], scan_output_axes=[1], scan_output_directions=[1],
            ),
        ],
        "reverse_scan",
        [helper.make_tensor_value_info("x", f32, ["B", "T", 2])],
        [helper.make_tensor_value_info("ys", f32, ["B", "T", UNITS])],
        initializer=[
            numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"),
            numpy_helper.from_array(np.array([0], np.int64), "zero"), numpy_helper.from_array(np.array([1], np.int64), "one"),
            numpy_helper.from_array(np.array([UNITS], np.int64), "units"),
        ],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), w, b


def test_a_scan_over_the_tokens_in_reverse_counts_the_real_tokens(cli, tmp_path):
    """A Scan that iterates the tokens (axis 1 of [B, T, F]) last first: its body's Relu counts each
    step's kept samples only (the mask's column of that step, scanned the same way), exactly as numpy
    over the kept tokens; `applied`, the gate passes. Before: every position counted, 'in a subgraph',
    the gate failed."""
    model, w, b = _reverse_scan()
    path = tmp_path / "scan.onnx"
    onnx.save(model, path)
    rng = np.random.RandomState(2)
    lengths = np.array([5, 2, 4, 1, 3, 5, 2])
    x = rng.randn(len(lengths), 5, 2).astype(np.float32)
    keep = np.arange(5)[None, :] < lengths[:, None]
    x[~keep] = 5.0
    data = save_npz(tmp_path / "d.npz", x=x, attention_mask=keep.astype(np.int64))
    xw = x.astype(np.float64) @ w
    later = np.cumsum(xw[:, ::-1], axis=1)[:, ::-1] - xw  # the state at step t: the later tokens' sum
    pre = (xw + 0.1 * later + b)[keep]
    assert (xw + 0.1 * later + b)[~keep].max(0)[0] > 0 >= pre.max(0)[0]  # unit 0 fires on padding only
    result = cli("scan", path, "--data", data, "--json", "-", "-q", "--batch-size", "3", "--max-dead", "0.5")
    assert result.code == 0, result.err
    (layer,) = result.json()["layers"]
    assert layer["positive_counts"] == (pre > 0).sum(0).tolist()
    assert layer["elements_per_unit"] == int(keep.sum())
    np.testing.assert_allclose(layer["max_preactivation"], pre.max(0), rtol=1e-5)
    assert layer["extra"]["position_mask"] == "applied"
    assert 0 in layer["dead_indices"]


def test_a_scan_body_under_an_all_ones_mask_is_exact(cli, tmp_path):
    """No padding anywhere: a Scan over the samples (not masked per step) counted every position,
    which are all kept: `applied`, the gate passes. Before: 'in a subgraph', the gate failed."""
    from test_mask37 import SAMPLES, TOKENS, _subgraph_tokens

    model, (*_, ws, bs) = _subgraph_tokens(scan_over_samples=True)
    path = tmp_path / "sub.onnx"
    onnx.save(model, path)
    x = np.random.RandomState(3).randn(SAMPLES, TOKENS, 4).astype(np.float32)
    data = save_npz(
        tmp_path / "d.npz", x=x, flag=np.array(True), attention_mask=np.ones((SAMPLES, TOKENS), np.int64)
    )
    result = cli("scan", path, "--data", data, "--const", "flag", "--json", "-", "-q", "--max-dead", "1.0")
    assert result.code == 0, result.err
    scan = {layer["name"]: layer for layer in result.json()["layers"]}["scan/body/scan_relu"]
    pre = (x.astype(np.float64) @ ws + bs).reshape(-1, 3)
    assert scan["positive_counts"] == (pre > 0).sum(0).tolist()
    assert scan["elements_per_unit"] == SAMPLES * TOKENS
    assert scan["extra"]["position_mask"] == "applied"


class Conv2dSubsampler(nn.Module):
    """A Conformer's front end: features [B, T, F] as one channel -> two Conv2d (k3 s2, no padding) +
    ReLU over (frames, features) -> [B, T2, C*F2] -> Linear + ReLU."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.c1 = nn.Conv2d(1, 3, 3, stride=2)
        self.c2 = nn.Conv2d(3, 3, 3, stride=2)
        self.fc = nn.Linear(3, 5)

    def forward(self, input_features):
        h = torch.relu(self.c2(torch.relu(self.c1(input_features.unsqueeze(1)))))
        return torch.relu(self.fc(h.permute(0, 2, 1, 3).flatten(2)))


def test_a_conv2d_subsampled_encoder_counts_its_real_frames(cli, tmp_path):
    """After a Conv2d subsampler over (frames, features), the convs' own ReLUs [B, C, T', F'] and the
    feed-forward's [B, T2, C] count the real frames (the frames axis's conv arithmetic), exactly,
    `applied`. Before: every frame, 'no token axis', a note only."""
    model = Conv2dSubsampler().eval()
    lengths = np.array([23, 15, 9, 20, 7])
    x = np.random.RandomState(8).randn(len(lengths), 23, 9).astype(np.float32)
    keep = np.arange(23)[None, :] < lengths[:, None]
    x[~keep] = 4.0
    path = tmp_path / "conformer.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.from_numpy(x[:2]),), str(path), input_names=["input_features"],
            dynamic_axes={"input_features": {0: "batch", 1: "frames"}}, opset_version=17, dynamo=False,
        )  # fmt: skip
    data = save_npz(tmp_path / "d.npz", input_features=x, attention_mask=keep.astype(np.int64))
    graph = onnx.load(path)
    names = _relu_nodes(graph)
    truth = onnx_relu_io(graph, {"input_features": x}, names)
    first = (lengths - 3) // 2 + 1
    real = {names[0]: first, names[1]: (first - 3) // 2 + 1, names[2]: (first - 3) // 2 + 1}
    result = cli("scan", path, "--data", data, "--json", "-", "-q", "--batch-size", "2")
    assert result.code == 0, result.err
    layers = {layer["name"]: layer for layer in result.json()["layers"]}
    for name, frames in real.items():
        pre = truth[name].pre
        if pre.ndim == 4:  # a conv's own [B, C, T', F']: units on axis 1
            pre = np.moveaxis(pre, 1, -1)
        pre = pre[np.arange(pre.shape[1])[None, :] < frames[:, None]].reshape(-1, pre.shape[-1])
        assert layers[name]["positive_counts"] == (pre > 0).sum(0).tolist(), name
        assert layers[name]["elements_per_unit"] == pre.shape[0], name
        np.testing.assert_allclose(layers[name]["max_preactivation"], pre.max(0), rtol=1e-6, err_msg=name)
        assert layers[name]["extra"]["position_mask"] == "applied", name


def test_fix_bias_shift_of_a_subsampled_encoder_moves_on_the_real_frames(cli, tmp_path):
    """`fix --strategy bias-shift` on the conv-subsampled encoder: unit 0 of the first ReLU is dead on the
    real frames (alive on padding only); the shift is computed on the real frames as the scan counts
    them, so the written model's unit fires on --target-rate of the real frames (onnxruntime + numpy).
    Before: the scan saw no dead unit there (padding counted), nothing was moved."""
    model, path, x = _speech(tmp_path)
    keep = np.arange(FRAMES)[None, :] < LENGTHS[:, None]
    x[~keep] = 9.0
    data = save_npz(tmp_path / "d.npz", input_features=x, attention_mask=keep.astype(np.int64))
    c1 = _relu_nodes(model)[0]
    out = tmp_path / "fixed.onnx"
    result = cli(
        "fix", path, "--data", data, "--strategy", "bias-shift", "--target-rate", "0.25", "--output", out
    )
    assert result.code == 0, result.err
    pre = onnx_relu_io(onnx.load(out), {"input_features": x}, [c1])[c1].pre
    real = np.arange(pre.shape[2])[None, :] < _frames(LENGTHS)[0][:, None]
    rate = (pre[:, 0][real] > 0).mean()
    assert 0.15 <= rate <= 0.35, rate


def test_frames_reach_an_if_branch(cli, tmp_path):
    """The subsampled frames [B, T2, C] feed an If whose branch holds the feed-forward's Relu (an export
    that keeps a data-dependent branch): the branch sees the main graph's frames' mask and counts the
    real frames, exactly (numpy). Before: 'no token axis', every frame, a note only."""
    f32 = TensorProto.FLOAT
    rng = np.random.default_rng(43)
    conv = (rng.standard_normal((4, FEATURES, 5)) * 0.4).astype(np.float32)
    w = (rng.standard_normal((4, UNITS)) * 0.5).astype(np.float32)

    def branch(name, scale):
        return helper.make_graph(
            [
                helper.make_node("MatMul", ["frames", "w"], [f"{name}_m"], name=f"{name}_mm"),
                helper.make_node("Mul", [f"{name}_m", f"{name}_k"], [f"{name}_pre"], name=f"{name}_mul"),
                helper.make_node("Relu", [f"{name}_pre"], [f"{name}_out"], name=f"{name}_relu"),
            ],
            name, [], [helper.make_tensor_value_info(f"{name}_out", f32, ["B", "T2", UNITS])],
            initializer=[numpy_helper.from_array(np.float32(scale), f"{name}_k")],
        )  # fmt: skip

    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["x"], ["xc"], perm=[0, 2, 1]),
            helper.make_node("Conv", ["xc", "conv"], ["c"], name="conv", strides=[2], pads=[2, 2]),
            helper.make_node("Transpose", ["c"], ["frames"], perm=[0, 2, 1]),
            helper.make_node("If", ["flag"], ["y"], name="gate", then_branch=branch("then", 1.0), else_branch=branch("else", -1.0)),
        ],
        "if_frames",
        [helper.make_tensor_value_info("x", f32, ["B", "T", FEATURES]), helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", f32, ["B", "T2", UNITS])],
        initializer=[numpy_helper.from_array(conv, "conv"), numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    path = tmp_path / "if.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = np.random.RandomState(6).randn(SAMPLES, FRAMES, FEATURES).astype(np.float32)
    keep = np.arange(FRAMES)[None, :] < LENGTHS[:, None]
    x[~keep] = 5.0
    data = save_npz(tmp_path / "d.npz", x=x, flag=np.array(True), attention_mask=keep.astype(np.int64))
    padded = np.pad(x.astype(np.float64), ((0, 0), (2, 2), (0, 0)))
    t2 = (FRAMES + 4 - 5) // 2 + 1
    frames = np.stack([np.einsum("bkf,ofk->bo", padded[:, 2 * t : 2 * t + 5], conv) for t in range(t2)], 1)
    pre = (frames @ w)[np.arange(t2)[None, :] < _frames(LENGTHS)[0][:, None]]
    result = cli("scan", path, "--data", data, "--const", "flag", "--json", "-", "-q", "--batch-size", "4")
    assert result.code == 0, result.err
    layer = {layer["name"]: layer for layer in result.json()["layers"]}["gate/then_branch/then_relu"]
    assert layer["positive_counts"] == (pre > 0).sum(0).tolist()
    assert layer["elements_per_unit"] == pre.shape[0]
    assert layer["extra"]["position_mask"] == "applied"


def test_fix_compares_a_subsampled_encoders_outputs_on_the_real_frames(cli, tmp_path):
    """`fix --strategy leaky` on the conv-subsampled encoder: its output rows [B*T2, 4] are frames, so
    the reported max |Δ| is taken over the real frames' rows only (onnxruntime on both models + numpy).
    Before: over every frame's rows, padding included, with no note."""
    import onnxruntime as ort

    model, path, x = _speech(tmp_path)
    keep = np.arange(FRAMES)[None, :] < LENGTHS[:, None]
    x[~keep] = 9.0
    data = save_npz(tmp_path / "d.npz", input_features=x, attention_mask=keep.astype(np.int64))
    out, report = tmp_path / "leaky.onnx", tmp_path / "fix.json"
    result = cli("fix", path, "--data", data, "--strategy", "leaky", "--output", out, "--json", report)
    assert result.code == 0, result.err

    def rows(file):
        session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
        return session.run(None, {"input_features": x})[0].astype(np.float64).reshape(SAMPLES, -1, 4)

    change = np.abs(rows(out) - rows(path))
    real = np.arange(change.shape[1])[None, :] < _frames(LENGTHS)[1][:, None]
    assert change[real].max() < change.max()  # the padded frames' rows change more: they would decide it
    fixed = json.loads(report.read_text())
    np.testing.assert_allclose(fixed["max_abs_diff"], change[real].max(), rtol=1e-5)
