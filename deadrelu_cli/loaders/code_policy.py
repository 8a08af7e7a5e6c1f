"""What a TorchScript archive or a `.pt2` ExportedProgram may execute: an allowlist of pure tensor ops.

Both formats carry code: TorchScript archives hold Python-like source (`code/**/*.py`) that
`torch.jit.load` compiles, and whose `__setstate__` methods run *while loading*; a `.pt2` holds a
serialized graph (`models/*.json`) whose nodes name the ops they call. Both can name ops that touch
the world outside the tensors (`aten::from_file(path, shared=True)` followed by `fill_` overwrites a
file of the author's choosing). So before either is loaded, every op the archive names is read from
the archive itself (zipfile, `ast`, `json`, `pickletools`; nothing from the file is imported or run)
and checked against the lists below. Anything else is refused with one line naming the op;
`--trust-pickle` (which also trusts code) is the explicit opt-out.

The allowlist is data: `ALLOWED_ATEN` (aten op base names: pure tensor math, shapes, indexing,
creation from numbers, the nn ops), `ALLOWED_PRIM` (TorchScript control flow and list/scalar
plumbing), `ALLOWED_BUILTINS` (names TorchScript source may call), `ALLOWED_PICKLE_GLOBALS` (what the
archive's data.pkl may reference), `ALLOWED_GRAPH_TARGETS` (non-aten targets of a `.pt2` graph).
Widening it is a security decision: an op belongs here only when it reads and writes nothing but
tensors and Python scalars (no files, storages, network, processes, Python objects, custom classes).
SECURITY.md gives the threat model per format.
"""

from __future__ import annotations

import ast
import io
import json
import pickletools
import re
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from deadrelu_cli.errors import UserError
from deadrelu_cli.loaders.detect import check_archive, refuse_ambiguous_names

