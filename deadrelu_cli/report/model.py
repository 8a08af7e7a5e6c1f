"""The report: one dataclass for every backend, JSON schema version 1 (docs/report-schema.md)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from deadrelu_cli.errors import UserError
from deadrelu_cli.files import check_regular_file
from deadrelu_cli.report.fingerprint import (
    DOCUMENT_METHOD,
    SampleSketch,
    shared_samples,
    sketch_from_dict,
    union_sketch,
)
from deadrelu_cli.report.validate import reject_constant, validate_report
from deadrelu_cli.stats import FREQUENCY_EDGES, LayerStats, Thresholds, merge_layer
from deadrelu_cli.version import __version__

SCHEMA_VERSION = (
    2  # 2: per-layer certified_dead_indices / upper_bound (--certify); version 1 reports still load
)
READABLE_VERSIONS = (1, 2)
SCHEMA_PATH = Path(__file__).with_name("schema_v2.json")
MODEL_FORMATS = (
    "state_dict",
    "safetensors",
    "torchscript",
    "exported_program",
    "module",
    "onnx",
    "hf_folder",
)


@dataclass
class ModelInfo:
    path: str
    format: str
    sha256: str


@dataclass
class DataInfo:
    path: str
    samples: int
    # --text: how the documents became samples ({"packing": "pad"|"pack", "seq_len", "documents", …}), or None
    text: dict | None = None
    # which samples were counted (report.fingerprint: a sketch of per-sample digests), or None (older
    # reports, training windows)
    fingerprint: dict | None = None

    def samples_text(self) -> str:
        """The sample count, and for --text how they were made: "12 samples (40 documents packed into …)"."""
        out = f"{self.samples} samples"
        t = self.text or {}
        if t.get("packing") == "pack":
            out += f" ({t.get('documents')} documents packed into {t.get('seq_len')}-token blocks)"
        elif t.get("packing") == "pad":
            out += f" (one document each, padded, at most {t.get('seq_len')} tokens)"
        return out


@dataclass
class Settings:
    threshold: float = 0.0
    dying: float = 0.01
    tau: float = 0.1
    channel_dim: int | None = None  # None = per site (inferred)
    device: str = "cpu"
    ops: tuple[str, ...] = ("relu", "relu6")

    @property
    def thresholds(self) -> Thresholds:
        return Thresholds(self.threshold, self.dying, self.tau)


@dataclass
class Summary:
    layers: int
    units: int
    dead: int
    dead_fraction: float
    dying: int
    dormant: int
    layers_with_dead: int
    saturated: int
    certified_dead: int | None = None  # None when no layer was certified
    # mean fraction of units inactive per counted position, over every unit of every layer that ran
    activation_sparsity: float | None = None


@dataclass
class TrainingInfo:
    """Where a report made during training (`deadrelu_cli.watch`) sits in the run, and what changed
    since the previous window: per layer, the units newly dead and revived, and the ReDo persistence
    (the share of the previous window's dead units still dead; None when none were dead)."""

    step: int  # the last sampled step of the window (what `deadrelu trend` orders by)
    first_step: int
    sampled_steps: int
    every: int
    window: int  # index of the window, from 0
    epoch: int | None = None
    # the process's rank when the window holds that rank's own counts (watch(distributed=False) under
    # several ranks); None: one process, or every rank's counts
    rank: int | None = None
    newly_dead: dict[str, list[int]] = field(default_factory=dict)
    revived: dict[str, list[int]] = field(default_factory=dict)
    persistence: dict[str, float | None] = field(default_factory=dict)
    persistence_overall: float | None = None


@dataclass
class Report:
    model: ModelInfo
    data: DataInfo
    settings: Settings
    layers: list[LayerStats]
    tool: dict[str, str] = field(default_factory=lambda: {"name": "deadrelu", "version": __version__})
    notes: list[str] = field(default_factory=list)
    training: TrainingInfo | None = None  # reports made while training (watch); None for scans
    # the token positions that counted ({"array": "attention_mask", "exclude_token_ids": [...]}), or None
    mask: dict | None = None
    unseen: dict[str, int] = field(default_factory=dict)  # node type -> count of activations not scanned
    # op -> layers of an activation --ops could count but did not ask for (a LeakyReLU beside the ReLUs)
    unscanned: dict[str, int] = field(default_factory=dict)

    def layer(self, name: str) -> LayerStats:
        for layer in self.layers:
            if layer.name == name:
                return layer
        names = ", ".join(layer.name for layer in self.layers[:8])
        raise UserError(f"no layer named {name!r}; layers are: {names}{' …' if len(self.layers) > 8 else ''}")

    def summary(self) -> Summary:
        s = self.settings
        ran = [layer for layer in self.layers if layer.ran]
        units = sum(layer.units for layer in ran)
        dead = sum(int(layer.dead_mask().sum()) for layer in ran)
        # docs/report-schema.md: 1 - Σ positives / Σ (units × elements_per_unit), every counted value
        # weighs the same (not each layer: a conv layer counts H·W positions per sample, a Linear one)
        values = sum(layer.units * float(layer.elements_per_unit) for layer in ran if layer.units)
        positives = sum(float(layer.positive_counts.sum()) for layer in ran if layer.units)
        return Summary(
            layers=len(self.layers),
            units=units,
            dead=dead,
            dead_fraction=(dead / units) if units else 0.0,
            dying=sum(int(layer.dying_mask(s.dying).sum()) for layer in ran),
            dormant=sum(int(layer.dormant_mask(s.tau).sum()) for layer in ran),
            layers_with_dead=sum(1 for layer in ran if layer.dead_mask().any()),
            saturated=sum(int(layer.saturated_mask().sum()) for layer in ran),
            certified_dead=(
                sum(len(layer.certified_dead or []) for layer in self.layers)
                if any(layer.upper_bound is not None or layer.certify_note for layer in self.layers)
                else None
            ),
            activation_sparsity=1.0 - positives / values if values else None,
        )


def _finite_or_none(values: np.ndarray) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in values.tolist()]


