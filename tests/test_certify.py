"""Data-free certification: sound (never claims a unit that fires) and complete on planted cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, arch, save_npz, save_state_dict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from truth import capture, sample_cnn, sample_cnn_truth

from deadrelu_cli.backends.torch.certify import certify_graph, graph_for
from deadrelu_cli.intervals import input_boxes

CNN = ROOT / "sample_models" / "cnn"


def _certify(model, shape, lo, hi, ops=("relu", "relu6")):
    graph = graph_for(model, "eager", (torch.zeros(2, *shape),))
    return {b.name: b for b in certify_graph(graph, input_boxes((lo, hi), [shape]), ops, 0.0, None)}


def _sampled(model, shape, lo, hi, samples=4000, seed=0):
    """Per site, the units that fire and each unit's largest pre-activation on random points of the box
    (corners included), by running the model in plain torch with forward hooks on its activation
    modules (tests/truth.py), not with deadrelu's probe."""
    generator = torch.Generator().manual_seed(seed)
    x = lo + (hi - lo) * torch.rand((samples, *shape), generator=generator)
    x[: samples // 4] = torch.where(torch.rand((samples // 4, *shape), generator=generator) < 0.5, lo, hi)
    out = {}
    for name, site in capture(model, x.split(500)).items():
        rows = np.moveaxis(site.pre, 1, -1).reshape(-1, site.pre.shape[1])
        out[name] = (set(np.flatnonzero((rows > 0).any(0)).tolist()), rows.max(0))
    return out


def _fires(model, shape, lo, hi, samples=4000, seed=0):
    return {name: fired for name, (fired, _) in _sampled(model, shape, lo, hi, samples, seed).items()}


def test_planted_units_are_certified(planted_module):
    bounds = _certify(planted_module.eight_neuron().eval(), (4,), -1.0, 1.0)
    assert bounds["relu"].certified_dead == [2, 4, 6]
    bounds = _certify(planted_module.conv_bn().eval(), (3, 6, 6), -2.2, 2.7)
    assert {2, 4} <= set(bounds["act"].certified_dead)  # BN gamma = 0, beta < 0: dead for any input
    assert 1 in bounds["act1d"].certified_dead
    bounds = _certify(planted_module.relu6_model().eval(), (4,), -1.0, 1.0)
    assert 0 in bounds["act"].certified_dead and 1 not in bounds["act"].certified_dead  # bias -100 / +100


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 10**6), width=st.integers(2, 12), shift=st.floats(-3, 1))
def test_sound_on_random_models(seed, width, shift):
    """Certified dead ⊆ never fires on many random inputs from the box."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(5, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, 3),
        nn.ReLU6(),
    ).eval()
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.Linear):
                module.bias.add_(shift)
        model[3].running_mean.uniform_(-1, 1)
        model[3].running_var.uniform_(0.5, 2)
    bounds = _certify(model, (5,), -1.5, 1.0)
    sampled = _sampled(model, (5,), -1.5, 1.0, samples=2000, seed=seed)
    assert set(bounds) == set(sampled) == {"1", "4", "6"}  # the same sites, by name, before comparing
    for name, bound in bounds.items():
        fired, maxima = sampled[name]
        assert bound.certified_dead is not None
        assert not set(bound.certified_dead) & fired, name
        assert np.all(maxima <= bound.upper_bound + 1e-5), name  # the bound holds wherever we looked


def test_unsupported_op_stops_certification_below_it():
    class WithSine(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return torch.relu(self.b(torch.sin(h)))

    bounds = _certify(WithSine().eval(), (3,), -1.0, 1.0)
    names = list(bounds)
    assert bounds[names[0]].certified_dead is not None
    assert bounds[names[1]].certified_dead is None and "sin" in bounds[names[1]].reason


def test_data_free_cli_and_json(cli, tmp_path):
    out = tmp_path / "cert.json"
    result = cli(
        "scan",
        CNN / "model.pt",
        "--arch",
        str(CNN / "arch.py") + ":build",
        "--certify",
        "--input-range",
        "-1",
        "1",
        "--input-shape",
        "3x16x16",
        "--json",
        out,
    )
    assert result.code == 0, result.err
    assert "Provably dead units: 8/36" in result.out
    report = json.loads(out.read_text())
    assert report["schema_version"] == 2 and report["summary"]["certified_dead"] == 8
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert layers["relu"]["certified_dead_indices"] == [1, 5] and len(layers["relu"]["upper_bound"]) == 8
    assert not layers["relu"]["ran"]


def test_with_data_gap_between_dead_and_provably_dead(cli, planted_module, tmp_path):
    model = planted_module.eight_neuron().eval()
    x = (
        np.random.default_rng(0).uniform(-0.2, 0.2, (64, 4)).astype(np.float32)
    )  # narrow data: more units look dead
    ckpt, data = save_state_dict(model, tmp_path / "m.pt"), save_npz(tmp_path / "d.npz", x=x)
    result = cli(
        "scan",
        ckpt,
        "--arch",
        arch("eight_neuron"),
        "--data",
        data,
        "--certify",
        "--input-range",
        "-1",
        "1",
        "--json",
        "-",
    )
    layer = json.loads(result.out)["layers"][0]
    with torch.no_grad():  # the data's dead units, in plain torch
        dead_on_data = np.flatnonzero((model.fc(torch.from_numpy(x)) > 0).sum(0).numpy() == 0).tolist()
    assert layer["dead_indices"] == dead_on_data and len(dead_on_data) > 3  # the gap: check with more data
    assert layer["certified_dead_indices"] == [2, 4, 6]  # the planted ones, and only those


def test_certified_prune_equals_original_on_the_whole_box(cli, tmp_path):
    out = tmp_path / "pruned.pt2"
    result = cli(
        "fix",
        CNN / "model.pt",
        "--arch",
        str(CNN / "arch.py") + ":build",
        "--data",
        CNN / "calib.npz",
        "--strategy",
        "prune",
        "--certified-only",
        "--input-range",
        "-1",
        "1",
        "--output",
        out,
    )
    assert result.code == 0, result.err
    pruned = torch.export.load(str(out)).module()
    import importlib.util

    spec = importlib.util.spec_from_file_location("cnn_arch_cert", CNN / "arch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    original = module.build()
    original.load_state_dict(torch.load(CNN / "model.pt", weights_only=True))
    original.eval()
    x = (
        torch.rand((256, 3, 16, 16), generator=torch.Generator().manual_seed(1)) * 2 - 1
    )  # random points of the box
    with torch.no_grad():
        np.testing.assert_allclose(pruned(x).numpy(), original(x).numpy(), rtol=1e-5, atol=1e-5)


def test_certify_errors(cli):
    result = cli(
        "scan", CNN / "model.onnx", "--certify", "--input-range", "-1", "1"
    )  # the shape comes from the graph
    assert result.code == 0 and "Provably dead units: 8/36" in result.out
    result = cli("scan", CNN / "model.onnx", "--input-range", "-1", "1")  # a box implies --certify
    assert result.code == 0 and "Provably dead units: 8/36" in result.out
    result = cli("scan", CNN / "model.pt", "--arch", str(CNN / "arch.py") + ":build", "--certify")
    assert result.code == 2 and ("--input-shape" in result.err or "--input-range" in result.err)
    result = cli(
        "scan",
        CNN / "model.pt",
        "--arch",
        str(CNN / "arch.py") + ":build",
        "--certify",
        "--input-range",
        "auto",
        "--input-shape",
        "3x16x16",
    )
    assert result.code == 2 and "auto needs --data" in result.err


@pytest.mark.parametrize("spec", ["auto"])
def test_auto_box_from_data(cli, spec):
    result = cli(
        "scan",
        CNN / "model.pt",
        "--arch",
        str(CNN / "arch.py") + ":build",
        "--data",
        CNN / "calib.npz",
        "--certify",
        "--input-range",
        spec,
        "--json",
        "-",
    )
    assert result.code == 0, result.err
    layers = json.loads(result.out)["layers"]
    # sound on the data's own box: every certified unit is dead on the data, by plain torch hooks
    truths = sample_cnn_truth(sample_cnn(CNN / "model.pt"), np.load(CNN / "calib.npz")["input"])
    assert [layer["name"] for layer in layers] == list(truths)
    for layer in layers:
        assert set(layer["certified_dead_indices"]) <= set(truths[layer["name"]].dead), layer["name"]
    assert sum(len(layer["certified_dead_indices"]) for layer in layers) > 0


def test_onnx_certification_matches_torch(tmp_path, planted_module):
    """Consistency (two certifiers): the ONNX export of each planted model certifies exactly the units
    its torch graph does; soundness itself is judged by plain torch in test_sound_on_random_models."""
    import warnings

    from deadrelu_cli.backends.onnx.certify import certify_onnx
    from deadrelu_cli.loaders.onnx_model import read_onnx

    for factory, shape in (
        ("eight_neuron", (4,)),
        ("conv_bn", (3, 6, 6)),
        ("relu6_model", (4,)),
        ("tokens", (5, 8)),
    ):
        model = getattr(planted_module, factory)().eval()
        path = tmp_path / f"{factory}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (torch.zeros(2, *shape),),
                str(path),
                input_names=["x"],
                dynamic_axes={"x": {0: "n"}},
                opset_version=17,
                dynamo=False,
            )
        from_torch = list(_certify(model, shape, -1.0, 1.0).values())
        from_onnx = certify_onnx(
            read_onnx(str(path)), input_boxes((-1.0, 1.0), [shape]), ("relu", "relu6"), 0.0, None
        )
        assert [b.certified_dead for b in from_onnx] == [b.certified_dead for b in from_torch], factory
        for a, b in zip(from_torch, from_onnx, strict=True):
            np.testing.assert_allclose(a.upper_bound, b.upper_bound, rtol=1e-4, atol=1e-4)


def test_onnx_graph_ops_and_subgraphs(tmp_path):
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    import onnx
    from onnx_graphs import conv_relu_hardswish, gemm_relu, relu_in_if

    from deadrelu_cli.backends.onnx.certify import certify_onnx

    bounds = certify_onnx(
        onnx.shape_inference.infer_shapes(gemm_relu()), input_boxes((-1.0, 1.0), [(4,)]), ("relu",), 0.0, None
    )
    assert bounds[0].certified_dead == [2, 4, 6]
    bounds = certify_onnx(
        onnx.shape_inference.infer_shapes(conv_relu_hardswish()),
        input_boxes((-1.0, 1.0), [(3, 8, 8)]),
        ("relu", "relu6"),
        0.0,
        None,
    )
    assert 1 in bounds[0].certified_dead and [b.op for b in bounds] == ["relu", "relu6"]
    bounds = certify_onnx(
        onnx.shape_inference.infer_shapes(relu_in_if()),
        input_boxes((-1.0, 1.0), [(4,)]),
        ("relu",),
        0.0,
        None,
    )
    assert all(b.certified_dead is None and "If/Loop/Scan" in b.reason for b in bounds)


class _ConvGateConv(nn.Module):
    """Conv -> a gate (below) -> Conv with a planted dead channel (2: bias -40) -> ReLU."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        with torch.no_grad():
            self.conv2.weight.mul_(0.3)
            self.conv2.bias[2] = -40.0
        self.act = nn.ReLU()

    def pre_activation(self, x):
        return self.conv2(self.gate(self.conv1(x)))

    def forward(self, x):
        return self.act(self.pre_activation(x))


