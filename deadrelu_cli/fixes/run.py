"""`deadrelu fix`: scan, patch, write to a temp file, verify *that file* on the data, then rename.

The verification loads the written artifact back with the same loaders as `scan`, replays the
calibration data through it and the original, compares every output, and rescans it for dead units.
Nothing reaches OUT unless that passes (or --force).
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from deadrelu_cli.backends import backend_of
from deadrelu_cli.calibration import CalibrationData, open_calibration
from deadrelu_cli.engine import run_scan_detailed
from deadrelu_cli.errors import UserError
from deadrelu_cli.files import (
    check_companion_free,
    commit_temp,
    copy_folder_file,
    guard_outputs,
    temp_folder_for,
    temp_path_for,
)
from deadrelu_cli.fixes.plan import EXACT_STRATEGIES, STRATEGIES, FixOptions, FixResult, plan_layers
from deadrelu_cli.loaders.companions import model_companions
from deadrelu_cli.options import ScanOptions


def _outputs_of(
    runner,
    data,
    scan_options: ScanOptions,
    mask=None,
    notes: list[str] | None = None,
    orders: dict[int, bool | None] | None = None,
) -> list[list[np.ndarray]]:
    """Every output of every batch; with a position mask, outputs with the [batch, tokens] axes keep
    only the counted positions (a padded position's output is not compared, as it is not counted):
    [B, T, ...], time-major [T, B, ...], and rows [B*T, ...] flattened from either. Where the shape
    cannot say which (rows; [B, T] at as many samples as tokens), the batch is run again with its samples
    reversed and what comes back reversed is the samples' (probe.ops.reordered_order); an output that
    does not tell is compared at every position, which a line in `notes` says. `orders` (output index ->
    what its first batch told) is filled by the first call and read by the next (the patched model's
    outputs are cut as the original's were)."""
    from deadrelu_cli.inputs import DECODER_IDS, LABELS, batch_mask, decoder_batch_mask, output_keep
    from deadrelu_cli.probe.ops import reordered_order

    # the labels are fed only where an encoder-decoder's decoder runs on them (inputs.decoder_from_labels)
    labels_fed = LABELS in data.names and LABELS not in getattr(data, "unfed", ())
    consts, axes = set(getattr(data, "consts", ())), getattr(data, "batch_axes", {})
    orders = {} if orders is None else orders  # output -> time-major? as reordering told (None: not)
    untold: set[int] = set()

    def reversed_batch(batch: dict) -> dict:
        flipped = {}
        for name, array in batch.items():
            array, axis = np.asarray(array), axes.get(name, 0)
            keep_it = name in consts or array.ndim <= axis
            flipped[name] = array if keep_it else np.flip(array, axis).copy()
        return flipped

    def lead_sums(a: np.ndarray, flat: bool) -> tuple:
        a = np.abs(a.astype(np.float64))  # sums of |x|: no cancellation
        leads = (0,) if flat else (0, 1)
        return tuple(a.sum(axis=tuple(d for d in range(a.ndim) if d != lead)) for lead in leads)

    outputs = []
    for batch in data.batches(scan_options.batch_size, scan_options.limit, scan_options.allow_nonfinite):
        out = runner(batch)
        if mask is not None:
            keep = batch_mask(mask, batch)
            # named outputs of an encoder-decoder fed decoder_input_ids: the decoder's on its own positions
            names = getattr(out, "names", ())
            fed = bool(names) and (DECODER_IDS in batch or (labels_fed and LABELS in batch))
            decoder_keep = decoder_batch_mask(mask, batch) if fed else None
            again = None
            kept = []
            for i, a in enumerate(out):
                k = output_keep(names[i], keep, decoder_keep, fed) if fed else keep
                if k is None:
                    kept.append(a)
                    continue
                to_frames = getattr(out, "to_frames", None)
                if to_frames is not None and a.ndim >= 2 and a.shape[:2] != k.shape:
                    frames = to_frames(k)  # a speech encoder's output: its frames' positions (or their rows)
                    k = frames if a.shape[:2] == frames.shape or a.shape[0] == frames.size != k.size else k
                b, t = k.shape
                square = b == t > 1 and a.ndim >= 2 and a.shape[:2] == k.shape
                flat = b > 1 and t > 1 and a.ndim >= 1 and a.shape[0] == b * t
                if (square or flat) and i not in orders:
                    orders[i] = None
                    if again is None:
                        again = runner(reversed_batch(batch))
                    other = np.asarray(again[i])
                    if other.shape == a.shape:
                        orders[i] = reordered_order(flat, b, t, lead_sums(a, flat), lead_sums(other, flat))
                told = orders.get(i)
                if (square or flat) and told is None:
                    untold.add(i)  # compared at every position, padding included (said below)
                elif flat:
                    a = a[(k.T if told else k).reshape(-1)]
                elif square:
                    a = a[k.T] if told else a[k]
                elif a.ndim >= 2 and a.shape[:2] == k.shape:
                    a = a[k]
                elif a.ndim >= 2 and a.shape[:2] == k.T.shape:  # time-major [T, B, ...]
                    a = a[k.T]
                elif b == 1 and a.ndim >= 1 and a.shape[0] == t:  # one sample's rows: either order
                    a = a[k.reshape(-1)]
                kept.append(a)
            out = kept
        outputs.append(out)
    if untold and notes is not None:
        note = (
            f"output(s) {', '.join(str(i) for i in sorted(untold))} hold the batch's positions as rows (or "
            "[batch, tokens] at as many samples as tokens) in an order reordering the samples did not tell: "
            "the output change is measured at every position there, padding included"
        )
        if note not in notes:
            notes.append(note)
    return outputs


def _position_mask(scanned, scan_options: ScanOptions, data):
    """The positions the scan counted."""
    from deadrelu_cli.inputs import is_pixel_mask, resolve_mask

    spec = resolve_mask(scan_options.mask, scan_options.exclude_token_ids, data)
    # an image's pixel mask marks no output's positions (a detector's outputs are its object queries)
    return None if is_pixel_mask(spec, data) else spec


def compare(before: list[list[np.ndarray]], after: list[list[np.ndarray]]) -> tuple[float, float]:
    """Max absolute difference over every output element, and that divided by the largest |output|."""
    max_abs, scale = 0.0, 0.0
    for a_batch, b_batch in zip(before, after, strict=True):
        if len(a_batch) != len(b_batch):
            raise UserError("the patched model returns a different number of outputs")
        for a, b in zip(a_batch, b_batch, strict=True):
            if a.shape != b.shape:
                raise UserError(
                    f"the patched model's output has shape {list(b.shape)}, the original {list(a.shape)}"
                )
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            max_abs = max(max_abs, float(np.max(np.abs(a64 - b64))) if a.size else 0.0)
            scale = max(scale, float(np.max(np.abs(a64))) if a.size else 0.0)
    return max_abs, (max_abs / scale if scale > 0 else max_abs)


def _move_into_place(companions: list[tuple], copies: list[tuple]) -> None:
    """Files that go with OUT (a training checkpoint's optimizer.pt, the rest of its folder)."""
    for temp, final in companions:
        commit_temp(temp, final)
    for source, destination in copies:  # checked again now: a link made since is not followed out
        copy_folder_file(source, destination, source.parent)


def _holdout_data(scan_options: ScanOptions, fraction: float) -> CalibrationData:
    """The last `fraction` of the samples (after --limit), opened on their own; the scan gets the rest."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"--holdout {fraction:g}: give a fraction between 0 and 1, e.g. 0.2")
    if scan_options.text is not None:  # the same documents, tokenized as the scan tokenizes them
        from deadrelu_cli.engine import open_data

        data = open_data(scan_options, "hf_folder")[0]
    else:
        data = open_calibration(
            scan_options.data, scan_options.batch_axes, scan_options.consts, (scan_options.model,)
        )
    if not isinstance(data, CalibrationData):
        raise UserError("--holdout needs one data file, not a glob: the hold-out is its last samples")
    total = data.samples if scan_options.limit is None else min(scan_options.limit, data.samples)
    held = int(round(total * fraction))
    if held < 1 or held >= total:
        raise UserError(
            f"--holdout {fraction:g} of {total} samples leaves no samples for the scan or the hold-out"
        )
    data.select(total - held, total)
    return data


def _verify_on_holdout(
    scanned, holdout, plans, original_runner, patched_runner, scan_options, result
) -> None:
    """Which acted-on units fire on samples the scan did not see, and how outputs change there."""
    options = replace(scan_options, limit=None, progress=None)
    _, layers, _ = backend_of(scanned.model).load_and_scan(options, holdout, scanned.device)
    by_name = {layer.name: layer for layer in layers}
    for plan in plans:
        layer = by_name.get(plan.name)
        if layer is not None and layer.ran and layer.units == plan.all_units:
            fired = [u for u in plan.units if layer.positive_counts[u] > 0]
            if fired:
                result.holdout_fired[plan.name] = fired
    result.holdout_samples = holdout.window[1] - holdout.window[0]
    mask = _position_mask(scanned, scan_options, holdout)  # padding is not compared there either
    orders: dict = {}
    before = _outputs_of(original_runner, holdout, options, mask, result.notes, orders)
    after = _outputs_of(patched_runner(), holdout, options, mask, None, orders)
    result.holdout_max_abs_diff, result.holdout_max_rel_diff = compare(before, after)


def _fail(result: FixResult, why: str) -> None:
    """Not verified, and why (a note in the table; the error line with -q)."""
    result.verified = False
    result.notes.append(why)
    result.failures.append(why)


REVIVING_STRATEGIES = ("reinit", "kick", "bias-shift")  # their point is that the units fire again
REVIVE_HINT = {
    "kick": "raise --kick-scale",
    "reinit": "check the layer's input: it may be constant or zero on this data",
    "bias-shift": "raise --target-rate",
}


def _check_revived(options: FixOptions, outcomes, result: FixResult) -> None:
    """Not verified when none of the acted-on units fires on the data afterwards: the file would change
    weights and fix nothing (a kick too small for the pre-activations, say)."""
    acted = [(o, o.rates_after) for o in outcomes if o.applied and o.rates_after is not None]
    total = sum(len(rates) for _, rates in acted)
    revived = sum(sum(rate > 0 for rate in rates) for _, rates in acted)
    if total and not revived:
        _fail(
            result,
            f"--strategy {options.strategy} revived none of the {total} dead units it changed "
            f"(none fires on the data afterwards); {REVIVE_HINT[options.strategy]}",
        )
    elif total and revived < total:
        hint = f"; {REVIVE_HINT[options.strategy]} to revive more" if options.strategy != "reinit" else ""
        result.notes.append(f"revived {revived} of the {total} dead units it changed{hint}")


def _check_promises(options: FixOptions, outcome, elements: int, threshold: float, result: FixResult) -> None:
    """Not verified when an acted-on unit does not do on the written file what the strategy computed:
    a unit it said fires (`outcome.promised` > 0) never exceeds --threshold in the rescan, or a shifted
    unit fires on more than twice what the shift was computed for (an op between the bias and the
    activation that the gain measurement missed, rounding at a tie)."""
    if outcome.promised is None or outcome.rates_after is None:
        return
    pairs = list(zip(outcome.units, outcome.promised, outcome.rates_after, strict=True))
    dead = [unit for unit, promised, rate in pairs if promised > 0 and rate <= 0]
    if dead:
        shown = ", ".join(str(u) for u in dead[:8]) + (", …" if len(dead) > 8 else "")
        _fail(
            result,
            f"{outcome.name}: {len(dead)} of the {len(pairs)} units {options.strategy} changed to fire still "
            f"never exceed --threshold {threshold:g} on the data in the written file (units {shown})",
        )
    if options.strategy == "bias-shift":
        # a move it could not make (its promise what the unit fired on before: nothing) is no revival
        # either; exit 0 with "revived N of M" would claim a fix it did not get
        stuck = [unit for unit, promised, rate in pairs if promised <= 0 and rate <= 0]
        if stuck:
            shown = ", ".join(str(u) for u in stuck[:8]) + (", …" if len(stuck) > 8 else "")
            _fail(
                result,
                f"{outcome.name}: bias-shift could not move {len(stuck)} of the {len(pairs)} units past their "
                f"cut (units {shown}): one step of their {outcome.coarse_dtype or 'stored'} entry is wider than "
                "the gap between their values; use --strategy reinit or kick there, or --layers to leave it out",
            )
        over = [
            (rate, promised)
            for _, promised, rate in pairs
            if promised > 0 and rate > 2 * promised + 2 / max(1, elements)
        ]
        if over:
            rate, promised = max(over)
            _fail(
                result,
                f"{outcome.name}: shifted units fire on up to {rate:.1%} of the data, not the {promised:.1%} "
                "the shift was computed for: something between the bias and the activation moved it "
                "otherwise than measured (use --strategy reinit or kick there, or --layers to leave it out)",
            )
    unreached = sum(promised <= 0 for _, promised, _ in pairs)
    if unreached and options.strategy == "reinit":
        result.notes.append(
            f"{outcome.name}: {unreached} of the {len(pairs)} re-initialised units cannot exceed --threshold "
            f"{threshold:g} with the drawn row or its negation (their inputs are zero or too small on this "
            "data): not revived"
        )
    tied = [
        promised for promised in outcome.promised if promised > 2 * options.target_rate + 2 / max(1, elements)
    ]
    if tied and options.strategy == "bias-shift" and outcome.coarse_dtype:
        result.notes.append(
            f"{outcome.name}: {len(tied)} shifted units fire on up to {max(tied):.1%} of the data, above "
            f"--target-rate {options.target_rate:g}: their {outcome.coarse_dtype} bias (the dtype the file "
            "stores it in) cannot place the cut between their values; one step lower would leave them dead"
        )
    elif tied and options.strategy == "bias-shift":
        result.notes.append(
            f"{outcome.name}: {len(tied)} shifted units fire on up to {max(tied):.1%} of the data, above "
            f"--target-rate {options.target_rate:g}: their values tie at the cut (equal on many positions), "
            "and tied values fire together"
        )


def _why_outputs_changed(report, outcomes, strategy: str, threshold: float) -> str:
    """Why an exact strategy changed outputs, when the scan tells: with --threshold > 0, units dead at
    it may still be positive (in (0, threshold]), so the next layer reads them and zeroing their
    outgoing weights (reinit) or removing them (prune) changes what it computes."""
    if threshold <= 0:
        return ""
    acted = [(report.layer(o.name), o.units) for o in outcomes if o.applied]
    peaks = [float(layer.max_preactivation[units].max()) for layer, units in acted if len(units)]
    positive = sum(int((layer.max_preactivation[units] > 0).sum()) for layer, units in acted)
    if not positive:
        return ""
    total = sum(len(units) for _, units in acted)
    done = "zeroes their outgoing weights" if strategy == "reinit" else "removes them"
    return (
        f": {positive} of the {total} units are dead only at --threshold {threshold:g} (positive up to "
        f"{max(peaks):.3g}, which the next layer reads) and {strategy} {done}; use --threshold 0 for an "
        f"exact {strategy}, or bias-shift, kick or leaky"
    )


def run_fix(scan_options: ScanOptions, options: FixOptions) -> FixResult:
    if options.strategy not in STRATEGIES:
        raise UserError(f"--strategy {options.strategy!r}: choose one of {', '.join(STRATEGIES)}")
    output = Path(options.output)
    guard_outputs(
        [("--output", output)],
        [
            ("MODEL", scan_options.model),
            ("--data", scan_options.data),
            ("--text", scan_options.text),
            *model_companions(scan_options.model, [("--output", output)]),
        ],
    )
    folder_out = Path(scan_options.model).is_dir()  # a model folder is fixed into a model folder
    if folder_out and output.exists():
        raise UserError(f"--output {output}: already exists; a model folder is written to a new folder name")
    if not folder_out and output.exists() and output.is_dir():
        raise UserError(f"--output {output}: is a directory")
    holdout = None
    if options.holdout is not None:
        holdout = _holdout_data(scan_options, options.holdout)
        scan_options = replace(scan_options, limit=holdout.window[0])  # the scan sees the rest only
    scanned = run_scan_detailed(scan_options)
    if isinstance(scan_options.batch_size, str):  # "auto": the later passes use the size the scan chose
        backend = backend_of(scanned.model)
        scan_options = replace(
            scan_options, batch_size=backend.batch_size("auto", scanned.model, scanned.data, scanned.device)
        )
    fixed = scanned.model.fixed_batch
    if fixed is not None and not scan_options.batch_size_explicit:  # the batch the graph's inputs accept
        scan_options = replace(scan_options, batch_size=fixed, batch_size_explicit=True)
    if options.certified_only and not scan_options.certify:
        raise UserError("--certified-only needs --input-range (the box over which units are certified dead)")
    plans = plan_layers(scanned.report, options.layers, options.certified_only)
    result = FixResult(
        strategy=options.strategy, output=str(output), scanned_samples=scanned.report.data.samples
    )
    seen = [scanned.report.layer(plan.name).elements_per_unit for plan in plans]
    result.values_per_unit = min(seen) if seen else None
    if not plans:
        ran = [layer for layer in scanned.report.layers if layer.ran]
        if not ran:  # no silent all-clear: nothing was seen, so nothing is known to be clean
            raise UserError("no activation site ran on the data: nothing to decide a fix on; nothing written")
        where = f" in layers matching {' '.join(options.layers)}" if options.layers else ""
        units = sum(layer.units for layer in ran)
        result.nothing_to_fix = result.verified = True
        result.notes.append(
            f"no {'provably ' if options.certified_only else ''}dead units{where} "
            f"({units} units in {len(ran)} layers); nothing to fix, nothing written"
        )
        return result
    apply = backend_of(scanned.model).apply_fix
    # a model folder is written as a new folder beside OUT, renamed onto it once verified (guard_outputs
    # and the checks above have refused a missing parent and an existing OUT)
    temp = temp_folder_for(output) if folder_out else temp_path_for(output, "--output")
    try:
        original_runner, patched_runner, outcomes = apply(scanned, plans, options, scan_options, temp, result)
        result.layers = outcomes
        if not any(outcome.applied for outcome in outcomes):
            raise UserError(
                "no layer could be patched: " + "; ".join(f"{o.name}: {o.action}" for o in outcomes)
            )
        mask = _position_mask(scanned, scan_options, scanned.data)
        orders: dict = {}
        before = _outputs_of(original_runner, scanned.data, scan_options, mask, result.notes, orders)
        after = _outputs_of(patched_runner(), scanned.data, scan_options, mask, None, orders)
        result.max_abs_diff, result.max_rel_diff = compare(before, after)
        if holdout is not None:
            _verify_on_holdout(scanned, holdout, plans, original_runner, patched_runner, scan_options, result)
        ops = scan_options.ops + (("leaky_relu", "elu") if options.strategy in ("leaky", "elu") else ())
        rescan = run_scan_detailed(replace(scan_options, model=str(temp), ops=ops, progress=None)).report
        after_by_name = {layer.name: layer for layer in rescan.layers}
        by_position = len(rescan.layers) == len(scanned.report.layers)  # e.g. torch names -> ONNX node names
        positions = {layer.name: i for i, layer in enumerate(scanned.report.layers)}
        elements: dict[str, int] = {}  # values per unit of each rescanned layer
        for outcome in outcomes:
            layer = after_by_name.get(outcome.name) or after_by_name.get(f"module.{outcome.name}")
            if layer is None and by_position:
                layer = rescan.layers[positions[outcome.name]]
            if layer is not None:
                outcome.dead_after = int(layer.dead_mask().sum())
                outcome.units_after = layer.units
                # (for leaky/elu "fires" is not the point: the units now pass gradient below zero)
                if (
                    layer.units == scanned.report.layer(outcome.name).units
                    and layer.ran
                    and options.strategy not in ("leaky", "elu")
                ):
                    outcome.rates_after = [float(r) for r in layer.active_rate()[outcome.units]]
                    elements[outcome.name] = layer.elements_per_unit
        exact = options.strategy in EXACT_STRATEGIES
        result.verified = True
        if exact and result.max_rel_diff > options.tolerance:
            _fail(
                result,
                f"outputs changed by {result.max_rel_diff:.3g} relative (> --tolerance {options.tolerance:g})"
                + _why_outputs_changed(scanned.report, outcomes, options.strategy, scan_options.threshold),
            )
        if options.strategy in REVIVING_STRATEGIES:
            _check_revived(options, outcomes, result)
        for outcome in outcomes:
            if outcome.applied and outcome.name in elements:
                _check_promises(options, outcome, elements[outcome.name], scan_options.threshold, result)
        if (
            exact
            and result.holdout_max_rel_diff is not None
            and result.holdout_max_rel_diff > options.tolerance
        ):
            _fail(
                result,
                f"outputs on the hold-out changed by {result.holdout_max_rel_diff:.3g} relative "
                f"(> {options.tolerance:g}): units dead on the scanned data fire on new data",
            )
        if result.verified or options.force:
            for _, final in result.companions:  # checked when planned; again now, before anything moves
                check_companion_free(final, output)
            commit_temp(temp, output)
            _move_into_place(result.companions, result.copies)
            result.written = True
        return result
    finally:
        for companion, _ in result.companions:
            if companion.exists():
                companion.unlink()
        if temp.is_dir():
            shutil.rmtree(temp)
        elif temp.exists():
            temp.unlink()
