"""Deployed ONNX graphs: activations that are not Relu nodes.

- Fused: onnxruntime's optimizer (ORT_ENABLE_EXTENDED) folds Conv/Gemm + activation into com.microsoft
  FusedConv / FusedGemm / NhwcFusedConv (attribute `activation`). `unfuse` splits each back into the
  plain op and an explicit activation node, computing the same float numbers, so the scan sees them.
- Quantized: a QuantizeLinear whose zero point is its integer type's minimum clamps at 0: fed by a
  value that can be negative it *is* the ReLU (quantize_static removes a Relu after any op it can
  re-route, a BatchNormalization, a Mul, a Concat as well as a Conv, and folds it so; onnxruntime's
  optimizer removes a Relu kept between a DequantizeLinear and a QuantizeLinear so). The same holds for
  the output of QLinearConv / QLinearMatMul / QGemm and of the com.microsoft QLinearAdd / QLinearMul /
  QLinearConcat / pools (QOperator graphs). A unit fires when its quantized value is above the zero
  point, i.e. when the dequantized value is > 0. Whether the value can be negative is decided by
  `may_be_negative` (a clamp of a value that never is, after a Sigmoid or a max pool of a ReLU, is none).
  `expose_quantized` gives every such output a DequantizeLinear (float, >= 0) for the statistics.
- Blocked layout: ORT_ENABLE_ALL graphs (CPU) hold com.microsoft.nchwc Conv(activation=…) whose output is
  in onnxruntime's NCHWc layout (channels padded to a block of 8 or 16). `expose_nchwc` adds beside each a
  copy without the activation, reordered back to NCHW with the model's real channel count, and the
  explicit activation: the deployed graph's own outputs are untouched, the site sees C real channels.
- What stays hidden (other fused activations, custom domains, …) is listed by `unseen`.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper

from deadrelu_cli.wiring.onnx_index import GraphIndex, attr

FUSED_OPS = ("FusedConv", "FusedGemm", "NhwcFusedConv")
# activations onnxruntime fuses, by their name in the `activation` attribute (all standard ONNX ops)
UNFUSABLE = ("Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "HardSigmoid")
# QOperator ops: (index of the output scale, index of the output zero point)
QLINEAR_OUTPUTS = {
    "QLinearConv": (6, 7),
    "QLinearMatMul": (6, 7),
    "QGemm": (7, 8),
    "QLinearAdd": (6, 7),
    "QLinearMul": (6, 7),
    "QLinearConcat": (0, 1),
    "QLinearAveragePool": (3, 4),
    "QLinearGlobalAveragePool": (3, 4),
    "QLinearReduceMean": (3, 4),
}
# ... and the positions of their quantized data inputs' zero points, for those whose output has a sign
# only their inputs decide (a sum, product, concatenation or mean of non-negative values is one)
_QLINEAR_INPUT_ZEROS = {
    "QLinearAdd": (2, 5),
    "QLinearMul": (2, 5),
    "QLinearAveragePool": (2,),
    "QLinearGlobalAveragePool": (2,),
    "QLinearReduceMean": (2,),
}
# ops whose output is never negative, whatever their input
_NONNEGATIVE_OPS = (
    "Relu",
    "Sigmoid",
    "HardSigmoid",
    "Softmax",
    "Softplus",
    "Exp",
    "Abs",
    "Sqrt",
    "ReduceL1",
    "ReduceL2",
    "ReduceSumSquare",
    "Shape",
    "Size",
    "QLinearSigmoid",
    "QLinearSoftmax",
)
# ops whose output is non-negative when the data inputs listed (all inputs: None) are: they select,
# move, pool, sum or multiply values (a max is non-negative as soon as one input is: see below)
_SIGN_KEEPING_OPS = {
    "Identity": (0,),
    "Dropout": (0,),
    "Cast": (0,),
    "Reshape": (0,),
    "Flatten": (0,),
    "Squeeze": (0,),
    "Unsqueeze": (0,),
    "Transpose": (0,),
    "Slice": (0,),
    "Split": (0,),
    "Gather": (0,),
    "GatherElements": (0,),
    "GatherND": (0,),
    "Tile": (0,),
    "Expand": (0,),
    "DepthToSpace": (0,),
    "SpaceToDepth": (0,),
    "MaxPool": (0,),
    "AveragePool": (0,),
    "GlobalAveragePool": (0,),
    "GlobalMaxPool": (0,),
    "NhwcMaxPool": (0,),
    "ReduceMax": (0,),
    "ReduceMin": (0,),
    "ReduceMean": (0,),
    "ReduceSum": (0,),
    "Pad": (0, 2),
    "Where": (1, 2),
    "Concat": None,
    "Add": None,
    "Mul": None,
    "Div": None,
    "Min": None,
    "Sum": None,
    "Mean": None,
}
_SIGN_DEPTH = 200  # deeper than this the walk gives up and answers "may be negative"
STANDARD_DOMAINS = ("", "ai.onnx", "com.microsoft", "ai.onnx.ml")
# com.microsoft / standard ops that are activations the scan does not count (quantized or fused forms)
HIDDEN_ACTIVATIONS = (
    "QLinearLeakyRelu",
    "QLinearSigmoid",
    "QLinearSoftmax",
    "QuickGelu",
    "BiasGelu",
    "FastGelu",
)
NCHWC = "com.microsoft.nchwc"
NCHWC_CONV = "nchwc.Conv"  # how scanned sites name the op they were split from (module_type)
# nchwc ops that keep every channel where it was (walked to find the channel count of a blocked tensor)
NCHWC_CHANNEL_PRESERVING = ("MaxPool", "AveragePool", "GlobalMaxPool", "GlobalAveragePool", "Upsample")
NCHWC_COPY = "deadrelu: NCHW copy of an nchwc Conv's activation"  # doc_string of the nodes added
DEQUANTIZED_SUFFIX = "_deadrelu_dequantized"
UNFUSED_MARK = "_deadrelu_unfused_"  # the pre-activation of an unfused node: <output>_deadrelu_unfused_<op>


def nchwc_tensor(activation_name: str) -> str:
    """The tensor an nchwc Conv's activation wrote in the graph onnxruntime optimized (it names the
    nchwc node '<that tensor>_nchwc'), from the name `expose_nchwc` gave the activation's copy."""
    return activation_name.removesuffix(f"/{NCHWC_CONV}")


