"""Data-free certification: interval bound propagation (IBP) through the model's graph.

For an input box [lo, hi] (scalars, or per feature from the calibration data), every tensor of the
graph gets an interval that contains all its possible values; a unit whose pre-activation upper bound
is below the threshold everywhere cannot fire for ANY input in the box: it is *certified dead*.

The propagation runs on the torch.export graph (ATen ops) in float64, and a unit counts as certified
only with a margin for the model's own float32 rounding. Supported: linear / matmul with constant
weights, convolution, batch norm (eval), layer norm and RMS norm (bounded whatever their input), relu /
relu6 / hardtanh / clamp / sigmoid / tanh / hardsigmoid / hardswish, max and average pooling, flatten /
view / reshape / permute / transpose, add / sub / mul of tensors or constants, div by constants,
concatenation. Anything
else makes its output unknown, and the activation sites that depend on it are reported as
"not certified" — never guessed.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx

from deadrelu_cli.errors import UserError
from deadrelu_cli.intervals import (
    Interval,
    SiteBound,
    Unsupported,
    linear_interval,
    normalized_interval,
    product,
    scale_interval,
)
from deadrelu_cli.probe.base import infer_channel_dim
from deadrelu_cli.probe.exported import find_sites
from deadrelu_cli.probe.ops import resolve_channel_dim

aten = torch.ops.aten


def _value(env: dict, arg):
    if isinstance(arg, fx.Node):
        return env.get(arg.name)
    if isinstance(arg, list | tuple):
        return type(arg)(_value(env, a) for a in arg)
    return arg


def _constant(value) -> torch.Tensor | float | None:
    if isinstance(value, torch.Tensor):
        return value.double()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


_SHAPE_OPS = {
    "view",
    "reshape",
    "_unsafe_view",
    "flatten",
    "permute",
    "transpose",
    "t",
    "squeeze",
    "unsqueeze",
    "contiguous",
    "clone",
    "alias",
    "detach",
    "expand",
    "_to_copy",
    "to",
    "dropout",
    "max_pool2d",
    "max_pool1d",
    "max_pool3d",
    "avg_pool2d",
    "avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool1d",
    "mean",
    "relu",
    "relu_",
    "hardtanh",
    "hardtanh_",
    "sigmoid",  # elementwise non-decreasing: bounds map to bounds
    "tanh",
    "hardsigmoid",
    "clamp",  # non-decreasing in x and in both bounds
    "clamp_",
    "clamp_min",
    "clamp_min_",
    "clamp_max",
    "slice",
    "select",
    "index_select",
    "identity",
    "max_pool2d_with_indices",
}


def _apply(target, args, kwargs, env):
    """The interval of one graph node's output (raises Unsupported)."""
    name = (
        target.__name__.split(".")[0]
        if isinstance(target, torch._ops.OpOverload)
        else getattr(target, "__name__", "")
    )
    values = [_value(env, a) for a in args]
    kw = {k: _value(env, v) for k, v in kwargs.items()}
    intervals = [v for v in values if isinstance(v, Interval)]
    if target is operator.getitem:
        container, index = values
        if isinstance(container, tuple | list):
            return container[index]
        raise Unsupported("getitem")
    if not intervals:  # a constant computation (weights, shapes): run it for real
        return target(*values, **kw)
    if name in ("add", "mul") and len(values) > 1 and not isinstance(values[0], Interval):
        values = [values[1], values[0], *values[2:]]  # `scale * x` (ConvNeXt's layer scale), `b + x`
        if name == "add" and kw.get("alpha", 1) != 1:
            raise Unsupported("add with alpha scaling the input-dependent operand")
    if name == "sub" and len(values) > 1 and not isinstance(values[0], Interval):
        constant, alpha = _constant(values[0]), kw.get("alpha", 1)
        if constant is None or alpha < 0:
            raise Unsupported(name)
        other = values[1]  # c - alpha * x: the ends swap
        return Interval(constant - alpha * other.hi, constant - alpha * other.lo)
    x = values[0]
    if name in ("linear",):
        weight, bias = values[1], values[2] if len(values) > 2 else None
        if isinstance(weight, Interval) or isinstance(bias, Interval):
            raise Unsupported("linear with input-dependent weights")
        return linear_interval(x, weight.double(), None if bias is None else bias.double(), F.linear)
    if name in ("conv2d", "conv1d", "conv3d", "convolution"):
        weight, bias = values[1], values[2]
        rest = values[3:]
        if isinstance(weight, Interval) or isinstance(bias, Interval):
            raise Unsupported("convolution with input-dependent weights")
        if name == "convolution":
            stride, padding, dilation, transposed, _output_padding, groups = rest
            if transposed:
                raise Unsupported("transposed convolution")
        else:
            stride, padding, dilation, groups = (
                (rest + [1, 0, 1, 1][len(rest) :])[:4] if rest else (1, 0, 1, 1)
            )
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[x.lo.dim()]
        return linear_interval(
            x,
            weight.double(),
            None if bias is None else bias.double(),
            lambda t, w, b: conv(t, w, b, stride, padding, dilation, groups),
        )
    if name in ("mm", "matmul") and not isinstance(values[1], Interval):
        return linear_interval(x, values[1].double(), None, lambda t, w, b: torch.matmul(t, w))
    if name == "addmm" and isinstance(values[1], Interval) and not isinstance(values[2], Interval):
        bias, inp, weight = values[0], values[1], values[2]
        return linear_interval(inp, weight.double(), None, lambda t, w, b: torch.matmul(t, w)).map(
            lambda t: t + bias.double()
        )
    if name in ("_native_batch_norm_legit_no_training", "batch_norm", "native_batch_norm"):
        weight, bias, mean, var = values[1], values[2], values[3], values[4]
        eps = values[6] if name != "batch_norm" else values[7]
        shape = [1, -1] + [1] * (x.lo.dim() - 2)
        scale = (weight.double() if weight is not None else 1.0) / torch.sqrt(var.double() + eps)
        shift = (bias.double() if bias is not None else 0.0) - mean.double() * scale
        out = scale_interval(x, scale.reshape(shape)).map(lambda t: t + shift.reshape(shape))
        return (out, None, None) if name != "batch_norm" else out
    if name in ("layer_norm", "native_layer_norm", "rms_norm"):
        weight = values[2] if len(values) > 2 else kw.get("weight")
        bias = None if name == "rms_norm" else (values[3] if len(values) > 3 else kw.get("bias"))
        if isinstance(weight, Interval) or isinstance(bias, Interval):
            raise Unsupported(f"{name} with input-dependent weights")
        out = normalized_interval(
            x,
            len(values[1]),
            None if weight is None else weight.double(),
            None if bias is None else bias.double(),
            centered=name != "rms_norm",
        )
        return (out, None, None) if name == "native_layer_norm" else out
    if name in ("add", "sub"):
        other = values[1]
        alpha = kw.get("alpha", 1)
        if isinstance(other, Interval):
            if name == "add":
                return Interval(x.lo + alpha * other.lo, x.hi + alpha * other.hi)
            return Interval(x.lo - alpha * other.hi, x.hi - alpha * other.lo)
        constant = _constant(other)
        if constant is None:
            raise Unsupported(name)
        return x.map(lambda t: t + constant * alpha if name == "add" else t - constant * alpha)
    if name == "hardswish":  # x * hardsigmoid(x): not monotone, bounded as a product
        return product(x, x.map(F.hardsigmoid))
    if name in ("mul", "div"):
        other = values[1]
        if isinstance(other, Interval):
            if name == "mul":
                return product(x, other)
            raise Unsupported("div by an input-dependent tensor")
        constant = _constant(other)
        if constant is None:
            raise Unsupported(name)
        return scale_interval(x, constant if name == "mul" else 1.0 / constant)
    if name == "cat":
        parts = values[0]
        if not all(isinstance(p, Interval) for p in parts):
            raise Unsupported("cat with constants")
        dim = values[1] if len(values) > 1 else kw.get("dim", 0)
        return Interval(torch.cat([p.lo for p in parts], dim), torch.cat([p.hi for p in parts], dim))
    threshold = name in ("threshold", "threshold_") and len(values) == 3
    if threshold and not isinstance(values[1], Interval) and not isinstance(values[2], Interval):
        # threshold(x, t, v): non-decreasing in x when v <= t (a ReLU's (0, 0), as spelled ReLUs are written)
        if values[2] > values[1]:
            raise Unsupported("threshold above its value")
        return Interval(target(x.lo, *values[1:]), target(x.hi, *values[1:]))
    if name in _SHAPE_OPS:
        # monotone (non-decreasing) or purely structural: apply to both ends
        def run(end):
            rest = [end if isinstance(v, Interval) else v for v in values]
            return target(*rest, **kw)

        lo, hi = run(x.lo), run(x.hi)
        if isinstance(lo, tuple):  # max_pool2d_with_indices
            return (Interval(lo[0], hi[0]), None)
        return Interval(lo, hi)
    raise Unsupported(name or str(target))


