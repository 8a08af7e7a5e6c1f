"""torch43: the margin rule at rank 4 and 5 in every format; DETR-style pixel masks; LeakyReLU layers
beside ReLUs; watch() windows in merge; a resumed watch()'s trend. Truth: the tests' own torch / numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import arch_file, counts_from_pre, export_onnx, save_npz

MARGINS = """
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.conv3, self.lin = nn.Conv2d(3, 6, 1), nn.Conv3d(3, 6, 1), nn.Linear(3, 6)

    def forward(self, x):
        h = self.conv(x)  # [N, 6, H, W]: units on dim 1
        g = self.lin(x.permute(0, 2, 3, 1))  # [N, H, W, 6]: units last
        k = self.conv3(x.unsqueeze(2).expand(-1, -1, 2, -1, -1))  # [N, 6, 2, H, W]
        clamped = [
            # the units summed away: one value per position, no layer
            (h.sum(-3) - 0.5).clamp(min=0),
            (g.sum(-1) - 0.5).clamp(min=0),
            (g.sum(3) - 0.5).clamp(min=0),
            (k.sum(-4) - 0.5).clamp(min=0),
            # the mean broadcast back over the units: ReLU layers of 6 units
            (h - h.mean(-3, keepdim=True)).clamp(min=0),
            (g - g.mean(3, keepdim=True)).clamp(min=0),
            (k - k.mean(1, keepdim=True)).clamp(min=0),
        ]
        return torch.stack([c.flatten(1).sum(1) for c in clamped], 1)


def build():
    return Net()
"""


def _formats(model, spec: str, example, tmp_path) -> dict:
    """MODEL as a state_dict (+ --arch), .pt2, scripted, traced and ONNX (dynamo=False)."""
    dynamic = ({0: torch.export.Dim("b", max=1024)},)
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=dynamic), tmp_path / "m.pt2")
    torch.save(model.state_dict(), tmp_path / "m.pt")
    with torch.no_grad():
        torch.jit.script(model).save(tmp_path / "s.pt")
        torch.jit.trace(model, example).save(tmp_path / "t.pt")
    export_onnx(model, example, tmp_path / "m.onnx")
    return {
        "eager": [tmp_path / "m.pt", "--arch", spec],
        "pt2": [tmp_path / "m.pt2"],
        "scripted": [tmp_path / "s.pt"],
        "traced": [tmp_path / "t.pt"],
        "onnx": [tmp_path / "m.onnx"],
    }


def test_margins_and_centred_clamps_of_rank_4_and_5_agree_with_the_truth_in_every_format(cli, tmp_path):
    """Clamps of a conv's [N, C, H, W], a channels-last Linear's [N, H, W, C] and a Conv3d's [N, C, D, H, W]:
    the units summed away (`(h.sum(-3) - m).clamp(min=0)`, `g.sum(-1)`, `g.sum(3)`, `k.sum(-4)`) is no
    layer; centred on the units' mean (`h - h.mean(-3, keepdim=True)`) is a ReLU layer of 6 units, counted
    on its unit axis. Truth: the three centred pre-activations computed here, counted in numpy.
    Before: TorchScript took every reduction's input as rank 3 (counted `h.sum(-3)` and `k.sum(-4)`,
    dropped the Conv3d's centred layer), eager / .pt2 / ONNX counted the channels-last margins, and
    .pt2 dropped the conv's and the Conv3d's centred layers."""
    model, spec = arch_file(tmp_path / "margins.py", MARGINS)
    x = np.random.RandomState(43).randn(7, 3, 4, 5).astype(np.float32)
    data = save_npz(tmp_path / "d.npz", x=x)
    with torch.no_grad():
        t = torch.from_numpy(x).double()
        h = torch.nn.functional.conv2d(t, model.conv.weight.double(), model.conv.bias.double())
        g = torch.nn.functional.linear(
            t.permute(0, 2, 3, 1), model.lin.weight.double(), model.lin.bias.double()
        )
        k = torch.nn.functional.conv3d(
            t.unsqueeze(2).expand(-1, -1, 2, -1, -1), model.conv3.weight.double(), model.conv3.bias.double()
        )
    truth = []
    for pre, dim in (
        (h - h.mean(1, keepdim=True), 1),
        (g - g.mean(3, keepdim=True), 3),
        (k - k.mean(1, keepdim=True), 1),
    ):
        positives, _, elements = counts_from_pre(pre, dim)
        truth.append((6, positives.tolist(), elements))
    assert all(0 < p < e for _, counts, e in truth for p in counts)  # every unit fires on some positions only
    for fmt, args in _formats(model, spec, torch.from_numpy(x[:2]), tmp_path).items():
        result = cli("scan", *args, "--data", data, "--json", "-", "-q")
        assert result.code == 0, (fmt, result.err)
        layers = result.json()["layers"]
        found = [(la["units"], la["positive_counts"], la["elements_per_unit"]) for la in layers]
        assert found == truth, (fmt, [la["name"] for la in layers])


def _net_and_hooks():
    """Linear(4, 8) + ReLU + Linear(8, 1), and the ReLU's outputs each forward recorded by a plain hook."""
    torch.manual_seed(43)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    seen: list[torch.Tensor] = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    return model, seen


