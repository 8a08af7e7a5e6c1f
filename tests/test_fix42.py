"""`deadrelu fix` through a Concat and a BatchNormalization (ONNX), and bias-shift written in a
half-precision stored dtype.

- ONNX reinit/prune reach a Relu whose units a Concat joins with another branch before the next Conv
  (a SqueezeNet fire module: the consumer's columns past the other branch's) and one whose producer is
  an unfused Conv -> BatchNormalization (reset to the identity by reinit, narrowed with the Conv by prune).
- bias-shift on fp16/bf16 weights loaded into an fp32 --arch: the written file, read back in its own
  dtype, has the units alive.

Truth: onnxruntime on the original and the written graphs with every Relu's output exposed, the
expected pruned widths from numpy, plain torch on the written state_dict — never the tool's report."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import arch_file, save_npz
from onnx import TensorProto, helper, numpy_helper

F32 = TensorProto.FLOAT


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def _fire(path) -> dict[str, np.ndarray]:
    """x[N,3,5,5] -> Conv sq(3->4) -> Relu rs -> Concat(Relu(Conv e1 1x1, 3 ch), Relu(Conv e3 3x3, 5 ch))
    -> Conv head(8->2) -> GlobalAveragePool -> Flatten. Planted dead: sq unit 2 (read by e1 and e3),
    e1 unit 1, e3 units 0 and 3."""
    rng = np.random.default_rng(0)
    w = {
        "sq.w": rng.standard_normal((4, 3, 1, 1)),
        "sq.b": np.array([0.1, 0.1, -60.0, 0.1]),
        "e1.w": rng.standard_normal((3, 4, 1, 1)) * 0.5,
        "e1.b": np.array([2.0, -60.0, 2.0]),
        "e3.w": rng.standard_normal((5, 4, 3, 3)) * 0.2,
        "e3.b": np.array([-60.0, 2.0, 2.0, -60.0, 2.0]),
        "head.w": rng.standard_normal((2, 8, 1, 1)),
        "head.b": np.zeros(2),
    }
    nodes = [
        helper.make_node("Conv", ["x", "sq.w", "sq.b"], ["s"], name="sq"),
        helper.make_node("Relu", ["s"], ["rs"], name="relu_sq"),
        helper.make_node("Conv", ["rs", "e1.w", "e1.b"], ["a"], name="e1"),
        helper.make_node("Relu", ["a"], ["ra"], name="relu_e1"),
        helper.make_node("Conv", ["rs", "e3.w", "e3.b"], ["c"], name="e3", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["rc"], name="relu_e3"),
        helper.make_node("Concat", ["ra", "rc"], ["cat"], name="cat", axis=1),
        helper.make_node("Conv", ["cat", "head.w", "head.b"], ["h"], name="head"),
        helper.make_node("GlobalAveragePool", ["h"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["y"], name="flat"),
    ]
    _save(path, nodes, w, [1, 3, 5, 5])
    return w


def _conv_bn(path) -> dict[str, np.ndarray]:
    """x[N,3,5,5] -> Conv c1 (no bias, 6 ch) -> BatchNormalization bn1 -> Relu -> Conv c2 (6->2) ->
    GlobalAveragePool -> Flatten, as torch exports it with do_constant_folding=False. Dead: 1 and 4."""
    rng = np.random.default_rng(1)
    w = {
        "c1.w": rng.standard_normal((6, 3, 3, 3)) * 0.3,
        "bn.scale": rng.uniform(0.5, 1.5, 6),
        "bn.B": np.array([1.0, -40.0, 1.0, 1.0, -40.0, 1.0]),
        "bn.mean": rng.uniform(-0.1, 0.1, 6),
        "bn.var": rng.uniform(0.5, 2.0, 6),
        "c2.w": rng.standard_normal((2, 6, 1, 1)),
        "c2.b": np.array([0.5, -0.5]),
    }
    nodes = [
        helper.make_node("Conv", ["x", "c1.w"], ["c"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c", "bn.scale", "bn.B", "bn.mean", "bn.var"], ["n"], name="bn1"
        ),
        helper.make_node("Relu", ["n"], ["r"], name="relu1"),
        helper.make_node("Conv", ["r", "c2.w", "c2.b"], ["h"], name="c2"),
        helper.make_node("GlobalAveragePool", ["h"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["y"], name="flat"),
    ]
    _save(path, nodes, w, [1, 3, 5, 5])
    return w


def _save(path, nodes, weights, shape) -> None:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F32, ["n", *shape[1:]])],
        [helper.make_tensor_value_info("y", F32, ["n", 2])],
        initializer=[_init(k, v) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _run(path, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every Relu's output and the model output y, by onnxruntime, keyed by the Relu's name."""
    model = onnx.load(str(path))
    relus = [n for n in model.graph.node if n.op_type == "Relu"]
    for node in relus:
        model.graph.output.append(helper.make_tensor_value_info(node.output[0], F32, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = session.run(None, {"x": x})
    return {"y": outs[0], **{n.name: o for n, o in zip(relus, outs[1:], strict=True)}}


def _alive(relu_out: np.ndarray) -> np.ndarray:
    return (relu_out > 0).any(axis=(0, 2, 3))


def _weights(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _data(tmp_path):
    x = np.random.default_rng(2).standard_normal((24, 3, 5, 5)).astype(np.float32)
    return x, save_npz(tmp_path / "x.npz", x=x)


def test_onnx_reinit_and_prune_reach_units_behind_a_concat(cli, tmp_path):
    model = tmp_path / "fire.onnx"
    w = _fire(model)
    x, data = _data(tmp_path)
    before = _run(model, x)
    assert (~_alive(before["relu_sq"])).tolist() == [False, False, True, False]
    assert (~_alive(before["relu_e1"])).tolist() == [False, True, False]
    assert (~_alive(before["relu_e3"])).tolist() == [True, False, False, True, False]

    out = tmp_path / "re.onnx"
    r = cli("fix", model, "--data", data, "--strategy", "reinit", "--output", out)
    assert r.code == 0, r.out + r.err
    after = _run(out, x)
    np.testing.assert_array_equal(after["y"], before["y"])  # the dead columns of head zeroed
    assert _alive(after["relu_e1"]).all() and _alive(after["relu_e3"]).all()
    np.testing.assert_array_equal(after["relu_e1"][:, [0, 2]], before["relu_e1"][:, [0, 2]])
    np.testing.assert_array_equal(after["relu_e3"][:, [1, 2, 4]], before["relu_e3"][:, [1, 2, 4]])
    assert _alive(after["relu_sq"]).all()
    written = _weights(out)  # the squeeze's dead unit: column 2 of both expand convs zeroed (live rows)
    assert not written["e1.w"][[0, 2], 2].any() and not written["e3.w"][[1, 2, 4], 2].any()
    head = written["head.w"]
    # the concat's columns: e1's 3 units first, then e3's 5: e1#1 -> 1, e3#0 -> 3, e3#3 -> 6
    assert not head[:, [1, 3, 6]].any()
    np.testing.assert_array_equal(
        np.delete(head, [1, 3, 6], axis=1), np.delete(w["head.w"], [1, 3, 6], axis=1).astype(np.float32)
    )

    out = tmp_path / "pr.onnx"
    r = cli("fix", model, "--data", data, "--strategy", "prune", "--output", out)
    assert r.code == 0, r.out + r.err
    pruned, written = _run(out, x), _weights(out)
    np.testing.assert_allclose(pruned["y"], before["y"], rtol=1e-5, atol=1e-6)
    assert written["e1.w"].shape[:2] == (2, 3) and written["e3.w"].shape[:2] == (3, 3)
    assert written["sq.w"].shape[0] == 3
    np.testing.assert_array_equal(
        written["head.w"], np.delete(w["head.w"], [1, 3, 6], axis=1).astype(np.float32)
    )
    np.testing.assert_array_equal(written["e3.b"], np.float32([2, 2, 2]))
    np.testing.assert_allclose(pruned["relu_e3"], before["relu_e3"][:, [1, 2, 4]], rtol=1e-5, atol=1e-6)


def test_onnx_reinit_prune_and_kick_reach_a_conv_behind_a_batchnorm(cli, tmp_path):
    model = tmp_path / "bn.onnx"
    w = _conv_bn(model)
    x, data = _data(tmp_path)
    before = _run(model, x)
    dead = [1, 4]
    assert (~_alive(before["relu1"])).nonzero()[0].tolist() == dead

    out = tmp_path / "re.onnx"
    r = cli("fix", model, "--data", data, "--strategy", "reinit", "--output", out)
    assert r.code == 0, r.out + r.err
    after, written = _run(out, x), _weights(out)
    np.testing.assert_array_equal(after["y"], before["y"])
    assert _alive(after["relu1"]).all()
    live = [0, 2, 3, 5]
    np.testing.assert_array_equal(after["relu1"][:, live], before["relu1"][:, live])
    # the BatchNormalization's dead channels are the identity (up to its epsilon), the rest untouched
    for name, value in (("bn.scale", 1), ("bn.B", 0), ("bn.mean", 0), ("bn.var", 1)):
        np.testing.assert_array_equal(written[name][dead], np.float32([value, value]))
        np.testing.assert_array_equal(written[name][live], w[name][live].astype(np.float32))
    # the unit's pre-activation is the fresh row's convolution, computed here in numpy
    pre = _conv3x3(x, written["c1.w"][1]) / np.sqrt(1 + 1e-5)
    np.testing.assert_allclose(np.maximum(pre, 0), after["relu1"][:, 1], rtol=1e-4, atol=1e-5)

    out = tmp_path / "pr.onnx"
    r = cli("fix", model, "--data", data, "--strategy", "prune", "--output", out)
    assert r.code == 0, r.out + r.err
    pruned, written = _run(out, x), _weights(out)
    np.testing.assert_allclose(pruned["y"], before["y"], rtol=1e-5, atol=1e-6)
    assert written["c1.w"].shape[0] == 4 and written["c2.w"].shape[1] == 4
    for name in ("bn.scale", "bn.B", "bn.mean", "bn.var"):
        np.testing.assert_array_equal(written[name], w[name][live].astype(np.float32))

    out = tmp_path / "kick.onnx"
    r = cli("fix", model, "--data", data, "--strategy", "kick", "--kick-scale", "400", "--output", out)
    assert r.code == 0, r.out + r.err
    kicked, written = _run(out, x), _weights(out)
    assert _alive(kicked["relu1"]).all()
    np.testing.assert_array_equal(written["c1.w"][live], w["c1.w"][live].astype(np.float32))


def _conv3x3(x: np.ndarray, row: np.ndarray) -> np.ndarray:
    """One output channel of a 3x3 convolution with padding 1: [N, H, W]."""
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    h, w = x.shape[2:]
    out = np.zeros((x.shape[0], h, w))
    for i in range(3):
        for j in range(3):
            out += np.einsum("nchw,c->nhw", padded[:, :, i : i + h, j : j + w], row[:, i, j])
    return out


def test_onnx_fix_refuses_a_conv_whose_output_another_node_reads(cli, tmp_path):
    """Rewriting a Conv's rows whose output a residual Add also reads would change that path too: the
    table says so, instead of an output check failing without a reason."""
    rng = np.random.default_rng(3)
    w = {
        "c1.w": rng.standard_normal((3, 3, 1, 1)),
        "c1.b": np.array([0.1, -50.0, 0.1]),
        "c2.w": rng.standard_normal((3, 3, 1, 1)),
    }
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c"], name="c1"),
        helper.make_node("Relu", ["c"], ["r"], name="relu1"),
        helper.make_node("Conv", ["r", "c2.w"], ["d"], name="c2"),
        helper.make_node("Add", ["d", "c"], ["s"], name="res"),
        helper.make_node("GlobalAveragePool", ["s"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["y"], name="flat"),
    ]
    model = tmp_path / "res.onnx"
    _save(model, nodes, w, [1, 3, 5, 5])
    _, data = _data(tmp_path)
    r = cli("fix", model, "--data", data, "--strategy", "reinit", "--output", tmp_path / "o.onnx")
    assert r.code == 2, r.out + r.err
    assert "also read elsewhere (res)" in r.err
    assert not (tmp_path / "o.onnx").exists()


HALF_ARCH = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        return self.out(torch.relu(self.fc(x)))


def build():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.fc.weight.uniform_(0.9, 1.1)
        net.fc.bias[:] = -1000.0  # every unit dead; its values sit ~0.1 apart near 480
    return net
"""


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bias_shift_of_a_half_precision_state_dict_is_alive_as_written(cli, tmp_path, dtype):
    """fp16/bf16 weights loaded into an fp32 --arch: the shifted bias is written back in the stored
    dtype, whose step near 480 (0.25 / 2) is wider than the gaps between the values at the cut; rounded
    to the nearest, units stayed dead in the file (exit 1)."""
    net, spec = arch_file(tmp_path / "arch.py", HALF_ARCH)
    torch.save({k: v.to(dtype) for k, v in net.state_dict().items()}, tmp_path / "m.pt")
    x = (60 + np.random.default_rng(6).standard_normal((64, 8)) * 0.05).astype(np.float32)
    data = save_npz(tmp_path / "x.npz", x=x)
    out = tmp_path / "fixed.pt"
    r = cli(
        "fix", tmp_path / "m.pt", "--arch", spec, "--data", data, "--strategy", "bias-shift",
        "--target-rate", "0", "--output", out,
    )  # fmt: skip
    assert r.code == 0, r.out + r.err
    written = torch.load(out, weights_only=True)
    assert written["fc.bias"].dtype == dtype and written["fc.weight"].dtype == dtype
    # the --arch model as it loads the file: fp32 parameters holding the stored values
    pre = torch.nn.functional.linear(
        torch.from_numpy(x), written["fc.weight"].float(), written["fc.bias"].float()
    )
    assert bool((pre > 0).any(0).all()), (pre > 0).sum(0)
    assert torch.equal(written["out.weight"], net.out.weight.to(dtype))


def test_bias_shift_of_a_float16_onnx_model_is_alive_as_written(cli, tmp_path):
    rng = np.random.default_rng(0)
    w = rng.uniform(0.9, 1.1, (16, 8)).astype(np.float16)
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu1"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="out"),
    ]
    f16 = TensorProto.FLOAT16
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", f16, ["n", 8])],
        [helper.make_tensor_value_info("y", f16, ["n", 2])],
        initializer=[
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.full(16, -1000, np.float16), "b"),
            numpy_helper.from_array(rng.standard_normal((16, 2)).astype(np.float16), "w2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "half.onnx"))
    x = (60 + rng.standard_normal((64, 8)) * 0.05).astype(np.float16)
    data = save_npz(tmp_path / "x.npz", x=x)
    out = tmp_path / "fixed.onnx"
    r = cli(
        "fix", tmp_path / "half.onnx", "--data", data, "--strategy", "bias-shift", "--target-rate", "0",
        "--output", out,
    )  # fmt: skip
    assert r.code == 0, r.out + r.err
    written = onnx.load(str(out))
    written.graph.output.append(helper.make_tensor_value_info("h", f16, None))
    session = ort.InferenceSession(written.SerializeToString(), providers=["CPUExecutionProvider"])
    pre = session.run(None, {"x": x})[1]
    assert pre.dtype == np.float16 and bool((pre > 0).any(0).all()), (pre > 0).sum(0)


FIRE_ARCH = """
import torch
from torch import nn
import torch.nn.functional as F


class Fire(nn.Module):
    def __init__(self):
        super().__init__()
        self.sq = nn.Conv2d(3, 4, 1)
        self.e1 = nn.Conv2d(4, 3, 1)
        self.e3 = nn.Conv2d(4, 5, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        s = F.relu(self.sq(x))
        h = torch.cat([F.relu(self.e1(s)), F.relu(self.e3(s))], 1)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def build():
    torch.manual_seed(0)
    net = Fire()
    with torch.no_grad():
        net.sq.bias[:] = torch.tensor([1.0, 1.0, -60.0, 1.0])  # unit 2 dead, read by e1 and e3
        net.e1.bias[:] = torch.tensor([2.0, -60.0, 2.0])
        net.e3.bias[:] = torch.tensor([-60.0, 2.0, 2.0, -60.0, 2.0])
    return net
"""


def _fire_branches(state: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The e1 and e3 ReLU outputs, recomputed with torch.nn.functional from a state_dict."""
    F = torch.nn.functional
    s = F.relu(F.conv2d(x, state["sq.weight"], state["sq.bias"]))
    return (
        F.relu(F.conv2d(s, state["e1.weight"], state["e1.bias"])),
        F.relu(F.conv2d(s, state["e3.weight"], state["e3.bias"], padding=1)),
    )


def test_torch_reinit_and_prune_reach_units_behind_torch_cat(cli, tmp_path):
    """Eager (state_dict + --arch) and .pt2: the Linear after torch.cat([e1, e3]) reads e1's units in
    columns 0-2 and e3's in 3-7; the dead ones (e1#1, e3#0, e3#3: columns 1, 3, 6) are zeroed by reinit
    and removed by prune, the other columns untouched."""
    net, spec = arch_file(tmp_path / "arch.py", FIRE_ARCH)
    torch.save(net.state_dict(), tmp_path / "m.pt")
    x = torch.from_numpy(np.random.default_rng(4).standard_normal((16, 3, 5, 5)).astype(np.float32))
    data = save_npz(tmp_path / "x.npz", x=x.numpy())
    with torch.no_grad():
        expected = net(x)
        a, c = _fire_branches(net.state_dict(), x)
    assert ((a > 0).sum((0, 2, 3)) == 0).nonzero().flatten().tolist() == [1]
    assert ((c > 0).sum((0, 2, 3)) == 0).nonzero().flatten().tolist() == [0, 3]
    out = tmp_path / "re.pt"
    r = cli("fix", tmp_path / "m.pt", "--arch", spec, "--data", data, "--strategy", "reinit", "--output", out)
    assert r.code == 0, r.out + r.err
    written = torch.load(out, weights_only=True)
    head = written["head.weight"]
    assert not head[:, [1, 3, 6]].any()
    assert not written["e1.weight"][[0, 2], 2].any() and not written["e3.weight"][[1, 2, 4], 2].any()
    keep = [0, 2, 4, 5, 7]
    assert torch.equal(head[:, keep], net.head.weight.detach()[:, keep])
    a, c = _fire_branches(written, x)
    assert bool((a > 0).any((0, 2, 3)).all()) and bool((c > 0).any((0, 2, 3)).all())
    net.load_state_dict(written)
    with torch.no_grad():
        assert torch.equal(net(x), expected)

    net, _ = arch_file(tmp_path / "arch.py", FIRE_ARCH)
    program = torch.export.export(net, (x[:2],), dynamic_shapes=({0: torch.export.Dim("b", min=1)},))
    torch.export.save(program, tmp_path / "m.pt2")
    out = tmp_path / "pr.pt2"
    r = cli("fix", tmp_path / "m.pt2", "--data", data, "--strategy", "prune", "--output", out)
    assert r.code == 0, r.out + r.err
    pruned = torch.export.load(out)
    state = pruned.state_dict
    assert state["e1.weight"].shape[:2] == (2, 3) and state["e3.weight"].shape[:2] == (3, 3)
    assert torch.equal(state["head.weight"], net.head.weight.detach()[:, keep])
    torch.testing.assert_close(pruned.module()(x), expected, rtol=1e-5, atol=1e-6)


def test_onnx_fix_reaches_a_matmul_with_a_transposed_weight(cli, tmp_path):
    """torch's Linear on [B, T, F] exported without constant folding: MatMul(x, Transpose(W)) + Add(b),
    W stored [out, in]. reinit redraws W's rows and zeroes the next W's columns; prune narrows both."""
    rng = np.random.default_rng(5)
    w = {
        "up.w": rng.standard_normal((6, 4)),
        "up.b": np.array([1.0, -60.0, 1.0, 1.0, -60.0, 1.0]),
        "down.w": rng.standard_normal((3, 6)),
        "down.b": np.zeros(3),
    }
    nodes = [
        helper.make_node("Transpose", ["up.w"], ["up.t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "up.t"], ["m"], name="up"),
        helper.make_node("Add", ["m", "up.b"], ["h"], name="up_bias"),
        helper.make_node("Relu", ["h"], ["r"], name="relu1"),
        helper.make_node("Transpose", ["down.w"], ["down.t"], perm=[1, 0]),
        helper.make_node("MatMul", ["r", "down.t"], ["d"], name="down"),
        helper.make_node("Add", ["d", "down.b"], ["y"], name="down_bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F32, ["n", 3, 4])],
        [helper.make_tensor_value_info("y", F32, ["n", 3, 3])],
        initializer=[_init(k, v) for k, v in w.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "t.onnx"))
    x = rng.standard_normal((8, 3, 4)).astype(np.float32)
    data = save_npz(tmp_path / "x.npz", x=x)
    session = ort.InferenceSession(str(tmp_path / "t.onnx"), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"x": x})
    for strategy in ("reinit", "prune"):
        out = tmp_path / f"{strategy}.onnx"
        r = cli("fix", tmp_path / "t.onnx", "--data", data, "--strategy", strategy, "--output", out)
        assert r.code == 0, r.out + r.err
        written = _weights(out)
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-6)
        if strategy == "reinit":
            assert not written["down.w"][:, [1, 4]].any()
            pre = x.astype(np.float64) @ written["up.w"].T.astype(np.float64) + written["up.b"]
            assert (pre[..., [1, 4]] > 0).any(axis=(0, 1)).all()
        else:
            np.testing.assert_array_equal(written["up.w"], w["up.w"][[0, 2, 3, 5]].astype(np.float32))
            np.testing.assert_array_equal(written["down.w"], w["down.w"][:, [0, 2, 3, 5]].astype(np.float32))


class _ConvBnMean(torch.nn.Module):
    """conv (bias=False) -> BN -> relu -> mean over (2, 3) -> linear, scripted: the conv reads its
    `self.bias` (None), and the pool is a reduction in the TorchScript graph."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(6)
        self.fc = torch.nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_torchscript_reinit_of_a_conv_without_bias_pooled_by_a_mean(cli, tmp_path):
    """Before: "conv.bias is computed by a parametrization" (it is None) and "goes to aten::mean"."""
    torch.manual_seed(0)
    net = _ConvBnMean().eval()
    with torch.no_grad():
        net.bn.bias[:] = torch.tensor([1.0, -50.0, 1.0, 1.0, -50.0, 1.0])
    torch.jit.save(torch.jit.script(net), str(tmp_path / "m.ts"))
    x = torch.from_numpy(np.random.default_rng(7).standard_normal((12, 3, 5, 5)).astype(np.float32))
    data = save_npz(tmp_path / "x.npz", x=x.numpy())
    out = tmp_path / "re.ts"
    r = cli("fix", tmp_path / "m.ts", "--data", data, "--strategy", "reinit", "--output", out)
    assert r.code == 0, r.out + r.err
    fixed = torch.jit.load(str(out))
    F = torch.nn.functional
    with torch.no_grad():
        torch.testing.assert_close(fixed(x), net(x), rtol=0, atol=0)
        bn = fixed.bn
        pre = F.batch_norm(
            F.conv2d(x, fixed.conv.weight, padding=1), bn.running_mean, bn.running_var, bn.weight, bn.bias
        )
    assert bool((pre > 0).any(0).any(-1).any(-1).all())
    assert not fixed.fc.weight[:, [1, 4]].any()
