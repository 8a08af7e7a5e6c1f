"""The compiled kernel as an onnxruntime custom op (csrc/ort_relu_stats.c: deadrelu.ReluStats), issue 22.

* the op alone: per unit the max of x, the count of x > 0, the sum of relu(x) and the element count, for
  units on axis 1 ([N, C], [N, C, L], [N, C, H, W]) and units last ([N, F], [B, T, F]), against numpy in
  float64, with NaN, ±inf, -0.0 and subnormals, one to five jobs, empty batches;
* a scan puts it where it counts exactly what the graph's own ops count (float32 relu, main graph,
  threshold 0, no position mask, no --explain): counts, maxima and sums against onnxruntime's plain run
  of the model and numpy, both ways (tests/test_onnx_output_max.py runs its switches both ways too);
* where onnxruntime refuses the library, the graph's own ops count, with the same numbers.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import kernel_nodes, onnx_kernel_library
from onnx import TensorProto, helper, numpy_helper
from test_onnx_output_max import PRE, _data, planted_model, pre_activations

from deadrelu_cli import scan
from deadrelu_cli.backends.onnx import scan as onnx_scan
from deadrelu_cli.probe.onnx_graph import find_sites, instrument


def op_session(units_last: int, jobs: int, library: str, cap: float | None = None) -> ort.InferenceSession:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    names = ["max", "count", "sum", "size"]
    types = [TensorProto.DOUBLE, TensorProto.INT64, TensorProto.DOUBLE, TensorProto.INT64]
    attrs = {"units_last": units_last, "jobs": jobs}
    if cap is not None:  # ClipStats: clip(x, 0, cap), and the count at the cap
        names, types, attrs["cap"] = [*names, "at_cap"], [*types, TensorProto.INT64], cap
    op = "ReluStats" if cap is None else "ClipStats"
    node = helper.make_node(op, ["x"], names, domain="deadrelu", **attrs)
    graph = helper.make_graph(
        [node],
        "op",
        [x],
        [helper.make_tensor_value_info(n, t, None) for n, t in zip(names, types, strict=True)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("deadrelu", 1)]
    )
    options = ort.SessionOptions()
    options.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def numpy_stats(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Max (NaN where the unit met a NaN), count of x > 0, sum of relu(x), per unit, in float64."""
    rows = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, x.shape[axis])
    nan = np.isnan(rows).any(0)
    finite_max = (
        np.where(np.isnan(rows), -np.inf, rows).max(0) if rows.shape[0] else np.full(rows.shape[1], -np.inf)
    )
    relu = np.where(rows > 0, rows, np.where(np.isnan(rows), np.nan, 0.0))
    return np.where(nan, np.nan, finite_max), (rows > 0).sum(0), relu.sum(0)


