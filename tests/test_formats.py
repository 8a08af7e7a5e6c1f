"""Every checkpoint format of the same weights gives the same layers and counts."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import arch, save_npz
from safetensors.torch import save_file

from deadrelu_cli import scan
from deadrelu_cli.errors import UserError

FACTORIES = ["eight_neuron", "shared_and_functional", "conv_bn", "relu6_model", "tokens"]
INPUTS = {
    "eight_neuron": (4,),
    "shared_and_functional": (6,),
    "conv_bn": (3, 6, 6),
    "relu6_model": (4,),
    "tokens": (5, 8),
}


def _save_formats(model, example, tmp_path):
    paths = {}
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    paths["state_dict"] = tmp_path / "sd.pt"
    torch.save(
        {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
        tmp_path / "ckpt.pth",
    )
    paths["checkpoint_dict"] = tmp_path / "ckpt.pth"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    paths["safetensors"] = tmp_path / "m.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(model).save(str(tmp_path / "script.pt"))
        torch.jit.trace(model, example).save(str(tmp_path / "traced.pt"))
        program = torch.export.export(
            model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
        )
        torch.export.save(program, str(tmp_path / "m.pt2"))
    paths["torchscript"] = tmp_path / "script.pt"
    paths["traced"] = tmp_path / "traced.pt"
    paths["exported_program"] = tmp_path / "m.pt2"
    torch.save(model, tmp_path / "whole.pt")
    paths["module"] = tmp_path / "whole.pt"
    return paths


@pytest.mark.parametrize("factory", FACTORIES)
def test_all_formats_agree(tmp_path, planted_module, factory):
    """Consistency (format invariance): every format of the same weights gives the state_dict's report.
    The state_dict path itself is checked against plain torch + numpy in test_truth / test_scan_torch."""
    model = getattr(planted_module, factory)().eval()
    x = np.random.default_rng(11).standard_normal((24, *INPUTS[factory])).astype(np.float32)
    example = torch.from_numpy(x[:2])
    data = save_npz(tmp_path / "d.npz", x=x)
    paths = _save_formats(model, example, tmp_path)
    reports = {}
    for kind, path in paths.items():
        reports[kind] = scan(
            str(path),
            str(data),
            arch=arch(factory),
            device="cpu",
            batch_size=5,
            trust_pickle=(kind == "module"),
        )
    reference = reports["state_dict"]
    assert reports["exported_program"].model.format == "exported_program"
    assert reports["torchscript"].model.format == "torchscript"
    assert reports["module"].model.format == "module"
    for kind, report in reports.items():
        assert [(lay.name, lay.op, lay.units) for lay in report.layers] == [
            (lay.name, lay.op, lay.units) for lay in reference.layers
        ], kind
        for a, b in zip(reference.layers, report.layers, strict=True):
            np.testing.assert_array_equal(a.positive_counts, b.positive_counts, err_msg=f"{kind} {a.name}")
            assert a.elements_per_unit == b.elements_per_unit
            assert a.channel_dim == b.channel_dim, (kind, a.name)
            np.testing.assert_allclose(a.max_preactivation, b.max_preactivation, rtol=1e-5, atol=1e-5)
            assert a.producer == b.producer, (kind, a.name)


def test_pickled_module_needs_trust_pickle(tmp_path, planted_module):
    model = planted_module.eight_neuron()
    torch.save(model, tmp_path / "whole.pt")
    data = save_npz(tmp_path / "d.npz", x=np.zeros((2, 4), np.float32))
    with pytest.raises(UserError, match="--trust-pickle"):
        scan(str(tmp_path / "whole.pt"), str(data), device="cpu")


def test_state_dict_key_mismatch_lists_keys(tmp_path, planted_module):
    state = planted_module.eight_neuron().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["out.bias"]
    torch.save(state, tmp_path / "sd.pt")
    data = save_npz(tmp_path / "d.npz", x=np.zeros((2, 4), np.float32))
    with pytest.raises(UserError, match=r"1 missing \(e.g. out.bias\); 1 unexpected \(e.g. extra.weight\)"):
        scan(str(tmp_path / "sd.pt"), str(data), arch=arch("eight_neuron"), device="cpu")


def test_extra_tensors_are_left_out_with_a_note(tmp_path, planted_module):
    """A checkpoint with tensors the architecture has no place for (resemblyzer's similarity_weight /
    similarity_bias, a loss's parameters) loads the rest strictly and says what it left out."""
    model = planted_module.eight_neuron()
    state = dict(
        model.state_dict(), similarity_weight=torch.tensor([10.0]), similarity_bias=torch.tensor([-5.0])
    )
    torch.save(state, tmp_path / "extra.pt")
    data = save_npz(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((9, 4)).astype(np.float32))
    report = scan(str(tmp_path / "extra.pt"), str(data), arch=arch("eight_neuron"), device="cpu")
    with torch.no_grad():
        pre = model.fc(torch.from_numpy(np.load(data)["x"]))
    np.testing.assert_array_equal(report.layers[0].positive_counts, (pre > 0).sum(0).numpy())
    assert any("left out: similarity_bias, similarity_weight" in note for note in report.notes)


def test_lightning_prefix_and_ema_key_are_unwrapped(tmp_path, planted_module):
    model = planted_module.eight_neuron()
    torch.save(
        {"model_ema": {f"model.{k}": v for k, v in model.state_dict().items()}, "step": 10}, tmp_path / "c.pt"
    )
    data = save_npz(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((9, 4)).astype(np.float32))
    report = scan(str(tmp_path / "c.pt"), str(data), arch=arch("eight_neuron"), device="cpu")
    assert np.flatnonzero(report.layers[0].dead_mask()).tolist() == [2, 4, 6]


def test_training_checkpoint_with_its_own_key(tmp_path, planted_module):
    """{"step", "model_state", "optimizer_state"} (resemblyzer's pretrained.pt) and any other single
    weight dict under a script's own key are found; two weight dicts are refused, naming both."""
    model = planted_module.eight_neuron()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()  # a real optimizer state: nested dicts of tensors, not a state_dict
    data = save_npz(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((9, 4)).astype(np.float32))
    expected = model.state_dict()
    for key in ("model_state", "my_weights"):
        torch.save(
            {"step": 3, key: expected, "optimizer_state": optimizer.state_dict()}, tmp_path / f"{key}.pt"
        )
        report = scan(str(tmp_path / f"{key}.pt"), str(data), arch=arch("eight_neuron"), device="cpu")
        with torch.no_grad():
            pre = model.fc(torch.from_numpy(np.load(data)["x"]))
        np.testing.assert_array_equal(report.layers[0].positive_counts, (pre > 0).sum(0).numpy())
    torch.save({"generator": expected, "discriminator": expected}, tmp_path / "two.pt")
    with pytest.raises(UserError, match=r"several weight dicts \(generator, discriminator\)"):
        scan(str(tmp_path / "two.pt"), str(data), arch=arch("eight_neuron"), device="cpu")


def test_a_second_weight_dict_is_named(tmp_path, planted_module):
    """{"model": …, "model_ema": …}: the scan reads "model" (the first of the known keys) and says so,
    naming the EMA copy it did not scan (before: silently; the EMA weights here have two more dead units)."""
    model = planted_module.eight_neuron()
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    ema["fc.bias"][[0, 1]] = -1e4
    torch.save({"model": model.state_dict(), "model_ema": ema, "epoch": 2}, tmp_path / "c.pt")
    data = save_npz(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((9, 4)).astype(np.float32))
    report = scan(str(tmp_path / "c.pt"), str(data), arch=arch("eight_neuron"), device="cpu")
    with torch.no_grad():
        pre = model.fc(torch.from_numpy(np.load(data)["x"]))
    np.testing.assert_array_equal(report.layers[0].positive_counts, (pre > 0).sum(0).numpy())
    assert any("under 'model'" in note and "'model_ema'" in note for note in report.notes), report.notes
