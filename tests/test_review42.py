"""review42: watch()'s position masks at a batch of as many samples as tokens, and nn.Transformer*'s own
key padding masks. Truth: the model's own pre-activations recorded with forward hooks, counted in torch."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from deadrelu_cli import watch

UNITS = 16


def _close(w):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w.close()
    return [str(c.message) for c in caught if "as many samples as tokens" in str(c.message)]


class TwoCalls(nn.Module):
    """One nn.TransformerEncoder called twice in a forward: with a key padding mask, then without."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(8, 2, UNITS, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

    def forward(self, x, pad, y):
        return self.enc(x, src_key_padding_mask=pad).sum() + self.enc(y).sum()


def test_an_encoder_called_again_without_its_padding_mask_counts_every_position_of_that_call():
    """The second call has no src_key_padding_mask: every position of y is real. Before: the first call's
    mask stayed on for it (10 of 15 positions, wrong counts, "applied")."""
    model = TwoCalls()
    x, y = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, 3:], pad[1, 2:] = True, True
    seen = []
    model.enc.layers[0].linear1.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    w = watch(model, every=1, config=False)
    w.step()
    model(x, pad, y)
    w.close()
    first, second = w.last.layer("enc.layers.0.relu()"), w.last.layer("enc.layers.0.relu()#2")
    assert first.positive_counts.tolist() == (seen[0][~pad] > 0).sum(0).tolist()
    assert first.elements_per_unit == int((~pad).sum()) == 10
    assert second.positive_counts.tolist() == (seen[1].reshape(-1, UNITS) > 0).sum(0).tolist()
    assert second.elements_per_unit == 15


class TimeMajorIds(nn.Module):
    """Token ids come in time-major, [T, B] (fairseq-style): every activation is [T, B, F]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.emb, self.fc = nn.Embedding(20, 6), nn.Linear(6, UNITS)

    def forward(self, src):
        return torch.relu(self.fc(self.emb(src))).sum()


def _time_major_run(shapes, pad_id):
    model = TimeMajorIds()
    seen = []
    model.fc.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    w = watch(model, every=1, window=len(shapes), config=False)
    truth, kept = torch.zeros(UNITS, dtype=torch.long), 0
    gen = torch.Generator().manual_seed(2)
    for step, (batch, tokens) in enumerate(shapes):
        keep = torch.arange(tokens)[None, :] < (1 + torch.arange(batch) % tokens)[:, None]  # [B, T]
        src = torch.randint(1, 20, (tokens, batch), generator=gen)
        if pad_id is not None:
            src[~keep.T] = pad_id
        w.step(step, position_mask=keep)
        model(src)
        w.end_step()
        truth += (seen[-1].transpose(0, 1)[keep] > 0).sum(0)
        kept += int(keep.sum())
    ambiguous = _close(w)
    return w.last.layer("relu()"), truth.tolist(), kept, ambiguous


def test_time_major_token_ids_at_a_square_batch_are_not_read_as_batch_first():
    """A square first batch (4 samples of 4 tokens) of time-major ids: the ids have the mask's shape, but
    are [T, B]. Ids padded with varied values: the square batches wait for the 3-sample batch's shape;
    padded with one id: the ids' values tell. Before: read as [B, T] ("applied", wrong counts)."""
    for shapes, pad_id in (([(4, 4), (3, 4), (4, 4)], None), ([(4, 4), (4, 4)], 0)):
        layer, truth, kept, ambiguous = _time_major_run(shapes, pad_id)
        assert layer.positive_counts.tolist() == truth
        assert layer.elements_per_unit == kept
        assert layer.extra["position_mask"] == "applied"
        assert not ambiguous


