"""What a new user trips over (issue 23), one test per class, each against ground truth computed here:
CI logs at full width, static-batch .pt2 fixes, [1, N] biases, MACs from shapes, input mismatches,
trend order, exit codes, If-branch sample counts, n/c reasons, index clamps, --holdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import ROOT, arch_file
from onnx import TensorProto, helper, numpy_helper
from onnx_graphs import F32, gemm_relu
from torch import nn

DEAD = [2, 5]


def _model(nodes, inputs, outputs, inits, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _run(path, x) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _initializers(path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


# 1. CI logs: without a terminal, whole rows ----------------------------------------------------------


def test_piped_output_keeps_whole_rows(tmp_path):
    model = gemm_relu()
    long_name = "/encoder/layers.11/feed_forward/intermediate_dense/activation_fn/Relu_" + "x" * 40
    for node in model.graph.node:
        if node.op_type == "Relu":
            node.name = long_name
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    w, b = (numpy_helper.to_array(i) for i in model.graph.initializer[:2])
    pre = x @ w.T + b  # Gemm with transB
    dead = int(((pre > 0).sum(0) == 0).sum())
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | {"PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "deadrelu_cli", "scan", "m.onnx", "--data", "d.npz"]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "m.onnx (onnx) · d.npz · 64 samples"  # the header on one line
    header = next(line for line in lines if line.startswith("Layer"))
    assert header.split() == "Layer Op Units Dead Dead % Dying Dormant Median Rates".split()
    row = next(line for line in lines if line.startswith(long_name))  # the name whole, on one line
    rates = (pre > 0).mean(0)
    dying = int(((rates > 0) & (rates < 0.01)).sum())
    expected = ["relu", "8", str(dead), f"{100 * dead / 8:.1f}%", str(dying)]
    assert row.split()[1:6] == expected
    assert row.split()[7] == f"{100 * np.median(rates):.1f}%"  # after Dormant: the Median column
    bar = "█" * round(8 * dead / 8) + "·" * (8 - round(8 * dead / 8))
    assert row.split()[8] == bar and row.rstrip()[-1] != "·"  # the Rates column follows the bar
    # an explicit $COLUMNS is respected (a terminal-like width)
    narrow = subprocess.run(
        command, cwd=tmp_path, env=env | {"COLUMNS": "60"}, capture_output=True, text=True, timeout=120
    )
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 60


# 2. fix on a .pt2 exported with a static (or constrained) batch -------------------------------------


def _planted_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with torch.no_grad():
        model[0].bias[DEAD] = -50.0
    return model


def _user_input_shape(program) -> list:
    from torch.export.graph_signature import InputKind

    spec = next(s for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT)
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == spec.arg.name)
    return list(node.meta["val"].shape)


@pytest.mark.parametrize("strategy", ["leaky", "elu", "reinit", "bias-shift", "prune", "kick"])
def test_static_batch_pt2_through_every_fix(cli, tmp_path, strategy):
    model = _planted_mlp()
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    torch.export.save(torch.export.export(model, (x[:4],)), tmp_path / "m.pt2")  # static batch 4
    np.savez(tmp_path / "d.npz", x=x.numpy())
    out = tmp_path / "fixed.pt2"
    # a default kick cannot lift a -50 bias (verification fails): --force, the point here is the batch
    force = ("--force",) if strategy == "kick" else ()
    result = cli(
        "fix",
        tmp_path / "m.pt2",
        "--data",
        tmp_path / "d.npz",
        "--strategy",
        strategy,
        "--output",
        out,
        *force,
    )
    assert result.code == 0, result.err
    fixed = torch.export.load(str(out))
    assert _user_input_shape(fixed) == [4, 4]  # static stays static
    with torch.no_grad():
        got = torch.cat([fixed.module()(x[i : i + 4]) for i in range(0, 16, 4)])
        if strategy in ("reinit", "prune"):  # exact strategies: the original's outputs, by plain torch
            torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)
        if strategy == "prune":
            assert fixed.module().get_parameter("0.weight").shape == (6, 4)


def test_constrained_batch_pt2_keeps_its_range(cli, tmp_path):
    model = _planted_mlp()
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    batch = torch.export.Dim("batch", min=2, max=32)
    program = torch.export.export(model, (x[:4],), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "m.pt2")
    np.savez(tmp_path / "d.npz", x=x.numpy())
    out = tmp_path / "fixed.pt2"
    result = cli(
        "fix", tmp_path / "m.pt2", "--data", tmp_path / "d.npz", "--strategy", "leaky", "--output", out
    )
    assert result.code == 0, result.err
    fixed = torch.export.load(str(out))
    (bounds,) = fixed.range_constraints.values()
    assert (int(bounds.lower), int(bounds.upper)) == (2, 32)
    slope = torch.nn.functional.leaky_relu
    with torch.no_grad():
        expected = model[2](slope(model[0](x), 0.01))
        torch.testing.assert_close(fixed.module()(x), expected, rtol=1e-5, atol=1e-5)


# 3. a bias stored as [1, N] -------------------------------------------------------------------------


def _bias_model(producer: str, bias_shape: tuple[int, ...]):
    """x[B,4] -> MatMul + Add(bias) or Gemm(C=bias) -> Relu -> MatMul(W2) -> y; units 2 and 5 dead."""
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((4, 8)) * 0.5).astype(np.float32)
    b = np.full(8, 0.1, np.float32)
    b[DEAD] = -50.0
    w2 = rng.standard_normal((8, 2)).astype(np.float32)
    if producer == "matmul":
        nodes = [
            helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
            helper.make_node("Add", ["m", "b"], ["h"], name="bias_add"),
        ]
    else:
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="gemm")]
    nodes += [
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="out"),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", F32, ["B", 4])],
        [helper.make_tensor_value_info("y", F32, ["B", 2])],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(b.reshape(bias_shape), "b"),
            numpy_helper.from_array(w2, "w2"),
        ],
    )
    return model, w, b, w2


@pytest.mark.parametrize("producer", ["matmul", "gemm"])
@pytest.mark.parametrize("bias_shape", [(8,), (1, 8)])
@pytest.mark.parametrize("strategy", ["prune", "reinit", "bias-shift"])
def test_bias_with_leading_ones_is_the_producers(cli, tmp_path, producer, bias_shape, strategy):
    model, w, b, w2 = _bias_model(producer, bias_shape)
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(5).standard_normal((64, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    out = tmp_path / "fixed.onnx"
    result = cli(
        "fix", tmp_path / "m.onnx", "--data", tmp_path / "d.npz", "--strategy", strategy, "--output", out
    )
    assert result.code == 0, result.out + result.err
    stored = _initializers(out)
    original = np.maximum(x @ w + b, 0) @ w2  # numpy, by hand
    kept = [u for u in range(8) if u not in DEAD]
    if strategy == "prune":
        assert stored["b"].shape == bias_shape[:-1] + (6,)  # narrowed, its layout kept
        np.testing.assert_array_equal(stored["b"].reshape(-1), b[kept])
        np.testing.assert_array_equal(stored["w"], w[:, kept])
        np.testing.assert_array_equal(stored["w2"], w2[kept])
    else:
        assert stored["b"].shape == bias_shape
    if strategy in ("prune", "reinit"):
        np.testing.assert_allclose(_run(out, x), original, rtol=1e-5, atol=1e-5)
    if strategy == "reinit":
        assert np.all(stored["b"].reshape(-1)[DEAD] == 0) and np.all(stored["w2"][DEAD] == 0)
    if strategy == "bias-shift":
        pre = x @ w + stored["b"].reshape(-1)
        assert np.all((pre[:, DEAD] > 0).sum(0) >= 1)  # the shifted units fire now
        np.testing.assert_array_equal(stored["b"].reshape(-1)[kept], b[kept])


# 4. MACs from inferred shapes, against a hand count -------------------------------------------------


CNN_SOURCE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.conv1.bias[[1, 5]] = -50.0
    return net
"""
# per sample of 3x16x16: conv1 16*16*8 outputs x 3*3*3; conv2 8*8*16 outputs x 8*3*3; fc 16*4
MACS_BEFORE = 16 * 16 * 8 * 27 + 8 * 8 * 16 * 72 + 16 * 4
MACS_AFTER = 16 * 16 * 6 * 27 + 8 * 8 * 16 * 54 + 16 * 4  # conv1 8 -> 6 units, conv2 loses 2 inputs


