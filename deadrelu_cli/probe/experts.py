"""Hugging Face's fused mixture-of-experts modules (transformers 5's `@use_experts_implementation`:
every expert's weights in one 3-D tensor `[experts, …]`, one `act_fn` module) run the rows of all
experts through that one activation call (grouped_mm / batched_mm) or through it once per expert hit
(eager, in an order that depends on which experts a batch reaches). Either way unit i of expert 0 and
unit i of expert 1 — different neurons — would be counted as one unit: a unit dead in one expert is
alive in the table as soon as another expert's unit i fires. For a scan each expert gets its own
activation module, `<experts>.<e>.act_fn`, and the module runs its forward once per expert, on the
eager implementation, with the routing restricted to that expert (the others point at the sentinel
index `num_experts`, which the eager forward skips). The outputs are the eager forward's, addition for
addition."""

from __future__ import annotations

import contextlib
import copy
import functools
import types
from collections.abc import Iterator

ACTIVATION = "act_fn"


def fused_experts(module) -> int:
    """The number of experts of a fused experts module whose eager forward can be restricted to one
    expert, else 0."""
    import torch

    if isinstance(module, torch.jit.ScriptModule):
        return 0
    count = getattr(module, "num_experts", None)
    if not isinstance(count, int) or isinstance(count, bool) or count < 2:
        return 0
    eager = getattr(type(module).forward, "__wrapped__", None)  # use_experts_implementation's original
    act = getattr(module, ACTIVATION, None)
    if eager is None:
        return 0
    if not isinstance(act, torch.nn.Module) or not hasattr(
        getattr(module, "config", None), "_experts_implementation_internal"
    ):
        return 0
    weights = [p for name, p in module.named_parameters(recurse=False) if name in ("gate_up_proj", "up_proj")]
    if len(weights) != 1 or weights[0].dim() != 3 or weights[0].shape[0] != count:
        return 0
    return count


# the names transformers 5 gives a fused experts module's first weight (`fused_experts` reads the same)
FUSED_WEIGHTS = ("gate_up_proj", "up_proj")


def fused_holders(tensors) -> dict[str, int]:
    """{module path: experts} of the fused experts modules that a model's tensors show, from (name, shape)
    pairs: a 3-D `<path>.gate_up_proj` / `<path>.up_proj` of two or more experts. What an export keeps of
    such a module (a .pt2 program's, a TorchScript module's parameters): its forward is gone, its weights
    are not."""
    found = {}
    for name, shape in tensors:
        holder, _, leaf = name.rpartition(".")
        if leaf in FUSED_WEIGHTS and len(shape) == 3 and int(shape[0]) >= 2:
            found[holder] = int(shape[0])
    return found


def merged_expert_sites(names, holders: dict[str, int]) -> dict[str, tuple[str, int]]:
    """{site: (module path, experts)} of the sites in `names` that run inside a fused experts module of
    `holders` and are not one expert's own (`<path>.<e>.act_fn`, which the eager scan makes): one
    activation for every expert's rows, unit i of each expert counted as one unit (exported formats and
    `watch()`, which cannot split the module's forward)."""
    found = {}
    for name in names:
        for holder, count in holders.items():
            head = f"{holder}." if holder else ""
            if name.startswith(head) and not name[len(head) :].split(".")[0].isdigit():
                found[name] = (holder, count)
    return found


def merged_experts_note(merged: dict[str, tuple[str, int]], remedy: str) -> str:
    """The note for sites that count several experts' units as one (`merged_expert_sites`)."""
    shown = ", ".join(f"{name} ({count} experts)" for name, (_, count) in list(merged.items())[:4])
    more = f", … ({len(merged)} in all)" if len(merged) > 4 else ""
    return (
        f"fused mixture of experts: {shown}{more} run every expert's rows through one activation, so unit i of "
        f"all experts is counted as one unit (dead only when dead in every expert) and a gate does not pass "
        f"on it; {remedy}"
    )