# Pure tensor math: pointwise, reductions, views and shapes, indexing, creation from numbers, nn ops,
# linear algebra. Base names (overloads such as `.Tensor` / `.default` are stripped before the lookup).
ALLOWED_ATEN: frozenset[str] = frozenset(
    """
    abs absolute acos acosh adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d
    adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d add addbmm addcdiv addcmul addmm addmv
    addr affine_grid_generator alias alias_copy all allclose amax amin aminmax angle any arange argmax
    argmin argsort argwhere as_strided as_strided_copy as_strided_scatter as_tensor asin asinh atan atan2
    atanh atleast_1d atleast_2d atleast_3d avg_pool1d avg_pool2d avg_pool3d baddbmm batch_norm
    bernoulli bilinear binary_cross_entropy binary_cross_entropy_with_logits bincount bitwise_and
    bitwise_left_shift bitwise_not bitwise_or bitwise_right_shift bitwise_xor block_diag bmm
    broadcast_shapes broadcast_tensors broadcast_to bucketize cartesian_prod cat cauchy cdist ceil
    celu channel_shuffle chunk clamp clamp_max clamp_min clip clone col2im column_stack complex concat
    concatenate conj conj_physical constant_pad_nd contiguous conv1d conv2d conv3d conv_tbc
    conv_transpose1d conv_transpose2d conv_transpose3d convolution copy copysign cos cosh
    cosine_similarity count_nonzero cross cross_entropy_loss cummax cummin cumprod cumsum deg2rad detach
    diag diag_embed diagonal diagonal_copy diagonal_scatter diff digamma dist div divide dot dropout
    dsplit dstack einsum elu embedding embedding_bag empty empty_like empty_permuted empty_strided eq
    equal erf erfc erfinv exp exp2 expand expand_as expand_copy expm1 exponential eye feature_alpha_dropout
    feature_dropout fill fill_diagonal flatten flip fliplr flipud float_power floor floor_divide fmax
    fmin fmod frac full full_like gather gcd ge gelu geometric glu greater greater_equal grid_sampler
    grid_sampler_2d group_norm gru gru_cell gt hardshrink hardsigmoid hardswish hardtanh heaviside
    hinge_embedding_loss histc hsplit hstack huber_loss hypot i0 igamma igammac im2col imag index
    index_add index_copy index_fill index_put index_reduce index_select instance_norm isclose isfinite
    isin isinf isnan isneginf isposinf isreal kl_div kron kthvalue l1_loss layer_norm lcm ldexp le
    leaky_relu lerp less less_equal lgamma linear linspace log log10 log1p log2 log_normal log_sigmoid
    log_softmax logaddexp logaddexp2 logcumsumexp logical_and logical_not logical_or logical_xor logit
    logspace logsumexp lstm lstm_cell lt margin_ranking_loss masked_fill masked_scatter masked_select
    matmul max max_pool1d max_pool1d_with_indices max_pool2d max_pool2d_with_indices max_pool3d
    max_pool3d_with_indices max_unpool2d max_unpool3d maximum mean median meshgrid min minimum mish mm
    mode moveaxis movedim mse_loss msort mul multinomial multiply mv mvlgamma nan_to_num nanmean
    nanmedian nansum narrow narrow_copy native_batch_norm native_dropout native_group_norm
    native_layer_norm ne neg negative new_empty new_empty_strided new_full new_ones new_zeros nextafter
    nll_loss nll_loss2d nll_loss_nd nonzero norm normal not_equal numel one_hot ones ones_like outer pad
    pairwise_distance pdist permute permute_copy pixel_shuffle pixel_unshuffle poisson_nll_loss polar
    positive pow prelu prod rad2deg rand rand_like randint randint_like randn randn_like randperm ravel
    real reciprocal reflection_pad1d reflection_pad2d reflection_pad3d relu relu6 remainder renorm
    repeat repeat_interleave replication_pad1d replication_pad2d replication_pad3d reshape reshape_as
    rms_norm rnn_relu rnn_relu_cell rnn_tanh rnn_tanh_cell roll rot90 round rrelu rsqrt rsub
    scaled_dot_product_attention scalar_tensor scatter scatter_add scatter_reduce searchsorted select
    select_copy select_scatter selu sgn sigmoid sign signbit silu sin sinc sinh slice slice_copy
    slice_scatter smooth_l1_loss soft_margin_loss softmax softmin softplus softshrink sort split
    split_with_sizes sqrt square squeeze squeeze_copy stack std std_mean sub subtract sum sum_to_size
    swapaxes swapdims sym_constrain_range sym_constrain_range_for_size sym_numel sym_size sym_storage_offset
    sym_stride t t_copy take take_along_dim tan tanh tanhshrink tensor tensor_split tensordot threshold
    tile to topk trace transpose transpose_copy trapz triangular_solve tril tril_indices triplet_margin_loss
    triu triu_indices true_divide trunc type_as unbind unbind_copy unflatten unfold unfold_copy uniform
    unique_consecutive unique_dim unsafe_chunk unsafe_split unsqueeze unsqueeze_copy upsample_bicubic2d
    upsample_bilinear2d upsample_linear1d upsample_nearest1d upsample_nearest2d upsample_nearest3d
    upsample_trilinear3d var var_mean vdot view view_as view_as_complex view_as_real view_copy vsplit
    vstack where xlogy zero zeros zeros_like
    numpy_T matrix_H mT mH adjoint
    _adaptive_avg_pool2d _adaptive_avg_pool3d _assert_async _assert_scalar _assert_tensor_metadata
    _cast_Float _cast_Long _convolution _log_softmax _native_batch_norm_legit
    _native_batch_norm_legit_functional _native_batch_norm_legit_no_training _reshape_alias _softmax
    _to_copy _unsafe_view _upsample_bilinear2d_aa _upsample_nearest_exact1d _upsample_nearest_exact2d
    _upsample_nearest_exact3d _upsample_bicubic2d_aa _upsample_lanczos2d_aa _weight_norm _weight_norm_interface
    is_autocast_enabled is_autocast_cpu_enabled to_padded_tensor
    _scaled_dot_product_attention_math _scaled_dot_product_flash_attention_for_cpu
    _scaled_dot_product_efficient_attention _scaled_dot_product_flash_attention _transformer_encoder_layer_fwd
    _native_multi_head_attention _masked_softmax _pack_padded_sequence _pad_packed_sequence
    _dim_arange _shape_as_tensor _autocast_to_reduced_precision _autocast_to_full_precision
    _has_compatible_shallow_copy_type _nested_tensor_from_mask _nested_tensor_from_mask_left_aligned
    linalg_vector_norm linalg_norm linalg_matrix_norm fft_fft fft_ifft fft_rfft fft_irfft fft_fftn
    fft_ifftn fft_rfftn fft_irfftn fft_fft2 fft_ifft2 fft_rfft2 fft_irfft2 fft_fftshift fft_ifftshift
    special_erf special_expit special_logit special_xlog1py
    lift_fresh lift_fresh_copy resolve_conj resolve_neg is_floating_point is_complex is_contiguous
    is_nonzero is_same_size is_signed item size stride dim ndimension len device dtype layout
    storage_offset requires_grad_ set_grad_enabled is_grad_enabled detach_ bool Bool Int Float Complex
    ScalarImplicit IntImplicit FloatImplicit ComplexImplicit __and__ __or__ __xor__ __not__ __lshift__
    __rshift__ __contains__ __getitem__ __is__ __isnot__ __round_to_zero_floordiv __range_length
    __derive_index __upsample __upsample_bilinear __interpolate _set_item _get_tracing_state warn
    append extend insert pop clear keys values items get setdefault copy_ list tensors dict str
    format join split splitlines strip startswith endswith lower upper replace count find
    floordiv mod divmod factorial radians degrees
    int float complex sorted reverse __getstate__ __setstate__
    """.split()
)
# Trailing-underscore in-place variants of the ops above (relu_, add_, fill_, …) are allowed too: they
# write into a tensor the graph already holds; `from_file`, storages and the like are never in the list.