def fused_origin(pre_activation: str) -> str | None:
    """The fused op type an activation was split from (by `unfuse`), or None."""
    head, mark, op = pre_activation.rpartition(UNFUSED_MARK)
    return op if mark and op in (*FUSED_OPS, NCHWC_CONV) else None


def _zero_point_is_minimum(index: GraphIndex, node: onnx.NodeProto, position: int, optional: bool) -> bool:
    """True when the zero point at `position` is the minimum of its integer type (uint8 0, int8 -128, …).
    A QuantizeLinear without one quantizes to uint8 around 0: also the minimum."""
    name = node.input[position] if len(node.input) > position else ""
    if not name:
        return optional and attr(node, "output_dtype", 0) in (0, TensorProto.UINT8)
    zero = index.constant(name)
    if zero is None or zero.dtype.kind not in "iu" or zero.size == 0:
        return False
    return bool(np.all(zero == np.iinfo(zero.dtype).min))


def _dequantized_consumer(index: GraphIndex, quantized: str) -> str | None:
    for consumer in index.consumers.get(quantized, []):
        if consumer.op_type == "DequantizeLinear" and consumer.input[0] == quantized:
            return consumer.output[0]
    return None


def _producer(index: GraphIndex, name: str) -> tuple[GraphIndex, onnx.NodeProto | None]:
    """The node writing `name` and the index of its graph (a subgraph reads tensors of its outer graphs)."""
    scope: GraphIndex | None = index
    while scope is not None:
        node = scope.producer.get(name)
        if node is not None:
            return scope, node
        scope = scope.outer
    return index, None