class _HandWrittenHardSwish(_ConvGateConv):
    def gate(self, h):  # written out: a product of two input-dependent tensors
        return h * (h + 3).clamp(0, 6) / 6


class _GatedConvs(_ConvGateConv):
    def gate(self, h):  # MobileNetV3-style: HardSwish, a squeeze-excitation Sigmoid, HardSigmoid(Tanh(.))
        h = F.hardswish(h)
        return h * torch.sigmoid(self.pool(h)) * F.hardsigmoid(torch.tanh(h))


@pytest.mark.parametrize(
    "factory, opset, onnx_ops",
    [
        (_HandWrittenHardSwish, 13, {"Mul", "Clip"}),  # x * clamp(x + 3, 0, 6) / 6: a Mul of two tensors
        (_GatedConvs, 17, {"HardSwish", "Sigmoid", "HardSigmoid", "Tanh"}),
    ],
)
def test_gates_and_products_are_bounded_alike_in_torch_and_onnx(tmp_path, factory, opset, onnx_ops):
    """Products of two input-dependent tensors and hardswish / sigmoid / hardsigmoid / tanh gates: the
    planted unit is certified, no certified unit fires and the bounds hold on sampled inputs of the box,
    and the ONNX export gives the same bounds as the torch graph (two implementations)."""
    import warnings

    from deadrelu_cli.backends.onnx.certify import certify_onnx
    from deadrelu_cli.loaders.onnx_model import read_onnx

    model, shape = factory().eval(), (3, 6, 6)
    bound = _certify(model, shape, -1.0, 1.0)["act"]
    assert bound.certified_dead is not None and 2 in bound.certified_dead
    fired = _fires(model, shape, -1.0, 1.0)
    assert set(fired) == {"act"}
    assert not set(bound.certified_dead) & fired["act"]
    generator = torch.Generator().manual_seed(2)
    x = torch.rand((3000, *shape), generator=generator) * 2 - 1
    x[:500] = torch.where(torch.rand((500, *shape), generator=generator) < 0.5, -1.0, 1.0)
    with torch.no_grad():
        sampled_max = model.pre_activation(x).amax((0, 2, 3)).double().numpy()
    assert np.all(sampled_max <= bound.upper_bound + 1e-6)
    path = tmp_path / "gates.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(2, *shape),), str(path), input_names=["x"], opset_version=opset, dynamo=False
        )
    assert onnx_ops <= {node.op_type for node in read_onnx(str(path)).graph.node}
    (from_onnx,) = certify_onnx(read_onnx(str(path)), input_boxes((-1.0, 1.0), [shape]), ("relu",), 0.0, None)
    assert from_onnx.certified_dead == bound.certified_dead
    np.testing.assert_allclose(from_onnx.upper_bound, bound.upper_bound, rtol=1e-6)


