"""Torch loaders: state_dict / checkpoint dicts, safetensors, TorchScript, ExportedProgram, pickled modules.

Every torch.load is weights_only=True unless the user passed --trust-pickle; TorchScript and .pt2
archives pass the code policy (loaders/code_policy.py) before torch reads them, unless --trust-pickle.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from deadrelu_cli.errors import UserError
from deadrelu_cli.files import require_temp_folder
from deadrelu_cli.loaders.arch import build_from_arch
from deadrelu_cli.loaders.code_policy import check_exported, check_torchscript
from deadrelu_cli.loaders.detect import TORCH_LEGACY, TORCH_ZIP, check_torch_file
from deadrelu_cli.loaders.model import InputSpec, LoadedModel, LoadOptions, file_sha256_async

# Keys under which training scripts nest the weights (timm, Lightning, torchvision references, …).
STATE_DICT_KEYS = (
    "state_dict",
    "model_state_dict",
    "model_state",
    "model",
    "state_dict_ema",
    "model_ema",
    "ema",
    "net",
    "module",
)
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")


def torch_load(path: Path, device: str, trust_pickle: bool, checked: bool = False):
    """torch.load of a file from outside. `checked`: detect_format has already checked this file's
    archive in this run (the model itself); any other file (an optimizer.pt beside it) is checked here."""
    from safetensors import SafetensorError

    if not checked:
        check_torch_file(path)  # CRCs and zip bombs: torch's reader checks neither
    try:
        return torch.load(path, map_location=device, weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        if trust_pickle:
            raise UserError(f"{path}: cannot unpickle ({exc})") from exc
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        detail = f"it references {found.group(1)}" if found else "it is not a plain weights file"
        raise UserError(
            f"{path}: refused to unpickle: the file needs more than weights ({detail}); "
            "if you trust its source, pass --trust-pickle (it can run code)"
        ) from None
    except ImportError as exc:  # a whole pickled module whose class lives in code not importable here
        if not trust_pickle:
            raise
        raise UserError(
            f"{path}: the pickled model needs module {exc.name or str(exc)!r}, which cannot be imported here; "
            "run deadrelu from the folder that holds its code or add that folder to PYTHONPATH"
        ) from None
    except AttributeError as exc:
        if trust_pickle and str(exc).startswith("Can't get attribute"):
            raise UserError(
                f"{path}: the pickled model needs a class its module no longer defines ({exc}); "
                "put that module's version that saved it on PYTHONPATH, or save a state_dict and pass --arch"
            ) from None
        raise _unreadable(path, exc) from None
    except (
        RuntimeError, EOFError, ValueError, OSError, KeyError, TypeError,
        SafetensorError,  # torch.load hands a file it takes for safetensors to that library
    ) as exc:  # fmt: skip
        raise _unreadable(path, exc) from None


class UnreadEntry:
    """A placeholder for an object of a class deadrelu does not unpickle (a Lightning checkpoint's
    omegaconf hyper-parameters, an argparse Namespace): made and filled by nothing of that class's code.
    It keeps what the pickle gave it (plain data), only so that tensors inside can be found."""

    def __init__(self, *args, **kwargs) -> None:
        self.held = [args, kwargs]

    def __setstate__(self, state) -> None:
        self.held = [*getattr(self, "held", []), state]


def _tensor_inside_placeholder(obj, inside: bool = False, seen: set | None = None) -> bool:
    """Whether a tensor lies in an UnreadEntry's data: the weights themselves (a whole pickled module of
    the user's classes), not hyper-parameters beside them."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return inside
    if isinstance(obj, UnreadEntry):
        return _tensor_inside_placeholder(getattr(obj, "held", []), True, seen)
    if isinstance(obj, Mapping):
        return any(_tensor_inside_placeholder(v, inside, seen) for v in obj.values())
    if isinstance(obj, list | tuple | set | frozenset):
        return any(_tensor_inside_placeholder(v, inside, seen) for v in obj)
    return False


