"""The torch readers of the wiring model: eager nn.Modules and ExportedProgram graphs.

Both name tensors by their dotted parameter/buffer names, which an nn.Module and a program's module
(`program.module()` keeps every parameter under its original name) resolve alike with `named_tensor`.
- eager: the scan's EagerProbe saw which module made each activation (`layer.producer`), which one
  fed a BatchNorm (`probe.upstream`) and which modules read the activation (`probe.consumers`);
- exported: the producer (a linear/conv node, optionally followed by batch_norm) and the one
  linear/conv reading the activation are found in the ATen graph; their get_attr targets are the names.
  A decomposed Linear (`addmm(bias, rows, weight.T)` / `mm(rows, weight.T)`, viewed back) is one too.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from deadrelu_cli.probe.aten_ops import BATCH_NORM_OPS, LINEAR_OR_CONV_OPS, UNIT_PRESERVING, VIEWS
from deadrelu_cli.probe.base import is_stored, pools_over_space, submodule
from deadrelu_cli.probe.eager import EagerProbe
from deadrelu_cli.probe.experts import fused_expert_of
from deadrelu_cli.probe.exported import keeps_last_axis, op_base
from deadrelu_cli.wiring.model import BatchNormRef, TensorRef, UnitWiring

# how deep the reader walks go (a DenseNet-style block of L layers nests L joins)
MAX_JOINS = 256
LINEAR_OR_CONV = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCH_NORM = nn.modules.batchnorm._BatchNorm
BATCH_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")


def named_tensor(module: nn.Module, name: str | None) -> torch.Tensor | None:
    """A parameter or buffer by its dotted name (an nn.Module, a program's module, a TorchScript
    module), else None."""
    if name is None:
        return None
    owner, _, leaf = name.rpartition(".")
    if isinstance(module, torch.jit.ScriptModule):  # (no get_parameter/get_buffer there)
        try:
            tensors = dict(submodule(module, owner).named_parameters(recurse=False))
            tensors.update(submodule(module, owner).named_buffers(recurse=False))
        except AttributeError:
            return None
        return tensors.get(leaf)
    for getter in (module.get_parameter, module.get_buffer):
        try:
            tensor = getter(name)
        except AttributeError:
            continue
        if tensor.is_meta:
            return offloaded(module.get_submodule(owner), leaf)
        return tensor
    try:  # computed, not stored (weight_norm, spectral_norm): readable; `write_conflict` keeps fixes off it
        value = getattr(module.get_submodule(owner) if owner else module, leaf, None)
    except AttributeError:
        return None
    return value if isinstance(value, torch.Tensor) else None


def write_conflict(model: nn.Module, names, report=None, layer=None) -> str:
    """Why a fix must not rewrite entries of the tensors `names` for `layer` (a report layer), or "".

    A write must change this layer's units and nothing else: not a tensor a parametrization computes
    (the write would be lost), not one tied to another module, and not the units of a module that makes
    other call sites too (one Linear called twice): those would change with it."""
    if report is not None and layer is not None and layer.producer:
        others = [o.name for o in report.layers if o.name != layer.name and o.producer == layer.producer]
        if others:
            return (
                f"skipped: {layer.producer} also makes {', '.join(others)} (one module called at several "
                "sites); changing its units would change those sites too"
            )
    if isinstance(model, fx.GraphModule):
        why = _program_conflict(model.graph, [name for name in names if name])
        if why:
            return why
    aliases: dict[int, list[str]] = {}
    for key, tensor in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(tensor), []).append(key)
    for name in names:
        if not name:
            continue
        if not is_stored(model, name):
            return (
                f"skipped: {name} is computed by a parametrization (weight_norm, spectral_norm, …), not "
                "stored, so its entries cannot be rewritten; prune or leaky can act on this layer"
            )
        tensor = named_tensor(model, name)
        tied = [key for key in aliases.get(id(tensor), []) if key != name]
        if tied:
            return f"skipped: {name} is tied to {', '.join(tied)}; rewriting it would change that module too"
    return ""


def _program_conflict(graph: fx.Graph, names: list[str]) -> str:
    """write_conflict for a program's module, whose graph says what reads each tensor: a tensor tied
    to another module's is stored once in the program (torch.export keeps one name, read by both
    modules' ops, and the other name unread), so the tie shows in the graph, not in the module."""
    attrs = {str(node.target): node for node in graph.nodes if node.op == "get_attr"}
    for name in names:
        node = attrs.get(name)
        if node is None or node.users:
            why = _tied([node]) if node is not None else ""
            if why:
                return why
            continue
        owner, _, leaf = name.rpartition(".")
        # what the module's ops read in its place: the same kind of tensor beside its weight
        ops = [] if f"{owner}.weight" not in attrs else list(attrs[f"{owner}.weight"].users)
        read = sorted(
            {
                target
                for op in ops
                for arg in op.args
                if (target := _attr_target(arg)) is not None and target.rpartition(".")[2] == leaf
            }
        )
        if read:
            stored = ", ".join(read)
            return (
                f"skipped: {name} is tied to {stored} (the program stores the tensor once, as {stored}); "
                "rewriting it would change that module too"
            )
        return f"skipped: the program never reads {name}; rewriting it would change nothing"
    return ""


