"""CUDA against CPU on the bench's ResNet-18 (64 images, 112x112): dead units and positive counts of a scan
on cuda (eager, --compile, bf16 channels_last) against the same scan on cpu. Run by scripts/gpu_check.sh."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import build_resnet18  # noqa: E402

from deadrelu_cli.engine import run_scan  # noqa: E402
from deadrelu_cli.options import ScanOptions  # noqa: E402

DEVICE = os.environ.get("GPU_COUNTS_DEVICE", "cuda")  # cpu: a smoke run without a GPU


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        torch.save(build_resnet18().state_dict(), work / "m.pt")
        x = np.random.default_rng(0).standard_normal((64, 3, 112, 112), dtype=np.float32)
        np.save(work / "x.npy", x)
        common = dict(
            model=str(work / "m.pt"),
            data=str(work / "x.npy"),
            arch=f"{Path(__file__).parent / 'bench.py'}:build_resnet18",
        )
        reference = run_scan(ScanOptions(device="cpu", batch_size=16, **common))
        for label, extra in (
            ("cuda eager", {}),
            ("cuda --compile", {"compile": True}),
            ("cuda bf16 channels_last", {"dtype": "bf16", "channels_last": True}),
        ):
            report = run_scan(ScanOptions(device=DEVICE, batch_size=32, **common, **extra))
            dead_diff = sum(
                int((a.dead_mask() != b.dead_mask()).sum())
                for a, b in zip(report.layers, reference.layers, strict=True)
            )
            count_diff = max(
                float(np.abs(a.positive_counts - b.positive_counts).max() / max(1, b.elements_per_unit))
                for a, b in zip(report.layers, reference.layers, strict=True)
            )
            units = sum(layer.units for layer in reference.layers)
            print(
                f"{label:<26} layers {len(report.layers)}/{len(reference.layers)}  dead units differing {dead_diff}/{units}  max |count diff| / positions {count_diff:.2e}"
            )


if __name__ == "__main__":
    main()
