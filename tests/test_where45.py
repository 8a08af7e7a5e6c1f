"""where45: ReLUs the torch formats did not see, and unit axes they guessed without saying so.

- A ReLU spelled with the select or mask of a layer run twice (`torch.where(fc(h) > 0, fc(h), 0)`,
  `fc(h) * (fc(h) > 0)`, `fc(h).masked_fill(fc(h) < 0, 0)`) is a site in eager, `--compile`, .pt2 (as
  exported and decomposed) and TorchScript (scripted and traced), as ONNX counted it; before, nothing
  and no note in any torch format.
- A scripted model's own function (`def clamp_relu(x): return x.clamp(min=0)` called in forward) is
  walked: before, its clamp was missing from the site list while the run met it, so its counts went to
  the next site and every later site took its follower's counts (wrong producer, wrong dead units).
- `self.act(fc(h))` (a helper method spelling the ReLU): scripted found no producer and no site.
- `torch.fmax(x, zeros)`: a ReLU (0 at NaN, as threshold); before, nothing in any format. A negated mask
  (`x.masked_fill(~(x > 0), 0)`, `torch.where(torch.logical_not(x > 0), 0, x)`): before, nothing in any
  format, ONNX included. A clamp with a tensor of zeros as its bound (`torch.clamp(x, min=torch.zeros(()))`,
  `x.clamp_min(torch.zeros_like(x))`): before, nothing in the torch formats.
- A rank >= 4 activation no layer placed is counted on dim 1 with a note that says so and how to set
  --channel-dim, and a gate stops on it (a rank-3 guess too) unless --channel-dim or --allow-unseen,
  in every format; before, no note at rank 4 and no gate at all.

Truth: the model's weights in float64 torch ops, or numpy; never deadrelu. Each test fails on main."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import arch_file, export_onnx, save_npz

SAMPLES, FEATURES = 12, 4
DATA = np.random.RandomState(4545).randn(SAMPLES, FEATURES).astype(np.float32)

SPELLED = """
import torch
import torch.nn.functional as F
from torch import nn


def clamp_relu(x):
    return x.clamp(min=0)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        for i in range(8):
            setattr(self, f"fc{i}", nn.Linear(4 if i == 0 else 6, 6))
        self.head = nn.Linear(6, 2)

    def act(self, x):
        return torch.where(x > 0, x, 0.0)

    def forward(self, h):
        h = torch.where(self.fc0(h) > 0, self.fc0(h), 0.0)
        h = self.fc1(h) * (self.fc1(h) > 0)
        h = torch.where(self.fc2(h) > 0, self.fc2(h), torch.zeros_like(self.fc2(h)))
        h = clamp_relu(self.fc3(h))
        h = self.fc4(h).masked_fill(self.fc4(h) < 0, 0.0)
        h = F.threshold(self.fc5(h), 0.0, 0.0)
        h = self.act(self.fc6(h))
        x = self.fc7(h)
        h = torch.fmax(x, torch.zeros_like(x))
        return self.head(h)


def build():
    torch.manual_seed(45)
    model = Net()
    with torch.no_grad():
        for i in range(8):
            getattr(model, f"fc{i}").bias[i % 6] = -40.0
    return model.eval()