def may_be_negative(index: GraphIndex, name: str, memo: dict | None = None, depth: int = 0) -> bool:
    """Whether some node of the graph can make `name` negative: False only when every path back from it
    reaches, through ops that keep the sign of non-negative values (pools, re-shapes, sums, products,
    concatenations), an op whose output is never negative (a Relu, a Sigmoid, a dequantized tensor whose
    zero point is its type's minimum), a non-negative constant or a graph input. Graph inputs count as
    given: a quantization of the input (or of the input scaled in the graph) is not a folded ReLU."""
    memo = {} if memo is None else memo
    if name in memo:
        return memo[name]
    if depth > _SIGN_DEPTH:
        return True
    constant = index.constant(name)
    if constant is not None:
        return bool(constant.dtype.kind in "fiu" and np.any(constant < 0))
    scope, node = _producer(index, name)
    if node is None:
        return False  # a graph input (or an outer graph's): taken as given
    memo[name] = True  # a cycle (malformed graph) answers "may be negative"
    op = node.op_type
    if op in ("DequantizeLinear", "QuantizeLinear"):  # the value a quantized tensor stands for
        answer = not _zero_point_is_minimum(scope, node, 2, optional=op == "QuantizeLinear")
    elif op in _NONNEGATIVE_OPS:
        answer = False
    elif op == "Clip":
        low = scope.constant(node.input[1]) if len(node.input) > 1 else attr(node, "min")
        answer = low is None or bool(np.any(np.asarray(low) < 0))
    elif op == "Max":  # the max of values one of which is never negative is never negative
        answer = all(may_be_negative(scope, i, memo, depth + 1) for i in node.input if i)
    elif op == "Resize" or op == "Upsample":  # cubic interpolation overshoots: only nearest/linear keep it
        mode = attr(node, "mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        answer = mode not in ("nearest", "linear", "bilinear") or may_be_negative(
            scope, node.input[0], memo, depth + 1
        )
    elif op in _QLINEAR_INPUT_ZEROS:
        answer = not all(
            _zero_point_is_minimum(scope, node, at, optional=False) for at in _QLINEAR_INPUT_ZEROS[op]
        )
    elif op == "QLinearConcat":  # inputs (tensor, scale, zero point) from position 2 on
        answer = not all(
            _zero_point_is_minimum(scope, node, at, optional=False) for at in range(4, len(node.input), 3)
        )
    elif op == "Sub" and _never_below(scope, node.input[0], node.input[1]):
        answer = False
    elif op == "Pad" and float(attr(node, "value", 0.0) or 0.0) < 0:  # opset < 11: the fill value
        answer = True
    elif op in _SIGN_KEEPING_OPS and node.domain in ("", "ai.onnx", "com.microsoft"):
        positions = _SIGN_KEEPING_OPS[op] or range(len(node.input))
        answer = any(
            may_be_negative(scope, node.input[at], memo, depth + 1)
            for at in positions
            if at < len(node.input) and node.input[at]
        )
    else:  # a Conv, MatMul, BatchNormalization, Sub, LayerNormalization, Tanh, …: any sign
        answer = True
    memo[name] = answer
    return answer


_LAYOUT_ONLY = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand")


def _unshaped(index: GraphIndex, name: str) -> tuple[str, onnx.NodeProto | None]:
    """The tensor `name` re-shapes (through Reshape, Unsqueeze, Expand, …), and the node that wrote it."""
    for _ in range(_SIGN_DEPTH):
        _, node = _producer(index, name)
        if node is None or node.op_type not in _LAYOUT_ONLY or not node.input:
            return name, node
        name = node.input[0]
    return name, None


