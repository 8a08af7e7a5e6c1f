"""The ONNX scan against numpy counts of the un-instrumented graph's Relu inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from onnx_graphs import (
    conv_relu_hardswish,
    float16_model,
    gemm_relu,
    matmul_tokens,
    paddle_conv_bn,
    relu_in_if,
    relu_inputs_ground_truth,
    two_inputs,
)
from truth import onnx_relu_io

from deadrelu_cli import scan
from deadrelu_cli.errors import UserError


def _save(model, tmp_path, name="m.onnx"):
    path = tmp_path / name
    onnx.save(model, str(path))
    return str(path)


def _check_layer(layer, truth):
    positives, max_pre, elements = truth
    np.testing.assert_array_equal(layer.positive_counts, positives)
    np.testing.assert_allclose(layer.max_preactivation, max_pre, rtol=1e-6, atol=1e-6)
    assert layer.elements_per_unit == elements
    assert np.flatnonzero(layer.dead_mask()).tolist() == np.flatnonzero(positives == 0).tolist()


@pytest.mark.parametrize("opset", [11, 13, 17, 18, 21])
def test_gemm_relu_all_opsets(tmp_path, opset):
    model = gemm_relu(opset=opset)
    x = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    report = scan(_save(model, tmp_path), str(tmp_path / "d.npz"), batch_size=16, device="cpu")
    truth = relu_inputs_ground_truth(model, {"x": x}, {"relu1": 1})
    layer = report.layers[0]
    assert layer.name == "relu1" and layer.op == "relu" and report.model.format == "onnx"
    _check_layer(layer, truth["relu1"])
    assert np.flatnonzero(layer.dead_mask()).tolist() == [2, 4, 6]
    assert layer.producer == "fc"
    np.testing.assert_allclose(layer.bias, [0.5, -0.2, -8, 0.1, -10, 0.3, -15, -0.1], rtol=1e-6)


def test_fixed_batch_graph(tmp_path):
    """A graph whose batch axis is fixed at 10: 30 samples in three runs; the truth is onnxruntime's
    Relu inputs of each run of the un-instrumented graph, counted together in numpy."""
    model = gemm_relu(batch=10)
    x = np.random.default_rng(1).standard_normal((30, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    report = scan(_save(model, tmp_path), str(tmp_path / "d.npz"), batch_size=10, device="cpu")
    pre = np.concatenate(
        [onnx_relu_io(model, {"x": x[i : i + 10]}, ["relu1"])["relu1"].pre for i in (0, 10, 20)]
    )
    assert pre.shape == (30, 8)
    (layer,) = report.layers
    _check_layer(layer, ((pre > 0).sum(0), pre.max(0), 30))
    np.testing.assert_allclose(layer.sum_abs, np.maximum(pre, 0).sum(0), rtol=1e-5, atol=1e-5)
    assert np.flatnonzero(layer.dead_mask()).tolist() == [2, 4, 6]


def test_matmul_tokens_last_axis(tmp_path):
    model = matmul_tokens()
    x = np.random.default_rng(2).standard_normal((9, 5, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    report = scan(_save(model, tmp_path), str(tmp_path / "d.npz"), batch_size=4, device="cpu")
    layer = report.layers[0]
    assert layer.units == 6 and layer.channel_dim == 2
    _check_layer(layer, relu_inputs_ground_truth(model, {"x": x}, {"ffn_relu": -1})["ffn_relu"])
    assert np.flatnonzero(layer.dead_mask()).tolist() == [1, 4]
    np.testing.assert_allclose(layer.bias, [0, -40, 0, 0, -40, 0])


@pytest.mark.parametrize(
    "opset, hardswish",
    [(11, "scale-first"), (17, "scale-first"), (17, "multiply-first"), (12, "times-a-sixth")],
)
def test_clip_and_hardswish_are_not_relu(tmp_path, opset, hardswish):
    """A HardSwish decomposed by an exporter is not a ReLU6, whichever order it scales in (paddle2onnx
    multiplies first: PP-OCR's models were reported with 24 false relu6 layers)."""
    model = conv_relu_hardswish(opset=opset, hardswish=hardswish)
    x = np.random.default_rng(3).standard_normal((6, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    report = scan(_save(model, tmp_path), str(tmp_path / "d.npz"), batch_size=4, device="cpu")
    assert [(layer.name, layer.op) for layer in report.layers] == [("relu", "relu"), ("relu6", "relu6")]
    truth = relu_inputs_ground_truth(model, {"x": x}, {"relu": 1, "relu6": 1})
    _check_layer(report.layers[0], truth["relu"])
    _check_layer(report.layers[1], truth["relu6"])
    assert 1 in np.flatnonzero(report.layers[0].dead_mask()).tolist()
    assert report.layers[0].channel_dim == 1


@pytest.mark.parametrize("weights_in_constants", [False, True])
def test_reshaped_conv_bias_and_unfused_batchnorm_are_producers(tmp_path, weights_in_constants):
    """paddle2onnx adds a Conv's bias as Add(Reshape(b, [1, C, 1, 1])) and keeps BatchNormalization:
    both are the layers' producers, with their biases, as for a Conv with its own bias."""
    model = paddle_conv_bn(weights_in_constants=weights_in_constants)
    x = np.random.default_rng(5).standard_normal((10, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    report = scan(_save(model, tmp_path), str(tmp_path / "d.npz"), batch_size=4, device="cpu")
    first, second = report.layers
    truth = relu_inputs_ground_truth(model, {"x": x}, {"relu1": 1, "relu2": 1})
    _check_layer(first, truth["relu1"])
    _check_layer(second, truth["relu2"])
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in paddle_conv_bn().graph.initializer}
    assert (first.producer, first.channel_dim) == ("bias_add", 1)
    np.testing.assert_array_equal(first.bias, inits["b1"])
    assert second.producer == "bn"
    np.testing.assert_array_equal(second.bias, inits["shift"])
    assert np.flatnonzero(first.dead_mask()).tolist() == [1]
    assert np.flatnonzero(second.dead_mask()).tolist() == [2]


def test_a_graph_without_relu_says_what_it_uses_instead(tmp_path, cli):
    """YOLO-style SiLU (x * Sigmoid(x)): no layers, exit 0, and the note names the Sigmoid nodes."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Sigmoid", ["c"], ["s"], name="sig"),
            helper.make_node("Mul", ["c", "s"], ["y"], name="silu"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3, 8, 8), np.float32))
    report = scan(_save(model, tmp_path), str(tmp_path / "d.npz"), device="cpu")
    assert report.layers == []
    assert any("no relu/relu6 nodes" in note and "Sigmoid ×1" in note for note in report.notes)
    shown = cli("scan", tmp_path / "m.onnx", "--data", tmp_path / "d.npz")  # no empty table
    assert shown.code == 0 and "Layer" not in shown.out
    assert "No activation site of relu, relu6 in this model" in shown.out and "Sigmoid ×1" in shown.out


def test_relu_inside_if_branches(tmp_path):
    model = relu_in_if()
    x = np.random.default_rng(4).standard_normal((12, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, flag=np.array(True))
    report = scan(
        _save(model, tmp_path), str(tmp_path / "d.npz"), batch_size=5, device="cpu", consts=("flag",)
    )
    names = [layer.name for layer in report.layers]
    assert names == ["gate/then_branch/then_relu", "gate/else_branch/else_relu"]
    then_layer, else_layer = report.layers
    assert then_layer.ran and not else_layer.ran
    assert else_layer.dead_mask().sum() == 0  # never ran: not dead
    wa = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "wa")).astype(
        np.float64
    )
    pre = x.astype(np.float64) @ wa + np.array([0, 0, -50, 0, 0])
    np.testing.assert_array_equal(then_layer.positive_counts, (pre > 0).sum(0))
    assert then_layer.elements_per_unit == 12
    assert 2 in np.flatnonzero(then_layer.dead_mask()).tolist()
    np.savez(tmp_path / "e.npz", x=x, flag=np.array(False))
    report = scan(_save(model, tmp_path), str(tmp_path / "e.npz"), device="cpu", consts=("flag",))
    np.testing.assert_array_equal(report.layers[1].positive_counts, (-pre > 0).sum(0))
    assert not report.layers[0].ran


def test_two_inputs_by_name_and_mismatch(tmp_path):
    model = two_inputs()
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((7, 3)).astype(np.float32), rng.standard_normal((7, 2)).astype(np.float32)
    np.savez(tmp_path / "d.npz", b=b, a=a)
    report = scan(_save(model, tmp_path), str(tmp_path / "d.npz"), device="cpu", batch_size=3)
    _check_layer(report.layers[0], relu_inputs_ground_truth(model, {"a": a, "b": b}, {"relu": 1})["relu"])
    np.savez(tmp_path / "bad.npz", a=a, c=b)
    with pytest.raises(
        UserError,
        match=r"no array for model input\(s\) b; the file holds a\[7, 3\] float32, c\[7, 2\] float32; "
        r"the model's inputs are a\[\?, 3\] float32, b\[\?, 2\] float32",
    ):
        scan(_save(model, tmp_path), str(tmp_path / "bad.npz"), device="cpu")


def test_float16_model_gets_converted_inputs(tmp_path):
    model = float16_model()
    x = np.random.default_rng(6).standard_normal((20, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    report = scan(_save(model, tmp_path), str(tmp_path / "d.npz"), device="cpu")
    truth = relu_inputs_ground_truth(model, {"x": x.astype(np.float16)}, {"relu1": 1})
    _check_layer(report.layers[0], truth["relu1"])
    assert any("converted to the model's float16" in note for note in report.notes)


def test_integer_pixels_into_a_float_model_are_counted_as_raw_values_with_a_note(tmp_path):
    """uint8 images fed to a float model: converted value for value (0-255, no scaling; the counts are
    those of the float values) and a note says so, as it is the classic missing-normalisation slip."""
    model = gemm_relu()
    x = np.random.default_rng(7).integers(0, 256, (12, 4)).astype(np.uint8)
    np.savez(tmp_path / "d.npz", x=x)
    report = scan(_save(model, tmp_path), str(tmp_path / "d.npz"), device="cpu")
    truth = relu_inputs_ground_truth(model, {"x": x.astype(np.float32)}, {"relu1": 1})
    _check_layer(report.layers[0], truth["relu1"])
    assert any("uint8 converted" in note and "normalise" in note for note in report.notes)


def test_external_data(tmp_path):
    model = gemm_relu()
    path = tmp_path / "ext.onnx"
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.data",
        size_threshold=0,
    )
    assert (tmp_path / "ext.data").exists()
    x = np.random.default_rng(7).standard_normal((10, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    report = scan(str(path), str(tmp_path / "d.npz"), device="cpu")
    assert np.flatnonzero(report.layers[0].dead_mask()).tolist() == [2, 4, 6]


def test_external_data_outside_folder_is_refused(tmp_path):
    model = gemm_relu()
    (tmp_path / "sub").mkdir()
    onnx.save(
        model,
        str(tmp_path / "sub" / "m.onnx"),
        save_as_external_data=True,
        location="w.data",
        size_threshold=0,
    )
    raw = (
        (tmp_path / "sub" / "m.onnx").read_bytes().replace(b"w.data", b"../w.d")
    )  # same length: the protobuf stays valid
    (tmp_path / "sub" / "m.onnx").write_bytes(raw)
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 4), np.float32))
    with pytest.raises(UserError, match="outside the model's folder") as refused:
        scan(str(tmp_path / "sub" / "m.onnx"), str(tmp_path / "d.npz"), device="cpu")
    assert str(refused.value).startswith(f"{tmp_path / 'sub' / 'm.onnx'}: ")  # the file, not its folder


def test_memory_does_not_grow_with_activation_size(tmp_path):
    """Only per-channel (at most per sample and channel) values leave the instrumented graph, whatever the spatial size."""
    from deadrelu_cli.probe.onnx_graph import find_sites, instrument

    fetched = {}
    for spatial in (8, 32):  # 16x more activation elements
        model = onnx.shape_inference.infer_shapes(conv_relu_hardswish(spatial=spatial))
        sites = find_sites(model, ("relu", "relu6"))
        inst = instrument(model, sites, 0.0, None)
        import onnxruntime as ort

        session = ort.InferenceSession(inst.SerializeToString(), providers=["CPUExecutionProvider"])
        x = np.random.default_rng(8).standard_normal((4, 3, spatial, spatial)).astype(np.float32)
        outputs = session.run(None, {"x": x})
        fetched[spatial] = sum(o.nbytes for o in outputs)
        units = 4
        assert all(o.size <= x.shape[0] * units for o in outputs)  # per (sample, channel) at most
        assert [o.name for o in inst.graph.output] == [n for s in sites for n in s.outputs.values()]
    assert fetched[8] == fetched[32]


@pytest.mark.parametrize("content", [b"not an onnx file at all", b"\x08\x07\x12\x04junk"])
def test_bad_onnx_files(tmp_path, content):
    (tmp_path / "bad.onnx").write_bytes(content)
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 4), np.float32))
    with pytest.raises(UserError):
        scan(str(tmp_path / "bad.onnx"), str(tmp_path / "d.npz"), device="cpu")


def test_truncated_and_invalid_onnx(tmp_path):
    model = gemm_relu()
    raw = model.SerializeToString()
    (tmp_path / "t.onnx").write_bytes(raw[: len(raw) // 2])
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 4), np.float32))
    with pytest.raises(UserError, match="truncated or not ONNX|fails onnx.checker"):
        scan(str(tmp_path / "t.onnx"), str(tmp_path / "d.npz"), device="cpu")
    broken = gemm_relu()
    broken.graph.node[1].input[0] = "does_not_exist"
    onnx.save(broken, str(tmp_path / "b.onnx"))
    with pytest.raises(UserError, match="fails onnx.checker"):
        scan(str(tmp_path / "b.onnx"), str(tmp_path / "d.npz"), device="cpu")


def test_initializer_with_missing_bytes_is_refused(tmp_path):
    model = gemm_relu()
    weight = model.graph.initializer[0]
    weight.raw_data = weight.raw_data[:-4]  # one float short of its [8, 4] shape
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 4), np.float32))
    with pytest.raises(UserError, match="fails onnx.checker.*holds 124 bytes"):
        scan(_save(model, tmp_path), str(tmp_path / "d.npz"), device="cpu")


def test_relu_inside_a_model_local_function_is_a_site(tmp_path):
    """Exporters may wrap blocks in model-local functions; their ReLUs are inlined and counted."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    bias = np.array([0.2, -30.0, 0.1], np.float32)  # unit 1 can never fire on this data
    block = helper.make_function(
        "local",
        "LinRelu",
        ["x", "w", "b"],
        ["y"],
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Add", ["h", "b"], ["hb"]),
            helper.make_node("Relu", ["hb"], ["y"]),
        ],
        [helper.make_opsetid("", 17)],
    )
    graph = helper.make_graph(
        [
            helper.make_node("LinRelu", ["x", "w", "b"], ["y"], domain="local", name="block"),
            helper.make_node("Relu", ["y"], ["z"], name="after"),
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [None, 3])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)], functions=[block]
    )
    x = rng.standard_normal((40, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    report = scan(_save(model, tmp_path), str(tmp_path / "d.npz"), batch_size=16, device="cpu")
    pre = x @ w + bias  # the reference, in numpy
    assert len(report.layers) == 2
    np.testing.assert_array_equal(report.layers[0].positive_counts, (pre > 0).sum(0))
    np.testing.assert_allclose(report.layers[0].max_preactivation, pre.max(0), rtol=1e-5, atol=1e-5)
    assert np.flatnonzero(report.layers[0].dead_mask()).tolist() == [1]


@pytest.mark.parametrize("spatial", [[5, 6], ["H", "W"]])
def test_exact_step_count_on_extreme_values_and_nan_recount(tmp_path, spatial, onnx_counting):
    """NCHW counts come from a scaled-and-clipped step (no NCHW copy in onnxruntime): every positive
    float32 counts, subnormals and inf included; a batch with NaN is recounted with Greater (NaN never
    fires). Static H*W needs no Size output, symbolic H*W does; both are checked against numpy, and the
    same with the compiled kernel's op counting instead (onnx_counting)."""
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["y"], name="act"),
            helper.make_node("Neg", ["y"], ["z"], name="neg"),
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 4, *spatial])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [None, 4, *spatial])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rng = np.random.default_rng(9)
    x = -np.abs(rng.standard_normal((12, 4, 5, 6))).astype(np.float32)  # nothing fires by default
    x[0, 0, 0, :4] = [1.4e-45, 1e-40, 1.1754942e-38, np.inf]  # the smallest subnormal, a subnormal, ...
    x[1, 0, 1, 1] = 3e38
    x[2, 1, 2, 2] = -0.0
    x[3, 2] = 0.5  # channel 2 fires everywhere in sample 3
    x[6, 1, 0, 0] = np.nan  # batch 2 (samples 4-7) holds a NaN
    x[7, 1, 3, 3] = 2.0
    np.savez(tmp_path / "d.npz", x=x)
    report = scan(
        _save(model, tmp_path), str(tmp_path / "d.npz"), batch_size=4, device="cpu", allow_nonfinite=True
    )
    layer = report.layers[0]
    # numpy: NaN > 0 is False; under --allow-nonfinite the inf is left out too (data42: NaN/±Inf fire
    # nowhere, in every format), the batch holding it recounted
    expected = (np.isfinite(x) & (x > 0)).sum(axis=(0, 2, 3))
    np.testing.assert_array_equal(layer.positive_counts, expected)
    assert expected.tolist() == [4, 1, 30, 0] and layer.nonfinite == 2
    assert layer.elements_per_unit == 12 * 5 * 6
    assert np.flatnonzero(layer.dead_mask()).tolist() == [3]


