"""axis44: the unit axis and the units' identity are never guessed in silence. A permute that leaves a
conv's channels on a middle axis, a Linear's output unsqueezed or viewed as [N, 1, F] before its ReLU:
counted on the producer's units in every format (eager, .pt2 and --compile, TorchScript, ONNX, watch());
where a reshape loses them, a note names the layer and the gate stops. An exported fused mixture of
experts (one activation for every expert's rows) is marked, said and gated in .pt2, TorchScript and ONNX.

Truth: the test's own float64 torch ops on the weights and forward hooks, never deadrelu's output; each
test fails on the code before this branch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import arch_file, export_onnx, save_npz

DATA = np.random.RandomState(4404).randn(8, 3, 6, 6).astype(np.float32)
FLAT = np.random.RandomState(4405).randn(8, 4).astype(np.float32)

MODELS = """
import torch
from torch import nn


class PermuteMid(nn.Module):
    # conv [N, C, H, W] -> permute(0, 2, 1, 3): the channels (the units) on dim 2 at the ReLU
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        with torch.no_grad():
            self.conv.bias[1] = -100.0  # channel 1 never fires
        self.head = nn.Linear(5 * 6 * 6, 2)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x).permute(0, 2, 1, 3)).flatten(1))


class Unsqueezed(nn.Module):
    # Linear -> unsqueeze(1) ([N, 1, F]) -> ReLU, and the same through view(N, 1, F)
    def __init__(self, view=False):
        super().__init__()
        self.view = view
        self.fc = nn.Linear(4, 6)
        with torch.no_grad():
            self.fc.bias[2] = -100.0
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = self.fc(x)
        h = h.view(x.shape[0], 1, 6) if self.view else h.unsqueeze(1)
        return self.out(torch.relu(h).squeeze(1))


class Flattened(nn.Module):
    # a conv's [N, C, H, W] viewed as [N, C*H*W] before its ReLU: the channels merged with the pixels
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)

    def forward(self, x):
        return torch.relu(self.conv(x).view(x.shape[0], -1))


def permute_mid():
    torch.manual_seed(0)
    return PermuteMid()


def unsqueezed():
    torch.manual_seed(1)
    return Unsqueezed()


def viewed():
    torch.manual_seed(1)
    return Unsqueezed(view=True)


def flattened():
    torch.manual_seed(2)
    return Flattened()
