"""The ONNX side of `deadrelu fix`: edit nodes (leaky, elu) or initializers (reinit, bias-shift, prune).

Supported around a Relu: a producer that is a Conv, a Gemm, a MatMul followed by an Add of a bias
initializer, or a Conv without bias followed by an Add of a per-channel bias (re-shaped or not); a
consumer that is one Conv, Gemm or MatMul with an initializer weight, reached directly or through
unit-preserving nodes (pooling, Flatten, Dropout, Identity). A BatchNormalization producer is patched
by bias-shift only (its B). Anything else is skipped with the reason in the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from deadrelu_cli.errors import UserError
from deadrelu_cli.fixes.plan import FixOptions, FixResult, LayerOutcome, LayerPlan, firing_thresholds
from deadrelu_cli.probe.onnx_graph import (
    _float_type,
    _GraphIndex,
    conv_added_bias,
    find_sites,
    site_channel_dim,
)

UNIT_PRESERVING = (
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Flatten",
    "Dropout",
    "Identity",
)


@dataclass
class Weight:
    """Where a unit's incoming (axis of units) or outgoing weights live in one initializer."""

    name: str
    axis: int  # the axis along which units (or consumer inputs) are laid out


@dataclass
class Wiring:
    incoming: Weight | None = None
    # the bias as the graph reads it, back to the initializer holding one value per unit (last);
    # longer than one when the graph re-shapes it (Reshape(b, [1, C, 1, 1]))
    bias_chain: list[str] = field(default_factory=list)
    outgoing: Weight | None = None
    why: str = ""

    @property
    def bias(self) -> str | None:
        return self.bias_chain[-1] if self.bias_chain else None


def _initializer(index: _GraphIndex, name: str) -> np.ndarray | None:
    """The values of an initializer or of a Constant node's tensor (both are edited in place)."""
    tensor = index.stored_tensor(name)
    return None if tensor is None else numpy_helper.to_array(tensor)


