"""`deadrelu inspect`: list the activation sites of a model, without data."""

from __future__ import annotations

import typer

from deadrelu_cli.cli import options as opt
from deadrelu_cli.cli.console import make_console

InputShape = opt.Annotated[
    str | None,
    typer.Option(
        "--input-shape", help="e.g. 3x32x32: run one zero sample to find functional activations too."
    ),
]


@opt.command
def inspect(
    model: opt.Model,
    loading: opt.Loading = None,
    ops: opt.Ops = None,
    input_shape: InputShape = None,
    quiet: opt.QuietSummary = False,
) -> None:
    """List the activation call sites of MODEL (name, op, module type) without running data."""
    from deadrelu_cli.display import rich_text, terminal_text
    from deadrelu_cli.probe.ops import ALL_OPS, parse_ops
    from deadrelu_cli.report.table import plain_table
    from deadrelu_cli.sites import list_sites

    wanted = parse_ops(ops)
    sites, notes = list_sites(
        model, loading.arch, loading.trust_pickle, wanted, input_shape, loading.weights_key
    )
    console = make_console()
    console.print(terminal_text(f"{model}: {len(sites)} activation sites"), markup=False)
    if quiet:  # the structural warnings (scan prints them too), on stderr
        err = make_console(stderr=True, soft_wrap=True)
        for kind, note in notes:
            if kind == "warning":
                err.print(f"warning: {terminal_text(note)}", style="yellow", markup=False)
        return
    table = plain_table()
    for column in ("#", "Layer", "Op", "Module type"):
        table.add_column(column, overflow="fold")  # a layer name is what --layers takes: shown whole
    # tf2onnx names a node after every op it fused ("a/Relu;a/FusedBatchNormV3;a/Conv2D;…"): one line
    table.add_column("Producer", overflow="ellipsis", no_wrap=True, max_width=48)
    for i, site in enumerate(sites, 1):
        table.add_row(
            str(i),
            rich_text(site.name),
            rich_text(site.op),
            rich_text(site.module_type),
            rich_text(site.producer or "–"),
        )
    console.print(table)
    # the ops --ops takes (a HardSwish's inner clamp is listed, never counted as a layer)
    others = sorted(({site.op for site in sites} - set(wanted)) & set(ALL_OPS))
    if others:  # inspect lists every activation it sees; scan counts the --ops ones only
        counted = sum(site.op in wanted for site in sites)
        console.print(
            f"note: scan counts --ops {','.join(wanted)}: {counted} of these {len(sites)} sites; "
            f"add --ops {','.join([*wanted, *others])} to count them all",
            style="dim",
            markup=False,
        )
    for kind, note in notes:  # one line each: a structural warning (as scan prints it), a note
        console.print(f"{kind}: {terminal_text(note)}", style="dim" if kind == "note" else None, markup=False)


def register(app: typer.Typer) -> None:
    app.command("inspect", no_args_is_help=True)(inspect)
