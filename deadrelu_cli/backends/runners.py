"""Run a loaded model of either backend on a batch: a fix compares outputs before and after.

Below both backends' fix modules (a torch model may be written as .onnx and checked with onnxruntime),
so it dispatches to their runner functions, not to their api modules (which import the fix modules).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from deadrelu_cli.calibration import CalibrationData
from deadrelu_cli.loaders.model import LoadedModel


def runner_for(
    loaded: LoadedModel, data: CalibrationData, device: str
) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    """batch -> list of output arrays, for a model of any backend."""
    if loaded.backend == "onnx":
        from deadrelu_cli.backends.onnx.scan import runner

        return runner(loaded, data, device)
    from deadrelu_cli.backends.torch.inputs import detect_float_fed, torch_runner
    from deadrelu_cli.inputs import match_inputs

    order = match_inputs(loaded, data)
    detect_float_fed(
        loaded, data, order, device
    )  # a model loaded back takes uint8 images as the scan fed them
    return torch_runner(loaded, order, device)
