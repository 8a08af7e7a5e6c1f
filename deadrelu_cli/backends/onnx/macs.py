"""Multiply-accumulates per sample of an ONNX graph's Conv / ConvTranspose / Gemm / MatMul nodes, from
shapes: the graph's inputs set to the shapes a real sample has, then onnx shape inference (with data
propagation, so Reshape targets computed in the graph are followed)."""

from __future__ import annotations

import numpy as np
import onnx

from deadrelu_cli.wiring.onnx_index import attr

MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _dims(value: onnx.ValueInfoProto) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]


def _in_subgraph(graph: onnx.GraphProto) -> bool:
    """Whether a MAC op sits inside an If/Loop/Scan body (shape inference does not size those)."""
    for node in graph.node:
        for attribute in node.attribute:
            bodies = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
            for body in bodies:
                if any(n.op_type in MAC_OPS for n in body.node) or _in_subgraph(body):
                    return True
    return False


def onnx_macs(model: onnx.ModelProto, sample_shapes: dict[str, tuple[int, ...]] | None = None) -> int | None:
    """MACs for one sample. `sample_shapes`: graph input -> the shape a one-sample batch has, for dims the
    graph leaves symbolic. None when a shape stays unknown or a MAC op sits in a subgraph: no figure is
    better than a wrong one."""
    from deadrelu_cli.loaders.onnx_model import weight_free_skeleton

    skeleton = weight_free_skeleton(model)
    del skeleton.graph.value_info[:]
    # small integer tensors (Reshape targets, axes) stay values, so that data propagation can follow them
    small = [
        init
        for init in model.graph.initializer
        if init.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
        and int(np.prod(init.dims)) <= 64
    ]
    small_names = {init.name for init in small}
    kept_inputs = [value for value in skeleton.graph.input if value.name not in small_names]
    del skeleton.graph.input[:]
    skeleton.graph.input.extend(kept_inputs)
    skeleton.graph.initializer.extend(small)
    samples = 1
    for value in skeleton.graph.input:
        fed = (sample_shapes or {}).get(value.name)
        declared = _dims(value)
        if fed is None or len(fed) != len(declared):
            continue
        if declared and declared[0] is not None and declared[0] != fed[0]:
            samples = declared[0]  # a static batch: the graph computes that many samples at once
        for dim, size, known in zip(value.type.tensor_type.shape.dim, fed, declared, strict=True):
            if known is None:
                dim.Clear()
                dim.dim_value = int(size)
    if _in_subgraph(skeleton.graph):
        return None
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - an uninferable graph has no figure, not a crash
        return None
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        shapes[value.name] = _dims(value)
    for node in inferred.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    shapes[node.output[0]] = list(attribute.t.dims)
    total = 0
    for node in inferred.graph.node:
        if node.op_type not in MAC_OPS:
            continue
        a, b, out = (shapes.get(name) for name in (node.input[0], node.input[1], node.output[0]))
        if any(s is None or not s or any(d is None for d in s) for s in (a, b, out)):
            return None
        if node.op_type == "Conv":  # each output element: Cin/group * kernel products
            total += int(np.prod(out)) * int(np.prod(b[1:]))
        elif node.op_type == "ConvTranspose":  # each input element: Cout/group * kernel products
            total += int(np.prod(a)) * int(np.prod(b[1:]))
        elif node.op_type == "Gemm":
            total += int(np.prod(out)) * (a[0] if attr(node, "transA", 0) else a[-1])
        else:  # MatMul: [..., M, K] @ [..., K, N]; a 1-D operand has its K as its only dim
            total += int(np.prod(out)) * a[-1]
    return total // samples