# builtins that pickles of configuration objects name as values; any other builtin (open, eval, exec,
# getattr) is a call, which no hyper-parameter needs
BUILTIN_TYPES = frozenset(
    {
        "int",
        "float",
        "str",
        "bool",
        "bytes",
        "complex",
        "dict",
        "list",
        "tuple",
        "set",
        "frozenset",
        "object",
        "type",
    }
)
CODE_MODULES = frozenset(
    {"os", "posix", "nt", "subprocess", "sys", "shutil", "importlib", "runpy", "pickle", "marshal", "socket",
     "ctypes", "code", "codeop", "io", "pty", "multiprocessing", "webbrowser", "pdb", "operator", "functools",
     "torch", "numpy", "types", "inspect", "signal", "threading", "_io", "posixpath", "ntpath", "pathlib"}
)  # fmt: skip


def _plain_data_name(name: str) -> bool:
    module, _, attribute = name.rpartition(".")
    if module == "builtins":
        return attribute in BUILTIN_TYPES
    return module.split(".")[0] not in CODE_MODULES


def load_checkpoint_weights(path: Path, device: str, trust_pickle: bool) -> tuple[object, list[str]]:
    """torch_load of a model checkpoint (checked by detect_format), and the names left unread: where
    torch's weights-only reader refuses names that are not torch's (the hyper-parameters beside the
    weights: omegaconf configs, an argparse Namespace), each becomes an inert UnreadEntry class, so the
    weights are read without running any code those names name; a name of torch's (a pickled module:
    the weights inside it) keeps the refusal and its advice."""
    try:
        return torch_load(path, device, trust_pickle, checked=True), []
    except UserError as refusal:
        if trust_pickle or "refused to unpickle" not in str(refusal):
            raise
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # noqa: BLE001 - not readable so: the refusal stands
            raise refusal from None
        # every name the reader refused (a builtin type used as a value: omegaconf's `ref_type=int`), as
        # inert classes: nothing the names name is called. A name of torch's (the weights may be inside
        # it) or one that runs code (builtins.open, os.system: a hostile file, not hyper-parameters)
        # keeps the refusal.
        unread = [n for n in names if "." in n]
        if not unread or not all(_plain_data_name(n) for n in unread):
            raise
        stubs = [(type(name.rsplit(".", 1)[1], (UnreadEntry,), {}), name) for name in unread]
        try:
            with torch.serialization.safe_globals(stubs):
                loaded = torch.load(path, map_location=device, weights_only=True)
        except Exception:  # noqa: BLE001 - torch's reader still refuses: the first refusal says why
            raise refusal from None
        if _tensor_inside_placeholder(loaded):  # the weights are in those objects: a pickled model
            raise refusal from None
        return loaded, unread


def _unreadable(path: Path, exc: Exception) -> UserError:
    return UserError(
        f"{path}: cannot read checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); the file is truncated, corrupted or not a torch checkpoint"
    )


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _holds_weights(inner) -> bool:
    return (
        isinstance(inner, nn.Module)
        or _is_tensor_dict(inner)
        or (
            isinstance(inner, Mapping)
            and bool(inner)
            and _is_tensor_dict({k: v for k, v in inner.items() if isinstance(v, torch.Tensor)})
        )
    )


def weight_dicts(obj) -> list[str]:
    """The keys of a checkpoint dict whose values hold weights (a model, its EMA copy, a GAN's G and D)."""
    if not isinstance(obj, Mapping) or _is_tensor_dict(obj):
        return []
    return [key for key, value in obj.items() if _holds_weights(value)]


def weights_key(obj, chosen: str | None = None) -> str | None:
    """The key of a checkpoint dict that holds its weights (None: the weights are at the top level, or
    there is no single such key); what `unwrap_checkpoint` unwraps, and what a fix writes back into.
    `chosen` (--weights-key): that key, which must hold weights."""
    if chosen is not None:
        candidates = weight_dicts(obj)
        if chosen not in candidates:
            if candidates:
                listed = ", ".join(repr(k) for k in candidates)
                raise UserError(
                    f"--weights-key {chosen!r}: the checkpoint has no weight dict under that key; "
                    f"pass one of its weight dicts: {listed}"
                )
            raise UserError(  # a plain state_dict: its weights are the file's top level, nothing to choose
                f"--weights-key {chosen!r}: the checkpoint holds no weight dicts to choose from (its weights "
                "are at the top level, as in a plain state_dict); leave out --weights-key"
            )
        return chosen
    if not isinstance(obj, Mapping) or _is_tensor_dict(obj):
        return None
    for key in STATE_DICT_KEYS:
        if _holds_weights(obj.get(key)):
            return key
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        return None
    # a training script's own key ({"epoch": …, "weights": {…}, "optim": {…}}): the one tensor dict
    nested = [key for key, value in obj.items() if _is_tensor_dict(value)]
    return nested[0] if len(nested) == 1 else None


