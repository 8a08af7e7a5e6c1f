"""Option definitions shared by every command (defined once, like Polygraphy's argument groups)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import typer

Model = Annotated[
    str,
    typer.Argument(
        help="Checkpoint: .pt/.pth/.bin state_dict, .safetensors, TorchScript, .pt2 (torch.export), .onnx, or a Hugging Face model folder.",
        show_default=False,
    ),
]
Data = Annotated[
    str,
    typer.Option(
        "--data",
        "-d",
        help="Calibration data: .npz, .npy (read batch by batch), .pt or .safetensors, a glob or a folder of them; first axis = samples.",
        show_default=False,
    ),
]
OptionalModel = Annotated[
    str | None,
    typer.Argument(
        help="Checkpoint: .pt/.pth/.bin state_dict, .safetensors, TorchScript, .pt2 (torch.export), .onnx, or a Hugging Face model folder.",
        show_default=False,
    ),
]
OptionalData = Annotated[
    str | None,
    typer.Option(
        "--data",
        "-d",
        help="Calibration data: .npz, .npy (read batch by batch), .pt or .safetensors, a glob or a folder of them; first axis = samples.",
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
WeightsKey = Annotated[
    str | None,
    typer.Option(
        "--weights-key",
        help="The key of a checkpoint dict that holds the weights, when it holds several (a model and its EMA copy, a GAN's G and D); fix then rewrites that one and keeps the others.",
        show_default=False,
    ),
]
BatchSize = Annotated[
    str | None,
    typer.Option(
        "--batch-size",
        "-b",
        help="Samples per batch, or auto (never changes the result; a dynamically quantized model, whose activations depend on their batch, runs one sample at a time unless given). Default: auto, sized by the model's activations, or the batch size an ONNX graph's inputs fix.",
    ),
]
DEFAULT_BATCH_SIZE = "auto"
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
# -q on scan and gate: a CI log of only the problems and the verdict (see README, "Quiet output")
Quiet = Annotated[
    bool,
    typer.Option(
        "--quiet",
        "-q",
        help="Print only problems (warnings, errors), the gate verdict (without limits: the one-line "
        "summary) and files written: no table, no progress bar.",
    ),
]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="No progress bar (the table still prints).")]
# fix and trend draw no progress bar; they take scan's flag so that a CI script can copy scan's flags
NoProgressAccepted = Annotated[
    bool,
    typer.Option("--no-progress", help="Accepted as scan takes it (this command draws no progress bar)."),
]
QuietTable = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="Do not print the table (files, gate messages and errors still)."),
]
# -q on trend and inspect: what was read in one line on stdout, warnings on stderr; no table, no notes
QuietSummary = Annotated[
    bool,
    typer.Option(
        "--quiet",
        "-q",
        help="Print only a one-line summary and warnings (no table, no notes); files are still written.",
    ),
]
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
AllowNoSites = Annotated[
    bool,
    typer.Option(
        "--allow-no-sites",
        help="Gate: pass a model in which no activation site was scanned (by default that fails: nothing was checked).",
    ),
]
AllowUnseen = Annotated[
    bool,
    typer.Option(
        "--allow-unseen",
        help="Gate: pass even though the model has activations the scan could not see (an nn.RNN's ReLU kernel, torch.cond branches, int8 kernels; ONNX fused, quantized or custom-domain nodes it cannot count; sites in ONNX If/Loop/Scan bodies that a position mask cannot reach; by default that fails).",
    ),
]
AllowUnpaired = Annotated[
    bool,
    typer.Option(
        "--allow-unpaired",
        help="Gate: pass even though layers of the report and of --baseline could not be paired (by default, layers left unpaired on both sides fail: they were not compared).",
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
        help="Settings file (default: nearest deadrelu.toml or pyproject.toml with \\[tool.deadrelu]).",
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


Mask = Annotated[
    str | None,
    typer.Option(
        "--mask",
        help="Array of --data whose nonzero [samples, tokens] positions count (default: attention_mask when "
        "present; none = every position, padding included).",
    ),
]
ExcludeTokenIds = Annotated[
    str | None,
    typer.Option(
        "--exclude-token-ids",
        help="Comma-separated token ids whose positions never count (e.g. BOS: --exclude-token-ids 1); needs input_ids.",
    ),
]
Text = Annotated[
    str | None,
    typer.Option(
        "--text",
        help="Instead of --data: a text file (one document per line), .jsonl or .json, tokenized with the model folder's tokenizer.",
    ),
]
TextField = Annotated[
    str, typer.Option("--text-field", help="--text .jsonl / .json: the key holding each document.")
]
SeqLen = Annotated[
    int,
    typer.Option(
        "--seq-len",
        min=1,
        help="--text: tokens per sample (pad: longer documents are truncated; pack: the block length).",
    ),
]
TextPacking = Annotated[
    str,
    typer.Option(
        "--text-packing",
        help="--text: pad (one document per sample, padded) or pack (documents joined by EOS and cut into full "
        "--seq-len blocks; only the last block has padding).",
    ),
]
DeviceMap = Annotated[
    str | None,
    typer.Option(
        "--device-map",
        help="Hugging Face folders: spread the model over devices with accelerate (auto, balanced, cpu).",
    ),
]
MaxMemory = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        help="With --device-map: the most each device may hold, as for accelerate: 0=20GiB,cpu=64GiB "
        "(layers that fit nowhere go to a temporary folder on disk, under TMPDIR).",
    ),
]


def parse_token_ids(value: str | None) -> tuple[int, ...]:
    from deadrelu_cli.errors import UserError

    if not value:
        return ()
    try:
        return tuple(int(part) for part in value.replace(" ", "").split(",") if part)
    except ValueError:
        raise UserError(f"--exclude-token-ids {value!r}: give comma-separated integers, e.g. 0,2") from None


# Option groups: options several commands take, declared once (Polygraphy's argument groups). A command
# names a group as one parameter; `command` spreads it into single options for Typer (so --help lists
# them as before) and hands the command one group object.
class OptionGroup:
    @classmethod
    def parameters(cls) -> list[inspect.Parameter]:
        hints = get_type_hints(cls, include_extras=True)
        return [
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name]
            )
            for f in fields(cls)
        ]

    @classmethod
    def take(cls, values: dict[str, Any]):
        """The group made of its options in VALUES, which loses them."""
        return cls(**{f.name: values.pop(f.name) for f in fields(cls)})


@dataclass(frozen=True)
class Loading(OptionGroup):
    """How a checkpoint is opened."""

    arch: Arch = None
    trust_pickle: TrustPickle = False
    weights_key: WeightsKey = None


@dataclass(frozen=True)
class Running(OptionGroup):
    """How the calibration data is replayed and counted."""

    batch_size: BatchSize = None  # None: the default (a graph's fixed batch may replace it)
    limit: Limit = None
    device: Device = "auto"
    threshold: Threshold = 0.0
    channel_dim: ChannelDim = None


@dataclass(frozen=True)
class Feeding(OptionGroup):
    """Arrays of --data that are not one sample per row, and which token positions count."""

    const: Const = None
    batch_axis: BatchAxis = None
    mask: Mask = None
    exclude_token_ids: ExcludeTokenIds = None


@dataclass(frozen=True)
class TextInput(OptionGroup):
    """--text instead of --data: documents tokenized with the model folder's tokenizer."""

    text: Text = None
    text_field: TextField = "text"
    seq_len: SeqLen = 128
    text_packing: TextPacking = "pad"


