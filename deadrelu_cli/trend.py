"""`deadrelu trend`: dead units across training checkpoints — when each unit died, which revived.

The inputs may also be JSON reports (those `deadrelu_cli.watch` and its training callbacks write per
window, or `scan --json` of each checkpoint): then nothing is scanned and no --data is needed; they are
ordered by the step in their `training` section, else by the number in the file name.

The data is opened once and, for weight-only checkpoints (state_dict / safetensors with --arch), the
model is built once: only the weights change between checkpoints. Other formats (.pt2, TorchScript,
ONNX) are scanned file by file with the same data.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from deadrelu_cli.errors import UserError
from deadrelu_cli.stats import LayerStats

STEP_KEYS = ("global_step", "step", "epoch", "iteration", "iter")


@dataclass
class Checkpoint:
    path: Path
    step: int | None
    source: str  # where the order came from: "checkpoint" (its own step), "file name" or "command line"
    key: str | None = None  # the checkpoint's key that held the step (global_step, epoch, …)


@dataclass
class LayerTrend:
    name: str
    units: int
    dead_fraction: list[float | None]  # per checkpoint (None: the layer did not run there)
    died_at: dict[int, int] = field(
        default_factory=dict
    )  # unit -> index of the checkpoint where it was first dead
    revived: dict[int, int] = field(
        default_factory=dict
    )  # unit -> index of the checkpoint where it came back


@dataclass
class TrendResult:
    checkpoints: list[Checkpoint]
    layers: list[LayerTrend]
    samples: int
    notes: list[str] = field(default_factory=list)  # files whose own step and name disagree

    @property
    def order(self) -> str:
        """Where the order came from, for headers: "checkpoint", "file name", both, or "command line"."""
        return " and ".join(dict.fromkeys(c.source for c in self.checkpoints))

    def to_dict(self) -> dict:
        return {
            "checkpoints": [
                {"path": str(c.path), "step": c.step, "order_from": c.source} for c in self.checkpoints
            ],
            "samples": self.samples,
            "notes": self.notes,
            "layers": [
                {
                    "name": t.name,
                    "units": t.units,
                    "dead_fraction": t.dead_fraction,
                    "died_at": {
                        str(u): self.checkpoints[i].step if self.checkpoints[i].step is not None else i
                        for u, i in t.died_at.items()
                    },
                    "revived": {
                        str(u): self.checkpoints[i].step if self.checkpoints[i].step is not None else i
                        for u, i in t.revived.items()
                    },
                }
                for t in self.layers
            ],
        }


def expand_paths(items: list[str]) -> list[Path]:
    from deadrelu_cli.loaders.hf_folder import is_hf_folder

    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            # a Hugging Face Trainer's output_dir: its checkpoint-N/ model folders (the final model that
            # save_model may have written beside them has no step of its own)
            found = sorted(
                (f for f in p.iterdir() if is_hf_folder(f)), key=lambda f: (_name_number(f) or 0, f)
            )
            if not found and is_hf_folder(p):  # one model folder (checkpoint-N/) is one checkpoint
                paths.append(p)
                continue
            if not found:
                found = sorted(
                    f
                    for f in p.iterdir()
                    if not f.is_dir()
                    and f.suffix.lower() in (".pt", ".pth", ".bin", ".safetensors", ".pt2", ".onnx", ".ckpt")
                )
            if not found:  # a folder of reports (watch(out_dir=…), the training callbacks)
                found = sorted(f for f in p.iterdir() if f.suffix.lower() == ".json")
            if not found:
                raise UserError(
                    f"{item}: no checkpoint files (.pt, .pth, .bin, .ckpt, .safetensors, .pt2, .onnx), "
                    "model folders (checkpoint-N/ with config.json) or JSON reports in this folder"
                )
            paths.extend(found)
        elif any(ch in item for ch in "*?[") and not p.exists():
            import glob

            matched = sorted(glob.glob(item))
            if not matched:
                raise UserError(f"{item}: no file matches this pattern")
            paths.extend(Path(m) for m in matched)
        else:
            paths.append(p)
    if len(paths) < 2:
        raise UserError("trend needs at least two checkpoints (files, a glob or a folder)")
    return paths


def _step_from_checkpoint(path: Path) -> tuple[int, str] | None:
    import torch

    from deadrelu_cli.loaders.detect import TORCH_LEGACY, TORCH_ZIP, detect_format

    if path.is_dir():  # a Trainer's checkpoint-N/: its trainer_state.json has the step
        return _step_from_trainer_state(path / "trainer_state.json")
    if detect_format(path) not in (TORCH_ZIP, TORCH_LEGACY):
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - the scan reports unreadable files with a proper message
        return None
    if isinstance(obj, dict):
        for key in STEP_KEYS:
            value = obj.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value, key
    return None


def _step_from_trainer_state(path: Path) -> tuple[int, str] | None:
    from deadrelu_cli.files import parse_json

    if not path.is_file():  # stat only: a FIFO would block read_text (the folder's loader refuses it)
        return None
    try:
        step = parse_json(path.read_text(encoding="utf-8"), path).get("global_step")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return (step, "global_step") if isinstance(step, int) and not isinstance(step, bool) else None


def is_report(path: Path) -> bool:
    return path.suffix.lower() == ".json"


def _step_from_report(path: Path) -> tuple[int, str] | None:
    """A JSON report's training step (reports made by watch() and the training callbacks)."""
    from deadrelu_cli.files import parse_json

    if not path.is_file():  # stat only: a FIFO would block read_text (load_report refuses it)
        return None
    try:
        training = parse_json(path.read_text(encoding="utf-8"), path).get("training")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None  # load_report says what is wrong with it
    step = training.get("step") if isinstance(training, dict) else None
    return (step, "training step") if isinstance(step, int) and not isinstance(step, bool) else None


