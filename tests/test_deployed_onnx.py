"""Deployed ONNX graphs (issue 19): onnxruntime-optimized (fused), int8 QDQ and QOperator, fixed batch.

Everything is built here from one small float CNN exported with torch.onnx.export; the ground truth comes
from running each graph with the relevant tensors exposed as outputs and counting in numpy."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from torch import nn

DEAD_C2 = [0, 1, 2]  # bias -50: never fire
CONSTANT_C2 = 3  # zero weights, bias +1: always exactly 1.0
DEAD_FC = [0, 1]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 6)
        self.fc2 = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x)).flatten(1)
        return self.fc2(torch.relu(self.fc(x)))


class _Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray) -> None:
        self.batches = iter([{"x": x[i : i + 4]} for i in range(0, len(x), 4)])

    def get_next(self):
        return next(self.batches, None)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """float.onnx, opt.onnx (ORT_ENABLE_EXTENDED), qdq.onnx, qop.onnx, b1.onnx (fixed batch 1), data.npz."""
    root = tmp_path_factory.mktemp("deployed")
    torch.manual_seed(0)
    net = _Net().eval()
    with torch.no_grad():
        net.c2.bias[DEAD_C2] = -50.0
        net.c2.weight[CONSTANT_C2] = 0.0
        net.c2.bias[CONSTANT_C2] = 1.0
        net.fc.bias[DEAD_FC] = -50.0
    x = np.random.default_rng(0).standard_normal((20, 3, 8, 8)).astype(np.float32)
    np.savez(root / "data.npz", x=x)
    sample = torch.from_numpy(x[:1])
    common = dict(dynamo=False, input_names=["x"], output_names=["y"], opset_version=17)
    torch.onnx.export(net, sample, str(root / "float.onnx"), dynamic_axes={"x": {0: "n"}}, **common)
    torch.onnx.export(net, sample, str(root / "b1.onnx"), **common)
    for fmt, name in ((QuantFormat.QDQ, "qdq"), (QuantFormat.QOperator, "qop")):
        quantize_static(
            str(root / "float.onnx"),
            str(root / f"{name}.onnx"),
            _Reader(x),
            quant_format=fmt,
            activation_type=QuantType.QUInt8 if name == "qdq" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(root / "opt.onnx")
    ort.InferenceSession(str(root / "float.onnx"), options, providers=["CPUExecutionProvider"])
    return root, x


def _run_exposing(path, names: list[str], x: np.ndarray) -> list[np.ndarray]:
    """Run the graph with `names` as its outputs (plain onnxruntime)."""
    model = onnx.load(str(path))
    del model.graph.output[:]
    for name in names:
        value = onnx.ValueInfoProto()
        value.name = name
        model.graph.output.append(value)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _per_unit(array: np.ndarray) -> np.ndarray:
    """[N, C, ...] or [N, C] -> [C, everything else]."""
    return np.moveaxis(array, 1, 0).reshape(array.shape[1], -1)


def _scan(cli, root, name: str, *extra: str, data=None) -> dict:
    data = data or root / "data.npz"
    result = cli("scan", root / f"{name}.onnx", "--data", data, "--json", "-", "-q", *extra)
    assert result.code == 0, result.err
    return result.json()


def _const(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


def test_float_counts_match_numpy(cli, deployed):
    root, x = deployed
    relus = [n.output[0] for n in onnx.load(str(root / "float.onnx")).graph.node if n.op_type == "Relu"]
    truth = [(_per_unit(a) > 0).sum(axis=1) for a in _run_exposing(root / "float.onnx", relus, x)]
    report = _scan(cli, root, "float")
    assert [layer["positive_counts"] for layer in report["layers"]] == [t.tolist() for t in truth]
    assert report["layers"][1]["dead_indices"] == DEAD_C2
    assert set(DEAD_FC) <= set(report["layers"][2]["dead_indices"])


def test_optimized_graph_gives_the_float_graphs_dead_units(cli, deployed):
    root, _ = deployed
    fused = [n.op_type for n in onnx.load(str(root / "opt.onnx")).graph.node if n.domain == "com.microsoft"]
    assert fused.count("FusedConv") == 2 and "FusedGemm" in fused  # the activations are inside fused nodes
    float_report, opt_report = _scan(cli, root, "float"), _scan(cli, root, "opt")
    assert len(opt_report["layers"]) == 3
    for a, b in zip(float_report["layers"], opt_report["layers"], strict=True):
        assert a["dead_indices"] == b["dead_indices"]
        assert a["positive_counts"] == b["positive_counts"]
        assert b["implicit"] == "fused" and b["module_type"] in ("FusedConv", "FusedGemm")
        assert a["weight"] == b["weight"]  # c1.weight, c2.weight, fc.weight in both
        np.testing.assert_allclose(a["max_preactivation"], b["max_preactivation"], rtol=1e-5, atol=1e-5)
    assert any("FusedConv ×2" in note for note in opt_report["notes"])


def _implicit_quantizes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """QuantizeLinear nodes right after a Conv/Gemm whose zero point is the type's minimum (test's own)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    found = []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or producers.get(node.input[0]) is None:
            continue
        zero = _const(model, node.input[2])
        if producers[node.input[0]].op_type in ("Conv", "Gemm") and zero == np.iinfo(zero.dtype).min:
            found.append(node)
    return found


