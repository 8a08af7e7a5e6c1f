"""ONNX loader: read (external data only from inside the model's folder), check, infer shapes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from deadrelu_cli.errors import UserError
from deadrelu_cli.loaders.detect import check_readable_file
from deadrelu_cli.loaders.model import (
    InputSpec,
    LoadedModel,
    LoadOptions,
    StreamingSha256,
    bytes_sha256_async,
)


def stored_tensors(model):
    """Every TensorProto the model stores, wherever the message holds one: initializers, tensor
    attributes, the values and indices of sparse tensors (`sparse_initializer`, `sparse_value`),
    model-local functions' nodes, training graphs. A generic walk over the protobuf, not a list of
    fields: a tensor this walk missed would keep its external data, which onnxruntime would then read
    from wherever the location points (relative to the current directory for a model given as bytes)."""
    from onnx import TensorProto

    stack = [model]
    while stack:
        message = stack.pop()
        if isinstance(message, TensorProto):
            yield message
            continue
        for field, value in message.ListFields():
            if field.type == field.TYPE_MESSAGE:
                stack.extend([value] if hasattr(value, "ListFields") else value)


def _check_external_locations(model, path: Path) -> None:
    from onnx import TensorProto

    root = path.parent.resolve()
    for tensor in stored_tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        try:
            target = (root / location).resolve()
        except (OSError, ValueError):  # a NUL byte, a link loop
            raise UserError(
                f"{path}: tensor {tensor.name!r} names an invalid external data file ({location!r}); the file is damaged"
            ) from None
        if Path(location).is_absolute() or not target.is_relative_to(root):
            raise UserError(
                f"{path}: tensor {tensor.name!r} points outside the model's folder ({location}); refusing to read it"
            )
        if not target.is_file():
            raise UserError(
                f"{path}: external data file {location} of tensor {tensor.name!r} is missing next to the model"
            )


def read_onnx(path: str, keep_bytes: dict | None = None):
    """Parse, confine and check an ONNX file. With `keep_bytes` (a dict), the file's bytes are left in
    it under "file" when the graph is self-contained, for a session built without re-serialising the
    weights (backends.onnx.scan.instrumented_bytes), and under "digest" the future of the model's
    sha256: of the file's bytes, followed (external data) by the bytes of every external tensor as read."""
    import onnx
    from google.protobuf.message import DecodeError

    p = check_readable_file(path)
    raw = p.read_bytes()
    try:
        model = onnx.load_from_string(raw)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise UserError(
            f"{path}: not a valid ONNX model ({type(exc).__name__}); the file is truncated or not ONNX"
        ) from None
    if not model.graph.node:
        raise UserError(f"{path}: not a valid ONNX model (the graph has no nodes)")
    if has_undecodable_string(model):
        raise UserError(f"{path}: not a valid ONNX model (a name is not UTF-8 text); the file is damaged")
    _check_external_locations(model, p)
    external = _has_external_data(model)
    hasher = None
    if keep_bytes is not None:
        if external:
            hasher = StreamingSha256()
            hasher.update(raw)
        else:  # the hash of the bytes the scan runs on, not of a second read of a file written over since
            keep_bytes["digest"] = bytes_sha256_async(raw)
    if external:
        _load_external_data(model, p, hasher)
    if hasher is not None:
        keep_bytes["digest"] = hasher.hexdigest_async()
    inlined = bool(model.functions)
    if inlined:  # activations inside model-local functions become call sites of the main graph
        import onnx.inliner

        try:
            model = onnx.inliner.inline_local_functions(model)
        except Exception as exc:  # noqa: BLE001 - onnx raises its own types
            raise UserError(f"{path}: cannot inline the model's local functions ({exc})") from None
    reordered = sort_nodes(model.graph)
    skeleton = weight_free_skeleton(model)
    # where the initializers' bytes lie in the file: their sizes without copying them out of the graph
    # (each read of a TensorProto's raw_data is a copy), and release_weights
    spans = raw_data_spans(raw, model, 0) if not external and not inlined else {}
    try:
        # The graph is checked on its weight-free skeleton (the full check re-parses every weight, tens
        # of ms per 100 MB); the weights themselves are checked for size here and by onnxruntime.
        onnx.checker.check_model(skeleton)
        _check_initializer_sizes(model, {name: span[1] for name, span in spans.items()})
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid graph"
        raise UserError(f"{path}: the ONNX graph fails onnx.checker ({first})") from None
    add_inferred_shapes(model, skeleton)
    if keep_bytes is not None and not external and not inlined and not reordered:
        keep_bytes["file"], keep_bytes["spans"] = raw, spans
    return model


