"""Counting inside the graph (`--compile`): the per-unit reductions become extra outputs of the model's
FX graph, so torch.compile fuses them into the model's own kernels.

The model is exported with torch.export (an ExportedProgram is used as it is), each activation node
gets `amax` of its input and the count / sum of its output as new graph nodes, and the graph returns
(original outputs, statistics). The host only adds the returned [C]-vectors to the counters, on the
model's device: no Python runs per activation, no host sync.
"""

from __future__ import annotations

import os

import torch
from torch import fx

from deadrelu_cli.errors import UserError
from deadrelu_cli.probe.base import ProbeSettings, SiteRegistry, infer_channel_dim
from deadrelu_cli.probe.exported import StaticSite, find_sites
from deadrelu_cli.probe.hidden import graph_hidden, prepare_graph
from deadrelu_cli.probe.ops import counts_from_output, resolve_channel_dim, threshold_below
from deadrelu_cli.stats import CAPPED_OPS

aten = torch.ops.aten


def export_for_stats(
    module: torch.nn.Module, example: tuple, names: list[str] | None = None
) -> fx.GraphModule:
    """The module as an FX graph with a dynamic batch axis. On CUDA, torch 2.11 guards convolutions'
    batch at <= 65535 (cuDNN's limit) and refuses an unbounded Dim: then the range is bounded so.
    `names`: the example's tensors go to forward() by these names (data arrays named after its
    arguments); the graph then takes them positionally in that order."""
    program, error = None, None
    for bounds in ({"min": 1}, {"max": 65535}, {"min": 2, "max": 65535}):
        batch = torch.export.Dim("batch", **bounds)
        try:
            if names:
                kwargs = dict(zip(names, example, strict=True))
                shapes = {name: {0: batch} for name in names}
                program = torch.export.export(module, (), kwargs=kwargs, dynamic_shapes=shapes)
            else:
                program = torch.export.export(
                    module, example, dynamic_shapes=tuple({0: batch} for _ in example)
                )
            break
        except Exception as exc:  # torch.export raises many types; the message is what the user needs
            error = error or exc
    if program is None:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"--compile and --certify need a model that torch.export can capture, and this one fails: {first}; "
            "scan without them"
        ) from None
    from deadrelu_cli.loaders.torch_models import graph_module_with_stack

    return graph_module_with_stack(program)


