"""sites41: ReLU call sites the torch formats did not see, or saw wrongly. A ReLU spelled
`torch.maximum(x, 0)` / `torch.max(x, zeros)` / `torch.where(x > 0, x, 0)` after a layer is a site in
eager, .pt2 and TorchScript (ONNX counted its `Max(x, 0)` already), a maximum of a reduction is none; a
rank-3 site whose unit axis is a guess says so; a LoRA layer and a fake-quant module are looked through in
TorchScript and .pt2 as in eager; a decomposed Linear (`addmm` viewed back) is the producer of its ReLU.

Truth comes from the weights with plain torch ops in float64, or from forward hooks, never from deadrelu;
each test fails on the code before this branch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from arch_sources import FAKE_QUANT, lora_source
from conftest import arch_file, save_npz

SAMPLES, STEPS, FEATURES = 10, 3, 4
DATA = np.random.RandomState(4107).randn(SAMPLES, STEPS, FEATURES).astype(np.float32)


def _scan(cli, args, data, *extra) -> dict:
    result = cli("scan", *args, "--data", data, "--json", "-", "-q", *extra)
    assert result.code == 0, result.err
    return result.json()


def _linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return torch.nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())


def _dead(pre: torch.Tensor) -> list[int]:
    flat = pre.detach().double().reshape(-1, pre.shape[-1])
    return [int(i) for i in np.flatnonzero(~(flat > 0).any(dim=0).numpy())]


def _positives(pre: torch.Tensor) -> list[int]:
    return (pre.detach().reshape(-1, pre.shape[-1]) > 0).sum(dim=0).tolist()


def _formats(model: torch.nn.Module, spec: str, tmp_path, script: bool = True) -> dict[str, list]:
    """The model saved as a state_dict (+ --arch), .pt2 (as exported and decomposed), scripted and traced."""
    example = torch.from_numpy(DATA[:2])
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    torch.export.save(program, tmp_path / "m.pt2")
    torch.export.save(program.run_decompositions(), tmp_path / "m_dec.pt2")
    formats = {"eager": [tmp_path / "m.pt", "--arch", spec], "pt2": [tmp_path / "m.pt2"]}
    formats["pt2 decomposed"] = [tmp_path / "m_dec.pt2"]
    with torch.no_grad():
        if script:
            torch.jit.script(model).save(tmp_path / "m_script.pt")
            formats["scripted"] = [tmp_path / "m_script.pt"]
        torch.jit.trace(model, example).save(tmp_path / "m_trace.pt")
    formats["traced"] = [tmp_path / "m_trace.pt"]
    return formats


SPELLED = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 6)
        self.fc3 = nn.Linear(6, 6)
        self.fc4 = nn.Linear(6, 5)
        self.fc5 = nn.Linear(5, 5)
        self.head = nn.Linear(5, 2)
        self.register_buffer("floor", torch.zeros(5))
        self.w = nn.Parameter(torch.randn(5, 5))

    def forward(self, x):
        h = torch.maximum(self.fc1(x), torch.tensor(0.0))
        h = torch.maximum(self.fc2(h), torch.zeros_like(h))
        h = torch.max(torch.zeros(6), self.fc3(h))  # zeros first
        g = self.fc4(h)
        h = torch.where(g > 0, g, 0.0)
        # no ReLU layer: a maximum of a reduction with zeros, run right before a spelled site
        spread = torch.maximum(h.var(-1, keepdim=True), torch.zeros_like(h[..., :1]))
        h = torch.maximum(self.fc5(h), h.new_zeros(()))
        h = torch.maximum(h @ self.w - 0.2, torch.zeros(5))  # a matmul is a layer too, without a bias
        # no ReLU layers: a reduction, a maximum of two layers' outputs, a select on another tensor's sign
        peak = torch.max(h, -1, keepdim=True)[0]
        mixed = torch.maximum(self.fc5(h), self.fc5(h) * 2.0)
        picked = torch.where(peak > 0, mixed, 0.0)
        # no ReLU layer either, after a Linear: a maximum with a buffer of zeros (the checkpoint's values,
        # not the code's)
        kept = torch.maximum(self.fc5(h), self.floor)
        return self.head(h + picked + spread + kept)


def build():
    torch.manual_seed(41)
    model = Net()
    with torch.no_grad():
        model.fc1.bias[1] = -40.0
        model.fc2.bias[[0, 4]] = -40.0
        model.fc3.bias[3] = -40.0
        model.fc4.bias[2] = -40.0
        model.fc5.bias[0] = -40.0
    return model.eval()
"""


