"""The ONNX side of `deadrelu fix`: edit nodes (leaky, elu) or initializers (reinit, bias-shift, prune).

Supported around a Relu: a producer that is a Conv, a Gemm, a MatMul followed by an Add of a bias
initializer, or a Conv without bias followed by an Add of a per-channel bias (re-shaped or not); a
consumer that is one Conv, Gemm or MatMul with an initializer weight, reached directly or through
unit-preserving nodes (pooling, Flatten, Dropout, Identity). A BatchNormalization producer is patched
by bias-shift only (its B). Anything else is skipped with the reason in the table.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

from deadrelu_cli.backends.onnx.macs import onnx_macs
from deadrelu_cli.errors import UserError
from deadrelu_cli.files import write_bytes
from deadrelu_cli.fixes.plan import FixOptions, FixResult, LayerOutcome, LayerPlan, firing_cuts, shift_gains
from deadrelu_cli.probe.onnx_deployed import NCHWC_CONV, strip_nchwc_copies
from deadrelu_cli.probe.onnx_graph import find_sites, site_channel_dim
from deadrelu_cli.wiring.model import TensorRef, unit_vector_axis
from deadrelu_cli.wiring.onnx import unit_wiring
from deadrelu_cli.wiring.onnx_index import GraphIndex, float_type, uses

# half-precision stored dtypes: a bias-shift rounds their entries towards firing (`_move`)
HALF_FLOATS = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


def _set(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    tensor = GraphIndex(model.graph).stored_tensor(name)
    if tensor is None:
        raise KeyError(name)
    tensor.CopyFrom(numpy_helper.from_array(array.astype(numpy_helper.to_array(tensor).dtype), tensor.name))


def _get(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(GraphIndex(model.graph).stored_tensor(name)).copy()


def _declare_stored_shapes(model: onnx.ModelProto) -> None:
    """A graph input that names an initializer (every weight of an IR 3 file, e.g. the old model zoo's
    AlexNet/ResNet exports: inputs were their defaults) declares its shape: after prune narrowed the
    weight, the declaration must follow it, or onnxruntime refuses the written file."""
    stored = {tensor.name: tensor for tensor in model.graph.initializer}
    for value in model.graph.input:
        tensor = stored.get(value.name)
        if tensor is None or not value.type.HasField("tensor_type"):
            continue
        shape = value.type.tensor_type.shape
        if [d.dim_value for d in shape.dim] != list(tensor.dims):
            del shape.dim[:]
            for size in tensor.dims:
                shape.dim.add().dim_value = size


def _zeros_of_width(model: onnx.ModelProto, site) -> bool:
    """Whether the Max/Where/Mul spelling a ReLU reads zeros whose shape a narrowed layer would not follow:
    anything but a one-element constant or zeros made to Shape(x) (torch.zeros(C) exported is [C];
    torch.zeros_like(h) of another tensor h keeps h's width)."""
    index = GraphIndex(model.graph)
    node = next(
        n for n in model.graph.node if (n.name or n.output[0]) == (site.node_name or site.output_name)
    )
    operands = list(node.input[1:] if node.op_type == "Where" else node.input)
    if node.op_type in ("Where", "Mul"):  # the comparison behind the mask (through its Casts) reads zeros
        mask = (
            node.input[0] if node.op_type == "Where" else next(n for n in node.input if n != site.input_name)
        )
        test = index.producer[mask]
        while test.op_type == "Cast":
            test = index.producer[test.input[0]]
        operands = [n for n in operands if n != mask] + list(test.input)

    def follows(name: str) -> bool:
        value = index.constant(name)
        if value is not None:
            return value.size == 1
        made = index.producer.get(name)
        shape_of = index.producer.get(made.input[-1]) if made is not None and made.input else None
        return (
            made.op_type in ("ConstantOfShape", "Expand")
            and shape_of is not None
            and shape_of.op_type == "Shape"
            and shape_of.input[0] == site.input_name
        )

    return not all(follows(name) for name in operands if name != site.input_name)


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
    from deadrelu_cli.loaders.onnx_model import restore_weights

    restore_weights(scanned.model)  # the scan held the graph without its large weights
    if not str(options.output).lower().endswith(".onnx"):
        raise UserError(f"--output {options.output}: an ONNX model is written as ONNX; use a .onnx name")
    original = scanned.model.runnable
    model = onnx.ModelProto()
    model.CopyFrom(original)
    sites = {site.name: site for site in find_sites(model, scan_options.ops)}
    nodes = {n.name or n.output[0]: n for n in model.graph.node}
    outcomes = []
    shifts: dict[str, str] = {}  # bias-shift: per layer, the tensor to move (moved after this loop)
    drawn: dict[str, TensorRef] = {}  # reinit: per layer, the weight whose rows were redrawn
    dropped: dict[tuple[str, int], set[int]] = {}  # prune: per consumer weight (name, axis), its columns out
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
            was = node.op_type  # Relu, or the Max / Where / Mul that spells it
            node.op_type = "LeakyRelu" if options.strategy == "leaky" else "Elu"
            # Max(x, 0) / Where(x > 0, x, 0) / Mul(x, x > 0) / Clip(x, 0, inf): the activation of x alone
            if site.spelled or len(node.input) > 1:
                del node.input[:]
                node.input.append(site.input_name)
            del node.attribute[:]
            node.attribute.append(
                helper.make_attribute("alpha", options.slope if options.strategy == "leaky" else 1.0)
            )
            outcome.applied, outcome.action = True, f"{was} → {node.op_type}({node.attribute[0].f:g})"
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
            shifts[plan.name] = shift
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
            pushed = wire.batchnorm.bias if wire.batchnorm is not None else wire.bias  # B, as torch's beta
            if pushed:
                bias = _get(model, pushed)
                bias.reshape(-1)[plan.units] += np.abs(rng.standard_normal(len(plan.units)) * sigma).astype(
                    bias.dtype
                )
                _set(model, pushed, bias)
            outcome.applied, outcome.action = True, f"{wire.weight.name} kicked (σ = {sigma:.3g})"
            continue
        if wire.weight is None or wire.consumer_weight is None:
            outcome.action = wire.why
            continue
        w_in = _get(model, wire.weight.name)
        bn = wire.batchnorm
        bn_tensors = (
            [name for name in (bn.weight, bn.bias, bn.running_mean, bn.running_var) if name] if bn else []
        )
        try:  # (read on the original: an earlier layer's prune may have narrowed a shared Concat consumer)
            columns = {
                ref: wire.consumer_columns(
                    plan.units, plan.all_units, _get(original, ref.name).shape[ref.axis], ref
                )
                for _, ref in wire.consumers()
            }
        except ValueError as exc:
            outcome.action = f"skipped: {exc}"
            continue
        readers = ", ".join(ref.name for ref in columns)
        if options.strategy == "reinit":
            fan_in = int(np.prod(w_in.shape)) // w_in.shape[wire.weight.axis]
            bound = 1.0 / np.sqrt(fan_in)
            fresh = rng.uniform(-bound, bound, size=w_in.shape).astype(w_in.dtype)
            taken = np.take(fresh, plan.units, axis=wire.weight.axis)
            _assign(w_in, wire.weight.axis, plan.units, taken)
            _set(model, wire.weight.name, w_in)
            for ref, zeroed in columns.items():
                w_out = _get(model, ref.name)
                _assign(w_out, ref.axis, zeroed, 0.0)
                _set(model, ref.name, w_out)
            if wire.bias:
                bias = _get(model, wire.bias)
                bias.reshape(-1)[plan.units] = 0.0
                _set(model, wire.bias, bias)
            # a BatchNormalization after the rows: its channels reset to the identity, as the torch fix
            # does (scale 1, B 0, mean 0, var 1), so the unit's pre-activation is the fresh row's output
            for name, value in (
                zip((bn.weight, bn.bias, bn.running_mean, bn.running_var), (1, 0, 0, 1), strict=True)
                if bn
                else ()
            ):
                if name:
                    array = _get(model, name)
                    array.reshape(-1)[plan.units] = value
                    _set(model, name, array)
            reset = f", {bn.owner} reset" if bn else ""
            outcome.applied, outcome.action = (
                True,
                f"{wire.weight.name} re-initialised{reset}; {readers} inputs zeroed",
            )
            drawn[plan.name] = wire.weight
        elif options.strategy == "prune":
            if site.op != "relu":
                outcome.action = f"skipped: only relu units are exactly zero when dead ({site.op})"
                continue
            if len(plan.units) == plan.all_units:
                outcome.action = "skipped: every unit is dead"
                continue
            if site.spelled and _zeros_of_width(model, site):
                outcome.action = (
                    f"skipped: the {site.spelled} that spells this ReLU takes zeros whose shape is not "
                    "its input's (use reinit)"
                )
                continue
            bias_axis = unit_vector_axis(_get(model, wire.bias).shape) if wire.bias else None
            if wire.bias_reshaped or (wire.bias and bias_axis is None):
                outcome.action = "skipped: the graph re-shapes its bias to the old width (use reinit)"
                continue
            kept = [u for u in range(plan.all_units) if u not in set(plan.units)]
            _set(model, wire.weight.name, np.take(w_in, kept, axis=wire.weight.axis))
            # the consumer is narrowed once every layer is planned: the layers a Concat joins share it
            for ref, removed in columns.items():
                dropped.setdefault((ref.name, ref.axis), set()).update(removed)
            if wire.bias:
                _set(model, wire.bias, np.take(_get(model, wire.bias), kept, axis=bias_axis))  # shape kept
            for name in bn_tensors:
                _set(model, name, np.take(_get(model, name).reshape(-1), kept))
            narrowed = f" (and {bn.owner})" if bn else ""
            outcome.applied, outcome.action = (
                True,
                f"{wire.weight.name}{narrowed} narrowed to {len(kept)}; {readers} inputs removed",
            )
            outcome.units_after = len(kept)
            for layer in [wire.owner] + ([bn.owner] if bn else []):  # the layers narrowed, not the site
                result.new_widths[layer] = len(kept)
    for (name, axis), columns in dropped.items():
        consumer = _get(model, name)
        _set(model, name, np.delete(consumer, sorted(columns), axis=axis))
    by_name = {outcome.name: outcome for outcome in outcomes}
    pass_ = _SitePass(scanned, sites, scan_options)
    if shifts:
        _bias_shift(model, [p for p in plans if p.name in shifts], shifts, by_name, options, pass_)
    if drawn:
        _flip_silent_rows(model, [p for p in plans if p.name in drawn], drawn, by_name, pass_)
    strip_nchwc_copies(model)  # the scan's NCHW copies of blocked convolutions: not part of the model
    if options.strategy == "prune":
        del model.graph.value_info[:]  # shapes changed: let shape inference redo them
        _declare_stored_shapes(model)
    result.params_before, result.params_after = _parameter_count(original), _parameter_count(model)
    shapes = sample_shapes(scanned, scan_options)
    result.flops_before, result.flops_after = onnx_macs(original, shapes), onnx_macs(model, shapes)
    if any(o.applied for o in outcomes):
        write_bytes(temp, model.SerializeToString())

    def patched_runner():
        try:
            return runner_for(load_model(LoadOptions(str(temp))), scanned.data, scanned.device)
        except UserError as exc:  # the file loaded before the fix: what fails now is the patch (exit 3)
            raise RuntimeError(f"the patched model does not load ({exc}); nothing was written") from exc

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


def _lead_sums(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-index sums of |x| along a tensor's axis 0 and axis 1 over every other axis (what
    probe.ops.reordered_layout reads; the scan's `_add_lead_sums` in the graph)."""
    magnitude = np.abs(np.asarray(values, np.float64))
    return magnitude.reshape(magnitude.shape[0], -1).sum(1), np.moveaxis(magnitude, 1, 0).reshape(
        magnitude.shape[1], -1
    ).sum(1)


def _kept_positions(
    moved: np.ndarray, shape: tuple, dim: int, keep: np.ndarray | None, time_major: bool | None = None
) -> np.ndarray:
    """[values, units]: a site's values (units moved last) at the positions `keep` [batch, tokens] keeps,
    where the site's tensor holds those positions (probe.ops.token_layout, as the scan decides it).
    `time_major`: rows [B*T, ...] are a [T, B, ...] flattened, or a square batch's [B, T, ...] shape is
    [T, B, ...] (as reordering the samples told)."""
    from deadrelu_cli.probe.ops import TOKEN_FLAT, TOKENS_FIRST, layout_ambiguous, token_layout

    units = moved.shape[-1]
    layout = token_layout(tuple(shape), dim, *keep.shape) if keep is not None and len(shape) >= 2 else None
    if layout is not None and time_major and layout_ambiguous(tuple(shape), dim, *keep.shape):
        layout = TOKENS_FIRST
    if layout == TOKEN_FLAT and time_major:  # [T*B, ..., U] -> [T, B, ..., U]
        moved, layout = moved.reshape(keep.shape[1], keep.shape[0], *moved.shape[1:]), TOKENS_FIRST
    elif layout == TOKEN_FLAT:  # [B*T, ..., U] -> [B, T, ..., U]
        moved = moved.reshape(*keep.shape, *moved.shape[1:])
    if layout == TOKENS_FIRST:  # [T, B, ..., U]
        moved = moved[keep.T]
    elif layout is not None:  # [B, T, ..., U] (rows, flat, and [B, C, T] with the units moved last)
        moved = moved[keep]
    return moved.reshape(-1, units)


class _SitePass:
    """Runs a model (the one being fixed, as it stands) over the data with the planned sites'
    pre-activations exposed: [values, units] per site, over the positions the scan counted (a position
    mask's kept ones, as the torch collectors see them)."""

    def __init__(self, scanned, sites, scan_options) -> None:
        self.scanned, self.sites, self.options = scanned, sites, scan_options
        # site -> time-major? (rows [B*T, ...], or a square batch's [T, B, ...]; None: untold), and how
        # many batches were reordered to tell it
        self.row_orders: dict[str, bool | None] = {}
        self.tries: dict[str, int] = {}
        self.threshold = float(scan_options.threshold)

    def values(
        self,
        model: onnx.ModelProto,
        units: dict[str, list[int] | None],
        limit: int | None = None,
        outputs: list | None = None,
    ):
        """Per site name, its values [values, units] (`units`: the units to keep; None: every unit), as
        float64, and the machine epsilon of the site's own dtype. `outputs`: a list that receives the
        model's own outputs of every batch."""
        from deadrelu_cli.backends.onnx.scan import LAYOUT_BATCHES, as_input, feed_order, make_session
        from deadrelu_cli.inputs import batch_mask, mask_lengths, resolve_mask, square_free_batch_size
        from deadrelu_cli.probe.onnx_graph import (
            cells_keep,
            conv_frames_keep,
            frame_chains,
            frames_keep,
            site_cells,
            site_frames,
        )
        from deadrelu_cli.probe.ops import (
            layout_ambiguous,
            reordered_layout,
            row_order_ambiguous,
            token_layout,
        )
        from deadrelu_cli.wiring.onnx_index import opset_version

        scanned, options = self.scanned, self.options
        exposed = onnx.ModelProto()
        exposed.CopyFrom(model)
        own = len(exposed.graph.output) if outputs is not None else 0
        del exposed.graph.output[own:]
        index = GraphIndex(exposed.graph)
        names = list(units)
        for name in names:
            value = self.sites[name].input_name
            exposed.graph.output.append(helper.make_tensor_value_info(value, float_type(index, value), None))
        session = make_session(exposed.SerializeToString(), scanned.device, [])
        order = feed_order(scanned.model, scanned.data)
        dtypes = {spec.name: spec.dtype for spec in scanned.model.inputs}
        chunks: dict[str, list[np.ndarray]] = {name: [] for name in names}
        eps = dict.fromkeys(names, 0.0)
        # the scan applies a mask from opset 9 (Where); below that it counted every position
        mask = resolve_mask(options.mask, options.exclude_token_ids, scanned.data)
        mask = mask if opset_version(scanned.model.runnable) >= 9 else None
        limit = (
            options.limit if limit is None else limit if options.limit is None else min(limit, options.limit)
        )
        size = options.batch_size
        if mask is not None and scanned.model.fixed_batch is None and isinstance(size, int):
            # no batch of as many samples as tokens: a time-major site is told by its shape, as in the scan
            local = scanned.data.local_samples
            total = local if limit is None else min(limit, local)
            size = square_free_batch_size(size, total, mask_lengths(mask, scanned.data))
        consts, axes = set(getattr(scanned.data, "consts", ())), getattr(scanned.data, "batch_axes", {})
        chains = None  # frame_chains of the model, where a site's positions are not the mask's
        for batch in scanned.data.batches(size, limit, options.allow_nonfinite):
            feeds = {i: as_input(batch[a], dtypes.get(i), i) for i, a in order.items()}
            outs = session.run(None, feeds)
            batch_keep = batch_mask(mask, batch) if mask is not None else None
            if outputs is not None:
                outputs.extend(outs[:own])
            again = None
            for name, out in zip(names, outs[own:], strict=True):
                dim = site_channel_dim(self.sites[name], options.channel_dim) % max(1, out.ndim)
                keep, spatial = batch_keep, None
                if keep is not None and keep.ndim == 3:  # an image's pixel mask: as the scan reads it
                    chains = frame_chains(model) if chains is None else chains
                    input_name = self.sites[name].input_name
                    grid = site_cells(chains, input_name, out.shape, dim, *keep.shape)
                    cells, told = cells_keep(grid, keep) if grid else (None, False)
                    moved = np.moveaxis(out, dim, -1)
                    moved = moved if units[name] is None else moved[..., units[name]]
                    # a feature map's cells of image only; elsewhere (cells mixed, no pixel axis) all
                    kept = moved[cells] if told else moved.reshape(-1, moved.shape[-1])
                    chunks[name].append(kept.astype(np.float64))
                    if np.issubdtype(out.dtype, np.floating):
                        eps[name] = max(eps[name], float(np.finfo(out.dtype).eps))
                    continue
                if keep is not None and out.ndim >= 2 and token_layout(out.shape, dim, *keep.shape) is None:
                    # a speech encoder's frames, as the scan masks them (every frame where it could not)
                    chains = frame_chains(model) if chains is None else chains
                    fit = site_frames(chains, self.sites[name].input_name, out.shape, dim, *keep.shape)
                    if fit is not None:
                        frames, real = frames_keep(fit[0], keep)
                        keep, spatial = (frames if real else None), fit[2]
                if keep is not None and spatial is not None:  # a conv's own [B, C, frames, …]: units at 1
                    moved = np.moveaxis(out, 1, -1)
                    moved = moved if units[name] is None else moved[..., units[name]]
                    where = np.broadcast_to(conv_frames_keep(keep, out.ndim, spatial), out.shape)[:, 0]
                    chunks[name].append(moved[where].astype(np.float64))
                    if np.issubdtype(out.dtype, np.floating):
                        eps[name] = max(eps[name], float(np.finfo(out.dtype).eps))
                    continue
                if (
                    keep is not None
                    and self.row_orders.get(name) is None
                    and self.tries.get(name, 0) < LAYOUT_BATCHES
                    and (
                        row_order_ambiguous(out.shape, dim, *keep.shape)
                        or layout_ambiguous(out.shape, dim, *keep.shape)
                    )
                ):  # rows [B*T, ...], or a square [B, T, ...] / [T, B, ...]: as the scan tells it, by
                    # reordering the samples (a batch that tells nothing: the next one, as the scan does)
                    if again is None:
                        flipped = {
                            i: v if a in consts else np.flip(v, axes.get(a, 0)).copy()
                            for (i, a), v in zip(order.items(), feeds.values(), strict=True)
                        }
                        again = session.run(None, flipped)[own:]
                    self.tries[name] = self.tries.get(name, 0) + 1
                    self.row_orders[name] = reordered_layout(
                        out.shape, dim, *keep.shape, _lead_sums(out), _lead_sums(again[names.index(name)])
                    )
                moved = np.moveaxis(out, dim, -1)
                moved = moved if units[name] is None else moved[..., units[name]]
                told = self.row_orders.get(name)
                untold = name in self.row_orders and told is None  # the scan counted every position
                kept = _kept_positions(moved, out.shape, dim, None if untold else keep, told)
                chunks[name].append(kept.astype(np.float64))
                if np.issubdtype(out.dtype, np.floating) or out.dtype == ml_dtypes.bfloat16:
                    eps[name] = max(eps[name], float(ml_dtypes.finfo(out.dtype).eps))
        return {name: np.concatenate(parts) for name, parts in chunks.items()}, eps


def _move(
    model: onnx.ModelProto, name: str, units: list[int], by: np.ndarray, gain: np.ndarray | None = None
) -> np.ndarray:
    """Add `by` to the units' entries of the stored tensor `name` (one value per unit, whatever its
    shape); the move as stored (rounded to the tensor's dtype), per unit. With `gain` (a bias-shift's
    move) a float16 or bfloat16 entry is rounded towards the side that fires (up for a positive gain), not to the
    nearest: one float16 step can be wider than the gap above the cut, and the nearest value would
    leave the unit dead (`backends.torch.strategies.place_shifted`, the torch side). bfloat16 (an
    ml_dtypes array, as onnx reads it) likewise: its step near -1000 is 4."""
    stored = _get(model, name)
    flat = stored.reshape(-1)  # a view
    kept = flat[units].astype(np.float64)
    exact = kept + by
    moved = exact.astype(stored.dtype)
    if gain is not None and stored.dtype in HALF_FLOATS:
        up = np.broadcast_to(np.asarray(gain, np.float64) > 0, exact.shape)
        short = np.where(up, moved.astype(np.float64) < exact, moved.astype(np.float64) > exact)
        toward = np.where(up, np.inf, -np.inf).astype(stored.dtype)
        moved = np.where(short, np.nextafter(moved, toward), moved)
    flat[units] = moved
    _set(model, name, stored)
    return flat[units].astype(np.float64) - kept


def _measure_gains(model, plans, shifts: dict[str, str], site_pass: _SitePass) -> dict[str, np.ndarray | str]:
    """Per layer, d pre / d entry of its shift tensor per unit, measured on a few samples (the model as
    it is, then once per layer with the entries moved and restored): a Gemm's beta, a scale between the
    bias and the ReLU are measured, not assumed; a move that changes other units, or not by one constant,
    is refused (`plan.shift_gains`)."""
    fixed = site_pass.scanned.model.fixed_batch
    samples = fixed or min(16, site_pass.scanned.data.local_samples)
    outputs: list[np.ndarray] = []
    base, eps = site_pass.values(model, dict.fromkeys(shifts), samples, outputs)
    if any(not values.shape[0] for values in base.values()):  # a mask kept nothing there: every sample
        outputs = []
        base, eps = site_pass.values(model, dict.fromkeys(shifts), None, outputs)
        samples = None
    gains = _joint_gains(model, plans, shifts, site_pass, (base, eps, outputs), samples)
    for plan in plans:
        before = base[plan.name]
        if plan.name in gains:
            continue
        if not before.shape[0]:
            gains[plan.name] = "skipped: the data keeps no position of the site (padding only)"
            continue
        delta = 1.0 + float(np.abs(before).max())
        original = _get(model, shifts[plan.name])
        applied = _move(model, shifts[plan.name], plan.units, np.full(len(plan.units), delta))
        try:
            after = site_pass.values(model, {plan.name: None}, samples)[0][plan.name]
        finally:
            _set(model, shifts[plan.name], original)
        gains[plan.name] = shift_gains(shifts[plan.name], plan.units, before, after, applied, eps[plan.name])
    return gains


def _joint_gains(
    model, plans, shifts, site_pass: _SitePass, measured, samples
) -> dict[str, np.ndarray | str]:
    """Every layer's gains from one pass (an onnxruntime session per layer made a ResNet-50's bias-shift
    take minutes): each planned unit's entry is moved *down*, so a ReLU/ReLU6 whose pre-activation stays
    at or below 0 outputs the same 0 and no layer sees another's move. Taken only when that holds for
    every moved value and the model's outputs are bit-equal (nothing else reads a moved tensor);
    else {}: each layer is measured alone, as before."""
    base, eps, before_outputs = measured
    live = [plan for plan in plans if base[plan.name].shape[0]]
    if len(live) < 2 or any(site_pass.sites[plan.name].op not in ("relu", "relu6") for plan in live):
        return {}
    originals = {plan.name: _get(model, shifts[plan.name]) for plan in live}
    applied, after_outputs = {}, []
    try:
        for plan in live:
            delta = 1.0 + float(np.abs(base[plan.name]).max())
            applied[plan.name] = _move(model, shifts[plan.name], plan.units, np.full(len(plan.units), -delta))
        after, _ = site_pass.values(model, dict.fromkeys(p.name for p in live), samples, after_outputs)
    finally:
        for name, array in originals.items():
            _set(model, shifts[name], array)
    silent = all(
        (base[p.name][:, p.units] <= 0).all() and (after[p.name][:, p.units] <= 0).all() for p in live
    )
    same = len(before_outputs) == len(after_outputs) and all(
        np.array_equal(a, b, equal_nan=True) for a, b in zip(before_outputs, after_outputs, strict=True)
    )
    if not (silent and same):
        return {}
    return {
        p.name: shift_gains(
            shifts[p.name], p.units, base[p.name], after[p.name], applied[p.name], eps[p.name]
        )
        for p in live
    }


def _bias_shift(model, plans, shifts: dict[str, str], outcomes: dict, options: FixOptions, site_pass):
    """Move each dead unit's shift tensor entry (a Conv/Gemm/MatMul+Add bias, a BatchNormalization's or
    LayerNormalization's B) by (--threshold - cut) / gain, so that it exceeds --threshold on about
    --target-rate of the data (`plan.firing_cuts`; tied values fire together); then settle: rerun the
    shifted model and move again the units off their count (a unit revived in an earlier layer changes
    what a later one sees; a value next to the cut may round to the other side once the bias moves), one
    round per layer and one that checks the last moves, as the torch fixes do."""
    threshold = site_pass.threshold
    gains = _measure_gains(model, plans, shifts, site_pass)
    live = [plan for plan in plans if not isinstance(gains[plan.name], str)]
    for plan in plans:
        if isinstance(gains[plan.name], str):
            outcomes[plan.name].action = gains[plan.name]
    if not live:
        return
    units = {plan.name: plan.units for plan in live}
    values, _ = site_pass.values(model, units)
    moves: dict[str, np.ndarray] = {}
    for plan in live:
        cuts, wanted = firing_cuts(values[plan.name], options.target_rate)
        by = (threshold - cuts) / gains[plan.name]
        _move(model, shifts[plan.name], plan.units, by, gains[plan.name])
        moves[plan.name] = by
        outcome = outcomes[plan.name]
        outcome.applied = True
        outcome.promised = (wanted / max(1, len(values[plan.name]))).tolist()
        gain = gains[plan.name]
        outcome.action = f"{shifts[plan.name]} moved by {float(by.min()):.4g}…{float(by.max()):.4g}" + (
            "" if np.allclose(gain, 1.0) else f" (gain {float(np.min(gain)):.4g}…{float(np.max(gain)):.4g})"
        )
    for _ in range(len(live) + 1):  # one round per layer, and one that checks the last moves
        values, _ = site_pass.values(model, units)
        moved = False
        for plan in live:
            fired = (values[plan.name] > threshold).sum(axis=0)
            cuts, wanted = firing_cuts(values[plan.name], options.target_rate)
            off = fired != wanted
            if not off.any():
                continue
            gain = np.asarray(gains[plan.name])[off]
            by = (threshold - cuts[off]) / gain
            applied = _move(model, shifts[plan.name], list(np.asarray(plan.units)[off]), by, gain)
            # a float16 entry one step from the cut cannot move closer: it stays, firing on what it
            # fires on now (kept on the firing side by _move)
            stuck = np.zeros(len(plan.units), bool)
            stuck[np.flatnonzero(off)] = applied == 0
            outcome = outcomes[plan.name]
            rates = np.where(stuck, fired, wanted) / max(1, len(values[plan.name]))
            outcome.promised = np.where(off, rates, outcome.promised).tolist()
            if stuck.any() and outcome.coarse_dtype is None:
                outcome.coarse_dtype = str(_get(model, shifts[plan.name]).dtype)
                outcome.action += f"; {outcome.coarse_dtype} steps wider than the gap at some cuts (see note)"
            if not (off & ~stuck).any():
                continue
            moved = True
            if "re-settled" not in outcome.action:
                outcome.action += f"; {int((off & ~stuck).sum())} re-settled on a rescan"
        if not moved:
            break


def _flip_silent_rows(model, plans, drawn: dict[str, TensorRef], outcomes: dict, site_pass) -> None:
    """After reinit: negate each fresh row whose unit still never exceeds --threshold on the data while
    the negated row would (`strategies.flip_silent_rows`, the torch side: bias 0, so the pre-activation
    is linear in the row and negating the row negates every value; outgoing weights are zero, so one pass
    serves every layer). `promised`: per unit, the fraction of values above the threshold afterwards."""
    threshold = site_pass.threshold
    values, _ = site_pass.values(model, {plan.name: plan.units for plan in plans})
    for plan in plans:
        column = values[plan.name]
        above, below = (column > threshold).sum(axis=0), (column < -threshold).sum(axis=0)
        silent = (above == 0) & (below > 0)
        if silent.any():
            ref = drawn[plan.name]
            weight = _get(model, ref.name)
            rows = list(np.asarray(plan.units)[silent])
            _assign(weight, ref.axis, rows, -np.take(weight, rows, axis=ref.axis))
            _set(model, ref.name, weight)
        outcomes[plan.name].promised = (np.where(silent, below, above) / max(1, len(column))).tolist()
