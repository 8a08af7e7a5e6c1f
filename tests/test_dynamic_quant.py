"""A dynamically quantized model (ONNX: onnxruntime.quantization.quantize_dynamic, whose
DynamicQuantizeLinear takes one scale for the whole batch; torch: torch.ao's quantize_dynamic, its
quantized::linear_dynamic the same) makes every sample's activations depend on the samples batched with it.
The scan runs each sample alone by default and says so; with --batch-size N it says its counts are for
those batches. Ground truth: the model run one sample (or one batch) at a time, by onnxruntime with its
ReLU's input added as an output or by the eager module with a forward hook, counted in numpy."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from deadrelu_cli import scan


def _quantized(tmp_path, batch="batch") -> tuple[str, str]:
    """Float MatMul (16 -> 24) + Relu, dynamically quantized by onnxruntime's own quantizer; the name of
    the ReLU's input in the quantized graph."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(4)
    w = rng.standard_normal((16, 24)).astype(np.float32)
    b = (rng.standard_normal(24) - 0.5).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["xw"], name="fc"),
            helper.make_node("Add", ["xw", "b"], ["a"], name="bias"),
            helper.make_node("Relu", ["a"], ["y"], name="act"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 24])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    float_path, quant_path = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(float_path))
    quantize_dynamic(str(float_path), str(quant_path), weight_type=QuantType.QInt8)
    quantized = onnx.load(str(quant_path))
    assert any(node.op_type == "DynamicQuantizeLinear" for node in quantized.graph.node)
    relu = next(node for node in quantized.graph.node if node.op_type == "Relu")
    return str(quant_path), relu.input[0]


