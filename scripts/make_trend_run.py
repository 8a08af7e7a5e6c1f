#!/usr/bin/env python
"""Write a small training run for `deadrelu trend`: the sample MLP trained with SGD at a learning rate
high enough to kill units (0.5), a checkpoint every 10 steps (with its `global_step`), and the data.

Run: python scripts/make_trend_run.py [OUT]   (default build/trend-run; `make trend-demo` runs it)
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def write_run(out: Path, steps: int = 40, every: int = 10) -> list[Path]:
    """The checkpoints `out/ckpt-<step>.pt` and `out/calib.npz`; returns the checkpoint paths."""
    spec = importlib.util.spec_from_file_location(
        "sample_mlp_arch", ROOT / "sample_models" / "mlp" / "arch.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = module.build()
    x, y = torch.randn(256, 16), torch.randn(256, 4) * 5
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # deliberately too high
    written = []
    for step in range(steps + 1):
        if step % every == 0:
            path = out / f"ckpt-{step:03d}.pt"
            torch.save({"global_step": step, "state_dict": model.state_dict()}, path)
            written.append(path)
        loss = ((model(x) - y) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    np.savez(out / "calib.npz", x=x.numpy())
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="build/trend-run", type=Path)
    args = parser.parse_args()
    paths = write_run(args.out)
    print(f"wrote {len(paths)} checkpoints and calib.npz to {args.out}")


if __name__ == "__main__":
    main()
