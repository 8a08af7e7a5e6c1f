"""Probe for torch.export ExportedPrograms: the FX graph is rewritten so that each activation node
calls a recorder, so the site is known by node identity (exact, and compatible with torch.compile).
Names follow the eager rules, using each node's `nn_module_stack`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import fx

from deadrelu_cli.probe.aten_ops import (
    CHANNEL_FIRST,
    FAKE_QUANT,
    LAST_DIM,
    LAYOUT,
    PASS_THROUGH,
    PER_POSITION_OPS,
    RESHAPES,
    UNIT_REDUCTIONS,
    VIEWS,
)
from deadrelu_cli.probe.base import (
    SQUEEZES,
    ProbeSettings,
    SiteRegistry,
    einsum_permutation,
    infer_channel_dim,
    relaid_units,
    run_static_site,
)
from deadrelu_cli.probe.hidden import SPELLED_RELU, STORED_ZEROS_RELU, graph_hidden, prepare_graph
from deadrelu_cli.probe.ops import (
    NAMED_WHEN_UNSCANNED,
    SiteNamer,
    aten_op_kind,
    clamp_is_layer,
    is_activation_module_type,
    is_clamp_op,
    stored_zeros_label,
    unit_axis_reduced,
)

# Index of the bias argument of each producer op.
_BIAS_ARG = {
    "conv1d": 2,
    "conv2d": 2,
    "conv3d": 2,
    "convolution": 2,
    "_convolution": 2,
    "linear": 2,
    "addmm": 0,
    "batch_norm": 2,
    "_native_batch_norm_legit_no_training": 2,
    "_native_batch_norm_legit": 2,
    "native_batch_norm": 2,
    "layer_norm": 3,
    "group_norm": 3,
    "conv_transpose1d": 2,
    "conv_transpose2d": 2,
    "conv_transpose3d": 2,
}
_BATCH_NORMS = frozenset(name for name in _BIAS_ARG if "batch_norm" in name)


def _attr_named(node, suffix: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr" and str(node.target).endswith(suffix)


# Ops whose weight rows are their output units (not a transposed convolution), bias or not.
_BIAS_FREE_PRODUCERS = frozenset({"linear", "conv1d", "conv2d", "conv3d"})


@dataclass(frozen=True)
class StaticSite:
    """An activation site found in a graph before anything runs."""

    name: str
    op: str
    in_place: bool
    module_type: str
    channel_first: bool | None
    producer: str | None
    clamp: bool = False  # a clamp / threshold with a ReLU's bounds (a layer only by probe.ops.clamp_is_layer)
    # TorchScript: the op spelling a ReLU (maximum / max / where / masked_fill / mul; probe.ops), else ""
    spelled: str = ""
    units: int | None = None  # TorchScript, spelled: the producer module's units (checked at run time)
    # TorchScript: the reductions (dim, keepdim, channel_first) a clamp's input may be one value per position
    # of (no layer); its rank is known at run time only, where probe.ops.reduced_over_units decides
    per_position: tuple = ()
    # units a layout op moved to a middle axis of a rank >= 4 tensor (probe.base.relaid_units) ...
    unit_axis: int | None = None
    # ... or where the walk lost them (a layer made them): counted on a guessed axis, said and gated
    axis_lost: bool = False


class Units(NamedTuple):
    """What the walk back from an activation tells of its units (probe.base.relaid_units)."""

    channel_first: bool | None
    producer: str | None
    unit_axis: int | None = None  # a middle axis
    lost: bool = False  # a layer made them, a layout op on the way moved them where the walk lost them


def op_base(target) -> str:
    if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return target.__name__.split(".")[0]
    if target is __import__("operator").getitem:
        return "getitem"
    return getattr(target, "__name__", str(target))


def _trace_producer(node: fx.Node, pre: fx.Node | None = None) -> Units:
    """Walk back from an activation's input (`pre`, else its first argument) to the op that produced it.

    The unit axis follows any elementwise op; the bias only ops whose other operands are scalars
    (x + y of two tensors has no single bias). The eager probe applies the same rule.
    """
    seen = 0
    keep_producer = True
    viewed = False  # through a reshape that keeps the last axis: only a last-axis producer fits
    layouts: list[tuple[str, tuple]] = []  # transposes, permutes, slices on the way (nearest first)
    view_layout: tuple[str, tuple] | None = None
    producer_rank: int | None = None  # the rank the layout op nearest the producer reads
    current = pre if pre is not None else node.args[0] if node.args else None
    while isinstance(current, fx.Node) and seen < 32:
        seen += 1
        base = op_base(current.target) if current.op == "call_function" else ""
        if base in FAKE_QUANT and current.args and isinstance(current.args[0], fx.Node):
            current = current.args[0]  # QAT's fake quant: the units and the producer stay
            continue
        if base in VIEWS and not layouts and not viewed and keeps_last_axis(current):
            viewed = True  # a decomposed Linear: addmm / mm on rows, viewed back to [B, T, F]
            view_layout = _reshape_layout(current)  # (a conv's [N, C, 1, W] viewed as [N, C, W])
            current = current.args[0]
            continue
        if base in RESHAPES and current.args and isinstance(current.args[0], fx.Node):
            layout = _reshape_layout(current)  # None: shapes not traced, where the units went is not known
            layouts.append(layout if layout is not None else ("lost", ()))
            keep_producer = False
            producer_rank = len(layout[1][0]) if layout is not None else None
            current = current.args[0]
            continue
        if base == "add" and keep_producer and _lora_update(current):
            current = current.args[0]  # base_layer(x) + lora_B(lora_A(x)) * scaling: the base's units
            continue
        if base in SQUEEZES and current.args and isinstance(current.args[0], fx.Node):
            layout = _reshape_layout(current)  # read by shapes: a squeeze of a dim not of size 1 is none
            layouts.append(layout if layout is not None else ("lost", ()))
            producer_rank = len(layout[1][0]) if layout is not None else None
            keep_producer = False
            current = current.args[0]
            continue
        if base == "einsum" and len(current.args) == 2 and len(current.args[1]) == 1:
            dims = einsum_permutation(current.args[0])  # "nchw->nhwc": a permute
            source = current.args[1][0]
            value = source.meta.get("val") if isinstance(source, fx.Node) else None
            if dims is None or not isinstance(value, torch.Tensor) or value.dim() != len(dims):
                break
            producer_rank = value.dim()
            layouts.append(("permute", dims))
            keep_producer = False
            current = source
            continue
        if base in LAYOUT and current.args and isinstance(current.args[0], fx.Node):
            value, source = current.meta.get("val"), current.args[0].meta.get("val")
            if not isinstance(value, torch.Tensor) or value.dim() < 3:
                break
            # the rank the layout op reads (a conv's [N, C, H, W] permuted to channels-last: units last)
            producer_rank = source.dim() if isinstance(source, torch.Tensor) else None
            dims = (
                current.args[1]
                if base == "permute"
                else current.args[1:3]
                if base != "slice"
                else current.args[1:2]
            )
            layouts.append((base, tuple(dims) or (0,)))
            keep_producer = False  # the producer's bias no longer sits before the activation alone
            current = current.args[0]
            continue
        if base in CHANNEL_FIRST or base in LAST_DIM:
            if base in ("bmm", "matmul") and any(kind in ("reshape", "lost") for kind, _ in layouts):
                break  # a decomposed einsum's product reshaped back: no layer, as the einsum is none in eager
            if viewed and base in CHANNEL_FIRST:  # not a decomposed Linear: the view moves the units
                layouts.insert(0, view_layout if view_layout is not None else ("lost", ()))
            producer = None
            index = _BIAS_ARG.get(base)
            if keep_producer and index is not None and len(current.args) > index:
                bias = current.args[index]
                if isinstance(bias, fx.Node) and bias.op == "get_attr" and str(bias.target).endswith(".bias"):
                    producer = str(bias.target)[: -len(".bias")]
                mean = current.args[3] if base in _BATCH_NORMS and len(current.args) > 3 else None
                if producer is None and keep_producer and bias is None and _attr_named(mean, ".running_mean"):
                    producer = str(mean.target)[: -len(".running_mean")]  # affine=False: mean and var make it
            weight = current.args[1] if len(current.args) > 1 else None
            if (
                base in ("mm", "addmm")
                and isinstance(weight, fx.Node)
                and op_base(weight.target)
                in (
                    "permute",
                    "t",
                )
            ):  # a decomposed Linear: x @ weight.T
                weight = weight.args[0]
            if (  # a tensor tied to another module's (one tensor, one name in the program): the module
                producer is not None  # the op ran in, where it is the weight's or the bias's name
                and isinstance(weight, fx.Node)
                and weight.op == "get_attr"
                and str(weight.target).endswith(".weight")
                and str(weight.target)[: -len(".weight")] != producer
            ):
                stack = current.meta.get("nn_module_stack") or {}
                path = list(stack.values())[-1][0] if stack else ""
                if path == str(weight.target)[: -len(".weight")]:
                    producer = path
            if (  # bias=False: the Linear/Conv whose weight rows are the units (as the eager probe keeps it)
                producer is None
                and keep_producer
                and (base in _BIAS_FREE_PRODUCERS or (base == "mm" and viewed))
                and (len(current.args) <= 2 or current.args[2] is None)
                and isinstance(weight, fx.Node)
                and weight.op == "get_attr"
                and str(weight.target).endswith(".weight")
            ):
                producer = str(weight.target)[: -len(".weight")]
            side, axis = relaid_units(base in CHANNEL_FIRST, layouts, producer_rank)
            if side is None and axis is None:
                return Units(None, None, None, True)
            return Units(side, producer, axis)
        if base in PASS_THROUGH and current.args and isinstance(current.args[0], fx.Node):
            if base != "getitem" and any(isinstance(a, fx.Node) for a in current.args[1:]):
                keep_producer = False
            current = current.args[0]
            continue
        break
    return Units(None, None)


def _reshape_layout(node: fx.Node) -> tuple[str, tuple] | None:
    """("reshape", (shape before, shape after)) of a view / reshape / flatten / squeeze node from its traced
    example values (symbolic sizes by name), or None when they are not traced."""
    source = node.args[0] if node.args else None
    before = _sizes(source) if isinstance(source, fx.Node) else None
    after = _sizes(node)
    return None if before is None or after is None else ("reshape", (before, after))


def _sizes(node: fx.Node) -> tuple | None:
    """The traced shape, a symbolic size as its expression (products of them compare: `3*s0`)."""
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return None
    return tuple(
        d if isinstance(d, int) else getattr(getattr(d, "node", None), "expr", str(d)) for d in value.shape
    )


def keeps_last_axis(node: fx.Node) -> bool:
    """Whether a view / reshape keeps its input's last axis (rows regrouped: [B*T, F] -> [B, T, F])."""
    source = node.args[0] if node.args else None
    before = source.meta.get("val") if isinstance(source, fx.Node) else None
    after = node.meta.get("val")
    if not (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)):
        return False
    if before.dim() == 0 or after.dim() == 0:
        return False
    try:
        return bool(before.shape[-1] == after.shape[-1])
    except Exception:  # a size the shape environment cannot decide
        return False


