"""sites44: one model, every format, the same answer; `fix` never claims what it did not get.

A zoo of spelled, doubled, in-place, shared and clamped ReLUs (and a LeakyReLU / ReLU6 not scanned) gives
the same layers, units, per-unit counts and not-scanned activations as a state_dict + --arch, .pt2,
scripted and traced TorchScript and a dynamo=False ONNX export. `fix` on a .pt2 whose select clamps a
ReLU's output checks the layers it changed (the program written back used to hold one more clamp site,
so the rescan read another layer's units); a bias tied to another module's is refused as tied in .pt2
as in the other formats; an fp32 bias far larger than its unit's values is moved past the cut (it was
left dead with "revived N of M" and exit 0); a unit a bias move cannot reach says so.

Truth: the models' weights in float64 torch (their own `sites()` list of pre-activations), forward hooks
or onnxruntime with the intermediate value as an extra output, never deadrelu. Each test fails on the
code before this branch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import arch_file, export_onnx, save_npz
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SAMPLES = 24
DATA = np.random.RandomState(4401).randn(SAMPLES, 4).astype(np.float32)

ZOO = """
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.ModuleList([nn.Linear(4 if i == 0 else 6, 6) for i in range(7)])
        self.head = nn.Linear(6, 2)
        self.act = nn.ReLU()
        self.act6 = nn.ReLU6()

    def forward(self, x):
        h = F.relu(F.relu(self.fc[0](x)))            # relu of relu: two sites
        h = self.act(self.act(self.fc[1](h)))        # one module called twice on itself: two
        a = self.fc[2](h)
        a = F.relu(a, inplace=True)
        h = a.relu_()                                # in place, twice: two
        a = self.act(self.fc[3](h))
        h = torch.where(a > 0, a, 0.0)               # a select of a ReLU's output: no site
        h = torch.clamp(self.act(self.fc[4](h)), min=0)  # a clamp of it: a site
        h = F.relu6(F.relu(self.fc[5](h)))           # relu, then relu6 (not scanned)
        h = torch.clamp(F.hardtanh(self.fc[6](h), 0.0, 6.0), 0, 6)  # two relu6 (not scanned)
        return self.head(F.leaky_relu(h))            # leaky_relu (not scanned)

    def sites(self, x):
        \"\"\"The scanned sites' pre-activations in float64, in the order they run.\"\"\"
        def lin(i, v):
            return F.linear(v, self.fc[i].weight.double(), self.fc[i].bias.double())

        x, out = x.double(), []
        for i in range(5):
            pre = lin(i, x)
            out += [pre, pre] if i != 3 else [pre]
            x = pre.clamp(min=0)
        pre = lin(5, x)
        out.append(pre)
        return out


def build():
    torch.manual_seed(44)
    net = Net()
    with torch.no_grad():
        for i, unit in enumerate([1, 2, 0, 3, 4, 5, 1]):
            net.fc[i].bias[unit] = -50.0
    return net
"""


def _formats(model, spec: str, tmp_path) -> dict[str, list]:
    example = torch.from_numpy(DATA[:2])
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("b", max=1024)},))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    torch.export.save(program, tmp_path / "m.pt2")
    formats = {"eager": [tmp_path / "m.pt", "--arch", spec], "pt2": [tmp_path / "m.pt2"]}
    with torch.no_grad():
        torch.jit.script(model).save(tmp_path / "s.pt")
        torch.jit.trace(model, example).save(tmp_path / "t.pt")
    formats["scripted"], formats["traced"] = [tmp_path / "s.pt"], [tmp_path / "t.pt"]
    formats["onnx"] = [export_onnx(model, example, tmp_path / "m.onnx")]
    return formats


def test_zoo_of_relus_agrees_in_every_format(cli, tmp_path):
    """Nine ReLU sites (doubled, a module applied to its own output, in place twice, a clamp of a ReLU's
    output; a select of one is none) with the float64 truth's units and positives in every format, and
    the same activations named as not scanned: relu6 x3 (a clamp(0, 6) of a hardtanh's output among
    them) and one leaky_relu. Before: the traced TorchScript named none of them, eager and TorchScript
    left the clamp(0, 6) out."""
    model, spec = arch_file(tmp_path / "zoo.py", ZOO)
    data = save_npz(tmp_path / "d.npz", x=DATA)
    with torch.no_grad():
        truth = [(6, (pre > 0).sum(0).tolist()) for pre in model.sites(torch.from_numpy(DATA))]
    assert len(truth) == 10 and all(0 in counts for _, counts in truth)  # planted dead units
    for fmt, args in _formats(model, spec, tmp_path).items():
        result = cli("scan", *args, "--data", data, "--ops", "relu", "--json", "-", "-q")
        assert result.code in (0, 1), (fmt, result.err)
        report = result.json()
        found = [(la["units"], la["positive_counts"]) for la in report["layers"]]
        assert found == truth, (fmt, [la["name"] for la in report["layers"]])
        assert report.get("unscanned_activations") == {"relu6": 3, "leaky_relu": 1}, fmt


SELECT = """
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        a = F.relu(self.fc1(x))
        h = torch.where(a > 0, a, 0.0)  # a select of a ReLU's output: no site of its own
        return self.head(F.relu(self.fc2(h)))