"""


def _truth(model) -> list[tuple[int, list[int], list[int]]]:
    """(units, dead units, positives per unit) of the eight ReLU layers, in float64."""
    h, found = torch.from_numpy(DATA).double(), []
    for layer in (getattr(model, f"fc{i}") for i in range(8)):
        pre = torch.nn.functional.linear(h, layer.weight.double(), layer.bias.double())
        positives = (pre > 0).sum(dim=0)
        found.append((pre.shape[-1], torch.nonzero(positives == 0).flatten().tolist(), positives.tolist()))
        h = pre.clamp(min=0)
    return found


def _scan(cli, args, data, *extra) -> dict:
    result = cli("scan", *args, "--data", data, "--json", "-", "-q", *extra)
    assert result.code == 0, result.err
    return result.json()


def _torch_formats(model, spec: str, example: torch.Tensor, tmp_path) -> dict[str, list]:
    """{format: the scan's model arguments}: state_dict + --arch (and --compile), .pt2 (and decomposed),
    scripted and traced TorchScript."""
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("b", max=1024)},))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    torch.export.save(program, tmp_path / "m.pt2")
    torch.export.save(program.run_decompositions(), tmp_path / "dec.pt2")
    with torch.no_grad():
        torch.jit.script(model).save(tmp_path / "s.pt")
        torch.jit.trace(model, example).save(tmp_path / "t.pt")
    return {
        "eager": [tmp_path / "m.pt", "--arch", spec],
        "compile": [tmp_path / "m.pt", "--arch", spec, "--compile"],
        "pt2": [tmp_path / "m.pt2"],
        "pt2 decomposed": [tmp_path / "dec.pt2"],
        "scripted": [tmp_path / "s.pt"],
        "traced": [tmp_path / "t.pt"],
    }


def test_relus_spelled_on_a_layer_run_twice_and_in_helpers_are_sites_in_every_torch_format(cli, tmp_path):
    """Eight ReLUs after Linears, spelled as a select / product / masked fill of a layer run twice, a
    module-level function's clamp, F.threshold, a helper method's select and an fmax: eight sites named
    relu() … relu()#8, each with its Linear as producer and the float64 truth's dead units and positives,
    in every torch format. Before: eager, .pt2 and TorchScript counted 3 to 5 of them without a word, and
    scripted TorchScript put fc3's counts under fc5 (its producer) and so on down the list."""
    model, spec = arch_file(tmp_path / "spelled.py", SPELLED)
    data = save_npz(tmp_path / "d.npz", x=DATA)
    truth = _truth(model)
    assert all(dead and len(dead) < units for units, dead, _ in truth)  # planted, and not all dead
    expected_names = ["relu()"] + [f"relu()#{i}" for i in range(2, 9)]
    for fmt, args in _torch_formats(model, spec, torch.from_numpy(DATA[:2]), tmp_path).items():
        layers = _scan(cli, args, data)["layers"]
        found = [(la["units"], la["dead_indices"], la["positive_counts"]) for la in layers]
        assert found == truth, (fmt, [(la["name"], la["producer"]) for la in layers])
        assert [la["producer"] for la in layers] == [f"fc{i}" for i in range(8)], fmt
        assert [la["name"] for la in layers] == expected_names, fmt
        assert all(la["elements_per_unit"] == SAMPLES for la in layers), fmt


TWICE_AND_NEGATED = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        for i in range(6):
            setattr(self, f"fc{i}", nn.Linear(4 if i == 0 else 6, 6))
        self.head = nn.Linear(6, 2)

    def forward(self, h):
        h = torch.where(self.fc0(h) > 0, self.fc0(h), 0.0)
        h = self.fc1(h) * (self.fc1(h) > 0)
        x = self.fc2(h)
        h = x.masked_fill(~(x > 0), 0.0)
        x = self.fc3(h)
        h = torch.where(torch.logical_not(x > 0), 0.0, x)
        x = self.fc4(h)
        h = x.clamp_min(torch.zeros_like(x))
        h = torch.clamp(self.fc5(h), min=torch.zeros(()))
        return self.head(h)


def build():
    torch.manual_seed(7)
    model = Net()
    with torch.no_grad():
        for i in range(6):
            getattr(model, f"fc{i}").bias[(i + 1) % 6] = -40.0
    return model.eval()
"""


def test_a_layer_run_twice_a_negated_mask_and_a_tensor_bound_count_alike_in_every_format(cli, tmp_path):
    """`torch.where(fc0(h) > 0, fc0(h), 0)`, `fc1(h) * (fc1(h) > 0)`, `x.masked_fill(~(x > 0), 0)`,
    `torch.where(torch.logical_not(x > 0), 0, x)`, `x.clamp_min(torch.zeros_like(x))` and
    `torch.clamp(x, min=torch.zeros(()))` after Linears: six sites with numpy's per-unit counts in eager,
    .pt2, scripted and traced TorchScript and the ONNX export (whose exporter merges the two calls;
    `Not(Greater(x, 0))` is x's mask turned round; `Max(x, Cast(ConstantOfShape(Shape(x))))`). Before:
    ONNX counted three of them (the two merged calls and the Clip), the torch formats none."""
    model, spec = arch_file(tmp_path / "twice.py", TWICE_AND_NEGATED)
    data = save_npz(tmp_path / "d.npz", x=DATA)
    h, truth = DATA.astype(np.float64), []
    for i in range(6):
        layer = getattr(model, f"fc{i}")
        pre = h @ layer.weight.detach().double().numpy().T + layer.bias.detach().double().numpy()
        truth.append((pre > 0).sum(axis=0).tolist())
        h = np.maximum(pre, 0)
    assert all(t[(i + 1) % 6] == 0 and max(t) > 0 for i, t in enumerate(truth))
    example = torch.from_numpy(DATA[:2])
    torch.save(model.state_dict(), tmp_path / "m.pt")
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("b", max=1024)},))
    torch.export.save(program, tmp_path / "m.pt2")
    with torch.no_grad():
        torch.jit.script(model).save(tmp_path / "s.pt")
        torch.jit.trace(model, example).save(tmp_path / "t.pt")
    onnx_path = export_onnx(model, example, tmp_path / "m.onnx")
    for args in (
        [tmp_path / "m.pt", "--arch", spec],
        [tmp_path / "m.pt2"],
        [tmp_path / "s.pt"],
        [tmp_path / "t.pt"],
        [onnx_path],
    ):
        layers = _scan(cli, args, data)["layers"]
        assert [la["positive_counts"] for la in layers] == truth, args


COMPUTED = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(-1.0, 1.0, 3).view(1, 3, 1, 1))

    def forward(self, x):
        h = torch.relu(x * self.scale - 0.25)  # [N, 3, 4, 5]: no layer says where its units are
        t = torch.relu(x.flatten(2) - 1.5)  # [N, 3, 20]
        return h.sum(dim=(2, 3)) + t.sum(dim=2)


def build():
    return Net().eval()
"""


def test_an_activation_no_layer_placed_is_said_and_gated_at_every_rank(cli, tmp_path):
    """relu of a computed [N, 3, 4, 5] tensor and of a computed [N, 3, 20] one: counted on dim 1 and on the
    last axis (numpy's counts on those axes), each named in a note that says which axis was assumed and
    how to set --channel-dim, and a gate stops on both unless --allow-unseen or --channel-dim says where
    the units are, in eager, --compile, .pt2, TorchScript and ONNX alike. Before: the rank-4 one had no
    note, and the gate passed on both."""
    model, spec = arch_file(tmp_path / "computed.py", COMPUTED)
    images = np.abs(np.random.RandomState(45).randn(6, 3, 4, 5)).astype(np.float32)
    data = save_npz(tmp_path / "d.npz", x=images)
    scale = model.scale.detach().double().numpy()
    pre4 = images.astype(np.float64) * scale - 0.25
    pre3 = images.astype(np.float64).reshape(6, 3, 20) - 1.5
    truth4 = (np.moveaxis(pre4, 1, -1).reshape(-1, 3) > 0).sum(axis=0).tolist()
    truth3 = (pre3.reshape(-1, 20) > 0).sum(axis=0).tolist()
    assert 0 in truth4 and 0 in truth3 and max(truth4) > 0
    example = torch.from_numpy(images[:2])
    formats = _torch_formats(model, spec, example, tmp_path)
    formats["onnx"] = [export_onnx(model, example, tmp_path / "m.onnx")]
    for fmt, args in formats.items():
        report = _scan(cli, args, data)
        assert [la["positive_counts"] for la in report["layers"]] == [truth4, truth3], fmt
        names = [la["name"] for la in report["layers"]]
        rank4 = [n for n in report["notes"] if n.startswith("unit axis assumed 1 ([N, C, H, W]) for ")]
        rank3 = [n for n in report["notes"] if n.startswith("unit axis assumed last ([N, T, C]) for ")]
        assert len(rank4) == 1 and f"for {names[0]}:" in rank4[0] and "--channel-dim" in rank4[0], fmt
        assert len(rank3) == 1 and f"for {names[1]}:" in rank3[0], (fmt, report["notes"])
        gated = cli("scan", *args, "--data", data, "--max-dead", "1.0", "-q")
        assert gated.code == 1, (fmt, gated.err)
        assert "counted on an assumed axis" in gated.err and names[0] in gated.err, (fmt, gated.err)
        allowed = cli("scan", *args, "--data", data, "--max-dead", "1.0", "--allow-unseen", "-q")
        assert allowed.code == 0, (fmt, allowed.err)
        said = _scan(cli, args, data, "--channel-dim", "1", "--max-dead", "1.0")
        assert not any("unit axis assumed" in n for n in said["notes"]), fmt
        assert said["layers"][0]["positive_counts"] == truth4, fmt


LIFTED_ZERO = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc0 = nn.Linear(4, 6)
        self.fc1 = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, h):
        h = torch.maximum(self.fc0(h), torch.tensor(0.0))
        h = torch.where(self.fc1(h) > 0, self.fc1(h), 0.0)
        return self.head(h)


def build():
    torch.manual_seed(3)
    model = Net()
    with torch.no_grad():
        model.fc0.bias[2] = -40.0
        model.fc1.bias[0] = -40.0
    return model.eval()
"""


def test_fix_and_certify_on_a_pt2_keep_a_relu_spelled_with_a_code_constant(cli, tmp_path):
    """`torch.maximum(fc0(h), torch.tensor(0.))` (the export lifts the constant) and a select of fc1 run
    twice, in a .pt2: `fix --strategy leaky` writes a program whose graph holds two leaky_relu nodes and no
    maximum / where, computing leaky_relu(fc(·)) as float64 torch does with the slope it wrote; `--certify`
    proves on both sites the units numpy's interval arithmetic proves. Before: fix copied the program's
    module, which made the lifted constant a buffer (a checkpoint tensor: no site), so the maximum was left
    as it was, and the written program's scan named it as a stored zero; certify read no site there."""
    model, _ = arch_file(tmp_path / "lifted.py", LIFTED_ZERO)
    data = save_npz(tmp_path / "d.npz", x=DATA)
    example = torch.from_numpy(DATA[:2])
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("b", max=1024)},))
    torch.export.save(program, tmp_path / "m.pt2")
    out = tmp_path / "fixed.pt2"
    fixed = cli("fix", tmp_path / "m.pt2", "--data", data, "--strategy", "leaky", "--output", out, "-q")
    assert fixed.code == 0, fixed.err
    written = torch.export.load(str(out))
    targets = [str(n.target) for n in written.graph.nodes if n.op == "call_function"]
    leaky = [n for n in written.graph.nodes if "leaky_relu" in str(n.target)]
    assert len(leaky) == 2 and not any(("maximum" in t or "where" in t) for t in targets), targets
    slopes = [float(n.args[1]) if len(n.args) > 1 else 0.01 for n in leaky]  # (aten's default slope)
    h = torch.from_numpy(DATA).double()
    for layer, slope in zip((model.fc0, model.fc1), slopes, strict=True):
        h = torch.nn.functional.leaky_relu(
            torch.nn.functional.linear(h, layer.weight.double(), layer.bias.double()), slope
        )
    expected = torch.nn.functional.linear(h, model.head.weight.double(), model.head.bias.double())
    got = written.module()(torch.from_numpy(DATA)).double()
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    # --certify: interval arithmetic in numpy through the two layers
    lo, hi, proven = np.full(FEATURES, -3.0), np.full(FEATURES, 3.0), []
    for layer in (model.fc0, model.fc1):
        w, b = layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()
        pre_lo = np.clip(w, 0, None) @ lo + np.clip(w, None, 0) @ hi + b
        pre_hi = np.clip(w, 0, None) @ hi + np.clip(w, None, 0) @ lo + b
        proven.append(np.flatnonzero(pre_hi + 1e-5 * (1 + np.abs(pre_hi)) <= 0).tolist())
        lo, hi = np.clip(pre_lo, 0, None), np.clip(pre_hi, 0, None)
    assert all(proven)
    report = _scan(cli, [tmp_path / "m.pt2"], data, "--certify", "--input-range", "-3", "3")
    assert [la["certified_dead_indices"] for la in report["layers"]] == proven