def _lora_update(add: fx.Node) -> bool:
    """Whether `add` is a PEFT LoRA layer's `base_layer(x) + lora_B(lora_A(x)) * scaling` (its module is
    peft's, and its second operand is made from a `lora_B` weight): the base layer's bias still adds to each
    unit, so it is the producer, as the eager probe's look-through finds (DoRA rescales the base output
    by a tensor first: not followed, as a `mul` of two tensors keeps no producer)."""
    stack = add.meta.get("nn_module_stack") or {}
    if not stack or len(add.args) != 2 or not all(isinstance(a, fx.Node) for a in add.args):
        return False
    module_cls = list(stack.values())[-1][1]
    qualified = (
        module_cls if isinstance(module_cls, str) else f"{module_cls.__module__}.{module_cls.__qualname__}"
    )
    if not qualified.startswith("peft.tuners.lora"):
        return False
    pending, seen = [add.args[1]], 0
    while pending and seen < 16:
        current = pending.pop()
        seen += 1
        if not isinstance(current, fx.Node):
            continue
        if current.op == "get_attr" and ".lora_B." in f".{current.target}":
            return True
        if current.op == "call_function":
            pending.extend(a for a in current.args if isinstance(a, fx.Node))
    return False


def shift_source(node: fx.Node) -> str | None:
    """The module whose bias a pre-activation still holds through elementwise ops with tensor operands
    too (`scale * fc(x)`, `fc(x) + x`), when exactly one such producer is found: bias-shift's candidate,
    as the eager probe's `shift_sources` (whether a move of it is a shift is measured by the fix)."""
    found: set[str] = set()
    stack, seen = [node.args[0]] if node.args else [], 0
    while stack and seen < 64:
        current = stack.pop()
        seen += 1
        if not isinstance(current, fx.Node) or current.op != "call_function":
            continue
        base = op_base(current.target)
        index = _BIAS_ARG.get(base)
        if index is not None:
            bias = current.args[index] if len(current.args) > index else None
            if _attr_named(bias, ".bias"):
                found.add(str(bias.target)[: -len(".bias")])
            continue
        if base in PASS_THROUGH:
            stack.extend(arg for arg in current.args if isinstance(arg, fx.Node))
        elif (base in FAKE_QUANT or (base in VIEWS and keeps_last_axis(current))) and current.args:
            stack.append(current.args[0])
    return found.pop() if len(found) == 1 else None