def fused_expert_of(model, site: str) -> str | None:
    """Why a fix cannot patch `site` when it is one expert of a fused experts module (its rows are slices
    of one 3-D tensor shared by every expert), else None."""
    path, _, last = site.rpartition(f".{ACTIVATION}")
    holder, _, expert = path.rpartition(".")
    if last or not expert.isdigit() or not holder:
        return None
    try:
        module = model.get_submodule(holder)
    except AttributeError:
        return None
    weight = "gate_up_proj" if hasattr(module, "gate_up_proj") else "up_proj"
    if not fused_experts(module):
        return None
    return (
        f"expert {expert} of the fused mixture of experts {holder} (its rows are slices of {holder}.{weight}, one "
        "tensor for every expert): fix does not patch fused experts; reinitialise those rows in the training code"
    )


def _expert(act):
    """One expert's own activation module, held by a child `<e>` of the experts module (no parameters)."""
    import torch

    holder = torch.nn.Module()
    holder.add_module(ACTIVATION, copy.deepcopy(act))
    return holder


def _per_expert(module, run):
    """A forward for `module` that runs `run` (its forward as it was: a wrapper such as accelerate's
    device hook, or the class's) once per expert, with the routing restricted to it and that expert's
    own activation module in place of the shared one. With a token mask, the eager probe follows each
    row of an expert to its token from the module's input (`carried_rows`: the module is a block of
    `expert_blocks`) and counts the rows of real tokens only."""
    import torch

    def forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        shared = module._modules[ACTIVATION]
        out = None
        try:
            for expert in range(module.num_experts):
                chosen = top_k_index == expert
                if not bool(chosen.any()):
                    continue  # no token reached it: its units saw nothing (the table says it did not run)
                module._modules[ACTIVATION] = module._modules[str(expert)]._modules[ACTIVATION]
                only = torch.where(chosen, top_k_index, torch.full_like(top_k_index, module.num_experts))
                part = run(hidden_states, only, top_k_weights, *args, **kwargs)
                out = part if out is None else out + part  # disjoint rows: adding zeros elsewhere
        finally:
            module._modules[ACTIVATION] = shared
        return torch.zeros_like(hidden_states) if out is None else out

    return forward


def declare_unreached(registry, fused: dict[str, int]) -> None:
    """Experts no token reached ran no activation: made known to the probe's registry (a site of the
    same op as their siblings'), so that the report lists them as not run instead of leaving them out."""
    for path, count in fused.items():
        names = [f"{path}.{expert}.{ACTIVATION}" for expert in range(count)]
        ran = next((registry.sites[name] for name in names if name in registry.sites), None)
        for name in names:
            if ran is not None and name not in registry.sites:
                registry.declare(name, ran.op, ran.module_type, None)


@contextlib.contextmanager
def experts_apart(model) -> Iterator[dict[str, int]]:
    """Within: every fused experts module of `model` counts each expert's units apart (their sites are
    `<path>.<e>.act_fn`); {module path: experts} is yielded. An eager probe made within follows their
    rows to their tokens (`expert_blocks`): padding rows are not counted. The model is as it was
    afterwards."""
    import torch

    changed = []
    if isinstance(model, torch.nn.Module) and not isinstance(model, torch.jit.ScriptModule):
        for path, module in list(model.named_modules()):
            count = fused_experts(module)
            if not count or any(str(e) in module._modules for e in range(count)):
                continue
            for expert in range(count):
                module.add_module(str(expert), _expert(module._modules[ACTIVATION]))
            previous = module.__dict__.get("forward")  # accelerate's device hook (--device-map), …
            implementation = module.config._experts_implementation_internal
            # the eager forward skips the sentinel index (grouped_mm / batched_mm would index past the end)
            module.config._experts_implementation_internal = "eager"  # this config only, not its sub-configs
            run = previous if previous is not None else types.MethodType(type(module).forward, module)
            module.forward = _per_expert(module, run)
            changed.append((path, module, count, previous, implementation))
    try:
        yield {path: count for path, _, count, _, _ in changed}
    finally:
        # in reverse: every layer's experts module holds the model's one config, so each after the first
        # saw "eager" as the implementation it found; undone last to first, the first one's is what stays
        for _, module, count, previous, implementation in reversed(changed):
            for expert in range(count):
                del module._modules[str(expert)]
            module.config._experts_implementation_internal = implementation
            if previous is None:
                del module.forward
            else:
                module.forward = previous


