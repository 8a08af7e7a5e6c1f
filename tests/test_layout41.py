"""layout41: padded positions and [B, T] vs [T, B] layout never depend on a coincidence of sizes.

* A batch of as many samples as tokens leaves a [T, B, F] activation and a [B, T, F] one the same shape.
  watch() decides it from the module the site runs in (nn.TransformerEncoderLayer's batch_first) or from
  a batch whose shape tells (the square batches before it are counted both ways until then); where
  nothing ever tells, the layer counts every position and says so. An ONNX graph that fixes its batch at
  the mask's token count: the same word, and a gate stops on it.
* watch() on torch's nn.Transformer / nn.TransformerEncoder reads the key padding masks of the modules'
  own calls (src_key_padding_mask, tgt_key_padding_mask).

Truth: plain forward hooks / numpy / onnxruntime in this file, counting only the kept positions."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import save_npz
from torch import nn

TOKENS, FEATURES, UNITS = 4, 3, 12


class TimeMajor(nn.Module):
    """Time-major by its own transpose ([T, B, F] at the ReLU): no module of it says so."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(41)
        self.fc = nn.Linear(FEATURES, UNITS)
        self.out = nn.Linear(UNITS, 2)

    def forward(self, x, attention_mask=None):
        return self.out(torch.relu(self.fc(x.transpose(0, 1))))


