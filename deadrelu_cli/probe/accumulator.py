"""On-device per-unit counters for torch probes: O(units) memory, no host sync per batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from deadrelu_cli.errors import UserError
from deadrelu_cli.stats import CAPPED_OPS, LayerStats


def resolve_channel_dim(rank: int, inferred: int, override: int | None) -> int:
    """The unit axis of an activation of this rank: the user's override, else what the probe inferred."""
    dim = inferred if override is None else override
    if rank == 0:
        raise UserError("an activation site produced a scalar; it has no units to count")
    if rank == 1:
        return 0
    if not -rank <= dim < rank:
        raise UserError(f"--channel-dim {dim} is out of range for an activation of rank {rank}")
    return dim % rank


@dataclass
class SiteAccumulator:
    """Counters for one call site, living on the activation's device."""

    name: str
    op: str
    channel_dim: int
    module_type: str | None = None
    producer: str | None = None
    positive: torch.Tensor | None = None
    max_pre: torch.Tensor | None = None
    sum_abs: torch.Tensor | None = None
    saturated: torch.Tensor | None = None
    elements_per_unit: int = 0
    extra: dict = field(default_factory=dict)

    def update(self, pre: torch.Tensor, post: torch.Tensor | None, threshold: float) -> None:
        """Count one batch. `pre` is the pre-activation; `post` the output, or None to derive it from `pre`."""
        pre = pre.detach()
        rank = pre.dim()
        dim = self.channel_dim if rank > 1 else 0
        reduce_dims = [d for d in range(rank) if d != dim]
        units = pre.shape[dim]
        if self.positive is None:
            device = pre.device
            self.positive = torch.zeros(units, dtype=torch.int64, device=device)
            self.max_pre = torch.full((units,), -torch.inf, dtype=torch.float64, device=device)
            self.sum_abs = torch.zeros(units, dtype=torch.float64, device=device)
            if self.op in CAPPED_OPS:
                self.saturated = torch.zeros(units, dtype=torch.int64, device=device)
        elif self.positive.shape[0] != units:
            raise UserError(
                f"layer {self.name} produced {units} units on this batch but {self.positive.shape[0]} before; "
                "pass --channel-dim to pick a fixed unit axis"
            )
        if pre.numel() == 0:
            return
        if post is None:
            post = _apply(self.op, pre)
        if reduce_dims:
            self.positive += (pre > threshold).sum(dim=reduce_dims)
            self.max_pre = torch.maximum(self.max_pre, pre.amax(dim=reduce_dims).to(torch.float64))
            self.sum_abs += post.abs().sum(dim=reduce_dims, dtype=torch.float64)
            if self.saturated is not None:
                self.saturated += (pre >= CAPPED_OPS[self.op]).sum(dim=reduce_dims)
        else:
            self.positive += pre > threshold
            self.max_pre = torch.maximum(self.max_pre, pre.to(torch.float64))
            self.sum_abs += post.abs().to(torch.float64)
            if self.saturated is not None:
                self.saturated += pre >= CAPPED_OPS[self.op]
        self.elements_per_unit += pre.numel() // units

    def to_layer_stats(self) -> LayerStats:
        def host(t: torch.Tensor | None, dtype) -> np.ndarray | None:
            return None if t is None else t.detach().cpu().numpy().astype(dtype)

        return LayerStats(
            name=self.name,
            op=self.op,
            channel_dim=self.channel_dim,
            positive_counts=host(self.positive, np.int64),
            elements_per_unit=self.elements_per_unit,
            max_preactivation=host(self.max_pre, np.float64),
            sum_abs=host(self.sum_abs, np.float64),
            saturated_counts=host(self.saturated, np.int64),
            module_type=self.module_type,
            producer=self.producer,
            extra=dict(self.extra),
        )


def _apply(op: str, pre: torch.Tensor) -> torch.Tensor:
    if op == "relu":
        return pre.clamp(min=0)
    if op == "relu6":
        return pre.clamp(0, 6)
    raise AssertionError(f"no reference activation for op {op}")
