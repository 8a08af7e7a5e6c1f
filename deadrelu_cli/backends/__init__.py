"""Backends side by side, one per framework (Polygraphy's `backend/<framework>/` layout).

Each backend's `api` module answers the same questions for its models — which options apply, which
device, load and replay the data, which data array feeds which input, certify, apply a fix — so the
engine and `fix` orchestrate without knowing a framework. The ONNX backend never imports torch.
`runners.runner_for` runs a model of either backend (a fix's before/after check); it sits below the
backends' fix modules, which use it.
"""

from __future__ import annotations

from types import ModuleType


def backend_for(fmt: str) -> ModuleType:
    """The api module of the backend that runs models of format `fmt` (loaders.detect_format)."""
    if fmt == "onnx":
        from deadrelu_cli.backends.onnx import api
    else:
        from deadrelu_cli.backends.torch import api
    return api


def backend_of(loaded) -> ModuleType:
    """The api module of the backend a LoadedModel belongs to."""
    return backend_for("onnx" if loaded.backend == "onnx" else "torch")
