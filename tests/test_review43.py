"""review43: findings of the review of the 42 round, each against truth computed here (plain torch
hooks, numpy), each failing on the code before its fix.

1. A conv's [N, C, H, W] output permuted to channels-last before its ReLU (a Linear reads it there)
   was counted on the image rows (dim 1 of the permuted tensor) in eager, .pt2 and TorchScript: 5
   "units", none dead, gate passed on 2 of 8 dead channels (ONNX was right)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from conftest import arch_file, save_npz

PERMUTED = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 6)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):  # x [N, 3, H, W]
        h = torch.relu(self.conv(x).permute(0, 2, 3, 1))  # channels-last: units on the last axis
        h = torch.relu(self.fc(h).permute(0, 3, 1, 2))  # a Linear's units back on dim 1
        return self.out(h)


def build():
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.conv.bias[[1, 5]] = -50.0
        model.fc.bias[[2]] = -50.0
    return model.eval()
"""


def _permuted_truth(model, x: np.ndarray) -> list[tuple[int, list[int]]]:
    """(units, positives per unit) of the two ReLUs, by hooks on the conv and the Linear."""
    seen = {}
    hooks = [
        model.conv.register_forward_hook(lambda _m, _a, out: seen.__setitem__("conv", out.detach())),
        model.fc.register_forward_hook(lambda _m, _a, out: seen.__setitem__("fc", out.detach())),
    ]
    with torch.no_grad():
        model(torch.from_numpy(x))
    for hook in hooks:
        hook.remove()
    conv = seen["conv"].transpose(0, 1).reshape(8, -1).numpy()  # per channel, every position
    fc = seen["fc"].reshape(-1, 6).numpy()
    return [
        (a.shape[0] if a is conv else a.shape[1], (a > 0).sum(axis=1 if a is conv else 0).tolist())
        for a in (conv, fc)
    ]


def test_a_conv_output_permuted_to_channels_last_has_its_units_on_the_last_axis(cli, tmp_path):
    model, spec = arch_file(tmp_path / "perm.py", PERMUTED)
    x = np.random.RandomState(43).randn(6, 3, 5, 7).astype(np.float32)
    data = save_npz(tmp_path / "d.npz", x=x)
    truth = _permuted_truth(model, x)
    assert [t[0] for t in truth] == [8, 6] and truth[0][1][1] == truth[0][1][5] == truth[1][1][2] == 0
    example = torch.from_numpy(x[:2])
    torch.save(model.state_dict(), tmp_path / "m.pt")
    torch.export.save(torch.export.export(model, (example,)), tmp_path / "m.pt2")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(model).save(tmp_path / "s.pt")
        torch.jit.trace(model, example).save(tmp_path / "t.pt")
    for args in (
        [tmp_path / "m.pt", "--arch", spec],
        [tmp_path / "m.pt2"],
        [tmp_path / "s.pt"],
        [tmp_path / "t.pt"],
    ):
        result = cli("scan", *map(str, args), "--data", str(data), "--json", "-", "-q", "--max-dead", "0.1")
        assert result.code == 1, (args, result.err)  # 3 of 14 dead: the gate fails
        layers = result.json()["layers"]
        assert [(len(layer["positive_counts"]), layer["positive_counts"]) for layer in layers] == truth, args
        assert [layer["elements_per_unit"] for layer in layers] == [6 * 5 * 7] * 2, args


def test_watch_counts_a_permuted_conv_output_on_its_channels(tmp_path):
    """The same under `watch()` (the eager probe in a training loop)."""
    from deadrelu_cli import watch

    model, _ = arch_file(tmp_path / "perm.py", PERMUTED)
    x = np.random.RandomState(44).randn(4, 3, 5, 7).astype(np.float32)
    truth = _permuted_truth(model, x)
    model.train()
    with watch(model, every=2, window=1, config=False) as w:
        for step in range(2):
            w.step(step)
            model(torch.from_numpy(x)).square().mean().backward()
    report = w.reports[0]
    assert [
        (len(layer.positive_counts), np.asarray(layer.positive_counts).tolist()) for layer in report.layers
    ] == truth


TOKENS = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 4)
        self.fc = nn.Linear(4, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, input_ids, attention_mask=None):
        return self.head(torch.relu(self.fc(self.emb(input_ids))))


def build():
    torch.manual_seed(0)
    return Net().eval()
