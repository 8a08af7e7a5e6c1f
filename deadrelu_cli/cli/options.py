"""Option definitions shared by every command (defined once, like Polygraphy's argument groups)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Model = Annotated[
    str,
    typer.Argument(
        help="Checkpoint: .pt/.pth/.bin state_dict, .safetensors, TorchScript, .pt2 (torch.export) or .onnx.",
        show_default=False,
    ),
]
Data = Annotated[
    str,
    typer.Option(
        "--data",
        "-d",
        help="Calibration data: .npz, .npy (memory-mapped), .pt or .safetensors; first axis = samples.",
        show_default=False,
    ),
]
OptionalModel = Annotated[
    str | None,
    typer.Argument(
        help="Checkpoint: .pt/.pth/.bin state_dict, .safetensors, TorchScript, .pt2 (torch.export) or .onnx.",
        show_default=False,
    ),
]
OptionalData = Annotated[
    str | None,
    typer.Option(
        "--data",
        "-d",
        help="Calibration data: .npz, .npy (memory-mapped), .pt or .safetensors; first axis = samples.",
        show_default=False,
    ),
]
Arch = Annotated[
    str | None,
    typer.Option(
        "--arch",
        help="MODULE:FACTORY that builds the model for a state_dict (MODULE = importable name or path to a .py file).",
    ),
]
TrustPickle = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Trust the file: allow full unpickling and TorchScript / .pt2 code beyond pure tensor ops (both can run code from the file). Only for checkpoints you trust.",
    ),
]
BatchSize = Annotated[
    str, typer.Option("--batch-size", "-b", help="Samples per batch, or auto (does not change the result).")
]
Compile = Annotated[
    bool,
    typer.Option(
        "--compile", help="Count inside the graph and torch.compile it (fastest on CUDA; torch models)."
    ),
]
ChannelsLast = Annotated[
    bool,
    typer.Option(
        "--channels-last",
        help="Run a torch conv model and its 4-D inputs in channels_last (NHWC) memory format; same counts.",
    ),
]
Dtype = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        help="Run a torch model in bf16, fp16 or fp32 (counts near the threshold may shift in low precision).",
    ),
]


def parse_batch_size(value) -> int | str:
    from deadrelu_cli.errors import UserError

    if isinstance(value, int) or value == "auto":
        return value
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise UserError(f"--batch-size {value!r}: give a positive integer or auto") from None
    if size < 1:
        raise UserError("--batch-size must be at least 1")
    return size


Limit = Annotated[int | None, typer.Option("--limit", min=1, help="Use only the first N samples.")]
Device = Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu or cuda.")]
Threshold = Annotated[
    float, typer.Option("--threshold", help="A unit fires when its pre-activation exceeds this.")
]
Dying = Annotated[float, typer.Option("--dying", help="Dying: active rate above 0 but below this.")]
Tau = Annotated[float, typer.Option("--tau", help="Dormant (ReDo): mean|act| / layer mean at most this.")]
ChannelDim = Annotated[
    int | None,
    typer.Option(
        "--channel-dim", help="Unit axis of every activation (default: 1 for conv outputs, last for Linear)."
    ),
]
Ops = Annotated[
    str | None,
    typer.Option(
        "--ops",
        help="Comma-separated activation ops to report: relu, relu6 (default), leaky_relu, elu, gelu, silu.",
    ),
]
AllowNonfinite = Annotated[
    bool, typer.Option("--allow-nonfinite", help="Accept NaN/Inf in the data instead of stopping.")
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
JsonOut = Annotated[
    str | None,
    typer.Option("--json", help="Write the JSON report here ('-' = stdout, and nothing else on stdout)."),
]
LayerName = Annotated[str | None, typer.Option("--layer", help="Show one row per unit of this layer.")]
MaxDead = Annotated[
    float | None,
    typer.Option(
        "--max-dead", min=0.0, max=1.0, help="Gate: exit 1 when the dead fraction of the model is above this."
    ),
]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
ReportPath = Annotated[
    Path, typer.Argument(help="A JSON report written by `deadrelu scan --json`.", show_default=False)
]
Const = Annotated[
    list[str] | None,
    typer.Option(
        "--const",
        help="Array of --data fed whole to every batch (a sample rate, a mask, an initial state). Repeatable.",
    ),
]
BatchAxis = Annotated[
    list[str] | None,
    typer.Option(
        "--batch-axis",
        help="NAME=AXIS: this array holds samples on AXIS (e.g. an RNN state [2, B, 128]: state=1). Repeatable.",
    ),
]


def parse_batch_axes(values: list[str] | None) -> dict[str, int]:
    from deadrelu_cli.errors import UserError

    axes = {}
    for value in values or []:
        name, sep, axis = value.rpartition("=")
        if not sep or not name:
            raise UserError(f"--batch-axis {value!r}: expected NAME=AXIS, e.g. state=1")
        try:
            axes[name] = int(axis)
        except ValueError:
            raise UserError(f"--batch-axis {value!r}: AXIS must be an integer") from None
    return axes


MaxDeadLayer = Annotated[
    float | None,
    typer.Option(
        "--max-dead-layer",
        min=0.0,
        max=1.0,
        help="Gate: exit 1 when any layer's dead fraction is above this.",
    ),
]
LayerLimit = Annotated[
    list[str] | None,
    typer.Option(
        "--layer-limit",
        help="Gate: GLOB=FRACTION limit for matching layers, e.g. 'encoder.*=0.3' (first match wins). Repeatable.",
    ),
]
MaxDeadUnits = Annotated[
    int | None,
    typer.Option("--max-dead-units", min=0, help="Gate: exit 1 when more units than this are dead."),
]
Baseline = Annotated[
    str | None,
    typer.Option(
        "--baseline",
        help="Gate: an earlier JSON report; fail when dead fractions grew by more than --max-increase.",
    ),
]
MaxIncrease = Annotated[
    float | None,
    typer.Option(
        "--max-increase",
        min=0.0,
        max=1.0,
        help="Gate: allowed growth of a dead fraction over --baseline (default 0).",
    ),
]
Junit = Annotated[str | None, typer.Option("--junit", help="Write JUnit XML (one testcase per layer) here.")]
Markdown = Annotated[
    str | None,
    typer.Option(
        "--markdown", help="Write a Markdown summary here (also appended to $GITHUB_STEP_SUMMARY when set)."
    ),
]
ConfigPath = Annotated[
    str | None,
    typer.Option(
        "--config",
        help="Settings file (default: nearest deadrelu.toml or pyproject.toml with [tool.deadrelu]).",
    ),
]
ShowConfig = Annotated[
    bool,
    typer.Option("--show-config", help="Print the effective settings and where each came from, then exit."),
]
HtmlOut = Annotated[
    str | None,
    typer.Option("--html", help="Write a self-contained HTML report (plots inline, works offline) here."),
]
Distributed = Annotated[
    bool,
    typer.Option(
        "--distributed",
        help="Under torchrun: each rank scans its shard, counts are all_reduced, rank 0 reports.",
    ),
]
Certify = Annotated[
    bool,
    typer.Option(
        "--certify",
        help="Also bound every unit over an input box (interval bound propagation): which units can never fire.",
    ),
]
InputRange = Annotated[
    list[str] | None,
    typer.Option(
        "--input-range",
        help="The input box to certify over (implies --certify): LO HI for every input element (--input-range -1 1, or the option twice), or auto (min/max per feature of --data).",
    ),
]
InputShapeOpt = Annotated[
    str | None,
    typer.Option(
        "--input-shape", help="One sample's shape (e.g. 3x32x32) when neither the model nor --data gives it."
    ),
]


def parse_input_range(values: list[str] | None):
    from deadrelu_cli.errors import UserError

    if not values:
        return None
    if values == ["auto"]:
        return "auto"
    if len(values) == 1 and " " in values[0].strip():
        values = values[0].split()
    if len(values) != 2:
        raise UserError(
            "--input-range: give LO and HI (e.g. --input-range -1 --input-range 1, or --input-range '-1 1') or auto"
        )
    try:
        return float(values[0]), float(values[1])
    except ValueError:
        raise UserError(f"--input-range {' '.join(values)}: LO and HI must be numbers") from None


Explain = Annotated[
    bool,
    typer.Option(
        "--explain",
        help="Say why each dead unit is dead (negative bias, collapsed weights, BatchNorm shift, starved, direction) and what to do.",
    ),
]
