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