def build():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.fc1.bias[1] = -50.0
        net.fc2.bias[[0, 3]] = -50.0
    return net
"""


def test_fix_of_a_program_checks_the_layers_it_changed(cli, tmp_path):
    """reinit and prune on a .pt2 whose select clamps a ReLU's output: the fix's rescan reports fc2's
    units as they are in the written program (float64 truth from its weights): reinit's dead units fire
    at the rates they do, prune leaves the live units. Before: the program written back held a clamp of the
    ReLU's output, one more site, and `relu()#2` named fc1's units there (1 dead of 6 after a prune)."""
    model, _ = arch_file(tmp_path / "select.py", SELECT)
    data = save_npz(tmp_path / "d.npz", x=DATA)
    example = torch.from_numpy(DATA[:2])
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("b", max=1024)},))
    torch.export.save(program, tmp_path / "m.pt2")
    with torch.no_grad():
        dead = np.flatnonzero(
            ~(model.fc2(torch.relu(model.fc1(example.new_tensor(DATA)))) > 0).any(0)
        ).tolist()
    assert 0 in dead and 3 in dead and len(dead) < 6
    for strategy in ("reinit", "prune"):
        out = tmp_path / f"{strategy}.pt2"
        result = cli(
            "fix", tmp_path / "m.pt2", "--data", data, "-s", strategy, "-o", out, "--json", "-", "-q"
        )
        assert result.code == 0, result.err
        layer = next(la for la in result.json()["layers"] if la["name"] == "relu()#2")
        state = torch.export.load(out).state_dict
        x = torch.from_numpy(DATA).double()
        h = torch.relu(
            torch.nn.functional.linear(x, state["fc1.weight"].double(), state["fc1.bias"].double())
        )
        pre = torch.nn.functional.linear(h, state["fc2.weight"].double(), state["fc2.bias"].double())
        fires = (pre > 0).double().mean(0)
        assert layer["units_after"] == pre.shape[1], strategy
        assert layer["dead_after"] == int((fires == 0).sum()), strategy
        if strategy == "reinit":
            assert layer["units"] == dead
            assert np.allclose(layer["rates_after"], fires[dead].tolist()), (layer["rates_after"], fires)
        else:
            assert pre.shape[1] == 6 - len(dead) and layer["dead_after"] == 0


TIED = """
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)
        with torch.no_grad():
            self.fc1.bias[1] = -50.0
        self.fc2.bias = self.fc1.bias  # one Parameter, two modules

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def build():
    torch.manual_seed(0)
    return Net()