ALLOWED_PRIM: frozenset[str] = frozenset(
    """
    RaiseException unchecked_cast Uninitialized TupleIndex TupleUnpack TupleConstruct ListConstruct
    ListUnpack DictConstruct Constant device dtype layout min max abs is_cuda is_cpu is_mps is_xpu
    is_meta is_quantized is_sparse is_mkldnn is_vulkan is_nested data requires_grad shape grad
    NumToTensor ImplicitTensorToNum AutogradZero AutogradAdd isinstance unchecked_unwrap_optional
    BroadcastSizes ConstantChunk layout_ EnumName EnumValue StringIndex rangelist type index
    """.split()
)

# Names TorchScript source may call (builtins and type-annotation helpers); `print` is not among them.
ALLOWED_BUILTINS: frozenset[str] = frozenset(
    """
    int float bool str complex len range enumerate zip min max abs round divmod isinstance annotate
    unchecked_cast uninitialized getattr hasattr list tuple dict sorted any all sum hash ord chr
    Tensor List Tuple Dict Optional Union NoneType Final Any Future Device
    """.split()
)

# Globals the pickles inside a TorchScript archive may reference (module, name); `__torch__.*` classes
# are allowed only when the archive's own code/ defines them.
ALLOWED_PICKLE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_qtensor"),
        ("collections", "OrderedDict"),
        ("torch.jit._pickle", "build_intlist"),
        ("torch.jit._pickle", "build_doublelist"),
        ("torch.jit._pickle", "build_boollist"),
        ("torch.jit._pickle", "build_tensorlist"),
        ("torch.jit._pickle", "build_tensor_from_id"),
        ("torch.jit._pickle", "restore_type_tag"),
        ("torch", "device"),
    }
)
STORAGE_GLOBAL = re.compile(r"^torch(\.cuda)?\.\w*Storage$")

# Non-aten call targets of a .pt2 graph: Python's own operators on sizes and the symbolic-shape helpers.
ALLOWED_GRAPH_TARGETS: frozenset[str] = frozenset(
    """
    _operator.getitem _operator.add _operator.sub _operator.mul _operator.floordiv _operator.truediv
    _operator.mod _operator.pow _operator.neg _operator.eq _operator.ne _operator.lt _operator.le
    _operator.gt _operator.ge _operator.and_ _operator.or_ _operator.not_ _operator.pos _operator.abs
    math.ceil math.floor math.sqrt math.trunc builtins.getattr
    torch.sym_int torch.sym_float torch.sym_max torch.sym_min torch.sym_not torch.sym_sqrt torch.sym_ite
    torch._sym_sqrt torch.sym_sum
    """.split()
)
# Names that TorchScript source uses as modules (everything else with attributes is a value).
MODULE_ROOTS = ("torch", "ops", "__torch__", "math", "CONSTANTS")
# Namespaces whose ops TorchScript / torch.export emit for plain models.
ALLOWED_NAMESPACES = ("aten", "prim")

