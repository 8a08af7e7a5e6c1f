"""Mixtures of experts built from separate expert modules (SwitchTransformers' experts ModuleDict,
NLLB-MoE's, an nn.ModuleList of expert MLPs written by hand) scanned with padded tokens: each expert's
ReLU sees the rows of the tokens routed to it, gathered by index ([k, d_ff], no token axis), and counted
every row, padding's included, under a note that did not gate: a unit firing on padding only passed as
alive. Truth: the test's own hooks (each expert's rows matched to the block's input rows, whose tokens
are known) or plain torch re-running the hand-written routing, over real tokens only."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from conftest import arch_file, save_npz, save_state_dict

transformers = pytest.importorskip("transformers")

MASK = np.array(
    [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]], np.int64
)


def _ids(pad: int, extra: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of MASK's four samples (right padding with `pad`), `extra` more padding columns."""
    ids = np.random.default_rng(45).integers(3, 32, MASK.shape)
    ids[MASK == 0] = pad
    return np.pad(ids, ((0, 0), (0, extra)), constant_values=pad), np.pad(MASK, ((0, 0), (0, extra)))


def expert_truth(model, feed: dict, containers: dict[str, torch.nn.Module], keep: np.ndarray) -> dict:
    """{expert activation site: (positive counts, rows)} over the rows of kept tokens. Each expert's input
    rows are matched to its container's input rows (one row per token, flattened sample-major; a row
    equal to both a real token's and padding's would be untold, checked), which says whose each is; the pre-activation is the hooked ReLU's input."""
    inputs, rows, pres = {}, {}, {}
    handles = []
    for path, container in containers.items():
        handles.append(
            container.register_forward_pre_hook(
                lambda _m, args, path=path: inputs.__setitem__(
                    path, args[0].detach().reshape(-1, args[0].shape[-1])
                )
            )
        )
        for key, expert in container.named_children():
            if not any(True for _ in expert.parameters()):
                continue
            name = f"{path}.{key}"
            handles.append(
                expert.register_forward_pre_hook(
                    lambda _m, args, name=name: rows.__setitem__(name, args[0].detach())
                )
            )
            handles.append(
                expert.act.register_forward_pre_hook(
                    lambda _m, args, name=name: pres.__setitem__(name, args[0].detach())
                )
            )
    try:
        with torch.no_grad():
            model(**{k: torch.from_numpy(v) for k, v in feed.items()})
    finally:
        for handle in handles:
            handle.remove()
    kept_flat = torch.from_numpy(keep.reshape(-1).astype(bool))
    truth, padded_rows = {}, 0
    for name, x in rows.items():
        path = name.rpartition(".")[0]
        hidden = inputs[path]
        same = (x.reshape(-1, x.shape[-1])[:, None, :] == hidden[None]).all(-1)  # [rows, tokens]
        assert bool(same.any(1).all())  # every row is one of the block's input rows
        real = (same & kept_flat[None]).any(1)
        assert torch.equal(real, ~(same & ~kept_flat[None]).any(1))  # a row matched both kinds: untold
        padded_rows += int((~real).sum())
        pre = pres[name].reshape(-1, pres[name].shape[-1])[real]
        truth[f"{name}.act"] = ((pre > 0).sum(0).tolist(), int(real.sum()))
    assert padded_rows > 0  # padding reached the experts: counting every row would be wrong
    return truth


def _layers(result) -> dict:
    assert result.code == 0, result.err
    return {layer["name"]: layer for layer in result.json()["layers"]}


def _agrees(layers: dict, truth: dict) -> None:
    for name, (counts, rows) in truth.items():
        assert layers[name]["elements_per_unit"] == rows, name
        assert layers[name]["positive_counts"] == counts, name
        assert layers[name]["extra"]["position_mask"] == "applied", name