def sort_nodes(graph) -> bool:
    """Put the nodes of `graph` and of its subgraphs in an order where each comes after the nodes whose
    outputs it reads, keeping the stored order wherever it already is one; True when any moved.
    onnxruntime runs a graph stored out of order (onnxruntime's float16 converter with keep_io_types
    appends the input Casts at the end), and onnx.checker refuses one; a cycle is left to the checker."""
    from onnx import AttributeProto

    def reads(node) -> set[str]:
        """What a node reads, its subgraphs' reads of enclosing names included."""
        names = {i for i in node.input if i}
        for attribute in node.attribute:
            subgraphs = [attribute.g] if attribute.type == AttributeProto.GRAPH else list(attribute.graphs)
            for sub in subgraphs:
                inner = {o for n in sub.node for o in n.output} | {i.name for i in sub.input}
                inner |= {t.name for t in sub.initializer}
                names |= {name for n in sub.node for name in reads(n)} - inner
        return names

    moved = False
    nodes = list(graph.node)
    made = {o: k for k, node in enumerate(nodes) for o in node.output if o}
    needs = [
        {made[name] for name in reads(node) if name in made and made[name] != k}
        for k, node in enumerate(nodes)
    ]
    if any(j > k for k, deps in enumerate(needs) for j in deps):
        import heapq

        waiting = [len(deps) for deps in needs]
        users: dict[int, list[int]] = {}
        for k, deps in enumerate(needs):
            for j in deps:
                users.setdefault(j, []).append(k)
        ready = [k for k, count in enumerate(waiting) if count == 0]
        heapq.heapify(ready)
        order = []
        while ready:
            k = heapq.heappop(ready)
            order.append(k)
            for user in users.get(k, ()):
                waiting[user] -= 1
                if waiting[user] == 0:
                    heapq.heappush(ready, user)
        if len(order) == len(nodes):
            del graph.node[:]
            graph.node.extend(nodes[k] for k in order)
            moved = True
    for node in graph.node:
        for attribute in node.attribute:
            subgraphs = [attribute.g] if attribute.type == AttributeProto.GRAPH else list(attribute.graphs)
            for sub in subgraphs:
                moved = sort_nodes(sub) or moved
    return moved


def has_undecodable_string(message) -> bool:
    """True when a string field (a name, an op type, …) is not UTF-8. Protobuf hands such a field back as
    bytes (or raises) only when it is read, and a later step that copies it fails: read every one once
    here (tensors' weight bytes skipped)."""
    from onnx import TensorProto

    def bad(values) -> bool:
        return any(not isinstance(v, str) for v in values)

    stack = [message]
    try:
        while stack:
            msg = stack.pop()
            if isinstance(msg, TensorProto):
                if bad([msg.name, msg.doc_string, *(t for e in msg.external_data for t in (e.key, e.value))]):
                    return True
                continue
            for field, value in msg.ListFields():
                if field.type == field.TYPE_MESSAGE:
                    stack.extend([value] if hasattr(value, "ListFields") else value)
                elif field.type == field.TYPE_STRING and bad(
                    [value] if isinstance(value, str | bytes) else value
                ):
                    return True
    except UnicodeDecodeError:
        return True
    return False


