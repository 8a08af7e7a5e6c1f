"""Data-parallel scans under torchrun: each rank scans a disjoint shard, the raw counts are summed.

    torchrun --nproc_per_node 4 -m deadrelu_cli scan MODEL --data DATA --distributed --json report.json

Shards are contiguous and deterministic (rank r of W takes samples [r*N//W, (r+1)*N//W)), so every
sample is scanned exactly once, uneven tails included. With `--data 'calib-*.npy'` the files are dealt
to ranks in sorted order instead. The per-unit statistics are combined with one all_reduce per
statistic (not per layer), on gloo for CPU tensors and NCCL for CUDA ones, and rank 0 alone prints and
writes. A rank that fails makes every rank fail with its message: no partial report is ever written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from deadrelu_cli.errors import EXIT_INTERNAL, DeadreluError, UserError
from deadrelu_cli.gate import MASK_NOT_APPLIED
from deadrelu_cli.report.fingerprint import SampleSketch, union_sketch
from deadrelu_cli.stats import LayerStats


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(device: str) -> World:
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise UserError(
            "--distributed needs torchrun (or RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set): "
            "torchrun --nproc_per_node N -m deadrelu_cli scan … --distributed"
        )
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    if backend == "nccl":
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return World(dist.get_rank(), dist.get_world_size(), backend)


def shard_range(total: int, rank: int, world: int) -> tuple[int, int]:
    return rank * total // world, (rank + 1) * total // world


def check_all_ranks(world: World, error: BaseException | None) -> None:
    """Every rank calls this after its local scan; if any rank failed, all raise with that rank's message."""
    import torch.distributed as dist

    mine = None
    if error is not None:  # the failed rank's exit code travels with its message: 2 input, 3 internal
        code = error.exit_code if isinstance(error, DeadreluError) else EXIT_INTERNAL
        mine = (code, f"{type(error).__name__}: {error}")
    messages: list = [None] * world.size
    dist.all_gather_object(messages, mine)
    failed = [(rank, found) for rank, found in enumerate(messages) if found is not None]
    if failed:
        rank, (code, message) = failed[0]
        raise RankFailed(f"rank {rank} of {world.size} failed, no report written: {message}", code)