def test_watch_says_and_gates_an_assumed_axis():
    """watch() on the same model in training: both layers marked as counted on an assumed axis, both notes,
    and the window's gate fails on them (max_dead_layer=1.0 passes any count); the counts are numpy's on
    dim 1 and on the last axis. Before: no note at rank 4 and a passing gate."""
    from deadrelu_cli import watch

    exec(COMPUTED, space := {})
    model = space["build"]().train()
    images = np.abs(np.random.RandomState(45).randn(6, 3, 4, 5)).astype(np.float32)
    pre4 = images.astype(np.float64) * model.scale.detach().double().numpy() - 0.25
    truth4 = (np.moveaxis(pre4, 1, -1).reshape(-1, 3) > 0).sum(axis=0).tolist()
    w = watch(model, every=1, window=1, config=False, max_dead_layer=1.0)
    with pytest.warns(UserWarning, match="counted on an assumed axis"):
        for _ in range(2):
            w.step()
            model(torch.from_numpy(images)).sum().backward()
    report, result = w.reports[0], w.gate_results[0]
    assert [layer.extra.get("unit_axis") for layer in report.layers] == ["assumed", "assumed"]
    assert report.layers[0].positive_counts.tolist() == truth4
    assert sum(note.startswith("unit axis assumed") for note in report.notes) == 2, report.notes
    assert not result.passed and any("assumed axis" in f for f in result.model_failures)


