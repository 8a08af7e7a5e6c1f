#!/usr/bin/env python
"""Steady state of the eager probe on the CPU, in one process: ResNet-18 (bench.py's, 112x112, batch 64)
on batches already in memory, per forward pass, for plain eager, the forward-hook recipe and the scan's
eager probe (and the probe's variants, for A/B of a change). No data loading, hashing or report in the
timed part: what is left is the per-forward cost that bench.py's marginal column estimates.

Every round runs each arm over the same batches, in a rotated order (no arm always follows another);
time is the process's CPU time (`time.process_time`, not wall: a process descheduled by other jobs is
not charged) with one torch thread, so a busy machine shifts every arm alike. Prints per-arm medians,
their ratio to plain, the median of per-round ratios (paired) and `uptime` before and after.

    PYTHONPATH=$PWD python scripts/cpu_steady.py [--rounds 15] [--batches 1] [--batch 64] [--side 112]
        [--threads 1] [--arms plain,hooks,scan,scan-before] [--model resnet18|mlp] [--json out.json]
        [--clock cpu|wall] [--part-mib 2]

Arms: plain, hooks (the recipe), scan (the probe as shipped), scan-before (the probe with this branch's
fast paths off: the counting of before), scan-aten (the probe as shipped without the compiled
kernel, deadrelu_cli/native.py: the relu counted while it runs by ATen's kernels), scan-fused (the torch.compile'd one-pass reduction, which compiles first), scan-nosites (hooks and
call-site mode, nothing counted: the probe's Python cost), scan@MIB (the probe as shipped, its relu
counted in slices of MIB: `--arms plain,scan@2,scan@4 --threads 2` compares 2 MiB slices, the
default, with 4 MiB in one process), scan-stats1t (the probe as shipped with its relu counting on one
torch thread, the model's other ops on all), scan-bare (the probe as shipped with each relu it counts
while running replaced by the bare relu: the probe's cost without that counting).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import build_mlp_block, build_resnet18, hook_recipe  # noqa: E402

from deadrelu_cli.probe.base import ProbeSettings  # noqa: E402
from deadrelu_cli.probe.eager import EagerProbe  # noqa: E402


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "uptime: n/a"


def make_arms(names: list[str], model: str, batches: list[torch.Tensor]) -> dict:
    build = build_mlp_block if model == "mlp" else build_resnet18
    arms = {}
    stacks = []
    for name in names:
        net = build()
        if name == "plain":
            arms[name] = (lambda n: lambda x: n(x))(net)
        elif name == "hooks":
            counts = hook_recipe(net)
            arms[name] = (lambda n, c: lambda x: n(x))(net, counts)
        elif name.startswith("scan"):
            # scan-nosites: the probe's hooks and mode with nothing to count (no elu in the model)
            probe = EagerProbe(
                net, ProbeSettings(ops=("elu",) if name == "scan-nosites" else ("relu", "relu6"))
            )
            probe.fast_paths = name != "scan-before"
            probe.registry.fused_devices = ("cpu",) if name == "scan-fused" else ()
            stacks.append(probe.attached())
            arms[name] = (lambda p: lambda x: p.run((x,)))(probe)
            if name == "scan-stats1t":
                arms[name] = _stats_on_one_thread(arms[name])
            if name == "scan-bare":
                arms[name] = _bare_relu(arms[name])
            if name == "scan-aten":
                arms[name] = _without_kernel(arms[name])
            if "@" in name:  # scan@MIB: the probe as shipped with slices of MIB
                arms[name] = _with_part_size(arms[name], float(name.split("@")[1]))
        else:
            raise SystemExit(f"unknown arm {name!r}")
    return arms, stacks


def _with_counting(run, replace):
    """The arm `run` with SiteAccumulator.run_relu_in_parts (the relu counted while it runs) replaced, for
    its calls only, by replace(real) — a function of (self, pre, in_place, threshold)."""
    from deadrelu_cli.probe import accumulator

    real = accumulator.SiteAccumulator.run_relu_in_parts
    replacement = replace(real)

    def patched(x):
        accumulator.SiteAccumulator.run_relu_in_parts = replacement
        try:
            return run(x)
        finally:
            accumulator.SiteAccumulator.run_relu_in_parts = real

    return patched


def _stats_on_one_thread(run):
    """The probe's relu counted while it runs on one torch thread, the model's other ops on all: whether
    the slices' many short parallel regions are what 2 threads cost."""

    def one_thread(real):
        def counted(self, *args):
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return real(self, *args)
            finally:
                torch.set_num_threads(threads)

        return counted

    return _with_counting(run, one_thread)


