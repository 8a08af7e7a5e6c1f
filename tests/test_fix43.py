"""`deadrelu fix` through nested concatenations (every format), TorchScript's several readers / cat /
spelled ReLUs, a bfloat16 ONNX bias-shift, prune's "new widths", and scan's flags on fix and trend.

- A DenseNet-style block: h1 = relu(c1(x)) read by c2, by c3 through cat(h1, h2) and by the head through
  cat(cat(h1, h2), h3). reinit zeroes each reader's own columns, prune removes them (ONNX, TorchScript,
  eager, .pt2); before, ONNX/.pt2/TorchScript skipped h1 and h2, eager re-initialised h2 with the head's
  columns left (outputs changed).
- TorchScript: a ReLU read by two convs and a ReLU spelled z * (z > 0) (refused before).
- ONNX bias-shift of a bias stored in bfloat16 (Cast to float32 before the Gemm) rounds towards firing.

Truth: plain torch (F.conv2d / F.linear on the written tensors), onnxruntime on the original and the
written graphs, numpy — never the tool's report."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from conftest import arch_file, relu_onnx, save_npz
from onnx import TensorProto, helper, numpy_helper

DENSE_ARCH = """
import torch
from torch import nn
import torch.nn.functional as F


class Dense(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 5, 3, padding=1)
        self.c3 = nn.Conv2d(9, 6, 1)
        self.head = nn.Conv2d(15, 3, 1)
        with torch.no_grad():
            self.c1.bias[1] = -50
            self.c2.bias[:2] = -50
            self.c3.bias[4] = -50

    def forward(self, x):
        h1 = F.relu(self.c1(x))
        h2 = F.relu(self.c2(h1))
        k1 = torch.cat([h1, h2], 1)
        h3 = F.relu(self.c3(k1))
        return self.head(torch.cat([k1, h3], 1)).mean((2, 3))


def build():
    return Dense().eval()
