"""Steady state on CUDA, in one process, without data loading or compiling in the timed part: ResNet-18
(224x224, batch 128, batches already on the GPU) per forward pass, for plain eager, plain
torch.compile, the forward-hook recipe, the eager scan probe and the --compile probe (fp32 and bf16
channels_last). Medians of interleaved rounds, CUDA-synchronised. Run by scripts/gpu_check.sh."""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import build_resnet18, hook_recipe  # noqa: E402

from deadrelu_cli.probe.base import ProbeSettings  # noqa: E402
from deadrelu_cli.probe.eager import EagerProbe  # noqa: E402
from deadrelu_cli.probe.graph_stats import InGraphProbe, export_for_stats  # noqa: E402

DEVICE = os.environ.get("STEADY_DEVICE", "cuda")  # cpu: a smoke run without a GPU
BATCH, SIDE = (128, 224) if DEVICE == "cuda" else (4, 64)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def measure(dtype, layout, rounds: int, steps: int) -> dict[str, float]:
    def fresh():  # one model per side, the same weights: hooks of one never reach another
        return build_resnet18().to(DEVICE).to(dtype=dtype, memory_format=layout).eval()

    net = fresh()
    x = torch.randn(BATCH, 3, SIDE, SIDE, device=DEVICE, dtype=dtype).contiguous(memory_format=layout)
    hooked = fresh()
    hook_recipe(hooked)
    compiled = torch.compile(fresh(), dynamic=True)
    eager_probe = EagerProbe(fresh(), ProbeSettings())
    graph_probe = InGraphProbe(export_for_stats(fresh(), (x[:2],)), ProbeSettings(), compile_graph=True)
    fns = {
        "plain eager": lambda: net(x),
        "plain compiled": lambda: compiled(x),
        "hook recipe": lambda: hooked(x),
        "scan eager": lambda: eager_probe.run((x,)),
        "scan --compile": lambda: graph_probe.run((x,)),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    with eager_probe.attached(), torch.inference_mode():
        for fn in fns.values():  # compile, warm up
            fn()
            fn()
        for _ in range(rounds):
            for key, fn in fns.items():
                sync()
                start = time.perf_counter()
                for _ in range(steps):
                    fn()
                sync()
                times[key].append((time.perf_counter() - start) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def main(rounds: int = 7, steps: int = 10) -> None:
    for dtype, layout, label in (
        (torch.float32, torch.contiguous_format, "fp32"),
        (torch.bfloat16, torch.channels_last, "bf16 channels_last"),
    ):
        med = measure(dtype, layout, rounds, steps)
        base, comp = med["plain eager"], med["plain compiled"]
        for key, value in med.items():
            print(
                f"{label:<19} {key:<15} {value * 1e3:7.2f} ms/batch {BATCH / value:8.0f} img/s  "
                f"/plain eager {value / base:5.3f}  /plain compiled {value / comp:5.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
