#!/usr/bin/env python
"""Peak RSS of `deadrelu scan` against plain onnxruntime at the same batch, as fresh processes (what
`/usr/bin/time -f %M` reports), on three ONNX models: ResNet-18 (scripts/bench.py's, 45 MB of weights,
64 images of 112x112), an MLP with large Linear layers (1024-4096-4096-4096-10, 151 MB of weights, 256
vectors) and a small CNN with large activations (3 convs of 64 channels at 112x112, 0.3 MB of weights).
Each side --reps times; the medians and the range. Memory only: the machine's load does not change it.

    python scripts/onnx_memory.py --reps 3
    python scripts/onnx_memory.py --reps 3 --pythonpath /tmp/main-checkout   # scan with another checkout too
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

PLAIN = """
import sys
import numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
array, batch = np.load(sys.argv[2], mmap_mode="r"), int(sys.argv[3])
for i in range(0, len(array), batch):
    session.run(None, {"input": np.array(array[i : i + batch])})
"""


def build(work: Path) -> dict[str, tuple[Path, Path]]:
    import numpy as np
    import torch
    from torch import nn

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench import build_resnet18

    rng = np.random.default_rng(0)
    images = rng.standard_normal((64, 3, 112, 112)).astype(np.float32)
    vectors = rng.standard_normal((256, 1024)).astype(np.float32)
    np.save(work / "images.npy", images)
    np.save(work / "vectors.npy", vectors)
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
        nn.Linear(4096, 10),
    )  # fmt: skip
    cnn = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip
    models = {
        "resnet18": (build_resnet18(), images),
        "mlp": (mlp.eval(), vectors),
        "cnn": (cnn.eval(), images),
    }
    out = {}
    for name, (net, data) in models.items():
        path = work / f"{name}.onnx"
        torch.onnx.export(
            net,
            (torch.from_numpy(data[:2]),),
            str(path),
            input_names=["input"],
            dynamo=False,
            dynamic_axes={"input": {0: "batch"}},
            opset_version=17,
        )
        out[name] = (path, work / ("vectors.npy" if name == "mlp" else "images.npy"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--pythonpath", action="append", default=[], help="also scan with this checkout")
    parser.add_argument(
        "--cases",
        default="resnet18:16,resnet18:32,resnet18:64,resnet18:auto,mlp:64,cnn:32",
        help="model:batch,…",
    )
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peak_rss import peak_rss_kib

    root = str(Path(__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = build(work)
        os.chdir(work)  # `-m deadrelu_cli` would otherwise find the package in the current directory first
        (work / "plain.py").write_text(PLAIN)
        variants = {"scan": root, **{f"scan@{p}": p for p in args.pythonpath}}
        print(f"{'case':16} {'plain MB':>16} " + " ".join(f"{v:>26}" for v in variants))
        for case in args.cases.split(","):
            name, batch = case.split(":")
            model, data = models[name]
            plain_batch = "32" if batch == "auto" else batch  # auto picks 32 for these models at 112x112
            plain = [
                peak_rss_kib([sys.executable, str(work / "plain.py"), str(model), str(data), plain_batch])
                for _ in range(args.reps)
            ]
            cells = []
            for path in variants.values():
                os.environ["PYTHONPATH"] = (
                    path  # the scan's checkout (peak_rss runs it with this environment)
                )
                command = [sys.executable, "-m", "deadrelu_cli", "scan", str(model), "--data", str(data)]
                command += ["-q", "--batch-size", batch]
                peaks = [peak_rss_kib(command) for _ in range(args.reps)]
                ratio = statistics.median(peaks) / statistics.median(plain)
                cells.append(f"{_mb(peaks):>18} {ratio:5.2f}x")
            print(f"{case:16} {_mb(plain):>16} " + " ".join(f"{c:>26}" for c in cells))


def _mb(peaks: list[int]) -> str:
    return f"{statistics.median(peaks) / 1024:.0f} ({min(peaks) / 1024:.0f}-{max(peaks) / 1024:.0f})"


if __name__ == "__main__":
    main()
