"""The ONNX side of `deadrelu fix`: edit nodes (leaky, elu) or initializers (reinit, bias-shift, prune).

Supported around a Relu: a producer that is a Conv, a Gemm, a MatMul followed by an Add of a bias
initializer, or a Conv without bias followed by an Add of a per-channel bias (re-shaped or not); a
consumer that is one Conv, Gemm or MatMul with an initializer weight, reached directly or through
unit-preserving nodes (pooling, Flatten, Dropout, Identity). A BatchNormalization producer is patched
by bias-shift only (its B). Anything else is skipped with the reason in the table.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from deadrelu_cli.backends.onnx.macs import onnx_macs
from deadrelu_cli.errors import UserError
from deadrelu_cli.files import write_bytes
from deadrelu_cli.fixes.plan import FixOptions, FixResult, LayerOutcome, LayerPlan, firing_thresholds
from deadrelu_cli.probe.onnx_deployed import NCHWC_CONV, strip_nchwc_copies
from deadrelu_cli.probe.onnx_graph import find_sites, site_channel_dim
from deadrelu_cli.wiring.model import input_columns, unit_vector_axis
from deadrelu_cli.wiring.onnx import unit_wiring
from deadrelu_cli.wiring.onnx_index import GraphIndex, float_type, uses


def _set(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    tensor = GraphIndex(model.graph).stored_tensor(name)
    if tensor is None:
        raise KeyError(name)
    tensor.CopyFrom(numpy_helper.from_array(array.astype(numpy_helper.to_array(tensor).dtype), tensor.name))


def _get(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(GraphIndex(model.graph).stored_tensor(name)).copy()


def _parameter_count(model: onnx.ModelProto) -> int:
    stored = list(model.graph.initializer) + [
        attr.t
        for node in model.graph.node
        if node.op_type == "Constant"
        for attr in node.attribute
        if attr.name == "value"
    ]
    return sum(int(np.prod(tensor.dims)) for tensor in stored)


def apply_onnx(scanned, plans: list[LayerPlan], options: FixOptions, scan_options, temp, result: FixResult):
    from deadrelu_cli.backends.runners import runner_for
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
        if site.implicit == "quantize":
            outcome.action = (
                f"skipped: a ReLU folded into a {site.module_type} of a quantized graph (integer weights); "
                "fix the float model, then quantize it again"
            )
            continue
        if site.module_type == NCHWC_CONV:
            outcome.action = (
                "skipped: a ReLU inside onnxruntime's blocked-layout (nchwc) Conv of an ORT_ENABLE_ALL graph; "
                "fix the float model, then optimize it again"
            )
            continue
        if site.implicit == "fused":
            note = (
                "fused activations are written unfused (Conv/Gemm + activation); onnxruntime fuses them again"
            )
            if note not in result.notes:
                result.notes.append(note)
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
        dim = site_channel_dim(site, scan_options.channel_dim)
        wire = unit_wiring(
            model,
            site.input_name,
            site.output_name,
            unit_axis=None if site.rank is None else (dim, site.rank),
        )
        if options.strategy == "bias-shift":
            shift = wire.shift
            if shift is None or uses(GraphIndex(model.graph), shift) != 1:
                outcome.action = (
                    "skipped: its bias is shared with other nodes"
                    if shift is not None
                    else (wire.why or "skipped: no bias initializer")
                )
                continue
            bias = _get(model, shift)
            flat = bias.reshape(-1)  # a view: one value per unit, whatever shape the initializer has
            flat[plan.units] = flat[plan.units] - quantiles[plan.name].astype(bias.dtype)
            _set(model, shift, bias)
            outcome.applied, outcome.action = (
                True,
                f"{shift} raised by {float(-quantiles[plan.name].max()):.4g}…{float(-quantiles[plan.name].min()):.4g}",
            )
            continue
        if options.strategy == "kick":
            if wire.weight is None:
                outcome.action = wire.why
                continue
            w_in = _get(model, wire.weight.name)
            sigma = float(w_in.std()) * options.kick_scale
            noise = rng.standard_normal(np.take(w_in, plan.units, axis=wire.weight.axis).shape) * sigma
            _assign(
                w_in,
                wire.weight.axis,
                plan.units,
                np.take(w_in, plan.units, axis=wire.weight.axis) + noise.astype(w_in.dtype),
            )
            _set(model, wire.weight.name, w_in)
            if wire.bias:
                bias = _get(model, wire.bias)
                bias.reshape(-1)[plan.units] += np.abs(rng.standard_normal(len(plan.units)) * sigma).astype(
                    bias.dtype
                )
                _set(model, wire.bias, bias)
            outcome.applied, outcome.action = True, f"{wire.weight.name} kicked (σ = {sigma:.3g})"
            continue
        if wire.weight is None or wire.consumer_weight is None:
            outcome.action = wire.why
            continue
        w_in, w_out = _get(model, wire.weight.name), _get(model, wire.consumer_weight.name)
        per_unit = w_out.shape[wire.consumer_weight.axis] // plan.all_units
        columns = input_columns(plan.units, per_unit)
        if options.strategy == "reinit":
            fan_in = int(np.prod(w_in.shape)) // w_in.shape[wire.weight.axis]
            bound = 1.0 / np.sqrt(fan_in)
            fresh = rng.uniform(-bound, bound, size=w_in.shape).astype(w_in.dtype)
            taken = np.take(fresh, plan.units, axis=wire.weight.axis)
            _assign(w_in, wire.weight.axis, plan.units, taken)
            _assign(w_out, wire.consumer_weight.axis, columns, 0.0)
            _set(model, wire.weight.name, w_in)
            _set(model, wire.consumer_weight.name, w_out)
            if wire.bias:
                bias = _get(model, wire.bias)
                bias.reshape(-1)[plan.units] = 0.0
                _set(model, wire.bias, bias)
            outcome.applied, outcome.action = (
                True,
                f"{wire.weight.name} re-initialised; {wire.consumer_weight.name} inputs zeroed",
            )
        elif options.strategy == "prune":
            if site.op != "relu":
                outcome.action = f"skipped: only relu units are exactly zero when dead ({site.op})"
                continue
            if len(plan.units) == plan.all_units:
                outcome.action = "skipped: every unit is dead"
                continue
            bias_axis = unit_vector_axis(_get(model, wire.bias).shape) if wire.bias else None
            if wire.bias_reshaped or (wire.bias and bias_axis is None):
                outcome.action = "skipped: the graph re-shapes its bias to the old width (use reinit)"
                continue
            kept = [u for u in range(plan.all_units) if u not in set(plan.units)]
            _set(model, wire.weight.name, np.take(w_in, kept, axis=wire.weight.axis))
            _set(
                model,
                wire.consumer_weight.name,
                np.take(w_out, input_columns(kept, per_unit), axis=wire.consumer_weight.axis),
            )
            if wire.bias:
                _set(model, wire.bias, np.take(_get(model, wire.bias), kept, axis=bias_axis))  # shape kept
            outcome.applied, outcome.action = (
                True,
                f"{wire.weight.name} narrowed to {len(kept)}; {wire.consumer_weight.name} inputs removed",
            )
            outcome.units_after = len(kept)
            result.new_widths[plan.name] = len(kept)
    strip_nchwc_copies(model)  # the scan's NCHW copies of blocked convolutions: not part of the model
    if options.strategy == "prune":
        del model.graph.value_info[:]  # shapes changed: let shape inference redo them
    result.params_before, result.params_after = _parameter_count(original), _parameter_count(model)
    shapes = sample_shapes(scanned, scan_options)
    result.flops_before, result.flops_after = onnx_macs(original, shapes), onnx_macs(model, shapes)
    if any(o.applied for o in outcomes):
        write_bytes(temp, model.SerializeToString())

    def patched_runner():
        return runner_for(load_model(LoadOptions(str(temp))), scanned.data, scanned.device)

    return runner_for(scanned.model, scanned.data, scanned.device), patched_runner, outcomes


def sample_shapes(scanned, scan_options) -> dict[str, tuple[int, ...]]:
    """Graph input -> the shape one sample of the data has there (what MACs are counted for)."""
    from deadrelu_cli.backends.onnx.scan import feed_order

    order = feed_order(scanned.model, scanned.data)
    batch = next(iter(scanned.data.batches(1, 1, scan_options.allow_nonfinite)), None)
    return {} if batch is None else {name: tuple(batch[array].shape) for name, array in order.items()}


def _assign(array: np.ndarray, axis: int, indices: list[int], values) -> None:
    index = [slice(None)] * array.ndim
    index[axis] = indices
    array[tuple(index)] = values


def _kept_positions(moved: np.ndarray, shape: tuple, dim: int, keep: np.ndarray | None) -> np.ndarray:
    """[values, units]: a site's values (units moved last) at the positions `keep` [batch, tokens] keeps,
    where the site's tensor holds those positions (probe.ops.token_layout, as the scan decides it)."""
    from deadrelu_cli.probe.ops import TOKEN_FLAT, TOKENS_FIRST, token_layout

    units = moved.shape[-1]
    layout = token_layout(tuple(shape), dim, *keep.shape) if keep is not None and len(shape) >= 2 else None
    if layout == TOKEN_FLAT:  # [B*T, ..., U] -> [B, T, ..., U]
        moved = moved.reshape(*keep.shape, *moved.shape[1:])
    if layout == TOKENS_FIRST:  # [T, B, ..., U]
        moved = moved[keep.T]
    elif layout is not None:  # [B, T, ..., U] (rows, flat, and [B, C, T] with the units moved last)
        moved = moved[keep]
    return moved.reshape(-1, units)