DENIED_WORDS = ("file", "storage", "save", "load", "_unsafe_", "pickle", "socket", "process")


def op_allowed(name: str, namespace: str = "aten") -> bool:
    """Whether `namespace::name` (overload already stripped) is pure tensor math by the lists above."""
    if namespace == "prim":
        return name in ALLOWED_PRIM or name in ALLOWED_ATEN
    if namespace != "aten":
        return False
    base = name[:-1] if name.endswith("_") and not name.endswith("__") else name
    if name != "_unsafe_view" and any(word in name for word in DENIED_WORDS):
        return False
    return name in ALLOWED_ATEN or base in ALLOWED_ATEN


def _refuse(path: Path, what: str, where: str) -> UserError:
    return UserError(
        f"{path}: refused to load: it would run {what} ({where}), which is not pure tensor math; "
        "if you trust its source, pass --trust-pickle (it trusts code in the file too)"
    )


# --- TorchScript -----------------------------------------------------------------------------------


def _attribute_chain(node: ast.AST) -> list[str] | None:
    """`a.b.c` -> ["a", "b", "c"]; None when the chain does not start at a name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return parts[::-1]
    return None


def _defined_qualnames(sources: dict[str, ast.Module]) -> tuple[set[str], set[str]]:
    """`__torch__.…` classes and functions the archive's own code defines, and every method name."""
    qualnames: set[str] = set()
    methods: set[str] = set()
    for member, tree in sources.items():
        start = member.lower().index("/code/") + len("/code/")  # found case-insensitively, as torch does
        module = member[start : -len(".py")].replace("/", ".")
        for node in tree.body:
            if isinstance(node, ast.ClassDef | ast.FunctionDef):
                qualnames.add(f"{module}.{node.name}")
            if isinstance(node, ast.ClassDef):
                methods.update(n.name for n in node.body if isinstance(n, ast.FunctionDef))
    return qualnames, methods


def _setstate_violations(function: ast.FunctionDef, where: str) -> Iterator[tuple[str, str]]:
    """A `__setstate__` may only assign attributes from its state (no calls beyond unpacking)."""
    harmless_calls = {"unchecked_cast", "annotate", "uninitialized"}
    for statement in function.body:
        if isinstance(statement, ast.Return) and (
            statement.value is None
            or (isinstance(statement.value, ast.Constant) and statement.value.value is None)
        ):
            continue
        if isinstance(statement, ast.Pass):
            continue
        if isinstance(statement, ast.Assign | ast.AnnAssign):
            for node in ast.walk(statement):
                if isinstance(node, ast.Call):
                    chain = _attribute_chain(node.func) or ["?"]
                    if chain[-1] not in harmless_calls:
                        yield (f"{'.'.join(chain)} inside __setstate__", f"{where}, line {node.lineno}")
            continue
        yield (
            f"a {type(statement).__name__.lower()} statement inside __setstate__",
            f"{where}, line {statement.lineno}",
        )


def _source_violations(
    where: str, tree: ast.Module, qualnames: set[str], methods: set[str]
) -> Iterator[tuple[str, str]]:
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "__setstate__":
            yield from _setstate_violations(node, where)
        if isinstance(node, ast.Import | ast.ImportFrom | ast.Global | ast.Nonlocal | ast.Lambda):
            yield (f"a {type(node).__name__.lower()} statement", f"{where}, line {node.lineno}")
        if isinstance(node, ast.Attribute) and id(node) not in inner:  # the whole chain `a.b.c` once
            chain = _attribute_chain(node)
            if not chain:
                continue
            root = chain[0]
            if root == "torch":
                if len(chain) >= 2 and chain[1] in ("classes", "ops", "jit", "_C", "cuda"):
                    yield (".".join(chain), f"{where}, line {node.lineno}")
                if len(chain) > 2 or not op_allowed(chain[1]):
                    yield (f"aten::{chain[1]}", f"{where}, line {node.lineno}")
            elif root == "ops" and len(chain) >= 3:
                if not op_allowed(chain[2], chain[1]):
                    yield (f"{chain[1]}::{chain[2]}", f"{where}, line {node.lineno}")
            elif root == "__torch__":
                # a reference to a class/function of this archive, or an attribute of one (a constant)
                qualname = ".".join(chain)
                if not any(qualname == q or qualname.startswith(q + ".") for q in qualnames):
                    yield (qualname, f"{where}, line {node.lineno}")
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):
                if func.id in ("print", "exec", "eval", "open", "compile", "__import__", "input"):
                    yield (func.id, f"{where}, line {node.lineno}")
                elif func.id in ("getattr", "hasattr", "setattr") and (
                    func.id == "setattr"
                    or not node.args
                    or (isinstance(node.args[0], ast.Name) and node.args[0].id in MODULE_ROOTS)
                ):  # an op looked up by name would bypass the attribute checks above
                    yield (f"{func.id} on a module", f"{where}, line {node.lineno}")
            elif isinstance(func, ast.Attribute):
                chain = _attribute_chain(func)
                if chain is None or chain[0] not in MODULE_ROOTS:
                    # a method called on a value: a tensor method is an aten op, or a method of this
                    # archive's own classes (forward, …), or a list/dict/str method
                    name = func.attr
                    if name not in methods and not op_allowed(name):
                        yield (f"the method {name}", f"{where}, line {node.lineno}")


