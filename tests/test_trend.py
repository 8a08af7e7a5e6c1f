"""deadrelu trend on a real (tiny, seeded) training run with a learning rate high enough to kill units."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ROOT

MLP_ARCH = str(ROOT / "sample_models" / "mlp" / "arch.py") + ":build"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import importlib.util

    folder = tmp_path_factory.mktemp("run")
    spec = importlib.util.spec_from_file_location(
        "mlp_arch_trend", ROOT / "sample_models" / "mlp" / "arch.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = module.build()
    x, y = torch.randn(256, 16), torch.randn(256, 4) * 5
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # deliberately too high
    states = {}
    for step in range(41):
        if step % 10 == 0:
            states[step] = {k: v.clone() for k, v in model.state_dict().items()}
            # saved out of order on disk names, ordered by the step inside
            torch.save({"global_step": step, "state_dict": states[step]}, folder / f"ckpt-{40 - step:02d}.pt")
        loss = ((model(x) - y) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    np.savez(folder / "calib.npz", x=x.numpy())
    return folder, module, states, x


def _reference_dead(module, state, x):
    """Dead units per layer, by a plain forward pass written out here."""
    model = module.build()
    model.load_state_dict(state)
    with torch.no_grad():
        h1 = model.fc1(x)
        h2 = model.fc2(torch.relu(h1))
    return {
        "act1": set(np.flatnonzero((h1 > 0).sum(0).numpy() == 0).tolist()),
        "relu()": set(np.flatnonzero((h2 > 0).sum(0).numpy() == 0).tolist()),
    }


def test_trend_matches_reference(cli, run):
    folder, module, states, x = run
    result = cli("trend", folder, "--data", folder / "calib.npz", "--arch", MLP_ARCH, "--json", "-")
    assert result.code == 0, result.err
    trend = json.loads(result.out)
    assert [c["step"] for c in trend["checkpoints"]] == [0, 10, 20, 30, 40]
    assert {c["order_from"] for c in trend["checkpoints"]} == {"checkpoint"}
    references = [_reference_dead(module, states[step], x) for step in (0, 10, 20, 30, 40)]
    for layer in trend["layers"]:
        units = layer["units"]
        expected = [len(ref[layer["name"]]) / units for ref in references]
        np.testing.assert_allclose(layer["dead_fraction"], expected)
        first_dead = {}
        for step, ref in zip((0, 10, 20, 30, 40), references, strict=True):
            for unit in ref[layer["name"]]:
                first_dead.setdefault(str(unit), step)
        assert layer["died_at"] == first_dead, layer["name"]
    fc2 = next(layer for layer in trend["layers"] if layer["name"] == "relu()")
    assert fc2["dead_fraction"][0] < fc2["dead_fraction"][-1]  # the high learning rate killed units


def test_trend_table_and_errors(cli, run):
    folder, *_ = run
    result = cli("trend", folder, "--data", folder / "calib.npz", "--arch", MLP_ARCH)
    assert result.code == 0 and "step 40" in result.out and "ordered by checkpoint" in result.out
    result = cli("trend", folder / "ckpt-00.pt", "--data", folder / "calib.npz", "--arch", MLP_ARCH)
    assert result.code == 2 and "at least two checkpoints" in result.err


def test_trend_html(cli, run, tmp_path):
    folder, *_ = run
    out = tmp_path / "trend.html"
    result = cli("trend", folder, "--data", folder / "calib.npz", "--arch", MLP_ARCH, "--html", out)
    assert result.code == 0, result.err
    text = out.read_text()
    assert (
        text.count("<svg") == 1
        and 'data-layer="relu()"' in text
        and "http://" not in text.replace("http://www.w3.org", "")
    )


def test_trend_onnx_files(cli, tmp_path):
    import shutil

    for i in (1, 2):
        shutil.copy(ROOT / "sample_models" / "cnn" / "model.onnx", tmp_path / f"export-{i}.onnx")
    result = cli(
        "trend",
        tmp_path / "export-*.onnx",
        "--data",
        ROOT / "sample_models" / "cnn" / "calib.npz",
        "--json",
        "-",
    )
    assert result.code == 0, result.err
    trend = json.loads(result.out)
    assert [c["order_from"] for c in trend["checkpoints"]] == ["file name", "file name"]
    assert trend["layers"][0]["dead_fraction"] == [0.25, 0.25]
