"""Review of round 43 (review44): silent wrong answers found by a hostile reading, each checked against
truth the test builds itself (the data's construction, numpy)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import arch_file, save_npz
from hf_models import mixtral_config, opt_model, save_folder, save_tokenizer

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def packed_opt(tmp_path_factory):
    """A tiny OPT folder whose tokenizer has an EOS to join documents with (--text-packing pack)."""
    folder = save_folder(opt_model(), tmp_path_factory.mktemp("opt44") / "opt")
    save_tokenizer(folder, eos_token="[BOS]")
    return folder


def _documents(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{i}" for i in rng.integers(0, 29, int(rng.integers(3, 9)))) for _ in range(count)]


def _packed_scan(cli, folder, path, documents, out):
    path.write_text("".join(d + "\n" for d in documents))
    result = cli("scan", folder, "--text", path, "--text-packing", "pack", "--seq-len", "5", "--json", out)
    assert result.code == 0, result.err


def test_merge_of_packed_text_finds_documents_shared_wherever_the_stream_was_cut(packed_opt, cli, tmp_path):
    """Two --text-packing pack scans of files that share documents 1-5 (one file starts a document
    later): the shared documents' tokens are in both parts, but each stream is cut into other blocks, so
    a fingerprint of blocks shares nothing and merge summed them twice, silently. The fingerprint of a
    packed scan is of its documents: merge refuses, naming the shared count the test built."""
    docs = _documents(7, seed=3)
    assert len(set(docs)) == len(docs)
    _packed_scan(cli, packed_opt, tmp_path / "a.txt", docs[:6], tmp_path / "a.json")
    _packed_scan(cli, packed_opt, tmp_path / "b.txt", docs[1:], tmp_path / "b.json")
    merged = cli("merge", tmp_path / "a.json", tmp_path / "b.json", "--json", tmp_path / "ab.json")
    assert merged.code == 2, merged.err
    assert "5 of the same documents" in merged.err and "--allow-overlap" in merged.err


def test_merge_of_packed_text_takes_disjoint_documents(packed_opt, cli, tmp_path):
    """Disjoint document files merge, whatever their blocks hold; the union's fingerprint is of every
    document, and a later part with one of them is refused against the merged report."""
    docs = _documents(8, seed=4)
    assert len(set(docs)) == len(docs)
    _packed_scan(cli, packed_opt, tmp_path / "a.txt", docs[:4], tmp_path / "a.json")
    _packed_scan(cli, packed_opt, tmp_path / "b.txt", docs[4:7], tmp_path / "b.json")
    _packed_scan(cli, packed_opt, tmp_path / "c.txt", [docs[7], docs[2]], tmp_path / "c.json")
    merged = cli("merge", tmp_path / "a.json", tmp_path / "b.json", "--json", tmp_path / "ab.json")
    assert merged.code == 0, merged.err
    again = cli("merge", tmp_path / "ab.json", tmp_path / "c.json", "--json", tmp_path / "abc.json")
    assert again.code == 2 and "1 of the same documents" in again.err, again.err


MOVED = """
import torch
from torch import nn
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 6)
        self.out = nn.Conv2d(6, 2, 1)
    def forward(self, x):  # x [N, 3, H, W]
        h = torch.relu(MOVE_LAST)  # channels-last: units on the last axis
        h = torch.relu(torch.moveaxis(self.fc(h), (3, 1), (1, 3)))  # [N, W, H, 6] -> [N, 6, H, W]
        return self.out(h.transpose(2, 3))
def build():
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.conv.bias[[1, 5]] = -50.0
        model.fc.bias[[2]] = -50.0
    return model.eval()
