#!/usr/bin/env python
"""Fixed cost of an ONNX scan as a whole process: `deadrelu scan` on 1 sample of ResNet-18 (scripts/bench.py's,
45 MB) against a plain script (import numpy and onnxruntime, create the session, run the sample), both as
fresh processes, interleaved, medians and minima, with bytecode cached as after a pip install. Each
--pythonpath P adds a scan variant run with P in front of PYTHONPATH (another checkout, or a folder with
another version of a dependency installed by `pip install --target`).

    python scripts/onnx_fixed_cost.py --reps 7
    python scripts/onnx_fixed_cost.py --reps 7 --pythonpath /tmp/typer028
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PLAIN = """
import sys
import numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
session.run(None, {"input": np.load(sys.argv[2])})
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--pythonpath", action="append", default=[])
    args = parser.parse_args()
    import numpy as np
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench import build_resnet18

    root = str(Path(__file__).resolve().parent.parent)
    with tempfile.TemporaryDirectory() as tmp:
        model, sample, script = (Path(tmp) / n for n in ("resnet18.onnx", "x1.npy", "plain.py"))
        x = np.random.default_rng(0).standard_normal((2, 3, 112, 112)).astype(np.float32)
        torch.onnx.export(
            build_resnet18(),
            (torch.from_numpy(x),),
            str(model),
            input_names=["input"],
            dynamo=False,
            dynamic_axes={"input": {0: "batch"}},
            opset_version=17,
        )
        np.save(sample, x[:1])
        script.write_text(PLAIN)
        scan = [sys.executable, "-m", "deadrelu_cli", "scan", str(model), "--data", str(sample), "-q"]
        sides = {"plain": ([sys.executable, str(script), str(model), str(sample)], None)}
        sides["scan"] = (scan, root)
        for extra in args.pythonpath:
            sides[f"scan with {extra} first"] = (scan, f"{extra}{os.pathsep}{root}")
        times: dict[str, list[float]] = {key: [] for key in sides}
        load = os.getloadavg()
        for rep in range(args.reps + 1):  # the first round warms the page cache
            for key, (command, path) in sides.items():
                env = dict(os.environ, PYTHONPATH=path) if path else dict(os.environ)
                # as an installed package (pip writes the bytecode at install): the warm-up round writes
                # __pycache__, where a PYTHONDONTWRITEBYTECODE=1 environment would have every run compile
                # deadrelu's ~50 modules from source again (~60 ms) while numpy's and onnxruntime's come
                # compiled from their wheels
                env.pop("PYTHONDONTWRITEBYTECODE", None)
                start = time.perf_counter()
                done = subprocess.run(command, env=env, capture_output=True, text=True)
                elapsed = time.perf_counter() - start
                if done.returncode not in (0, 1):
                    raise SystemExit(f"{key} failed: {done.stderr[-2000:]}")
                if rep:
                    times[key].append(elapsed)
    print(f"load average at start {load[0]:.2f}, at end {os.getloadavg()[0]:.2f}; {args.reps} reps")
    plain_median, plain_min = statistics.median(times["plain"]), min(times["plain"])
    for key, values in times.items():
        print(
            f"  {key:40s} median {statistics.median(values):.3f} s ({statistics.median(values) - plain_median:+.3f}"
            f" over plain)  min {min(values):.3f} s ({min(values) - plain_min:+.3f})"
        )


if __name__ == "__main__":
    main()
