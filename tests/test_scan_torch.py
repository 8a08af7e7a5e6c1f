"""The torch scan against ground truth computed here with plain torch and numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import arch, arch_file, counts_from_pre, save_npz, save_state_dict

from deadrelu_cli import scan


def _layer(report, name):
    return next(layer for layer in report.layers if layer.name == name)


def test_eight_neuron_example(tmp_path, planted_module):
    model = planted_module.eight_neuron().eval()
    x = np.random.default_rng(0).standard_normal((300, 4)).astype(np.float32)
    ckpt = save_state_dict(model, tmp_path / "m.pt")
    data = save_npz(tmp_path / "d.npz", x=x)
    report = scan(str(ckpt), str(data), arch=arch("eight_neuron"), device="cpu")
    layer = _layer(report, "relu")
    # independent ground truth: pre-activation in numpy
    w = model.fc.weight.detach().numpy().astype(np.float64)
    b = model.fc.bias.detach().numpy().astype(np.float64)
    pre = x.astype(np.float64) @ w.T + b
    assert np.flatnonzero((pre > 0).sum(0) == 0).tolist() == [2, 4, 6]
    assert np.flatnonzero(layer.dead_mask()).tolist() == [2, 4, 6]
    np.testing.assert_array_equal(layer.positive_counts, (pre > 0).sum(0))
    np.testing.assert_allclose(layer.max_preactivation, pre.max(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.sum_abs, np.maximum(pre, 0).sum(0), rtol=1e-4, atol=1e-4)
    assert layer.elements_per_unit == 300
    assert layer.producer == "fc"
    np.testing.assert_allclose(layer.bias, planted_module.EIGHT_BIASES, rtol=1e-6)


def test_shared_module_functional_and_inplace_sites(tmp_path, planted_module):
    model = planted_module.shared_and_functional().eval()
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((200, 6)).astype(np.float32))
    report = scan(
        str(save_state_dict(model, tmp_path / "m.pt")),
        str(save_npz(tmp_path / "d.npz", x=x.numpy())),
        arch=arch("shared_and_functional"),
        device="cpu",
        batch_size=13,
    )
    # ground truth: the pre-activations, recomputed step by step without any hook
    with torch.no_grad():
        p1 = model.fc1(x)
        p2 = model.fc2(p1.clamp(min=0))
        p3 = model.fc3(p2.clamp(min=0))
        p4 = model.fc4(p3.clamp(min=0))
        p5 = model.fc5(p4.clamp(min=0))
        p6 = p5.clamp(min=0) - 0.5
    expected = {"relu": p1, "relu#2": p2, "relu()": p3, "relu()#2": p4, "relu()#3": p5, "relu()#4": p6}
    assert [layer.name for layer in report.layers] == list(expected)
    for name, pre in expected.items():
        positives, max_pre, elements = counts_from_pre(pre, -1)
        layer = _layer(report, name)
        np.testing.assert_array_equal(layer.positive_counts, positives, err_msg=name)
        np.testing.assert_allclose(layer.max_preactivation, max_pre, rtol=1e-5, atol=1e-6, err_msg=name)
        assert layer.elements_per_unit == elements
        assert np.flatnonzero(layer.dead_mask()).tolist() == np.flatnonzero(positives == 0).tolist(), name
    assert {0, 7} <= set(np.flatnonzero(_layer(report, "relu").dead_mask()).tolist())
    assert {1, 2, 9} <= set(np.flatnonzero(_layer(report, "relu()").dead_mask()).tolist())
    assert _layer(report, "relu").module_type == "ReLU"
    assert _layer(report, "relu()").module_type == "functional"


def test_conv_bn_relu_channels(tmp_path, planted_module):
    model = planted_module.conv_bn().eval()
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((40, 3, 8, 8)).astype(np.float32))
    report = scan(
        str(save_state_dict(model, tmp_path / "m.pt")),
        str(save_npz(tmp_path / "d.npz", x=x.numpy())),
        arch=arch("conv_bn"),
        device="cpu",
        batch_size=16,
    )
    with torch.no_grad():
        pre1 = model.bn(model.conv(x))
        pre2 = model.conv1d(pre1.clamp(min=0).flatten(2))
    layer = _layer(report, "act")
    positives, max_pre, elements = counts_from_pre(pre1, 1)
    assert layer.channel_dim == 1 and layer.units == 6
    np.testing.assert_array_equal(layer.positive_counts, positives)
    assert layer.elements_per_unit == elements == 40 * 8 * 8
    assert np.flatnonzero(layer.dead_mask()).tolist() == np.flatnonzero(positives == 0).tolist()
    assert {2, 4} <= set(np.flatnonzero(layer.dead_mask()).tolist())
    assert layer.producer == "bn"
    np.testing.assert_allclose(layer.bias, model.bn.bias.detach().numpy())
    layer1d = _layer(report, "act1d")
    assert layer1d.channel_dim == 1 and layer1d.units == 4
    positives1d = counts_from_pre(pre2, 1)[0]
    np.testing.assert_array_equal(layer1d.positive_counts, positives1d)
    assert np.flatnonzero(layer1d.dead_mask()).tolist() == np.flatnonzero(positives1d == 0).tolist()
    assert 1 in np.flatnonzero(layer1d.dead_mask()).tolist()


def test_relu6_dead_and_saturated(tmp_path, planted_module):
    model = planted_module.relu6_model().eval()
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((64, 4)).astype(np.float32))
    report = scan(
        str(save_state_dict(model, tmp_path / "m.pt")),
        str(save_npz(tmp_path / "d.npz", x=x.numpy())),
        arch=arch("relu6_model"),
        device="cpu",
    )
    assert [(layer.name, layer.op) for layer in report.layers] == [("act", "relu6"), ("relu6()", "relu6")]
    with torch.no_grad():
        pre1 = model.fc(x)
        pre2 = model.fc2(pre1.clamp(0, 6))
    act = _layer(report, "act")
    assert (
        np.flatnonzero(act.dead_mask()).tolist()
        == np.flatnonzero((pre1 > 0).sum(0).numpy() == 0).tolist()
        == [0]
    )
    assert (
        np.flatnonzero(act.saturated_mask()).tolist()
        == np.flatnonzero((pre1 >= 6).all(0).numpy()).tolist()
        == [1]
    )
    np.testing.assert_allclose(act.sum_abs, pre1.clamp(0, 6).sum(0).double().numpy(), rtol=1e-5)
    assert 2 in np.flatnonzero(_layer(report, "relu6()").dead_mask()).tolist()
    np.testing.assert_array_equal(_layer(report, "relu6()").positive_counts, (pre2 > 0).sum(0).numpy())


def test_token_shaped_linear_uses_last_axis(tmp_path, planted_module):
    model = planted_module.tokens().eval()
    x = torch.from_numpy(np.random.default_rng(4).standard_normal((20, 7, 8)).astype(np.float32))
    report = scan(
        str(save_state_dict(model, tmp_path / "m.pt")),
        str(save_npz(tmp_path / "d.npz", x=x.numpy())),
        arch=arch("tokens"),
        device="cpu",
        batch_size=3,
    )
    layer = report.layers[0]
    with torch.no_grad():
        pre = model.up(x)
    positives, _, elements = counts_from_pre(pre, -1)
    assert layer.units == 16 and layer.channel_dim == 2 and layer.elements_per_unit == elements == 140
    np.testing.assert_array_equal(layer.positive_counts, positives)
    assert np.flatnonzero(layer.dead_mask()).tolist() == [0, 5, 6]


def test_channel_dim_override(tmp_path, planted_module):
    model = planted_module.tokens().eval()
    x = np.random.default_rng(5).standard_normal((10, 7, 8)).astype(np.float32)
    report = scan(
        str(save_state_dict(model, tmp_path / "m.pt")),
        str(save_npz(tmp_path / "d.npz", x=x)),
        arch=arch("tokens"),
        device="cpu",
        channel_dim=1,
    )
    with torch.no_grad():
        pre = model.up(torch.from_numpy(x))
    assert report.layers[0].units == 7
    np.testing.assert_array_equal(report.layers[0].positive_counts, counts_from_pre(pre, 1)[0])


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_batch_size_does_not_change_counts(tmp_path, planted_module, batch_size):
    """Consistency (batch-size invariance) between two scans; test_conv_bn_relu_channels anchors the
    counts of this model to plain torch."""
    model = planted_module.conv_bn().eval()
    x = np.random.default_rng(6).standard_normal((50, 3, 6, 6)).astype(np.float32)
    ckpt, data = save_state_dict(model, tmp_path / "m.pt"), save_npz(tmp_path / "d.npz", x=x)
    reference = scan(str(ckpt), str(data), arch=arch("conv_bn"), device="cpu", batch_size=50)
    report = scan(str(ckpt), str(data), arch=arch("conv_bn"), device="cpu", batch_size=batch_size)
    for a, b in zip(reference.layers, report.layers, strict=True):
        np.testing.assert_array_equal(a.positive_counts, b.positive_counts)
        # the model's own conv kernels round differently per batch shape (last float32 bit)
        np.testing.assert_allclose(a.max_preactivation, b.max_preactivation, rtol=1e-6, atol=1e-6)
        assert a.elements_per_unit == b.elements_per_unit
        np.testing.assert_allclose(a.sum_abs, b.sum_abs, rtol=1e-6, atol=1e-6)


def test_threshold_counts_elements_above_it(tmp_path, planted_module):
    model = planted_module.eight_neuron().eval()
    x = np.random.default_rng(7).standard_normal((100, 4)).astype(np.float32)
    report = scan(
        str(save_state_dict(model, tmp_path / "m.pt")),
        str(save_npz(tmp_path / "d.npz", x=x)),
        arch=arch("eight_neuron"),
        device="cpu",
        threshold=0.3,
    )
    with torch.no_grad():
        pre = model.fc(torch.from_numpy(x))
    np.testing.assert_array_equal(report.layers[0].positive_counts, (pre > 0.3).sum(0).numpy())


def test_limit_uses_first_samples(tmp_path, planted_module):
    model = planted_module.eight_neuron().eval()
    x = np.random.default_rng(8).standard_normal((100, 4)).astype(np.float32)
    report = scan(
        str(save_state_dict(model, tmp_path / "m.pt")),
        str(save_npz(tmp_path / "d.npz", x=x)),
        arch=arch("eight_neuron"),
        device="cpu",
        limit=30,
        batch_size=8,
    )
    with torch.no_grad():
        pre = model.fc(torch.from_numpy(x[:30]))
    assert report.data.samples == 30 and report.layers[0].elements_per_unit == 30
    np.testing.assert_array_equal(report.layers[0].positive_counts, (pre > 0).sum(0).numpy())


def test_model_train_mode_is_restored(tmp_path, planted_module):
    from deadrelu_cli.probe.base import ProbeSettings
    from deadrelu_cli.probe.eager import EagerProbe

    model = planted_module.conv_bn().train()
    probe = EagerProbe(model, ProbeSettings())
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with pytest.raises(RuntimeError), probe.attached(), torch.inference_mode():
        assert not model.training
        probe.run((torch.zeros(2, 5, 4, 4),))  # wrong channel count: raises inside the forward
    assert model.training and model.bn.training
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before


def test_functional_relu_missed_by_module_hooks_is_found(tmp_path, planted_module):
    """The guide's complaint: hooks on nn.ReLU miss F.relu. Count what plain hooks would see."""
    model = planted_module.shared_and_functional().eval()
    module_relus = [m for m in model.modules() if isinstance(m, torch.nn.ReLU)]
    assert len(module_relus) == 1  # hooks would report one layer
    x = np.random.default_rng(9).standard_normal((10, 6)).astype(np.float32)
    report = scan(
        str(save_state_dict(model, tmp_path / "m.pt")),
        str(save_npz(tmp_path / "d.npz", x=x)),
        arch=arch("shared_and_functional"),
        device="cpu",
    )
    assert len(report.layers) == 6
    assert F.relu is not None