def test_qdq_int8_counts_are_exact(cli, deployed):
    root, x = deployed
    model = onnx.load(str(root / "qdq.onnx"))
    assert not [n for n in model.graph.node if n.op_type == "Relu"]  # the quantizer folded every Relu
    quantizes = _implicit_quantizes(model)
    assert len(quantizes) == 3
    values = _run_exposing(
        root / "qdq.onnx", [q.output[0] for q in quantizes] + [q.input[0] for q in quantizes], x
    )
    report = _scan(cli, root, "qdq")
    assert len(report["layers"]) == 3
    for q, quantized, pre, layer in zip(quantizes, values[:3], values[3:], report["layers"], strict=True):
        zero = _const(model, q.input[2]).astype(np.int64)
        scale = float(_const(model, q.input[1]))
        fired = _per_unit(quantized.astype(np.int64)) > zero
        dequantized = (_per_unit(quantized.astype(np.int64)) - zero) * np.float32(scale)
        assert layer["op"] == "relu" and layer["implicit"] == "quantize"
        assert layer["module_type"] == "QuantizeLinear"
        assert layer["positive_counts"] == fired.sum(axis=1).tolist()
        assert layer["positive_counts"] == (dequantized > 0).sum(axis=1).tolist()
        assert layer["elements_per_unit"] == fired.shape[1]
        np.testing.assert_allclose(layer["sum_abs"], dequantized.sum(axis=1), rtol=1e-5)
        np.testing.assert_allclose(layer["max_preactivation"], _per_unit(pre).max(axis=1), rtol=1e-6)
        assert layer["weight"].endswith("weight_quantized")
    assert report["layers"][1]["dead_indices"] == DEAD_C2
    assert set(DEAD_FC) <= set(report["layers"][2]["dead_indices"])


def test_qoperator_counts_are_exact(cli, deployed):
    root, x = deployed
    model = onnx.load(str(root / "qop.onnx"))
    ops = {"QLinearConv": 7, "QGemm": 8}  # where each keeps its output zero point
    nodes = [
        n
        for n in model.graph.node
        if n.op_type in ops and (z := _const(model, n.input[ops[n.op_type]])) == np.iinfo(z.dtype).min
    ]
    assert [n.op_type for n in nodes] == ["QLinearConv", "QLinearConv", "QGemm"]
    values = _run_exposing(root / "qop.onnx", [n.output[0] for n in nodes], x)
    report = _scan(cli, root, "qop")
    assert len(report["layers"]) == 3
    for node, quantized, layer in zip(nodes, values, report["layers"], strict=True):
        zero = int(_const(model, node.input[ops[node.op_type]]))
        assert layer["implicit"] == "quantize" and layer["module_type"] == node.op_type
        assert layer["positive_counts"] == (_per_unit(quantized.astype(np.int64)) > zero).sum(axis=1).tolist()
    assert report["layers"][1]["dead_indices"] == DEAD_C2


