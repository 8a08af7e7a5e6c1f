"""Independent ground truth for every statistic deadrelu reports.

Written from the documentation (README "A unit is dead when…", docs/report-schema.md), not from
deadrelu's code, and using none of it: activations are captured with plain torch forward hooks (or read
as onnxruntime outputs), every statistic is counted here in numpy, and rendered tables are parsed back
into numbers. Tests compare the tool's JSON, table and HTML with these numbers.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

# nn activation modules and the --ops name of each (docs: --ops relu,relu6,leaky_relu,elu,gelu,silu)
MODULE_OPS = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.LeakyReLU: "leaky_relu",
    nn.ELU: "elu",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
}
CAP = {"relu6": 6.0}  # a unit whose output is at the cap on every element is "saturated"


def reference_activation(op: str, x: np.ndarray, slope: float = 0.01, alpha: float = 1.0) -> np.ndarray:
    """Each op written out in numpy (the definitions in torch's docs)."""
    if op == "relu":
        return np.maximum(x, 0.0)
    if op == "relu6":
        return np.minimum(np.maximum(x, 0.0), 6.0)
    if op == "leaky_relu":
        return np.where(x > 0, x, slope * x)
    if op == "elu":
        return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0.0)))
    if op == "gelu":
        return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    if op == "silu":
        return x / (1.0 + np.exp(-x))
    raise ValueError(op)


@dataclass
class Captured:
    """One activation call site: its op, pre-activations and outputs over all batches (float64)."""

    op: str
    pre: np.ndarray
    post: np.ndarray


def capture(
    model: nn.Module,
    batches,
    producers: dict[str, tuple[str, str]] | None = None,
) -> dict[str, Captured]:
    """Run `model` on each batch (a tensor or a tuple of tensors) with plain forward hooks.

    Sites are named as the docs name them: an activation module at path `p` is `p`, `p#2`, … for its
    calls in one forward. `producers` adds functional sites a module hook cannot see, as
    {site name: (path of the module whose output is the pre-activation, op)}; their output is computed
    with `reference_activation`.
    """
    producers = producers or {}
    calls: Counter[str] = Counter()
    pre: dict[str, list[np.ndarray]] = {}
    post: dict[str, list[np.ndarray]] = {}
    ops: dict[str, str] = {}
    handles = []
    by_path = dict(model.named_modules())

    def site(path: str) -> str:
        calls[path] += 1
        return path if calls[path] == 1 else f"{path}#{calls[path]}"

    def as_numpy(t: torch.Tensor) -> np.ndarray:
        return t.detach().double().cpu().numpy().copy()

    for path, module in by_path.items():
        op = next((name for kind, name in MODULE_OPS.items() if type(module) is kind), None)
        if op is None:
            continue

        def before(module, args, path=path, op=op):
            # the input is copied before the call: an in-place ReLU overwrites it
            name = site(path)
            ops[name] = op
            pre.setdefault(name, []).append(as_numpy(args[0]))
            module._truth_name = name

        def after(module, args, output):
            post.setdefault(module._truth_name, []).append(as_numpy(output))

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    for name, (path, op) in producers.items():

        def produced(module, args, output, name=name, op=op):
            ops[name] = op
            value = as_numpy(output)
            pre.setdefault(name, []).append(value)
            post.setdefault(name, []).append(reference_activation(op, value))

        handles.append(by_path[path].register_forward_hook(produced))
    try:
        with torch.no_grad():
            for batch in batches:
                calls.clear()
                model(*(batch if isinstance(batch, tuple) else (batch,)))
    finally:
        for handle in handles:
            handle.remove()
        for module in model.modules():
            module.__dict__.pop("_truth_name", None)
    return {name: Captured(ops[name], np.concatenate(pre[name]), np.concatenate(post[name])) for name in pre}


