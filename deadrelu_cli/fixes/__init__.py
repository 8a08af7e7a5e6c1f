"""`deadrelu fix`: leaky, elu, reinit (ReDo), bias-shift, prune and kick, verified on data before writing.

`patch_module` applies the leaky/elu patch to a live nn.Module (torch is imported on use).
"""

from __future__ import annotations


def patch_module(module, layers, strategy: str = "leaky", slope: float = 0.01):
    from deadrelu_cli.backends.torch.strategies import patch_module as _patch

    return _patch(module, list(layers), strategy, slope)


__all__ = ["patch_module"]