def other_weights_note(obj, path: Path, chosen: str | None = None) -> list[str]:
    """A note when a checkpoint dict holds more weight dicts than the one scanned (the model and its
    EMA copy, a GAN's two models): which one was read, and how to scan another."""
    key = weights_key(obj, chosen)
    if key is None:
        return []
    others = [k for k, v in obj.items() if k != key and _holds_weights(v)]
    if not others:
        return []
    listed = ", ".join(repr(k) for k in others)
    if chosen is not None:
        return [f"{path.name}: read the weights under --weights-key {key!r}; it also holds {listed}"]
    return [
        f"{path.name}: scanned the weights under {key!r}; it also holds {listed}. To scan one of those, "
        f"pass --weights-key {others[0]!r} (with an --arch that builds it)"
    ]


def unwrap_checkpoint(obj, chosen: str | None = None):
    """Return the state_dict (or the nn.Module) inside a checkpoint dict (under `chosen`, if given)."""
    if chosen is None and (isinstance(obj, nn.Module) or _is_tensor_dict(obj)):
        return obj
    if isinstance(obj, Mapping):
        key = weights_key(obj, chosen)
        inner = obj if key is None else obj[key]
        if isinstance(inner, nn.Module) or _is_tensor_dict(inner):
            return inner
        tensors = {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
        nested = [key for key, value in obj.items() if _is_tensor_dict(value)]
        found = f"several weight dicts ({', '.join(map(str, nested))})" if nested else "no weights"
        how = "pass --weights-key NAME to read one, or save" if nested else "save"
        raise UserError(
            f"checkpoint dict has {found} and none under {', '.join(STATE_DICT_KEYS)} "
            f"(keys: {', '.join(map(str, list(obj)[:8]))}); {how} the model's state_dict on its own"
        )
    raise UserError(f"checkpoint holds a {type(obj).__name__}, not a state_dict or a model")


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Strip DataParallel `module.`, Lightning `model.` and torch.compile `_orig_mod.` prefixes when that fits better;
    when no key fits as it is, also the one attribute name every key starts with (a LightningModule's
    `self.net`, `self.backbone`) if that makes every expected key fit."""
    state = dict(state)
    while True:
        matches = len(expected & state.keys())
        best = None
        prefixes = list(WRAPPER_PREFIXES)
        first = {k.split(".", 1)[0] for k in state}
        if matches == 0 and len(first) == 1 and all("." in k for k in state):
            prefixes.append(f"{first.pop()}.")
        for prefix in prefixes:
            if state and all(k.startswith(prefix) for k in state):
                candidate = {k[len(prefix) :]: v for k, v in state.items()}
                known = prefix in WRAPPER_PREFIXES
                if len(expected & candidate.keys()) > matches and (known or expected <= candidate.keys()):
                    best = candidate
                    break
        if best is None:
            return state
        state = best


def load_state_into(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str, layout: dict | None = None
) -> list[str]:
    """Load every weight the architecture has (strictly: a missing one is an error, never a random init);
    tensors it has no place for (a training head, a loss's parameters) are left out with a note.
    `layout`, when given, receives what writing the weights back in the source's own key names takes:
    "key_prefix" (the wrapper prefix stripped, e.g. "model."), "left_out" (the tensors left out) and
    "dtypes" (each tensor's stored dtype, by its key in the source)."""
    expected = set(model.state_dict().keys())
    original = state
    state = strip_wrapper_prefixes(state, expected)
    if layout is not None:
        first_before, first_after = next(iter(original), ""), next(iter(state), "")
        layout["key_prefix"] = first_before[: len(first_before) - len(first_after)]
        # the stored dtype of every tensor: fp16/bf16 weights loaded into an fp32 --arch are written back as stored
        layout["dtypes"] = {
            f"{layout['key_prefix']}{k}": v.dtype for k, v in state.items() if isinstance(v, torch.Tensor)
        }
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    if missing:
        parts = [f"{len(missing)} missing (e.g. {', '.join(missing[:3])})"]
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise UserError(
            f"{source}: weights do not fit --arch: {'; '.join(parts)}; check that --arch builds the same architecture"
        )
    notes = []
    if unexpected:
        if layout is not None:
            layout["left_out"] = {f"{layout['key_prefix']}{k}": state[k] for k in unexpected}
        state = {k: v for k, v in state.items() if k in expected}
        notes.append(
            f"{len(unexpected)} tensor(s) of the checkpoint have no place in --arch and were left out: "
            f"{', '.join(unexpected[:5])}{', …' if len(unexpected) > 5 else ''}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = next(
            (line.strip() for line in str(exc).splitlines() if "size mismatch" in line),
            str(exc).splitlines()[0],
        )
        raise UserError(f"{source}: weights do not fit --arch: {first}") from None
    return notes


def _with_notes(loaded: LoadedModel, notes: list[str]) -> LoadedModel:
    loaded.notes.extend(notes)
    return loaded


def forward_parameters(model: nn.Module) -> tuple[list[InputSpec], tuple[str, ...]]:
    """forward()'s required positional inputs, and every argument name it takes by keyword."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return [], ()
    required = [
        InputSpec(p.name)
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    accepted = tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return required, accepted


def _float_dtype(model: nn.Module) -> str:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return str(tensor.dtype).replace("torch.", "")
    return "float32"


def _eager(path: Path, fmt: str, model: nn.Module, sha, device: str) -> LoadedModel:
    model = model.to(device).eval()  # inference semantics (BatchNorm running stats, no dropout) everywhere
    required, accepted = forward_parameters(model)
    return LoadedModel(
        path=path,
        format=fmt,
        digest=sha,
        backend="torch",
        runnable=model,
        kind="eager",
        inputs=required,
        keyword_inputs=accepted,
        float_dtype=_float_dtype(model),
    )


def graph_module_with_stack(program):
    """program.module(), with each node's `nn_module_stack` (call-site names) kept from the program."""
    graph_module = program.module()
    by_name = {node.name: node.meta.get("nn_module_stack") for node in program.graph.nodes}
    for node in graph_module.graph.nodes:
        if "nn_module_stack" not in node.meta and by_name.get(node.name):
            node.meta["nn_module_stack"] = by_name[node.name]
    return graph_module


_UNRESOLVED_OP = re.compile(r"failed to resolve (torch\.ops\.[\w.]+) to an operator")


def load_exported_program(path: Path):
    """torch.export.load, its failures as one line: an operator the program calls that this process
    does not have (a custom op, registered by the code that exported the program) is named. torch logs
    the real error (a whole traceback) as a warning and raises a vague one: the warning is kept from
    stderr and read here instead."""
    logger = logging.getLogger("torch.export")
    kept: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: kept.append(logging.Formatter().format(record))
    saved = logger.handlers, logger.propagate
    logger.handlers, logger.propagate = [handler], False
    try:
        return torch.export.load(str(path))
    except Exception as exc:
        found = _UNRESOLVED_OP.search("\n".join([*kept, str(exc)]))
        if found:
            raise UserError(
                f"{path}: the program calls {found.group(1)}, a custom operator this process does not have "
                "(it is registered by the package that exported it); scan the model before export, or export "
                "it without the custom op (transformers' mixture-of-experts: experts_implementation='batched_mm')"
            ) from None
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(
            f"{path}: cannot load the ExportedProgram ({type(exc).__name__}: {first}); the file is truncated "
            "or from an incompatible torch"
        ) from None
    finally:
        logger.handlers, logger.propagate = saved


def _exported(path: Path, sha, device: str, trust_code: bool) -> LoadedModel:
    if not trust_code:  # read the graph before torch runs or unpickles anything from the archive
        check_exported(path)
    require_temp_folder("loading a .pt2 (torch.export)")
    program = load_exported_program(path)
    graph_module = graph_module_with_stack(program).to(device)
    inputs, fixed_batch = [], None
    user_inputs = [s for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    for spec in user_inputs:
        node = placeholders.get(spec.arg.name)
        val = node.meta.get("val") if node is not None else None
        shape = dtype = None
        if isinstance(val, torch.Tensor):
            shape = tuple(int(d) if isinstance(d, int) else None for d in val.shape)
            dtype = str(val.dtype).replace("torch.", "")
            if shape and shape[0] is not None and fixed_batch is None:
                fixed_batch = shape[0]
        inputs.append(InputSpec(spec.arg.name, shape, dtype))
    float_dtype = next(
        (i.dtype for i in inputs if i.dtype and i.dtype.startswith(("float", "bfloat"))), "float32"
    )
    return LoadedModel(
        path=path,
        format="exported_program",
        digest=sha,
        backend="torch",
        runnable=graph_module,
        kind="exported",
        inputs=inputs,
        float_dtype=float_dtype,
        fixed_batch=fixed_batch,
        extra={"program": program},
    )


def load_torchscript_archive(path: Path, device: str, trust_code: bool, sha256: str | None = None):
    """torch.jit.load of exactly the bytes that were checked: the file is read once, its code checked
    (torch.jit.load already runs __setstate__), and those bytes loaded, so a file swapped in between is
    never what runs. `sha256`: the file must still be the one scanned (fix re-loads it)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise UserError(f"{path}: the file changed since it was scanned; run the command again")
    if not trust_code:
        check_torchscript(path, data)
    require_temp_folder("running TorchScript")
    try:
        return torch.jit.load(io.BytesIO(data), map_location=device)
    except Exception as exc:
        raise UserError(
            f"{path}: cannot load the TorchScript archive ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None


def _torchscript(path: Path, sha, device: str, trust_code: bool) -> LoadedModel:
    module = load_torchscript_archive(path, device, trust_code)
    inputs = []
    try:
        schema = module.forward.schema
        inputs = [InputSpec(a.name) for a in schema.arguments[1:] if not a.has_default_value()]
    except Exception:  # noqa: BLE001 - schema is a nicety for input matching
        pass
    dtype = "float32"
    for tensor in module.parameters():
        if tensor.is_floating_point():
            dtype = str(tensor.dtype).replace("torch.", "")
            break
    return LoadedModel(
        path=path,
        format="torchscript",
        digest=sha,
        backend="torch",
        runnable=module,
        kind="torchscript",
        inputs=inputs,
        float_dtype=dtype,
    )


def load_safetensors(path: Path, device: str) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a header the library refuses (shapes past the file, offsets that
    overlap) is one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(
            f"{path}: cannot read safetensors ({exc}); the file is truncated or corrupted"
        ) from None


def load_torch(options: LoadOptions, fmt: str) -> LoadedModel:
    path = Path(options.path)
    sha = file_sha256_async(path)
    device = options.device
    if fmt == "exported_program":
        return _exported(path, sha, device, options.trust_pickle)
    if fmt == "torchscript":
        return _torchscript(path, sha, device, options.trust_pickle)
    if fmt == "safetensors":
        state = load_safetensors(path, device)
        if not options.arch:
            raise UserError(
                f"{path}: safetensors holds weights only; pass --arch MODULE:FACTORY that builds the model"
            )
        model = build_from_arch(options.arch)
        layout: dict = {}
        notes = load_state_into(model, state, str(path), layout)
        loaded = _with_notes(_eager(path, "safetensors", model, sha, device), notes)
        loaded.extra.update(layout)
        return loaded
    if fmt in (TORCH_ZIP, TORCH_LEGACY):
        whole, unread = load_checkpoint_weights(path, device, options.trust_pickle)
        key = options.weights_key
        obj = unwrap_checkpoint(whole, key)
        if isinstance(obj, nn.Module):
            return _with_notes(_eager(path, "module", obj, sha, device), other_weights_note(whole, path, key))
        if unread:
            shown = ", ".join(unread[:3]) + (", …" if len(unread) > 3 else "")
            unread_note = [
                f"{path}: entries beside the weights hold objects of classes deadrelu does not unpickle ({shown}): "
                "left unread; the weights were read as saved"
            ]
        else:
            unread_note = []
        if not options.arch:
            raise UserError(
                f"{path}: holds a state_dict (weights only); pass --arch MODULE:FACTORY that builds the model, e.g. --arch models.py:build"
            )
        model = build_from_arch(options.arch)
        layout = {}
        notes = (
            load_state_into(model, obj, str(path), layout)
            + other_weights_note(whole, path, key)
            + unread_note
        )
        loaded = _with_notes(_eager(path, "state_dict", model, sha, device), notes)
        loaded.extra.update(layout)
        return loaded
    raise UserError(f"{path}: unsupported model format {fmt}")
