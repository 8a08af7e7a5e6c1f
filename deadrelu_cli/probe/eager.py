"""Call-site probe for eager nn.Modules.

A TorchFunctionMode sees every activation *call* — nn.ReLU modules (which call F.relu), functional
F.relu / torch.relu / Tensor.relu and their in-place forms — so nothing is missed and a module
reused at several places gives one layer per call. Module forward hooks only keep track of which
module is running (for names) and which Linear/Conv/BN ran last (for the unit axis and the bias).
Hooks are always removed and the train/eval mode restored, whatever happens.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode

from deadrelu_cli.probe.accumulator import PositionMask, RoutedRows, RowsNotAttributed, counted_while_running
from deadrelu_cli.probe.base import (
    PER_POSITION_ELEMENTWISE,
    REDUCTIONS,
    ProbeSettings,
    SiteRegistry,
    call_and_record,
    einsum_permutation,
    infer_channel_dim,
    keeps_dtype,
    moved_unit_axis,
    pools_over_space,
    reduces_unit_axis,
    unit_axis_side,
)
from deadrelu_cli.probe.experts import carried_rows, expert_blocks
from deadrelu_cli.probe.ops import (
    CLAMP_OPS,
    NAMED_WHEN_UNSCANNED,
    TOKEN_FLAT,
    TOKEN_FLAT_TIME_MAJOR,
    TOKEN_ROWS,
    TOKENS_FIRST,
    SiteNamer,
    aten_op_kind,
    clamp_bounds,
    clamp_is_layer,
    hardtanh_op,
    hidden_label,
    is_activation_module_type,
    is_clamp_op,
    is_scalar_value,
    is_zero_number,
    reshaped_unit_axis,
    stored_zeros_label,
    zeros_fit,
)

CHANNEL_FIRST_TYPES: tuple[type, ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
)
# LayerNorm / GroupNorm hold a per-unit beta right before the activation (bias-shift acts on it)
PRODUCER_TYPES: tuple[type, ...] = (
    nn.Linear,
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
)
SHAPING_TYPES = PRODUCER_TYPES + CHANNEL_FIRST_TYPES  # outputs whose origin is tracked
# attribute names of wrappers that torch nests inside a model (FSDP1's auto-wrapping, activation
# checkpointing's wrapper, a torch.compile'd submodule): not part of a layer's name
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def module_names(model: nn.Module) -> dict[int, str]:
    """id(module) -> its name in `model`, without the segments of wrappers nested inside it (the names of
    a scan of the saved weights; the wrapper and the module it wraps share the name)."""
    names = {}
    for name, module in model.named_modules():
        names[id(module)] = ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)
    return names


@dataclass(frozen=True)
class _FunctionSpec:
    op: str
    in_place_arg: int | None  # position of the `inplace` argument, if any
    always_in_place: bool = False
    clamp: str | None = None  # a clamp / threshold (its aten name): a site only with a ReLU's bounds


def _function_table() -> dict[Callable, _FunctionSpec]:
    table: dict[Callable, _FunctionSpec] = {
        F.relu: _FunctionSpec("relu", 1),
        torch.relu: _FunctionSpec("relu", None),
        torch.Tensor.relu: _FunctionSpec("relu", None),
        F.relu_: _FunctionSpec("relu", None, True),
        torch.relu_: _FunctionSpec("relu", None, True),
        torch.Tensor.relu_: _FunctionSpec("relu", None, True),
        F.relu6: _FunctionSpec("relu6", 1),
        F.hardtanh: _FunctionSpec("relu6", 3),  # relu6 for (0, 6), relu for (0, inf): decided per call
        F.hardtanh_: _FunctionSpec("relu6", None, True),
        F.leaky_relu: _FunctionSpec("leaky_relu", 2),
        F.leaky_relu_: _FunctionSpec("leaky_relu", None, True),
        F.rrelu: _FunctionSpec("leaky_relu", 4),  # nn.RReLU: a leaky ReLU whose slope is fixed in eval
        F.rrelu_: _FunctionSpec("leaky_relu", None, True),
        F.elu: _FunctionSpec("elu", 2),
        F.elu_: _FunctionSpec("elu", None, True),
        F.gelu: _FunctionSpec("gelu", None),
        F.silu: _FunctionSpec("silu", 1),
    }
    # ReLU spelled as a clamp (clamp(x, min=0), clamp_min(x, 0), threshold(x, 0, 0)): op decided per call
    for base, in_place_arg, functions in (
        ("clamp", None, (torch.clamp, torch.clip, torch.Tensor.clamp, torch.Tensor.clip)),
        ("clamp_min", None, (torch.clamp_min, torch.Tensor.clamp_min)),
        ("threshold", 3, (F.threshold, torch.threshold)),
    ):
        for function in functions:
            table[function] = _FunctionSpec("relu", in_place_arg, clamp=base)
    for base, functions in (
        ("clamp", (torch.clamp_, torch.clip_, torch.Tensor.clamp_, torch.Tensor.clip_)),
        ("clamp_min", (torch.clamp_min_, torch.Tensor.clamp_min_)),
        ("threshold", (F.threshold_, torch.threshold_)),
    ):
        for function in functions:
            table[function] = _FunctionSpec("relu", None, True, clamp=base)
    return table


def _clamp_op(base: str, args: tuple, kwargs: dict) -> str | None:
    """The op a clamp / threshold call is (relu, relu6), or None when its bounds are no ReLU's (whether
    what it clamps has units is EagerProbe.clamp_is_layer's question)."""
    rest = list(args[1:3])
    for position, key in enumerate(("threshold", "value") if base == "threshold" else ("min", "max")):
        if key in kwargs:
            rest.extend([None] * (position + 1 - len(rest)))
            rest[position] = kwargs[key]
    bounds = clamp_bounds(base, tuple(rest))
    return CLAMP_OPS.get(bounds) if bounds is not None else None


def _hardtanh_bounds(args: tuple, kwargs: dict) -> tuple[float, float]:
    lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
    hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
    return float(lo), float(hi)


def _zero_floor(func, args: tuple, kwargs: dict) -> bool:
    """Whether the activation gives +0.0 below zero, as run_in_parts' relu/relu6 do: all but a hardtanh
    whose lower bound is -0.0 (equal to 0, so still a ReLU's bounds, but it gives -0.0)."""
    if func not in (F.hardtanh, F.hardtanh_):
        return True
    return math.copysign(1.0, _hardtanh_bounds(args, kwargs)[0]) > 0


def _pass_through_functions() -> set:
    """Ops a pre-activation may flow through from its Linear/Conv/BN (the graph probes follow the same ones)."""
    T = torch.Tensor
    return {
        T.__add__,
        T.__radd__,
        T.__iadd__,
        T.__sub__,
        T.__isub__,
        T.__mul__,
        T.__rmul__,
        T.__imul__,
        T.__truediv__,
        T.__itruediv__,
        T.add,
        T.add_,
        T.sub,
        T.sub_,
        T.mul,
        T.mul_,
        T.div,
        T.div_,
        T.clone,
        T.contiguous,
        torch.add,
        torch.sub,
        torch.mul,
        torch.div,
        torch.clone,
        F.dropout,
    }


def _unit_preserving_functions() -> set:
    """Ops after an activation that keep each unit's values in their own slot (for finding its consumer)."""
    T = torch.Tensor
    return {
        torch.flatten,
        T.flatten,
        T.view,
        T.reshape,
        torch.reshape,
        F.dropout,
        F.max_pool1d,
        F.max_pool2d,
        F.max_pool3d,
        F.avg_pool1d,
        F.avg_pool2d,
        F.avg_pool3d,
        F.adaptive_avg_pool1d,
        F.adaptive_avg_pool2d,
        F.adaptive_avg_pool3d,
        F.adaptive_max_pool1d,
        F.adaptive_max_pool2d,
        T.contiguous,
        T.clone,
    }


def _layout_functions() -> set:
    """Ops that keep a [B, X, Y] tensor's units but may move their axis (transposes, permutes; squeezes of
    dims after 1, which keep a conv's channels on dim 1 across ranks), or keep
    the axis while changing the values (layer_norm over the units) or other axes (slicing time off, as
    wav2vec2's SamePad does): followed so that a Conv1d's channels stay the units after
    conv -> transpose -> LayerNorm -> transpose -> ReLU."""
    T = torch.Tensor
    return {T.transpose, torch.transpose, T.swapaxes, torch.swapaxes, T.permute, torch.permute,
            T.movedim, torch.movedim, T.moveaxis, torch.moveaxis,
            F.layer_norm, T.__getitem__, T.squeeze, torch.squeeze, T.unsqueeze, torch.unsqueeze}  | _RESHAPES  # fmt: skip


# ops that keep the elements in their order and change the shape only: the unit axis is followed through
# them by the shapes (probe.ops.reshaped_unit_axis), as the graph probes follow their view / reshape nodes
_RESHAPES = frozenset(
    (torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.flatten, torch.flatten)
    + (torch.Tensor.unflatten, torch.unflatten, torch.Tensor.squeeze, torch.squeeze, torch.Tensor.unsqueeze)
    + (torch.unsqueeze, torch.Tensor.view_as, torch.Tensor.reshape_as)
)


_GETITEM = torch.Tensor.__getitem__

# ops that may move a tensor's first two axes (followed by EagerProbe.carry_alignment)
_AXIS_MOVES = frozenset(
    (torch.Tensor.transpose, torch.transpose, torch.Tensor.swapaxes, torch.swapaxes, torch.Tensor.swapdims)
    + (torch.swapdims, torch.Tensor.permute, torch.permute, torch.Tensor.movedim, torch.movedim)
    + (torch.Tensor.moveaxis, torch.moveaxis, torch.Tensor.t, torch.t, torch.Tensor.mT.__get__)
    + (torch.Tensor.T.__get__,)
)