def _batch(rng, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """x [samples, TOKENS, FEATURES] with junk (6.0) at the padding; keep [samples, TOKENS]."""
    x = rng.randn(samples, TOKENS, FEATURES).astype(np.float32)
    lengths = np.concatenate([[TOKENS], rng.randint(1, TOKENS, samples - 1)])
    keep = np.arange(TOKENS)[None, :] < lengths[:, None]
    x[~keep] = 6.0
    return x, keep


def _fc_truth(model: TimeMajor, batches) -> tuple[list[int], int, np.ndarray]:
    """(positive counts, kept positions, max pre-activation) of relu(fc(x)) over the kept positions, from a
    hook on fc (its [T, B, F] output transposed back to [B, T, F])."""
    captured = []
    hook = model.fc.register_forward_hook(lambda m, a, out: captured.append(out.detach().double().numpy()))
    with torch.no_grad():
        for x, _ in batches:
            model(torch.from_numpy(x))
    hook.remove()
    kept = np.concatenate(
        [pre.transpose(1, 0, 2)[keep] for pre, (_, keep) in zip(captured, batches, strict=True)]
    )
    return (kept > 0).sum(0).tolist(), kept.shape[0], kept.max(0)


def _watched(model, batches, **kwargs):
    """One window over `batches` (each one training step), the forward given its attention_mask."""
    from deadrelu_cli import watch

    w = watch(model, every=1, window=len(batches), config=False, **kwargs)
    for x, keep in batches:
        w.step()
        model(torch.from_numpy(x), attention_mask=torch.from_numpy(keep.astype(np.int64)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w.close()
    return w.last, [str(c.message) for c in caught]


def test_watch_time_major_square_batches_counted_as_the_shape_of_another_batch_tells():
    """Steps of 4, 3 and 4 samples of 4 tokens, time-major: the square batches (whose [T, B, F] reads as
    [B, T, F] as well) are counted as the 3-sample batch's shape shows the site is laid out, before and
    after it: the counts are exactly the kept positions', and the same as with the samples in batches of
    3 and 5 (batch size never changes them). Before: the square batches were read as [B, T, F], so
    other positions than the real tokens were counted."""
    model = TimeMajor()
    rng = np.random.RandomState(0)
    batches = [_batch(rng, 4), _batch(rng, 3), _batch(rng, 4)]
    positive, kept, max_pre = _fc_truth(model, batches)
    report, warned = _watched(model, batches)
    layer = report.layer("relu()")
    assert layer.positive_counts.tolist() == positive
    assert layer.elements_per_unit == kept
    np.testing.assert_allclose(layer.max_preactivation, max_pre, rtol=1e-5)
    assert layer.extra["position_mask"] == "applied"
    assert not warned
    # the same 11 samples in batches of 3, 3, 5: the same counts
    x = np.concatenate([b[0] for b in batches])
    keep = np.concatenate([b[1] for b in batches])
    regrouped = [(x[:3], keep[:3]), (x[3:6], keep[3:6]), (x[6:], keep[6:])]
    again, _ = _watched(model, regrouped)
    assert again.layer("relu()").positive_counts.tolist() == positive
    assert again.layer("relu()").elements_per_unit == kept


def test_watch_square_batches_only_count_every_position_and_say_so():
    """Only square batches, and no module saying the layout: nothing tells [T, B, F] from [B, T, F], so
    the layer counts every position (padding included), marks it `layout ambiguous`, and a warning
    says which batch size tells them apart. Before: counted as [B, T, F] with no word (wrong here)."""
    model = TimeMajor()
    rng = np.random.RandomState(1)
    batches = [_batch(rng, 4), _batch(rng, 4)]
    report, warned = _watched(model, batches)
    layer = report.layer("relu()")
    with torch.no_grad():
        pre = np.concatenate(
            [model.fc(torch.from_numpy(x)).double().numpy().reshape(-1, UNITS) for x, _ in batches]
        )
    assert layer.positive_counts.tolist() == (pre > 0).sum(0).tolist()  # every position
    assert layer.elements_per_unit == 2 * 4 * TOKENS
    assert layer.extra["position_mask"] == "layout ambiguous"
    assert any("as many samples as tokens" in note and "relu()" in note for note in report.notes)
    assert any("another batch size or sequence length" in message for message in warned)


class Encoder(nn.Module):
    """torch's own encoder, time-major (batch_first=False), fed its src_key_padding_mask."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation="relu", batch_first=False)
        self.embed = nn.Linear(FEATURES, 8)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

    def forward(self, x, padding):
        return self.encoder(self.embed(x).transpose(0, 1), src_key_padding_mask=padding)


@pytest.mark.parametrize("samples", [TOKENS, TOKENS + 1], ids=["square", "other"])
def test_watch_reads_a_transformer_encoders_own_src_key_padding_mask(samples):
    """watch() on a model calling nn.TransformerEncoder(..., src_key_padding_mask=pad): the FFN ReLU
    counts the real tokens only, also in a batch of as many samples as tokens (the layer's batch_first
    says [T, B, E]). Before: every position counted, padding included, with no word."""
    from deadrelu_cli import watch

    model = Encoder()  # training mode, dropout 0: the slow path, every position computed
    x, keep = _batch(np.random.RandomState(2), samples)
    pad = torch.from_numpy(~keep)
    captured = []
    hook = model.encoder.layers[0].linear1.register_forward_hook(
        lambda m, a, out: captured.append(out.detach().double().numpy())
    )
    with torch.no_grad():
        model(torch.from_numpy(x), pad)
    hook.remove()
    kept = captured[0].transpose(1, 0, 2)[keep]
    w = watch(model, every=1, config=False)
    w.step()
    model(torch.from_numpy(x), pad)
    w.close()
    layer = w.last.layer("encoder.layers.0.relu()")
    assert layer.positive_counts.tolist() == (kept > 0).sum(0).tolist()
    assert layer.elements_per_unit == int(keep.sum())
    assert layer.extra["position_mask"] == "applied"


def test_watch_reads_nn_transformers_source_and_target_padding():
    """nn.Transformer called with src_key_padding_mask and tgt_key_padding_mask (targets as long as the
    sources, as many samples as tokens): the encoder's ReLU counts the real source tokens, the decoder's
    the real target tokens. Before: every position of both."""
    from deadrelu_cli import watch

    torch.manual_seed(3)
    model = nn.Transformer(8, 2, 1, 1, 16, dropout=0.0, activation="relu")  # time-major
    rng = np.random.RandomState(4)
    lengths = {"src": [4, 2, 3, 1], "tgt": [2, 4, 1, 3]}
    keeps = {k: np.arange(TOKENS)[None, :] < np.array(v)[:, None] for k, v in lengths.items()}
    feed = {}
    for key, keep in keeps.items():
        values = rng.randn(TOKENS, TOKENS, 8).astype(np.float32)  # [T, B, E]
        values[~keep.T] = 6.0  # junk at the padding
        feed[key] = torch.from_numpy(values)
        feed[f"{key}_key_padding_mask"] = torch.from_numpy(~keep)
    src_keep, tgt_keep = keeps["src"], keeps["tgt"]
    linears = {"encoder": model.encoder.layers[0].linear1, "decoder": model.decoder.layers[0].linear1}
    captured = {}
    hooks = [
        linear.register_forward_hook(
            lambda m, a, out, k=key: captured.update({k: out.detach().double().numpy()})
        )
        for key, linear in linears.items()
    ]
    with torch.no_grad():
        model(**feed)
    for hook in hooks:
        hook.remove()
    w = watch(model, every=1, config=False)
    w.step()
    model(**feed)
    w.close()
    for key, keep in (("encoder", src_keep), ("decoder", tgt_keep)):
        kept = captured[key].transpose(1, 0, 2)[keep]
        layer = w.last.layer(f"{key}.layers.0.relu()")
        assert layer.positive_counts.tolist() == (kept > 0).sum(0).tolist(), key
        assert layer.elements_per_unit == int(keep.sum()), key


def _fixed_square_graph():
    """An ONNX graph whose input fixes the batch at TOKENS samples and which runs its Relu time-major:
    x [4, 4, 3] -> Transpose [T, B, 3] -> MatMul W + b -> Relu [T, B, 12]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.RandomState(5)
    w = rng.randn(FEATURES, UNITS).astype(np.float32)
    b = rng.randn(UNITS).astype(np.float32) - 0.5
    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
            helper.make_node("MatMul", ["xt", "w"], ["mm"]),
            helper.make_node("Add", ["mm", "b"], ["pre"]),
            helper.make_node("Relu", ["pre"], ["y"], name="relu"),
        ],
        "square",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [TOKENS, TOKENS, FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [TOKENS, TOKENS, UNITS])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, w, b


def test_onnx_fixed_batch_of_as_many_samples_as_tokens_is_told_by_reordering_the_samples(cli, tmp_path):
    """A graph that fixes its batch at 4 samples, with masks of 4 tokens: its [4, 4, 12] Relu reads as
    [B, T, F] and [T, B, F] alike. The scan runs the first batch again with its samples reversed: the
    axis along which the Relu's input comes back reversed is the batch (here axis 1: time-major), so
    the real tokens are counted exactly (numpy over the kept positions). Where that cannot tell (every
    batch one vector at every position of every sample; onnxmask44: a later batch that tells is read), the layer counts every position, is marked `layout ambiguous`, a
    note says to re-export with a dynamic batch dim, and a gate stops on it unless --allow-unseen.
    Before: read as [B, T, F] (other positions than the real tokens counted), marked applied."""
    import onnx

    model, w, b = _fixed_square_graph()
    path = tmp_path / "square.onnx"
    onnx.save(model, path)
    x, keep = _batch(np.random.RandomState(6), 8)
    data = save_npz(tmp_path / "d.npz", x=x, attention_mask=keep.astype(np.int64))
    pre = x.astype(np.float64) @ w + b  # [B, T, F]: positions do not mix
    result = cli("scan", path, "--data", data, "--json", "-", "-q")
    assert result.code == 0, result.err
    (layer,) = result.json()["layers"]
    assert layer["positive_counts"] == (pre[keep] > 0).sum(0).tolist()
    assert layer["elements_per_unit"] == int(keep.sum())
    np.testing.assert_allclose(layer["max_preactivation"], pre[keep].max(0), rtol=1e-5)
    assert layer["extra"]["position_mask"] == "applied"

    alike = x.copy()
    alike[:] = x[0, 0]  # every batch: one vector everywhere (reversed, nothing moves)
    data = save_npz(tmp_path / "alike.npz", x=alike, attention_mask=keep.astype(np.int64))
    pre = alike.astype(np.float64) @ w + b
    args = ("scan", path, "--data", data, "--json", "-", "-q")
    result = cli(*args)
    assert result.code == 0, result.err
    report = result.json()
    (layer,) = report["layers"]
    assert layer["positive_counts"] == (pre > 0).reshape(-1, UNITS).sum(0).tolist()  # every position
    assert layer["elements_per_unit"] == 8 * TOKENS
    assert layer["extra"]["position_mask"] == "layout ambiguous"
    assert any("dynamic batch dim" in note and "relu" in note for note in report["notes"]), report["notes"]
    gated = cli(*args, "--max-dead", "1.0")
    assert gated.code == 1 and "position mask could not be applied to 1 layer(s)" in gated.err, gated.err
    assert "re-export with a dynamic batch dim" in gated.err, gated.err
    assert cli(*args, "--max-dead", "1.0", "--allow-unseen").code == 0


def test_a_scan_bodys_unmasked_relu_says_how_to_count_real_tokens_only(cli, tmp_path):
    """A Scan body over the samples sees one sample's [tokens, ...] per step, not the batch's [batch,
    tokens] positions (a Scan over the tokens is masked per step: test_mask37): its Relu counts every
    position; the note and the gate's failure now say what counts real
    tokens only there (the PyTorch model, or an export with the loop unrolled), besides --allow-unseen.
    Before: only --allow-unseen or --mask none were offered."""
    import onnx
    from test_mask37 import LENGTHS, SAMPLES, _subgraph_tokens

    model, _ = _subgraph_tokens(scan_over_samples=True)  # a Scan over the tokens is masked (onnxmask43)
    path = tmp_path / "sub.onnx"
    onnx.save(model, path)
    x = np.random.RandomState(3).randn(SAMPLES, 5, 4).astype(np.float32)
    keep = np.arange(5)[None, :] < LENGTHS[:, None]
    data = save_npz(tmp_path / "d.npz", x=x, flag=np.array(True), attention_mask=keep.astype(np.int64))
    args = ("scan", path, "--data", data, "--const", "flag", "--json", "-", "-q", "--max-dead", "1.0")
    gated = cli(*args)
    assert gated.code == 1, gated.err
    assert "scan/body/scan_relu" in gated.err and "an ONNX export with the loop unrolled" in gated.err, (
        gated.err
    )
    notes = gated.json()["notes"]
    assert any("scan/body/scan_relu" in n and "scan the PyTorch model" in n for n in notes), notes


def test_pt2_fixed_batch_of_as_many_samples_as_tokens_is_told_by_reordering_the_samples(cli, tmp_path):
    """A .pt2 exported with a static batch of 4 samples, masks of 4 tokens, time-major inside: its ReLU
    reads both ways on every batch; the scan runs the first batch again with its samples reversed and
    the axis that comes back reversed is the batch (layout42): the kept positions' counts exactly
    (numpy), `applied`. Before layout41: read as [B, T, F] (wrong positions), marked applied; layout41:
    every position, `layout ambiguous`."""
    model = TimeMajor().eval()
    x, keep = _batch(np.random.RandomState(9), 8)
    path = tmp_path / "tm.pt2"
    torch.export.save(torch.export.export(model, (torch.from_numpy(x[:4]),)), path)
    data = save_npz(tmp_path / "d.npz", x=x, attention_mask=keep.astype(np.int64))
    with torch.no_grad():
        pre = model.fc(torch.from_numpy(x)).double().numpy()  # [B, T, U] per sample
    result = cli("scan", path, "--trust-pickle", "--data", data, "--json", "-", "-q")
    assert result.code == 0, result.err
    (layer,) = result.json()["layers"]
    assert layer["positive_counts"] == (pre[keep] > 0).sum(0).tolist()
    assert layer["elements_per_unit"] == int(keep.sum())
    assert layer["extra"]["position_mask"] == "applied"


class TokenModel(nn.Module):
    """Token ids -> embedding -> (time-major: transpose) -> Linear -> ReLU."""

    def __init__(self, time_major: bool) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.embed = nn.Embedding(20, 6)
        self.fc = nn.Linear(6, UNITS)
        self.time_major = time_major

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        if self.time_major:
            h = h.transpose(0, 1)
        return torch.relu(self.fc(h)).sum()


@pytest.mark.parametrize("time_major", [False, True], ids=["batch-first", "time-major"])
def test_watch_square_token_batches_follow_the_token_ids_axes(time_major):
    """A token model's square batches only (5 samples of 5 tokens): the site's layout is told by what the
    model did to its input_ids' axes (the mask marks them), not by its shape: exact counts over the real
    tokens, batch-first and time-major, no warning. Before: the time-major one was read as [B, T, F]."""
    from deadrelu_cli import watch

    model = TokenModel(time_major)
    rng = np.random.RandomState(12)
    ids = rng.randint(1, 20, (5, 5))
    keep = np.arange(5)[None, :] < np.array([5, 2, 4, 1, 3])[:, None]
    ids[~keep] = 0  # padded with the pad id, as a tokenizer pads: what tells the ids' own layout
    with torch.no_grad():
        pre = model.fc(model.embed(torch.from_numpy(ids))).double().numpy()[keep]  # [B, T, F] at the kept
    w = watch(model, every=1, config=False)
    w.step()
    model(torch.from_numpy(ids), attention_mask=torch.from_numpy(keep.astype(np.int64)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w.close()
    layer = w.last.layer("relu()")
    assert layer.positive_counts.tolist() == (pre > 0).sum(0).tolist()
    assert layer.elements_per_unit == int(keep.sum())
    assert layer.extra["position_mask"] == "applied"
    assert not [c for c in caught if "as many samples as tokens" in str(c.message)]


MARGINS = """
import torch
from torch import nn


class Margins(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 5)

    def forward(self, x):
        h = self.fc(x)
        # one value per position ([B, T]: the units summed away), clamped: a margin, no layer of units
        margin = (torch.relu(h).sum(-1) - 1.0).clamp(min=0)
        out = torch.cond(
            h.sum() > -1e9,
            lambda t: torch.relu(t) + (2.0 - t.sum(-1)).clamp(min=0)[..., None] + t.pow(2).mean(-1, keepdim=True).clamp(min=0),
            lambda t: torch.relu(-t),
            (h,),
        )
        return h * margin[..., None] + out


def build():
    torch.manual_seed(2)
    return Margins().eval()
"""


def test_a_clamp_of_a_sum_over_the_units_is_no_layer_also_inside_torch_cond(cli, tmp_path, monkeypatch):
    """`(relu(h).sum(-1) - 1).clamp(min=0)` is [B, T]: one value per position, the units summed away; a
    clamp of it is no ReLU layer, whatever T. Inside a torch.cond branch the same rule (and the [B, T, 1]
    rule) holds: the branch's one ReLU of a layer is named, not its two clamps of reductions. Before:
    the margin was a site `relu()#2` of T "units", and the branch was said to hide 3 ReLUs."""
    import importlib.util
    import sys

    from conftest import arch_file

    _, spec = arch_file(tmp_path / "margins.py", MARGINS)
    loader = importlib.util.spec_from_file_location("l41_margins", tmp_path / "margins.py")
    module = importlib.util.module_from_spec(loader)
    monkeypatch.setitem(sys.modules, "l41_margins", module)
    loader.loader.exec_module(module)
    model = module.build()
    state = tmp_path / "m.pt"
    torch.save(model.state_dict(), state)
    x = np.abs(np.random.RandomState(8).randn(6, TOKENS, 3)).astype(np.float32)
    data = save_npz(tmp_path / "d.npz", x=x)
    with torch.no_grad():
        pre = model.fc(torch.from_numpy(x)).double().numpy().reshape(-1, 5)
    try:
        result = cli("scan", state, "--arch", spec, "--data", data, "--json", "-", "-q")
    finally:
        torch._dynamo.reset()  # the branches' compiled code: not kept for a later export of another model
    assert result.code == 0, result.err
    report = result.json()
    assert [layer["name"] for layer in report["layers"]] == ["relu()"]
    assert report["layers"][0]["positive_counts"] == (pre > 0).sum(0).tolist()
    assert report["unseen_activations"] == {"<model>: torch.cond(activation=Relu)": 1}