def _per_position(value: object) -> bool:
    """Whether a graph value is one per position, no units: a reduction over the unit axis
    (probe.base.unit_axis_reduced), or an elementwise op of one (`h.sum(-1) - m`), as the eager probe
    marks them (EagerProbe.note_per_position). An operand broadcast to more values than the op's output
    holds (`h - h.mean(-1, keepdim=True)`: back over h's units, a centred layer) is not followed."""
    stack, seen = [value], 0
    while stack and seen < 32:
        node, seen = stack.pop(), seen + 1
        if not isinstance(node, fx.Node) or node.op != "call_function" or not node.args:
            continue
        base = op_base(node.target)
        where = UNIT_REDUCTIONS.get(base)
        if where is not None:
            source = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
            dim = node.args[where] if len(node.args) > where else node.kwargs.get("dim")
            if isinstance(source, torch.Tensor) and unit_axis_reduced(
                source.dim(), dim, _trace_producer(node)[0]
            ):
                return True
        elif base in PASS_THROUGH or base in PER_POSITION_OPS:
            shape = _shape(node)
            stack.extend(
                arg
                for arg in node.args
                if isinstance(arg, fx.Node) and (shape is None or _shape(arg) in (None, shape))
            )
    return False


def _shape(node: fx.Node) -> tuple | None:
    value = node.meta.get("val")
    # a symbolic size by its name: comparing SymInts would guard on them
    return (
        tuple(d if isinstance(d, int) else str(d) for d in value.shape)
        if isinstance(value, torch.Tensor)
        else None
    )