def test_relu_spelled_as_maximum_or_where_is_a_site_in_every_torch_format(cli, tmp_path):
    """maximum(x, tensor(0.)), maximum(x, zeros_like), max(zeros, x), where(x > 0, x, 0) and maximum(x,
    x.new_zeros(())) after a Linear, and maximum(h @ w, zeros): six ReLU layers, the first five with their
    Linear as producer, in eager, .pt2 (as exported and
    decomposed) and TorchScript (scripted and traced); the maximum of a variance with zeros, max over an
    axis, the maximum of two computed tensors, a select on another tensor's sign and a maximum with a
    zero buffer are none. Before, the
    torch formats found no site at all ("the model ran no relu/relu6 call")."""
    model, spec = arch_file(tmp_path / "spelled.py", SPELLED)
    data = save_npz(tmp_path / "d.npz", x=DATA)
    x = torch.from_numpy(DATA)
    pres, h = [], x
    for layer in (model.fc1, model.fc2, model.fc3, model.fc4, model.fc5):
        pre = _linear(h, layer)
        pres.append(pre)
        h = pre.clamp(min=0)
    planted = [[1], [0, 4], [3], [2], [0]]
    assert all(set(p) <= set(_dead(pre)) for p, pre in zip(planted, pres, strict=True))
    pres.append(h @ model.w.double() - 0.2)
    assert all(len(_dead(pre)) < pre.shape[-1] for pre in pres)
    expected = [
        (name, pre.shape[-1], _dead(pre), _positives(pre), producer)
        for name, pre, producer in zip(
            ["relu()", "relu()#2", "relu()#3", "relu()#4", "relu()#5", "relu()#6"],
            pres,
            ["fc1", "fc2", "fc3", "fc4", "fc5", None],
            strict=True,
        )
    ]
    for fmt, args in _formats(model, spec, tmp_path).items():
        layers = _scan(cli, args, data)["layers"]
        found = [
            (la["name"], la["units"], la["dead_indices"], la["positive_counts"], la["producer"])
            for la in layers
        ]
        assert found == expected, (fmt, [(la["name"], la["units"], la["producer"]) for la in layers])
        assert all(la["elements_per_unit"] == SAMPLES * STEPS for la in layers), fmt
        assert np.allclose(layers[4]["bias"], model.fc5.bias.detach().numpy()), fmt
    # the leaky fix patches those sites and exports the patched model: pure tensor math (the probe's own
    # checks record no op in the program), six leaky sites where the ReLUs were
    out = tmp_path / "leaky.pt2"
    fixed = cli(
        "fix", tmp_path / "m.pt", "--arch", spec, "--data", data, "--strategy", "leaky", "--output", out
    )
    assert fixed.code == 0, fixed.err
    leaky = _scan(cli, [out], data, "--ops", "relu,leaky_relu")["layers"]
    assert [(la["op"], la["units"]) for la in leaky] == [("leaky_relu", pre.shape[-1]) for pre in pres]


UNKNOWN_AXIS = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6))
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        a = torch.relu(torch.einsum("btf,fu->btu", x, self.w) - 0.5)  # no layer module: axis unknown
        return torch.relu(self.fc(a))  # a Linear says where the units are


def build():
    torch.manual_seed(5)
    return Net().eval()
"""


def test_a_guessed_unit_axis_is_said_in_every_torch_format(cli, tmp_path):
    """A rank-3 ReLU whose input no Linear/Conv/norm made is counted on the last axis: the torch formats
    now say so in a note (as the ONNX scan does), naming that site only, and not with --channel-dim.
    Before: no word in eager, .pt2 or TorchScript."""
    model, spec = arch_file(tmp_path / "unk.py", UNKNOWN_AXIS)
    data = save_npz(tmp_path / "d.npz", x=DATA)
    pre = torch.einsum("btf,fu->btu", torch.from_numpy(DATA).double(), model.w.double()) - 0.5
    for fmt, args in _formats(model, spec, tmp_path).items():
        report = _scan(cli, args, data)
        guesses = [note for note in report["notes"] if "unit axis assumed last" in note]
        assert len(guesses) == 1 and "relu()#2" not in guesses[0], (fmt, report["notes"])
        assert "for relu():" in guesses[0] and "--channel-dim 1" in guesses[0], (fmt, guesses)
        first = report["layers"][0]
        assert first["positive_counts"] == _positives(pre), fmt  # the last axis, as the note says
        again = _scan(cli, args, data, "--channel-dim", "-1")
        assert not any("unit axis assumed" in note for note in again["notes"]), fmt
    compiled = _scan(cli, [tmp_path / "m.pt2"], data, "--compile", "--mask", "none")
    assert any("unit axis assumed last" in note for note in compiled["notes"])


LORA = lora_source(inner=True)


def test_lora_and_fake_quant_are_looked_through_in_torchscript_and_pt2(cli, tmp_path):
    """A LoRA layer (peft) traced to TorchScript or exported to .pt2 (as exported and decomposed), and a
    FakeQuantize module scripted or traced: the ReLU's producer is the base layer / the Linear before the
    fake quant, with its bias, as the eager scan finds. Before: no producer and no bias in those formats.
    (peft layers do not script; a FakeQuantize does not export: torch.export stops on its observer flag.)"""
    pytest.importorskip("peft", reason="peft is not installed (the test extra installs it)")
    data = save_npz(tmp_path / "d.npz", x=DATA)
    example = torch.from_numpy(DATA[:2])
    for stem, source, producer, watched in (
        ("lora", LORA, "fc.base_layer", "fc"),
        ("fq", FAKE_QUANT, "fc", "fq"),
    ):
        model, _ = arch_file(tmp_path / f"{stem}.py", source)
        seen = {}
        hook = model.get_submodule(watched).register_forward_hook(
            lambda m, a, out, seen=seen: seen.setdefault("pre", out.detach())
        )
        with torch.no_grad():
            model(torch.from_numpy(DATA))
        hook.remove()
        dead = _dead(seen["pre"])  # the ReLU's own input, from a plain hook
        assert dead == [2], stem
        files = []
        with torch.no_grad():
            torch.jit.trace(model, example).save(tmp_path / f"{stem}_trace.pt")
            files.append([tmp_path / f"{stem}_trace.pt"])
            if stem == "fq":
                torch.jit.script(model).save(tmp_path / f"{stem}_script.pt")
                files.append([tmp_path / f"{stem}_script.pt"])
        if stem == "lora":
            batch = torch.export.Dim("batch", min=1, max=1024)
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, tmp_path / "lora.pt2")
            torch.export.save(program.run_decompositions(), tmp_path / "lora_dec.pt2")
            files += [[tmp_path / "lora.pt2"], [tmp_path / "lora_dec.pt2"]]
        bias = model.get_submodule(producer).bias.detach().numpy()
        for args in files:
            extra = ("--trust-pickle",) if stem == "fq" else ()  # its observer code resizes buffers
            (layer,) = _scan(cli, args, data, *extra)["layers"]
            assert layer["dead_indices"] == dead, args
            assert layer["producer"] == producer, (args, layer["producer"])
            assert np.allclose(layer["bias"], bias), args


DECOMPOSED = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.plain = nn.Linear(6, 5, bias=False)
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.plain(torch.relu(self.fc(x)))))


def build():
    torch.manual_seed(9)
    model = Net()
    with torch.no_grad():
        model.fc.bias[2] = -3.0
    return model.eval()
"""


