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


def _kept_tokens(registry, site: str, hidden_states):
    """bool [tokens]: which rows of the experts' input ([batch·tokens, hidden], sample-major, as the MoE
    blocks flatten it) are kept positions of the scan's token mask; None without one, or when the rows
    are not the mask's positions."""
    from deadrelu_cli.probe.accumulator import PositionMask, RoutedRows

    mask = None if registry is None else registry.mask_for(site)
    if not isinstance(mask, PositionMask) or isinstance(mask, RoutedRows) or hidden_states.dim() != 2:
        return None
    if hidden_states.shape[0] != mask.batch * mask.tokens:
        return None
    return mask.mask.reshape(-1).to(hidden_states.device)


def _per_expert(module, run, path: str, probe_of):
    """A forward for `module` that runs `run` (its forward as it was: a wrapper such as accelerate's
    device hook, or the class's) once per expert, with the routing restricted to it and that expert's
    own activation module in place of the shared one. With a token mask (the registry's), the rows of
    kept tokens and those of padding run apart (one site still), the latter under a mask that keeps none: an
    expert's rows are the tokens routed to it, padding included, in an order of the implementation's,
    which no [batch, tokens] mask reads; the sum of the two runs is the expert's output."""
    import torch

    from deadrelu_cli.probe.accumulator import RoutedRows

    def forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        shared = module._modules[ACTIVATION]
        probe = probe_of() if probe_of is not None else None
        registry = getattr(probe, "registry", None) if hasattr(probe, "name_again") else None
        out = None
        try:
            for expert in range(module.num_experts):
                chosen = top_k_index == expert
                if not bool(chosen.any()):
                    continue  # no token reached it: its units saw nothing (the table says it did not run)
                module._modules[ACTIVATION] = module._modules[str(expert)]._modules[ACTIVATION]
                site = f"{path}.{expert}.{ACTIVATION}"
                keep = _kept_tokens(registry, site, hidden_states)
                groups = (
                    [(chosen, None)]
                    if keep is None
                    else [(chosen & keep[:, None], True), (chosen & ~keep[:, None], False)]
                )
                for routed, kept in groups:
                    if kept is not None:
                        rows = int(routed.any(1).sum())
                        if not rows:
                            continue
                        # every row of this run kept (real tokens) or none (padding): the order is no matter
                        registry.set_scoped_mask(site, RoutedRows(rows, kept))
                    only = torch.where(routed, top_k_index, torch.full_like(top_k_index, module.num_experts))
                    try:
                        part = run(hidden_states, only, top_k_weights, *args, **kwargs)
                    finally:
                        if kept is not None:
                            registry.given_scope(site)
                            probe.name_again(site)  # both runs are the one site
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
def experts_apart(model, probe_of=None) -> Iterator[dict[str, int]]:
    """Within: every fused experts module of `model` counts each expert's units apart (their sites are
    `<path>.<e>.act_fn`); {module path: experts} is yielded. PROBE_OF: a function giving the eager probe
    once there is one (its registry's token mask: padding rows are not counted). The model is as it
    was afterwards."""
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
            module.forward = _per_expert(module, run, path, probe_of)
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
