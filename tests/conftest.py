from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PLANTED = ROOT / "tests" / "planted.py"
sys.path.insert(0, str(ROOT / "tests"))

import planted  # noqa: E402

from deadrelu_cli import native  # noqa: E402


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def json(self):
        return json.loads(self.out)


@pytest.fixture
def cli(capsys):
    """Run `deadrelu ARGS…` in-process through the real entry point (exit-code mapping included)."""
    from deadrelu_cli.cli.app import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def save_state_dict(model: torch.nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def arch(factory: str) -> str:
    return f"{PLANTED}:{factory}"


def relu_onnx(path: Path, width: int) -> Path:
    """A tiny ONNX model, x [n, width] -> Relu(x + b), b = -0.5 on the first half of the units."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    bias = np.where(np.arange(width) < width // 2, -0.5, 0.0).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["pre"]), helper.make_node("Relu", ["pre"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])],
        [numpy_helper.from_array(bias, "b")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    """The legacy (TorchScript-based) ONNX export of a one-input model: input "x", batch axis dynamic;
    its deprecation warnings kept out of the test's output."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), path, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "b"}}
        )
    return path


def arch_file(path: Path, source: str) -> tuple[torch.nn.Module, str]:
    """Write an --arch file whose `build()` makes the model: (that model in eval mode, the --arch spec)."""
    import importlib.util

    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"arch_for_test_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build().eval(), f"{path}:build"


def counts_from_pre(
    pre: torch.Tensor, dim: int, threshold: float = 0.0
) -> tuple[np.ndarray, np.ndarray, int]:
    """Ground truth, counted in numpy: positives per unit, max pre-activation per unit, elements per unit."""
    a = np.moveaxis(pre.detach().cpu().numpy().astype(np.float64), dim, -1)
    a = a.reshape(-1, a.shape[-1])
    return (a > threshold).sum(axis=0), a.max(axis=0), a.shape[0]


@pytest.fixture
def planted_module():
    return planted


def compiled_kernel():
    """The compiled counting kernel (deadrelu_cli/native.py); skipped with its reason where it cannot be
    built, a failure in CI (which has a compiler)."""
    kernel = native.relu_stats()
    if kernel is None:
        reason = f"the compiled kernel is not available here: {native.status()}"
        if os.environ.get("CI"):  # CI has a compiler: a kernel that does not build there is a failure
            pytest.fail(reason)
        pytest.skip(reason)
    return kernel


def onnx_kernel_library() -> str:
    """The custom-op library of the compiled kernel (native.onnx_library), as an ONNX scan on the CPU uses
    it; skipped with its reason where it cannot be built or onnxruntime is too old, a failure in CI."""
    from deadrelu_cli.backends.onnx import scan as onnx_scan

    library = onnx_scan.kernel_library("cpu")
    if library is None:
        import onnxruntime

        reason = (
            f"the compiled kernel's onnxruntime op is not available here: {native.onnx_status()} "
            f"(onnxruntime {onnxruntime.__version__}, the op needs {'.'.join(map(str, onnx_scan.KERNEL_API))})"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return library


@pytest.fixture(params=["kernel", "graph"])
def onnx_counting(request, monkeypatch):
    """ONNX relu sites counted both ways: by the compiled kernel's custom op and by the graph's own ops
    (where the op cannot be built, on CUDA, and for what it does not count). Returns the sessions' model
    bytes, recorded as each session is made."""
    from deadrelu_cli.backends.onnx import scan as onnx_scan

    if request.param == "kernel":
        onnx_kernel_library()
    else:
        monkeypatch.setattr(onnx_scan, "kernel_library", lambda device: None)
    made: list[tuple[bytes, str | None]] = []
    real = onnx_scan.make_session

    def recording(model_bytes, device, notes, weights_dir=None, library=None):
        made.append((model_bytes, library))
        return real(model_bytes, device, notes, weights_dir, library)

    monkeypatch.setattr(onnx_scan, "make_session", recording)
    return request.param, made


def kernel_nodes(model_bytes: bytes) -> int:
    """How many deadrelu.ReluStats / ClipStats nodes a session's model holds."""
    import onnx

    model = onnx.ModelProto()
    model.ParseFromString(model_bytes)
    return sum(
        node.domain == "deadrelu" and node.op_type in ("ReluStats", "ClipStats") for node in model.graph.node
    )