def _indices(mask: np.ndarray) -> list[int]:
    return np.flatnonzero(mask).astype(int).tolist()


def layer_to_dict(layer: LayerStats, settings: Settings) -> dict[str, Any]:
    dead = layer.dead_mask()
    out: dict[str, Any] = {
        "name": layer.name,
        "op": layer.op,
        "module_type": layer.module_type,
        "units": layer.units,
        "channel_dim": layer.channel_dim,
        "ran": layer.ran,
        "elements_per_unit": int(layer.elements_per_unit),
        "dead": int(dead.sum()),
        "dead_fraction": (float(dead.sum()) / layer.units) if layer.units and layer.ran else 0.0,
        "dead_indices": _indices(dead),
        "dying_indices": _indices(layer.dying_mask(settings.dying)),
        "dormant_indices": _indices(layer.dormant_mask(settings.tau)),
        "positive_counts": layer.positive_counts.astype(int).tolist(),
        "active_rate": layer.active_rate().tolist(),
        "max_preactivation": _finite_or_none(layer.max_preactivation),
        "sum_abs": layer.sum_abs.tolist(),
        "producer": layer.producer,
        "bias": None if layer.bias is None else layer.bias.astype(float).tolist(),
    }
    out["activation_sparsity"] = layer.activation_sparsity()
    if layer.ran and layer.units:
        dead_units, counts = layer.firing_histogram()
        out["firing_histogram"] = {
            "log10_edges": [round(float(e), 2) for e in np.log10(FREQUENCY_EDGES)],
            "counts": counts.astype(int).tolist(),
            "dead": dead_units,
        }
    if layer.saturated_counts is not None:
        out["saturated_counts"] = layer.saturated_counts.astype(int).tolist()
        out["saturated_indices"] = _indices(layer.saturated_mask())
    out["certified_dead_indices"] = layer.certified_dead
    out["upper_bound"] = None if layer.upper_bound is None else _finite_or_none(layer.upper_bound)
    if layer.certify_note:
        out["certify_note"] = layer.certify_note
    if layer.implicit:
        out["implicit"] = layer.implicit
    if layer.weight:
        out["weight"] = layer.weight
    if layer.output_tensor:
        out["output_tensor"] = layer.output_tensor
    if layer.min_preactivation is not None:
        out["min_preactivation"] = _finite_or_none(layer.min_preactivation)
    if layer.samples is not None:
        out["samples"] = int(layer.samples)
    if layer.nonfinite:
        out["nonfinite"] = int(layer.nonfinite)
    if layer.extra:
        out["extra"] = layer.extra
    return out