def _load_external_data(model, path: Path, hasher: StreamingSha256 | None = None) -> None:
    """Read every external tensor (those `_check_external_locations` confined to the model's folder)
    into the model: onnxruntime then gets a self-contained graph and opens no file itself. (onnx's
    `load_external_data_for_model` skips sparse tensors and functions, which onnxruntime would read.)
    HASHER gets each tensor's bytes as read (the report's hash covers the weights, not only the graph
    file, and nothing is read twice)."""
    from onnx import TensorProto
    from onnx.checker import ValidationError
    from onnx.external_data_helper import load_external_data_for_tensor

    external = [t for t in stored_tensors(model) if t.data_location == TensorProto.EXTERNAL]
    _check_external_sizes(external, path)
    for tensor in external:
        try:
            load_external_data_for_tensor(tensor, str(path.parent))
        except (OSError, ValueError, ValidationError) as exc:
            # (ValidationError: onnx's own refusals, e.g. a data file with several hard links)
            text = " ".join(str(exc).split())
            raise UserError(f"{path}: cannot read its external data ({text})") from None
        tensor.data_location = TensorProto.DEFAULT
        del tensor.external_data[:]
        if hasher is not None:
            hasher.update(tensor.raw_data)


def _check_external_sizes(tensors, path: Path) -> None:
    """Before reading a byte: each external tensor's bytes (its shape times its element size, what
    onnx would read with no `length`) lie inside its file, and all of them fit in memory — a tensor
    claiming 400 GB of a sparse file inside the folder would otherwise be read whole."""
    import numpy as np
    from onnx import TensorProto, helper

    from deadrelu_cli.memory import available_memory

    total = 0
    for tensor in tensors:
        if tensor.data_type in (TensorProto.STRING, TensorProto.INT4, TensorProto.UINT4) or (
            tensor.data_type == getattr(TensorProto, "FLOAT4E2M1", -1)
        ):
            continue  # no fixed bytes per element (two values per byte): left to onnx and onnxruntime
        info = {entry.key: entry.value for entry in tensor.external_data}
        try:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
            offset = int(info.get("offset", 0) or 0)
            length = int(info["length"]) if info.get("length") else None
        except (KeyError, TypeError, ValueError):
            continue  # onnx and the size check after loading say what is wrong
        needed = int(np.prod([int(d) for d in tensor.dims], dtype=object)) * itemsize
        size = (path.parent / info.get("location", "")).stat().st_size
        if (
            offset < 0
            or offset + (length if length is not None else needed) > size
            or (length is not None and length != needed)
        ):
            raise UserError(
                f"{path}: tensor {tensor.name!r} claims {needed} bytes of {info.get('location')} at offset {offset}, "
                f"which holds {size}; the model or its data file is damaged"
            )
        total += needed
    if total > available_memory():
        raise UserError(
            f"{path}: its external data are {total / 2**30:.1f} GiB, more than the memory available"
        )


def _has_external_data(model) -> bool:
    from onnx import TensorProto

    return any(t.data_location == TensorProto.EXTERNAL for t in stored_tensors(model))


def _check_initializer_sizes(model, raw_lengths: dict[str, int] | None = None) -> None:
    """Each stored tensor's data (raw bytes, or the typed field: float_data, int64_data, …) matches its
    declared shape (what the full checker would refuse): initializers and Constant values, in subgraphs
    too. A tensor that claims 10^12 elements and holds none is damage, not a model to run. RAW_LENGTHS:
    the raw_data sizes of main-graph initializers, read off the file (raw_data_spans), for names no other
    stored tensor has."""
    import numpy as np
    from onnx import TensorProto, helper

    raw_lengths = raw_lengths or {}
    names = Counter(t.name for t in stored_tensors(model)) if raw_lengths else Counter()

    packed = {TensorProto.INT4, TensorProto.UINT4} | (
        {TensorProto.FLOAT4E2M1} if hasattr(TensorProto, "FLOAT4E2M1") else set()
    )
    for init in stored_tensors(model):
        if (
            init.data_type in (TensorProto.STRING, TensorProto.UNDEFINED)
            or init.data_type in packed  # two values per byte: left to onnxruntime
            or init.data_location == TensorProto.EXTERNAL
        ):
            continue
        elements = int(np.prod([int(d) for d in init.dims], dtype=object))
        if init.HasField("raw_data"):
            try:
                itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
            except (KeyError, TypeError, ValueError):
                continue
            known = raw_lengths.get(init.name) if names[init.name] == 1 else None
            held = known if known is not None else len(init.raw_data)
            expected, unit = elements * itemsize, "bytes"
        else:
            try:
                field = helper.tensor_dtype_to_field(init.data_type)
            except (KeyError, TypeError, ValueError):
                continue
            per = 2 if init.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128) else 1
            expected, held, unit = elements * per, len(getattr(init, field)), "values"
        if held != expected:
            raise ValueError(
                f"tensor {init.name!r} holds {held} {unit} for shape {list(init.dims)}, expected {expected}"
            )


