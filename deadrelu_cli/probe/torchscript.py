"""Probe for TorchScript archives.

TorchScript runs in C++, so neither hooks nor a TorchFunctionMode see inside it. The sites are
read statically from the module's graphs (following calls into submodules, resolving `if` on
module attributes and constants, naming them like the eager probe), and at run time a
TorchDispatchMode sees the activation ops in execution order: the k-th activation op of a forward
is the k-th static site. If the two disagree (data-dependent control flow around an activation),
the scan stops with a clear error rather than attribute counts to the wrong layer.
"""

from __future__ import annotations

from collections import Counter, deque

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from deadrelu_cli.errors import UserError
from deadrelu_cli.probe.aten_ops import (
    CHANNEL_FIRST,
    FAKE_QUANT,
    LAST_DIM,
    LAYOUT,
    MASK_CASTS,
    MASK_NEGATIONS,
    MAXIMA,
    PASS_THROUGH,
    PER_POSITION_OPS,
    RESHAPES,
    SIGN_TESTS,
    TENSOR_CLAMPS,
    UNIT_REDUCTIONS,
    VALUE_COPIES,
    ZERO_FACTORIES,
    aten_base,
)
from deadrelu_cli.probe.base import (
    SQUEEZES,
    ProbeSettings,
    SiteRegistry,
    einsum_permutation,
    infer_channel_dim,
    keeps_dtype,
    relaid_units,
    run_static_site,
)
from deadrelu_cli.probe.exported import StaticSite, Units
from deadrelu_cli.probe.ops import (
    CLAMP_OPS,
    NAMED_WHEN_UNSCANNED,
    SiteNamer,
    aten_op_kind,
    clamp_bounds,
    clamp_is_layer,
    hardtanh_op,
    hidden_label,
    is_activation_module_type,
    is_clamp_op,
    is_scalar_value,
    is_zero_number,
    reduced_over_units,
    same_computation,
    stored_zeros_label,
    zeros_fit,
)

_FUNCTIONS = {
    "relu": "relu",
    "relu6": "relu6",
    "hardtanh": "relu6",
    "leaky_relu": "leaky_relu",
    "elu": "elu",
    "gelu": "gelu",
    "silu": "silu",
    "relu_": "relu",
    "hardtanh_": "relu6",
    "rrelu": "leaky_relu",
    "rrelu_": "leaky_relu",
}
_CHANNEL_FIRST_MODULES = (
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
)
_PRODUCER_MODULES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d")
_NORM_PRODUCER_MODULES = ("LayerNorm", "GroupNorm")  # producers when they hold a per-unit beta


class _Dynamic(Exception):
    pass


def _type_name(module) -> str:
    return module._c._type().qualified_name().replace("__torch__.", "")


