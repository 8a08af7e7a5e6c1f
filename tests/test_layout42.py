"""layout42: flattened rows of a time-major tensor ([T, B, C] -> [T*B, C], `h.view(-1, C)` before a
Linear + ReLU) are masked as the rows they are, in every format; `fix`'s output change leaves padded
rows out. (A .pt2 with a static batch of as many samples as tokens, told the same way:
test_layout41's `…pt2_fixed_batch…`.)

Rows [B*T, C] have one shape whichever order they are in: the scan runs a batch once more with its
samples reversed and reads the order off what comes back reversed (eager: off the flatten it sees).
Truth: forward hooks and numpy in this file, counting only the kept positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import export_onnx, save_npz
from torch import nn

TOKENS, FEATURES, UNITS = 4, 3, 10


class FlatHead(nn.Module):
    """x [B, T, F] -> time-major [T, B, F] -> rows [T*B, F] (or [B*T, F]) -> Linear -> ReLU -> Linear."""

    def __init__(self, time_major: bool = True, flat_output: bool = False) -> None:
        super().__init__()
        torch.manual_seed(42)
        self.fc = nn.Linear(FEATURES, UNITS)
        self.out = nn.Linear(UNITS, 2)
        self.time_major, self.flat_output = time_major, flat_output

    def forward(self, x, attention_mask=None):
        h = x.transpose(0, 1) if self.time_major else x
        y = self.out(torch.relu(self.fc(h.reshape(-1, h.shape[-1]))))
        return y if self.flat_output else y.view(h.shape[0], h.shape[1], 2)


def _data(seed: int, samples: int, pad: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(seed)
    x = rng.randn(samples, TOKENS, FEATURES).astype(np.float32)
    lengths = np.concatenate([[TOKENS], rng.randint(1, TOKENS, samples - 1)])
    keep = np.arange(TOKENS)[None, :] < lengths[:, None]
    x[~keep] = pad  # junk at the padding: counted there, it changes the counts
    return x, keep


def _truth(model: FlatHead, x: np.ndarray, keep: np.ndarray) -> tuple[list[int], int]:
    """(positive counts, kept positions) of relu(fc(rows)) over the kept positions, from a hook on fc."""
    captured = []
    hook = model.fc.register_forward_hook(lambda m, a, out: captured.append(out.detach().double().numpy()))
    with torch.no_grad():
        model(torch.from_numpy(x))
    hook.remove()
    rows = captured[0]
    grid = (
        rows.reshape(TOKENS, len(x), UNITS).transpose(1, 0, 2)
        if model.time_major
        else rows.reshape(len(x), TOKENS, UNITS)
    )
    kept = grid[keep]
    return (kept > 0).sum(0).tolist(), kept.shape[0]


def _save(model: FlatHead, fmt: str, path, example: np.ndarray, static: bool = False):
    example_t = torch.from_numpy(example)
    if fmt == "ts":
        torch.jit.save(torch.jit.trace(model, example_t), path)
    elif fmt == "pt2":
        dynamic = None if static else ({0: torch.export.Dim("b", min=2, max=64)},)
        torch.export.save(torch.export.export(model, (example_t,), dynamic_shapes=dynamic), path)
    else:
        export_onnx(model, example_t, path)
    return path


@pytest.mark.parametrize("fmt", ["ts", "pt2", "onnx"])
def test_time_major_rows_are_masked_as_time_major_in_every_format(cli, tmp_path, fmt):
    """[T*B, C] rows of a time-major tensor: the kept positions' counts exactly, at batch sizes 2 and 3
    alike. Before: read as sample-major rows (other positions than the real tokens counted), `applied`."""
    model = FlatHead().eval()
    x, keep = _data(0, 7)
    positive, kept = _truth(model, x, keep)
    path = _save(model, fmt, tmp_path / f"m.{fmt}", x[:3])
    data = save_npz(tmp_path / "d.npz", x=x, attention_mask=keep.astype(np.int64))
    for size in ("2", "3"):
        result = cli(
            "scan", path, "--trust-pickle", "--data", data, "--json", "-", "-q", "--batch-size", size
        )
        assert result.code == 0, result.err
        (layer,) = [lay for lay in result.json()["layers"] if len(lay["positive_counts"]) == UNITS]
        assert layer["positive_counts"] == positive, (size, layer["positive_counts"], positive)
        assert layer["elements_per_unit"] == kept
        assert layer["extra"]["position_mask"] == "applied"


@pytest.mark.parametrize("time_major", [True, False])
def test_watch_reads_the_row_order_off_the_flatten_it_sees(time_major):
    """watch() (eager, no reordering): the view of a [T, B, F] (or [B, T, F]) tensor into rows says their
    order; counts exact over steps of 3, 5 and 2 samples. Before: time-major rows read sample-major."""
    from deadrelu_cli import watch

    model = FlatHead(time_major)
    batches = [_data(seed, n) for seed, n in ((1, 3), (2, 5), (3, 2))]
    w = watch(model, every=1, window=len(batches), config=False)
    for x, keep in batches:
        w.step()
        model(torch.from_numpy(x), attention_mask=torch.from_numpy(keep.astype(np.int64)))
    w.close()
    truths = [_truth(model, x, keep) for x, keep in batches]
    layer = w.last.layer("relu()")
    assert layer.positive_counts.tolist() == np.sum([t[0] for t in truths], axis=0).tolist()
    assert layer.elements_per_unit == sum(t[1] for t in truths)
    assert layer.extra["position_mask"] == "applied"


def test_rows_of_one_vector_everywhere_count_every_position_say_so_and_gate(cli, tmp_path):
    """One vector at every position of every sample (reordering the samples changes no row) in a
    TorchScript model: the rows' order cannot be told, so every position counts (numpy's count over all
    rows), the layer is marked `row order ambiguous`, a note says so, and a gate fails unless
    --allow-unseen. (Identical samples alone still tell it: rows differ by position.)"""
    model = FlatHead().eval()
    x, keep = _data(4, 4)
    x[:] = x[0, 0]
    path = _save(model, "ts", tmp_path / "m.ts", x[:2])
    data = save_npz(tmp_path / "d.npz", x=x, attention_mask=keep.astype(np.int64))
    with torch.no_grad():
        rows = model.fc(torch.from_numpy(x).transpose(0, 1).reshape(-1, FEATURES)).double().numpy()
    result = cli("scan", path, "--trust-pickle", "--data", data, "--json", "-", "-q", "--batch-size", "2")
    assert result.code == 0, result.err
    report = result.json()
    (layer,) = report["layers"]
    assert layer["positive_counts"] == (rows > 0).sum(0).tolist()
    assert layer["elements_per_unit"] == 4 * TOKENS
    assert layer["extra"]["position_mask"] == "row order ambiguous"
    assert any("relu()" in n and "flattened" in n for n in report["notes"]), report["notes"]
    gated = cli(
        "scan", path, "--trust-pickle", "--data", data, "-q", "--batch-size", "2", "--max-dead", "1.0"
    )
    assert gated.code == 1 and "relu()" in gated.err, gated.err


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_fix_output_change_leaves_out_padded_rows_of_a_flat_output(cli, tmp_path, fmt):
    """The model returns rows [T*B, 2]; unit 0 is dead on real tokens and far below zero at the padding,
    so leaky's change is largest there. The reported max |Δ| is the kept rows' (numpy on the outputs
    of the original and the written model), not the padding's. Before: the padding's, 10x larger."""
    model = FlatHead(flat_output=True).eval()
    with torch.no_grad():
        model.fc.weight[0] = torch.tensor([1.0, 1.0, 1.0])
        model.fc.bias[0] = -20.0  # dead on real tokens (|x| < ~5)
    x, keep = _data(6, 6, pad=-60.0)  # pre -200 at the padding
    path = _save(model, fmt, tmp_path / f"m.{fmt}", x[:3])
    data = save_npz(tmp_path / "d.npz", x=x, attention_mask=keep.astype(np.int64))
    out = tmp_path / f"f.{fmt}"
    result = cli("fix", path, "--trust-pickle", "--data", data, "-s", "leaky", "-o", out, "--json", "-",
                 "--batch-size", "3")  # fmt: skip
    assert result.code == 0, result.err

    def rows_of(run) -> np.ndarray:  # [samples, T, 2] from the [T*B, 2] rows of batches of 3
        return np.concatenate([run(x[i : i + 3]).reshape(TOKENS, -1, 2).transpose(1, 0, 2) for i in (0, 3)])

    with torch.no_grad():
        before = rows_of(lambda b: model(torch.from_numpy(b)).double().numpy())
    if fmt == "pt2":
        fixed = torch.export.load(out).module()
        with torch.no_grad():
            after = rows_of(lambda b: fixed(torch.from_numpy(b)).double().numpy())
    else:
        import onnxruntime as ort

        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        after = rows_of(lambda b: session.run(None, {"x": b})[0].astype(np.float64))
    change = np.abs(after - before)
    assert change.max() > 5 * change[keep].max()  # the padding's change would dominate
    np.testing.assert_allclose(result.json()["max_abs_diff"], change[keep].max(), rtol=1e-4)


def test_onnx_bias_shift_reads_the_kept_rows_of_time_major_rows(cli, tmp_path):
    """bias-shift on an ONNX graph whose ReLU runs on [T*B, C] rows of a time-major tensor: the move is
    computed on the kept rows (told by reordering the samples, as the scan tells them), so the fixed unit
    fires on --target-rate of the real tokens (numpy on the written bias and the data). Before: the
    rows of sample-major positions were read, padding (pre-activation -200) among them."""
    import onnx
    from onnx import numpy_helper

    model = FlatHead().eval()
    with torch.no_grad():
        model.fc.weight[0] = torch.tensor([1.0, 1.0, 1.0])
        model.fc.bias[0] = -20.0  # dead on real tokens
    x, keep = _data(8, 6, pad=-60.0)
    path = _save(model, "onnx", tmp_path / "m.onnx", x[:3])
    data = save_npz(tmp_path / "d.npz", x=x, attention_mask=keep.astype(np.int64))
    out = tmp_path / "f.onnx"
    result = cli("fix", path, "--data", data, "-s", "bias-shift", "--target-rate", "0.5", "-o", out,
                 "--json", "-", "--batch-size", "3", "--layers", "*")  # fmt: skip
    assert result.code == 0, result.err
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    bias = stored["fc.bias"]
    pre = x[keep] @ model.fc.weight.detach().numpy()[0] + bias[0]
    assert 0.4 <= float(np.mean(pre > 0)) <= 0.6, (bias[0], np.sort(pre))


def test_reordering_tells_row_order_beside_a_large_shared_offset():
    """probe.ops.reordered_order on rows built in numpy: each row's sum of |x| is 30000 (a large bias every
    row shares, as a tiny OPT's FFN has) plus a small part of its own. The reversed batch's rows, laid out
    sample-major or time-major, are told apart by the rows' spread, not their size; rows that are all one
    value tell nothing (None)."""
    from deadrelu_cli.probe.ops import reordered_order

    batch, tokens = 3, 5
    own = np.random.RandomState(0).rand(batch, tokens)  # [sample, position]
    flipped = own[::-1]
    sample_major = (30000 + own.reshape(-1), 30000 + flipped.reshape(-1))
    time_major = (30000 + own.T.reshape(-1), 30000 + flipped.T.reshape(-1))
    assert reordered_order(True, batch, tokens, (sample_major[0],), (sample_major[1],)) is False
    assert reordered_order(True, batch, tokens, (time_major[0],), (time_major[1],)) is True
    same = np.full(batch * tokens, 30000.0)
    assert reordered_order(True, batch, tokens, (same,), (same,)) is None