def offloaded(module, leaf: str):
    """`module.<leaf>`'s values; where accelerate offloaded it (--device-map with --max-memory: a meta
    tensor on the module), the copy its hook keeps (on the CPU, or memory-mapped from disk); None if neither."""
    tensor = getattr(module, leaf, None)
    if tensor is None or not tensor.is_meta:
        return tensor
    weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
    return weights[leaf] if weights is not None and leaf in weights else None


def _goes_to(op: str) -> str:
    """Why a site whose output an op other than a Linear/Conv reads is skipped (the op by its name in
    the model's code or graph: `add`, `aten.gt.Tensor`, `aten::slice`)."""
    base = op.replace("::", ".").split(".")[1 if op.startswith("aten") else 0].strip("_")
    residual = " (a residual add)" if base in ("add", "iadd") else ""
    return f"skipped: its output goes to {op}{residual}, not to a Linear/Conv"


def _dotted(owner: str, tensor: str) -> str:
    return f"{owner}.{tensor}" if owner else tensor


# --- eager nn.Modules -------------------------------------------------------------------------------


def _consumers(probe: EagerProbe, site: str, model: nn.Module) -> tuple[list[str] | None, str]:
    """The Linear/Conv modules reading the site (one, or several: a SqueezeNet squeeze ReLU read by both
    expand Convs, a DenseNet-style ReLU read by the next Conv and, through nested concatenations, by
    the later ones), or why not."""
    consumers = sorted(probe.consumers.get(site, set()))
    if len(consumers) > 1 and not any(name.startswith("<") for name in consumers):
        checked = [_single_consumer(probe, site, model, name) for name in consumers]
        whys = [why for _, why in checked if why]
        return (None, whys[0]) if whys else (consumers, "")
    name, why = _single_consumer(probe, site, model)
    return ([name] if name is not None else None), why


def _single_consumer(
    probe: EagerProbe, site: str, model: nn.Module, name: str | None = None
) -> tuple[str | None, str]:
    consumers = probe.consumers.get(site, set()) if name is None else {name}
    if len(consumers) != 1:
        uses = ", ".join(sorted(consumers)) or "nothing"
        return None, f"skipped: its output goes to {uses}, not to exactly one Linear/Conv"
    name = next(iter(consumers))
    if name.startswith("<"):
        return (
            None,
            _goes_to(name.strip("<>")),
        )
    module = model.get_submodule(name)
    if not isinstance(module, LINEAR_OR_CONV):  # ConvTranspose holds its inputs on axis 0
        return None, f"skipped: consumer {name} is a {type(module).__name__}, not a Linear/Conv"
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups != 1:
        return None, f"skipped: consumer {name} is a grouped convolution"
    others = sorted(
        other
        for other, readers in probe.consumers.items()
        if other != site and name in readers and not _joined_apart(probe, site, other, name)
    )
    if others:  # one module reading two sites: its input columns belong to both
        return (
            None,
            f"skipped: consumer {name} also reads {', '.join(others)}; changing its inputs would change that site's path too",
        )
    calls = probe.consumer_calls.get(name, set())
    if len({frozenset(read for read in call if read[0] == site) for call in calls}) > 1:
        # head(cat([h, h])) + head(cat([h, x])): the columns one call reads h in are x's in the other
        return (
            None,
            f"skipped: consumer {name} is called at several places that do not all read this output in the "
            "same columns; changing its inputs for one would change the others",
        )
    return name, ""


def _joined_apart(probe: EagerProbe, site: str, other: str, consumer: str) -> bool:
    """Whether `consumer` reads `site` and `other` in separate columns of one concatenation."""
    mine, theirs = probe.joined.get((site, consumer)), probe.joined.get((other, consumer))
    if not mine or not theirs:
        return False
    same_join = {place[1:] for place in mine} == {place[1:] for place in theirs}
    return same_join and not {place[0] for place in mine} & {place[0] for place in theirs}


def _producers(
    model: nn.Module, probe: EagerProbe, producer: str
) -> tuple[nn.Module | None, nn.Module | None, str]:
    """(Linear/Conv whose rows make the unit, BatchNorm after it or None, name of the Linear/Conv)."""
    module = model.get_submodule(producer)
    if isinstance(module, BATCH_NORM):
        upstream = probe.upstream.get(producer)
        conv = model.get_submodule(upstream) if upstream else None
        if conv is not None and isinstance(conv, LINEAR_OR_CONV):
            return conv, module, upstream
        return None, module, ""
    if isinstance(module, LINEAR_OR_CONV):
        return module, None, producer
    return None, None, ""