RECOMPUTED_CHAIN = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 6)
        self.res = nn.Linear(6, 6)
        self.other = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        y = torch.where(self.bn(self.conv(x)) > 0, self.bn(self.conv(x)), 0.0)
        h = y.mean(dim=(2, 3))
        h = torch.where(self.fc(h) * 2 > 0, self.fc(h) * 2, 0.0)
        h = torch.where(self.res(h) + h > 0, self.res(h) + h, 0.0)
        other = self.other(h) * (self.other(h) - 1.0 > 0)  # another value's mask: no ReLU
        return self.head(h + other)


def build():
    torch.manual_seed(42)
    model = Net()
    with torch.no_grad():
        model.bn.bias[1] = -40.0
        model.bn.running_var.fill_(2.0)
        model.fc.bias[2] = -40.0
        model.res.bias[3] = -40.0
    return model.eval()
"""


def test_a_chain_of_layers_run_twice_is_one_value_in_every_format(cli, tmp_path):
    """`torch.where(bn(conv(x)) > 0, bn(conv(x)), 0)` (two layers run twice: the first conv output is freed
    before the second is made), `torch.where(fc(h) * 2 > 0, fc(h) * 2, 0)` and `torch.where(res(h) + h > 0,
    res(h) + h, 0)` (elementwise ops after the layer, with a number or a tensor): three sites with float64 torch's per-unit counts in eager, .pt2, scripted and ONNX, and
    `other(h) * (other(h) - 1 > 0)` none. Before: the torch formats listed neither."""
    model, spec = arch_file(tmp_path / "chain.py", RECOMPUTED_CHAIN)
    images = np.random.RandomState(5).randn(6, 3, 5, 5).astype(np.float32)
    data = save_npz(tmp_path / "d.npz", x=images)
    with torch.no_grad():
        double = {k: v.double() for k, v in model.state_dict().items()}
        x = torch.from_numpy(images).double()
        pre = torch.nn.functional.conv2d(x, double["conv.weight"], double["conv.bias"], padding=1)
        pre = torch.nn.functional.batch_norm(
            pre, double["bn.running_mean"], double["bn.running_var"], double["bn.weight"], double["bn.bias"]
        )
        first = (pre > 0).sum(dim=(0, 2, 3)).tolist()
        h = pre.clamp(min=0).mean(dim=(2, 3))
        pre = torch.nn.functional.linear(h, double["fc.weight"], double["fc.bias"]) * 2
        second = (pre > 0).sum(0).tolist()
        h = pre.clamp(min=0)
        pre = torch.nn.functional.linear(h, double["res.weight"], double["res.bias"]) + h
        third = (pre > 0).sum(0).tolist()
    assert first[1] == 0 and second[2] == 0 and third[3] == 0 and min(map(max, (first, second, third))) > 0
    example = torch.from_numpy(images[:2])
    torch.save(model.state_dict(), tmp_path / "m.pt")
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("b", max=1024)},))
    torch.export.save(program, tmp_path / "m.pt2")
    with torch.no_grad():
        torch.jit.script(model).save(tmp_path / "s.pt")
    onnx_path = export_onnx(model, example, tmp_path / "m.onnx")
    for args in ([tmp_path / "m.pt", "--arch", spec], [tmp_path / "m.pt2"], [tmp_path / "s.pt"], [onnx_path]):
        layers = _scan(cli, args, data)["layers"]
        assert [la["positive_counts"] for la in layers] == [first, second, third], args