"""


def test_tied_bias_is_its_own_module_and_refused_as_tied(cli, tmp_path):
    """fc1 and fc2 share one bias Parameter. The .pt2 scan names fc1 as relu()'s producer, as eager,
    TorchScript and ONNX do (the code: relu(fc1(x))), and bias-shift refuses both layers as tied. Before:
    .pt2 named fc2 (the one name torch.export keeps for the tensor) and refused with "fc2 also makes
    relu()#2 (one module called at several sites)"."""
    model, spec = arch_file(tmp_path / "tied.py", TIED)
    data = save_npz(tmp_path / "d.npz", x=DATA)
    for fmt, args in _formats(model, spec, tmp_path).items():
        result = cli("scan", *args, "--data", data, "--json", "-", "-q")
        assert result.code in (0, 1), result.err
        producers = [la["producer"] for la in result.json()["layers"]]
        assert producers == (["/fc1/Gemm", "/fc2/Gemm"] if fmt == "onnx" else ["fc1", "fc2"]), (
            fmt,
            producers,
        )
    result = cli("fix", tmp_path / "m.pt2", "--data", data, "-s", "bias-shift", "-o", tmp_path / "o.pt2")
    assert result.code == 2
    assert "fc1.bias is tied to fc2.bias" in result.err and "several sites" not in result.err, result.err
    # a tied weight (an LM head's) is the other way round: fc2 reads fc1's weight, its own bias
    tied_weight = (
        TIED.replace("self.fc2.bias = self.fc1.bias", "self.fc2.weight = self.fc1.weight")
        .replace("nn.Linear(4, 6)", "nn.Linear(6, 6)")
        .replace("F.relu(self.fc1(x))", "F.relu(self.fc1(x.repeat(1, 2)[:, :6]))")
    )
    model, _ = arch_file(tmp_path / "tied_weight.py", tied_weight)
    program = torch.export.export(model, (torch.from_numpy(DATA[:2]),))
    torch.export.save(program, tmp_path / "w.pt2")
    result = cli("scan", tmp_path / "w.pt2", "--data", data, "--json", "-", "-q")
    assert [la["producer"] for la in result.json()["layers"]] == ["fc1", "fc2"], result.err


ABSORB = """
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)
        with torch.no_grad():
            # unit 0: 1e5 * 1000 from a constant input, a bias near -1e8 (float32 steps of 8) and values
            # a few steps apart; unit 2: an ordinary dead unit
            self.fc1.weight[0] = torch.tensor([1e5, 1.0, 0.0])
            self.fc1.bias[0] = -1e8 - 1000.0
            self.fc1.bias[2] = -50.0

    def forward(self, x):
        return self.head(F.relu(self.fc1(x)))


def build():
    torch.manual_seed(0)
    return Net()
"""


def test_bias_shift_moves_a_large_fp32_bias_past_the_cut(cli, tmp_path):
    """An fp32 bias near -1e8 whose unit's values lie a few float32 steps apart: bias-shift writes every
    dead unit firing (truth: a forward hook on the written state_dict's model, onnxruntime with the Gemm
    output as an extra output). Before: the nearest float32 put unit 0 on the dead side of the cut, the
    settle move was smaller than one step, and `fix` ended with "revived 2 of the 3", exit 0."""
    model, spec = arch_file(tmp_path / "absorb.py", ABSORB)
    rs = np.random.RandomState(5)
    x = np.stack([np.full(32, 1000.0), rs.randn(32) * 12, rs.randn(32)], 1).astype(np.float32)
    data = save_npz(tmp_path / "d.npz", x=x)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    with torch.no_grad():
        dead = np.flatnonzero(~(model.fc1(torch.from_numpy(x)) > 0).any(0).numpy()).tolist()
    assert 0 in dead and 2 in dead
    result = cli(
        "fix", tmp_path / "m.pt", "--arch", spec, "--data", data, "-s", "bias-shift", "-o", tmp_path / "o.pt"
    )
    assert result.code == 0, result.out + result.err
    model.load_state_dict(torch.load(tmp_path / "o.pt"))
    seen = []
    model.fc1.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    with torch.no_grad():
        model(torch.from_numpy(x))
    assert (seen[0][:, dead] > 0).any(0).all(), seen[0][:, dead].max(0)

    export_onnx(arch_file(tmp_path / "absorb.py", ABSORB)[0], torch.from_numpy(x[:2]), tmp_path / "m.onnx")
    result = cli("fix", tmp_path / "m.onnx", "--data", data, "-s", "bias-shift", "-o", tmp_path / "o.onnx")
    assert result.code == 0, result.out + result.err
    written = onnx.load(tmp_path / "o.onnx")
    gemm = next(n for n in written.graph.node if n.op_type == "Gemm")
    written.graph.output.append(
        onnx.helper.make_tensor_value_info(gemm.output[0], onnx.TensorProto.FLOAT, None)
    )
    session = ort.InferenceSession(written.SerializeToString(), providers=["CPUExecutionProvider"])
    pre = session.run([gemm.output[0]], {"x": x})[0]
    assert (pre[:, dead] > 0).any(0).all(), pre[:, dead].max(0)