def test_exact_step_only_for_the_cpu_provider(tmp_path):
    """On CUDA (cuDNN may flush subnormals or use TF32) the count stays Greater-based."""
    from deadrelu_cli.backends.onnx.scan import instrumented_bytes
    from deadrelu_cli.loaders.model import LoadOptions
    from deadrelu_cli.loaders.onnx_model import load_onnx
    from deadrelu_cli.probe.onnx_graph import find_sites

    path = _save(conv_relu_hardswish(), tmp_path)
    ops = {}
    for device in ("cpu", "cuda"):
        loaded = load_onnx(LoadOptions(path, device="cpu"))
        sites = find_sites(loaded.runnable, ("relu", "relu6"))
        graph = onnx.load_from_string(instrumented_bytes(loaded, sites, 0.0, None, device)).graph
        ops[device] = {n.op_type for n in graph.node if n.name.startswith("deadrelu_")}
    assert "HardSigmoid" in ops["cpu"] and "Greater" not in ops["cpu"]
    assert "Greater" in ops["cuda"] and "HardSigmoid" not in ops["cuda"]


def test_appended_instrumentation_parses_as_the_instrumented_graph(tmp_path):
    """The session is built from the file's bytes + a message of appended nodes; protobuf merges them
    into exactly the graph that instrument() builds (same nodes, same outputs, weights untouched)."""
    from deadrelu_cli.backends.onnx.scan import instrumented_bytes
    from deadrelu_cli.loaders.model import LoadOptions
    from deadrelu_cli.loaders.onnx_model import load_onnx
    from deadrelu_cli.probe.onnx_graph import find_sites, instrument

    path = _save(conv_relu_hardswish(), tmp_path)
    loaded = load_onnx(LoadOptions(path, device="cpu"))
    assert loaded.extra["file_bytes"] == (tmp_path / "m.onnx").read_bytes()
    sites = find_sites(loaded.runnable, ("relu", "relu6"))
    merged = onnx.load_from_string(instrumented_bytes(loaded, sites, 0.0, None))
    expected = instrument(loaded.runnable, sites, 0.0, None, keep_outputs=True)
    assert [n.SerializeToString() for n in merged.graph.node] == [
        n.SerializeToString() for n in expected.graph.node
    ]
    assert [o.name for o in merged.graph.output] == [o.name for o in expected.graph.output]
    assert [i.SerializeToString() for i in merged.graph.initializer] == [
        i.SerializeToString() for i in loaded.runnable.graph.initializer
    ]