def _quantiles(scanned, plans, sites, options: FixOptions, scan_options) -> dict[str, np.ndarray]:
    """The (1 - target_rate) quantile of each planned unit's pre-activation, from a run exposing them,
    over the positions the scan counted (a position mask's kept ones, as the torch collectors see them)."""
    from deadrelu_cli.backends.onnx.scan import as_input, feed_order, make_session
    from deadrelu_cli.inputs import batch_mask, resolve_mask
    from deadrelu_cli.wiring.onnx_index import opset_version

    exposed = onnx.ModelProto()
    exposed.CopyFrom(scanned.model.runnable)
    del exposed.graph.output[:]
    wanted = [plan for plan in plans if plan.name in sites and not sites[plan.name].graph_path]
    index = GraphIndex(exposed.graph)
    for plan in wanted:
        name = sites[plan.name].input_name
        exposed.graph.output.append(helper.make_tensor_value_info(name, float_type(index, name), None))
    if not wanted:
        return {}
    session = make_session(exposed.SerializeToString(), scanned.device, [])
    order = feed_order(scanned.model, scanned.data)
    dtypes = {spec.name: spec.dtype for spec in scanned.model.inputs}
    values: dict[str, list[np.ndarray]] = {plan.name: [] for plan in wanted}
    # the scan applies a mask from opset 9 (Where); below that it counted every position
    mask = resolve_mask(scan_options.mask, scan_options.exclude_token_ids, scanned.data)
    mask = mask if opset_version(scanned.model.runnable) >= 9 else None
    for batch in scanned.data.batches(
        scan_options.batch_size, scan_options.limit, scan_options.allow_nonfinite
    ):
        outs = session.run(None, {i: as_input(batch[a], dtypes.get(i), i) for i, a in order.items()})
        keep = batch_mask(mask, batch) if mask is not None else None
        for plan, out in zip(wanted, outs, strict=True):
            dim = site_channel_dim(sites[plan.name], scan_options.channel_dim) % max(1, out.ndim)
            moved = np.moveaxis(out, dim, -1)[..., plan.units]
            values[plan.name].append(_kept_positions(moved, out.shape, dim, keep).astype(np.float64))
    return {
        name: firing_thresholds(np.concatenate(chunks), options.target_rate)
        for name, chunks in values.items()
    }
