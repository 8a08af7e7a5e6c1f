"""Review of the day's merges (review36a): regressions found by trying the tool as a user would.
Truth is plain torch on the written files, never the tool's own output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from arch_sources import HEADER, net_source, rebuild
from conftest import arch_file, save_npz
from torch import nn


class _Half(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bias_shift_on_a_half_precision_program(cli, tmp_path, dtype):
    """A float16/bfloat16 .pt2, Linear -> ReLU: the gain of its bias is 1 up to the dtype's rounding.
    The gain check held it to float32's precision and refused ("a data-dependent op between them")."""
    torch.manual_seed(0)
    net = _Half()
    with torch.no_grad():
        net.fc1.bias[[1, 3]] = -50.0
    net = net.to(dtype).eval()
    program = torch.export.export(
        net, (torch.zeros(4, 6, dtype=dtype),), dynamic_shapes=({0: torch.export.Dim("b")},)
    )
    torch.export.save(program, tmp_path / "m.pt2")
    x = np.random.default_rng(0).standard_normal((64, 6)).astype(np.float32)
    data = save_npz(tmp_path / "x.npz", input=x)
    out = tmp_path / "out.pt2"
    result = cli("fix", tmp_path / "m.pt2", "--data", data, "--strategy", "bias-shift", "--output", out)
    assert result.code == 0, result.out + result.err
    state = dict(torch.export.load(str(out)).state_dict)
    before = net.state_dict()
    changed = {k: (before[k] != state[k]).reshape(-1).nonzero().reshape(-1).tolist() for k in before}
    assert {k: v for k, v in changed.items() if v} == {"fc1.bias": [1, 3]}
    with torch.no_grad():  # the pre-activations in the model's own dtype, before and after
        xt = torch.from_numpy(x).to(dtype)
        pre_before = F.linear(xt, before["fc1.weight"], before["fc1.bias"])
        pre_after = F.linear(xt, state["fc1.weight"], state["fc1.bias"])
    assert not (pre_before[:, [1, 3]] > 0).any()
    fired = (pre_after[:, [1, 3]] > 0).sum(0)
    assert (fired >= 1).all() and (fired <= 8).all(), fired
    assert torch.equal(pre_before[:, [0, 2, 4, 5, 6, 7]], pre_after[:, [0, 2, 4, 5, 6, 7]])


def test_onnx_bias_shift_quantiles_count_the_kept_positions_only(cli, tmp_path):
    """An ONNX token model scanned with its attention_mask: bias-shift's quantile came from every
    position, padding included, so a unit dead on real tokens but firing on padding was lowered (and
    the others moved by padding's values). Now it is over the kept positions, as the scan counts: each
    shifted unit fires on about --target-rate of the real tokens. Truth: onnxruntime on the written
    graph with the Relu inputs exposed, the mask applied in numpy."""
    import onnx
    from onnx_graphs import token_sites
    from truth import onnx_relu_io

    vocab = 300  # few repeated tokens: the quantile falls between distinct values
    model = token_sites(mask_input=True, vocab=vocab, pad=1)
    onnx.save(model, tmp_path / "m.onnx")
    rng = np.random.default_rng(5)
    ids = rng.integers(2, vocab, (40, 9))
    mask = np.zeros((40, 9), np.int64)
    for i, length in enumerate(rng.integers(3, 10, 40)):
        mask[i, :length] = 1
    ids[mask == 0] = 1
    data = save_npz(tmp_path / "tok.npz", input_ids=ids, attention_mask=mask)
    out = tmp_path / "fixed.onnx"
    sites = ["rows_relu", "conv_relu"]  # nothing shifted upstream of them
    args = ["--layers", sites[0], "--layers", sites[1], "--output", out]
    result = cli("fix", tmp_path / "m.onnx", "--data", data, "--strategy", "bias-shift", *args)
    assert result.code == 0, result.out + result.err
    feeds = {"input_ids": ids, "attention_mask": mask}
    kept = mask.astype(bool)

    def real(graph):
        io = onnx_relu_io(graph, feeds, sites)
        return {
            "rows_relu": io["rows_relu"].pre[kept],
            "conv_relu": np.moveaxis(io["conv_relu"].pre, 1, -1)[kept],
        }

    before, after = real(model), real(onnx.load(out))
    n = int(kept.sum())
    for name in sites:
        dead = np.flatnonzero((before[name] <= 0).all(0))
        assert dead.size, name
        fired = (after[name][:, dead] > 0).sum(0)
        assert ((fired >= 1) & (fired <= 2 * 0.01 * n + 2)).all(), (name, fired)


