"""Every statistic of the JSON report and the table (active rate, dead, dying, dormant with --tau,
saturated, median, max pre-activation, mean |act|) against tests/truth.py: activations captured with
plain torch forward hooks / onnxruntime outputs, counted in numpy from the documented definitions."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import arch, arch_file, save_npz, save_state_dict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from truth import (
    Captured,
    assert_json_matches,
    assert_layers_table,
    assert_summary_line,
    assert_units_table,
    capture,
    onnx_relu_io,
    reference_activation,
    truth_of,
)

# (factory, one sample's shape, unit axis per site, functional sites {name: (producer module, op)},
# CLI settings); functional relus are invisible to module hooks: their producer's output is hooked
PLANTED = [
    ("eight_neuron", (4,), {"relu": 1}, {}, {}),
    ("graded", (3,), {"act": 1, "act6": 1}, {}, {"dying": 0.01, "tau": 0.1}),
    ("graded", (3,), {"act": 1, "act6": 1}, {}, {"dying": 0.05, "tau": 0.3, "threshold": 0.05}),
    # unit 1 fires on exactly 3 of the 400 samples: at --dying 0.0075 it is not dying (rate < dying)
    ("graded", (3,), {"act": 1, "act6": 1}, {}, {"dying": 0.0075, "tau": 0.1}),
    ("relu6_model", (4,), {"act": 1, "relu6()": 1}, {"relu6()": ("fc2", "relu6")}, {}),
    ("conv_bn", (3, 5, 5), {"act": 1, "act1d": 1}, {}, {"tau": 0.5}),
    ("tokens", (6, 8), {"relu()": 2}, {"relu()": ("up", "relu")}, {"dying": 0.2}),
]


def _scan_cli(cli, folder, ckpt, spec, data, flags, layer=None):
    out = folder / "report.json"
    result = cli(
        "scan", ckpt, "--arch", spec, "--data", data, "--json", out, "--batch-size", "7",
        *flags, *(("--layer", layer) if layer else ()),
    )  # fmt: skip
    assert result.code == 0, result.err
    return json.loads(out.read_text()), result.out


def _flags(settings_: dict) -> list[str]:
    return [part for key, value in settings_.items() for part in (f"--{key}", str(value))]


@pytest.mark.parametrize("factory, shape, dims, producers, options", PLANTED)
def test_planted_models_json_and_table(
    cli, tmp_path, planted_module, factory, shape, dims, producers, options
):
    model = getattr(planted_module, factory)().eval()
    x = np.random.default_rng(11).standard_normal((400 if len(shape) == 1 else 40, *shape)).astype(np.float32)
    sites = capture(model, torch.from_numpy(x).split(50), producers=producers)
    truths = {name: truth_of(site, dims[name], **options) for name, site in sites.items()}
    ckpt, data = save_state_dict(model, tmp_path / "m.pt"), save_npz(tmp_path / "d.npz", x=x)
    report, table = _scan_cli(cli, tmp_path, ckpt, arch(factory), data, _flags(options))
    assert_json_matches(report, truths)
    assert_layers_table(table, truths, {name: site.op for name, site in sites.items()})
    assert_summary_line(table, truths)
    first = next(iter(truths))
    _, units = _scan_cli(cli, tmp_path, ckpt, arch(factory), data, _flags(options), layer=first)
    assert_units_table(units, truths[first], None, dying=options.get("dying", 0.01))
    if factory == "graded" and options == {"dying": 0.0075, "tau": 0.1}:
        assert truths["act"].positive_counts[1] == 3 and truths["act"].dying == []
    if factory == "graded" and options == {"dying": 0.01, "tau": 0.1}:
        # the planted statuses are all there, so each formula above was exercised
        act, act6 = truths["act"], truths["act6"]
        assert act.dead == [0] and act.dying == [1] and 2 in act.dormant and act6.saturated == [0]
        assert act6.dead == [1]


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    seed=st.integers(0, 10**6),
    width=st.integers(1, 9),
    shift=st.floats(-2.0, 1.0),
    threshold=st.sampled_from([0.0, 0.2]),
    dying=st.sampled_from([0.01, 0.2]),
    tau=st.sampled_from([0.1, 0.6]),
)
def test_random_models_json_and_table(cli, tmp_path_factory, seed, width, shift, threshold, dying, tau):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(3, width), nn.ReLU(), nn.Linear(width, 5), nn.ReLU6(), nn.Linear(5, 4), nn.ReLU()
    ).eval()
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.Linear):
                module.weight.mul_(4.0)
                module.bias.add_(shift * torch.rand(module.bias.shape) * 4)
    folder = tmp_path_factory.mktemp("random")
    model_py = folder / "arch.py"
    torch.save(model, folder / "whole.pt")  # the factory reloads this exact module
    model_py.write_text(
        "import torch\n\ndef build():\n"
        f"    return torch.load({str(folder / 'whole.pt')!r}, weights_only=False)\n"
    )
    x = np.random.default_rng(seed).standard_normal((90, 3)).astype(np.float32)
    options = {"threshold": threshold, "dying": dying, "tau": tau}
    truths = {
        name: truth_of(site, 1, **options)
        for name, site in capture(model, torch.from_numpy(x).split(40)).items()
    }
    ckpt, data = save_state_dict(model, folder / "m.pt"), save_npz(folder / "d.npz", x=x)
    report, table = _scan_cli(cli, folder, ckpt, f"{model_py}:build", data, _flags(options))
    assert_json_matches(report, truths)
    assert_layers_table(table, truths, {"1": "relu", "3": "relu6", "5": "relu"})
    assert_summary_line(table, truths)


def test_optional_ops_follow_their_definitions(cli, tmp_path, planted_module):
    """--ops leaky_relu,elu,gelu,silu: only those sites; fired = pre-activation above the threshold;
    mean |act| from each op's own formula in numpy (LeakyReLU(0.2), ELU(0.7), exact-erf GELU, SiLU)."""
    model = planted_module.smooth_ops().eval()
    x = np.random.default_rng(12).standard_normal((300, 4)).astype(np.float32)
    sites = capture(model, torch.from_numpy(x).split(64))
    params = {"leaky": {"slope": 0.2}, "elu": {"alpha": 0.7}, "gelu": {}, "silu": {}}
    assert list(sites) == ["leaky", "elu", "gelu", "silu", "relu"]
    expected = {}
    for name, kwargs in params.items():
        site = sites[name]
        by_formula = reference_activation(site.op, site.pre, **kwargs)
        np.testing.assert_allclose(site.post, by_formula, rtol=1e-5, atol=1e-6)  # the formulas are torch's
        expected[name] = Captured(site.op, site.pre, by_formula)
    ckpt, data = save_state_dict(model, tmp_path / "m.pt"), save_npz(tmp_path / "d.npz", x=x)
    for threshold in (0.0, -0.3):
        truths = {name: truth_of(site, 1, threshold=threshold) for name, site in expected.items()}
        report, table = _scan_cli(
            cli, tmp_path, ckpt, arch("smooth_ops"), data,
            ["--ops", "leaky_relu,elu,gelu,silu", "--threshold", str(threshold)],
        )  # fmt: skip
        assert [layer["op"] for layer in report["layers"]] == ["leaky_relu", "elu", "gelu", "silu"]
        assert_json_matches(report, truths)
        assert_layers_table(table, truths, {name: site.op for name, site in expected.items()})
        if threshold == 0.0:
            assert all(0 in t.dead for t in truths.values())  # the planted bias -30 units


