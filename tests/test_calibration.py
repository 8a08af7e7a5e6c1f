"""Calibration data: every format streams the same batches; bad data gives one clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import arch, save_npz, save_state_dict
from safetensors.numpy import save_file

from deadrelu_cli import scan
from deadrelu_cli.calibration import NpyFileSource, NpzMemberSource, open_calibration
from deadrelu_cli.errors import UserError


@pytest.fixture
def x():
    return np.random.default_rng(3).standard_normal((37, 4)).astype(np.float32)


def _write_all(tmp_path, x):
    np.save(tmp_path / "d.npy", x)
    np.savez(tmp_path / "d.npz", input=x)
    np.savez_compressed(tmp_path / "dc.npz", input=x)
    torch.save(torch.from_numpy(x), tmp_path / "d.pt")
    torch.save({"input": torch.from_numpy(x)}, tmp_path / "dd.pt")
    save_file({"input": x}, str(tmp_path / "d.safetensors"))
    return ["d.npy", "d.npz", "dc.npz", "d.pt", "dd.pt", "d.safetensors"]


def test_every_data_format_gives_the_same_batches(tmp_path, x):
    for name in _write_all(tmp_path, x):
        data = open_calibration(str(tmp_path / name))
        assert data.samples == 37
        batches = list(data.batches(batch_size=10))
        assert [len(next(iter(b.values()))) for b in batches] == [10, 10, 10, 7]
        np.testing.assert_array_equal(
            np.concatenate([next(iter(b.values())) for b in batches]), x, err_msg=name
        )


def test_every_data_format_gives_the_same_report(tmp_path, x, planted_module):
    """Consistency (data-format invariance), anchored: every format's counts equal numpy's count of
    x @ W.T + b > 0 (tiny float32/float64 differences at 0 aside, there are none on this data)."""
    model = planted_module.eight_neuron()
    ckpt = save_state_dict(model, tmp_path / "m.pt")
    w, b = (p.detach().numpy().astype(np.float64) for p in (model.fc.weight, model.fc.bias))
    expected = ((x.reshape(len(x), -1).astype(np.float64) @ w.T + b) > 0).sum(0).tolist()
    counts = []
    for name in _write_all(tmp_path, x):
        report = scan(str(ckpt), str(tmp_path / name), arch=arch("eight_neuron"), device="cpu", batch_size=6)
        counts.append(report.layers[0].positive_counts.tolist())
    assert all(c == expected for c in counts), (counts, expected)


def test_npy_streams_rows_without_a_memory_map(tmp_path, x):
    # a memory map would add every page the scan touches to the process's resident memory
    np.save(tmp_path / "d.npy", x)
    source = open_calibration(str(tmp_path / "d.npy")).sources[0]
    assert isinstance(source, NpyFileSource)
    np.testing.assert_array_equal(source.rows(5, 9), x[5:9])
    np.testing.assert_array_equal(source.rows(0, 2), x[0:2])
    np.testing.assert_array_equal(source.whole(), x)


def test_fortran_order_npy_still_reads(tmp_path, x):
    np.save(tmp_path / "f.npy", np.asfortranarray(x))
    source = open_calibration(str(tmp_path / "f.npy")).sources[0]
    np.testing.assert_array_equal(source.rows(3, 7), x[3:7])


def test_truncated_npy_is_refused_before_reading(tmp_path, x):
    np.save(tmp_path / "d.npy", x)
    raw = (tmp_path / "d.npy").read_bytes()
    (tmp_path / "d.npy").write_bytes(raw[: len(raw) - 10])
    with pytest.raises(UserError, match="truncated"):
        open_calibration(str(tmp_path / "d.npy"))


def test_npz_member_streams_rows(tmp_path, x):
    np.savez_compressed(tmp_path / "d.npz", input=x)
    source = open_calibration(str(tmp_path / "d.npz")).sources[0]
    assert isinstance(source, NpzMemberSource)
    np.testing.assert_array_equal(source.rows(5, 9), x[5:9])
    np.testing.assert_array_equal(source.rows(2, 3), x[2:3])  # going back reopens the stream


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((0, 4), np.float32)}, "zero samples"),
        ({"x": np.array(["a", "b"])}, "expected numbers"),
        ({"x": np.zeros((3, 4)), "y": np.zeros((2, 4))}, "different sample counts"),
        ({"x": np.float32(1.0)}, "is a scalar"),
    ],
)
def test_bad_data(tmp_path, arrays, message):
    path = save_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserError, match=message):
        open_calibration(str(path))


def test_object_arrays_are_refused_without_unpickling(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match=r"holds Python objects \(never unpickled\)"):
        open_calibration(str(tmp_path / "obj.npy"))


def test_truncated_npz(tmp_path, x):
    np.savez(tmp_path / "d.npz", input=x)
    raw = (tmp_path / "d.npz").read_bytes()
    (tmp_path / "t.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError):
        data = open_calibration(str(tmp_path / "t.npz"))
        list(data.batches(8))


def test_inputs_matched_by_name(tmp_path, planted_module):
    model = planted_module.two_inputs().eval()
    rng = np.random.default_rng(0)
    image, extra = (
        rng.standard_normal((9, 3)).astype(np.float32),
        rng.standard_normal((9, 2)).astype(np.float32),
    )
    ckpt = save_state_dict(model, tmp_path / "m.pt")
    save_npz(tmp_path / "d.npz", extra=extra, image=image)  # not in forward order
    report = scan(str(ckpt), str(tmp_path / "d.npz"), arch=arch("two_inputs"), device="cpu")
    with torch.no_grad():
        pre = model.a(torch.from_numpy(image)) + model.b(torch.from_numpy(extra))
    np.testing.assert_array_equal(report.layers[0].positive_counts, (pre > 0).sum(0).numpy())
    assert report.layers[0].producer is None  # a sum of two Linears has no single bias
    save_npz(tmp_path / "bad.npz", foo=image, bar=extra)
    with pytest.raises(
        UserError,
        match=r"no array for model input\(s\) image, extra; the file holds foo\[9, 3\] float32, bar\[9, 2\] float32; the model's inputs are image.*extra",
    ):
        scan(str(ckpt), str(tmp_path / "bad.npz"), arch=arch("two_inputs"), device="cpu")


@pytest.mark.parametrize("name", ["corpus.txt", "docs.jsonl"])
def test_text_given_as_data_points_to_text(cli, tmp_path, name):
    """A text file passed to --data is named as such, with the option that takes text (it used to be
    read as a damaged safetensors header)."""
    from conftest import ROOT

    path = tmp_path / name
    path.write_text("the first document\nthe second one\n")
    result = cli("scan", ROOT / "sample_models" / "mlp" / "model.onnx", "--data", path)
    assert result.code == 2 and "--text FILE" in result.err and "not calibration data" in result.err
    assert len(result.err.strip().splitlines()) == 1