def test_nan_activations_are_not_counted_as_firing(tmp_path, planted_module):
    """The fast count (y.bool()) would count NaN as fired; the probe falls back to y > 0 for such
    batches, in any batch and whatever the NaN's sign bit."""
    from deadrelu_cli.probe.accumulator import SiteAccumulator

    pre = torch.tensor([[1.0, -1.0], [float("nan"), -2.0], [-3.0, 0.5]])
    site = SiteAccumulator("s", "relu", channel_dim=1)
    site.update(pre, torch.relu(pre), 0.0)
    assert site.positive.tolist() == [1, 1]  # NaN > 0 is False
    later = torch.tensor([[2.0, float("nan")], [-1.0, 1.0]])
    site.update(later, torch.relu(later), 0.0)
    assert site.positive.tolist() == [2, 2]
    assert site.max_pre.isnan().tolist() == [True, True]  # a NaN input makes the max NaN, as amax does
    negative_nan = torch.tensor([[-float("nan"), 3.0]])
    site.update(negative_nan, torch.relu(negative_nan), 0.0)
    assert site.positive.tolist() == [2, 3]
    clean = SiteAccumulator("c", "relu", channel_dim=1)
    clean.update(pre.nan_to_num(-5.0), torch.relu(pre.nan_to_num(-5.0)), 0.0)
    assert clean.positive.tolist() == [1, 1]


def test_a_model_without_relu_says_what_it_uses_instead(tmp_path):
    """SiLU/GELU models: no layers, and the note names their activations (modules, or a .pt2's ops)."""
    model, arch_spec = arch_file(
        tmp_path / "arch.py",
        "import torch\nfrom torch import nn\n\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 2), nn.GELU())\n",
    )
    torch.save(model.state_dict(), tmp_path / "m.pt")
    program = torch.export.export(model, (torch.zeros(2, 4),), dynamic_shapes=({0: torch.export.Dim("n")},))
    torch.export.save(program, tmp_path / "m.pt2")
    np.save(tmp_path / "x.npy", np.zeros((3, 4), np.float32))
    for path, spec in ((tmp_path / "m.pt", arch_spec), (tmp_path / "m.pt2", None)):
        report = scan(str(path), str(tmp_path / "x.npy"), arch=spec, device="cpu")
        assert report.layers == []
        (note,) = [n for n in report.notes if n.startswith("the model ran no relu/relu6 call")]
        assert "SiLU ×2, GELU ×1" in note or "silu ×2, gelu ×1" in note, note