def _clamp_is_layer(node: fx.Node, channel_first: bool | None) -> bool:
    """probe.ops.clamp_is_layer from the traced example value of the clamp's input; a clamp of one value
    per position (`(h.sum(-1) - m).clamp(min=0)`, _per_position) is none, whatever its shape."""
    if _per_position(node.args[0]):
        return False
    value = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    if not isinstance(value, torch.Tensor):
        return True
    shape = tuple(d if isinstance(d, int) else None for d in value.shape)
    unit_axis = infer_channel_dim(len(shape), channel_first) if shape else None
    return clamp_is_layer(shape, unit_axis, channel_first is not None or _decomposed_linear(node))


def _decomposed_linear(node: fx.Node, pre: fx.Node | None = None) -> bool:
    """Whether a clamp's input (`pre`, else its first argument) is a Linear's output in a decomposed
    graph (run_decompositions writes linear as addmm / mm on rows, viewed back to [B, T, F]: the view
    keeps the last axis, the units)."""
    current = pre if pre is not None else node.args[0]
    for _ in range(8):
        if not isinstance(current, fx.Node) or current.op != "call_function" or not current.args:
            return False
        base = op_base(current.target)
        if base in LAST_DIM:
            return True
        source = current.args[0]
        if base in ("view", "_unsafe_view", "reshape") and isinstance(source, fx.Node):
            before, after = source.meta.get("val"), current.meta.get("val")
            if not (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)):
                return False
            if before.dim() == 0 or after.dim() == 0 or before.shape[-1] != after.shape[-1]:
                return False
        elif base not in PASS_THROUGH:
            return False
        current = source
    return False


def spelled_from_layer(node: fx.Node, x: fx.Node) -> bool:
    """Whether a ReLU spelled by `node` (maximum(x, 0), where(x > 0, x, 0), x * (x > 0)) clamps a
    layer's output: a site then (find_sites); else an ordinary op."""
    return _trace_producer(node, x)[0] is not None or _decomposed_linear(node, x)


def prepare_program(graph_module: fx.GraphModule) -> None:
    """hidden.prepare_graph with the spelled ReLUs written as clamps only where they are sites: one of
    a ReLU's output (`where(a > 0, a, 0)` after F.relu) stays as written, so a program `fix` writes back
    holds what the user wrote, and its rescan finds the sites of the original (a clamp of a ReLU's
    output would be one more)."""
    prepare_graph(graph_module, spelled_from_layer)