def test_onnx_statistics_from_onnxruntime_outputs(cli, tmp_path):
    """The ONNX scan's every statistic against the graph's own Relu inputs/outputs from onnxruntime."""
    from onnx_graphs import gemm_relu

    model = gemm_relu()
    onnx.save(model, str(tmp_path / "m.onnx"))
    x = np.random.default_rng(13).standard_normal((70, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    truths = {
        name: truth_of(site, 1, tau=0.4, dying=0.1)
        for name, site in onnx_relu_io(model, {"x": x}, ["relu1"]).items()
    }
    result = cli(
        "scan", tmp_path / "m.onnx", "--data", tmp_path / "d.npz", "--tau", "0.4", "--dying", "0.1",
        "--batch-size", "16", "--json", tmp_path / "r.json",
    )  # fmt: skip
    assert result.code == 0, result.err
    assert_json_matches(json.loads((tmp_path / "r.json").read_text()), truths)
    assert_layers_table(result.out, truths, {"relu1": "relu"})
    assert_summary_line(result.out, truths)
    assert truths["relu1"].dead == [2, 4, 6]


def test_a_layer_that_never_fires_is_dormant_throughout(cli, tmp_path):
    """docs/report-schema.md: dormant is 'all units when the layer's mean is 0'; the layer after it sees
    only zeros, so its units sit at their biases (0.5: always active; -0.5: dead, and dormant)."""
    model, spec = arch_file(
        tmp_path / "arch.py",
        "import torch\nfrom torch import nn\n\n"
        "def build():\n"
        "    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU())\n"
        "    with torch.no_grad():\n"
        "        model[0].bias.fill_(-100.0)\n"
        "        model[2].bias.copy_(torch.tensor([0.5, -0.5]))\n"
        "    return model\n",
    )
    x = np.random.default_rng(14).standard_normal((30, 3)).astype(np.float32)
    truths = {name: truth_of(site, 1) for name, site in capture(model, [torch.from_numpy(x)]).items()}
    assert truths["1"].dead == truths["1"].dormant == [0, 1, 2, 3]
    assert truths["3"].dead == [1] and truths["3"].dormant == [1]
    ckpt, data = save_state_dict(model, tmp_path / "m.pt"), save_npz(tmp_path / "d.npz", x=x)
    report, table = _scan_cli(cli, tmp_path, ckpt, spec, data, [])
    assert_json_matches(report, truths)
    assert_layers_table(table, truths, {"1": "relu", "3": "relu"})
