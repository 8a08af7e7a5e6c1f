"""Which torch callables and aten ops are activation sites, and how call sites are named.

Naming (identical for eager modules, TorchScript and ExportedProgram graphs):
- an activation module (nn.ReLU, nn.ReLU6, …) called at several places: `path`, `path#2`, `path#3`, …
  in the order the calls run in one forward;
- a functional call (F.relu, torch.relu, Tensor.relu, relu_) inside module `path`:
  `path.relu()`, `path.relu()#2`, …; at the top level: `relu()`.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from deadrelu_cli.errors import UserError

DEFAULT_OPS = ("relu", "relu6")
OPTIONAL_OPS = ("leaky_relu", "elu", "gelu", "silu")
ALL_OPS = DEFAULT_OPS + OPTIONAL_OPS
# ops a scan names when it finds their layers but --ops did not ask for them (report.unscanned): the
# piecewise ones, whose units can die or nearly (smooth GELU/SiLU are never exactly 0: not named)
NAMED_WHEN_UNSCANNED = ("relu", "relu6", "leaky_relu", "elu")

ACTIVATION_MODULE_PREFIX = "torch.nn.modules.activation."


def parse_ops(text: str | None) -> tuple[str, ...]:

    if not text:
        return DEFAULT_OPS
    ops = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [op for op in ops if op not in ALL_OPS]
    if unknown:
        raise UserError(f"--ops: unknown op {unknown[0]!r}; choose from {', '.join(ALL_OPS)}")
    return ops


# --ops name -> the kind a label carries (gate.UNSEEN_OP_KINDS)
LABEL_KINDS = {
    "relu": "Relu",
    "relu6": "Relu6",
    "leaky_relu": "LeakyRelu",
    "elu": "Elu",
    "gelu": "Gelu",
    "silu": "Silu",
}


def hidden_label(path: str, what: str, op: str) -> str:
    """How an activation the probe cannot count is named (probe.hidden; gate.unseen_op_kinds reads it)."""
    return f"{path or '<model>'}: {what}(activation={LABEL_KINDS[op]})"


def stored_zeros_label(path: str, spelling: str) -> str:
    """How a ReLU spelled with a parameter or buffer of zeros after a layer is named in `hidden`: no site
    (its zeros are the checkpoint's values, not the code's: probe.ops above zeros_fit), yet a ReLU as
    the checkpoint stands, so a gate stops on it unless --allow-unseen. Every probe alike."""
    spelling = spelling.removeprefix("aten::").removeprefix("aten.").split(".")[0].rstrip("_")
    return hidden_label(path, f"{spelling} with a stored zero tensor ", "relu")


def is_activation_module_type(qualified_type: str | None) -> bool:
    """True for torch.nn activation modules (as qualified by export / TorchScript / Python)."""
    if not qualified_type:
        return False
    return qualified_type.replace("__torch__.", "").startswith(ACTIVATION_MODULE_PREFIX)


def aten_op_kind(overload_name: str, args: tuple) -> tuple[str, bool] | None:
    """Map an aten op (e.g. 'aten::relu_' or 'aten.relu_.default') and its args to (op, in_place)."""
    base = overload_name.replace("aten::", "").replace("aten.", "").split(".")[0]
    in_place = base.endswith("_")
    base = base.rstrip("_")
    if base == "relu":
        return "relu", in_place
    if base == "relu6":
        return "relu6", in_place
    if base == "hardtanh":
        op = hardtanh_op(args[1] if len(args) > 1 else -1.0, args[2] if len(args) > 2 else 1.0)
        return (op, in_place) if op is not None else None
    if base in ("leaky_relu", "elu", "gelu", "silu"):
        return base, in_place
    if base == "rrelu":  # nn.RReLU: a leaky ReLU (its slope fixed in eval, random in training)
        return "leaky_relu", in_place
    if base in ("clamp", "clip", "clamp_min", "threshold"):  # ReLU spelled another way (exactly a ReLU)
        if args and is_scalar_value(args[0]):
            return None
        bounds = clamp_bounds(base, args[1:])
        return (CLAMP_OPS[bounds], in_place) if bounds in CLAMP_OPS else None
    return None


def hardtanh_op(lo: object, hi: object) -> str | None:
    """The op `hardtanh(x, lo, hi)` is: relu6 for (0, 6), relu for (0, inf) (ONNX's Clip(x, 0, inf) alike),
    else None (no ReLU's bounds)."""
    if not (_is_number(lo) and _is_number(hi)) or float(lo) != 0.0:
        return None
    return "relu6" if float(hi) == 6.0 else "relu" if float(hi) == float("inf") else None


# clamp(x, min=0) is relu, clamp(x, 0, 6) relu6, threshold(x, 0, 0) relu: the same values (their ONNX
# export is a Relu or a Clip), so they are the same sites in every format
CLAMP_OPS = {(0.0, None): "relu", (0.0, 6.0): "relu6"}


def clamp_bounds(base: str, rest: tuple) -> tuple[float | None, float | None] | None:
    """(lower, upper) bounds of clamp / clip / clamp_min / threshold given its arguments after the
    tensor, or None when they are not numbers (a tensor bound) or the op is no clamp from below to 0
    (threshold(x, t, v) is one only when v == t)."""
    if base == "threshold":
        if len(rest) < 2 or not (_is_number(rest[0]) and _is_number(rest[1])) or rest[0] != rest[1]:
            return None
        return float(rest[0]), None
    lo = rest[0] if rest else None
    hi = rest[1] if len(rest) > 1 and base != "clamp_min" else None
    if not _is_number(lo) or not (hi is None or _is_number(hi)):
        return None
    return float(lo), None if hi is None or float(hi) == float("inf") else float(hi)  # (0, inf): (0, None)


def is_scalar_value(value: object) -> bool:
    """Whether a clamp's input (a tensor, or a traced graph node with its example value) is 0-d: a
    clamped loss / norm / sum, no layer of units, so no ReLU site."""
    meta = getattr(value, "meta", None)  # an fx.Node: its traced example value
    if isinstance(meta, dict):
        value = meta.get("val", value)
    dim = getattr(value, "dim", None)
    return callable(dim) and dim() == 0


def clamp_is_layer(shape, unit_axis: int | None, from_layer: bool) -> bool:
    """Whether a clamp with a ReLU's bounds (clamp(min=0), clamp_min(0), threshold(0, 0), ONNX Clip(x, 0))
    is a ReLU layer. `shape`: its input's shape (None for an unknown dim, or None when unknown);
    `unit_axis`: where its units would be (None: the last axis); `from_layer`: the input comes from a
    Linear/Conv/norm layer (through elementwise ops and transposes).

    A layer's output is always one; otherwise the clamped value needs a unit axis of more than one unit:
    a clamped 0-d or rank-1 value (a loss, a per-sample margin) or a clamp of one value per position
    (a variance, a norm or a denominator kept as [B, T, 1]) holds no units. Such a clamp is an ordinary
    op, no layer (it still takes its number in the site names, so that every format numbers alike). An
    unknown shape is a layer: a ReLU missed is worse than a clamp listed. Shared by every probe."""
    if shape is not None and len(shape) == 0:
        return False
    if from_layer or shape is None:
        return True
    if len(shape) < 2:
        return False
    size = shape[-1 if unit_axis is None else unit_axis]
    return not isinstance(size, int) or size > 1  # a symbolic size: not known to be one


# A ReLU spelled with the select or mask of a layer run twice — `torch.where(fc(h) > 0, fc(h), 0)`,
# `fc(h) * (fc(h) > 0)` — compares one call's output and keeps another's: one value computed twice (the
# same layer, or the same pure ops, on the same inputs), which ONNX's exporters merge into one node before
# the file is written. Every torch probe takes the two as one, relu of the kept one, a site as
# `where(x > 0, x, 0)` is: eager by the call (module or function and its input tensors, not written since),
# .pt2 and TorchScript by `same_computation` over the graph (TorchScript checks the values as it runs).
def same_computation(a, b, describe, depth: int = 16) -> bool:
    """Whether graph values `a` and `b` are one value computed twice: the same value, or the outputs of two
    nodes alike (`describe(v)`: (a key for its op, constant arguments and which output it is; its operand
    values), None for a value that is no pure op's output: an input, a random or in-place op) whose operands
    are pairwise one value again, within `depth` steps."""
    if a is b or a == b:
        return True
    if depth <= 0:
        return False
    first, second = describe(a), describe(b)
    if first is None or second is None or first[0] != second[0] or len(first[1]) != len(second[1]):
        return False
    return all(same_computation(x, y, describe, depth - 1) for x, y in zip(first[1], second[1], strict=True))


# A ReLU spelled `maximum(x, Z)` / `max(x, Z)` (Z: zeros that do not widen x, made by the code: zeros /
# zeros_like / new_zeros / full(…, 0) / tensor(0.), or that constant lifted by an export or a trace; a
# parameter or buffer is no Z, zeros or not: its values are the checkpoint's) or `where(x > 0, x, 0)`
# computes the values of `clamp_min(x, 0)` and of `threshold(x, 0, 0)`
# (NaN included). It is a ReLU site when x comes from a layer (a Linear/Conv/norm, through elementwise and
# layout ops, as ONNX's `Max(x, 0)`, probe.onnx_graph.max_relu_input): a maximum of a reduction (an
# observer's running min/max, a variance, a softmax's max) is no layer, and takes no number in the names.
# Eager: the mode (probe.eager); .pt2: written as that clamp (probe.hidden.recompose_spelled_relus) and
# kept by find_sites; TorchScript: the static walk and the run-time dispatch (probe.torchscript).
# `maximum(x, y)` of two computed tensors, or `x * (x > 0)`, is no site.
def zeros_fit(x_shape, zeros_shape) -> bool:
    """Whether zeros of `zeros_shape` broadcast against x (of `x_shape`) without widening it: the result of
    maximum(x, zeros) has x's shape (torch.maximum(x, torch.zeros(C)) of x [B, C], or a 0-d zero)."""
    x_shape, zeros_shape = tuple(x_shape), tuple(zeros_shape)
    if len(zeros_shape) > len(x_shape):
        return False
    return all(z == 1 or z == d for z, d in zip(zeros_shape[::-1], x_shape[::-1], strict=False))


def unit_axis_reduced(rank: int, dim, channel_first: bool | None) -> bool:
    """Whether a reduction over `dim` (an int, or a list of one) of a rank >= 2 tensor is one over its
    unit axis alone (as probe.base.infer_channel_dim places it: dim 1 for a channel-first producer, the
    last for a Linear's output of any rank, [N, H, W, C] included; without a producer dim 1 from rank 4
    on, else the last): what remains is one value per position, and a clamp of it is no ReLU layer
    (probe.base.reduces_unit_axis for eager; the graph probes ask it of their reduction nodes)."""
    if isinstance(dim, (tuple, list)) and len(dim) == 1:
        dim = dim[0]
    if not isinstance(dim, int) or isinstance(dim, bool) or rank < 2:
        return False
    first = channel_first if channel_first is not None else rank >= 4
    unit = 1 if first and rank >= 3 else rank - 1
    return dim % rank == unit


def reduced_over_units(shape, reductions) -> bool:
    """Whether a clamp's input of `shape` is one value per position, given the reductions a graph walk
    without shapes (TorchScript) found on its way, each `(dim, keepdim, channel_first)`: a reduction
    without keepdim had one axis more than the clamped value, one with keepdim as many, and then its unit
    axis must still be of size 1 here (`h - h.mean(-1, keepdim=True)` broadcasts back over h's units: a
    centred layer). The rank, which the walk cannot know, is the clamped value's (unit_axis_reduced)."""
    rank = len(shape)
    for dim, keepdim, channel_first in reductions:
        if not keepdim:
            if unit_axis_reduced(rank + 1, dim, channel_first):
                return True
        elif unit_axis_reduced(rank, dim, channel_first):
            axis = dim[0] if isinstance(dim, (tuple, list)) else dim
            if shape[axis % rank] == 1:
                return True
    return False


def is_zero_number(value: object) -> bool:
    return _is_number(value) and float(value) == 0.0


def is_clamp_op(overload_name: str) -> bool:
    """Whether an aten op name ('aten::clamp_min', 'aten.threshold_.default') is a clamp / threshold."""
    base = overload_name.replace("aten::", "").replace("aten.", "").split(".")[0].rstrip("_")
    return base in ("clamp", "clip", "clamp_min", "threshold")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class SiteNamer:
    """Hands out call-site names in execution order; reset at the start of every forward."""

    def __init__(self) -> None:
        self._seen: Counter[str] = Counter()

    def reset(self) -> None:
        self._seen.clear()

    def name(self, module_path: str, op: str, module_is_activation: bool) -> str:
        if module_is_activation and module_path:
            base = module_path
        else:
            base = f"{module_path}.{op}()" if module_path else f"{op}()"
        self._seen[base] += 1
        count = self._seen[base]
        return base if count == 1 else f"{base}#{count}"


# activations that are never exactly 0 over a region (no dead units in the ReLU sense), by lower-case name
SMOOTH_ACTIVATIONS = (
    "sigmoid",
    "tanh",
    "gelu",
    "silu",
    "swish",
    "softplus",
    "mish",
    "elu",
    "selu",
    "celu",
    "softsign",
)


# activation names as models spell them (lower case, no "_" or "()") -> the --ops name that counts them
OPS_BY_NAME = {"leakyrelu": "leaky_relu", "elu": "elu", "gelu": "gelu", "silu": "silu", "swish": "silu"}


def no_sites_note(what: str, found: Counter) -> str:
    """The note for a model with no site of the chosen ops: `what` it lacks, and the activations it
    has instead; smooth ones (SiLU = x·sigmoid(x), GELU, …) are named as the reason only when present,
    and --ops is suggested only for the kinds it would find (a GELU written out with Tanh and Pow is no
    Gelu node: `--ops gelu` finds nothing there)."""
    if not found:
        return what
    listed = ", ".join(f"{name} ×{count}" for name, count in found.most_common())
    names = {name: name.lower().replace("_", "").rstrip("()") for name in found}
    smooth = [name for name, key in names.items() if key in SMOOTH_ACTIVATIONS]
    countable = [op for op in OPTIONAL_OPS if op in {OPS_BY_NAME.get(key) for key in names.values()}]
    hint = f"--ops {','.join(countable)} counts {'those' if smooth else 'them'}" if countable else ""
    if not smooth:
        return f"{what}; its activations: {listed}" + (f" ({hint})" if hint else "")
    return (
        f"{what}; its activations: {listed} ({', '.join(smooth)}: smooth activations are never exactly 0 "
        "with zero gradient, so no dead units in the ReLU sense" + (f"; {hint})" if hint else ")")
    )


def reshaped_unit_axis(before, after, axis: int) -> int | None:
    """Where the unit axis `axis` of a tensor of shape `before` is after a row-major reshape to `after`
    (view, reshape, flatten, unflatten, squeeze, unsqueeze: ops that keep the elements in their order),
    or None when the units keep no axis of their own there ([N, C, H, W] viewed as [N, C·H·W]: merged
    with the positions) or a size that matters is unknown. The axis after the reshape that starts where
    `axis` started (the same number of elements before it) and is as long; sizes are ints or names of
    symbolic sizes (equal names, equal sizes), None where nothing is known. Every probe reads it."""
    units = before[axis] if -len(before) <= axis < len(before) else None
    head = _size_product(before[: axis % len(before)]) if units is not None else None
    if not isinstance(units, int) or head is None:
        return None
    for place in range(len(after)):
        prefix = _size_product(after[:place])
        if prefix is None:
            return None
        if prefix == head and after[place] == units:
            return place
    return None


def _size_product(sizes) -> tuple[object, tuple[str, ...]] | None:
    """The product of `sizes` as (product of the ints and symbolic expressions, sorted names of the sizes
    known by name only); None when one is unknown. A traced graph's symbolic sizes are expressions
    (sympy: `3*s0` equals 3 times `s0`), ONNX's dim_params names."""
    total, names = 1, []
    for size in sizes:
        if size is None or isinstance(size, bool):
            return None
        if isinstance(size, str):
            names.append(size)
        else:
            total = total * size
    return total, tuple(sorted(names))


def axis_lost_note(names: list[str]) -> str:
    """The note for sites whose units a layer made but a layout op (a view / reshape / flatten, a permute of
    a rank the walk could not tell) moved where no probe can follow them: the axis they were counted on is
    a guess, and the gate stops on them (gate.UNIT_AXIS_NOT_FOLLOWED). Torch and ONNX scans alike."""
    shown = ", ".join(names[:4]) + (f", … ({len(names)} in all)" if len(names) > 4 else "")
    return (
        f"unit axis not followed for {shown}: a reshape or permute between the layer that makes the units and "
        "the activation moved them where deadrelu cannot follow, so the axis counted is a guess and a gate "
        "does not pass on it; scan again with --channel-dim N (the units' axis at the activation), or pass "
        "--allow-unseen to gate on the layers as counted"
    )


def axis_guess_notes(ranks: dict[str, int], producers: str) -> list[str]:
    """The notes for sites (name -> rank) whose units were put on an axis with no producer (one of
    `producers`) to say where they are: rank 3 on the last axis ([N, C, T] and [N, T, C] look alike), rank
    >= 4 on dim 1 ([N, C, H, W]; a ReLU on a computed tensor may be [N, H, W, C]). The axis counted is a
    guess: a gate does not pass on it (gate.UNIT_AXIS_ASSUMED) until --channel-dim says where the units
    are or --allow-unseen takes the layers as counted. Torch and ONNX scans alike."""
    gated = (
        "a gate does not pass on a guessed axis: --channel-dim N says where the units are, or --allow-unseen "
        "gates on the layers as counted"
    )
    notes = []
    for names, text in (
        (
            [name for name, rank in ranks.items() if rank == 3],
            "unit axis assumed last ([N, T, C]) for {}: no {} found before the activation says where its units "
            "are; if they are [N, C, T], scan again with --channel-dim 1 (-1 confirms the last axis); ",
        ),
        (
            [name for name, rank in ranks.items() if rank >= 4],
            "unit axis assumed 1 ([N, C, H, W]) for {}: no {} found before the activation says where its units "
            "are; if they are elsewhere ([N, H, W, C]: --channel-dim -1), scan again with --channel-dim N "
            "(1 confirms dim 1); ",
        ),
    ):
        if names:
            shown = ", ".join(names[:4]) + (f", … ({len(names)} in all)" if len(names) > 4 else "")
            notes.append(text.format(shown, producers) + gated)
    return notes


def resolve_channel_dim(rank: int, inferred: int, override: int | None) -> int:
    """The unit axis of an activation of this rank: the user's override, else what the probe inferred."""
    dim = inferred if override is None else override
    if rank == 0:
        raise UserError("an activation site produced a scalar; it has no units to count")
    if rank == 1:
        return 0
    if not -rank <= dim < rank:
        raise UserError(f"--channel-dim {dim} is out of range for an activation of rank {rank}")
    return dim % rank


TOKENS_LAST = "units_first"  # [B, C, T]: units before the token axis (SqueezeBERT's Conv1d FFN, a text CNN)
TOKEN_ROWS = "rows"  # [B, T, ..., C]
TOKEN_FLAT = "flat"  # [B*T, ..., C] (OPT's FFN runs on the flattened tokens)
TOKENS_FIRST = "time_major"  # [T, B, ..., C]: nn.Transformer*/nn.RNN with batch_first=False
# [T*B, ..., C]: a time-major [T, B, C] flattened (an old LSTM/seq2seq head's `h.view(-1, C)`); its shape
# is TOKEN_FLAT's, only what the model computed tells them apart (`row_order_ambiguous`)
TOKEN_FLAT_TIME_MAJOR = "flat_time_major"


def token_layout(shape: tuple[int, ...], channel_dim: int, batch: int, tokens: int) -> str | None:
    """Where an activation of this shape (units on `channel_dim`, >= 0) holds the [batch, tokens]
    positions of a position mask: TOKENS_LAST, TOKEN_ROWS, TOKENS_FIRST, TOKEN_FLAT, or None (no such
    axis: a pooled head, a conv over pixels, a sequence of another length). Shared by the torch and ONNX
    probes. [T, B, ...] is told from [B, T, ...] by its shape only: where batch == tokens it reads as
    [B, T, ...] (`layout_ambiguous` says when; the probes then decide it otherwise)."""
    rank = len(shape)
    if rank == 3 and channel_dim == 1 and (shape[0], shape[2]) == (batch, tokens):
        return TOKENS_LAST
    if rank >= 3 and tuple(shape[:2]) == (batch, tokens) and channel_dim >= 2:
        return TOKEN_ROWS
    if rank >= 3 and tuple(shape[:2]) == (tokens, batch) and channel_dim >= 2:
        return TOKENS_FIRST
    if rank >= 2 and shape[0] == batch * tokens and channel_dim >= 1 and tokens > 1:
        return TOKEN_FLAT
    return None


def layout_ambiguous(shape: tuple[int, ...], channel_dim: int, batch: int, tokens: int) -> bool:
    """Whether an activation of this shape reads as [B, T, ...] and as [T, B, ...] alike: a batch of as
    many samples as tokens (> 1), units after the first two axes. Its shape cannot say which it is."""
    return (
        batch == tokens > 1 and len(shape) >= 3 and tuple(shape[:2]) == (batch, tokens) and channel_dim >= 2
    )


def row_order_ambiguous(shape: tuple[int, ...], channel_dim: int, batch: int, tokens: int) -> bool:
    """Whether an activation of this shape holds the mask's positions as flattened rows ([B*T, ..., C],
    TOKEN_FLAT) whose order its shape cannot say: sample-major (row b*T + t, [B, T, C] flattened) or
    time-major (row t*B + b, [T, B, C] flattened) alike, whenever more than one sample and token."""
    return batch > 1 and token_layout(shape, channel_dim, batch, tokens) == TOKEN_FLAT


def reordered_layout(
    shape: tuple[int, ...],
    channel_dim: int,
    batch: int,
    tokens: int,
    sums: tuple[np.ndarray, ...],
    again: tuple[np.ndarray, ...],
) -> bool | None:
    """How a tensor whose shape cannot say it holds the mask's positions, found by what the model
    computed (`reordered_order`): True time-major ([T, B, ...], or rows t*B + b of one flattened), False
    sample-major ([B, T, ...], rows b*T + t), None: not told, or a shape that needs no telling."""
    if layout_ambiguous(shape, channel_dim, batch, tokens):
        return reordered_order(False, batch, tokens, sums, again)
    if row_order_ambiguous(shape, channel_dim, batch, tokens):
        return reordered_order(True, batch, tokens, sums, again)
    return None


def reordered_order(
    flat: bool, batch: int, tokens: int, sums: tuple[np.ndarray, ...], again: tuple[np.ndarray, ...]
) -> bool | None:
    """`sums`: a tensor's per-index sums of |x| along axis 0 (and 1, unless `flat`: its rows [B*T, ...])
    over every other axis on a batch; `again`: the same on that batch with its samples in reverse order.
    Whatever holds the samples comes back reversed, the tokens unchanged. True: time-major ([T, B, ...],
    rows t*B + b); False: sample-major ([B, T, ...], rows b*T + t); None: neither or both (identical
    samples), or sums that do not fit."""
    order = np.arange(batch)[::-1]
    try:
        sums = tuple(np.asarray(a, np.float64) for a in sums)
        again = tuple(np.asarray(a, np.float64) for a in again)
        if flat:
            rows, rows_again = sums[0], again[0]
            if rows.shape != (batch * tokens,) or rows_again.shape != rows.shape:
                return None
            samples = rows_again.reshape(batch, tokens) - rows.reshape(batch, tokens)[order]
            steps = rows_again.reshape(tokens, batch) - rows.reshape(tokens, batch)[:, order]
            errors = (np.abs(samples).max(), np.abs(steps).max())
            sums = (rows,)  # the rows' sums alone say the order (axis 1's are the units')
        else:
            if any(a.shape != b.shape for a, b in zip(sums, again, strict=True)) or len(sums) != 2:
                return None
            first = max(np.abs(again[0] - sums[0][order]).max(), np.abs(again[1] - sums[1]).max())
            second = max(np.abs(again[1] - sums[1][order]).max(), np.abs(again[0] - sums[0]).max())
            errors = (first, second)
    except (IndexError, ValueError):
        return None
    # told where one reading matches to well within the rows' spread and the other is far worse: the
    # spread, not the sums' size, is the scale (a large bias shared by every row says nothing); rows
    # that differ only by rounding (one vector everywhere) tell nothing
    spread = max(float(np.ptp(a)) if a.size else 0.0 for a in sums)
    size = max(float(np.abs(a).max()) if a.size else 0.0 for a in sums)
    best = int(np.argmin(errors))
    if spread <= 1e-6 * size or errors[best] > 1e-3 * spread or errors[best] * 20 > errors[1 - best]:
        return None
    return bool(best)


def pixel_cells(pixels: np.ndarray, strides: tuple[int, int], grid: tuple[int, int]) -> np.ndarray | None:
    """bool [B, h, w]: the cells of an h×w feature map over images `pixels` (bool [B, H, W], True = image)
    that are all image, cell (i, j) being the block of pixels [i·sy, (i+1)·sy) × [j·sx, (j+1)·sx) (`strides`
    (sy, sx): the map's stride over the image). A block reaching past the image's edge is judged by its
    pixels inside it (a conv's own zero padding there is no image's padding); one wholly outside is
    padding. None where some cell holds image and padding pixels both: nothing tells which it is. The
    rule of the torch probe (probe.accumulator.PixelMask) and the ONNX one alike."""
    pixels = np.asarray(pixels, dtype=bool)
    (sy, sx), (h, w) = strides, grid
    batch, height, width = pixels.shape
    if min(sy, sx, h, w) < 1:
        return None
    inside = np.zeros((batch, h * sy, w * sx), dtype=np.int64)
    image = np.zeros_like(inside)
    rows, cols = min(height, h * sy), min(width, w * sx)
    inside[:, :rows, :cols] = 1
    image[:, :rows, :cols] = pixels[:, :rows, :cols]
    inside = inside.reshape(batch, h, sy, w, sx).sum(axis=(2, 4))
    image = image.reshape(batch, h, sy, w, sx).sum(axis=(2, 4))
    if np.any((image > 0) & (image < inside)):
        return None
    return (image > 0) & (image == inside)


def pixels_flattened(shape: tuple[int, ...], channel_dim: int, batch: int, height: int, width: int) -> bool:
    """Whether a [B, positions, F] activation's positions may be the pixels of an H×W image's feature
    map flattened (h·w of a grid of a stride s dividing both sides): nothing in its shape says in which
    order, so no probe reads a pixel mask into it (DETR's encoder, given the mask as its own)."""
    if len(shape) != 3 or channel_dim % 3 != 2 or shape[0] != batch:
        return False
    return any(
        not height % s and not width % s and (height // s) * (width // s) == int(shape[1])
        for s in range(1, min(height, width) + 1)
    )


def threshold_below(threshold: float, dtype: object) -> float:
    """The largest value of the float type `dtype` (a torch or numpy dtype, or its name) at most
    `threshold`: for every x of that type, x > result exactly when x > threshold. `x > threshold`
    on a float32 tensor rounds the threshold to the nearest float32 instead, and float32(0.1) is above
    0.1: a unit whose largest value is float32(0.1) would be dead at --threshold 0.1 although its
    max pre-activation exceeds it. Other types (integers) and NaN: the threshold as given."""
    name = str(dtype).removeprefix("torch.")
    if name not in _FLOAT_BITS or threshold != threshold:
        return float(threshold)
    if name == "bfloat16":  # the upper half of a float32: truncate the float32 floor toward -inf
        bits = int(np.array(threshold_below(threshold, "float32"), np.float32).view(np.uint32))
        if bits & 0xFFFF:
            bits = (bits & 0xFFFF0000) + (0x10000 if bits >> 31 else 0)  # negative: one step more
        return float(np.array(bits, np.uint32).view(np.float32))
    with np.errstate(over="ignore"):
        nearest = np.array(threshold, dtype=name)
    if float(nearest) > threshold:
        nearest = np.nextafter(nearest, np.array(-np.inf, dtype=name))
    return float(nearest)


_FLOAT_BITS = {"float16": 16, "bfloat16": 16, "float32": 32, "float64": 64}


def counts_from_output(op: str, threshold: float) -> bool:
    """Whether `pre > threshold` can be read off the output (then no pass over the input is needed)."""
    if op == "relu":
        return threshold >= 0.0
    if op == "relu6":
        return 0.0 <= threshold < 6.0
    return False