def test_a_decomposed_linear_is_the_producer_of_its_relu(cli, tmp_path):
    """A .pt2 after run_decompositions() writes nn.Linear as addmm (mm without a bias) on [B*T, F] rows,
    viewed back to [B, T, F]: the Linear is still the ReLU's producer (its bias in the report, the units
    on the last axis, no axis note), and `fix --strategy bias-shift` moves the dead unit's bias so that
    it fires, `--strategy reinit` redraws its row. Before: no producer, and both fixes refused ("no bias to
    shift", "not produced by one linear/conv")."""
    model, _ = arch_file(tmp_path / "dec.py", DECOMPOSED)
    data = save_npz(tmp_path / "d.npz", x=DATA)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (torch.from_numpy(DATA[:2]),), dynamic_shapes=({0: batch},))
    program = program.run_decompositions()
    assert "addmm" in program.graph_module.code and "linear" not in program.graph_module.code
    torch.export.save(program, tmp_path / "dec.pt2")
    pre = _linear(torch.from_numpy(DATA), model.fc)
    assert _dead(pre) == [2]
    report = _scan(cli, [tmp_path / "dec.pt2"], data)
    first, second = report["layers"]
    assert (first["producer"], first["dead_indices"], first["channel_dim"]) == ("fc", [2], 2)
    assert np.allclose(first["bias"], model.fc.bias.detach().numpy())
    assert second["producer"] == "plain" and second["channel_dim"] == 2
    assert not any("unit axis assumed" in note for note in report["notes"])
    out = tmp_path / "fixed.pt2"
    fixed = cli("fix", tmp_path / "dec.pt2", "--data", data, "--strategy", "bias-shift", "--output", out)
    assert fixed.code == 0, fixed.err
    state = torch.export.load(out).state_dict
    new_bias = state["fc.bias"].double()
    assert new_bias[2] > model.fc.bias[2]  # moved up: the unit fires on the data now
    assert torch.equal(new_bias[[0, 1, 3, 4, 5]], model.fc.bias.detach().double()[[0, 1, 3, 4, 5]])
    moved = torch.nn.functional.linear(torch.from_numpy(DATA).double(), model.fc.weight.double(), new_bias)
    assert _dead(moved) == []
    # reinit finds the decomposed Linear's weight (behind a permute) and the consumer reading the view
    out = tmp_path / "reinit.pt2"
    fixed = cli("fix", tmp_path / "dec.pt2", "--data", data, "--strategy", "reinit", "--output", out)
    assert fixed.code == 0, fixed.err
    state = torch.export.load(out).state_dict
    weight = model.fc.weight.detach()
    assert not torch.equal(state["fc.weight"][2], weight[2])  # the dead unit's row redrawn
    assert torch.equal(state["fc.weight"][[0, 1, 3, 4, 5]], weight[[0, 1, 3, 4, 5]])
    # prune cannot change a width the decomposed views hold: refused with the reason, nothing written
    out = tmp_path / "pruned.pt2"
    refused = cli("fix", tmp_path / "dec.pt2", "--data", data, "--strategy", "prune", "--output", out)
    assert refused.code != 0 and "decomposed Linear" in refused.err and not out.exists()
