"""ONNX masking gaps (onnxmask44): an image's pixel mask, frames through a Scan's stacked outputs, and a
graph whose fixed batch equals the sequence length.

The truth: onnxruntime runs the plain graph with the Relus' inputs exposed (truth.onnx_relu_io), and the
test masks them in numpy with cells / frames / positions computed here, from the documented rules."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from conftest import save_npz
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from truth import onnx_relu_io


class Det(nn.Module):
    """A DETR-like detector: two strided convs (k3 s2 p1) over the image, then an encoder FFN over the
    flattened feature map, given the pixel mask interpolated to it (as DETR does)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(44)
        self.stem, self.conv = nn.Conv2d(3, 6, 3, 2, 1), nn.Conv2d(6, 8, 3, 2, 1)
        self.ffn, self.head = nn.Linear(8, 12), nn.Linear(12, 4)
        with torch.no_grad():  # unit 0 of the stem fires on the padding's large values only
            self.stem.weight[0] = 0.3
            self.stem.bias[0] = -40.0

    def forward(self, pixel_values, pixel_mask):
        h = F.relu(self.conv(F.relu(self.stem(pixel_values))))
        mask = F.interpolate(pixel_mask[:, None].float(), size=h.shape[-2:])[:, 0].flatten(1)
        seq = F.relu(self.ffn(h.flatten(2).transpose(1, 2))) * mask[..., None]
        return self.head(seq).sum(1)


def _export(tmp_path, height: int, width: int):
    model = Det().eval()
    x = torch.zeros(2, 3, height, width)
    m = torch.ones(2, height, width, dtype=torch.int64)
    path = tmp_path / "det.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x, m), str(path), input_names=["pixel_values", "pixel_mask"],
            dynamic_axes={"pixel_values": {0: "b"}, "pixel_mask": {0: "b"}}, opset_version=17, dynamo=False,
        )  # fmt: skip
    return onnx.load(path), path


def _cells(mask: np.ndarray, stride: int, grid: tuple[int, int]) -> np.ndarray | None:
    """bool [B, h, w]: cell (i, j) covers the image's pixels [i·s, (i+1)·s) × [j·s, (j+1)·s) (inside the
    image): True where all of them are image; None where a cell holds image and padding both."""
    b, height, width = mask.shape
    out = np.zeros((b, *grid), bool)
    for n in range(b):
        for i in range(grid[0]):
            for j in range(grid[1]):
                block = mask[n, i * stride : (i + 1) * stride, j * stride : (j + 1) * stride]
                if block.any() and not block.all():
                    return None
                out[n, i, j] = block.size > 0 and block.all()
    return out


def _scan(cli, path, data, *extra):
    result = cli("scan", path, "--data", data, "--json", "-", "-q", "--max-dead", "0.99", *extra)
    return result, {layer["name"]: layer for layer in (result.json()["layers"] if result.out else [])}