def _pickle_globals(data: bytes) -> Iterator[tuple[str, str]]:
    """(module, name) of every GLOBAL / STACK_GLOBAL in a pickle, without unpickling it."""
    strings: list[str] = []
    memo: dict[int, object] = {}
    last = None
    for opcode, arg, _ in pickletools.genops(data):
        name = opcode.name
        if name == "GLOBAL":
            module, _, attr = str(arg).partition(" ")
            yield module, attr
            last = None
        elif name == "STACK_GLOBAL":
            if len(strings) < 2:
                yield "?", "?"
            else:
                yield strings[-2], strings[-1]
        elif name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            strings.append(arg)
            last = arg
        elif name in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
            memo[arg if name != "MEMOIZE" else len(memo)] = last
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            value = memo.get(arg)
            if isinstance(value, str):
                strings.append(value)
            last = value
        else:
            last = None


def _pickle_violations(
    path: Path, member: str, data: bytes, qualnames: set[str]
) -> Iterator[tuple[str, str]]:
    try:
        found = list(_pickle_globals(data))
    except Exception:  # noqa: BLE001 - a pickle pickletools cannot walk is not one we load
        raise UserError(
            f"{path}: archive member {member} is not a readable pickle; refusing to load it"
        ) from None
    for module, name in found:
        if (module, name) in ALLOWED_PICKLE_GLOBALS or STORAGE_GLOBAL.match(f"{module}.{name}"):
            continue
        if module.startswith("__torch__") and f"{module}.{name}" in qualnames:
            continue
        yield (f"the Python object {module}.{name}", member)


def torchscript_violations(path: str | Path, data: bytes | None = None) -> Iterator[tuple[str, str]]:
    """(what, where) for everything a TorchScript archive's code or pickles reach outside the allowlist.
    `data`: the archive's bytes as read once (then exactly those are checked, not the file again)."""
    path = Path(path)
    with zipfile.ZipFile(io.BytesIO(data) if data is not None else path) as archive:
        members = archive.namelist()
        refuse_ambiguous_names(path, members)  # the bytes torch.jit.load gets, not only the file
        sources: dict[str, ast.Module] = {}
        for member in members:
            # names compared as torch's reader finds them: case-insensitively (`CODE/…/m.PY` is code)
            if "/code/" in member.lower() and member.lower().endswith(".py"):
                text = archive.read(member).decode("utf-8", errors="replace")
                try:
                    sources[member] = ast.parse(text)
                except (SyntaxError, ValueError, RecursionError) as exc:
                    raise UserError(
                        f"{path}: archive member {member} is not TorchScript source ({type(exc).__name__}); "
                        "refusing to load it"
                    ) from None
        qualnames, methods = _defined_qualnames(sources)
        for member, tree in sources.items():
            yield from _source_violations(member, tree, qualnames, methods)
        for member in members:
            if member.lower().endswith(".pkl") and not member.lower().endswith(".debug_pkl"):
                yield from _pickle_violations(path, member, archive.read(member), qualnames)


def check_torchscript(path: str | Path, data: bytes | None = None) -> None:
    """Refuse (UserError, one line naming the op) a TorchScript archive that is not pure tensor math."""
    for what, where in torchscript_violations(path, data):
        raise _refuse(Path(path), what, where)


