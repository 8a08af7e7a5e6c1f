"""The scan: load the model and the data, replay the data through a probe, build the Report."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from deadrelu_cli.calibration import CalibrationData, open_calibration, prefetched
from deadrelu_cli.errors import UserError
from deadrelu_cli.loaders import LoadedModel, LoadOptions, load_model
from deadrelu_cli.probe.ops import DEFAULT_OPS
from deadrelu_cli.report.model import DataInfo, ModelInfo, Report, Settings

ProgressCallback = Callable[[int, int], None]  # (samples done, samples total)


@dataclass
class ScanOptions:
    model: str
    data: str | None
    arch: str | None = None
    trust_pickle: bool = False
    batch_size: int | str = 64  # or "auto"
    limit: int | None = None
    device: str = "auto"
    threshold: float = 0.0
    dying: float = 0.01
    tau: float = 0.1
    channel_dim: int | None = None
    ops: tuple[str, ...] = DEFAULT_OPS
    allow_nonfinite: bool = False
    compile: bool = False  # counting inside the graph, through torch.compile
    dtype: str | None = None  # run the model in bf16 / fp16 / fp32
    channels_last: bool = False  # run conv models (and 4-D inputs) in channels_last memory format
    consts: tuple[str, ...] = ()  # arrays fed whole to every batch
    batch_axes: dict[str, int] = field(default_factory=dict)  # arrays whose samples are not on axis 0
    distributed: bool = False  # under torchrun: scan this rank's shard, all_reduce the counts
    explain: bool = False  # the cause of each dead unit, and what to do
    certify: bool = False  # data-free bounds: which units can never fire over the input box
    input_range: tuple[float, float] | str | None = None  # (LO, HI) or "auto" (min/max of the data)
    input_shape: str | None = None  # one sample's shape when neither the model nor the data gives it
    progress: ProgressCallback | None = field(default=None, repr=False)


def resolve_device(requested: str) -> str:
    import torch

    requested = (requested or "auto").lower()
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(
                f"--device {requested}: no CUDA device is available here; use --device cpu or auto"
            )
        return requested
    if requested != "cpu":
        raise UserError(f"--device {requested!r}: choose auto, cpu or cuda")
    return requested


def match_inputs(model: LoadedModel, data: CalibrationData) -> list[str]:
    """Order the data's arrays as the model's positional inputs."""
    names = data.names
    wanted = [spec.name for spec in model.inputs]
    if len(names) == 1 and len(wanted) <= 1:
        return names
    if wanted and all(n in names for n in wanted):
        extra = [n for n in names if n not in wanted]
        if extra:
            raise UserError(
                f"{data.path}: arrays {', '.join(extra)} match no model input (inputs: {', '.join(wanted)})"
            )
        return wanted
    described = (
        ", ".join(
            f"{s.name}{list(s.shape) if s.shape else ''}{' ' + s.dtype if s.dtype else ''}"
            for s in model.inputs
        )
        or "unknown"
    )
    raise UserError(
        f"{data.path}: arrays {', '.join(names)} do not match the model inputs ({described}); name the arrays after the inputs"
    )


def check_shapes(model: LoadedModel, data: CalibrationData, order: list[str]) -> None:
    by_name = {s.name: s for s in data.sources}
    for spec, name in zip(model.inputs, order, strict=False):
        if spec.shape is None:
            continue
        got = by_name[name].shape
        expected = tuple(spec.shape)
        if len(got) != len(expected) or any(
            e is not None and e != g for e, g in zip(expected[1:], got[1:], strict=False)
        ):
            shown = "x".join("?" if e is None else str(e) for e in expected)
            raise UserError(
                f"{data.path}: array {name!r} has shape {list(got)}, the model input {spec.name!r} expects {shown} (first axis = samples)"
            )


def _first_layer_hint(model: LoadedModel, data: CalibrationData) -> str | None:
    """After the first batch failed: when the model's first registered parametrised layer is a Linear or
    Conv that the data does not fit, say so (a guess — registration order is not always execution
    order — so it only words an error that has already happened, never refuses a model that runs)."""
    from torch import nn

    if model.kind != "eager" or len(data.sources) != 1:
        return None
    first = next(
        (m for m in model.runnable.modules() if any(True for _ in m.parameters(recurse=False))),
        None,
    )
    shape = data.sources[0].shape
    if isinstance(first, nn.Linear) and len(shape) >= 2 and shape[-1] != first.in_features:
        return f"{data.path}: samples have {shape[-1]} features (shape {list(shape)}) but the model's first Linear expects {first.in_features}"
    rank = {nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5}.get(type(first))
    if rank and len(shape) == rank and shape[1] != first.in_channels:
        return f"{data.path}: samples have {shape[1]} channels (shape {list(shape)}) but the model's first Conv expects {first.in_channels}"
    return None


def to_tensor(array: np.ndarray, float_dtype: str, device: str, channels_last: bool = False):
    """One batch array as a model input on `device`. Runs in the prefetch thread: on CUDA the batch is
    staged in pinned memory and copied asynchronously, then cast on the GPU, so the copy overlaps the
    model running the previous batch and the host never waits for it."""
    import torch

    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, order="C")  # torch wants writable memory; the batch is small
    if array.dtype.kind in "iu":
        array = array.astype(np.int64, copy=False)
    tensor = torch.from_numpy(array)
    if device.startswith("cuda"):
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    else:
        tensor = tensor.to(device)
    if array.dtype.kind == "f":
        tensor = tensor.to(getattr(torch, float_dtype))
    if channels_last and tensor.dim() == 4:
        tensor = tensor.contiguous(memory_format=torch.channels_last)
    return tensor


def example_inputs(model: LoadedModel, data: CalibrationData, order: list[str], device: str) -> tuple:
    """The first (up to) two samples as model inputs: what torch.export traces with."""
    first = next(data.batches(min(2, data.samples)))
    return tuple(to_tensor(first[name], model.float_dtype, device, model.channels_last) for name in order)


def make_probe(model: LoadedModel, settings, compile_graph: bool = False, example: tuple | None = None):
    if compile_graph:
        from deadrelu_cli.probe.graph_stats import InGraphProbe, export_for_stats

        if model.kind == "eager":
            return InGraphProbe(export_for_stats(model.runnable, example), settings, compile_graph=True)
        if model.kind == "exported":
            from deadrelu_cli.loaders.torch_models import graph_module_with_stack

            graph_module = graph_module_with_stack(model.extra["program"]).to(
                next(iter(model.runnable.parameters())).device
            )
            return InGraphProbe(graph_module, settings, compile_graph=True)
        raise UserError(
            "--compile works on state_dict/safetensors (with --arch) and .pt2 models, not TorchScript"
        )
    if model.kind == "eager":
        from deadrelu_cli.probe.eager import EagerProbe

        return EagerProbe(model.runnable, settings)
    if model.kind == "exported":
        from deadrelu_cli.probe.exported import ExportedProbe

        return ExportedProbe(model.runnable, settings)
    if model.kind == "torchscript":
        from deadrelu_cli.probe.torchscript import TorchScriptProbe

        return TorchScriptProbe(model.runnable, settings)
    raise AssertionError(model.kind)


def attach_biases(model: LoadedModel, layers) -> None:
    """Copy each unit's bias (of the producing Linear/Conv/BN) into the stats, for the drill-down."""
    import torch

    params = {}
    runnable = model.runnable
    if hasattr(runnable, "named_parameters"):
        params.update(dict(runnable.named_parameters()))
    if hasattr(runnable, "named_buffers"):
        params.update({k: v for k, v in runnable.named_buffers() if k not in params})
    for layer in layers:
        if layer.producer is None:
            continue
        bias = params.get(f"{layer.producer}.bias")
        if isinstance(bias, torch.Tensor) and bias.dim() == 1 and bias.shape[0] == layer.units:
            layer.bias = bias.detach().float().cpu().numpy().astype(np.float64)
        else:
            layer.producer = None


