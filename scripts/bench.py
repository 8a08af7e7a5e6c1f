#!/usr/bin/env python
"""Benchmark: scan time against plain inference and against the recipes users write today, in one run.

Cases: (a) a ResNet-18-sized CNN on CPU (eager, and --compile against plain eager and plain compiled),
(b) its ONNX export with onnxruntime, (c) a transformer-style MLP block on [B, T, F], (d) on CUDA when
available (eager, --compile, bf16 + channels_last), and (e) the peak RSS of a scan when the data grows 10x. Both sides are timed end to
end from the files (plain: load the weights or create the session, stream the .npy, run every batch;
scan: `deadrelu scan` on the same files and batch size). Repetitions are interleaved (plain, scan, peer,
then scan, peer, plain, …: each round starts one further on) and medians compared, so machine noise hits
every side alike; "paired" is the median of each scan's time over the plain run of the same round. Peers, in the same interleaved loop: the
forward-hook recipe for torch ((y > 0) summed per channel on every nn.ReLU) and the fetch-all recipe for
ONNX (every Relu output made a graph output, counted in numpy). Whole process: `deadrelu scan` as a
command against a plain script, as processes, on 1 sample (the fixed cost) and on N samples. Prints a
table and writes bench.json.

    python scripts/bench.py [--quick] [--reps 3] [--only eager,onnx] [--out bench.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from bench_watch import measure_watch  # training steps with watch() (scripts/bench_watch.py)
from peak_rss import peak_rss_kib  # scripts/ is on sys.path when this runs as a script
from torch import nn

from deadrelu_cli.engine import run_scan
from deadrelu_cli.options import ScanOptions

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


def _interleaved(fns: dict, reps: int) -> dict[str, list[float]]:
    """Each callable once as a warm-up (allocator, kernels, sessions), then `reps` rounds of all of them
    in turn: machine noise hits every side alike. Each round starts one side further on, so that no side
    always follows the same one (a run right after a smaller one pays the page faults of growing the heap
    again: the ONNX scan, always run after plain onnxruntime, read ~5% slower than when run second)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {key: [] for key in fns}
    keys = list(fns)
    for round_ in range(reps):
        for key in keys[round_ % len(keys) :] + keys[: round_ % len(keys)]:
            fn = fns[key]
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return times


def hook_recipe(net: nn.Module) -> dict:
    """The usual forward-hook script: (y > 0) summed per channel on every nn.ReLU (counts only)."""
    counts: dict = {}

    def hook(module, args, out):
        dims = [d for d in range(out.dim()) if d != (1 if out.dim() == 4 else out.dim() - 1)]
        counts[module] = counts.get(module, 0) + (out > 0).sum(dim=dims)

    for module in net.modules():
        if isinstance(module, nn.ReLU):
            module.register_forward_hook(hook)
    return counts


def torch_pair(
    name,
    factory,
    data_path: Path,
    batch: int,
    workdir: Path,
    device: str = "cpu",
    compile: bool = False,
    plain_compiled: bool = False,
    dtype: str | None = None,
    channels_last: bool = False,
):
    """{plain, scan, peer} callables (peer: the forward-hook recipe). `compile` runs the scan with --compile; `plain_compiled` compiles the plain
    model with torch.compile (the baseline for "scan --compile vs plain compiled"); `dtype` and
    `channels_last` apply to both sides."""
    build = globals()[factory]
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: torch.float32}[dtype]
    layout = torch.channels_last if channels_last else torch.contiguous_format

    def plain(hooks: bool = False):  # a user's own inference loop: load the weights, stream the .npy, run
        net = build()
        net.load_state_dict(torch.load(workdir / f"{name}.pt", weights_only=True))
        net = net.to(device=device, dtype=torch_dtype, memory_format=layout).eval()
        counts = hook_recipe(net) if hooks else None
        if plain_compiled:
            net = torch.compile(net, dynamic=True)
        array = np.load(data_path, mmap_mode="r")
        with torch.inference_mode():
            for i in range(0, len(array), batch):
                x = torch.from_numpy(np.array(array[i : i + batch])).to(device)
                net(x.to(dtype=torch_dtype, memory_format=layout))
        if counts:
            [c.cpu() for c in counts.values()]  # the recipe's results, on the host
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
                dtype=dtype,
                channels_last=channels_last,
            )
        )

    fns = {"plain": plain, "scan": scan}
    if not plain_compiled:  # the hook recipe is an eager script
        fns["peer"] = lambda: plain(hooks=True)
    return fns


