"""Training-step time with `watch(every=100)` against the same loop without it (scripts/bench.py --only watch).

Per model, on the CPU, with SGD on random data: the issue's two cases — a transformer-style MLP on tokens
(bench.py's "mlp" block, smaller: 2 blocks of 256 -> 1024 -> 256) and a CNN (smaller than bench.py's
ResNet-18) —, and a stress row beyond them, a tiny MLP (128-512-512-10, a 1.8 ms step: little compute
per Python call, so the probe's fixed per-call cost shows most):
- "average": 200 training steps with watch(every=100) (2 sampled steps, 2 reports) against 200 without;
  the two loops alternate step by step so that machine noise hits both alike;
- "sampled": in a run with watch(every=100) over SAMPLES * 100 steps, the median sampled step (probe
  on) against the median unsampled one, and the step after a sampled one (it makes the window's report)
  against the same. (Sampling every 100th step, as the target says, leaves the probe's code and data
  cold between samples; every 4th step read ~0.1 lower on the tiny MLP.)
Steps are timed in CPU time of this process (time.process_time; run with 1 thread), not wall time.

    python scripts/bench_watch.py [THREADS] [SAMPLES]      (or: python scripts/bench.py --only watch)
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from deadrelu_cli import watch


def mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    return model, torch.randn(64, 128), torch.randint(0, 10, (64,))


class TokenMLP(nn.Module):
    """A transformer feed-forward stack on [B, T, F] tokens (bench.py's "mlp" case, smaller), a head on top."""

    def __init__(self, width: int = 256, hidden: int = 1024, depth: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))
            for _ in range(depth)
        )
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.mean(dim=1))


def token_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return TokenMLP(), torch.randn(16, 64, 256), torch.randint(0, 10, (16,))


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


# CPU time of this process (one torch thread): steps are timed without the time other jobs on shared
# cores take from it, which made wall-clock medians of a 2 ms step swing by ±20 %
clock = time.process_time


def _steps(model, optimizer, x, y, count: int, w=None) -> list[float]:
    times = []
    for _ in range(count):
        start = clock()
        if w is not None:
            w.step()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(clock() - start)
    return times


def measure_case(name: str, factory, steps: int = 200, samples: int = 8, every: int = 100) -> dict:
    model, x, y = factory()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    _steps(model, optimizer, x, y, 20)  # warm-up (allocator, kernels)
    watched = watch(model, every=100, config=False, keep_reports=1)
    plain_times, watch_times = [], []
    for _ in range(steps):  # alternating steps: machine noise hits both sides alike
        plain_times += _steps(model, optimizer, x, y, 1)
        watch_times += _steps(model, optimizer, x, y, 1, watched)
    watched.close()
    # per step, in one run sampling every 100th step: the sampled step (probe on), the next one (it makes
    # the window's report), and the unsampled ones (no hook, no mode: the baseline)
    sampling = watch(model, every=every, config=False, keep_reports=1)
    times = _steps(model, optimizer, x, y, every * samples, sampling)
    sampling.close()
    sampled = times[0::every]
    reporting = times[1::every]
    unsampled = [t for i, t in enumerate(times) if i % every > 1]
    base = statistics.median(unsampled)
    return {
        "case": name,
        "steps": steps,
        "plain_ms": 1e3 * statistics.fmean(plain_times),
        "watch_ms": 1e3 * statistics.fmean(watch_times),
        "average_ratio": statistics.fmean(watch_times) / statistics.fmean(plain_times),
        "unsampled_step_ms": 1e3 * base,
        "sampled_step_ms": 1e3 * statistics.median(sampled),
        "sampled_ratio": statistics.median(sampled) / base,
        "report_step_ratio": statistics.median(reporting) / base,
    }


def measure_watch(steps: int = 200, samples: int = 8) -> list[dict]:
    rows = [
        measure_case("token mlp [16,64,256], 2 blocks", token_mlp, steps, samples),
        measure_case("cnn 3x32x32, batch 16", cnn, steps, samples),
        measure_case("stress: mlp 128-512-512-10, b64", mlp, steps, samples),
    ]
    print(
        f"{'training step':<33} {'plain ms':>9} {'watch ms':>9} {'average':>8} "
        f"{'unsampled':>10} {'sampled':>8} {'ratio':>7} {'report step':>12}"
    )
    for r in rows:
        print(
            f"{r['case']:<33} {r['plain_ms']:>9.2f} {r['watch_ms']:>9.2f} {r['average_ratio']:>7.3f}x "
            f"{r['unsampled_step_ms']:>9.2f} {r['sampled_step_ms']:>8.2f} {r['sampled_ratio']:>6.3f}x "
            f"{r['report_step_ratio']:>11.3f}x"
        )
    return rows


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
    measure_watch(samples=int(sys.argv[2]) if len(sys.argv) > 2 else 8)
