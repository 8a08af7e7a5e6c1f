#!/usr/bin/env python
"""Benchmark: scan time against plain inference over the same batches, in one run.

Cases: (a) a ResNet-18-sized CNN on CPU (eager), (b) its ONNX export with onnxruntime, (c) a
transformer-style MLP block on [B, T, F], and (d) on CUDA when available. Both sides are timed end to
end from the files (plain: load the weights or create the session, stream the .npy, run every batch;
scan: `deadrelu scan` on the same files and batch size). Repetitions are interleaved (plain, scan,
plain, scan, …) and medians compared, so machine noise hits both sides alike. Prints a table and
writes bench.json.

    python scripts/bench.py [--quick] [--reps 3] [--out bench.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deadrelu_cli.engine import ScanOptions, run_scan

warnings.filterwarnings("ignore")


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision's resnet18 layout (same widths, 17 ReLU call sites), without the dependency."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class MLPBlock(nn.Module):
    """A transformer feed-forward block on [B, T, F] tokens."""

    def __init__(self, width: int = 512, hidden: int = 2048, depth: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))
            for _ in range(depth)
        )

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def build_resnet18() -> nn.Module:
    torch.manual_seed(0)
    return ResNet18().eval()


def build_mlp_block() -> nn.Module:
    torch.manual_seed(0)
    return MLPBlock().eval()


def _median_pair(plain, scan, reps: int) -> tuple[float, float]:
    plain()  # warm-up both (allocator, kernels, onnxruntime session)
    scan()
    plain_times, scan_times = [], []
    for _ in range(reps):
        start = time.perf_counter()
        plain()
        plain_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        scan()
        scan_times.append(time.perf_counter() - start)
    return statistics.median(plain_times), statistics.median(scan_times)


def torch_pair(
    name, factory, data_path: Path, batch: int, workdir: Path, device: str = "cpu", compile: bool = False
):
    build = globals()[factory]

    def plain():  # what a user's own inference loop costs: load the weights, stream the .npy, run
        net = build()
        net.load_state_dict(torch.load(workdir / f"{name}.pt", weights_only=True))
        net = net.to(device).eval()
        array = np.load(data_path, mmap_mode="r")
        with torch.inference_mode():
            for i in range(0, len(array), batch):
                net(torch.from_numpy(np.array(array[i : i + batch])).to(device))
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def scan():
        run_scan(
            ScanOptions(
                model=str(workdir / f"{name}.pt"),
                data=str(data_path),
                arch=f"{__file__}:{factory}",
                batch_size=batch,
                device=device,
                compile=compile,
            )
        )

    return plain, scan


def onnx_pair(name, data_path: Path, batch: int, workdir: Path):
    import onnxruntime as ort

    path = workdir / f"{name}.onnx"

    def plain():  # a plain onnxruntime loop: create the session, stream the .npy, run
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        array = np.load(data_path, mmap_mode="r")
        for i in range(0, len(array), batch):
            session.run(None, {"input": np.array(array[i : i + batch])})

    def scan():
        run_scan(ScanOptions(model=str(path), data=str(data_path), batch_size=batch, device="cpu"))

    return plain, scan


def measure(name, device, make_pair, data: np.ndarray, batch: int, reps: int, workdir: Path) -> dict:
    """End to end at N and 3N samples; the marginal ratio (3N - N) cancels the fixed costs
    (loading, hashing, instrumenting) and is the steady-state cost per sample."""
    n = len(data)
    small, large = workdir / f"{name}-n.npy", workdir / f"{name}-3n.npy"
    np.save(small, data)
    np.save(large, np.concatenate([data, data, data]))
    plain_n, scan_n = _median_pair(*make_pair(small), reps)
    plain_3n, scan_3n = _median_pair(*make_pair(large), reps)
    return {
        "case": name,
        "device": device,
        "samples": 3 * n,
        "batch": batch,
        "plain_s": plain_3n,
        "scan_s": scan_3n,
        "ratio": scan_3n / plain_3n,
        "marginal_ratio": (scan_3n - scan_n) / (plain_3n - plain_n),
        "plain_per_s": 3 * n / plain_3n,
        "scan_per_s": 3 * n / scan_3n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small inputs, for a smoke run")
    parser.add_argument("--out", type=Path, default=Path("bench.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    side, n_img = (64, 32) if args.quick else (112, 128)
    images = rng.standard_normal((n_img, 3, side, side)).astype(np.float32)
    tokens = rng.standard_normal((16 if args.quick else 64, 64, 512)).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        torch.save(build_resnet18().state_dict(), work / "resnet18.pt")
        torch.save(build_mlp_block().state_dict(), work / "mlp.pt")
        torch.onnx.export(
            build_resnet18(),
            (torch.from_numpy(images[:2]),),
            str(work / "resnet18.onnx"),
            input_names=["input"],
            dynamo=False,
            dynamic_axes={"input": {0: "batch"}},
            opset_version=17,
        )
        rows.append(
            measure(
                "resnet18 eager",
                "cpu",
                lambda p: torch_pair("resnet18", "build_resnet18", p, 16, work),
                images,
                16,
                args.reps,
                work,
            )
        )
        rows.append(
            measure(
                "resnet18 onnx",
                "cpu (onnxruntime)",
                lambda p: onnx_pair("resnet18", p, 16, work),
                images,
                16,
                args.reps,
                work,
            )
        )
        if (
            not args.quick
        ):  # counting fused by torch.compile; the first run compiles, the marginal ratio is the steady state
            rows.append(
                measure(
                    "resnet18 --compile",
                    "cpu",
                    lambda p: torch_pair("resnet18", "build_resnet18", p, 16, work, compile=True),
                    images,
                    16,
                    args.reps,
                    work,
                )
            )
        rows.append(
            measure(
                "mlp block [B,T,F]",
                "cpu",
                lambda p: torch_pair("mlp", "build_mlp_block", p, 8, work),
                tokens,
                8,
                args.reps,
                work,
            )
        )
        if torch.cuda.is_available():
            big = rng.standard_normal((512, 3, 224, 224)).astype(np.float32)
            rows.append(
                measure(
                    "resnet18 eager",
                    "cuda",
                    lambda p: torch_pair("resnet18", "build_resnet18", p, 128, work, "cuda"),
                    big,
                    128,
                    args.reps,
                    work,
                )
            )
    machine = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    print(
        f"{'case':<20} {'device':<18} {'samples':>7} {'plain/s':>9} {'scan/s':>9} {'scan/plain':>11} {'marginal':>9}"
    )
    for row in rows:
        print(
            f"{row['case']:<20} {row['device']:<18} {row['samples']:>7} {row['plain_per_s']:>9.1f} {row['scan_per_s']:>9.1f} "
            f"{row['ratio']:>10.3f}x {row['marginal_ratio']:>8.3f}x"
        )
    args.out.write_text(json.dumps({"machine": machine, "reps": args.reps, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
