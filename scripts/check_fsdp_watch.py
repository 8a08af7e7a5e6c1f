"""watch() on FSDP1 (FullyShardedDataParallel, flat and auto-wrapped) and FSDP2 (fully_shard) models,
2 CPU processes over gloo: each window's counts must equal the union of both ranks' own forward hooks,
layer names must be the unwrapped model's, biases the full (unsharded) ones.

    PYTHONPATH=$PWD python scripts/check_fsdp_watch.py      # exit 0: all match; 1: a mismatch (printed)

Too slow for the suite on a loaded 2-core machine (two torch imports, 5-15 s); tests/test_train36.py
checks the same in a world of one process.
"""

from __future__ import annotations

import sys
import tempfile
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

KINDS = ("fsdp1", "fsdp1-nested", "fsdp2")


def build() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16), nn.ReLU()), nn.Linear(16, 1)
    )
    with torch.no_grad():
        model[0].bias[:3] = -100.0  # planted dead on every rank
    return model


def run(rank: int, world: int, init: str, failures) -> None:
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from deadrelu_cli import watch

    for kind in KINDS:
        model = build()
        counts: dict[str, list] = {"1": [], "2.1": []}
        for name, module in (("1", model[1]), ("2.1", model[2][1])):
            module.register_forward_hook(
                lambda m, a, o, name=name, counts=counts: counts[name].append(
                    ((a[0] > 0).sum(0), a[0].shape[0])
                )
            )
        if kind == "fsdp2":
            fully_shard(model[2])
            wrapped = fully_shard(model)
        else:
            policy = ModuleWrapPolicy({nn.Sequential}) if kind == "fsdp1-nested" else None
            wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"), auto_wrap_policy=policy)
        optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.01)
        with watch(wrapped, every=2, config=False) as w:
            for step in range(3):  # windows: step 0, and step 2 (closed by close(), after its update)
                w.step()
                x = torch.randn(4 + rank, 8, generator=torch.Generator().manual_seed(10 * step + rank))
                loss = wrapped(x).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        for window, report in enumerate(w.reports):  # steps 0 and 2: hook entries 0 and 2
            for name in ("1", "2.1"):
                positive, rows = counts[name][2 * window]
                both = [None, None]
                dist.all_gather_object(both, (positive.numpy(), rows))
                layer = report.layer(name)
                expected = sum(p for p, _ in both)
                if not (
                    np.array_equal(layer.positive_counts, expected)
                    and layer.elements_per_unit == sum(r for _, r in both)
                ):
                    failures.append(f"{kind} rank {rank} window {window} layer {name}: counts differ")
        # the last window closed after the last update: its biases are the full ones of now
        if kind == "fsdp2":
            now = {"1": model[0].bias.full_tensor(), "2.1": model[2][0].bias.full_tensor()}
        else:
            with FullyShardedDataParallel.summon_full_params(wrapped):
                now = {"1": model[0].bias.detach().clone(), "2.1": model[2][0].bias.detach().clone()}
        for name, bias in now.items():
            if not np.array_equal(w.reports[-1].layer(name).bias, bias.detach().double().numpy()):
                failures.append(f"{kind} rank {rank} layer {name}: bias is not the full one")
            if sorted(layer.name for layer in report.layers) != ["1", "2.1"]:
                failures.append(f"{kind}: names {[layer.name for layer in report.layers]}")
        if rank == 0:
            print(
                kind,
                "ok" if not failures else "MISMATCH",
                [(lay.name, lay.elements_per_unit) for lay in w.reports[0].layers],
            )
    dist.destroy_process_group()


def main() -> int:
    with mp.Manager() as manager:
        failures = manager.list()
        init = f"file://{tempfile.mkdtemp()}/store"
        mp.spawn(run, args=(2, init, failures), nprocs=2)
        for failure in failures:
            print(failure)
        return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
