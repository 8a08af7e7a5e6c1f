"""In-process A/B of the masked ReLU transformer case (the `transformer` case of bench.py, its folder and
batches): plain forward, scan with the mask (run views on CPU), scan with the mask through one gathered
copy per pass (the path before run views), scan with `--mask none`; interleaved, fastest round of each.

    PYTHONPATH=$PWD .venv/bin/python scripts/mask_ab.py --reps 4 [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench import (  # scripts/ is on sys.path when run as a script
    build_relu_transformer,
    plain_transformer_pass,
    token_batches,
)

from deadrelu_cli.engine import run_scan
from deadrelu_cli.options import ScanOptions
from deadrelu_cli.probe import accumulator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp())
    folder = build_relu_transformer(work / "opt-relu", 768, 3072, 2)
    path = work / "tokens.npz"
    np.savez(path, **token_batches(np.random.default_rng(0), 64, 128))
    batch = 32
    run_views = accumulator.RUN_VIEW_ELEMENTS

    def plain():
        plain_transformer_pass(folder, path, batch)

    def scan(mask=None, run_view_elements=run_views):
        accumulator.RUN_VIEW_ELEMENTS = run_view_elements
        extra = {} if mask is None else {"mask": mask}
        run_scan(ScanOptions(model=str(folder), data=str(path), batch_size=batch, device="cpu", **extra))
        accumulator.RUN_VIEW_ELEMENTS = run_views

    cases = {
        "plain forward": plain,
        "scan, mask, run views": scan,
        "scan, mask, gathered": lambda: scan(run_view_elements=2**62),
        "scan, --mask none": lambda: scan(mask="none"),
    }
    plain(), scan()  # warm-up
    times = {name: [] for name in cases}
    for _ in range(args.reps):
        for name, case in cases.items():
            start = time.perf_counter()
            case()
            times[name].append(time.perf_counter() - start)
    base = min(times["plain forward"])
    for name, spent in times.items():
        rounds = ", ".join(f"{s:.2f}" for s in spent)
        print(f"{name:24s} {min(spent):6.2f} s  {min(spent) / base:.3f}x plain   rounds: {rounds}")


if __name__ == "__main__":
    main()