@dataclass(frozen=True)
class Gating(OptionGroup):
    """Gate limits and the CI outputs that carry the verdict."""

    max_dead: MaxDead = None
    max_dead_layer: MaxDeadLayer = None
    layer_limit: LayerLimit = None
    max_dead_units: MaxDeadUnits = None
    baseline: Baseline = None
    max_increase: MaxIncrease = None
    allow_no_sites: AllowNoSites = False
    allow_unseen: AllowUnseen = False
    allow_unpaired: AllowUnpaired = False
    junit: Junit = None
    markdown: Markdown = None

    def config(self):
        """The library's GateConfig (the baseline report loaded)."""
        from deadrelu_cli.gate import GateConfig, parse_layer_limits
        from deadrelu_cli.options import check_finite
        from deadrelu_cli.report.model import load_report

        for flag, value in (
            ("--max-dead", self.max_dead),
            ("--max-dead-layer", self.max_dead_layer),
            ("--max-increase", self.max_increase),
        ):
            if value is not None:  # NaN (from a config file) passes Click's range check
                check_finite(flag, value, 0.0, 1.0)
        return GateConfig(
            max_dead=self.max_dead,
            max_dead_layer=self.max_dead_layer,
            layer_limits=parse_layer_limits(self.layer_limit),
            max_dead_units=self.max_dead_units,
            baseline=load_report(self.baseline) if self.baseline else None,
            max_increase=self.max_increase,
            allow_no_sites=bool(self.allow_no_sites),
            allow_unseen=bool(self.allow_unseen),
            allow_unpaired=bool(self.allow_unpaired),
        )