"""


def _dense(state: dict, x: torch.Tensor):
    """(pre-activations of c1, c2, c3; the output) with plain torch on a state_dict."""
    p1 = F.conv2d(x, state["c1.weight"], state["c1.bias"], padding=1)
    h1 = p1.clamp_min(0)
    p2 = F.conv2d(h1, state["c2.weight"], state["c2.bias"], padding=1)
    k1 = torch.cat([h1, p2.clamp_min(0)], 1)
    p3 = F.conv2d(k1, state["c3.weight"], state["c3.bias"])
    k2 = torch.cat([k1, p3.clamp_min(0)], 1)
    return (p1, p2, p3), F.conv2d(k2, state["head.weight"], state["head.bias"]).mean((2, 3))


def _dead(pres) -> list[list[int]]:
    return [((p > 0).sum((0, 2, 3)) == 0).nonzero().flatten().tolist() for p in pres]


def _written_state(path, fmt: str) -> dict:
    if fmt == "onnx":
        stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
        return {k: torch.from_numpy(v.copy()) for k, v in stored.items()}
    if fmt == "ts":
        return {k: v.detach() for k, v in torch.jit.load(str(path)).state_dict().items()}
    if fmt == "pt2":
        return dict(torch.export.load(str(path)).state_dict)
    return torch.load(path, weights_only=True)


def _run(path, fmt: str, x: torch.Tensor) -> torch.Tensor:
    if fmt == "onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    if fmt == "ts":
        return torch.jit.load(str(path))(x).detach()
    return torch.export.load(str(path)).module()(x).detach()


@pytest.fixture(scope="module")
def dense_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dense")
    net, spec = arch_file(folder / "arch.py", DENSE_ARCH)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((12, 3, 6, 6)).astype(np.float32))
    torch.save(net.state_dict(), folder / "m.pt")
    torch.jit.save(torch.jit.script(net), str(folder / "m.ts"))
    batch = {0: torch.export.Dim("b", min=1)}
    torch.export.save(torch.export.export(net, (x[:2],), dynamic_shapes=(batch,)), str(folder / "m.pt2"))
    torch.onnx.export(
        net, (x[:2],), str(folder / "m.onnx"), input_names=["input"], dynamo=False, opset_version=17,
        dynamic_axes={"input": {0: "b"}},
    )  # fmt: skip
    return folder, spec, net, x, save_npz(folder / "x.npz", input=x.numpy())


@pytest.mark.parametrize("fmt", ["onnx", "ts", "pt"])
def test_reinit_follows_nested_concats(cli, dense_files, fmt):
    folder, spec, net, x, data = dense_files
    state = {k: v.detach() for k, v in net.state_dict().items()}
    with torch.no_grad():
        pres, expected = _dense(state, x)
    dead = _dead(pres)
    assert dead == [[1], [0, 1], [4]]  # the planted units, by the test's own forward
    # each reader's columns of the dead units: c2 reads h1; c3 [h1, h2]; head [h1, h2, h3]
    columns = {
        "c2.weight": dead[0],
        "c3.weight": dead[0] + [4 + u for u in dead[1]],
        "head.weight": dead[0] + [4 + u for u in dead[1]] + [9 + u for u in dead[2]],
    }
    out = folder / f"re.{fmt}"
    arch = ("--arch", spec) if fmt == "pt" else ()
    r = cli("fix", folder / f"m.{fmt}", *arch, "--data", data, "--strategy", "reinit", "--output", out)
    assert r.code == 0, r.out + r.err
    written = _written_state(out, fmt)
    fresh = {"c2.weight": dead[1], "c3.weight": dead[2], "head.weight": []}  # rows redrawn whole
    for name, zeroed in columns.items():
        rows = [u for u in range(state[name].shape[0]) if u not in fresh[name]]
        assert not written[name][rows][:, zeroed].any(), name
        kept = [c for c in range(state[name].shape[1]) if c not in zeroed]
        assert torch.equal(written[name][rows][:, kept], state[name][rows][:, kept]), name
    with torch.no_grad():
        pres_after, output = _dense(written, x)
    for pre, units in zip(pres_after, dead, strict=True):
        assert bool((pre[:, units] > 0).any((0, 2, 3)).all())  # every re-initialised unit fires
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
    if fmt != "pt":
        torch.testing.assert_close(_run(out, fmt, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["onnx", "ts", "pt2"])
def test_prune_follows_nested_concats_and_names_the_layers_narrowed(cli, dense_files, fmt):
    folder, _, net, x, data = dense_files
    state = {k: v.detach() for k, v in net.state_dict().items()}
    with torch.no_grad():
        pres, expected = _dense(state, x)
    dead = _dead(pres)
    out = folder / f"pr.{fmt}"
    r = cli("fix", folder / f"m.{fmt}", "--data", data, "-s", "prune", "-o", out, "--json", "-")
    assert r.code == 0, r.out + r.err
    written = _written_state(out, fmt)
    widths = [4 - len(dead[0]), 5 - len(dead[1]), 6 - len(dead[2])]
    assert [written[f"c{i}.weight"].shape[0] for i in (1, 2, 3)] == widths
    assert written["c2.weight"].shape[1] == widths[0]
    assert written["c3.weight"].shape[1] == widths[0] + widths[1]
    assert written["head.weight"].shape[1] == sum(widths)
    kept = [c for c in range(15) if c not in dead[0] + [4 + u for u in dead[1]] + [9 + u for u in dead[2]]]
    assert torch.equal(written["head.weight"], state["head.weight"][:, kept])
    torch.testing.assert_close(_run(out, fmt, x), expected, rtol=1e-5, atol=1e-5)
    # "new widths" names the layers narrowed (the Conv nodes in ONNX, the modules in torch), not the sites
    layers = ["/c1/Conv", "/c2/Conv", "/c3/Conv"] if fmt == "onnx" else ["c1", "c2", "c3"]
    assert r.json()["new_widths"] == dict(zip(layers, widths, strict=True))


MIX_ARCH = """
import torch
from torch import nn
import torch.nn.functional as F


