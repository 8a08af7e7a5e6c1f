"""Activations a torch.export graph probe cannot count, named per site so that the scan says so and a
gate stops on them (`gate.split_unseen` reads the '(activation=Relu)' of a label): an RNN with
nonlinearity='relu' (one fused kernel over every time step), the transformer encoder's fast path
(`aten._transformer_encoder_layer_fwd`), the subgraphs of a higher-order op (`torch.cond`, `while_loop`,
`map`). The eager probe names its own (`probe.eager.eager_hidden`), the TorchScript walk its own.
Labels are '<module path>: <what>(activation=<Kind>)'; the counts are sites (one per RNN layer and
direction, one per encoder layer, the ReLU calls of a subgraph). An `rnn_relu_cell` is written out and
counted instead (`decompose_rnn_cells`)."""

from __future__ import annotations

import operator
from collections import Counter

import torch
from torch import fx

from deadrelu_cli.probe.aten_ops import (
    MASK_CASTS,
    MASK_NEGATIONS,
    MAXIMA,
    SIGN_TESTS,
    TENSOR_CLAMPS,
    VALUE_COPIES,
    ZERO_FACTORIES,
)
from deadrelu_cli.probe.base import is_stored
from deadrelu_cli.probe.ops import aten_op_kind, hidden_label, is_zero_number, same_computation, zeros_fit


def _stack_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _encoder_op(args: tuple, kwargs: dict) -> str:
    """The FFN activation of `_transformer_encoder_layer_fwd(src, embed_dim, num_heads, qkv_weight,
    qkv_bias, proj_weight, proj_bias, use_gelu, …)`."""
    use_gelu = args[7] if len(args) > 7 else kwargs.get("use_gelu", False)
    return "gelu" if use_gelu else "relu"


def graph_hidden(graph_module: fx.GraphModule, ops: tuple[str, ...]) -> Counter:
    """Nodes of a torch.export graph whose activations the graph probe cannot see."""
    found: Counter = Counter()
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        name = getattr(target, "__name__", str(target)).split(".")[0]
        if isinstance(target, torch._ops.HigherOrderOperator):
            inner: Counter = Counter()
            for arg in node.args:
                sub = (
                    getattr(graph_module, arg.target, None)
                    if isinstance(arg, fx.Node) and arg.op == "get_attr"
                    else None
                )
                if isinstance(sub, fx.GraphModule):
                    inner.update(_graph_sites(sub, ops))
                    inner.update(graph_hidden(sub, ops))
            for op, count in inner.items():
                found[hidden_label(_stack_path(node), f"torch.{name}", op)] += count
        elif name in ("rnn_relu", "rnn_relu_cell") and "relu" in ops:
            # rnn_relu(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
            layers = node.args[4] * (2 if node.args[7] else 1) if name == "rnn_relu" else 1
            found[hidden_label(_stack_path(node), "RNN" if name == "rnn_relu" else "RNNCell", "relu")] += (
                layers
            )
        elif name == "_transformer_encoder_layer_fwd":
            op = _encoder_op(tuple(node.args), dict(node.kwargs))
            if op in ops:
                found[hidden_label(_stack_path(node), "transformer encoder fast path", op)] += 1
    return found


def decompose_rnn_cells(graph_module: fx.GraphModule) -> None:
    """Write each `aten.rnn_relu_cell` of a graph out as ATen computes it (linear_hh(hx) + linear_ih(x),
    then relu: the same values), so that its ReLU is a site like any other (as in eager and TorchScript)."""
    graph = graph_module.graph
    changed = False
    for node in list(graph.nodes):
        if (
            node.op != "call_function"
            or getattr(node.target, "__name__", "").split(".")[0] != "rnn_relu_cell"
        ):
            continue
        x, hx, w_ih, w_hh, *biases = node.args
        b_ih, b_hh = (list(biases) + [None, None])[:2]
        aten = torch.ops.aten
        with graph.inserting_before(node):
            hh = graph.call_function(aten.linear.default, (hx, w_hh, b_hh))
            ih = graph.call_function(aten.linear.default, (x, w_ih, b_ih))
            pre = graph.call_function(aten.add.Tensor, (hh, ih))
            out = graph.call_function(aten.relu.default, (pre,))
        for new in (hh, ih, pre, out):
            new.meta = {
                key: value
                for key, value in node.meta.items()
                if key in ("nn_module_stack", "val", "stack_trace")
            }
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        changed = True
    if changed:
        graph_module.recompile()