def _never_below(index: GraphIndex, minuend: str, subtrahend: str) -> bool:
    """`minuend - subtrahend` is never negative by construction: x - ReduceMin(x), ReduceMax(x) - x or
    ReduceMax(x) - ReduceMin(x), re-shapes aside (the parts of a min-max normalisation, whose result a
    static quantization stores with zero point 0 although no ReLU was there)."""
    high, high_node = _unshaped(index, minuend)
    low, low_node = _unshaped(index, subtrahend)

    def reduced(node: onnx.NodeProto | None, op: str) -> str | None:
        return _unshaped(index, node.input[0])[0] if node is not None and node.op_type == op else None

    smallest, largest = reduced(low_node, "ReduceMin"), reduced(high_node, "ReduceMax")
    return (smallest is not None and smallest in (high, largest)) or (largest is not None and largest == low)


def implicit_relu(node: onnx.NodeProto, index: GraphIndex) -> tuple[str, str | None, str] | None:
    """(name, pre-activation tensor, dequantized output or None) of the implicit ReLU that `node`
    performs, if it does: a quantization whose zero point is its type's minimum, of a value that can be
    negative. The pre-activation of a QOperator op lives inside it: None then."""
    if node.op_type == "QuantizeLinear":
        if not _zero_point_is_minimum(index, node, 2, optional=True):
            return None
        if not may_be_negative(index, node.input[0]):
            return None
        found = node.input[0], node.input[0], _dequantized_consumer(index, node.output[0])
    else:
        positions = QLINEAR_OUTPUTS.get(node.op_type)
        if positions is None or not _zero_point_is_minimum(index, node, positions[1], optional=False):
            return None
        if node.op_type not in ("QLinearConv", "QLinearMatMul", "QGemm") and not may_be_negative(
            index, node.output[0]
        ):
            return None
        found = node.output[0], None, _dequantized_consumer(index, node.output[0])
    readers = index.consumers.get(found[2], []) if found[2] else []
    if readers and all(_clamps_at_zero(index, reader) for reader in readers):
        return None  # the graph kept its Relu after the clamp (QDQKeepRemovableActivations): that is the site
    return found


def _clamps_at_zero(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """A Relu, or a Clip whose lower bound is 0 (a ReLU6): an activation node the scan counts itself."""
    if node.op_type == "Relu":
        return True
    if node.op_type != "Clip":
        return False
    low = index.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else attr(node, "min")
    return low is not None and bool(np.all(np.asarray(low) == 0))


def expose_quantized(model: onnx.ModelProto) -> int:
    """Give each implicit ReLU without one a DequantizeLinear of its quantized output (same scale and
    zero point; the graph's own outputs are untouched), in the main graph and in every subgraph.
    Returns how many were added."""
    return _expose_quantized_graph(model.graph, None)


def _expose_quantized_graph(graph: onnx.GraphProto, outer: GraphIndex | None) -> int:
    index = GraphIndex(graph, outer)
    added = []
    inner = 0
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                inner += _expose_quantized_graph(a.g, index)
        found = implicit_relu(node, index)
        if found is None or found[2] is not None:
            continue
        if node.op_type == "QuantizeLinear":
            inputs = list(node.input[1:3])
        else:
            scale_at, zero_at = QLINEAR_OUTPUTS[node.op_type]
            inputs = [node.input[scale_at], node.input[zero_at] if len(node.input) > zero_at else ""]
        out = node.output[0] + DEQUANTIZED_SUFFIX
        dq = helper.make_node("DequantizeLinear", [node.output[0], *inputs], [out], name=out)
        axis = attr(node, "axis") if node.op_type == "QuantizeLinear" else None  # QLinearConcat's is not
        if axis is not None:
            dq.attribute.append(helper.make_attribute("axis", axis))
        added.append(dq)
        shape = index.shape(node.output[0])
        if shape is not None:
            graph.value_info.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, shape))
    graph.node.extend(added)  # appended: nothing reads them, so the order stays topological
    return len(added) + inner


