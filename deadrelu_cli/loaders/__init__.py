"""Model loaders: a checkpoint file (any supported format) -> LoadedModel.

Torch loaders are imported lazily, so that `deadrelu --help` and the report tools never import torch.
"""

from __future__ import annotations

from deadrelu_cli.loaders.detect import detect_format
from deadrelu_cli.loaders.model import InputSpec, LoadedModel, LoadOptions


def load_model(options: LoadOptions) -> LoadedModel:
    fmt = detect_format(options.path)
    if fmt == "onnx":
        from deadrelu_cli.loaders.onnx_model import load_onnx

        return load_onnx(options)
    if fmt == "hf_folder":
        from deadrelu_cli.loaders.hf_folder import load_hf_folder

        return load_hf_folder(options)
    from deadrelu_cli.loaders.torch_models import load_torch

    return load_torch(options, fmt)


__all__ = ["InputSpec", "LoadOptions", "LoadedModel", "detect_format", "load_model"]
