"""spell42: more spellings of a ReLU are call sites, with the same per-unit counts in every format:
`x * (x > 0)` (the mask cast with .float() / .to(x.dtype) or not, either order, `>=` too),
`where(x <= 0, 0, x)` / `where(x < 0, 0, x)` / `where(x >= 0, x, 0)`, `x.masked_fill(x < 0, 0)` (and in
place), in eager, .pt2 (as exported and decomposed), TorchScript (scripted and traced) and ONNX
(`Mul(x, Cast(Greater(x, 0)))`, `Where(Cast(Less(x, 0)), 0, x)`). Look-alikes stay ordinary ops: a mask
of another tensor, a select with a zero buffer (which TorchScript used to count as the next site).

Truth: the model's weights in float64 torch ops (or numpy for a hand-built graph), never deadrelu. Each
test fails on the code before this branch."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from conftest import arch_file, export_onnx, save_npz
from onnx import TensorProto, helper, numpy_helper

SAMPLES, FEATURES = 12, 4
DATA = np.random.RandomState(4207).randn(SAMPLES, FEATURES).astype(np.float32)

MASKS = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        for i in range(8):
            setattr(self, f"fc{i}", nn.Linear(4 if i == 0 else 6, 6))
        self.head = nn.Linear(6, 2)
        self.register_buffer("floor", torch.zeros(6))

    def forward(self, h):
        x = self.fc0(h)
        h = x * (x > 0)
        x = self.fc1(h)
        h = (x >= 0).float() * x
        x = self.fc2(h)
        h = x * (x > 0).to(x.dtype)
        x = self.fc3(h)
        h = torch.where(x <= 0, 0.0, x)
        # no ReLU layers: a select with a zero buffer (the checkpoint's values), a mask of another tensor
        kept = torch.where(self.fc4(h) > 0, self.fc4(h), self.floor)
        other = self.fc4(h) * (x > 0)
        x = self.fc4(h)
        h = torch.where(x >= 0, x, torch.zeros_like(x))
        x = self.fc5(h)
        h = x.masked_fill(x < 0, 0.0)
        x = self.fc6(h)
        h = x.masked_fill_(x <= 0, 0.0)
        x = self.fc7(h)
        h = torch.where(x < 0, torch.zeros_like(x), x)
        return self.head(h + kept + other)


def build():
    torch.manual_seed(42)
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


def _scan(cli, args, data) -> list[dict]:
    result = cli("scan", *args, "--data", data, "--json", "-", "-q")
    assert result.code == 0, result.err
    return result.json()["layers"]


def _saved_formats(model, spec: str, example, tmp_path, *, decomposed=False, traced=False) -> dict:
    """MODEL saved as a state_dict (+ --arch SPEC), .pt2 (and decomposed), scripted (and traced) and a
    dynamo=False ONNX export: {format: the scan's model arguments}, in that order."""
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("b", max=1024)},))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    torch.export.save(program, tmp_path / "m.pt2")
    formats = {"eager": [tmp_path / "m.pt", "--arch", spec], "pt2": [tmp_path / "m.pt2"]}
    if decomposed:
        torch.export.save(program.run_decompositions(), tmp_path / "dec.pt2")
        formats["pt2 decomposed"] = [tmp_path / "dec.pt2"]
    with torch.no_grad():
        torch.jit.script(model).save(tmp_path / "s.pt")
        formats["scripted"] = [tmp_path / "s.pt"]
        if traced:
            torch.jit.trace(model, example).save(tmp_path / "t.pt")
            formats["traced"] = [tmp_path / "t.pt"]
    formats["onnx"] = [export_onnx(model, example, tmp_path / "m.onnx")]
    return formats