@pytest.mark.parametrize("reduce, opset", [("ReduceMax", 12), ("ReduceMean", 18), ("ReduceSum", 13)])
def test_onnx_reductions_are_bounded(reduce, opset):
    """A global max/mean pool written as a Reduce node (tf2onnx's `global_max_pooling2d`, as in DNSMOS's
    model_v8.onnx) stopped certification below it ("unsupported op ReduceMax"). The bound here is
    computed by hand in numpy: Conv (no padding) + ReLU lies in [0, sum|W| + b] at every position, a
    reduction over positions keeps it (max/min: the same; mean: the same; sum: times the positions),
    and the Gemm unit's upper bound is b + sum of positive weights × that."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from deadrelu_cli.backends.onnx.certify import certify_onnx

    rng = np.random.default_rng(3)
    conv_w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    conv_b = rng.normal(size=4).astype(np.float32)
    gemm_w = rng.normal(size=(5, 4)).astype(np.float32)  # [out, in], transB
    positions = 4 * 4
    channel_hi = np.maximum(np.abs(conv_w.astype(np.float64)).reshape(4, -1).sum(axis=1) + conv_b, 0.0)
    pooled_hi = channel_hi * (positions if reduce == "ReduceSum" else 1)
    reach = (
        np.maximum(gemm_w.astype(np.float64), 0.0) @ pooled_hi
    )  # the most the weights can add above the bias
    gemm_b = np.where(np.arange(5) % 2 == 0, -reach - 1.0, -reach + 1.0).astype(np.float32)  # even: dead
    axes = [2, 3]
    inits = [
        numpy_helper.from_array(a, n) for a, n in ((conv_w, "W"), (conv_b, "B"), (gemm_w, "G"), (gemm_b, "g"))
    ]
    reduce_inputs = ["r"]
    reduce_attrs = {"keepdims": 0}
    if (reduce == "ReduceSum" and opset >= 13) or opset >= 18:
        inits.append(numpy_helper.from_array(np.array(axes, np.int64), "axes"))
        reduce_inputs.append("axes")
    else:
        reduce_attrs["axes"] = axes
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv"),
            helper.make_node("Relu", ["c"], ["r"], name="relu1"),
            helper.make_node(reduce, reduce_inputs, ["p"], name="pool", **reduce_attrs),
            helper.make_node("Gemm", ["p", "G", "g"], ["h"], name="fc", transB=1),
            helper.make_node("Relu", ["h"], ["y"], name="relu2"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        inits,
    )
    model = onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    )
    first, second = certify_onnx(model, input_boxes((-1.0, 1.0), [(3, 6, 6)]), ("relu",), 0.0, None)
    assert first.certified_dead is not None and second.certified_dead == [0, 2, 4], second.reason
    np.testing.assert_allclose(second.upper_bound, gemm_b.astype(np.float64) + reach, rtol=1e-6, atol=1e-4)


class _NormRelu(nn.Module):
    """x -> LayerNorm (or RMSNorm) -> ReLU -> Linear -> ReLU, with planted scales and shifts."""

    def __init__(self, width: int = 16, rms: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.norm = nn.RMSNorm(width) if rms else nn.LayerNorm(width)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(width, 4)
        self.act2 = nn.ReLU()
        radius = np.sqrt(width if rms else width - 1)
        with torch.no_grad():
            self.norm.weight.uniform_(-1.5, 1.5)
            self.norm.weight[3] = -0.5  # a negative scale: |gamma| is what bounds
            if not rms:
                self.norm.bias.uniform_(-0.5, 0.5)
                self.norm.bias[:4] = -1.02 * radius * self.norm.weight[:4].abs()  # just past the bound
                self.norm.bias[4] = -0.9 * radius * self.norm.weight[4].abs()  # within it: can fire
            self.fc2.bias[0] = -radius * self.norm.weight.abs().sum() * self.fc2.weight[0].abs().max() - 1

    def forward(self, x):
        return self.act2(self.fc2(self.act(self.norm(x))))


def _norm_model_fires(model: _NormRelu, samples: int = 4000) -> dict[str, set[int]]:
    """Which units fire, by plain torch hooks on random inputs of any scale and on the inputs that reach a
    normalized element's extremes (one element apart from all the others: +-50 e_u)."""
    generator = torch.Generator().manual_seed(1)
    width = model.norm.normalized_shape[0]
    x = torch.randn((samples, width), generator=generator) * torch.logspace(-2, 3, samples)[:, None]
    x = torch.cat([x, 50 * torch.eye(width), -50 * torch.eye(width)])
    fired = capture(model, x.split(500))
    return {name: set(np.flatnonzero((site.pre > 0).any(0)).tolist()) for name, site in fired.items()}