ZERO_GAIN = """
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.head = nn.Linear(6, 2)
        self.register_buffer("scale", torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0]))
        with torch.no_grad():
            self.fc1.bias[3] = -50.0

    def forward(self, x):
        return self.head(F.relu(self.fc1(x) * self.scale))  # unit 1: always 0, whatever its bias


def build():
    torch.manual_seed(0)
    return Net()
"""


def test_bias_shift_names_a_unit_its_bias_cannot_reach(cli, tmp_path):
    """A unit multiplied by a stored 0 after its Linear cannot fire for any bias: bias-shift refuses the
    layer naming that unit and the zero factor. Before: "does not move the pre-activation by one constant
    per unit (a data-dependent op between them)", naming neither (the op is no data-dependent one)."""
    model, spec = arch_file(tmp_path / "zero.py", ZERO_GAIN)
    data = save_npz(tmp_path / "d.npz", x=DATA)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    with torch.no_grad():
        pre = model.fc1(torch.from_numpy(DATA)) * model.scale
    assert not (pre[:, 1] > 0).any() and not (pre[:, 3] > 0).any()
    result = cli(
        "fix", tmp_path / "m.pt", "--arch", spec, "--data", data, "-s", "bias-shift", "-o", tmp_path / "o.pt"
    )
    assert result.code == 2
    assert "unit(s) 1 " in result.err and "zero factor" in result.err, result.err
    assert "data-dependent" not in result.err


TWO_JOINS = """
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 3)
        self.fc2 = nn.Linear(4, 3)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        # one module reads h in both halves here and in the first half only there: the second half of
        # its input is fc2's output in the other call
        return self.head(torch.cat([h, h], -1)) + self.head(torch.cat([h, self.fc2(x)], -1))


def build():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.fc1.bias[1] = -50.0
    return net
"""


def test_a_consumer_reading_a_site_in_different_columns_is_refused_up_front(cli, tmp_path):
    """`head(cat([h, h])) + head(cat([h, fc2(x)]))`: zeroing head's input columns of h's dead unit in both
    halves would zero a column of fc2's output in the second call. reinit refuses the layer before
    patching, in eager (naming head and the columns) as in .pt2/TorchScript, and ONNX names the shared
    weight. Before: eager patched, and the output check failed with "outputs changed by 0.375 relative"
    (exit 1); ONNX said /head/Gemm is "not a Conv/Gemm/MatMul with stored weights"."""
    model, spec = arch_file(tmp_path / "joins.py", TWO_JOINS)
    data = save_npz(tmp_path / "d.npz", x=DATA)
    with torch.no_grad():
        assert not (model.fc1(torch.from_numpy(DATA))[:, 1] > 0).any()  # the planted dead unit
    formats = _formats(model, spec, tmp_path)
    for fmt, args in formats.items():
        out = tmp_path / f"o{args[0].suffix}"
        result = cli("fix", *args, "--data", data, "-s", "reinit", "-o", out)
        assert result.code == 2, (fmt, result.out, result.err)
        assert "head" in result.err and "places" in result.err, (fmt, result.err)


