"""ONNX sessions rebuilt mid-scan so that sites whose units have all fired read their max off the ReLU's
output: every count and every max pre-activation against onnxruntime running the plain model with the
pre-activations added as graph outputs (here, with onnx.helper) and numpy."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deadrelu_cli import scan
from deadrelu_cli.backends.onnx import scan as onnx_scan

PRE = {"reluA": "a", "reluB": "b", "reluC": "c"}  # site -> its pre-activation tensor


def planted_model() -> onnx.ModelProto:
    """A: grouped 3x3 conv, 6 units (unit 3 dead: zero weights, bias -1; unit 1 fires only on large
    inputs; units 4, 5 read input channel 2 only). B: per-unit 1x1 conv of A's output, every unit alive.
    C: a [N, 3] MatMul site after a pool (unit 2 dead, unit 1 fires only on large inputs)."""
    rng = np.random.default_rng(3)
    wa = rng.standard_normal((6, 1, 3, 3)).astype(np.float32)
    wa[1] = np.abs(wa[1])
    wa[3] = 0.0
    ba = np.array([0.0, -30.0, 0.1, -1.0, 0.0, -0.2], np.float32)
    wb = np.full((6, 1, 1, 1), 1.0, np.float32)
    bb = np.array([-0.1, 0.2, -0.1, 0.2, -0.1, -0.1], np.float32)
    wc = np.zeros((6, 3), np.float32)
    wc[:, 0] = 1.0
    wc[1, 1] = 1.0
    bc = np.array([0.0, -1.0, -1.0], np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], pads=[1, 1, 1, 1], group=3, name="convA"),
        helper.make_node("Relu", ["a"], ["ra"], name="reluA"),
        helper.make_node("Conv", ["ra", "wb", "bb"], ["b"], group=6, name="convB"),
        helper.make_node("Relu", ["b"], ["rb"], name="reluB"),
        helper.make_node("GlobalAveragePool", ["rb"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flat"),
        helper.make_node("MatMul", ["flat", "wc"], ["mm"], name="fc"),
        helper.make_node("Add", ["mm", "bc"], ["c"], name="fc_bias"),
        helper.make_node("Relu", ["c"], ["y"], name="reluC"),
    ]
    weights = [
        numpy_helper.from_array(v, k)
        for k, v in {"wa": wa, "ba": ba, "wb": wb, "bb": bb, "wc": wc, "bc": bc}.items()
    ]
    graph = helper.make_graph(
        nodes,
        "planted",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def pre_activations(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """Per site, its pre-activation as [positions, units], from the plain model with the pre-activations
    added as outputs, run by onnxruntime one sample at a time."""
    import onnxruntime as ort

    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    for name in PRE.values():
        exposed.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    runs = [session.run(list(PRE.values()), {"x": x[i : i + 1]}) for i in range(len(x))]
    out = {}
    for k, site in enumerate(PRE):
        pre = np.concatenate([r[k] for r in runs])
        out[site] = np.moveaxis(pre, 1, -1).reshape(-1, pre.shape[1])
    return out


def truth(model: onnx.ModelProto, x: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Counts, max pre-activation (over the finite values: the scans here pass --allow-nonfinite, which
    leaves NaN out) and positions per unit."""
    return {
        site: ((pre > 0).sum(0), np.where(np.isfinite(pre), pre, -np.inf).max(0), pre.shape[0])
        for site, pre in pre_activations(model, x).items()
    }


def _data(nan: bool) -> np.ndarray:
    x = np.random.default_rng(5).standard_normal((24, 3, 6, 6)).astype(np.float32)
    x[17] *= 40.0  # the only sample where A's unit 1 and C's unit 1 fire (batch 5 of 6 at batch size 4)
    if nan:
        x[9, 2, 0, 0] = np.nan  # reaches A's units 4, 5, B's units 4, 5 and C's units through the pool
    return x