def onnx_relu_io(model, feeds: dict[str, np.ndarray], nodes: list[str]) -> dict[str, Captured]:
    """Run the un-instrumented ONNX graph in onnxruntime with each named Relu's input and output exposed
    as graph outputs."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    wanted = {n.name: (n.input[0], n.output[0]) for n in exposed.graph.node if n.name in nodes}
    assert set(wanted) == set(nodes), f"no such Relu nodes: {set(nodes) - set(wanted)}"
    present = {o.name for o in exposed.graph.output}
    for tensors in wanted.values():
        for tensor in tensors:
            if tensor not in present:
                exposed.graph.output.append(
                    helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None)
                )
                present.add(tensor)
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    return {
        name: Captured("relu", values[i].astype(np.float64), values[o].astype(np.float64))
        for name, (i, o) in wanted.items()
    }


def _rows(a: np.ndarray, dim: int) -> np.ndarray:
    """[elements, units]: every sample and position of a unit in its column."""
    assert a.ndim >= 2, "rank-1 activations have no batch axis to concatenate over"
    moved = np.moveaxis(a, dim, -1)
    return moved.reshape(-1, moved.shape[-1])


@dataclass
class Truth:
    """Every per-unit statistic of one site, from the documented definitions."""

    positive_counts: np.ndarray
    elements: int
    active_rate: np.ndarray
    max_pre: np.ndarray
    sum_abs: np.ndarray
    mean_abs: np.ndarray
    dead: list[int]
    dying: list[int]
    dormant: list[int]
    saturated: list[int] | None
    median_rate: float

    @property
    def units(self) -> int:
        return len(self.positive_counts)


def truth_of(
    site: Captured, dim: int, threshold: float = 0.0, dying: float = 0.01, tau: float = 0.1
) -> Truth:
    """dead: never above the threshold; dying: 0 < active rate < --dying; dormant (ReDo, Sokar et al.
    2023): mean|act_i| <= tau × the layer's mean of mean|act_j| (all units when that mean is 0);
    saturated (relu6): output at 6 on every element; the table's Median: the median active rate."""
    pre, post = _rows(site.pre, dim), _rows(site.post, dim)
    n = pre.shape[0]
    positive = (pre > threshold).sum(axis=0)
    rate = positive / n
    mean_abs = np.abs(post).sum(axis=0) / n
    layer_mean = mean_abs.mean()
    dormant = np.ones(len(rate), bool) if layer_mean == 0 else mean_abs <= tau * layer_mean
    saturated = None
    if site.op in CAP:
        saturated = np.flatnonzero((post >= CAP[site.op]).all(axis=0)).tolist()
    return Truth(
        positive_counts=positive,
        elements=n,
        active_rate=rate,
        max_pre=pre.max(axis=0),
        sum_abs=np.abs(post).sum(axis=0),
        mean_abs=mean_abs,
        dead=np.flatnonzero(positive == 0).tolist(),
        dying=np.flatnonzero((positive > 0) & (rate < dying)).tolist(),
        dormant=np.flatnonzero(dormant).tolist(),
        saturated=saturated,
        median_rate=float(np.median(rate)),
    )


def assert_json_matches(
    report: dict, truths: dict[str, Truth], rtol: float = 1e-5, atol: float = 1e-5
) -> None:
    """Every per-layer field of a JSON report and its summary equal the independent numbers. The site
    names must match exactly first (a renamed or missing site is an error, not 'nothing fired')."""
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert list(layers) == list(truths), (list(layers), list(truths))
    for name, t in truths.items():
        layer = layers[name]
        where = f"layer {name}"
        assert layer["units"] == t.units and layer["ran"], where
        assert layer["elements_per_unit"] == t.elements, where
        assert layer["positive_counts"] == t.positive_counts.tolist(), where
        np.testing.assert_allclose(layer["active_rate"], t.active_rate, rtol=0, atol=1e-12, err_msg=where)
        assert layer["dead"] == len(t.dead) and layer["dead_indices"] == t.dead, where
        assert layer["dead_fraction"] == len(t.dead) / t.units, where
        assert layer["dying_indices"] == t.dying, where
        assert layer["dormant_indices"] == t.dormant, where
        # null in the JSON: a non-finite maximum (or a unit that saw nothing)
        maxima = [
            (m if not math.isfinite(m) else math.nan) if v is None else v
            for v, m in zip(layer["max_preactivation"], t.max_pre.tolist(), strict=True)
        ]
        np.testing.assert_allclose(maxima, t.max_pre, rtol=rtol, atol=atol, err_msg=where)
        np.testing.assert_allclose(layer["sum_abs"], t.sum_abs, rtol=rtol, atol=atol, err_msg=where)
        if t.saturated is None:
            assert "saturated_indices" not in layer, where
        else:
            assert layer["saturated_indices"] == t.saturated, where
    summary = report["summary"]
    units = sum(t.units for t in truths.values())
    dead = sum(len(t.dead) for t in truths.values())
    assert summary["layers"] == len(truths) and summary["units"] == units and summary["dead"] == dead
    assert summary["dead_fraction"] == (dead / units if units else 0.0)
    assert summary["dying"] == sum(len(t.dying) for t in truths.values())
    assert summary["dormant"] == sum(len(t.dormant) for t in truths.values())
    assert summary["layers_with_dead"] == sum(1 for t in truths.values() if t.dead)
    assert summary["saturated"] == sum(len(t.saturated or []) for t in truths.values())


# -- rendered tables, parsed back into numbers -------------------------------------------------