# The property's vocabulary: how each op is written after `v`, and what it is (a scanned ReLU site, a
# spelled ReLU: a site only of a layer's output, or an activation --ops relu names but does not count)
CODE = {
    "relu": "F.relu(v)",
    "relu_": "v.relu_()",
    "module": "self.act(v)",
    "clamp": "v.clamp(min=0)",
    "where": "torch.where(v > 0, v, 0.0)",
    "mask": "v * (v > 0)",
    "maximum": "torch.maximum(v, torch.zeros_like(v))",
    "relu6": "F.relu6(v)",
    "hardtanh": "F.hardtanh(v, 0.0, 6.0)",
    "clamp6": "v.clamp(0, 6)",
    "leaky": "F.leaky_relu(v)",
}
RELUS, SPELLED, RELU6S = (
    ("relu", "relu_", "module", "clamp"),
    ("where", "mask", "maximum"),
    ("relu6", "hardtanh", "clamp6"),
)
FIRST = RELUS + SPELLED + RELU6S + ("leaky",)


@st.composite
def chains(draw):
    """Two Linear layers, each followed by one or two of the ops: a spelled ReLU only of the layer's
    output or of a ReLU's (what it is after another activation is no rule yet)."""
    stages = []
    for _ in range(2):
        first = draw(st.sampled_from(FIRST))
        seconds = (None,) + RELUS + RELU6S + (SPELLED if first in RELUS else ())
        stages.append((first, draw(st.sampled_from(seconds))))
    return stages


def _chain_source(stages) -> str:
    lines = []
    for i, ops in enumerate(stages):
        lines.append(f"v = self.fc{i}(v)")
        lines += [f"v = {CODE[op]}" for op in ops if op]
    body = "\n        ".join(lines)
    return f"""
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc0 = nn.Linear(4, 5)
        self.fc1 = nn.Linear(5, 5)
        self.head = nn.Linear(5, 2)
        self.act = nn.ReLU()

    def forward(self, v):
        {body}
        return self.head(v)


def build():
    torch.manual_seed(7)
    net = Net()
    with torch.no_grad():
        net.fc0.bias[1] = net.fc1.bias[3] = -50.0
    return net
"""


def _chain_truth(model, stages):
    """(per site: units and positives, {op: layers named but not scanned}) by the rule, in float64."""
    v, sites, unscanned = torch.from_numpy(DATA).double(), [], {}
    for i, ops in enumerate(stages):
        layer = getattr(model, f"fc{i}")
        v = torch.nn.functional.linear(v, layer.weight.double(), layer.bias.double())
        for position, op in enumerate(o for o in ops if o):
            if op in RELUS or (op in SPELLED and position == 0):
                sites.append((v.shape[1], (v > 0).sum(0).tolist()))
            if op in RELU6S or op == "leaky":
                name = "relu6" if op in RELU6S else "leaky_relu"
                unscanned[name] = unscanned.get(name, 0) + 1
            v = (
                torch.nn.functional.leaky_relu(v)
                if op == "leaky"
                else v.clamp(0, 6 if op in RELU6S else None)
            )
    return sites, unscanned


@pytest.fixture(scope="module")
def chain_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("chains")


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(stages=chains())
def test_relu_chains_agree_in_every_format(cli, chain_dir, stages):
    """Any two ReLU-like ops after a layer (doubled ReLUs, a clamp or a spelled ReLU of a ReLU's output, a
    ReLU6 / hardtanh / clamp(0, 6) or LeakyReLU beside them): the sites, their units and positives and
    the activations named as not scanned follow one rule in eager, .pt2, scripted and traced TorchScript
    and ONNX: a relu / clamp(min=0) call is a site wherever it runs, a spelled ReLU only of a layer's
    output, every ReLU6 and LeakyReLU is named. Truth: that rule on float64 pre-activations."""
    folder = chain_dir / "_".join(f"{a}_{b}" for a, b in stages)  # (a Python module name: TorchScript's)
    folder.mkdir(exist_ok=True)
    model, spec = arch_file(folder / "chain.py", _chain_source(stages))
    data = save_npz(folder / "d.npz", x=DATA)
    truth, unscanned = _chain_truth(model, stages)
    for fmt, args in _formats(model, spec, folder).items():
        result = cli("scan", *args, "--data", data, "--ops", "relu", "--json", "-", "-q")
        assert result.code in (0, 1), (fmt, result.err)
        report = result.json()
        assert [(la["units"], la["positive_counts"]) for la in report["layers"]] == truth, (fmt, stages)
        assert (report.get("unscanned_activations") or {}) == unscanned, (fmt, stages)