def eager_wiring(model: nn.Module, probe: EagerProbe, layer, need_consumer: bool = True) -> UnitWiring | str:
    """The UnitWiring of a scanned layer of an nn.Module, or why the layer must be skipped."""
    if layer.producer is None:
        fused = fused_expert_of(model, layer.name)
        if fused:
            return f"skipped: {fused}"
        return (
            "skipped: no single Linear/Conv (or BatchNorm after one) makes this activation directly "
            "(e.g. a LayerNorm or a residual add sits between them, or the layer is another type, such as "
            "transformers' Conv1D)"
        )
    consumer_name, more = "", []
    if need_consumer:
        names, why = _consumers(probe, layer.name, model)
        if names is None:
            return why
        consumer_name, *more = names
    incoming, bn, incoming_name = _producers(model, probe, layer.producer)
    norm = model.get_submodule(layer.producer)
    if isinstance(incoming, nn.modules.conv._ConvNd) and incoming.groups != 1:
        return f"skipped: producer {incoming_name} is a grouped convolution (groups={incoming.groups})"
    if isinstance(norm, nn.modules.conv._ConvNd) and not isinstance(norm, LINEAR_OR_CONV):
        return f"skipped: producer {layer.producer} is a {type(norm).__name__} (its weight holds its units on axis 1)"
    if isinstance(norm, (nn.LayerNorm, nn.GroupNorm)):
        return (
            f"skipped: producer {layer.producer} is a {type(norm).__name__}: no Linear/Conv's rows alone make "
            f"a unit (a {'LayerNorm' if isinstance(norm, nn.LayerNorm) else 'GroupNorm'} mixes them); "
            "bias-shift (which moves its beta) or leaky can act on this layer"
        )
    if incoming is None or (isinstance(incoming, nn.modules.conv._ConvNd) and incoming.groups != 1):
        return f"skipped: producer {layer.producer} is not a plain Linear/Conv (or BN after one)"
    batchnorm = None
    if bn is not None:
        batchnorm = BatchNormRef(
            layer.producer,
            *(
                _dotted(layer.producer, key) if getattr(bn, key, None) is not None else None
                for key in BATCH_NORM_TENSORS
            ),
        )
    wiring = UnitWiring(
        producer=layer.producer,
        owner=incoming_name,
        weight=TensorRef(_dotted(incoming_name, "weight"), 0),
        bias=_dotted(incoming_name, "bias") if incoming.bias is not None else None,
        batchnorm=batchnorm,
        consumer=consumer_name,
        consumer_weight=TensorRef(_dotted(consumer_name, "weight"), 1) if consumer_name else None,
        readers=tuple(sorted(probe.consumers.get(layer.name, ()))),
        also_read_by=tuple((name, TensorRef(_dotted(name, "weight"), 1)) for name in more),
    )
    for name in [consumer_name, *more] if consumer_name else []:
        # torch.cat([relu(e1(s)), relu(e3(s))], 1) read by one Conv: the columns past the other parts
        places = probe.joined.get((layer.name, name)) or [(0, None, None, None)]
        for offset, width, axis, rank in places:
            if axis is not None and axis != (
                1 if isinstance(incoming, nn.modules.conv._ConvNd) else rank - 1
            ):
                return f"skipped: its output is concatenated along another axis than its units' before {name}"
            wiring.column_at.setdefault(_dotted(name, "weight"), []).append((offset, width))
    if consumer_name:
        wiring.column_offset, wiring.column_units = wiring.column_at[_dotted(consumer_name, "weight")][0]
    return wiring


_NORMS = ("layer_norm", "native_layer_norm", "group_norm", "native_group_norm")


def _norm_producer(op: str) -> str:
    """Why a graph's layer made by a layer_norm/group_norm is skipped (the eager reader says the same)."""
    return (
        f"skipped: produced by {op}: no linear/conv's rows alone make a unit (the norm mixes them); "
        "bias-shift (which moves its beta) or leaky can act on this layer"
    )


def _producer_wiring(weight_name: str, bias_name: str | None, batchnorm: BatchNormRef | None) -> UnitWiring:
    """A graph's unit made by the linear/conv whose weight is WEIGHT_NAME (and BATCHNORM after it), before
    the walk to its consumer: the .pt2 and TorchScript wirings alike."""
    owner = weight_name.rsplit(".", 1)[0]
    return UnitWiring(
        producer=batchnorm.owner if batchnorm is not None else owner,
        owner=owner,
        weight=TensorRef(weight_name, 0),
        bias=bias_name,
        batchnorm=batchnorm,
    )


# --- ExportedProgram graphs ---------------------------------------------------------------------------


def _base(node: fx.Node) -> str:
    return op_base(node.target) if node.op == "call_function" else ""