# ops whose output keeps its input's first two axes where it keeps their sizes (elementwise ops and the
# pass-through ones, a Linear / embedding / norm / softmax over the last axis, a row-major reshape that
# keeps the first two sizes, a matmul whose left operand is the trail); any other op ends the trail at a
# square batch, since an einsum, a `.T`, a rot90 swaps [B, T] for [T, B] with the same sizes
_KEEPS_LEAD_AXES = frozenset(
    (F.linear, F.embedding, F.layer_norm, F.group_norm, F.gelu, F.silu, F.elu, F.leaky_relu, F.softmax)
    + (F.log_softmax, F.normalize, torch.tanh, torch.sigmoid, torch.Tensor.tanh, torch.Tensor.sigmoid)
    + (torch.softmax, torch.Tensor.softmax, torch.Tensor.to, torch.Tensor.float, torch.Tensor.type_as)
    + (torch.Tensor.detach, torch.Tensor.masked_fill, torch.where, torch.Tensor.view, torch.Tensor.reshape)
    + (torch.reshape, torch.Tensor.flatten, torch.flatten, torch.Tensor.unflatten, torch.unflatten)
)
_LEFT_OPERAND_LEAD = frozenset(
    (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm)
)


# ops that may flatten a [B, T, ...] or [T, B, ...] tensor's first two axes into rows (EagerProbe.note_flatten)
_FLATTENS = frozenset(
    (torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.flatten, torch.flatten)
)


def _lead_axes_after(func, args: tuple, kwargs: dict) -> tuple[int, int] | None:
    """Where axes 0 and 1 of args[0] are after the axis move `func` (an _AXIS_MOVES op), read off the
    same op on a meta tensor whose axes all have different sizes; None when that fails."""
    rank = args[0].dim()
    sizes = (2, 3, 5, 7, 11, 13, 17, 19)[:rank]
    if len(sizes) < rank:
        return None
    try:
        moved = tuple(func(torch.empty(sizes, device="meta"), *args[1:], **kwargs).shape)
    except Exception:  # noqa: BLE001  (an op this does not read: no alignment carried)
        return None
    return (moved.index(2), moved.index(3)) if 2 in moved and 3 in moved else None


def _moved_unit_axis(func, args: tuple, kwargs: dict, axis: int, before, after) -> int | None:
    """Where a tensor's unit axis `axis` is after `func` (see `_layout_functions`), or None when that is
    not known (rank below 3 or changed, or the op changed the number of units). Rank >= 4 too: a conv's
    [N, C, H, W] permuted to channels-last has its units last (a Linear reads them there). A reshape
    (view, flatten, unsqueeze, …) is read by the shapes before and after it, at any rank."""
    if func in _RESHAPES:
        return reshaped_unit_axis(tuple(before.shape), tuple(after.shape), axis % max(before.dim(), 1))
    rank = before.dim()
    if rank < 3 or after.dim() != rank:
        return None
    name = getattr(func, "__name__", "")
    if name in ("transpose", "swapaxes"):
        dims = tuple(args[1:3]) or (kwargs.get("dim0"), kwargs.get("dim1"))
    elif name == "permute":
        dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        dims = tuple(dims or kwargs.get("dims", ()))
    elif name in ("movedim", "moveaxis"):  # x.movedim(1, -1): a conv's channels moved last
        dims = (*args[1:3], *(kwargs[k] for k in ("source", "destination") if k in kwargs))
    else:  # layer_norm, a slice: the axis stays; the shape check below says whether the units did
        name, dims = "", ()
    moved = moved_unit_axis(name, dims, axis % rank, rank)
    return moved if moved is not None and after.shape[moved] == before.shape[axis] else None


# A ReLU spelled `maximum(x, zeros)` / `max(x, zeros)` / `where(x > 0, x, 0)` (probe.ops, above zeros_fit):
# the calls that make zeros (the position of their fill value; None: zeros by name), copy a tensor's
# values, compare with 0, and the maxima and selects themselves
_ZERO_MAKERS: dict[Callable, int | None] = {
    torch.zeros: None,
    torch.zeros_like: None,
    torch.Tensor.new_zeros: None,
    torch.full: 1,
    torch.full_like: 1,
    torch.Tensor.new_full: 2,
    torch.tensor: 0,
    torch.scalar_tensor: 0,
    torch.as_tensor: 0,
}
_VALUE_COPIES = frozenset(
    {
        torch.Tensor.to,
        torch.Tensor.detach,
        torch.Tensor.clone,
        torch.clone,
        torch.Tensor.expand,
        torch.Tensor.expand_as,
        torch.Tensor.type_as,
        torch.Tensor.contiguous,
        torch.Tensor.float,
        torch.Tensor.double,
        torch.Tensor.half,
        torch.Tensor.bfloat16,
    }
)
# a comparison of x with 0 -> whether its mask is true where x > 0 (x > 0, x >= 0; `0 < x` runs as x > 0)
# or where x <= 0 (x < 0, x <= 0)
_COMPARES: dict[Callable, bool] = {
    **dict.fromkeys(
        (torch.Tensor.gt, torch.Tensor.__gt__, torch.gt, torch.greater, torch.Tensor.greater), True
    ),
    **dict.fromkeys(
        (torch.Tensor.ge, torch.Tensor.__ge__, torch.ge, torch.greater_equal, torch.Tensor.greater_equal),
        True,
    ),
    **dict.fromkeys((torch.Tensor.lt, torch.Tensor.__lt__, torch.lt, torch.less, torch.Tensor.less), False),
    **dict.fromkeys(
        (torch.Tensor.le, torch.Tensor.__le__, torch.le, torch.less_equal, torch.Tensor.less_equal), False
    ),
}
# a mask's negation (`~(x > 0)`: true where x <= 0, and at NaN)
_NEGATIONS = frozenset(
    {
        torch.Tensor.__invert__,
        torch.bitwise_not,
        torch.Tensor.bitwise_not,
        torch.logical_not,
        torch.Tensor.logical_not,
    }
)
_MAXIMA = frozenset(
    {torch.maximum, torch.Tensor.maximum, torch.max, torch.Tensor.max, torch.fmax, torch.Tensor.fmax}
)
_SELECTS = frozenset({torch.where, torch.Tensor.where})
# x.masked_fill(x < 0, 0) and x * (x > 0) (the mask cast or not): relu(x), but for x * mask at x = -inf (NaN)
_MASKED_FILLS = frozenset({torch.Tensor.masked_fill, torch.masked_fill, torch.Tensor.masked_fill_})
_PRODUCTS = frozenset(
    {
        torch.mul,
        torch.Tensor.mul,
        torch.Tensor.__mul__,
        torch.Tensor.__rmul__,
        torch.Tensor.mul_,
        torch.multiply,
    }
)
# clamp(x, min=Z) with a tensor Z: maximum(x, Z) (a number bound is the clamp sites' own, _clamp_op)
_TENSOR_CLAMPS = frozenset(
    {
        torch.clamp,
        torch.Tensor.clamp,
        torch.clip,
        torch.Tensor.clip,
        torch.clamp_min,
        torch.Tensor.clamp_min,
        torch.Tensor.clamp_,
        torch.Tensor.clip_,
        torch.Tensor.clamp_min_,
    }
)
_SPELLED_IN_PLACE = frozenset(
    {
        torch.Tensor.masked_fill_,
        torch.Tensor.mul_,
        torch.Tensor.clamp_,
        torch.Tensor.clip_,
        torch.Tensor.clamp_min_,
    }
)
_SPELLED = _MAXIMA | _SELECTS | _MASKED_FILLS | _PRODUCTS | _TENSOR_CLAMPS
# functional products whose units are on the last axis, as the graph probes read `linear`, `matmul`, `mm`,
# `bmm` and `embedding` (aten_ops.LAST_DIM): an origin without a producer (an nn.Linear's own output then
# gets its module as producer when the module returns)
_LAST_AXIS_MAKERS = frozenset(
    {
        F.linear,
        torch.matmul,
        torch.Tensor.matmul,
        torch.Tensor.__matmul__,
        torch.mm,
        torch.Tensor.mm,
        torch.bmm,
        torch.Tensor.bmm,
        F.embedding,
    }
)
# concatenations: a site output joined with others along its units (a SqueezeNet fire module) still
# reaches the layer that reads the joined tensor, in its own columns (EagerProbe.note_join)
_JOINS = frozenset({torch.cat, torch.concat, torch.concatenate})
_NOTED = frozenset(_ZERO_MAKERS) | _VALUE_COPIES | frozenset(_COMPARES) | _NEGATIONS | _LAST_AXIS_MAKERS
_SPELLED_SPEC = _FunctionSpec("relu", None, clamp="spelled")
_SPELLED_IN_PLACE_SPEC = _FunctionSpec("relu", None, True, clamp="spelled")


def _same_key(first, second, depth: int) -> bool:
    """Whether two calls (EagerProbe._call_of) are one computation: the same op and other arguments on
    operands that are the same live tensors or, within `depth` steps, computed alike again."""
    if isinstance(first, weakref.ref) or isinstance(second, weakref.ref):
        return (
            isinstance(first, weakref.ref)
            and isinstance(second, weakref.ref)
            and first() is not None
            and first() is second()
        )
    if first is None or second is None or depth <= 0:
        return False
    if first[0] != second[0] or first[2] != second[2] or len(first[1]) != len(second[1]):
        return False
    return all(_same_key(a, b, depth - 1) for a, b in zip(first[1], second[1], strict=True))