"""


@pytest.mark.parametrize(
    "move_last",
    ["self.conv(x).movedim(1, -1)", 'torch.einsum("nchw->nhwc", self.conv(x))'],
    ids=["movedim", "einsum"],
)
def test_a_unit_axis_moved_by_movedim_is_followed_in_every_torch_format(cli, tmp_path, move_last):
    """movedim / moveaxis and an einsum that only reorders axes (channels-last written other common
    ways) were not followed as permute is: the conv's ReLU was counted on the image rows (5 "units", none
    dead) in eager, .pt2 and TorchScript, and the gate passed on 2 of 8 dead channels. Truth: hooks on
    the conv and the Linear."""
    model, spec = arch_file(tmp_path / "moved.py", MOVED.replace("MOVE_LAST", move_last))
    x = np.random.RandomState(44).randn(6, 3, 5, 7).astype(np.float32)
    data = save_npz(tmp_path / "d.npz", x=x)
    seen = {}
    hooks = [
        getattr(model, name).register_forward_hook(
            lambda _m, _a, out, n=name: seen.__setitem__(n, out.detach())
        )
        for name in ("conv", "fc")
    ]
    example = torch.from_numpy(x)
    with torch.no_grad():
        model(example)
    for hook in hooks:
        hook.remove()
    truth = [
        (seen["conv"] > 0).sum((0, 2, 3)).tolist(),  # [N, 8, H, W]: per channel
        (seen["fc"] > 0).sum((0, 1, 2)).tolist(),  # [N, H, W, 6]: per feature
    ]
    assert truth[0][1] == truth[0][5] == truth[1][2] == 0
    torch.save(model.state_dict(), tmp_path / "m.pt")
    torch.export.save(torch.export.export(model, (example[:2],)), tmp_path / "m.pt2")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(model).save(tmp_path / "s.pt")
        torch.jit.trace(model, example[:2]).save(tmp_path / "t.pt")
    for args in (
        [tmp_path / "m.pt", "--arch", spec],
        [tmp_path / "m.pt2"],
        [tmp_path / "s.pt"],
        [tmp_path / "t.pt"],
    ):
        result = cli("scan", *args, "--data", data, "--json", "-", "-q", "--max-dead", "0.1")
        assert result.code == 1, (args, result.err)  # 3 of 14 dead: the gate fails
        layers = result.json()["layers"]
        assert [layer["positive_counts"] for layer in layers] == truth, args
        assert [layer["elements_per_unit"] for layer in layers] == [6 * 5 * 7] * 2, args


def test_a_scan_leaves_a_mixture_of_experts_on_its_own_implementation():
    """Counting experts apart sets the experts' config to the eager implementation for the scan. Every
    layer's experts module holds the model's one config, so the second layer found "eager" already and
    put that back last: after the scan (fix's later runs of the same model) the model ran the slow
    eager experts, not the implementation it had."""
    transformers = pytest.importorskip("transformers")
    from deadrelu_cli.probe.experts import experts_apart

    config = mixtral_config(layers=2)
    model = transformers.MixtralModel(config).eval()
    experts = [layer.mlp.experts for layer in model.layers]
    assert experts[0].config is experts[1].config
    before = experts[0].config._experts_implementation_internal
    assert before != "eager"
    with experts_apart(model) as fused:
        assert len(fused) == 2 and experts[0].config._experts_implementation_internal == "eager"
    assert experts[0].config._experts_implementation_internal == before
    assert all("forward" not in module.__dict__ and "0" not in module._modules for module in experts)


WRAPPED = """
import torch
from torch import nn
class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv1d(c, c, 1)
        self.drop = nn.Dropout(0.1)
    def forward(self, x):
        return self.drop(self.conv(x))
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(6) for _ in range(2)])
        self.inner = nn.Sequential(nn.Conv1d(6, 6, 1), nn.BatchNorm1d(6), nn.Dropout(0.1))
    def forward(self, x):  # x [N, 6, T]
        for block in self.blocks:
            x = torch.relu(block(x))
        return torch.relu(self.inner(x))
def build():
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.blocks[0].conv.bias[0] = -80.0
        model.blocks[1].conv.bias[4] = -80.0
        model.inner[1].bias[3] = -80.0
    return model.eval()