def test_an_onnx_detector_counts_its_feature_maps_on_image_cells_and_marks_what_it_cannot(cli, tmp_path):
    """Images 18×12 (18 not a multiple of the maps' grids 9×6 and 5×3 after stride 2 and 4: only the
    convs' strides say which pixels a cell is) padded at the bottom / right on a multiple of 4: each
    conv ReLU counts its cells of image only, exactly (onnxruntime + numpy), "applied"; the encoder
    FFN's [B, h·w, F] may be the pixels flattened (in an order nothing says): counted whole, marked
    "pixel positions flattened", the gate fails unless --allow-unseen. Padding ending inside a cell
    (column 7): those maps count every cell, "pixel cells mixed", gated. Before: refused in one line."""
    model, path = _export(tmp_path, 18, 12)
    rs = np.random.RandomState(44)
    x = rs.randn(4, 3, 18, 12).astype(np.float32)
    mask = np.ones((4, 18, 12), dtype=np.int64)
    mask[1, :, 8:] = 0
    mask[2, 12:, :] = 0
    mask[3, 16:, 4:] = 0
    x[mask[:, None].repeat(3, 1) == 0] = 100.0  # padding the stem's unit 0 fires on
    stem, conv, ffn = (n.name for n in model.graph.node if n.op_type == "Relu")
    truth = onnx_relu_io(model, {"pixel_values": x, "pixel_mask": mask}, [stem, conv, ffn])
    cells = {stem: _cells(mask == 1, 2, (9, 6)), conv: _cells(mask == 1, 4, (5, 3))}
    kept = {name: truth[name].pre.transpose(0, 2, 3, 1)[cells[name]] for name in cells}
    assert (kept[stem][:, 0] > 0).sum() == 0 < (truth[stem].pre[:, 0] > 0).sum()  # alive on padding only
    data = save_npz(tmp_path / "d.npz", pixel_values=x, pixel_mask=mask)
    result, layers = _scan(cli, path, data)
    assert result.code == 1, result.err
    assert "(pixel positions flattened)" in result.err, result.err
    for name, pre in kept.items():
        layer = layers[name]
        assert layer["positive_counts"] == (pre > 0).sum(0).tolist(), name
        assert layer["elements_per_unit"] == pre.shape[0], name
        np.testing.assert_allclose(layer["max_preactivation"], pre.max(0), rtol=1e-6, err_msg=name)
        assert layer["extra"]["position_mask"] == "applied", name
    every = truth[ffn].pre.reshape(-1, 12)
    assert layers[ffn]["positive_counts"] == (every > 0).sum(0).tolist()
    assert layers[ffn]["extra"]["position_mask"] == "pixel positions flattened"
    assert _scan(cli, path, data, "--allow-unseen")[0].code == 0
    # padding ending inside a cell of both maps: every cell counted, marked, gated
    mask[1, :, 7:] = 0
    data = save_npz(tmp_path / "d.npz", pixel_values=x, pixel_mask=mask)
    result, layers = _scan(cli, path, data)
    assert result.code == 1 and "pixel cells mixed" in result.err, result.err
    for name in (stem, conv):
        every = truth[name].pre.transpose(0, 2, 3, 1).reshape(-1, truth[name].pre.shape[1])
        assert layers[name]["positive_counts"] == (every > 0).sum(0).tolist(), name
        assert layers[name]["elements_per_unit"] == every.shape[0]
        assert layers[name]["extra"]["position_mask"] == "pixel cells mixed", name
    # every pixel real: nothing to leave out, nothing marked
    data = save_npz(tmp_path / "d.npz", pixel_values=x, pixel_mask=np.ones_like(mask))
    result, layers = _scan(cli, path, data)
    assert result.code == 0, result.err
    assert {la["extra"]["position_mask"] for la in layers.values()} == {"applied"}


def test_fix_bias_shift_of_an_onnx_detector_moves_its_stem_on_the_image_cells(cli, tmp_path):
    """The stem's unit 0 fires on the padding only: the fix sees it dead on the image's cells (as the scan
    counts them) and moves its bias until it fires there; the fixed graph, run by onnxruntime, fires
    on the share of image cells the fix reports. Before: refused in one line."""
    model, path = _export(tmp_path, 16, 12)
    rs = np.random.RandomState(44)
    x = rs.randn(4, 3, 16, 12).astype(np.float32)
    mask = np.ones((4, 16, 12), dtype=np.int64)
    mask[1, :, 8:], mask[2, 12:, :] = 0, 0
    x[mask[:, None].repeat(3, 1) == 0] = 100.0
    data = save_npz(tmp_path / "d.npz", pixel_values=x, pixel_mask=mask)
    out = tmp_path / "fixed.onnx"
    result = cli("fix", path, "--data", data, "-s", "bias-shift", "-o", out, "--json", "-", "-q")
    assert result.code == 0, result.err
    stem = next(n.name for n in model.graph.node if n.op_type == "Relu")
    layer = next(la for la in result.json()["layers"] if la["name"] == stem)
    assert layer["units"] == [0] and layer["dead_after"] == 0
    fixed = onnx.load(out)
    pre = onnx_relu_io(fixed, {"pixel_values": x, "pixel_mask": mask}, [stem])[stem].pre
    cells = _cells(mask == 1, 2, (8, 6))
    real = pre.transpose(0, 2, 3, 1)[cells][:, 0]
    assert (real > 0).sum() > 0
    assert layer["rates_after"][0] == (real > 0).sum() / real.size


FEATURES, C, C2 = 4, 5, 3


