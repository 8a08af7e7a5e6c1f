"""The CI gate: limits on dead units, per layer and for the model, and against a baseline report."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from deadrelu_cli.display import shown_names
from deadrelu_cli.errors import UserError
from deadrelu_cli.report.diff import match_layers
from deadrelu_cli.report.model import COUNT_SETTINGS, Report, settings_difference

# extra["position_mask"] of a site whose [batch, tokens, …] and [tokens, batch, …] readings had one shape on
# every batch it saw (as many samples as tokens) and nothing told them apart: every position counted
LAYOUT_AMBIGUOUS = "layout ambiguous"
# the same for a site of flattened [batch*tokens, …] rows whose order (sample-major, or time-major: a
# [tokens, batch, …] flattened) nothing told: every position counted
ROW_ORDER_AMBIGUOUS = "row order ambiguous"
# extra["position_mask"] of an ONNX site after a conv subsampler (a speech encoder's frames) where a
# batch's mask was not its samples' real positions first and padding after: the frames' real lengths rest
# on that, so every frame of such a batch counted
FRAMES_NOT_TOLD = "frames not told"
# extra["position_mask"] of a site the scan's position mask could not reach (it counted padding too)
# an image's pixel mask ([samples, height, width], a DETR-style `pixel_mask`) at a conv feature map whose
# cells hold real and padded pixels both (the padding does not end on the map's stride), and at a
# [batch, positions, …] site whose positions may be the pixels flattened (no module mask told which)
PIXELS_MIXED = "pixel cells mixed"
PIXELS_FLATTENED = "pixel positions flattened"
# extra["position_mask"] of an activation inside one expert of a mixture of experts (probe.experts) whose rows
# (the tokens routed to it, gathered by index) the probe could not follow back to their tokens: every row
# counted, padding's included
ROWS_NOT_ATTRIBUTED = "routed rows not attributed"
# extra["unit_axis"] of a layer whose units a layer made but a layout op moved where the probe could not
# follow them (probe.ops.axis_lost_note): counted on a guessed axis, so a gate does not pass on it
UNIT_AXIS_NOT_FOLLOWED = "not followed"
# extra["unit_axis"] of a layer of rank >= 3 whose units no layer placed (a ReLU on a computed tensor): counted
# on an assumed axis (the last for rank 3, dim 1 from rank 4; probe.ops.axis_guess_notes), so a gate does
# not pass on it either
UNIT_AXIS_ASSUMED = "assumed"
# extra key of a layer of an exported fused mixture of experts (one activation for every expert's rows: unit
# i of each expert counted as one unit), valued with the number of experts merged
EXPERTS_MERGED = "experts_merged"
MASK_NOT_APPLIED = (
    "in a subgraph",
    "opset below 9",
    LAYOUT_AMBIGUOUS,
    ROW_ORDER_AMBIGUOUS,
    PIXELS_MIXED,
    PIXELS_FLATTENED,
    FRAMES_NOT_TOLD,
    ROWS_NOT_ATTRIBUTED,
)


@dataclass
class GateConfig:
    max_dead: float | None = None  # fraction of the whole model
    max_dead_layer: float | None = None  # fraction of any one layer
    layer_limits: list[tuple[str, float]] = field(default_factory=list)  # (glob, fraction), first match wins
    max_dead_units: int | None = None
    baseline: Report | None = None
    max_increase: float | None = None  # with a baseline; None means 0
    allow_no_sites: bool = False  # else a report in which no activation site was scanned fails
    allow_unseen: bool = False  # else a report naming activations the scan could not see fails
    allow_unpaired: bool = False  # else layers left unpaired with the baseline on both sides fail

    @property
    def active(self) -> bool:
        return any(
            v is not None for v in (self.max_dead, self.max_dead_layer, self.max_dead_units, self.baseline)
        ) or bool(self.layer_limits)


@dataclass
class LayerVerdict:
    name: str
    op: str
    units: int
    dead: int
    fraction: float
    limit: float | None
    baseline_fraction: float | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class GateResult:
    layers: list[LayerVerdict]
    model_failures: list[str]
    added: list[str] = field(default_factory=list)  # layers not in the baseline
    removed: list[str] = field(default_factory=list)  # baseline layers gone from this report
    dead_fraction: float = 0.0
    baseline_dead_fraction: float | None = None
    checked: bool = True
    # activations the scan could not see that are none of the scanned --ops (a softmax, a fused
    # HardSwish): listed, not gated
    unseen_other: dict[str, int] = field(default_factory=dict)
    # layers of activations --ops did not ask for (report.unscanned): listed, not gated
    unscanned: dict[str, int] = field(default_factory=dict)
    # layer limits that limited no layer: why each one ("matches no layer", or the earlier glob that
    # takes every layer it matches); a mistyped glob would otherwise pass without a word
    unused_limits: list[str] = field(default_factory=list)
    # layers compared with a baseline layer of another width (pruned, or counted on another unit axis)
    width_changes: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        return self.model_failures + [f for layer in self.layers for f in layer.failures]

    @property
    def passed(self) -> bool:
        return not self.failures


def parse_layer_limits(values: list[str] | None) -> list[tuple[str, float]]:
    limits = []
    for value in values or []:
        glob, sep, number = value.rpartition("=")
        if not sep or not glob:
            raise UserError(f"--layer-limit {value!r}: expected GLOB=FRACTION, e.g. 'encoder.*=0.3'")
        try:
            fraction = float(number)
        except ValueError:
            raise UserError(f"--layer-limit {value!r}: FRACTION must be a number between 0 and 1") from None
        if not 0.0 <= fraction <= 1.0:
            raise UserError(f"--layer-limit {value!r}: FRACTION must be between 0 and 1")
        limits.append((glob, fraction))
    return limits


def layer_limit(name: str, config: GateConfig) -> float | None:
    for glob, fraction in config.layer_limits:
        if fnmatch.fnmatchcase(name, glob):
            return fraction
    return config.max_dead_layer


def unused_layer_limits(names: list[str], config: GateConfig) -> list[str]:
    """Each layer limit that applies to none of the layers `names` (first match wins), and why."""
    used = set()
    for name in names:
        first = next(
            (k for k, (glob, _) in enumerate(config.layer_limits) if fnmatch.fnmatchcase(name, glob)), None
        )
        if first is not None:
            used.add(first)
    unused = []
    for k, (glob, fraction) in enumerate(config.layer_limits):
        if k in used:
            continue
        matched = [name for name in names if fnmatch.fnmatchcase(name, glob)]
        if not matched:
            why = "it matches no layer of this report (names are case-sensitive globs)"
        else:
            earlier = sorted(
                {g for g, _ in config.layer_limits[:k] if any(fnmatch.fnmatchcase(n, g) for n in matched)}
            )
            why = f"the layers it matches all take an earlier limit ({', '.join(earlier)}; the first match wins)"
        unused.append(f"layer limit {glob}={fraction:g} limited nothing: {why}")
    return unused


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def _listed(names: list[str], most: int = 4) -> str:
    return ", ".join(names[:most]) + (f", … ({len(names)} in all)" if len(names) > most else "")


def scanned_any(report: Report) -> bool:
    """Whether any activation site with units was measured (by data, or bounded by --certify)."""
    return any(layer.units and (layer.ran or layer.upper_bound is not None) for layer in report.layers)


def unseen_text(unseen: dict[str, int]) -> str:
    """'domain.Op ×n, …', most frequent first; node types come from the model file: non-printable
    characters escaped so the reason stays one line."""

    def printable(text: str) -> str:
        return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)

    ranked = sorted(unseen.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{printable(op)} ×{count}" for op, count in ranked)


# What an activation the scan could not see is, by the op type in its label (the scan's labels:
# 'domain.Op', 'domain.Op(activation=Kind)' for a fused one, 'QLinearKind' for a quantized one): the
# --ops it would be scanned as. () for those with no dead units in --ops' sense (softmax, sigmoid, tanh,
# hard-sigmoid, hard-swish: none is a scanned op). An op not listed may be anything: it always counts.
UNSEEN_OP_KINDS: dict[str, tuple[str, ...]] = {
    "Relu": ("relu",),
    "Clip": ("relu", "relu6"),
    "Relu6": (
        "relu6",
    ),  # torch: a ReLU6 inside code the probe cannot see (probe.hidden)  # a fused Clip's bounds are not in the label: Clip(0, 6) or Clip(0, inf)
    "LeakyRelu": ("leaky_relu",),
    "Elu": ("elu",),
    "Gelu": ("gelu",),
    "BiasGelu": ("gelu",),
    "FastGelu": ("gelu",),
    "QuickGelu": ("gelu", "silu"),  # x * sigmoid(alpha * x): SiLU when alpha = 1
    "Silu": ("silu",),
    "Sigmoid": (),
    "Tanh": (),
    "HardSigmoid": (),
    "HardSwish": (),
    "Softmax": (),
}


def unseen_op_kinds(label: str) -> tuple[str, ...] | None:
    """The --ops an unseen activation's label stands for (UNSEEN_OP_KINDS), None when it is not known."""
    head, fused, tail = label.partition("(activation=")
    if fused:  # a fused node: its activation attribute says what it is
        return UNSEEN_OP_KINDS.get(tail.removesuffix(")"))
    domain, _, op = head.rpartition(".")
    if domain not in ("", "ai.onnx", "com.microsoft"):
        return None  # a node of a custom domain: could be anything
    return UNSEEN_OP_KINDS.get(op.removeprefix("QLinear"))


