"""The torch backend's answers to the engine and to `fix` (see deadrelu_cli/backends/__init__.py)."""

from __future__ import annotations

from deadrelu_cli import native
from deadrelu_cli.calibration import CalibrationData, sample_axis
from deadrelu_cli.errors import UserError
from deadrelu_cli.loaders.model import LoadedModel, LoadOptions
from deadrelu_cli.options import ScanOptions


def check_options(options: ScanOptions) -> None:
    """Every scan option applies to torch models; --compile counts inside the compiled graph, which
    cannot leave NaN/Inf values out as --allow-nonfinite does."""
    if options.compile and options.allow_nonfinite:
        raise UserError(
            "--compile counts inside the compiled graph and cannot leave NaN/Inf values out "
            "(--allow-nonfinite); drop one of them"
        )


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


def load_and_scan(options: ScanOptions, data: CalibrationData, device: str):
    """(model, layers, probe): the model loaded, set up as asked, and replayed through a probe."""
    from deadrelu_cli.backends.torch.inputs import apply_channels_last, apply_dtype
    from deadrelu_cli.backends.torch.scan import scan_torch
    from deadrelu_cli.loaders import load_model

    if device == "cpu":
        import torch  # noqa: F401  (first: the kernel then shares the OpenMP runtime torch loads)

        native.prepare()  # a first build of the counting kernel overlaps the model's loading
    model = load_model(
        LoadOptions(
            options.model,
            options.arch,
            options.trust_pickle,
            device,
            options.dtype,
            options.device_map,
            options.max_memory,
            weights_key=options.weights_key,
        )
    )
    apply_dtype(model, options.dtype)
    apply_channels_last(model, options.channels_last)
    if not data.local_samples:
        return model, [], None
    layers, probe = scan_torch(model, data, options, device)
    return model, layers, probe


def input_order(model: LoadedModel, data: CalibrationData) -> list[str]:
    from deadrelu_cli.inputs import match_inputs

    return match_inputs(model, data)


def batch_size(requested, model: LoadedModel, data: CalibrationData, device: str) -> int:
    from deadrelu_cli.backends.torch.scan import batch_size_for

    return batch_size_for(requested, model, data, input_order(model, data), device)


def certify(model: LoadedModel, options: ScanOptions, shapes: list, data, device: str, names=None):
    import torch

    from deadrelu_cli.backends.torch.certify import certify_graph, graph_for
    from deadrelu_cli.intervals import input_boxes

    # the program is exported with the batch on every input's first axis (export_for_stats)
    other = [name for name in names or () if sample_axis(data, name) != 0]
    if other:
        raise UserError(
            f"--certify on a PyTorch model bounds inputs with samples on the first axis; {', '.join(other)} "
            "is fed whole (--const) or has its samples on another axis (--batch-axis): certify its ONNX export"
        )
    example = tuple(
        torch.zeros((2, *shape), dtype=getattr(torch, model.float_dtype), device=device) for shape in shapes
    )
    graph = graph_for(model.runnable, model.kind, example, model.extra.get("program")).cpu()
    boxes = input_boxes(options.input_range, shapes, data, names)
    return certify_graph(graph, boxes, options.ops, options.threshold, options.channel_dim)


def apply_fix(scanned, plans, options, scan_options, temp, result):
    from deadrelu_cli.files import require_temp_folder

    require_temp_folder("fixing a torch model (torch.export)")  # before torch's compiler is imported
    from deadrelu_cli.backends.torch.fix import apply_torch

    return apply_torch(scanned, plans, options, scan_options, temp, result)