def _activation_nodes(
    node: onnx.NodeProto, pre: str, out: str | None = None, name: str = ""
) -> list[onnx.NodeProto] | None:
    """The explicit activation a fused node applies to `pre` (written to `out`, by default the fused
    node's output), or None when it cannot be written so."""
    kind = attr(node, "activation", b"")
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    if kind not in UNFUSABLE:
        return None
    if node.op_type == "FusedGemm":  # activation_alpha -> alpha, … (onnxruntime's FusedGemm kernel)
        params = {
            a.name[len("activation_") :]: helper.get_attribute_value(a)
            for a in node.attribute
            if a.name.startswith("activation_")
        }
        values = [params[k] for k in ("alpha", "beta") if k in params]
    else:
        params, values = {}, list(attr(node, "activation_params", []) or [])
    out = out or node.output[0]
    # unnamed by default: the site is named by the tensor it writes, as the float graph's Relu wrote it
    stem = f"{name or node.name or out}/{kind}"
    if kind == "Clip":  # FusedConv: activation_params = [min, max]; opset 11+ Clip takes them as inputs
        if len(values) != 2:
            return None
        bounds = [f"{stem}/min", f"{stem}/max"]
        return [
            helper.make_node(
                "Constant", [], [bounds[i]], name=bounds[i], value=helper.make_tensor(bounds[i], 1, [], [v])
            )
            for i, v in enumerate(values)
        ] + [helper.make_node("Clip", [pre, *bounds], [out], name=name)]
    attrs = {}
    if kind == "LeakyRelu" and values:
        attrs["alpha"] = float(values[0])
    if kind == "HardSigmoid":
        attrs.update(zip(("alpha", "beta"), (float(v) for v in values), strict=False))
    attrs.update({k: v for k, v in params.items() if k in ("alpha", "beta") and kind != "Relu"})
    return [helper.make_node(kind, [pre], [out], name=name, **attrs)]


def _graphs(graph: onnx.GraphProto):
    """Every subgraph in `graph` (If branches, Loop/Scan bodies), then `graph`: inner graphs first, so that
    rewriting an outer graph's node list (which copies its nodes, subgraphs included) keeps their edits."""
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
    yield graph


def unfuse(model: onnx.ModelProto) -> Counter:
    """Split each FusedConv / FusedGemm / NhwcFusedConv with a known activation into the op and the
    activation (the same float computation), in the main graph and in every If/Loop/Scan body
    (onnxruntime optimizes those too); returns the fused node types split, with counts."""
    split: Counter = Counter()
    for graph in list(_graphs(model.graph)):
        split += _unfuse_graph(graph)
    if split and not any(entry.domain in ("", "ai.onnx") for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid("", 13))
    return split


def _unfuse_graph(graph: onnx.GraphProto) -> Counter:
    nodes = list(graph.node)
    shapes = {vi.name: vi for vi in list(graph.value_info) + list(graph.output)}
    rebuilt, split = [], Counter()
    for node in nodes:
        if node.op_type not in FUSED_OPS or node.domain != "com.microsoft":
            rebuilt.append(node)
            continue
        pre = f"{node.output[0]}{UNFUSED_MARK}{node.op_type}"
        activation = _activation_nodes(node, pre)
        if activation is None:
            rebuilt.append(node)
            continue
        kept = [a for a in node.attribute if not a.name.startswith("activation")]
        if node.op_type == "NhwcFusedConv":  # the same op without an activation is a plain NHWC conv
            plain = helper.make_node(
                node.op_type, list(node.input), [pre], name=node.name, domain=node.domain
            )
            extra = []
        else:
            op = "Conv" if node.op_type == "FusedConv" else "Gemm"
            base_inputs = list(node.input[:3])
            plain = helper.make_node(op, base_inputs, [pre], name=node.name)
            extra = []
            if node.op_type == "FusedConv" and len(node.input) > 3 and node.input[3]:
                # FusedConv's 4th input Z is added before the activation (Conv + Add + Relu fusion)
                summed = pre + "_sum"
                plain.output[0] = summed
                extra = [helper.make_node("Add", [summed, node.input[3]], [pre], name=f"{node.name}/Add")]
        plain.attribute.extend(kept)
        rebuilt.extend([plain, *extra, *activation])
        known = shapes.get(node.output[0])
        if known is not None:  # the pre-activation has the output's type and shape
            for name in {pre, plain.output[0]}:
                typed = onnx.ValueInfoProto()
                typed.CopyFrom(known)
                typed.name = name
                graph.value_info.append(typed)
        split[node.op_type] += 1
    if split:
        del graph.node[:]
        graph.node.extend(rebuilt)
    return split