def weight_free_skeleton(model):
    """The graph with every initializer turned into a typed input: what shape inference and the checker
    need, without copying a byte of the weights."""
    import onnx
    from onnx import helper

    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)  # model-local functions the nodes may call
    skeleton.graph.name = model.graph.name or "graph"
    skeleton.graph.node.extend(model.graph.node)
    skeleton.graph.input.extend(model.graph.input)
    skeleton.graph.output.extend(model.graph.output)
    known = {value.name for value in model.graph.input}
    for init in model.graph.initializer:
        small_ints = (
            init.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and len(init.dims) <= 1
        )
        if small_ints and (not init.dims or init.dims[0] <= 16):
            # shapes, axes, slice bounds: shape inference reads their values (a Reshape's target shape)
            skeleton.graph.initializer.append(init)
            if model.ir_version >= 4:
                continue
        if init.name not in known:
            skeleton.graph.input.append(
                helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
            )
    for sparse in model.graph.sparse_initializer:  # named by its values tensor
        if sparse.values.name not in known:
            skeleton.graph.input.append(
                helper.make_tensor_value_info(sparse.values.name, sparse.values.data_type, list(sparse.dims))
            )
    return skeleton


def add_inferred_shapes(model, skeleton=None) -> None:
    """Shape inference on a weight-free skeleton of the graph (milliseconds instead of a pass over
    every weight), copied back as value_info."""
    import onnx

    skeleton = skeleton if skeleton is not None else weight_free_skeleton(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton)
    except Exception:  # noqa: BLE001 - shapes are a help, the graph runs without them
        return
    have = {value.name for value in model.graph.value_info}
    model.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in have)
    if any(attr.type == onnx.AttributeProto.GRAPH for node in model.graph.node for attr in node.attribute):
        del model.graph.node[:]  # subgraph shapes live inside the nodes' graph attributes
        model.graph.node.extend(inferred.graph.node)