@pytest.mark.parametrize(
    ("batch", "reverse", "nan"),
    [(4, False, False), (1, False, False), (4, True, False), (4, False, True), (1, True, True)],
)
def test_switched_sites_keep_exact_counts_and_maxima(
    tmp_path, monkeypatch, batch, reverse, nan, onnx_counting
):
    model = planted_model()
    x = _data(nan)
    if reverse:
        x = x[::-1].copy()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    np.save(tmp_path / "x.npy", x)
    # always worth a rebuild here (the tiny model's batches cost less than a session); the build is
    # waited for, so the switch happens at the next batch
    switches = _forced_switch(monkeypatch)
    report = scan(str(path), str(tmp_path / "x.npy"), batch_size=batch, device="cpu", allow_nonfinite=True)
    expected = truth(model, x)
    layers = {layer.name: layer for layer in report.layers}
    assert sorted(layers) == sorted(PRE)
    for site, (positives, maxima, positions) in expected.items():
        layer = layers[site]
        np.testing.assert_array_equal(layer.positive_counts, positives, err_msg=site)
        np.testing.assert_allclose(layer.max_preactivation, maxima, rtol=1e-6, atol=1e-7, err_msg=site)
        assert layer.elements_per_unit == positions
    assert np.flatnonzero(layers["reluA"].dead_mask()).tolist() == [3]
    assert np.flatnonzero(layers["reluC"].dead_mask()).tolist() == [2]
    assert layers["reluA"].max_preactivation[3] == pytest.approx(-1.0)
    assert expected["reluA"][0][1] > 0 and expected["reluC"][0][1] > 0  # the late units did fire
    # B (index 1) is read off its output after the first rebuild; A and C (dead units) never are
    assert switches and all(s == {1} for s in switches), switches
    if nan:  # B's units 4, 5 met the NaN: left out of their max (data42), counted per layer
        assert not np.isnan(layers["reluB"].max_preactivation).any() and layers["reluB"].nonfinite > 0