def fetch_all_model(path: Path) -> bytes:
    """The fetch-all recipe's graph: every Relu output added as a graph output."""
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.op_type == "Relu":
            model.graph.output.append(
                onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)
            )
    return model.SerializeToString()


def onnx_pair(name, data_path: Path, batch: int, workdir: Path):
    import onnxruntime as ort

    path = workdir / f"{name}.onnx"

    def plain(fetch_all: bool = False):  # a plain onnxruntime loop: create the session, stream the .npy, run
        model = fetch_all_model(path) if fetch_all else str(path)
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        array = np.load(data_path, mmap_mode="r")
        counts: dict = {}
        for i in range(0, len(array), batch):
            outputs = session.run(None, {"input": np.array(array[i : i + batch])})
            for k, y in enumerate(outputs[1:] if fetch_all else ()):  # the recipe: count in numpy
                counts[k] = counts.get(k, 0) + (y > 0).sum(axis=(0, 2, 3))

    def scan():
        run_scan(ScanOptions(model=str(path), data=str(data_path), batch_size=batch, device="cpu"))

    return {"plain": plain, "scan": scan, "peer": lambda: plain(fetch_all=True)}


def measure(
    name, device, make_fns, data: np.ndarray, batch: int, reps: int, workdir: Path, process=None
) -> dict:
    """End to end at N and 3N samples, in process; the marginal ratio (3N - N) cancels the fixed costs
    (loading, hashing, instrumenting) and is the steady-state cost per sample. `process(path) -> (plain
    command, scan command)` adds the whole-process column: both as processes on 1 sample (the fixed cost)
    and on N samples."""
    n = len(data)
    one, small, large = (workdir / f"{name}-{k}.npy" for k in ("1", "n", "3n"))
    np.save(one, data[:1])
    np.save(small, data)
    np.save(large, np.concatenate([data, data, data]))
    at_n = _interleaved(make_fns(small), reps)
    at_3n = _interleaved(make_fns(large), reps)
    med_n = {k: statistics.median(v) for k, v in at_n.items()}
    med = {k: statistics.median(v) for k, v in at_3n.items()}
    row = {
        "case": name,
        "device": device,
        "samples": 3 * n,
        "batch": batch,
        "plain_s": med["plain"],
        "scan_s": med["scan"],
        "ratio": med["scan"] / med["plain"],
        # each scan against the plain run of the same round: slow drift of the machine cancels in each pair
        "paired_ratio": statistics.median(s / p for s, p in zip(at_3n["scan"], at_3n["plain"], strict=True)),
        "marginal_ratio": (med["scan"] - med_n["scan"]) / (med["plain"] - med_n["plain"]),
        "plain_per_s": 3 * n / med["plain"],
        "scan_per_s": 3 * n / med["scan"],
        "times_s": {f"{k}_n": v for k, v in at_n.items()} | {f"{k}_3n": v for k, v in at_3n.items()},
    }
    if "peer" in med:
        row["peer_s"] = med["peer"]
        row["scan_over_peer"] = med["scan"] / med["peer"]
        row["marginal_over_peer"] = (med["scan"] - med_n["scan"]) / (med["peer"] - med_n["peer"])
        row["peer_marginal_ratio"] = (med["peer"] - med_n["peer"]) / (med["plain"] - med_n["plain"])
    if process is not None:
        runs = {}
        for label, path in (("1", one), ("n", small)):
            plain_cmd, scan_cmd = process(path)
            runs[label] = _interleaved(
                {"plain": lambda c=plain_cmd: _run(c), "scan": lambda c=scan_cmd: _run(c)}, reps
            )
        process_med = {
            f"{k}_{label}": statistics.median(v) for label, r in runs.items() for k, v in r.items()
        }
        row["process_s"] = process_med
        row["process_fixed_s"] = process_med["scan_1"] - process_med["plain_1"]
        row["process_ratio"] = process_med["scan_n"] / process_med["plain_n"]
        row["times_s"] |= {f"process_{k}_{label}": v for label, r in runs.items() for k, v in r.items()}
    return row