def input_specs(model) -> list[InputSpec]:
    import onnx

    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        # -1 where an exporter meant "any size" (PaddlePaddle's batch axis): onnxruntime runs any size
        # there, so it is a free axis, not a fixed one
        shape = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None
            for d in tensor_type.shape.dim
        )
        dtype = (
            str(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
            if tensor_type.elem_type
            else None
        )
        specs.append(InputSpec(value.name, shape, dtype))
    return specs


def load_onnx(options: LoadOptions) -> LoadedModel:
    kept: dict = {}
    model = read_onnx(options.path, kept)
    extra: dict = {}
    # self-contained: the file's bytes; external data: those and the external tensors' (read_onnx)
    digest = kept["digest"]
    if "file" in kept:
        # "rereadable": the file's bytes, read again, are the graph (a session built later reads them anew
        # rather than keeping 1x the weights resident for the whole scan); "weight_spans": where each large
        # initializer's bytes lie in the file, for release_weights
        extra = {"file_bytes": kept["file"], "rereadable": True}
        spans = {name: span for name, span in kept["spans"].items() if span[1] >= RELEASE_MIN_BYTES}
        if spans:
            extra["weight_spans"] = spans
    specs = input_specs(model)
    float_dtype = next((s.dtype for s in specs if s.dtype and s.dtype.startswith("float")), "float32")
    return LoadedModel(
        path=Path(options.path),
        format="onnx",
        digest=digest,
        backend="onnx",
        runnable=model,
        kind="onnx",
        inputs=specs,
        float_dtype=float_dtype,
        fixed_batch=next((s.shape[0] for s in specs if s.shape and s.shape[0] is not None), None),
        extra=extra,
    )


# Initializers at least this large are released from the parsed graph during a scan (release_weights);
# the small ones (biases, norms' parameters, shapes, clip bounds) stay, for whatever reads them.
RELEASE_MIN_BYTES = 64 * 1024


def _varint(buf, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _length_fields(buf, start: int, end: int):
    """(field number, start, end) of each length-delimited field of the message in buf[start:end]."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 2:
            size, i = _varint(buf, i)
            if i + size > end:
                raise ValueError("field past the message's end")
            yield number, i, i + size
            i += size
        elif wire == 0:
            _, i = _varint(buf, i)
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:  # groups: not in ONNX's schema
            raise ValueError(f"wire type {wire}")
    if i != end:
        raise ValueError("field past the message's end")


def raw_data_spans(raw: bytes, model, min_bytes: int = RELEASE_MIN_BYTES) -> dict[str, tuple[int, int]]:
    """name -> (offset, length) of the raw_data bytes, inside the file's bytes RAW, of each main-graph
    initializer of at least MIN_BYTES: what onnxruntime can read from the file itself as external
    data. Read off protobuf's wire format (ModelProto.graph = 7, GraphProto.initializer = 5,
    TensorProto.name = 8, raw_data = 9); a layout protobuf would merge (a field given twice, a name shared
    by two initializers) or any span that disagrees with the parsed tensor leaves the tensor out."""
    buf = memoryview(raw)
    try:
        graphs = [(s, e) for number, s, e in _length_fields(buf, 0, len(buf)) if number == 7]
        if len(graphs) != 1:
            return {}
        found: dict[str, list[tuple[int, int]]] = {}
        for number, start, end in _length_fields(buf, *graphs[0]):
            if number != 5:
                continue
            names, data = [], []
            for inner, s, e in _length_fields(buf, start, end):
                if inner == 8:
                    names.append(bytes(buf[s:e]))
                elif inner == 9:
                    data.append((s, e - s))
            if len(names) == 1 and len(data) == 1:
                try:
                    found.setdefault(names[0].decode(), []).append(data[0])
                except UnicodeDecodeError:
                    continue
            elif names:
                found.setdefault(bytes(names[-1]).decode(errors="replace"), []).append((-1, -1))
    except (ValueError, IndexError):
        return {}
    finally:
        buf.release()
    from onnx import TensorProto

    spans = {}
    for init in model.graph.initializer:
        where = found.get(init.name)
        if not where or len(where) != 1 or where[0][1] < max(min_bytes, 0):
            continue
        if init.data_location == TensorProto.EXTERNAL or not init.HasField("raw_data"):
            continue
        spans[init.name] = where[0]
    # a name two initializers share is ambiguous: neither is released
    names = Counter(init.name for init in model.graph.initializer)
    return {name: span for name, span in spans.items() if names[name] == 1}


def _copy_fields(source, target, skip: str) -> None:
    """Every field of message SOURCE but SKIP into the empty message TARGET (copying SKIP is what costs;
    by name, as ListFields would hand out a copy of SKIP's bytes)."""
    for field in source.DESCRIPTOR.fields:
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(getattr(source, field.name))
        elif source.HasField(field.name):
            if field.type == field.TYPE_MESSAGE:
                getattr(target, field.name).CopyFrom(getattr(source, field.name))
            else:
                setattr(target, field.name, getattr(source, field.name))


# The name of the scan's private copy of the model file (release_weights), in its own temporary folder
WEIGHTS_COPY = "weights.onnx"


def release_weights(loaded: LoadedModel) -> bool:
    """Replace the loaded graph by one whose large initializers are references to their bytes in a private
    copy of the model file (ONNX external data: location, offset, length), so that the scan does not
    keep 1x the weights in the parsed graph while onnxruntime holds its own copy. Sessions read them from
    that copy themselves (make_session's weights_dir); anything that needs their values calls
    restore_weights first. Only for a graph that is the file's own (`rereadable`): no inlined functions,
    nothing rewritten. True when something was released.

    Why a copy: onnxruntime maps external data from its file, and a page past the end of a file cut short
    under the map faults inside onnxruntime (SIGBUS, exit 135, no message) — an exporter writing to the
    model's path mid-scan did that. The copy is written from the bytes the loader read (those the
    report's hash is of: load_onnx) into a folder only this user can enter, removed with the model (or
    at exit); on a disk-backed $TMPDIR it is reclaimable page cache, as the model file's pages were (on a
    tmpfs it is 1x the file of memory: SECURITY.md). Where it cannot be
    written (a full disk), nothing is released: the graph keeps its weights."""
    import tempfile
    import weakref

    from onnx import ModelProto, TensorProto

    spans = loaded.extra.pop("weight_spans", None)
    raw = loaded.extra.get("file_bytes")
    if not spans or not loaded.extra.get("rereadable") or raw is None:
        return False
    # weights only: onnxruntime's shape inference reads the values of integer tensors (shapes, axes,
    # pads) and refuses external ones
    weights = {
        TensorProto.FLOAT,
        TensorProto.FLOAT16,
        TensorProto.BFLOAT16,
        TensorProto.DOUBLE,
        TensorProto.INT8,
        TensorProto.UINT8,
    }
    full = loaded.runnable
    released = {
        i.name: spans[i.name] for i in full.graph.initializer if i.name in spans and i.data_type in weights
    }
    if not released:
        return False
    try:
        folder = tempfile.mkdtemp(prefix="deadrelu-weights-")  # 0700: no other user can touch the copy
    except OSError:  # no temporary folder: the graph keeps its weights
        return False
    # removed with the model, at exit, or now on a failure (sessions keep the copy mapped after it is
    # removed: an unlinked file lives while mapped)
    remove = weakref.finalize(loaded, _remove_folder, folder)
    try:
        with open(Path(folder, WEIGHTS_COPY), "xb") as handle:
            handle.write(raw)
    except OSError:  # no space: the graph keeps its weights
        remove()
        return False
    except BaseException:  # Ctrl-C, SIGTERM (cli.app) mid-copy: a large model's partial copy is not left
        remove()
        raise
    light = ModelProto()
    _copy_fields(full, light, "graph")
    _copy_fields(full.graph, light.graph, "initializer")
    for init in full.graph.initializer:
        span = released.get(init.name)
        if span is None:
            light.graph.initializer.append(init)
            continue
        tensor = light.graph.initializer.add()
        _copy_fields(init, tensor, "raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", WEIGHTS_COPY), ("offset", str(span[0])), ("length", str(span[1]))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    loaded.runnable = light  # the parsed graph (and its weights) goes with its last reference
    loaded.extra.pop("file_bytes", None)
    loaded.extra["released"] = released
    loaded.extra["weights_dir"] = folder
    return True


def _remove_folder(folder: str) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def restore_weights(loaded: LoadedModel) -> None:
    """Put released weights (release_weights) back into the loaded graph, from the scan's private copy of
    the file (the bytes the report's hash is of: a model file changed since cannot slip in); for what
    needs their values (--explain, --certify, `fix`)."""
    from onnx import TensorProto

    spans = loaded.extra.get("released")
    if not spans:
        return
    try:
        raw = Path(loaded.extra["weights_dir"], WEIGHTS_COPY).read_bytes()
    except OSError as exc:  # the temporary folder emptied by something else
        raise UserError(
            f"{loaded.path}: the scan's copy of the weights is gone ({exc.strerror}); run the command again"
        ) from None
    view = memoryview(raw)
    for init in loaded.runnable.graph.initializer:
        span = spans.get(init.name)
        if span is None or init.data_location != TensorProto.EXTERNAL:
            continue
        del init.external_data[:]
        init.data_location = TensorProto.DEFAULT
        init.raw_data = bytes(view[span[0] : span[0] + span[1]])
    view.release()
    del loaded.extra["released"]
