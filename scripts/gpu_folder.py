"""Issue 20 on a GPU: one ReLU transformer folder scanned on the CPU, on CUDA in fp32 and bf16, with
`--device-map auto`, and split between the GPU and the CPU by `--max-memory`; dead sets and counts
compared with the CPU fp32 scan, wall time per command. Builds its own folder (random weights, planted
dead FFN units, padded token batches); needs transformers and accelerate.

    python scripts/gpu_folder.py [--out DIR] [--small]      (--small: a quick dry run on a CPU-only box)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PLANTED = {0: [1, 5, 9], 3: [0, 2]}  # layer -> FFN units given a -1e4 bias (dead on every input)


def build(folder: Path, small: bool) -> tuple[int, int]:
    import transformers

    hidden, ffn, layers, vocab = (64, 256, 4, 512) if small else (1024, 4096, 8, 8192)
    torch.manual_seed(0)
    config = transformers.OPTConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        ffn_dim=ffn,
        num_hidden_layers=layers,
        num_attention_heads=8,
        max_position_embeddings=512,
        word_embed_proj_dim=hidden,
        activation_function="relu",
        pad_token_id=1,
        dropout=0.0,
        attention_dropout=0.0,
    )
    model = transformers.OPTForCausalLM(config).eval()
    with torch.no_grad():
        for layer, units in PLANTED.items():
            model.model.decoder.layers[layer].fc1.bias[units] = -1e4
    model.save_pretrained(folder, max_shard_size="100MB")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights, layers


def tokens(path: Path, small: bool) -> None:
    samples, length = (16, 32) if small else (128, 128)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 500, (samples, length)).astype(np.int64)
    mask = np.zeros((samples, length), dtype=np.int64)
    for i in range(samples):
        mask[i, : int(rng.integers(length // 4, length + 1))] = 1
    ids[mask == 0] = 1
    np.savez(path, input_ids=ids, attention_mask=mask)


def scan(name: str, folder: Path, data: Path, out: Path, extra: list[str], timeout: int) -> dict | None:
    report = out / f"folder-{name}.json"
    command = [sys.executable, "-m", "deadrelu_cli", "scan", str(folder), "--data", str(data)]
    command += ["--json", str(report), "--quiet", *extra]
    start = time.perf_counter()
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        print(f"{name:<22} timed out after {timeout} s", flush=True)
        return None
    wall = time.perf_counter() - start
    if run.returncode not in (0, 1):
        print(f"{name:<22} exit {run.returncode}: {run.stderr.strip()[-400:]}", flush=True)
        return None
    layers = {layer["name"]: layer for layer in json.loads(report.read_text())["layers"]}
    return {"wall": wall, "layers": layers}


def compare(name: str, got: dict | None, ref: dict) -> None:
    if got is None:
        return
    same_names = set(got["layers"]) == set(ref["layers"])
    dead_diff, worst = 0, 0.0
    for layer, r in ref["layers"].items():
        g = got["layers"].get(layer)
        if g is None:
            continue
        dead_diff += len(set(g["dead_indices"]) ^ set(r["dead_indices"]))
        a, b = np.array(g["positive_counts"]), np.array(r["positive_counts"])
        if g["elements_per_unit"] != r["elements_per_unit"]:
            dead_diff += 10**6  # a different number of counted positions is a failure, not rounding
        worst = max(worst, float(np.abs(a - b).max()) / max(1, r["elements_per_unit"]))
    planted = all(
        set(units) <= set(got["layers"][f"model.decoder.layers.{layer}.activation_fn"]["dead_indices"])
        for layer, units in PLANTED.items()
    )
    print(
        f"{name:<22} {got['wall']:7.1f} s  same layers {same_names}  planted dead found {planted}  "
        f"dead/alive differences vs cpu {dead_diff}  largest count difference {worst:.2%} of positions",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/gpu-folder")
    work.mkdir(exist_ok=True)
    folder, data = work / "opt-relu", work / "tokens.npz"
    start = time.perf_counter()
    weights, layers = build(folder, args.small)
    tokens(data, args.small)
    print(
        f"folder: {layers} layers, {weights / 2**20:.0f} MiB fp32, built in {time.perf_counter() - start:.1f} s"
    )
    ref = scan("cpu fp32", folder, data, out, ["--device", "cpu"], 300)
    if ref is None:
        return
    compare("cpu fp32", ref, ref)
    cuda = torch.cuda.is_available()
    gpu_share = max(1, weights // 2 // 2**20)  # half the weights on the GPU, the rest on the CPU
    runs = [
        ("cuda fp32", ["--device", "cuda"]),
        ("cuda bf16", ["--device", "cuda", "--dtype", "bf16"]),
        ("device-map auto", ["--device-map", "auto"]),
        ("device-map gpu+cpu", ["--device-map", "auto", "--max-memory", f"0={gpu_share}MiB,cpu=64GiB"]),
    ]
    if not cuda:  # a dry run: the accelerate paths on the CPU alone (the rest offloaded to disk)
        runs = [("device-map cpu+disk", ["--device-map", "auto", "--max-memory", f"cpu={gpu_share}MiB"])]
    for name, extra in runs:
        compare(name, scan(name.replace(" ", "-").replace("+", "-"), folder, data, out, extra, 240), ref)


if __name__ == "__main__":
    main()
