"""mask37's CUDA check (about a minute): the position mask at time-major [T, B, F] sites and from a
`src_key_padding_mask` (True = padding) gives the same counts on CUDA as on the CPU, eager and ONNX
(CUDA execution provider), and both equal plain hooks on the CPU. Installs nothing; run from the
repository root on a machine with a GPU:

    PYTHONPATH=$PWD python3 scripts/mask37_cuda.py       (CPU_ONLY=1: the CPU rows only)

Prints one line per case and exits 1 on any mismatch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ARCH = """
import torch
from torch import nn


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation="relu", batch_first=False), 2,
            enable_nested_tensor=False,
        )

    def forward(self, src, src_key_padding_mask=None):
        return self.encoder(self.embed(src).transpose(0, 1), src_key_padding_mask=src_key_padding_mask)


def build():
    torch.manual_seed(0)
    return Encoder().eval()
"""


def scan(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "deadrelu_cli", "scan", *args, "--json", "-", "-q"],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise SystemExit(f"scan {' '.join(args)} failed: {done.stderr.strip()}")
    return {layer["name"]: layer["positive_counts"] for layer in json.loads(done.stdout)["layers"]}


def main() -> int:
    tmp = Path(tempfile.mkdtemp())
    (tmp / "enc.py").write_text(ARCH)
    sys.path.insert(0, str(tmp))
    import enc

    model = enc.build()
    rng = np.random.RandomState(0)
    src = rng.randn(64, 12, 4).astype(np.float32)
    pad = np.arange(12)[None, :] >= rng.randint(1, 13, size=64)[:, None]
    src[pad] = 6.0
    np.savez(tmp / "d.npz", src=src, src_key_padding_mask=pad)
    torch.save(model.state_dict(), tmp / "m.pt")
    captured = []
    hooks = [
        layer.linear1.register_forward_hook(lambda m, a, o: captured.append(o))
        for layer in model.encoder.layers
    ]
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(src), torch.from_numpy(pad))
    for hook in hooks:
        hook.remove()
    truth = [(o.double().numpy().transpose(1, 0, 2)[~pad] > 0).sum(0).tolist() for o in captured]
    torch.onnx.export(
        model, (torch.from_numpy(src[:2]), torch.from_numpy(pad[:2])), tmp / "m.onnx", dynamo=False,
        input_names=["src", "src_key_padding_mask"],
        dynamic_axes={"src": {0: "b", 1: "t"}, "src_key_padding_mask": {0: "b", 1: "t"}},
    )  # fmt: skip
    bad = 0
    for label, args in (
        ("eager cpu", ["m.pt", "--arch", f"{tmp / 'enc.py'}:build", "--device", "cpu"]),
        ("eager cuda", ["m.pt", "--arch", f"{tmp / 'enc.py'}:build", "--device", "cuda"]),
        (
            "eager cuda bs12",
            ["m.pt", "--arch", f"{tmp / 'enc.py'}:build", "--device", "cuda", "--batch-size", "12"],
        ),
        ("onnx cpu", ["m.onnx", "--device", "cpu"]),
        ("onnx cuda", ["m.onnx", "--device", "cuda"]),
    ):
        if "cuda" in label and os.environ.get("CPU_ONLY"):  # the script's own check on a machine without one
            continue
        args[0] = str(tmp / args[0])
        got = list(scan(*args, "--data", str(tmp / "d.npz")).values())
        ok = got == truth
        bad += not ok
        print(f"{label:16s} {'ok' if ok else 'MISMATCH'}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