def stored_zero_relus(graph: fx.Graph, ops: tuple[str, ...]) -> Counter:
    """The ReLUs spelled with a parameter or buffer of zeros after a layer (hidden.recompose_spelled_relus
    marks them): no sites, named in `hidden` (probe.ops.stored_zeros_label)."""
    found: Counter = Counter()
    for node in graph.nodes:
        x = node.meta.get(STORED_ZEROS_RELU)
        if x is not None and "relu" in ops and _trace_producer(node, x)[0] is not None:
            stack = node.meta.get("nn_module_stack") or {}
            path = list(stack.values())[-1][0] if stack else ""
            found[stored_zeros_label(path, op_base(node.target))] += 1
    return found


def find_sites(graph: fx.Graph, ops: tuple[str, ...]) -> Iterator[tuple[fx.Node, StaticSite]]:
    namer = SiteNamer()
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        clamp = is_clamp_op(node.target.name())  # what it clamps is _clamp_is_layer's to judge, below
        kind = aten_op_kind(node.target.name(), (None, *node.args[1:]) if clamp else tuple(node.args))
        if kind is None or kind[0] not in ops:
            continue
        op, in_place = kind
        stack = node.meta.get("nn_module_stack") or {}
        path, qualified_type = ("", "")
        if stack:
            path, module_cls = list(stack.values())[-1]
            qualified_type = (
                module_cls
                if isinstance(module_cls, str)
                else f"{module_cls.__module__}.{module_cls.__qualname__}"
            )
        is_activation = is_activation_module_type(qualified_type)
        channel_first, producer, unit_axis, axis_lost = _trace_producer(node)
        if node.meta.get(SPELLED_RELU) and channel_first is None and not _decomposed_linear(node):
            continue  # maximum(x, 0) of no layer's output (a reduction): an ordinary op, unnumbered
        name = namer.name(path, op, is_activation)
        if clamp and not _clamp_is_layer(node, channel_first):
            continue  # a clamped variance / norm / loss: no layer (its number is taken, as in eager)
        module_type = qualified_type.rsplit(".", 1)[-1] if is_activation else "functional"
        yield (
            node,
            StaticSite(
                name,
                op,
                in_place,
                module_type,
                channel_first,
                producer,
                unit_axis=unit_axis,
                axis_lost=axis_lost,
            ),
        )


class ExportedProbe:
    """Runs an ExportedProgram's graph module with a recorder call at every activation node."""

    def __init__(self, graph_module: fx.GraphModule, settings: ProbeSettings) -> None:
        self.settings = settings
        self.registry = SiteRegistry(settings)
        self.sites: list[StaticSite] = []
        self.graph_module = graph_module
        prepare_program(graph_module)
        self.hidden = graph_hidden(graph_module, settings.ops)  # before the rewrite: the ops as exported
        others = tuple(op for op in NAMED_WHEN_UNSCANNED if op not in settings.ops)
        # a LeakyReLU beside the ReLUs: its layers named, not counted
        self.unscanned = dict(Counter(site.op for _, site in find_sites(graph_module.graph, others)))
        self.hidden.update(stored_zero_relus(graph_module.graph, settings.ops))
        self._site_nodes: list[tuple[fx.Node, StaticSite]] = []
        for node, site in list(find_sites(graph_module.graph, settings.ops)):
            self.sites.append(site)
            self._site_nodes.append((node, site))
            self.registry.declare(site.name, site.op, site.module_type, site.producer)
            node.target = self._recorder(site, node.target)
        graph_module.recompile()

    def _recorder(self, site: StaticSite, original):
        def deadrelu_site(*args, **kwargs):
            return run_static_site(self.registry, site, original, args, kwargs, site.in_place)

        return deadrelu_site

    def run(self, inputs: tuple, kwargs: dict | None = None):
        return self.graph_module(*inputs, **(kwargs or {}))

    def sites_reached_by(self, positions: set[int]) -> set[str]:
        """The sites whose inputs depend on the graph's inputs at `positions` (in call order): those the
        token inputs reach run on the tokens' positions; others (CLIP's image tower) do not."""
        placeholders = [node for node in self.graph_module.graph.nodes if node.op == "placeholder"]
        reached = {placeholders[i] for i in positions if i < len(placeholders)}
        for node in self.graph_module.graph.nodes:  # in topological order
            # a size read off a token input (a batch size shared by every input) carries no positions
            if isinstance(node.meta.get("val"), torch.SymInt | int) or node.op == "placeholder":
                continue
            if any(arg in reached for arg in node.all_input_nodes):
                reached.add(node)
        return {site.name for node, site in self._site_nodes if node in reached}