class Features(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.fc = nn.Linear(6, UNITS)

    def forward(self, x, attention_mask=None):
        return torch.relu(self.fc(x)).sum()


def test_a_square_batch_whose_mask_reads_the_same_both_ways_is_counted_not_called_ambiguous():
    """No padding (all ones), or a mask equal to its transpose: [B, T] and [T, B] keep the same elements,
    so the count is exact whichever the layout. Before: "layout ambiguous", a warning, and a gate that
    fails on it (every position counted, the symmetric mask's padding included)."""
    x = torch.randn(4, 4, 6)
    lengths = torch.tensor([4, 3, 2, 1])
    for keep in (torch.ones(4, 4, dtype=torch.bool), torch.arange(4)[None, :] < lengths[:, None]):
        model = Features()
        w = watch(model, every=1, config=False)
        w.step()
        model(x, attention_mask=keep.long())
        ambiguous = _close(w)
        layer = w.last.layer("relu()")
        with torch.no_grad():
            pre = model.fc(x)[keep]
        assert layer.positive_counts.tolist() == (pre > 0).sum(0).tolist()
        assert layer.elements_per_unit == int(keep.sum())
        assert layer.extra["position_mask"] == "applied"
        assert not ambiguous


class SwapsIds(nn.Module):
    """Batch-first ids (padded with id 0) made time-major by `.T` or an einsum, at a square batch."""

    def __init__(self, how: str) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.emb, self.fc, self.how = nn.Embedding(20, 6), nn.Linear(6, UNITS), how

    def forward(self, input_ids, attention_mask=None):
        if self.how == "T":
            h = self.emb(input_ids.T)  # [T, B, E]
        else:
            h = torch.einsum("btf->tbf", self.emb(input_ids))
        return torch.relu(self.fc(h)).sum()


def test_an_axis_swap_that_keeps_the_sizes_is_never_carried_as_no_swap():
    """`.T` of the ids is followed as a swap (exact counts); an einsum that swaps the axes is not followed
    (never "applied" with the counts of the other layout: counted on every position and said so). Before:
    both carried as [B, T] through an op that keeps the sizes, wrong counts marked "applied"."""
    keep = torch.arange(4)[None, :] < torch.tensor([4, 2, 3, 1])[:, None]
    ids = torch.randint(1, 20, (4, 4), generator=torch.Generator().manual_seed(5))
    ids[~keep] = 0
    for how in ("T", "einsum"):
        model = SwapsIds(how)
        seen = []
        model.fc.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o.detach()))
        w = watch(model, every=1, config=False)
        w.step()
        model(ids, attention_mask=keep.long())
        ambiguous = _close(w)
        layer = w.last.layer("relu()")
        pre = seen[0].transpose(0, 1)  # [B, T, F]
        if how == "T":
            assert layer.extra["position_mask"] == "applied"
            assert layer.positive_counts.tolist() == (pre[keep] > 0).sum(0).tolist()
            assert layer.elements_per_unit == int(keep.sum())
        else:
            assert layer.extra["position_mask"] == "layout ambiguous" and ambiguous
            assert layer.positive_counts.tolist() == (pre.reshape(-1, UNITS) > 0).sum(0).tolist()
            assert layer.elements_per_unit == 16


class Centred(nn.Module):
    """A centred ReLU layer `(h - h.mean(-1, keepdim=True)).clamp(min=0)` (16 units), and a margin
    `(relu(g).sum(-1) - 1).clamp(min=0)` (one value per sample: no layer)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.fc, self.fc2 = nn.Linear(6, UNITS), nn.Linear(6, UNITS)

    def forward(self, x):
        h = self.fc(x)
        centred = (h - h.mean(-1, keepdim=True)).clamp(min=0)
        margin = (torch.relu(self.fc2(x)).sum(-1) - 1.0).clamp(min=0)
        return centred.sum() + margin.sum()


def test_a_centred_layer_clamped_at_zero_is_a_relu_layer_a_clamped_margin_is_not():
    """`h - h.mean(-1, keepdim=True)` broadcasts the per-sample mean back over h's 16 units: its clamp is a
    ReLU layer of 16 units (counted exactly); the margin's clamp (the units summed away) stays no layer.
    Before: the centred layer was taken for one value per position and left out of the report."""
    model = Centred()
    x = torch.randn(5, 6)
    w = watch(model, every=1, config=False)
    w.step()
    model(x)
    w.close()
    with torch.no_grad():
        h = model.fc(x)
        centred = h - h.mean(-1, keepdim=True)
        relu2 = model.fc2(x)
    layers = {layer.name: layer for layer in w.last.layers}
    assert [(name, layer.units) for name, layer in layers.items()] == [("relu()", UNITS), ("relu()#2", UNITS)]
    assert layers["relu()"].positive_counts.tolist() == (centred > 0).sum(0).tolist()
    assert layers["relu()#2"].positive_counts.tolist() == (relu2 > 0).sum(0).tolist()


RANKS = """
import json, os, sys
import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp
from deadrelu_cli.distributed import World, reduce_layers
from deadrelu_cli.stats import LayerStats

def run(rank, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    # rank 1's batches were square and never told apart: it counted every position
    mark = "applied" if rank == 0 else "layout ambiguous"
    layer = LayerStats("relu()", "relu", -1, np.array([rank + 1, 0]), 5 + rank, np.array([1.0, -1.0]),
                       np.array([1.0, 0.0]), extra={"position_mask": mark})
    merged, samples = reduce_layers(World(rank, 2, "gloo"), [layer], 2, "cpu")
    with open(f"{out}.{rank}", "w") as f:
        json.dump([merged[0].extra, merged[0].positive_counts.tolist(), merged[0].elements_per_unit], f)
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1],), nprocs=2)
"""


def test_ranks_that_counted_every_position_make_the_merged_layer_say_so_on_every_rank(tmp_path):
    """DDP: rank 0 applied its mask, rank 1 could not (its square batches were never told apart) and counted
    padding too. The summed counts hold rank 1's padding: every rank's merged layer must say so (and gate
    alike). Before: each rank kept its own mark (rank 0, which writes the report, said "applied")."""
    import json
    import socket
    import subprocess
    import sys

    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "out"), port],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    for rank in (0, 1):
        extra, positive, elements = json.loads((tmp_path / f"out.{rank}").read_text())
        assert extra["position_mask"] == "layout ambiguous"
        assert positive == [3, 0] and elements == 11