def _counts(path: str, pre: str, x: np.ndarray, batch: int) -> np.ndarray:
    """Per unit, how often the ReLU's input is > 0 when the model runs batches of `batch` samples."""
    model = onnx.load(path)
    model.graph.output.append(helper.make_tensor_value_info(pre, TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    runs = [session.run([pre], {"x": x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return (np.concatenate(runs) > 0).sum(axis=0)


def test_each_sample_alone_by_default_and_said(tmp_path):
    path, pre = _quantized(tmp_path)
    x = np.random.default_rng(7).standard_normal((24, 16)).astype(np.float32)
    x[5] *= 30.0  # one sample with a wide range: its batch's scale coarsens every other sample's values
    np.save(tmp_path / "x.npy", x)
    alone, batched = _counts(path, pre, x, 1), _counts(path, pre, x, 8)
    assert not np.array_equal(alone, batched)  # the model itself depends on the batching here
    report = scan(path, str(tmp_path / "x.npy"), device="cpu")
    np.testing.assert_array_equal(report.layers[0].positive_counts, alone)
    assert any("each sample was run alone (batch 1)" in note for note in report.notes), report.notes
    assert any("1 DynamicQuantizeLinear" in note for note in report.notes)


@pytest.mark.parametrize("batch", [8, "auto"])
def test_batches_the_user_asks_for_are_said_to_depend_on_the_batching(tmp_path, batch):
    path, pre = _quantized(tmp_path)
    x = np.random.default_rng(7).standard_normal((24, 16)).astype(np.float32)
    x[5] *= 30.0
    np.save(tmp_path / "x.npy", x)
    report = scan(path, str(tmp_path / "x.npy"), batch_size=batch, device="cpu")
    said = [note for note in report.notes if "quantizes its activations per run" in note]
    assert len(said) == 1 and f"--batch-size {batch}" in said[0], report.notes
    if batch == 8:
        np.testing.assert_array_equal(report.layers[0].positive_counts, _counts(path, pre, x, 8))


@pytest.mark.parametrize("asked", [None, 4])
def test_a_batch_the_graph_fixes_is_said_without_offering_batch_one(tmp_path, asked):
    """The graph takes batches of 4 only: the note says the counts are for those, and offers no
    --batch-size 1 (which the graph would refuse)."""
    path, pre = _quantized(tmp_path, batch=4)
    x = np.random.default_rng(7).standard_normal((24, 16)).astype(np.float32)
    x[5] *= 30.0
    np.save(tmp_path / "x.npy", x)
    options = {} if asked is None else {"batch_size": asked}
    report = scan(path, str(tmp_path / "x.npy"), device="cpu", **options)
    said = [note for note in report.notes if "quantizes its activations per run" in note]
    assert len(said) == 1 and "batches of 4, the size the model's inputs fix" in said[0], report.notes
    assert "--batch-size 1" not in said[0]
    np.testing.assert_array_equal(report.layers[0].positive_counts, _counts(path, pre, x, 4))


def test_batch_one_asked_for_says_nothing_more(tmp_path):
    path, _ = _quantized(tmp_path)
    np.save(tmp_path / "x.npy", np.random.default_rng(7).standard_normal((6, 16)).astype(np.float32))
    report = scan(path, str(tmp_path / "x.npy"), batch_size=1, device="cpu")
    assert not [note for note in report.notes if "quantizes its activations" in note], report.notes


def _torch_quantized():
    """A float MLP and its torch.ao dynamic int8 version (the ReLU stays a float nn.ReLU)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 4)).eval()
    with warnings.catch_warnings():  # torch.ao.quantization's own deprecation notice
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def _torch_counts(model, x: np.ndarray, batch: int) -> np.ndarray:
    """Per unit of the ReLU, how often its input is > 0 when the model runs batches of `batch` samples
    (a forward hook on the eager module, numpy)."""
    import torch

    seen = []
    hook = model[1].register_forward_hook(lambda module, args, out: seen.append(args[0].numpy().copy()))
    with torch.no_grad():
        for i in range(0, len(x), batch):
            model(torch.from_numpy(x[i : i + batch]))
    hook.remove()
    return (np.concatenate(seen) > 0).sum(axis=0)


def test_torchscript_dynamic_int8_each_sample_alone_by_default(tmp_path):
    import torch

    from deadrelu_cli.backends.torch.scan import dynamic_quantizers

    model = _torch_quantized()
    x = np.random.default_rng(7).standard_normal((24, 16)).astype(np.float32)
    x[5] *= 30.0
    traced = torch.jit.trace(model, torch.from_numpy(x[:2]))
    traced.save(str(tmp_path / "q.pt"))
    np.save(tmp_path / "x.npy", x)
    alone, batched = _torch_counts(model, x, 1), _torch_counts(model, x, 8)
    assert not np.array_equal(alone, batched)
    # quantized::linear_dynamic is not pure tensor math to the safe loader: the user trusts the file
    report = scan(str(tmp_path / "q.pt"), str(tmp_path / "x.npy"), device="cpu", trust_pickle=True)
    np.testing.assert_array_equal(report.layers[0].positive_counts, alone)
    assert any("each sample was run alone (batch 1)" in note for note in report.notes), report.notes
    report = scan(
        str(tmp_path / "q.pt"), str(tmp_path / "x.npy"), batch_size=8, device="cpu", trust_pickle=True
    )
    np.testing.assert_array_equal(report.layers[0].positive_counts, batched)
    assert any("(--batch-size 8)" in note for note in report.notes), report.notes
    assert dynamic_quantizers(model) == "2 dynamic Linear"  # the eager module, as --arch builds it
    assert dynamic_quantizers(torch.jit.load(str(tmp_path / "q.pt"))) == "2 quantized::linear_dynamic"


def test_float16_dynamic_layers_quantize_no_activations():
    import torch
    from torch import nn

    from deadrelu_cli.backends.torch.scan import dynamic_quantizers

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.float16)
    assert dynamic_quantizers(half) == "" and dynamic_quantizers(model) == ""


def test_parts_scanned_with_different_batches_do_not_merge(tmp_path):
    """Counts of a per-batch-quantized model depend on the batches: parts scanned one sample at a time
    merge exactly (their sum is the whole's), a part scanned in batches of 8 beside them is refused."""
    from deadrelu_cli.errors import UserError
    from deadrelu_cli.report.model import merge_reports

    path, pre = _quantized(tmp_path)
    x = np.random.default_rng(7).standard_normal((24, 16)).astype(np.float32)
    x[5] *= 30.0
    np.save(tmp_path / "a.npy", x[:12])
    np.save(tmp_path / "b.npy", x[12:])
    alone = [scan(path, str(tmp_path / f"{h}.npy"), device="cpu") for h in "ab"]
    merged = merge_reports(alone)
    np.testing.assert_array_equal(merged.layers[0].positive_counts, _counts(path, pre, x, 1))
    batched = scan(path, str(tmp_path / "b.npy"), batch_size=8, device="cpu")
    with pytest.raises(
        UserError, match="quantizes its activations per batch, scanned with different batches"
    ):
        merge_reports([alone[0], batched])