def _attr(node, name, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _uses(index: _GraphIndex, name: str) -> int:
    return len(index.consumers.get(name, []))


def wiring(model: onnx.ModelProto, site) -> Wiring:
    index = _GraphIndex(model.graph)
    wire = Wiring()
    node = index.producer.get(site.input_name)
    if node is not None and node.op_type == "Add":
        data = [i for i in node.input if index.constant(i) is None]
        added = [i for i in node.input if index.constant(i) is not None]
        upstream = index.producer.get(data[0]) if len(data) == 1 else None
        chain = index.reshaped_from(added[0]) if len(added) == 1 else []
        if upstream is not None and upstream.op_type == "MatMul" and len(chain) == 1:
            if _initializer(index, upstream.input[1]) is not None and _initializer(index, chain[0]).ndim == 1:
                wire.incoming = Weight(upstream.input[1], 1)
                wire.bias_chain = chain
        elif (
            upstream is not None
            and upstream.op_type == "Conv"
            and _attr(upstream, "group", 1) == 1
            and chain
            and conv_added_bias(upstream, index.constant(added[0]), index) is not None
            and _initializer(index, upstream.input[1]) is not None
            and not (len(upstream.input) > 2 and upstream.input[2])
        ):
            # Conv without bias + Add(bias, maybe reshaped to [1, C, 1, 1]): paddle2onnx's layout
            wire.incoming = Weight(upstream.input[1], 0)
            wire.bias_chain = chain
    elif node is not None and node.op_type == "Conv" and _attr(node, "group", 1) == 1:
        if _initializer(index, node.input[1]) is not None:
            wire.incoming = Weight(node.input[1], 0)
            wire.bias_chain = [node.input[2]] if len(node.input) > 2 and node.input[2] else []
    elif node is not None and node.op_type == "Gemm" and not _attr(node, "transA", 0):
        if _initializer(index, node.input[1]) is not None:
            wire.incoming = Weight(node.input[1], 0 if _attr(node, "transB", 0) else 1)
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            if (
                bias is not None
                and _initializer(index, bias) is not None
                and _initializer(index, bias).ndim == 1
            ):
                wire.bias_chain = [bias]
    elif node is not None and node.op_type == "BatchNormalization" and len(node.input) > 2:
        # y = scale * (x - mean) / sqrt(var + eps) + B: shifting B shifts the pre-activation exactly
        if _initializer(index, node.input[2]) is not None and _uses(index, node.input[2]) == 1:
            wire.bias_chain = [node.input[2]]
            wire.why = (
                "skipped: produced by a BatchNormalization, whose units only bias-shift patches in ONNX"
            )
            return wire
    if wire.incoming is None:
        wire.why = (
            "skipped: not produced by a Conv, Gemm, MatMul+bias or BatchNormalization with stored weights"
        )
        return wire
    if _uses(index, wire.incoming.name) != 1 or any(_uses(index, name) != 1 for name in wire.bias_chain):
        wire.incoming, wire.why = None, "skipped: its weights are shared with other nodes"
        return wire
    # follow the output to its one consumer
    name = site.output_name
    for _ in range(8):
        consumers = index.consumers.get(name, [])
        if len(consumers) != 1 or any(o.name == name for o in model.graph.output):
            wire.why = (
                f"skipped: its output goes to {len(consumers)} nodes, not to exactly one Conv/Gemm/MatMul"
            )
            return wire
        consumer = consumers[0]
        if consumer.op_type in UNIT_PRESERVING:
            name = consumer.output[0]
            continue
        weight = consumer.input[1] if len(consumer.input) > 1 else ""
        if _initializer(index, weight) is None or consumer.input[0] != name or _uses(index, weight) != 1:
            break
        if consumer.op_type == "Conv" and _attr(consumer, "group", 1) == 1:
            wire.outgoing = Weight(weight, 1)
        elif consumer.op_type == "Gemm" and not _attr(consumer, "transA", 0):
            wire.outgoing = Weight(weight, 1 if _attr(consumer, "transB", 0) else 0)
        elif consumer.op_type == "MatMul":
            wire.outgoing = Weight(weight, 0)
        break
    if wire.outgoing is None:
        wire.why = "skipped: its output does not go to exactly one Conv/Gemm/MatMul with stored weights"
    return wire


def _set(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    tensor = _GraphIndex(model.graph).stored_tensor(name)
    if tensor is None:
        raise KeyError(name)
    tensor.CopyFrom(numpy_helper.from_array(array.astype(numpy_helper.to_array(tensor).dtype), tensor.name))


def _get(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(_GraphIndex(model.graph).stored_tensor(name)).copy()


def _parameter_count(model: onnx.ModelProto) -> int:
    stored = list(model.graph.initializer) + [
        attr.t
        for node in model.graph.node
        if node.op_type == "Constant"
        for attr in node.attribute
        if attr.name == "value"
    ]
    return sum(int(np.prod(tensor.dims)) for tensor in stored)


def _columns(units: list[int], per_unit: int) -> list[int]:
    return [u * per_unit + j for u in units for j in range(per_unit)]


def apply_onnx(scanned, plans: list[LayerPlan], options: FixOptions, scan_options, temp, result: FixResult):
    from deadrelu_cli.fixes.run import runner_for
    from deadrelu_cli.loaders import LoadOptions, load_model

    if not str(options.output).lower().endswith(".onnx"):
        raise UserError(f"--output {options.output}: an ONNX model is written as ONNX; use a .onnx name")
    original = scanned.model.runnable
    model = onnx.ModelProto()
    model.CopyFrom(original)
    sites = {site.name: site for site in find_sites(model, scan_options.ops)}
    nodes = {n.name or n.output[0]: n for n in model.graph.node}
    outcomes = []
    quantiles = (
        _quantiles(scanned, plans, sites, options, scan_options) if options.strategy == "bias-shift" else {}
    )
    rng = np.random.default_rng(options.seed)
    for plan in plans:
        site = sites.get(plan.name)
        outcome = LayerOutcome(plan.name, plan.units, "", False, len(plan.units))
        outcomes.append(outcome)
        if site is None or site.graph_path:
            outcome.action = "skipped: sites inside If/Loop/Scan bodies are not patched"
            continue
        if options.strategy in ("leaky", "elu"):
            if site.op != "relu":
                outcome.action = f"skipped: {site.op} is not a plain Relu"
                continue
            node = nodes[site.node_name or site.output_name]
            node.op_type = "LeakyRelu" if options.strategy == "leaky" else "Elu"
            del node.attribute[:]
            node.attribute.append(
                helper.make_attribute("alpha", options.slope if options.strategy == "leaky" else 1.0)
            )
            outcome.applied, outcome.action = True, f"Relu → {node.op_type}({node.attribute[0].f:g})"
            continue
        wire = wiring(model, site)
        if options.strategy == "bias-shift":
            if wire.bias is None:
                outcome.action = wire.why or "skipped: no bias initializer"
                continue
            bias = _get(model, wire.bias)
            flat = bias.reshape(-1)  # a view: one value per unit, whatever shape the initializer has
            flat[plan.units] = flat[plan.units] - quantiles[plan.name].astype(bias.dtype)
            _set(model, wire.bias, bias)
            outcome.applied, outcome.action = (
                True,
                f"{wire.bias} raised by {float(-quantiles[plan.name].max()):.4g}…{float(-quantiles[plan.name].min()):.4g}",
            )
            continue
        if options.strategy == "kick":
            if wire.incoming is None:
                outcome.action = wire.why
                continue
            w_in = _get(model, wire.incoming.name)
            sigma = float(w_in.std()) * options.kick_scale
            noise = rng.standard_normal(np.take(w_in, plan.units, axis=wire.incoming.axis).shape) * sigma
            _assign(
                w_in,
                wire.incoming.axis,
                plan.units,
                np.take(w_in, plan.units, axis=wire.incoming.axis) + noise.astype(w_in.dtype),
            )
            _set(model, wire.incoming.name, w_in)
            if wire.bias:
                bias = _get(model, wire.bias)
                bias.reshape(-1)[plan.units] += np.abs(rng.standard_normal(len(plan.units)) * sigma).astype(
                    bias.dtype
                )
                _set(model, wire.bias, bias)
            outcome.applied, outcome.action = True, f"{wire.incoming.name} kicked (σ = {sigma:.3g})"
            continue
        if wire.incoming is None or wire.outgoing is None:
            outcome.action = wire.why
            continue
        w_in, w_out = _get(model, wire.incoming.name), _get(model, wire.outgoing.name)
        per_unit = w_out.shape[wire.outgoing.axis] // plan.all_units
        columns = _columns(plan.units, per_unit)
        if options.strategy == "reinit":
            fan_in = int(np.prod(w_in.shape)) // w_in.shape[wire.incoming.axis]
            bound = 1.0 / np.sqrt(fan_in)
            fresh = rng.uniform(-bound, bound, size=w_in.shape).astype(w_in.dtype)
            taken = np.take(fresh, plan.units, axis=wire.incoming.axis)
            _assign(w_in, wire.incoming.axis, plan.units, taken)
            _assign(w_out, wire.outgoing.axis, columns, 0.0)
            _set(model, wire.incoming.name, w_in)
            _set(model, wire.outgoing.name, w_out)
            if wire.bias:
                bias = _get(model, wire.bias)
                bias.reshape(-1)[plan.units] = 0.0
                _set(model, wire.bias, bias)
            outcome.applied, outcome.action = (
                True,
                f"{wire.incoming.name} re-initialised; {wire.outgoing.name} inputs zeroed",
            )
        elif options.strategy == "prune":
            if site.op != "relu":
                outcome.action = f"skipped: only relu units are exactly zero when dead ({site.op})"
                continue
            if len(plan.units) == plan.all_units:
                outcome.action = "skipped: every unit is dead"
                continue
            if len(wire.bias_chain) > 1 or (wire.bias and _get(model, wire.bias).ndim != 1):
                outcome.action = "skipped: the graph re-shapes its bias to the old width (use reinit)"
                continue
            kept = [u for u in range(plan.all_units) if u not in set(plan.units)]
            _set(model, wire.incoming.name, np.take(w_in, kept, axis=wire.incoming.axis))
            _set(model, wire.outgoing.name, np.take(w_out, _columns(kept, per_unit), axis=wire.outgoing.axis))
            if wire.bias:
                _set(model, wire.bias, _get(model, wire.bias)[kept])
            outcome.applied, outcome.action = (
                True,
                f"{wire.incoming.name} narrowed to {len(kept)}; {wire.outgoing.name} inputs removed",
            )
            outcome.units_after = len(kept)
            result.new_widths[plan.name] = len(kept)
    if options.strategy == "prune":
        del model.graph.value_info[:]  # shapes changed: let shape inference redo them
    result.params_before, result.params_after = _parameter_count(original), _parameter_count(model)
    result.flops_before, result.flops_after = onnx_macs(original), onnx_macs(model)
    if any(o.applied for o in outcomes):
        onnx.save(model, str(temp))

    def patched_runner():
        return runner_for(load_model(LoadOptions(str(temp))), scanned.data, scanned.device)

    return runner_for(scanned.model, scanned.data, scanned.device), patched_runner, outcomes


def onnx_macs(model: onnx.ModelProto) -> int | None:
    """Multiply-accumulates per sample of the Conv/Gemm/MatMul nodes (None when a shape is unknown)."""
    from deadrelu_cli.loaders.onnx_model import add_inferred_shapes

    shaped = onnx.ModelProto()
    shaped.CopyFrom(model)
    del shaped.graph.value_info[:]
    add_inferred_shapes(shaped)
    shapes = {}
    for value in list(shaped.graph.value_info) + list(shaped.graph.output) + list(shaped.graph.input):
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    index = _GraphIndex(shaped.graph)
    total = 0
    for node in shaped.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        out = shapes.get(node.output[0])
        weight = _initializer(index, node.input[1]) if len(node.input) > 1 else None
        if out is None or weight is None or any(d is None for d in out[1:]):
            return None
        per_sample = int(np.prod(out[1:])) if len(out) > 1 else 1
        if node.op_type == "Conv":
            total += per_sample * int(np.prod(weight.shape[1:]))
        elif node.op_type == "Gemm":
            total += per_sample * int(weight.shape[1] if _attr(node, "transB", 0) else weight.shape[0])
        else:
            total += per_sample * int(weight.shape[0])
    return total


def _assign(array: np.ndarray, axis: int, indices: list[int], values) -> None:
    index = [slice(None)] * array.ndim
    index[axis] = indices
    array[tuple(index)] = values


def _quantiles(scanned, plans, sites, options: FixOptions, scan_options) -> dict[str, np.ndarray]:
    """The (1 - target_rate) quantile of each planned unit's pre-activation, from a run exposing them."""
    from deadrelu_cli.onnx_scan import _as_input, feed_order, make_session

    exposed = onnx.ModelProto()
    exposed.CopyFrom(scanned.model.runnable)
    del exposed.graph.output[:]
    wanted = [plan for plan in plans if plan.name in sites and not sites[plan.name].graph_path]
    index = _GraphIndex(exposed.graph)
    for plan in wanted:
        name = sites[plan.name].input_name
        exposed.graph.output.append(helper.make_tensor_value_info(name, _float_type(index, name), None))
    if not wanted:
        return {}
    session = make_session(exposed.SerializeToString(), scanned.device, [])
    order = feed_order(scanned.model, scanned.data)
    dtypes = {spec.name: spec.dtype for spec in scanned.model.inputs}
    values: dict[str, list[np.ndarray]] = {plan.name: [] for plan in wanted}
    for batch in scanned.data.batches(
        scan_options.batch_size, scan_options.limit, scan_options.allow_nonfinite
    ):
        outs = session.run(None, {i: _as_input(batch[a], dtypes.get(i)) for i, a in order.items()})
        for plan, out in zip(wanted, outs, strict=True):
            dim = site_channel_dim(sites[plan.name], scan_options.channel_dim)
            moved = np.moveaxis(out, dim, -1)[..., plan.units].reshape(-1, len(plan.units))
            values[plan.name].append(moved.astype(np.float64))
    return {
        name: firing_thresholds(np.concatenate(chunks), options.target_rate)
        for name, chunks in values.items()
    }
