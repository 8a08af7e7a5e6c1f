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


def _subgraph_tokens(scan_over_samples: bool = False):
    """x[B, T, 4] through three subgraphs: an If on `flag` (then: Relu(x @ Wa + ba) [B, T, 5], else: the
    same negated), a Loop of 2 trips h <- Relu(h @ Wl + bl) on [B, T, 4], and a Scan over the tokens
    (x transposed to [T, B, 4]) whose body's Relu sees one token's [B, 3] per step (`scan_over_samples`:
    over the samples of x instead, one sample's [T, 3] per step). Unit 0 of the If's and the Loop's Relu
    fire on the padding's junk only (their inputs summed, less 20)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    f32 = TensorProto.FLOAT
    rng = np.random.default_rng(37)
    wa = (rng.standard_normal((4, 5)) * 0.5).astype(np.float32)
    wa[:, 0] = 1.0
    ba = np.array([-20, 0, -50, 0.1, 0], np.float32)
    wl = (rng.standard_normal((4, 4)) * 0.5).astype(np.float32)
    wl[:, 0] = 1.0
    bl = np.array([-20, 0.1, -40, 0], np.float32)
    ws = (rng.standard_normal((4, 3)) * 0.5).astype(np.float32)
    bs = np.array([0.1, -30, 0], np.float32)

    def branch(name, scale):
        return helper.make_graph(
            [
                helper.make_node("MatMul", ["x", "wa"], [f"{name}_m"], name=f"{name}_mm"),
                helper.make_node("Add", [f"{name}_m", "ba"], [f"{name}_h"], name=f"{name}_add"),
                helper.make_node("Mul", [f"{name}_h", f"{name}_scale"], [f"{name}_hs"], name=f"{name}_mul"),
                helper.make_node("Relu", [f"{name}_hs"], [f"{name}_out"], name=f"{name}_relu"),
            ],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_out", f32, ["B", "T", 5])],
            initializer=[numpy_helper.from_array(np.float32(scale), f"{name}_scale")],
        )

    loop_body = helper.make_graph(
        [
            helper.make_node("MatMul", ["h_in", "wl"], ["lm"], name="loop_mm"),
            helper.make_node("Add", ["lm", "bl"], ["lpre"], name="loop_add"),
            helper.make_node("Relu", ["lpre"], ["h_out"], name="loop_relu"),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="loop_cond"),
        ],
        "loop_body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", f32, ["B", "T", 4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", f32, ["B", "T", 4]),
        ],
    )
    scan_body = helper.make_graph(
        [
            helper.make_node("MatMul", ["x_t", "ws"], ["sm"], name="scan_mm"),
            helper.make_node("Add", ["sm", "bs"], ["spre"], name="scan_add"),
            helper.make_node("Relu", ["spre"], ["y_t"], name="scan_relu"),
            helper.make_node("Identity", ["s_in"], ["s_out"], name="scan_state"),
        ],
        "scan_body",
        [
            helper.make_tensor_value_info("s_in", f32, [1]),
            helper.make_tensor_value_info("x_t", f32, [None, 4]),
        ],
        [
            helper.make_tensor_value_info("s_out", f32, [1]),
            helper.make_tensor_value_info("y_t", f32, [None, 3]),
        ],
    )
    nodes = [
        helper.make_node(
            "If",
            ["flag"],
            ["y_if"],
            name="gate",
            then_branch=branch("then", 1.0),
            else_branch=branch("else", -1.0),
        ),
        helper.make_node("Loop", ["trips", "", "x"], ["y_loop"], name="loop", body=loop_body),
        helper.make_node(
            "Transpose", ["x"], ["xt"], name="to_tbf", perm=[0, 1, 2] if scan_over_samples else [1, 0, 2]
        ),
        helper.make_node(
            "Scan", ["s0", "xt"], ["s_last", "y_scan"], name="scan", body=scan_body, num_scan_inputs=1
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "subgraph_tokens",
        [
            helper.make_tensor_value_info("x", f32, ["B", "T", 4]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info("y_if", f32, ["B", "T", 5]),
            helper.make_tensor_value_info("y_loop", f32, ["B", "T", 4]),
            helper.make_tensor_value_info("y_scan", f32, [None, None, 3]),
        ],
        initializer=[
            numpy_helper.from_array(a, n)
            for n, a in (
                ("wa", wa), ("ba", ba), ("wl", wl), ("bl", bl), ("ws", ws), ("bs", bs),
                ("trips", np.array(2, np.int64)), ("s0", np.zeros((1,), np.float32)),
            )
        ],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, (wa, ba, wl, bl, ws, bs)


def test_onnx_if_loop_and_scan_bodies_are_masked(cli, tmp_path):
    """The mask reaches If branches and Loop bodies that see the batch's [B, T, ...] tensors (an outer-scope
    input of the body): their Relus count the real tokens only, exactly. A Scan over the tokens sees one
    token's [B, ...] per step: the mask's column of that step reaches it as a scan input the scan adds
    (onnxmask43; before: every position counted, marked 'in a subgraph', the gate failed). A Scan over
    the samples is not masked: tests/test_layout41. Before mask37: every subgraph site counted the
    padding, and the gate passed."""
    import onnx

    model, (wa, ba, wl, bl, ws, bs) = _subgraph_tokens()
    path = tmp_path / "sub.onnx"
    onnx.save(model, path)
    rng = np.random.RandomState(3)
    x = rng.randn(SAMPLES, TOKENS, 4).astype(np.float32)
    pad = np.arange(TOKENS)[None, :] >= LENGTHS[:, None]
    x[pad] = 6.0
    data = save_npz(tmp_path / "d.npz", x=x, flag=np.array(True), attention_mask=(~pad).astype(np.int64))
    keep = ~pad
    x64 = x.astype(np.float64)
    if_pre = (x64 @ wa + ba)[keep]
    h1_pre = x64 @ wl + bl
    h2_pre = np.maximum(h1_pre, 0) @ wl + bl
    loop_pre = np.concatenate([h1_pre[keep], h2_pre[keep]])
    assert (x64 @ wa + ba)[..., 0].max() > 0 and if_pre[:, 0].max() < 0  # unit 0 fires on padding only

    args = ("scan", path, "--data", data, "--const", "flag", "--json", "-", "-q", "--batch-size", "4")
    result = cli(*args)
    assert result.code == 0, result.err
    report = result.json()
    layers = {layer["name"]: layer for layer in report["layers"]}
    for name, pre in (("gate/then_branch/then_relu", if_pre), ("loop/body/loop_relu", loop_pre)):
        layer = layers[name]
        assert layer["positive_counts"] == (pre > 0).sum(0).tolist(), name
        assert layer["elements_per_unit"] == pre.shape[0], name
        np.testing.assert_allclose(layer["max_preactivation"], pre.max(0), rtol=1e-5)
        assert layer["extra"]["position_mask"] == "applied", name
        assert 0 in layer["dead_indices"], name
    scan = layers["scan/body/scan_relu"]
    scan_pre = (x64 @ ws + bs)[keep]
    assert scan["positive_counts"] == (scan_pre > 0).sum(0).tolist()
    assert scan["elements_per_unit"] == int(keep.sum()) < SAMPLES * TOKENS
    np.testing.assert_allclose(scan["max_preactivation"], scan_pre.max(0), rtol=1e-5)
    assert scan["extra"]["position_mask"] == "applied"
    assert not any("scan/body/scan_relu" in note for note in report["notes"])
    assert cli(*args, "--max-dead", "1.0").code == 0


def test_labels_feed_a_seq2seq_decoder_counted_on_its_own_positions_and_are_left_out_elsewhere(cli, tmp_path):
    """BART fed input_ids, attention_mask and labels (-100 on label padding), no decoder_input_ids: its
    decoder runs on the labels shifted right (as in training), so the decoder's sites count the start
    position and each one after a real label; the encoder's the attention_mask's. Before: the encoder's
    attention_mask was laid over the decoder's positions (89 counted where the decoder has 91 real).
    OPT (forward() takes labels, a causal LM) given a labels array of another shape: left out (a note says
    so), the scan runs and counts as without them. Before: fed, and the loss refused them (the scan
    stopped: "the model failed on the first batch")."""
    from hf_models import bart_model, opt_model, save_folder, token_data, token_relu_counts

    bart = bart_model(seed=4)
    folder = save_folder(bart, tmp_path / "bart", shard="10KB")
    ids, mask = token_data(seed=2)
    label_ids, label_mask = token_data(seed=9)
    labels = np.where(label_mask == 1, label_ids, -100)
    feed = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    real = labels != -100
    decoder_keep = np.concatenate([np.ones_like(real[:, :1]), real[:, :-1]], axis=1)
    truth = token_relu_counts(bart, feed, lambda name: mask if ".encoder." in f".{name}" else decoder_keep)
    assert truth["model.decoder.layers.0.activation_fn"][1] != int(mask.sum())
    data = save_npz(tmp_path / "bart.npz", **feed)
    result = cli("scan", folder, "--data", data, "--json", "-", "-q")
    assert result.code == 0, result.err
    layers = {layer["name"]: layer for layer in result.json()["layers"]}
    assert set(layers) == set(truth)
    for name, (positive, elements) in truth.items():
        assert layers[name]["positive_counts"] == positive, name
        assert layers[name]["elements_per_unit"] == elements, name
        assert layers[name]["extra"]["position_mask"] == "applied", name

    opt = opt_model()
    folder = save_folder(opt, tmp_path / "opt", shard="20KB")
    truth = token_relu_counts(opt, {"input_ids": ids, "attention_mask": mask}, lambda name: mask)
    odd = np.zeros((ids.shape[0], 3), np.int64)  # another task's labels: not [samples, tokens]
    data = save_npz(tmp_path / "opt.npz", input_ids=ids, attention_mask=mask, labels=odd)
    result = cli("scan", folder, "--data", data, "--json", "-")
    assert result.code == 0, result.err
    report = result.json()
    assert {
        layer["name"]: (layer["positive_counts"], layer["elements_per_unit"]) for layer in report["layers"]
    } == {name: (positive, elements) for name, (positive, elements) in truth.items()}
    assert any("labels not fed to the model" in note for note in report["notes"]), report["notes"]


SEQ2SEQ = """
import torch
from torch import nn