def special(shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    flat = x.reshape(-1)
    if flat.size >= 64:
        picks = rng.choice(flat.size, 12, replace=False)
        flat[picks[:2]] = np.inf
        flat[picks[2:4]] = -np.inf
        flat[picks[4:6]] = -0.0
        flat[picks[6:8]] = np.float32(1e-45)  # the smallest subnormal: fires
        flat[picks[8:10]] = -np.float32(1e-45)
        flat[picks[10]] = np.nan
    return x


SHAPES = [
    ((5, 7), 0),  # [N, C]: units on axis 1 (read down the columns)
    ((3, 9, 131), 0),  # [N, C, L], rows longer than a vector block, with a remainder
    ((4, 6, 7, 7), 0),  # short rows (7x7), read down the columns
    ((2, 33, 40, 40), 0),  # long rows
    ((9, 21), 1),  # [N, F], units last
    ((2, 5, 300), 1),  # [B, T, F], units last, F not a multiple of the vector width
]


@pytest.mark.parametrize(("shape", "units_last"), SHAPES)
@pytest.mark.parametrize("jobs", [1, 2, 3, 5])
def test_op_matches_numpy(shape, units_last, jobs):
    library = onnx_kernel_library()
    x = special(shape, sum(shape) + jobs)
    got_max, got_count, got_sum, size = op_session(units_last, jobs, library).run(None, {"x": x})
    want_max, want_count, want_sum = numpy_stats(x, x.ndim - 1 if units_last else 1)
    np.testing.assert_array_equal(got_count, want_count)
    np.testing.assert_array_equal(got_max, want_max)  # a max is exact (NaN where NaN)
    np.testing.assert_allclose(got_sum, want_sum, rtol=1e-6)
    assert int(size) == x.size and got_count.dtype == np.int64 and got_max.dtype == np.float64


@pytest.mark.parametrize(("shape", "units_last"), SHAPES)
@pytest.mark.parametrize(("cap", "jobs"), [(6.0, 1), (6.0, 3), (1.5, 2)])
def test_clip_op_matches_numpy(shape, units_last, cap, jobs):
    """ClipStats: the sum is that of clip(x, 0, cap) and at_cap counts x >= cap (values exactly at the
    cap and above it, +inf included; NaN never)."""
    library = onnx_kernel_library()
    x = special(shape, sum(shape) + 7 * jobs)
    flat = x.reshape(-1)
    flat[:: max(1, flat.size // 9)] = cap  # some values exactly at the cap
    got_max, got_count, got_sum, size, at_cap = op_session(units_last, jobs, library, cap).run(None, {"x": x})
    axis = x.ndim - 1 if units_last else 1
    want_max, want_count, _ = numpy_stats(x, axis)
    rows = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, x.shape[axis])
    clipped = np.where(np.isnan(rows), np.nan, np.clip(rows, 0.0, cap))
    np.testing.assert_array_equal(got_count, want_count)
    np.testing.assert_array_equal(got_max, want_max)
    np.testing.assert_allclose(got_sum, clipped.sum(0), rtol=1e-6)
    np.testing.assert_array_equal(at_cap, (rows >= cap).sum(0))
    assert int(size) == x.size and at_cap.dtype == np.int64


def test_clip_op_without_a_cap_is_refused():
    library = onnx_kernel_library()
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    types = [TensorProto.DOUBLE, TensorProto.INT64, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.INT64]
    outs = [helper.make_tensor_value_info(n, t, None) for n, t in zip("abcde", types, strict=True)]
    node = helper.make_node("ClipStats", ["x"], list("abcde"), domain="deadrelu")
    model = helper.make_model(
        helper.make_graph([node], "g", [x], outs),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("deadrelu", 1)],
    )
    options = ort.SessionOptions()
    options.register_custom_ops_library(library)
    with pytest.raises(Exception, match="needs a float attribute cap above 0"):
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("units_last", [0, 1])
def test_op_on_an_empty_batch_counts_nothing(units_last):
    library = onnx_kernel_library()
    x = np.zeros((0, 4, 3), np.float32)
    got_max, got_count, got_sum, size = op_session(units_last, 2, library).run(None, {"x": x})
    units = 3 if units_last else 4
    assert got_max.tolist() == [-np.inf] * units and got_count.tolist() == [0] * units
    assert got_sum.tolist() == [0.0] * units and int(size) == 0


def test_jobs_do_not_change_counts_or_maxima():
    library = onnx_kernel_library()
    x = special((6, 16, 30, 30), 11)
    runs = [op_session(0, jobs, library).run(None, {"x": x}) for jobs in (1, 2, 4, 7)]
    for other in runs[1:]:
        np.testing.assert_array_equal(other[0], runs[0][0])
        np.testing.assert_array_equal(other[1], runs[0][1])
        np.testing.assert_allclose(other[2], runs[0][2], rtol=1e-12)


def _truth(model: onnx.ModelProto, x: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Counts, max pre-activation and sum of the output per unit, over the finite values (NaN/Inf values
    are left out, as --allow-nonfinite says)."""
    out = {}
    for site, pre in pre_activations(model, x).items():
        kept = np.isfinite(pre)
        pre = pre.astype(np.float64)
        peak = np.where(kept, pre, -np.inf).max(0)
        out[site] = ((kept & (pre > 0)).sum(0), peak, np.where(kept, np.maximum(pre, 0), 0).sum(0))
    return out


@pytest.mark.parametrize("nan", [False, True])
def test_scan_counts_the_same_with_the_kernel_and_without(tmp_path, onnx_counting, nan):
    way, made = onnx_counting
    model = planted_model()
    x = _data(nan)
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.save(tmp_path / "x.npy", x)
    # NaN in the data: --allow-nonfinite, whose batches with NaN are recounted by the graph's own ops
    report = scan(
        str(tmp_path / "m.onnx"), str(tmp_path / "x.npy"), batch_size=4, device="cpu", allow_nonfinite=nan
    )
    layers = {layer.name: layer for layer in report.layers}
    assert sorted(layers) == sorted(PRE)
    for site, (positives, maxima, sums) in _truth(model, x).items():
        layer = layers[site]
        np.testing.assert_array_equal(layer.positive_counts, positives, err_msg=site)
        np.testing.assert_allclose(layer.max_preactivation, maxima, rtol=1e-6, err_msg=site)
        np.testing.assert_allclose(layer.sum_abs, sums, rtol=1e-5, err_msg=site)
        if not nan:
            assert layer.elements_per_unit == x.shape[0] * (36 if site != "reluC" else 1)
    first, library = made[0]
    # every site of the planted model is a float32 relu of the main graph: the kernel counts all three
    assert kernel_nodes(first) == (3 if way == "kernel" else 0)
    assert (library is not None) == (way == "kernel")


def test_onnxruntime_refusing_the_library_leaves_the_graph_counting(tmp_path, monkeypatch):
    """A library onnxruntime cannot load (here: not a library at all): the scan says nothing new and
    counts with the graph's own ops, exactly."""
    onnx_kernel_library()
    bogus = tmp_path / "not-a-library.so"
    bogus.write_text("not a shared object")
    monkeypatch.setattr(onnx_scan, "kernel_library", lambda device: str(bogus))
    model = planted_model()
    x = _data(False)
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.save(tmp_path / "x.npy", x)
    report = scan(str(tmp_path / "m.onnx"), str(tmp_path / "x.npy"), batch_size=8, device="cpu")
    layers = {layer.name: layer for layer in report.layers}
    for site, (positives, maxima, _) in _truth(model, x).items():
        np.testing.assert_array_equal(layers[site].positive_counts, positives, err_msg=site)
        np.testing.assert_allclose(layers[site].max_preactivation, maxima, rtol=1e-6, err_msg=site)


@pytest.mark.parametrize(
    ("threshold", "explain", "count"),
    [(0.0, False, 3), (0.25, False, 0), (0.0, True, 0)],
)
def test_only_what_the_kernel_counts_exactly_goes_to_it(threshold, explain, count):
    """A threshold above 0 (the kernel counts x > 0) and --explain's minimum keep the graph's ops."""
    model = planted_model()
    sites = find_sites(model, ("relu",))
    for site in sites:
        site.track_min = explain
    for site in sites:  # as the scan's shape discovery sets them
        site.rank = 2 if site.name == "reluC" else 4
    out = instrument(model, sites, threshold, None, kernel_jobs=2)
    assert kernel_nodes(out.SerializeToString()) == count
    assert any(entry.domain == "deadrelu" for entry in out.opset_import) == bool(count)


def test_spelled_and_float16_relus_keep_the_graphs_ops():
    """Max(x, 0) (a spelled ReLU) and a float16 Relu: the graph's own ops count them."""
    zero = onnx.numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    nodes = [
        helper.make_node("Constant", [], ["zero"], value=zero, name="zero"),  # zeros the code makes
        helper.make_node("MatMul", ["x", "w"], ["xw"], name="layer"),  # a spelled ReLU follows a layer
        helper.make_node("Max", ["xw", "zero"], ["m"], name="spelled"),
        helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16, name="half"),
        helper.make_node("Relu", ["h"], ["r"], name="relu16"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [
            helper.make_tensor_value_info("m", TensorProto.FLOAT, [None, 4]),
            helper.make_tensor_value_info("r", TensorProto.FLOAT16, [None, 4]),
        ],
        [onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")],
    )
    # value types as the loader has them (shape inference)
    model = onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )
    sites = find_sites(model, ("relu",))
    assert sorted(site.spelled or "" for site in sites) == ["", "Max"]
    for site in sites:
        site.rank = 2
    assert kernel_nodes(instrument(model, sites, 0.0, None, kernel_jobs=2).SerializeToString()) == 0


def test_switched_off_or_without_a_compiler_the_graph_counts(tmp_path, monkeypatch):
    """DEADRELU_NATIVE=0, or no C compiler on PATH: no library, said by onnx_status, and the scan's
    session holds no ReluStats node; the counts are the truth's still."""
    from deadrelu_cli import native

    model = planted_model()
    x = _data(False)
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.save(tmp_path / "x.npy", x)
    for env, said in (
        ({"DEADRELU_NATIVE": "0"}, "off (DEADRELU_NATIVE=0)"),
        ({"PATH": str(tmp_path)}, "no C compiler ($CC, cc, gcc or clang): onnxruntime's own ops count"),
    ):
        with monkeypatch.context() as patch:
            patch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
            patch.delenv("CC", raising=False)
            for key, value in env.items():
                patch.setenv(key, value)
            patch.setattr(native, "_onnx_built", None)
            assert onnx_scan.kernel_library("cpu") is None
            assert native.onnx_status().startswith(said)
            made: list[bytes] = []

            def recording(model_bytes, *args, made=made, real=onnx_scan.make_session):
                made.append(model_bytes)
                return real(model_bytes, *args)

            patch.setattr(onnx_scan, "make_session", recording)
            report = scan(str(tmp_path / "m.onnx"), str(tmp_path / "x.npy"), batch_size=8, device="cpu")
            assert made and kernel_nodes(made[0]) == 0
            layers = {layer.name: layer for layer in report.layers}
            for site, (positives, _, _) in _truth(model, x).items():
                np.testing.assert_array_equal(layers[site].positive_counts, positives, err_msg=site)


def test_a_cuda_scan_never_asks_for_the_library():
    assert onnx_scan.kernel_library("cuda") is None
    assert onnx_scan.kernel_library("cuda:1") is None


def test_debug_says_how_the_scan_counted(tmp_path):
    """`--debug` names the library an ONNX scan counted with, or why there was none."""
    import os
    import subprocess
    import sys

    onnx_kernel_library()
    onnx.save(planted_model(), str(tmp_path / "m.onnx"))
    np.save(tmp_path / "x.npy", _data(False)[:8])
    command = [sys.executable, "-m", "deadrelu_cli", "scan", str(tmp_path / "m.onnx"), "--data"]
    command += [str(tmp_path / "x.npy"), "-q", "--debug"]
    said = {}
    for value in ("1", "off"):
        done = subprocess.run(
            command, capture_output=True, text=True, env={**os.environ, "DEADRELU_NATIVE": value}, check=False
        )
        assert done.returncode == 0, done.stderr
        said[value] = [line for line in done.stderr.splitlines() if line.startswith("deadrelu: debug: ")]
    assert said["1"] == [f"deadrelu: debug: onnxruntime op: {onnx_kernel_library()}"]
    assert said["off"] == ["deadrelu: debug: onnxruntime op: off (DEADRELU_NATIVE=off)"]


def _capped_model() -> tuple[onnx.ModelProto, dict[str, tuple[str, float]]]:
    """relu6 after a conv (NCHW), Clip(x, 0, 2.5) after a 1x1 conv, relu6 after a MatMul ([N, 3], units
    last); per site, its pre-activation and cap."""
    rng = np.random.default_rng(12)
    w1 = (rng.standard_normal((4, 3, 3, 3)) * 1.5).astype(np.float32)
    w1[2] = 0.0
    b1 = np.array([0.0, 2.0, -3.0, 1.0], np.float32)  # unit 2 dead
    w2 = rng.standard_normal((5, 4, 1, 1)).astype(np.float32)
    w3 = (rng.standard_normal((5, 3)) * 4).astype(np.float32)
    zero, six, cap = (
        numpy_helper.from_array(np.array(v, np.float32), n)
        for v, n in ((0, "zero"), (6, "six"), (2.5, "cap"))
    )
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Clip", ["a", "zero", "six"], ["ra"], name="relu6_a"),
        helper.make_node("Conv", ["ra", "w2"], ["b"], name="conv2"),
        helper.make_node("Clip", ["b", "zero", "cap"], ["rb"], name="clip_b"),
        helper.make_node("GlobalAveragePool", ["rb"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "w3"], ["c"], name="fc"),
        helper.make_node("Clip", ["c", "zero", "six"], ["y"], name="relu6_c"),
    ]
    graph = helper.make_graph(
        nodes,
        "capped",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        [numpy_helper.from_array(v, k) for k, v in {"w1": w1, "b1": b1, "w2": w2, "w3": w3}.items()]
        + [zero, six, cap],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, {"relu6_a": ("a", 6.0), "clip_b": ("b", 2.5), "relu6_c": ("c", 6.0)}


def test_relu6_and_clip_sites_with_the_kernel_and_without(tmp_path, onnx_counting):
    way, made = onnx_counting
    model, sites = _capped_model()
    x = (np.random.default_rng(2).standard_normal((20, 3, 6, 6)) * 3).astype(np.float32)
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.save(tmp_path / "x.npy", x)
    report = scan(
        str(tmp_path / "m.onnx"), str(tmp_path / "x.npy"), batch_size=6, device="cpu", ops="relu,relu6,clip"
    )
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    for pre, _ in sites.values():
        exposed.graph.output.append(helper.make_tensor_value_info(pre, TensorProto.FLOAT, None))
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run([pre for pre, _ in sites.values()], {"x": x})
    layers = {layer.name: layer for layer in report.layers}
    assert sorted(layers) == sorted(sites)
    for (site, (_, cap)), pre in zip(sites.items(), outputs, strict=True):
        rows = np.moveaxis(pre, 1, -1).reshape(-1, pre.shape[1]).astype(np.float64)
        layer = layers[site]
        np.testing.assert_array_equal(layer.positive_counts, (rows > 0).sum(0), err_msg=site)
        np.testing.assert_array_equal(layer.max_preactivation, rows.max(0), err_msg=site)
        np.testing.assert_allclose(layer.sum_abs, np.clip(rows, 0, cap).sum(0), rtol=1e-5, err_msg=site)
        np.testing.assert_array_equal(layer.saturated_counts, (rows >= cap).sum(0), err_msg=site)
        assert layer.elements_per_unit == rows.shape[0]
    assert (layers["relu6_a"].saturated_counts > 0).any() and layers["relu6_a"].positive_counts[2] == 0
    assert kernel_nodes(made[0][0]) == (3 if way == "kernel" else 0)