def test_switch_transformers_experts_count_real_tokens_only(cli, tmp_path):
    """SwitchTransformers (relu experts, an experts ModuleDict): every expert's units over the rows of real
    tokens routed to it, the same for any batch size and any amount of padding."""
    torch.manual_seed(0)
    config = transformers.SwitchTransformersConfig(
        vocab_size=32, d_model=16, d_kv=4, d_ff=12, num_layers=2, num_heads=2, num_experts=2,
        encoder_sparse_step=1, expert_capacity=64, dense_act_fn="relu", pad_token_id=0,
    )  # fmt: skip
    model = transformers.SwitchTransformersEncoderModel(config).eval()
    model.save_pretrained(tmp_path / "switch")
    containers = {
        f"encoder.block.{i}.layer.1.mlp.experts": block.layer[1].mlp.experts
        for i, block in enumerate(model.encoder.block)
    }
    ids, mask = _ids(pad=0)
    truth = expert_truth(model, {"input_ids": ids, "attention_mask": mask}, containers, mask)
    assert len(truth) == 4
    save_npz(tmp_path / "d.npz", input_ids=ids, attention_mask=mask)
    for batch in ("1", "3", "4"):
        layers = _layers(
            cli(
                "scan",
                tmp_path / "switch",
                "--data",
                tmp_path / "d.npz",
                "--batch-size",
                batch,
                "--json",
                "-",
                "-q",
            )
        )
        _agrees(layers, truth)
    more_ids, more_mask = _ids(pad=0, extra=3)  # more padding: the same rows of real tokens
    save_npz(tmp_path / "e.npz", input_ids=more_ids, attention_mask=more_mask)
    _agrees(
        _layers(cli("scan", tmp_path / "switch", "--data", tmp_path / "e.npz", "--json", "-", "-q")), truth
    )


def test_nllb_moe_experts_count_real_tokens_only(cli, tmp_path):
    """NLLB-MoE (encoder and decoder experts, a dropout beside the experts in their ModuleDict): the
    encoder's experts over the attention_mask's real tokens, the decoder's over the
    decoder_attention_mask's."""
    torch.manual_seed(1)
    config = transformers.NllbMoeConfig(
        vocab_size=32, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=12, decoder_ffn_dim=12, num_experts=2,
        encoder_sparse_step=1, decoder_sparse_step=1, expert_capacity=64, activation_function="relu",
        max_position_embeddings=32, pad_token_id=1, moe_eval_capacity_token_fraction=1.0,
    )  # fmt: skip
    model = transformers.NllbMoeForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path / "nllb")
    ids, mask = _ids(pad=1)
    decoder_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], np.int64)
    decoder_ids = np.where(decoder_mask == 1, np.arange(2, 7)[None, :] + np.arange(4)[:, None], 1)
    feed = {"input_ids": ids, "attention_mask": mask}
    feed |= {"decoder_input_ids": decoder_ids, "decoder_attention_mask": decoder_mask}
    encoder = {"model.encoder.layers.0.ffn.experts": model.model.encoder.layers[0].ffn.experts}
    decoder = {"model.decoder.layers.0.ffn.experts": model.model.decoder.layers[0].ffn.experts}
    truth = expert_truth(model, feed, encoder, mask) | expert_truth(model, feed, decoder, decoder_mask)
    assert len(truth) == 4
    save_npz(tmp_path / "d.npz", **feed)
    for batch in ("1", "4"):
        layers = _layers(
            cli(
                "scan",
                tmp_path / "nllb",
                "--data",
                tmp_path / "d.npz",
                "--batch-size",
                batch,
                "--json",
                "-",
                "-q",
            )
        )
        _agrees(layers, truth)


MOE_SOURCE = """
import torch
from torch import nn


class MoE(nn.Module):
    def __init__(self, width=8, hidden=10, experts=3):
        super().__init__()
        self.gate = nn.Linear(width, experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width)) for _ in range(experts)
        )

    def forward(self, x):
        batch, tokens, width = x.shape
        flat = x.reshape(-1, width)
        weights, chosen = self.gate(flat).softmax(-1).topk(2, dim=-1)
        out = torch.zeros_like(flat)
        for i, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == i)
            out.index_add_(0, token, expert(ROWS) * weights[token, slot, None])
        return out.view(batch, tokens, width)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.moe = MoE()

    def forward(self, input_ids, attention_mask):
        return self.moe(self.embed(input_ids))


def build():
    torch.manual_seed(3)
    return Net()
"""


def _hand_written(tmp_path, rows: str):
    """The hand-written mixture of experts, unit 0 of every expert planted to fire on padding only (the pad
    id's embedding is 10 on feature 0, every real token's below 1; unit 0 reads feature 0, bias -5)."""
    model, spec = arch_file(tmp_path / "moe.py", MOE_SOURCE.replace("ROWS", rows))
    with torch.no_grad():
        model.embed.weight[:, 0].clamp_(-1, 1)
        model.embed.weight[0, 0] = 10.0
        for expert in model.moe.experts:
            expert[0].weight[0] = torch.nn.functional.one_hot(torch.tensor(0), 8).float()
            expert[0].bias[0] = -5.0
    save_state_dict(model, tmp_path / "moe.pt")
    ids, mask = _ids(pad=0)
    save_npz(tmp_path / "d.npz", input_ids=ids, attention_mask=mask)
    return model, spec, ids, mask