@pytest.mark.parametrize("rms", [False, True])
def test_layer_and_rms_norm_bound_whatever_the_input(rms):
    """A normalized element lies within sqrt(n-1) (LayerNorm) or sqrt(n) (RMSNorm) of 0 for any input:
    the units whose shift is past |scale| times that are certified dead for an unbounded box, none of them
    fires on inputs of any scale, and the unit just within the bound is not certified (and fires)."""
    model = _NormRelu(rms=rms).eval()
    bounds = _certify(model, (16,), -1e6, 1e6)
    width = model.norm.normalized_shape[0]
    gamma = model.norm.weight.detach().double().numpy()
    beta = np.zeros(width) if rms else model.norm.bias.detach().double().numpy()
    radius = np.sqrt(width if rms else width - 1)  # the bound, computed here from the formula
    np.testing.assert_allclose(bounds["act"].upper_bound, beta + np.abs(gamma) * radius, rtol=1e-12)
    fired = _norm_model_fires(model)
    assert not set(bounds["act"].certified_dead) & fired["act"]
    assert not set(bounds["act2"].certified_dead) & fired["act2"]
    assert 0 in bounds["act2"].certified_dead  # below the norm: bounded through the Linear
    if not rms:
        assert bounds["act"].certified_dead == [0, 1, 2, 3]
        assert 4 in fired["act"]  # within the bound: reachable, so never claimed


def test_layer_norm_certified_alike_in_torch_and_onnx(tmp_path):
    import warnings

    from deadrelu_cli.backends.onnx.certify import certify_onnx
    from deadrelu_cli.loaders.onnx_model import read_onnx

    model = _NormRelu().eval()
    path = tmp_path / "ln.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(2, 16),), str(path), input_names=["x"], opset_version=17, dynamo=False
        )
    assert "LayerNormalization" in {node.op_type for node in read_onnx(str(path)).graph.node}
    from_torch = list(_certify(model, (16,), -3.0, 3.0).values())
    from_onnx = certify_onnx(read_onnx(str(path)), input_boxes((-3.0, 3.0), [(16,)]), ("relu",), 0.0, None)
    assert [b.certified_dead for b in from_onnx] == [b.certified_dead for b in from_torch]
    assert from_onnx[0].certified_dead == [0, 1, 2, 3]
    for a, b in zip(from_torch, from_onnx, strict=True):
        np.testing.assert_allclose(a.upper_bound, b.upper_bound, rtol=1e-6)
