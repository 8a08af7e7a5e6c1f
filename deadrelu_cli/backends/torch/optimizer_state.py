"""Optimizer state in training checkpoints, for resume-safe fixes (ReDo resets the recycled units' moments).

Where it lives: a checkpoint dict's `optimizer` / `optimizer_state_dict` / … key (a torch
`Optimizer.state_dict()`), Lightning's `optimizer_states` list, or a Hugging Face Trainer checkpoint's
`optimizer.pt` next to the weights. Its parameters are numbered, not named: the numbers are mapped to
the architecture's parameter names (`param_names` when the optimizer saved them; else the order of
`model.parameters()`, or the Hugging Face Trainer's two groups, checked against every state's shape).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from deadrelu_cli.errors import UserError
from deadrelu_cli.loaders.torch_models import strip_wrapper_prefixes

OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optimizer_state", "optim", "opt")
LIGHTNING_KEY = "optimizer_states"
# per-element state a reset zeroes (what a fresh parameter starts with): Adam/AdamW (amsgrad too), NAdam
# and RAdam moments, SGD momentum, Adamax's exp_inf, RMSprop's square_avg/grad_avg, Adadelta's acc_delta
MOMENT_KEYS = (
    "exp_avg",
    "exp_avg_sq",
    "max_exp_avg_sq",
    "momentum_buffer",
    "exp_inf",
    "square_avg",
    "grad_avg",
    "acc_delta",
)
# Adafactor's (transformers) factored second moment of a parameter of 2 or more dims: a row factor over
# shape[:-1] and a column factor over shape[:-2] + shape[-1:] (the estimate is row ⊗ col / mean(row))
FACTORED_KEYS = ("exp_avg_sq_row", "exp_avg_sq_col")
# what tells Adafactor's saved param_groups apart (transformers.optimization.Adafactor's own settings)
ADAFACTOR_SETTINGS = {"clip_threshold", "decay_rate", "scale_parameter", "relative_step", "warmup_init"}
# torch optimizers a resume check rebuilds from a saved state, told apart by their hyperparameters (the
# keys of param_groups) and, once stepped, their per-parameter state keys (Adam stands for AdamW: the
# group's decoupled_weight_decay says which)
OPTIMIZERS = ("Adam", "SGD", "NAdam", "RAdam", "Adamax", "RMSprop", "Adagrad", "Adadelta")
# group keys that come and go with torch versions (older checkpoints lack them): not the optimizer's kind
VERSION_KEYS = {"foreach", "maximize", "capturable", "differentiable", "fused", "decoupled_weight_decay"}


def is_optimizer_state(obj) -> bool:
    return (
        isinstance(obj, Mapping)
        and isinstance(obj.get("state"), Mapping)
        and isinstance(obj.get("param_groups"), list)
    )


def find_optimizer_states(checkpoint) -> list[tuple[tuple, dict]]:
    """(path of keys, optimizer state dict) for each optimizer state in a checkpoint dict."""
    found: list[tuple[tuple, dict]] = []
    if not isinstance(checkpoint, Mapping):
        return found
    if is_optimizer_state(checkpoint):  # an optimizer.pt on its own
        return [((), checkpoint)]
    # by what they hold, not by their key: the usual names first, then any other key (a GAN script's
    # `opt_g` / `opt_d`, a list or a dict of them): an optimizer state left unreset would kill the
    # recycled units again
    keys = [k for k in (*OPTIMIZER_KEYS, LIGHTNING_KEY) if k in checkpoint]
    keys += [k for k in checkpoint if k not in keys]
    for key in keys:
        value = checkpoint[key]
        if is_optimizer_state(value):
            found.append(((key,), value))
        elif isinstance(value, (list, tuple)):
            found.extend(((key, i), s) for i, s in enumerate(value) if is_optimizer_state(s))
        elif isinstance(value, Mapping):
            found.extend(((key, k), s) for k, s in value.items() if is_optimizer_state(s))
    return found


# transformers' Trainer.get_decay_parameter_names: no weight decay for biases and norm layers
_NO_DECAY = [
    re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
]


def hf_decay_names(model: nn.Module) -> set[str]:
    """The parameters a Hugging Face Trainer puts in its weight-decay group (the first of two)."""

    def names(module: nn.Module) -> list[str]:
        out = []
        for child_name, child in module.named_children():
            out += [
                f"{child_name}.{n}"
                for n in names(child)
                if not isinstance(child, nn.LayerNorm)
                and not any(p.search(f"{child_name}.{n}".lower()) for p in _NO_DECAY)
            ]
        out += [k for k in module._parameters if not any(p.search(k.lower()) for p in _NO_DECAY)]
        return out

    return set(names(model))


@dataclass
class ParamMap:
    """Optimizer parameter number -> the architecture's parameter name, and how it was found."""

    names: dict[int, str]
    source: str
    notes: list[str] = field(default_factory=list)