def _run(command: list[str]) -> None:
    """A whole process; exit 1 (the scan's gate found dead units) is a finished run too."""
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"{command} failed ({done.returncode}): {done.stderr[-2000:]}")


PLAIN_ONNX_SCRIPT = """
import sys
import numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
array, batch = np.load(sys.argv[2], mmap_mode="r"), int(sys.argv[3])
for i in range(0, len(array), batch):
    session.run(None, {"input": np.array(array[i : i + batch])})
"""

PLAIN_TORCH_SCRIPT = """
import sys
import numpy as np, torch
sys.path.insert(0, sys.argv[4])
from bench import {factory} as build
net = build()
net.load_state_dict(torch.load(sys.argv[1], weights_only=True))
array, batch = np.load(sys.argv[2], mmap_mode="r"), int(sys.argv[3])
with torch.inference_mode():
    for i in range(0, len(array), batch):
        net(torch.from_numpy(np.array(array[i : i + batch])))
"""


def process_commands(kind: str, model: Path, batch: int, workdir: Path, factory: str | None = None):
    """path -> (plain script command, `deadrelu scan` command), both as fresh processes."""
    script = workdir / f"plain_{kind}_{factory or 'onnx'}.py"
    text = PLAIN_ONNX_SCRIPT if kind == "onnx" else PLAIN_TORCH_SCRIPT.format(factory=factory)
    script.write_text(text)
    scripts_dir = str(Path(__file__).resolve().parent)

    def commands(path: Path):
        plain = [sys.executable, str(script), str(model), str(path), str(batch), scripts_dir]
        scan = [
            sys.executable,
            "-m",
            "deadrelu_cli",
            "scan",
            str(model),
            "--data",
            str(path),
            "-b",
            str(batch),
            "-q",
        ]
        if factory:
            scan += ["--arch", f"{__file__}:{factory}"]
        return plain, scan

    return commands


def build_small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 5, 4, 2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(256, 10),
        nn.ReLU(),
    )


def measure_memory(workdir: Path, quick: bool) -> dict:
    """Peak RSS of `deadrelu scan` on N and 10N images (.npy, 112x112), median of 3 processes each: flat
    when nothing grows with the data."""
    torch.save(build_small_cnn().state_dict(), workdir / "small.pt")
    n = 64 if quick else 512
    peaks = []
    for samples in (n, 10 * n):
        path = workdir / f"memory-{samples}.npy"
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(samples, 3, 112, 112))
        for i in range(0, samples, n):
            array[i : i + n] = np.random.default_rng(i).standard_normal((n, 3, 112, 112), dtype=np.float32)
        array.flush()
        del array
        command = [
            sys.executable,
            "-m",
            "deadrelu_cli",
            "scan",
            str(workdir / "small.pt"),
            "--data",
            str(path),
        ]
        command += ["--arch", f"{__file__}:build_small_cnn", "-b", "32"]
        peaks.append(statistics.median(peak_rss_kib(command) for _ in range(3)))  # allocator noise: ~±5 MiB
        path.unlink()
    return {
        "case": "peak RSS, 10x data",
        "device": "cpu",
        "samples": [n, 10 * n],
        "data_mib": [round(s * 3 * 112 * 112 * 4 / 2**20, 1) for s in (n, 10 * n)],
        "peak_rss_mib": [round(p / 1024, 1) for p in peaks],
        "growth": peaks[1] / peaks[0] - 1,
    }


def build_relu_transformer(folder: Path, hidden: int, ffn: int, layers: int, vocab: int = 2000) -> Path:
    """An OPT-style decoder (ReLU FFN) from a config, saved with save_pretrained (sharded safetensors)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.OPTConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        ffn_dim=ffn,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        word_embed_proj_dim=hidden,
        max_position_embeddings=512,
        activation_function="relu",
        pad_token_id=1,
    )
    transformers.OPTForCausalLM(config).eval().save_pretrained(folder, max_shard_size="100MB")
    return folder


def plain_transformer_pass(folder: Path, path: Path, batch: int) -> None:
    """Plain inference, the transformer cases' reference: from_pretrained + every batch of the .npz."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    with np.load(path) as data:
        ids, mask = data["input_ids"], data["attention_mask"]
    with torch.inference_mode():
        for i in range(0, len(ids), batch):
            model(
                input_ids=torch.from_numpy(ids[i : i + batch]),
                attention_mask=torch.from_numpy(mask[i : i + batch]),
                use_cache=False,
            )


