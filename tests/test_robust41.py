"""Hostile and changing files (helper robust41).

* an ONNX model file cut short in place mid-scan (an exporter's `open(path, "wb")`): onnxruntime mapped
  the released weights from it and the scan died with SIGBUS (exit 135, no message);
Truth: numpy on the weights and data the test wrote.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
UNITS = 16384  # 64 KiB of float32: released at the real threshold (loaders.onnx_model.RELEASE_MIN_BYTES)

# The scan's own process, with a hook after each batch: the model file is cut short in place (its inode
# kept, as `open(path, "wb")` does) after the first batch. In a child: SIGBUS would end the test run.
_TRUNCATING = """
import sys
from deadrelu_cli.backends.onnx import scan as onnx_scan
from deadrelu_cli.cli.app import main
consider = onnx_scan._OutputMaxSwitch.consider
def truncating(self, *args):
    with open(sys.argv[1], "r+b") as handle:
        handle.truncate(64)
    consider(self, *args)
onnx_scan._OutputMaxSwitch.consider = truncating
main(["scan", sys.argv[1], "--data", sys.argv[2], "--batch-size", "2", "--json", sys.argv[3], "-q"])
"""


def test_an_onnx_model_cut_short_mid_scan_is_no_crash(tmp_path):
    """An Add's operand is not prepacked: onnxruntime reads it on every run from where it got it. Before,
    that was its map of the model file, and the page past the new end faulted: SIGBUS. Now the exit is 0
    with the loaded model's counts (or 2 with one line), and the scan's private copy is gone after."""
    weight = np.where(np.arange(UNITS) < UNITS // 2, -100.0, 0.0).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["pre"], name="add"), helper.make_node("Relu", ["pre"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", UNITS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", UNITS])],
        [numpy_helper.from_array(weight, "w")],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = np.random.default_rng(0).standard_normal((8, UNITS)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(temp)}
    args = [str(path), str(tmp_path / "x.npy"), str(tmp_path / "r.json")]
    done = subprocess.run(
        [sys.executable, "-c", _TRUNCATING, *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert path.stat().st_size == 64  # the hook ran
    assert done.returncode in (0, 2), (done.returncode, done.stderr)
    if done.returncode == 2:
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    else:
        from deadrelu_cli.report.model import load_report

        report = load_report(str(tmp_path / "r.json"))
        np.testing.assert_array_equal(report.layers[0].positive_counts, ((x + weight) > 0).sum(0))
    assert list(temp.iterdir()) == []  # the private copy of the weights removed


def _relu_model(path: Path, width: int) -> Path:
    """x [n, width] -> Relu(x + b), b = -0.5 on the first half of the units."""
    bias = np.where(np.arange(width) < width // 2, -0.5, 0.0).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["pre"]), helper.make_node("Relu", ["pre"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])],
        [numpy_helper.from_array(bias, "b")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_a_deflate_bomb_of_samples_is_refused_up_front(cli, tmp_path):
    """72 MB of zeros deflate to ~70 KB: 4.5 million samples a scan would run one by one (before: as long
    as real ones). Refused in one line that says how to pass real data; the same data uncompressed
    (np.savez) is scanned, and so is a small compressed file, whatever its ratio."""
    model = _relu_model(tmp_path / "m.onnx", 4)
    bomb = tmp_path / "bomb.npz"
    np.savez_compressed(bomb, x=np.zeros((4_500_000, 4), np.float32))
    assert bomb.stat().st_size < 200_000
    result = cli("scan", model, "--data", bomb, "--limit", "8", "-q")
    assert result.code == 2, result.err
    assert result.err.count("\n") == 1 and "zip bomb" in result.err and "np.savez" in result.err
    small = tmp_path / "small.npz"
    x = np.zeros((1000, 4), np.float32)
    x[::7] = 1.0
    np.savez_compressed(small, x=x)
    result = cli("scan", model, "--data", small, "--json", "-", "-q")
    assert result.code == 0, result.err
    counts = result.json()["layers"][0]["positive_counts"]
    np.testing.assert_array_equal(counts, (x + np.array([-0.5, -0.5, 0, 0], np.float32) > 0).sum(0))


def test_a_bomb_split_over_a_glob_is_refused_as_a_whole(cli, tmp_path, monkeypatch):
    """Each file below the size floor, the glob above it: judged together."""
    from deadrelu_cli import calibration

    monkeypatch.setattr(calibration, "MIN_NPZ_REFUSED", 3 << 20)
    model = _relu_model(tmp_path / "m.onnx", 4)
    for k in range(4):
        np.savez_compressed(tmp_path / f"part{k}.npz", x=np.zeros((2 << 17, 4), np.float32))  # 1 MiB each
    result = cli("scan", model, "--data", tmp_path / "part*.npz", "-q")
    assert result.code == 2 and "zip bomb" in result.err and result.err.count("\n") == 1, result.err
    data = tmp_path / "data"
    data.mkdir()
    for k in range(4):
        (tmp_path / f"part{k}.npz").rename(data / f"part{k}.npz")
    result = cli("scan", model, "--data", data, "-q")
    assert result.code == 2 and "zip bomb" in result.err, result.err