def factored_axis(key: str, axis: int, dims: int) -> int | None:
    """Where the parameter's `axis` (of `dims`) is in Adafactor's row or column factor (None: that factor
    averages over it)."""
    if key == "exp_avg_sq_row":
        return None if axis == dims - 1 else axis
    if axis == dims - 2:
        return None
    return dims - 2 if axis == dims - 1 else axis


def _factored_shape(entry: Mapping) -> tuple[int, ...] | None:
    """The parameter's shape from Adafactor's row and column factors (None: not factored)."""
    row, col = (entry.get(key) for key in FACTORED_KEYS)
    if isinstance(row, torch.Tensor) and isinstance(col, torch.Tensor) and row.dim() >= 1 and col.dim() >= 1:
        return (*row.shape, col.shape[-1])
    return None


def _fits(state: Mapping, names: dict[int, str], params: dict[str, torch.Tensor]) -> bool:
    for index, entry in state.items():
        name = names.get(index)
        if name is None:
            return False
        for key, value in entry.items():
            if key in MOMENT_KEYS and isinstance(value, torch.Tensor) and value.shape != params[name].shape:
                return False
        factored = _factored_shape(entry)
        if factored is not None and factored != tuple(params[name].shape):
            return False
    return True


def map_parameters(optimizer_state: Mapping, model: nn.Module) -> ParamMap:
    """Which architecture parameter each numbered parameter of the optimizer state is."""
    params = dict(model.named_parameters())
    groups = optimizer_state["param_groups"]
    ids = [i for group in groups for i in group["params"]]
    if all("param_names" in group for group in groups):
        names = {i: n for group in groups for i, n in zip(group["params"], group["param_names"], strict=True)}
        # names saved through a wrapper (`ddp.named_parameters()`: `module.…`; a LightningModule's
        # `self.named_parameters()`: `model.…`; torch.compile: `_orig_mod.…`) are the architecture's
        names = {
            i: n for n, i in strip_wrapper_prefixes({n: i for i, n in names.items()}, set(params)).items()
        }
        names = {i: n for i, n in names.items() if n in params} if set(names.values()) <= set(params) else {}
        if names and _fits(optimizer_state["state"], names, params):
            return ParamMap(names, "the optimizer's saved parameter names")
    trainable = [n for n, p in params.items() if p.requires_grad]
    candidates = [("the order of model.parameters()", trainable)]
    decay = hf_decay_names(model) if len(groups) == 2 else None
    if decay is not None:
        if len(groups[0]["params"]) == sum(n in decay for n in trainable):
            candidates.append(
                (
                    "the Hugging Face Trainer's groups (weight decay, then none)",
                    [n for n in trainable if n in decay] + [n for n in trainable if n not in decay],
                )
            )
    fitting = []
    for source, order in candidates:
        if len(order) != len(ids):
            continue
        names = dict(zip(ids, order, strict=True))
        if _fits(optimizer_state["state"], names, params):
            fitting.append(ParamMap(names, source))
    if not fitting:  # the param groups in another order, or parameters left out (frozen): one fit only
        fitting = _reordered_or_partial(optimizer_state, groups, trainable, params, decay)
    if len(fitting) > 1 and fitting[0].names != fitting[1].names:
        raise UserError(
            "cannot tell which architecture parameter each optimizer entry belongs to (the shapes fit both "
            f"{fitting[0].source} and {fitting[1].source}); save the optimizer with named parameters "
            "(torch.optim.X(model.named_parameters(), …))"
        )
    if not fitting:
        raise UserError(
            f"the optimizer state has {len(ids)} parameters in {len(groups)} group(s) that do not match the "
            f"{len(trainable)} trainable parameters of --arch (by order and shape, also with its groups "
            "reordered or parameters left out); the checkpoint's optimizer is not for this architecture, or "
            "save it with named parameters (torch.optim.X(model.named_parameters(), …))"
        )
    return fitting[0]