class Mix(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.p = nn.Conv2d(6, 4, 1)
        self.q = nn.Conv2d(6, 4, 1)
        self.r = nn.Conv2d(4, 5, 1)
        self.fc = nn.Linear(5, 3)
        with torch.no_grad():
            self.stem.bias[2] = -50
            self.r.bias[1] = -50

    def forward(self, x):
        s = F.relu(self.stem(x))
        z = self.r(self.p(s) + self.q(s))
        z = z * (z > 0).float()
        return self.fc(z.mean((2, 3)))


def build():
    return Mix().eval()
"""


def _mix(state: dict, x: torch.Tensor):
    p1 = F.conv2d(x, state["stem.weight"], state["stem.bias"], padding=1)
    s = p1.clamp_min(0)
    h = F.conv2d(s, state["p.weight"], state["p.bias"]) + F.conv2d(s, state["q.weight"], state["q.bias"])
    p2 = F.conv2d(h, state["r.weight"], state["r.bias"])
    return (p1, p2), F.linear(p2.clamp_min(0).mean((2, 3)), state["fc.weight"], state["fc.bias"])


def test_torchscript_fix_reaches_several_readers_and_a_spelled_relu(cli, tmp_path):
    """stem's ReLU is read by p and q; r's ReLU is spelled z * (z > 0).float(). Both were refused in
    TorchScript (eager patches them); the ONNX export's Mul(z, Cast(z > 0)) and the .pt2's (whose
    `.float()` leaves a metadata check reading z > 0) were refused by reinit/prune."""
    net, _ = arch_file(tmp_path / "mix.py", MIX_ARCH)
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((12, 3, 6, 6)).astype(np.float32))
    data = save_npz(tmp_path / "x.npz", input=x.numpy())
    torch.jit.save(torch.jit.script(net), str(tmp_path / "m.ts"))
    torch.onnx.export(
        net, (x[:2],), str(tmp_path / "m.onnx"), input_names=["input"], dynamo=False, opset_version=17,
        dynamic_axes={"input": {0: "b"}},
    )  # fmt: skip
    batch = {0: torch.export.Dim("b", min=1)}
    torch.export.save(torch.export.export(net, (x[:2],), dynamic_shapes=(batch,)), str(tmp_path / "m.pt2"))
    state = {k: v.detach() for k, v in net.state_dict().items()}
    with torch.no_grad():
        pres, expected = _mix(state, x)
    dead = _dead(pres)
    assert dead[0] == [2] and 1 in dead[1]  # the planted units (and r's that the data leaves dead)
    live = [u for u in range(6) if u not in dead[0]]
    for fmt in ("ts", "onnx", "pt2"):
        out = tmp_path / f"re.{fmt}"
        r = cli("fix", tmp_path / f"m.{fmt}", "--data", data, "-s", "reinit", "-o", out)
        assert r.code == 0, r.out + r.err
        written = _written_state(out, fmt)
        for name in ("p.weight", "q.weight"):
            assert not written[name][:, dead[0]].any()
            assert torch.equal(written[name][:, live], state[name][:, live])
        assert not written["fc.weight"][:, dead[1]].any()
        with torch.no_grad():
            pres_after, output = _mix(written, x)
        assert all(bool((p[:, u] > 0).any()) for p, u in zip(pres_after, dead, strict=True))
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(_run(out, fmt, x), expected, rtol=1e-5, atol=1e-5)
    out = tmp_path / "pr.ts"
    r = cli("fix", tmp_path / "m.ts", "--data", data, "-s", "prune", "-o", out)
    assert r.code == 0, r.out + r.err
    written = _written_state(out, "ts")
    assert written["stem.weight"].shape[0] == 5 and written["p.weight"].shape[1] == 5
    assert written["q.weight"].shape[1] == 5 and written["r.weight"].shape[0] == 5 - len(dead[1])
    assert torch.equal(written["fc.weight"], state["fc.weight"][:, [u for u in range(5) if u not in dead[1]]])
    torch.testing.assert_close(_run(out, "ts", x), expected, rtol=1e-5, atol=1e-5)


def test_onnx_bias_shift_of_a_bfloat16_bias_rounds_towards_firing(cli, tmp_path):
    """Weights stored in bfloat16, Cast to float32 before the Gemm (a mixed-precision export). Near -500
    one bfloat16 step is 2, wider than every unit's spread of values: the nearest bfloat16 to the
    computed bias can leave a unit dead; rounded towards firing, every shifted unit fires in the written
    file and one step lower it would not. Live units keep their bias."""
    bf16 = ml_dtypes.bfloat16
    rng = np.random.default_rng(3)
    w = rng.uniform(0.9, 1.1, (16, 8)).astype(bf16)
    b = np.where(np.arange(16) < 12, -1000.0, 0.0).astype(bf16)
    w2 = rng.standard_normal((16, 2)).astype(bf16)
    nodes = [
        helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["w2"], ["w2f"], to=TensorProto.FLOAT),
        helper.make_node("Gemm", ["x", "wf", "bf"], ["h"], name="fc", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu1"),
        helper.make_node("MatMul", ["r", "w2f"], ["y"], name="out"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
        initializer=[numpy_helper.from_array(a, n) for n, a in (("w", w), ("b", b), ("w2", w2))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "bf.onnx"))
    x = (60 + rng.standard_normal((128, 8)) * 0.05).astype(np.float32)
    data = save_npz(tmp_path / "x.npz", x=x)

    def pre(bias: np.ndarray) -> np.ndarray:  # onnxruntime on the graph with the Gemm's output exposed
        graph = onnx.load(str(tmp_path / "bf.onnx"))
        graph.graph.initializer[1].CopyFrom(numpy_helper.from_array(bias, "b"))
        graph.graph.output.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, None))
        session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x})[1]

    before = pre(b)
    assert (before[:, :12] <= 0).all() and (before[:, 12:] > 0).any(0).all()
    spread = (before.max(0) - before.min(0))[:12]
    assert spread.max() < 2  # narrower than one bfloat16 step at the shifted bias
    out = tmp_path / "bs.onnx"
    r = cli("fix", tmp_path / "bf.onnx", "--data", data, "-s", "bias-shift", "-o", out, "--target-rate", "0")
    assert r.code == 0, r.out + r.err
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    moved = stored["b"]
    assert moved.dtype == bf16 and np.array_equal(stored["w"], w)  # written in the file's own dtype
    assert np.array_equal(moved[12:], b[12:])  # live units untouched
    assert (pre(moved)[:, :12] > 0).any(0).all()  # every shifted unit fires as stored
    lower = moved.copy()
    lower[:12] = np.nextafter(moved[:12], np.full(12, -np.inf, bf16))
    assert (pre(lower)[:, :12] <= 0).all()  # one step lower: dead (the bias is the lowest that fires)


def test_fix_and_trend_take_the_flags_a_ci_script_copies_from_scan(cli, tmp_path):
    """--no-progress, -q, --debug, --device, --trust-pickle, --ops, --allow-nonfinite: scan takes them;
    fix and trend refused --no-progress, --ops and --allow-nonfinite ("No such option")."""
    model = relu_onnx(tmp_path / "m.onnx", 4)
    copy = tmp_path / "m2.onnx"
    copy.write_bytes(model.read_bytes())
    x = np.random.default_rng(0).uniform(0.1, 0.4, (8, 4)).astype(np.float32)  # units 0, 1 (b -0.5) dead
    data = save_npz(tmp_path / "x.npz", x=x)
    flags = ("--no-progress", "-q", "--debug", "--device", "cpu", "--trust-pickle", "--ops", "relu")
    flags += ("--allow-nonfinite",)
    r = cli("scan", model, "--data", data, *flags)
    assert r.code == 0, r.err
    out = tmp_path / "leaky.onnx"
    r = cli("fix", model, "--data", data, "-s", "leaky", "-o", out, *flags)
    assert r.code == 0, r.err
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == ["Add", "LeakyRelu"]
    r = cli("trend", model, copy, "--data", data, *flags)
    assert r.code == 0, r.err
    assert "2 checkpoints" in r.out