class _Walker:
    def __init__(self, root, ops: tuple[str, ...]) -> None:
        self.root = root
        self.ops = ops
        self.paths = {id(m): name for name, m in root.named_modules()}
        self.namer = SiteNamer()
        self.sites: list[StaticSite] = []
        self.hidden: Counter = Counter()  # activations inside fused kernels (probe.hidden labels)
        self.unscanned: Counter = Counter()  # activation calls of ops --ops did not ask for, per op
        self._units: int | None = None  # the units of the producer `_producer` found last
        self._calls: list[tuple[object, object]] = []  # (CallMethod node, caller module)
        # the inputs of the model's own functions walked into (their graphs kept alive here), by their
        # debug names (made unique): (input, the caller's value it stands for) (`_outer`)
        self._arguments: dict[str, tuple[object, object]] = {}
        self._function_graphs: list = []
        self._types: dict | None = None  # a module's type name -> the module (_method_code)

    def walk_method(self, module, method: str, call=None) -> None:
        graph = getattr(module, method).graph
        env = {next(iter(graph.inputs())).debugName(): module}
        self._calls.append(call)
        try:
            self._walk_block(graph, module, env)
        finally:
            self._calls.pop()

    def _outer(self, value):
        """The caller's value that a parameter of a function walked into stands for (else `value`)."""
        for _ in range(16):
            if not self._arguments or value.node().kind() != "prim::Param":
                return value
            found = self._arguments.get(value.debugName())
            if found is None or found[0] != value:
                return value
            value = found[1]
        return value

    def _walk_function(self, call, module, env: dict) -> None:
        """A function of the model's own that the code calls (`def act(x): return x.clamp(min=0)` called
        in forward): its body, inlined into a graph of its own, walked as part of the caller's (its
        activations named after the module that runs it, as eager names them), its parameters read as the
        caller's arguments. Before, its activations were not in the site list while the run met them:
        their counts went to the sites after them."""
        graph = _function_graph(call)
        if graph is None:
            raise _Dynamic("a call of a function whose code cannot be read")
        self._function_graphs.append(graph)
        inner = {}
        for param, arg in zip(graph.inputs(), list(call.inputs())[1:], strict=True):
            param.setDebugName(f"deadrelu_argument{len(self._arguments)}")
            self._arguments[param.debugName()] = (param, arg)
            found = self._value(env, arg)
            if found is not None:
                inner[param.debugName()] = found
        self._walk_block(graph, module, inner)

    def _value(self, env: dict, value):
        if value.debugName() in env:
            return env[value.debugName()]
        value = self._outer(value)
        node = value.node()
        if node.kind() == "prim::Constant":
            try:
                return value.toIValue()
            except Exception:
                return None
        return env.get(value.debugName())

    def _walk_block(self, block, module, env: dict) -> None:
        for node in block.nodes():
            kind = node.kind()
            if kind == "prim::GetAttr":
                owner = env.get(node.inputsAt(0).debugName())
                if owner is not None and hasattr(owner, node.s("name")):
                    env[node.output().debugName()] = getattr(owner, node.s("name"))
            elif kind == "prim::CallMethod":
                target = env.get(node.inputsAt(0).debugName())
                if isinstance(target, torch.jit.ScriptModule):
                    self.walk_method(target, node.s("name"), (node, module))
            elif kind == "prim::CallFunction":
                fn = node.inputsAt(0).node()
                fname = fn.s("name") if fn.hasAttribute("name") else ""
                if fname in ("threshold", "_threshold", "threshold_"):  # F.threshold(x, t, v, inplace)
                    args = tuple(self._value(env, v) for v in list(node.inputs())[1:])
                    op = CLAMP_OPS.get(clamp_bounds("threshold", args[1:3]) or ())
                    if op is not None:
                        self._add(module, node, op, fname.endswith("_") or args[-1] is True, clamp=True)
                elif fname in _FUNCTIONS:
                    args = tuple(self._value(env, v) for v in list(node.inputs())[1:])
                    op = _FUNCTIONS[fname]
                    if fname.startswith("hardtanh"):  # (0, 6): relu6, (0, inf): relu, else no site
                        op = hardtanh_op(*(tuple(args[1:3]) + (None, None))[:2])
                        if op is None:
                            continue
                    in_place = fname.endswith("_") or (bool(args) and args[-1] is True)
                    self._add(module, node, op, in_place)
                else:
                    self._walk_function(node, module, env)
            elif kind == "prim::If":
                cond = self._value(env, node.inputsAt(0))
                blocks = list(node.blocks())
                if isinstance(cond, bool):
                    self._walk_block(blocks[0] if cond else blocks[1], module, env)
                else:
                    before = len(self.sites)
                    saved = self.namer._seen.copy()
                    self._walk_block(blocks[0], module, env)
                    first = self.sites[before:]
                    del self.sites[before:]
                    self.namer._seen = saved.copy()
                    self._walk_block(blocks[1], module, env)
                    second = self.sites[before:]
                    if [(s.name, s.op) for s in first] != [(s.name, s.op) for s in second]:
                        raise _Dynamic("an `if` whose branches run different activations")
            elif kind == "prim::Loop":
                before = len(self.sites)
                for inner in node.blocks():
                    self._walk_block(inner, module, env)
                if len(self.sites) > before:
                    raise _Dynamic("a loop that runs activations")
            elif kind.startswith("quantized::"):
                self._note_hidden(module, kind, ())
            elif kind.startswith("aten::"):
                args = tuple(self._value(env, v) for v in node.inputs())
                self._note_hidden(module, kind, args)
                spelled = self._spelled_relu(env, node)
                if spelled is not None and "relu" in self.ops:  # maximum(x, zeros), where(x > 0, x, 0), …
                    self._add(module, node, "relu", kind.endswith("_"), clamp=True, pre=spelled)
                elif "relu" in self.ops and aten_base(kind).rstrip("_") in _SPELLINGS:
                    stored = self._spelled_relu(env, node, self._stored_zeros)
                    if stored is not None and self._producer(stored, module)[0] is not None:
                        self.hidden[stored_zeros_label(self.paths.get(id(module), ""), kind)] += 1
                kind_op = aten_op_kind(kind, args)
                if kind_op is not None:  # _add names the ops --ops did not ask for (a traced leaky_relu)
                    self._add(module, node, kind_op[0], kind_op[1], clamp=is_clamp_op(kind))

    def _zeros(self, env: dict, value) -> bool:
        """Whether a value is zeros in every run: a constant 0 or tensor of zeros in the code, or what a
        zero factory makes, through copies (probe.ops: a ReLU spelled with a maximum). An attribute (a
        parameter or buffer) is none: its values are the checkpoint's, as in eager."""
        for _ in range(8):
            value = self._outer(value)
            node = value.node()
            kind = node.kind()
            if kind == "prim::Constant":
                found = self._value(env, value)
                if isinstance(found, torch.Tensor):
                    return not found.is_meta and not bool(found.any())
                return is_zero_number(found)
            base = aten_base(kind)
            inputs = list(node.inputs())
            if base in ZERO_FACTORIES:
                index = ZERO_FACTORIES[base]
                return index is None or (
                    len(inputs) > index and is_zero_number(self._value(env, inputs[index]))
                )
            if base not in VALUE_COPIES or not inputs:
                return False
            value = inputs[0]
        return False

    def _stored_zeros(self, env: dict, value) -> bool:
        """A parameter or buffer (an attribute, through copies) that holds zeros now: no ReLU's zeros."""
        for _ in range(8):
            value = self._outer(value)
            node = value.node()
            if node.kind() == "prim::GetAttr":
                found = env.get(node.output().debugName())
                return isinstance(found, torch.Tensor) and not found.is_meta and not bool(found.any())
            inputs = list(node.inputs())
            if aten_base(node.kind()) not in VALUE_COPIES or not inputs:
                return False
            value = inputs[0]
        return False

    def _spelled_relu(self, env: dict, node, zeros=None):
        """The x of `maximum(x, zeros)` / `max(x, zeros)` / `where(x > 0, x, 0)` / `x.masked_fill(x < 0,
        0)` / `x * (x > 0)` (zeros that pass `zeros`, by default the code's: _zeros), else None; whether the
        zeros widen x is known at run time only (`TorchScriptProbe.on_spelled`)."""
        base = aten_base(node.kind())
        inputs = list(node.inputs())
        is_zeros = self._zeros if zeros is None else zeros
        if base in MAXIMA and len(inputs) == 2 and all(str(v.type()) == "Tensor" for v in inputs):
            data = [v for v in inputs if not is_zeros(env, v)]
            return data[0] if len(data) == 1 else None
        if base in TENSOR_CLAMPS and len(inputs) >= 2 and str(inputs[1].type()) == "Tensor":
            unbounded = len(inputs) == 2 or (  # clamp(x, min=Z) with a tensor Z, no max: maximum(x, Z)
                inputs[2].node().kind() == "prim::Constant" and inputs[2].toIValue() is None
            )
            return inputs[0] if unbounded and is_zeros(env, inputs[1]) else None
        if base == "where" and len(inputs) == 3:
            tested = self._sign_test(env, inputs[0])
            if tested is None:
                return None
            x, keeps_x = tested
            kept, other = inputs[1:] if keeps_x else inputs[:0:-1]
            return kept if self._same(kept, x) and is_zeros(env, other) else None
        if base in ("masked_fill", "masked_fill_") and len(inputs) == 3:
            tested = self._sign_test(env, inputs[1])
            if tested is not None and self._same(tested[0], inputs[0]) and not tested[1]:
                return inputs[0] if is_zeros(env, inputs[2]) else None
        if (
            base in ("mul", "mul_")
            and zeros is None
            and len(inputs) == 2
            and all(str(v.type()) == "Tensor" for v in inputs)
        ):
            for x, mask in (inputs, inputs[::-1]):
                tested = self._sign_test(env, mask)
                if tested is not None and self._same(tested[0], x) and tested[1]:
                    return x if base == "mul" or x.unique() == inputs[0].unique() else None
        return None

    def _same(self, a, b) -> bool:
        """Whether graph values a and b are one value computed twice (probe.ops.same_computation: a layer
        run twice on one tensor); the run checks their values (TorchScriptProbe.on_spelled)."""
        return same_computation(self._outer(a), self._outer(b), self._describe)

    def _describe(self, value) -> tuple[tuple, list] | None:
        """A value's op, attributes, constant and output offset, and its operands (same_computation);
        None for a parameter, a block's result or an in-place op."""
        value = self._outer(value)
        node = value.node()
        kind = node.kind()
        if kind in ("prim::Param", "prim::If", "prim::Loop") or kind.endswith("_"):
            return None
        try:
            if kind == "prim::Constant":
                return (kind, str(value.type()), repr(value.toIValue())), []
            if kind == "prim::CallMethod":  # a trace writes each call as a method of its own (forward1, …)
                code = self._method_code(str(node.inputsAt(0).type()), node.s("name"))
                if code is None:
                    return None
                return (kind, str(node.inputsAt(0).type()), code, value.offset()), [
                    self._outer(v) for v in node.inputs()
                ]
            attributes = tuple(
                (name, repr(getattr(node, node.kindOf(name))(name))) for name in node.attributeNames()
            )
        except (RuntimeError, AttributeError):
            return None
        return (kind, attributes, value.offset()), [self._outer(v) for v in node.inputs()]

    def _method_code(self, type_name: str, method: str) -> str | None:
        """The code of METHOD of the submodule of type TYPE_NAME, less its name, or None."""
        if self._types is None:
            self._types = {str(m._c._type()): m for m in self.root.modules() if hasattr(m, "_c")}
        module = self._types.get(type_name)
        try:
            code = getattr(module, method).code if module is not None else None
        except (AttributeError, RuntimeError):
            return None
        return code.split("(", 1)[-1] if isinstance(code, str) else None

    def _sign_test(self, env: dict, value):
        """(x, whether the mask is true where x > 0) for a mask `value` that compares x with zeros
        (x > 0, x >= 0, x < 0, x <= 0), through casts ((x > 0).float()) and negations (~(x > 0)), else
        None."""
        negated = False
        for _ in range(8):
            value = self._outer(value)
            node = value.node()
            base = aten_base(node.kind())
            inputs = list(node.inputs())
            if (base in MASK_CASTS or base in MASK_NEGATIONS) and inputs:
                negated ^= base in MASK_NEGATIONS
                value = inputs[0]
                continue
            if base in SIGN_TESTS and len(inputs) == 2 and self._zeros(env, inputs[1]):
                return inputs[0], SIGN_TESTS[base] != negated
            return None
        return None

    def _note_hidden(self, module, kind: str, args: tuple) -> None:
        """A fused kernel with a ReLU inside (an RNN, the transformer encoder's fast path, an int8 op)."""
        path = self.paths.get(id(module), "")
        base = aten_base(kind)
        if kind.startswith("quantized::") and "relu" in kind and "relu" in self.ops:  # linear_relu, …
            self.hidden[
                hidden_label(path, kind.replace("::", "."), "relu6" if "relu6" in kind else "relu")
            ] += 1
            return
        if base == "rnn_relu" and "relu" in self.ops:
            # rnn_relu(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
            layers = args[4] if isinstance(args[4], int) else 1
            self.hidden[hidden_label(path, "RNN", "relu")] += layers * (2 if args[7] is True else 1)
        elif base == "_transformer_encoder_layer_fwd":
            op = "gelu" if args[7] is True else "relu"
            if op in self.ops:
                self.hidden[hidden_label(path, "transformer encoder fast path", op)] += 1

    def _per_position(self, value, module) -> tuple:
        """The reductions over a unit axis that a value may be one per position of, each `(dim, keepdim,
        channel_first)`: a reduction, or one behind elementwise ops (`h.sum(-1) - m`), as
        probe.exported._per_position reads a graph. TorchScript's types carry no rank: whether the dim is
        the unit axis is decided at run time from the clamped value's shape (probe.ops.reduced_over_units)."""
        stack, seen, found = [value], 0, []
        while stack and seen < 32:
            node, seen = self._outer(stack.pop()).node(), seen + 1
            base = aten_base(node.kind())
            inputs = list(node.inputs())
            where = UNIT_REDUCTIONS.get(base)
            if where is not None and len(inputs) > where:
                try:
                    dim = inputs[where].toIValue()
                    if dim is None and inputs[where].node().kind() == "prim::ListConstruct":
                        dim = [v.toIValue() for v in inputs[where].node().inputs()]
                    keepdim = node.namedInput("keepdim").toIValue()
                except RuntimeError:
                    continue
                if isinstance(dim, (tuple, list)) and len(dim) == 1:
                    dim = dim[0]
                if not isinstance(dim, int) or not isinstance(keepdim, bool):
                    continue
                units = self._units
                channel_first = self._producer(inputs[0], module)[0]
                self._units = units
                found.append((dim, keepdim, channel_first))
            elif base in PASS_THROUGH or base in PER_POSITION_OPS:
                stack.extend(v for v in inputs if str(v.type()).startswith("Tensor"))
        return tuple(found)

    def _clamps_per_position(self, node, module) -> bool:
        value = node.inputsAt(1) if node.kind() == "prim::CallFunction" else node.inputsAt(0)
        return bool(self._per_position(value, module))

    def _add(self, module, node, op: str, in_place: bool, clamp: bool = False, pre=None) -> None:
        if op not in self.ops:
            # a LeakyReLU beside the ReLUs: named, not counted; a clamp too unless it clamps one value per
            # position (an unknown shape is a layer, probe.ops.clamp_is_layer), as eager and .pt2 name it
            if (
                op in NAMED_WHEN_UNSCANNED
                and pre is None
                and not (clamp and self._clamps_per_position(node, module))
            ):
                self.unscanned[op] += 1
            return
        path = self.paths.get(id(module), "")
        qualified = _type_name(module)
        is_activation = is_activation_module_type(qualified)
        caller = self._calls[-1] if self._calls else None
        if is_activation and caller is not None:
            # The pre-activation is the module's argument: trace it in the caller's graph.
            channel_first, producer, unit_axis, axis_lost = self._producer(caller[0].inputsAt(1), caller[1])
        else:
            value = node.inputsAt(1) if node.kind() == "prim::CallFunction" else node.inputsAt(0)
            channel_first, producer, unit_axis, axis_lost = self._producer(
                value if pre is None else pre, module
            )
        if pre is not None and channel_first is None and unit_axis is None and not axis_lost:
            return  # maximum(x, 0) of no layer's output (a reduction): an ordinary op, unnumbered
        name = self.namer.name(path, op, is_activation)
        module_type = qualified.rsplit(".", 1)[-1] if is_activation else "functional"
        units = self._units if pre is not None else None
        spelled = aten_base(node.kind()) if pre is not None else ""
        functional = not (is_activation and caller is not None)  # a clamp of `value` in this graph
        per_position = self._per_position(value, module) if clamp and pre is None and functional else ()
        site = StaticSite(
            name, op, in_place, module_type, channel_first, producer, clamp, spelled, units, per_position,
            unit_axis, axis_lost,
        )  # fmt: skip
        self.sites.append(site)

    def _producer(self, value, module) -> Units:
        """Same rule as the FX probe: the unit axis follows elementwise ops, the bias only scalar ones.
        `self._units`: the producer module's units, when one was found. A view / reshape / flatten (whose
        shapes the code does not hold) or a layout op with dims computed at run time loses the units:
        the walk goes on, and a layer found behind it makes the site one whose axis was lost."""
        self._units = None
        keep_producer = True
        layouts: list[tuple[str, tuple]] = []  # transposes, permutes, slices on the way (nearest first)
        calls: list = []  # (call node, caller module) of the modules' graphs walked into
        # the methods this walk is in (walk_method): an argument of one (a block's forward, a helper
        # method `self.act(x)`) is its caller's value, as eager follows the tensor into the call
        outer = list(self._calls)
        for _ in range(32):
            value = self._outer(value)
            src = value.node()
            kind = src.kind()
            base = aten_base(kind)
            if kind == "prim::Param" and (calls or (outer and outer[-1] is not None)):
                # an argument of a module walked into: the caller's value
                call, module = calls.pop() if calls else outer.pop()
                if not 0 < value.offset() < len(list(call.inputs())):
                    return Units(None, None)
                value = call.inputsAt(value.offset())
                continue
            if base in SQUEEZES:
                try:
                    dims = src.inputsAt(1).toIValue() if len(list(src.inputs())) > 1 else None
                except RuntimeError:
                    dims = None
                # squeeze every size-1 dim: which ones is not in the graph
                layouts.append(
                    ("lost", ())
                    if dims is None
                    else (base, (dims,) if isinstance(dims, int) else tuple(dims))
                )
                keep_producer = False
                value = src.inputsAt(0)
                continue
            if base == "einsum":  # "nchw->nhwc" of one tensor: a permute
                try:
                    dims = einsum_permutation(src.inputsAt(0).toIValue())
                except RuntimeError:
                    dims = None
                operands = src.inputsAt(1).node()
                if (
                    dims is None
                    or operands.kind() != "prim::ListConstruct"
                    or len(list(operands.inputs())) != 1
                ):
                    return Units(None, None)
                layouts.append(("permute", dims))
                keep_producer = False
                value = operands.inputsAt(0)
                continue
            if base in LAYOUT:
                dims = _constant_dims(src, base)
                layouts.append(("lost", ()) if dims is None else (base, dims))
                keep_producer = False  # the producer's bias no longer sits before the activation alone
                value = src.inputsAt(0)
                continue
            if base in RESHAPES:  # no shapes in the code: where the units go is not known
                layouts.append(("lost", ()))
                keep_producer = False
                value = src.inputsAt(0)
                continue
            if base in FAKE_QUANT:  # QAT's fake quant (traced): the units and the producer stay
                value = src.inputsAt(0)
                continue
            if kind == "prim::CallMethod":
                target = _attribute_of(module, src.inputsAt(0))
                if target is None:
                    return Units(None, None)
                qualified = _type_name(target)
                type_name = qualified.rsplit(".", 1)[-1]
                if qualified.startswith("torch.ao.quantization") and "FakeQuantize" in type_name:
                    value = src.inputsAt(1)  # a FakeQuantize module (scripted): look through, as eager
                    continue
                base_layer = _lora_base(target, qualified)
                if base_layer is not None:  # a PEFT LoRA layer: its base layer makes the units
                    target, type_name = base_layer, _type_name(base_layer).rsplit(".", 1)[-1]
                if type_name in _IDENTITY_MODULES and len(list(src.inputs())) > 1:
                    value = src.inputsAt(1)  # scripted, its F.dropout is a call of its own: its input
                    continue
                if type_name not in _CHANNEL_FIRST_MODULES and type_name not in (
                    "Linear",
                    "LayerNorm",
                    "Embedding",
                ):
                    # a block of the model's own (an nn.Sequential, a wrapper returning self.conv(x), a
                    # Dropout): the value it returns, walked in its own graph, as eager sees the conv's output
                    returned = _returned_value(target, src.s("name"))
                    if returned is None:
                        return Units(None, None)
                    calls.append((src, module))
                    value, module = returned, target
                    continue
                makes_units = type_name in _PRODUCER_MODULES or (
                    type_name in _NORM_PRODUCER_MODULES and getattr(target, "bias", None) is not None
                )
                producer = self.paths.get(id(target)) if makes_units and keep_producer else None
                self._units = _module_units(target, type_name)
                if type_name in _CHANNEL_FIRST_MODULES:
                    channel_first = True
                elif type_name in ("Linear", "LayerNorm", "Embedding"):
                    channel_first = False
                else:
                    return Units(None, None)
                return _units(channel_first, layouts, _CONV_RANKS.get(type_name), producer)
            if base in CHANNEL_FIRST or base in LAST_DIM:
                return _units(base in CHANNEL_FIRST, layouts, _CONV_RANKS.get(base), None)
            if base in PASS_THROUGH:
                if any(str(v.type()).startswith("Tensor") for v in list(src.inputs())[1:]):
                    keep_producer = False
                value = src.inputsAt(0)
                continue
            return Units(None, None)
        return Units(None, None)