"""


def _padded(documents: list[list[int]]) -> dict[str, np.ndarray]:
    """Token ids and attention_mask, right-padded (with id 0) to the longest document."""
    width = max(map(len, documents))
    ids, mask = np.zeros((len(documents), width), np.int64), np.zeros((len(documents), width), np.int64)
    for row, doc in enumerate(documents):
        ids[row, : len(doc)], mask[row, : len(doc)] = doc, 1
    return {"input_ids": ids, "attention_mask": mask}


def test_merge_refuses_the_same_documents_padded_to_another_width(cli, tmp_path):
    """Two token files sharing three documents, padded to their own longest document (as --text pads a
    file): the merge counted those documents twice (their padded rows differed, so their digests did);
    disjoint files padded to other widths still merge."""
    model, spec = arch_file(tmp_path / "tok.py", TOKENS)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    rng = np.random.default_rng(43)
    docs = [rng.integers(1, 20, int(rng.integers(1, 6))).tolist() for _ in range(10)]
    docs.append(list(range(1, 10)))  # the longest: only in the second file
    parts = {"a": docs[0:6], "b": docs[3:11], "d": docs[6:11]}
    for name, part in parts.items():
        save_npz(tmp_path / f"{name}.npz", **_padded(part))
        result = cli("scan", str(tmp_path / "m.pt"), "--arch", spec, "--data", str(tmp_path / f"{name}.npz"),
                     "--json", str(tmp_path / f"{name}.json"), "-q")  # fmt: skip
        assert result.code == 0, result.err
    shared = cli(
        "merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json", str(tmp_path / "ab.json")
    )
    assert shared.code == 2 and "counted 3 of the same samples" in shared.err, shared.err
    disjoint = cli("merge", str(tmp_path / "a.json"), str(tmp_path / "d.json"), "--json", "-", "-q")
    assert disjoint.code == 0, disjoint.err
    assert disjoint.json()["data"]["samples"] == 11


SPELLED = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc0, self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        x = self.fc0(x)
        h = x * (x > 0)  # Mul(x, Cast(Greater(x, 0)))
        x = self.fc1(h)
        h = x.clamp(0, float("inf"))  # Clip(x, 0, inf)
        x = self.fc2(h)
        h = x.masked_fill(x < 0, 0.0)  # Where(Cast(Less(x, 0)), 0, x)
        return self.head(h)


def build():
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.fc0.bias[1] = model.fc1.bias[2] = model.fc2.bias[3] = -30.0
    return model.eval()
"""