def _plain(value) -> bool:
    """None, a number, a string or a tuple of those: an argument compared by its value (note_computed)."""
    if isinstance(value, tuple):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, int | float | str)


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's version counter (bumped by every in-place write to it or to a view of it), or None for
    an inference tensor, which keeps none."""
    return None if tensor.is_inference() else tensor._version


# a global pool written as a reduction (`x.mean((2, 3))`): unit-preserving when its dims are spatial
_SPATIAL_POOLS = frozenset({torch.mean, torch.Tensor.mean, torch.amax, torch.Tensor.amax})

UNIT_PRESERVING_MODULES: tuple[type, ...] = (
    nn.Dropout,
    nn.Identity,
    nn.Flatten,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool2d,
)
CONSUMER_TYPES: tuple[type, ...] = (nn.Linear, nn.modules.conv._ConvNd)


def rnn_layers(module: nn.Module) -> int:
    """The ReLU layers an nn.RNN(nonlinearity='relu') runs inside its kernel (0 for any other module)."""
    if isinstance(module, nn.RNN) and getattr(module, "nonlinearity", "tanh") == "relu":
        return module.num_layers * (2 if module.bidirectional else 1)
    return 0


def eager_hidden(model: nn.Module, ops: tuple[str, ...]) -> Counter:
    """Modules of an eager model whose activations the call-site probe cannot see."""
    from deadrelu_cli.probe.torchscript import script_sites

    found: Counter = Counter()
    inside_script: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(f"{outer}.") for outer in inside_script):
            continue  # walked with the scripted module that holds it
        if "relu" in ops and rnn_layers(module):
            found[hidden_label(path, "RNN", "relu")] += rnn_layers(module)
        elif isinstance(module, torch.jit.ScriptModule) and module is not model:
            inside_script.append(path)
            sites = script_sites(module, ops)
            if sites is None:  # code the static walk cannot follow: it may hold anything
                found[f"{path}: TorchScript code (not read)"] += 1
            for op, count in Counter(site.op for site in sites or ()).items():
                found[hidden_label(path, "TorchScript code", op)] += count
    return found


def _wrapper_role(kind: type) -> str:
    """'lora' for a PEFT LoRA layer, 'fake_quant' for a torch.ao fake-quant module, '' otherwise (by class
    name and module: neither library is imported for it)."""
    for cls in kind.__mro__:
        if cls.__module__.startswith("peft.tuners.lora") and cls.__name__ == "LoraLayer":
            return "lora"
        if cls.__module__.startswith("torch.ao.quantization") and cls.__name__ == "FakeQuantizeBase":
            return "fake_quant"
    return ""


class _CallSiteMode(TorchFunctionMode):
    def __init__(self, probe: EagerProbe) -> None:
        super().__init__()
        self.probe = probe

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):  # torch.cond & co: their code runs unseen
            return self.probe.run_higher_order(func, args, kwargs)
        if func is torch.rnn_relu_cell and "relu" in self.probe.settings.ops:
            # nn.RNNCell(nonlinearity='relu'): ATen's own steps (SimpleCell: linear_hh(hx) + linear_ih(x),
            # then relu), written out so that the ReLU is a call site, as TorchScript and ONNX show it
            x, hx, w_ih, w_hh, *biases = args
            b_ih, b_hh = (list(biases) + [None, None])[:2]
            pre = F.linear(hx, w_hh, b_hh) + F.linear(x, w_ih, b_ih)
            return self.__torch_function__(torch.relu, types, (pre,), {})
        spelled = self.probe.spelled_relu(func, args, kwargs) if func in _SPELLED else None
        if spelled is not None:  # maximum(x, zeros), where(x > 0, x, 0), x * (x > 0): relu(x), on x
            spec = _SPELLED_IN_PLACE_SPEC if func in _SPELLED_IN_PLACE else _SPELLED_SPEC
            func, args, kwargs = spelled
        else:
            spec = self.probe.functions.get(func)
        op = None if spec is None else spec.op
        if spec is not None and spec.clamp is not None and spelled is None:  # a clamp that is no ReLU
            op = _clamp_op(spec.clamp, args, kwargs)
            spec = None if op is None else spec
        if spec is None and isinstance(func, torch._ops.OpOverloadPacket | torch._ops.OpOverload):
            qualified = str(getattr(func, "_qualified_op_name", "") or func.name())
            if (
                qualified.startswith("quantized::")
                and "relu" in qualified
                and "relu" in self.probe.settings.ops
            ):
                # an int8 kernel with its ReLU fused in (torch.ao's converted LinearReLU, ConvReLU2d, …)
                self.probe.note_hidden(
                    self.probe.next_site_name("relu"), qualified.replace("::", "."), "relu"
                )
            elif qualified.startswith("aten::"):  # torch.ops.aten.relu(x) called as it is
                clamp = is_clamp_op(qualified)  # the tensor is clamp_is_layer's to judge, below
                kind = aten_op_kind(qualified, (None, *args[1:]) if clamp else tuple(args))
                if kind is not None:  # clamp="aten": run as written (not run_in_parts' relu)
                    spec, op = _FunctionSpec(kind[0], None, kind[1], clamp="aten"), kind[0]
                    if clamp and not self.probe.clamp_is_layer(args[0], op):
                        spec = None
        elif spec is not None and spec.clamp is not None and not self.probe.clamp_is_layer(args[0], op):
            spec = None  # a clamped variance / norm / loss: an ordinary op, not a ReLU layer
        if spec is None or not args or not isinstance(args[0], torch.Tensor):
            out = func(*args, **kwargs)
            if self.probe._rows:
                self.probe.carry_rows(func, args, kwargs, out)
            if func in _FLATTENS:
                self.probe.note_flatten(args, out)
            elif self.probe._flat:
                self.probe.carry_flat(func, args, kwargs, out)
            if self.probe._aligned:
                self.probe.carry_alignment(func, args, kwargs, out)
            if func in _NOTED:
                self.probe.note_made(func, args, kwargs, out)
            if args and isinstance(out, torch.Tensor) and isinstance(args[0], torch.Tensor):
                self.probe.note_per_position(func, args, kwargs, out)
                if func in self.probe.pass_through:
                    others = list(args[1:]) + list(kwargs.values())
                    self.probe.propagate(
                        args[0], out, keep_producer=not any(isinstance(a, torch.Tensor) for a in others)
                    )
                    if len(args) == 2 and not kwargs and isinstance(args[1], int | float):
                        self.probe.note_scaled(func, args[0], args[1], out)  # fc(h) * 2
                    elif self.probe.computed(args[0]):  # fc(h) + x
                        self.probe.note_computed(func, args, kwargs, out)
                    self.probe.carry_shift_source(args, kwargs, out)
                elif func in self.probe.layout:
                    self.probe.relayout(func, args, kwargs, out)
                if func in self.probe.unit_preserving:  # dropout, clone, contiguous are both kinds
                    self.probe.carry_site_output(args[0], out)
                    return out
                if func in _SPATIAL_POOLS and pools_over_space(
                    args[0].dim(), args[1] if len(args) > 1 else kwargs.get("dim")
                ):
                    self.probe.carry_site_output(args[0], out)
                    return out
            if func is torch.einsum and isinstance(out, torch.Tensor):  # its tensors follow its equation
                self.probe.relayout_einsum(args, out)
            if (
                func in _JOINS
                and self.probe._site_outputs
                and args
                and self.probe.note_join(args[0], args[1] if len(args) > 1 else kwargs.get("dim", 0), out)
            ):
                return out
            # reading a tensor's metadata (T5's `hidden_states.dtype`) is no use of its values
            if self.probe._site_outputs and getattr(func, "__name__", "") != "__get__":
                self.probe.note_other_use(func, args)
            return out
        if func in (F.hardtanh, F.hardtanh_):  # (0, 6): relu6, (0, inf): relu, else no site
            op = hardtanh_op(*_hardtanh_bounds(args, kwargs))
            if op is None:
                return func(*args, **kwargs)
        if op in self.probe.settings.ops and args[0].is_quantized:  # no float pre-activation to count
            self.probe.note_hidden(self.probe.next_site_name(op), "activation on a quantized tensor", op)
        if op not in self.probe.settings.ops or not args[0].is_floating_point():
            # a LeakyReLU beside the ReLUs, or a clamp(0, 6) that clamp_is_layer took above: named, not counted
            if op in NAMED_WHEN_UNSCANNED and args[0].is_floating_point():
                self.probe.note_unscanned(op)
            return func(*args, **kwargs)
        in_place = spec.always_in_place or bool(
            kwargs.get(
                "inplace",
                args[spec.in_place_arg]
                if spec.in_place_arg is not None and len(args) > spec.in_place_arg
                else False,
            )
        )
        name = self.probe.next_site_name(op)
        substitute = self.probe.substitutes.get(name)
        if substitute is not None:  # a patched site (deadrelu fix --strategy leaky, patch_module)
            if in_place:  # `x.relu_()` whose caller reads x, not the result
                return args[0].copy_(substitute(args[0]))
            return substitute(args[0])
        if not self.probe.recording:  # substitutes only: other sites run as written, uncounted
            return func(*args, **kwargs)
        out = None
        # an expert's rows (probe.experts): counted on the tokens they hold, for this call only
        routed = self.probe.routed_rows(name, args[0]) if self.probe.expert_paths else None
        if routed is not None:
            self.probe.registry.set_scoped_mask(name, routed)
        try:
            # run_in_parts computes a relu: a threshold's NaN gives 0, not NaN, so clamps run as written
            exact_relu = op in ("relu", "relu6") and spec.clamp is None and _zero_floor(func, args, kwargs)
            if self.probe.fast_paths and exact_relu:
                out = self.probe.run_in_parts(name, op, args[0], in_place)
            if out is None:
                out = call_and_record(
                    func,
                    args,
                    kwargs,
                    op,
                    in_place,
                    lambda pre: self.probe.observe(name, op, pre),
                    lambda post: self.probe.registry.record_post(name, post),
                )
        finally:
            if routed is not None:
                self.probe.registry.given_scope(name)
        if self.probe._rows and not in_place:
            self.probe.carry_rows(func, args, kwargs, out)
        if self.probe._aligned and not in_place:
            self.probe.carry_alignment(func, args, kwargs, out)
        if self.probe._flat and not in_place:
            self.probe.carry_flat(func, args, kwargs, out)
        if in_place:  # the tensor now holds activations, no longer its producer's output
            self.probe.forget(args[0])
        if isinstance(out, torch.Tensor):
            self.probe.mark_site_output(out, name)
        return out


def call_op(functions: dict, func, args: tuple, kwargs: dict) -> str | None:
    """The op of an activation call (`functions`: _function_table), None for any other call."""
    spec = functions.get(func)
    if spec is None or not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
        return None
    if func in (F.hardtanh, F.hardtanh_):
        return hardtanh_op(*_hardtanh_bounds(args, kwargs))
    if spec.clamp is not None and is_scalar_value(args[0]):  # a clamped loss or norm: no layer
        return None
    return spec.op if spec.clamp is None else _clamp_op(spec.clamp, args, kwargs)


# the functions nn.Linear, nn.Conv*, the norms call: a clamp of their output is a layer (clamp_is_layer)
_LAYER_FUNCTIONS = frozenset(
    (F.linear, F.bilinear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d)
    + (F.conv_transpose3d, F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm)
)


def per_position_operand(value, out: torch.Tensor, marked: Callable[[torch.Tensor], bool]) -> bool:
    """Whether `value`, an operand of the elementwise op that made `out`, is one value per position
    (`marked`) that `out` keeps as it is: an operand broadcast to more values (`h - h.mean(-1,
    keepdim=True)`: back over h's units) leaves a result with units, a layer's."""
    return isinstance(value, torch.Tensor) and value.shape == out.shape and marked(value)


class _ActivationCounter(TorchFunctionMode):
    """Counts the activation calls of code the probe runs but cannot attribute (a torch.cond branch).
    A clamp counts as the call site probes count it (probe.ops.clamp_is_layer): one of a layer's output
    (a Linear/Conv/norm function's, through elementwise ops), or of a value with a unit axis of more than
    one unit that is no reduction over the units (probe.base.reduces_unit_axis)."""

    def __init__(self, functions: dict, pass_through: set) -> None:
        super().__init__()
        self.functions = functions
        self.pass_through = pass_through
        self.counts: Counter = Counter()
        self._layer_outputs: dict[int, weakref.ref] = {}
        self._per_position: dict[int, weakref.ref] = {}

    @staticmethod
    def _marked(table: dict, value) -> bool:
        entry = table.get(id(value))
        return entry is not None and entry() is value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = call_op(self.functions, func, args, kwargs)
        if op is not None and self.functions[func].clamp is not None:
            pre = args[0]
            from_layer = self._marked(self._layer_outputs, pre)
            if self._marked(self._per_position, pre) or not clamp_is_layer(
                tuple(pre.shape), None, from_layer
            ):
                op = None
        if op is not None:
            self.counts[op] += 1
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
            if func in _LAYER_FUNCTIONS:
                self._layer_outputs[id(out)] = weakref.ref(out)
            elif func in self.pass_through or func in PER_POSITION_ELEMENTWISE:
                through = func in self.pass_through  # a layer's output stays one through these only
                operands = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
                if through and any(self._marked(self._layer_outputs, a) for a in operands):
                    self._layer_outputs[id(out)] = weakref.ref(out)
                marked = functools.partial(self._marked, self._per_position)
                if any(per_position_operand(a, out, marked) for a in operands):
                    self._per_position[id(out)] = weakref.ref(out)
            elif reduces_unit_axis(func, args, kwargs, None):
                self._per_position[id(out)] = weakref.ref(out)
        return out


class EagerProbe:
    """Records per-unit counts for every activation call site of an nn.Module."""

    def __init__(self, model: nn.Module, settings: ProbeSettings) -> None:
        self.model = model
        self.settings = settings
        self.registry = SiteRegistry(settings)
        self.functions = _function_table()
        self._namer = SiteNamer()
        self._stack: list[tuple[str, nn.Module]] = []
        # id(tensor) -> (weakref, producer name or None, producer module or None, channel-first?)
        self._produced: dict[int, tuple[weakref.ref, str | None, nn.Module | None, bool]] = {}
        # id(tensor) -> (weakref, axis): a layer's units that a layout op put on a middle axis of a rank >= 4
        # tensor (a conv's [N, C, H, W] permuted to [N, H, C, W]), or lost (None: merged by a view)
        self._axes: dict[int, tuple[weakref.ref, int | None]] = {}
        # id(tensor) -> (weakref, module): the producer whose bias a pre-activation still holds after
        # elementwise ops with tensor operands too (`scale * fc(x)`, `fc(x) + x`): bias-shift's candidate
        self._sources: dict[int, tuple[weakref.ref, str]] = {}
        self.shift_sources: dict[str, str] = {}  # site -> that producer, when the site saw one
        self.pass_through = _pass_through_functions()
        self.unit_preserving = _unit_preserving_functions()
        self.layout = _layout_functions()
        # activation outputs (and unit-preserving views of them): id -> (weakref, site name)
        self._site_outputs: dict[int, tuple[weakref.ref, str]] = {}
        # id(tensor) -> weakref: values reduced over the units, one per position (note_per_position)
        self._per_position: dict[int, weakref.ref] = {}
        # id(tensor) -> (weakref, time-major?): tensors whose first two axes are the position mask's
        # [batch, tokens] (False) or [tokens, batch] (True), by descent from the forward's token ids;
        # followed only in a forward whose mask has as many samples as tokens (see note_inputs)
        self._aligned: dict[int, tuple[weakref.ref, bool]] = {}
        # id(tensor) -> (weakref, time-major?): rows [B*T, ...] flattened from a [T, B, ...] tensor (True,
        # row t*B + b) or a [B, T, ...] one (False), as the flatten's operand showed (note_flatten)
        self._flat: dict[int, tuple[weakref.ref, bool]] = {}
        self.consumers: dict[str, set[str]] = {}  # site -> Linear/Conv modules that read its output
        # id(tensor) -> (weakref, [(site, offset, axis, width)]): concatenations holding site outputs;
        # (site, consumer) -> [(offset, width of the joined axis, axis, rank)]: where a consumer reads a
        # site through one (once per place: cat([h, h]) holds it twice), for the fixes' columns
        # (wiring.torch.eager_wiring)
        self._joins: dict[int, tuple[weakref.ref, list[tuple[str, int, int, int]]]] = {}
        self.joined: dict[tuple[str, str], list[tuple[int, int, int, int]]] = {}
        # Linear/Conv module -> what its calls read, one entry per distinct call: the sites it read and
        # where ((site, None) directly, (site, offset, width, axis) through a join), so that a module
        # called at several places that read a site differently (cat([h, h]) and cat([h, x])) is seen
        self.consumer_calls: dict[str, set[frozenset]] = {}
        self.upstream: dict[str, str] = {}  # producer -> the producer feeding it (BN -> its Conv)
        self.substitutes: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}  # site -> replacement
        self.recording = True  # False: only names sites for `substitutes` (a patched model, exportable)
        self.final_output_sites: set[str] = set()  # sites whose output is returned by the model
        self._module_names = module_names(model)
        self.fast_paths = True  # relu counted while it runs (run_in_parts); False: the counting of before
        self._activation_types: dict[type, bool] = {}
        self._wrapper_roles: dict[type, str] = {}  # module type -> _wrapper_role
        # activations inside kernels or TorchScript code no hook or mode sees: named, not counted
        self.hidden = eager_hidden(model, settings.ops)
        self._unscanned: dict[str, set[str]] = {}
        # a ReLU spelled with a maximum or a select: zeros made in this forward and `x > 0` masks (id ->
        # weakrefs, with the tensors' version counters: one changed in place since is no longer that)
        self._zeros: dict[int, tuple[weakref.ref, int]] = {}
        # masks: id -> (weakref, version, weakref to x, x's version, whether true where x > 0, what computed
        # x (note_computed, kept for `_sign_mask` once x is freed), how the mask is made again from a
        # tensor: the comparison, negated as the code negated it)
        self._positives: dict[int, tuple] = {}
        self._stored_ids: set[int] | None = None  # the ids of the model's parameters and buffers
        # id(tensor) -> (weakref, what computed it, weakrefs to its tensor arguments, its other arguments):
        # a layer's output, so that a layer run twice on one tensor reads as one value (probe.ops, above
        # same_computation: `torch.where(fc(h) > 0, fc(h), 0)`)
        self._computed: dict[int, tuple[weakref.ref, int, tuple, tuple]] = {}
        self._stored_seen: Counter = Counter()  # this forward's spellings with stored zeros, by label
        # mixtures of experts (probe.experts.expert_blocks: separate expert modules, fused ones split by
        # experts_apart): their blocks' paths and their experts' (prefixes of the experts' sites);
        # id(tensor) -> (weakref, rows): a tensor inside a block whose rows' tokens are known
        # (probe.experts.carried_rows), seeded at the block's input
        blocks = expert_blocks(model)
        self.expert_blocks = frozenset(blocks)
        self.expert_paths = tuple(f"{path}." for experts in blocks.values() for path in experts)
        self._rows: dict[int, tuple[weakref.ref, torch.Tensor]] = {}

    # -- hooks -------------------------------------------------------------------------------
    def enter_module(self, module: nn.Module, args) -> None:
        """A module's forward begins (its forward pre-hook)."""
        name = self._module_names.get(id(module), "")
        self._stack.append((name, module))
        if name in self.expert_blocks and args:
            self.seed_rows(name, args)
        if not args or not isinstance(args[0], torch.Tensor):
            return
        if isinstance(module, PRODUCER_TYPES):
            origin = self.origin_of(args[0])
            if origin is not None and origin[0] is not None:  # e.g. the Conv before a BatchNorm
                self.upstream[name] = origin[0]
        if isinstance(module, CONSUMER_TYPES):
            site = self.site_of(args[0])
            read = set()
            if site is not None:
                self.consumers.setdefault(site, set()).add(name)
                read.add((site, None))
            for site, offset, axis, width in self.joins_of(args[0]):
                self.consumers.setdefault(site, set()).add(name)
                places = self.joined.setdefault((site, name), [])
                if (offset, width, axis, args[0].dim()) not in places:
                    places.append((offset, width, axis, args[0].dim()))
                read.add((site, offset, width, axis))
            self.consumer_calls.setdefault(name, set()).add(frozenset(read))

    def note_other_use(self, func, args: tuple) -> None:
        """An activation output read by anything but a Linear/Conv or a unit-preserving op (residual add, …)."""
        if self._stack and isinstance(self._stack[-1][1], CONSUMER_TYPES):
            return
        for arg in args:
            if isinstance(arg, torch.Tensor):
                site = self.site_of(arg)
                sites = ([site] if site is not None else []) + [entry[0] for entry in self.joins_of(arg)]
                for site in sites:
                    self.consumers.setdefault(site, set()).add(f"<{getattr(func, '__name__', 'op')}>")
            elif isinstance(arg, list | tuple):  # torch.stack([h, …]), a cat along another axis
                for item in arg:
                    site = self.site_of(item) if isinstance(item, torch.Tensor) else None
                    if site is not None:
                        self.consumers.setdefault(site, set()).add(f"<{getattr(func, '__name__', 'op')}>")

    def note_join(self, parts, dim, out) -> bool:
        """A concatenation of tensors, some of them site outputs (or unit-preserving views of them),
        along `dim`: remember where each site's units sit in `out`, so the layer reading `out` is their
        consumer. False (nothing noted) when no part is a site output, or the parts are not tensors."""
        if not isinstance(out, torch.Tensor) or not isinstance(parts, list | tuple) or out.dim() < 2:
            return False
        if not all(isinstance(p, torch.Tensor) and p.dim() == out.dim() for p in parts):
            return False
        axis = int(dim) % out.dim()
        entries, offset = [], 0
        for part in parts:
            site = self.site_of(part)
            if site is not None:
                entries.append((site, offset, axis))
            # a part that is itself a join along the same axis (a DenseNet-style block joins a join
            # again): its sites sit at its offsets, past the parts before it here
            for inner, at, along, _ in self.joins_of(part):
                if along == axis:
                    entries.append((inner, offset + at, axis))
                else:  # joined again along another axis: its units' columns are lost (no reader found)
                    self.consumers.setdefault(inner, set()).add("<cat>")
            offset += int(part.shape[axis])
        if not entries:
            return False
        self._joins[id(out)] = (weakref.ref(out), [(*entry, offset) for entry in entries])
        return True

    def joins_of(self, tensor: torch.Tensor) -> list[tuple[str, int, int, int]]:
        entry = self._joins.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else []

    def site_of(self, tensor: torch.Tensor) -> str | None:
        entry = self._site_outputs.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def mark_site_output(self, tensor: torch.Tensor, site: str) -> None:
        self._site_outputs[id(tensor)] = (weakref.ref(tensor), site)

    def carry_site_output(self, source: torch.Tensor, result: torch.Tensor) -> None:
        site = self.site_of(source)
        if site is not None:
            self.mark_site_output(result, site)
        joins = self.joins_of(source)
        if joins and isinstance(result, torch.Tensor):
            # (a view that moves the joined axis would move the units: only pools and flattens after it)
            axis = joins[0][2]
            same = result.dim() >= axis + 1 and result.shape[axis] == source.shape[axis]
            if same or result.dim() == 2:
                self._joins[id(result)] = (weakref.ref(result), joins)

    def leave_module(self, module: nn.Module, args, output) -> None:
        """A module's forward returned (its forward hook, always called)."""
        if self._stack and self._stack[-1][1] is module:
            name, _ = self._stack.pop()
            if self._rows and name in self.expert_blocks:  # rows' tokens matter inside a block only
                self._rows.clear()
        if (
            isinstance(module, UNIT_PRESERVING_MODULES)
            and args
            and isinstance(args[0], torch.Tensor)
            and isinstance(output, torch.Tensor)
        ):
            self.carry_site_output(args[0], output)
        if isinstance(output, torch.Tensor) and not isinstance(module, SHAPING_TYPES):
            self._look_through(module, args, output)
        if isinstance(output, torch.Tensor) and isinstance(module, SHAPING_TYPES):
            is_producer = isinstance(module, PRODUCER_TYPES)
            if isinstance(module, PRODUCER_TYPES):
                self._sources[id(output)] = (weakref.ref(output), self._module_names.get(id(module), ""))
            self._produced[id(output)] = (
                weakref.ref(output),
                self._module_names.get(id(module), "") if is_producer else None,
                module if is_producer else None,
                isinstance(module, CHANNEL_FIRST_TYPES),
            )
            self.note_computed(module, args, {}, output)

    def _look_through(self, module: nn.Module, args, output: torch.Tensor) -> None:
        """Wrappers whose output still holds a layer's units: a PEFT LoRA layer (base_layer(x) plus the
        low-rank update: the base layer's bias still adds to each unit, so it is the producer) and a
        fake-quant module (QAT: elementwise and monotone, so the units and the producer before it stay)."""
        kind = type(module)
        role = self._wrapper_roles.get(kind)
        if role is None:
            role = self._wrapper_roles[kind] = _wrapper_role(kind)
        if role == "lora":
            base = getattr(module, "base_layer", None)
            if not isinstance(base, nn.Linear | nn.modules.conv._ConvNd) or any(
                (getattr(module, "use_dora", None) or {}).values()
            ):
                return  # DoRA rescales the base output per unit: the bias no longer adds alone
            channel_first = isinstance(base, nn.modules.conv._ConvNd)
            units = base.out_channels if channel_first else base.out_features
            if output.dim() == 0 or output.shape[1 if channel_first else -1] != units:
                return
            name = self._module_names.get(id(base), "")
            self._produced[id(output)] = (weakref.ref(output), name, base, channel_first)
            self._sources[id(output)] = (weakref.ref(output), name)
        elif role == "fake_quant" and args and isinstance(args[0], torch.Tensor):
            if args[0].shape == output.shape:
                self.propagate(args[0], output, keep_producer=True)
                self.carry_shift_source((args[0],), {}, output)

    def origin_of(self, tensor: torch.Tensor) -> tuple[str | None, nn.Module | None, bool] | None:
        """(producer name, producer module, channel-first) of a tensor, or None when unknown."""
        entry = self._produced.get(id(tensor))
        if entry is None or entry[0]() is not tensor:  # ids are reused once a tensor is freed
            return None
        return entry[1], entry[2], entry[3]

    def forget(self, tensor: torch.Tensor) -> None:
        self._produced.pop(id(tensor), None)
        self._axes.pop(id(tensor), None)
        self._sources.pop(id(tensor), None)

    def propagate(self, source: torch.Tensor, result: torch.Tensor, keep_producer: bool) -> None:
        """Carry the origin through an elementwise op; the bias stays meaningful only with a scalar operand."""
        found = self.origin_of(source)
        if found is not None:
            name, module, channel_first = found if keep_producer else (None, None, found[2])
            self._produced[id(result)] = (weakref.ref(result), name, module, channel_first)
        moved = self.moved_axis_of(source)
        if moved is not None and result.dim() == source.dim():
            self._axes[id(result)] = (weakref.ref(result), moved[1])

    def carry_shift_source(self, args: tuple, kwargs: dict, result: torch.Tensor) -> None:
        """Carry the bias-shift candidate through an elementwise op from the one operand that has one
        (whether a shift of its bias moves the result by a constant is measured by the fix, not assumed)."""
        found = {
            entry[1]
            for arg in (*args, *kwargs.values())
            if isinstance(arg, torch.Tensor)
            and (entry := self._sources.get(id(arg))) is not None
            and entry[0]() is arg
        }
        if len(found) == 1:
            self._sources[id(result)] = (weakref.ref(result), found.pop())

    def relayout(self, func, args: tuple, kwargs: dict, result: torch.Tensor) -> None:
        """Carry a tensor's unit axis through a transpose, permute, reshape (view, flatten, squeeze, …),
        layer_norm or slice, to dim 1, the last axis or a middle one (`_axes`); the producer is not carried
        (its bias no longer sits before the activation, or on another axis). Where a transpose, permute or
        reshape leaves the units nowhere this can tell (a view merging them with other axes), the result
        is marked lost: its site says so (probe.ops.axis_lost_note) rather than count another axis."""
        found = self.origin_of(args[0])
        moved = self.moved_axis_of(args[0])
        if found is None:
            if moved is not None and moved[1] is None and func is not _GETITEM:
                self._axes[id(result)] = (weakref.ref(result), None)  # lost stays lost
            return
        before = (
            infer_channel_dim(args[0].dim(), found[2], moved[1] if moved else None) if args[0].dim() else 0
        )
        axis = _moved_unit_axis(func, args, kwargs, before, args[0], result)
        side = None if axis is None else unit_axis_side(axis, result.dim())
        if side is not None:
            self._produced[id(result)] = (weakref.ref(result), None, None, side)
        elif axis is not None and axis > 0:
            self._produced[id(result)] = (weakref.ref(result), None, None, None)
            self._axes[id(result)] = (weakref.ref(result), axis)
        elif func is not _GETITEM and func is not F.layer_norm:  # (a slice changing the rank: not followed)
            self._axes[id(result)] = (weakref.ref(result), None)

    def moved_axis_of(self, tensor: torch.Tensor) -> tuple[bool, int | None] | None:
        """(True, k) for a tensor whose units sit on a middle axis k, (True, None) for one whose layer's
        units a layout op lost (`relayout`), else None."""
        entry = self._axes.get(id(tensor))
        if entry is None or entry[0]() is not tensor:
            return None
        return True, entry[1]

    def rows_of(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The tokens (flat indices b·tokens + t) of a tensor's rows inside a mixture of experts, or None."""
        entry = self._rows.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def seed_rows(self, block: str, args: tuple) -> None:
        """A mixture of experts' block begins: its inputs that hold the token mask's positions ([B, T, …]
        or rows [B·T, …], in an order the probe knows) get their rows' tokens, followed from here."""
        mask = self.registry.mask_for(block)
        if type(mask) is not PositionMask:  # no token mask (nothing to leave out), or a pixel mask
            return
        for value in args:
            if not isinstance(value, torch.Tensor) or value.dim() < 2 or self.rows_of(value) is not None:
                continue
            hint = self.alignment_of(value) if self._aligned else None
            if hint is None and self._flat:
                hint = self.flat_order(value)
            layout = mask.layout(value, -1, hint)
            if layout is None or (hint is None and mask.ambiguous(value, -1)):
                continue
            tokens = torch.arange(mask.batch * mask.tokens, device=value.device).view(mask.batch, mask.tokens)
            rows = {
                TOKEN_ROWS: tokens,
                TOKENS_FIRST: tokens.t(),
                TOKEN_FLAT: tokens.reshape(-1),
                TOKEN_FLAT_TIME_MAJOR: tokens.t().reshape(-1),
            }.get(layout)
            if rows is not None:
                self._rows[id(value)] = (weakref.ref(value), rows)

    def carry_rows(self, func, args: tuple, kwargs: dict, out) -> None:
        """Follow the rows' tokens through `func` (probe.experts.carried_rows)."""
        for tensor, rows in carried_rows(func, args, kwargs, out, self.rows_of):
            self._rows[id(tensor)] = (weakref.ref(tensor), rows)

    def routed_rows(self, name: str, pre: torch.Tensor) -> PositionMask | None:
        """The mask of the call at site `name` when it runs inside one expert of a mixture of experts under
        a token mask: the rows of kept tokens (RoutedRows), or RowsNotAttributed where the rows' tokens
        were lost on the way (counted, said, gated); None elsewhere (the site's mask as it is)."""
        if not name.startswith(self.expert_paths):
            return None
        mask = self.registry.mask_for(name)
        if type(mask) is not PositionMask:
            return None
        rows = self.rows_of(pre)
        if rows is not None and rows.dim() in (1, 2):
            return RoutedRows(mask.mask.reshape(-1).to(rows.device)[rows])
        if mask.all_kept or mask.layout(pre, -1) not in (None, TOKEN_FLAT, TOKEN_FLAT_TIME_MAJOR):
            return None  # every row a real token's, or an expert run on every token ([B, T, …]): as it is
        return RowsNotAttributed()

    def relayout_einsum(self, args: tuple, result: torch.Tensor) -> None:
        """An einsum of one operand that only reorders its axes (`"nchw->nhwc"`) moves the unit axis as
        the permute it is."""
        operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
        dims = einsum_permutation(args[0]) if args else None
        if dims is None or len(operands) != 1 or not isinstance(operands[0], torch.Tensor):
            return
        if len(dims) == operands[0].dim():
            self.relayout(torch.permute, (operands[0], dims), {}, result)

    def attach(self) -> list:
        """Register the hooks; returns their handles (see `attached` for the usual, scoped use)."""
        handles = []
        for module in self.model.modules():
            if isinstance(module, torch.jit.ScriptModule):  # takes no hooks; its code is in `hidden`
                continue
            handles.append(module.register_forward_pre_hook(self.enter_module))
            handles.append(module.register_forward_hook(self.leave_module, always_call=True))
        return handles

    def attach_global(
        self,
        outer_enter: Callable[[nn.Module, tuple], None] | None = None,
        outer_leave: Callable[[nn.Module], None] | None = None,
    ) -> list:
        """The same hooks as `attach`, as one pair of global module hooks: adding and removing them costs
        the same for any model (a training loop's sampled step adds them each time), and a module call
        pays about half of what two hooks of its own cost. They act on the modules below the root only:
        the caller enters and leaves the root itself (`enter_module` / `leave_module` from its own root
        hooks, which see the forward's keyword arguments). A module of the model called while no forward
        is under way (not inside the root's: `model.encoder(x)` on its own) is announced to
        `outer_enter(module, args)` before it is entered, and to `outer_leave(module)` once it is left.
        Returns the handles."""
        root = id(self.model)
        enter, leave = self.enter_module, self.leave_module
        foreign: set[int] = set()  # modules of other models seen since the names were last taken

        def ours(key: int) -> bool:
            if key in self._module_names:
                return key != root  # the caller's own root hooks enter and leave the root
            if not self._stack or key in foreign:  # outside the model's forward: another model's module
                return False
            # a module the names do not know, called inside the model's forward: the model changed since
            # (a submodule added or replaced), or it calls a module it does not own; the names are taken
            # again here, once, rather than walking every module on each attach (O(modules) per step)
            self._module_names = module_names(self.model)
            foreign.clear()
            if key in self._module_names:
                return True
            foreign.add(key)
            return False

        def pre(module, args):
            if ours(id(module)):  # modules of other models are left alone
                if outer_enter is not None and not self._stack:
                    outer_enter(module, args)
                enter(module, args)

        def post(module, args, output):
            if ours(id(module)):
                leave(module, args, output)
                if outer_leave is not None and not self._stack:
                    outer_leave(module)

        return [
            register_module_forward_pre_hook(pre),
            register_module_forward_hook(post, always_call=True),
        ]

    @contextlib.contextmanager
    def attached(self) -> Iterator[EagerProbe]:
        handles = []
        was_training = {m: m.training for m in self.model.modules()}
        try:
            handles = self.attach()
            self.model.eval()
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for module, mode in was_training.items():
                module.train(mode)

    def set_position_mask(
        self, mask: torch.Tensor | None, scoped: dict[str, torch.Tensor | None] | None = None
    ) -> None:
        """Count only the token positions where `mask` is true in the forward passes that follow.

        `mask` is a bool (or 0/1) tensor [batch, tokens] for the next batch, e.g. the batch's
        attention_mask (padding dropped), possibly with BOS positions cleared; None counts every
        position. Sites whose tensor has the token axis — [B, T, ..., units] or the same flattened
        to [B*T, ..., units] — count kept positions only, exactly (elements_per_unit grows by the kept
        count); other sites (pooled [B, F], conv [N, C, H, W]) count every element and are marked
        `extra["position_mask"] = "no token axis"`. Set it before each batch's forward (a training
        loop's `watch()` can call it per step); it stays until replaced. `scoped`: the sites under a
        module path get their own mask (a speech encoder's frames, an encoder-decoder's decoder)."""
        self.registry.set_position_mask(mask, scoped)

    def restart_counts(self) -> None:
        """Fresh counters (a new window of a training run); module names and function tables are kept."""
        self.registry.restart()

    def begin_forward(self) -> None:
        self._namer.reset()
        self._rows.clear()
        self._stack.clear()
        self._produced.clear()
        self._sources.clear()
        self._site_outputs.clear()
        self._joins.clear()
        self._per_position.clear()
        self._aligned.clear()
        self._flat.clear()
        self._zeros.clear()
        self._positives.clear()
        self._computed.clear()
        self._stored_ids = None  # read again when a spelling needs it (a .to() replaces buffers)
        self._stored_seen.clear()

    def mode(self) -> TorchFunctionMode:
        return _CallSiteMode(self)

    def run(self, inputs: tuple, kwargs: dict | None = None):
        """One forward pass under the call-site mode."""
        self.begin_forward()
        self.note_inputs(inputs, kwargs or {})
        compiler_loaded = "torch._dynamo" in sys.modules  # importing it costs seconds: only when loaded
        with self._eager_stance(compiler_loaded), _CallSiteMode(self):
            out = self.model(*inputs, **(kwargs or {}))
        if not compiler_loaded and "torch._dynamo" in sys.modules:
            # the forward compiled code (torch.cond's first call loads the compiler): what it ran is
            # unseen; once more, eagerly and uncounted, so that run_higher_order names what it hid
            recording, self.recording = self.recording, False
            try:
                self.begin_forward()
                with self._eager_stance(True), _CallSiteMode(self):
                    self.model(*inputs, **(kwargs or {}))
            finally:
                self.recording = recording
        for leaf in torch.utils._pytree.tree_leaves(out):  # an activation returned as the model's output
            if isinstance(leaf, torch.Tensor) and self.site_of(leaf) is not None:
                self.final_output_sites.add(self.site_of(leaf))
        return out

    # -- recording -----------------------------------------------------------------------------
    def _current_module(self) -> tuple[str, nn.Module, bool]:
        path, module = self._stack[-1] if self._stack else ("", self.model)
        kind = type(module)
        is_activation = self._activation_types.get(kind)
        if is_activation is None:
            is_activation = self._activation_types[kind] = is_activation_module_type(
                f"{kind.__module__}.{kind.__qualname__}"
            )
        return path, module, is_activation

    def next_site_name(self, op: str) -> str:
        path, _, is_activation = self._current_module()
        return self._namer.name(path, op, is_activation)

    def _site_facts(self, pre: torch.Tensor) -> tuple[int, str, str | None, bool, bool]:
        """(inferred unit axis, module type, producer (a per-unit bias, or a bias-free Linear/Conv) or None,
        whether a layer told the unit axis, whether a layout op lost a layer's units) of a site's input."""
        _, module, is_activation = self._current_module()
        origin = self.origin_of(pre)
        producer_name, producer, channel_first = origin or (None, None, None)
        moved = self.moved_axis_of(pre)
        inferred = infer_channel_dim(pre.dim(), channel_first, moved[1] if moved else None)
        units = pre.shape[inferred] if pre.dim() > 1 else pre.shape[0]
        bias = getattr(producer, "bias", None) if producer is not None else None
        weight = getattr(producer, "weight", None) if bias is None else None
        if (
            not (isinstance(bias, torch.Tensor) and bias.dim() == 1 and bias.shape[0] == units)
            and not (
                # bias=False (T5, LLaMA-style MLPs): a Linear/Conv whose rows are the units still makes them
                isinstance(producer, (torch.nn.Linear, torch.nn.modules.conv._ConvNd))
                and isinstance(weight, torch.Tensor)
                and weight.shape[0] == units
            )
            and not (  # an affine=False BatchNorm: no beta, but its per-unit mean and variance make the units
                isinstance(producer, nn.modules.batchnorm._BatchNorm)
                and isinstance(producer.running_mean, torch.Tensor)
                and producer.running_mean.shape == (units,)
            )
        ):
            producer_name = None
        module_type = type(module).__name__ if is_activation else "functional"
        lost = moved is not None and moved[1] is None
        return inferred, module_type, producer_name, origin is not None, lost

    def _note_source(self, name: str, pre: torch.Tensor) -> None:
        source = self._sources.get(id(pre))
        if source is not None and source[0]() is pre:
            self.shift_sources[name] = source[1]

    def observe(self, name: str, op: str, pre: torch.Tensor) -> None:
        self._hint(name, pre)
        self.registry.record_pre(name, op, pre, *self._site_facts(pre))

    def _hint(self, name: str, pre: torch.Tensor) -> None:
        """What the registry is told before a site's batch: where the tensor came from, and what the
        model did to the token ids' axes or its module says of the layout (a token mask reads them)."""
        self._note_source(name, pre)
        self.registry.call_hint = self.alignment_of(pre) if self._aligned else None
        if self.registry.call_hint is None and self._flat:
            self.registry.call_hint = self.flat_order(pre)
        if name not in self.registry.layout_hints:  # once per site: its module's own word on the layout
            self.registry.layout_hints[name] = self._time_major_hint()

    def _time_major_hint(self) -> bool | None:
        """Whether the running site's tensors are [T, B, ...]: inside torch's nn.TransformerEncoderLayer /
        nn.TransformerDecoderLayer, as its attention's `batch_first` says (False: [T, B, E]); None elsewhere
        (where a batch of as many samples as tokens leaves the shape ambiguous, another batch decides)."""
        for _, module in reversed(self._stack):
            if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
                first = getattr(getattr(module, "self_attn", None), "batch_first", None)
                return None if first is None else not first
        return None

    def note_per_position(self, func, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        """Remember `out` as one value per position (no units) when `func` reduced its input over the unit
        axis (probe.base.reduces_unit_axis), or is an elementwise op of such a value (`h.sum(-1) - m`) that
        it does not widen: `h - h.mean(-1, keepdim=True)` broadcasts back to h's units (a centred layer)."""
        if func in self.pass_through or func in PER_POSITION_ELEMENTWISE:
            if not self._per_position:
                return
            operands = (*args, *kwargs.values())
            if any(per_position_operand(a, out, self.per_position) for a in operands):
                self._per_position[id(out)] = weakref.ref(out)
            return
        if func in REDUCTIONS:
            origin = self.origin_of(args[0])
            if reduces_unit_axis(func, args, kwargs, origin[2] if origin else None):
                self._per_position[id(out)] = weakref.ref(out)

    def note_inputs(self, args: tuple, kwargs: dict) -> None:
        """At the start of a forward whose position mask has as many samples as tokens (where a site's
        [T, B, ...] and [B, T, ...] have one shape): its inputs of the mask's shape whose values say how they
        are laid out (PositionMask.reading: the mask itself, token ids padded with one id, batch-first or
        time-major) are marked so; what descends from them is followed
        (`carry_alignment`) to tell a site's layout by what the model did, not by its shape."""
        if "" in self.expert_blocks:  # the model is a mixture of experts' block: its inputs by keyword too
            self.seed_rows("", tuple(torch.utils._pytree.tree_leaves((args, kwargs))))
        mask = self.registry.position_mask
        if mask is None or mask.batch != mask.tokens or mask.batch < 2 or mask.symmetric:
            return
        for value in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(value, torch.Tensor) and tuple(value.shape) == (mask.batch, mask.tokens):
                # its layout by its values (the mask itself, or ids padded with one id), never by its shape:
                # time-major ids [T, B] (fairseq-style) have the mask's shape too
                time_major = mask.reading(value)
                if time_major is not None:
                    self._aligned[id(value)] = (weakref.ref(value), time_major)

    def alignment_of(self, tensor: torch.Tensor) -> bool | None:
        """Whether the tensor is [T, B, ...] (True) or [B, T, ...] (False) by descent (note_inputs), or None."""
        entry = self._aligned.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def carry_alignment(self, func, args: tuple, kwargs: dict, out) -> None:
        """`out` is laid out as the operand it came from when its first two axes are that operand's
        (elementwise ops, Linear, embedding, norms, views that keep them); a transpose of those two
        turns [B, T] into [T, B]; any other move of them, or other sizes there, ends the trail."""
        if not isinstance(out, torch.Tensor) or out.dim() < 2:
            return
        source, mark = None, None
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and (found := self.alignment_of(value)) is not None:
                source, mark = value, found
                break
        if source is None:
            return
        if func in _AXIS_MOVES:
            lead = _lead_axes_after(func, args, kwargs) if args and args[0] is source else None
            if lead == (1, 0):
                mark = not mark
            elif lead != (0, 1):
                return
        elif tuple(out.shape[:2]) != tuple(source.shape[:2]) or source.dim() < 2:
            return
        elif func in _LEFT_OPERAND_LEAD:
            if not (args and args[0] is source and source.dim() >= 3):
                return
        elif not (
            func in _KEEPS_LEAD_AXES
            or func in self.pass_through
            or func in PER_POSITION_ELEMENTWISE
            or func in self.functions  # the activations (a site's own call)
        ):
            return  # an op that may move the first two axes with their sizes (einsum, `.T`): no trail
        self._aligned[id(out)] = (weakref.ref(out), mark)

    def note_flatten(self, args: tuple, out) -> None:
        """A view/reshape/flatten of a [B, T, ...] or [T, B, ...] tensor into rows [B*T, ...]: which of
        the two it was (its shape where B != T, else its descent from the token ids) says the rows' order
        (sample-major b*T + t, or time-major t*B + b), which the rows' own shape never says."""
        mask = self.registry.position_mask
        if mask is None or mask.batch < 2 or not isinstance(out, torch.Tensor) or not args:
            return
        source, (batch, tokens) = args[0], (mask.batch, mask.tokens)
        if not isinstance(source, torch.Tensor) or source.dim() < 3 or out.dim() < 2:
            return
        if out.shape[0] != batch * tokens or tuple(out.shape[1:]) != tuple(source.shape[2:]):
            return
        time_major = self.alignment_of(source)
        if time_major is None and batch != tokens:
            lead = tuple(source.shape[:2])
            time_major = True if lead == (tokens, batch) else False if lead == (batch, tokens) else None
        if time_major is not None:
            self._flat[id(out)] = (weakref.ref(out), time_major)

    def flat_order(self, tensor: torch.Tensor) -> bool | None:
        """Whether the tensor's rows are a flattened [T, B, ...] (True) or [B, T, ...] (False), or None."""
        entry = self._flat.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def carry_flat(self, func, args: tuple, kwargs: dict, out) -> None:
        """`out` keeps an operand's row order when it keeps its rows (Linear, elementwise ops, norms)."""
        if not isinstance(out, torch.Tensor) or out.dim() < 1 or func in _AXIS_MOVES:
            return
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and (found := self.flat_order(value)) is not None:
                if value.dim() >= 1 and out.shape[0] == value.shape[0]:
                    self._flat[id(out)] = (weakref.ref(out), found)
                return

    def per_position(self, tensor: torch.Tensor) -> bool:
        entry = self._per_position.get(id(tensor))
        return entry is not None and entry() is tensor

    def note_made(self, func, args: tuple, kwargs: dict, out) -> None:
        """Keep track of the zeros a forward makes (and their copies) and of its `x > 0` masks: what a
        ReLU spelled with a maximum or a select is made of (`spelled_relu`)."""
        if not isinstance(out, torch.Tensor):
            return
        if func in _LAST_AXIS_MAKERS:
            self._produced[id(out)] = (weakref.ref(out), None, None, False)
            self.note_computed(func, args, kwargs, out)
        elif func in _ZERO_MAKERS:
            index = _ZERO_MAKERS[func]
            fill = kwargs.get("fill_value", args[index] if index is not None and len(args) > index else None)
            if (
                index is None
                or is_zero_number(fill)
                or (isinstance(fill, torch.Tensor) and fill.dim() == 0 and self.is_zeros(fill))
            ):
                self._zeros[id(out)] = (weakref.ref(out), _version(out))
        elif func in _VALUE_COPIES:
            if args and isinstance(args[0], torch.Tensor) and self.is_zeros(args[0]):
                self._zeros[id(out)] = (weakref.ref(out), _version(out))
            elif args and self._sign_mask(args[0], None) is not None:  # (x > 0).float(): the mask, cast
                entry = self._positives[id(args[0])]
                self._positives[id(out)] = (weakref.ref(out), _version(out), *entry[2:])
        elif func in _NEGATIONS:  # ~(x > 0): true where x <= 0 (and at NaN)
            if args and self._sign_mask(args[0], None) is not None and out.dtype == torch.bool:
                entry = self._positives[id(args[0])]
                remake = entry[6]
                self._positives[id(out)] = (
                    weakref.ref(out),
                    _version(out),
                    *entry[2:4],
                    not entry[4],
                    entry[5],
                    lambda t: ~remake(t).bool(),
                )
        elif (
            func in _COMPARES
            and len(args) == 2
            and isinstance(args[0], torch.Tensor)
            and self.is_zeros(args[1])
        ):
            x = args[0]  # x > 0, x >= 0, x < 0, x <= 0 (is x > 0 where the mask is true)
            self._positives[id(out)] = (
                weakref.ref(out),
                _version(out),
                weakref.ref(x),
                _version(x),
                _COMPARES[func],
                self._call_of(x),
                lambda t, compare=func, zero=args[1]: compare(t, zero),
            )

    def note_computed(self, what, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        """Remember that a layer (a module, or a function such as F.linear), or an elementwise op on a
        layer's output, computed `out` from `args`: its call (`_call_of`)."""
        operands, others = [], []
        for key, value in (*((None, a) for a in args), *kwargs.items()):
            if isinstance(value, torch.Tensor):
                # a tensor computed so: its own call (it may be freed before the one compared with it
                # is made: conv(x) before bn(conv(x))); else the tensor itself
                operands.append(self._call_of(value) or weakref.ref(value))
                others.append(key)
            elif _plain(value):
                others.append((key, value))
            else:  # (a list of tensors, an object): not compared
                return
        self._computed[id(out)] = (weakref.ref(out), (id(what), tuple(operands), tuple(others)))

    def computed(self, tensor: torch.Tensor) -> bool:
        """Whether a call computed `tensor` (note_computed): an op on it is kept as a call too."""
        return bool(self._computed) and self._call_of(tensor) is not None

    def note_scaled(self, func, tensor: torch.Tensor, number, out: torch.Tensor) -> None:
        """`out = func(tensor, number)` (`fc(h) * 2`, `fc(h) + 1`): a call of its own when `tensor` is one,
        as note_computed keeps it, in the form of the most frequent case, at a third of its cost."""
        call = self._call_of(tensor) if self._computed else None
        if call is not None:
            self._computed[id(out)] = (weakref.ref(out), (id(func), (call,), (None, (None, number))))

    def _call_of(self, tensor: torch.Tensor) -> tuple | None:
        """(what, its operands, its other arguments) of the call that computed `tensor` (note_computed)."""
        entry = self._computed.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def _same_call(self, call: tuple | None, tensor: torch.Tensor) -> bool:
        """Whether `tensor` was computed by a call like `call` (_call_of): the same layer or op on the
        same tensors (or on tensors computed alike again), with the same other arguments."""
        return call is not None and _same_key(call, self._call_of(tensor), 64)

    def _sign_mask(self, value, x) -> bool | None:
        """Whether the mask `value` is true where x > 0 (True: `x > 0`, `x >= 0`) or where x <= 0 (False:
        `x < 0`, `x <= 0`), for a mask this forward made by comparing x with 0 (note_made) — or the output
        of another call of the layer that made x on the same tensors, with the values to match
        (`torch.where(fc(h) > 0, fc(h), 0)`: probe.ops, above same_computation) — neither written since;
        None for any other mask. `x` None: whether `value` is such a mask of anything."""
        entry = self._positives.get(id(value)) if isinstance(value, torch.Tensor) else None
        if entry is None or entry[0]() is not value:
            return None
        if x is None:
            return entry[4] if entry[1] is None or entry[1] == _version(value) else None
        tested = entry[2]()
        if not isinstance(x, torch.Tensor) or (tested is not x and not self._same_call(entry[5], x)):
            return None
        if tested is x and None not in (entry[1], entry[3]):
            return entry[4] if (entry[1], entry[3]) == (_version(value), _version(x)) else None
        # inference tensors (no versions: see is_zeros), or another call's output: the mask read
        if value.shape != x.shape or not torch.equal(value.bool(), entry[6](x).bool()):
            return None
        return entry[4]

    def is_zeros(self, value) -> bool:
        """A 0, or a tensor of zeros in every forward: made by a zero factory in this one (or copied from
        such). A parameter or buffer is none, zeros or not: its values are the checkpoint's, not the code's
        (and an export tracing the probe could not read them)."""
        if not isinstance(value, torch.Tensor):
            return is_zero_number(value)
        entry = self._zeros.get(id(value))
        if entry is None or entry[0]() is not value:
            return False
        # `zeros += 0.5`, `zeros[:2] = 1`: written in place since it was made, no longer zeros (an
        # inference tensor counts no versions: its values are read, no export traces it)
        return _version(value) == entry[1] if entry[1] is not None else not bool(value.any())

    def spelled_relu(self, func, args: tuple, kwargs: dict) -> tuple[Callable, tuple, dict] | None:
        """For `maximum(x, Z)` / `max(x, Z)` / `where(x > 0, x, Z)` / `where(x <= 0, Z, x)` /
        `x.masked_fill(x < 0, 0)` / `x * (x > 0)` that compute relu(x) (Z: zeros that do not widen x;
        probe.ops; `>=`, `<` alike; the mask of a product may be cast to x's type): the call as a function
        of x alone, with (x,) and {}; else None. The same spelling with a parameter or buffer of zeros
        after a layer is no site, and is named in `hidden` (probe.ops.stored_zeros_label)."""
        found = self._spelling(func, args, kwargs, self.is_zeros)
        if found is None:
            if (
                self.recording
                and func not in _PRODUCTS  # a product takes no zeros
                and self._spelling(func, args, kwargs, self._stored_zeros) is not None
            ):
                label = stored_zeros_label(self._current_module()[0], getattr(func, "__name__", "maximum"))
                self._stored_seen[label] += 1  # as many as one forward ran, as the graphs count nodes
                self.hidden[label] = max(self.hidden[label], self._stored_seen[label])
            return None

        def spelled(_x: torch.Tensor):
            return func(*args, **kwargs)

        return spelled, (found,), {}

    def _stored_zeros(self, value) -> bool:
        """A parameter or buffer of the model that holds zeros now (no ReLU's Z: see spelled_relu)."""
        if self._stored_ids is None:
            self._stored_ids = {id(t) for t in (*self.model.parameters(), *self.model.buffers())}
        if not isinstance(value, torch.Tensor) or id(value) not in self._stored_ids:
            return False
        return not value.is_meta and not bool(value.any())

    def _spelling(self, func, args: tuple, kwargs: dict, is_zeros: Callable) -> torch.Tensor | None:
        """x of a ReLU spelled with a maximum, a select, a masked fill or a product (spelled_relu) whose
        zeros pass `is_zeros`, after a layer; else None."""
        if func in _MAXIMA:
            if set(kwargs) - {"other"}:
                return None
            given = (*args, kwargs["other"]) if "other" in kwargs else args
            if len(given) != 2 or not all(isinstance(a, torch.Tensor) for a in given):
                return None  # max(x, dim): a reduction
            x, zeros = given if is_zeros(given[1]) else given[::-1]
            if not is_zeros(zeros):
                return None
        elif func in _TENSOR_CLAMPS:
            names = (
                ("min",)
                if func in (torch.clamp_min, torch.Tensor.clamp_min, torch.Tensor.clamp_min_)
                else ("min", "max")
            )
            bounds = dict(zip(names, args[1:], strict=False)) | kwargs
            x, zeros = (args[0] if args else None), bounds.get("min")
            if set(bounds) - set(names) or bounds.get("max") is not None:
                return None
            if not isinstance(zeros, torch.Tensor) or not is_zeros(zeros):
                return None  # a number bound (clamp(x, min=0)): the clamp site's own path
        elif not self._positives or kwargs:
            return None  # no comparison with 0 in this forward: no mask to spell a ReLU with
        elif func in _SELECTS and len(args) == 3:
            cond, a, b = args if func is torch.where else (args[1], args[0], args[2])
            keeps = self._sign_mask(cond, None)
            if keeps is None:
                return None
            x, zeros = (a, b) if keeps else (b, a)
            if self._sign_mask(cond, x) is None or not is_zeros(zeros):  # not x's own `x > 0`
                return None
        elif func in _MASKED_FILLS and len(args) == 3:
            x, zeros = args[0], args[2]
            if self._sign_mask(args[1], x) is not False or not is_zeros(zeros):
                return None
        elif func in _PRODUCTS and len(args) == 2 and is_zeros == self.is_zeros:
            for x, mask in (args, args[::-1]) if func is not torch.Tensor.mul_ else (args,):
                # (in place: x.mul_(x > 0) only, which writes x)
                if self._sign_mask(mask, x) is True:
                    break
            else:
                return None
            zeros = mask  # no zeros: what the result's type and shape must keep is the mask's
        else:
            return None
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or self.origin_of(x) is None:
            return None  # of no layer's output (a reduction: an observer's min/max): an ordinary op
        shape = zeros.shape if isinstance(zeros, torch.Tensor) else ()
        if not zeros_fit(x.shape, shape) or not keeps_dtype(x, zeros):
            return None  # widened by the zeros, or promoted: not x's values clamped
        return x

    def clamp_is_layer(self, pre, op: str) -> bool:
        """Whether a clamp with a ReLU's bounds is a layer (probe.ops.clamp_is_layer; not when it clamps a
        reduction over the units, `per_position`); one that is not still takes its number in the names,
        as the graph probes number it."""
        if not isinstance(pre, torch.Tensor):
            return False
        origin = self.origin_of(pre)
        unit_axis = infer_channel_dim(pre.dim(), origin[2] if origin else None) if pre.dim() else None
        if not self.per_position(pre) and clamp_is_layer(tuple(pre.shape), unit_axis, origin is not None):
            return True
        if op in self.settings.ops and pre.is_floating_point():  # as a float site would have been
            self.next_site_name(op)
        return False

    def note_unscanned(self, op: str) -> None:
        """An activation call of an op --ops did not ask for: its call site's name, kept per op (each
        forward names it alike) so that the report says how many layers were not scanned."""
        self._unscanned.setdefault(op, set()).add(self.next_site_name(op))

    @property
    def unscanned(self) -> dict[str, int]:
        return {op: len(names) for op, names in self._unscanned.items()}

    def note_hidden(self, site: str, what: str, op: str) -> None:
        """A site the probe runs but cannot count (an int8 kernel): named in `hidden`, once."""
        self.hidden[hidden_label(site, what, op)] = 1

    @staticmethod
    def _eager_stance(compiler_loaded: bool):
        """torch.cond runs its branches in a compiled graph that no mode sees into; under the force_eager
        stance it reaches the mode as an operator (run_higher_order), as a watched training step's code does."""
        set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
        return set_stance("force_eager") if compiler_loaded and set_stance else contextlib.nullcontext()

    def run_higher_order(self, func, args: tuple, kwargs: dict):
        """Run torch.cond & co. as they run eagerly, counting the activations of the code they call:
        those are named in `hidden` (per call site, the most one forward ran), not counted per unit (the
        branch that ran depends on the batch, and the graph formats cannot see into them either)."""
        name = getattr(func, "__name__", str(func))
        counter = _ActivationCounter(self.functions, self.pass_through)
        with counter:
            if name == "cond" and len(args) == 4 and not kwargs:  # cond(pred, true_fn, false_fn, operands)
                pred, true_fn, false_fn, operands = args
                out = (true_fn if bool(pred) else false_fn)(*operands)
            else:
                out = func(*args, **kwargs)
        path = self._stack[-1][0] if self._stack else ""
        for op, count in counter.counts.items():
            if op in self.settings.ops:
                key = hidden_label(path, f"torch.{name}", op)
                self.hidden[key] = max(self.hidden[key], count)
        if name != "cond":
            self.hidden[f"{path or '<model>'}: torch.{name} (not read)"] = 1
        return out

    def run_in_parts(self, name: str, op: str, pre: torch.Tensor, in_place: bool) -> torch.Tensor | None:
        """The relu run and counted slice by slice (SiteRegistry.run_relu_in_parts), or None."""
        if not counted_while_running(pre):
            return None
        self._hint(name, pre)
        return self.registry.run_relu_in_parts(name, op, pre, in_place, *self._site_facts(pre))