def _attr_target(arg) -> str | None:
    return str(arg.target) if isinstance(arg, fx.Node) and arg.op == "get_attr" else None


def _weight_and_bias(node: fx.Node, rows: object = None) -> tuple[object, object] | None:
    """(weight, bias) arguments of a linear/conv node, or of a decomposed Linear — `addmm(bias, rows,
    permute(weight))` / `mm(rows, permute(weight))`, whose weight is stored [out, in] as the Linear's —
    or None for any other node (or one whose rows are not `rows`, when given)."""
    base = _base(node)
    if base in LINEAR_OR_CONV_OPS:
        if rows is not None and node.args[0] is not rows:
            return None
        return node.args[1] if len(node.args) > 1 else None, node.args[2] if len(node.args) > 2 else None
    if base not in ("addmm", "mm") or node.kwargs:  # beta / alpha scale the terms: no plain Linear
        return None
    operand, weight, bias = (
        (node.args[1], node.args[2], node.args[0]) if base == "addmm" else (*node.args[:2], None)
    )
    if rows is not None and operand is not rows:
        return None
    if not (isinstance(weight, fx.Node) and _base(weight) in ("permute", "t") and len(weight.users) == 1):
        return None
    if _base(weight) == "permute" and list(weight.args[1]) != [1, 0]:
        return None
    return weight.args[0], bias


def _groups(node: fx.Node) -> int:
    return int(node.args[6]) if _base(node) != "linear" and len(node.args) > 6 else 1


def _tied(args) -> str:
    """Why a stored tensor among `args` must not be rewritten: another node reads it (a weight tied to
    another layer is one tensor in the program), or ""."""
    for arg in args:
        name = _attr_target(arg)
        if name is None or len(arg.users) <= 1:
            continue
        paths = {_module_path(user) for user in arg.users}
        owner = name.rsplit(".", 1)[0]
        if paths <= {owner}:  # one module applied at several places, not a weight shared by two modules
            return (
                f"skipped: {owner} is applied at {len(arg.users)} places in the graph (one module called at "
                f"several sites); rewriting {name} would change every one of them"
            )
        others = ", ".join(sorted(path or "<root>" for path in paths - {owner}))
        return f"skipped: {name} is tied to {others} (one tensor read by {len(arg.users)} ops); rewriting it would change that layer too"
    return ""


def _module_path(node: fx.Node) -> str:
    """The module that made `node` (its innermost nn_module_stack entry), '' when not recorded."""
    stack = node.meta.get("nn_module_stack") or {}
    return str(list(stack.values())[-1][0]) if stack else ""


def exported_wiring(
    graph_module: fx.GraphModule,
    node: fx.Node,
    need_consumer: bool = True,
    to_write: bool = False,
    narrowing: bool = False,
) -> UnitWiring | str:
    """The UnitWiring of the activation `node` of a program's module, or why it must be skipped
    (`to_write`: also when a tensor a fix would rewrite is tied to another layer; `narrowing`: also when
    a decomposed Linear's views write its width into the graph, which prune cannot change)."""
    pre = node.args[0] if node.args else None
    bn = None
    if isinstance(pre, fx.Node) and _base(pre) in BATCH_NORM_OPS and len(pre.users) == 1:
        bn, pre = pre, pre.args[0]
    if (  # a decomposed Linear: addmm / mm on [B*T, F] rows, viewed back to [B, T, F]
        bn is None
        and isinstance(pre, fx.Node)
        and _base(pre) in VIEWS
        and len(pre.users) == 1
        and isinstance(pre.args[0], fx.Node)
        and _base(pre.args[0]) in ("addmm", "mm")
        and keeps_last_axis(pre)
    ):
        pre = pre.args[0]
    parts = _weight_and_bias(pre) if isinstance(pre, fx.Node) else None
    if narrowing and parts is not None and _base(pre) in ("addmm", "mm"):
        return (
            "skipped: a decomposed Linear (addmm / mm viewed back to a fixed width) cannot be narrowed; "
            "prune the program as exported (before run_decompositions), or use reinit / bias-shift"
        )
    if isinstance(pre, fx.Node) and _base(pre) in _NORMS:
        return _norm_producer(_base(pre))
    if parts is None or len(_value_users(pre)) != 1:
        return "skipped: not produced by one linear/conv (or batch_norm after one) in the graph"
    weight_name = _attr_target(parts[0])
    bias_name = _attr_target(parts[1])
    if weight_name is None or _groups(pre) != 1:
        return f"skipped: producer {weight_name or pre.name} is not a plain linear/conv with its own weight"
    tied = to_write and _tied(parts + (tuple(bn.args[1:5]) if bn is not None else ()))
    if tied:
        return tied
    batchnorm = None
    if bn is not None:
        names = [_attr_target(a) for a in bn.args[1:5]]
        batchnorm = BatchNormRef((names[1] or names[0] or names[2] or bn.name).rsplit(".", 1)[0], *names)
    wiring = _producer_wiring(weight_name, bias_name, batchnorm)
    if not need_consumer:
        return wiring
    found: list[tuple[str, int, int | None]] = []
    why = _graph_readers(node, 1 if _base(pre) != "linear" else -1, 0, None, False, to_write, found, 0)
    if why:
        return why
    _set_readers(wiring, found)
    return wiring