def certify_graph(
    graph_module: fx.GraphModule,
    boxes: list[Interval],
    ops: tuple[str, ...],
    threshold: float,
    channel_dim: int | None,
) -> list[SiteBound]:
    """Propagate the input boxes through the graph; bound every activation site's pre-activation."""
    sites = {node.name: site for node, site in find_sites(graph_module.graph, ops)}
    env: dict[str, object] = {}
    unknown: dict[str, str] = {}  # node -> why its value is not bounded
    placeholders = iter(boxes)
    bounds: list[SiteBound] = []
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            box = next(placeholders, None)
            if box is None:
                unknown[node.name] = "an input without a range"
            else:
                env[node.name] = box
            continue
        if node.op == "get_attr":
            target = graph_module
            for part in str(node.target).split("."):
                target = getattr(target, part)
            env[node.name] = target.detach() if isinstance(target, torch.Tensor) else target
            continue
        if node.op != "call_function":
            continue
        dependencies = [a.name for a in node.all_input_nodes]
        blocked = next((unknown[d] for d in dependencies if d in unknown), None)
        if node.name in sites:
            site = sites[node.name]
            pre = env.get(node.args[0].name) if isinstance(node.args[0], fx.Node) else None
            if blocked or not isinstance(pre, Interval):
                bounds.append(SiteBound(site.name, site.op, None, None, blocked or "input not bounded"))
            else:
                rank = pre.hi.dim()
                dim = (
                    resolve_channel_dim(
                        rank, infer_channel_dim(rank, site.channel_first, site.unit_axis), channel_dim
                    )
                    if rank > 1
                    else 0
                )
                dims = [d for d in range(rank) if d != dim]
                upper = pre.hi.amax(dim=dims) if dims else pre.hi
                upper = upper.cpu().numpy().astype(np.float64)
                # margin for the float32 rounding of the real computation
                margin = 1e-5 * (1.0 + np.abs(upper))
                certified = np.flatnonzero(upper + margin <= threshold).astype(int).tolist()
                bounds.append(SiteBound(site.name, site.op, upper, certified))
        if blocked:
            unknown[node.name] = blocked
            continue
        try:
            env[node.name] = _apply(node.target, node.args, node.kwargs, env)
        except Unsupported as exc:
            unknown[node.name] = f"unsupported op {exc} at {node.name}"
        except Exception as exc:  # noqa: BLE001 - an op we could not evaluate: not bounded, never guessed
            unknown[node.name] = f"{type(exc).__name__} at {node.name}"
    return bounds


def graph_for(model_runnable, kind: str, example: tuple, program=None) -> fx.GraphModule:
    """The ATen graph to bound, in float64 so that the bounds are not loosened by float32 rounding."""
    if kind == "exported":
        from deadrelu_cli.loaders.torch_models import graph_module_with_stack

        graph_module = graph_module_with_stack(program)
    elif kind == "eager":
        from deadrelu_cli.probe.graph_stats import export_for_stats

        graph_module = export_for_stats(model_runnable, example)
    else:
        raise UserError(
            "--certify works on state_dict/safetensors (with --arch) and .pt2 models; TorchScript and ONNX "
            "graphs are not supported yet (scan their state_dict or ExportedProgram)"
        )
    from deadrelu_cli.probe.base import copy_program_module
    from deadrelu_cli.probe.hidden import prepare_graph

    # a copy: the exported module shares the model's parameters
    graph_module = copy_program_module(graph_module)
    prepare_graph(graph_module)  # the sites as the scan counts and names them (spelled ReLUs as clamps)
    return graph_module.double()
