"""prune on an ExportedProgram or a TorchScript module: narrow the tensors of its module (program.module(),
whose parameters keep their original names; a ScriptModule's own); the units' tensors are found by
wiring.torch.exported_wiring / script_wiring."""

from __future__ import annotations

import torch
from torch import fx

from deadrelu_cli.wiring.torch import submodule


def narrow(
    graph_module: fx.GraphModule | torch.jit.ScriptModule,
    keep_out: dict[str, set[int]],
    keep_in: dict[str, set[int]],
) -> None:
    """prune on a program's module: keep only the listed output units of each named linear/conv/batch_norm
    (rows of weight, bias, running stats) and input columns of each consumer's weight. The graph's ops
    take their sizes from these tensors, so re-exporting gives the narrower program."""
    for prefix in sorted(set(keep_out) | set(keep_in)):
        owner = submodule(graph_module, prefix)
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
            else:  # (a ScriptModule has no register_buffer; setting an existing buffer replaces it)
                setattr(owner, attr, new.clone())