@pytest.mark.parametrize(
    "rows",
    ["flat[token]", "torch.cat(flat.index_select(0, token).view(-1, 1, width).split(3, 0)).squeeze(1)"],
)
def test_hand_written_module_list_experts_count_real_tokens_only(cli, tmp_path, rows):
    """An nn.ModuleList of expert MLPs with a top-2 router, as users write one (--arch), its rows gathered
    by indexing, or by index_select, a view, a split of the rows and their cat: each expert's ReLU over
    the rows of real tokens routed to it. Truth: the routing re-run in plain torch."""
    model, spec, ids, mask = _hand_written(tmp_path, rows)
    with torch.no_grad():
        flat = model.embed(torch.from_numpy(ids)).reshape(-1, 8)
        chosen = model.moe.gate(flat).softmax(-1).topk(2, dim=-1).indices
        kept = torch.from_numpy(mask.reshape(-1).astype(bool))
        truth, padded = {}, 0
        for i, expert in enumerate(model.moe.experts):
            token = torch.where(chosen == i)[0]
            padded += int((~kept[token]).sum())
            pre = expert[0](flat[token[kept[token]]])
            truth[f"moe.experts.{i}.1"] = ((pre > 0).sum(0).tolist(), int(kept[token].sum()))
            if (~kept[token]).any():  # padding reached it: the planted unit fires there, and only there
                assert truth[f"moe.experts.{i}.1"][0][0] == 0 and (expert[0](flat[token])[:, 0] > 0).any()
    assert padded > 0
    for batch in ("1", "2", "4"):
        layers = _layers(
            cli(
                "scan",
                tmp_path / "moe.pt",
                "--arch",
                spec,
                "--data",
                tmp_path / "d.npz",
                "--batch-size",
                batch,
                "--json",
                "-",
                "-q",
            )
        )
        _agrees(layers, truth)
        assert all(0 in layers[name]["dead_indices"] for name in truth)  # fires on padding only: dead


def test_experts_rows_not_followed_are_said_and_gated(cli, tmp_path):
    """An expert whose rows come through an op the probe does not follow back to their tokens
    (torch.gather): its rows are counted as they are, marked, named in a note, and a gate fails on
    them unless --allow-unseen; never counted silently as if they were all real tokens."""
    _, spec, _, _ = _hand_written(tmp_path, "flat.gather(0, token[:, None].expand(-1, width))")
    args = ["scan", tmp_path / "moe.pt", "--arch", spec, "--data", tmp_path / "d.npz", "--json", "-", "-q"]
    result = cli(*args)
    layers = _layers(result)
    marked = [
        name
        for name, layer in layers.items()
        if layer["extra"].get("position_mask") == "routed rows not attributed"
    ]
    assert marked == [f"moe.experts.{i}.1" for i in range(3)]
    assert any(
        "routed rows not attributed" in note or "could not follow back" in note
        for note in result.json()["notes"]
    )
    gated = cli(*args[:-3], "--max-dead", "1.0", "-q")
    assert gated.code == 1 and "position mask could not be applied" in gated.err + gated.out
    assert cli(*args[:-3], "--max-dead", "1.0", "--allow-unseen", "-q").code == 0


def test_separate_experts_are_told_by_their_structure():
    """A stack of identical layers is no mixture of experts (no router of their number beside them);
    experts with a router are, a dropout beside them in their container or not."""
    from deadrelu_cli.probe.experts import separate_experts

    stack = torch.nn.Sequential(
        torch.nn.Linear(4, 4), torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
    )
    assert separate_experts(stack) == {}
    model, _ = arch_file_model()
    assert separate_experts(model) == {"moe": ("moe.experts.0", "moe.experts.1", "moe.experts.2")}


def arch_file_model():
    namespace: dict = {}
    exec(textwrap.dedent(MOE_SOURCE.replace("ROWS", "flat[token]")), namespace)  # noqa: S102
    return namespace["build"](), namespace