def split_unseen(unseen: dict[str, int], ops: tuple[str, ...]) -> tuple[dict[str, int], dict[str, int]]:
    """(those that may hide dead units of the scanned --ops or are unknown, the others): only the first
    stop a gate."""
    hiding, other = {}, {}
    for label, count in unseen.items():
        kinds = unseen_op_kinds(label)
        (hiding if kinds is None or set(kinds) & set(ops) else other)[label] = count
    return hiding, other


def unseen_notes(
    unseen: dict[str, int], ops: tuple[str, ...], advice: str = "scan the float model for those layers"
) -> list[str]:
    """What a scan says about the activations it could not see: those a gate stops on (with `advice`),
    and the others."""
    hiding, other = split_unseen(unseen, ops)
    notes = []
    if hiding:
        notes.append(
            f"activations deadrelu cannot see (not scanned, not counted): {unseen_text(hiding)}; {advice}"
        )
    if other:
        notes.append(
            f"activations deadrelu cannot see that are none of the scanned ops ({', '.join(ops)}), so a gate "
            f"does not stop on them: {unseen_text(other)}"
        )
    return notes


def unscanned_text(unscanned: dict[str, int], ops: tuple[str, ...], flag: str = "--ops") -> str:
    """'leaky_relu ×2, elu ×1 layer(s) not scanned (not in --ops relu,relu6); --ops
    relu,relu6,leaky_relu,elu counts them': activations the scan could count but was not asked to."""
    ranked = sorted(unscanned.items(), key=lambda item: (-item[1], item[0]))
    shown = ", ".join(f"{op} ×{count}" for op, count in ranked)
    wider = ",".join(list(ops) + [op for op, _ in ranked if op not in ops])
    if flag.endswith("="):  # watch(ops="…")
        return f'{shown} layer(s) not scanned (not in {flag}"{",".join(ops)}"); {flag}"{wider}" counts them'
    return f"{shown} layer(s) not scanned (not in {flag} {','.join(ops)}); {flag} {wider} counts them"