def _stepped(path, loop=False, seed=44):
    """x [B, T, F] -> Conv1d (k3 s2 p1) + Relu -> [T2, B, C] -> a Scan (or a Loop over T2 with Gather)
    whose body runs Relu(x_t @ u) per step -> stacked [T2, B, C] -> MatMul + Add + Relu."""
    rs = np.random.RandomState(seed)
    w = rs.randn(C, FEATURES, 3).astype(np.float32) * 0.5
    b = rs.randn(C).astype(np.float32) * 0.1
    u = rs.randn(C, C).astype(np.float32) * 0.5
    w2 = rs.randn(C, C2).astype(np.float32) * 0.5
    b2 = np.array([-3.0, 0.1, 0.0], np.float32)  # unit 0 fires on the padding's large values only
    step = [
        helper.make_node("MatMul", ["x_t", "u"], ["m"]),
        helper.make_node("Relu", ["m"], ["y_t"], name="step_relu"),
    ]
    out_t = helper.make_tensor_value_info("y_t", TensorProto.FLOAT, ["b", C])
    if loop:
        body = helper.make_graph(
            [helper.make_node("Gather", ["ct", "i"], ["x_t"], axis=0), *step,
             helper.make_node("Identity", ["c_in"], ["c_out"])],
            "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                     helper.make_tensor_value_info("c_in", TensorProto.BOOL, [])],
            [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), out_t],
            [numpy_helper.from_array(u, "u")],
        )  # fmt: skip
        run = [
            helper.make_node("Shape", ["ct"], ["ct_shape"]),
            helper.make_node("Gather", ["ct_shape", "zero"], ["trips"], axis=0),
            helper.make_node("Loop", ["trips", "yes"], ["ys"], body=body),
        ]
    else:
        body = helper.make_graph(
            step, "body", [helper.make_tensor_value_info("x_t", TensorProto.FLOAT, ["b", C])], [out_t],
            [numpy_helper.from_array(u, "u")],
        )  # fmt: skip
        run = [helper.make_node("Scan", ["ct"], ["ys"], body=body, num_scan_inputs=1)]
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("Conv", ["xt", "w", "b"], ["c"], kernel_shape=[3], strides=[2], pads=[1, 1]),
        helper.make_node("Relu", ["c"], ["cr"], name="conv_relu"),
        helper.make_node("Transpose", ["cr"], ["ct"], perm=[2, 0, 1]),  # [T2, B, C]
        *run,
        helper.make_node("MatMul", ["ys", "w2"], ["z"]),
        helper.make_node("Add", ["z", "b2"], ["zb"]),
        helper.make_node("Relu", ["zb"], ["out"], name="stacked_relu"),
    ]
    consts = [
        (w, "w"),
        (b, "b"),
        (w2, "w2"),
        (b2, "b2"),
        (np.array(0, np.int64), "zero"),
        (np.array(True), "yes"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", FEATURES])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", "b", C2])],
        [numpy_helper.from_array(a, n) for a, n in consts],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return model, u


def _speech_data(tmp_path):
    lengths = np.array([13, 9, 5, 11, 2, 7])
    x = np.random.RandomState(1).randn(6, 13, FEATURES).astype(np.float32)
    keep = np.arange(13)[None] < lengths[:, None]
    x[~keep] = 9.0  # padding the stacked Relu's unit 0 fires on
    frames = (lengths + 2 - 3) // 2 + 1  # the conv's k3 s2 p1 arithmetic on each real length
    return x, save_npz(tmp_path / "d.npz", x=x, attention_mask=keep.astype(np.int64)), frames


def test_frames_through_a_scans_steps_and_stacked_outputs_count_the_real_frames(cli, tmp_path):
    """A Scan iterating a conv subsampler's frames [T2, B, C]: the Relu in its body (one step's [B, C])
    and the Relu on its stacked outputs [T2, B, C] count the real frames only, exactly (onnxruntime
    exposes the conv's output; the body's step is written out in numpy), "applied". Before: the body's
    site "in a subgraph" (every frame, gated) and the stacked one every frame, "no token axis", a note
    only: its unit 0, alive on padding only, passed as alive."""
    model, u = _stepped(tmp_path / "scan.onnx")
    x, data, frames = _speech_data(tmp_path)
    truth = onnx_relu_io(model, {"x": x}, ["conv_relu", "stacked_relu"])
    steps = truth["conv_relu"].post.transpose(2, 0, 1)  # [T2, B, C], the Scan's input
    real = np.arange(steps.shape[0])[:, None] < frames[None, :]  # [T2, B]
    kept = {"ys/body/step_relu": (steps @ u)[real], "stacked_relu": truth["stacked_relu"].pre[real]}
    assert (kept["stacked_relu"][:, 0] > 0).sum() == 0 < (truth["stacked_relu"].pre[..., 0] > 0).sum()
    result, layers = _scan(cli, tmp_path / "scan.onnx", data, "--batch-size", "4")
    assert result.code == 0, result.err
    for name, pre in kept.items():
        layer = layers[name]
        assert layer["positive_counts"] == (pre > 0).sum(0).tolist(), name
        assert layer["elements_per_unit"] == pre.shape[0], name
        np.testing.assert_allclose(layer["max_preactivation"], pre.max(0), rtol=1e-5, err_msg=name)
        assert layer["extra"]["position_mask"] == "applied", name


