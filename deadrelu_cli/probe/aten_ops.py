"""The ATen op vocabulary of the torch graph readers, one list per idea for the torch backend.

Names are base names as torch.export writes them (`add` for aten.add.Tensor); TorchScript's node kinds
are the same names behind `aten::` (see `aten_base`). Read by probe.exported, probe.torchscript and
wiring.torch. The eager probe sees Python callables instead of ATen ops; its lists in probe.eager name
the same ops in that form.
"""

from __future__ import annotations

# Ops a pre-activation flows through on its way from the Linear/Conv/BN that produced it (the
# bias survives only when the other operands are not tensors).
PASS_THROUGH = frozenset(
    {
        "add",
        "add_",
        "sub",
        "mul",
        "mul_",
        "div",
        "clone",
        "contiguous",
        "dropout",
        "to",
        "_to_copy",
        "getitem",
        "alias",
        "detach",
        "type_as",
        "identity",
        "native_dropout",
    }
)
# Producers whose units lie on axis 1 ([N, C, ...]) ...
CHANNEL_FIRST = frozenset(
    {
        "conv1d",
        "conv2d",
        "conv3d",
        "convolution",
        "_convolution",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "batch_norm",
        "_native_batch_norm_legit_no_training",
        "_native_batch_norm_legit",
        "native_batch_norm",
        "instance_norm",
        "group_norm",
    }
)
# ... and on the last axis ([..., F]).
LAST_DIM = frozenset(
    {"linear", "addmm", "mm", "matmul", "bmm", "layer_norm", "native_layer_norm", "embedding"}
)

# Ops that keep a rank-3 tensor's units but may move their axis (or slice another axis); the graph
# probes walk back through them and move the unit axis with `probe.base.moved_unit_axis`, as the eager
# probe does for the same Python calls.
LAYOUT = frozenset({"transpose", "swapaxes", "swapdims", "permute", "slice"})

# The producers and consumers the wiring reader follows.
LINEAR_OR_CONV_OPS = frozenset({"linear", "conv1d", "conv2d", "conv3d"})
BATCH_NORM_OPS = frozenset({"batch_norm", "_native_batch_norm_legit_no_training"})
# Ops after an activation that keep each unit's values in their own slots (on the way to its consumer).
UNIT_PRESERVING = frozenset(
    {
        "max_pool1d",
        "max_pool2d",
        "max_pool3d",
        "avg_pool1d",
        "avg_pool2d",
        "avg_pool3d",
        "adaptive_avg_pool1d",
        "adaptive_avg_pool2d",
        "adaptive_avg_pool3d",
        "flatten",
        "view",
        "reshape",
        "dropout",
        "clone",
        "contiguous",
        "alias",
    }
)


def aten_base(kind: str) -> str:
    """`aten::add` (a TorchScript node kind) -> `add`; other kinds -> ''."""
    return kind[len("aten::") :] if kind.startswith("aten::") else ""