def scan_torch(
    model: LoadedModel,
    data: CalibrationData,
    options: ScanOptions,
    device: str,
    collectors: dict | None = None,
) -> tuple[list, object]:
    """Replay the data through a probe of the model; returns the layer statistics and the probe."""
    import torch

    from deadrelu_cli.probe.base import ProbeSettings

    order = match_inputs(model, data)
    check_shapes(model, data, order)
    settings = ProbeSettings(threshold=options.threshold, channel_dim=options.channel_dim, ops=options.ops)
    batch_size = resolve_batch_size(options.batch_size, model, data, order, device)
    example = None
    if options.compile:
        example = example_inputs(model, data, order, device)
    probe = make_probe(model, settings, options.compile, example)
    probe.registry.collectors.update(collectors or {})
    total = data.local_samples if options.limit is None else min(options.limit, data.local_samples)
    if model.fixed_batch is not None and model.fixed_batch != batch_size:
        if total % model.fixed_batch:
            raise UserError(
                f"{model.path}: exported with a fixed batch size of {model.fixed_batch}, and {total} samples is not a "
                f"multiple of it; re-export with a dynamic batch dim or pass --limit {total - total % model.fixed_batch}"
            )
        batch_size = model.fixed_batch
    done = 0
    context = probe.attached() if hasattr(probe, "attached") else contextlib.nullcontext()

    def tensors():
        for batch in data.batches(batch_size, options.limit, options.allow_nonfinite):
            yield (
                batch,
                tuple(
                    to_tensor(batch[name], model.float_dtype, device, model.channels_last) for name in order
                ),
            )

    with context, torch.inference_mode():
        for index, (batch, inputs) in enumerate(prefetched(tensors())):
            try:
                probe.run(inputs)
            except UserError:
                raise
            except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                if index == 0:
                    shapes = ", ".join(f"{n}{list(batch[n].shape)}" for n in order)
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise UserError(
                        _first_layer_hint(model, data)
                        or f"the model failed on the first batch ({shapes}): {first}; check that --data fits the model's input"
                    ) from exc
                raise
            done += inputs[0].shape[0] if inputs and inputs[0].dim() else 0
            if options.progress:
                options.progress(done, total)
    layers = probe.registry.layer_stats()
    attach_biases(model, layers)
    if not layers and not any(note.startswith("the model ran no") for note in model.notes):
        model.notes.append(_no_sites_note(model, options.ops))
    return layers, probe