def test_a_loops_stacked_outputs_are_marked_and_gated(cli, tmp_path):
    """A Loop over the frames (Gather per iteration, trip count from a Shape): nothing ties its
    iterations to the mask's positions, so the Relu on its stacked outputs counts every frame, is marked
    "in a subgraph" as its body's is, and a gate fails unless --allow-unseen. Before: "no token axis",
    a note only, the padding counted without the gate knowing."""
    model, _ = _stepped(tmp_path / "loop.onnx", loop=True)
    x, data, _ = _speech_data(tmp_path)
    pre = onnx_relu_io(model, {"x": x}, ["stacked_relu"])["stacked_relu"].pre.reshape(-1, C2)
    result, layers = _scan(cli, tmp_path / "loop.onnx", data)
    assert result.code == 1 and "stacked_relu" in result.err, result.err
    assert layers["stacked_relu"]["extra"]["position_mask"] == "in a subgraph"
    assert layers["stacked_relu"]["positive_counts"] == (pre > 0).sum(0).tolist()
    assert _scan(cli, tmp_path / "loop.onnx", data, "--allow-unseen")[0].code == 0


def test_a_square_fixed_batch_is_told_by_a_later_batch_when_the_first_cannot(cli, tmp_path):
    """A graph fixing its batch at the token count (4), time-major at its Relu ([T, B, F] after its own
    Transpose): its shape reads both ways. The first batch is one vector everywhere (reversing its samples
    moves nothing), the second differs: the scan reads the second, finds the samples on axis 1, and
    counts the real tokens exactly (numpy over the kept positions), `applied`, the gate passes. Before:
    decided on the first batch only, every position counted, `layout ambiguous`, the gate failed."""
    from test_layout41 import TOKENS, UNITS, _batch, _fixed_square_graph

    model, w, b = _fixed_square_graph()
    path = tmp_path / "square.onnx"
    onnx.save(model, path)
    x, keep = _batch(np.random.RandomState(6), 12)
    x[:TOKENS] = x[0, 0]  # the first batch tells nothing
    keep[1, 2:], keep[2, 1:] = False, False  # padding in it too
    data = save_npz(tmp_path / "d.npz", x=x, attention_mask=keep.astype(np.int64))
    pre = x.astype(np.float64) @ w + b  # [B, T, F]: positions do not mix
    assert (pre[keep] > 0).sum(0).tolist() != (pre > 0).reshape(-1, UNITS).sum(0).tolist()
    result, layers = _scan(cli, path, data)
    assert result.code == 0, result.err
    (layer,) = layers.values()
    assert layer["positive_counts"] == (pre[keep] > 0).sum(0).tolist()
    assert layer["elements_per_unit"] == int(keep.sum())
    np.testing.assert_allclose(layer["max_preactivation"], pre[keep].max(0), rtol=1e-5)
    assert layer["extra"]["position_mask"] == "applied"


def test_fix_of_a_square_fixed_batch_moves_on_the_real_tokens_of_its_time_major_relu(cli, tmp_path):
    """The same time-major graph, its unit 0 dead (bias -50): bias-shift moves it until it fires on the
    real tokens, read as the scan reads them ([T, B, F], told by reordering a batch whose samples
    differ); the fixed graph, run by onnxruntime, fires on the share of real tokens the fix reports.
    Before: the fix read the square batch as [B, T, F] (other positions than the real tokens)."""
    from onnx import numpy_helper as nh
    from test_layout41 import TOKENS, _batch, _fixed_square_graph

    model, w, b = _fixed_square_graph()
    b = b.copy()
    b[0] = -50.0
    init = next(i for i in model.graph.initializer if i.name == "b")
    init.CopyFrom(nh.from_array(b, "b"))
    path = tmp_path / "square.onnx"
    onnx.save(model, path)
    x, keep = _batch(np.random.RandomState(7), 12)
    x[:TOKENS] = x[0, 0]  # the first batch tells nothing
    x[~keep] = 6.0 * np.sign(w[:, 0])  # padding where unit 0 is far above its real values
    data = save_npz(tmp_path / "d.npz", x=x, attention_mask=keep.astype(np.int64))
    out = tmp_path / "fixed.onnx"
    result = cli("fix", path, "--data", data, "-s", "bias-shift", "-o", out, "--json", "-", "-q")
    assert result.code == 0, result.err
    layer = next(la for la in result.json()["layers"] if la["units"] == [0] or 0 in la["units"])
    fixed_b = next(nh.to_array(i) for i in onnx.load(out).graph.initializer if i.name == "b")
    pre = x.astype(np.float64) @ w + fixed_b  # [B, T, F]: positions do not mix
    real = pre[keep][:, 0]
    assert (real > 0).sum() > 0
    position = layer["units"].index(0)
    assert layer["rates_after"][position] == (real > 0).sum() / real.size
