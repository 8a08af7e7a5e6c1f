"""The ONNX backend's answers to the engine and to `fix` (see deadrelu_cli/backends/__init__.py)."""

from __future__ import annotations

from deadrelu_cli.calibration import CalibrationData
from deadrelu_cli.errors import UserError
from deadrelu_cli.loaders.model import LoadedModel, LoadOptions
from deadrelu_cli.options import ScanOptions


def check_options(options: ScanOptions) -> None:
    """Torch-only options, refused by the model's content (not its file name)."""
    if options.compile:
        raise UserError("--compile is for torch models; ONNX graphs are already instrumented in-graph")
    if options.channels_last:
        raise UserError("--channels-last applies to torch models; onnxruntime picks its own layouts")
    if options.dtype:
        raise UserError("--dtype applies to torch models; an ONNX model runs in the types of its graph")
    if options.device_map:
        raise UserError("--device-map applies to Hugging Face model folders")


def resolve_device(requested: str) -> str:
    requested = (requested or "auto").lower()
    if requested == "auto":
        return "cpu"
    if requested.startswith("cuda"):  # asked for by name: as for torch models, no quiet fallback
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError(
                f"--device {requested}: onnxruntime has no CUDAExecutionProvider here "
                "(pip install onnxruntime-gpu); use --device cpu or auto"
            )
        return requested
    if requested != "cpu":
        raise UserError(f"--device {requested!r}: choose auto, cpu or cuda")
    return requested


def load_and_scan(options: ScanOptions, data: CalibrationData, device: str):
    """(model, layers, probe): the graph instrumented and replayed; no probe object outlives the scan."""
    from deadrelu_cli.backends.onnx.scan import scan_onnx
    from deadrelu_cli.loaders.onnx_model import load_onnx

    if not data.local_samples:
        return load_onnx(LoadOptions(options.model, device=device)), [], None
    model, layers = scan_onnx(options, data, device)
    return model, layers, None


def input_order(model: LoadedModel, data: CalibrationData) -> list[str]:
    """The data arrays in the order of the model's inputs."""
    from deadrelu_cli.backends.onnx.scan import feed_order

    return list(feed_order(model, data).values())


def batch_size(requested, model: LoadedModel, data: CalibrationData, device: str) -> int:
    from deadrelu_cli.backends.onnx.scan import feed_order, onnx_batch_size

    return onnx_batch_size(requested, model, data, feed_order(model, data))


def certify(model: LoadedModel, options: ScanOptions, shapes: list, data, device: str, names=None):
    from deadrelu_cli.backends.onnx.certify import certify_onnx
    from deadrelu_cli.intervals import input_boxes
    from deadrelu_cli.loaders.onnx_model import restore_weights

    boxes = input_boxes(options.input_range, shapes, data, names)
    restore_weights(model)  # the scan held the graph without its large weights
    return certify_onnx(model.runnable, boxes, options.ops, options.threshold, options.channel_dim)


def apply_fix(scanned, plans, options, scan_options, temp, result):
    from deadrelu_cli.backends.onnx.fix import apply_onnx

    return apply_onnx(scanned, plans, options, scan_options, temp, result)