def token_batches(rng, samples: int, tokens: int, vocab: int = 2000) -> dict[str, np.ndarray]:
    """input_ids with right padding (a quarter of the positions on average) and their attention_mask."""
    lengths = rng.integers(tokens // 2, tokens + 1, samples)
    mask = (np.arange(tokens)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(2, vocab, (samples, tokens)), 1).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask}


def measure_transformer(rng, reps: int, workdir: Path, quick: bool, batch: int) -> dict:
    """A ReLU transformer folder: `deadrelu scan FOLDER --data tokens.npz` (attention_mask applied) against
    from_pretrained + the same batches through the model, at N and 3N sequences."""

    # OPT-125m's widths (768 -> 3072), 2 layers: the FFN and the counting at the size they have in practice
    folder = build_relu_transformer(workdir / "opt-relu", 768, 3072, 2)
    n = 8 if quick else 32
    paths = {}
    for label, samples in (("n", n), ("3n", 3 * n)):
        paths[label] = workdir / f"tokens-{label}.npz"
        np.savez(paths[label], **token_batches(rng, samples, 128))

    def pair(path: Path):
        def plain():
            plain_transformer_pass(folder, path, batch)

        def scan():
            run_scan(ScanOptions(model=str(folder), data=str(path), batch_size=batch, device="cpu"))

        return plain, scan

    at_n = _interleaved(dict(zip(("plain", "scan"), pair(paths["n"]), strict=True)), reps)
    at_3n = _interleaved(dict(zip(("plain", "scan"), pair(paths["3n"]), strict=True)), reps)
    plain_n, scan_n = (statistics.median(at_n[k]) for k in ("plain", "scan"))
    plain_3n, scan_3n = (statistics.median(at_3n[k]) for k in ("plain", "scan"))
    plain_all, scan_all = at_3n["plain"], at_3n["scan"]
    return {
        "case": "relu transformer, masked",
        "device": "cpu",
        "samples": 3 * n,
        "batch": batch,
        "plain_s": plain_3n,
        "scan_s": scan_3n,
        "ratio": scan_3n / plain_3n,
        "paired_ratio": statistics.median(s / p for s, p in zip(scan_all, plain_all, strict=True)),
        "marginal_ratio": (scan_3n - scan_n) / (plain_3n - plain_n),
        "plain_per_s": 3 * n / plain_3n,
        "scan_per_s": 3 * n / scan_3n,
    }


def measure_folder_memory(workdir: Path, quick: bool) -> dict:
    """Peak RSS of `deadrelu scan FOLDER` against the weights' size on disk, and against a process that
    only imports torch + transformers (the interpreter's own share), median of 3 processes each."""
    hidden, ffn, layers = (256, 1024, 4) if quick else (1024, 4096, 8)
    folder = build_relu_transformer(workdir / "opt-memory", hidden, ffn, layers)
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    data = workdir / "tokens-memory.npz"
    np.savez(data, **token_batches(np.random.default_rng(1), 8, 64))
    scan = [sys.executable, "-m", "deadrelu_cli", "scan", str(folder), "--data", str(data), "-b", "8"]
    imports = [
        sys.executable,
        "-c",
        "import torch, transformers, deadrelu_cli.engine; transformers.OPTForCausalLM",
    ]
    scan_peak = statistics.median(peak_rss_kib(scan) for _ in range(3)) * 1024
    base_peak = statistics.median(peak_rss_kib(imports) for _ in range(3)) * 1024
    return {
        "case": "peak RSS, model folder",
        "device": "cpu",
        "weights_mib": round(weights / 2**20, 1),
        "peak_rss_mib": round(scan_peak / 2**20, 1),
        "imports_rss_mib": round(base_peak / 2**20, 1),
        "rss_over_weights": (scan_peak - base_peak) / weights,
    }