def _set_readers(wiring: UnitWiring, found: list[tuple[str, int, int | None]]) -> None:
    """Fill the consumer side of `wiring` from the (weight name, offset, units in all) of every
    linear/conv reading the units (`column_at`: where each reads them)."""
    names = list(dict.fromkeys(weight for weight, _, _ in found))
    wiring.consumer = names[0].rsplit(".", 1)[0]
    wiring.consumer_weight = TensorRef(names[0], 1)
    wiring.also_read_by = tuple((r.rsplit(".", 1)[0], TensorRef(r, 1)) for r in names[1:])
    wiring.readers = tuple(r.rsplit(".", 1)[0] for r in names)
    wiring.column_offset, wiring.column_units = found[0][1], found[0][2]
    for weight, offset, units in found:
        wiring.column_at.setdefault(weight, []).append((offset, units))


def _graph_readers(
    current: fx.Node,
    unit_axis: int,
    offset: int,
    units: int | None,
    flattened: bool,
    to_write: bool,
    found: list,
    depth: int,
) -> str:
    """Walk every reader of `current` (holding the units at `offset` of `units` along `unit_axis`;
    None: only them) through unit-preserving ops, spatial pools and concatenations along the units
    (nested ones too: a DenseNet-style block), adding each linear/conv leaf (weight name, offset,
    units) to `found`; why a reader cannot be followed, or ""."""
    users = _value_users(current)
    if depth > MAX_JOINS:
        return f"skipped: its readers are more than {MAX_JOINS} joins or ops away"
    if not users:
        return f"skipped: its output goes to {len(users)} nodes, not to exactly one linear/conv"
    for user in users:
        if _base(user) in UNIT_PRESERVING and user.args[0] is current:
            keep = flattened or _base(user) in VIEWS or _base(user) == "flatten"
            why = _graph_readers(user, unit_axis, offset, units, keep, to_write, found, depth + 1)
        elif _base(user) in ("cat", "concat") and not flattened:
            placed = _cat_places(user, current, unit_axis)
            if isinstance(placed, str):
                return placed
            places, width = placed
            why = ""
            for place in places:
                why = why or _graph_readers(
                    user, unit_axis, place + offset, width, False, to_write, found, depth + 1
                )
        elif (
            _base(user) in ("mean", "amax")
            and user.args[0] is current
            and isinstance(current.meta.get("val"), torch.Tensor)
            and pools_over_space(current.meta["val"].dim(), user.args[1] if len(user.args) > 1 else None)
        ):
            why = _graph_readers(user, unit_axis, offset, units, flattened, to_write, found, depth + 1)
        else:
            weight = _direct_consumer(user, current, to_write)
            if weight is None:
                return _goes_to(_base(user) if user.op == "call_function" else user.name)
            if weight.startswith("skipped"):
                return weight
            found.append((weight, offset, units))
            why = ""
        if why:
            return why
    return ""


# nodes that check a tensor without reading its values into anything (torch.export writes
# `_assert_tensor_metadata` for a `.float()`; symbolic sizes)
_CHECKS = frozenset({"_assert_tensor_metadata", "_assert_scalar", "_assert_async", "sym_size", "sym_numel"})


def _value_users(node: fx.Node) -> list[fx.Node]:
    """The users of `node` whose values reach something: not checks, nor ops only checks read (the
    x > 0 left of `x * (x > 0).float()` once the ReLU it spelled is recomposed, kept alive by the check
    of its `.float()`)."""
    return [user for user in node.users if not _only_checks(user)]


def _only_checks(node: fx.Node, depth: int = 0) -> bool:
    if node.op == "output":
        return False
    if _base(node) in _CHECKS:
        return True
    return depth < 4 and all(_only_checks(user, depth + 1) for user in node.users)


def _direct_consumer(user: fx.Node, current: fx.Node, to_write: bool) -> str | None:
    """The weight name of a plain linear/conv reading `current` as its rows, "skipped: …" when it is
    one that cannot be rewritten, None when it is no linear/conv."""
    parts = _weight_and_bias(user, rows=current)
    weight = _attr_target(parts[0]) if parts is not None else None
    if weight is None:
        return None
    if _groups(user) != 1:
        return f"skipped: consumer {weight} is a grouped convolution"
    return (_tied(parts[:1]) or weight) if to_write else weight


