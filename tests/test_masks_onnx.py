"""Position masks on ONNX scans: padding is not a position there either. The truth: onnxruntime running
the plain graph with the Relus' inputs and outputs exposed, the mask applied in numpy by the test."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hf_models import BOS, PAD, VOCAB, token_data
from onnx_graphs import token_sites
from truth import onnx_relu_io

from deadrelu_cli import scan

SITES = ("rows_relu", "flat_relu", "conv_relu", "pooled_relu")


def _truth(model, feeds: dict, keep: np.ndarray | None) -> dict[str, tuple]:
    """Per site: (positive counts, elements per unit, max pre-activation, sum of outputs) over the kept
    positions; the pooled head has no token axis: every sample."""
    captured = onnx_relu_io(model, feeds, list(SITES))
    b, t = feeds["input_ids"].shape
    kept = np.ones((b, t), bool) if keep is None else keep.astype(bool)
    out = {}
    for name, site in captured.items():
        if name == "pooled_relu":
            pre, post = site.pre, site.post
        elif name == "conv_relu":  # [B, C, T]
            pre, post = np.moveaxis(site.pre, 1, -1)[kept], np.moveaxis(site.post, 1, -1)[kept]
        else:  # [B, T, C] or [B*T, C]
            pre = site.pre.reshape(b, t, -1)[kept]
            post = site.post.reshape(b, t, -1)[kept]
        out[name] = ((pre > 0).sum(0), pre.shape[0], pre.max(0), np.abs(post).sum(0))
    return out


def _check(report, truth) -> None:
    layers = {layer.name: layer for layer in report.layers}
    assert set(layers) == set(SITES)
    for name, (positive, elements, max_pre, sum_abs) in truth.items():
        layer = layers[name]
        np.testing.assert_array_equal(layer.positive_counts, positive, err_msg=name)
        assert layer.elements_per_unit == elements, name
        np.testing.assert_allclose(layer.max_preactivation, max_pre, rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(layer.sum_abs, sum_abs, rtol=1e-5, err_msg=name)


def _data(tmp_path, side="right", **extra):
    ids, mask = token_data(samples=12, tokens=9, seed=4, side=side)
    path = tmp_path / f"tokens_{side}.npz"
    np.savez(path, input_ids=ids, attention_mask=mask, **extra)
    return path, ids, mask


@pytest.mark.parametrize("mask_input", [True, False], ids=["graph-takes-mask", "graph-without-mask"])
def test_onnx_scan_counts_real_tokens_only(tmp_path, mask_input):
    """Every site whose tensor holds the tokens ([B,T,C], [B*T,C], [B,C,T]) counts the kept positions
    only, exactly; the pooled head counts every sample and a note names it. A graph that takes no
    attention_mask still takes it as the position mask (it was refused: 'match no model input')."""
    model = token_sites(mask_input=mask_input, vocab=len(VOCAB), pad=PAD)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    data, ids, mask = _data(tmp_path)
    feeds = {"input_ids": ids, "attention_mask": mask} if mask_input else {"input_ids": ids}
    truth = _truth(model, feeds, mask)
    for batch_size in (5, 12):  # batch size never changes a count
        report = scan(str(path), str(data), batch_size=batch_size, device="cpu")
        _check(report, truth)
    assert report.mask == {"array": "attention_mask", "exclude_token_ids": []}
    note = next(n for n in report.notes if n.startswith("position mask not applied"))
    assert "pooled_relu" in note and "rows_relu" not in note
    layers = {layer.name: layer for layer in report.layers}
    # the planted unit fires on padding only: dead on real tokens, alive when padding counts
    assert layers["rows_relu"].dead_mask()[0] and layers["rows_relu"].dead_mask()[2]
    unmasked = scan(str(path), str(data), batch_size=5, device="cpu", mask="none")
    _check(unmasked, _truth(model, feeds, None))
    assert not {layer.name: layer for layer in unmasked.layers}["rows_relu"].dead_mask()[0]
    assert not any(n.startswith("position mask") for n in unmasked.notes)


def test_onnx_exclude_token_ids_and_padding_side(tmp_path):
    """--exclude-token-ids drops the BOS positions too; a graph whose positions do not mix (no
    attention) counts the same left- or right-padded."""
    model = token_sites(mask_input=False, vocab=len(VOCAB), pad=PAD)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    reports = []
    for side in ("right", "left"):
        data, ids, mask = _data(tmp_path, side)
        report = scan(str(path), str(data), batch_size=4, device="cpu", exclude_token_ids=(BOS,))
        _check(report, _truth(model, {"input_ids": ids}, (mask != 0) & (ids != BOS)))
        reports.append(report)
    for a, b in zip(*(r.layers for r in reports), strict=True):
        np.testing.assert_array_equal(a.positive_counts, b.positive_counts)
        assert a.elements_per_unit == b.elements_per_unit


def test_onnx_loss_mask_not_a_model_input(cli, tmp_path):
    """--mask NAME on ONNX: another [samples, tokens] array picks the positions (it is not fed)."""
    model = token_sites(mask_input=True, vocab=len(VOCAB), pad=PAD)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    ids, mask = token_data(samples=12, tokens=9, seed=4)
    loss_mask = mask.copy()
    loss_mask[:, 0] = 0  # the first position of every sample is not scored
    data = tmp_path / "d.npz"
    np.savez(data, input_ids=ids, attention_mask=mask, loss_mask=loss_mask)
    result = cli("scan", path, "--data", data, "--mask", "loss_mask", "--json", "-", "--batch-size", "5")
    assert result.code == 0, result.err
    report = result.json()
    truth = _truth(model, {"input_ids": ids, "attention_mask": mask}, loss_mask)
    for layer in report["layers"]:
        positive, elements, _, _ = truth[layer["name"]]
        assert layer["elements_per_unit"] == elements
        assert layer["positive_counts"] == positive.tolist()
    assert report["mask"]["array"] == "loss_mask"


def test_exported_opt_counts_real_tokens(tmp_path):
    """A tiny OPT exported with torch.onnx (input_ids + attention_mask; its FFN runs on [B*T, D]):
    the ONNX scan counts exactly what plain torch hooks count on the real tokens."""
    import warnings

    import torch
    from hf_models import hook_counts, opt_model

    model = opt_model()
    ids, mask = token_data(samples=12, tokens=10)

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    axes = {0: "batch", 1: "tokens"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Logits(model), (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2])), str(tmp_path / "opt.onnx"),
            input_names=["input_ids", "attention_mask"], dynamic_axes={"input_ids": axes, "attention_mask": axes},
            opset_version=17, dynamo=False,
        )  # fmt: skip
    np.savez(tmp_path / "tokens.npz", input_ids=ids, attention_mask=mask)
    truth = hook_counts(model, ids, mask, mask)
    report = scan(str(tmp_path / "opt.onnx"), str(tmp_path / "tokens.npz"), batch_size=5, device="cpu")
    assert len(report.layers) == len(truth) == 2
    for layer, (positive, kept) in zip(report.layers, truth.values(), strict=True):
        np.testing.assert_array_equal(layer.positive_counts, positive)
        assert layer.elements_per_unit == kept == int(mask.sum())
        assert layer.extra["position_mask"] == "applied"


def test_nan_on_padding_only_is_not_seen(tmp_path):
    """NaN activations on padded positions only: masked positions are not positions, so the token
    sites' statistics are those of the real tokens (no NaN max, no NaN sums); the pooled head mixes the
    padding into every sample's value and keeps its NaN."""
    model = token_sites(mask_input=False, vocab=len(VOCAB), pad=PAD, pad_value=float("nan"))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    data, ids, mask = _data(tmp_path)
    truth = _truth(model, {"input_ids": ids}, mask)
    report = scan(str(path), str(data), batch_size=5, device="cpu")
    layers = {layer.name: layer for layer in report.layers}
    for name in ("rows_relu", "flat_relu", "conv_relu"):
        positive, elements, max_pre, sum_abs = truth[name]
        assert np.isfinite(max_pre).all() and np.isfinite(sum_abs).all()
        np.testing.assert_array_equal(layers[name].positive_counts, positive, err_msg=name)
        assert layers[name].elements_per_unit == elements
        np.testing.assert_allclose(layers[name].max_preactivation, max_pre, rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(layers[name].sum_abs, sum_abs, rtol=1e-5, err_msg=name)
    assert np.isnan(layers["pooled_relu"].max_preactivation).any()


def test_sites_in_subgraphs_are_named(tmp_path):
    """A Relu inside an If branch not run on the first batch (the else branch): the mask cannot be
    placed there, so it would count every element, and the note names it apart (not as a site 'whose
    positions are not the mask's'). (Branches that run are masked: test_mask37.)"""
    from onnx_graphs import relu_in_if

    model = relu_in_if()
    path = tmp_path / "if.onnx"
    onnx.save(model, path)
    x = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, flag=np.array(True), attention_mask=np.ones((6, 4), np.int64))
    report = scan(str(path), str(tmp_path / "d.npz"), batch_size=3, device="cpu", consts=("flag",))
    inside = [layer for layer in report.layers if layer.extra.get("position_mask") == "in a subgraph"]
    assert inside and any("inside ONNX subgraphs the mask does not reach" in n for n in report.notes), (
        report.notes
    )