def test_watch_counts_the_experts_rows_of_real_tokens_only():
    """watch() on a training loop of the hand-written mixture of experts (the attention_mask read off
    the forward's arguments): each expert's units over the rows of real tokens, as the scan counts them.
    Truth: the routing re-run in plain torch."""
    from deadrelu_cli import watch

    model, _ = arch_file_model()
    ids, mask = _ids(pad=0)
    feeds = [(ids[:2], mask[:2]), (ids[2:], mask[2:])]
    watcher = watch(model, every=1, window=2, config=False)
    for step_ids, step_mask in feeds:
        watcher.step()
        model(torch.from_numpy(step_ids), attention_mask=torch.from_numpy(step_mask))
    watcher.close()
    counts = {f"moe.experts.{i}.1": [np.zeros(10, np.int64), 0] for i in range(3)}
    padded = 0
    with torch.no_grad():
        for step_ids, step_mask in feeds:
            flat = model.embed(torch.from_numpy(step_ids)).reshape(-1, 8)
            chosen = model.moe.gate(flat).softmax(-1).topk(2, dim=-1).indices
            kept = torch.from_numpy(step_mask.reshape(-1).astype(bool))
            for i, expert in enumerate(model.moe.experts):
                token = torch.where(chosen == i)[0]
                padded += int((~kept[token]).sum())
                counts[f"moe.experts.{i}.1"][0] += (expert[0](flat[token[kept[token]]]) > 0).sum(0).numpy()
                counts[f"moe.experts.{i}.1"][1] += int(kept[token].sum())
    assert padded > 0
    for name, (positive, rows) in counts.items():
        layer = watcher.last.layer(name)
        assert layer.elements_per_unit == rows, name
        assert layer.positive_counts.tolist() == positive.tolist(), name


@pytest.mark.parametrize("form", ["torchscript", "pt2", "onnx"])
def test_exported_experts_rows_are_said_and_gated(cli, tmp_path, form):
    """An export (.pt2, TorchScript, ONNX) of the hand-written mixture of experts: each expert's rows are
    gathered by the graph's index ops, which its probe does not follow to their tokens; the experts' layers
    counted every row (padding's too: more rows than the real tokens routed there, the test's own count)
    and passed a gate under a note that did not stop it. Now they are marked, noted, and gate; data
    without padding counts every row exactly and is not marked."""
    model, _, ids, mask = _hand_written(tmp_path, "flat[token]")
    feed = (torch.from_numpy(ids), torch.from_numpy(mask))
    path = tmp_path / f"moe.{form}"
    if form == "torchscript":
        torch.jit.trace(model, feed, check_trace=False).save(str(path))
    elif form == "pt2":
        torch.export.save(torch.export.export(model, feed, strict=False), str(path))
    else:
        torch.onnx.export(
            model, feed, str(path), input_names=["input_ids", "attention_mask"], dynamo=False,
            dynamic_axes={"input_ids": {0: "b"}, "attention_mask": {0: "b"}},
        )  # fmt: skip
    args = ["scan", path, "--data", tmp_path / "d.npz", "--trust-pickle"]
    result = cli(*args, "--json", "-", "-q")
    layers = _layers(result)
    marked = {
        name: layer
        for name, layer in layers.items()
        if layer["extra"].get("position_mask") == "routed rows not attributed"
    }
    assert len(marked) == 3 == len(layers)
    with torch.no_grad():
        flat = model.embed(feed[0]).reshape(-1, 8)
        chosen = model.moe.gate(flat).softmax(-1).topk(2, dim=-1).indices
    real = int((torch.from_numpy(mask.reshape(-1).astype(bool))[:, None] & (chosen >= 0)).sum())
    assert sum(layer["elements_per_unit"] for layer in marked.values()) > real  # padding's rows counted
    assert any("could not follow back to their tokens" in note for note in result.json()["notes"])
    gated = cli(*args, "--max-dead", "1.0", "-q")
    assert gated.code == 1 and "routed rows not attributed" in gated.err
    assert cli(*args, "--max-dead", "1.0", "--allow-unseen", "-q").code == 0
    save_npz(tmp_path / "full.npz", input_ids=np.where(mask == 1, ids, 5), attention_mask=np.ones_like(mask))
    unpadded = _layers(
        cli("scan", path, "--data", tmp_path / "full.npz", "--trust-pickle", "--json", "-", "-q")
    )
    assert all(
        layer["extra"]["position_mask"] == "no token axis" for layer in unpadded.values()
    )  # every row real