_SMOOTH_ACTIVATIONS = ("SiLU", "GELU", "Sigmoid", "Tanh", "Hardswish", "Hardsigmoid", "Mish", "Softplus")
_OTHER_ACTIVATIONS = ("LeakyReLU", "ELU", "SELU", "PReLU")


def _no_sites_note(model: LoadedModel, ops: tuple[str, ...]) -> str:
    """Say what the model uses instead of ReLUs (its activation modules, or a .pt2 graph's ops)."""
    from collections import Counter

    from deadrelu_cli.probe.ops import no_sites_note

    found: Counter = Counter()
    if model.kind == "exported":
        graph = model.extra["program"].graph
        wanted = {name.lower() for name in _SMOOTH_ACTIVATIONS + _OTHER_ACTIVATIONS}
        for node in graph.nodes:
            base = str(getattr(node.target, "__name__", "")).split(".")[0].rstrip("_")
            if node.op == "call_function" and base in wanted:
                found[base] += 1
    elif hasattr(model.runnable, "modules"):
        for module in model.runnable.modules():
            if type(module).__name__ in _SMOOTH_ACTIVATIONS + _OTHER_ACTIVATIONS:
                found[type(module).__name__] += 1
    return no_sites_note(f"the model ran no {'/'.join(ops)} call", found)


def resolve_batch_size(
    requested: int | str, model: LoadedModel, data: CalibrationData, order: list[str], device: str
) -> int:
    """An int as given; "auto": the largest power of two (up to 1024) whose batch fits comfortably —
    on CUDA measured from one sample's peak memory, on CPU bounded by 256 MiB of input per batch."""
    if not isinstance(requested, str):
        return int(requested)
    if requested != "auto":
        raise UserError(f"--batch-size {requested!r}: give a positive integer or auto")
    per_sample_input = (
        sum(int(np.prod(s.shape[1:], dtype=np.int64)) * 4 for s in data.sources if s.name in order) or 4
    )
    budget = 256 << 20
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        one = next(data.batches(1))
        with torch.inference_mode():
            model.runnable(
                *(to_tensor(one[name], model.float_dtype, device, model.channels_last) for name in order)
            )
        per_sample = max(1, torch.cuda.max_memory_allocated() - before)
        free, _total = torch.cuda.mem_get_info()
        budget = free // 2
        per_sample_input = max(per_sample_input, per_sample)
    size = 1
    while size * 2 <= 1024 and size * 2 * per_sample_input <= budget:
        size *= 2
    return size


def apply_channels_last(model: LoadedModel, enabled: bool) -> None:
    """--channels-last: NHWC memory format for the model's 4-D weights and inputs (what cuDNN and
    oneDNN run fastest, above all in bf16). The probe reduces such activations as [N*H*W, C] views."""
    if not enabled:
        return
    import torch

    if not hasattr(model.runnable, "to") or model.kind == "torchscript":  # ONNX is refused by run_scan
        raise UserError("--channels-last needs an nn.Module or a .pt2 program, not TorchScript")
    model.runnable = model.runnable.to(memory_format=torch.channels_last)
    model.channels_last = True