def test_prune_macs_match_a_hand_count(cli, tmp_path):
    net, spec = arch_file(tmp_path / "net.py", CNN_SOURCE)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    np.savez(tmp_path / "d.npz", x=x.numpy())
    # ONNX with height and width symbolic: only shape inference on the data's shapes can size the convs
    torch.onnx.export(
        net,
        (x[:2],),
        str(tmp_path / "m.onnx"),
        input_names=["x"],
        dynamo=False,
        opset_version=17,
        dynamic_axes={"x": {0: "batch", 2: "h", 3: "w"}},
    )
    torch.save(net.state_dict(), tmp_path / "m.pt")
    line = f"MACs per sample (Conv/Linear/MatMul) {MACS_BEFORE:,} → {MACS_AFTER:,}"
    for model, extra, out in (("m.onnx", [], "p.onnx"), ("m.pt", ["--arch", spec], "p.pt2")):
        result = cli(
            "fix", tmp_path / model, *extra, "--data", tmp_path / "d.npz", "--strategy", "prune",
            "--output", tmp_path / out,
        )  # fmt: skip
        assert result.code == 0, result.err
        assert line in result.out, (model, result.out)


# 5. data that does not fit the model's inputs --------------------------------------------------------


def test_mismatch_names_both_sides(cli, tmp_path):
    onnx.save(gemm_relu(), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", image=np.zeros((5, 4), np.float32), mask=np.zeros((5, 2), np.int64))
    result = cli("scan", tmp_path / "m.onnx", "--data", tmp_path / "d.npz")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert "the file holds image[5, 4] float32, mask[5, 2] int64" in result.err
    assert "the model's inputs are x[?, 4] float32" in result.err


# 6. trend: each file by its own step, else its name -------------------------------------------------


def test_trend_orders_each_file_by_its_own_step(cli, tmp_path):
    from deadrelu_cli.trend import order_checkpoints

    state = _planted_mlp().state_dict()
    files = {
        "ckpt-100.pt": {"global_step": 300, "state_dict": state},  # its name is misleading
        "ckpt-200.pt": {"state_dict": state},
        "ckpt-400.pt": {"state_dict": state},
        "ckpt-250.pt": {"epoch": 250, "state_dict": state},
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    ordered, notes = order_checkpoints([tmp_path / n for n in files])
    assert [c.path.name for c in ordered] == ["ckpt-200.pt", "ckpt-250.pt", "ckpt-100.pt", "ckpt-400.pt"]
    assert [c.step for c in ordered] == [200, 250, 300, 400]
    assert notes == [
        "ckpt-100.pt: global_step 300 in the file but 100 in its name; placed by its global_step"
    ]
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 4), np.float32))
    source = "from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))\n"
    _, spec = arch_file(tmp_path / "arch.py", source)
    result = cli("trend", *[tmp_path / n for n in files], "--data", tmp_path / "d.npz", "--arch", spec)
    assert result.code == 0, result.err
    assert "ordered by file name and checkpoint" in result.out
    assert "note: ckpt-100.pt: global_step 300 in the file but 100 in its name" in result.out