def recompose_thresholds(graph_module: fx.GraphModule) -> None:
    """Write `where(x <= t, v, x)` with t == v (torch's decomposition of `threshold(x, t, v)`, which
    `run_decompositions()` leaves for nn.Threshold / F.threshold) back as `threshold(x, t, v)`: the same
    values, NaN included, and a ReLU site when t = v = 0, as it is before the decomposition."""
    graph = graph_module.graph
    aten = torch.ops.aten
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.where.self or len(node.args) != 3:
            continue
        cond, fill, x = node.args
        if not (
            isinstance(cond, fx.Node)
            and cond.target is aten.le.Scalar
            and cond.args[0] is x
            and isinstance(x, fx.Node)
        ):
            continue
        value = fill
        if isinstance(fill, fx.Node) and fill.target is aten.scalar_tensor.default and fill.args:
            value = fill.args[0]
        bound = cond.args[1]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (value, bound)):
            continue
        if float(value) != float(bound):
            continue
        node.target, node.args, node.kwargs = aten.threshold.default, (x, bound, value), {}
        for dead in (cond, fill):
            if isinstance(dead, fx.Node) and not dead.users:
                graph.erase_node(dead)
        changed = True
    if changed:
        graph_module.recompile()


def _is_zeros(node: object, graph_module: fx.GraphModule) -> bool:
    """Whether a graph value is zeros in every run: a constant of zeros the export lifted out of the code
    (`torch.tensor(0.)`) or one a zero factory makes, through copies (probe.ops: a ReLU spelled with a
    maximum). A parameter or buffer is none (its values are the checkpoint's), as in eager."""
    for _ in range(8):
        if is_zero_number(node):
            return True
        if not isinstance(node, fx.Node):
            return False
        if node.op == "get_attr":
            if is_stored(graph_module, str(node.target)):
                return False
            value = graph_module
            for part in str(node.target).split("."):
                value = getattr(value, part, None)
            return isinstance(value, torch.Tensor) and not value.is_meta and not bool(value.any())
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            return False
        base = node.target.__name__.split(".")[0]
        if base in ZERO_FACTORIES:
            index = ZERO_FACTORIES[base]
            return index is None or (len(node.args) > index and is_zero_number(node.args[index]))
        if base not in VALUE_COPIES or not node.args:
            return False
        node = node.args[0]
    return False


def _example(node: object) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _sign_test(node: object, graph_module: fx.GraphModule) -> tuple[fx.Node, bool, bool] | None:
    """(x, whether the mask is true where x > 0, whether it is true where x is NaN) for a mask that
    compares x with zeros (x > 0, x >= 0, x < 0, x <= 0), through casts ((x > 0).float()) and negations
    (~(x > 0): true where x <= 0 and at NaN); None for any other mask."""
    negated = False
    for _ in range(8):
        if not isinstance(node, fx.Node) or node.op != "call_function" or not node.args:
            return None
        if not isinstance(node.target, torch._ops.OpOverload):
            return None
        base = node.target.__name__.split(".")[0]
        if base in MASK_CASTS or base in MASK_NEGATIONS:
            negated ^= base in MASK_NEGATIONS
            node = node.args[0]
            continue
        if base in SIGN_TESTS and len(node.args) == 2 and _is_zeros(node.args[1], graph_module):
            x = node.args[0]
            return (x, SIGN_TESTS[base] != negated, negated) if isinstance(x, fx.Node) else None
        return None
    return None