def _units(channel_first: bool, layouts: list[tuple[str, tuple]], rank: int | None, producer) -> Units:
    side, axis = relaid_units(channel_first, layouts, rank)
    if side is None and axis is None:
        return Units(None, None, None, True)
    return Units(side, producer if side is not None else None, axis)


def script_sites(script_module, ops: tuple[str, ...]) -> list[StaticSite] | None:
    """The activation sites of a ScriptModule's forward read from its code (None when the code's control
    flow decides which run): for TorchScript called from an eager model, which no eager probe sees into."""
    walker = _Walker(script_module, ops)
    try:
        walker.walk_method(script_module, "forward")
    except _Dynamic:
        return None
    return walker.sites


def spelled_relu_reader(script_module):
    """A function of a node of the module's forward graph (inlined or not) to the x of the ReLU it spells
    (maximum(x, zeros), where(x > 0, x, 0), x * (x > 0), …; probe.ops), when x comes from a layer, else to
    None: the nodes the scan counted as spelled sites, for `fix` to patch (backends.torch.fix)."""
    walker = _Walker(script_module, ("relu",))

    def read(node):
        if not node.kind().startswith("aten::"):
            return None
        x = walker._spelled_relu({}, node)
        return x if x is not None and walker._producer(x, script_module)[0] is not None else None

    return read


