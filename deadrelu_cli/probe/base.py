"""What every torch probe shares: the ordered set of site accumulators and the probe settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from deadrelu_cli.probe.accumulator import SiteAccumulator, resolve_channel_dim
from deadrelu_cli.stats import LayerStats


@dataclass(frozen=True)
class ProbeSettings:
    threshold: float = 0.0
    channel_dim: int | None = None
    ops: tuple[str, ...] = ("relu", "relu6")


class SiteRegistry:
    """Accumulators keyed by site name, in the order the sites first ran."""

    def __init__(self, settings: ProbeSettings) -> None:
        self.settings = settings
        self.sites: dict[str, SiteAccumulator] = {}
        # site name -> callback(pre-activation): for fixes that need the values of a few units
        self.collectors: dict[str, Callable[[torch.Tensor, int], None]] = {}

    def record(
        self,
        name: str,
        op: str,
        pre: torch.Tensor,
        post: torch.Tensor | None,
        inferred_channel_dim: int,
        module_type: str | None = None,
        producer: str | None = None,
    ) -> None:
        site = self.sites.get(name)
        if site is None:
            site = SiteAccumulator(name=name, op=op, channel_dim=-1, module_type=module_type, producer=producer)
            self.sites[name] = site
        if site.positive is None:
            site.channel_dim = resolve_channel_dim(pre.dim(), inferred_channel_dim, self.settings.channel_dim)
        site.update(pre, post, self.settings.threshold)
        collector = self.collectors.get(name)
        if collector is not None:
            collector(pre, site.channel_dim)

    def declare(self, name: str, op: str, module_type: str | None, producer: str | None) -> None:
        """Make a site known before it runs, so that a site no sample reaches is reported as not run."""
        if name not in self.sites:
            self.sites[name] = SiteAccumulator(
                name=name, op=op, channel_dim=-1, module_type=module_type, producer=producer
            )

    def layer_stats(self) -> list[LayerStats]:
        out = []
        for site in self.sites.values():
            if site.positive is None:  # declared, never ran
                out.append(
                    LayerStats(
                        name=site.name,
                        op=site.op,
                        channel_dim=site.channel_dim,
                        positive_counts=np.zeros(0, dtype=np.int64),
                        elements_per_unit=0,
                        max_preactivation=np.zeros(0),
                        sum_abs=np.zeros(0),
                        module_type=site.module_type,
                        producer=site.producer,
                    )
                )
            else:
                out.append(site.to_layer_stats())
        return out


def infer_channel_dim(rank: int, producer_is_channel_first: bool | None) -> int:
    """Unit axis: dim 1 for conv-like [N, C, …] outputs, the last dim for [N, F] and [B, T, F]."""
    if rank >= 4:
        return 1
    if rank == 3:
        return 1 if producer_is_channel_first else -1
    return -1


def call_and_record(func, args: tuple, kwargs: dict, op: str, in_place: bool, record) -> object:
    """Run an activation and hand (pre-activation, output) to `record`, right even when in place.

    An in-place op overwrites its input: relu/relu6 are counted from the input before the call
    (their output is derived), other ops keep a copy of the input.
    """
    pre = args[0]
    if in_place:
        if op in ("relu", "relu6"):
            record(pre, None)
            return func(*args, **kwargs)
        pre = pre.clone()
    out = func(*args, **kwargs)
    record(pre, out)
    return out
