"""One index over an ONNX graph: producers, consumers, constants, stored tensors and inferred shapes.

Every ONNX reader (sites, wiring, certification, fixes, MACs) builds on this; nothing else walks a
GraphProto's nodes by hand.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# ops that keep a tensor's values in order and only re-shape it
RESHAPING_OPS = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze")


def opset_version(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


class GraphIndex:
    """Producers, consumers and constants of one graph (plus the constants of enclosing graphs)."""

    def __init__(self, graph: onnx.GraphProto, outer: GraphIndex | None = None) -> None:
        self.graph = graph
        self.outer = outer
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.initializers = {init.name: init for init in graph.initializer}
        self.value_info = {
            vi.name: vi for vi in list(graph.value_info) + list(graph.input) + list(graph.output)
        }

    def constant(self, name: str) -> np.ndarray | None:
        if not name:
            return None
        if name in self.initializers:
            return tensor_values(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
                if attr.name == "value_float":
                    return np.array(attr.f, dtype=np.float32)
                if attr.name == "value_int":
                    return np.array(attr.i, dtype=np.int64)
        if node is not None and node.op_type in RESHAPING_OPS:
            return self._reshaped_constant(node)
        if node is not None and node.op_type == "DequantizeLinear":
            return self._dequantized_constant(node)
        return self.outer.constant(name) if self.outer is not None else None

    def _reshaped_constant(self, node: onnx.NodeProto) -> np.ndarray | None:
        """A constant only re-shaped by the graph (paddle2onnx adds a Conv's bias as Reshape(b, [1, C, 1, 1]))."""
        data = self.constant(node.input[0])
        if data is None:
            return None
        op = node.op_type
        try:
            if op == "Identity":
                return data
            if op == "Flatten":
                axis = int(attr(node, "axis", 1))
                axis = axis + data.ndim if axis < 0 else axis
                return data.reshape(int(np.prod(data.shape[:axis], dtype=np.int64)), -1)
            if op == "Reshape":
                shape = self.constant(node.input[1]) if len(node.input) > 1 else attr(node, "shape")
                if shape is None:
                    return None
                keep_zeros = bool(attr(node, "allowzero", 0))
                dims = [
                    data.shape[i] if d == 0 and not keep_zeros else int(d)
                    for i, d in enumerate(np.ravel(shape))
                ]
                return data.reshape(dims)
            axes = self.constant(node.input[1]) if len(node.input) > 1 else attr(node, "axes")
            if op == "Squeeze":
                return (
                    np.squeeze(data)
                    if axes is None
                    else np.squeeze(data, axis=tuple(int(a) for a in np.ravel(axes)))
                )
            if axes is None:  # Unsqueeze needs its axes
                return None
            return np.expand_dims(data, tuple(int(a) for a in np.ravel(axes)))
        except (ValueError, IndexError, TypeError):  # a malformed shape: not a constant we can read
            return None

    def _dequantized_constant(self, node: onnx.NodeProto) -> np.ndarray | None:
        """A quantized initializer behind DequantizeLinear (QDQ graphs keep weights and biases so):
        (q - zero_point) * scale, per tensor or per `axis`."""
        values = self.constant(node.input[0])
        scale = self.constant(node.input[1]) if len(node.input) > 1 else None
        if values is None or scale is None or values.dtype.kind not in "iu":
            return None
        zero = self.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        zero = np.zeros((), np.int64) if zero is None else zero.astype(np.int64)
        scale = scale.astype(np.float32)
        if scale.ndim == 1 and scale.size > 1 and values.ndim > 0:
            axis = int(attr(node, "axis", 1)) % values.ndim
            shape = [1] * values.ndim
            shape[axis] = scale.size
            scale, zero = scale.reshape(shape), zero.reshape(shape) if zero.ndim else zero
        return (values.astype(np.int64) - zero).astype(np.float32) * scale

    def stored_tensor(self, name: str) -> onnx.TensorProto | None:
        """The tensor behind `name` when this graph stores it: an initializer, or the value of a Constant
        node (older exporters, paddle2onnx among them, keep every weight in one)."""
        if name in self.initializers:
            return self.initializers[name]
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return next((attr.t for attr in node.attribute if attr.name == "value"), None)
        return None

    def reshaped_from(self, name: str) -> list[str]:
        """[name, …, stored tensor] when `name` is a tensor this graph stores, possibly re-shaped by
        Identity/Reshape/Flatten/Squeeze/Unsqueeze (its elements in the same order); else []."""
        chain = [name]
        while self.stored_tensor(chain[-1]) is None:
            node = self.producer.get(chain[-1])
            if node is None or node.op_type not in RESHAPING_OPS or self.constant(chain[-1]) is None:
                return []
            chain.append(node.input[0])
        return chain

    def shape(self, name: str) -> list[int | None] | None:
        """The inferred shape (None for symbolic dims), or None when not even the rank is known."""
        vi = self.value_info.get(name)
        if vi is not None and vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            # -1: an exporter's "any size" (onnx_model.input_specs), never a size to multiply by
            return [
                d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None
                for d in vi.type.tensor_type.shape.dim
            ]
        return self.outer.shape(name) if self.outer is not None else None

    def dims(self, name: str) -> list[int | str | None] | None:
        """`shape` with a symbolic dim by its name (equal names, equal sizes; probe.ops.reshaped_unit_axis),
        None for a dim without value or name; None when the rank is unknown."""
        vi = self.value_info.get(name)
        if vi is not None and vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            return [
                d.dim_value
                if d.HasField("dim_value") and d.dim_value >= 0
                else d.dim_param
                if d.HasField("dim_param")
                else None
                for d in vi.type.tensor_type.shape.dim
            ]
        return self.outer.dims(name) if self.outer is not None else None

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)


def attr(node: onnx.NodeProto, name: str, default=None):
    """A node attribute's value, or `default` when the node does not set it."""
    for entry in node.attribute:
        if entry.name == name:
            return helper.get_attribute_value(entry)
    return default


def float_type(index: GraphIndex, name: str) -> int:
    """The element type of a tensor (float32 when shape inference did not say)."""
    vi = index.value_info.get(name)
    if vi is not None and vi.type.HasField("tensor_type"):
        return vi.type.tensor_type.elem_type
    return TensorProto.FLOAT


def stored_array(index: GraphIndex, name: str) -> np.ndarray | None:
    """The values of an initializer or of a Constant node's tensor (both are edited in place by fixes)."""
    tensor = index.stored_tensor(name)
    return None if tensor is None else tensor_values(tensor)


def tensor_values(tensor: onnx.TensorProto) -> np.ndarray:
    """A stored tensor's values. The loader reads every external tensor into the graph, so one still
    external is a weight the scan released (loaders.onnx_model.release_weights): reading it here would
    open a file relative to the current directory, so it is refused (restore_weights first)."""
    if tensor.data_location == TensorProto.EXTERNAL:
        raise RuntimeError(f"tensor {tensor.name!r} was released during the scan; restore_weights() first")
    return numpy_helper.to_array(tensor)


def uses(index: GraphIndex, name: str) -> int:
    """How many nodes of the graph read `name`."""
    return len(index.consumers.get(name, []))
