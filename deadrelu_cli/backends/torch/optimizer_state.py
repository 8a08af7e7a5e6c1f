"""Optimizer state in training checkpoints, for resume-safe fixes (ReDo resets the recycled units' moments).

Where it lives: a checkpoint dict's `optimizer` / `optimizer_state_dict` / … key (a torch
`Optimizer.state_dict()`), Lightning's `optimizer_states` list, or a Hugging Face Trainer checkpoint's
`optimizer.pt` next to the weights. Its parameters are numbered, not named: the numbers are mapped to
the architecture's parameter names (`param_names` when the optimizer saved them; else the order of
`model.parameters()`, or the Hugging Face Trainer's two groups, checked against every state's shape).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from deadrelu_cli.errors import UserError

OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optimizer_state", "optim", "opt")
LIGHTNING_KEY = "optimizer_states"
HF_OPTIMIZER_FILE = "optimizer.pt"
# per-element state a reset zeroes: Adam/AdamW (amsgrad too) moments, SGD momentum
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


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
    for key in OPTIMIZER_KEYS:
        if is_optimizer_state(checkpoint.get(key)):
            found.append(((key,), checkpoint[key]))
    states = checkpoint.get(LIGHTNING_KEY)
    if isinstance(states, list):
        found.extend(((LIGHTNING_KEY, i), s) for i, s in enumerate(states) if is_optimizer_state(s))
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


def _fits(state: Mapping, names: dict[int, str], params: dict[str, torch.Tensor]) -> bool:
    for index, entry in state.items():
        name = names.get(index)
        if name is None:
            return False
        for key, value in entry.items():
            if key in MOMENT_KEYS and isinstance(value, torch.Tensor) and value.shape != params[name].shape:
                return False
    return True


def map_parameters(optimizer_state: Mapping, model: nn.Module) -> ParamMap:
    """Which architecture parameter each numbered parameter of the optimizer state is."""
    params = dict(model.named_parameters())
    groups = optimizer_state["param_groups"]
    ids = [i for group in groups for i in group["params"]]
    if all("param_names" in group for group in groups):
        names = {i: n for group in groups for i, n in zip(group["params"], group["param_names"], strict=True)}
        names = {i: n for i, n in names.items() if n in params} if set(names.values()) <= set(params) else {}
        if names and _fits(optimizer_state["state"], names, params):
            return ParamMap(names, "the optimizer's saved parameter names")
    trainable = [n for n, p in params.items() if p.requires_grad]
    candidates = [("the order of model.parameters()", trainable)]
    if len(groups) == 2:
        decay = hf_decay_names(model)
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
    if len(fitting) > 1 and fitting[0].names != fitting[1].names:
        raise UserError(
            "cannot tell which architecture parameter each optimizer entry belongs to (the shapes fit both "
            f"{fitting[0].source} and {fitting[1].source}); save the optimizer with named parameters "
            "(torch.optim.X(model.named_parameters(), …))"
        )
    if not fitting:
        raise UserError(
            f"the optimizer state has {len(ids)} parameters in {len(groups)} group(s) that do not match the "
            f"{len(trainable)} trainable parameters of --arch (by order and shape); the checkpoint's optimizer "
            "is not for this architecture"
        )
    return fitting[0]


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
            if key not in MOMENT_KEYS:
                unknown.add(key)
                continue
            value = value.clone()
            for axis, indices in parts:
                value.index_fill_(axis, torch.tensor(indices, dtype=torch.long, device=value.device), 0)
            entry[key] = value
        reset += 1
    return reset, sorted(unknown)


def optimizer_for(optimizer_state: Mapping, model: nn.Module, mapping: ParamMap) -> torch.optim.Optimizer:
    """An optimizer of the kind the state was saved from (Adam/AdamW or SGD), loaded with it."""
    params = dict(model.named_parameters())
    kinds = {key for entry in optimizer_state["state"].values() for key in entry}
    groups = [
        {"params": [params[mapping.names[i]] for i in group["params"]]}
        for group in optimizer_state["param_groups"]
    ]
    # saved before its first step, an optimizer has no moments yet: its hyperparameters tell the kind
    settings = {key for group in optimizer_state["param_groups"] for key in group} if not kinds else set()
    if "exp_avg" in kinds or {"betas", "eps", "amsgrad"} <= settings:
        optimizer: torch.optim.Optimizer = torch.optim.Adam(groups)  # AdamW: decoupled_weight_decay=True
    elif "momentum_buffer" in kinds or {"momentum", "dampening", "nesterov"} <= settings:
        optimizer = torch.optim.SGD(groups, lr=0.0)
    else:
        found = ", ".join(sorted(kinds or settings - {"params"})) or "nothing"
        raise UserError(
            f"optimizer state with {found}: only Adam/AdamW and SGD states can be resumed here; "
            "pass --resume-steps 0 to write the fix without the resume check"
        )
    optimizer.load_state_dict(optimizer_state)
    return optimizer
