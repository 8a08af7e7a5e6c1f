"""Model loaders: a checkpoint file (any supported format) -> LoadedModel.

Torch loaders are imported lazily, so that `deadrelu --help` and the report tools never import torch.
"""

from __future__ import annotations

from deadrelu_cli.errors import UserError
from deadrelu_cli.loaders.detect import TORCH_LEGACY, TORCH_ZIP, detect_format
from deadrelu_cli.loaders.model import InputSpec, LoadedModel, LoadOptions


def check_weights_key(path, fmt: str, key: str | None) -> None:
    """--weights-key picks a weight dict of a torch checkpoint dict; any other format has none."""
    if key is not None and fmt not in (TORCH_ZIP, TORCH_LEGACY):
        raise UserError(
            f"--weights-key {key!r}: {path} is not a torch checkpoint dict ({fmt}); the option picks one "
            "of the weight dicts of a .pt/.pth/.ckpt file"
        )


def load_model(options: LoadOptions) -> LoadedModel:
    fmt = detect_format(options.path)
    check_weights_key(options.path, fmt, options.weights_key)
    if fmt == "onnx":
        from deadrelu_cli.loaders.onnx_model import load_onnx

        return load_onnx(options)
    if fmt == "hf_folder":
        from deadrelu_cli.loaders.hf_folder import load_hf_folder

        return load_hf_folder(options)
    from deadrelu_cli.loaders.torch_models import load_torch

    return load_torch(options, fmt)


__all__ = ["InputSpec", "LoadOptions", "LoadedModel", "check_weights_key", "detect_format", "load_model"]