# 7. exit codes ---------------------------------------------------------------------------------------


def test_fix_with_nothing_to_fix_succeeds(cli, tmp_path):
    onnx.save(gemm_relu(bias=[0.5] * 8), tmp_path / "m.onnx")  # no unit is dead on this data
    x = np.random.default_rng(0).standard_normal((32, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    out = tmp_path / "fixed.onnx"
    result = cli(
        "fix", tmp_path / "m.onnx", "--data", tmp_path / "d.npz", "--strategy", "prune", "--output", out
    )
    assert result.code == 0, result.err
    assert "no dead units (8 units in 1 layers); nothing to fix, nothing written" in result.out
    assert not out.exists()
    as_json = cli(
        "fix", tmp_path / "m.onnx", "--data", tmp_path / "d.npz", "--strategy", "prune", "--output", out,
        "--json", "-",
    )  # fmt: skip
    assert as_json.code == 0 and as_json.json()["nothing_to_fix"] is True and not as_json.json()["written"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["scan", "--bogus"], "deadrelu: error: No such option: --bogus"),
        (["fix", "m.onnx"], "deadrelu: error: Missing option '--data'"),
        (["scan", "m.onnx", "--dying", "lots"], "deadrelu: error: Invalid value for '--dying'"),
        (["sacn"], "deadrelu: error: No such command 'sacn'"),
    ],
)
def test_usage_errors_are_one_line(args, message):
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "deadrelu_cli", *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(message) and "╭" not in proc.stderr