def _function_graph(call):
    """The body of the function a `prim::CallFunction` node calls, inlined into a graph of its own whose
    inputs are the call's arguments (the function constant aside), or None when it cannot be read."""
    try:
        graph = torch._C.Graph()
        arguments = list(call.inputs())[1:]
        params = []
        for argument in arguments:
            param = graph.addInput()
            param.setType(argument.type())
            params.append(param)
        function = graph.insertNode(graph.createClone(call.inputsAt(0).node(), lambda v: v))
        uniques = [a.unique() for a in arguments]
        cloned = graph.insertNode(
            graph.createClone(
                call,
                lambda v: (
                    function.output()
                    if v.unique() == call.inputsAt(0).unique()
                    else params[uniques.index(v.unique())]
                ),
            )
        )
        for output in cloned.outputs():
            graph.registerOutput(output)
        torch._C._jit_pass_inline(graph)
    except (RuntimeError, ValueError):
        return None
    return graph


def _module_units(module, type_name: str) -> int | None:
    """The units a Linear / Conv / norm module makes (its weight's rows, or its per-unit vector)."""
    if type_name.startswith("ConvTranspose"):
        return None
    for name in ("weight", "running_mean"):
        tensor = getattr(module, name, None)
        if isinstance(tensor, torch.Tensor) and tensor.dim() >= 1:
            return int(tensor.shape[0] if tensor.dim() >= 2 else tensor.shape[-1])
    return None