class RankFailed(DeadreluError):
    """A rank failed: every rank exits with that rank's exit code (2 for bad input, 3 for a crash)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _structure(layers: list[LayerStats]) -> list[tuple]:
    return [
        (
            layer.name,
            layer.op,
            layer.units,
            layer.channel_dim,
            layer.module_type,
            layer.producer,
            layer.saturated_counts is not None,
        )
        for layer in layers
        if layer.ran
    ]


def reduce_layers(
    world: World, layers: list[LayerStats], samples: int, device: str, layer_samples: bool = False
) -> tuple[list[LayerStats], int]:
    """Sum the raw counts of every rank (one all_reduce per statistic); returns the layers of the union.
    `layer_samples`: each layer's `samples` (None: 0) is summed too."""
    import torch
    import torch.distributed as dist

    structures: list = [None] * world.size
    # each rank's word on how its position mask applied per layer: a rank that counted every position
    # (padding included: a square batch it could not read, a Scan body) makes the merged layer say so on
    # every rank, so that the counts are read as they were made and every rank gates alike
    marks = {layer.name: layer.extra.get("position_mask") for layer in layers if layer.ran}
    dist.all_gather_object(structures, (_structure(layers), [layer.name for layer in layers], marks))
    union: dict[str, tuple] = {}
    order: list[str] = []
    unapplied: dict[str, str] = {}
    for structure, names, rank_marks in structures:  # layers in the order of the first rank that ran them
        for entry in structure:
            union.setdefault(entry[0], entry)
        for name, mark in rank_marks.items():
            if mark in MASK_NOT_APPLIED:
                unapplied.setdefault(name, mark)
        for name in names:
            if name not in order:
                order.append(name)
    for name in union:
        if name not in order:
            order.append(name)
    local = {layer.name: layer for layer in layers if layer.ran}
    tensor_device = device if world.backend == "nccl" else "cpu"
    widths = [union[name][2] if name in union else 0 for name in order]

    def flat(getter, fill, dtype):
        parts = []
        for name, width in zip(order, widths, strict=True):
            layer = local.get(name)
            parts.append(getter(layer) if layer is not None else np.full(width, fill))
        array = np.concatenate(parts) if parts else np.zeros(0)
        return torch.from_numpy(np.ascontiguousarray(array).astype(dtype)).to(tensor_device)

    positive = flat(lambda lay: lay.positive_counts, 0, np.int64)
    maximum = flat(lambda lay: lay.max_preactivation, -np.inf, np.float64)
    sum_abs = flat(lambda lay: lay.sum_abs, 0.0, np.float64)
    saturated = flat(
        lambda lay: lay.saturated_counts if lay.saturated_counts is not None else np.zeros(lay.units),
        0,
        np.int64,
    )
    elements = torch.tensor(
        [local[name].elements_per_unit if name in local else 0 for name in order]
        + ([(local[name].samples or 0) if name in local else 0 for name in order] if layer_samples else [])
        + [local[name].nonfinite if name in local else 0 for name in order]  # --allow-nonfinite
        + [samples],
        dtype=torch.int64,
        device=tensor_device,
    )
    for tensor, op in (
        (positive, dist.ReduceOp.SUM),
        (maximum, dist.ReduceOp.MAX),
        (sum_abs, dist.ReduceOp.SUM),
        (saturated, dist.ReduceOp.SUM),
        (elements, dist.ReduceOp.SUM),
    ):
        dist.all_reduce(tensor, op=op)
    positive, maximum, sum_abs, saturated, elements = (
        t.cpu().numpy() for t in (positive, maximum, sum_abs, saturated, elements)
    )
    merged = []
    offset = 0
    biases = {layer.name: layer.bias for layer in layers}
    for index, (name, width) in enumerate(zip(order, widths, strict=True)):
        span = slice(offset, offset + width)
        offset += width
        entry = union.get(name)
        if entry is None:  # no rank ran this site: keep it as "not run"
            merged.append(LayerStats(name, "relu", -1, np.zeros(0, np.int64), 0, np.zeros(0), np.zeros(0)))
            continue
        _, op, _, channel_dim, module_type, producer, has_saturation = entry
        extra = dict(local[name].extra) if name in local else {}  # e.g. how the position mask applied
        if name in unapplied:
            extra["position_mask"] = unapplied[name]
        merged.append(
            LayerStats(
                name=name,
                op=op,
                channel_dim=channel_dim,
                positive_counts=positive[span].astype(np.int64),
                elements_per_unit=int(elements[index]),
                max_preactivation=maximum[span],
                sum_abs=sum_abs[span],
                saturated_counts=saturated[span].astype(np.int64) if has_saturation else None,
                module_type=module_type,
                producer=producer,
                bias=biases.get(name),
                extra=extra,
                samples=int(elements[len(order) + index]) if layer_samples else None,
                nonfinite=int(elements[(2 if layer_samples else 1) * len(order) + index]),
            )
        )
    return merged, int(elements[-1])


def reduce_sketch(world: World, sketch: SampleSketch) -> SampleSketch:
    """The data fingerprint of every rank's samples (report.fingerprint): each rank's sketch gathered
    (at most 512 digests each) and joined, as merge joins reports'."""
    import torch.distributed as dist

    sketches: list = [None] * world.size
    dist.all_gather_object(sketches, (sketch.digests.tolist(), sketch.complete))
    return union_sketch(
        [
            SampleSketch(np.array(digests, dtype=np.uint64), complete, method=sketch.method)
            for digests, complete in sketches
        ]
    )


# set once this process has torn its process group down: the command-line entry point then leaves
# without running C++ static destructors, where a gloo thread still joinable could abort the process
# ("terminate called without an active exception", seen under heavy load) after the work was done
WORLD_CLOSED = False


def finish(world: World) -> None:
    global WORLD_CLOSED
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        WORLD_CLOSED = True
