"""ONNX scans hold the graph without its large weights (loaders.onnx_model.release_weights): onnxruntime
reads them from the model file, --explain / --certify / fix get them back from the file, verified by hash.
Counts checked against onnxruntime + numpy on the plain model; spans against onnx's own tensor values."""

from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deadrelu_cli import scan
from deadrelu_cli.backends.onnx import scan as onnx_scan
from deadrelu_cli.loaders import onnx_model
from tests.test_onnx_output_max import _data, _forced_switch, planted_model, pre_activations, truth

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture
def release_all(monkeypatch):
    """Every initializer released (the planted model's are far below the 64 KiB of real use); records
    what each scan released and that the graph it held then had none of those bytes."""
    monkeypatch.setattr(onnx_model, "RELEASE_MIN_BYTES", 1)
    seen: list[dict] = []
    release = onnx_model.release_weights

    def recording(loaded):
        done = release(loaded)
        held = {i.name: i.HasField("raw_data") for i in loaded.runnable.graph.initializer}
        seen.append({"released": dict(loaded.extra.get("released", {})), "held": held, "loaded": loaded})
        return done

    monkeypatch.setattr(onnx_scan, "release_weights", recording)
    return seen


def _save(model, tmp_path, x):
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    np.save(tmp_path / "x.npy", x)
    return path


@pytest.mark.parametrize("nan", [False, True])
def test_released_weights_give_the_exact_counts_through_switches(tmp_path, monkeypatch, release_all, nan):
    model = planted_model()
    x = _data(nan)
    path = _save(model, tmp_path, x)
    switches = _forced_switch(monkeypatch)
    report = scan(str(path), str(tmp_path / "x.npy"), batch_size=4, device="cpu", allow_nonfinite=True)
    assert release_all and set(release_all[0]["released"]) == {"wa", "ba", "wb", "bb", "wc", "bc"}
    assert not any(release_all[0]["held"].values())  # no weight byte in the graph the scan held
    assert switches  # the rebuilt session read them from the file too
    layers = {layer.name: layer for layer in report.layers}
    for site, (positives, maxima, positions) in truth(model, x).items():
        np.testing.assert_array_equal(layers[site].positive_counts, positives, err_msg=site)
        np.testing.assert_allclose(layers[site].max_preactivation, maxima, rtol=1e-6, atol=1e-7, err_msg=site)
        assert layers[site].elements_per_unit == positions


def test_explain_reads_the_weights_back(tmp_path, monkeypatch, release_all):
    """--explain after a scan that released every weight: the graph has the file's weights again (as onnx
    reads them from the original model), the minimum pre-activation is exact, and C's dead unit 2, whose
    weight column is all zero, reads no upstream unit: "starved" (docs/causes.md)."""
    model = planted_model()
    x = _data(False)
    path = _save(model, tmp_path, x)
    report = scan(str(path), str(tmp_path / "x.npy"), batch_size=4, device="cpu", explain=True)
    assert release_all[0]["released"]
    restored = {i.name: i for i in release_all[0]["loaded"].runnable.graph.initializer}
    for init in model.graph.initializer:
        assert restored[init.name].data_location == TensorProto.DEFAULT
        np.testing.assert_array_equal(numpy_helper.to_array(restored[init.name]), numpy_helper.to_array(init))
    layers = {layer.name: layer for layer in report.layers}
    np.testing.assert_allclose(
        layers["reluA"].min_preactivation, pre_activations(model, x)["reluA"].min(0), rtol=1e-6
    )
    assert layers["reluC"].extra.get("causes") == {"2": "starved"}


def test_raw_data_spans_point_at_each_tensors_bytes(tmp_path):
    """Offsets read off the wire format hold exactly each initializer's bytes as onnx decodes them; a
    tensor kept in float_data (no raw bytes), a name two initializers share, and a file whose graph field
    protobuf would merge from two parts are left out."""
    model = planted_model()
    model.graph.initializer.append(helper.make_tensor("typed", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]))
    twice = numpy_helper.from_array(np.arange(4, dtype=np.float32), "dup")
    model.graph.initializer.extend([twice, numpy_helper.from_array(np.ones(4, np.float32), "dup")])
    raw = model.SerializeToString()
    parsed = onnx.load_from_string(raw)
    spans = onnx_model.raw_data_spans(raw, parsed, 0)
    assert set(spans) == {"wa", "ba", "wb", "bb", "wc", "bc"}
    for init in parsed.graph.initializer:
        if init.name in spans:
            offset, length = spans[init.name]
            assert raw[offset : offset + length] == numpy_helper.to_array(init).tobytes(), init.name
    extra = onnx.ModelProto()
    extra.graph.initializer.append(numpy_helper.from_array(np.zeros(2, np.float32), "late"))
    merged = raw + extra.SerializeToString()  # protobuf merges the two graph fields into one
    assert onnx_model.raw_data_spans(merged, onnx.load_from_string(merged), 0) == {}
    assert onnx_model.raw_data_spans(b"\x3a\xff\xff", parsed, 0) == {}  # a length past the end