"""


def _scan(cli, args, data, *extra) -> dict:
    result = cli("scan", *args, "--data", data, "--json", "-", "-q", *extra)
    assert result.code == 0, result.err
    return result.json()


def _formats(model, spec: str, example: torch.Tensor, tmp_path, onnx: bool = True) -> dict[str, list]:
    """The model as a state_dict (+ --arch), a .pt2 (dynamic batch), a traced TorchScript and ONNX."""
    torch.save(model.state_dict(), tmp_path / "m.pt")
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.export.save(
        torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), tmp_path / "m.pt2"
    )
    with torch.no_grad():
        torch.jit.trace(model, example).save(tmp_path / "m.ts")
    formats = {"eager": [tmp_path / "m.pt", "--arch", spec], "pt2": [tmp_path / "m.pt2"]}
    formats["torchscript"] = [tmp_path / "m.ts"]
    if onnx:
        formats["onnx"] = [export_onnx(model, example, tmp_path / "m.onnx")]
    return formats


def _channel_positives(pre: torch.Tensor, dim: int) -> list[int]:
    """Per unit on `dim`: how many of its values are > 0 (the truth a scan's positive_counts must give)."""
    return (pre > 0).sum(dim=[d for d in range(pre.dim()) if d != dim]).tolist()


def test_a_permute_leaving_the_channels_on_a_middle_axis_counts_the_channels(cli, tmp_path):
    """conv [N, C, H, W] permuted to [N, H, C, W] before the ReLU: the units are the 5 channels (channel 1
    never fires). Before: every torch format counted the 6 rows of H as units on dim 1, no word, and
    channel 1's death was hidden (0 dead); now every format, --compile and watch() count the channels."""
    model, spec = arch_file(tmp_path / "pm.py", MODELS.replace("def permute_mid", "def build", 1))
    data = save_npz(tmp_path / "d.npz", x=DATA)
    conv = model.conv
    pre = torch.nn.functional.conv2d(
        torch.from_numpy(DATA).double(), conv.weight.double(), conv.bias.double(), padding=1
    )
    truth = _channel_positives(pre, 1)
    assert truth[1] == 0 and all(count > 0 for i, count in enumerate(truth) if i != 1)
    formats = _formats(model, spec, torch.from_numpy(DATA[:2]), tmp_path)
    for fmt, args in formats.items():
        (layer,) = _scan(cli, args, data)["layers"]
        assert layer["positive_counts"] == truth and layer["dead_indices"] == [1], fmt
    compiled = _scan(cli, [tmp_path / "m.pt2"], data, "--compile", "--mask", "none")["layers"]
    assert compiled[0]["positive_counts"] == truth

    from deadrelu_cli import watch

    with watch(model, every=1, window=1) as w:
        w.step()
        model(torch.from_numpy(DATA))
    (layer,) = w.reports[-1].layers
    assert layer.positive_counts.tolist() == truth


@pytest.mark.parametrize("factory", ["unsqueezed", "viewed"])
def test_a_linear_output_unsqueezed_before_its_relu_keeps_its_features(cli, tmp_path, factory):
    """Linear -> unsqueeze(1) or view(N, 1, F) -> ReLU: the 6 features are the units (feature 2 never
    fires). Before: eager and TorchScript (and eager for the view) counted them under a note saying the
    axis was assumed, the producer unseen; now the producer's axis is followed where the graph holds it,
    and where it does not (a TorchScript view, whose code has no shapes) a note names the layer and a gate
    stops on it."""
    model, spec = arch_file(tmp_path / "u.py", MODELS.replace(f"def {factory}", "def build", 1))
    data = save_npz(tmp_path / "d.npz", x=FLAT)
    fc = model.fc
    pre = torch.nn.functional.linear(torch.from_numpy(FLAT).double(), fc.weight.double(), fc.bias.double())
    truth = _channel_positives(pre, 1)
    assert truth[2] == 0
    for fmt, args in _formats(model, spec, torch.from_numpy(FLAT[:2]), tmp_path).items():
        report = _scan(cli, args, data)
        (layer,) = report["layers"]
        assert layer["positive_counts"] == truth, fmt
        assert not any("unit axis assumed" in note for note in report["notes"]), (fmt, report["notes"])
        lost = [note for note in report["notes"] if "unit axis not followed for" in note]
        shapeless = (fmt == "torchscript" and factory == "viewed") or (fmt == "onnx" and factory == "viewed")
        assert bool(lost) == shapeless, (fmt, report["notes"])
        gated = cli("scan", *args, "--data", data, "--max-dead", "1.0", "-q")
        assert gated.code == (1 if shapeless else 0), (fmt, gated.err)
        if shapeless:
            assert "unit axis of 1 layer(s) was not followed" in gated.err
            assert cli("scan", *args, "--data", data, "--max-dead", "1.0", "--allow-unseen", "-q").code == 0


def test_a_view_merging_the_channels_with_the_pixels_is_said_and_gated(cli, tmp_path):
    """conv(x).view(N, -1) -> ReLU: the conv's channels are merged with the pixels; no axis holds the units.
    Before: counted as 32 units with no word and a gate passed on them; now every format names the layer in
    a note and the gate stops (--allow-unseen gates on it as counted; --channel-dim says where they are)."""
    model, spec = arch_file(tmp_path / "f.py", MODELS.replace("def flattened", "def build", 1))
    data = save_npz(tmp_path / "d.npz", x=DATA)
    pre = model.conv(torch.from_numpy(DATA)).detach().flatten(1)
    formats = _formats(model, spec, torch.from_numpy(DATA[:2]), tmp_path)
    for fmt, args in formats.items():
        report = _scan(cli, args, data)
        (layer,) = report["layers"]
        assert layer["units"] == pre.shape[1], fmt  # counted as it is, the note says so
        assert any("unit axis not followed for" in note for note in report["notes"]), (fmt, report["notes"])
        assert layer.get("extra", {}).get("unit_axis") == "not followed", fmt
        gated = cli("scan", *args, "--data", data, "--max-dead", "1.0", "-q")
        assert gated.code == 1 and "was not followed" in gated.err, (fmt, gated.err)
        assert cli("scan", *args, "--data", data, "--max-dead", "1.0", "--allow-unseen", "-q").code == 0
        told = _scan(cli, args, data, "--channel-dim", "1")
        assert not any("not followed" in note for note in told["notes"]), fmt


class _Ids(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, input_ids):
        return self.m(input_ids=input_ids).last_hidden_state


def test_an_exported_fused_mixture_of_experts_is_marked_and_gated(cli, tmp_path):
    """A 1-layer Mixtral (transformers 5: experts fused in one [experts, 2·I, H] weight, one act_fn; the
    batched implementation, which exports) with relu, expert 0's gate rows 0, 3, 7 zero. Exported, one
    ReLU runs every expert's rows: unit i of the 3 experts is one unit, expert 0's dead units pass as alive.
    Before: .pt2, TorchScript and ONNX reported that layer with no word and a gate passed; now the layer is
    marked (extra experts_merged = 3), a note says so and the gate stops on it."""
    transformers = pytest.importorskip("transformers", reason="the transformers extra is not installed")
    torch.manual_seed(0)
    from hf_models import mixtral_config

    config = mixtral_config(kv_heads=2)
    config._attn_implementation = "eager"
    model = transformers.MixtralModel(config).eval()
    model.config._experts_implementation = "batched_mm"
    experts = model.layers[0].mlp.experts
    with torch.no_grad():
        experts.gate_up_proj[0, [0, 3, 7], :] = 0.0
    ids = torch.from_numpy(np.random.default_rng(3).integers(0, 32, (4, 6)))
    data = save_npz(tmp_path / "ids.npz", input_ids=ids.numpy())
    seen = []
    handle = experts.register_forward_hook(lambda _m, args, _o: seen.append([a.detach() for a in args[:2]]))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    (hidden, routes), weights = seen[0], experts.gate_up_proj.detach().double()
    rows = hidden[(routes == 0).any(dim=1)].double()
    assert rows.shape[0] and not (rows @ weights[0, [0, 3, 7]].T > 0).any()  # dead in expert 0
    wrapped = _Ids(model).eval()
    torch.export.save(torch.export.export(wrapped, (ids,), strict=False), tmp_path / "moe.pt2")
    with torch.no_grad():
        torch.jit.trace(wrapped, ids, check_trace=False).save(tmp_path / "moe.ts")
    torch.onnx.export(wrapped, (ids,), tmp_path / "moe.onnx", dynamo=False, input_names=["input_ids"])
    for path in ("moe.pt2", "moe.ts", "moe.onnx"):
        args = [tmp_path / path, "--trust-pickle"] if path == "moe.ts" else [tmp_path / path]
        report = _scan(cli, args, data)
        marked = [layer for layer in report["layers"] if layer.get("extra", {}).get("experts_merged") == 3]
        assert len(marked) == 1 and marked[0]["units"] == 12, (path, report["layers"])
        assert marked[0]["dead"] < 3  # what the merge hides: expert 0's 3 dead units, alive in others
        assert any("fused mixture of experts" in note and "(3 experts)" in note for note in report["notes"])
        gated = cli("scan", *args, "--data", data, "--max-dead", "1.0", "-q")
        assert gated.code == 1 and "fused mixture of experts" in gated.err, (path, gated.err)
        assert cli("scan", *args, "--data", data, "--max-dead", "1.0", "--allow-unseen", "-q").code == 0


@pytest.mark.parametrize("batch", [5, "N"])
def test_an_onnx_squeeze_without_axes_keeps_the_conv_channels(cli, tmp_path, batch):
    """A Conv2d over [N, 3, 1, W] squeezed back to [N, C, W] by a Squeeze without axes (every size-1 dim,
    opset 11; what an exporter writes for a Conv1d run as a Conv2d) before its Relu. Before: the walk
    stopped at the Squeeze and the rank-3 site was counted on its last axis, the window positions as units,
    under an "assumed last" note. Now the Squeeze is read by its shapes: with a static batch the 4 filters
    are the units (filter 2 never fires), as onnxruntime's own pre-activation says; with a symbolic batch
    (which may be 1, so shape inference cannot say what the Squeeze leaves) the layer is named as one
    whose units were not followed, and a gate stops on it."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    r = np.random.RandomState(44)
    weight = r.randn(4, 3, 1, 3).astype(np.float32)
    bias = np.array([0.1, 0.0, -100.0, 0.2], np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c4"], name="conv"),
        helper.make_node("Squeeze", ["c4"], ["pre"], name="squeeze"),
        helper.make_node("Relu", ["pre"], ["y"], name="act"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, 6])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    onnx.save(model, tmp_path / "sq.onnx")
    x = r.randn(5, 3, 1, 8).astype(np.float32)
    data = save_npz(tmp_path / "d.npz", x=x)
    model.graph.output.append(helper.make_tensor_value_info("pre", TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    pre = session.run(["pre"], {"x": x})[0]
    truth = (pre > 0).sum(axis=(0, 2)).tolist()
    assert pre.shape == (5, 4, 6) and truth[2] == 0
    report = _scan(cli, [tmp_path / "sq.onnx"], data)
    (layer,) = report["layers"]
    if batch == "N":
        assert any("unit axis not followed for act" in note for note in report["notes"]), report["notes"]
        gated = cli("scan", tmp_path / "sq.onnx", "--data", data, "--max-dead", "1.0", "-q")
        assert gated.code == 1 and "was not followed" in gated.err, gated.err
        return
    assert layer["positive_counts"] == truth and layer["dead_indices"] == [2]
    assert not any("unit axis" in note for note in report["notes"]), report["notes"]