class InGraphProbe:
    def __init__(
        self,
        graph_module: fx.GraphModule,
        settings: ProbeSettings,
        compile_graph: bool,
        from_input: bool | None = None,
    ) -> None:
        self.settings = settings
        # relu/relu6: every statistic from the activation's input (x > t, Σ op(x), x >= cap), so that the
        # reductions share one input and the compiler can make them one kernel (on CUDA, instead of one
        # over the input and more over the output); DEADRELU_GRAPH_STATS=input turns it on (measured by
        # scripts/gpu_steady.py before it becomes the default)
        self.from_input = (
            os.environ.get("DEADRELU_GRAPH_STATS", "") == "input" if from_input is None else from_input
        )
        self.registry = SiteRegistry(settings)
        self.sites: list[tuple[StaticSite, int, bool]] = []  # (site, channel dim, has saturation output)
        graph = graph_module.graph
        prepare_graph(graph_module)
        self.hidden = graph_hidden(graph_module, settings.ops)
        output = next(node for node in graph.nodes if node.op == "output")
        stats: list[fx.Node] = []
        for node, site in list(find_sites(graph, settings.ops)):
            stats += self._instrument(graph, node, site)
            self.registry.declare(site.name, site.op, site.module_type, site.producer)
        graph._codegen = fx.graph.CodeGen()  # plain positional in, (outputs, statistics) out
        output.args = ((output.args[0], tuple(stats)),)
        graph_module.recompile()
        self.graph_module = graph_module
        self.runner = torch.compile(graph_module, dynamic=True) if compile_graph else graph_module

    def _instrument(self, graph: fx.Graph, node: fx.Node, site: StaticSite) -> list[fx.Node]:
        pre = node.args[0]
        value = pre.meta.get("val") if isinstance(pre, fx.Node) else None
        if not isinstance(value, torch.Tensor):
            raise UserError(
                f"--compile: the shape of layer {site.name}'s input is unknown; scan without --compile"
            )
        rank = value.dim()
        self.registry.note_axis_guess(
            site.name, rank, site.channel_first is not None or site.unit_axis is not None, site.axis_lost
        )
        dim = (
            resolve_channel_dim(
                rank, infer_channel_dim(rank, site.channel_first, site.unit_axis), self.settings.channel_dim
            )
            if rank > 1
            else 0
        )
        dims = [d for d in range(rank) if d != dim]
        threshold = threshold_below(self.settings.threshold, value.dtype)
        from_output = counts_from_output(site.op, threshold)
        if site.in_place and not from_output:
            raise UserError(
                f"--compile: in-place {site.op} at {site.name} needs its input; scan without --compile"
            )
        if self.from_input and from_output and site.op in ("relu", "relu6"):
            return self._instrument_from_input(graph, node, site, pre, dim, dims)
        with graph.inserting_before(node):  # before an in-place op overwrites its input
            maximum = graph.call_function(aten.amax.default, (pre, dims, False))
            fired_from_input = None if from_output else graph.call_function(aten.gt.Scalar, (pre, threshold))
        with graph.inserting_after(node):
            fired = fired_from_input or graph.call_function(aten.gt.Scalar, (node, threshold))
        with graph.inserting_after(fired):
            count = graph.call_function(aten.sum.dim_IntList, (fired, dims, False), {"dtype": torch.int64})
        with graph.inserting_after(count):
            magnitude = (
                node if site.op in ("relu", "relu6") else graph.call_function(aten.abs.default, (node,))
            )
        with graph.inserting_after(magnitude):
            total = graph.call_function(
                aten.sum.dim_IntList, (magnitude, dims, False), {"dtype": torch.float32}
            )
        with graph.inserting_after(total):
            numel = graph.call_function(aten.sym_numel.default, (node,))
        outputs = [maximum, count, total, numel]
        if site.op in CAPPED_OPS:
            with graph.inserting_after(numel):
                capped = graph.call_function(aten.ge.Scalar, (node, CAPPED_OPS[site.op]))
            with graph.inserting_after(capped):
                outputs.append(
                    graph.call_function(aten.sum.dim_IntList, (capped, dims, False), {"dtype": torch.int64})
                )
        self.sites.append((site, dim, site.op in CAPPED_OPS))
        return outputs

    def _instrument_from_input(self, graph, node, site, pre, dim: int, dims: list[int]) -> list[fx.Node]:
        """Every statistic of a relu/relu6 site read off its input, all inserted before the op (an
        in-place op then still sees its input): x > t is y > t, op(x) >= 0 is |y|, x >= 6 is y >= 6."""
        threshold = threshold_below(self.settings.threshold, pre.meta["val"].dtype)
        cap = CAPPED_OPS.get(site.op)
        with graph.inserting_before(node):
            maximum = graph.call_function(aten.amax.default, (pre, dims, False))
            fired = graph.call_function(aten.gt.Scalar, (pre, threshold))
            count = graph.call_function(aten.sum.dim_IntList, (fired, dims, False), {"dtype": torch.int64})
            clamped = (
                graph.call_function(aten.clamp_min.default, (pre, 0.0))
                if cap is None
                else graph.call_function(aten.clamp.default, (pre, 0.0, cap))
            )
            total = graph.call_function(
                aten.sum.dim_IntList, (clamped, dims, False), {"dtype": torch.float32}
            )
            numel = graph.call_function(aten.sym_numel.default, (pre,))
            outputs = [maximum, count, total, numel]
            if cap is not None:
                capped = graph.call_function(aten.ge.Scalar, (pre, cap))
                outputs.append(
                    graph.call_function(aten.sum.dim_IntList, (capped, dims, False), {"dtype": torch.int64})
                )
        self.sites.append((site, dim, cap is not None))
        return outputs

    def run(self, inputs: tuple, kwargs: dict | None = None):
        # keyword inputs (arrays named after forward()'s arguments) by name: the graph was exported so
        out, stats = self.runner(*inputs, **(kwargs or {}))
        position = 0
        for site, dim, capped in self.sites:
            width = 5 if capped else 4
            maximum, count, total, numel, *saturated = stats[position : position + width]
            position += width
            self.registry.add_batch(
                site.name,
                site.op,
                dim,
                maximum,
                count,
                total,
                int(numel),
                saturated[0] if saturated else None,
                site.module_type,
                site.producer,
            )
        return out