def _name_number(path: Path) -> int | None:
    numbers = re.findall(r"\d+", path.stem)
    return int(numbers[-1]) if numbers else None


def order_checkpoints(paths: list[Path]) -> tuple[list[Checkpoint], list[str]]:
    """Each file by its own step/epoch (a report: its training step) when it has one, else by the number in its name; as given when a
    file has neither. Also the notes on files whose metadata and name disagree."""
    found = [_step_from_report(p) if is_report(p) else _step_from_checkpoint(p) for p in paths]
    named = [_name_number(p) for p in paths]
    if any(f is None and n is None for f, n in zip(found, named, strict=True)):
        return [Checkpoint(p, None, "command line") for p in paths], []
    checkpoints = [
        Checkpoint(p, f[0], "checkpoint", f[1]) if f is not None else Checkpoint(p, n, "file name")
        for p, f, n in zip(paths, found, named, strict=True)
    ]
    ordered = sorted(checkpoints, key=lambda c: c.step)
    for before, after in itertools.pairwise(ordered):
        if before.step == after.step:  # two runs mixed, or one saved twice: no order between them
            where = f"its {before.key}" if before.source == "checkpoint" else "the number in its name"
            raise UserError(
                f"{before.path} and {after.path} are both at step {before.step} ({where}): "
                "give one file per step of one run"
            )
    both = [
        (c, n) for c, n in zip(checkpoints, named, strict=True) if c.source != "file name" and n is not None
    ]
    if len(both) == len(paths) and sorted(both, key=lambda cn: cn[1]) == sorted(
        both, key=lambda cn: cn[0].step
    ):
        return ordered, []  # names count in other units (epochs vs steps) but agree on the order
    notes = [
        f"{c.path.name}: {c.key} {c.step} in the file but {n} in its name; placed by its {c.key}"
        for c, n in both
        if c.step != n
    ]
    return ordered, notes


