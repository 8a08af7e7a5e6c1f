#!/usr/bin/env python
"""What the position mask costs an ONNX scan: an OPT-style ReLU transformer (random weights, 4 layers,
256 -> 1024 FFNs) exported with torch.onnx, right-padded token data (about a quarter padding). Times
plain onnxruntime, the scan with the data's attention_mask and the scan with --mask none, by process
CPU time, each the median of --reps runs, one intra-op thread (ORT_INTRA_OP threads: 1).

    python scripts/onnx_mask_cost.py --reps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import onnxruntime as ort
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.OPTConfig(
        vocab_size=1000, hidden_size=256, ffn_dim=1024, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=args.tokens + 2, word_embed_proj_dim=256, activation_function="relu",
        dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    model = transformers.OPTModel(config).eval()

    class Hidden(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]

    rng = np.random.default_rng(0)
    ids = rng.integers(3, 1000, (args.samples, args.tokens)).astype(np.int64)
    mask = np.ones_like(ids)
    for i in range(args.samples):
        n = int(rng.integers(args.tokens // 2, args.tokens + 1))
        mask[i, n:], ids[i, n:] = 0, 1
    folder = Path(tempfile.mkdtemp())
    axes = {0: "batch", 1: "tokens"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Hidden(model), (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2])), str(folder / "opt.onnx"),
            input_names=["input_ids", "attention_mask"], dynamic_axes={"input_ids": axes, "attention_mask": axes},
            opset_version=17, dynamo=False,
        )  # fmt: skip
    np.savez(folder / "tokens.npz", input_ids=ids, attention_mask=mask)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from deadrelu_cli import scan

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(folder / "opt.onnx"), options, providers=["CPUExecutionProvider"])

    def plain() -> None:
        for start in range(0, args.samples, 32):
            session.run(
                None, {"input_ids": ids[start : start + 32], "attention_mask": mask[start : start + 32]}
            )

    def timed(run) -> float:
        times = []
        for _ in range(args.reps):
            started = time.process_time()
            run()
            times.append(time.process_time() - started)
        return statistics.median(times)

    base = timed(plain)
    masked = timed(
        lambda: scan(str(folder / "opt.onnx"), str(folder / "tokens.npz"), batch_size=32, device="cpu")
    )
    unmasked = timed(
        lambda: scan(
            str(folder / "opt.onnx"), str(folder / "tokens.npz"), batch_size=32, device="cpu", mask="none"
        )
    )
    print(f"kept positions: {mask.mean():.2f}; load average {os.getloadavg()[0]:.1f}")
    print(
        f"plain {base:.2f} s; scan masked {masked:.2f} s ({masked / base:.2f}x); --mask none {unmasked:.2f} s ({unmasked / base:.2f}x)"
    )


if __name__ == "__main__":
    main()