# 8. truth in the table -------------------------------------------------------------------------------


def _if_on_data():
    """If(ReduceMax(x) > 0) then Relu(x @ Wt) else Relu(x @ We): the branch depends on each batch."""
    rng = np.random.default_rng(6)
    wt, we = rng.standard_normal((4, 5)).astype(np.float32), rng.standard_normal((4, 5)).astype(np.float32)

    def branch(name, weight):
        nodes = [
            helper.make_node("MatMul", ["x", weight], [f"{name}_m"], name=f"{name}_mm"),
            helper.make_node("Relu", [f"{name}_m"], [f"{name}_out"], name=f"{name}_relu"),
        ]
        return helper.make_graph(
            nodes, name, [], [helper.make_tensor_value_info(f"{name}_out", F32, ["N", 5])]
        )

    nodes = [
        helper.make_node("ReduceMax", ["x"], ["peak"], keepdims=0, name="peak"),
        helper.make_node("Greater", ["peak", "zero"], ["cond"], name="cond"),
        helper.make_node(
            "If",
            ["cond"],
            ["y"],
            name="gate",
            then_branch=branch("then", "wt"),
            else_branch=branch("else", "we"),
        ),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", F32, ["N", 4])],
        [helper.make_tensor_value_info("y", F32, ["N", 5])],
        [
            numpy_helper.from_array(wt, "wt"),
            numpy_helper.from_array(we, "we"),
            numpy_helper.from_array(np.float32(0), "zero"),
        ],
    )
    return model


def test_if_branch_layers_show_the_samples_they_saw(cli, tmp_path):
    onnx.save(_if_on_data(), tmp_path / "m.onnx")
    rng = np.random.default_rng(7)
    x = -np.abs(rng.standard_normal((20, 4))).astype(np.float32)
    x[4:8] = np.abs(x[4:8])  # the second batch of 4 takes the then branch, the others the else branch
    np.savez(tmp_path / "d.npz", x=x)
    batches = [x[i : i + 4] for i in range(0, 20, 4)]
    then_samples = sum(len(b) for b in batches if b.max() > 0)  # counted here, batch by batch
    result = cli(
        "scan", tmp_path / "m.onnx", "--data", tmp_path / "d.npz", "--batch-size", "4", "--json", "-"
    )
    assert result.code == 0, result.err
    samples = {layer["name"]: layer["samples"] for layer in result.json()["layers"]}
    assert samples == {
        "gate/then_branch/then_relu": then_samples,
        "gate/else_branch/else_relu": 20 - then_samples,
    }
    table = cli("scan", tmp_path / "m.onnx", "--data", tmp_path / "d.npz", "--batch-size", "4")
    header = next(line for line in table.out.splitlines() if line.startswith("Layer"))
    assert header.split()[:4] == ["Layer", "Op", "Units", "Samples"]
    row = next(line for line in table.out.splitlines() if line.startswith("gate/then_branch/then_relu"))
    assert row.split()[3] == str(then_samples)