def close_to_printed(text: str, value: float, digits: int = 4) -> bool:
    """`text` is `value` printed with `digits` significant digits (the last digit may differ by one
    when the value sits on a rounding boundary and the tool's float rounding differs from ours)."""
    printed = float(text)
    if value == 0:
        return printed == 0
    step = 10 ** (math.floor(math.log10(abs(value))) - digits + 1)
    return abs(printed - value) <= 1.01 * step


def assert_summary_line(text: str, truths: dict[str, Truth]) -> None:
    units = sum(t.units for t in truths.values())
    dead = sum(len(t.dead) for t in truths.values())
    line = (
        f"Dead units: {dead}/{units} ({100 * dead / units:.1f}%) in "
        f"{sum(1 for t in truths.values() if t.dead)} of {len(truths)} layers · "
        f"dying {sum(len(t.dying) for t in truths.values())}, dormant {sum(len(t.dormant) for t in truths.values())}"
    )
    saturated = sum(len(t.saturated or []) for t in truths.values())
    if saturated:
        line += f", saturated {saturated}"
    assert line in text, (line, text)


def layer_row_cells(name: str, op: str, t: Truth) -> list[str]:
    """A layer row as the table and the HTML print it: Layer, Op, Units, Dead, Dead %, Dying, Dormant, Median."""
    return [
        name,
        op,
        str(t.units),
        str(len(t.dead)),
        f"{100 * len(t.dead) / t.units:.1f}%",
        str(len(t.dying)),
        str(len(t.dormant)),
        f"{100 * t.median_rate:.1f}%",
    ]


def assert_layers_table(text: str, truths: dict[str, Truth], ops: dict[str, str]) -> None:
    """Layer  Op  Units  Dead  Dead %  Dying  Dormant  Median  (bar, sparkline): every row's numbers."""
    rows = {}
    for line in text.splitlines():
        cells = line.split()
        if len(cells) >= 8 and cells[0] in truths and re.fullmatch(r"\d+", cells[2] or ""):
            rows[cells[0]] = cells[:8]
    assert set(rows) == set(truths), (set(rows), set(truths))
    for name, t in truths.items():
        expected = layer_row_cells(name, ops[name], t)
        assert rows[name] == expected, (name, rows[name], expected)


def assert_units_table(text: str, t: Truth, bias: np.ndarray | None, dying: float = 0.01) -> None:
    """Unit  Bias  Active %  Max pre-act  Mean |act|  Status: every unit's row."""
    rows = {}
    for line in text.splitlines():
        cells = line.split()
        if len(cells) >= 6 and re.fullmatch(r"\d+", cells[0]) and cells[2].endswith("%"):
            rows[int(cells[0])] = cells
    assert sorted(rows) == list(range(t.units)), sorted(rows)
    for i, cells in rows.items():
        if bias is not None:
            assert close_to_printed(cells[1], float(bias[i])), (i, cells[1], bias[i])
        assert cells[2] == f"{100 * t.active_rate[i]:.2f}%", (i, cells[2], t.active_rate[i])
        assert close_to_printed(cells[3], float(t.max_pre[i])), (i, cells[3], t.max_pre[i])
        assert close_to_printed(cells[4], float(t.mean_abs[i])), (i, cells[4], t.mean_abs[i])
        status = (
            "DEAD"
            if i in t.dead
            else "saturated"
            if t.saturated and i in t.saturated
            else "dying"
            if t.active_rate[i] < dying
            else "alive"
        )
        assert cells[5] == status, (i, cells[5], status)


# -- the sample CNN (sample_models/cnn), whose functional relu a module hook cannot see -------------


def sample_cnn(state_path) -> nn.Module:
    """sample_models/cnn's architecture with the weights in `state_path` (a state_dict or .safetensors)."""
    import importlib.util
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "sample_models" / "cnn"
    spec = importlib.util.spec_from_file_location("sample_cnn_for_truth", folder / "arch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.build()
    if str(state_path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(state_path))
    else:
        state = torch.load(state_path, weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


SAMPLE_CNN_DIMS = {"relu": 1, "relu#2": 1, "relu()": 1}  # conv outputs [N, C, H, W], then fc's [N, 12]


def sample_cnn_truth(model: nn.Module, x: np.ndarray, **settings) -> dict[str, Truth]:
    """The three sites of the sample CNN: the shared in-place nn.ReLU's two calls, then torch.relu(fc(…))."""
    batches = torch.from_numpy(x).split(32)
    sites = capture(model, batches, producers={"relu()": ("fc", "relu")})
    assert list(sites) == ["relu", "relu#2", "relu()"], list(sites)
    return {name: truth_of(site, SAMPLE_CNN_DIMS[name], **settings) for name, site in sites.items()}