def _describe(node: object) -> tuple[tuple, list] | None:
    """A node's op, constant arguments and operand nodes, for probe.ops.same_computation; None for what
    is no pure op (a placeholder, a parameter read: the same node or none; a random or in-place op)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        if target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
            return None
    elif target is not operator.getitem:
        return None
    operands: list[fx.Node] = []
    shape = fx.node.map_arg((node.args, node.kwargs), lambda n: operands.append(n) or "<operand>")
    return (target, repr(shape)), operands


def _same(a: object, b: object) -> bool:
    """Whether graph values a and b are one value computed twice (a layer run twice on one tensor)."""
    return same_computation(a, b, _describe)


SPELLED_RELU = "deadrelu_spelled_relu"  # node.meta key of a clamp written from a maximum or a select


def recompose_spelled_relus(graph_module: fx.GraphModule, keep=None) -> None:
    """Write `maximum(x, zeros)` / `max(x, zeros)` (zeros that do not widen x), `where(x <= 0, 0, x)`,
    `masked_fill(x, x < 0, 0)` and `x * (x > 0)` as `clamp_min(x, 0)` and `where(x > 0, x, 0)` as
    `threshold(x, 0, 0)` (`>=`, `<` alike): the same values, NaN included (a product is NaN at x = -inf,
    where the clamp is 0), and so ReLU sites as the clamps are (probe.ops: a ReLU spelled with a maximum),
    as the eager probe and TorchScript count them. One spelled with a parameter or buffer of zeros stays
    as written, its x in node.meta[STORED_ZEROS_RELU] (named in `hidden` when x comes from a layer).
    `keep(node, x)` (when given): whether to write this one; one it declines stays as written, no site
    (exported.prepare_program: only x from a layer, so that a program written back holds no clamp of
    a ReLU's output where the user wrote a select)."""
    graph = graph_module.graph
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        found = _spelling(node, graph_module, _is_zeros)
        if found is None:
            stored = _spelling(node, graph_module, _stored_zeros)
            if stored is not None:
                node.meta[STORED_ZEROS_RELU] = stored[0]
            continue
        if keep is not None and not keep(node, found[0]):
            continue
        node.target, node.args = found[1]
        node.meta[SPELLED_RELU] = True  # a site only from a layer (exported.find_sites)
        changed = True
    if changed:
        graph.eliminate_dead_code()
        graph_module.recompile()


STORED_ZEROS_RELU = "deadrelu_stored_zeros_relu"  # node.meta key: x of a ReLU spelled with stored zeros


def _stored_zeros(node: object, graph_module: fx.GraphModule) -> bool:
    """A parameter or buffer that holds zeros now (through copies): no ReLU's zeros (see _is_zeros)."""
    for _ in range(8):
        if not isinstance(node, fx.Node):
            return False
        if node.op == "get_attr":
            if not is_stored(graph_module, str(node.target)):
                return False
            value = graph_module
            for part in str(node.target).split("."):
                value = getattr(value, part, None)
            return isinstance(value, torch.Tensor) and not value.is_meta and not bool(value.any())
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload) or not node.args:
            return False
        if node.target.__name__.split(".")[0] not in VALUE_COPIES:
            return False
        node = node.args[0]
    return False