def test_relu_spelled_with_a_mask_is_a_site_in_every_format(cli, tmp_path):
    """Eight ReLUs spelled with masks after Linears: eight sites, each with its Linear as producer and the
    float64 truth's dead units and positives, in eager, .pt2, .pt2 decomposed, scripted and the ONNX
    export (and --certify's bounds on them); the select with a zero buffer and the product with another tensor's mask are none.
    Before: eager / .pt2 / TorchScript saw one or two of them, TorchScript counted the buffer's select
    as the next site, the ONNX export missed the products and the masked fills."""
    model, spec = arch_file(tmp_path / "masks.py", MASKS)
    data = save_npz(tmp_path / "d.npz", x=DATA)
    truth = _truth(model)
    assert all(dead and len(dead) < units for units, dead, _ in truth)  # planted, and not all dead
    formats = _saved_formats(model, spec, torch.from_numpy(DATA[:2]), tmp_path, decomposed=True)
    for fmt, args in formats.items():
        layers = _scan(cli, args, data)
        found = [(la["units"], la["dead_indices"], la["positive_counts"]) for la in layers]
        assert found == truth, (fmt, [(la["name"], la["producer"]) for la in layers])
        producers = [la["producer"] for la in layers]
        expected = [f"fc{i}" for i in range(8)] if fmt != "onnx" else [f"/fc{i}/Gemm" for i in range(8)]
        assert producers == expected, (fmt, producers)
        assert all(la["elements_per_unit"] == SAMPLES for la in layers), fmt
    # --certify reads the same sites (before: the .pt2's certify graph kept the spellings, so its site
    # names were shifted onto other layers); truth: interval arithmetic in numpy through the 8 layers
    lo, hi, proven = np.full(FEATURES, -3.0), np.full(FEATURES, 3.0), []
    for i in range(8):
        fc = getattr(model, f"fc{i}")
        w, b = fc.weight.detach().double().numpy(), fc.bias.detach().double().numpy()
        pre_lo = np.clip(w, 0, None) @ lo + np.clip(w, None, 0) @ hi + b
        pre_hi = np.clip(w, 0, None) @ hi + np.clip(w, None, 0) @ lo + b
        proven.append(np.flatnonzero(pre_hi + 1e-5 * (1 + np.abs(pre_hi)) <= 0).tolist())
        lo, hi = np.clip(pre_lo, 0, None), np.clip(pre_hi, 0, None)
    result = cli(
        "scan",
        tmp_path / "m.pt2",
        "--data",
        data,
        "--json",
        "-",
        "-q",
        "--certify",
        "--input-range",
        "-3",
        "3",
    )
    assert result.code == 0, result.err
    assert [la["certified_dead_indices"] for la in result.json()["layers"]] == proven
    assert sum(map(len, proven)) > 8  # more than the planted units


def test_hand_built_onnx_mask_spellings(cli, tmp_path):
    """Mul(x, Cast(Greater(x, 0))), Mul(Cast(GreaterOrEqual(x, 0)), x), Where(Cast(Less(x, 0), BOOL), 0, x)
    and Max(x, zeros [1, C] initializer) after Gemms are sites with numpy's counts; Mul(y, Cast(Greater(x,
    0))) of another tensor y is none. Before: the Max only."""
    rng = np.random.RandomState(42)
    width, nodes, inits, pres = 5, [], [], []
    h, prev = DATA.astype(np.float64), "x"
    zero = numpy_helper.from_array(np.zeros((), np.float32), "zero")
    wide_zero = numpy_helper.from_array(np.zeros((1, width), np.float32), "zeros_row")
    inits += [zero, wide_zero]
    for i in range(4):
        w = rng.randn(width, h.shape[1]).astype(np.float32)
        b = rng.randn(width).astype(np.float32)
        b[i] = -40.0
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"g{i}"], transB=1))
        pre = h @ w.astype(np.float64).T + b
        pres.append(pre)
        g, out = f"g{i}", f"a{i}"
        if i == 0:
            nodes += [
                helper.make_node("Greater", [g, "zero"], ["t0"]),
                helper.make_node("Cast", ["t0"], ["m0"], to=TensorProto.FLOAT),
                helper.make_node("Mul", [g, "m0"], [out]),
                helper.make_node("Mul", ["lookalike_in", "m0"], ["lookalike"]),  # another tensor's mask
            ]
        elif i == 1:
            nodes += [
                helper.make_node("GreaterOrEqual", [g, "zero"], ["t1"]),
                helper.make_node("Cast", ["t1"], ["m1"], to=TensorProto.FLOAT),
                helper.make_node("Mul", ["m1", g], [out]),
            ]
        elif i == 2:
            nodes += [
                helper.make_node("Less", [g, "zero"], ["t2"]),
                helper.make_node("Cast", ["t2"], ["m2"], to=TensorProto.BOOL),
                helper.make_node("Where", ["m2", "zero", g], [out]),
            ]
        else:
            nodes.append(helper.make_node("Max", [g, "zeros_row"], [out]))
        h, prev = np.maximum(pre, 0), out
    nodes.append(helper.make_node("Add", [prev, "lookalike"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "masks",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", FEATURES]),
            helper.make_tensor_value_info("lookalike_in", TensorProto.FLOAT, ["n", width]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])],
        inits,
    )
    path = tmp_path / "masks.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    data = save_npz(tmp_path / "d2.npz", x=DATA, lookalike_in=rng.randn(SAMPLES, width).astype(np.float32))
    layers = _scan(cli, [path], data)
    found = [(la["name"], la["units"], la["dead_indices"], la["positive_counts"]) for la in layers]
    expected = [
        (f"a{i}", width, np.flatnonzero(~(pre > 0).any(axis=0)).tolist(), (pre > 0).sum(axis=0).tolist())
        for i, pre in enumerate(pres)
    ]
    assert all(dead for _, _, dead, _ in expected)
    assert found == expected


def _forward64(model, x: torch.Tensor, act) -> torch.Tensor:
    """MASKS's forward in float64 with each of its eight ReLUs as `act` (the look-alikes as written)."""

    def layer(i: int, h: torch.Tensor) -> torch.Tensor:
        fc = getattr(model, f"fc{i}")
        return torch.nn.functional.linear(h, fc.weight.double(), fc.bias.double())

    h = x.double()
    for i in range(4):
        pre = layer(i, h)
        h = act(pre)
    kept = torch.where(layer(4, h) > 0, layer(4, h), 0.0)
    other = layer(4, h) * (pre > 0)
    for i in range(4, 8):
        h = act(layer(i, h))
    head = model.head
    return torch.nn.functional.linear(h + kept + other, head.weight.double(), head.bias.double())


