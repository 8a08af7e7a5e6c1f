"""Where a layer's units live in an ExportedProgram: read off its ATen graph (program.module()).

The module of an ExportedProgram keeps every parameter under its original name but no nn.Linear /
nn.Conv objects, so the producer (a linear/conv node, optionally followed by batch_norm) and the one
linear/conv reading the activation are found in the graph, and their get_attr targets give the
tensors that reinit and kick edit in place (torch_eager.UnitWiring).
"""

from __future__ import annotations

import torch
from torch import fx

from deadrelu_cli.backends.torch.strategies import UnitWiring
from deadrelu_cli.probe.exported import op_base

_LINEAR_OR_CONV = {"linear", "conv1d", "conv2d", "conv3d"}
_BATCH_NORM = {"batch_norm", "_native_batch_norm_legit_no_training"}
# ops after an activation that keep each unit's values in their own slots
_UNIT_PRESERVING = {
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "flatten",
    "view",
    "reshape",
    "dropout",
    "clone",
    "contiguous",
    "alias",
}


def _base(node: fx.Node) -> str:
    return op_base(node.target) if node.op == "call_function" else ""


def _attr_target(arg) -> str | None:
    return str(arg.target) if isinstance(arg, fx.Node) and arg.op == "get_attr" else None


def _groups(node: fx.Node) -> int:
    return int(node.args[6]) if _base(node) != "linear" and len(node.args) > 6 else 1


def exported_wiring(
    graph_module: fx.GraphModule, node: fx.Node, need_consumer: bool = True
) -> UnitWiring | str:
    """The UnitWiring of the activation `node`, or why it must be skipped."""
    pre = node.args[0] if node.args else None
    bn = None
    if isinstance(pre, fx.Node) and _base(pre) in _BATCH_NORM and len(pre.users) == 1:
        bn, pre = pre, pre.args[0]
    if not isinstance(pre, fx.Node) or _base(pre) not in _LINEAR_OR_CONV or len(pre.users) != 1:
        return "skipped: not produced by one linear/conv (or batch_norm after one) in the graph"
    weight_name = _attr_target(pre.args[1])
    bias_name = _attr_target(pre.args[2]) if len(pre.args) > 2 else None
    if weight_name is None or _groups(pre) != 1:
        return f"skipped: producer {weight_name or pre.name} is not a plain linear/conv with its own weight"
    bn_tensors, bn_name = None, ""
    if bn is not None:
        names = [_attr_target(a) for a in bn.args[1:5]]
        bn_tensors = {
            key: named_tensor(graph_module, name)
            for key, name in zip(("weight", "bias", "running_mean", "running_var"), names, strict=True)
        }
        bn_name = (names[1] or names[0] or bn.name).rsplit(".", 1)[0]
    wiring = UnitWiring(
        named_tensor(graph_module, weight_name),
        named_tensor(graph_module, bias_name),
        weight_name.rsplit(".", 1)[0],
        bn_tensors,
        bn_name,
    )
    if not need_consumer:
        return wiring
    current = node
    for _ in range(16):
        if len(current.users) != 1:
            return f"skipped: its output goes to {len(current.users)} nodes, not to exactly one linear/conv"
        (user,) = current.users
        if _base(user) in _UNIT_PRESERVING and user.args[0] is current:
            current = user
            continue
        consumer_weight = _attr_target(user.args[1]) if len(user.args) > 1 else None
        if _base(user) not in _LINEAR_OR_CONV or user.args[0] is not current or consumer_weight is None:
            return f"skipped: its output goes to {user.name} (e.g. a residual add), not to a linear/conv"
        if _groups(user) != 1:
            return f"skipped: consumer {consumer_weight} is a grouped convolution"
        wiring.consumer_weight = named_tensor(graph_module, consumer_weight)
        wiring.consumer_name = consumer_weight.rsplit(".", 1)[0]
        return wiring
    return "skipped: its output does not reach a linear/conv"


def named_tensor(module: torch.nn.Module, name: str | None) -> torch.Tensor | None:
    """A parameter or buffer by its dotted name (an nn.Module, or a program's module), else None."""
    if name is None:
        return None
    for getter in (module.get_parameter, module.get_buffer):
        try:
            return getter(name)
        except AttributeError:
            continue
    return None


def narrow(graph_module: fx.GraphModule, keep_out: dict[str, set[int]], keep_in: dict[str, set[int]]) -> None:
    """prune on a program's module: keep only the listed output units of each named linear/conv/batch_norm
    (rows of weight, bias, running stats) and input columns of each consumer's weight. The graph's ops
    take their sizes from these tensors, so re-exporting gives the narrower program."""
    for prefix in sorted(set(keep_out) | set(keep_in)):
        owner = graph_module.get_submodule(prefix)
        for attr in ("weight", "bias", "running_mean", "running_var"):
            tensor = getattr(owner, attr, None)
            if not isinstance(tensor, torch.Tensor):
                continue
            new = tensor.detach()
            if prefix in keep_out:
                new = new[sorted(keep_out[prefix])]
            if prefix in keep_in and attr == "weight" and new.dim() > 1:
                new = new[:, sorted(keep_in[prefix])]
            if isinstance(tensor, torch.nn.Parameter):
                setattr(owner, attr, torch.nn.Parameter(new.clone(), requires_grad=tensor.requires_grad))
            else:
                owner.register_buffer(attr, new.clone())