def _nchwc_channels(index: GraphIndex, blocked: str, depth: int = 0) -> tuple[int, str | None] | None:
    """(real channel count, its NCHW tensor if a ReorderOutput writes one) of a blocked nchwc tensor:
    from a ReorderOutput's `channels`, or from a Conv reading it blocked (group 1: its weight's input
    channels; onnxruntime feeds blocked data to a Conv only in whole blocks). Through nchwc pools and
    depthwise Convs (each keeps every channel where it was)."""
    if depth > 8:
        return None
    found = None
    for consumer in index.consumers.get(blocked, []):
        if consumer.domain != NCHWC:
            continue
        if consumer.op_type == "ReorderOutput" and attr(consumer, "channels"):
            nchw = None if attr(consumer, "channels_last", 0) else consumer.output[0]
            return int(attr(consumer, "channels")), nchw
        weight = index.stored_tensor(consumer.input[1]) if consumer.op_type == "Conv" else None
        if consumer.op_type == "Conv" and consumer.input[0] == blocked and attr(consumer, "group", 1) == 1:
            if weight is not None and len(weight.dims) == 4:
                found = found or (int(weight.dims[1]), None)
        elif (
            consumer.op_type == "Conv"
            and consumer.input[0] == blocked
            and weight is not None
            and len(weight.dims) == 4
            and weight.dims[1] == 1
            and attr(consumer, "group", 1) == weight.dims[0]
        ):  # depthwise: channel c in, channel c out (its group is the padded count): look past it
            found = found or _nchwc_channels(index, consumer.output[0], depth + 1)
        elif consumer.op_type in NCHWC_CHANNEL_PRESERVING:
            found = found or _nchwc_channels(index, consumer.output[0], depth + 1)
    return found


def expose_nchwc(model: onnx.ModelProto) -> set[str]:
    """Beside each com.microsoft.nchwc Conv with a known activation: the same Conv without it, a
    ReorderOutput to NCHW with the real channel count (the pre-activation) and the explicit activation,
    which nothing of the model reads. Returns the outputs of the nchwc Convs so exposed."""
    graph = model.graph
    index = GraphIndex(graph)
    names = {node.name for node in graph.node}
    rebuilt, exposed = [], set()
    for node in graph.node:
        rebuilt.append(node)
        if node.domain != NCHWC or node.op_type != "Conv":
            continue
        channels = _nchwc_channels(index, node.output[0])
        if channels is None or _activation_nodes(node, "") is None:
            continue
        count, nchw = channels
        # onnxruntime names the nchwc Conv after the output of the node it replaced (usually the tensor the
        # float graph's activation wrote, as unfused sites are named)
        shown = node.name.removesuffix("_nchwc") if node.name.endswith("_nchwc") else nchw or node.output[0]
        if shown in names:
            shown = f"{shown}/{NCHWC_CONV}"
        pre = f"{shown}{UNFUSED_MARK}{NCHWC_CONV}"
        kept = [a for a in node.attribute if not a.name.startswith("activation")]
        plain = helper.make_node("Conv", list(node.input), [pre + "_blocked"], domain=NCHWC)
        plain.attribute.extend(kept)
        reorder = helper.make_node("ReorderOutput", plain.output, [pre], domain=NCHWC, channels=count)
        activation = _activation_nodes(node, pre, out=f"{shown}_deadrelu_nchwc", name=shown)
        for tensor in (pre, activation[-1].output[0]):  # NCHW: units on dim 1 (onnxruntime's 2-D convs)
            graph.value_info.append(
                helper.make_tensor_value_info(tensor, TensorProto.FLOAT, [None, count, None, None])
            )
        for copy in (plain, reorder, *activation):
            copy.doc_string = NCHWC_COPY
        rebuilt += [plain, reorder, *activation]  # right after it: the scan keeps the graph's order
        names.add(shown)
        exposed.add(node.output[0])
    if exposed:
        del graph.node[:]
        graph.node.extend(rebuilt)
    if exposed and not any(entry.domain in ("", "ai.onnx") for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid("", 13))
    return exposed