def test_switched_sessions_keep_the_mask(tmp_path, monkeypatch):
    """Once a masked site's units have all fired, the scan rebuilds its session reading the max off the
    Relu's output (_OutputMaxSwitch): the rebuilt graph takes the mask too, and the numbers stay exact."""
    from onnx import numpy_helper
    from test_onnx_output_max import _forced_switch

    model = token_sites(mask_input=False, vocab=len(VOCAB), pad=PAD)
    for init in model.graph.initializer:  # no dead unit: every site becomes eligible for the switch
        if init.name in ("b1", "b2", "b3", "b4"):
            init.CopyFrom(
                numpy_helper.from_array(
                    np.full(numpy_helper.to_array(init).shape, 2.0, np.float32), init.name
                )
            )
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    data, ids, mask = _data(tmp_path)
    switches = _forced_switch(monkeypatch)
    report = scan(str(path), str(data), batch_size=2, device="cpu")
    assert switches and {0, 2} <= switches[-1]  # masked sites (rows, conv) read their max off the output
    _check(report, _truth(model, {"input_ids": ids}, mask))


def test_no_mask_builds_the_unmasked_graph(tmp_path):
    """Without a mask (none in the data, or --mask none) the instrumented graph is the one of before: no
    mask input, no Where, the global-pool path for the [B, C, T] conv site."""
    from deadrelu_cli.backends.onnx.scan import instrumented_bytes
    from deadrelu_cli.loaders.model import LoadOptions
    from deadrelu_cli.loaders.onnx_model import load_onnx
    from deadrelu_cli.probe.onnx_graph import MASK_INPUT, find_sites

    path = tmp_path / "m.onnx"
    onnx.save(token_sites(mask_input=False, vocab=len(VOCAB), pad=PAD), path)
    loaded = load_onnx(LoadOptions(str(path), device="cpu"))
    sites = find_sites(loaded.runnable, ("relu",))
    graph = onnx.load_from_string(instrumented_bytes(loaded, sites, 0.0, None)).graph
    assert MASK_INPUT not in {i.name for i in graph.input}
    assert not [n for n in graph.node if n.op_type == "Where"]
    assert [n for n in graph.node if n.op_type == "GlobalAveragePool"]