def _train(model, seen, steps, out_dir, seed, checkpoint_at=None) -> dict[int, np.ndarray]:
    """A plain loop (every=2, window=3: blocks of 6 steps) over `steps`, w.step(global_step) as a resumed
    trainer gives them, an optimizer step each; `checkpoint_at`: a checkpoint saved after that step
    (w.checkpoint()). Returns the hooks' positives per unit of each sampled step."""
    from deadrelu_cli import watch

    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    fired = {}
    with watch(model, every=2, window=3, config=False, out_dir=out_dir) as w:
        for step in steps:
            sampled = w.step(step)
            seen.clear()
            model(torch.randn(3, 4, generator=g)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            if sampled:
                fired[step] = (seen[0] > 0).sum(0).numpy()
            if step == checkpoint_at:
                w.checkpoint()
    return fired


def test_a_resumed_run_keeps_the_first_runs_steps_before_its_checkpoint_in_the_trend(cli, tmp_path):
    """Run 1: steps 0-10, a checkpoint saved after step 7 (w.checkpoint(), as the Lightning / Trainer
    callbacks call at each save); run 2 resumes there: steps 8-13. `deadrelu trend` of the folder covers
    steps 0, 2, 4 (run 1), 6 (run 1, before the checkpoint), 8, 10 (run 2: replacing run 1's abandoned
    steps after the checkpoint) and 12, each once, with the counts the hooks saw. Without w.checkpoint(),
    run 1's window 6+8 cannot be split: it is replaced, and a warning names step 6 as lost.
    Before: run 1's step 6 went with its window of steps 6-11, silently (a gap in the trend)."""
    model, seen = _net_and_hooks()
    run1 = _train(model, seen, range(0, 11), tmp_path, seed=1, checkpoint_at=7)
    run2 = _train(model, seen, range(8, 14), tmp_path, seed=2)
    truth = {4: [run1[s] for s in (0, 2, 4)], 6: [run1[6]], 10: [run2[8], run2[10]], 12: [run2[12]]}
    result = cli("trend", tmp_path, "--json", "-")
    assert result.code == 0, result.err
    points = result.json()["checkpoints"]
    assert [p["step"] for p in points] == sorted(truth)
    for step in truth:
        report = json.loads((tmp_path / f"deadrelu-step{step:08d}.json").read_text())
        layer = report["layers"][0]
        assert layer["positive_counts"] == sum(truth[step]).tolist(), step
        assert layer["elements_per_unit"] == 3 * len(truth[step])
    # the same runs without the checkpoint call: run 1's window of steps 6 and 8 is dropped whole, said
    other = tmp_path / "no-checkpoint"
    model, seen = _net_and_hooks()
    _train(model, seen, range(0, 11), other, seed=1)
    with pytest.warns(
        UserWarning, match=r"steps 6-7 \(before step 8, where this run began\) are in no report"
    ):
        _train(model, seen, range(8, 14), other, seed=2)
    assert sorted(p.name for p in other.iterdir()) == [f"deadrelu-step{n:08d}.json" for n in (4, 10, 12)]


def test_merge_of_training_windows_refuses_windows_of_the_same_steps(cli, tmp_path):
    """Windows of one run (steps 0-4, 6-10) merge into the hooks' summed counts, with a note that merge
    checked their steps (windows carry no data fingerprint). A window of steps 6-8 kept from an earlier run
    beside the resumed run's window of steps 8-10 (step 8 twice), or a window's copy, is refused (exit 2)
    naming both. Before: windows were checked only by identical statistics, so the first pair merged and
    counted step 8 twice."""
    model, seen = _net_and_hooks()
    run = tmp_path / "run"
    fired = _train(model, seen, range(0, 12), run, seed=1)
    a, b = run / "deadrelu-step00000004.json", run / "deadrelu-step00000010.json"
    result = cli("merge", a, b, "--json", "-")
    assert result.code == 0, result.err
    merged = result.json()
    assert merged["layers"][0]["positive_counts"] == sum(fired.values()).tolist()
    assert merged["layers"][0]["elements_per_unit"] == 3 * len(fired)
    assert any("merge checked that no two of them counted the same steps" in n for n in merged["notes"])
    # an earlier run's window of steps 6-8 (checkpoint at step 7: w.checkpoint() was not called), kept
    earlier = tmp_path / "earlier"
    model, seen = _net_and_hooks()
    _train(model, seen, range(0, 9), earlier, seed=3)
    stale = earlier / "deadrelu-step00000008.json"
    assert json.loads(stale.read_text())["training"]["first_step"] == 6
    result = cli("merge", b, stale, "--json", "-")
    assert result.code == 2
    assert "steps 6-8, which overlap those of" in result.err and "steps 6-10" in result.err
    copy = tmp_path / "copy.json"
    copy.write_text(b.read_text())
    assert cli("merge", b, copy, "--json", "-").code == 2


MIXED = """
import torch
import torch.nn.functional as F
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3, self.fc4 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.act, self.leaky = nn.ReLU(), nn.LeakyReLU(0.1)

    def forward(self, x):
        h = self.leaky(self.fc2(self.act(self.fc1(x))))
        return self.fc4(F.elu(self.fc3(h)) + self.leaky(h))


def build():
    return Net()
"""


def test_leaky_and_elu_layers_beside_relus_are_named_as_not_scanned_in_every_format(cli, tmp_path):
    """A model with one ReLU, one LeakyReLU module called twice and an F.elu: the default scan (--ops
    relu,relu6) counts the ReLU and says, in the JSON (`unscanned_activations`: leaky_relu 2 layers, elu 1),
    in a note under the table and in the gate's output (a saved report's gate and its Markdown too), that those
    layers were not scanned and which --ops counts them; with that --ops they are counted, each layer
    against the hooks' truth. Before: nothing said that the leaky layers were there (only a model without
    any ReLU was told so)."""
    model, spec = arch_file(tmp_path / "mixed.py", MIXED)
    x = np.random.RandomState(3).randn(16, 4).astype(np.float32)
    data = save_npz(tmp_path / "d.npz", x=x)
    hint = "--ops relu,relu6,leaky_relu,elu counts them"
    for fmt, args in _formats(model, spec, torch.from_numpy(x[:2]), tmp_path).items():
        if fmt == "traced":
            continue
        result = cli("scan", *args, "--data", data, "--json", tmp_path / "r.json", "--max-dead", "0.9")
        assert result.code == 0, (fmt, result.err)
        report = json.loads((tmp_path / "r.json").read_text())
        assert [la["op"] for la in report["layers"]] == ["relu"], fmt
        assert report["unscanned_activations"] == {"leaky_relu": 2, "elu": 1}, fmt
        said = "leaky_relu ×2, elu ×1 layer(s) not scanned (not in --ops relu,relu6)"
        assert f"note: {said}; {hint}" in result.out, fmt  # under the table
        assert f"note: not gated: {said}" in result.err and "gate passed" in result.err, fmt
        assert any(said in note for note in report["notes"]), fmt
    gated = cli("gate", tmp_path / "r.json", "--max-dead", "0.9", "--markdown", tmp_path / "g.md")
    assert gated.code == 0 and "not gated: leaky_relu ×2, elu ×1 layer(s) not scanned" in gated.err
    markdown = (tmp_path / "g.md").read_text()
    assert "Not gated: leaky\\_relu ×2, elu ×1 layer(s) not scanned (not in --ops relu,relu6)" in markdown
    # the --ops the note gives counts them: the hooks' truth for each of the four layers
    captured = {}
    for name in ("act", "fc3"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: captured.setdefault(name, o))
    leaky_inputs = []
    model.leaky.register_forward_hook(lambda m, i, o: leaky_inputs.append(i[0]))
    with torch.no_grad():
        model(torch.from_numpy(x))
    pre = {
        "act": captured["act"],
        "leaky": leaky_inputs[0],
        "leaky#2": leaky_inputs[1],
        "elu()": captured["fc3"],
    }
    result = cli(
        "scan",
        tmp_path / "m.pt",
        "--arch",
        spec,
        "--data",
        data,
        "--json",
        "-",
        "-q",
        "--ops",
        "relu,relu6,leaky_relu,elu",
    )
    assert result.code == 0, result.err
    found = result.json()
    assert "unscanned_activations" not in found
    # a training window says it too (watch()'s ops=)
    from deadrelu_cli import watch

    w = watch(model, every=1, config=False)
    w.step()
    model(torch.from_numpy(x))
    w.close()
    assert w.last.unscanned == {"leaky_relu": 2, "elu": 1}
    assert any(
        'layer(s) not scanned (not in ops="relu,relu6"); ops="relu,relu6,leaky_relu,elu" counts them' in note
        for note in w.last.notes
    )
    assert {la["name"]: la["positive_counts"] for la in found["layers"]} == {
        name: (value > 0).sum(0).tolist() for name, value in pre.items()
    }


PIXELS = """
import torch
import torch.nn.functional as F
import torch.nn.functional as F
from torch import nn


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.ffn = nn.Linear(8, 12)

    def forward(self, x, attention_mask=None):
        return F.relu(self.ffn(x)) * attention_mask[..., None]


class Det(nn.Module):
    \"\"\"A DETR-like detector: two strided convs over the image, then an encoder over the flattened feature
    map, given the pixel mask interpolated to it and flattened (as DETR does).\"\"\"

    def __init__(self):
        super().__init__()
        torch.manual_seed(43)
        self.stem, self.conv = nn.Conv2d(3, 6, 3, 2, 1), nn.Conv2d(6, 8, 3, 2, 1)
        self.enc, self.head = Encoder(), nn.Linear(12, 4)

    def forward(self, pixel_values, pixel_mask):
        h = F.relu(self.conv(F.relu(self.stem(pixel_values))))
        mask = F.interpolate(pixel_mask[None].float(), size=h.shape[-2:])[0].bool().flatten(1)
        return self.head(self.enc(h.flatten(2).transpose(1, 2), attention_mask=mask)).sum(1)


def build():
    return Det()
"""


def _cells(mask: np.ndarray, stride: int) -> np.ndarray:
    """bool [B, h, w]: the stride×stride cells of the images that are all image (the test's truth)."""
    b, hh, ww = mask.shape
    return mask.reshape(b, hh // stride, stride, ww // stride, stride).all(axis=(2, 4))


def test_a_pixel_mask_leaves_padded_pixels_out_of_conv_maps_and_the_encoder_or_fails_the_gate(cli, tmp_path):
    """Images 16×12 padded at the bottom / right, `pixel_mask` 1 on the image: the strided convs' feature
    maps (stride 2 and 4) count their cells of image only, the encoder (given the mask interpolated and
    flattened as its attention_mask) its image positions only; truth: the test's own pre-activations,
    counted over the cells computed here in numpy. Padding that ends between cells (column 7) cannot be
    told per cell: those conv layers count every cell, are marked "pixel cells mixed", and the gate fails
    unless --allow-unseen; the .pt2 (no module hooks there) marks the encoder "pixel positions flattened".
    Before: every position counted everywhere, padded pixels included, and the gate passed."""
    model, spec = arch_file(tmp_path / "det.py", PIXELS)
    rs = np.random.RandomState(43)
    x = rs.randn(4, 3, 16, 12).astype(np.float32)
    mask = np.ones((4, 16, 12), dtype=np.int64)
    mask[1, :, 8:] = 0
    mask[2, 12:, :] = 0
    x[mask[:, None].repeat(3, 1) == 0] = 0.0
    torch.save(model.state_dict(), tmp_path / "m.pt")
    with torch.no_grad():
        t = torch.from_numpy(x)
        stem = model.stem(t)
        conv = model.conv(F.relu(stem))
        keep = F.interpolate(torch.from_numpy(mask)[None].float(), size=conv.shape[-2:])[0].bool().flatten(1)
        ffn = model.enc.ffn(F.relu(conv).flatten(2).transpose(1, 2))

    def counted(pre: torch.Tensor, cells: np.ndarray) -> list[int]:
        kept = pre.numpy().transpose(0, 2, 3, 1)[cells]  # [kept cells, C]
        return (kept > 0).sum(0).tolist()

    truth = {
        "relu()": counted(stem, _cells(mask == 1, 2)),
        "relu()#2": counted(conv, _cells(mask == 1, 4)),
        "enc.relu()": (ffn.numpy()[keep.numpy()] > 0).sum(0).tolist(),
    }
    everything = {
        "relu()": (stem > 0).sum((0, 2, 3)).tolist(),
        "relu()#2": (conv > 0).sum((0, 2, 3)).tolist(),
    }
    assert truth["relu()"] != everything["relu()"] and truth["relu()#2"] != everything["relu()#2"]
    data = save_npz(tmp_path / "d.npz", pixel_values=x, pixel_mask=mask)
    args = ["scan", tmp_path / "m.pt", "--arch", spec, "--data", data, "--json", "-", "--max-dead", "0.99"]
    result = cli(*args)
    assert result.code == 0, result.err
    layers = {la["name"]: la for la in result.json()["layers"]}
    assert {name: la["positive_counts"] for name, la in layers.items()} == truth, [
        (n, la["elements_per_unit"], la["extra"]) for n, la in layers.items()
    ]
    assert [layers[n]["extra"]["position_mask"] for n in truth] == ["applied"] * 3
    assert layers["enc.relu()"]["elements_per_unit"] == int(keep.sum())
    # watch() reads the forward's pixel_mask alike (a training step of this detector)
    from deadrelu_cli import watch

    w = watch(model, every=1, config=False)
    w.step()
    model(t, pixel_mask=torch.from_numpy(mask))
    w.close()
    assert {layer.name: layer.positive_counts.tolist() for layer in w.last.layers} == truth
    # padding that ends inside a cell of both conv maps: counted whole, marked, the gate fails on it
    mask[1, :, 7:] = 0
    data = save_npz(tmp_path / "d.npz", pixel_values=x, pixel_mask=mask)
    result = cli(*args)
    assert result.code == 1
    assert "could not be applied to 2 layer(s) (pixel cells mixed)" in result.err
    layers = {la["name"]: la for la in result.json()["layers"]}
    assert {n: layers[n]["positive_counts"] for n in everything} == everything
    assert layers["relu()"]["extra"]["position_mask"] == "pixel cells mixed"
    assert cli(*args, "--allow-unseen").code == 0
    # an ExportedProgram runs no module hooks: its encoder positions cannot be told, and it says so
    mask[1, :, 7:], mask[1, :, :8] = 0, 1
    data = save_npz(tmp_path / "d.npz", pixel_values=x, pixel_mask=mask)
    dims = {
        "pixel_values": {0: torch.export.Dim("b", max=64)},
        "pixel_mask": {0: torch.export.Dim("b", max=64)},
    }
    program = torch.export.export(model, (t[:2], torch.from_numpy(mask[:2])), dynamic_shapes=dims)
    torch.export.save(program, tmp_path / "m.pt2")
    result = cli("scan", tmp_path / "m.pt2", "--data", data, "--json", "-", "--max-dead", "0.99")
    assert result.code == 1 and "(pixel positions flattened)" in result.err, result.err
    layers = {la["name"]: la for la in result.json()["layers"]}
    assert layers["enc.relu()"]["extra"]["position_mask"] == "pixel positions flattened"
    assert [layers[n]["positive_counts"] for n in ("relu()", "relu()#2")] == [
        truth["relu()"],
        truth["relu()#2"],
    ]


def test_a_tiny_detr_counts_its_backbone_and_encoder_on_the_image_pixels_only(cli, tmp_path):
    """Hugging Face DETR (random weights, a two-stage ResNet backbone, ReLU FFNs) saved as a folder, fed
    `pixel_values` and a `pixel_mask` padded on a multiple of the backbone's stride: each backbone ReLU
    counts its feature map's cells of image only, the encoder's FFN the positions of DETR's own mask
    (the pixel mask interpolated to the feature map), the decoder and the box head every object query.
    Truth: forward hooks on the activation modules, counted in numpy over cells computed here.
    Before: every feature position counted, padding included, without a word."""
    transformers = pytest.importorskip("transformers", reason="the transformers extra is not installed")
    torch.manual_seed(0)
    backbone = transformers.ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
        out_features=["stage2"],
    )  # fmt: skip
    config = transformers.DetrConfig(
        backbone_config=backbone, use_pretrained_backbone=False, d_model=16, encoder_layers=1,
        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=12,
        decoder_ffn_dim=12, num_queries=5, activation_function="relu", num_labels=3,
    )  # fmt: skip
    model = transformers.DetrForObjectDetection(config).eval()
    model.save_pretrained(tmp_path / "detr")
    rs = np.random.RandomState(0)
    x = rs.randn(4, 3, 64, 48).astype(np.float32)
    mask = np.ones((4, 64, 48), dtype=np.int64)
    mask[1, :, 32:], mask[2, 40:, :] = 0, 0  # multiples of the stride 8 of the last feature map
    x[mask[:, None].repeat(3, 1) == 0] = 0.0
    data = save_npz(tmp_path / "d.npz", pixel_values=x, pixel_mask=mask)
    pre = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ReLU):
            # before it runs, copied: the ResNet's ReLUs work in place
            module.register_forward_pre_hook(lambda m, i, name=name: pre.setdefault(name, i[0].clone()))
    with torch.no_grad():
        model(pixel_values=torch.from_numpy(x), pixel_mask=torch.from_numpy(mask))
    truth = {}
    for name, value in pre.items():
        if value.dim() == 4:  # a backbone feature map [B, C, h, w]: its cells of image only
            cells = _cells(mask == 1, 64 // value.shape[2])
            truth[name] = (value.numpy().transpose(0, 2, 3, 1)[cells] > 0).sum(0).tolist()
        elif name.startswith("model.encoder"):  # [B, h*w, F] on DETR's own mask
            size = pre["model.backbone.model.encoder.stages.1.layers.0.activation"].shape[-2:]
            keep = F.interpolate(torch.from_numpy(mask)[None].float(), size=size)[0].bool().flatten(1)
            truth[name] = (value.numpy()[keep.numpy()] > 0).sum(0).tolist()
        else:  # object queries: every one
            truth[name] = (value.reshape(-1, value.shape[-1]) > 0).sum(0).tolist()
    result = cli("scan", tmp_path / "detr", "--data", data, "--json", "-", "-q", "--max-dead", "0.99")
    assert result.code == 0, result.err
    layers = {la["name"]: la for la in result.json()["layers"]}
    assert {name: layers[name]["positive_counts"] for name in truth} == truth
    assert len(layers) == len(truth) + 2  # and the box head's two functional ReLUs
    assert layers["model.encoder.layers.0.mlp.activation_fn"]["extra"]["position_mask"] == "applied"
