"""mask37: masked positions are not positions, wherever the padding mask comes from.

* A PyTorch encoder fed `src_key_padding_mask` (True = padding, PyTorch's convention) counts its FFN
  ReLU on the real tokens only, batch-first ([B, T, F]) and time-major ([T, B, F]) alike, eager and ONNX.
* ONNX sites the mask cannot reach (If/Loop/Scan bodies) stop a gate instead of passing on padding.
* Label arrays are not fed to a forward() that takes `labels`.

Truth: plain forward hooks on each layer's `linear1` (the FFN's pre-activation) in this file, the ReLU
and the kept positions applied with numpy; never deadrelu's own numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import arch_file, save_npz

SAMPLES, TOKENS, FEATURES, FFN = 6, 5, 4, 16
LENGTHS = np.array([5, 3, 2, 4, 1, 5])

ENCODER = """
import torch
from torch import nn


class Encoder(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        layer = nn.TransformerEncoderLayer(
            8, 2, 16, dropout=0.0, activation="relu", batch_first=batch_first
        )
        # enable_nested_tensor (the default): in eval torch's fast path would drop the padding itself
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=batch_first)
        self.batch_first = batch_first

    def forward(self, src, src_key_padding_mask=None):
        h = self.embed(src)
        if not self.batch_first:
            h = h.transpose(0, 1)  # [T, B, F]
        return self.encoder(h, src_key_padding_mask=src_key_padding_mask)


def _build(batch_first):
    torch.manual_seed(0)
    model = Encoder(batch_first)
    with torch.no_grad():
        for layer in model.encoder.layers:
            layer.linear1.bias[:3] = -3.0
            layer.linear1.weight[9] = 0.0  # unit 9 fires on the padding's junk only
            layer.linear1.bias[9] = -1.0
        model.encoder.layers[0].linear1.weight[9, :] = 0.0
    return model.eval()


def build():
    return _build(True)


def build_time_major():
    return _build(False)
"""


def _encoder(tmp_path, factory: str):
    """(the model `factory` of ENCODER builds, in eval mode; its --arch spec)."""
    model, spec = arch_file(tmp_path / "enc.py", ENCODER)
    if factory != "build":
        import importlib.util

        loader = importlib.util.spec_from_file_location(f"enc_{factory}", tmp_path / "enc.py")
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
        model, spec = getattr(module, factory)(), f"{tmp_path / 'enc.py'}:{factory}"
    return model, spec


def _data(tmp_path, float_mask=False):
    rng = np.random.RandomState(37)
    src = rng.randn(SAMPLES, TOKENS, FEATURES).astype(np.float32)
    pad = np.arange(TOKENS)[None, :] >= LENGTHS[:, None]
    src[pad] = 6.0  # junk at the padded positions: makes units fire there
    mask = np.where(pad, -np.inf, 0.0).astype(np.float32) if float_mask else pad
    return save_npz(tmp_path / "d.npz", src=src, src_key_padding_mask=mask), src, pad


def _truth(model, src, pad, batch_first) -> list[tuple[np.ndarray, int, np.ndarray]]:
    """Per encoder layer: (positive counts, elements per unit, max pre-activation) over the real tokens,
    from hooks on linear1 (the slow path: train mode, dropout 0, computes every position)."""
    captured = []
    hooks = [
        layer.linear1.register_forward_hook(lambda m, a, out: captured.append(out.detach().double().numpy()))
        for layer in model.encoder.layers
    ]
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(src), torch.from_numpy(pad))
    model.eval()
    for hook in hooks:
        hook.remove()
    truths = []
    for pre in captured:
        rows = pre if batch_first else pre.transpose(1, 0, 2)  # [B, T, F]
        kept = np.maximum(rows[~pad], 0.0)  # the ReLU, at the real tokens only
        pre_kept = rows[~pad]
        truths.append(((kept > 0).sum(0), pre_kept.shape[0], pre_kept.max(0)))
    return truths


def _check(report: dict, truths) -> None:
    layers = report["layers"]
    assert len(layers) == len(truths)
    for layer, (positive, elements, max_pre) in zip(layers, truths, strict=True):
        assert layer["positive_counts"] == positive.tolist(), layer["name"]
        assert layer["elements_per_unit"] == elements, layer["name"]
        np.testing.assert_allclose(layer["max_preactivation"], max_pre, rtol=1e-5, atol=1e-6)
        assert layer["dead_indices"] == [int(i) for i in np.flatnonzero(positive == 0)]
        assert layer["extra"]["position_mask"] == "applied"


@pytest.mark.parametrize("factory", ["build", "build_time_major"])
def test_src_key_padding_mask_counts_real_tokens_only(cli, tmp_path, factory):
    """The data's src_key_padding_mask (True = padding) is the position mask, by itself: every FFN
    ReLU counts the real tokens only, batch-first and time-major ([T, B, F]), at any batch size (also
    one of as many samples as tokens, where [T, B, F] and [B, T, F] have one shape).
    Before: every position counted (30 per unit, not 20), unit 9 (firing on padding only) alive, no
    word said; `--mask src_key_padding_mask` counted the padding only, and a [T, B, F] site was
    "not the mask's positions"."""
    model, spec = _encoder(tmp_path, factory)
    state = tmp_path / "m.pt"
    torch.save(model.state_dict(), state)
    data, src, pad = _data(tmp_path)
    truths = _truth(model, src, pad, factory == "build")
    assert truths[1][0][9] == 0  # unit 9 of layer 1 is dead on the real tokens
    for extra in ([], ["--batch-size", "4"], ["--batch-size", "5"], ["--mask", "src_key_padding_mask"]):
        result = cli("scan", state, "--arch", spec, "--data", data, "--json", "-", "-q", *extra)
        assert result.code == 0, result.err
        report = result.json()
        _check(report, truths)
        assert report["mask"]["array"] == "src_key_padding_mask"
        assert report["mask"]["marks"] == "padding"
    # a float mask (-inf at padding, 0 on real tokens, as nn.MultiheadAttention takes it): the same
    float_data, _, _ = _data(tmp_path, float_mask=True)
    result = cli("scan", state, "--arch", spec, "--data", float_data, "--json", "-", "-q")
    assert result.code == 0, result.err
    _check(result.json(), truths)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "time-major"])
def test_onnx_export_with_src_key_padding_mask(cli, tmp_path, batch_first):
    """The same encoder exported to ONNX (the mask a graph input): the mask is applied inside the graph
    at the [B, T, F] and [T, B, F] sites alike, the same numbers as the torch truth."""
    model, _ = _encoder(tmp_path, "build" if batch_first else "build_time_major")
    data, src, pad = _data(tmp_path)
    truths = _truth(model, src, pad, batch_first)
    path = tmp_path / "m.onnx"
    model.train()  # dropout 0: the slow path exports the FFN as MatMul + Relu
    dims = {0: "b", 1: "t"}
    torch.onnx.export(
        model,
        (torch.from_numpy(src[:2]), torch.from_numpy(pad[:2])),
        path,
        dynamo=False,
        input_names=["src", "src_key_padding_mask"],
        dynamic_axes={"src": dims, "src_key_padding_mask": dims},
    )
    result = cli("scan", path, "--data", data, "--json", "-", "-q", "--batch-size", "4")
    assert result.code == 0, result.err
    _check(result.json(), truths)
