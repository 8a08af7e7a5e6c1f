"""deadrelu: find dead ReLU units in saved checkpoints.

The public Python API is small and lazy (importing this package does not import torch):

    from deadrelu_cli import scan
    report = scan("model.pt", data="calib.npz", arch="arch.py:build")
    print(report.summary())

    from deadrelu_cli import watch          # while it trains (docs/training.md)
    w = watch(model, every=100)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from deadrelu_cli.version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from deadrelu_cli.report.model import Report
    from deadrelu_cli.watcher import Watch


def scan(model: str, data: str, **options: Any) -> Report:
    """Scan MODEL on the calibration DATA and return the Report (see `deadrelu scan --help` for options)."""
    from deadrelu_cli.engine import run_scan
    from deadrelu_cli.options import ScanOptions

    options.setdefault("batch_size_explicit", "batch_size" in options)
    return run_scan(ScanOptions(model=model, data=data, **options))


def watch(model: Any, every: int = 100, window: int = 1, **options: Any) -> Watch:
    """Watch MODEL while it trains: the probe on every EVERY-th step, one Report per WINDOW sampled steps
    (see deadrelu_cli.watcher.Watch and docs/training.md)."""
    from deadrelu_cli.watcher import Watch

    return Watch(model, every, window, **options)


__all__ = ["__version__", "scan", "watch"]