TOKENS = HEADER + net_source(
    "self.emb, self.fc1, self.fc2 = nn.Embedding(20, 6), nn.Linear(6, 8), nn.Linear(8, 2)",
    "return self.fc2(F.relu(self.fc1(self.emb(input_ids))))",
    seed=0,
    plant="_plant(net.fc1, [1, 3])",
    args="input_ids, attention_mask=None",
)


def test_reinit_with_a_batch_of_padding_only(cli, tmp_path):
    """reinit's pass after the redraw read each unit's max over the batch's kept positions: a batch of
    padding only keeps none, and amax() on nothing failed the fix ("the model failed on the first
    batch … check that --data fits", exit 2). Truth: plain torch on the written state dict, real tokens."""
    model, spec = arch_file(tmp_path / "arch.py", TOKENS)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    rng = np.random.default_rng(0)
    ids, mask = rng.integers(2, 20, (8, 5)), np.ones((8, 5), np.int64)
    ids[:2], mask[:2] = 0, 0  # the first batch: padding only
    mask[5, 3:] = 0
    data = save_npz(tmp_path / "tok.npz", input_ids=ids, attention_mask=mask)
    out = tmp_path / "out.pt"
    args = ["--strategy", "reinit", "--batch-size", "2", "--output", out]
    result = cli("fix", tmp_path / "m.pt", "--arch", spec, "--data", data, *args)
    assert result.code == 0, result.out + result.err
    fixed = rebuild(spec).eval()
    fixed.load_state_dict(torch.load(out, weights_only=True))
    kept = torch.from_numpy(mask).bool()
    with torch.no_grad():
        pre = fixed.fc1(fixed.emb(torch.from_numpy(ids)))[kept]
        old = model.fc1(model.emb(torch.from_numpy(ids)))[kept]
    assert not (old[:, [1, 3]] > 0).any()
    assert ((pre[:, [1, 3]] > 0).sum(0) >= 1).all()
    assert torch.equal(pre[:, [0, 2, 4, 5, 6, 7]], old[:, [0, 2, 4, 5, 6, 7]])


def test_bias_shift_when_the_first_samples_are_padding_only(cli, tmp_path):
    """bias-shift measures each bias's gain on the first 16 samples: when a position mask keeps none of
    their positions, median() of nothing crashed the fix (internal error). Now it reads every sample.
    Truth: plain torch on the written state dict, over the real tokens."""
    source = TOKENS.replace("nn.Embedding(20", "nn.Embedding(200")  # few repeated tokens
    model, spec = arch_file(tmp_path / "arch.py", source)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    rng = np.random.default_rng(1)
    ids, mask = rng.integers(2, 200, (24, 5)), np.ones((24, 5), np.int64)
    ids[:16], mask[:16] = 0, 0
    data = save_npz(tmp_path / "tok.npz", input_ids=ids, attention_mask=mask)
    out = tmp_path / "out.pt"
    result = cli(
        "fix", tmp_path / "m.pt", "--arch", spec, "--data", data, "--strategy", "bias-shift", "--output", out
    )
    assert result.code == 0, result.out + result.err
    state = torch.load(out, weights_only=True)
    changed = {
        k: (v != state[k]).reshape(-1).nonzero().reshape(-1).tolist() for k, v in model.state_dict().items()
    }
    assert {k: v for k, v in changed.items() if v} == {"fc1.bias": [1, 3]}
    fixed = rebuild(spec).eval()
    fixed.load_state_dict(state)
    kept = torch.from_numpy(mask).bool()
    with torch.no_grad():
        pre = fixed.fc1(fixed.emb(torch.from_numpy(ids)))[kept]
    fired = (pre[:, [1, 3]] > 0).sum(0)
    assert ((fired >= 1) & (fired <= 2 * 0.01 * len(pre) + 2)).all(), fired
