"""`deadrelu fix`: write a patched model, verified on the calibration data before it is written."""

from __future__ import annotations

import json
import sys

import typer

from deadrelu_cli.cli import options as opt
from deadrelu_cli.cli.console import make_console

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


@opt.command
def fix(
    model: opt.Model,
    strategy: Strategy,
    output: Output,
    data: opt.OptionalData = None,
    loading: opt.Loading = None,
    layers: Layers = None,
    slope: float = typer.Option(0.01, "--slope", help="Negative slope for --strategy leaky."),
    seed: int = typer.Option(
        0,
        "--seed",
        help="Seed of the re-initialisation (reinit), the push (kick) and the sampling (bias-shift).",
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
    running: opt.Running = None,
    feeding: opt.Feeding = None,
    texts: opt.TextInput = None,
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
    holdout: float | None = typer.Option(
        None,
        "--holdout",
        help="Keep this fraction of the data (its last samples) from the scan and verify the fix on it: "
        "units dead on the rest may fire there.",
        show_default=False,
    ),
    ops: opt.Ops = None,
    allow_nonfinite: opt.AllowNonfinite = False,
    json_out: opt.JsonOut = None,
    quiet: opt.QuietTable = False,
    no_progress: opt.NoProgressAccepted = False,
) -> None:
    """Patch the dead units of MODEL and write OUT; exit 0 written and verified, 1 verification failed (nothing written)."""
    from deadrelu_cli.errors import GateFailed
    from deadrelu_cli.files import guard_outputs, write_text_atomic
    from deadrelu_cli.fixes.plan import FixOptions
    from deadrelu_cli.fixes.run import run_fix
    from deadrelu_cli.loaders.arch import arch_file
    from deadrelu_cli.loaders.companions import model_companions
    from deadrelu_cli.options import check_finite
    from deadrelu_cli.probe.ops import parse_ops
    from deadrelu_cli.report.fix_table import print_fix

    check_finite("--slope", slope)
    check_finite("--tolerance", tolerance)  # (a negative one makes every exact fix fail verification)
    check_finite("--kick-scale", kick_scale, 0.0)
    check_finite("--target-rate", target_rate, 0.0, 1.0)
    if not data and not texts.text:
        from deadrelu_cli.errors import UserError

        raise UserError(
            "missing --data: the calibration data the fix is decided and verified on, or --text FILE"
        )
    outputs = [("--output", output), ("--json", json_out)]
    guard_outputs(
        outputs,
        [
            ("MODEL", model),
            ("--data", data),
            ("--text", texts.text),
            ("--arch", arch_file(loading.arch)),
            *model_companions(model, outputs),
        ],
    )
    scan_options = opt.scan_options(
        model,
        data,
        loading,
        running,
        feeding,
        texts,
        certify=input_range is not None,
        input_range=opt.parse_input_range(input_range),
        ops=parse_ops(ops),
        allow_nonfinite=allow_nonfinite,
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
        holdout=holdout,
    )
    result = run_fix(scan_options, fix_options)
    console = make_console(stderr=json_out == "-")
    if not quiet:
        print_fix(result, console, model, output, data or texts.text)
    if json_out:
        text = json.dumps(result.to_dict(), indent=2) + "\n"
        if json_out == "-":
            sys.stdout.write(text)
        else:
            write_text_atomic(json_out, text)
    if result.nothing_to_fix:  # a success: MODEL is already what fix would make; OUT is not written
        return
    if not result.written:
        why = f": {'; '.join(result.failures)}" if quiet and result.failures else ""  # else in the table
        raise GateFailed(f"verification failed, nothing written to {output} (--force writes it anyway){why}")
    console.print(
        ("written" if result.verified else "written despite failed verification (--force)") + f": {output}",
        markup=False,
    )


def register(app: typer.Typer) -> None:
    app.command("fix")(fix)