def _replaced_by_another_model(path):
    """Write over PATH a model whose B units are all dead (a new file renamed over it)."""
    other = planted_model()
    bias = next(i for i in other.graph.initializer if i.name == "bb")
    bias.CopyFrom(numpy_helper.from_array(np.full(6, -1e6, np.float32), "bb"))
    onnx.save(other, str(path.with_name("other.onnx")))
    os.replace(path.with_name("other.onnx"), path)


def test_a_file_replaced_mid_scan_changes_nothing(tmp_path, monkeypatch, release_all):
    """Replaced by another model (B's units all dead) after the first batch: the rebuilt sessions and
    --explain read the weights from the scan's private copy of the bytes it loaded, so the counts, the
    minima and the report's hash are the loaded model's — never a mix of two models."""
    import hashlib

    model = planted_model()
    x = _data(False)
    path = _save(model, tmp_path, x)
    loaded_hash = hashlib.sha256(path.read_bytes()).hexdigest()
    switches = _forced_switch(monkeypatch)
    consider = onnx_scan._OutputMaxSwitch.consider

    def replacing_consider(self, *args):
        if hashlib.sha256(path.read_bytes()).hexdigest() == loaded_hash:
            _replaced_by_another_model(path)
        consider(self, *args)

    monkeypatch.setattr(onnx_scan._OutputMaxSwitch, "consider", replacing_consider)
    report = scan(str(path), str(tmp_path / "x.npy"), batch_size=4, device="cpu")
    assert switches  # sessions built after the replacement
    assert report.model.sha256 == loaded_hash
    layers = {layer.name: layer for layer in report.layers}
    for site, (positives, _, positions) in truth(model, x).items():
        np.testing.assert_array_equal(layers[site].positive_counts, positives, err_msg=site)
        assert layers[site].elements_per_unit == positions
    onnx.save(model, str(path))  # and again with --explain, which needs the weights' values
    report = scan(str(path), str(tmp_path / "x.npy"), batch_size=4, device="cpu", explain=True)
    assert report.model.sha256 == loaded_hash
    layers = {layer.name: layer for layer in report.layers}
    minima = pre_activations(model, x)
    for site, (positives, _, _) in truth(model, x).items():
        np.testing.assert_array_equal(layers[site].positive_counts, positives, err_msg=site)
        np.testing.assert_allclose(layers[site].min_preactivation, minima[site].min(0), rtol=1e-6, atol=1e-7)


def test_a_file_replaced_before_the_session_reads_it_changes_nothing(tmp_path, monkeypatch, release_all):
    model = planted_model()
    x = _data(False)
    path = _save(model, tmp_path, x)
    make_session = onnx_scan.make_session

    def replace_then_make(*args, **kwargs):
        _replaced_by_another_model(path)
        return make_session(*args, **kwargs)

    monkeypatch.setattr(onnx_scan, "make_session", replace_then_make)
    report = scan(str(path), str(tmp_path / "x.npy"), batch_size=4, device="cpu")
    layers = {layer.name: layer for layer in report.layers}
    for site, (positives, _, _) in truth(model, x).items():
        np.testing.assert_array_equal(layers[site].positive_counts, positives, err_msg=site)


_PLAIN_ONNX = """
import sys
import numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
x, batch = np.load(sys.argv[2]), int(sys.argv[3])
for i in range(0, len(x), batch):
    session.run(None, {"x": x[i : i + batch]})
"""


@pytest.mark.slow
def test_weight_heavy_onnx_scan_stays_within_1_5x_of_plain_inference(tmp_path):
    """An MLP whose weights (80 MB) dwarf its activations: the scan's peak RSS within 1.5x of plain
    onnxruntime at the same batch (2.5x when the scan held the parsed weights, its session's model bytes
    and onnxruntime's copy at once)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from peak_rss import peak_rss_kib
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    rng = np.random.default_rng(0)
    widths = [1024, 4096, 4096, 16]
    nodes, weights, previous = [], [], "x"
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:], strict=False)):
        w = (rng.standard_normal((n_in, n_out), dtype=np.float32) / np.sqrt(n_in)).astype(np.float32)
        weights += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(np.zeros(n_out, np.float32), f"b{i}"),
        ]
        nodes.append(helper.make_node("Gemm", [previous, f"w{i}", f"b{i}"], [f"h{i}"], name=f"fc{i}"))
        previous = f"h{i}"
        if i < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [previous], [f"r{i}"], name=f"relu{i}"))
            previous = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, widths[0]])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, [None, widths[-1]])],
        weights,
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    np.save(tmp_path / "x.npy", rng.standard_normal((256, widths[0]), dtype=np.float32))
    (tmp_path / "plain.py").write_text(_PLAIN_ONNX)
    plain = [sys.executable, str(tmp_path / "plain.py"), str(path), str(tmp_path / "x.npy"), "64"]
    scanner = [sys.executable, "-m", "deadrelu_cli", "scan", str(path), "--data", str(tmp_path / "x.npy")]

    def median(command):  # one process's peak moves by a few percent with allocator timing
        return sorted(peak_rss_kib(command) for _ in range(3))[1]

    scan_peak, plain_peak = median([*scanner, "-b", "64", "-q"]), median(plain)
    assert scan_peak <= 1.5 * plain_peak, (scan_peak, plain_peak)
