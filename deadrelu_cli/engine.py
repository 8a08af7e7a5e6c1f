"""The scan, orchestrated: options → backend (load, replay the data) → distributed reduction →
certification → Report. The backends (`deadrelu_cli.backends`) do the model-specific work."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from deadrelu_cli.backends import backend_for, backend_of
from deadrelu_cli.calibration import CalibrationData, open_calibration, sample_axis
from deadrelu_cli.display import shown_names
from deadrelu_cli.errors import UserError
from deadrelu_cli.gate import (
    FRAMES_NOT_TOLD,
    LAYOUT_AMBIGUOUS,
    PIXELS_FLATTENED,
    PIXELS_MIXED,
    ROW_ORDER_AMBIGUOUS,
    ROWS_NOT_ATTRIBUTED,
)
from deadrelu_cli.inputs import GROUPED_INPUTS, dict_groups
from deadrelu_cli.loaders import LoadedModel, LoadOptions, load_model
from deadrelu_cli.options import ScanOptions
from deadrelu_cli.report.fingerprint import DOCUMENT_METHOD, SampleSketch
from deadrelu_cli.report.model import (
    DataInfo,
    ModelInfo,
    Report,
    Settings,
    nonfinite_bias_notes,
    nonfinite_notes,
)


@dataclass
class ScanResult:
    report: Report
    model: LoadedModel
    data: CalibrationData
    device: str
    probe: object | None = None  # torch probes: consumers and producer links, for fixes
    is_main: bool = True  # False on the ranks of a distributed scan that stay quiet


def run_scan(options: ScanOptions) -> Report:
    return run_scan_detailed(options).report


def run_scan_detailed(options: ScanOptions) -> ScanResult:
    if isinstance(options.batch_size, int) and options.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if options.limit is not None and options.limit < 1:
        raise UserError("--limit must be at least 1")
    from deadrelu_cli.loaders import check_weights_key
    from deadrelu_cli.loaders.detect import detect_format

    fmt = detect_format(options.model)
    check_weights_key(options.model, fmt, options.weights_key)
    backend_for(fmt).check_options(options)
    device = backend_for(fmt).resolve_device(options.device)
    world = None
    if options.distributed:
        from deadrelu_cli.distributed import init_world

        world = init_world(device)
    if options.data is None and options.text is None:
        if not options.certify:
            raise UserError(
                "missing --data: the calibration data to replay (.npz, .npy, .pt or .safetensors)"
            )
        return _certify_only(options, fmt, device)
    data, text_info = open_data(options, fmt)
    extra_notes: list[str] = list(getattr(data, "notes", ()))  # what a --data FOLDER read and left out
    from deadrelu_cli.inputs import resolve_mask

    mask = resolve_mask(options.mask, options.exclude_token_ids, data)
    if text_info and text_info.get("truncated"):
        extra_notes.append(
            f"{text_info['truncated']} of {text_info['documents']} documents are longer than --seq-len "
            f"{text_info['seq_len']} tokens and were cut there: their later tokens are not counted "
            "(raise --seq-len, or --text-packing pack to count every token)"
        )
    if world is not None:
        data.shard(world.rank, world.size, options.limit)
        options = replace(options, limit=None)  # the limit is inside the shard windows now
    data.allow_nonfinite = options.allow_nonfinite
    # the report's data fingerprint (each rank: its shard's, joined below); padding is no part of a sample
    data.sketch = SampleSketch(
        mask=mask.array if mask else None,
        marks_padding=bool(mask and mask.marks_padding),
        method=DOCUMENT_METHOD if data.sample_digests is not None else "",
    )
    error: BaseException | None = None
    model = probe = None
    layers: list = []
    try:
        # a rank with no samples still loads the model and takes part in the reduction
        model, layers, probe = backend_for(fmt).load_and_scan(options, data, device)
    except Exception as exc:  # under --distributed every rank must hear of it before anyone reduces
        if world is None:
            raise
        error = exc
    samples = data.samples if options.limit is None else min(options.limit, data.samples)
    if world is not None:
        from deadrelu_cli.distributed import check_all_ranks, finish, reduce_layers, reduce_sketch

        try:
            check_all_ranks(world, error)
            layers, samples = reduce_layers(world, layers, data.local_samples, device)
            data.sketch = reduce_sketch(world, data.sketch)
        finally:
            finish(world)
    # the fingerprint holds the samples counted: certify's `--input-range auto` reads the whole file
    sketch, data.sketch = data.sketch, None
    if options.certify and (world is None or world.is_main):
        attach_certificates(layers, certify_model(model, options, data, device))
    findings = []
    if probe is not None and world is None:
        from deadrelu_cli.causes import structural_checks

        findings = structural_checks(model, probe)
    if options.allow_nonfinite:
        extra_notes = extra_notes + nonfinite_bias_notes(layers)
    report = Report(
        model=ModelInfo(path=str(options.model), format=model.format, sha256=model.sha256),
        data=DataInfo(
            path=str(options.text or options.data),
            samples=samples,
            text=text_info,
            fingerprint=None if sketch is None else sketch.to_dict(),
        ),
        settings=Settings(
            options.threshold, options.dying, options.tau, options.channel_dim, device, tuple(options.ops)
        ),
        layers=layers,
        notes=list(model.notes)
        + [f"check {f.kind}: {f.message}" for f in findings]
        + mask_notes(layers, mask)
        + nonfinite_notes(layers)
        + extra_notes,
        mask=None if mask is None else mask.describe(),
        unseen=dict(model.extra.get("unseen", {})),
        unscanned=dict(model.extra.get("unscanned", {})),
    )
    if options.explain:
        from deadrelu_cli.causes import explain

        explain(report, model, probe, tuple(options.ops))
    return ScanResult(report, model, data, device, probe, is_main=world is None or world.is_main)


def backend_of_format(fmt: str) -> str:
    return "onnx" if fmt == "onnx" else "torch"


def open_data(options: ScanOptions, fmt: str) -> tuple[CalibrationData, dict | None]:
    """--data FILE, or --text FILE tokenized with the model folder's tokenizer (and how: the report's
    `data.text`)."""
    if options.text is None:
        return open_calibration(options.data, options.batch_axes, options.consts, (options.model,)), None
    if options.data is not None:
        raise UserError("--text and --data are two sources of samples; give one of them")
    if fmt != "hf_folder":
        raise UserError(
            "--text needs a Hugging Face model folder (its tokenizer); for other models tokenize into an .npz "
            "with input_ids and attention_mask"
        )
    from deadrelu_cli.text import tokenized_data

    return tokenized_data(
        options.text,
        options.model,
        options.text_field,
        options.seq_len,
        options.text_packing,
        options.trust_pickle,
    )


def mask_notes(layers: list, mask) -> list[str]:
    """Say which layers the position mask could not apply to (they count every element)."""
    if mask is None:
        return []
    notes = []
    reasons = {
        "no token axis": "whose positions are not the mask's (a pooled head, a conv over pixels or audio, "
        "a sequence of another length; every element counted)",
        "in a subgraph": "inside ONNX subgraphs the mask does not reach (a Scan body whose steps are not the tokens, a "
        "Loop body's tensors of other positions, an If branch not run on the first batch, or a Loop's stacked "
        "outputs, whose steps nothing ties to the mask's positions; every element "
        "counted, padding included; a gate fails on them unless --allow-unseen; to count real tokens only "
        "there, scan the PyTorch model, or an ONNX export with the loop unrolled: torch.onnx.export of a "
        "Python loop writes no Scan/Loop)",
        "opset below 9": "of an ONNX graph of opset below 9 (every element counted, padding included; a gate "
        "fails on them unless --allow-unseen; re-export with a newer opset)",
        LAYOUT_AMBIGUOUS: "whose [batch, tokens, …] and [tokens, batch, …] readings had one shape on every "
        "batch (as many samples as tokens, a batch size the graph fixes) and nothing told them apart (every "
        "element counted, padding included; a gate fails on them unless --allow-unseen; re-export with a "
        "dynamic batch dim, or with another batch size or sequence length)",
        ROW_ORDER_AMBIGUOUS: "whose tensor holds the positions as flattened [batch·tokens, …] rows in an "
        "order nothing told (sample-major [batch, tokens] flattened, or time-major [tokens, batch] "
        "flattened, as `h.view(-1, C)` of a time-major RNN's output; every element counted, padding "
        "included; a gate fails on them unless --allow-unseen; reordering the samples of a batch tells "
        "the order where the samples differ)",
        FRAMES_NOT_TOLD: "after an ONNX graph's conv subsampler (a speech encoder's frames), on batches whose "
        "mask did not keep each sample's positions first and its padding after: a frame's real length rests on "
        "that (every frame of those batches counted, padding included; a gate fails on them unless "
        "--allow-unseen; pad at the end)",
        PIXELS_MIXED: "whose feature-map cells hold image and padding pixels both (the images' padding does not "
        "end on the layer's stride; every element counted, padding included; a gate fails on them unless "
        "--allow-unseen; pad the images to a multiple of the stride)",
        ROWS_NOT_ATTRIBUTED: "inside one expert of a mixture of experts, whose rows (the tokens routed to it, "
        "gathered by index) the scan could not follow back to their tokens: an export's (.pt2, TorchScript, "
        "ONNX) index ops, or an op between the block's input and the expert's activation that the eager scan "
        "does not read (every row counted, padding's included; a gate fails on them unless --allow-unseen; "
        "scan the PyTorch model, or data without padding)",
        PIXELS_FLATTENED: "whose positions may be the image's pixels flattened and that no module given the "
        "flattened mask as its attention_mask scoped (every element counted, padding included; a gate fails "
        "on them unless --allow-unseen; scan the PyTorch model, where DETR's encoder gets that mask)",
    }
    for reason, said in reasons.items():
        unmasked = [layer.name for layer in layers if layer.extra.get("position_mask") == reason]
        if unmasked:
            shown = shown_names(unmasked)
            notes.append(f"position mask not applied to {len(unmasked)} layer(s) {said}: {shown}")
    return notes


def certify_model(model: LoadedModel, options: ScanOptions, data: CalibrationData | None, device: str):
    """Interval bounds of every activation site over the input box (the backend's certify module)."""
    from deadrelu_cli.sites import guess_input_shape

    order = None
    if data is not None:
        order = backend_of(model).input_order(model, data)
        if dict_groups(model, order):
            raise UserError(GROUPED_INPUTS.format(option="--certify"))
        by_name = {s.name: s for s in data.sources}
        shapes = []
        for name in order:  # one sample's shape: the sample axis left out (a --const array: all of it)
            shape, axis = tuple(by_name[name].shape), sample_axis(data, name)
            shapes.append(shape if axis is None else shape[:axis] + shape[axis + 1 :])
    elif options.input_shape:
        from deadrelu_cli.sites import parse_shape

        shapes = [parse_shape(options.input_shape)]
    elif model.inputs and all(spec.shape for spec in model.inputs):
        shapes = [tuple(spec.shape[1:]) for spec in model.inputs]
    elif model.kind == "eager" and guess_input_shape(model.runnable) is not None:
        shapes = [guess_input_shape(model.runnable)]
    else:
        raise UserError("--certify without --data needs --input-shape (one sample, e.g. 3x32x32)")
    if any(d is None for shape in shapes for d in shape):
        raise UserError("--certify: the input shape has dynamic dimensions; pass --input-shape")
    return backend_of(model).certify(model, options, shapes, data, device, order)


def attach_certificates(layers: list, bounds) -> None:
    """Put the bounds on the scanned layers (by name); sites no data reached get a layer of their own."""
    from deadrelu_cli.stats import LayerStats

    by_name = {layer.name: layer for layer in layers}
    for bound in bounds:
        layer = by_name.get(bound.name)
        if layer is None:
            units = 0 if bound.upper_bound is None else len(bound.upper_bound)
            layer = LayerStats(
                bound.name,
                bound.op,
                -1,
                np.zeros(units, np.int64),
                0,
                np.full(units, -np.inf),
                np.zeros(units),
            )
            layers.append(layer)
            by_name[bound.name] = layer
        if bound.upper_bound is not None and layer.ran and len(bound.upper_bound) != layer.units:
            layer.certify_note = (
                f"bounds have {len(bound.upper_bound)} units, the scan {layer.units}: not certified"
            )
            continue
        layer.upper_bound = bound.upper_bound
        layer.certified_dead = bound.certified_dead
        layer.certify_note = bound.reason or None


def _certify_only(options: ScanOptions, fmt: str, device: str) -> ScanResult:
    """`scan --certify` without data: layers, units and which of them can never fire."""
    model = load_model(
        LoadOptions(
            options.model, options.arch, options.trust_pickle, device, weights_key=options.weights_key
        )
    )
    layers: list = []
    attach_certificates(layers, certify_model(model, options, None, device))
    report = Report(
        model=ModelInfo(path=str(options.model), format=model.format, sha256=model.sha256),
        data=DataInfo(path="(none: data-free certification)", samples=0),
        settings=Settings(
            options.threshold, options.dying, options.tau, options.channel_dim, device, tuple(options.ops)
        ),
        layers=layers,
        notes=list(model.notes) + [f"input box: {options.input_range}"],
    )
    return ScanResult(report, model, None, device, None)