def evaluate(report: Report, config: GateConfig) -> GateResult:
    differ = settings_difference(config.baseline, report, COUNT_SETTINGS) if config.baseline else None
    if differ:  # a unit dead at threshold 0.1 may fire at 0: the fractions do not compare
        raise UserError(
            f"--baseline was scanned with {differ} than this report: its dead units do not compare; "
            "re-scan the baseline with the same settings"
        )
    summary = report.summary()
    model_failures: list[str] = []
    if config.max_dead is not None and summary.dead_fraction > config.max_dead:
        model_failures.append(
            f"model: {_pct(summary.dead_fraction)} of units are dead ({summary.dead}/{summary.units}), above the limit {_pct(config.max_dead)}"
        )
    if config.max_dead_units is not None and summary.dead > config.max_dead_units:
        model_failures.append(f"model: {summary.dead} dead units, above the limit {config.max_dead_units}")

    if config.active and not config.allow_no_sites and not scanned_any(report):
        model_failures.append(
            "model: no activation site was scanned, so nothing was checked (see the notes); "
            "pass --allow-no-sites if the model truly has no ReLUs"
        )
    hiding, not_scanned_ops = split_unseen(report.unseen, tuple(report.settings.ops))
    if config.active and not config.allow_unseen and hiding:
        model_failures.append(
            f"model: activations deadrelu could not scan (their dead units are not counted): {unseen_text(hiding)}; "
            "pass --allow-unseen to gate on the scanned layers only"
        )
    unmasked = {
        layer.name: layer.extra["position_mask"]
        for layer in report.layers
        if layer.ran and layer.extra.get("position_mask") in MASK_NOT_APPLIED
    }
    if config.active and not config.allow_unseen and report.mask and unmasked:
        shown = shown_names(unmasked)
        remedies = {  # what counts real tokens only there, per reason
            "in a subgraph": "scan the PyTorch model, or an ONNX export with the loop unrolled (no Scan/Loop)",
            "opset below 9": "re-export with opset 9 or newer",
            LAYOUT_AMBIGUOUS: "re-export with a dynamic batch dim (or another batch size than the sequence length)",
            ROW_ORDER_AMBIGUOUS: "give data whose samples differ (the order of flattened rows is told by "
            "reordering the samples of a batch), or scan the PyTorch model",
            FRAMES_NOT_TOLD: "pad every sample at its end (real positions first), as speech feature "
            "extractors do, or scan the PyTorch model",
            PIXELS_MIXED: "pad the images to a multiple of the layers' stride (each cell of their feature maps "
            "then all image or all padding)",
            PIXELS_FLATTENED: "scan the PyTorch model, whose modules called with the flattened mask as their "
            "attention_mask (DETR's encoder) count on it",
            ROWS_NOT_ATTRIBUTED: "scan the PyTorch model (state_dict + --arch, or its folder), whose experts' "
            "rows are followed to their tokens where they are gathered by indexing (x[index], index_select)",
        }
        how = "; ".join(remedies[reason] for reason in MASK_NOT_APPLIED if reason in unmasked.values())
        model_failures.append(
            f"model: the position mask could not be applied to {len(unmasked)} layer(s) ({', '.join(sorted(set(unmasked.values())))}): they counted every "
            f"position, padding included, so a unit that fires on padding only passes as alive: {shown}; to "
            f"count real tokens only: {how}; or pass --allow-unseen to gate on them as counted (--mask none "
            "counts every position everywhere)"
        )
    guessed = [
        layer.name
        for layer in report.layers
        if layer.ran and layer.extra.get("unit_axis") == UNIT_AXIS_NOT_FOLLOWED
    ]
    if config.active and not config.allow_unseen and guessed:
        model_failures.append(
            f"model: the unit axis of {len(guessed)} layer(s) was not followed from the layer that makes their "
            f"units (a reshape or permute on the way), so their units were counted on a guessed axis: "
            f"{shown_names(guessed)}; scan again with --channel-dim N, or pass --allow-unseen to gate on them as counted"
        )
    assumed = [
        layer.name
        for layer in report.layers
        if layer.ran and layer.extra.get("unit_axis") == UNIT_AXIS_ASSUMED
    ]
    if config.active and not config.allow_unseen and assumed:
        model_failures.append(
            f"model: no layer says where the units of {len(assumed)} layer(s) are (an activation of a computed "
            f"tensor of rank >= 3), so they were counted on an assumed axis: {shown_names(assumed)}; scan again with "
            "--channel-dim N (the units' axis), or pass --allow-unseen to gate on them as counted"
        )
    merged = [layer.name for layer in report.layers if layer.ran and layer.extra.get(EXPERTS_MERGED)]
    if config.active and not config.allow_unseen and merged:
        model_failures.append(
            f"model: {len(merged)} layer(s) count the units of several experts of a fused mixture of experts as "
            f"one (a unit dead in one expert passes as alive when another expert's fires): {shown_names(merged)}; scan "
            "the PyTorch model (state_dict + --arch, or the Hugging Face folder), which counts each expert apart, "
            "or pass --allow-unseen to gate on them as counted"
        )
    # a quantized/optimized graph's layers meet the float baseline's by their producer's weight
    old_layers = match_layers(config.baseline, report) if config.baseline else {}
    increase = config.max_increase if config.max_increase is not None else 0.0
    verdicts = []
    width_changes: list[str] = []
    for layer in report.layers:
        dead = int(layer.dead_mask().sum())
        fraction = dead / layer.units if layer.units and layer.ran else 0.0
        limit = layer_limit(layer.name, config)
        verdict = LayerVerdict(layer.name, layer.op, layer.units, dead, fraction, limit)
        if layer.ran and limit is not None and fraction > limit:
            verdict.failures.append(
                f"layer {layer.name}: {_pct(fraction)} dead ({dead}/{layer.units}), above the limit {_pct(limit)}"
            )
        old = old_layers.get(layer.name)
        if old is not None and old.ran and layer.ran:
            if old.units != layer.units:
                width_changes.append(
                    f"layer {layer.name} has {layer.units} units, its baseline layer {old.name} {old.units}: "
                    "their dead fractions compare layers of different widths (pruned or widened, or one report "
                    "counted another unit axis: re-scan the baseline with this deadrelu if the model did not change)"
                )
            old_fraction = int(old.dead_mask().sum()) / old.units if old.units else 0.0
            verdict.baseline_fraction = old_fraction
            if fraction - old_fraction > increase + 1e-12:
                verdict.failures.append(
                    f"layer {layer.name}: dead fraction grew from {_pct(old_fraction)} to {_pct(fraction)} "
                    f"(+{100 * (fraction - old_fraction):.1f} points, allowed +{100 * increase:.1f})"
                )
        verdicts.append(verdict)

    result = GateResult(
        layers=verdicts,
        model_failures=model_failures,
        dead_fraction=summary.dead_fraction,
        checked=config.active,
        unseen_other=not_scanned_ops,
        unscanned=dict(report.unscanned),
        unused_limits=unused_layer_limits([layer.name for layer in report.layers], config),
        width_changes=width_changes,
    )
    if config.baseline is not None:
        matched_old = {layer.name for layer in old_layers.values()}
        result.added = [layer.name for layer in report.layers if layer.name not in old_layers]
        result.removed = [layer.name for layer in config.baseline.layers if layer.name not in matched_old]
        if result.added and result.removed and not config.allow_unpaired:
            # unpaired layers on both sides: a renamed layer and a replaced one look alike, and either
            # way the report's layers went unchecked against the baseline
            model_failures.append(
                f"baseline: {len(result.added)} layer(s) of this report and {len(result.removed)} of the baseline "
                f"could not be paired (by weight, output tensor or name), so they were not compared: "
                f"{_listed(result.added)}; baseline: {_listed(result.removed)}; re-scan the baseline with this "
                "deadrelu (its reports record what pairs the layers of an optimized graph), or pass "
                "--allow-unpaired if those layers really changed"
            )
        old_summary = config.baseline.summary()
        result.baseline_dead_fraction = old_summary.dead_fraction
        if summary.dead_fraction - old_summary.dead_fraction > increase + 1e-12:
            model_failures.append(
                f"model: dead fraction grew from {_pct(old_summary.dead_fraction)} to {_pct(summary.dead_fraction)} "
                f"(+{100 * (summary.dead_fraction - old_summary.dead_fraction):.1f} points, allowed +{100 * increase:.1f})"
            )
    return result
