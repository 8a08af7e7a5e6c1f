"""Which torch callables and aten ops are activation sites, and how call sites are named.

Naming (identical for eager modules, TorchScript and ExportedProgram graphs):
- an activation module (nn.ReLU, nn.ReLU6, …) called at several places: `path`, `path#2`, `path#3`, …
  in the order the calls run in one forward;
- a functional call (F.relu, torch.relu, Tensor.relu, relu_) inside module `path`:
  `path.relu()`, `path.relu()#2`, …; at the top level: `relu()`.
"""

from __future__ import annotations

from collections import Counter

DEFAULT_OPS = ("relu", "relu6")
OPTIONAL_OPS = ("leaky_relu", "elu", "gelu", "silu")
ALL_OPS = DEFAULT_OPS + OPTIONAL_OPS

ACTIVATION_MODULE_PREFIX = "torch.nn.modules.activation."


def parse_ops(text: str | None) -> tuple[str, ...]:
    from deadrelu_cli.errors import UserError

    if not text:
        return DEFAULT_OPS
    ops = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [op for op in ops if op not in ALL_OPS]
    if unknown:
        raise UserError(f"--ops: unknown op {unknown[0]!r}; choose from {', '.join(ALL_OPS)}")
    return ops


def is_activation_module_type(qualified_type: str | None) -> bool:
    """True for torch.nn activation modules (as qualified by export / TorchScript / Python)."""
    if not qualified_type:
        return False
    return qualified_type.replace("__torch__.", "").startswith(ACTIVATION_MODULE_PREFIX)


def aten_op_kind(overload_name: str, args: tuple) -> tuple[str, bool] | None:
    """Map an aten op (e.g. 'aten::relu_' or 'aten.relu_.default') and its args to (op, in_place)."""
    base = overload_name.replace("aten::", "").replace("aten.", "").split(".")[0]
    in_place = base.endswith("_")
    base = base.rstrip("_")
    if base == "relu":
        return "relu", in_place
    if base == "relu6":
        return "relu6", in_place
    if base == "hardtanh":
        lo = args[1] if len(args) > 1 else -1.0
        hi = args[2] if len(args) > 2 else 1.0
        if _is_number(lo) and _is_number(hi) and float(lo) == 0.0 and float(hi) == 6.0:
            return "relu6", in_place
        return None
    if base in ("leaky_relu", "elu", "gelu", "silu"):
        return base, in_place
    return None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class SiteNamer:
    """Hands out call-site names in execution order; reset at the start of every forward."""

    def __init__(self) -> None:
        self._seen: Counter[str] = Counter()

    def reset(self) -> None:
        self._seen.clear()

    def name(self, module_path: str, op: str, module_is_activation: bool) -> str:
        if module_is_activation and module_path:
            base = module_path
        else:
            base = f"{module_path}.{op}()" if module_path else f"{op}()"
        self._seen[base] += 1
        count = self._seen[base]
        return base if count == 1 else f"{base}#{count}"


# activations that are never exactly 0 over a region (no dead units in the ReLU sense), by lower-case name
SMOOTH_ACTIVATIONS = (
    "sigmoid",
    "tanh",
    "gelu",
    "silu",
    "swish",
    "softplus",
    "mish",
    "elu",
    "selu",
    "celu",
    "softsign",
)


def no_sites_note(what: str, found: Counter) -> str:
    """The note for a model with no site of the chosen ops: `what` it lacks, and the activations it
    has instead; smooth ones (SiLU = x·sigmoid(x), GELU, …) are named as the reason only when present."""
    if not found:
        return what
    listed = ", ".join(f"{name} ×{count}" for name, count in found.most_common())
    smooth = [name for name in found if name.lower().replace("_", "").rstrip("()") in SMOOTH_ACTIVATIONS]
    if not smooth:
        return f"{what}; its activations: {listed}"
    return (
        f"{what}; its activations: {listed} ({', '.join(smooth)}: smooth activations are never exactly 0 "
        "with zero gradient, so no dead units in the ReLU sense; --ops leaky_relu,elu,gelu counts those kinds)"
    )