def _state_shape(entry: Mapping | None) -> tuple[int, ...] | None:
    """The shape of a parameter as its optimizer state shows it (None: no per-element state yet)."""
    for key, value in (entry or {}).items():
        if key in MOMENT_KEYS and isinstance(value, torch.Tensor) and value.dim() > 0:
            return tuple(value.shape)
    return _factored_shape(entry or {})


def _embeddings(shapes: list, order: list[str], params: dict[str, torch.Tensor]) -> tuple[int, list[str]]:
    """How many ways (0, 1, or 2 for "more") `shapes` fit an order-preserving subsequence of `order`
    (a None shape fits anything), and the names of one such fit."""
    k, n = len(shapes), len(order)
    ways = [[0] * (n + 1) for _ in range(k + 1)]
    ways[k] = [1] * (n + 1)
    for i in range(k - 1, -1, -1):
        for j in range(n - 1, -1, -1):
            skip = ways[i][j + 1] if n - j > k - i else 0
            fits = shapes[i] is None or shapes[i] == tuple(params[order[j]].shape)
            ways[i][j] = min(2, skip + (ways[i + 1][j + 1] if fits else 0))
    chosen, j = [], 0
    for i in range(k):
        if ways[0][0] == 0:
            break
        while not (
            (shapes[i] is None or shapes[i] == tuple(params[order[j]].shape)) and ways[i + 1][j + 1] > 0
        ):
            j += 1
        chosen.append(order[j])
        j += 1
    return ways[0][0], chosen


def _reordered_or_partial(
    optimizer_state: Mapping,
    groups: list,
    trainable: list[str],
    params: dict[str, torch.Tensor],
    decay: set[str] | None,
) -> list[ParamMap]:
    """Param groups listed in another order than the model's (a head with its own learning rate first),
    or an optimizer made over the trainable parameters only (`filter(lambda p: p.requires_grad, …)`): the
    groups, in some order, are the architecture's parameters in order with some left out; or the
    Hugging Face Trainer's two groups (`decay`: the names of the first) of a model with frozen parameters.
    Used only when exactly one arrangement fits every state's shape; two or more that fit differently
    refuse."""
    orders = list(itertools.permutations(range(len(groups)))) if len(groups) <= 4 else [range(len(groups))]
    found: dict[tuple, ParamMap] = {}
    if decay is not None:  # each Trainer group: its own names in order, some left out
        names: dict[int, str] = {}
        for group, pool in zip(
            groups,
            ([n for n in trainable if n in decay], [n for n in trainable if n not in decay]),
            strict=True,
        ):
            shapes = [_state_shape(optimizer_state["state"].get(i)) for i in group["params"]]
            ways, chosen = _embeddings(shapes, pool, params) if len(shapes) <= len(pool) else (0, [])
            if ways != 1:
                break
            names.update(zip(group["params"], chosen, strict=True))
        else:
            left_out = len(trainable) - len(names)
            mapping = ParamMap(
                names,
                f"the Hugging Face Trainer's groups with {left_out} parameter(s) the optimizer does not hold "
                "(frozen, or another optimizer's)",
            )
            found[tuple(sorted(names.items()))] = mapping
    for order in orders:
        ids = [i for g in order for i in groups[g]["params"]]
        if len(ids) > len(trainable):
            continue
        ways, names = _embeddings(
            [_state_shape(optimizer_state["state"].get(i)) for i in ids], trainable, params
        )
        if ways == 0:
            continue
        left_out = len(trainable) - len(ids)
        how = ", ".join(
            part
            for part in (
                "its param groups reordered" if list(order) != sorted(order) else "",
                f"{left_out} parameter(s) the optimizer does not hold (frozen, or another optimizer's)"
                if left_out
                else "",
            )
            if part
        )
        mapping = ParamMap(dict(zip(ids, names, strict=True)), f"the order of model.parameters() with {how}")
        if ways > 1:  # this arrangement alone fits in two ways: nothing tells which
            return [mapping, ParamMap({}, f"another choice of the {left_out} left out")]
        found.setdefault(tuple(sorted(mapping.names.items())), mapping)
    return list(found.values())