def test_one_batch_scan_never_rebuilds(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    onnx.save(planted_model(), str(path))
    np.save(tmp_path / "x.npy", _data(False)[:4])
    monkeypatch.setattr(onnx_scan._OutputMaxSwitch, "GAIN", 1e9)
    started = []
    monkeypatch.setattr(onnx_scan._OutputMaxSwitch, "_build", lambda self, wanted: started.append(wanted))
    scan(str(path), str(tmp_path / "x.npy"), batch_size=4, device="cpu")
    assert started == []


def _forced_switch(monkeypatch) -> list[set[int]]:
    """Rebuild whenever some site's units have all fired, and switch at the next batch."""
    switches: list[set[int]] = []
    ready, consider = onnx_scan._OutputMaxSwitch.ready, onnx_scan._OutputMaxSwitch.consider

    def consider_and_wait(self, *args):
        consider(self, *args)
        if self._thread is not None:
            self._thread.join()

    def recording_ready(self):
        rebuilt = ready(self)
        if rebuilt is not None:
            switches.append(set(self.switched))
        return rebuilt

    monkeypatch.setattr(onnx_scan._OutputMaxSwitch, "GAIN", 1e9)
    monkeypatch.setattr(onnx_scan._OutputMaxSwitch, "consider", consider_and_wait)
    monkeypatch.setattr(onnx_scan._OutputMaxSwitch, "ready", recording_ready)
    return switches


def test_merged_halves_and_json_round_trip_match_the_truth(tmp_path, monkeypatch):
    """Two shards scanned with switched sessions, merged (as `deadrelu merge` does) and read back from
    JSON: the same counts and maxima as onnxruntime + numpy over all samples."""
    from deadrelu_cli.report.model import layer_from_dict, merge_reports, report_to_json

    model = planted_model()
    x = _data(False)
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.save(tmp_path / "a.npy", x[:12])
    np.save(tmp_path / "b.npy", x[12:])
    switches = _forced_switch(monkeypatch)
    halves = [
        scan(str(tmp_path / "m.onnx"), str(tmp_path / f"{h}.npy"), batch_size=4, device="cpu") for h in "ab"
    ]
    assert switches  # each half switched B to its output's max
    merged = merge_reports(halves)
    import json

    layers = {d["name"]: layer_from_dict(d) for d in json.loads(report_to_json(merged))["layers"]}
    for site, (positives, maxima, positions) in truth(model, x).items():
        np.testing.assert_array_equal(layers[site].positive_counts, positives, err_msg=site)
        np.testing.assert_allclose(layers[site].max_preactivation, maxima, rtol=1e-6, atol=1e-7, err_msg=site)
        assert layers[site].elements_per_unit == positions
        assert layers[site].elements_per_unit == positions


def test_explain_keeps_the_pre_activation_and_its_minimum(tmp_path, monkeypatch):
    """--explain needs each unit's minimum pre-activation: no site switches, and min and max are exact."""
    model = planted_model()
    x = _data(False)
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.save(tmp_path / "x.npy", x)
    switches = _forced_switch(monkeypatch)
    report = scan(str(tmp_path / "m.onnx"), str(tmp_path / "x.npy"), batch_size=4, device="cpu", explain=True)
    assert switches == []
    layer = next(layer for layer in report.layers if layer.name == "reluB")
    positives, maxima, _ = truth(model, x)["reluB"]
    np.testing.assert_array_equal(layer.positive_counts, positives)
    np.testing.assert_allclose(layer.max_preactivation, maxima, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(layer.min_preactivation, pre_activations(model, x)["reluB"].min(0), rtol=1e-6)


@pytest.mark.parametrize("replaced", [False, True])
def test_a_rebuild_reads_the_file_again_never_a_replaced_one(tmp_path, monkeypatch, replaced):
    """The scan does not keep the file's bytes (1x the weights) for its whole run: a rebuilt session reads
    them again, and only if they still have the hash the report names; a file replaced mid-scan (here
    with B's units all dead) is not read into the session, the graph held in memory is."""
    model = planted_model()
    x = _data(False)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    np.save(tmp_path / "x.npy", x)
    switches = _forced_switch(monkeypatch)
    reread, held = [], []
    original_reread, original_instrumented = onnx_scan.reread_verified, onnx_scan.instrumented_bytes
    consider = onnx_scan._OutputMaxSwitch.consider

    def replacing_consider(self, *args):
        if replaced and not reread:
            other = planted_model()
            bias = next(i for i in other.graph.initializer if i.name == "bb")
            bias.CopyFrom(numpy_helper.from_array(np.full(6, -1e6, np.float32), "bb"))
            onnx.save(other, str(path))
        consider(self, *args)

    def recording_reread(*args):
        reread.append(original_reread(*args))
        return reread[-1]

    def recording_instrumented(loaded, *args, **kwargs):
        out = original_instrumented(loaded, *args, **kwargs)
        held.append("file_bytes" in loaded.extra)
        return out

    monkeypatch.setattr(onnx_scan._OutputMaxSwitch, "consider", replacing_consider)
    monkeypatch.setattr(onnx_scan, "reread_verified", recording_reread)
    monkeypatch.setattr(onnx_scan, "instrumented_bytes", recording_instrumented)
    report = scan(str(path), str(tmp_path / "x.npy"), batch_size=4, device="cpu")
    assert switches and reread and held and not any(held), (switches, held)
    assert all((r is None) == replaced for r in reread)
    layers = {layer.name: layer for layer in report.layers}
    for site, (positives, maxima, positions) in truth(model, x).items():
        np.testing.assert_array_equal(layers[site].positive_counts, positives, err_msg=site)
        np.testing.assert_allclose(layers[site].max_preactivation, maxima, rtol=1e-6, atol=1e-7, err_msg=site)
        assert layers[site].elements_per_unit == positions
