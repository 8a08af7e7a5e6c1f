"""--explain: planted units of each cause are classified as planted; structural checks; the kick fix."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import arch, save_npz, save_state_dict


def _scan_json(cli, model, factory, x, tmp_path, *extra):
    ckpt, data = save_state_dict(model, tmp_path / "m.pt"), save_npz(tmp_path / "d.npz", x=x)
    result = cli("scan", ckpt, "--arch", arch(factory), "--data", data, "--json", "-", *extra)
    assert result.code == 0, result.err
    return json.loads(result.out), ckpt, data


def test_each_planted_cause(cli, tmp_path, planted_module):
    x = np.random.default_rng(0).uniform(0, 1, (200, 4)).astype(np.float32)
    report, *_ = _scan_json(cli, planted_module.causes_mlp().eval(), "causes_mlp", x, tmp_path, "--explain")
    fc1, fc2 = report["layers"]
    assert fc1["dead_indices"] == [0, 1, 2]
    assert fc1["extra"]["causes"] == {"0": "negative bias", "1": "collapsed weights", "2": "direction"}
    assert fc2["extra"]["causes"]["0"] == "starved"
    assert fc1["extra"]["cause_counts"] == {"negative bias": 1, "collapsed weights": 1, "direction": 1}


@pytest.mark.parametrize("factory, shape", [("causes_mlp", (200, 4)), ("conv_bn", (20, 3, 5, 5))])
def test_causes_of_an_exported_program_are_the_planted_ones(cli, tmp_path, planted_module, factory, shape):
    """--explain on a .pt2 reads the same tensors from the program (by name) and the consumers from its
    graph: the same causes per unit as the state_dict + --arch scan, planted ones included."""
    import torch

    model = getattr(planted_module, factory)().eval()
    x = np.random.default_rng(0).uniform(0, 1, shape).astype(np.float32)
    from_modules, _ckpt, data = _scan_json(cli, model, factory, x, tmp_path, "--explain")
    program = torch.export.export(
        model, (torch.from_numpy(x[:2]),), dynamic_shapes=({0: torch.export.Dim("n")},)
    )
    torch.export.save(program, tmp_path / "m.pt2")
    result = cli("scan", tmp_path / "m.pt2", "--data", data, "--json", "-", "--explain")
    assert result.code == 0, result.err
    from_graph = json.loads(result.out)
    expected = [layer["extra"].get("causes") for layer in from_modules["layers"]]
    assert [layer["extra"].get("causes") for layer in from_graph["layers"]] == expected
    assert any(expected)
    if factory == "causes_mlp":
        assert expected[1]["0"] == "starved" and expected[0]["1"] == "collapsed weights"


def test_causes_from_an_onnx_graph(cli, tmp_path, planted_module):
    """Consistency (ONNX vs torch causes), anchored on the planted causes: --explain on ONNX reads the
    producer's stored tensors (Gemm rows, a reshaped Conv bias, an unfused BatchNormalization's scale
    and B): the torch scan's causes for the planted MLP's export, and the planted causes of a
    paddle2onnx-style graph."""
    import warnings

    import onnx
    import torch
    from onnx_graphs import paddle_conv_bn

    model = planted_module.causes_mlp().eval()
    x = np.random.default_rng(0).uniform(0, 1, (200, 4)).astype(np.float32)
    from_torch, _ckpt, data = _scan_json(cli, model, "causes_mlp", x, tmp_path, "--explain")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 4),), str(tmp_path / "m.onnx"), input_names=["x"],
                          dynamic_axes={"x": {0: "n"}}, opset_version=17, dynamo=False)  # fmt: skip
    result = cli("scan", tmp_path / "m.onnx", "--data", data, "--json", "-", "--explain")
    assert result.code == 0, result.err
    expected = [layer["extra"].get("causes") for layer in from_torch["layers"]]
    assert [layer["extra"].get("causes") for layer in json.loads(result.out)["layers"]] == expected
    assert expected[0] == {"0": "negative bias", "1": "collapsed weights", "2": "direction"}  # as planted
    assert expected[1]["0"] == "starved"
    onnx.save(paddle_conv_bn(weights_in_constants=True), str(tmp_path / "p.onnx"))
    images = save_npz(
        tmp_path / "i.npz", x=np.random.default_rng(5).standard_normal((10, 3, 8, 8)).astype(np.float32)
    )
    result = cli("scan", tmp_path / "p.onnx", "--data", images, "--json", "-", "--explain")
    first, second = json.loads(result.out)["layers"]
    assert first["extra"]["causes"] == {"1": "negative bias"}
    assert second["extra"]["causes"] == {"2": "batchnorm shift"}


def test_batchnorm_shift(cli, tmp_path, planted_module):
    x = np.random.default_rng(1).standard_normal((20, 3, 5, 5)).astype(np.float32)
    report, *_ = _scan_json(cli, planted_module.conv_bn().eval(), "conv_bn", x, tmp_path, "--explain")
    causes = report["layers"][0]["extra"]["causes"]
    assert causes["2"] == "batchnorm shift" and causes["4"] == "batchnorm shift"


def test_table_shows_causes_and_advice(cli, tmp_path, planted_module):
    x = np.random.default_rng(0).uniform(0, 1, (50, 4)).astype(np.float32)
    ckpt, data = (
        save_state_dict(planted_module.causes_mlp().eval(), tmp_path / "m.pt"),
        save_npz(tmp_path / "d.npz", x=x),
    )
    result = cli("scan", ckpt, "--arch", arch("causes_mlp"), "--data", data, "--explain")
    assert "Why they are dead" in result.out and "exclude biases (and norms) from weight decay" in result.out
    drill = cli("scan", ckpt, "--arch", arch("causes_mlp"), "--data", data, "--explain", "--layer", "relu()")
    assert "DEAD (negative bias)" in drill.out and "DEAD (collapsed weights)" in drill.out


def test_relu_before_softmax_check(cli, tmp_path, planted_module):
    x = np.random.default_rng(2).standard_normal((10, 4)).astype(np.float32)
    report, *_ = _scan_json(
        cli, planted_module.relu_before_softmax().eval(), "relu_before_softmax", x, tmp_path
    )
    assert any(note.startswith("check relu-before-softmax:") for note in report["notes"])
    clean, *_ = _scan_json(cli, planted_module.causes_mlp().eval(), "causes_mlp", x, tmp_path)
    assert not any("relu-before-softmax" in note for note in clean["notes"])


def test_zero_weight_rows_are_reported_where_they_feed_an_activation(cli, tmp_path, planted_module):
    """A Linear row of zeros feeding a ReLU is a unit that only outputs its bias: reported. A zero row of
    the head (no activation after it, like an LM head tied to a zero padding embedding) is not a unit
    of any scanned layer: not reported."""
    import torch

    model = planted_module.causes_mlp().eval()
    with torch.no_grad():
        model.fc1.weight[3] = 0.0
        model.out.weight[1] = 0.0
    x = np.random.default_rng(2).uniform(0, 1, (20, 4)).astype(np.float32)
    report, *_ = _scan_json(cli, model, "causes_mlp", x, tmp_path)
    zero = [note for note in report["notes"] if note.startswith("check zero-weights:")]
    assert len(zero) == 1 and "fc1: units [3]" in zero[0], report["notes"]


def test_relu_on_output_and_constant_bn_checks(cli, tmp_path, planted_module):
    x = np.random.default_rng(3).standard_normal((10, 4)).astype(np.float32)
    report, *_ = _scan_json(cli, planted_module.relu6_model().eval(), "relu6_model", x, tmp_path)
    assert any(note.startswith("check relu-on-output:") and "relu6()" in note for note in report["notes"])
    x = np.random.default_rng(4).standard_normal((10, 3, 5, 5)).astype(np.float32)
    report, *_ = _scan_json(cli, planted_module.conv_bn().eval(), "conv_bn", x, tmp_path)
    assert any(note.startswith("check constant-bn:") and "[2, 4]" in note for note in report["notes"])


def test_kick_revives_and_is_verified(cli, tmp_path, planted_module):
    x = np.random.default_rng(0).uniform(0, 1, (200, 4)).astype(np.float32)
    _, ckpt, data = _scan_json(cli, planted_module.causes_mlp().eval(), "causes_mlp", x, tmp_path)
    out = tmp_path / "kicked.pt"
    result = cli(
        "fix",
        ckpt,
        "--arch",
        arch("causes_mlp"),
        "--data",
        data,
        "--strategy",
        "kick",
        "--kick-scale",
        "2.0",
        "--layers",
        "relu()",
        "--output",
        out,
        "--seed",
        "3",
        "--json",
        tmp_path / "kick.json",
    )
    assert result.code == 0, result.err
    import torch
    from truth import capture, truth_of

    before, after = torch.load(ckpt, weights_only=True), torch.load(out, weights_only=True)
    changed = (before["fc1.weight"] != after["fc1.weight"]).any(dim=1).nonzero().flatten().tolist()
    assert changed == [0, 1, 2]  # only the dead units' incoming weights moved
    assert torch.equal(before["fc2.weight"], after["fc2.weight"])
    # what the fix report says about revival, against the kicked model run in plain torch
    kicked = planted_module.causes_mlp()
    kicked.load_state_dict(after)
    site = capture(kicked.eval(), [torch.from_numpy(x)], producers={"relu()": ("fc1", "relu")})["relu()"]
    truth = truth_of(site, 1)
    (layer,) = json.loads((tmp_path / "kick.json").read_text())["layers"]
    assert layer["name"] == "relu()" and layer["units"] == [0, 1, 2] and layer["dead_before"] == 3
    assert layer["dead_after"] == len(truth.dead) and truth.dead != [0, 1, 2]  # something revived
    np.testing.assert_allclose(layer["rates_after"], truth.active_rate[[0, 1, 2]], rtol=0, atol=1e-12)


def test_kick_that_revives_nothing_is_not_verified(cli, tmp_path, planted_module):
    """A kick far too small for the pre-activations changes weights and revives no unit: verification
    fails (exit 1, nothing written) with the hint; --force writes it anyway. Which units fire afterwards
    is judged from the kicked model in plain torch."""
    import torch
    from truth import capture, truth_of

    x = np.random.default_rng(0).uniform(0, 1, (200, 4)).astype(np.float32)
    _, ckpt, data = _scan_json(cli, planted_module.causes_mlp().eval(), "causes_mlp", x, tmp_path)
    out = tmp_path / "kicked.pt"
    args = ("fix", ckpt, "--arch", arch("causes_mlp"), "--data", data, "--strategy", "kick")
    args += ("--kick-scale", "1e-6", "--layers", "relu()", "--output", out)
    result = cli(*args)
    assert result.code == 1, result.err
    assert (
        "revived none of the 3 dead units" in result.out + result.err
        and "--kick-scale" in result.out + result.err
    )
    assert not out.exists()
    forced = cli(*args, "--force")
    assert forced.code == 0, forced.err
    kicked = planted_module.causes_mlp()
    kicked.load_state_dict(torch.load(out, weights_only=True))
    site = capture(kicked.eval(), [torch.from_numpy(x)], producers={"relu()": ("fc1", "relu")})["relu()"]
    assert {0, 1, 2} <= set(truth_of(site, 1).dead)  # the premise: nothing revived


def test_inspect_runs_the_structural_checks(cli, tmp_path, planted_module):
    ckpt = save_state_dict(planted_module.relu_before_softmax(), tmp_path / "m.pt")
    result = cli("inspect", ckpt, "--arch", arch("relu_before_softmax"))
    assert result.code == 0 and "relu-before-softmax" in result.out