def test_certify_table_says_why_not_certified(cli, tmp_path):
    # Relu -> Erf -> MatMul -> Relu: the certifier does not bound Erf, so the second layer is n/c
    rng = np.random.default_rng(8)
    w1, w2 = rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal((6, 3)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
        helper.make_node("Relu", ["a"], ["r1"], name="first"),
        helper.make_node("Erf", ["r1"], ["e"], name="erf"),
        helper.make_node("MatMul", ["e", "w2"], ["c"], name="mm2"),
        helper.make_node("Relu", ["c"], ["y"], name="second"),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", F32, ["N", 4])],
        [helper.make_tensor_value_info("y", F32, ["N", 3])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((16, 4)).astype(np.float32))
    result = cli("scan", tmp_path / "m.onnx", "--data", tmp_path / "d.npz", "--input-range", "-1", "1")
    assert result.code == 0, result.err
    layers = {layer["name"]: layer for layer in cli(
        "scan", tmp_path / "m.onnx", "--data", tmp_path / "d.npz", "--input-range", "-1", "1", "--json", "-"
    ).json()["layers"]}  # fmt: skip
    note = layers["second"]["certify_note"]
    assert layers["second"]["certified_dead_indices"] is None and "Erf" in note
    row = next(line for line in result.out.splitlines() if line.startswith("second"))
    assert "n/c" in row and row.rstrip().endswith(note)
    assert "Why not certified" in result.out


def test_index_clamps_are_not_activation_sites(cli, tmp_path):
    rng = np.random.default_rng(9)
    table = rng.standard_normal((7, 6)).astype(np.float32)  # Clip(ids, 0, 6): shaped like a ReLU6
    nodes = [  # position ids clamped to the table, then looked up; then a real ReLU
        helper.make_node("Clip", ["ids", "lo", "hi"], ["safe"], name="clamp_ids"),
        helper.make_node("Gather", ["table", "safe"], ["emb"], name="lookup"),
        helper.make_node("Relu", ["emb"], ["y"], name="act"),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("y", F32, ["N", 6])],
        [
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(np.int64(0), "lo"),
            numpy_helper.from_array(np.int64(6), "hi"),
        ],
    )
    onnx.save(model, tmp_path / "m.onnx")
    result = cli("inspect", tmp_path / "m.onnx")
    assert result.code == 0, result.err
    assert "1 activation sites" in result.out and "clamp_ids" not in result.out and "act" in result.out


# 9. --holdout ------------------------------------------------------------------------------------------


def test_holdout_catches_units_dead_only_on_the_scanned_part(cli, tmp_path):
    model, w, b, w2 = _bias_model("matmul", (8,))
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(10).standard_normal((50, 4)).astype(np.float32)
    x[40:, 0] = 200.0 * np.sign(w[0, 2])  # the last 10 samples push unit 2 past its bias of -50
    np.savez(tmp_path / "d.npz", x=x)
    pre = x @ w + b
    assert (pre[:40, 2] <= 0).all() and (pre[40:, 2] > 0).any()  # ground truth: dead on 40, alive on 10
    out = tmp_path / "fixed.onnx"
    plain = cli(
        "fix", tmp_path / "m.onnx", "--data", tmp_path / "d.npz", "--strategy", "prune", "--output", out
    )
    assert plain.code == 0 and "--holdout" in plain.out  # the whole data: unit 2 fires, only 5 is pruned
    held = cli(
        "fix", tmp_path / "m.onnx", "--data", tmp_path / "d.npz", "--strategy", "prune",
        "--output", tmp_path / "held.onnx", "--holdout", "0.2", "--json", "-",
    )  # fmt: skip
    assert held.code == 1  # pruning unit 2 changes outputs on the 10 held-out samples: nothing written
    report = held.json()
    assert report["holdout_samples"] == 10 and report["scanned_samples"] == 40
    assert report["holdout_fired"] == {"relu": [2]}
    assert not (tmp_path / "held.onnx").exists()
    expected = np.abs(np.maximum(pre[40:], 0)[:, [2]] @ w2[[2]]).max()  # what dropping unit 2 removes
    assert report["holdout_max_abs_diff"] == pytest.approx(expected, rel=1e-4)
    assert json.dumps(report)  # plain JSON