def _cat_places(cat: fx.Node, part: fx.Node, unit_axis: int) -> tuple[list[int], int] | str:
    """Where `part`'s units sit among the columns of `cat` (a SqueezeNet fire module joins its branches
    along the channels): the offsets past the parts before each place it is joined at, and the width
    of `cat`; or why not (another axis, widths the graph does not record)."""
    parts = cat.args[0] if cat.args else ()
    values = [p.meta.get("val") if isinstance(p, fx.Node) else None for p in parts]
    rank = values[0].dim() if values and isinstance(values[0], torch.Tensor) else None
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if rank is None or any(not isinstance(v, torch.Tensor) for v in values):
        return f"skipped: its output goes to {cat.name}, whose input widths the graph does not record"
    if int(dim) % rank != unit_axis % rank:
        return f"skipped: its output goes to {cat.name}, which joins along another axis than its units'"
    sizes = [int(v.shape[int(dim)]) for v in values]
    return [sum(sizes[:i]) for i, p in enumerate(parts) if p is part], sum(sizes)


# --- TorchScript graphs -------------------------------------------------------------------------------

# aten::_convolution (a traced Conv): (input, weight, bias, stride, padding, dilation, transposed, …, groups)
_SCRIPT_CONVS = {"linear": None, "conv1d": 6, "conv2d": 6, "conv3d": 6, "_convolution": 8}


# ops that read only a tensor's shape (a scripted BatchNorm checks its input's dim()): not consumers
_SHAPE_READS = frozenset({"aten::dim", "aten::size", "aten::len", "prim::shape", "aten::numel"})


def _script_uses(value) -> list:
    """The nodes that read `value`'s values (not only its shape)."""
    return [use.user for use in value.uses() if use.user.kind() not in _SHAPE_READS]


def _feeds_only(value, node) -> bool:
    """`value` goes to the activation `node` and nowhere else (after an in-place relu_, code that reads
    the tensor again reads the activated values: those reads belong to the activation's output)."""
    in_place = node.kind().endswith("_")
    return all(user == node or (in_place and user.isAfter(node)) for user in _script_uses(value))


def _activation_readers(node) -> list:
    """What reads the activation `node`'s values: its output's users, and after an in-place relu_ the
    later users of the tensor it activated in place."""
    readers = _script_uses(node.output())
    if node.kind().endswith("_"):
        readers += [user for user in _script_uses(node.inputsAt(0)) if user != node and user.isAfter(node)]
    return readers


def _script_constants(value) -> list | None:
    """The int list a TorchScript value holds when it is a constant (or a list of constants), else None."""
    constant = value.toIValue() if value.node().kind() == "prim::Constant" else None
    if constant is not None:
        return list(constant) if isinstance(constant, list | tuple) else [constant]
    if value.node().kind() != "prim::ListConstruct":
        return None
    items = [
        item.toIValue() if item.node().kind() == "prim::Constant" else None for item in value.node().inputs()
    ]
    return None if any(not isinstance(item, int) for item in items) else items


def _script_base(node) -> str:
    kind = node.kind()
    return kind[len("aten::") :].rstrip("_") if kind.startswith("aten::") else ""


def _script_attr(value) -> str | None:
    """The dotted name of the module attribute `value` reads (a `prim::GetAttr` chain from self)."""
    names = []
    node = value.node()
    while node.kind() == "prim::GetAttr":
        names.append(node.s("name"))
        node = node.inputsAt(0).node()
    return ".".join(reversed(names)) if names and node.kind() == "prim::Param" else None


def _script_plain(node) -> bool:
    """A linear, or a convolution that is neither transposed nor grouped."""
    base = _script_base(node)
    if base not in _SCRIPT_CONVS:
        return False
    if base == "_convolution" and node.inputsAt(6).toIValue() is not False:
        return False
    groups = _SCRIPT_CONVS[base]
    return groups is None or node.inputsAt(groups).toIValue() == 1


def script_weight_reads(graph) -> dict[str, int]:
    """How many linear/conv/batch_norm ops of an inlined TorchScript graph read each weight (a module
    applied at several places reads its weight in each)."""
    reads: dict[str, int] = {}
    for node in graph.findAllNodes("aten::linear") + [
        n
        for kind in ("conv1d", "conv2d", "conv3d", "_convolution", "batch_norm")
        for n in graph.findAllNodes(f"aten::{kind}")
    ]:
        name = _script_attr(node.inputsAt(1))
        if name:
            reads[name] = reads.get(name, 0) + 1
    return reads


def _only_into(value, node, depth: int = 0) -> bool:
    """Whether every read of `value` ends in `node`: read by it, or by ops whose outputs only it reads
    (the x > 0 mask of a ReLU spelled x * (x > 0), its cast; zeros_like(x) of a spelled where)."""
    users = _script_uses(value)
    return (
        bool(users)
        and depth < 4
        and all(u == node or all(_only_into(o, node, depth + 1) for o in u.outputs()) for u in users)
    )