def reset_moments(
    optimizer_state: dict, mapping: ParamMap, touched: dict[str, list[tuple[int, list[int]]]]
) -> tuple[int, list[str]]:
    """Zero the moments of the touched entries (parameter name -> (axis, indices) pairs) in place.
    Returns how many parameters were reset, and the per-element state keys left alone (unknown kinds)."""
    by_name = {name: index for index, name in mapping.names.items()}
    reset = 0
    unknown: set[str] = set()
    for name, parts in touched.items():
        index = by_name.get(name)
        entry = optimizer_state["state"].get(index) if index is not None else None
        if entry is None:  # no state yet (never stepped, or frozen): nothing to reset
            continue
        for key, value in list(entry.items()):
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue
            if key not in MOMENT_KEYS and key not in FACTORED_KEYS:
                unknown.add(key)
                continue
            value = value.clone()
            for axis, indices in parts:
                if key in FACTORED_KEYS:  # a recycled row's entry of the row factor, a zeroed column's of
                    # the column factor: their estimate row ⊗ col / mean(row) is then zero, as for a fresh one
                    axis = factored_axis(key, axis, value.dim() + 1)
                    if axis is None:
                        continue
                value.index_fill_(axis, torch.tensor(indices, dtype=torch.long, device=value.device), 0)
            entry[key] = value
        reset += 1
    return reset, sorted(unknown)


def optimizer_class(optimizer_state: Mapping) -> type[torch.optim.Optimizer] | None:
    """The torch optimizer the state was saved from: every hyperparameter of its kind is in the saved
    groups and, once it has stepped, one step of it makes the same per-parameter state keys. The kind
    with the most hyperparameters wins (RAdam's are a subset of Adam's); None when no kind fits."""
    groups = optimizer_state["param_groups"]
    saved = set.intersection(*(set(group) for group in groups)) if groups else set()
    kinds = {key for entry in optimizer_state["state"].values() for key in entry}
    best: tuple[type, int] | None = None
    for name in OPTIMIZERS:
        cls = getattr(torch.optim, name)
        probe = torch.zeros(1, requires_grad=True)
        core = set(cls([probe]).defaults) - VERSION_KEYS
        if not core <= saved:
            continue
        if kinds:  # the state keys one step makes with the saved settings (amsgrad, momentum, centered)
            try:
                optimizer = cls([probe], **{key: groups[0][key] for key in core})
                probe.grad = torch.zeros_like(probe)
                optimizer.step()
            except (TypeError, ValueError, RuntimeError):
                continue
            if set(optimizer.state[probe]) != kinds:
                continue
        if best is None or len(core) > best[1]:
            best = (cls, len(core))
    if best is None and ADAFACTOR_SETTINGS <= saved:
        try:  # the Hugging Face Trainer's `optim="adafactor"`
            from transformers.optimization import Adafactor
        except ImportError:
            return None
        return Adafactor
    return best[0] if best else None


def optimizer_for(optimizer_state: Mapping, model: nn.Module, mapping: ParamMap) -> torch.optim.Optimizer:
    """An optimizer of the kind the state was saved from (see `optimizer_class`), loaded with it."""
    params = dict(model.named_parameters())
    groups = [
        {"params": [params[mapping.names[i]] for i in group["params"]]}
        for group in optimizer_state["param_groups"]
    ]
    cls = optimizer_class(optimizer_state)
    if cls is None:
        kinds = {key for entry in optimizer_state["state"].values() for key in entry}
        settings = {key for group in optimizer_state["param_groups"] for key in group} - {
            "params",
            "param_names",
        }
        found = ", ".join(sorted(kinds or settings)) or "nothing"
        raise UserError(
            f"optimizer state with {found}: not one of torch's {', '.join(OPTIMIZERS)} (AdamW too) nor "
            "transformers' Adafactor (with transformers installed), so the resume cannot be checked here; pass "
            "--resume-steps 0 to write the fix without the resume check"
        )
    optimizer = cls(groups)
    optimizer.load_state_dict(optimizer_state)
    return optimizer