def _scan_all(checkpoints: list[Checkpoint], options) -> tuple[list[list[LayerStats]], int, list[str]]:
    """Each checkpoint's layers, the samples, and what loading the weights said (a second weight
    dict beside the one read, as scan notes it)."""
    from deadrelu_cli.backends.torch.api import resolve_device
    from deadrelu_cli.backends.torch.scan import scan_torch
    from deadrelu_cli.calibration import open_calibration
    from deadrelu_cli.engine import run_scan
    from deadrelu_cli.loaders import LoadOptions, load_model
    from deadrelu_cli.loaders.detect import TORCH_LEGACY, TORCH_ZIP, detect_format
    from deadrelu_cli.loaders.torch_models import (
        load_checkpoint_weights,
        load_safetensors,
        load_state_into,
        unwrap_checkpoint,
    )

    data = open_calibration(
        options.data, options.batch_axes, options.consts, tuple(c.path for c in checkpoints)
    )
    weight_only = options.arch and all(
        detect_format(c.path) in (TORCH_ZIP, TORCH_LEGACY, "safetensors") for c in checkpoints
    )
    results = []
    notes: list[str] = list(getattr(data, "notes", ()))  # what a --data FOLDER read and left out
    if weight_only:
        device = resolve_device(options.device)
        model = load_model(
            LoadOptions(
                str(checkpoints[0].path),
                options.arch,
                options.trust_pickle,
                device,
                weights_key=options.weights_key,
            )
        )  # built once
        notes = list(model.notes)
        for checkpoint in checkpoints:
            if detect_format(checkpoint.path) == "safetensors":
                state = load_safetensors(checkpoint.path, device)
            else:
                whole, _ = load_checkpoint_weights(checkpoint.path, device, options.trust_pickle)
                state = unwrap_checkpoint(whole, options.weights_key)  # detect_format checked each one above
            load_state_into(model.runnable, state, str(checkpoint.path))
            layers, _ = scan_torch(model, data, options, device)
            results.append(layers)
    else:
        for checkpoint in checkpoints:
            results.append(run_scan(replace(options, model=str(checkpoint.path))).layers)
    samples = data.samples if options.limit is None else min(options.limit, data.samples)
    return results, samples, notes


def _read_reports(checkpoints: list[Checkpoint]) -> tuple[list[list[LayerStats]], int]:
    from deadrelu_cli.report.model import COUNT_SETTINGS, load_report, settings_difference

    reports = [load_report(c.path) for c in checkpoints]
    for checkpoint, report in zip(checkpoints[1:], reports[1:], strict=True):
        differ = settings_difference(reports[0], report, COUNT_SETTINGS)
        if differ:
            raise UserError(
                f"{checkpoints[0].path} and {checkpoint.path} were scanned with {differ}: their dead units do not "
                "compare; re-scan them with the same settings"
            )
    return [r.layers for r in reports], max(r.data.samples for r in reports)


def run_trend(items: list[str], options) -> TrendResult:
    checkpoints, notes = order_checkpoints(expand_paths(items))
    kinds = {is_report(c.path) for c in checkpoints}
    if kinds == {True, False}:
        raise UserError("trend takes checkpoints or JSON reports, not both in one run")
    if kinds == {True}:
        scans, samples = _read_reports(checkpoints)
    elif options.data is None:
        raise UserError("missing --data: the calibration data to scan each checkpoint with")
    else:
        scans, samples, loaded = _scan_all(checkpoints, options)
        notes = [*notes, *loaded]
    names: list[str] = []
    for layers in scans:
        for layer in layers:
            if layer.name not in names:
                names.append(layer.name)
    trends = []
    for name in names:
        per = [
            next((layer for layer in layers if layer.name == name and layer.ran), None) for layers in scans
        ]
        seen = [(c, layer.units) for c, layer in zip(checkpoints, per, strict=True) if layer is not None]
        other = next(((c, n) for c, n in seen if n != seen[0][1]), None)
        if other is not None:  # its dead fractions and unit numbers would mean different units
            raise UserError(
                f"layer {name} has {seen[0][1]} units in {seen[0][0].path} but {other[1]} in "
                f"{other[0].path}: these are not checkpoints of one model; trend one run's files"
            )
        units = max((layer.units for layer in per if layer is not None), default=0)
        trend = LayerTrend(
            name,
            units,
            [
                None if layer is None else float(layer.dead_mask().mean()) if layer.units else 0.0
                for layer in per
            ],
        )
        was_dead = np.zeros(units, dtype=bool)
        for index, layer in enumerate(per):
            if layer is None or layer.units != units:
                continue
            dead = layer.dead_mask()
            for unit in np.flatnonzero(dead & ~was_dead):
                trend.died_at.setdefault(int(unit), index)
            for unit in np.flatnonzero(was_dead & ~dead):
                trend.revived[int(unit)] = index
            was_dead = dead
        trends.append(trend)
    return TrendResult(checkpoints, trends, samples, notes)