def llm_sized_report(layers: int = 32, units: int = 11008, positions: int = 200_000):
    """A synthetic report of LLaMA-7B's shape: log-uniform firing frequencies, more dead units deeper."""
    from deadrelu_cli.report.model import DataInfo, ModelInfo, Report, Settings
    from deadrelu_cli.stats import LayerStats

    rng = np.random.default_rng(0)
    stats = []
    for i in range(layers):
        counts = (10 ** rng.uniform(-6.5, 0, units) * positions).astype(np.int64)
        counts[rng.random(units) < 0.1 * i / layers] = 0
        stats.append(
            LayerStats(
                f"model.layers.{i}.mlp.act_fn",
                "relu",
                2,
                counts,
                positions,
                rng.standard_normal(units),
                counts * 0.5,
            )
        )
    return Report(ModelInfo("m", "hf_folder", "0" * 64), DataInfo("d", 10), Settings(dying=0.001), stats)


def measure_html(reps: int) -> dict:
    """`render_html` of a 32-layer, 11,008-unit report in this process (after one small render for the
    imports and matplotlib's font cache): the fastest of REPS, and the page's size."""
    from deadrelu_cli.report.html import render_html

    render_html(llm_sized_report(4, 100))
    report = llm_sized_report()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        text = render_html(report)
        times.append(time.perf_counter() - started)
    return {
        "case": "html 32 x 11008",
        "render_s": min(times),
        "render_all_s": times,
        "mb": len(text.encode()) / 1e6,
    }


