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
