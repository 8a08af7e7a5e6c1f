"""review37a: today's masking and site merges on inputs their authors did not try.

* An ONNX time-major site ([T, B, U]) of a 2-token mask: the scan decided the layout on a 2-sample batch,
  where [T, B, U] and [B, T, U] have one shape; `fix` decided it per batch (a batch of as many samples as
  tokens laid the mask over the wrong positions).
* `Max(x, zeros)` with a zero tensor (torch.maximum(x, torch.zeros(C)) exported) is a ReLU as `Max(x, 0)`.
* watch() on an encoder-decoder fed labels and a decoder_attention_mask counts the decoder's positions as
  `deadrelu scan` does (both the mask and the labels that are not -100).

Truth: numpy on the graphs' own weights, onnxruntime's own tensors, plain torch forward hooks."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import arch_file, save_npz
from onnx import TensorProto, helper, numpy_helper

F32 = TensorProto.FLOAT


def _time_major_model() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """x [B, T, 3] -> Transpose [T, B, 3] -> MatMul W -> Add b -> Relu [T, B, 4]. Unit 0 sums the inputs
    less 20: it fires on the padding's junk (10 per feature) only."""
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((3, 4)) * 0.5).astype(np.float32)
    w[:, 0] = 1.0
    b = np.array([-20.0, 0.1, -0.2, 0.0], np.float32)
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], name="to_tbf", perm=[1, 0, 2]),
        helper.make_node("MatMul", ["xt", "w"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "b"], ["pre"], name="add"),
        helper.make_node("Relu", ["pre"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "time_major",
        [helper.make_tensor_value_info("x", F32, ["B", "T", 3])],
        [helper.make_tensor_value_info("y", F32, ["T", "B", 4])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, w, b


def _two_token_data(samples: int = 7):
    """x [samples, 2, 3]: every sample has one real token then one padded with junk (10.0)."""
    x = np.random.default_rng(3).standard_normal((samples, 2, 3)).astype(np.float32)
    mask = np.zeros((samples, 2), np.int64)
    mask[:, 0] = 1
    x[mask == 0] = 10.0
    return x, mask


@pytest.mark.parametrize("batch", [[], ["--batch-size", "2"]], ids=["auto", "batch-2"])
def test_onnx_time_major_site_of_two_tokens_counts_the_real_tokens(cli, tmp_path, batch):
    """Before: the first (2-sample) batch read [T=2, B=2, U] as [B, T, U]: the mask was laid transposed
    (a padded position counted, a real one dropped), and larger batches did not broadcast at all."""
    model, w, b = _time_major_model()
    onnx.save(model, tmp_path / "m.onnx")
    x, mask = _two_token_data()
    data = save_npz(tmp_path / "d.npz", x=x, attention_mask=mask)
    pre = x.astype(np.float64) @ w.astype(np.float64) + b  # [B, T, U]
    kept = pre[mask == 1]
    result = cli("scan", tmp_path / "m.onnx", "--data", data, "--json", "-", "-q", *batch)
    assert result.code == 0, result.err
    (layer,) = result.json()["layers"]
    assert layer["elements_per_unit"] == int(mask.sum())
    assert layer["positive_counts"] == (kept > 0).sum(0).tolist()
    assert layer["dead_indices"] == [0]  # fires on padding only


def test_onnx_fix_of_a_time_major_site_with_batches_of_as_many_samples_as_tokens(cli, tmp_path):
    """bias-shift measures the pre-activation at the positions the scan counted. Before: with batches of
    2 samples of 2 tokens the fix read [T, B, U] as [B, T, U] and took padding for real tokens (where
    unit 0 fires), so it found unit 0 firing already and left it dead on the real tokens."""
    model, _, _ = _time_major_model()
    onnx.save(model, tmp_path / "m.onnx")
    x, mask = _two_token_data(samples=8)
    data = save_npz(tmp_path / "d.npz", x=x, attention_mask=mask)
    result = cli("fix", tmp_path / "m.onnx", "--data", data, "--strategy", "bias-shift",
                 "--batch-size", "2", "--output", tmp_path / "fixed.onnx")  # fmt: skip
    assert result.code == 0, result.err
    fixed = onnx.load(tmp_path / "fixed.onnx")
    exposed = onnx.ModelProto()
    exposed.CopyFrom(fixed)
    exposed.graph.output.append(helper.make_empty_tensor_value_info("pre"))
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    pre = session.run(["pre"], {"x": x})[0].transpose(1, 0, 2)  # [B, T, U]
    assert (pre[mask == 1][:, 0] > 0).any()  # unit 0 now fires on a real token


def _gemm_max(zero: np.ndarray) -> onnx.ModelProto:
    """x [B, 6] -> Gemm [B, 5] (units 1 and 3 dead by their bias) -> Max(h, zero) -> Gemm."""
    rng = np.random.default_rng(11)
    w1 = rng.standard_normal((6, 5)).astype(np.float32)
    b1 = np.array([0.1, -50.0, 0.0, -60.0, 0.2], np.float32)
    w2 = rng.standard_normal((5, 2)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
        helper.make_node("Max", ["h", "zero"], ["a"], name="max_relu"),
        helper.make_node("Gemm", ["a", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "gemm_max",
        [helper.make_tensor_value_info("x", F32, ["B", 6])],
        [helper.make_tensor_value_info("y", F32, ["B", 2])],
        initializer=[
            numpy_helper.from_array(a, n) for n, a in (("w1", w1), ("b1", b1), ("w2", w2), ("zero", zero))
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_onnx_max_with_a_zero_tensor_is_a_relu(cli, tmp_path):
    """torch.maximum(x, torch.zeros(C)) exports its zeros as a [C] (or [1, C]) tensor: the same ReLU as
    Max(x, 0), counted. Before: invisible (a gate passed on the other layers). Zeros that would widen x
    ([4, 5] against [B, 5]) or a tensor that is not all zeros stay no site."""
    x = np.random.default_rng(2).standard_normal((12, 6)).astype(np.float32)
    data = save_npz(tmp_path / "d.npz", x=x)
    for zero in (np.zeros(5, np.float32), np.zeros((1, 5), np.float32)):
        model = _gemm_max(zero)
        onnx.save(model, tmp_path / "m.onnx")
        exposed = onnx.ModelProto()
        exposed.CopyFrom(model)
        exposed.graph.output.append(helper.make_empty_tensor_value_info("h"))
        session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
        h = session.run(["h"], {"x": x})[0]
        result = cli("scan", tmp_path / "m.onnx", "--data", data, "--json", "-", "-q")
        assert result.code == 0, result.err
        (layer,) = result.json()["layers"]
        assert layer["name"] == "max_relu"
        assert layer["positive_counts"] == (h > 0).sum(0).tolist()
        assert layer["dead_indices"] == [1, 3]
    for other in (np.zeros((4, 5), np.float32), np.array([0, 0, 1, 0, 0], np.float32)):
        onnx.save(_gemm_max(other), tmp_path / "o.onnx")
        listed = cli("inspect", tmp_path / "o.onnx")
        assert listed.code == 0, listed.err
        assert "max_relu" not in listed.out


def test_watch_decoder_with_labels_and_decoder_attention_mask_counts_as_scan(cli, tmp_path):
    """BART fed labels (-100 on the first label of some rows, as prompt masking writes it, and on the
    padding) and a decoder_attention_mask: the decoder runs on the labels shifted right, so the position
    after a -100 holds the pad token. `scan` counts the decoder where the mask keeps and a real label
    precedes; watch() counted every position the mask keeps. Both now count the same, the truth's."""
    from hf_models import bart_model, save_folder, token_data, token_relu_counts

    from deadrelu_cli import watch

    model = bart_model(seed=4)
    ids, mask = token_data(seed=2)
    label_ids, label_mask = token_data(seed=9)
    labels = np.where(label_mask == 1, label_ids, -100)
    labels[::2, :2] = -100  # the first two labels of every other row are not learned (a prompt)
    feed = {"input_ids": ids, "attention_mask": mask, "labels": labels, "decoder_attention_mask": label_mask}
    real = labels != -100
    decoder_keep = np.concatenate([np.ones_like(real[:, :1]), real[:, :-1]], axis=1) & (label_mask == 1)

    truth = token_relu_counts(
        model, feed, lambda name: mask == 1 if ".encoder." in f".{name}" else decoder_keep
    )
    assert any(".decoder." in f".{n}" for n in truth) and any(".encoder." in f".{n}" for n in truth)

    model.train()  # a training step (dropout 0: the same values)
    w = watch(model, every=1, config=False)
    w.step()
    with torch.no_grad():
        model(**{k: torch.from_numpy(v) for k, v in feed.items()})
    w.close()
    for name, (positive, elements) in truth.items():
        layer = w.last.layer(name)
        assert layer.elements_per_unit == elements, name
        assert layer.positive_counts.tolist() == positive, name

    folder = save_folder(model.eval(), tmp_path / "bart", shard="10KB")
    data = save_npz(tmp_path / "d.npz", **feed)
    result = cli("scan", folder, "--data", data, "--json", "-", "-q")
    assert result.code == 0, result.err
    got = {
        layer["name"]: (layer["positive_counts"], layer["elements_per_unit"])
        for layer in result.json()["layers"]
    }
    assert got == truth


CONDITIONAL = """
import torch
from torch import nn


class Conditional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.embed = nn.Embedding(3, 6)
        self.act = nn.ReLU()
        self.out = nn.Linear(6, 2)

    def forward(self, x, y=None):  # a class-conditional net: the class embedding shifts the units
        h = self.fc(x)
        if y is not None:
            h = h + self.embed(y)
        return self.out(self.act(h))


def build():
    torch.manual_seed(0)
    model = Conditional()
    with torch.no_grad():
        model.fc.bias[:3] = -30.0  # units 0-2 fire only where class 2's embedding lifts them
        model.embed.weight.zero_()
        model.embed.weight[2, :3] = 40.0
    return model
"""


def test_a_class_conditional_forward_is_fed_its_y(cli, tmp_path):
    """A torch forward(x, y=None) that embeds y: the data's `y` is an input, fed. Before (since labels
    were left out of every forward() that merely accepts them): the model ran unconditioned, units 0-2
    counted dead though they fire on every class-2 sample. A transformers head's labels stay left out."""
    model, spec = arch_file(tmp_path / "cond.py", CONDITIONAL)
    state = tmp_path / "m.pt"
    torch.save(model.state_dict(), state)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 4)).astype(np.float32)
    y = np.array([0, 1, 2] * 3, np.int64)
    captured = []
    hook = model.act.register_forward_hook(lambda _m, args, _out: captured.append(args[0].numpy()))
    with torch.no_grad():
        model(torch.from_numpy(x), torch.from_numpy(y))
    hook.remove()
    pre = captured[0]
    data = save_npz(tmp_path / "d.npz", x=x, y=y)
    result = cli("scan", state, "--arch", spec, "--data", data, "--json", "-", "-q")
    assert result.code == 0, result.err
    (layer,) = result.json()["layers"]
    assert layer["positive_counts"] == (pre > 0).sum(0).tolist()
    assert layer["dead_indices"] == np.flatnonzero(~(pre > 0).any(0)).tolist()
    assert 0 not in layer["dead_indices"]


def test_a_key_padding_mask_written_one_on_real_tokens_is_refused(cli, tmp_path):
    """A mask named *key_padding_mask but 1 on real tokens (an unpadded sample all 1): by PyTorch's
    convention the scan would count the padding only. Before: it did, silently (exit 0). Now: one line,
    exit 2, saying the convention and the way out; the same array named attention_mask counts the real
    tokens."""
    model, w, b = _time_major_model()
    onnx.save(model, tmp_path / "m.onnx")
    x, mask = _two_token_data()
    mask[0] = 1  # sample 0 unpadded
    x[0, 1] = np.random.default_rng(5).standard_normal(3)
    data = save_npz(tmp_path / "d.npz", x=x, key_padding_mask=mask)
    result = cli("scan", tmp_path / "m.onnx", "--data", data, "-q")
    assert result.code == 2, result.out
    assert "key_padding_mask" in result.err and "PyTorch's convention" in result.err
    assert "Traceback" not in result.err and len(result.err.strip().splitlines()) == 1
    renamed = save_npz(tmp_path / "r.npz", x=x, attention_mask=mask)
    result = cli("scan", tmp_path / "m.onnx", "--data", renamed, "--json", "-", "-q")
    assert result.code == 0, result.err
    (layer,) = result.json()["layers"]
    pre = x.astype(np.float64) @ w.astype(np.float64) + b
    assert layer["positive_counts"] == (pre[mask == 1] > 0).sum(0).tolist()