def test_onnx_fix_patches_relus_spelled_with_cast_masks_and_clip(cli, tmp_path):
    """A dynamo=False export writes x * (x > 0) and masked_fill with a Cast between the comparison and
    the activation, clamp(0, inf) as Clip(x, 0, inf). Before: reinit/prune/kick skipped the first two
    ("the pre-activation is also read elsewhere (/Greater)": the mask was taken for another reader), and
    leaky crashed (exit 3: a LeakyRelu with Clip's three inputs). Truth: onnxruntime and numpy here."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model, _ = arch_file(tmp_path / "spelled.py", SPELLED)
    x = np.random.RandomState(45).randn(32, 4).astype(np.float32)
    data = save_npz(tmp_path / "d.npz", x=x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.from_numpy(x[:2]),), tmp_path / "m.onnx", dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "b"}})  # fmt: skip

    def run(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    result = cli("fix", str(tmp_path / "m.onnx"), "--data", str(data), "--strategy", "reinit",
                 "--output", str(tmp_path / "r.onnx"))  # fmt: skip
    assert result.code == 0, result.err
    assert np.abs(run(tmp_path / "r.onnx") - run(tmp_path / "m.onnx")).max() < 1e-5
    tensors = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "r.onnx").graph.initializer}
    h = x.astype(np.float64)
    for layer, dead in (("fc0", 1), ("fc1", 2), ("fc2", 3)):
        pre = h @ tensors[f"{layer}.weight"].T.astype(np.float64) + tensors[f"{layer}.bias"]
        assert (pre[:, dead] > 0).any(), (layer, "still dead in the written file")
        h = np.maximum(pre, 0)
    result = cli("fix", str(tmp_path / "m.onnx"), "--data", str(data), "--strategy", "leaky",
                 "--output", str(tmp_path / "l.onnx"))  # fmt: skip
    assert result.code == 0, result.err
    leaky = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "m.onnx").graph.initializer}
    h = x.astype(np.float64)
    for layer in ("fc0", "fc1", "fc2"):
        pre = h @ leaky[f"{layer}.weight"].T + leaky[f"{layer}.bias"]
        h = np.where(pre > 0, pre, 0.01 * pre)
    assert np.abs(run(tmp_path / "l.onnx") - (h @ leaky["head.weight"].T + leaky["head.bias"])).max() < 1e-4


def test_certify_input_range_auto_adds_no_uncounted_samples_to_the_fingerprint(cli, tmp_path):
    """`--certify --input-range auto` reads every sample of the file for its box; under `--limit 3`
    the report's fingerprint listed all 12 (merge then refused a disjoint part holding samples 3..11 as
    overlapping). Now it lists the 3 counted, as the same scan without --certify does."""
    from conftest import relu_onnx

    model = relu_onnx(tmp_path / "m.onnx", 4)
    x = np.random.RandomState(46).randn(12, 4).astype(np.float32)
    whole, rest = save_npz(tmp_path / "all.npz", x=x), save_npz(tmp_path / "rest.npz", x=x[3:])
    certified = cli("scan", str(model), "--data", str(whole), "--limit", "3", "--certify", "--input-range", "auto",
                    "--json", str(tmp_path / "a.json"), "-q")  # fmt: skip
    assert certified.code == 0, certified.err
    plain = cli("scan", str(model), "--data", str(whole), "--limit", "3", "--json", "-", "-q")
    first = __import__("json").loads((tmp_path / "a.json").read_text())["data"]["fingerprint"]["digests"]
    assert len(first) == 3 and first == plain.json()["data"]["fingerprint"]["digests"]
    assert cli("scan", str(model), "--data", str(rest), "--json", str(tmp_path / "b.json"), "-q").code == 0
    merged = cli("merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json", "-", "-q")
    assert merged.code == 0, merged.err
    assert merged.json()["data"]["samples"] == 12


def test_input_range_auto_on_nan_data_does_not_ask_for_the_flag_already_given(cli, tmp_path):
    """Under --allow-nonfinite, NaN data and --input-range auto: one line, exit 2, saying why the box
    needs finite data (it said "clean the data or pass --allow-nonfinite", the flag given)."""
    from conftest import relu_onnx

    x = np.random.RandomState(47).randn(6, 4).astype(np.float32)
    x[2, 1] = np.nan
    data = save_npz(tmp_path / "d.npz", x=x)
    args = (
        "scan",
        str(relu_onnx(tmp_path / "m.onnx", 4)),
        "--data",
        str(data),
        "--certify",
        "--input-range",
        "auto",
    )
    result = cli(*args, "--allow-nonfinite", "-q")
    assert result.code == 2 and "sample 2" in result.err and "--input-range LO HI" in result.err, result.err
    assert "pass --allow-nonfinite" not in result.err and len(result.err.strip().splitlines()) == 1


NESTED = """
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.layers = nn.ModuleList([nn.Conv1d(8, 8, 1) for _ in range(2)])
        self.out = nn.Conv1d(8, 2, 1)

    def forward(self, x):  # x [N, 3, T]
        h = torch.relu(self.block.conv(x))  # a grandchild called directly
        for layer in self.layers:  # a ModuleList unrolled into this graph
            h = layer(h)
            h = h * (h > 0)
        return self.out(h)


def build():
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.block.conv.bias[[1, 5]] = -30.0
        model.layers[0].bias[2] = model.layers[1].bias[6] = -30.0
    return model.eval()
"""


def test_torchscript_finds_producers_behind_attribute_chains(cli, tmp_path):
    """TorchScript (scripted and traced): a producer reached through a chain of attributes
    (`self.block.conv(x)`, a ModuleList unrolled in a loop) was not found. The ReLU after the grandchild
    Conv1d was counted on the time axis (5 "units", 0 dead, a note, gate passed), and the spelled ReLUs
    after the ModuleList's convs (whose x must come from a layer) were no sites at all. Truth: hooks."""
    model, _ = arch_file(tmp_path / "nested.py", NESTED)
    x = np.random.RandomState(48).randn(6, 3, 5).astype(np.float32)
    data = save_npz(tmp_path / "d.npz", x=x)
    seen = []
    hooks = [
        m.register_forward_hook(lambda _m, _a, out: seen.append(out.detach()))
        for m in (model.block.conv, *model.layers)
    ]
    with torch.no_grad():
        model(torch.from_numpy(x))
    for hook in hooks:
        hook.remove()
    truth = [(out > 0).sum(dim=(0, 2)).tolist() for out in seen]
    assert [[i for i, c in enumerate(t) if c == 0] for t in truth][0] == [1, 5]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(model).save(tmp_path / "s.pt")
        torch.jit.trace(model, torch.from_numpy(x[:2])).save(tmp_path / "t.pt")
    for path in (tmp_path / "s.pt", tmp_path / "t.pt"):
        result = cli("scan", str(path), "--data", str(data), "--json", "-", "-q", "--max-dead", "0.1")
        assert result.code == 1, (path, result.err)
        layers = result.json()["layers"]
        assert [layer["positive_counts"] for layer in layers] == truth, path
        assert [layer["producer"] for layer in layers] == ["block.conv", "layers.0", "layers.1"], path