def apply_dtype(model: LoadedModel, dtype: str | None) -> None:
    """--dtype: run a torch model in bf16/fp16 (or fp32)."""
    if not dtype:
        return
    import torch

    names = {
        "bf16": "bfloat16",
        "bfloat16": "bfloat16",
        "fp16": "float16",
        "float16": "float16",
        "fp32": "float32",
        "float32": "float32",
    }
    if dtype not in names:
        raise UserError(f"--dtype {dtype!r}: choose bf16, fp16 or fp32")
    if model.backend != "torch":
        raise UserError("--dtype applies to torch models; an ONNX model runs in the types of its graph")
    model.runnable = model.runnable.to(getattr(torch, names[dtype]))
    model.float_dtype = names[dtype]
    if names[dtype] != "float32":
        model.notes.append(
            f"ran in {names[dtype]}: values within rounding of the threshold may count differently than in float32"
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
    from deadrelu_cli.loaders.detect import detect_format

    fmt = detect_format(options.model)
    if fmt == "onnx":  # torch-only options, refused by content (not the file name)
        if options.compile:
            raise UserError("--compile is for torch models; ONNX graphs are already instrumented in-graph")
        if options.channels_last:
            raise UserError("--channels-last applies to torch models; onnxruntime picks its own layouts")
        if options.dtype:
            raise UserError("--dtype applies to torch models; an ONNX model runs in the types of its graph")
    device = (
        (options.device if options.device != "auto" else "cpu")
        if fmt == "onnx"
        else resolve_device(options.device)
    )
    world = None
    if options.distributed:
        from deadrelu_cli.distributed import init_world

        world = init_world(device)
    if options.data is None:
        if not options.certify:
            raise UserError(
                "missing --data: the calibration data to replay (.npz, .npy, .pt or .safetensors)"
            )
        return _certify_only(options, fmt, device)
    data = open_calibration(options.data, options.batch_axes, options.consts)
    if world is not None:
        data.shard(world.rank, world.size, options.limit)
        options = replace(options, limit=None)  # the limit is inside the shard windows now
    error: BaseException | None = None
    model = probe = None
    layers: list = []
    try:
        if fmt == "onnx":
            from deadrelu_cli.loaders.onnx_model import load_onnx
            from deadrelu_cli.onnx_scan import scan_onnx

            if data.local_samples:
                model, layers = scan_onnx(options, data, device)
            else:  # a rank with no samples still takes part in the reduction
                model = load_onnx(LoadOptions(options.model, device=device))
        else:
            model = load_model(LoadOptions(options.model, options.arch, options.trust_pickle, device))
            apply_dtype(model, options.dtype)
            apply_channels_last(model, options.channels_last)
            if data.local_samples:
                layers, probe = scan_torch(model, data, options, device)
    except Exception as exc:  # under --distributed every rank must hear of it before anyone reduces
        if world is None:
            raise
        error = exc
    samples = data.samples if options.limit is None else min(options.limit, data.samples)
    if world is not None:
        from deadrelu_cli.distributed import check_all_ranks, finish, reduce_layers

        try:
            check_all_ranks(world, error)
            layers, samples = reduce_layers(world, layers, data.local_samples, device)
        finally:
            finish(world)
    if options.certify and (world is None or world.is_main):
        attach_certificates(layers, certify_model(model, options, data, device))
    findings = []
    if probe is not None and world is None:
        from deadrelu_cli.causes import structural_checks

        findings = structural_checks(model, probe)
    report = Report(
        model=ModelInfo(path=str(options.model), format=model.format, sha256=model.sha256),
        data=DataInfo(path=str(options.data), samples=samples),
        settings=Settings(
            options.threshold, options.dying, options.tau, options.channel_dim, device, tuple(options.ops)
        ),
        layers=layers,
        notes=list(model.notes) + [f"check {f.kind}: {f.message}" for f in findings],
    )
    if options.explain:
        from deadrelu_cli.causes import explain

        explain(report, model, probe, tuple(options.ops))
    return ScanResult(report, model, data, device, probe, is_main=world is None or world.is_main)


def certify_model(model: LoadedModel, options: ScanOptions, data: CalibrationData | None, device: str):
    """Interval bounds of every activation site over the input box (see certify.py)."""
    import torch

    from deadrelu_cli.certify import certify_graph, graph_for, input_boxes
    from deadrelu_cli.sites import guess_input_shape

    if data is not None and model.backend == "onnx":
        from deadrelu_cli.onnx_scan import feed_order

        order = list(feed_order(model, data).values())
        by_name = {s.name: s for s in data.sources}
        shapes = [tuple(by_name[name].shape[1:]) for name in order]
    elif data is not None:
        order = match_inputs(model, data)
        by_name = {s.name: s for s in data.sources}
        shapes = [tuple(by_name[name].shape[1:]) for name in order]
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
    if model.backend == "onnx":
        from deadrelu_cli.certify_onnx import certify_onnx

        boxes = input_boxes(options.input_range, shapes, data)
        return certify_onnx(model.runnable, boxes, options.ops, options.threshold, options.channel_dim)
    example = tuple(
        torch.zeros((2, *shape), dtype=getattr(torch, model.float_dtype), device=device) for shape in shapes
    )
    graph = graph_for(model.runnable, model.kind, example, model.extra.get("program")).cpu()
    boxes = input_boxes(options.input_range, shapes, data)
    return certify_graph(graph, boxes, options.ops, options.threshold, options.channel_dim)


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
    model = load_model(LoadOptions(options.model, options.arch, options.trust_pickle, device))
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
