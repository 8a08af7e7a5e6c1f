"""Steady state on CUDA, in one process, without data loading or compiling in the timed part: ResNet-18
(224x224, batch 128, batches already on the GPU) per forward pass. Arms (interleaved rounds, medians,
CUDA-synchronised):

  plain eager, plain compiled (only with --arms ...,plain-compiled: it compiles for a minute),
  hook recipe, scan eager (the eager probe as it counts by default), scan eager fused (the same probe
  with DEADRELU_FUSED_STATS=cuda: one torch.compile'd pass per site), scan --compile (statistics in the
  compiled graph, read off the output), scan --compile input (DEADRELU_GRAPH_STATS=input: all off the
  input, one reduction input per site).

    python3 scripts/gpu_steady.py --dtype fp32|bf16 [--arms a,b,...] [--rounds 7] [--steps 10]
    python3 scripts/gpu_steady.py --check     # counts: eager vs fused on CUDA (same tensors), and vs CPU

Each arm is built and warmed up on its own; one that fails is reported and left out, the others still
run. Run by scripts/gpu_check.sh (one process per part, each with its own time limit).
STEADY_DEVICE=cpu runs it on the CPU (a smoke run: batch 4, 64x64)."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import build_resnet18, hook_recipe  # noqa: E402

from deadrelu_cli.probe.base import ProbeSettings  # noqa: E402
from deadrelu_cli.probe.eager import EagerProbe  # noqa: E402
from deadrelu_cli.probe.graph_stats import InGraphProbe, export_for_stats  # noqa: E402

DEVICE = os.environ.get("STEADY_DEVICE", "cuda")  # cpu: a smoke run without a GPU
BATCH, SIDE = (128, 224) if DEVICE == "cuda" else (4, 64)
ALL_ARMS = (
    "plain eager",
    "hook recipe",
    "scan eager",
    "scan eager fused",
    "scan --compile",
    "scan --compile input",
)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def build_arm(name: str, fresh, x: torch.Tensor):
    """(callable, context manager or None) for one arm; raises if it cannot be built."""
    if name == "plain eager":
        net = fresh()
        return (lambda: net(x)), None
    if name == "plain compiled":
        compiled = torch.compile(fresh(), dynamic=True)
        return (lambda: compiled(x)), None
    if name == "hook recipe":
        hooked = fresh()
        hook_recipe(hooked)
        return (lambda: hooked(x)), None
    if name in ("scan eager", "scan eager fused"):
        fused = (DEVICE,) if name.endswith("fused") else ()
        probe = EagerProbe(fresh(), ProbeSettings(fused_devices=fused))
        return (lambda: probe.run((x,))), probe.attached()
    if name in ("scan --compile", "scan --compile input"):
        graph = export_for_stats(fresh(), (x[:2],))
        probe = InGraphProbe(graph, ProbeSettings(), compile_graph=True, from_input=name.endswith("input"))
        return (lambda: probe.run((x,))), None
    raise SystemExit(f"unknown arm {name!r}")


def measure(dtype, layout, stages: list[list[str]], rounds: int, steps: int, label: str) -> None:
    """Stage by stage (the cheap arms first, the compiled ones after): build and warm up the stage's arms,
    then time them with plain eager and print, so a time limit that cuts a later stage keeps the rows
    already printed."""

    def fresh():  # one model per arm, the same weights: hooks of one never reach another
        return build_resnet18().to(DEVICE).to(dtype=dtype, memory_format=layout).eval()

    x = torch.randn(BATCH, 3, SIDE, SIDE, device=DEVICE, dtype=dtype).contiguous(memory_format=layout)
    fns, contexts = {}, []
    try:
        with torch.inference_mode():
            for stage in stages:
                for name in stage:
                    if name in fns:
                        continue
                    start = time.perf_counter()
                    try:
                        fn, context = build_arm(name, fresh, x)
                        if context is not None:
                            context.__enter__()
                            contexts.append(context)
                        fn()  # compile, warm up
                        fn()
                        sync()
                        fns[name] = fn
                        print(f"  built {name} in {time.perf_counter() - start:.1f} s", flush=True)
                    except Exception as exc:  # one arm's failure must not lose the others
                        print(
                            f"  FAILED {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                            flush=True,
                        )
                        traceback.print_exc(limit=3)
                names = [n for n in dict.fromkeys(["plain eager", *stage]) if n in fns]
                report(time_arms({n: fns[n] for n in names}, rounds, steps), label)
    finally:
        for context in reversed(contexts):
            context.__exit__(None, None, None)


def time_arms(fns: dict, rounds: int, steps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for key in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                fns[key]()
            sync()
            times[key].append((time.perf_counter() - start) / steps)
    return {k: statistics.median(v) for k, v in times.items() if v}


def report(med: dict[str, float], label: str) -> None:
    base, recipe = med.get("plain eager"), med.get("hook recipe")
    for key, value in med.items():
        ratio = f"/plain eager {value / base:5.3f}" if base else ""
        if recipe and key.startswith("scan eager"):
            ratio += f"  /hook recipe {value / recipe:5.3f}"
        print(
            f"{label:<19} {key:<21} {value * 1e3:7.2f} ms/batch {BATCH / value:8.0f} img/s  {ratio}",
            flush=True,
        )


def check_counts() -> None:
    """Eager vs fused statistics on CUDA over the same tensors (deterministic cuDNN: the two runs see
    identical activations, so counts and max must be equal, sums close), and both against the CPU."""
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((64, 3, 112, 112), dtype=np.float32))
    results = {}
    for label, device, fused in (
        ("cpu reference", "cpu", ()),
        (f"{DEVICE} eager", DEVICE, ()),
        (f"{DEVICE} fused", DEVICE, (DEVICE,)),
    ):
        try:
            probe = EagerProbe(build_resnet18().to(device), ProbeSettings(fused_devices=fused))
            with probe.attached(), torch.inference_mode():
                for part in x.split(32):
                    probe.run((part.to(device),))
            results[label] = probe.registry.layer_stats()
        except Exception as exc:  # report, and compare what did run
            print(f"FAILED {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", flush=True)
            traceback.print_exc(limit=3)
    if len(results) < 3:
        return
    eager, fused, cpu = results[f"{DEVICE} eager"], results[f"{DEVICE} fused"], results["cpu reference"]
    units = sum(layer.units for layer in cpu)
    same_counts = all(
        np.array_equal(a.positive_counts, b.positive_counts) for a, b in zip(eager, fused, strict=True)
    )
    same_max = all(
        np.array_equal(a.max_preactivation, b.max_preactivation) for a, b in zip(eager, fused, strict=True)
    )
    sum_rel = max(
        float(np.max(np.abs(a.sum_abs - b.sum_abs) / np.maximum(1e-12, np.abs(a.sum_abs))))
        for a, b in zip(eager, fused, strict=True)
    )
    print(
        f"{DEVICE} fused vs {DEVICE} eager (same activations): counts equal {same_counts}, max equal {same_max}, "
        f"sums max rel diff {sum_rel:.1e}, layers {len(fused)}/{len(eager)}, "
        f"names equal {[a.name for a in eager] == [b.name for b in fused]}",
        flush=True,
    )
    for label in (f"{DEVICE} eager", f"{DEVICE} fused"):
        dead = sum(
            int((a.dead_mask() != b.dead_mask()).sum()) for a, b in zip(results[label], cpu, strict=True)
        )
        diff = max(
            float(np.abs(a.positive_counts - b.positive_counts).max() / max(1, b.elements_per_unit))
            for a, b in zip(results[label], cpu, strict=True)
        )
        print(f"{label} vs cpu: dead units differing {dead}/{units}, max |count diff| / positions {diff:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--arms", default=",".join(ALL_ARMS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--check", action="store_true", help="the count check instead of timings")
    args = parser.parse_args()
    if args.check:
        check_counts()
        return
    dtype, layout, label = (
        (torch.float32, torch.contiguous_format, "fp32")
        if args.dtype == "fp32"
        else (torch.bfloat16, torch.channels_last, "bf16 channels_last")
    )
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    # the arms that compile nothing first, then the fused eager arm (a few small kernels), then the
    # compiled graphs: each stage is timed and printed before the next one builds
    fused = [a for a in arms if a.endswith("fused")]
    compiled = [a for a in arms if "compile" in a]
    stages = [s for s in ([a for a in arms if a not in fused + compiled], fused, compiled) if s]
    print(f"== {label}: {BATCH}x3x{SIDE}x{SIDE}, {DEVICE}, torch {torch.__version__}", flush=True)
    measure(dtype, layout, stages, args.rounds, args.steps, label)


if __name__ == "__main__":
    main()
