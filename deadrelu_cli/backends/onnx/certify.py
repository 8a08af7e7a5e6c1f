"""Interval bound propagation through an ONNX graph (the ONNX side of `scan --certify`).

Same contract as certify.py: float64 intervals, a margin for float32 rounding, and any node that is not
understood makes everything below it "not certified". Nodes whose inputs are all constants (shape
arithmetic, Constant, …) are evaluated exactly with onnx's reference evaluator.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from onnx import helper

from deadrelu_cli.intervals import (
    Interval,
    SiteBound,
    Unsupported,
    linear_interval,
    normalized_interval,
    product,
    scale_interval,
)
from deadrelu_cli.probe.onnx_graph import find_sites, site_channel_dim
from deadrelu_cli.wiring.onnx_index import GraphIndex, attr, tensor_values


def _t(value) -> torch.Tensor:
    return torch.from_numpy(np.asarray(value, dtype=np.float64))


def _conv(node, x: Interval, weight, bias) -> Interval:
    if (attr(node, "auto_pad", b"NOTSET") or b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise Unsupported("Conv auto_pad")
    spatial = x.lo.dim() - 2
    strides = attr(node, "strides", [1] * spatial)
    dilations = attr(node, "dilations", [1] * spatial)
    pads = attr(node, "pads", [0] * (2 * spatial))
    group = attr(node, "group", 1)
    begins, ends = pads[:spatial], pads[spatial:]
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]

    def run(t, w, b):
        if list(begins) != list(ends):
            flat = []
            for begin, end in zip(reversed(begins), reversed(ends), strict=True):
                flat += [begin, end]
            return conv(F.pad(t, flat), w, b, strides, 0, dilations, group)
        return conv(t, w, b, strides, list(begins), dilations, group)

    return linear_interval(x, _t(weight), None if bias is None else _t(bias), run)


def _pool(node, x: Interval) -> Interval:
    op = node.op_type
    if op == "GlobalAveragePool":
        return x.map(lambda t: t.mean(dim=tuple(range(2, t.dim())), keepdim=True))
    if op == "GlobalMaxPool":
        return x.map(lambda t: t.amax(dim=tuple(range(2, t.dim())), keepdim=True))
    spatial = x.lo.dim() - 2
    kernel = attr(node, "kernel_shape")
    strides = attr(node, "strides", [1] * spatial)
    pads = attr(node, "pads", [0] * (2 * spatial))
    dilations = attr(node, "dilations", [1] * spatial)
    if op == "MaxPool" and list(pads[:spatial]) != list(pads[spatial:]) and not attr(node, "ceil_mode", 0):
        # pads [0, 0, 1, 1] (Caffe's ceil-mode pools as the model zoo's AlexNet writes them): pad with
        # -inf, which no max takes, then pool without padding (max is monotone: bounds map to bounds)
        flat = []
        for begin, end in zip(reversed(pads[:spatial]), reversed(pads[spatial:]), strict=True):
            flat += [begin, end]
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
        return x.map(lambda t: pool(F.pad(t, flat, value=-torch.inf), kernel, strides, 0, dilations))
    if list(pads[:spatial]) != list(pads[spatial:]) or attr(node, "ceil_mode", 0):
        raise Unsupported(f"{op} with asymmetric pads or ceil_mode")
    if op == "MaxPool":
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
        return x.map(lambda t: pool(t, kernel, strides, list(pads[:spatial]), dilations))
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
    include = bool(attr(node, "count_include_pad", 0))
    return x.map(lambda t: pool(t, kernel, strides, list(pads[:spatial]), count_include_pad=include))


def _square(x: Interval) -> Interval:
    low = torch.where((x.lo <= 0) & (x.hi >= 0), torch.zeros_like(x.lo), torch.minimum(x.lo**2, x.hi**2))
    return Interval(low, torch.maximum(x.lo**2, x.hi**2))


def _slice(node, t: torch.Tensor, values: list) -> torch.Tensor:
    """Slice: starts, ends, axes, steps are attributes up to opset 9, then constant inputs."""
    if any(isinstance(v, Interval) for v in values[1:]):
        raise Unsupported("Slice with input-dependent bounds")
    if len(values) > 1:
        starts, ends = (np.asarray(v).reshape(-1).tolist() for v in values[1:3])
        axes = values[3] if len(values) > 3 and values[3] is not None else range(len(starts))
        steps = values[4] if len(values) > 4 and values[4] is not None else [1] * len(starts)
    else:
        starts, ends = attr(node, "starts"), attr(node, "ends")
        axes, steps = attr(node, "axes") or range(len(starts)), [1] * len(starts)
    index = [slice(None)] * t.dim()
    for start, end, axis, step in zip(
        starts, ends, np.asarray(list(axes)).reshape(-1), np.asarray(list(steps)).reshape(-1), strict=True
    ):
        if int(step) < 0:
            raise Unsupported("Slice with a negative step")
        size = t.shape[int(axis)]
        index[int(axis)] = slice(*(int(max(-size - 1, min(size, v))) for v in (start, end)), int(step))
    return t[tuple(index)]


def _pad(node, x: Interval, values: list) -> Interval:
    """Pad: a constant fills the new positions (its value in both bounds); reflect / edge / wrap copy
    positions of x, so both bounds are padded alike. pads are an attribute up to opset 10, then an input
    (with the constant and, from opset 18, the axes)."""
    mode = attr(node, "mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    pads = attr(node, "pads") if len(values) < 2 else values[1]
    if pads is None or isinstance(pads, Interval):
        raise Unsupported("Pad with input-dependent pads")
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    fill = values[2] if len(values) > 2 and values[2] is not None else attr(node, "value", 0.0)
    if isinstance(fill, Interval):
        raise Unsupported("Pad with an input-dependent value")
    rank = x.lo.dim()
    axes = values[3] if len(values) > 3 and values[3] is not None else range(rank)
    axes = [int(a) % rank for a in np.asarray(list(axes)).reshape(-1)]
    begins, ends = [0] * rank, [0] * rank
    for axis, begin, end in zip(axes, pads[: len(axes)], pads[len(axes) :], strict=True):
        begins[axis], ends[axis] = begin, end
    flat: list[int] = []
    for axis in reversed(range(rank)):  # torch: the last axis first
        flat += [begins[axis], ends[axis]]
    if mode == "constant":
        value = float(np.asarray(fill).reshape(-1)[0]) if np.size(fill) else 0.0
        return x.map(lambda t: F.pad(t, flat, value=value))
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode is None:
        raise Unsupported(f"Pad mode {mode}")
    while len(flat) > 2 and flat[-2:] == [0, 0]:  # torch pads only the trailing axes in these modes
        flat = flat[:-2]
    return x.map(lambda t: F.pad(t, flat, mode=torch_mode))


def _node_interval(node, values: list, index: GraphIndex):
    op = node.op_type
    x = values[0]
    constants = [v for v in values[1:] if not isinstance(v, Interval)]
    if op == "Conv":
        return _conv(node, x, values[1], values[2] if len(values) > 2 else None)
    if op == "Gemm":
        if attr(node, "transA", 0):
            raise Unsupported("Gemm transA")
        weight = np.asarray(values[1], dtype=np.float64)
        weight = weight.T if attr(node, "transB", 0) else weight
        alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
        out = linear_interval(x, _t(weight) * alpha, None, lambda t, w, b: torch.matmul(t, w))
        if len(values) > 2 and values[2] is not None:
            c = _t(values[2]) * beta
            out = out.map(lambda t: t + c)
        return out
    if op == "MatMul":
        if isinstance(values[0], Interval) and isinstance(values[1], Interval):
            raise Unsupported("MatMul of two input-dependent tensors")
        if not isinstance(values[0], Interval):  # a constant on the left (a DFT basis times the frames)
            return linear_interval(values[1], _t(values[0]), None, lambda t, w, b: torch.matmul(w, t))
        return linear_interval(x, _t(values[1]), None, lambda t, w, b: torch.matmul(t, w))
    if op in ("Add", "Sub", "Mul", "Div"):
        a, b = values
        if isinstance(a, Interval) and isinstance(b, Interval):
            if op == "Add":
                return Interval(a.lo + b.lo, a.hi + b.hi)
            if op == "Sub":
                return Interval(a.lo - b.hi, a.hi - b.lo)
            if op == "Mul" and node.input[0] == node.input[1]:  # x * x: a square, never negative
                return _square(a)
            if op == "Mul":
                return product(a, b)
            raise Unsupported("Div by an input-dependent tensor")
        interval, constant = (a, _t(b)) if isinstance(a, Interval) else (b, _t(a))
        if op == "Add":
            return interval.map(lambda t: t + constant)
        if op == "Sub":
            return (
                interval.map(lambda t: t - constant)
                if isinstance(a, Interval)
                else Interval(constant - interval.hi, constant - interval.lo)
            )
        if op == "Mul":
            return scale_interval(interval, constant)
        if not isinstance(a, Interval):
            raise Unsupported("Div by an input-dependent tensor")
        return scale_interval(interval, 1.0 / constant)
    if op == "Relu":
        return x.map(lambda t: t.clamp(min=0))
    if op == "Clip":
        lo = (
            attr(node, "min")
            if len(values) < 2
            else (None if values[1] is None else float(np.asarray(values[1])))
        )
        hi = (
            attr(node, "max")
            if len(values) < 3
            else (None if values[2] is None else float(np.asarray(values[2])))
        )
        return x.map(lambda t: t.clamp(min=lo, max=hi))
    if op in ("Sigmoid", "Tanh"):
        return x.map(torch.sigmoid if op == "Sigmoid" else torch.tanh)
    if op in ("HardSigmoid", "HardSwish"):
        alpha, beta = (
            (attr(node, "alpha", 0.2), attr(node, "beta", 0.5)) if op == "HardSigmoid" else (1 / 6, 0.5)
        )
        ends = [(t * alpha + beta).clamp(0, 1) for t in (x.lo, x.hi)]
        gate = Interval(torch.minimum(*ends), torch.maximum(*ends))  # alpha < 0 reverses the order
        return gate if op == "HardSigmoid" else product(x, gate)
    if op == "LRN":
        # y = x / (bias + alpha/size * sum of x^2 over neighbouring channels)^beta: the sign of x, and
        # the denominator is at least bias^beta, so |y| <= |x| / bias^beta (AlexNet, GoogLeNet, ZFNet)
        bias, beta, alpha = attr(node, "bias", 1.0), attr(node, "beta", 0.75), attr(node, "alpha", 1e-4)
        if bias <= 0 or beta < 0 or alpha < 0:
            raise Unsupported(f"LRN with bias {bias}, alpha {alpha}, beta {beta}")
        floor = float(bias) ** float(beta)
        return Interval(x.lo.clamp(max=0) / floor, x.hi.clamp(min=0) / floor)
    if op == "LeakyRelu":
        alpha = attr(node, "alpha", 0.01)
        return x.map(lambda t: F.leaky_relu(t, alpha))
    if op == "BatchNormalization":
        scale, bias, mean, var = (_t(v) for v in values[1:5])
        eps = attr(node, "epsilon", 1e-5)
        shape = [1, -1] + [1] * (x.lo.dim() - 2)
        factor = scale / torch.sqrt(var + eps)
        shift = bias - mean * factor
        return scale_interval(x, factor.reshape(shape)).map(lambda t: t + shift.reshape(shape))
    if op in ("LayerNormalization", "RMSNormalization"):
        scale, bias = values[1], values[2] if len(values) > 2 else None
        if isinstance(scale, Interval) or isinstance(bias, Interval):
            raise Unsupported(f"{op} with input-dependent scale")
        rank = x.lo.dim()
        return normalized_interval(
            x,
            rank - attr(node, "axis", -1) % rank,
            _t(scale),
            None if bias is None else _t(bias),
            centered=op == "LayerNormalization",
        )
    if op in ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"):
        return _pool(node, x)
    if op in ("Identity", "Dropout", "Cast"):
        return x
    if op == "Pad":
        return _pad(node, x, values)
    if op == "Slice":  # positions of x, as they are
        return x.map(lambda t: _slice(node, t, values))
    if op == "Pow" and not isinstance(values[1], Interval) and np.asarray(values[1]).size == 1:
        if float(np.asarray(values[1])) == 2.0:
            return _square(x)
        raise Unsupported("Pow with an exponent other than 2")
    if op in ("Exp", "Log", "Sqrt"):  # monotone; Log and Sqrt of a negative number are NaN, not bounded
        if op != "Exp" and bool((x.lo < 0).any()):
            raise Unsupported(f"{op} of a possibly negative input")
        return x.map({"Exp": torch.exp, "Log": torch.log, "Sqrt": torch.sqrt}[op])
    if op in ("ReduceMax", "ReduceMin", "ReduceMean", "ReduceSum"):  # monotone in every input element
        axes = attr(node, "axes")  # an attribute up to opset 17 (ReduceSum: 12), then an input
        if axes is None and constants and constants[0] is not None:
            axes = [int(a) for a in np.asarray(constants[0]).reshape(-1)]
        if not axes and attr(node, "noop_with_empty_axes", 0):
            return x
        keep = bool(attr(node, "keepdims", 1))
        reduce = {"ReduceMax": torch.amax, "ReduceMin": torch.amin, "ReduceMean": torch.mean}.get(
            op, torch.sum
        )
        return x.map(
            lambda t: reduce(t, dim=tuple(a % t.dim() for a in axes or range(t.dim())), keepdim=keep)
        )
    if op == "Flatten":
        axis = attr(node, "axis", 1)
        return x.map(lambda t: t.reshape(int(np.prod(t.shape[:axis])), -1))
    if op == "Reshape":
        target = [int(d) for d in np.asarray(constants[0])]

        def reshape(t):
            dims = [t.shape[i] if d == 0 else d for i, d in enumerate(target)]
            return t.reshape(dims)

        return x.map(reshape)
    if op == "Transpose":
        perm = attr(node, "perm") or list(reversed(range(x.lo.dim())))
        return x.map(lambda t: t.permute(*perm))
    if op in ("Squeeze", "Unsqueeze"):
        axes = (
            attr(node, "axes")
            if attr(node, "axes") is not None
            else [int(a) for a in np.asarray(constants[0])]
        )
        if op == "Squeeze":
            return x.map(lambda t: t.squeeze(dim=tuple(a % t.dim() for a in axes)))

        def unsqueeze(t):
            for a in sorted(a % (t.dim() + len(axes)) for a in axes):
                t = t.unsqueeze(a)
            return t

        return x.map(unsqueeze)
    if op == "Concat":
        axis = attr(node, "axis", 0)
        parts = [v if isinstance(v, Interval) else Interval(_t(v), _t(v)) for v in values]
        return Interval(torch.cat([p.lo for p in parts], axis), torch.cat([p.hi for p in parts], axis))
    raise Unsupported(op)


def certify_onnx(
    model, boxes: list[Interval], ops: tuple[str, ...], threshold: float, channel_dim: int | None
) -> list[SiteBound]:
    graph = model.graph
    index = GraphIndex(graph)
    sites = find_sites(model, ops)
    by_input = {}
    bounds: dict[str, SiteBound] = {}
    for site in sites:
        if site.graph_path:
            bounds[site.name] = SiteBound(
                site.name, site.op, None, None, "inside an If/Loop/Scan body (not certified yet)"
            )
        else:
            by_input.setdefault(site.node_name or site.output_name, site)
    env: dict[str, object] = {name: tensor_values(init) for name, init in index.initializers.items()}
    unknown: dict[str, str] = {}
    initializer_names = set(index.initializers)
    box_iter = iter(boxes)
    for value in graph.input:
        if value.name in initializer_names:
            continue
        box = next(box_iter, None)
        if box is None:
            unknown[value.name] = "an input without a range"
        elif torch.equal(box.lo, box.hi):  # one value (a --const sample rate): a constant, folded exactly
            env[value.name] = box.lo.numpy().astype(
                helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            )
        else:
            env[value.name] = box
    for node in graph.node:
        inputs = [name for name in node.input]
        key = node.name or node.output[0]
        site = by_input.get(key)
        # a spelled ReLU reads x alone (its Greater on x, say, has no interval rule)
        read = [site.input_name] if site is not None and site.spelled else inputs
        blocked = next((unknown[n] for n in read if n in unknown), None)
        if site is not None:
            pre = env.get(site.input_name)
            if blocked or not isinstance(pre, Interval):
                bounds[site.name] = SiteBound(site.name, site.op, None, None, blocked or "input not bounded")
            else:
                rank = pre.hi.dim()
                site.rank = rank
                dim = site_channel_dim(site, channel_dim)
                dims = [d for d in range(rank) if d != dim]
                upper = (pre.hi.amax(dim=dims) if dims else pre.hi).numpy().astype(np.float64)
                margin = 1e-5 * (1.0 + np.abs(upper))
                bounds[site.name] = SiteBound(
                    site.name,
                    site.op,
                    upper,
                    np.flatnonzero(upper + margin <= threshold).astype(int).tolist(),
                )
        if blocked:
            for out in node.output:
                unknown[out] = blocked
            continue
        if site is not None and site.spelled and isinstance(env.get(site.input_name), Interval):
            # Max(x, 0) / Where(x > 0, x, 0): its output is relu(x), whatever op spells it
            env[node.output[0]] = env[site.input_name].map(lambda t: t.clamp(min=0))
            continue
        values = [None if name == "" else env.get(name) for name in inputs]
        try:
            if not any(isinstance(v, Interval) for v in values):
                if any(v is None and name for v, name in zip(values, inputs, strict=True)):
                    raise Unsupported(node.op_type)  # an input we have no value for
                for out, result in zip(
                    node.output, _single_node(node, inputs, values, model.opset_import), strict=False
                ):
                    env[out] = result
                continue
            if node.op_type == "Shape":
                env[node.output[0]] = np.array(values[0].lo.shape, dtype=np.int64)
                continue
            result = _node_interval(node, values, index)
            env[node.output[0]] = result
        except Unsupported as exc:
            for out in node.output:
                unknown[out] = f"unsupported op {exc} at {key}"
        except Exception as exc:  # noqa: BLE001 - not bounded, never guessed
            for out in node.output:
                unknown[out] = f"{type(exc).__name__} at {key}"
    return [bounds[site.name] for site in sites if site.name in bounds]


def _single_node(node, inputs: list[str], values: list, opsets) -> list:
    """Evaluate one node whose inputs are all constants, exactly as the ONNX reference does."""
    from onnx import TensorProto
    from onnx.reference import ReferenceEvaluator

    graph_inputs = [
        helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype), None)
        for name, v in zip(inputs, values, strict=True)
        if name
    ]
    graph_outputs = [helper.make_tensor_value_info(out, TensorProto.UNDEFINED, None) for out in node.output]
    graph = helper.make_graph([node], "constant_node", graph_inputs, graph_outputs)
    evaluator = ReferenceEvaluator(helper.make_model(graph, opset_imports=list(opsets)))
    feeds = {name: np.asarray(v) for name, v in zip(inputs, values, strict=True) if name}
    return evaluator.run(None, feeds)
