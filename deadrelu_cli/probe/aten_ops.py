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
# Fake-quant ops (QAT, torch.ao's FakeQuantize traced or written out): elementwise and monotone, so the
# units and the producer before them stay (the eager probe looks through FakeQuantize modules alike);
# the `_cachemask` forms return (output, mask), read through `getitem`.
FAKE_QUANT = frozenset(
    {
        "fake_quantize_per_tensor_affine",
        "fake_quantize_per_channel_affine",
        "fake_quantize_per_tensor_affine_cachemask",
        "fake_quantize_per_channel_affine_cachemask",
        "_fake_quantize_per_tensor_affine_cachemask_tensor_qparams",
        "_fake_quantize_learnable_per_tensor_affine",
        "_fake_quantize_learnable_per_channel_affine",
        "fused_moving_avg_obs_fake_quant",
        "_fused_moving_avg_obs_fq_helper",
    }
)
# Reshapes that a decomposed Linear ends with (addmm / mm on rows, viewed back to [B, T, F]): followed
# back to that producer when they keep the last axis, the units.
VIEWS = frozenset({"view", "_unsafe_view", "reshape"})
# Ops that keep the elements in order but change the shape: the walks follow the unit axis through them
# by the shapes before and after (probe.ops.reshaped_unit_axis) where the graph traced them
RESHAPES = VIEWS | {"flatten", "unflatten", "_reshape_alias"}
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
LAYOUT = frozenset({"transpose", "swapaxes", "swapdims", "permute", "movedim", "moveaxis", "slice"})

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


# A ReLU spelled `maximum(x, zeros)` / `max(x, zeros)` / `where(x > 0, x, 0)` (probe.ops.relu_spelled):
# the ops that make a tensor of zeros (the position of their fill value; None: zeros by name) ...
ZERO_FACTORIES = {
    "zeros": None,
    "zeros_like": None,
    "new_zeros": None,
    "full": 1,
    "full_like": 1,
    "new_full": 2,
    "scalar_tensor": 0,
    "tensor": 0,
    "as_tensor": 0,
}
# ... the ops that copy a tensor's values unchanged (a stored zero lifted, moved, cast or broadcast) ...
VALUE_COPIES = frozenset(
    {
        "lift_fresh_copy",
        "lift_fresh",
        "detach",
        "detach_",
        "clone",
        "_to_copy",
        "to",
        "alias",
        "contiguous",
        "expand",
        "expand_as",
        "type_as",
    }
)
# ... and the binary maxima (`max.other`; max(x, dim) is a reduction, told by its second argument;
# `fmax` is 0 where x is NaN, as `where(x > 0, x, 0)` and threshold are)
MAXIMA = frozenset({"maximum", "max", "fmax"})
# ... and the clamps from below that take a tensor bound (`clamp(x, min=Z)`: maximum(x, Z))
TENSOR_CLAMPS = frozenset({"clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_"})
# ... and the masks of `where(x > 0, x, 0)`, `x.masked_fill(x < 0, 0)`, `x * (x > 0)`: a comparison of x
# with zeros (-> whether the mask is true where x > 0), through casts (`(x > 0).float()`)
SIGN_TESTS = {"gt": True, "ge": True, "lt": False, "le": False}
MASK_CASTS = frozenset({"to", "_to_copy", "type_as", "clone", "alias", "detach"})
# ... and its negations (`~(x > 0)`, `logical_not(x > 0)`: true where x <= 0, and at NaN)
MASK_NEGATIONS = frozenset({"bitwise_not", "logical_not"})

# Reductions that may take a tensor's unit axis away (the position of their `dim`), and the elementwise
# ops besides PASS_THROUGH that keep such a reduction one value per position: the graph probes' forms of
# probe.base.REDUCTIONS and PER_POSITION_ELEMENTWISE (a clamp of `h.sum(-1) - m` is no ReLU layer)
UNIT_REDUCTIONS = {
    **dict.fromkeys(("sum", "mean", "amax", "amin", "var", "std", "logsumexp", "prod"), 1),
    **dict.fromkeys(("linalg_vector_norm", "norm"), 2),
}
PER_POSITION_OPS = frozenset({"rsub", "neg", "pow", "abs", "sqrt", "exp", "log"})