def test_parity_with_torch_scan_on_exported_samples(tmp_path, planted_module):
    """Consistency (torch vs ONNX backends): each planted torch model exported to ONNX gives the same
    dead units per layer as the torch scan."""
    import warnings

    from conftest import arch, save_npz, save_state_dict

    for factory, shape in (
        ("eight_neuron", (4,)),
        ("conv_bn", (3, 6, 6)),
        ("tokens", (5, 8)),
        ("relu6_model", (4,)),
    ):
        model = getattr(planted_module, factory)().eval()
        x = np.random.default_rng(9).standard_normal((32, *shape)).astype(np.float32)
        data = save_npz(tmp_path / f"{factory}.npz", x=x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (torch.from_numpy(x[:2]),),
                str(tmp_path / f"{factory}.onnx"),
                input_names=["x"],
                dynamic_axes={"x": {0: "n"}},
                opset_version=17,
                dynamo=False,
            )
        torch_report = scan(
            str(save_state_dict(model, tmp_path / f"{factory}.pt")),
            str(data),
            arch=arch(factory),
            device="cpu",
        )
        onnx_report = scan(str(tmp_path / f"{factory}.onnx"), str(data), device="cpu")
        assert [layer.op for layer in onnx_report.layers] == [layer.op for layer in torch_report.layers], (
            factory
        )
        for a, b in zip(torch_report.layers, onnx_report.layers, strict=True):
            assert a.units == b.units and a.elements_per_unit == b.elements_per_unit, (
                factory,
                a.name,
                b.name,
            )
            assert np.flatnonzero(a.dead_mask()).tolist() == np.flatnonzero(b.dead_mask()).tolist(), (
                factory,
                a.name,
            )