def report_to_dict(report: Report) -> dict[str, Any]:
    s = report.settings
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": dict(report.tool),
        "model": vars(report.model).copy(),
        "data": {k: v for k, v in vars(report.data).items() if v is not None},
        "settings": {
            "threshold": s.threshold,
            "dying": s.dying,
            "tau": s.tau,
            "channel_dim": s.channel_dim,
            "device": s.device,
            "ops": list(s.ops),
        },
        "summary": vars(report.summary()).copy(),
        "notes": list(report.notes),
        **({"mask": dict(report.mask)} if report.mask is not None else {}),
        **({"unseen_activations": dict(report.unseen)} if report.unseen else {}),
        **({"unscanned_activations": dict(report.unscanned)} if report.unscanned else {}),
        "layers": [layer_to_dict(layer, s) for layer in report.layers],
        **({"training": _training_dict(report.training)} if report.training is not None else {}),
    }


def report_to_json(report: Report) -> str:
    for layer in report.layers:  # JSON has no NaN/Inf: say which layer and why instead of crashing
        if not np.isfinite(layer.sum_abs).all():
            raise UserError(
                f"layer {layer.name}: the sum of |activation| is NaN or Inf (NaN/Inf or huge values in the "
                "data or the weights); a JSON report cannot hold it: clean the data or check the weights, "
                "or pass --allow-nonfinite to leave NaN/Inf values out of the statistics"
            )
        if layer.bias is not None and not np.isfinite(layer.bias).all():
            raise UserError(
                f"layer {layer.name}: its bias holds NaN or Inf; a JSON report cannot hold it: check the weights, "
                "or pass --allow-nonfinite to leave the bias out of the report"
            )
    return json.dumps(report_to_dict(report), indent=2, allow_nan=False) + "\n"


def layer_from_dict(d: dict[str, Any]) -> LayerStats:
    max_pre = np.array([-np.inf if v is None else v for v in d["max_preactivation"]], dtype=np.float64)
    sat = d.get("saturated_counts")
    bias = d.get("bias")
    return LayerStats(
        name=d["name"],
        op=d["op"],
        channel_dim=int(d["channel_dim"]),
        positive_counts=np.asarray(d["positive_counts"], dtype=np.int64),
        elements_per_unit=int(d["elements_per_unit"]),
        max_preactivation=max_pre,
        sum_abs=np.asarray(d["sum_abs"], dtype=np.float64),
        saturated_counts=None if sat is None else np.asarray(sat, dtype=np.int64),
        module_type=d.get("module_type"),
        producer=d.get("producer"),
        bias=None if bias is None else np.asarray(bias, dtype=np.float64),
        extra=d.get("extra") or {},
        upper_bound=None
        if d.get("upper_bound") is None
        else np.array([np.inf if v is None else v for v in d["upper_bound"]], dtype=np.float64),
        certified_dead=d.get("certified_dead_indices"),
        certify_note=d.get("certify_note"),
        implicit=d.get("implicit"),
        weight=d.get("weight"),
        output_tensor=d.get("output_tensor"),
        min_preactivation=None
        if d.get("min_preactivation") is None
        else np.array([np.inf if v is None else v for v in d["min_preactivation"]], dtype=np.float64),
        samples=d.get("samples"),
        nonfinite=int(d.get("nonfinite") or 0),
    )