def script_wiring(
    node,
    reads: dict[str, int],
    need_consumer: bool = True,
    x=None,
    module=None,
    spelled=None,
    units_at: int | None = None,
) -> UnitWiring | str:
    """The UnitWiring of the activation `node` of an inlined TorchScript graph (its GetAttr chains name
    the module's tensors), or why it must be skipped; `reads`: `script_weight_reads` of the graph; `x`:
    the pre-activation of a ReLU the node spells (x * (x > 0), where(x > 0, x, 0)); `module` (the
    ScriptModule) gives the widths of what a `cat` joins, which the graph does not record; `spelled`:
    the reader of spelled sites' x (probe.torchscript.spelled_relu_reader), for those widths;
    `units_at`: the axis the scan counted the units on (a Linear's output rank is in no graph type: a
    `cat(…, 1)` of [B, F] outputs joins their units)."""
    pre = (x if x is not None else node.inputsAt(0)).node()
    feeds = (lambda value, n: _only_into(value, n)) if x is not None else _feeds_only
    bn = None
    if _script_base(pre) == "batch_norm" and feeds(pre.output(), node):
        bn, pre = pre, pre.inputsAt(0).node()
    if _script_base(pre) in _NORMS:
        return _norm_producer(_script_base(pre))
    if not _script_plain(pre) or not (_feeds_only(pre.output(), bn) if bn else feeds(pre.output(), node)):
        return "skipped: not produced by one plain linear/conv (or batch_norm after one) in the graph"
    weight_name = _script_attr(pre.inputsAt(1))
    bias_name = _script_attr(pre.inputsAt(2))
    if weight_name is None:
        return "skipped: the producer's weight is not a module parameter"
    batchnorm = None
    if bn is not None:
        names = [_script_attr(bn.inputsAt(i)) for i in range(1, 5)]
        batchnorm = BatchNormRef((names[1] or names[0] or names[2] or "batch_norm").rsplit(".", 1)[0], *names)
    for name in [weight_name] + ([batchnorm.weight or batchnorm.bias] if batchnorm else []):
        if name and reads.get(name, 0) > 1:
            return (
                f"skipped: {name.rsplit('.', 1)[0]} is applied at {reads[name]} places in the graph (one "
                "module called at several sites); rewriting it would change every one of them"
            )
    wiring = _producer_wiring(weight_name, bias_name, batchnorm)
    if not need_consumer:
        return wiring
    rank = {"conv1d": 3, "conv2d": 4, "conv3d": 5}.get(_script_base(pre))
    if _script_base(pre) == "_convolution":
        rank = rank or _conv_rank(pre)
    walk = _ScriptWalk(reads, module, spelled, 1 if _script_base(pre) != "linear" else -1, units_at)
    # (after an in-place relu_, the later reads of the tensor it activated are reads of its output)
    read = {node.output().unique(), node.inputsAt(0).unique()} if x is None else {node.output().unique()}
    why = walk.readers(_activation_readers(node), read, rank, 0, None, False, 0)
    if why:
        return why
    _set_readers(wiring, walk.found)
    return wiring


def _conv_rank(node) -> int | None:
    """The output rank of a traced `aten::_convolution` (its stride list has one entry per spatial dim)."""
    stride = _script_constants(node.inputsAt(3))
    return None if stride is None else len(stride) + 2