# -- rows of experts built from separate modules ------------------------------------------------------
# (SwitchTransformers' / NLLB-MoE's experts ModuleDict, an nn.ModuleList of expert MLPs written by hand):
# each expert runs on the rows of the tokens routed to it, gathered by index from the block's
# [batch, tokens, hidden] (or [batch·tokens, hidden]) input. No [batch, tokens] mask reads those rows; the
# eager probe follows each row's token from the block's input through the index ops to the expert's
# activation (`carried_rows`), and counts the rows of kept tokens only (accumulator.RoutedRows).


def expert_groups(tensors) -> dict[str, tuple[str, ...]]:
    """{experts' holder path: their module paths} of the mixtures of experts built from separate modules
    that a model's tensors show, from (name, shape) pairs: two or more children of one holder with the
    same parameters (names and shapes; the holder's other children hold none: NLLB's dropout), beside a
    router in the holder's parent (a 2-D tensor outside the experts, at most two modules down, with a
    dimension of the experts' number: `router.classifier`, `gate`, a bare `[hidden, experts]` weight). What
    an export keeps of such a model (a .pt2 program's, a TorchScript module's parameters, an ONNX graph's
    initializers): its index ops are graph nodes, its weights keep their names."""
    tensors = [(name, tuple(int(d) for d in shape)) for name, shape in tensors]
    children: dict[str, dict[str, set]] = {}  # holder -> child -> {(name below it, shape)}
    for name, shape in tensors:
        parts = name.split(".")
        for i in range(len(parts) - 1):
            holder = ".".join(parts[:i])
            children.setdefault(holder, {}).setdefault(parts[i], set()).add((".".join(parts[i + 1 :]), shape))
    found = {}
    for holder, kids in children.items():
        if not holder:  # the model itself holds them: no block around them to hold a router
            continue
        kinds: dict[frozenset, list[str]] = {}
        for key, signature in kids.items():
            kinds.setdefault(frozenset(signature), []).append(key)
        if len(kinds) != 1 or len(kids) < 2:
            continue
        count = len(kids)
        block, _, _ = holder.rpartition(".")
        head = f"{block}." if block else ""
        if any(
            len(shape) == 2
            and count in shape
            and name.startswith(head)
            and not name.startswith(f"{holder}.")
            and name[len(head) :].count(".") <= 2
            for name, shape in tensors
        ):
            found[holder] = tuple(f"{holder}.{key}" for key in kids)
    return found


def separate_experts(model) -> dict[str, tuple[str, ...]]:
    """{block path: its experts' module paths} of the mixtures of experts of `model` built from separate
    modules (`expert_groups`) held by an nn.ModuleList / nn.ModuleDict (its parent is the block, whose
    input holds the tokens). Fused experts modules (`fused_experts`) are not listed."""
    import torch

    if not isinstance(model, torch.nn.Module) or isinstance(model, torch.jit.ScriptModule):
        return {}
    groups = expert_groups((name, p.shape) for name, p in model.named_parameters())
    found = {}
    for holder, experts in groups.items():
        container = model.get_submodule(holder) if holder else model
        if isinstance(container, torch.nn.ModuleList | torch.nn.ModuleDict):
            found[holder.rpartition(".")[0]] = experts
    return found