def test_diff_and_baseline_match_deployed_layers_to_float_ones(cli, deployed, tmp_path):
    root, _ = deployed
    reports = {}
    for name in ("float", "qdq", "qop"):
        reports[name] = tmp_path / f"{name}.json"
        reports[name].write_text(json.dumps(_scan(cli, root, name)))
    shown = cli("diff", reports["float"], reports["qdq"], "--all")
    assert shown.code == 0
    assert shown.out.count("←") == 3 and "(absent)" not in shown.out  # every int8 layer met its float one
    assert cli("gate", reports["qop"], "--baseline", reports["float"], "-q").code == 0
    # a float baseline with fewer dead units in c2: the int8 graph has more, and the gate says so
    fewer = json.loads(reports["float"].read_text())
    fewer["layers"][1]["positive_counts"] = [1] * 8
    reports["fewer"] = tmp_path / "fewer.json"
    reports["fewer"].write_text(json.dumps(fewer))
    failed = cli("gate", reports["qdq"], "--baseline", reports["fewer"], "-q")
    assert failed.code == 1
    assert "layer /Relu_1_output_0: dead fraction grew" in failed.err


def test_fixed_batch_model_scans_with_its_batch_by_default(cli, deployed):
    root, x = deployed
    assert onnx.load(str(root / "b1.onnx")).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    result = cli("scan", root / "b1.onnx", "--data", root / "data.npz", "--json", "-")
    assert result.code == 0, result.err
    assert result.json()["layers"][1]["dead_indices"] == DEAD_C2
    assert any("fix the batch size at 1" in note for note in result.json()["notes"])
    wrong = cli("scan", root / "b1.onnx", "--data", root / "data.npz", "--batch-size", "4")
    assert wrong.code == 2
    assert "index: 0 Got: 4 Expected: 1" in wrong.err and "Traceback" not in wrong.err


def _onnx_without_relu(path, op: str, domain: str = ""):
    """x[N,4] -> Gemm -> OP -> y, and for QLinearLeakyRelu the quantize/dequantize around it."""
    from onnx import TensorProto, helper

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    inits = [w]
    if op == "Tanh":
        nodes = [helper.make_node("Gemm", ["x", "w"], ["h"]), helper.make_node("Tanh", ["h"], ["y"])]
    else:
        inits += [
            numpy_helper.from_array(np.array(0.1, np.float32), "s"),
            numpy_helper.from_array(np.array(128, np.uint8), "z"),
        ]
        nodes = [
            helper.make_node("Gemm", ["x", "w"], ["h"]),
            helper.make_node("QuantizeLinear", ["h", "s", "z"], ["hq"]),
            helper.make_node(op, ["hq", "s", "z", "s", "z"], ["lq"], domain=domain, alpha=0.1),
            helper.make_node("DequantizeLinear", ["lq", "s", "z"], ["y"]),
        ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        initializer=inits,
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_gate_fails_on_a_model_with_no_scanned_site(cli, tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32))
    model = _onnx_without_relu(tmp_path / "tanh.onnx", "Tanh")
    failed = cli("scan", model, "--data", data, "--max-dead", "0", "--json", tmp_path / "r.json")
    assert failed.code == 1
    assert "no activation site was scanned" in failed.err and "gate passed" not in failed.err
    assert "Tanh: smooth activations" in " ".join(failed.out.split())
    assert cli("scan", model, "--data", data, "--max-dead", "0", "--allow-no-sites").code == 0
    assert cli("gate", tmp_path / "r.json", "--max-dead", "0").code == 1
    assert cli("gate", tmp_path / "r.json", "--max-dead", "0", "--allow-no-sites").code == 0


def test_activations_the_tool_cannot_see_are_named(cli, tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32))
    model = _onnx_without_relu(tmp_path / "qleaky.onnx", "QLinearLeakyRelu", "com.microsoft")
    result = cli("scan", model, "--data", data, "--max-dead", "0")
    assert result.code == 1
    err = " ".join((result.out + result.err).split())
    assert "activations deadrelu cannot see" in err and "com.microsoft.QLinearLeakyRelu ×1" in err
    assert "smooth" not in err  # the graph has no smooth activation to blame


