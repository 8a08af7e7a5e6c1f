#!/usr/bin/env python
"""Peak RSS of `deadrelu scan` against plain onnxruntime at the same batch, as fresh processes (what
`/usr/bin/time -f %M` reports), on three ONNX models: ResNet-18 (scripts/bench.py's, 45 MB of weights,
64 images of 112x112), an MLP with large Linear layers (1024-4096-4096-4096-10, 151 MB of weights, 256
vectors) and a small CNN with large activations (3 convs of 64 channels at 112x112, 0.3 MB of weights).
Opt-in cases: `vgg19` (VGG-19, 548 MiB of weights, 16 images of 224x224; random weights, built here
without torchvision) and `vgg19-pt`: the same model as a torch state_dict, scanned with
`--arch scripts/onnx_memory.py:build_vgg19` against a plain script that builds it, loads the state_dict
and runs the batches. Each side --reps times; the medians and the range. Memory only: the machine's
load does not change it.

    python scripts/onnx_memory.py --reps 3
    python scripts/onnx_memory.py --reps 3 --pythonpath /tmp/main-checkout   # scan with another checkout too
    python scripts/onnx_memory.py --reps 3 --cases vgg19:4,vgg19:auto,vgg19-pt:4,vgg19-pt:auto
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

PLAIN_TORCH = """
import sys
import numpy as np, torch
sys.path.insert(0, sys.argv[4])
from onnx_memory import build_vgg19
net = build_vgg19()
net.load_state_dict(torch.load(sys.argv[1], weights_only=True))
array, batch = np.load(sys.argv[2], mmap_mode="r"), int(sys.argv[3])
with torch.inference_mode():
    for i in range(0, len(array), batch):
        net(torch.from_numpy(np.array(array[i : i + batch])))
"""

AUTO_PLAIN_BATCH = {"vgg19": "2", "vgg19-pt": "2"}  # what --batch-size auto picks (else 32)


def build_vgg19():
    """VGG-19 (torchvision's layout: 16 convs, 3 linears, 548 MiB of float32 weights), random weights."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    widths = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M"] + [512, 512, 512, 512, "M"] * 2
    layers, cin = [], 3
    for width in widths:
        if width == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, width, 3, padding=1), nn.ReLU(inplace=True)]
            cin = width
    head = [nn.Linear(512 * 49, 4096), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, 4096), nn.ReLU(True)]
    head += [nn.Dropout(), nn.Linear(4096, 1000)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(7), nn.Flatten(), *head).eval()


def build(work: Path, wanted: set[str]) -> dict[str, tuple[Path, Path]]:
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
        "resnet18": (build_resnet18, images),
        "mlp": (mlp.eval, vectors),
        "cnn": (cnn.eval, images),
    }
    out = {}
    if wanted & {"vgg19", "vgg19-pt"}:
        np.save(work / "images224.npy", rng.standard_normal((16, 3, 224, 224)).astype(np.float32))
        models["vgg19"] = (build_vgg19, None)
        if "vgg19-pt" in wanted:
            torch.save(build_vgg19().state_dict(), work / "vgg19.pt")
            out["vgg19-pt"] = (work / "vgg19.pt", work / "images224.npy")
    for name, (make, data) in models.items():
        if name not in wanted:
            continue
        net = make()
        if data is None:
            data = np.load(work / "images224.npy")
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
        images_file = "images224.npy" if name == "vgg19" else "images.npy"
        out[name] = (path, work / ("vectors.npy" if name == "mlp" else images_file))
        del net
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
        cases = [case.split(":") for case in args.cases.split(",")]
        models = build(work, {name for name, _ in cases})
        os.chdir(work)  # `-m deadrelu_cli` would otherwise find the package in the current directory first
        (work / "plain.py").write_text(PLAIN)
        (work / "plain_torch.py").write_text(PLAIN_TORCH)
        scripts = str(Path(__file__).resolve().parent)
        variants = {"scan": root, **{f"scan@{p}": p for p in args.pythonpath}}
        print(f"{'case':16} {'plain MB':>16} " + " ".join(f"{v:>26}" for v in variants))
        for name, batch in cases:
            model, data = models[name]
            # auto picks 32 for the first three models at 112x112
            plain_batch = AUTO_PLAIN_BATCH.get(name, "32") if batch == "auto" else batch
            torch_case = name.endswith("-pt")
            plain_cmd = [sys.executable, str(work / ("plain_torch.py" if torch_case else "plain.py"))]
            plain_cmd += [str(model), str(data), plain_batch, scripts]
            plain = [peak_rss_kib(plain_cmd) for _ in range(args.reps)]
            cells = []
            for path in variants.values():
                os.environ["PYTHONPATH"] = (
                    path  # the scan's checkout (peak_rss runs it with this environment)
                )
                command = [sys.executable, "-m", "deadrelu_cli", "scan", str(model), "--data", str(data)]
                command += ["-q", "--batch-size", batch]
                if torch_case:
                    command += ["--arch", f"{Path(__file__).resolve()}:build_vgg19"]
                peaks = [peak_rss_kib(command) for _ in range(args.reps)]
                ratio = statistics.median(peaks) / statistics.median(plain)
                cells.append(f"{_mb(peaks):>18} {ratio:5.2f}x")
            print(f"{name + ':' + batch:16} {_mb(plain):>16} " + " ".join(f"{c:>26}" for c in cells))


def _mb(peaks: list[int]) -> str:
    return f"{statistics.median(peaks) / 1024:.0f} ({min(peaks) / 1024:.0f}-{max(peaks) / 1024:.0f})"


if __name__ == "__main__":
    main()