class _ScriptWalk:
    """Every linear/conv reading a TorchScript activation's units, through unit-preserving ops, spatial
    pools and `cat`s along the units (the widths of the other parts from their producers' weights in
    the module: a TorchScript graph records no shapes)."""

    def __init__(self, reads, module, spelled, unit_axis: int, units_at: int | None) -> None:
        self.reads, self.module, self.spelled, self.unit_axis = reads, module, spelled, unit_axis
        self.units_at = units_at
        self.found: list[tuple[str, int, int | None]] = []

    def readers(self, users, read: set, rank, offset: int, units, flattened: bool, depth: int) -> str:
        if depth > MAX_JOINS:
            return f"skipped: its readers are more than {MAX_JOINS} joins or ops away"
        if not users:
            return f"skipped: its output goes to {len(users)} ops, not to exactly one linear/conv"
        for user in users:
            takes = user.inputsAt(0).unique() in read if len(list(user.inputs())) else False
            base = _script_base(user)
            if base in UNIT_PRESERVING and takes:
                flat = flattened or base in VIEWS or base == "flatten"
                why = self.readers(
                    _script_uses(user.output()),
                    {user.output().unique()},
                    rank,
                    offset,
                    units,
                    flat,
                    depth + 1,
                )
            elif base in ("mean", "amax") and takes and rank is not None:
                # a global pool written `h.mean((2, 3))` (as the .pt2 and eager readers take it); the rank
                # is the producing conv's (a TorchScript graph records no shapes)
                dims = _script_constants(user.inputsAt(1))
                if dims is None or not pools_over_space(rank, dims):
                    return f"skipped: its output goes to {user.kind()} over its units, not to a linear/conv"
                keep = user.inputsAt(2).toIValue() if len(list(user.inputs())) > 2 else False
                why = self.readers(
                    _script_uses(user.output()),
                    {user.output().unique()},
                    rank if keep else rank - len(dims),
                    offset,
                    units,
                    flattened,
                    depth + 1,
                )
            elif user.kind() == "prim::ListConstruct" and not flattened:
                why = self._joined(user, read, rank, offset, depth)
            else:
                why = self._leaf(user, takes, offset, units)
            if why:
                return why
        return ""

    def _leaf(self, user, takes: bool, offset: int, units) -> str:
        consumer_weight = _script_attr(user.inputsAt(1)) if len(list(user.inputs())) > 1 else None
        if _script_base(user) not in _SCRIPT_CONVS or not takes or not consumer_weight:
            return _goes_to(user.kind())
        if not _script_plain(user):
            return f"skipped: consumer {consumer_weight} is a grouped or transposed convolution"
        if self.reads.get(consumer_weight, 0) > 1:
            return (
                f"skipped: consumer {consumer_weight.rsplit('.', 1)[0]} is applied at {self.reads[consumer_weight]} "
                "places; changing its inputs would change the others too"
            )
        self.found.append((consumer_weight, offset, units))
        return ""

    def _joined(self, listed, read: set, rank, offset: int, depth: int) -> str:
        """The units joined by `aten::cat([..., units, ...], dim)` along their own axis: each reader of
        the cat reads them past the widths of the parts before them."""
        cats = _script_uses(listed.output())
        if len(cats) != 1 or cats[0].kind() != "aten::cat":
            return f"skipped: its output goes to {(cats[0].kind() if cats else 'prim::ListConstruct')} (e.g. torch.stack), not to a linear/conv"
        cat = cats[0]
        dim = cat.inputsAt(1).toIValue() if cat.inputsAt(1).node().kind() == "prim::Constant" else None
        along = dim is not None and (
            dim in (self.unit_axis, self.units_at)
            or (rank is not None and dim % rank == self.unit_axis % rank)
        )
        if not along:
            where = f"dim {self.units_at}" if self.units_at is not None else "the units' axis"
            return (
                f"skipped: its output is joined by aten::cat along dim {dim}, not along its units ({where})"
            )
        parts = list(listed.inputs())
        sizes = [self._width(part, dim, rank) for part in parts]
        if self.module is None or any(size is None for size in sizes):
            unknown = next((p.debugName() for p, w in zip(parts, sizes, strict=True) if w is None), "a part")
            return (
                f"skipped: its output is joined by aten::cat with %{unknown}, whose width neither the graph nor "
                "a linear/conv weight behind it tells; fix the state_dict with --arch, the .pt2 or the ONNX "
                "export instead"
            )
        for position in [i for i, part in enumerate(parts) if part.unique() in read]:
            why = self.readers(
                _script_uses(cat.output()),
                {cat.output().unique()},
                rank,
                sum(sizes[:position]) + offset,
                sum(sizes),
                False,
                depth + 1,
            )
            if why:
                return why
        return ""

    def _width(self, value, dim: int, rank, depth: int = 0) -> int | None:
        """How many units `value` holds along the joined axis: its producing linear/conv's output units,
        back through activations, batch_norm, pools and dropout, and nested cats along the same axis."""
        node = value.node()
        base = _script_base(node)
        x = self.spelled(node) if self.spelled is not None else None
        if depth > MAX_JOINS:
            return None
        if x is not None:
            return self._width(x, dim, rank, depth + 1)
        if base in _WIDTH_KEEPING or (base in UNIT_PRESERVING and base not in VIEWS and base != "flatten"):
            return self._width(node.inputsAt(0), dim, rank, depth + 1)
        if base == "cat" and node.inputsAt(0).node().kind() == "prim::ListConstruct":
            inner = (
                node.inputsAt(1).toIValue() if node.inputsAt(1).node().kind() == "prim::Constant" else None
            )
            if inner != dim:
                return None
            sizes = [self._width(part, dim, rank, depth + 1) for part in node.inputsAt(0).node().inputs()]
            return None if any(size is None for size in sizes) else sum(sizes)
        if base in _SCRIPT_CONVS and _script_plain(node) and self.module is not None:
            weight = named_tensor(self.module, _script_attr(node.inputsAt(1)))
            return None if weight is None else int(weight.shape[0])
        return None


# ops that keep each unit's values in its own slot (the width of what they make is their input's)
_WIDTH_KEEPING = frozenset(
    {"relu", "relu6", "hardtanh", "leaky_relu", "elu", "gelu", "silu", "sigmoid", "tanh", "batch_norm"}
)