"""


def test_torchscript_finds_the_conv_inside_a_block_or_a_sequential(cli, tmp_path):
    """A ReLU of a block's output (a module of the model's own returning its conv's output, through a
    Dropout; an nn.Sequential of conv, BatchNorm, Dropout) in scripted and traced TorchScript: the walk
    stopped at the block's call, so the [N, C, T] ReLUs were counted on the time axis (9 "units", none
    dead) under a note, and the gate passed on the planted dead channels. Truth: hooks on the blocks."""
    model, _ = arch_file(tmp_path / "wrapped.py", WRAPPED)
    x = np.random.RandomState(44).randn(4, 6, 9).astype(np.float32)
    data = save_npz(tmp_path / "d.npz", x=x)
    seen = []
    hooks = [
        m.register_forward_hook(lambda _m, _a, out: seen.append(out.detach()))
        for m in (*model.blocks, model.inner)
    ]
    example = torch.from_numpy(x)
    with torch.no_grad():
        model(example)
    for hook in hooks:
        hook.remove()
    truth = [(out > 0).sum((0, 2)).tolist() for out in seen]  # [N, 6, T]: per channel
    assert truth[0][0] == truth[1][4] == truth[2][3] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(model).save(tmp_path / "s.pt")
        torch.jit.trace(model, example).save(tmp_path / "t.pt")
    for path in (tmp_path / "s.pt", tmp_path / "t.pt"):
        result = cli("scan", path, "--data", data, "--json", "-", "-q")
        assert result.code == 0, result.err
        report = result.json()
        assert [layer["positive_counts"] for layer in report["layers"]] == truth, path
        assert [layer["producer"] for layer in report["layers"]] == [
            "blocks.0.conv",
            "blocks.1.conv",
            "inner.1",
        ]
        assert not any("unit axis assumed" in note for note in report["notes"]), report["notes"]


def test_merge_says_which_fingerprint_was_made_another_way(packed_opt, cli, tmp_path):
    """A packed text part (fingerprint of documents) merged with a padded one of other documents
    (fingerprint of kept positions): the two do not compare, and merge's note must say so, naming the
    part, not that it has "no data fingerprint (an older deadrelu)" (what the note said of every
    fingerprint made another way), which its report plainly holds."""
    docs = _documents(6, seed=5)
    _packed_scan(cli, packed_opt, tmp_path / "a.txt", docs[:3], tmp_path / "a.json")
    (tmp_path / "b.txt").write_text("".join(d + "\n" for d in docs[3:]))
    padded = cli(
        "scan", packed_opt, "--text", tmp_path / "b.txt", "--seq-len", "5", "--json", tmp_path / "b.json"
    )
    assert padded.code == 0, padded.err
    merged = cli("merge", tmp_path / "a.json", tmp_path / "b.json", "--json", "-", "-q")
    assert merged.code == 0, merged.err
    notes = merged.json()["notes"]
    assert not any("an older deadrelu" in note for note in notes), notes
    assert any(
        note.startswith(f"{tmp_path / 'b.json'}: a data fingerprint made another way") for note in notes
    ), notes


def test_fused_experts_count_the_rows_of_real_tokens_only(cli, tmp_path):
    """A fused mixture of experts scanned with an attention_mask: each expert's rows are the tokens
    routed to it, padding included, which no [batch, tokens] mask reads, so every expert counted its
    padding rows ('no token axis', the gate not told): a unit firing on padding only passed as alive.
    Truth: the experts module's own inputs (hidden states, routing) and weights, over real tokens only."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = mixtral_config()
    model = transformers.MixtralModel(config).eval()
    model.save_pretrained(tmp_path / "moe")
    rng = np.random.default_rng(44)
    ids = rng.integers(0, 32, (6, 9))
    mask = np.ones((6, 9), np.int64)
    mask[1, 5:] = mask[3, 2:] = mask[4, 7:] = 0
    np.savez(tmp_path / "d.npz", input_ids=ids, attention_mask=mask)
    experts = model.layers[0].mlp.experts
    seen = []
    handle = experts.register_forward_hook(
        lambda _m, args, _o: seen.append([a.detach().numpy() for a in args[:2]])
    )
    with torch.no_grad():
        model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    handle.remove()
    (hidden, routes), weights = seen[0], experts.gate_up_proj.detach().numpy()
    real = mask.reshape(-1).astype(bool)
    units = weights.shape[1] // 2
    truth = {}
    for expert in range(weights.shape[0]):
        rows = hidden[(routes == expert).any(axis=1) & real]
        truth[f"layers.0.mlp.experts.{expert}.act_fn"] = (
            ((rows @ weights[expert, :units].T) > 0).sum(0).tolist(),
            len(rows),
        )
    assert all(
        rows < ((routes == int(name.split(".")[4])).any(axis=1)).sum() for name, (_, rows) in truth.items()
    )
    result = cli(
        "scan", tmp_path / "moe", "--data", tmp_path / "d.npz", "--batch-size", "2", "--json", "-", "-q"
    )
    assert result.code == 0, result.err
    layers = {layer["name"]: layer for layer in result.json()["layers"]}
    assert set(layers) == set(truth)
    for name, (counts, rows) in truth.items():
        assert layers[name]["positive_counts"] == counts and layers[name]["elements_per_unit"] == rows, name
        assert layers[name]["extra"]["position_mask"] == "applied", name
