"""Device diagnosis: why torch.export of the bench's ResNet-18 with a dynamic batch fails on this torch/CUDA."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import build_resnet18  # noqa: E402

net = build_resnet18().cuda()
x = torch.randn(2, 3, 224, 224, device="cuda")
for low in (1, 2):
    try:
        torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=low)},))
        print(f"min={low}: ok")
    except Exception as exc:  # noqa: BLE001
        print(f"min={low}: {type(exc).__name__}: " + "\n".join(str(exc).splitlines()[:12]))