def test_explain_lists_constant_channels(cli, deployed, tmp_path):
    root, x = deployed
    relus = [n.output[0] for n in onnx.load(str(root / "float.onnx")).graph.node if n.op_type == "Relu"]
    outputs = _run_exposing(root / "float.onnx", relus, x)
    report = _scan(cli, root, "float", "--explain")
    for layer, out in zip(report["layers"], outputs, strict=True):
        units = _per_unit(out)
        constant = units.min(axis=1) == units.max(axis=1)
        zero = constant & (units.max(axis=1) == 0)
        found = layer.get("extra", {}).get("constant_channels", {"all_zero": [], "single_value": []})
        assert found["all_zero"] == np.flatnonzero(zero).tolist()
        assert found["single_value"] == np.flatnonzero(constant & ~zero).tolist()
    assert report["layers"][1]["extra"]["constant_channels"] == {
        "all_zero": DEAD_C2,
        "single_value": [CONSTANT_C2],
    }
    # the per-unit minimum merges exactly: two halves give the whole
    halves = []
    for i, part in enumerate((x[:9], x[9:])):
        np.savez(tmp_path / f"h{i}.npz", x=part)
        halves.append(tmp_path / f"h{i}.json")
        assert (
            cli(
                "scan",
                root / "float.onnx",
                "--data",
                tmp_path / f"h{i}.npz",
                "--explain",
                "--json",
                halves[-1],
            ).code
            == 0
        )
    merged = cli("merge", *halves).json()
    for a, b in zip(merged["layers"], report["layers"], strict=True):
        assert a["min_preactivation"] == pytest.approx(b["min_preactivation"], rel=1e-6)


def test_fix_on_deployed_graphs_refuses_or_works_never_crashes(cli, deployed, tmp_path):
    root, _ = deployed
    for strategy in ("reinit", "leaky", "bias-shift", "prune"):
        result = cli(
            "fix",
            root / "qdq.onnx",
            "--data",
            root / "data.npz",
            "--strategy",
            strategy,
            "-o",
            tmp_path / f"q_{strategy}.onnx",
        )
        assert result.code == 2, (strategy, result.err)
        assert "folded into a QuantizeLinear" in result.err and "Traceback" not in result.err
    fixed = cli(
        "fix",
        root / "opt.onnx",
        "--data",
        root / "data.npz",
        "--strategy",
        "reinit",
        "-o",
        tmp_path / "o.onnx",
    )
    assert fixed.code == 0, fixed.err
    rescanned = _scan(cli, tmp_path, "o", data=root / "data.npz")
    assert [layer["dead"] for layer in rescanned["layers"]][:2] == [0, 0]


def test_ci_doc_deployed_section_runs_as_written(cli, tmp_path, monkeypatch):
    """docs/ci.md 'Gating deployed graphs': its quantize.py and `$ …` commands, on the bundled CNN."""
    import shlex
    import shutil
    import subprocess
    import sys

    from conftest import ROOT

    text = (ROOT / "docs" / "ci.md").read_text()
    section = text.split("## Gating deployed graphs", 1)[1].split("\n## ", 1)[0]
    script = section.split("```python\n", 1)[1].split("```", 1)[0]
    commands = [line[2:] for line in section.splitlines() if line.startswith("$ ")]
    assert commands[0] == "python quantize.py" and len(commands) == 6
    for name in ("model.onnx", "calib.npz"):
        shutil.copy(ROOT / "sample_models" / "cnn" / name, tmp_path / name)
    (tmp_path / "quantize.py").write_text(script)
    monkeypatch.chdir(tmp_path)
    subprocess.run([sys.executable, "quantize.py"], check=True, capture_output=True)
    for command in commands[1:]:
        result = cli(*shlex.split(command)[1:])
        assert result.code == 0, (command, result.err)
    shown = cli("diff", "float.json", "int8.json", "--all")
    assert shown.out.count("←") == 3
    int8 = json.loads((tmp_path / "int8.json").read_text())
    assert [layer["implicit"] for layer in int8["layers"]] == ["quantize"] * 3


def test_explain_constant_channels_of_a_torch_model(cli, tmp_path):
    """The torch probe records the per-unit minimum under --explain too: a channel with zero weights and
    a positive bias is constant (one value), checked against the module's own pre-activation."""
    from conftest import arch_file, save_npz, save_state_dict

    source = (
        "import torch\nfrom torch import nn\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    m = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU())\n"
        "    with torch.no_grad():\n"
        "        m[0].weight[2] = 0.0; m[0].bias[2] = 0.5; m[0].bias[4] = -40.0\n"
        "    return m\n"
    )
    module, spec = arch_file(tmp_path / "arch.py", source)
    x = np.random.default_rng(1).standard_normal((10, 3, 6, 6)).astype(np.float32)
    with torch.no_grad():
        out = _per_unit(module(torch.from_numpy(x)).numpy())
    constant = out.min(axis=1) == out.max(axis=1)
    zero = constant & (out.max(axis=1) == 0)
    result = cli(
        "scan",
        save_state_dict(module, tmp_path / "m.pt"),
        "--arch",
        spec,
        "--data",
        save_npz(tmp_path / "d.npz", x=x),
        "--explain",
        "--json",
        "-",
    )
    assert result.code == 0, result.err
    found = result.json()["layers"][0]["extra"]["constant_channels"]
    assert found == {
        "all_zero": np.flatnonzero(zero).tolist(),
        "single_value": np.flatnonzero(constant & ~zero).tolist(),
    }
    assert found == {"all_zero": [4], "single_value": [2]}