def test_torchscript_leaky_fix_patches_spelled_sites(cli, tmp_path):
    """`fix --strategy leaky` on a scripted model whose ReLUs are spelled with masks and selects: every
    one becomes leaky_relu(x) (torch.jit.load of the output computes the float64 leaky forward), the
    look-alikes stay as written. Before: refused ("its inlined graph has 0 activations but the scan
    found 8 call sites")."""
    model, _ = arch_file(tmp_path / "masks.py", MASKS)
    data = save_npz(tmp_path / "d.npz", x=DATA)
    with torch.no_grad():
        torch.jit.script(model).save(tmp_path / "s.pt")
    x = torch.from_numpy(DATA)
    relu = _forward64(model, x, torch.relu)
    with torch.no_grad():
        assert torch.allclose(model(x).double(), relu, atol=1e-5)  # the float64 forward is the model's
    out = tmp_path / "leaky.pt"
    fixed = cli(
        "fix", tmp_path / "s.pt", "--data", data, "--strategy", "leaky", "--slope", "0.1", "--output", out
    )
    assert fixed.code == 0, fixed.err
    leaky = _forward64(model, x, lambda pre: torch.nn.functional.leaky_relu(pre, 0.1))
    with torch.no_grad():
        patched = torch.jit.load(str(out))(x).double()
    assert torch.allclose(patched, leaky, atol=1e-5), (patched - leaky).abs().max()
    assert not torch.allclose(leaky, relu, atol=1e-3)  # the slope changes the outputs


EDGES = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc0 = nn.Linear(4, 6)
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)
        self.register_buffer("zero", torch.tensor(0.0))

    def forward(self, x):
        h = torch.nn.functional.hardtanh(self.fc0(x), 0.0, float("inf"))  # a ReLU: no upper bound
        # a margin, one value per position: no ReLU layer, whatever the number of positions
        margin = (h.sum(-1) - 0.5).clamp(min=0)
        h = torch.relu(self.fc1(h))
        # a ReLU as the checkpoint stands, but its zeros are a buffer's values: not counted, said
        kept = torch.maximum(self.fc2(h), self.zero)
        return self.head(h + kept) + margin.unsqueeze(-1)


def build():
    torch.manual_seed(7)
    model = Net()
    with torch.no_grad():
        model.fc0.bias[2] = -40.0
    return model.eval()
"""


def test_unbounded_hardtanh_margins_and_stored_zeros_alike_in_every_format(cli, tmp_path):
    """hardtanh(x, 0, inf) after a Linear is a relu site (ONNX counted its Clip(x, 0) already); the clamp
    of `h.sum(-1) - m` over [B, T, C] data is none (eager's rule; .pt2, TorchScript and ONNX counted it as
    a T-unit layer); a maximum with a zero buffer after a Linear is no site but is named unseen, and a
    gate fails on it unless --allow-unseen (before: silent in every format). Counts from float64 torch."""
    model, spec = arch_file(tmp_path / "edges.py", EDGES)
    rows = np.random.RandomState(7).randn(SAMPLES, 3, FEATURES).astype(np.float32)
    data = save_npz(tmp_path / "d.npz", x=rows)
    x = torch.from_numpy(rows).double()
    pre0 = torch.nn.functional.linear(x, model.fc0.weight.double(), model.fc0.bias.double())
    pre1 = torch.nn.functional.linear(pre0.clamp(min=0), model.fc1.weight.double(), model.fc1.bias.double())
    truth = [
        (6, torch.nonzero(~(p > 0).flatten(0, 1).any(0)).flatten().tolist(), (p > 0).sum((0, 1)).tolist())
        for p in (pre0, pre1)
    ]
    assert truth[0][1] == [2] and len(truth[1][1]) < 6
    formats = _saved_formats(model, spec, torch.from_numpy(rows[:2]), tmp_path, traced=True)
    for fmt, args in formats.items():
        result = cli("scan", *args, "--data", data, "--json", "-", "-q", "--max-dead", "1")
        assert result.code == 1, (fmt, result.err)  # the unseen maximum stops the gate
        report = result.json()
        found = [(la["units"], la["dead_indices"], la["positive_counts"]) for la in report["layers"]]
        assert found == truth, (fmt, [(la["name"], la["units"]) for la in report["layers"]])
        unseen = report["unseen_activations"]
        assert len(unseen) == 1 and "stored zero tensor (activation=Relu)" in next(iter(unseen)), (
            fmt,
            unseen,
        )
        allowed = cli("scan", *args, "--data", data, "-q", "--max-dead", "1", "--allow-unseen")
        assert allowed.code == 0, (fmt, allowed.err)