def _lora_base(module, qualified: str):
    """The base layer (a Linear / Conv) of a PEFT LoRA layer, whose bias still adds to each unit of its
    output; None for any other module, and for DoRA (which rescales the base output per unit)."""
    if not qualified.startswith("peft.tuners.lora"):
        return None
    base = getattr(module, "base_layer", None)
    magnitude = getattr(module, "lora_magnitude_vector", None)
    if base is None or (magnitude is not None and any(True for _ in magnitude.children())):
        return None
    name = _type_name(base).rsplit(".", 1)[-1]
    return base if name == "Linear" or name.startswith("Conv") else None


# output rank of the convolutions by module type and aten name (the graph's types often carry none)
_CONV_RANKS = {
    **{f"{kind}{n}d": n + 2 for kind in ("Conv", "ConvTranspose") for n in (1, 2, 3)},
    **{f"conv{n}d": n + 2 for n in (1, 2, 3)},
    **{f"conv_transpose{n}d": n + 2 for n in (1, 2, 3)},
}


# modules whose output is their input at inference (the units and their axis stay)
_IDENTITY_MODULES = frozenset({"Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "Identity"})


def _returned_value(module, method: str):
    """The value a ScriptModule's METHOD returns (a graph value), or None (a tuple, no such graph)."""
    try:
        graph = getattr(module, method).graph
    except (AttributeError, RuntimeError):
        return None
    returned = list(graph.return_node().inputs())
    if len(returned) != 1 or not str(returned[0].type()).startswith("Tensor"):
        return None
    return returned[0]


def _attribute_of(module, value):
    """The submodule that VALUE holds: a chain of attribute reads from the graph's `self` (MODULE), as a
    grandchild called directly (`self.block.conv(x)`) or a ModuleList unrolled in a loop (`self.layers.0`)
    is reached; None when the chain does not start at `self` or a name is missing."""
    names = []
    node = value.node()
    while node.kind() == "prim::GetAttr" and len(names) < 16:
        names.append(node.s("name"))
        node = node.inputsAt(0).node()
    if not names or node.kind() != "prim::Param":
        return None
    for name in reversed(names):
        if not hasattr(module, name):
            return None
        module = getattr(module, name)
    return module


def _constant_dims(node, base: str) -> tuple | None:
    """The constant axes of a TorchScript transpose / permute / movedim / slice node, or None when not
    constant."""
    try:
        if base == "permute":
            dims = node.inputsAt(1).toIValue()
            if dims is None and node.inputsAt(1).node().kind() == "prim::ListConstruct":
                dims = [v.toIValue() for v in node.inputsAt(1).node().inputs()]
            return None if dims is None or None in dims else tuple(int(d) for d in dims)
        count = 1 if base == "slice" else 2
        dims = [node.inputsAt(1 + i).toIValue() for i in range(count)]
    except RuntimeError:
        return None
    if None in dims:
        return None
    # movedim's source and destination may be lists of axes (aten::movedim.intlist)
    return tuple(int(d) if isinstance(d, int) else tuple(int(v) for v in d) for d in dims)


_MASK_OPS = MASK_CASTS | MASK_NEGATIONS
_SPELLED_OPS = MAXIMA | TENSOR_CLAMPS | {"where", "masked_fill", "masked_fill_", "mul", "mul_"}
# those that take zeros (a stored tensor's: no site)
_SPELLINGS = MAXIMA | TENSOR_CLAMPS | {"where", "masked_fill"}


def _same_values(tested, x) -> bool:
    """Whether the tensor a mask compared with 0 is x, or holds x's values: the output of another call of
    the layer that made x, which the walk found computed alike (_Walker._same)."""
    if tested is x:
        return True
    return (
        isinstance(tested, torch.Tensor)
        and isinstance(x, torch.Tensor)
        and tested.shape == x.shape
        and tested.dtype == x.dtype
        and torch.equal(tested, x)
    )


class _OrderedDispatch(TorchDispatchMode):
    def __init__(self, probe: TorchScriptProbe) -> None:
        super().__init__()
        self.probe = probe

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = aten_op_kind(func.name(), tuple(args))
        base = aten_base(func.name()).split(".")[0]
        if kind is None and base in _SPELLED_OPS and self.probe.spelled_next():
            return self.probe.on_spelled(func, args, kwargs)
        if kind is None and self.probe.spelled_sites and (base in SIGN_TESTS or base in _MASK_OPS):
            out = func(*args, **kwargs)
            self.probe.note_mask(base, args, out)
            return out
        if kind is None and args and is_clamp_op(func.name()) and is_scalar_value(args[0]):
            kind = aten_op_kind(func.name(), (None, *args[1:]))  # a 0-d clamp: on_activation drops it
        if kind is None or kind[0] not in self.probe.settings.ops:
            return func(*args, **kwargs)
        return self.probe.on_activation(func, args, kwargs, kind[0], kind[1])


class TorchScriptProbe:
    def __init__(self, script_module, settings: ProbeSettings) -> None:
        self.module = script_module
        self.settings = settings
        self.registry = SiteRegistry(settings)
        walker = _Walker(script_module, settings.ops)
        try:
            walker.walk_method(script_module, "forward")
        except _Dynamic as exc:
            raise UserError(
                f"this TorchScript model has {exc}; its activations cannot be matched to layers by order. "
                "Scan the state_dict with --arch, or an ExportedProgram (.pt2), instead"
            ) from None
        self.sites = walker.sites
        self.hidden = walker.hidden
        self.unscanned = dict(walker.unscanned)
        for site in self.sites:
            self.registry.declare(site.name, site.op, site.module_type, site.producer)
        self._position = 0
        self.spelled_sites = any(site.spelled for site in self.sites)
        # the comparisons with 0 of this forward (mask, x, whether it is true where x > 0), the latest few:
        # held, so that the same tensors reach on_spelled as the same Python objects
        self._masks: deque = deque(maxlen=8)
        # where the checkpoint's tensors live: never a ReLU's zeros, zeros or not (probe.ops)
        self._stored = {
            t.untyped_storage().data_ptr() for t in script_module.state_dict().values() if t.numel()
        }

    def note_mask(self, base: str, args: tuple, out) -> None:
        """Remember a mask made by comparing x with 0 (x > 0, x <= 0, …), or a cast of one."""
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(out, torch.Tensor):
            return
        if base in SIGN_TESTS:
            if len(args) == 2 and self._zero(args[1]):
                self._masks.append((out, args[0], SIGN_TESTS[base]))
        else:  # a cast keeps what the mask says, a negation turns it round
            found = self._mask_of(args[0])
            if found is not None:
                self._masks.append((out, found[0], found[1] != (base in MASK_NEGATIONS)))

    def _mask_of(self, mask) -> tuple[torch.Tensor, bool] | None:
        return next(((x, keeps) for made, x, keeps in self._masks if made is mask), None)

    def _zero(self, value) -> bool:
        """A 0, or zeros that are no checkpoint tensor's (read at run time)."""
        if not isinstance(value, torch.Tensor):
            return is_zero_number(value)
        if value.numel() and value.untyped_storage().data_ptr() in self._stored:
            return False
        return not value.is_meta and not bool(value.any())

    def spelled_next(self) -> bool:
        """Whether the next site of the code is a ReLU spelled with a maximum or a select."""
        return self._position < len(self.sites) and self.sites[self._position].spelled

    def _fits_next(self, x: torch.Tensor) -> bool:
        """Whether x has the units of the next site's producer (when the walk found one): a maximum of
        another tensor run before that site (a variance's with zeros) is not taken for it."""
        site = self.sites[self._position]
        if site.units is None or x.dim() < 2:
            return True
        axis = infer_channel_dim(x.dim(), site.channel_first, site.unit_axis)
        return x.shape[axis] == site.units

    def on_spelled(self, func, args: tuple, kwargs: dict):
        """A maximum, select, masked fill or product run where the code's next site is one spelled with that
        op: that site when it computes relu(x) here (its zeros are zeros and no checkpoint tensor, its mask
        is x's own comparison with 0 (note_mask), and the zeros do not widen x), else an ordinary op: one
        the static walk did not list, or the listed maximum whose zeros widen or promote x (withdrawn
        when x has the units of the site's producer; without a producer the count check at the end of the
        forward says so)."""
        site = self.sites[self._position]
        base = aten_base(func.name()).split(".")[0]
        if base.rstrip("_") != site.spelled.rstrip("_") and not (base in MAXIMA and site.spelled in MAXIMA):
            return func(*args, **kwargs)  # not the op that spells the next site
        given = list(args)
        if kwargs:
            return func(*args, **kwargs)
        if base in TENSOR_CLAMPS:  # clamp(x, min=Z): maximum(x, Z), with no max
            if len(given) < 2 or any(a is not None for a in given[2:]) or not self._zero(given[1]):
                return func(*args, **kwargs)
            x, zeros = given[:2]
        elif base in MAXIMA:
            if len(given) != 2 or not all(isinstance(a, torch.Tensor) for a in given):
                return func(*args, **kwargs)
            if self._zero(given[1]):
                x, zeros = given
            elif self._zero(given[0]):
                zeros, x = given
            else:  # no zeros of the code's (a stored zero tensor's maximum): an ordinary op
                return func(*args, **kwargs)
        else:
            if base == "where" and len(given) == 3:
                found = self._mask_of(given[0])
                x, zeros = (given[1], given[2]) if found is None or found[1] else (given[2], given[1])
            elif base.startswith("masked_fill") and len(given) == 3:
                found, (x, zeros) = self._mask_of(given[1]), (given[0], given[2])
                found = None if found is None or found[1] else found
            elif base.startswith("mul") and len(given) == 2:
                x, zeros = given
                found = self._mask_of(zeros)
                if found is None or not _same_values(found[0], x):
                    zeros, x = given
                    found = None if base == "mul_" else self._mask_of(zeros)
                found = None if found is None or not found[1] else found
            else:
                found = None
            # not x's own comparison with 0 (nor one of x's values computed again): an ordinary op
            if found is None or not _same_values(found[0], x):
                return func(*args, **kwargs)
            if base.startswith("mul"):
                zeros = torch.zeros((), dtype=zeros.dtype)  # a mask, no zeros: its type is what it promotes
        if isinstance(zeros, torch.Tensor):
            fits = self._zero(zeros) and zeros_fit(x.shape, zeros.shape)
        else:
            fits = is_zero_number(zeros)
        if not isinstance(x, torch.Tensor) or not self._fits_next(x):
            return func(*args, **kwargs)
        if not fits or not x.is_floating_point() or not keeps_dtype(x, zeros):
            if site.units is not None and base in MAXIMA:  # the listed site (x has its producer's units):
                self._position += 1  # no ReLU, withdrawn as a clamp that is no layer is (on_activation)
                self.registry.withdraw(site.name)
            return func(*args, **kwargs)

        def spelled(_x):
            return func(*args, **kwargs)

        return self.on_activation(spelled, (x,), {}, "relu", site.in_place)

    def on_activation(self, func, args, kwargs, op: str, in_place: bool):
        if self._position >= len(self.sites) or self.sites[self._position].op != op:
            # raised inside the TorchScript interpreter, which hands on only a RuntimeError: kept for run()
            self._error = UserError(
                f"this TorchScript model ran an unexpected {op} (activation #{self._position + 1} of this forward; "
                f"{len(self.sites)} found in its code); scan the state_dict with --arch or an ExportedProgram instead"
            )
            raise self._error
        site = self.sites[self._position]
        self._position += 1
        if site.clamp and (
            # (h.sum(-1) - m).clamp(min=0): one value per position, no units
            reduced_over_units(tuple(args[0].shape), site.per_position)
            or not clamp_is_layer(
                tuple(args[0].shape),
                infer_channel_dim(args[0].dim(), site.channel_first, site.unit_axis)
                if args[0].dim()
                else None,
                site.channel_first is not None or site.unit_axis is not None or site.axis_lost,
            )
        ):  # a clamped variance / norm / loss (its shape tells, known once it runs): no layer
            self.registry.withdraw(site.name)
            return func(*args, **kwargs)
        if getattr(args[0], "is_quantized", False):  # an int8 tensor: no float pre-activation to count
            self.hidden[hidden_label(site.name, "activation on a quantized tensor", op)] = 1
            return func(*args, **kwargs)

        return run_static_site(self.registry, site, func, args, kwargs, in_place)

    def run(self, inputs: tuple, kwargs: dict | None = None):
        self._position = 0
        self._error: UserError | None = None
        self._masks.clear()
        try:
            # unoptimized: the optimizer merges identical calls on one tensor (relu(x) twice, one ReLU
            # module applied twice) into one, which the code's sites (and eager) count as two
            with torch.jit.optimized_execution(False), _OrderedDispatch(self):
                out = self.module(*inputs, **(kwargs or {}))
        except RuntimeError:
            if self._error is not None:
                raise self._error from None
            raise
        finally:
            self._masks.clear()
        if self._position != len(self.sites):
            raise UserError(
                f"this TorchScript model ran {self._position} activations but its code has {len(self.sites)}; "
                "scan the state_dict with --arch or an ExportedProgram instead"
            )
        return out
