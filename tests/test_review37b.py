"""Review of the ONNX weight release (mem37) and the output guard's model companions (hostile40).

* onnxruntime maps a released weight from the model file and reads it there on every run: a file
  written over in place mid-scan must be an error, never later batches counted on other weights;
* the output guard does not parse every weight of an ONNX model without external data just because an
  output (a report from the last run) already exists beside it.
Truth: numpy forward passes on the weights the test wrote; onnx's own loader for the external files.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from deadrelu_cli import scan
from deadrelu_cli.backends.onnx import scan as onnx_scan
from deadrelu_cli.errors import UserError

UNITS = 16384  # 64 KiB of float32: released at the real threshold (loaders.onnx_model.RELEASE_MIN_BYTES)


def _add_relu(weight: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["pre"], name="add"), helper.make_node("Relu", ["pre"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", weight.size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", weight.size])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_model_file_written_over_in_place_mid_scan_is_an_error(tmp_path, monkeypatch):
    """An Add's operand is not prepacked: onnxruntime reads it from its map of the file on every run. The
    file written over in place (same inode, same size) after the first batch: before, the later batches
    ran on the new weights and the report mixed two models (dead units counted as firing)."""
    weight = np.where(np.arange(UNITS) < UNITS // 2, -100.0, 0.0).astype(np.float32)
    path = tmp_path / "m.onnx"
    onnx.save(_add_relu(weight), str(path))
    x = np.random.default_rng(0).standard_normal((8, UNITS)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    offset = path.read_bytes().find(weight.tobytes())
    assert offset > 0
    consider = onnx_scan._OutputMaxSwitch.consider
    written = []

    def writing_consider(self, *args):
        if not written:  # after the first batch: every unit would fire from now on
            with open(path, "r+b") as handle:
                handle.seek(offset)
                handle.write(np.full(UNITS, 100.0, np.float32).tobytes())
            written.append(True)
        consider(self, *args)

    monkeypatch.setattr(onnx_scan._OutputMaxSwitch, "consider", writing_consider)
    try:
        report = scan(str(path), str(tmp_path / "x.npy"), batch_size=2, device="cpu")
    except UserError as exc:
        assert "the model file changed while deadrelu read it" in str(exc)
        return
    assert written
    # not an error: then the counts must be the loaded model's
    np.testing.assert_array_equal(report.layers[0].positive_counts, ((x + weight) > 0).sum(0))


def test_the_guard_parses_no_onnx_model_without_external_data(tmp_path, monkeypatch):
    """A report from the last run beside the model: the guard looks for the model's external data files
    without parsing its weights when the file names none (the key "location" is not in its bytes); with
    external data it still finds the file onnx itself reads."""
    from deadrelu_cli.loaders import companions

    weight = np.linspace(-1, 1, UNITS, dtype=np.float32)
    plain, external = tmp_path / "plain", tmp_path / "external"
    plain.mkdir()
    external.mkdir()
    onnx.save(_add_relu(weight), str(plain / "m.onnx"))
    onnx.save(_add_relu(weight), str(external / "m.onnx"), save_as_external_data=True, location="w.bin")
    parsed = []
    load = onnx.load

    def counting_load(*args, **kwargs):
        parsed.append(args[0])
        return load(*args, **kwargs)

    monkeypatch.setattr(onnx, "load", counting_load)
    for folder in (plain, external):
        (folder / "report.json").write_text("{}")
    outputs = [("--json", str(plain / "report.json"))]
    assert companions.model_companions(plain / "m.onnx", outputs) == []
    assert parsed == []
    outputs = [("--json", str(external / "report.json"))]
    found = companions.model_companions(external / "m.onnx", outputs)
    truth = load(str(external / "m.onnx"), load_external_data=False)  # onnx names the file
    location = {e.key: e.value for e in truth.graph.initializer[0].external_data}["location"]
    assert [path for label, path in found if "external" in label] == [external / location]


def test_explain_never_restores_weights_written_over_after_the_scan(tmp_path, monkeypatch):
    """The report's sha256 is read in the background: written over in place after the last batch, the
    hash may be of the new bytes. --explain then must refuse, not put the new weights into the graph the
    scan counted (the small tensors are the old file's)."""
    import hashlib

    from deadrelu_cli.loaders import onnx_model

    weight = np.where(np.arange(UNITS) < UNITS // 2, -100.0, 0.0).astype(np.float32)
    path = tmp_path / "m.onnx"
    onnx.save(_add_relu(weight), str(path))
    x = np.random.default_rng(0).standard_normal((4, UNITS)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    offset = path.read_bytes().find(weight.tobytes())
    restore = onnx_model.restore_weights
    restored = []

    def write_then_restore(loaded):
        if "released" in loaded.extra:
            with open(path, "r+b") as handle:
                handle.seek(offset)
                handle.write(np.full(UNITS, 100.0, np.float32).tobytes())
            loaded.digest = hashlib.sha256(path.read_bytes()).hexdigest()  # the background hash, read late
        restore(loaded)
        restored.extend(numpy_helper.to_array(i) for i in loaded.runnable.graph.initializer if i.name == "w")

    monkeypatch.setattr(onnx_model, "restore_weights", write_then_restore)
    try:
        scan(str(path), str(tmp_path / "x.npy"), batch_size=2, device="cpu", explain=True)
    except UserError as exc:
        assert "the model file changed while deadrelu read it" in str(exc)
        return
    assert restored
    np.testing.assert_array_equal(restored[0], weight)