def mark_unattributed_rows(layers, groups: dict[str, tuple[str, ...]]) -> list[str]:
    """An export's (.pt2, TorchScript, ONNX) layers inside one expert of `groups` (`expert_groups`) whose
    rows were not the token mask's positions ("no token axis": the tokens routed to the expert, gathered
    by a graph's index ops, which the export's probe does not follow): marked ROWS_NOT_ATTRIBUTED (they
    counted every row, padding's included; noted, and a gate fails on them). A layer is inside an expert
    by its name (a module path) or its producer's weight. Returns the names marked."""
    from deadrelu_cli.gate import ROWS_NOT_ATTRIBUTED

    paths = tuple(f"{path}." for experts in groups.values() for path in experts)
    marked = []
    for layer in layers:
        inside = layer.name.startswith(paths) or (layer.weight or "").startswith(paths)
        if paths and inside and layer.extra.get("position_mask") == "no token axis":
            layer.extra["position_mask"] = ROWS_NOT_ATTRIBUTED
            marked.append(layer.name)
    return marked


def expert_blocks(model) -> dict[str, tuple[str, ...]]:
    """{block path: expert paths} of every mixture of experts whose experts' rows the eager probe follows:
    those of separate modules (`separate_experts`) and the fused ones `experts_apart` split (their block
    is the experts module, each expert `<path>.<e>`)."""
    import torch

    found = separate_experts(model)
    if isinstance(model, torch.nn.Module) and not isinstance(model, torch.jit.ScriptModule):
        for path, module in model.named_modules():
            count = fused_experts(module)
            if count and all(str(e) in module._modules for e in range(count)):
                found[path] = tuple(f"{path}.{e}" if path else str(e) for e in range(count))
    return found


def _row_reshapes():
    import torch

    T = torch.Tensor
    return frozenset(
        (T.view, T.reshape, torch.reshape, T.flatten, torch.flatten, T.unflatten, torch.unflatten, T.squeeze)
        + (torch.squeeze, T.unsqueeze, torch.unsqueeze, T.view_as, T.reshape_as, T.contiguous)
    )


def _row_wise():
    """Ops whose output row r is made of the input's row r alone (they act on the last axis, or on each
    element): the token of each row is kept."""
    import torch
    import torch.nn.functional as F

    T = torch.Tensor
    ops = (F.linear, F.relu, F.relu6, F.gelu, F.silu, F.elu, F.leaky_relu, F.hardtanh, F.mish, F.dropout)
    ops += (torch.relu, T.relu, torch.tanh, T.tanh, torch.sigmoid, T.sigmoid, F.sigmoid, F.tanh, F.layer_norm)
    ops += (T.to, T.float, T.half, T.bfloat16, T.double, T.type_as, T.detach, T.clone, torch.clone)
    ops += (T.__add__, T.__radd__, T.__sub__, T.__rsub__, T.__mul__, T.__rmul__, T.__truediv__, T.__neg__)
    ops += (T.add, T.sub, T.mul, T.div, torch.add, torch.sub, torch.mul, torch.div, torch.neg, T.neg)
    ops += (torch.clamp, T.clamp, torch.clamp_min, T.clamp_min, torch.square, T.square, torch.pow, T.pow)
    ops += (torch.matmul, T.matmul, T.__matmul__)  # with a 2-D right operand: checked below
    return frozenset(ops)


def _last_axis_splits():
    import torch

    T = torch.Tensor
    return frozenset((T.chunk, torch.chunk, T.split, torch.split, T.tensor_split, torch.tensor_split))


@functools.cache
def _row_ops():
    """(reshapes, row-wise ops, last-axis splits): made once, on first use (torch is imported lazily)."""
    return _row_reshapes(), _row_wise(), _last_axis_splits()