def _known_fields(cls, d: dict[str, Any]) -> dict[str, Any]:
    """The keys of `d` that `cls` has: fields a later version adds (optional, as the schema allows)
    must not stop an older deadrelu from loading the report."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def report_from_dict(d: dict[str, Any], source: str = "report") -> Report:
    version = d.get("schema_version") if isinstance(d, dict) else None
    if version not in READABLE_VERSIONS:
        raise UserError(
            f"{source}: not a deadrelu report of schema version {' or '.join(map(str, READABLE_VERSIONS))} (found {version!r}); "
            "re-create it with `deadrelu scan … --json`"
        )
    validate_report(d, source, version)
    try:
        st = d["settings"]
        settings = Settings(
            threshold=float(st["threshold"]),
            dying=float(st["dying"]),
            tau=float(st["tau"]),
            channel_dim=st.get("channel_dim"),
            device=st.get("device", "cpu"),
            ops=tuple(st.get("ops", ("relu", "relu6"))),
        )
        return Report(
            model=ModelInfo(**_known_fields(ModelInfo, d["model"])),
            data=DataInfo(**_known_fields(DataInfo, d["data"])),
            settings=settings,
            layers=[layer_from_dict(layer) for layer in d["layers"]],
            tool=d.get("tool", {}),
            notes=list(d.get("notes", [])),
            training=None
            if d.get("training") is None
            else TrainingInfo(**_known_fields(TrainingInfo, d["training"])),
            mask=d.get("mask"),
            unseen={str(k): int(v) for k, v in (d.get("unseen_activations") or {}).items()},
            unscanned={str(k): int(v) for k, v in (d.get("unscanned_activations") or {}).items()},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(
            f"{source}: malformed deadrelu report ({exc!r}); re-create it with `deadrelu scan … --json`"
        ) from exc


def load_report(path: str | Path) -> Report:
    p = check_regular_file(path, "report")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read report ({exc})") from exc
    try:
        data = json.loads(text, parse_constant=reject_constant)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); expected a deadrelu --json report"
        ) from exc
    except (ValueError, RecursionError) as exc:  # NaN/Infinity, or nesting deeper than the parser goes
        detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise UserError(f"{path}: not a deadrelu report ({detail})") from None
    return report_from_dict(data, source=str(path))


MERGE_SETTINGS = (
    ("--threshold", "threshold"),
    ("--dying", "dying"),
    ("--tau", "tau"),
    ("--ops", "ops"),
    ("--channel-dim", "channel_dim"),
)
# the settings that decide whether a unit is dead: reports that differ in them do not compare (trend,
# --baseline); dying/tau/ops change only derived fields or which layers are listed
COUNT_SETTINGS = (("--threshold", "threshold"), ("--channel-dim", "channel_dim"))


def _setting(settings: Settings, key: str):
    value = getattr(settings, key)
    return ",".join(value) if key == "ops" else value


def settings_difference(a: Report, b: Report, settings=MERGE_SETTINGS) -> str | None:
    """'different --threshold (0.0 and 0.1)' when A and B were made with different SETTINGS (merge: all
    of them, their counts must add up; trend and --baseline: COUNT_SETTINGS), else None."""
    for flag, key in settings:
        x, y = _setting(a.settings, key), _setting(b.settings, key)
        if x != y:
            return f"different {flag} ({x} and {y})"
    return None


def refuse_repeated_reports(paths: list[str | Path]) -> None:
    """`merge` sums counts: the same report given twice (one file, a link to it, or a copy) would
    count its samples twice. Exit 2 naming both."""
    import hashlib

    from deadrelu_cli.files import same_file

    seen: dict[str, str] = {}
    for i, path in enumerate(paths):
        for earlier in paths[:i]:
            if same_file(path, earlier):
                raise UserError(f"{path}: the same report as {earlier}, given twice; merge each part once")
        p = check_regular_file(path, "report")
        try:
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
        except OSError as exc:
            raise UserError(f"{path}: cannot read report ({exc.strerror})") from None
        if digest in seen:
            raise UserError(
                f"{path}: has the same content as {seen[digest]}, the same report twice; merge each part once"
            )
        seen[digest] = str(path)


def _merged_text(texts: list[dict | None]) -> dict | None:
    """`data.text` of a merge: kept when every part was tokenized the same way (documents added up)."""
    if any(t is None for t in texts):
        return None
    layouts = {tuple(sorted((k, v) for k, v in t.items() if k != "documents")) for t in texts}
    if len(layouts) != 1:
        return None
    return {**texts[0], "documents": sum(int(t.get("documents", 0)) for t in texts)}


# the start of merge's notes on data the parts may share (the merge command prints them as warnings)
DATA_CHECK_NOTE = "check the data of the merged parts:"
# the start of merge's note on layers some parts do not list (the merge command prints it)
PARTIAL_LAYERS_NOTE = "layer(s) not listed by every merged report:"
# how a scan's note on a model that quantizes per batch begins (inputs.per_batch_quantization writes it):
# its counts depend on the batches, so parts scanned with different ones do not add up
PER_BATCH_NOTE = "the model quantizes its activations per run"


def union_order(orders: list[list[str]]) -> list[str]:
    """Every name of ORDERS once, each list's order kept where they agree: a name one list adds comes
    right after the name it follows there (a layer a later training window reached first)."""
    result: list[str] = []
    for order in orders:
        at = 0  # where the next new name of this list goes: after the last name of it already placed
        for name in order:
            if name in result:
                at = max(at, result.index(name) + 1)
            else:
                result.insert(at, name)
                at += 1
    return result


def statistics_fingerprint(report: Report) -> str | None:
    """A hash of what a report counted: its samples and every layer's per-unit counts, maxima and sums.
    Two scans of the same samples (one data file copied under another name, or scanned twice and saved
    as two reports) give the same one; disjoint shards of real data do not (every unit's float maximum
    and sum of |activation| would have to agree). None for a report with no units."""
    import hashlib

    if not any(layer.units for layer in report.layers):
        return None
    digest = hashlib.sha256(f"{report.data.samples}".encode())
    for layer in report.layers:
        digest.update(f"\0{layer.name}\0{layer.elements_per_unit}\0{layer.samples}".encode())
        for values in (layer.positive_counts, layer.max_preactivation, layer.sum_abs):
            digest.update(np.ascontiguousarray(values, dtype=np.float64).tobytes())
    return digest.hexdigest()


def refuse_overlapping_data(
    reports: list[Report], names: list[str], sketches: list[SampleSketch | None], allow: bool = False
) -> list[str]:
    """Exit 2 naming both reports when two of them counted the same samples: by their data
    fingerprints (report.fingerprint) when both have one, else (older reports,
    training windows) by identical statistics (statistics_fingerprint). With ALLOW (merge
    --allow-overlap), the findings are returned instead, for the merged report's notes."""
    found: list[str] = []

    def overlap(what: str) -> None:
        if not allow:
            raise UserError(
                f"{what}; merge disjoint data, or pass --allow-overlap if the parts only share identical "
                "samples (a blank image)"
            )
        found.append(what)

    counted = [
        None if sketch is not None else statistics_fingerprint(r)
        for r, sketch in zip(reports, sketches, strict=True)
    ]
    for j, (report, name, sketch) in enumerate(zip(reports, names, sketches, strict=True)):
        for i in range(j):
            if sketch is not None and sketches[i] is not None:
                shared = shared_samples(sketches[i], sketch)
                if shared:
                    exact = sketches[i].complete and sketch.complete
                    what = "documents" if sketch.method == DOCUMENT_METHOD else "samples"
                    overlap(
                        f"{name}: counted {'' if exact else 'at least '}{shared} of the same {what} as "
                        f"{names[i]} (the same file under another --limit or --batch-size, a copy, or files "
                        "sharing samples)"
                    )
                continue
            mine = counted[j] if sketch is None else statistics_fingerprint(report)
            theirs = counted[i] if sketches[i] is None else statistics_fingerprint(reports[i])
            if mine is not None and mine == theirs:
                overlap(
                    f"{name}: the same counts, maxima and sums in every layer over the same "
                    f"{report.data.samples} samples as {names[i]}, and no data fingerprint to tell them apart "
                    "(the same data scanned twice?)"
                )
    return found