def _spelling(node: fx.Node, graph_module: fx.GraphModule, is_zeros) -> tuple[fx.Node, tuple] | None:
    """(x, the clamp's (target, args)) of a node that spells relu(x) with zeros that pass `is_zeros`
    (recompose_spelled_relus), else None."""
    aten = torch.ops.aten
    base, overload = node.target.__name__.split(".")[0], node.target._overloadname
    if base in MAXIMA and overload in ("default", "other") and len(node.args) == 2 and not node.kwargs:
        data = [a for a in node.args if not is_zeros(a, graph_module)]
        zeros = [a for a in node.args if a not in data]
        if len(data) != 1 or len(zeros) != 1:
            return None
        # fmax(x, 0) is 0 where x is NaN, as threshold is; maximum(x, 0) NaN there, as clamp_min is
        clamp = (aten.threshold.default, (data[0], 0.0, 0.0)) if base == "fmax" else None
        x, replacement = data[0], clamp or (aten.clamp_min.default, (data[0], 0.0))
        zero_value = _example(zeros[0])
        if zero_value is None:
            return None
        zero_shape = tuple(zero_value.shape)
    elif base in TENSOR_CLAMPS and overload == "Tensor" and not node.kwargs:
        # clamp(x, min=Z) with a tensor Z (and no max): maximum(x, Z)
        if len(node.args) < 2 or (len(node.args) > 2 and node.args[2] is not None):
            return None
        x, zeros = node.args[:2]
        if not is_zeros(zeros, graph_module) or _example(zeros) is None:
            return None
        clamp = aten.clamp_min_.default if base.endswith("_") else aten.clamp_min.default
        replacement, zero_shape = (clamp, (x, 0.0)), tuple(_example(zeros).shape)
    elif base == "where" and len(node.args) == 3 and not node.kwargs:
        tested = _sign_test(node.args[0], graph_module)
        if tested is None:
            return None
        x, keeps_x, true_at_nan = tested
        kept, other = node.args[1:] if keeps_x else node.args[:0:-1]
        if not _same(kept, x) or not is_zeros(other, graph_module):
            return None
        # where(x > 0, x, 0) is 0 at a NaN as threshold is; where(x <= 0, 0, x) NaN as clamp_min (a
        # negated mask the other way round)
        x = kept  # (x > 0 of another call of the layer that made the kept x: probe.ops.same_computation)
        replacement = (
            (aten.threshold.default, (x, 0.0, 0.0))
            if keeps_x != true_at_nan
            else (aten.clamp_min.default, (x, 0.0))
        )
        zero_shape = tuple(_example(other).shape) if _example(other) is not None else ()
    elif base in ("masked_fill", "masked_fill_") and len(node.args) == 3 and not node.kwargs:
        x, mask, other = node.args
        tested = _sign_test(mask, graph_module)
        if tested is None or tested[1] or not _same(tested[0], x) or not is_zeros(other, graph_module):
            return None
        in_place = base.endswith("_")
        if tested[2]:  # masked_fill(x, ~(x > 0), 0) is 0 at a NaN, as threshold is
            clamp = aten.threshold_.default if in_place else aten.threshold.default
            replacement = (clamp, (x, 0.0, 0.0))
        else:
            clamp = aten.clamp_min_.default if in_place else aten.clamp_min.default
            replacement = (clamp, (x, 0.0))
        zero_shape = tuple(_example(other).shape) if _example(other) is not None else ()
    elif (
        base in ("mul", "mul_")
        and overload == "Tensor"
        and len(node.args) == 2
        and not node.kwargs
        and is_zeros is _is_zeros
    ):
        # x * (x > 0): relu(x), but at x = -inf (NaN there, 0 as written here)
        x = next(
            (
                a
                for a, m in (node.args, node.args[::-1])
                if (tested := _sign_test(m, graph_module)) is not None and tested[1] and _same(tested[0], a)
            ),
            None,
        )
        if x is None or (base == "mul_" and node.args[0] is not x):
            return None
        clamp = aten.clamp_min_.default if base.endswith("_") else aten.clamp_min.default
        replacement = (clamp, (x, 0.0))
        zero_shape = tuple(_example(x).shape) if _example(x) is not None else ()
    else:
        return None
    x_value, out = _example(x), _example(node)
    if (
        x_value is None
        or out is None
        or not x_value.is_floating_point()
        or out.dtype != x_value.dtype
        or tuple(out.shape) != tuple(x_value.shape)
        or not zeros_fit(x_value.shape, zero_shape)
    ):
        return None  # widened by the zeros or promoted to another type: not x's values clamped
    return x, replacement


def prepare_graph(graph_module: fx.GraphModule, keep_spelled=None) -> None:
    """The rewrites before a graph's sites are found (the scan, `inspect` and `fix` alike, through
    exported.prepare_program; `keep_spelled`: recompose_spelled_relus's `keep`)."""
    decompose_rnn_cells(graph_module)
    recompose_thresholds(graph_module)
    recompose_spelled_relus(graph_module, keep_spelled)


def _graph_sites(graph_module: fx.GraphModule, ops: tuple[str, ...]) -> Counter:
    found: Counter = Counter()
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            kind = aten_op_kind(node.target.name(), tuple(node.args))
            if kind is not None and kind[0] in ops:
                found[kind[0]] += 1
    return found