# --- torch.export (.pt2) ---------------------------------------------------------------------------


def _graph_targets(document: object) -> Iterator[str]:
    """The `target` of every node of every graph (subgraphs of higher-order ops included)."""
    stack = [document]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            nodes = item.get("nodes")
            if isinstance(nodes, list):
                for node in nodes:
                    if isinstance(node, dict) and "target" in node:
                        yield str(node["target"])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def graph_target_allowed(target: str) -> bool:
    if target in ALLOWED_GRAPH_TARGETS:
        return True
    parts = target.split(".")
    # torch.ops.<namespace>.<op>[.<overload>]
    if len(parts) >= 4 and parts[:2] == ["torch", "ops"]:
        return op_allowed(parts[3], parts[2])
    return False


def exported_violations(path: str | Path) -> Iterator[tuple[str, str]]:
    """(what, where) for every call of a .pt2's serialized graph outside the allowlist."""
    path = Path(path)
    with zipfile.ZipFile(path) as archive:
        members = archive.namelist()
        refuse_ambiguous_names(path, members)
        graphs = [
            m
            for m in members
            if ("/models/" in m.lower() and m.lower().endswith(".json"))
            or m.lower().endswith("serialized_exported_program.json")
        ]
        for member in graphs:
            try:
                document = json.loads(archive.read(member))
            except (ValueError, RecursionError):
                raise UserError(
                    f"{path}: archive member {member} is not a readable graph; refusing to load it"
                ) from None
            for target in _graph_targets(document):
                if not graph_target_allowed(target):
                    yield (target, member)
            for obj in _custom_objects(document):
                yield (f"the custom object {obj}", member)
        yield from _pt2_payload_violations(archive, members)


def _pt2_payload_violations(archive: zipfile.ZipFile, members: list[str]) -> Iterator[tuple[str, str]]:
    """torch.export.load unpickles some members with weights_only=False (sample inputs after a failed
    weights_only load, weights and constants marked `use_pickle`, legacy weight files) and loads
    compiled AOTInductor libraries: each such member must pass torch.load(weights_only=True) here."""
    import io

    import torch

    pickled: list[str] = []
    for member in members:
        lower = member.lower()  # as torch's reader matches names: case-insensitively
        parts = lower.split("/")
        if "aotinductor" in parts or lower.endswith((".so", ".dll", ".dylib")):
            yield ("compiled native code (AOTInductor)", member)
        elif lower.endswith(".pkl") or "/custom_objects/" in lower:
            yield ("a pickled Python object", member)
        elif "sample_inputs" in parts or lower.endswith(".pt"):
            pickled.append(member)
        elif lower.endswith(("weights_config.json", "constants_config.json")):
            try:
                config = json.loads(archive.read(member)).get("config", {})
            except (ValueError, AttributeError, RecursionError):
                yield ("an unreadable payload config", member)
                continue
            folder = member.rsplit("/", 1)[0]
            for fqn, meta in config.items() if isinstance(config, dict) else []:
                path_name = str(meta.get("path_name", "")) if isinstance(meta, dict) else ""
                if path_name.startswith(("custom_obj", "opaque_obj")):
                    yield (f"the Python object behind constant {fqn}", member)
                elif isinstance(meta, dict) and meta.get("use_pickle"):
                    pickled.append(f"{folder}/{path_name}")
    for member in pickled:
        try:
            payload = archive.read(member)
        except KeyError:
            continue  # torch.export.load reports the missing member itself
        if payload[:2] == b"PK":  # a torch.save zip inside the archive: checked as the archive was
            check_archive(Path(f"{archive.filename}:{member}"), data=payload)
        try:
            torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - anything weights_only cannot rebuild would be fully unpickled
            yield ("a pickle that needs more than tensors", member)


def check_exported(path: str | Path) -> None:
    """Refuse (UserError, one line naming the op) a .pt2 whose graph is not pure tensor math."""
    for what, where in exported_violations(path):
        raise _refuse(Path(path), what, where)


def _custom_objects(document: object) -> Iterable[str]:
    stack = [document]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key in ("as_custom_obj", "custom_obj_values") and value:
                    yield str(value.get("class_fqn", key) if isinstance(value, dict) else key)
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)
