"""deadrelu fix: every strategy, torch and ONNX, checked against plain torch / onnxruntime runs."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import ROOT
from onnx_graphs import stored_tensors
from truth import onnx_relu_io, sample_cnn, sample_cnn_truth, truth_of

CNN = ROOT / "sample_models" / "cnn"
MLP = ROOT / "sample_models" / "mlp"


def _arch(folder):
    return str(folder / "arch.py") + ":build"


def _load_cnn(state_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cnn_arch_for_test", CNN / "arch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.SmallCNN()
    model.load_state_dict(torch.load(state_path, weights_only=True), strict=True)  # strict: same architecture
    return model.eval()


def _x():
    return torch.from_numpy(np.load(CNN / "calib.npz")["input"])


def _cnn_by_hand(m, first, second, third):
    """The sample CNN's forward written out, with the activation of each of its three call sites given."""
    with torch.no_grad():
        h = first(m.bn1(m.conv1(_x())))
        h = second(m.bn2(m.conv2(h)))
        return m.head(third(m.fc(torch.flatten(m.pool(h), 1))))


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# the dead units scripts/make_sample_models.py planted in the sample CNN
PLANTED_DEAD = {"relu": [1, 5], "relu#2": [0, 7, 8, 15], "relu()": [2, 9]}


def _assert_fix_report_matches(report, truths):
    """The fix report's per-layer dead_after and rates_after equal plain-torch / onnxruntime numbers."""
    for layer in report["layers"]:
        t = truths[layer["name"]]
        assert layer["dead_after"] == len(t.dead), layer["name"]
        np.testing.assert_allclose(layer["rates_after"], t.active_rate[layer["units"]], rtol=0, atol=1e-12)


def _target_count(target_rate, n):
    """Units shifted to a target rate fire on k = round(rate × n) of the n elements seen (docs: the
    value exactly k values exceed); one more or less when the boundary value itself rounds across 0."""
    return max(1, round(target_rate * n))


@pytest.fixture
def work(tmp_path):
    for name in ("model.pt", "model.onnx", "calib.npz", "arch.py"):
        shutil.copy(CNN / name, tmp_path / name)
    return tmp_path


def test_reinit_state_dict_keeps_outputs_and_revives(cli, work):
    before = _sha(work / "model.pt")
    result = _fix_cnn(
        cli,
        work,
        "--strategy",
        "reinit",
        "--output",
        work / "fixed.pt",
        "--json",
        work / "fix.json",
    )
    assert result.code == 0, result.err
    assert _sha(work / "model.pt") == before
    original, fixed = _load_cnn(work / "model.pt"), _load_cnn(work / "fixed.pt")
    with torch.no_grad():
        np.testing.assert_allclose(fixed(_x()).numpy(), original(_x()).numpy(), rtol=1e-5, atol=1e-6)
    # revival measured in plain torch (forward hooks, tests/truth.py), not with deadrelu's scan
    before_t = sample_cnn_truth(sample_cnn(work / "model.pt"), _x().numpy())
    after_t = sample_cnn_truth(sample_cnn(work / "fixed.pt"), _x().numpy())
    assert {name: t.dead for name, t in before_t.items()} == PLANTED_DEAD
    assert all(t.dead == [] for t in after_t.values())  # all 8 revived
    for name, dead in PLANTED_DEAD.items():  # the other units see exactly what they saw before
        alive = np.setdiff1d(np.arange(before_t[name].units), dead)
        np.testing.assert_array_equal(
            after_t[name].positive_counts[alive], before_t[name].positive_counts[alive]
        )
    report = json.loads((work / "fix.json").read_text())
    assert report["strategy"] == "reinit" and report["written"] and report["max_abs_diff"] <= 1e-5
    _assert_fix_report_matches(report, after_t)


def test_prune_to_pt2_is_exact_and_smaller(cli, work):
    result = _fix_cnn(
        cli,
        work,
        "--strategy",
        "prune",
        "--output",
        work / "pruned.pt2",
    )
    assert result.code == 0, result.err
    program = torch.export.load(str(work / "pruned.pt2"))
    pruned = program.module()
    original = _load_cnn(work / "model.pt")
    with torch.no_grad():
        np.testing.assert_allclose(pruned(_x()).numpy(), original(_x()).numpy(), rtol=1e-5, atol=1e-5)
    n_pruned = sum(v.numel() for v in program.state_dict.values() if v.is_floating_point())
    n_original = sum(p.numel() for p in original.state_dict().values() if p.is_floating_point())
    assert n_pruned < n_original
    assert "new widths:" in result.out and "conv1=6" in result.out


