"""Device diagnosis: why torch.export of the bench's ResNet-18 with a dynamic batch fails on this torch/CUDA."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import build_resnet18  # noqa: E402

net = build_resnet18().cuda()
x = torch.randn(2, 3, 224, 224, device="cuda")
from deadrelu_cli.probe.graph_stats import export_for_stats  # noqa: E402

try:
    export_for_stats(net, (x,))
    print("export_for_stats: ok")
except Exception as exc:  # noqa: BLE001
    print(f"export_for_stats: {type(exc).__name__}: {exc}")