class _WideNet(nn.Module):
    """16 channels stay in onnxruntime's blocked layout from conv to conv; 8 are padded to a block."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.c3 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 4)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        return self.fc(torch.relu(self.c3(x)).flatten(1))


def _nchwc_convs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [
        n
        for n in model.graph.node
        if n.domain == "com.microsoft.nchwc"
        and n.op_type == "Conv"
        and any(a.name == "activation" for a in n.attribute)
    ]


@pytest.fixture(scope="module")
def nchwc(tmp_path_factory):
    """wide.onnx (float) and all.onnx (saved by onnxruntime with ORT_ENABLE_ALL on CPU), data.npz."""
    root = tmp_path_factory.mktemp("nchwc")
    torch.manual_seed(1)
    net = _WideNet().eval()
    with torch.no_grad():
        net.c2.bias[[0, 5]] = -50.0
        net.c3.bias[[1]] = -50.0
    x = np.random.default_rng(1).standard_normal((12, 3, 8, 8)).astype(np.float32)
    np.savez(root / "data.npz", x=x)
    torch.onnx.export(
        net,
        torch.from_numpy(x[:1]),
        str(root / "wide.onnx"),
        dynamo=False,
        input_names=["x"],
        output_names=["y"],
        opset_version=17,
        dynamic_axes={"x": {0: "n"}},
    )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(root / "all.onnx")
    options.log_severity_level = 3  # onnxruntime warns that the saved graph is hardware specific
    ort.InferenceSession(str(root / "wide.onnx"), options, providers=["CPUExecutionProvider"])
    if not _nchwc_convs(onnx.load(str(root / "all.onnx"))):
        pytest.skip("onnxruntime wrote no nchwc Conv on this CPU (it has no NCHWc kernels here)")
    return root, x


def test_ort_enable_all_nchwc_graph_gives_the_float_graphs_counts(cli, nchwc):
    root, x = nchwc
    optimized = onnx.load(str(root / "all.onnx"))
    assert len(_nchwc_convs(optimized)) == 3  # every ReLU sits inside a blocked-layout Conv
    relus = [n for n in onnx.load(str(root / "wide.onnx")).graph.node if n.op_type == "Relu"]
    values = _run_exposing(root / "wide.onnx", [n.output[0] for n in relus] + [n.input[0] for n in relus], x)
    outs, pres = values[:3], values[3:]
    report = _scan(cli, root, "all")
    assert [layer["name"] for layer in report["layers"]] == [n.output[0] for n in relus]
    real = [16, 16, 8]  # the model's channels, not the padded block
    assert [layer["units"] for layer in report["layers"]] == real
    for layer, out, pre in zip(report["layers"], outs, pres, strict=True):
        assert layer["implicit"] == "fused" and layer["module_type"] == "nchwc.Conv"
        assert layer["positive_counts"] == (_per_unit(out) > 0).sum(axis=1).tolist()
        assert layer["dead_indices"] == np.flatnonzero((_per_unit(out) > 0).sum(axis=1) == 0).tolist()
        np.testing.assert_allclose(
            layer["max_preactivation"], _per_unit(pre).max(axis=1), rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(layer["sum_abs"], _per_unit(out).sum(axis=1), rtol=1e-4)
    assert {0, 5} <= set(report["layers"][1]["dead_indices"]) and 1 in report["layers"][2]["dead_indices"]
    # the deployed graph's own NCHW tensors (after its ReorderOutput nodes) give the same counts
    reordered = [
        n.output[0]
        for n in optimized.graph.node
        if n.op_type == "ReorderOutput" and n.output[0] in report_names(report)
    ]
    assert reordered  # at least the 8-channel layer is reordered back to NCHW by onnxruntime itself
    by_name = {layer["name"]: layer for layer in report["layers"]}
    for name, out in zip(reordered, _run_exposing(root / "all.onnx", reordered, x), strict=True):
        assert by_name[name]["positive_counts"] == (_per_unit(out) > 0).sum(axis=1).tolist()
    assert "unseen_activations" not in report
    assert not any("cannot see" in note for note in report["notes"])
    assert cli("scan", root / "all.onnx", "--data", root / "data.npz", "--max-dead", "0.5", "-q").code == 0
    # fix never edits a copy the scan added: these sites are skipped with a reason
    refused = cli(
        "fix", root / "all.onnx", "--data", root / "data.npz", "--strategy", "leaky", "-o", root / "f.onnx"
    )
    assert refused.code == 2 and "nchwc" in refused.err and "Traceback" not in refused.err


def _relu_dw_hardswish(path):
    """x -> Conv(3->16) + Relu -> depthwise Conv + Relu -> Conv(16->16) + HardSwish -> pool, by
    onnx.helper; units 2 and 7 of the depthwise layer are dead (bias -50)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(2)
    b2 = np.zeros(16, np.float32)
    b2[[2, 7]] = -50.0
    arrays = {
        "w1": (rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32),
        "b1": (rng.standard_normal(16) * 0.1).astype(np.float32),
        "w2": (rng.standard_normal((16, 1, 3, 3)) * 0.3).astype(np.float32),
        "b2": b2,
        "w3": (rng.standard_normal((16, 16, 3, 3)) * 0.2).astype(np.float32),
        "b3": np.zeros(16, np.float32),
    }
    pads = [1, 1, 1, 1]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=pads),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="dw", pads=pads, group=16),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3", pads=pads),
        helper.make_node("HardSwish", ["c3"], ["h3"], name="hardswish"),
        helper.make_node("GlobalAveragePool", ["h3"], ["y"], name="pool"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16, 1, 1])],
        initializer=[numpy_helper.from_array(a, name) for name, a in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_gate_stops_only_on_unseen_activations_of_the_scanned_ops(cli, tmp_path):
    """In an ORT_ENABLE_ALL graph, a fused HardSwish (not a scanned op, in no graph) is listed but does not
    stop the gate; a ReLU the scan cannot reach does. Both ReLUs here are reached — the one feeding a
    depthwise Conv too (its channel count read past the depthwise Conv) — with the float graph's counts
    (onnxruntime + numpy)."""
    float_path = _relu_dw_hardswish(tmp_path / "float.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "all.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(float_path), options, providers=["CPUExecutionProvider"])
    if len(_nchwc_convs(onnx.load(str(tmp_path / "all.onnx")))) != 3:
        pytest.skip("onnxruntime wrote no nchwc Conv on this CPU (it has no NCHWc kernels here)")
    x = np.random.default_rng(3).standard_normal((8, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    r1, r2 = _run_exposing(float_path, ["r1", "r2"], x)
    scan = ("scan", tmp_path / "all.onnx", "--data", tmp_path / "d.npz", "--max-dead", "1")
    passed = cli(*scan, "--json", tmp_path / "all.json")
    assert passed.code == 0 and "gate passed" in passed.err
    assert "not gated" in passed.err and "com.microsoft.nchwc.Conv(activation=HardSwish) ×1" in passed.err
    report = json.loads((tmp_path / "all.json").read_text())
    assert report["unseen_activations"] == {"com.microsoft.nchwc.Conv(activation=HardSwish)": 1}
    assert [layer["units"] for layer in report["layers"]] == [16, 16]
    for layer, out in zip(report["layers"], (r1, r2), strict=True):
        assert layer["positive_counts"] == (_per_unit(out) > 0).sum(axis=1).tolist()
    assert report["layers"][1]["dead_indices"] == [2, 7]
    gated = cli("gate", tmp_path / "all.json", "--max-dead", "1", "--markdown", tmp_path / "g.md")
    assert gated.code == 0 and "Not gated" in (tmp_path / "g.md").read_text()
    # a ReLU fused where the scan cannot reach it, as the scan records one, stops the gate
    report["unseen_activations"]["com.microsoft.nchwc.Conv(activation=Relu)"] = 1
    (tmp_path / "relu.json").write_text(json.dumps(report))
    failed = cli("gate", tmp_path / "relu.json", "--max-dead", "1")
    assert failed.code == 1
    (reason,) = [line for line in failed.err.splitlines() if "could not scan" in line]
    assert "com.microsoft.nchwc.Conv(activation=Relu) ×1" in reason and "HardSwish" not in reason
    assert cli("gate", tmp_path / "relu.json", "--max-dead", "1", "--allow-unseen").code == 0
    # a fused Clip may be a ReLU6 (its bounds are not in the label): it stops the gate
    report["unseen_activations"] = {"com.microsoft.FusedConv(activation=Clip)": 1}
    (tmp_path / "clip.json").write_text(json.dumps(report))
    assert cli("gate", tmp_path / "clip.json", "--max-dead", "1").code == 1
    assert cli("gate", tmp_path / "clip.json", "--max-dead", "1", "--allow-unseen").code == 0


def test_diff_and_baseline_pair_an_ort_enable_all_graph_with_the_float_graph(cli, nchwc, tmp_path):
    """onnxruntime renames the weights of an ORT_ENABLE_ALL graph (reorder_token_*), so no layer has a
    weight name to pair by; each pairs with the float layer whose Relu wrote the tensor onnxruntime named
    the nchwc Conv after (read from the float graph here), and the baseline gate compares every one."""
    root, x = nchwc
    relus = [n for n in onnx.load(str(root / "wide.onnx")).graph.node if n.op_type == "Relu"]
    float_json, all_json = tmp_path / "float.json", tmp_path / "all.json"
    float_json.write_text(json.dumps(_scan(cli, root, "wide")))
    optimized = _scan(cli, root, "all")
    all_json.write_text(json.dumps(optimized))
    assert all("weight" not in layer for layer in optimized["layers"])  # renamed: nothing to pair by
    expected = [f"{relu.output[0]} ← {relu.name}" for relu in relus]
    shown = cli("diff", float_json, all_json, "--all")
    assert shown.code == 0
    assert [line.split("  ")[0] for line in shown.out.splitlines()[2:5]] == expected
    assert "(absent)" not in shown.out
    # the dead units of each pair, counted with onnxruntime on the float graph: the same on both sides
    outs = _run_exposing(root / "wide.onnx", [relu.output[0] for relu in relus], x)
    for layer, out in zip(optimized["layers"], outs, strict=True):
        assert layer["dead_indices"] == np.flatnonzero((_per_unit(out) > 0).sum(axis=1) == 0).tolist()
    passed = cli("gate", all_json, "--baseline", float_json, "-q")
    assert passed.code == 0 and "not in the baseline" not in passed.err
    page = tmp_path / "r.html"  # the HTML report's baseline column pairs them the same way
    assert cli("report", all_json, "--html", page, "--baseline", float_json).code == 0
    assert "(new)" not in page.read_text()
    # every layer is compared: a baseline with fewer dead units in the second layer fails on that layer
    fewer = json.loads(float_json.read_text())
    fewer["layers"][1]["positive_counts"] = [1] * fewer["layers"][1]["units"]
    (tmp_path / "fewer.json").write_text(json.dumps(fewer))
    failed = cli("gate", all_json, "--baseline", tmp_path / "fewer.json", "-q")
    assert failed.code == 1 and f"layer {relus[1].output[0]}: dead fraction grew" in failed.err
    # a float report that does not record the tensors (an older deadrelu): nothing pairs, and the gate
    # fails saying so instead of comparing nothing
    older = json.loads(float_json.read_text())
    for layer in older["layers"]:
        del layer["output_tensor"]
    (tmp_path / "older.json").write_text(json.dumps(older))
    unpaired = cli("gate", all_json, "--baseline", tmp_path / "older.json", "-q")
    assert (
        unpaired.code == 1
        and "3 layer(s) of this report and 3 of the baseline could not be paired" in unpaired.err
    )
    assert unpaired.err.count("warning: layer") == 3
    assert cli("gate", all_json, "--baseline", tmp_path / "older.json", "-q", "--allow-unpaired").code == 0


def report_names(report: dict) -> set[str]:
    return {layer["name"] for layer in report["layers"]}


def _mixed_model(path):
    """x[N,4] -> Gemm -> Relu (visible) -> MatMul -> Q -> com.microsoft QLinearLeakyRelu (not scannable) -> DQ."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([0, 0, -50, 0, 0, 0], np.float32), "b"),
        numpy_helper.from_array(rng.standard_normal((6, 6)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array(0.1, np.float32), "s"),
        numpy_helper.from_array(np.array(128, np.uint8), "z"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"], name="relu1"),
        helper.make_node("MatMul", ["r", "w2"], ["h2"]),
        helper.make_node("QuantizeLinear", ["h2", "s", "z"], ["hq"]),
        helper.make_node(
            "QLinearLeakyRelu", ["hq", "s", "z", "s", "z"], ["lq"], domain="com.microsoft", alpha=0.1
        ),
        helper.make_node("DequantizeLinear", ["lq", "s", "z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 6])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_gate_fails_on_activations_the_scan_could_not_see(cli, tmp_path):
    import jsonschema
    from conftest import ROOT

    x = np.random.default_rng(4).standard_normal((10, 4)).astype(np.float32)
    data = tmp_path / "d.npz"
    np.savez(data, x=x)
    model = _mixed_model(tmp_path / "mixed.onnx")
    (relu,) = _run_exposing(model, ["r"], x)
    # a quantized LeakyReLU hides dead units of --ops leaky_relu: the gate stops on it
    leaky = ("--ops", "relu,leaky_relu")
    failed = cli("scan", model, "--data", data, *leaky, "--max-dead", "0.5", "--json", tmp_path / "r.json")
    assert failed.code == 1
    reason = [line for line in failed.err.splitlines() if "could not scan" in line]
    assert (
        len(reason) == 1
        and "com.microsoft.QLinearLeakyRelu ×1" in reason[0]
        and "--allow-unseen" in reason[0]
    )
    saved = json.loads((tmp_path / "r.json").read_text())
    jsonschema.validate(saved, json.loads((ROOT / "deadrelu_cli" / "report" / "schema_v2.json").read_text()))
    assert saved["unseen_activations"] == {"com.microsoft.QLinearLeakyRelu": 1}
    (layer,) = saved["layers"]  # the visible ReLU is still scanned exactly
    assert layer["positive_counts"] == (relu > 0).sum(axis=0).tolist() and layer["dead_indices"] == [2]
    assert cli("scan", model, "--data", data, *leaky, "--max-dead", "0.5", "--allow-unseen").code == 0
    assert cli("scan", model, "--data", data, *leaky).code == 0  # no gate limit: a note only
    # with the default --ops (relu, relu6) a LeakyReLU is not scanned in any graph: listed, not gated
    passed = cli("scan", model, "--data", data, "--max-dead", "0.5", "--json", tmp_path / "default.json")
    assert passed.code == 0 and "gate passed" in passed.err
    assert "not gated" in passed.err and "com.microsoft.QLinearLeakyRelu ×1" in passed.err
    assert json.loads((tmp_path / "default.json").read_text())["unseen_activations"] == {
        "com.microsoft.QLinearLeakyRelu": 1
    }
    # the saved report fails the same way; the flag, or the config key, lets it pass
    again = cli("gate", tmp_path / "r.json", "--max-dead", "0.5")
    assert again.code == 1 and "com.microsoft.QLinearLeakyRelu ×1" in again.err
    assert cli("gate", tmp_path / "r.json", "--max-dead", "0.5", "--allow-unseen").code == 0
    (tmp_path / "deadrelu.toml").write_text("allow-unseen = true\nmax-dead = 0.5\n")
    assert cli("gate", tmp_path / "r.json", "--config", tmp_path / "deadrelu.toml").code == 0
    # merged reports of one model keep its unseen nodes once; a hostile op name stays on one line
    # a second part of other samples (merge refuses one report twice, and the same samples reordered)
    np.savez(tmp_path / "d2.npz", x=x[::-1] + np.float32(0.25))
    cli("scan", model, "--data", tmp_path / "d2.npz", *leaky, "--json", tmp_path / "r2.json", "-q")
    assert cli("merge", tmp_path / "r.json", tmp_path / "r2.json").json()["unseen_activations"] == {
        "com.microsoft.QLinearLeakyRelu": 1
    }
    saved["unseen_activations"] = {"evil.Op\n::error::x": 2}
    (tmp_path / "evil.json").write_text(json.dumps(saved))
    evil = cli("gate", tmp_path / "evil.json", "--max-dead", "0.5")
    assert evil.code == 1 and "evil.Op\\n::error::x ×2" in evil.err