def carried_rows(func, args: tuple, kwargs: dict, out, rows_of) -> list[tuple[object, object]]:
    """[(tensor, rows)] for the outputs of `func` whose rows' tokens are known: `rows` is a LongTensor of
    the output's shape less its last axis, each entry the flat index (b·tokens + t) of the token the row
    holds. `rows_of(tensor)` gives an operand's (None: not followed). Followed: indexing, index_select
    and reshapes of the axes before the last, cat and splits along them, splits of the last axis, the row-wise
    ops (`_row_wise`); anything else (a sort, a reduction over rows, an op not listed) ends the trail:
    the activation it reaches is then not attributed (said, and gated, by the probe), never guessed."""
    import torch

    reshapes, row_wise, splits = _row_ops()
    T = torch.Tensor
    source = args[0] if args and isinstance(args[0], torch.Tensor) else None
    rows = rows_of(source) if source is not None else None
    if func in (torch.cat, torch.concat) and isinstance(out, torch.Tensor) and args:
        parts = args[0]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if (
            not isinstance(parts, list | tuple)
            or not parts
            or out.dim() < 2
            or int(dim) % out.dim() == out.dim() - 1
        ):
            return []
        origins = [rows_of(p) if isinstance(p, torch.Tensor) else None for p in parts]
        if any(o is None for o in origins):
            return []
        return [(out, torch.cat(origins, int(dim) % out.dim()))]
    if rows is None:
        # a row-wise op whose tracked operand is not the first (`w * x`)
        if (
            func in row_wise
            and isinstance(out, torch.Tensor)
            and func not in (torch.matmul, T.matmul, T.__matmul__)
        ):
            tracked = [
                rows_of(a)
                for a in (*args[1:], *kwargs.values())
                if isinstance(a, torch.Tensor) and a.dim() >= 1
            ]
            tracked = [r for r in tracked if r is not None]
            if len(tracked) == 1 and tuple(tracked[0].shape) == tuple(out.shape[:-1]):
                return [(out, tracked[0])]
        return []
    lead = tuple(source.shape[:-1])
    if func in splits and isinstance(out, list | tuple):
        dim = int(kwargs.get("dim", args[2] if len(args) > 2 else 0)) % source.dim()
        if dim == source.dim() - 1:  # the features split (a gate and an up half): every piece the rows
            pieces = [rows] * len(out)
        else:  # the rows split (DeepSeek's rows of each expert, sorted): the tokens split alike
            sizes = args[1] if len(args) > 1 else next(v for k, v in kwargs.items() if k != "dim")
            pieces = func(rows, sizes, dim=dim)
        return [
            (piece, part)
            for piece, part in zip(out, pieces, strict=False)
            if isinstance(piece, torch.Tensor) and tuple(piece.shape[:-1]) == tuple(part.shape)
        ]
    if not isinstance(out, torch.Tensor) or out.dim() < 1:
        return []
    if func is T.__getitem__:
        key = args[1] if isinstance(args[1], tuple) else (args[1],)
        if any(k is Ellipsis for k in key) or sum(k is not None for k in key) >= source.dim():
            return []
        key = tuple(k.to(rows.device) if isinstance(k, torch.Tensor) else k for k in key)
        try:
            picked = rows[key]
        except (IndexError, TypeError, RuntimeError):
            return []
        same = tuple(picked.shape) == tuple(out.shape[:-1]) and out.shape[-1] == source.shape[-1]
        return [(out, picked)] if same else []
    if func in (torch.index_select, T.index_select):
        dim = int(args[1] if len(args) > 1 else kwargs["dim"]) % source.dim()
        index = args[2] if len(args) > 2 else kwargs["index"]
        return [] if dim == source.dim() - 1 else [(out, rows.index_select(dim, index.to(rows.device)))]
    if func in reshapes:
        if out.shape[-1] != source.shape[-1] or out.numel() != source.numel():
            return []
        return [(out, rows.reshape(tuple(out.shape[:-1])))]
    if func in row_wise:
        if func in (torch.matmul, T.matmul, T.__matmul__):
            other = args[1] if len(args) > 1 else None
            if not isinstance(other, torch.Tensor) or other.dim() != 2 or rows_of(other) is not None:
                return []
        others = [rows_of(a) for a in (*args[1:], *kwargs.values()) if isinstance(a, torch.Tensor)]
        if any(o is not None and not torch.equal(o, rows) for o in others):
            return []  # rows of other tokens joined elementwise: no one token per row
        return [(out, rows)] if tuple(out.shape[:-1]) == lead else []
    return []