def _training_dict(training: TrainingInfo) -> dict:
    found = vars(training).copy()
    if found["rank"] is None:  # optional: only a window of one rank's own counts says it
        del found["rank"]
    return found


def refuse_overlapping_steps(reports: list[Report], names: list[str]) -> None:
    """Exit 2 naming both when two training windows (report.training) counted the same steps: their
    sampled steps overlap, in the same epoch numbering (when both say one) and of the same rank (when a
    window holds one rank's own counts). A window's samples are not fingerprinted; its steps are what
    tells a window counted twice (a copy, or a resumed run's window beside the one it replaced)."""
    for j, (report, name) in enumerate(zip(reports, names, strict=True)):
        mine = report.training
        if mine is None:
            continue
        for i in range(j):
            theirs = reports[i].training
            if theirs is None or mine.rank != theirs.rank:
                continue
            if mine.epoch is not None and theirs.epoch is not None and mine.epoch != theirs.epoch:
                continue
            if mine.first_step <= theirs.step and theirs.first_step <= mine.step:
                raise UserError(
                    f"{name}: a training window of steps {mine.first_step}-{mine.step}, which overlap those of "
                    f"{names[i]} (steps {theirs.first_step}-{theirs.step}): the same steps would be counted twice "
                    "(a copy, or an earlier run's window of steps a resumed run replayed); merge windows of "
                    "different steps, each once"
                )