def strip_nchwc_copies(model: onnx.ModelProto) -> None:
    """Remove what `expose_nchwc` added (before writing a model: nothing of it reads them)."""
    kept = [node for node in model.graph.node if node.doc_string != NCHWC_COPY]
    if len(kept) != len(model.graph.node):
        gone = {out for node in model.graph.node if node.doc_string == NCHWC_COPY for out in node.output}
        values = [vi for vi in model.graph.value_info if vi.name not in gone]
        del model.graph.node[:], model.graph.value_info[:]
        model.graph.node.extend(kept)
        model.graph.value_info.extend(values)


def unseen(model: onnx.ModelProto, exposed: set[str] = frozenset()) -> Counter:
    """Nodes that may hold an activation the scan cannot count: fused nodes left fused (an activation
    the unfusing does not know, or onnxruntime's nchwc layout), quantized activations, custom domains.
    Keyed 'domain.Op' (or 'Op' for standard ones); nodes whose output is in `exposed` are scanned."""
    found: Counter = Counter()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            label = f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
            activation = attr(node, "activation")
            if node.output and node.output[0] in exposed:
                pass  # an nchwc Conv that expose_nchwc gave a scannable copy
            elif activation not in (None, b"", ""):  # a fused node left fused (nchwc Conv included)
                found[f"{label}(activation={activation.decode()})"] += 1
            elif node.domain == "com.microsoft.nchwc":
                pass  # onnxruntime's blocked layout: reorders, pools; activations carry the attribute above
            elif node.domain not in STANDARD_DOMAINS:
                found[label] += 1
            elif node.op_type in HIDDEN_ACTIVATIONS:
                found[label] += 1
            elif node.op_type in ("RNN", "GRU", "LSTM") and node.domain in ("", "ai.onnx"):
                # their activations (default Tanh and Sigmoid gates) run inside the node at every time step
                for kind in attr(node, "activations") or []:
                    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
                    if kind not in ("Tanh", "Sigmoid", "HardSigmoid", "Softsign"):
                        found[f"{label}(activation={kind})"] += 1
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)

    walk(model.graph)
    return found


def deployed_view(model: onnx.ModelProto) -> tuple[bool, list[str], Counter]:
    """Rewrite `model` in place so that every fused or quantized activation the tool knows is
    scannable; (whether anything changed, notes for the user, the nodes left unseen with counts)."""
    notes = []
    split = unfuse(model)
    if split:
        listed = ", ".join(f"{op} ×{n}" for op, n in split.most_common())
        notes.append(f"fused activations scanned unfused ({listed}): the same float computation")
    nchwc = expose_nchwc(model)
    if nchwc:
        notes.append(
            f"onnxruntime's blocked-layout convolutions (com.microsoft.nchwc.Conv ×{len(nchwc)}) scanned "
            "through an NCHW copy of their pre-activation"
        )
    exposed = expose_quantized(model)
    # the caller names them (which of them may hide dead units of the scanned ops: gate.split_unseen)
    hidden = unseen(model, nchwc)
    return bool(split) or bool(nchwc) or exposed > 0, notes, hidden