def test_relu_inside_loop_body(tmp_path):
    from onnx_graphs import relu_in_loop

    model, w, b = relu_in_loop(trips=3)
    x = np.random.default_rng(10).standard_normal((11, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    report = scan(_save(model, tmp_path), str(tmp_path / "d.npz"), device="cpu", batch_size=4)
    assert [layer.name for layer in report.layers] == ["loop/body/body_relu"]
    layer = report.layers[0]
    h, positives, maxima = x.astype(np.float64), np.zeros(4, np.int64), np.full(4, -np.inf)
    for _ in range(3):  # every iteration is one more pass through the same call site
        pre = h @ w.astype(np.float64) + b
        positives += (pre > 0).sum(0)
        maxima = np.maximum(maxima, pre.max(0))
        h = np.maximum(pre, 0)
    np.testing.assert_array_equal(layer.positive_counts, positives)
    np.testing.assert_allclose(layer.max_preactivation, maxima, rtol=1e-5, atol=1e-5)
    assert layer.elements_per_unit == 33
    assert 1 in np.flatnonzero(layer.dead_mask()).tolist()


@pytest.mark.parametrize(("factory", "channel_dim"), [("relu_in_if", 1), ("matmul_tokens", -1), ("conv", 1)])
def test_sites_of_unknown_rank_use_rank_free_reductions(factory, channel_dim):
    """When shape inference cannot tell a site's rank (seen in silero-vad's If branches), the reductions
    reshape to [N, C, rest] or [rest, C]; the counts must equal those of the known-rank path."""
    import onnxruntime as ort

    from deadrelu_cli.backends.onnx.scan import HostAccumulator
    from deadrelu_cli.probe.onnx_graph import find_sites, instrument

    model = {"relu_in_if": relu_in_if, "matmul_tokens": matmul_tokens, "conv": conv_relu_hardswish}[factory]()
    model = onnx.shape_inference.infer_shapes(model)
    rng = np.random.default_rng(12)
    feeds = {
        "relu_in_if": {"x": rng.standard_normal((6, 4)).astype(np.float32), "flag": np.array(True)},
        "matmul_tokens": {"x": rng.standard_normal((3, 5, 8)).astype(np.float32)},
        "conv": {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)},
    }[factory]
    results = []
    for forget_rank in (False, True):
        sites = find_sites(model, ("relu",))
        if forget_rank:
            for site in sites:
                site.rank = None
        inst = instrument(model, sites, 0.0, None)
        session = ort.InferenceSession(inst.SerializeToString(), providers=["CPUExecutionProvider"])
        out = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
        counts = []
        for site in sites:
            acc = HostAccumulator(site)
            acc.add({key: out[name] for key, name in site.outputs.items()})
            counts.append((acc.positive.tolist() if acc.positive is not None else None, acc.elements))
        results.append(counts)
    assert results[0] == results[1]
    assert results[1][0][0] is not None


def test_relu_inside_scan_body(tmp_path):
    from onnx_graphs import relu_in_scan

    model, w, u, b = relu_in_scan(steps=5)
    rng = np.random.default_rng(13)
    seq = rng.standard_normal((5, 7, 4)).astype(np.float32)  # [T, N, 4]: samples on axis 1
    h0 = np.zeros((7, 3), np.float32)
    np.savez(tmp_path / "d.npz", seq=seq, h0=h0)
    report = scan(
        _save(model, tmp_path), str(tmp_path / "d.npz"), device="cpu", batch_size=3, batch_axes={"seq": 1}
    )
    assert [layer.name for layer in report.layers] == ["scan/body/scan_relu"]
    layer = report.layers[0]
    h, positives = h0.astype(np.float64), np.zeros(3, np.int64)
    for t in range(5):  # the recurrence, written out
        pre = seq[t].astype(np.float64) @ w + h @ u + b
        positives += (pre > 0).sum(0)
        h = np.maximum(pre, 0)
    np.testing.assert_array_equal(layer.positive_counts, positives)
    assert layer.elements_per_unit == 5 * 7
    assert 1 in np.flatnonzero(layer.dead_mask()).tolist()


def test_onnx_scan_does_not_import_torch(tmp_path):
    """`deadrelu scan model.onnx` runs without torch (2 s of import, the bulk of a small scan's time), and
    still counts right: checked against numpy on the graph's own Relu input."""
    model = conv_relu_hardswish()
    path = _save(model, tmp_path)
    x = np.random.default_rng(3).standard_normal((5, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    code = (
        "import json, sys\n"
        "from deadrelu_cli.cli.app import main\n"
        f"args = ['scan', {path!r}, '--data', {str(tmp_path / 'x.npz')!r}, '--json', {str(tmp_path / 'r.json')!r}]\n"
        "try:\n    main(args)\nexcept SystemExit as e:\n    assert e.code in (0, 1, None), e.code\n"
        "heavy = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
        "assert not heavy, heavy[:5]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    relu = next(layer for layer in report["layers"] if layer["op"] == "relu")
    positives, maximum, _ = relu_inputs_ground_truth(model, {"x": x}, {"relu": 1})["relu"]
    assert relu["positive_counts"] == positives.tolist()
    assert np.allclose(relu["max_preactivation"], maximum)


def _relu_and_hardswish_model(batch_dim) -> onnx.ModelProto:
    """x [batch, 4] -> MatMul -> Relu (a layer), and a HardSwish written x * Clip(x + 3, 0, 6) / 6."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((4, 5)).astype(np.float32)
    w[:, 2] = -1.0  # unit 2 dead on non-negative inputs
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["a"], name="fc"),
            helper.make_node("Relu", ["a"], ["r"], name="act"),
            helper.make_node("Add", ["r", "three"], ["r3"], name="plus3"),
            helper.make_node("Clip", ["r3", "zero", "six"], ["c"], name="hs_clip"),
            helper.make_node("Mul", ["r", "c"], ["m"], name="hs_mul"),
            helper.make_node("Div", ["m", "six"], ["y"], name="hs_div"),
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch_dim, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch_dim, 5])],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array(3.0, np.float32), "three"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
            numpy_helper.from_array(np.array(6.0, np.float32), "six"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("batch_dim", [-1, "N"])
def test_a_batch_axis_declared_minus_one_is_free_not_fixed(tmp_path, batch_dim):
    """PaddlePaddle exports write the batch axis as -1: a free axis. It used to be taken as a batch fixed
    at -1: every layer "not run", exit 0."""
    x = np.abs(np.random.default_rng(1).standard_normal((10, 4))).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    report = scan(
        _save(_relu_and_hardswish_model(batch_dim), tmp_path), str(tmp_path / "x.npy"), device="cpu"
    )
    w = numpy_helper.to_array(_relu_and_hardswish_model(batch_dim).graph.initializer[0])
    pre = x.astype(np.float64) @ w.astype(np.float64)
    layer = report.layers[0]
    np.testing.assert_array_equal(layer.positive_counts, (pre > 0).sum(0))
    assert layer.elements_per_unit == 10 and layer.positive_counts[2] == 0
    assert not [note for note in report.notes if "fix the batch size" in note], report.notes


def test_inspect_suggests_only_ops_that_scan_takes(tmp_path, cli):
    """A HardSwish's inner clamp is listed by inspect (op hardswish_part), but --ops does not take it: the
    suggested --ops line must work as pasted."""
    path = _save(_relu_and_hardswish_model("N"), tmp_path)
    listed = cli("inspect", path)
    assert listed.code == 0 and "hardswish_part" in listed.out, listed
    suggestion = [line for line in listed.out.splitlines() if "add --ops" in line]
    assert not suggestion or "hardswish_part" not in suggestion[0], suggestion
    np.save(tmp_path / "x.npy", np.ones((2, 4), np.float32))
    for line in suggestion:
        ops = line.split("add --ops ")[1].split()[0]
        assert cli("scan", path, "--data", tmp_path / "x.npy", "--ops", ops, "-q").code == 0


def test_spatial_axes_declared_minus_one_count_every_position(tmp_path, onnx_counting):
    """A conv model whose input says [-1, 3, -1, -1] (shape inference carries the -1s on): no H*W of -1
    taken as static, both ways of counting."""
    rng = np.random.default_rng(8)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["a"], pads=[1, 1, 1, 1], name="conv"),
            helper.make_node("Relu", ["a"], ["y"], name="act"),
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [-1, 3, -1, -1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [-1, 4, -1, -1])],
        [numpy_helper.from_array(w, "w")],
    )
    model = onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )
    x = rng.standard_normal((6, 3, 5, 7)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    report = scan(_save(model, tmp_path), str(tmp_path / "x.npy"), batch_size=4, device="cpu")
    import onnxruntime as ort

    graph.output.append(helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, None))
    plain = ort.InferenceSession(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    pre = plain.run(["a"], {"x": x})[0]
    rows = np.moveaxis(pre, 1, -1).reshape(-1, 4).astype(np.float64)
    layer = report.layers[0]
    np.testing.assert_array_equal(layer.positive_counts, (rows > 0).sum(0))
    np.testing.assert_allclose(layer.sum_abs, np.maximum(rows, 0).sum(0), rtol=1e-5)
    assert layer.elements_per_unit == 6 * 5 * 7