def _bare_relu(run):
    """The probe as shipped with each relu it counts while running replaced by the bare relu: what is left
    over plain is the probe's Python and its other sites."""

    def bare(_real):
        return lambda self, pre, in_place, threshold: pre.clamp_min_(0) if in_place else pre.clamp_min(0)

    return _with_counting(run, bare)


def _without_kernel(run):
    """The probe as shipped, its relu counted by ATen's kernels instead of the compiled one."""
    from deadrelu_cli.probe import accumulator

    def aten(x):
        real = accumulator.relu_stats
        accumulator.relu_stats = lambda: None
        try:
            return run(x)
        finally:
            accumulator.relu_stats = real

    return aten


def _with_part_size(run, mib: float):
    from deadrelu_cli.probe import accumulator

    def sized(x):
        before = accumulator.CACHE_PART_BYTES
        accumulator.CACHE_PART_BYTES = int(mib * 2**20)
        try:
            return run(x)
        finally:
            accumulator.CACHE_PART_BYTES = before

    return sized


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batches", type=int, default=1, help="batches per arm and round")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--side", type=int, default=112)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arms", default="plain,hooks,scan,scan-before")
    parser.add_argument("--model", default="resnet18", choices=("resnet18", "mlp"))
    parser.add_argument("--clock", default="cpu", choices=("cpu", "wall"))
    parser.add_argument(
        "--part-mib",
        type=float,
        help="slice size of the relu counted while it runs (probe/accumulator.CACHE_PART_BYTES), for A/B",
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.part_mib is not None:
        from deadrelu_cli.probe import accumulator

        accumulator.CACHE_PART_BYTES = int(args.part_mib * 2**20)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(1)
    shape = (args.batch, 64, 512) if args.model == "mlp" else (args.batch, 3, args.side, args.side)
    batches = [torch.randn(shape) for _ in range(args.batches)]
    names = [n.strip() for n in args.arms.split(",") if n.strip()]
    before = uptime()
    print(f"start: {before}", flush=True)
    arms, stacks = make_arms(names, args.model, batches)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for stack in stacks:
            stack.__enter__()
        try:
            for (
                fn
            ) in arms.values():  # warm-up: allocator, oneDNN primitives, compiles, the probe's first batch
                for x in batches:
                    fn(x)
                    fn(x)
            for r in range(args.rounds):
                order = names[r % len(names) :] + names[: r % len(names)]
                for name in order:
                    start = clock()
                    for x in batches:
                        arms[name](x)
                    times[name].append((clock() - start) / len(batches))
        finally:
            for stack in reversed(stacks):
                stack.__exit__(None, None, None)
    after = uptime()
    plain = statistics.median(times["plain"]) if "plain" in times else None
    print(
        f"{args.model} {args.batch}x{shape[1:]} threads={args.threads} rounds={args.rounds} "
        f"clock={args.clock} torch {torch.__version__}"
    )
    result = {"args": vars(args), "uptime_start": before, "uptime_end": after, "arms": {}}
    for name in names:
        med = statistics.median(times[name])
        line = f"{name:<15} {med * 1e3:8.1f} ms/batch  min {min(times[name]) * 1e3:8.1f}"
        row = {"median_s": med, "times_s": times[name]}
        if plain:
            paired = statistics.median(a / b for a, b in zip(times[name], times["plain"], strict=True))
            line += f"  /plain {med / plain:6.3f}  paired {paired:6.3f}"
            row.update(ratio=med / plain, paired=paired)
        print(line, flush=True)
        result["arms"][name] = row
    print(f"end:   {after}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
