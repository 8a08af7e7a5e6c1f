#!/usr/bin/env python
"""ONNX steady state in one process, interleaved: plain onnxruntime, the fetch-all recipe, the scan's first
session (max of every pre-activation) and its switched session (every relu site reads its max off the
output, as after `_OutputMaxSwitch` switched them all). ResNet-18 (scripts/bench.py's) at 112x112,
batch 64. With --threads 1 every run is timed by process CPU time (robust to other jobs on the machine),
else by the wall clock. Prints each side's median, minimum and paired median (each run over the plain
run just before it) as a multiple of plain, and the load average.

    python scripts/onnx_steady.py --rounds 30 --threads 1
    python scripts/onnx_steady.py --cli 12 --rounds 3   # the CLI path: run_scan from files, CPU split

With --cli K: `run_scan` (the scan as the CLI runs it: calibration data from a .npy, prefetch thread,
conversions, host-side accumulation, report) against a plain loop over the same .npy (a session with the
scan's thread settings: 2 intra-op threads, no spinning, so CPU times compare), on 1 and K batches,
interleaved. Prints the marginal process CPU time per batch (K - 1 batches) of each, split into the time
inside `Session.run` (the graph) and outside it (the CLI path's own work).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _options(threads: int, scan: bool, profile: str | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    options.intra_op_num_threads = threads
    options.log_severity_level = 4
    if scan:  # the scan's own settings (backends/onnx/scan.make_session)
        options.enable_mem_pattern = False
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--profile", action="store_true", help="kernel time per op type instead")
    parser.add_argument(
        "--gap",
        type=float,
        default=0.03,
        help="seconds idle before each timed run: a spinning session's threads (onnxruntime's default) "
        "keep a core busy for a while after its run, which would slow whichever arm runs next",
    )
    parser.add_argument("--cli", type=int, metavar="K", help="the CLI path on K batches instead (see above)")
    args = parser.parse_args()
    import torch
    from bench import build_resnet18, fetch_all_model

    from deadrelu_cli.backends.onnx.scan import KERNEL_JOBS, instrumented_bytes, kernel_library
    from deadrelu_cli.loaders.model import LoadOptions
    from deadrelu_cli.loaders.onnx_model import load_onnx
    from deadrelu_cli.native import onnx_status
    from deadrelu_cli.probe.onnx_graph import find_sites

    x = np.random.default_rng(0).standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "resnet18.onnx")
        torch.onnx.export(
            build_resnet18(),
            (torch.from_numpy(x[:2]),),
            path,
            input_names=["input"],
            dynamo=False,
            dynamic_axes={"input": {0: "batch"}},
            opset_version=17,
        )
        if args.cli:
            _cli_split(path, x, args.cli, args.rounds, Path(tmp))
            return
        profile = (
            (lambda label: str(Path(tmp) / label.replace(" ", "_").replace(",", "")))
            if args.profile
            else (lambda label: None)
        )
        plain = ort.InferenceSession(
            path, _options(args.threads, False, profile("plain")), providers=["CPUExecutionProvider"]
        )
        fetch = ort.InferenceSession(
            fetch_all_model(Path(path)), _options(args.threads, False), providers=["CPUExecutionProvider"]
        )

        def recipe() -> None:
            for y in fetch.run(None, {"input": x})[1:]:
                (y > 0).sum(axis=(0, 2, 3))

        runs = {"plain": lambda: plain.run(None, {"input": x}), "fetch-all recipe": recipe}
        sessions = {"plain": plain}
        library = kernel_library("cpu")
        arms = [("first session", False, False), ("switched", True, False)]
        if library is not None:  # the compiled kernel (custom op) counts the relu sites
            arms += [("kernel, first session", False, True), ("kernel, switched", True, True)]
        else:
            print(f"no kernel arms: {onnx_status()}")
        for label, switched, kernel in arms:
            label = f"scan, {label}"
            loaded = load_onnx(LoadOptions(path, device="cpu"))
            sites = find_sites(loaded.runnable, ("relu",))
            chosen = frozenset(range(len(sites))) if switched else frozenset()
            model_bytes = instrumented_bytes(
                loaded, sites, 0.0, None, max_from_output=chosen, kernel_jobs=KERNEL_JOBS if kernel else 0
            )
            options = _options(args.threads, True, profile(label))
            if kernel:
                options.register_custom_ops_library(library)
            session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
            names = [name for site in sites for name in site.outputs.values()]
            runs[label] = lambda s=session, n=names: s.run(n, {"input": x})
            sessions[label] = session
        if args.profile:
            del runs["fetch-all recipe"]
            _profile(runs, sessions, args.rounds)
            return
    for run in runs.values():
        run()
    clock = time.process_time if args.threads == 1 else time.perf_counter
    times: dict[str, list[float]] = {key: [] for key in runs}
    load = os.getloadavg()
    for _ in range(args.rounds):
        for key, run in runs.items():
            time.sleep(args.gap)
            start = clock()
            run()
            times[key].append(clock() - start)
    print(
        f"load average at start {load[0]:.2f}, at end {os.getloadavg()[0]:.2f}; {args.rounds} rounds, "
        f"{args.threads} thread(s), clock {clock.__name__}"
    )
    base = statistics.median(times["plain"])
    for key, values in times.items():
        paired = statistics.median(v / p for v, p in zip(values, times["plain"], strict=True))
        print(
            f"  {key:20s} median x{statistics.median(values) / base:.3f}  "
            f"min x{min(values) / min(times['plain']):.3f}  paired x{paired:.3f}"
        )
    print(
        f"  plain median {base:.4f} s per batch of {args.batch}, {base / args.batch * 1e3:.3f} ms per sample"
    )


def _cli_split(path: str, x: np.ndarray, batches: int, rounds: int, tmp: Path) -> None:
    from onnxruntime.capi.onnxruntime_inference_collection import Session

    from deadrelu_cli.engine import run_scan
    from deadrelu_cli.options import ScanOptions

    files = {k: tmp / f"data{k}.npy" for k in (1, batches)}
    for k, file in files.items():
        np.save(file, np.concatenate([x] * k))
    inside = [0.0]
    original = Session.run

    def timed_run(self, *args, **kwargs):  # process CPU time (every thread) while the graph runs
        start = time.process_time()
        try:
            return original(self, *args, **kwargs)
        finally:
            inside[0] += time.process_time() - start

    Session.run = timed_run

    def plain(file: Path) -> None:
        options = _options(2, False)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        array = np.load(file, mmap_mode="r")
        for i in range(0, len(array), len(x)):
            session.run(None, {"input": np.array(array[i : i + len(x)])})

    def scan(file: Path) -> None:
        run_scan(ScanOptions(model=path, data=str(file), batch_size=len(x), device="cpu"))

    arms = {"plain": plain, "scan": scan}
    for fn in arms.values():
        fn(files[1])
    cpu: dict = {(k, n): [] for k in arms for n in files}
    load = os.getloadavg()
    for r in range(rounds):
        for key in list(arms)[r % 2 :] + list(arms)[: r % 2]:
            for n, file in files.items():
                inside[0] = 0.0
                start = time.process_time()
                arms[key](file)
                cpu[(key, n)].append((time.process_time() - start, inside[0]))
    print(f"load average at start {load[0]:.2f}, at end {os.getloadavg()[0]:.2f}; {rounds} rounds")
    per = {}
    for key in arms:
        total, graph = (
            (
                statistics.median(t[i] for t in cpu[(key, batches)])
                - statistics.median(t[i] for t in cpu[(key, 1)])
            )
            / (batches - 1)
            for i in (0, 1)
        )
        per[key] = (total, graph)
    base = per["plain"][0]
    for key, (total, graph) in per.items():
        print(
            f"  {key:6s} CPU per batch {total * 1e3:8.1f} ms (x{total / base:.3f}): inside Session.run "
            f"{graph * 1e3:8.1f} ms (x{graph / base:.3f}), outside {(total - graph) * 1e3:6.1f} ms "
            f"(x{(total - graph) / base:.3f})"
        )


def _profile(runs: dict, sessions: dict, rounds: int) -> None:
    """Kernel time per op type from onnxruntime's profiler, per run, after one warm-up run; the sessions
    take turns, so machine noise hits each alike."""
    for _ in range(rounds + 1):
        for run in runs.values():
            run()
    base = None
    for label, session in sessions.items():
        with open(session.end_profiling()) as file:
            events = [
                e for e in json.load(file) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
            ]
        events = events[len(events) // (rounds + 1) :]  # drop the warm-up run
        per_op = collections.Counter()
        for event in events:
            per_op[event["args"]["op_name"]] += event["dur"] / rounds / 1000
        total = sum(per_op.values())
        base = base or total
        ops = ", ".join(f"{op} {ms:.2f}" for op, ms in per_op.most_common())
        print(f"  {label:20s} {total:8.2f} ms per run (x{total / base:.3f}): {ops}")


if __name__ == "__main__":
    main()
