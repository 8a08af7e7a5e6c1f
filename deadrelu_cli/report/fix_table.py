"""What `deadrelu fix` prints: per layer dead before/after and the action, then the output change."""

from __future__ import annotations

from rich.console import Console

from deadrelu_cli.display import rich_text, terminal_text
from deadrelu_cli.report.table import plain_table


def print_fix(result, console: Console, model: str, output: str, data: str) -> None:
    """RESULT is a fixes.plan.FixResult (not imported: the report layer sits below fixes)."""
    table = plain_table()
    resumed = any(getattr(layer, "alive_after_resume", None) is not None for layer in result.layers)
    columns = ("Layer", "Dead before", "Dead after", "Fixed units fire")
    columns += ("Alive after resume",) if resumed else ()  # training checkpoints (--resume-steps)
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
        alive = ()
        if resumed:
            count = layer.alive_after_resume
            alive = ("–" if count is None else f"{count}/{len(layer.units)}",)
        table.add_row(
            rich_text(layer.name),
            str(layer.dead_before),
            after,
            fire,
            *alive,
            rich_text(layer.action),
            style="" if layer.applied else "dim",
        )
    console.print(terminal_text(f"{model} → {output} ({result.strategy})"), markup=False)  # OUTPUT as written
    if not result.nothing_to_fix:
        console.print(table)
        console.print(
            f"outputs on {terminal_text(data)}: max |Δ| = {result.max_abs_diff:.3g}, relative {result.max_rel_diff:.3g}",
            markup=False,
        )
    print_evidence(result, console)
    if (
        result.params_before is not None
        and result.params_after is not None
        and result.params_before != result.params_after
    ):
        macs = (
            f"; MACs per sample (Conv/Linear/MatMul) {result.flops_before:,} → {result.flops_after:,}"
            if result.flops_before is not None and result.flops_after is not None
            else ""
        )
        console.print(f"parameters {result.params_before:,} → {result.params_after:,}{macs}", markup=False)
    if result.new_widths:
        console.print(
            terminal_text("new widths: " + ", ".join(f"{k}={v}" for k, v in result.new_widths.items())),
            markup=False,
        )
    for note in result.notes:
        console.print(f"note: {terminal_text(note)}", markup=False, style="dim")


def print_evidence(result, console: Console) -> None:
    """How much data the verdict rests on, and with --holdout what the held-out samples showed."""
    if result.values_per_unit is not None:
        console.print(
            f"evidence: dead on all of {result.scanned_samples:,} samples, at least "
            f"{result.values_per_unit:,} values per unit"
            + (
                " (add --holdout 0.2 to verify on samples the scan does not see)"
                if result.holdout_samples is None
                else ""
            ),
            markup=False,
        )
    if result.holdout_samples is not None:
        fired = sum(len(units) for units in result.holdout_fired.values())
        acted = sum(len(layer.units) for layer in result.layers if layer.applied)
        where = "; ".join(
            f"{name}: {', '.join(map(str, units))}" for name, units in result.holdout_fired.items()
        )
        console.print(
            f"hold-out ({result.holdout_samples:,} samples the scan did not see): {fired} of {acted} units fired"
            + (f" ({terminal_text(where)})" if where else "")
            + f"; outputs max |Δ| = {result.holdout_max_abs_diff:.3g}, relative {result.holdout_max_rel_diff:.3g}",
            markup=False,
        )
