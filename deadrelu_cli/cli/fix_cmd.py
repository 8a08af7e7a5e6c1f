"""`deadrelu fix`: write a patched model, verified on the calibration data before it is written."""

from __future__ import annotations

import json
import sys

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from deadrelu_cli.cli import options as opt

Strategy = opt.Annotated[
    str,
    typer.Option(
        "--strategy",
        "-s",
        help="leaky | elu | reinit (ReDo) | bias-shift | prune | kick.",
        show_default=False,
    ),
]
Output = opt.Annotated[
    str,
    typer.Option(
        "--output", "-o", help="Where to write the patched model (never over MODEL).", show_default=False
    ),
]
Layers = opt.Annotated[
    list[str] | None,
    typer.Option(
        "--layers", help="Only layers matching this glob (repeatable; default: every layer with dead units)."
    ),
]


def fix(
    model: opt.Model,
    data: opt.Data,
    strategy: Strategy,
    output: Output,
    arch: opt.Arch = None,
    trust_pickle: opt.TrustPickle = False,
    layers: Layers = None,
    slope: float = typer.Option(0.01, "--slope", help="Negative slope for --strategy leaky."),
    seed: int = typer.Option(
        0, "--seed", help="Seed of the re-initialisation (reinit) and sampling (bias-shift)."
    ),
    target_rate: float = typer.Option(
        0.01,
        "--target-rate",
        min=0.0,
        max=1.0,
        help="bias-shift: fraction of the data each revived unit fires on.",
    ),
    tolerance: float = typer.Option(
        1e-5, "--tolerance", help="Allowed relative output change for reinit and prune."
    ),
    force: bool = typer.Option(False, "--force", help="Write even when verification fails."),
    batch_size: opt.BatchSize = "64",
    limit: opt.Limit = None,
    device: opt.Device = "auto",
    threshold: opt.Threshold = 0.0,
    channel_dim: opt.ChannelDim = None,
    const: opt.Const = None,
    batch_axis: opt.BatchAxis = None,
    kick_scale: float = typer.Option(
        0.1, "--kick-scale", help="kick: noise std as a fraction of the layer's weight std."
    ),
    certified_only: bool = typer.Option(
        False,
        "--certified-only",
        help="Act only on units proven dead over --input-range (prune is then exact on every input in the box).",
    ),
    input_range: opt.InputRange = None,
    resume_steps: int = typer.Option(
        10,
        "--resume-steps",
        min=0,
        help="Training checkpoints with optimizer state: optimizer steps taken from the written state "
        "before counting the fixed units that still fire (0: skip).",
    ),
    json_out: opt.JsonOut = None,
) -> None:
    """Patch the dead units of MODEL and write OUT; exit 0 written and verified, 1 verification failed (nothing written)."""
    from deadrelu_cli.errors import GateFailed
    from deadrelu_cli.files import write_text_atomic
    from deadrelu_cli.fixes.plan import FixOptions
    from deadrelu_cli.fixes.run import run_fix
    from deadrelu_cli.options import ScanOptions

    scan_options = ScanOptions(
        model=model,
        data=data,
        arch=arch,
        trust_pickle=trust_pickle,
        batch_size=opt.parse_batch_size(batch_size),
        limit=limit,
        device=device,
        threshold=threshold,
        channel_dim=channel_dim,
        consts=tuple(const or ()),
        batch_axes=opt.parse_batch_axes(batch_axis),
        certify=input_range is not None,
        input_range=opt.parse_input_range(input_range),
    )
    fix_options = FixOptions(
        strategy=strategy,
        output=output,
        layers=tuple(layers or ()),
        slope=slope,
        seed=seed,
        target_rate=target_rate,
        tolerance=tolerance,
        force=force,
        certified_only=certified_only,
        kick_scale=kick_scale,
        resume_steps=resume_steps,
    )
    result = run_fix(scan_options, fix_options)
    console = Console(stderr=json_out == "-", highlight=False)
    table = Table(
        header_style="bold", box=box.SIMPLE_HEAVY, pad_edge=False, show_edge=False, padding=(0, 1, 0, 0)
    )
    resumed = any(layer.alive_after_resume is not None for layer in result.layers)
    columns = ("Layer", "Dead before", "Dead after", "Fixed units fire")
    columns += ("Alive after resume",) if resumed else ()
    for column in columns + ("Action",):
        table.add_column(
            column, justify="right" if column.startswith(("Dead", "Alive")) else "left", overflow="fold"
        )
    for layer in result.layers:
        after = (
            "–"
            if layer.dead_after is None
            else f"{layer.dead_after}" + (f"/{layer.units_after}" if layer.units_after is not None else "")
        )
        rates = layer.rates_after if layer.applied and layer.rates_after else None
        fire = "–" if not rates else f"{100 * min(rates):.1f}–{100 * max(rates):.1f}%"
        alive = (
            ()
            if not resumed
            else (
                "–" if layer.alive_after_resume is None else f"{layer.alive_after_resume}/{len(layer.units)}",
            )
        )
        table.add_row(
            layer.name,
            str(layer.dead_before),
            after,
            fire,
            *alive,
            layer.action,
            style="" if layer.applied else "dim",
        )
    console.print(f"{model} → {output} ({strategy})", markup=False)
    console.print(table)
    console.print(
        f"outputs on {data}: max |Δ| = {result.max_abs_diff:.3g}, relative {result.max_rel_diff:.3g}",
        markup=False,
    )
    if (
        result.params_before is not None
        and result.params_after is not None
        and result.params_before != result.params_after
    ):
        macs = (
            f"; Linear/Conv MACs per sample {result.flops_before:,} → {result.flops_after:,}"
            if result.flops_before is not None and result.flops_after is not None
            else ""
        )
        console.print(f"parameters {result.params_before:,} → {result.params_after:,}{macs}", markup=False)
    if result.new_widths:
        console.print(
            "new widths: " + ", ".join(f"{k}={v}" for k, v in result.new_widths.items()), markup=False
        )
    for note in result.notes:
        console.print(f"note: {note}", markup=False, style="dim")
    if json_out:
        text = json.dumps(result.to_dict(), indent=2) + "\n"
        if json_out == "-":
            sys.stdout.write(text)
        else:
            write_text_atomic(json_out, text)
    if not result.written:
        raise GateFailed(f"verification failed: nothing written to {output} (use --force to write anyway)")
    console.print(
        ("written" if result.verified else "written despite failed verification (--force)") + f": {output}",
        markup=False,
    )


def register(app: typer.Typer) -> None:
    app.command("fix")(fix)