def nonfinite_notes(layers: list[LayerStats]) -> list[str]:
    """--allow-nonfinite: one note per layer that met NaN/Inf values (left out of its statistics)."""
    return [
        f"layer {layer.name}: {layer.nonfinite} NaN/Inf value(s) of its input or output were left out "
        "(--allow-nonfinite): they fire nowhere and add nothing to its max pre-activation and sum of |activation|"
        for layer in layers
        if layer.nonfinite
    ]


def nonfinite_bias_notes(layers: list[LayerStats]) -> list[str]:
    """--allow-nonfinite: a bias holding NaN/Inf is left out of the report (JSON has no NaN; the bias is
    shown for reading only, no statistic depends on it), with a note per layer; the layers lose it here."""
    notes = []
    for layer in layers:
        if layer.bias is not None and not np.isfinite(layer.bias).all():
            bad = int(np.count_nonzero(~np.isfinite(layer.bias)))
            notes.append(
                f"layer {layer.name}: its bias holds {bad} NaN/Inf value(s); the bias is left out of the report "
                "(--allow-nonfinite): check the weights"
            )
            layer.bias = None
    return notes


def merge_reports(
    reports: list[Report], names: list[str] | None = None, allow_overlap: bool = False
) -> Report:
    """Exact merge of reports of the same model over disjoint data. A layer some reports do not list (a
    training window whose forwards never reached it) adds nothing from them: its `samples` say how many it
    saw, and a note names it. The same layer name with other units, or another model, is refused, and so
    are two reports that counted the same samples (refuse_overlapping_data), unless ALLOW_OVERLAP: then
    they are added as given and a note says which share samples. NAMES: the reports' files, for
    messages."""
    if not reports:
        raise UserError("nothing to merge: give at least one report")
    names = names or [f"report {k + 1}" for k in range(len(reports))]
    first = reports[0]
    for other in reports[1:]:
        if other.model.sha256 != first.model.sha256:
            raise UserError(
                f"cannot merge reports of different models ({first.model.path} sha256 {first.model.sha256[:12]}… "
                f"vs {other.model.path} sha256 {other.model.sha256[:12]}…)"
            )
        differ = settings_difference(first, other)
        if differ:
            raise UserError(
                f"cannot merge reports made with {differ}; re-scan the parts with the same settings"
            )
        if other.mask != first.mask:
            raise UserError(
                "cannot merge reports made with different position masks (--mask / --exclude-token-ids)"
            )
        batches = [sorted(n for n in r.notes if n.startswith(PER_BATCH_NOTE)) for r in (first, other)]
        if batches[0] != batches[1]:
            raise UserError(
                "cannot merge reports of a model that quantizes its activations per batch, scanned with "
                "different batches (their notes say which); re-scan the parts with the same --batch-size"
            )
    sketches = [sketch_from_dict(r.data.fingerprint) for r in reports]
    # fingerprints made another way than the first's (a masked scan of an earlier deadrelu, blocks of
    # packed text beside documents) do not compare
    method = next((s.method for s in sketches if s is not None), None)
    other_way = [n for n, s in zip(names, sketches, strict=True) if s is not None and s.method != method]
    sketches = [s if s is not None and s.method == method else None for s in sketches]
    refuse_overlapping_steps(reports, names)
    overlaps = refuse_overlapping_data(reports, names, sketches, allow_overlap)
    # a layer's samples (None: all of its report's) are added as counts: a part where a site saw fewer
    # (an ONNX branch, a GAN's generator in a training window), or that does not list the site at all (a
    # training window whose forwards never reached it), must not make the merged site "all"
    merged: dict[str, LayerStats] = {}
    listed: dict[str, int] = {}
    for report in reports:
        for layer in report.layers:
            if layer.samples is None:  # a site no sample reached saw none of its report's samples
                layer = replace(layer, samples=report.data.samples if layer.ran else 0)
            merged[layer.name] = merge_layer(merged[layer.name], layer) if layer.name in merged else layer
            listed[layer.name] = listed.get(layer.name, 0) + 1
    total = sum(r.data.samples for r in reports)
    layers = [
        replace(merged[name], samples=None) if merged[name].samples == total else merged[name]
        for name in union_order([[layer.name for layer in r.layers] for r in reports])
    ]
    data_paths = sorted({r.data.path for r in reports})
    # each part's NaN/Inf notes are said again for the merged counts
    counted_notes = {n for r in reports for n in nonfinite_notes(r.layers)}
    notes = sorted({n for r in reports for n in r.notes} - counted_notes) + nonfinite_notes(layers)
    partial = [name for name in (layer.name for layer in layers) if listed[name] < len(reports)]
    if partial:
        shown = ", ".join(f"{name} (in {listed[name]} of {len(reports)})" for name in partial[:5])
        notes.append(
            f"{PARTIAL_LAYERS_NOTE} {shown}{', …' if len(partial) > 5 else ''}: their counts and Samples "
            "cover only the samples of the reports that list them"
        )
    unprinted = [name for name, sketch in zip(names, sketches, strict=True) if sketch is None]
    windows = [name for name, r in zip(names, reports, strict=True) if r.training is not None]
    older = [name for name in unprinted if name not in windows and name not in other_way]
    if older:
        notes.append(
            f"{', '.join(older[:4])}{', …' if len(older) > 4 else ''}: no data fingerprint (an older "
            "deadrelu): overlap with the other parts was checked only by identical statistics"
        )
    if other_way:
        notes.append(
            f"{', '.join(other_way[:4])}{', …' if len(other_way) > 4 else ''}: a data fingerprint made another "
            f"way than {next(n for n, s in zip(names, sketches, strict=True) if s is not None)}'s ({method}; "
            "another deadrelu version, or another --text-packing): overlap with it was checked only by "
            "identical statistics"
        )
    if windows:
        notes.append(
            f"{', '.join(windows[:4])}{', …' if len(windows) > 4 else ''}: training windows, which carry no "
            "data fingerprint (an epoch feeds the same samples again, to other weights): merge checked that no "
            "two of them counted the same steps, not which samples they saw"
        )
    for message in overlaps:  # --allow-overlap: merged as given, said in the report and on stderr
        notes.append(
            f"{DATA_CHECK_NOTE} {message}; merged as given (--allow-overlap): a shared sample counts once per part"
        )
    if len(data_paths) < len(reports) and unprinted:
        # scan has no offset: two scans of one data file (e.g. --limit 40 and --limit 60) both start at its
        # first sample, and their sum counts those samples twice; shards are files of their own
        shared = sorted({p for p in data_paths if sum(r.data.path == p for r in reports) > 1})
        notes.append(
            f"{DATA_CHECK_NOTE} several were scanned on the same data file ({', '.join(shared)}); "
            "merge adds their counts, so unless those were different files of one name, the samples they "
            "share are counted twice; merge scans of disjoint shard files"
        )
    return Report(
        model=first.model,
        data=DataInfo(
            path=",".join(data_paths),
            samples=sum(r.data.samples for r in reports),
            text=_merged_text([r.data.text for r in reports]),
            fingerprint=None if unprinted else union_sketch(sketches).to_dict(),
        ),
        settings=first.settings,
        layers=layers,
        notes=notes,
        mask=first.mask,
        # the same model in every report: its unseen nodes are the same, not added up
        unseen={k: max(r.unseen.get(k, 0) for r in reports) for r in reports for k in r.unseen},
        unscanned={k: max(r.unscanned.get(k, 0) for r in reports) for r in reports for k in r.unscanned},
    )
