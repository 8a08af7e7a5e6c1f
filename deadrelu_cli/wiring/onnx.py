"""The wiring reader for ONNX graphs: which node and stored tensors make a site's units, and which read them.

Producers recognised: Conv / ConvTranspose / Gemm (their own bias), MatMul + Add(bias), Conv without bias +
Add(per-channel bias, re-shaped or not: paddle2onnx), BatchNormalization; reached through the
pass-through ops. Consumers: one Conv / Gemm / MatMul with a stored weight, reached through the
unit-preserving ops. One list of each kind lives here, for every ONNX reader.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from deadrelu_cli.probe.ops import reshaped_unit_axis
from deadrelu_cli.wiring.model import (
    BatchNormRef,
    ProducerTrace,
    TensorRef,
    UnitWiring,
    is_last_axis_vector,
)
from deadrelu_cli.wiring.onnx_index import GraphIndex, attr, stored_array, uses

CHANNEL_FIRST_OPS = (
    "Conv",
    "ConvTranspose",
    "BatchNormalization",
    "InstanceNormalization",
    "GroupNormalization",
    "QLinearConv",
    "ConvInteger",
)
LAST_DIM_OPS = ("MatMul", "Gemm", "LayerNormalization", "QGemm", "QLinearMatMul", "MatMulInteger")
# onnxruntime's NHWC kernels (its layout transformation at ORT_ENABLE_ALL writes them, with Transposes
# around): com.microsoft ops always channels-last, and those whose `channels_last` attribute says so
# (QLinearConv, QLinearAveragePool, QLinearGlobalAveragePool): their units are on the last axis
NHWC_OPS = ("NhwcConv", "NhwcFusedConv", "NhwcMaxPool")
# ops a pre-activation flows through from its producer (the bias survives only scalar operands);
# a quantize/dequantize pair keeps each unit where it was
PASS_THROUGH_OPS = (
    "Add",
    "Mul",
    "Sub",
    "Div",
    "BatchNormalization",
    "Identity",
    "Dropout",
    "Cast",
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearAdd",
    "QLinearMul",
)
# the input holding the weight of each producer kind (quantized graphs keep the float graph's weight
# names, suffixed: c1.weight -> c1.weight_quantized; report.diff.weight_key strips that)
WEIGHT_INPUT = {
    "Conv": 1,
    "ConvTranspose": 1,
    "Gemm": 1,
    "FusedConv": 1,
    "NhwcFusedConv": 1,
    "FusedGemm": 1,
    "ConvInteger": 1,
    "MatMulInteger": 1,
    "QLinearConv": 3,
    "QLinearMatMul": 3,
    "QGemm": 3,
}
# ops after an activation that keep each unit's values in their own slots and its axis where it was
UNIT_PRESERVING_OPS = (
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Dropout",
    "Identity",
    "Cast",
)
# ... and those that also keep the order of the values but move the unit axis (a consumer still reads
# each unit's values in consecutive columns)
FLATTENING_OPS = ("Flatten",)
# single-input ops whose output *is* their input, value for value (checked per node by `passes_values`):
# exporters put them between a producer and its activation (paddle2onnx: Conv -> Add -> Identity -> Relu)
VALUE_PRESERVING_OPS = ("Identity", "Dropout", "Cast")
# float casts that represent every value of the source type exactly (widening)
_EXACT_CASTS = {
    (TensorProto.FLOAT16, TensorProto.FLOAT),
    (TensorProto.BFLOAT16, TensorProto.FLOAT),
    (TensorProto.FLOAT16, TensorProto.DOUBLE),
    (TensorProto.BFLOAT16, TensorProto.DOUBLE),
    (TensorProto.FLOAT, TensorProto.DOUBLE),
}
# how many Concats / forks the reader walk follows (a DenseNet-style block of L layers nests L joins)
MAX_JOINS = 256
_FLOAT_TYPES = (TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE)


def _elem_type(index: GraphIndex, name: str) -> int | None:
    """The element type of a tensor when the graph says it (value_info, an input, an initializer)."""
    for scope in (index, index.outer):
        if scope is None:
            continue
        vi = scope.value_info.get(name)
        if vi is not None and vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            return vi.type.tensor_type.elem_type
        if name in scope.initializers:
            return scope.initializers[name].data_type
    return None


def passes_values(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """Whether `node`'s first output equals its first input element for element: an Identity, a Dropout
    in inference mode (no training_mode input, or a constant false one), a Cast to the same float type
    or a wider one. The wiring walks through these in both directions."""
    if node.op_type not in VALUE_PRESERVING_OPS or not node.input or not node.output:
        return False
    if node.op_type == "Identity":
        return True
    if node.op_type == "Dropout":
        if attr(node, "is_test", 1) == 0:  # opset < 7: is_test = 0 is training
            return False
        if len(node.input) > 2 and node.input[2]:
            training = index.constant(node.input[2])
            return training is not None and not bool(np.any(training))
        return True
    source, target = _elem_type(index, node.input[0]), attr(node, "to")
    return source in _FLOAT_TYPES and (source == target or (source, target) in _EXACT_CASTS)


def value_source(index: GraphIndex, name: str) -> str:
    """The earliest tensor holding the same values as `name`, back through value-preserving nodes."""
    for _ in range(32):
        node = index.producer.get(name)
        if node is None or not passes_values(index, node):
            return name
        name = node.input[0]
    return name


def stored_behind(index: GraphIndex, name: str) -> str | None:
    """The stored tensor whose values `name` holds: `name` itself, or an initializer that exact widening
    Casts (or Identities) carry to it, each tensor on the way read by that way alone (weights kept in
    bfloat16 or float16 and computed in float32: a fix edits the stored tensor, in its own dtype); else
    None."""
    for _ in range(8):
        if stored_array(index, name) is not None:
            return name
        node = index.producer.get(name)
        if node is None or not passes_values(index, node) or uses(index, node.input[0]) != 1:
            return None
        name = node.input[0]
    return None


def display_name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def conv_through_squeeze(index: GraphIndex, name: str) -> onnx.NodeProto | None:
    """The node behind `name`; a Conv also through Squeezes/Unsqueezes of axes after dim 1 (tf2onnx
    writes a Conv1D as Unsqueeze -> Conv2D -> Squeeze): its channels stay on dim 1, value for value."""
    node = index.producer.get(value_source(index, name))
    for step in range(4):
        if node is None or node.op_type not in ("Squeeze", "Unsqueeze"):
            return (
                node
                if step == 0 or (node is not None and node.op_type in ("Conv", "ConvTranspose"))
                else None
            )
        axes = _squeeze_axes(index, node)
        rank = index.rank(node.input[0])
        if axes is None or rank is None:
            return None
        rank = rank if node.op_type == "Squeeze" else rank + len(axes)
        if any(a % rank <= 1 for a in axes):
            return None
        node = index.producer.get(value_source(index, node.input[0]))
    return None


def conv_added_bias(
    conv: onnx.NodeProto, added: np.ndarray, index: GraphIndex, rank: int | None = None
) -> np.ndarray | None:
    """The per-channel bias of Conv(x) + added, when `added` holds one value per output channel laid
    out on dim 1 ([C, 1, 1], [1, C, 1, 1], …, of a tensor of `rank` dims: the Conv's output rank unless
    a Squeeze changed it); the Conv's own bias, if any, included. Else None."""
    weight = index.constant(conv.input[1]) if len(conv.input) > 1 else None
    if weight is None or weight.ndim < 3:
        return None
    rank = rank or weight.ndim
    channels = weight.shape[0] if conv.op_type == "Conv" else weight.shape[1] * int(attr(conv, "group", 1))
    if added.ndim > rank or added.size != channels:
        return None
    aligned = (1,) * (rank - added.ndim) + added.shape
    if aligned[1] != channels or int(np.prod(aligned)) != channels:
        return None
    bias = added.reshape(-1).astype(np.float64)
    own = index.constant(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    return bias if own is None else bias + own.reshape(-1)


def channels_last(node: onnx.NodeProto) -> bool:
    """Whether `node` is one of onnxruntime's NHWC kernels (units on the last axis of its output)."""
    return node.domain == "com.microsoft" and (
        node.op_type in NHWC_OPS or bool(attr(node, "channels_last", 0))
    )


def trace_producer(index: GraphIndex, input_name: str) -> ProducerTrace:
    """Unit axis, producer and bias from the op that produced an activation's input (through
    Add/Mul/BN/bias, and Transposes, Squeezes, Unsqueezes, Reshapes and Flattens, which move the unit
    axis: `axis`; one whose move is not known marks the units `lost`)."""
    moves: list[
        tuple[str, list, int | None]
    ] = []  # (op, perm / axes / shapes, its input's rank), activation first
    trace = _trace_producer(index, input_name, moves)
    if moves and trace.channel_first is not None:
        rank = moves[-1][2]
        axis = None if rank is None else 1 if trace.channel_first else rank - 1
        for op, values, rank_in in reversed(moves):  # from the producer's side to the activation's
            if axis is None or rank_in != rank:
                axis = None
            elif op == "Reshape":  # values: the shapes before and after
                axis = reshaped_unit_axis(values[0], values[1], axis)
                rank = len(values[1])
            elif op == "Transpose":
                axis = values.index(axis) if axis in values else None
                rank = len(values)
            elif op == "Squeeze":  # the removed axes (all size 1) are no unit axis
                gone = {a % rank for a in values}
                axis = None if axis in gone else axis - sum(a < axis for a in gone)
                rank -= len(gone)
            else:  # Unsqueeze: new axes of size 1 at `values` of the output
                rank += len(values)
                added = {a % rank for a in values}
                axis = [k for k in range(rank) if k not in added][axis]
            if axis is None or axis == 0:
                trace.channel_first, trace.producer, trace.bias, trace.lost = None, None, None, True
                return trace
        trace.axis = axis
        trace.channel_first = True if axis == 1 else False if axis == rank - 1 else None
    return trace


# between a fused experts' product and its activation: the gate half sliced or split off, reshaped
_TO_EXPERT_PRODUCT = frozenset(
    {"Slice", "Split", "Squeeze", "Unsqueeze", "Reshape", "Transpose", "Flatten", "Identity", "Cast"}
    | {"Add", "Sub", "Mul", "Div"}
)
# between a stored [experts, rows, cols] weight and the gather of the routed tokens' experts
_TO_STORED_WEIGHT = frozenset({"Transpose", "Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze"})


def fused_experts_rows(index: GraphIndex, input_name: str) -> int:
    """How many experts' rows reach an activation through one product (0: none): a fused mixture of
    experts exported (transformers 5's batched experts: the routed tokens' expert weights gathered from one
    stored `[experts, …]` tensor, one MatMul, one activation for all of them), where unit i of every expert
    is one column of the activation's input. Walks back through slices, splits, reshapes and elementwise
    ops to the MatMul/Gemm/Einsum, and from its operands to a Gather of a stored 3-D tensor."""
    pending, seen = [input_name], 0
    while pending and seen < 24:
        name, seen = pending.pop(), seen + 1
        node = index.producer.get(name)
        if node is None:
            continue
        if node.op_type in ("MatMul", "Gemm", "Einsum"):
            counts = [_gathered_experts(index, operand) for operand in node.input if operand]
            if any(counts):
                return max(counts)
        elif node.op_type in _TO_EXPERT_PRODUCT:
            pending.extend(i for i in node.input if i and index.stored_tensor(i) is None)
    return 0


def _gathered_experts(index: GraphIndex, name: str) -> int:
    """The experts of a stored [experts, …] tensor (two or more, rank 3) that `name` gathers rows of."""
    for _ in range(8):
        node = index.producer.get(name)
        if node is None:
            return 0
        if node.op_type in ("Gather", "GatherND", "GatherElements"):
            data = node.input[0]
            for _ in range(8):  # through a transpose or cast of the stored tensor
                stored = index.stored_tensor(data)
                if stored is not None:
                    dims = list(stored.dims)
                    return int(dims[0]) if len(dims) == 3 and dims[0] >= 2 else 0
                source = index.producer.get(data)
                if source is None or source.op_type not in _TO_STORED_WEIGHT:
                    return 0
                data = source.input[0]
            return 0
        if node.op_type not in _TO_STORED_WEIGHT:
            return 0
        name = node.input[0]
    return 0


def _reshape_move(index: GraphIndex, node: onnx.NodeProto) -> tuple[str, list, int | None]:
    """A node that keeps its input's elements in order (Reshape, Flatten, a Squeeze), as a move of the
    unit axis read by the shapes before and after it (probe.ops.reshaped_unit_axis); lost without them."""
    before, after = index.dims(node.input[0]), index.dims(node.output[0])
    if before is None or after is None:
        return ("Lost", [], None)
    return ("Reshape", [before, after], len(before))


def _squeeze_axes(index: GraphIndex, node: onnx.NodeProto) -> list[int] | None:
    """The axes a Squeeze removes or an Unsqueeze adds (an input from opset 13, an attribute before)."""
    stored = index.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    axes = stored.reshape(-1).tolist() if stored is not None else attr(node, "axes")
    return [int(a) for a in axes] if axes else None


def _trace_producer(
    index: GraphIndex, input_name: str, moves: list[tuple[str, list[int], int]]
) -> ProducerTrace:
    trace = ProducerTrace()
    name = input_name
    keep_producer = True
    for _ in range(32):
        node = index.producer.get(name)
        if node is None:
            return trace
        if channels_last(node):
            trace.channel_first = False
            return trace
        if node.op_type in ("Concat", "QLinearConcat"):  # the inputs' layout, from the first one's producer
            data = node.input[2::3] if node.op_type == "QLinearConcat" else node.input
            data = [i for i in data if i and index.constant(i) is None]
            if not data:
                return trace
            keep_producer, name = False, data[0]
            continue
        if node.op_type == "Transpose":
            rank = index.rank(node.input[0])
            perm = attr(node, "perm") or (list(range(rank))[::-1] if rank else None)
            moves.append(
                ("Lost", [], None) if perm is None else ("Transpose", [int(p) for p in perm], len(perm))
            )
            name = node.input[0]
            continue
        if node.op_type in ("Reshape", "Flatten"):  # read by the shapes shape inference gives
            moves.append(_reshape_move(index, node))
            keep_producer, name = False, node.input[0]
            continue
        if node.op_type in (
            "Squeeze",
            "Unsqueeze",
        ):  # a Conv1d as Conv2d (tf2onnx): [N, C, 1, W] -> [N, C, W]
            axes, rank = _squeeze_axes(index, node), index.rank(node.input[0])
            # without axes (every size-1 dim) or a rank: read by the shapes, as a Reshape
            moves.append(
                _reshape_move(index, node) if axes is None or rank is None else (node.op_type, axes, rank)
            )
            name = node.input[0]
            continue
        if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
            trace.channel_first = node.op_type != "Gemm"
            if keep_producer and len(node.input) > 2:
                bias = index.constant(node.input[2])
                if bias is None or node.op_type != "Gemm" or is_last_axis_vector(bias.shape):
                    trace.bias = None if bias is None else bias.reshape(-1)  # Gemm's C may be [1, N]
                    trace.producer = display_name(node)
            return trace
        if node.op_type == "MatMul":
            trace.channel_first = False
            return trace
        if node.op_type in CHANNEL_FIRST_OPS:
            trace.channel_first = True
            if node.op_type == "BatchNormalization" and keep_producer:
                trace.bias = index.constant(node.input[2])
                trace.producer = display_name(node)
            return trace
        if node.op_type in LAST_DIM_OPS:
            trace.channel_first = False
            return trace
        if node.op_type in PASS_THROUGH_OPS:
            data_inputs = [i for i in node.input if i and index.constant(i) is None]
            if node.op_type == "Add" and len(data_inputs) == 1 and keep_producer:
                other = next((index.constant(i) for i in node.input if index.constant(i) is not None), None)
                upstream = conv_through_squeeze(index, data_inputs[0])
                if (
                    upstream is not None
                    and upstream.op_type == "MatMul"
                    and other is not None
                    and is_last_axis_vector(other.shape)
                ):  # MatMul + bias ([N] or [1, N]): the constant operand is the bias
                    trace.channel_first = False
                    trace.bias = other.reshape(-1)
                    trace.producer = display_name(node)
                    return trace
                if (
                    upstream is not None
                    and upstream.op_type in ("Conv", "ConvTranspose")
                    and other is not None
                ):
                    per_channel = conv_added_bias(upstream, other, index, index.rank(data_inputs[0]))
                    if per_channel is not None:  # Conv without bias + Add(b reshaped to [1, C, 1, 1])
                        trace.channel_first = True
                        trace.bias = per_channel
                        trace.producer = display_name(node)
                        return trace
            if len(data_inputs) != 1:
                keep_producer = False
            if not data_inputs:
                return trace
            name = data_inputs[0]
            continue
        return trace
    return trace


def producer_weight(index: GraphIndex, input_name: str, depth: int = 0) -> str | None:
    """The stored weight of the Conv/Gemm/MatMul (float, fused or quantized) that produced an
    activation's input, followed back through the pass-through ops and DequantizeLinear (and, for
    dynamically quantized graphs, through ConvInteger's Cast * scale); else None."""
    node = index.producer.get(input_name)
    if node is None or depth > 16:
        return None
    position = WEIGHT_INPUT.get(node.op_type)
    if node.op_type == "MatMul":
        position = next((i for i in (1, 0) if index.constant(node.input[i]) is not None), None)
    if position is not None:
        return _stored_source(index, node.input[position]) if len(node.input) > position else None
    if node.op_type not in PASS_THROUGH_OPS:
        return None
    for name in (i for i in node.input if i and index.constant(i) is None):
        found = producer_weight(index, name, depth + 1)
        if found is not None:
            return found
    return None


def _stored_source(index: GraphIndex, name: str) -> str | None:
    """The stored tensor behind a weight input: itself, or what a DequantizeLinear/re-shaping reads."""
    for _ in range(8):
        if (
            index.stored_tensor(name) is not None
            or index.outer is not None
            and index.outer.stored_tensor(name)
        ):
            return name
        node = index.producer.get(name)
        if node is None or node.op_type not in (
            "DequantizeLinear",
            "Identity",
            "Reshape",
            "Transpose",
            "Cast",
        ):
            return None
        name = node.input[0]
    return None


def consumer_layout(index: GraphIndex, output_name: str) -> bool | None:
    """When the producer does not tell (an LSTM, a Reshape…): the layer that reads the activation does —
    a Conv reads channels on dim 1, a MatMul/Gemm the last dim."""
    name = output_name
    for _ in range(8):
        consumers = index.consumers.get(name, [])
        if len(consumers) != 1:
            return None
        node = consumers[0]
        if node.op_type in ("Conv", "ConvTranspose"):
            return True
        if node.op_type in ("MatMul", "Gemm"):
            return False
        if node.op_type not in UNIT_PRESERVING_OPS:
            return None
        name = node.output[0]
    return None


def _incoming(index: GraphIndex, wire: UnitWiring, input_name: str) -> None:
    """Fill the producer side of `wire`: the weight whose rows make the units, and the bias (through
    value-preserving nodes on either side of a bias Add, and Transposes: they move the units' axis, each
    unit keeps its values)."""
    node = index.producer.get(value_source(index, input_name))
    while node is not None and node.op_type == "Transpose":
        node = index.producer.get(value_source(index, node.input[0]))
    if node is None:
        return
    wire.producer = display_name(node)
    if node.op_type == "Add":
        data = [i for i in node.input if index.constant(i) is None]
        added = [i for i in node.input if index.constant(i) is not None]
        upstream = conv_through_squeeze(index, data[0]) if len(data) == 1 else None
        chain = index.reshaped_from(added[0]) if len(added) == 1 else []
        if upstream is not None and upstream.op_type == "MatMul" and len(chain) == 1:
            stored = _matmul_weight(index, upstream.input[1])
            if stored is not None and is_last_axis_vector(stored_array(index, chain[0]).shape):
                wire.owner = display_name(upstream)
                wire.weight = TensorRef(stored[0], 1 - stored[1])  # rows of [in, out]; of W in W^T
                wire.bias = chain[0]
        elif (
            upstream is not None
            and upstream.op_type == "Conv"
            and attr(upstream, "group", 1) == 1
            and chain
            and conv_added_bias(upstream, index.constant(added[0]), index, index.rank(data[0])) is not None
            and stored_array(index, upstream.input[1]) is not None
            and not (len(upstream.input) > 2 and upstream.input[2])
        ):
            # Conv without bias + Add(bias, maybe reshaped to [1, C, 1, 1]): paddle2onnx's layout
            wire.owner = display_name(upstream)
            wire.weight = TensorRef(upstream.input[1], 0)
            wire.bias, wire.bias_reshaped = chain[-1], len(chain) > 1
            if any(uses(index, name) != 1 for name in chain):
                wire.weight, wire.why = None, "skipped: its weights are shared with other nodes"
        elif (
            len(data) == 1
            and len(chain) == 1
            and stored_array(index, chain[0]) is not None
            and is_last_axis_vector(stored_array(index, chain[0]).shape)
            and stored_array(index, chain[0]).size > 1
        ):
            # a per-unit bias added after no weight: a LayerNorm written out (ReduceMean, Sub, Pow, Sqrt,
            # Div, Mul(gamma), Add(beta): torch.onnx below opset 17); moving it moves each unit by 1
            wire.norm_bias, wire.norm_op = chain[0], "Add"
    elif node.op_type == "Conv" and attr(node, "group", 1) != 1:
        wire.why = f"skipped: producer {display_name(node)} is a grouped convolution (group={attr(node, 'group', 1)})"
    elif node.op_type == "Conv":
        weight = stored_behind(index, node.input[1])
        if weight is not None:
            wire.owner = display_name(node)
            wire.weight = TensorRef(weight, 0)
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            wire.bias = stored_behind(index, bias) or bias if bias else None
    elif node.op_type == "Gemm" and not attr(node, "transA", 0):
        weight = stored_behind(index, node.input[1])
        if weight is not None:
            wire.owner = display_name(node)
            wire.weight = TensorRef(weight, 0 if attr(node, "transB", 0) else 1)
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            bias = stored_behind(index, bias) if bias else None
            if bias is not None and is_last_axis_vector(
                stored_array(index, bias).shape
            ):  # C as [N] or [1, N]; an [M, N] table is not a per-unit bias
                wire.bias = bias
    elif node.op_type == "LayerNormalization":
        _layer_norm(index, wire, node)
    elif node.op_type == "BatchNormalization" and len(node.input) > 2:
        # y = scale * (x - mean) / sqrt(var + eps) + B: shifting B shifts the pre-activation exactly
        if stored_array(index, node.input[2]) is not None:
            scale, bias, mean, var = (list(node.input[1:5]) + [""] * 4)[:4]
            wire.batchnorm = BatchNormRef(display_name(node), scale or None, bias, mean or None, var or None)
            _through_batchnorm(index, wire, node)


def _through_batchnorm(index: GraphIndex, wire: UnitWiring, bn: onnx.NodeProto) -> None:
    """The Conv (or 2-D Gemm) whose rows make the channels a BatchNormalization normalises (an unfused
    export: `do_constant_folding=False`, a training-mode export): `wire`'s weight and bias become its
    own, the BatchNorm stays `wire.batchnorm` (reinit resets its channel, prune narrows it)."""
    inner = UnitWiring()
    _incoming(index, inner, bn.input[0])
    if inner.weight is None or inner.batchnorm is not None or inner.why:
        return
    weight = stored_array(index, inner.weight.name)
    # BatchNormalization normalises axis 1: a Conv's channels, or a Gemm's features on a [N, F] input
    if weight.ndim < 3 and index.rank(bn.input[0]) != 2:
        return
    wire.owner, wire.weight, wire.bias, wire.bias_reshaped = (
        inner.owner,
        inner.weight,
        inner.bias,
        inner.bias_reshaped,
    )


def _direct_reader(
    index: GraphIndex, node: onnx.NodeProto, name: str, axis: int | None, rank: int | None
) -> tuple[str, TensorRef] | None:
    """(display name, weight) of a plain Conv (group 1) / Gemm / MatMul that reads `name` as its data
    input, by a stored weight of its own, taking its features from the units' axis; else None."""
    weight = node.input[1] if len(node.input) > 1 else ""
    if node.input[0] != name or weight == name:
        return None
    if node.op_type == "Conv" and attr(node, "group", 1) == 1 and axis in (None, 1):
        ref = TensorRef(weight, 1)
    elif node.op_type == "Gemm" and not attr(node, "transA", 0) and (rank is None or rank == 2):
        ref = TensorRef(weight, 1 if attr(node, "transB", 0) else 0)
    elif node.op_type == "MatMul" and (axis is None or axis == rank - 1):
        stored = _matmul_weight(index, weight)
        if stored is None:
            return None
        ref = TensorRef(stored[0], 1 if stored[1] else 0)
        weight = stored[0]
    else:
        return None
    stored_name = stored_behind(index, weight)
    if stored_name is None or uses(index, stored_name) != 1 or uses(index, weight) != 1:
        return None
    return display_name(node), TensorRef(stored_name, ref.axis)


def _matmul_weight(index: GraphIndex, name: str) -> tuple[str, bool] | None:
    """The stored tensor behind a MatMul's weight operand, and whether the graph transposes it first
    (torch's `x @ W.T` exported without constant folding: MatMul(x, Transpose(W)), W stored [out, in]);
    None when it is neither a stored tensor nor one transposed once."""
    if stored_behind(index, name) is not None:
        return stored_behind(index, name), False
    node = index.producer.get(name)
    if node is None or node.op_type != "Transpose" or uses(index, name) != 1:
        return None
    source = node.input[0]
    stored = stored_array(index, source)
    perm = attr(node, "perm")
    if stored is None or stored.ndim != 2 or (perm is not None and list(perm) != [1, 0]):
        return None
    return source, True


def _shift_through_constants(index: GraphIndex, input_name: str) -> str | None:
    """The shift tensor (`UnitWiring.shift`) of the producer behind Mul/Div/Add/Sub nodes whose other
    operand is a constant (a scale, an offset); None when there is none. Its effect on the
    pre-activation is measured by bias-shift, not derived here."""
    name = value_source(index, input_name)
    for _ in range(8):
        node = index.producer.get(name)
        while node is not None and node.op_type == "Transpose":
            node = index.producer.get(value_source(index, node.input[0]))
        if node is None or node.op_type not in ("Mul", "Div", "Add", "Sub"):
            return None
        data = [i for i in node.input if i and index.constant(i) is None]
        if len(data) != 1 or (node.op_type in ("Div", "Sub") and node.input[0] != data[0]):
            return None  # (c / x, c - x: not a scale or an offset of x)
        inner = UnitWiring()
        _incoming(index, inner, data[0])
        if inner.shift is not None and not inner.why:
            return inner.shift
        name = value_source(index, data[0])
    return None


def _layer_norm(index: GraphIndex, wire: UnitWiring, node: onnx.NodeProto) -> None:
    """A LayerNormalization making the units: its B is one value per unit (and shifts it exactly) when
    it normalises over the last axis only; its rows are no one weight's, so only bias-shift acts."""
    rank = index.rank(node.input[0])
    axis = attr(node, "axis", -1)
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is None or stored_array(index, bias) is None:
        wire.why = (
            f"skipped: produced by LayerNormalization {display_name(node)}, which has no stored B to shift"
        )
    elif not (axis == -1 or (rank is not None and axis == rank - 1)):
        wire.why = (
            f"skipped: produced by LayerNormalization {display_name(node)} over axes {axis}… (its B is not one "
            "value per unit); use leaky"
        )
    else:
        wire.norm_bias, wire.norm_op = bias, "LayerNormalization"


def _reduced_axes(index: GraphIndex, node: onnx.NodeProto, rank: int) -> list[int] | None:
    """The axes a Reduce* node reduces (non-negative), or None when the graph does not say."""
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = index.constant(node.input[1])
        if axes is None:
            return None
    if axes is None or len(np.ravel(axes)) == 0:
        return None if attr(node, "noop_with_empty_axes", 0) else list(range(rank))
    return sorted({int(a) % rank for a in np.ravel(axes)})


def _outgoing(
    index: GraphIndex,
    wire: UnitWiring,
    output_name: str,
    graph_outputs: set[str],
    unit_axis: tuple[int, int] | None = None,
) -> str:
    """Fill the consumer side of `wire`: every Conv/Gemm/MatMul with a stored weight that reads the
    units, with the columns they sit in; return why not, or "". The walk follows every reader of the
    activation (a SqueezeNet squeeze Relu read by both expand Convs), unit-preserving ops (pools,
    Flatten, Dropout), and Concats along the units' axis, nested ones too (a DenseNet-style block: a
    Relu joined with the next layer's output, that join joined again before the head); each leaf must
    be such a reader. With `unit_axis` (axis, rank of the activation) it also follows Transposes and
    reductions over other axes (a global max pool written as Transpose + ReduceMax, as tf2onnx exports
    Keras models) and checks that each reader takes its input features from the units' axis."""
    axis, rank = unit_axis if unit_axis is not None else (None, None)
    found: list[tuple[str, TensorRef, int, int | None]] = []
    readers: list[str] = []
    why = _readers(index, output_name, axis, rank, 0, None, False, graph_outputs, found, readers, 0)
    wire.readers = tuple(dict.fromkeys(readers))
    if why:
        return why
    (wire.consumer, wire.consumer_weight, wire.column_offset, wire.column_units), *rest = found
    wire.also_read_by = tuple(
        dict.fromkeys((name, ref) for name, ref, _, _ in rest if ref != wire.consumer_weight)
    )
    for _, ref, offset, units in found:
        wire.column_at.setdefault(ref.name, []).append((offset, units))
    return ""


def _readers(
    index: GraphIndex,
    name: str,
    axis: int | None,
    rank: int | None,
    offset: int,
    units: int | None,
    flattened: bool,
    graph_outputs: set[str],
    found: list,
    readers: list[str],
    depth: int,
) -> str:
    """Walk every reader of `name` (holding the units at `offset` of `units`, None: only them), adding
    each Conv/Gemm/MatMul leaf to `found`; why a reader cannot be followed, or ""."""
    consumers = list({id(c): c for c in index.consumers.get(name, [])}.values())
    forked = depth > 0 or len(consumers) > 1
    if depth > MAX_JOINS:
        return f"skipped: its readers are more than {MAX_JOINS} joins or branches away"
    if name in graph_outputs or not consumers:
        readers.extend(display_name(c) for c in consumers)
        return f"skipped: its output goes to {len(consumers)} nodes, not to exactly one Conv/Gemm/MatMul" + (
            " (and to a graph output)" if name in graph_outputs else ""
        )
    for consumer in consumers:
        op = consumer.op_type
        step = dict(axis=axis, rank=rank, offset=offset, units=units, flattened=flattened)
        if passes_values(index, consumer) or op in ("Dropout", "Identity", "Cast"):
            pass
        elif op in UNIT_PRESERVING_OPS:  # pools: over the axes after 1, so the units must be on axis 1
            if axis is not None and axis != 1:
                return _no_reader(consumer, readers, forked)
        elif op in FLATTENING_OPS:  # [N, C, …] -> [N, C*…]: each unit's values in consecutive columns
            if axis is not None:
                if axis != int(attr(consumer, "axis", 1)) % rank:
                    return _no_reader(consumer, readers, forked)
                step.update(axis=1, rank=2)
            step["flattened"] = True
        elif op == "Concat" and axis is not None and not flattened:
            if int(attr(consumer, "axis", 0)) % rank != axis:
                return _no_reader(consumer, readers, forked)
            widths = [(index.shape(i) or [None] * rank) for i in consumer.input]
            sizes = [shape[axis] if len(shape) == rank else None for shape in widths]
            if any(not size for size in sizes):
                readers.append(display_name(consumer))
                return (
                    f"skipped: its output reaches Concat {display_name(consumer)}, whose input widths the graph "
                    "does not say (run onnx shape inference on the model)"
                )
            for position in [p for p, i in enumerate(consumer.input) if i == name]:  # (cat([h, h]): each)
                why = _readers(
                    index,
                    consumer.output[0],
                    axis,
                    rank,
                    sum(sizes[:position]) + offset,
                    sum(sizes),
                    False,
                    graph_outputs,
                    found,
                    readers,
                    depth + 1,
                )
                if why:
                    return why
            continue
        elif op == "Transpose" and axis is not None:
            perm = [int(p) for p in (attr(consumer, "perm") or range(rank)[::-1])]
            if sorted(perm) != list(range(rank)):
                return _no_reader(consumer, readers, forked)
            step["axis"] = perm.index(axis)
        elif op in ("ReduceMax", "ReduceMin", "ReduceMean", "ReduceSum") and axis is not None:
            reduced = _reduced_axes(index, consumer, rank)
            if reduced is None or axis in reduced:  # the units would be mixed
                return _no_reader(consumer, readers, forked)
            if attr(consumer, "keepdims", 1) == 0:
                step.update(axis=axis - sum(1 for a in reduced if a < axis), rank=rank - len(reduced))
        else:
            readers.append(display_name(consumer))
            if op == "Conv" and attr(consumer, "group", 1) != 1:
                return f"skipped: consumer {display_name(consumer)} is a grouped convolution (group={attr(consumer, 'group', 1)})"
            leaf = _direct_reader(index, consumer, name, axis, rank)
            if leaf is None:
                return _no_reader(consumer, readers, forked, listed=True)
            found.append((*leaf, offset, units))
            continue
        why = _readers(
            index,
            consumer.output[0],
            step["axis"],
            step["rank"],
            offset,
            units,
            step["flattened"],
            graph_outputs,
            found,
            readers,
            depth + int(len(consumers) > 1),
        )
        if why:
            return why
    return ""


def _no_reader(consumer: onnx.NodeProto, readers: list[str], forked: bool, listed: bool = False) -> str:
    """Why the walk stops at `consumer` (not a Conv/Gemm/MatMul reading the units by a stored weight)."""
    if not listed:
        readers.append(display_name(consumer))
    where = f"it reaches {consumer.op_type} {display_name(consumer)}"
    if forked:
        return f"skipped: its output goes to several nodes, and {where}, not a Conv/Gemm/MatMul with stored weights"
    return f"skipped: its output does not go to exactly one Conv/Gemm/MatMul with stored weights ({where})"


def _private_path(index: GraphIndex, input_name: str, output_name: str, graph_outputs: set[str]) -> str:
    """Why rewriting the producer's rows would change more than the activation's units, or "": every
    tensor from the weight's op to the activation's input must be read by that path alone (a Conv output
    that a residual branch also reads would change with it)."""
    activation = index.producer.get(output_name)
    name = input_name
    for step in range(16):
        # (a Shape reads no values: rewriting rows does not change what it gives)
        readers = [r for r in index.consumers.get(name, []) if r.op_type != "Shape"]
        if not step:  # a spelled ReLU, Where(x > 0, x, 0), reads its input twice: once through Greater
            # (and Mul(x, Cast(x > 0)) through Greater and a Cast)
            readers = [r for r in readers if r is not activation and not _only_into(index, r, activation)]
            readers = readers + [activation]
        if len(readers) != 1 or name in graph_outputs:
            others = ", ".join(display_name(r) for r in readers if r is not activation) + (
                " and a graph output" if name in graph_outputs else ""
            )
            return (
                f"skipped: the pre-activation {name} is also read elsewhere ({others}); changing its producer's "
                "rows would change those readers too"
            )
        node = index.producer.get(name)
        if node is None or node.op_type in WEIGHT_INPUT or node.op_type == "MatMul":
            return ""
        data = [i for i in node.input if i and index.constant(i) is None]
        if len(data) != 1:
            return ""
        name = data[0]
    return ""


def _only_into(index: GraphIndex, node: onnx.NodeProto, activation: onnx.NodeProto, depth: int = 0) -> bool:
    """Whether every output of `node` is read by `activation` alone, directly or through nodes whose
    outputs are (the x > 0 mask of a spelled ReLU, and its Cast)."""
    return depth < 4 and all(
        c is activation or (c is not None and _only_into(index, c, activation, depth + 1))
        for o in node.output
        for c in index.consumers.get(o, [None])
    )


def unit_wiring(
    model: onnx.ModelProto,
    input_name: str,
    output_name: str,
    index: GraphIndex | None = None,
    unit_axis: tuple[int, int] | None = None,
) -> UnitWiring:
    """The wiring of the activation reading `input_name` and writing `output_name` (main graph);
    `unit_axis`: (axis, rank) of the activation's units, when known."""
    index = index or GraphIndex(model.graph)
    wire = UnitWiring()
    _incoming(index, wire, input_name)
    if wire.shift is None and not wire.why:
        wire.scaled_shift = _shift_through_constants(index, input_name)
    consumer_why = _outgoing(index, wire, output_name, {o.name for o in model.graph.output}, unit_axis)
    bn = wire.batchnorm
    bn_tensors = [bn.weight, bn.bias, bn.running_mean, bn.running_var] if bn is not None else []
    if wire.weight is not None and (
        uses(index, wire.weight.name) != 1
        or any(name and uses(index, name) != 1 for name in [wire.bias, *bn_tensors])
    ):
        wire.weight, wire.why = None, "skipped: its weights are shared with other nodes"
    if wire.weight is not None and not wire.why:
        wire.why = _private_path(index, input_name, output_name, {o.name for o in model.graph.output})
        if wire.why:
            wire.weight = None
    if wire.why:
        return wire
    if wire.weight is None and wire.batchnorm is not None:
        bn_node = next((n for n in index.graph.node if display_name(n) == wire.batchnorm.owner), None)
        node = index.producer.get(value_source(index, bn_node.input[0])) if bn_node is not None else None
        made = f" (its input is made by {node.op_type} {display_name(node)})" if node is not None else ""
        wire.why = (
            f"skipped: produced by BatchNormalization {wire.batchnorm.owner}, whose input is not a Conv or "
            f"Gemm with stored weights{made}; only bias-shift (its B) or leaky patch it in ONNX"
        )
    elif wire.weight is None and wire.norm_bias is not None:
        made = (
            f"LayerNormalization {wire.producer}"
            if wire.norm_op == "LayerNormalization"
            else f"Add {wire.producer} (a per-unit bias added to what no stored weight makes: a LayerNorm written out)"
        )
        wire.why = f"skipped: produced by {made}, whose units only bias-shift (which moves its B) or leaky patch in ONNX"
    elif wire.weight is None:
        node = index.producer.get(value_source(index, input_name))
        made = f" (it is made by {node.op_type} {display_name(node)})" if node is not None else ""
        wire.why = (
            "skipped: not produced by a Conv, Gemm, MatMul+bias or BatchNormalization with stored weights"
            + made
        )
    else:
        wire.why = consumer_why
    return wire
