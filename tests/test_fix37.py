"""`deadrelu fix` does what it says, checked on the written file: bias-shift revives units whose top
values tie and honours --threshold, reinit's flip honours --threshold, ONNX bias-shift measures gains
(a Gemm's beta, a scale), settles layers in order and moves a LayerNormalization's B, and a fix whose
written file does not revive what it computed exits 1 and writes nothing.

Truth: plain torch forwards on the written state_dict and onnxruntime runs of the written .onnx with
the Relu inputs exposed, computed here (never the tool's report)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from conftest import arch_file, save_npz
from onnx import TensorProto, helper, numpy_helper

HEADER = """
import torch
import torch.nn.functional as F
from torch import nn
"""

TIED = """
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def build():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        # unit 0: pre = x0 - 1, and x0 = 0 (its largest value) on three samples: the top values tie
        net.fc1.weight[0] = torch.tensor([1.0, 0, 0, 0])
        net.fc1.bias[0] = -1.0
        net.fc1.bias[3] = -20.0
    return net
"""


def _tied_data() -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    x[:, 0] = -np.abs(x[:, 0])
    x[[3, 10, 40], 0] = 0.0
    return x


def _pre(model, x: np.ndarray) -> list[torch.Tensor]:
    """The pre-activations of every F.relu call, in call order (our own forward hooks on the Linears)."""
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: seen.append(o.detach())) for m in model.children()]
    with torch.no_grad():
        model(torch.from_numpy(x))
    for hook in hooks:
        hook.remove()
    return seen[:-1]  # the last Linear is the head


def _load(spec: str, path) -> torch.nn.Module:
    import importlib.util

    file, _, factory = spec.rpartition(":")
    module_spec = importlib.util.spec_from_file_location("arch_again_fix37", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    model = getattr(module, factory)()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def _dead(pres: list[torch.Tensor], threshold: float) -> list[list[int]]:
    return [(p.amax(0) <= threshold).nonzero().reshape(-1).tolist() for p in pres]


def _onnx_pre(path, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every Relu's input of the ONNX file at `path`, by Relu node name (onnxruntime, outputs exposed)."""
    model = onnx.load(str(path))
    relus = [n for n in model.graph.node if n.op_type == "Relu"]
    del model.graph.output[:]
    for node in relus:
        model.graph.output.append(helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = session.run(None, {session.get_inputs()[0].name: x})
    return {node.name: out.reshape(-1, out.shape[-1]) for node, out in zip(relus, outs, strict=True)}


def test_bias_shift_revives_units_whose_top_values_tie(cli, tmp_path):
    """A dead unit whose largest pre-activation is reached on three samples at once: the shift must put
    those tied values above the threshold (they fire together), not on it (main left the unit dead and
    wrote the file, exit 0). state_dict and ONNX."""
    x = _tied_data()
    model, spec = arch_file(tmp_path / "arch.py", HEADER + TIED)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    save_npz(tmp_path / "calib.npz", input=x)
    dead = _dead(_pre(model, x), 0.0)
    assert dead[0] == [0, 3]
    out = tmp_path / "out.pt"
    result = cli(
        "fix", tmp_path / "model.pt", "--arch", spec, "--data", tmp_path / "calib.npz",
        "--strategy", "bias-shift", "--output", out,
    )  # fmt: skip
    assert result.code == 0, result.out + result.err
    after = _pre(_load(spec, out), x)
    for layer, units in enumerate(dead):
        fired = (after[layer][:, units] > 0).sum(0)
        assert (fired >= 1).all(), (layer, fired)
    assert int((after[0][:, 0] > 0).sum()) == 3  # the three tied values fire together

    torch.onnx.export(
        model, (torch.from_numpy(x[:2]),), str(tmp_path / "model.onnx"), input_names=["input"],
        dynamic_axes={"input": {0: "b"}}, dynamo=False, opset_version=17,
    )  # fmt: skip
    out2 = tmp_path / "out.onnx"
    result = cli(
        "fix", tmp_path / "model.onnx", "--data", tmp_path / "calib.npz", "--strategy", "bias-shift",
        "--output", out2,
    )  # fmt: skip
    assert result.code == 0, result.out + result.err
    pre = list(_onnx_pre(out2, x).values())
    assert int((pre[0][:, 0] > 0).sum()) == 3 and int((pre[0][:, 3] > 0).sum()) >= 1


def test_bias_shift_units_exceed_the_threshold(cli, tmp_path):
    """--threshold 0.5: a shifted unit must exceed 0.5 on the data, not 0 (main moved them to 0 and
    failed: "revived none"). Every unit dead at 0.5 in our own forward fires above 0.5 in the written
    file, on a few values each; state_dict and ONNX agree."""
    x = _tied_data()
    model, spec = arch_file(tmp_path / "arch.py", HEADER + TIED)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    save_npz(tmp_path / "calib.npz", input=x)
    dead = _dead(_pre(model, x), 0.5)
    assert sum(map(len, dead)) >= 4
    out = tmp_path / "out.pt"
    common = ("--data", tmp_path / "calib.npz", "--strategy", "bias-shift", "--threshold", "0.5")
    result = cli("fix", tmp_path / "model.pt", "--arch", spec, *common, "--output", out)
    assert result.code == 0, result.out + result.err
    after = _pre(_load(spec, out), x)
    for layer, units in enumerate(dead):
        fired = (after[layer][:, units] > 0.5).sum(0)
        assert (fired >= 1).all() and (fired <= 3).all(), (layer, fired)

    torch.onnx.export(
        model, (torch.from_numpy(x[:2]),), str(tmp_path / "model.onnx"), input_names=["input"],
        dynamic_axes={"input": {0: "b"}}, dynamo=False, opset_version=17,
    )  # fmt: skip
    out2 = tmp_path / "out.onnx"
    result = cli("fix", tmp_path / "model.onnx", *common, "--output", out2)
    assert result.code == 0, result.out + result.err
    for layer, pre in enumerate(_onnx_pre(out2, x).values()):
        fired = (pre[:, dead[layer]] > 0.5).sum(0)
        assert (fired >= 1).all() and (fired <= 3).all(), (layer, fired)


FLIP = """
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(2, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def build():
    torch.manual_seed(1)
    net = Net()
    with torch.no_grad():
        net.fc1.weight[:4] = torch.tensor([[1.0, 1.0]])
        net.fc1.bias[:4] = 1.0
        net.fc1.bias[4:] = -100.0  # units 4..7 never fire
    return net
"""


def _flip_data() -> np.ndarray:
    """x = c * [1, 1]: c = 0.01 on all samples but one, where c = -10. A fresh row w makes
    pre = c * (w0 + w1): at most 0.01 * |w0 + w1| < 0.05 on the many samples, 10 * |w0 + w1| on the one."""
    x = np.full((32, 2), 0.01, np.float32)
    x[7] = -10.0
    return x


def test_reinit_flip_honours_the_threshold(cli, tmp_path):
    """--threshold 0.05: a redrawn row with w0 + w1 > 0 peaks at 0.01 * (w0 + w1), above 0 but not above
    0.05, while its negation reaches 10 * (w0 + w1) on one sample. The flip must decide on 0.05 (main
    decided on 0 and left those units dead at 0.05, exit 0). Outputs stay exact; every redrawn unit
    fires above 0.05 in the written file (ONNX too)."""
    x = _flip_data()
    model, spec = arch_file(tmp_path / "arch.py", HEADER + FLIP)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    save_npz(tmp_path / "calib.npz", input=x)
    assert _dead(_pre(model, x), 0.05) == [[4, 5, 6, 7]]
    common = ("--data", tmp_path / "calib.npz", "--strategy", "reinit", "--threshold", "0.05")
    out = tmp_path / "out.pt"
    result = cli("fix", tmp_path / "model.pt", "--arch", spec, *common, "--output", out)
    assert result.code == 0, result.out + result.err
    fixed = _load(spec, out)
    rows = fixed.fc1.weight[4:].detach()
    assert (rows.sum(1).abs() > 0.005).all()  # (so each unit can exceed 0.05 one way or the other)
    pre = _pre(fixed, x)[0]
    assert (pre[:, 4:].amax(0) > 0.05).all(), pre[:, 4:].amax(0)
    with torch.no_grad():
        assert torch.equal(fixed(torch.from_numpy(x)), model(torch.from_numpy(x)))

    torch.onnx.export(
        model, (torch.from_numpy(x[:2]),), str(tmp_path / "model.onnx"), input_names=["input"],
        dynamic_axes={"input": {0: "b"}}, dynamo=False, opset_version=17,
    )  # fmt: skip
    out2 = tmp_path / "out.onnx"
    result = cli("fix", tmp_path / "model.onnx", *common, "--output", out2)
    assert result.code == 0, result.out + result.err
    (pre,) = _onnx_pre(out2, x).values()
    assert (pre[:, 4:].max(0) > 0.05).all(), pre[:, 4:].max(0)


GATED = """
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        gate = 1.0 - 0.5 * x[:, :1]  # 1 on the first 16 samples, 0.5 after: a gain the first 16 hide
        h = F.relu(self.fc1(x) * gate)
        return self.fc3(F.relu(self.fc2(h)))


def build():
    torch.manual_seed(3)
    net = Net()
    with torch.no_grad():
        net.fc1.weight[:2] = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
        net.fc1.bias[:2] = -10.0
        net.fc2.bias[0] = -30.0
    return net
"""


def test_a_fix_whose_file_does_not_revive_what_it_computed_fails(cli, tmp_path):
    """Two layers; fc1's units 0 and 1 are dead and reach fc1 through a data-dependent gain that is 1 on
    the 16 samples bias-shift measures gains on and 0.5 later. Unit 1 peaks on the first samples and
    revives; unit 0 peaks later, where the shift moves it by half, and stays dead in the written file.
    main wrote that file (exit 0, "revived 2 of the 3"); the verification must compare each unit with
    what the shift was computed for: exit 1, the layer named, nothing written."""
    rng = np.random.default_rng(0)
    x = np.zeros((64, 3), np.float32)
    x[16:, 0] = 1.0
    x[:16, 1] = 8.0 + 0.1 * rng.standard_normal(16)  # unit 1: -2 on the first 16, -5 after
    x[16:, 2] = 3.0 + 0.1 * rng.standard_normal(48)  # unit 0: -10 on the first 16, about -3.5 after
    model, spec = arch_file(tmp_path / "arch.py", HEADER + GATED)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    save_npz(tmp_path / "calib.npz", input=x)
    out = tmp_path / "out.pt"
    result = cli(
        "fix", tmp_path / "model.pt", "--arch", spec, "--data", tmp_path / "calib.npz",
        "--strategy", "bias-shift", "--output", out,
    )  # fmt: skip
    assert result.code == 1, result.out + result.err
    assert not out.exists()
    assert "never exceed --threshold 0" in result.out and "relu" in result.out, result.out
    # the truth behind the verdict: with --force, the written file's unit 0 never fires, unit 1 does
    result = cli(
        "fix", tmp_path / "model.pt", "--arch", spec, "--data", tmp_path / "calib.npz",
        "--strategy", "bias-shift", "--output", out, "--force",
    )  # fmt: skip
    fixed = _load(spec, out)
    with torch.no_grad():
        xt = torch.from_numpy(x)
        pre = fixed.fc1(xt) * (1.0 - 0.5 * xt[:, :1])
    assert float(pre[:, 0].max()) <= 0 < float(pre[:, 1].max())


F32 = TensorProto.FLOAT


def _onnx(path, nodes, inits, opset=17):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", F32, ["N", 4])],
        [helper.make_tensor_value_info("y", F32, ["N", 2])],
        initializer=[numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _onnx_weights(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((6, 4)) * 0.5,
        "b": np.array([0.5, -9.0, 0.2, -7.0, 0.1, 0.3]),
        "w2": rng.standard_normal((6, 2)),
    }


def test_onnx_bias_shift_measures_the_gain_of_a_scale(cli, tmp_path):
    """Gemm(beta=2) -> Relu, and Gemm -> Mul(4) -> Relu: moving the bias by d moves the pre-activation
    by 2d / 4d. The dead units must fire on --target-rate of the data (main: beta made them fire on far
    more and failed verification; the Mul was skipped, nothing patched)."""
    x = np.random.default_rng(1).standard_normal((200, 4)).astype(np.float32)
    save_npz(tmp_path / "calib.npz", x=x)
    weights = _onnx_weights()
    cases = {
        "beta": [helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc", transB=1, beta=2.0)],
        "mul": [
            helper.make_node("Gemm", ["x", "w", "b"], ["g"], name="fc", transB=1),
            helper.make_node("Mul", ["g", "four"], ["h"], name="scale"),
        ],
    }
    for case, head in cases.items():
        nodes = [
            *head,
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ]
        _onnx(tmp_path / f"{case}.onnx", nodes, {**weights, "four": np.array(4.0)})
        out = tmp_path / f"{case}-fixed.onnx"
        result = cli(
            "fix", tmp_path / f"{case}.onnx", "--data", tmp_path / "calib.npz", "--strategy", "bias-shift",
            "--target-rate", "0.05", "--output", out,
        )  # fmt: skip
        assert result.code == 0, (case, result.out + result.err)
        pre = _onnx_pre(out, x)["relu"]
        assert (pre[:, [1, 3]] > 0).sum(0).tolist() == [10, 10], case  # 5% of 200
        before = _onnx_pre(tmp_path / f"{case}.onnx", x)["relu"]
        assert np.array_equal(before[:, [0, 2, 4, 5]], pre[:, [0, 2, 4, 5]])


def test_onnx_bias_shift_settles_later_layers_after_earlier_ones(cli, tmp_path):
    """Gemm -> Relu -> Gemm -> Relu: reviving fc1's unit 1 feeds fc2's dead unit 0 through a large weight,
    so fc2's shift computed on the original model is stale. Like the torch path, the ONNX fix must
    rerun in order: both units fire on exactly --target-rate of the data (main: fc2's unit fired far
    above it and the fix failed verification)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((200, 4)).astype(np.float32)
    save_npz(tmp_path / "calib.npz", x=x)
    w2 = rng.standard_normal((6, 6)) * 0.3
    w2[0, 1] = 40.0  # fc2 unit 0 reads fc1 unit 1 strongly
    b2 = np.array([-6.0, 0.2, 0.3, 0.1, 0.2, 0.4])
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["h1"], name="fc1", transB=1),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], name="fc2", transB=1),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("MatMul", ["r2", "w3"], ["y"], name="head"),
    ]
    weights = _onnx_weights()
    _onnx(
        tmp_path / "m.onnx",
        nodes,
        {"w": weights["w"], "b": weights["b"], "w2": w2, "b2": b2, "w3": rng.standard_normal((6, 2))},
    )
    before = _onnx_pre(tmp_path / "m.onnx", x)
    assert before["relu1"][:, 1].max() <= 0 and before["relu2"][:, 0].max() <= 0
    out = tmp_path / "fixed.onnx"
    result = cli(
        "fix", tmp_path / "m.onnx", "--data", tmp_path / "calib.npz", "--strategy", "bias-shift",
        "--target-rate", "0.05", "--output", out,
    )  # fmt: skip
    assert result.code == 0, result.out + result.err
    after = _onnx_pre(out, x)
    assert int((after["relu1"][:, 1] > 0).sum()) == 10
    assert int((after["relu2"][:, 0] > 0).sum()) == 10, int((after["relu2"][:, 0] > 0).sum())


def test_onnx_layer_normalization_beta_is_shifted_and_refused_clearly(cli, tmp_path):
    """MatMul + Add -> LayerNormalization -> Relu: bias-shift moves the LayerNormalization's B (one value
    per unit, right before the Relu): the dead units fire on --target-rate, every other unit is
    unchanged. reinit (no weight rows make the units) and a LayerNormalization over two axes (its B is
    not per unit) are refused in one line naming it (main: "not produced by a Conv, Gemm…")."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 4)).astype(np.float32)
    save_npz(tmp_path / "calib.npz", x=x)
    beta = np.array([0.1, -20.0, 0.2, 0.0, -20.0, 0.3])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "b"], ["a"], name="bias"),
        helper.make_node("LayerNormalization", ["a", "gamma", "beta"], ["h"], name="ln", axis=-1),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="head"),
    ]
    inits = {
        "w": rng.standard_normal((4, 6)),
        "b": np.zeros(6),
        "gamma": np.ones(6),
        "beta": beta,
        "w2": rng.standard_normal((6, 2)),
    }
    _onnx(tmp_path / "ln.onnx", nodes, inits)
    out = tmp_path / "ln-fixed.onnx"
    common = ("--data", tmp_path / "calib.npz", "--target-rate", "0.05")
    result = cli("fix", tmp_path / "ln.onnx", *common, "--strategy", "bias-shift", "--output", out)
    assert result.code == 0, result.out + result.err
    before, after = _onnx_pre(tmp_path / "ln.onnx", x)["relu"], _onnx_pre(out, x)["relu"]
    assert (after[:, [1, 4]] > 0).sum(0).tolist() == [10, 10]
    assert np.array_equal(before[:, [0, 2, 3, 5]], after[:, [0, 2, 3, 5]])

    result = cli(
        "fix", tmp_path / "ln.onnx", *common, "--strategy", "reinit", "--output", tmp_path / "r.onnx"
    )
    assert result.code == 2 and "LayerNormalization ln" in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1

    # over the last two axes of [N, 2, 3]: B is [2, 3], not one value per unit
    nodes = [
        helper.make_node("Reshape", ["x6", "shape"], ["x3"]),
        helper.make_node("LayerNormalization", ["x3", "gamma", "beta"], ["h"], name="ln2", axis=1),
        helper.make_node("Relu", ["h"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x6", F32, ["N", 6])],
        [helper.make_tensor_value_info("y", F32, ["N", 2, 3])],
        initializer=[
            numpy_helper.from_array(np.array([-1, 2, 3], np.int64), "shape"),
            numpy_helper.from_array(np.ones((2, 3), np.float32), "gamma"),
            numpy_helper.from_array(np.full((2, 3), -20.0, np.float32), "beta"),
        ],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "ln2.onnx"))
    save_npz(tmp_path / "x6.npz", x6=rng.standard_normal((20, 6)).astype(np.float32))
    result = cli(
        "fix", tmp_path / "ln2.onnx", "--data", tmp_path / "x6.npz", "--strategy", "bias-shift",
        "--output", tmp_path / "o2.onnx",
    )  # fmt: skip
    assert result.code == 2 and "LayerNormalization ln2" in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1


def test_firing_cuts_put_tied_values_on_one_side():
    """Per column, exactly `count` values exceed the cut (counted here with numpy), at least one, and
    no value equals it; a column without ties at the k-th value keeps k = round(rate * n)."""
    from deadrelu_cli.fixes.plan import firing_cuts

    rng = np.random.default_rng(5)
    values = rng.standard_normal((100, 5))
    values[:, 1] = np.where(np.arange(100) < 4, 7.0, values[:, 1])  # the top four tie
    values[:, 2] = -3.0  # constant
    values[:, 3] = np.round(values[:, 3])  # many ties everywhere
    values[:, 4] = np.float32(np.float32(2.0) + np.arange(100, dtype=np.float32) * np.float32(2.0**-22))
    cuts, counts = firing_cuts(values.astype(np.float32).astype(np.float64), 0.02)
    above = (values > cuts).sum(axis=0)
    assert above.tolist() == counts.tolist()
    assert (counts >= 1).all() and not (values == cuts).any()
    assert counts[0] == 2 and counts[1] == 4 and counts[2] == 100
    # adjacent float32 values (one rounding apart) count as tied: no gap wider than that, so all fire
    assert counts[4] == 100 and values[:, 4].min() - cuts[4] >= 1.0