@dataclass(frozen=True)
class Settings(OptionGroup):
    """The settings file. A command taking this group gets every option not given on the command line
    from the file, and --show-config prints them instead of running the command."""

    config: ConfigPath = None
    show_config_flag: ShowConfig = False


def from_config_file(exc, flags: dict[str, str], sources: dict[str, str]):
    """An error about a setting that came from the config file names the file and the key there, not a
    flag the user never typed ("--max-dead 1.5: …" -> "max-dead = 1.5 in pyproject.toml [tool.deadrelu]: …")."""
    from deadrelu_cli.errors import UserError

    message = str(exc)
    for name, flag in flags.items():
        source = sources.get(name, "default")
        if source in ("default", "command line") or not message.startswith(flag + " "):
            continue
        value, sep, rest = message[len(flag) + 1 :].partition(": ")
        if sep:
            from deadrelu_cli.config import table_label

            where = f"{source} {table_label(source)}".strip()
            return UserError(f"{flag.removeprefix('--')} = {value} in {where}: {rest}")
    return exc


def command(func: Callable) -> Callable:
    """Let FUNC take option groups (parameters annotated with an OptionGroup); see the note above."""
    signature = inspect.signature(func, eval_str=True)
    groups = {
        p.name: p.annotation
        for p in signature.parameters.values()
        if isinstance(p.annotation, type) and issubclass(p.annotation, OptionGroup)
    }
    spread = []
    for p in signature.parameters.values():
        if p.name in groups:
            spread.extend(groups[p.name].parameters())
        else:  # keyword-only: any order of defaults is valid, and Typer calls by keyword
            spread.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))

    settings = Settings in groups.values()
    if settings:  # Typer hands the context to a parameter typed typer.Context
        spread.insert(0, inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))

    @functools.wraps(func)
    def run(**values: Any) -> None:
        ctx = values.pop("ctx", None)
        # Click hands them over in command-line order; the signature's order keeps --show-config stable
        values = {p.name: values[p.name] for p in spread if p.name in values}
        if settings:
            from deadrelu_cli.cli.console import make_console
            from deadrelu_cli.cli.gating import merge_settings, show_config

            values, sources, _ = merge_settings(ctx, values, values["config"])
            flags = {
                param.name: max((o for o in param.opts if o.startswith("--")), key=len, default=param.name)
                for param in ctx.command.params
            }
            if values["show_config_flag"]:
                show_config(values, sources, make_console(), flags)
                return
        for name, group in groups.items():
            values[name] = group.take(values)
        if not settings:
            func(**values)
            return
        from deadrelu_cli.errors import UserError

        try:
            func(**values)
        except UserError as exc:
            raise from_config_file(exc, flags, sources) from None

    run.__signature__ = signature.replace(parameters=spread)
    run.__annotations__ = {p.name: p.annotation for p in spread}
    return run


def scan_options(
    model: str,
    data: str | None,
    loading: Loading,
    running: Running,
    feeding: Feeding | None = None,
    texts: TextInput | None = None,
    **more,
):
    """The library's ScanOptions from the groups every scanning command takes (built here only)."""
    from deadrelu_cli.options import ScanOptions

    feeding = feeding or Feeding()
    texts = texts or TextInput()
    return ScanOptions(
        text=texts.text,
        text_field=texts.text_field,
        seq_len=texts.seq_len,
        text_packing=texts.text_packing,
        model=model,
        data=data,
        arch=loading.arch,
        trust_pickle=loading.trust_pickle,
        weights_key=loading.weights_key,
        batch_size=parse_batch_size(running.batch_size or DEFAULT_BATCH_SIZE),
        batch_size_explicit=running.batch_size is not None,
        limit=running.limit,
        device=running.device,
        threshold=running.threshold,
        channel_dim=running.channel_dim,
        consts=tuple(feeding.const or ()),
        batch_axes=parse_batch_axes(feeding.batch_axis),
        mask=feeding.mask,
        exclude_token_ids=parse_token_ids(feeding.exclude_token_ids),
        **more,
    )