class Seq2Seq(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.src_in = nn.Linear(4, 8)
        self.tgt_in = nn.Linear(4, 8)
        self.transformer = nn.Transformer(8, 2, 1, 1, 16, dropout=0.0, batch_first=batch_first)
        self.batch_first = batch_first

    def forward(self, src, tgt, src_key_padding_mask=None, tgt_key_padding_mask=None):
        s, t = self.src_in(src), self.tgt_in(tgt)
        if not self.batch_first:
            s, t = s.transpose(0, 1), t.transpose(0, 1)
        return self.transformer(
            s, t, src_key_padding_mask=src_key_padding_mask, tgt_key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=src_key_padding_mask,
        )


def build():
    torch.manual_seed(0)
    return Seq2Seq(True).eval()


def build_time_major():
    torch.manual_seed(0)
    return Seq2Seq(False).eval()
"""


@pytest.mark.parametrize("factory", ["build", "build_time_major"])
def test_torch_transformer_decoder_counts_the_targets_positions(cli, tmp_path, factory):
    """nn.Transformer fed src and tgt with their own key padding masks (same length, other padding): the
    encoder's FFN counts the source's real positions, the decoder's the target's (its
    tgt_key_padding_mask). Before: the source's mask was laid over the decoder's positions. Without a
    tgt_key_padding_mask the decoder counts every target position and a note says so."""
    import importlib.util

    path = tmp_path / "seq.py"
    path.write_text(SEQ2SEQ)
    loader = importlib.util.spec_from_file_location(f"seq_{factory}", path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    model = getattr(module, factory)()
    state = tmp_path / "m.pt"
    torch.save(model.state_dict(), state)
    rng = np.random.RandomState(5)
    src = rng.randn(SAMPLES, TOKENS, 4).astype(np.float32)
    tgt = rng.randn(SAMPLES, TOKENS, 4).astype(np.float32)
    src_pad = np.arange(TOKENS)[None, :] >= LENGTHS[:, None]
    tgt_pad = np.arange(TOKENS)[None, :] >= np.array([2, 5, 4, 1, 3, 5])[:, None]
    src[src_pad], tgt[tgt_pad] = 6.0, 6.0
    captured = {}
    layers = {
        "transformer.encoder": model.transformer.encoder,
        "transformer.decoder": model.transformer.decoder,
    }
    hooks = [
        stack.layers[0].linear1.register_forward_hook(
            lambda m, a, out, name=name: captured.__setitem__(name, out.detach().double().numpy())
        )
        for name, stack in layers.items()
    ]
    model.train()  # dropout 0: the slow path computes every position
    with torch.no_grad():
        model(*(torch.from_numpy(a) for a in (src, tgt, src_pad, tgt_pad)))
    model.eval()
    for hook in hooks:
        hook.remove()
    truth = {}
    for name, pad in (("transformer.encoder", src_pad), ("transformer.decoder", tgt_pad)):
        pre = captured[name] if factory == "build" else captured[name].transpose(1, 0, 2)
        truth[f"{name}.layers.0.relu()"] = ((pre[~pad] > 0).sum(0).tolist(), int((~pad).sum()))
    data = save_npz(
        tmp_path / "d.npz", src=src, tgt=tgt, src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad
    )
    spec = f"{path}:{factory}"
    result = cli("scan", state, "--arch", spec, "--data", data, "--json", "-", "-q")
    assert result.code == 0, result.err
    got = {
        layer["name"]: (layer["positive_counts"], layer["elements_per_unit"])
        for layer in result.json()["layers"]
    }
    assert got == truth
    # no target mask (the model given none either): every target position, said
    untargeted = save_npz(tmp_path / "u.npz", src=src, tgt=tgt, src_key_padding_mask=src_pad)
    result = cli("scan", state, "--arch", spec, "--data", untargeted, "--json", "-", "-q")
    assert result.code == 0, result.err
    report = result.json()
    layers = {layer["name"]: layer for layer in report["layers"]}
    decoder = "transformer.decoder.layers.0.relu()"
    assert layers["transformer.encoder.layers.0.relu()"]["elements_per_unit"] == int((~src_pad).sum())
    assert layers[decoder]["elements_per_unit"] == SAMPLES * TOKENS
    assert any("no tgt_key_padding_mask" in note for note in report["notes"]), report["notes"]


def test_watch_counts_a_seq2seq_decoder_on_its_own_positions():
    """watch() on a BART training forward (input_ids, attention_mask, labels with -100 padding, as
    Seq2SeqTrainer calls it): the decoder's sites count the labels' shifted positions, the encoder's
    the attention_mask's, as `deadrelu scan` does. Before: the attention_mask was laid over the decoder."""
    from hf_models import bart_model, token_data, token_relu_counts

    from deadrelu_cli import watch

    model = bart_model(seed=4)
    ids, mask = token_data(seed=2)
    label_ids, label_mask = token_data(seed=9)
    labels = np.where(label_mask == 1, label_ids, -100)
    feed = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    real = labels != -100
    decoder_keep = np.concatenate([np.ones_like(real[:, :1]), real[:, :-1]], axis=1)
    truth = token_relu_counts(model, feed, lambda name: mask if ".encoder." in f".{name}" else decoder_keep)
    model.train()  # a training step (dropout 0: the same values); evaluation forwards are not counted
    w = watch(model, every=1, config=False)
    w.step()
    with torch.no_grad():
        model(**{k: torch.from_numpy(v) for k, v in feed.items()})
    w.close()
    for name, (positive, elements) in truth.items():
        layer = w.last.layer(name)
        assert layer.positive_counts.tolist() == positive, name
        assert layer.elements_per_unit == elements, name