def cuda_cases(rng, reps: int, workdir: Path, images: int = 512) -> dict:
    """ResNet-18 at 224x224, batch 128: eager, --compile (against plain eager and plain compiled),
    bf16 + channels_last on both sides."""
    big = rng.standard_normal((images, 3, 224, 224), dtype=np.float32)

    def case(label: str, **kwargs):
        return lambda: measure(
            label,
            "cuda",
            lambda p: torch_pair("resnet18", "build_resnet18", p, 128, workdir, "cuda", **kwargs),
            big,
            128,
            reps,
            workdir,
        )

    return {
        "cuda-eager": case("resnet18 eager"),
        "cuda-compile": case("resnet18 --compile vs eager", compile=True),
        "cuda-compile-vs-compiled": case("resnet18 --compile vs compiled", compile=True, plain_compiled=True),
        "cuda-bf16": case("resnet18 bf16 channels_last", dtype="bf16", channels_last=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small inputs, for a smoke run")
    parser.add_argument("--out", type=Path, default=Path("bench.json"))
    parser.add_argument(
        "--batch",
        type=int,
        default=64,
        help="images per batch (default 64, the scan's default); sequences: half",
    )
    parser.add_argument(
        "--images", type=int, default=256, help="N: the dataset sizes are N and 3N (default 256)"
    )
    parser.add_argument(
        "--only",
        help="comma-separated cases: eager,onnx,compile,mlp,memory,transformer,folder-memory,watch,html (+ cuda-* on a GPU)",
    )
    parser.add_argument("--cuda-images", type=int, default=512, help="N for the cuda-* cases (224x224)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    side, n_img = (64, 32) if args.quick else (112, args.images)
    images = rng.standard_normal((n_img, 3, side, side)).astype(np.float32)
    tokens = rng.standard_normal((16 if args.quick else args.images // 2, 64, 512)).astype(np.float32)
    batch = min(args.batch, n_img)  # images per batch, both sides
    token_batch = max(1, batch // 2)  # sequences of 64 tokens per batch
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
        cases = {
            "eager": lambda: measure(
                "resnet18 eager",
                "cpu",
                lambda p: torch_pair("resnet18", "build_resnet18", p, batch, work),
                images,
                batch,
                args.reps,
                work,
                process_commands("torch", work / "resnet18.pt", batch, work, "build_resnet18"),
            ),
            "onnx": lambda: measure(
                "resnet18 onnx",
                "cpu (onnxruntime)",
                lambda p: onnx_pair("resnet18", p, batch, work),
                images,
                batch,
                args.reps,
                work,
                process_commands("onnx", work / "resnet18.onnx", batch, work),
            ),
            # counting fused by torch.compile: the first run compiles, the marginal ratio is the steady state
            "compile": lambda: measure(
                "resnet18 --compile",
                "cpu",
                lambda p: torch_pair("resnet18", "build_resnet18", p, batch, work, compile=True),
                images,
                batch,
                args.reps,
                work,
            ),
            "compile-vs-compiled": lambda: measure(
                "resnet18 --compile vs compiled",
                "cpu",
                lambda p: torch_pair(
                    "resnet18", "build_resnet18", p, batch, work, compile=True, plain_compiled=True
                ),
                images,
                batch,
                args.reps,
                work,
            ),
            "mlp": lambda: measure(
                "mlp block [B,T,F]",
                "cpu",
                lambda p: torch_pair("mlp", "build_mlp_block", p, token_batch, work),
                tokens,
                token_batch,
                args.reps,
                work,
                process_commands("torch", work / "mlp.pt", token_batch, work, "build_mlp_block"),
            ),
            "memory": lambda: measure_memory(work, args.quick),
            "transformer": lambda: measure_transformer(rng, args.reps, work, args.quick, token_batch),
            "folder-memory": lambda: measure_folder_memory(work, args.quick),
            "watch": lambda: {"watch": measure_watch()},  # prints its own table
            "html": lambda: measure_html(args.reps),
        }
        if torch.cuda.is_available():
            cases.update(cuda_cases(rng, args.reps, work, args.cuda_images))
        slow = ("compile", "compile-vs-compiled")  # ~10 s of compiling per run on CPU
        wanted = args.only.split(",") if args.only else [c for c in cases if not (args.quick and c in slow)]
        unknown = [c for c in wanted if c not in cases]
        if unknown:
            parser.error(f"--only: unknown case(s) {', '.join(unknown)}; choose from {', '.join(cases)}")
        for case in wanted:
            rows.append(cases[case]())
            args.out.write_text(json.dumps({"reps": args.reps, "rows": rows}, indent=2) + "\n")  # so far
    machine = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    print(
        f"{'case':<32} {'device':<18} {'samples':>7} {'plain/s':>8} {'scan/s':>8} {'scan/plain':>10} {'paired':>7} "
        f"{'marginal':>8} {'peer/plain':>10} {'scan/peer':>9} {'marg/peer':>9} {'fixed s':>8} {'process':>8}"
    )

    def cell(row, key, fmt, width):
        return f"{row[key]:{width}{fmt}}" if row.get(key) is not None else f"{'-':>{width}}"

    for row in rows:
        if "growth" in row or "rss_over_weights" in row or "watch" in row or "render_s" in row:
            continue
        print(
            f"{row['case']:<32} {row['device']:<18} {row['samples']:>7} {row['plain_per_s']:>8.1f} {row['scan_per_s']:>8.1f} "
            f"{row['ratio']:>10.3f} {row['paired_ratio']:>7.3f} {row['marginal_ratio']:>8.3f} "
            f"{cell(row, 'peer_marginal_ratio', '.3f', 10)} {cell(row, 'scan_over_peer', '.3f', 9)} "
            f"{cell(row, 'marginal_over_peer', '.3f', 9)} {cell(row, 'process_fixed_s', '.2f', 8)} "
            f"{cell(row, 'process_ratio', '.3f', 8)}"
        )
    for row in rows:
        if "growth" in row:
            print(
                f"peak RSS of a scan: {row['peak_rss_mib'][0]} MiB on {row['samples'][0]} images "
                f"({row['data_mib'][0]} MiB of .npy), {row['peak_rss_mib'][1]} MiB on {row['samples'][1]} "
                f"({row['data_mib'][1]} MiB): {row['growth']:+.1%}"
            )
        if "rss_over_weights" in row:
            print(
                f"peak RSS of a model-folder scan: {row['peak_rss_mib']} MiB for {row['weights_mib']} MiB of weights; "
                f"{row['imports_rss_mib']} MiB is torch + transformers imported: "
                f"{row['rss_over_weights']:.2f}x the weights beyond that"
            )
        if "render_s" in row:
            print(
                f"HTML report of 32 layers x 11,008 units: {row['render_s']:.2f} s to render (fastest of "
                f"{len(row['render_all_s'])}), {row['mb']:.2f} MB"
            )
    args.out.write_text(json.dumps({"machine": machine, "reps": args.reps, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