def test_prune_refuses_state_dict_output(cli, work):
    result = _fix_cnn(
        cli,
        work,
        "--strategy",
        "prune",
        "--output",
        work / "pruned.pt",
    )
    assert result.code == 2 and "a state_dict cannot hold" in result.err
    assert not (work / "pruned.pt").exists()


def test_leaky_pt2_has_no_relu_at_patched_sites(cli, work):
    result = _fix_cnn(
        cli,
        work,
        "--strategy",
        "leaky",
        "--slope",
        "0.1",
        "--output",
        work / "leaky.pt2",
    )
    assert result.code == 0, result.err
    program = torch.export.load(str(work / "leaky.pt2"))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert not any("relu" in t and "leaky" not in t for t in targets)
    assert sum("leaky_relu" in t for t in targets) == 3
    m = _load_cnn(work / "model.pt")
    leaky = lambda t: torch.nn.functional.leaky_relu(t, 0.1)  # noqa: E731
    expected = _cnn_by_hand(m, leaky, leaky, leaky)  # the same network written out with LeakyReLU(0.1)
    with torch.no_grad():
        np.testing.assert_allclose(program.module()(_x()).numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
        assert (expected - m(_x())).abs().max() > 0.01  # and it is not the ReLU network


def test_bias_shift_reaches_target_rate(cli, work):
    result = _fix_cnn(
        cli,
        work,
        "--strategy",
        "bias-shift",
        "--layers",
        "relu#2",
        "--target-rate",
        "0.05",
        "--output",
        work / "shifted.safetensors",
        "--json",
        work / "shift.json",
    )
    assert result.code == 0, result.err
    before = sample_cnn_truth(sample_cnn(work / "model.pt"), _x().numpy())
    after = sample_cnn_truth(sample_cnn(work / "shifted.safetensors"), _x().numpy())
    layer = after["relu#2"]
    k = _target_count(0.05, layer.elements)
    assert np.all(np.abs(layer.positive_counts[PLANTED_DEAD["relu#2"]] - k) <= 1), layer.positive_counts
    others = np.setdiff1d(np.arange(16), PLANTED_DEAD["relu#2"])
    np.testing.assert_array_equal(layer.positive_counts[others], before["relu#2"].positive_counts[others])
    assert after["relu"].dead == [1, 5] and after["relu()"].dead == [2, 9]  # untouched layers
    _assert_fix_report_matches(json.loads((work / "shift.json").read_text()), after)


def test_verification_failure_writes_nothing(cli, work):
    result = _fix_cnn(
        cli,
        work,
        "--strategy",
        "reinit",
        "--tolerance",
        "-1",
        "--output",
        work / "fixed.pt",
    )
    assert result.code == 1 and "nothing written" in result.err
    assert sorted(p.name for p in work.iterdir()) == ["arch.py", "calib.npz", "model.onnx", "model.pt"]


def test_output_equal_to_model_is_refused(cli, work):
    before = _sha(work / "model.pt")
    result = _fix_cnn(
        cli,
        work,
        "--strategy",
        "reinit",
        "--output",
        work / "model.pt",
    )
    assert result.code == 2 and "refusing to overwrite" in result.err
    assert _sha(work / "model.pt") == before


def _ort(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("strategy", ["reinit", "prune"])
def test_onnx_exact_strategies(cli, work, strategy):
    before = _sha(work / "model.onnx")
    out = work / f"{strategy}.onnx"
    result = cli(
        "fix", work / "model.onnx", "--data", work / "calib.npz", "--strategy", strategy, "--output", out
    )
    assert result.code == 0, result.err
    assert _sha(work / "model.onnx") == before
    x = _x().numpy()
    np.testing.assert_allclose(_ort(out, x), _ort(work / "model.onnx", x), rtol=1e-5, atol=1e-5)
    params = {
        p: sum(int(np.prod(i.dims)) for i in onnx.load(str(p)).graph.initializer)
        for p in (out, work / "model.onnx")
    }
    if strategy == "prune":
        assert params[out] < params[work / "model.onnx"]
        # conv1 8→6, conv2 16→12 (and 8→6 inputs), fc 16→12 inputs, 12→10 outputs, head 12→10 inputs; per sample:
        before = 16 * 16 * (8 * 27 + 16 * 72) + 16 * 12 + 12 * 3
        after = 16 * 16 * (6 * 27 + 12 * 54) + 12 * 10 + 10 * 3
        assert f"MACs per sample (Conv/Linear/MatMul) {before:,} → {after:,}" in result.out
    else:  # revival measured with onnxruntime (each Relu's input exposed), not with deadrelu's scan
        names = {"/relu/Relu": "relu", "/relu_1/Relu": "relu#2", "/Relu": "relu()"}
        before, after = (
            {
                name: truth_of(site, 1)
                for name, site in onnx_relu_io(onnx.load(str(p)), {"input": x}, list(names)).items()
            }
            for p in (work / "model.onnx", out)
        )
        assert {names[n]: t.dead for n, t in before.items()} == PLANTED_DEAD
        assert all(t.dead == [] for t in after.values())  # all 8 revived


def test_onnx_leaky_swaps_nodes(cli, work):
    out = work / "leaky.onnx"
    assert (
        cli(
            "fix", work / "model.onnx", "--data", work / "calib.npz", "--strategy", "leaky", "--output", out
        ).code
        == 0
    )
    ops = [node.op_type for node in onnx.load(str(out)).graph.node]
    assert "Relu" not in ops and ops.count("LeakyRelu") == 3


def test_onnx_bias_shift_rate(cli, work):
    out = work / "shift.onnx"
    assert (
        cli(
            "fix",
            work / "model.onnx",
            "--data",
            work / "calib.npz",
            "--strategy",
            "bias-shift",
            "--layers",
            "/relu_1/Relu",
            "--target-rate",
            "0.02",
            "--output",
            out,
        ).code
        == 0
    )
    x = _x().numpy()
    (layer,) = (
        truth_of(site, 1)
        for site in onnx_relu_io(onnx.load(str(out)), {"input": x}, ["/relu_1/Relu"]).values()
    )
    k = _target_count(0.02, layer.elements)
    assert np.all(np.abs(layer.positive_counts[PLANTED_DEAD["relu#2"]] - k) <= 1), layer.positive_counts


@pytest.fixture(params=[False, True], ids=["initializers", "constant-nodes"])
def paddle_model(tmp_path, request):
    from onnx_graphs import paddle_conv_bn

    model = paddle_conv_bn(weights_in_constants=request.param)
    onnx.save(model, str(tmp_path / "paddle.onnx"))
    x = np.random.default_rng(5).standard_normal((40, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    return model, tmp_path, x


def test_onnx_bias_shift_through_reshaped_bias_and_batchnorm(cli, paddle_model):
    """The bias read through Reshape(b, [1, C, 1, 1]) and an unfused BatchNormalization's B are shifted
    for the dead units only, and those units fire at the target rate (checked with onnxruntime)."""
    from onnx_graphs import relu_inputs_ground_truth

    model, work, x = paddle_model
    out = work / "shifted.onnx"
    result = cli(
        "fix", work / "paddle.onnx", "--data", work / "d.npz", "--strategy", "bias-shift",
        "--target-rate", "0.05", "--output", out,
    )  # fmt: skip
    assert result.code == 0, result.err
    before, after = stored_tensors(work / "paddle.onnx"), stored_tensors(out)
    assert np.flatnonzero(after["b1"] != before["b1"]).tolist() == [1] and after["b1"][1] > -40
    assert np.flatnonzero(after["shift"] != before["shift"]).tolist() == [2] and after["shift"][2] > -40
    truth = relu_inputs_ground_truth(onnx.load(str(out)), {"x": x}, {"relu1": 1, "relu2": 1})
    positives, _max, n = truth["relu1"]
    assert abs(positives[1] / n - 0.05) <= 2 / n  # the first layer's inputs are the data: exact target
    positives, _max, n = truth["relu2"]
    assert positives[2] > 0  # its inputs changed with the first layer's revived unit: alive, rate approximate


def test_onnx_reinit_and_prune_around_reshaped_bias(cli, paddle_model):
    model, work, x = paddle_model
    out = work / "reinit.onnx"
    result = cli(
        "fix", work / "paddle.onnx", "--data", work / "d.npz", "--strategy", "reinit", "--output", out
    )
    assert result.code == 0, result.err
    np.testing.assert_allclose(_ort(out, x), _ort(work / "paddle.onnx", x), rtol=1e-5, atol=1e-5)
    before, after = stored_tensors(work / "paddle.onnx"), stored_tensors(out)
    assert after["b1"][1] == 0 and np.array_equal(np.delete(after["b1"], 1), np.delete(before["b1"], 1))
    # (row 2 of w2 is the second layer's dead unit: redrawn whole, below)
    assert not np.array_equal(after["w1"][1], before["w1"][1])
    assert np.all(np.delete(after["w2"], 2, axis=0)[:, 1] == 0)
    # the Conv -> BatchNormalization layer (unit 2): the conv row redrawn, the BN channel the identity
    assert not np.array_equal(after["w2"][2], before["w2"][2]) and np.all(after["wfc"][2] == 0)
    assert (after["scale"][2], after["shift"][2], after["mean"][2], after["var"][2]) == (1, 0, 0, 1)
    result = cli(
        "fix",
        work / "paddle.onnx",
        "--data",
        work / "d.npz",
        "--strategy",
        "prune",
        "--output",
        work / "p.onnx",
    )
    # the re-shaped bias's layer is skipped; the Conv -> BatchNormalization one is narrowed
    assert result.code == 0 and "re-shapes its bias" in result.out, result.err
    assert stored_tensors(work / "p.onnx")["w1"].shape[0] == 4
    assert stored_tensors(work / "p.onnx")["w2"].shape[0] == 4


def test_patch_module_api(planted_module):
    from deadrelu_cli.fixes import patch_module

    model = planted_module.shared_and_functional().eval()
    patched = patch_module(model, ["relu#2", "relu()"], slope=0.2)
    x = torch.randn(5, 6)
    with torch.no_grad():
        p1 = model.fc1(x).clamp(min=0)
        p2 = torch.nn.functional.leaky_relu(model.fc2(p1), 0.2)
        p3 = torch.nn.functional.leaky_relu(model.fc3(p2), 0.2)
        p4 = torch.relu(model.fc4(p3))
        p5 = model.fc5(p4).clamp(min=0)
        expected = torch.relu(p5 - 0.5)
        np.testing.assert_allclose(patched(x).numpy(), expected.numpy(), rtol=1e-6, atol=1e-6)
        assert isinstance(model.relu, torch.nn.ReLU)  # the original is untouched


def test_leaky_on_exported_program_input(cli, work):
    shutil.copy(CNN / "model.pt2", work / "model.pt2")
    out = work / "leaky_ep.pt2"
    result = cli(
        "fix",
        work / "model.pt2",
        "--data",
        work / "calib.npz",
        "--strategy",
        "leaky",
        "--slope",
        "0.1",
        "--output",
        out,
    )
    assert result.code == 0, result.err
    program = torch.export.load(str(out))
    targets = [
        str(n.target) for n in program.graph.nodes if n.op == "call_function" and "relu" in str(n.target)
    ]
    assert targets and all("leaky_relu" in t for t in targets)
    m = _load_cnn(work / "model.pt")
    leaky = lambda t: torch.nn.functional.leaky_relu(t, 0.1)  # noqa: E731
    expected = _cnn_by_hand(m, leaky, leaky, leaky)
    with torch.no_grad():
        np.testing.assert_allclose(program.module()(_x()).numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_bias_shift_on_exported_program_input(cli, work):
    """Only the producer's bias of the chosen layer changes in the .pt2 (BatchNorm beta here), and the
    shifted units fire at the target rate — rates computed from the sample CNN in plain torch."""
    shutil.copy(CNN / "model.pt2", work / "model.pt2")
    out = work / "shifted.pt2"
    result = cli(
        "fix", work / "model.pt2", "--data", work / "calib.npz", "--strategy", "bias-shift",
        "--layers", "relu#2", "--target-rate", "0.05", "--output", out,
    )  # fmt: skip
    assert result.code == 0, result.err
    before = torch.export.load(str(work / "model.pt2")).state_dict
    after = torch.export.load(str(out)).state_dict
    assert [k for k in before if not torch.equal(before[k], after[k])] == ["bn2.bias"]
    m = _load_cnn(work / "model.pt")
    with torch.no_grad():
        m.bn2.bias.copy_(after["bn2.bias"])
        pre = m.bn2(m.conv2(torch.relu(m.bn1(m.conv1(_x())))))
    n = pre.shape[0] * pre.shape[2] * pre.shape[3]
    rates = (pre > 0).double().mean(dim=(0, 2, 3))[[0, 7, 8, 15]]
    assert torch.all((rates - 0.05).abs() <= 2 / n), rates


def _fix_cnn(cli, work, *more):
    """`deadrelu fix` of the sample CNN's state_dict (+ --arch) on its calibration data."""
    return cli("fix", work / "model.pt", "--arch", _arch(work), "--data", work / "calib.npz", *more)


def _fix_both(cli, work, strategy, *more):
    """The same fix from the .pt2 (graph wiring) and from the state_dict + --arch (module wiring)."""
    shutil.copy(CNN / "model.pt2", work / "model.pt2")
    for source, out, extra in (
        ("model.pt2", f"{strategy}.pt2", ()),
        ("model.pt", f"{strategy}.pt", ("--arch", _arch(work))),
    ):
        result = cli(
            "fix", work / source, *extra, "--data", work / "calib.npz", "--strategy", strategy,
            "--output", work / out, *more,
        )  # fmt: skip
        assert result.code == 0, result.err
    return torch.export.load(str(work / f"{strategy}.pt2")), torch.load(
        work / f"{strategy}.pt", weights_only=True
    )


def test_prune_on_exported_program_input_matches_the_module_path(cli, work):
    """Consistency (graph vs module wiring), anchored on outputs: prune on a .pt2 narrows the tensors
    found in its graph: the same program, tensor for tensor, as
    pruning the state_dict + --arch into a .pt2 (modules rebuilt), and the same outputs as the original."""
    shutil.copy(CNN / "model.pt2", work / "model.pt2")
    for source, out, extra in (
        ("model.pt2", "graph.pt2", ()),
        ("model.pt", "modules.pt2", ("--arch", _arch(work))),
    ):
        result = cli(
            "fix",
            work / source,
            *extra,
            "--data",
            work / "calib.npz",
            "--strategy",
            "prune",
            "--output",
            work / out,
        )
        assert result.code == 0, result.err
    from_graph = torch.export.load(str(work / "graph.pt2"))
    from_modules = torch.export.load(str(work / "modules.pt2")).state_dict
    assert from_graph.state_dict.keys() == from_modules.keys()
    for key, value in from_graph.state_dict.items():
        assert torch.equal(value, from_modules[key]), key
    assert from_graph.state_dict["conv2.weight"].shape == (12, 6, 3, 3)  # 16 -> 12 units, 8 -> 6 inputs
    with torch.no_grad():
        np.testing.assert_allclose(
            from_graph.module()(_x()).numpy(),
            _load_cnn(work / "model.pt")(_x()).numpy(),
            rtol=1e-5,
            atol=1e-5,
        )


def test_kick_on_exported_program_input_matches_the_state_dict_path(cli, work):
    """Consistency (graph vs module wiring), anchored: the .pt2 and the state_dict paths write the same
    tensors, and exactly the planted dead units' incoming rows and BatchNorm beta / bias moved."""
    # the default kick is too small to revive these planted units (verification says so): --force
    # writes it, as the point here is which tensors the two wirings move
    program, from_modules = _fix_both(cli, work, "kick", "--force")
    original = torch.load(work / "model.pt", weights_only=True)
    moved = {
        key: sorted({int(i) for i in torch.nonzero(value != original[key])[:, 0]})
        for key, value in program.state_dict.items()
        if not torch.equal(value, original[key])
    }
    assert moved == {
        "conv1.weight": [1, 5], "bn1.bias": [1, 5],
        "conv2.weight": [0, 7, 8, 15], "bn2.bias": [0, 7, 8, 15],
        "fc.weight": [2, 9], "fc.bias": [2, 9],
    }  # fmt: skip
    assert all(torch.equal(value, from_modules[key]) for key, value in program.state_dict.items())


def test_reinit_on_exported_program_input_matches_the_state_dict_path(cli, work):
    """Consistency (graph vs module wiring), anchored in plain torch: reinit on a .pt2 finds the units' weights in its graph (conv1 + bn1 -> conv2, conv2 + bn2 -> fc,
    fc -> head): outputs unchanged (plain torch), the revived units fire, and every tensor equals what
    the same reinit writes from the state_dict + --arch (same seed; modules instead of a graph)."""
    program, from_modules = _fix_both(cli, work, "reinit")
    from_graph = program.state_dict
    assert from_graph.keys() <= from_modules.keys()
    for key, value in from_graph.items():
        assert torch.equal(value, from_modules[key]), key
    original = torch.export.load(str(work / "model.pt2")).state_dict
    assert not torch.equal(from_graph["conv1.weight"], original["conv1.weight"])
    with torch.no_grad():
        np.testing.assert_allclose(
            program.module()(_x()).numpy(), _load_cnn(work / "model.pt")(_x()).numpy(), rtol=1e-5, atol=1e-6
        )
    revived = sample_cnn(work / "model.pt")
    revived.load_state_dict(from_graph, strict=True)
    assert all(t.dead == [] for t in sample_cnn_truth(revived, _x().numpy()).values())  # plain torch


def test_leaky_on_torchscript_input_one_site(cli, work):
    shutil.copy(CNN / "model.torchscript.pt", work / "model.torchscript.pt")
    out = work / "leaky.ts"
    result = cli(
        "fix",
        work / "model.torchscript.pt",
        "--data",
        work / "calib.npz",
        "--strategy",
        "leaky",
        "--slope",
        "0.2",
        "--layers",
        "relu#2",
        "--output",
        out,
    )
    assert result.code == 0, result.err
    refused = cli(  # (every strategy takes TorchScript now: tests/test_fix41.py; its output stays TorchScript)
        "fix", work / "model.torchscript.pt", "--data", work / "calib.npz", "--strategy", "leaky",
        "--output", work / "x.onnx",
    )  # fmt: skip
    assert refused.code == 2 and "patched into a TorchScript archive" in refused.err
    assert not (work / "x.onnx").exists()
    patched = torch.jit.load(str(out))
    m = _load_cnn(work / "model.pt")
    # only the second call of the shared ReLU becomes leaky
    expected = _cnn_by_hand(m, torch.relu, lambda t: torch.nn.functional.leaky_relu(t, 0.2), torch.relu)
    with torch.no_grad():
        np.testing.assert_allclose(patched(_x()).numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


TOKEN_MLP = """
import torch
from torch import nn


class TokenMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(8, 4)
        self.fc1 = nn.Linear(4, 6)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(6, 3)

    def forward(self, input_ids):
        return self.fc2(self.act(self.fc1(self.emb(input_ids))))


def build():
    torch.manual_seed(0)
    model = TokenMLP()
    with torch.no_grad():
        model.emb.weight[:, 0] = 0.0
        model.emb.weight[0, 0] = 5.0  # the pad id 0
        model.fc1.weight[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
        model.fc1.bias[0] = -1.0  # unit 0 fires on padding only
        model.fc1.bias[1:] = 3.0  # the others on every token
    return model
"""


def test_holdout_compares_outputs_at_counted_positions_only(cli, tmp_path):
    """fix --holdout on padded tokens: the unit that fires only on padding is dead (padding is not a
    position) and pruned; the hold-out's outputs are compared where the scan counts, at real tokens,
    where pruning it changes nothing (at the padding it does: a comparison there refused the fix)."""
    from conftest import arch_file, save_npz

    model, spec = arch_file(tmp_path / "tokens_arch.py", TOKEN_MLP)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 8, (10, 6))
    mask = np.ones_like(ids)
    for row, length in enumerate(rng.integers(2, 6, 10)):
        ids[row, length:], mask[row, length:] = 0, 0
    save_npz(tmp_path / "tokens.npz", input_ids=ids, attention_mask=mask)
    result = cli(
        "fix", tmp_path / "model.pt", "--arch", spec, "--data", tmp_path / "tokens.npz",
        "--strategy", "prune", "--holdout", "0.5", "--output", tmp_path / "pruned.pt2", "--json", "-",
    )  # fmt: skip
    assert result.code == 0, result.err
    report = result.json()
    # by hand: unit 0 is the dead one; without it the outputs at the hold-out's real tokens stay, at its padding they move
    with torch.no_grad():
        hidden = model.act(model.fc1(model.emb(torch.from_numpy(ids))))
        before, after = model.fc2(hidden), model.fc2(hidden * torch.tensor([0.0, 1, 1, 1, 1, 1]))
    real = torch.from_numpy(mask == 1)
    assert (hidden[real][:, 0] == 0).all() and (hidden[~real][:, 0] > 0).all()
    held = torch.zeros_like(real)
    held[5:] = True
    diff = (after - before).abs()
    assert float(diff[held & ~real].max()) > 1e-3
    assert report["holdout_max_abs_diff"] == pytest.approx(float(diff[held & real].max()), abs=1e-6)
    assert report["layers"][0]["units"] == [0] and report["verified"] and report["written"]
