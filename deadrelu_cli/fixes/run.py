"""`deadrelu fix`: scan, patch, write to a temp file, verify *that file* on the data, then rename.

The verification loads the written artifact back with the same loaders as `scan`, replays the
calibration data through it and the original, compares every output, and rescans it for dead units.
Nothing reaches OUT unless that passes (or --force).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from deadrelu_cli.backends import backend_of
from deadrelu_cli.engine import run_scan_detailed
from deadrelu_cli.errors import UserError
from deadrelu_cli.files import refuse_overwrite_of_inputs
from deadrelu_cli.fixes.plan import EXACT_STRATEGIES, STRATEGIES, FixOptions, FixResult, plan_layers
from deadrelu_cli.options import ScanOptions


def _temp_path(output: Path) -> Path:
    directory = output.parent if str(output.parent) else Path(".")
    if not directory.is_dir():
        raise UserError(f"--output {output}: directory {directory} does not exist")
    try:
        handle, name = tempfile.mkstemp(prefix=f".{output.stem}.", suffix=output.suffix, dir=directory)
    except OSError as exc:
        raise UserError(f"--output {output}: cannot write there ({exc.strerror})") from None
    os.close(handle)
    return Path(name)


def _outputs_of(runner, data, scan_options: ScanOptions) -> list[list[np.ndarray]]:
    return [
        runner(batch)
        for batch in data.batches(scan_options.batch_size, scan_options.limit, scan_options.allow_nonfinite)
    ]


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
    import shutil

    for temp, final in companions:
        os.replace(temp, final)
    for source, destination in copies:
        shutil.copy2(source, destination)


def run_fix(scan_options: ScanOptions, options: FixOptions) -> FixResult:
    if options.strategy not in STRATEGIES:
        raise UserError(f"--strategy {options.strategy!r}: choose one of {', '.join(STRATEGIES)}")
    output = Path(options.output)
    refuse_overwrite_of_inputs(output, [scan_options.model, scan_options.data])
    if output.exists() and output.is_dir():
        raise UserError(f"--output {output}: is a directory")
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
    result = FixResult(strategy=options.strategy, output=str(output))
    if not plans:
        raise UserError(
            "no dead units to fix"
            + (f" in layers matching {' '.join(options.layers)}" if options.layers else "")
            + "; nothing written"
        )
    apply = backend_of(scanned.model).apply_fix
    temp = _temp_path(output)
    try:
        original_runner, patched_runner, outcomes = apply(scanned, plans, options, scan_options, temp, result)
        result.layers = outcomes
        if not any(outcome.applied for outcome in outcomes):
            raise UserError(
                "no layer could be patched: " + "; ".join(f"{o.name}: {o.action}" for o in outcomes)
            )
        before = _outputs_of(original_runner, scanned.data, scan_options)
        after = _outputs_of(patched_runner(), scanned.data, scan_options)
        result.max_abs_diff, result.max_rel_diff = compare(before, after)
        ops = scan_options.ops + (("leaky_relu", "elu") if options.strategy in ("leaky", "elu") else ())
        rescan = run_scan_detailed(replace(scan_options, model=str(temp), ops=ops, progress=None)).report
        after_by_name = {layer.name: layer for layer in rescan.layers}
        by_position = len(rescan.layers) == len(scanned.report.layers)  # e.g. torch names -> ONNX node names
        positions = {layer.name: i for i, layer in enumerate(scanned.report.layers)}
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
        exact = options.strategy in EXACT_STRATEGIES
        result.verified = (result.max_rel_diff <= options.tolerance) if exact else True
        if exact and not result.verified:
            result.notes.append(
                f"outputs changed by {result.max_rel_diff:.3g} relative (> {options.tolerance:g})"
            )
        if result.verified or options.force:
            os.replace(temp, output)
            _move_into_place(result.companions, result.copies)
            result.written = True
        return result
    finally:
        for path in [temp] + [companion for companion, _ in result.companions]:
            if path.exists():
                path.unlink()
