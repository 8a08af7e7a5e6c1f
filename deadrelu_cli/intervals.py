"""Interval arithmetic shared by the certifiers (`scan --certify`) of torch programs and ONNX graphs.

float64 intervals; ops that are monotone map both ends, linear ops use the midpoint-radius form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from deadrelu_cli.calibration import sample_axis
from deadrelu_cli.errors import UserError
from deadrelu_cli.memory import available_memory


@dataclass
class Interval:
    lo: torch.Tensor
    hi: torch.Tensor

    def map(self, fn) -> Interval:
        """A monotonically non-decreasing op applied to both ends."""
        return Interval(fn(self.lo), fn(self.hi))


@dataclass
class SiteBound:
    name: str
    op: str
    upper_bound: np.ndarray | None  # per unit: max over positions of the pre-activation's upper bound
    certified_dead: list[int] | None  # None: not certified (an unsupported op upstream)
    reason: str = ""


def linear_interval(x: Interval, weight: torch.Tensor, bias: torch.Tensor | None, fn) -> Interval:
    mid, rad = (x.hi + x.lo) / 2, (x.hi - x.lo) / 2
    out_mid = fn(mid, weight, bias)
    out_rad = fn(rad, weight.abs(), None)
    return Interval(out_mid - out_rad, out_mid + out_rad)


def product(a: Interval, b: Interval) -> Interval:
    """Elementwise a * b of two intervals (broadcast): its extremes are among the four corner products.
    Sound, if loose where a and b depend on the same inputs (x * hardsigmoid(x) in a HardSwish)."""
    corners = torch.stack(torch.broadcast_tensors(a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi))
    unbounded = corners.isnan().any(0)  # 0 * inf: no finite bound there
    lo = torch.where(unbounded, -torch.inf, corners.amin(0))
    hi = torch.where(unbounded, torch.inf, corners.amax(0))
    return Interval(lo, hi)


class Unsupported(Exception):
    """An op the propagation does not understand: everything below it is not certified."""


def scale_interval(x: Interval, factor) -> Interval:
    """x * factor for a constant factor of either sign."""
    a, b = x.lo * factor, x.hi * factor
    return Interval(torch.minimum(a, b), torch.maximum(a, b))


def normalized_interval(
    x: Interval, last_dims: int, weight=None, bias=None, centered: bool = True
) -> Interval:
    """LayerNorm (`centered`) or RMSNorm over the last `last_dims` axes of x (n elements), then the
    elementwise `weight` and `bias`. Whatever the input, each normalized element is bounded: LayerNorm's
    |x_i - mean| <= sqrt(n - 1) * std (Cauchy-Schwarz, as the deviations sum to 0), RMSNorm's
    x_i^2 <= n * mean(x^2); eps only shrinks both. So the bound needs no input interval at all, and it
    is reached (one element apart from n - 1 equal ones), hence no tighter box bound exists."""
    n = int(np.prod(x.lo.shape[x.lo.dim() - last_dims :]))
    radius = float(np.sqrt(max(n - 1, 0) if centered else n))
    out = Interval(torch.full_like(x.lo, -radius), torch.full_like(x.hi, radius))
    if weight is not None:
        out = scale_interval(out, weight)
    if bias is not None:
        out = out.map(lambda t: t + bias)
    return out


def fixed_range(spec) -> tuple[float, float]:
    if spec is None:
        raise UserError("--certify needs --input-range LO HI (or auto with --data)")
    lo, hi = spec
    if lo > hi:
        raise UserError(f"--input-range {lo} {hi}: LO must not exceed HI")
    return float(lo), float(hi)


def input_boxes(
    spec: str | tuple[float, float] | None,
    shapes: list[tuple[int, ...]],
    data=None,
    names: list[str] | None = None,
) -> list[Interval]:
    """Boxes of one sample per input, in the order of SHAPES (one sample's shape, its sample axis left out):
    (LO, HI) for every element, or 'auto' = per-element min/max of the data. NAMES, with DATA: the arrays
    that feed the model's inputs, in that order. A box is matched to its input by that name, never by where
    the array sits in the file; an array fed whole (--const: a sample rate) is bounded by its own values,
    and one whose samples lie on another axis (--batch-axis) keeps that axis, of length 1."""
    if data is not None and names is not None:
        return _data_boxes(spec, shapes, data, names)
    if spec == "auto":
        raise UserError(
            "--input-range auto needs --data (the box is the min/max of each input feature over the data)"
        )
    lo, hi = fixed_range(spec)
    boxes = []
    for shape in shapes:
        # a shape an ONNX graph's inputs declare (dims of 10^12 cost nothing to write there) is checked
        # before the two float64 bounds are allocated: one line, not an allocator's crash or the OOM killer
        size = 16 * int(np.prod([int(d) for d in shape], dtype=object))
        if size > available_memory():
            raise UserError(
                f"--certify: an input of shape {list(shape)} needs a {size / 2**30:.1f} GiB box, more than the "
                "memory available; the model declares an impossible input size (pass --input-shape)"
            )
        boxes.append(
            Interval(
                torch.full((1, *shape), float(lo), dtype=torch.float64),
                torch.full((1, *shape), float(hi), dtype=torch.float64),
            )
        )
    return boxes


def _data_boxes(spec, shapes: list[tuple[int, ...]], data, names: list[str]) -> list[Interval]:
    axes = {name: sample_axis(data, name) for name in names}
    lows: dict[str, np.ndarray] = {}
    highs: dict[str, np.ndarray] = {}
    if spec != "auto":
        lo, hi = fixed_range(spec)
        for name, shape in zip(names, shapes, strict=True):
            if axes[name] is not None:
                one = (*shape[: axes[name]], 1, *shape[axes[name] :])
                lows[name], highs[name] = np.full(one, lo), np.full(one, hi)
    wanted = [n for n in names if n not in lows]  # auto: every input; LO HI: the --const arrays
    try:
        for batch in (
            data.batches(256, allow_nonfinite=False) if wanted else ()
        ):  # a box of NaN bounds nothing
            for name in wanted:
                a = batch[name].astype(np.float64)
                if axes[name] is None:  # the same whole array in every batch: its values are the box
                    lows[name] = highs[name] = a
                    continue
                low, high = a.min(axes[name], keepdims=True), a.max(axes[name], keepdims=True)
                lows[name] = np.minimum(lows[name], low) if name in lows else low
                highs[name] = np.maximum(highs[name], high) if name in highs else high
            if spec != "auto":  # only --const arrays were wanted, and every batch holds them whole
                break
    except UserError as exc:
        where = str(exc).split("; clean the data")[0]
        if not getattr(data, "allow_nonfinite", False) or where == str(exc):
            raise
        raise UserError(  # the scan took --allow-nonfinite; the box cannot
            f"{where}: --input-range auto bounds each input element by its min/max over the data, which NaN/Inf "
            "leave undefined (--allow-nonfinite or not); give --input-range LO HI"
        ) from None
    return [
        Interval(torch.from_numpy(np.asarray(lows[n])), torch.from_numpy(np.asarray(highs[n]))) for n in names
    ]
