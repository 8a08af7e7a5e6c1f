"""Training-step time with `watch(every=100)` against the same loop without it (scripts/bench.py --only watch).

Per model (an MLP and a CNN), on the CPU, with SGD on random data:
- "average": 200 training steps with watch(every=100) (2 sampled steps, 2 reports) against 200 without;
  the runs are interleaved in blocks of 20 steps so that machine noise hits both alike;
- "sampled": one step with the probe on (watch(every=1), a report every step: the worst case) against one
  without, medians over the steps.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from deadrelu_cli import watch


def mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    return model, torch.randn(64, 128), torch.randint(0, 10, (64,))


def cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(inplace=True),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.Conv2d(64, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    return model, torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))


def _steps(model, optimizer, x, y, count: int, w=None) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        if w is not None:
            w.step()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def measure_case(name: str, factory, steps: int = 200, block: int = 20) -> dict:
    model, x, y = factory()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    _steps(model, optimizer, x, y, 20)  # warm-up (allocator, kernels)
    watched = watch(model, every=100, config=False, keep_reports=1)
    plain_times, watch_times = [], []
    for _ in range(steps // block):
        plain_times += _steps(model, optimizer, x, y, block)
        watch_times += _steps(model, optimizer, x, y, block, watched)
    watched.close()
    every_step = watch(model, every=1, config=False, keep_reports=1)
    sampled, unsampled = [], []
    for _ in range(steps // block):
        unsampled += _steps(model, optimizer, x, y, block // 4)
        sampled += _steps(model, optimizer, x, y, block // 4, every_step)
    every_step.close()
    return {
        "case": name,
        "steps": steps,
        "plain_ms": 1e3 * statistics.fmean(plain_times),
        "watch_ms": 1e3 * statistics.fmean(watch_times),
        "average_ratio": statistics.fmean(watch_times) / statistics.fmean(plain_times),
        "unsampled_step_ms": 1e3 * statistics.median(unsampled),
        "sampled_step_ms": 1e3 * statistics.median(sampled),
        "sampled_ratio": statistics.median(sampled) / statistics.median(unsampled),
    }


def measure_watch(steps: int = 200) -> list[dict]:
    rows = [
        measure_case("mlp 128-512-512-10, batch 64", mlp, steps),
        measure_case("cnn 3x32x32, batch 16", cnn, steps),
    ]
    print(
        f"{'training step':<34} {'plain ms':>9} {'watch ms':>9} {'average':>8} {'unsampled':>10} {'sampled':>8} {'ratio':>6}"
    )
    for r in rows:
        print(
            f"{r['case']:<34} {r['plain_ms']:>9.2f} {r['watch_ms']:>9.2f} {r['average_ratio']:>7.3f}x "
            f"{r['unsampled_step_ms']:>9.2f} {r['sampled_step_ms']:>8.2f} {r['sampled_ratio']:>5.3f}x"
        )
    return rows


if __name__ == "__main__":
    measure_watch()
