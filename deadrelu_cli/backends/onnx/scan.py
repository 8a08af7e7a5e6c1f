"""The ONNX backend of the scan: instrument the graph, run it with onnxruntime, sum the [C] vectors."""

from __future__ import annotations

import os
import re
import time
from collections import Counter

import numpy as np

from deadrelu_cli.calibration import CalibrationData, prefetched
from deadrelu_cli.errors import UserError
from deadrelu_cli.gate import (
    EXPERTS_MERGED,
    FRAMES_NOT_TOLD,
    LAYOUT_AMBIGUOUS,
    MASK_NOT_APPLIED,
    PIXELS_FLATTENED,
    PIXELS_MIXED,
    ROW_ORDER_AMBIGUOUS,
    UNIT_AXIS_ASSUMED,
    UNIT_AXIS_NOT_FOLLOWED,
    unscanned_text,
    unseen_notes,
)
from deadrelu_cli.inputs import (
    OutputArrays,
    batch_mask,
    fixed_batch_error,
    is_pixel_mask,
    label_arrays,
    labels_note,
    layout_probe_size,
    mask_lengths,
    mismatch,
    per_batch_quantization,
    positional_arrays,
    resolve_mask,
    shape_advice,
    unfed_arrays,
)
from deadrelu_cli.loaders.model import LoadedModel, LoadOptions, reread_verified
from deadrelu_cli.loaders.onnx_model import release_weights
from deadrelu_cli.probe.experts import expert_groups, mark_unattributed_rows, merged_experts_note
from deadrelu_cli.probe.onnx_graph import (
    MASK_INPUT,
    OnnxSite,
    cells_keep,
    find_sites,
    frames_keep,
    stored_zero_relus,
)
from deadrelu_cli.probe.ops import NAMED_WHEN_UNSCANNED, axis_guess_notes, axis_lost_note
from deadrelu_cli.stats import LayerStats

_shared_arena: bool | None = None  # whether this process registered its CPU arena with onnxruntime
# ReluStats's jobs per site: onnxruntime's intra-op threads share them out (more jobs than threads cost
# only their partial results)
KERNEL_JOBS = max(1, min(os.cpu_count() or 1, 16))
KERNEL_API = (1, 20)  # the onnxruntime release whose C API the custom op asks for (csrc/ort_relu_stats.c)


def kernel_library(device: str) -> str | None:
    """The custom-op library that counts relu sites in one read (native.onnx_library), for a scan on
    `device`: None on CUDA (the op runs on the CPU), on an onnxruntime older than KERNEL_API, and where
    it cannot be built (no C compiler, DEADRELU_NATIVE=0); the graph's own ops count there instead."""
    if device.startswith("cuda"):
        return None
    import onnxruntime as ort

    release = tuple(int(part) for part in re.findall(r"\d+", ort.__version__)[:2])
    if release < KERNEL_API:
        return None
    from deadrelu_cli import native

    path = native.onnx_library()
    return str(path) if path is not None else None


def shared_cpu_arena(ort) -> bool:
    """One CPU arena for every session of the process (onnxruntime's environment allocator), registered once.

    A scan may build a second session while the first runs (_OutputMaxSwitch, the NaN recount). Each
    session's own arena keeps what its first run took: on a model with large activations the switched
    session's first run took its ~110 MB anew while the first session's stayed resident, so the peak went
    from 1.05x to 1.54x plain inference, depending on whether the timing made the scan switch. Sessions
    that share one arena reuse each other's freed blocks. False when onnxruntime refuses (an older
    release, or the host program registered its own): each session keeps its own arena."""
    global _shared_arena
    if _shared_arena is None:
        try:
            info = ort.OrtMemoryInfo(
                "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
            )
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))  # onnxruntime's defaults
            _shared_arena = True
        except Exception:  # noqa: BLE001 - onnxruntime's own exception types
            _shared_arena = False
    return _shared_arena


def make_session(
    model_bytes: bytes,
    device: str,
    notes: list[str],
    weights_dir: str | None = None,
    library: str | None = None,
):
    """An onnxruntime session of MODEL_BYTES; WEIGHTS_DIR: the scan's private folder holding the copy of
    the model file whose bytes the graph's released initializers reference
    (loaders.onnx_model.release_weights); LIBRARY: the custom-op library its ReluStats nodes need."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            notes.append(
                "--device cuda: onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu); ran on CPU"
            )
    options = ort.SessionOptions()
    # onnxruntime's own log lines (warnings, and errors we report in one line) only under --debug
    severity = 2 if os.environ.get("DEADRELU_DEBUG") == "1" else 4
    ort.set_default_logger_severity(severity)
    options.log_severity_level = severity
    # The statistics branches keep activations alive longer than the plain graph does. With its
    # memory pattern on, onnxruntime re-plans one big block on the first passes of each batch shape
    # (ResNet-18, batch 64: the second pass took 0.7-1.1 s instead of 0.4 s); without it the first passes
    # cost what the plain model's do. onnxruntime's default order (not priority-based, which the scan used
    # before) runs as fast and frees each activation sooner: ResNet-18 at batch 32, the run's memory
    # +101 MB instead of +190 MB (docs/performance.md, seventh session).
    options.enable_mem_pattern = False
    # Between runs the host adds up the statistics and the prefetch thread reads the next batch; spinning
    # intra-op threads would compete with both for the cores (2 cores, ResNet-18 ONNX: 1.13x -> 1.03x plain)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if shared_cpu_arena(ort):
        options.add_session_config_entry("session.use_env_allocators", "1")
    if weights_dir is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", weights_dir)
    try:
        if library is not None:  # inside: a library onnxruntime refuses is a load error like the others
            options.register_custom_ops_library(library)
        if providers != ["CPUExecutionProvider"]:
            return ort.InferenceSession(model_bytes, sess_options=options, providers=providers)
        session = ort.InferenceSession(
            model_bytes, sess_options=options, providers=providers, enable_fallback=0
        )
        # onnxruntime's Python class keeps the bytes it was given for the session's whole life, only to
        # rebuild it on a provider fallback (off here: CPU has nothing to fall back to): 1x the weights
        # wherever they are inside the bytes
        if getattr(session, "_model_bytes", None) is not None:
            session._model_bytes = None
        return session
    except Exception as exc:  # onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # the advice before onnxruntime's words: a long message is cut at the end (errors.one_line)
        raise UserError(
            f"onnxruntime cannot load this model: {load_advice(first)} (onnxruntime: {first})"
        ) from None


def load_advice(message: str) -> str:
    """What to do when onnxruntime refuses a graph: an op of a domain it does not implement (QONNX's
    `onnx.brevitas:Quant`, FINN's custom ops) has to become standard ONNX first."""
    unknown = re.search(r"([\w.]+):(\w+)\(-?\d+\) is not a registered function/op", message)
    if unknown:
        domain, op = unknown.groups()
        return (
            f"its {op} ops (domain {domain!r}) are no ONNX or onnxruntime ops; convert them to standard "
            "ONNX (QONNX: its QCDQ conversion) or scan the float model they were made from"
        )
    return "scan a graph that onnxruntime runs (try onnxruntime.InferenceSession on it)"


def instrumented_bytes(
    loaded: LoadedModel,
    sites: list[OnnxSite],
    threshold: float,
    channel_dim,
    device: str = "cpu",
    max_from_output: frozenset[int] = frozenset(),
    file_bytes: bytes | None = None,
    kernel_jobs: int = 0,
) -> bytes:
    """The instrumented model, serialised for onnxruntime (`kernel_jobs`: probe.onnx_graph.instrument's).

    When every site is in the main graph, instrumenting only appends nodes and outputs, and protobuf
    parses concatenated messages as one merged message: the file's own bytes followed by a small
    message holding the appended nodes and outputs *are* the instrumented model. That skips
    re-serialising every weight (~0.1 s per 50 MB) and keeps the model's outputs, which plain
    inference computes too. Otherwise (graphs with If/Loop/Scan nodes, external data, inlined local
    functions: the loaded nodes differ from the file's), the copy is serialised whole. The file's bytes
    are FILE_BYTES, else those the loader kept, which are dropped here: a later session reads them anew
    (_OutputMaxSwitch), so the scan does not hold the weights once more for its whole run."""
    import onnx

    from deadrelu_cli.probe.onnx_graph import instrument

    # The exact step avoids copies out of onnxruntime's CPU layout; on CUDA there is no such layout, and
    # cuDNN may flush subnormals or round through TF32, so Greater counts there.
    exact_step = not device.startswith("cuda")
    model = loaded.runnable
    raw = file_bytes if file_bytes is not None else loaded.extra.pop("file_bytes", None)
    # With subgraphs, shape inference has rewritten the nodes, so they no longer prefix the file's
    has_subgraphs = any(
        attr.type == onnx.AttributeProto.GRAPH for node in model.graph.node for attr in node.attribute
    )
    if raw is None or has_subgraphs:
        return instrument(
            model,
            sites,
            threshold,
            channel_dim,
            exact_step=exact_step,
            max_from_output=max_from_output,
            kernel_jobs=kernel_jobs,
        ).SerializeToString()
    # Instrument a weight-free shell of the graph (nodes, inputs, outputs, shapes): copying the whole
    # model only to cut the appended part off again cost ~50 ms per 45 MB of weights.
    shell = onnx.ModelProto()
    shell.ir_version = model.ir_version
    shell.opset_import.extend(model.opset_import)
    for part in ("node", "input", "output", "value_info"):
        getattr(shell.graph, part).extend(getattr(model.graph, part))
    instrumented = instrument(
        shell,
        sites,
        threshold,
        channel_dim,
        keep_outputs=True,
        exact_step=exact_step,
        max_from_output=max_from_output,
        kernel_jobs=kernel_jobs,
    )
    appended = onnx.ModelProto()
    # a custom op's domain (merged lists append: the file's imports, then this one)
    appended.opset_import.extend(instrumented.opset_import[len(model.opset_import) :])
    appended.graph.node.extend(instrumented.graph.node[len(model.graph.node) :])
    appended.graph.initializer.extend(instrumented.graph.initializer)
    appended.graph.output.extend(instrumented.graph.output[len(model.graph.output) :])
    appended.graph.input.extend(instrumented.graph.input[len(model.graph.input) :])  # a position mask
    return raw + appended.SerializeToString()


def activation_bytes_per_sample(model) -> int | None:
    """One sample's share of every intermediate tensor shape inference sized (all but the first axis
    static), summed: what --batch-size auto bounds. None when shape inference sized none."""
    from onnx import helper

    total, sized = 0, False
    for value in model.graph.value_info:
        tensor = value.type.tensor_type
        dims = tensor.shape.dim
        if not value.type.HasField("tensor_type") or len(dims) < 2 or not tensor.elem_type:
            continue
        rest = [d.dim_value if d.HasField("dim_value") else 0 for d in dims[1:]]
        if not all(rest):
            continue
        try:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)).itemsize
        except (KeyError, TypeError, ValueError):
            continue
        total += int(np.prod(rest, dtype=np.int64)) * itemsize
        sized = True
    return total if sized else None


def onnx_batch_size(
    requested, loaded: LoadedModel, data: CalibrationData, order: dict[str, str], sample_cost=None
) -> int:
    """--batch-size as given; auto: the graph's fixed batch (`_batch_size` found it), else sized by its
    activations: the larger of what one sample's run made the process hold (`sample_cost`) and what
    shape inference sized."""
    from deadrelu_cli.inputs import resolve_batch_size

    if requested == "auto":
        if loaded.fixed_batch is not None:
            return loaded.fixed_batch
        if "auto_batch_size" in loaded.extra:  # the scan's choice, for the passes after it (fix)
            return loaded.extra["auto_batch_size"]

    def per_sample() -> int | None:
        # the larger of the two: the run may reuse memory freed earlier, shape inference may not size all
        measured = sample_cost() if sample_cost is not None else None
        return max(measured or 0, activation_bytes_per_sample(loaded.runnable) or 0) or None

    size = resolve_batch_size(requested, data, list(order.values()), activation_bytes=per_sample)
    if requested == "auto":
        loaded.extra["auto_batch_size"] = size
    return size


def one_sample_growth(session, output_names: list[str], feeds: dict) -> int | None:
    """Resident bytes the process gained running one sample (onnxruntime keeps its arena): the scan's
    memory per sample, measured, for --batch-size auto. None where it cannot be read."""
    from deadrelu_cli.memory import resident_memory

    before = resident_memory()
    session.run(output_names, feeds)
    after = resident_memory()
    return None if before is None or after is None else max(0, after - before)


def feed_order(model: LoadedModel, data: CalibrationData) -> dict[str, str]:
    """model input name -> data array name."""
    wanted = [spec.name for spec in model.inputs]
    labels = label_arrays(model, data.names)
    # a position mask the graph does not take (inputs.unfed_arrays), and label arrays
    unfed = set(getattr(data, "unfed", ())) | set(labels)
    names = [n for n in data.names if n not in unfed]
    if labels and labels_note(labels) not in model.notes:
        model.notes.append(labels_note(labels))
    if len(wanted) == 1 and len(names) == 1:
        return {wanted[0]: names[0]}
    positional = positional_arrays(names, wanted)
    if positional:
        return dict(zip(wanted, positional, strict=True))
    missing = [w for w in wanted if w not in names]
    if missing:
        raise mismatch(data, model, f"no array for model input(s) {', '.join(missing)}")
    extra = [n for n in names if n not in wanted]
    if extra:
        raise mismatch(data, model, f"arrays {', '.join(extra)} match no model input")
    return {w: w for w in wanted}


def _discover_shapes(
    model,
    sites: list[OnnxSite],
    data: CalibrationData,
    order: dict[str, str],
    dtypes: dict,
    device: str,
    batch_size: int = 1,
    mask=None,
    channel_dim: int | None = None,
    weights_dir: str | None = None,
) -> None:
    """Sites whose rank shape inference could not tell, and with a position mask (`mask`, an
    inputs.MaskSpec) every site of the main graph: run one batch exposing Shape(x) only. Sets the rank,
    and where a site's tensor holds the mask's [batch, tokens] positions, its `token_layout` (decided as
    the torch probe decides it, probe.ops.token_layout, from the shapes of that batch), or those of the
    frames a conv subsampler makes of them (`frames`: a speech encoder's, probe.onnx_graph.frame_chains),
    and for the body sites of a Scan that iterates the tokens, TOKEN_STEPS (probe.onnx_graph.token_steps).
    With a mask the same session also exposes each main-graph site's per-index sums of |x| along its
    first two axes, which `_tell_layouts` reads where the shapes cannot say the layout."""
    from onnx import TensorProto, helper

    from deadrelu_cli.probe.onnx_graph import (
        CONV_FRAMES,
        TOKEN_STEPS,
        frame_chains,
        frame_steps,
        lift_to_main,
        reached_from,
        site_channel_dim,
        site_frames,
        subgraph_map,
        token_steps,
        unmapped_steps,
    )
    from deadrelu_cli.probe.ops import layout_ambiguous, row_order_ambiguous, token_layout
    from deadrelu_cli.wiring.onnx_index import opset_version

    if mask is not None:
        for site in sites:
            if site.graph_path:  # until its shape on the first batch says where the tokens are
                site.mask_unapplied = "in a subgraph"
    probe = type(model)()
    probe.CopyFrom(model)
    graphs, owners = subgraph_map(probe.graph)
    # If branches see the batch's tensors, and so may a Loop body (a loop over layers); a Scan body
    # sees per-step slices, whose positions are not the batch's
    reachable = [
        s
        for s in sites
        if s.graph_path
        and mask is not None
        and opset_version(model) >= 9
        and _owner_types(owners, s.graph_path) <= {"If", "Loop"}
    ]
    # a Scan of the main graph: its body's sites are masked per step where it iterates the tokens
    stepped = [
        s
        for s in sites
        if len(s.graph_path) == 1
        and mask is not None
        and opset_version(model) >= 9
        and owners[s.graph_path][1].op_type == "Scan"
    ]
    unknown = [s for s in sites if not s.graph_path and (s.rank is None or mask is not None)]
    unknown += reachable + stepped
    if not unknown:
        return
    del probe.graph.output[:]
    opset = opset_version(probe)
    for i, site in enumerate(unknown):
        name = f"deadrelu_rank_{i}"
        graphs[site.graph_path].node.append(helper.make_node("Shape", [site.input_name], [name], name=name))
        lifted = lift_to_main(
            graphs,
            owners,
            site.graph_path,
            {"shape": name},
            {"shape": TensorProto.INT64},
            lambda builder, _key: builder.const(np.zeros((0,), np.int64), "noshape"),
            opset,
            f"r{i}",
            site.name,
        )
        probe.graph.output.append(helper.make_tensor_value_info(lifted["shape"], TensorProto.INT64, None))
    # the sums that tell a layout by reordering the samples, in this session (no second one to build):
    # main-graph sites whose rank shape inference knows
    pixels = is_pixel_mask(mask, data)  # an image's [B, H, W]: its sites' layout is read off their shapes
    summed = [
        s
        for s in unknown
        if mask is not None and not pixels and opset >= 9 and not s.graph_path and (s.rank or 0) >= 2
    ]
    for i, site in enumerate(summed):
        _add_lead_sums(probe, site, i, opset)
    # the shapes of those Scans' inputs: which of them, on which axis, the Scan iterates
    scans = {
        owners[site.graph_path][1].name or owners[site.graph_path][1].output[0]: owners[site.graph_path][1]
        for site in stepped
    }
    scanned_inputs = list(dict.fromkeys(name for node in scans.values() for name in node.input if name))
    for i, name in enumerate(scanned_inputs):
        probe.graph.node.append(helper.make_node("Shape", [name], [f"deadrelu_scanned_{i}"]))
        probe.graph.output.append(
            helper.make_tensor_value_info(f"deadrelu_scanned_{i}", TensorProto.INT64, None)
        )
    session = make_session(probe.SerializeToString(), device, [], weights_dir)
    batch = next(data.batches(batch_size))
    feeds = {inp: as_input(batch[arr], dtypes[inp], inp) for inp, arr in order.items()}
    keep = batch_mask(mask, batch) if mask is not None else None
    results = session.run(None, feeds)
    if scanned_inputs:
        shapes = results[len(results) - len(scanned_inputs) :]
        results = results[: len(results) - len(scanned_inputs)]
        scanned_shapes = {n: tuple(int(d) for d in v) for n, v in zip(scanned_inputs, shapes, strict=True)}
    # Where (opset 9) applies the mask in the graph; older graphs count every position, which a note says
    maskable = keep is not None and opset_version(model) >= 9
    chains = None  # frame_chains of the main graph, found when a site's positions are not the mask's
    stacked = None  # unmapped_steps of the main graph, likewise
    # what the token inputs (every input fed [batch, tokens, …] as the mask is) reach: a main-graph site
    # they do not reach runs on other positions (CLIP's image tower), even where its sequence has the
    # tokens' length
    # (inputs laid out time-major too; none found: no rule, as before)
    token_inputs = (
        {i for i, a in feeds.items() if np.shape(a)[:2] in (keep.shape, keep.shape[::-1])}
        if maskable and keep.ndim == 2
        else set()
    )
    tokens_reach = reached_from(model.graph, token_inputs) if token_inputs else None
    # (site, shape, tokens): its shape reads as [B, T, ...] and [T, B, ...] alike, or flattened rows
    ambiguous = []
    for site, shape in zip(unknown, results[: len(unknown)], strict=True):
        shape = np.asarray(shape)
        if shape.ndim == 2:  # a Loop's per-iteration shapes: the first iteration's
            shape = shape[0] if shape.shape[0] else shape.reshape(-1)[:0]
        if site.graph_path and not shape.size:  # an If branch not taken on this batch: left unmasked
            continue
        shape = tuple(int(d) for d in shape.reshape(-1))
        site.rank = len(shape)
        if keep is not None and not maskable:
            site.mask_unapplied = "opset below 9"
        elif pixels:
            if site not in stepped:  # a Scan body's per-step slice stays unmasked ("in a subgraph")
                chains = frame_chains(model) if chains is None else chains
                _pixel_layout(site, shape, site_channel_dim(site, channel_dim), keep.shape, chains, owners)
            continue
        elif site in stepped:
            node = owners[site.graph_path][1]
            direction, frames = token_steps(node, scanned_shapes, *keep.shape), None
            if direction is None:  # a Scan over a conv subsampler's frames: their mask's columns
                chains = frame_chains(model) if chains is None else chains
                found = frame_steps(node, chains, scanned_shapes, *keep.shape)
                frames, direction = found if found is not None else (None, None)
            dim = site_channel_dim(site, channel_dim)
            # one step's slice of the batch: [B, ..., C], its units not on the batch's axis
            if direction is not None and site.rank >= 2 and shape[0] == keep.shape[0] and dim != 0:
                site.token_layout, site.step_direction, site.frames = TOKEN_STEPS, direction, frames
                site.mask_unapplied = None
            continue
        elif (
            tokens_reach is not None
            and site.rank >= 2
            and not site.graph_path
            and site.input_name not in tokens_reach
        ):
            pass  # counted over every element ("no token axis")
        elif maskable and site.rank >= 2:
            dim = site_channel_dim(site, channel_dim)
            batch_n, tokens = keep.shape
            if token_layout(shape, dim, batch_n, tokens) is None:
                # a speech encoder's frames: the mask's positions shortened by its conv subsampler (in the
                # main graph, an If branch or a Loop body alike: the frames' mask is a main-graph input)
                chains = frame_chains(model) if chains is None else chains
                fit = site_frames(chains, site.input_name, shape, dim, batch_n, tokens)
                if fit is not None:
                    site.frames, tokens, site.frames_axis = fit
                if site.frames_axis is not None:  # a conv's own [B, C, frames, …]: nothing ambiguous
                    site.token_layout = CONV_FRAMES
                    if site.graph_path:
                        site.mask_unapplied = None
                    continue
            if layout_ambiguous(shape, dim, batch_n, tokens):  # a fixed batch of as many samples as tokens
                site.mask_unapplied = LAYOUT_AMBIGUOUS
                ambiguous.append((site, shape, tokens))
                continue
            if row_order_ambiguous(shape, dim, batch_n, tokens):
                # [B*T, …] rows of a [B, T] or of a time-major [T, B] flattened: told by reordering
                # (main-graph sites; a subgraph's stays unmasked, every position counted, and says so)
                site.mask_unapplied = ROW_ORDER_AMBIGUOUS
                if not site.graph_path:
                    ambiguous.append((site, shape, tokens))
                continue
            site.token_layout = token_layout(shape, dim, batch_n, tokens)
            if site.token_layout is None and not site.graph_path and site.rank >= 3:
                # a Loop's (or an unfollowed Scan's) stacked steps: possibly the positions, nothing says
                chains = frame_chains(model) if chains is None else chains
                stacked = unmapped_steps(model, chains) if stacked is None else stacked
                if site.input_name in stacked:
                    site.mask_unapplied = "in a subgraph"
        if site.graph_path and (site.token_layout or "Loop" not in _owner_types(owners, site.graph_path)):
            # a Loop body's tensor of other positions may be a per-step slice of the tokens: stays unmasked
            site.mask_unapplied = None
    ambiguous = [entry for entry in ambiguous if not entry[0].graph_path]
    if not ambiguous:
        return
    consts, axes = set(getattr(data, "consts", ())), getattr(data, "batch_axes", {})
    sample_axes = {inp: None if arr in consts else axes.get(arr, 0) for inp, arr in order.items()}
    if all(site in summed for site, _, _ in ambiguous):  # the probe session has their sums
        sums_of, offset = summed, len(unknown)
    else:  # a site whose rank shape inference did not know: a session exposing the sums of those
        del session
        sums_of, offset = [site for site, _, _ in ambiguous], 0
        session = _sums_session(model, sums_of, device, weights_dir)
        if session is None:
            return
        results = None
    names = _lead_names(sums_of)
    # the first batch, then later ones while a site is not told (samples that are all one vector, or
    # reversed into themselves, tell nothing; the next batch may): each batch counts nothing here
    later = data.batches(batch_size)
    next(later, None)
    for attempt in range(LAYOUT_BATCHES):
        if attempt:
            batch = next(later, None)
            if batch is None:
                return
            feeds = {inp: as_input(batch[arr], dtypes[inp], inp) for inp, arr in order.items()}
            results = None
        reversed_feeds = _reversed_samples(feeds, sample_axes)
        if reversed_feeds is None or any(
            feeds[inp].shape[axis] != keep.shape[0] for inp, axis in sample_axes.items() if axis is not None
        ):  # no samples to reorder, or a last batch of another size (whose shapes read otherwise)
            return
        try:
            first = results if results is not None else session.run(None, feeds)
            second = session.run(None, reversed_feeds)
        except Exception:  # noqa: BLE001  (a graph this cannot run again: its sites stay ambiguous)
            return
        first = dict(zip(names, first[offset : offset + len(names)], strict=True))
        second = dict(zip(names, second[offset : offset + len(names)], strict=True))
        _tell_layouts(
            ambiguous, {s.name: (first, second) for s in sums_of}, sums_of, keep.shape[0], channel_dim
        )
        ambiguous = [entry for entry in ambiguous if entry[0].mask_unapplied is not None]
        if not ambiguous:
            return


def _pixel_layout(site: OnnxSite, shape: tuple[int, ...], dim: int, pixels: tuple, chains, owners) -> None:
    """With an image's pixel mask [B, H, W] (`pixels`: its shape), as the torch probe reads one
    (probe.accumulator.PixelMask): a feature map [B, C, h, w] over the image counts its cells of image
    only (PIXEL_CELLS; probe.onnx_graph.site_cells: through the convs' strides); one whose grid is not
    the image's is marked as cells mixed, a [B, h·w, F] of its positions flattened as such; any other
    site has no pixel axis. A Loop body's tensor of other positions (possibly a step's) stays unmasked."""
    from deadrelu_cli.probe.onnx_graph import PIXEL_CELLS, pixel_grid, site_cells
    from deadrelu_cli.probe.ops import pixels_flattened

    site.cells = site_cells(chains, site.input_name, shape, dim, *pixels)
    if site.cells is not None:
        site.token_layout, site.mask_unapplied = PIXEL_CELLS, None
        return
    if site.graph_path and "Loop" in _owner_types(owners, site.graph_path):
        return
    if len(shape) == 4 and dim == 1 and shape[0] == pixels[0]:
        site.mask_unapplied = PIXELS_MIXED
    elif pixels_flattened(shape, dim, *pixels) or (
        # the positions of the map the convs before it make, flattened (in an order nothing says)
        len(shape) == 3
        and dim == 2
        and shape[0] == pixels[0]
        and (grid := pixel_grid(chains, site.input_name, *pixels[1:])) is not None
        and grid[2] * grid[3] == shape[1]
    ):
        site.mask_unapplied = PIXELS_FLATTENED
    else:
        site.mask_unapplied = None


# how many batches the scan reorders, at most, to tell where a site holds the samples (the first batch,
# then later ones while some site is not told): a data set whose first samples are one vector repeated
LAYOUT_BATCHES = 8


def _site_leads(site: OnnxSite, i: int) -> list[str]:
    """The names of the sums `_add_lead_sums` exposes for the i-th summed site."""
    return [f"deadrelu_lead{lead}_{i}" for lead in range(min(site.rank, 2))]


def _lead_names(summed: list[OnnxSite]) -> list[str]:
    """The names of the sums `_add_lead_sums` exposes, in the order of the outputs it appends."""
    return [name for i, site in enumerate(summed) for name in _site_leads(site, i)]


def _add_lead_sums(probe, site: OnnxSite, i: int, opset: int) -> None:
    """Outputs of `probe` (main graph): the site's per-index sums of |x| along each of its first two axes
    over every other axis (no cancellation, so a row's sum is told from another's at float precision)."""
    from onnx import TensorProto, helper, numpy_helper

    for lead, name in enumerate(_site_leads(site, i)):
        axes = [a for a in range(site.rank) if a != lead]
        # in float: every site of a masked scan gets these, and onnxruntime's CPU Abs has no bfloat16
        as_float = helper.make_node("Cast", [site.input_name], [name + "_f"], to=TensorProto.FLOAT)
        magnitude = helper.make_node("Abs", [name + "_f"], [name + "_abs"])
        if opset >= 13:
            probe.graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), name + "_axes"))
            node = helper.make_node("ReduceSum", [name + "_abs", name + "_axes"], [name], keepdims=0)
        else:
            node = helper.make_node("ReduceSum", [name + "_abs"], [name], axes=axes, keepdims=0)
        probe.graph.node.extend([as_float, magnitude, node])
        probe.graph.output.append(helper.make_empty_tensor_value_info(name))


def _reversed_samples(feeds: dict, sample_axes: dict) -> dict | None:
    """The batch with its samples in reverse order (every sample elsewhere: a permutation that moves each
    of them); None when no input holds samples."""
    batched = [inp for inp, axis in sample_axes.items() if axis is not None]
    if not batched:
        return None
    samples = feeds[batched[0]].shape[sample_axes[batched[0]]]
    order = np.arange(samples)[::-1]
    return {
        inp: value if sample_axes.get(inp) is None else np.take(value, order, axis=sample_axes[inp])
        for inp, value in feeds.items()
    }


def _tell_layouts(
    sites: list[tuple], sums: dict, summed: list[OnnxSite], batch: int, channel_dim: int | None
) -> None:
    """Main-graph sites whose tensor holds the mask's positions in a way its shape cannot say ([B, T, ...]
    and [T, B, ...] in a graph that fixes its batch at the mask's token count; flattened rows [B*T, ...]
    of a [B, T] or of a time-major [T, B]): `sums` holds, per site name, the per-index sums of |x| along
    each of the first two axes on the batch and on the batch with its samples in reverse order. Whatever
    holds the samples comes back reversed, the tokens unchanged (probe.ops.reordered_layout): found by
    what the graph computes, not by its sizes. A site neither or both ways (identical samples) stays
    unmasked. `tokens` of each site: the mask's, or its frames' after a conv subsampler."""
    from deadrelu_cli.probe.onnx_graph import site_channel_dim
    from deadrelu_cli.probe.ops import (
        TOKEN_FLAT,
        TOKEN_FLAT_TIME_MAJOR,
        TOKEN_ROWS,
        TOKENS_FIRST,
        layout_ambiguous,
        reordered_layout,
    )

    names = {site.name: _site_leads(site, i) for i, site in enumerate(summed)}
    for site, shape, tokens in sites:
        first, second = sums[site.name]
        keys = names[site.name]
        dim = site_channel_dim(site, channel_dim)
        time_major = reordered_layout(
            shape, dim, batch, tokens, tuple(first[k] for k in keys), tuple(second[k] for k in keys)
        )
        if time_major is None:
            continue
        if layout_ambiguous(shape, dim, batch, tokens):
            site.token_layout = TOKENS_FIRST if time_major else TOKEN_ROWS
        else:
            site.token_layout = TOKEN_FLAT_TIME_MAJOR if time_major else TOKEN_FLAT
        site.mask_unapplied = None


def _sums_session(model, sites: list[OnnxSite], device, weights_dir):
    """A session exposing the per-index sums (`_add_lead_sums`) of sites whose rank the shape probe
    learned only by running; None where the graph cannot be built so (the sites stay ambiguous)."""
    from deadrelu_cli.wiring.onnx_index import opset_version

    probe = type(model)()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    for i, site in enumerate(sites):
        _add_lead_sums(probe, site, i, opset_version(probe))
    try:
        return make_session(probe.SerializeToString(), device, [], weights_dir)
    except Exception:  # noqa: BLE001  (its sites stay ambiguous, and say so)
        return None


def _owner_types(owners: dict, path: tuple[str, ...]) -> set[str]:
    return {owners[path[:k]][1].op_type for k in range(1, len(path) + 1)}


def as_input(array: np.ndarray, dtype: str | None, name: str = "") -> np.ndarray:
    """The batch array in the input's dtype. Into an integer or bool input only when every value
    survives (float token ids 3.0 do; 3.7, NaN, -1 into uint8 or 2**40 into int32 would become other
    numbers); float inputs take any data, rounded to their precision."""
    if dtype is None or array.dtype == np.dtype(dtype):
        return np.ascontiguousarray(array)
    target = np.dtype(dtype)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN or out-of-range floats: found just below
        out = np.ascontiguousarray(array.astype(target))
    if target.kind == "f" and array.dtype.kind in "biuf":  # a narrower float: finite values stay finite
        overflow = np.isinf(out) & np.isfinite(array)
        if overflow.any():
            bad = array.reshape(-1)[np.flatnonzero(overflow.reshape(-1))[0]].item()
            raise UserError(
                f"input {name or '?'}: the data's value {bad} overflows the model's {target.name} "
                f"(largest {np.finfo(target).max:g}); scale the data as the model expects"
            )
    if target.kind in "biu" and not np.array_equal(out.astype(array.dtype), array):
        changed = out.astype(array.dtype).reshape(-1) != array.reshape(-1)
        bad = array.reshape(-1)[np.flatnonzero(changed)[0]].item()
        raise UserError(
            f"input {name or '?'}: the data's {array.dtype} value {bad} is no {target.name} value, which the model "
            f"takes; give {target.name} data (token ids and indices as integers)"
        )
    return out


def _from_pooled(values: dict[str, np.ndarray], static_positions: int | None) -> dict[str, np.ndarray]:
    """Per-(sample, channel) means from the global pools -> per-channel counts and sums of the batch."""
    pos_nc = np.asarray(values["pos_nc"], dtype=np.float64)
    n, c = pos_nc.shape[0], pos_nc.shape[1]
    if static_positions is not None:
        positions = static_positions
        size = n * c * positions
    else:
        size = int(np.asarray(values["size"]))
        positions = size // (n * c) if n * c else 0
    out = {
        "size": np.asarray(size),
        # a mean of 0/1 values times the positions is an integer up to float32 rounding: round it back
        "pos": np.rint(pos_nc.reshape(n, c) * positions).astype(np.int64).sum(axis=0),
        "sum": (np.asarray(values["sum_nc"], dtype=np.float64).reshape(n, c) * positions).sum(axis=0),
        "max": np.asarray(values["max_nc"], dtype=np.float64).reshape(n, c).max(axis=0),
    }
    if "min_nc" in values:  # pooled as max(-x)
        out["min"] = -np.asarray(values["min_nc"], dtype=np.float64).reshape(n, c).max(axis=0)
    if "nan_nc" in values:
        out["nan"] = np.asarray(values["nan_nc"], dtype=np.float64).reshape(n, c).max(axis=0)
    if "sat_nc" in values:
        out["sat"] = (
            np.rint(np.asarray(values["sat_nc"], dtype=np.float64).reshape(n, c) * positions)
            .astype(np.int64)
            .sum(axis=0)
        )
    if "nonfinite" in values:
        out["nonfinite"] = values["nonfinite"]
    return out


class _NanRecount:
    """A NaN activation makes the batch's sum NaN (and the exact-step count, onnx_graph._exact_step,
    where Greater counts it as not firing); how a max pool treats it depends on the order it reads in.
    Such a batch is run again through a second session that counts with Greater everywhere, takes the max
    of the pre-activation and flags each unit whose input held a NaN (its max is NaN then, as in the
    torch path), built the first time it is needed. With --allow-nonfinite, that session leaves NaN/±Inf
    values out of every statistic instead and counts them per site (onnx_graph `finite_only`), and a batch
    whose data hold any is recounted too (a -inf input adds nothing NaN to a ReLU's sum)."""

    def __init__(self, loaded: LoadedModel, sites: list[OnnxSite], options, device: str) -> None:
        self.loaded, self.sites, self.options, self.device = loaded, sites, options, device
        self.session = None
        self.outputs: list[dict[str, str]] = []
        self.positions: list[int | None] = []

    def needed(self, per_site: list[dict[str, np.ndarray]], feeds: dict) -> bool:
        if not self.options.allow_nonfinite:
            return any(
                key in values and np.isnan(values[key]).any()
                for values in per_site
                for key in ("pos_nc", "sum_nc", "sum")
            )
        # a sum that is not finite, or a max that is NaN or +inf (-inf: no value counted), or data that
        # hold NaN/Inf
        for values in per_site:
            for key in ("pos_nc", "sum_nc", "sum", "max_nc", "max"):
                found = values.get(key)
                if found is not None and (np.isnan(found).any() or np.isposinf(found).any()):
                    return True
                if key.startswith("sum") and found is not None and np.isneginf(found).any():
                    return True
        return any(v.dtype.kind == "f" and not np.isfinite(v).all() for v in map(np.asarray, feeds.values()))

    def run(self, feeds: dict) -> list[dict[str, np.ndarray]]:
        from deadrelu_cli.probe.onnx_graph import instrument

        if self.session is None:
            kept = [(dict(site.outputs), site.positions) for site in self.sites]
            plain_count = instrument(
                self.loaded.runnable,
                self.sites,
                self.options.threshold,
                self.options.channel_dim,
                exact_step=False,
                nan_flags=not self.options.allow_nonfinite,
                finite_only=self.options.allow_nonfinite,
            )
            self.outputs = [dict(site.outputs) for site in self.sites]
            # this session's static H*W per pooled site (the main one's may differ: the kernel counts
            # there, without pools)
            self.positions = [site.positions for site in self.sites]
            for site, (outputs, positions) in zip(self.sites, kept, strict=True):
                site.outputs, site.positions = outputs, positions  # the main session's names
            self.session = make_session(
                plain_count.SerializeToString(), self.device, [], self.loaded.extra.get("weights_dir")
            )
        names = [name for per_site in self.outputs for name in per_site.values()]
        results = dict(zip(names, self.session.run(names, feeds), strict=True))
        per_site = [{key: results[name] for key, name in out.items()} for out in self.outputs]
        return [
            _from_pooled(values, positions) if "pos_nc" in values else values
            for values, positions in zip(per_site, self.positions, strict=True)
        ]


class _OutputMaxSwitch:
    """Rebuilds the session so that sites whose units have all fired read their max off the ReLU's output.

    The max of the pre-activation gives the Conv output a second consumer, so onnxruntime cannot fuse
    Conv+Relu there. It is only needed for units that never fired: once every unit of a relu site has fired
    (onnx_graph.output_only_max), max(y) over later batches continues the exact running max of x. After a
    batch, when some such sites are new and the remaining batches are long enough to pay for a new session,
    the new session is built in a background thread (onnxruntime releases the GIL while it builds) while
    batches keep running on the current one; the scan then switches to it and drops the old one. At most
    MAX_REBUILDS times, so a one-batch scan never rebuilds."""

    MAX_REBUILDS = 2
    GAIN = 0.03  # measured share of a ResNet-18 pass saved with every site switched (docs/performance.md)

    def __init__(
        self, loaded: LoadedModel, sites: list[OnnxSite], options, device: str, library: str | None = None
    ) -> None:
        from deadrelu_cli.probe.onnx_graph import output_only_max

        self.loaded, self.sites, self.options, self.device = loaded, sites, options, device
        self.library = library  # kernel_library's, where the first session counts with it
        self.eligible = [i for i, site in enumerate(sites) if output_only_max(site, options.threshold)]
        self.switched: frozenset[int] = frozenset()
        self.rebuilds = 0
        self.build_s = 0.0  # wall time of the last session built (the cost of a rebuild)
        self._thread = None
        self._result = None

    def consider(self, accumulators: list[HostAccumulator], batch_s: float, remaining_batches: int) -> None:
        if self._thread is not None or self.rebuilds >= self.MAX_REBUILDS or remaining_batches <= 0:
            return
        new = [
            i
            for i in self.eligible
            if i not in self.switched
            and accumulators[i].positive is not None
            and accumulators[i].positive.size
            and bool((accumulators[i].positive > 0).all())
        ]
        if not new:
            return

        def weight(i: int) -> int:
            acc = accumulators[i]
            return acc.elements * (acc.positive.size if acc.positive is not None else 0)

        share = sum(weight(i) for i in new) / max(1, sum(weight(i) for i in range(len(accumulators))))
        if remaining_batches * batch_s * self.GAIN * share < self.build_s:
            return
        import threading

        self.rebuilds += 1
        wanted = self.switched | frozenset(new)
        self._thread = threading.Thread(target=self._build, args=(wanted,), daemon=True)
        self._thread.start()

    def _build(self, wanted: frozenset[int]) -> None:
        import copy

        start = time.perf_counter()
        try:
            sites = [copy.copy(site) for site in self.sites]  # instrument() sets outputs on its sites
            # released weights: the scan's private copy of the file serves the new session as the first
            raw, weights_dir = None, self.loaded.extra.get("weights_dir")
            if self.loaded.extra.get("rereadable") and weights_dir is None:  # checked against the hash
                raw = reread_verified(self.loaded.path, self.loaded.sha256)
            model_bytes = instrumented_bytes(
                self.loaded,
                sites,
                self.options.threshold,
                self.options.channel_dim,
                self.device,
                max_from_output=wanted,
                file_bytes=raw,
                kernel_jobs=KERNEL_JOBS if self.library else 0,
            )
            del raw
            session = make_session(model_bytes, self.device, [], weights_dir, self.library)
            self._result = (wanted, session, [dict(site.outputs) for site in sites])
        except Exception:  # noqa: BLE001 - the current session stays, and it is exact
            self._result = None
        self.build_s = time.perf_counter() - start

    def ready(self):
        """(session, per-site outputs) once a rebuilt session is ready, else None."""
        if self._thread is None or self._thread.is_alive():
            return None
        self._thread.join()
        self._thread, result, self._result = None, self._result, None
        if result is None:
            return None
        self.switched, session, outputs = result
        return session, outputs

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = self._result = None


class HostAccumulator:
    def __init__(self, site: OnnxSite, masked: bool = False) -> None:
        self.site = site
        self.masked = masked  # the scan has a position mask (applied where site.token_layout is set)
        self.positive = self.max_pre = self.sum_abs = self.saturated = self.min_pre = None
        self.elements = 0
        self.samples = 0
        self.nonfinite = 0  # --allow-nonfinite: NaN/±Inf values left out (the recount session counts them)
        self.all_kept = True  # every batch's mask kept every position: no padding was ever counted
        # every batch's frames' (or a feature map's cells') mask was that of its real positions
        self.frames_told = True

    def add(
        self,
        values: dict[str, np.ndarray],
        samples: int = 0,
        keep: np.ndarray | None = None,
        told: bool = True,
    ) -> None:
        """One batch's reductions; `samples`: the batch's sample count (counted when the site ran);
        `keep`: the batch's position mask (or its frames', at a site after a conv subsampler), which the
        graph applied at a site with a token layout (its size is then scaled from all positions to the
        kept ones); `told`: False where that frames' mask kept every frame (probe.onnx_graph.frames_keep)."""
        self.frames_told = self.frames_told and told
        if keep is not None and not (told and keep.all()):  # an untold frames' mask keeps every frame
            self.all_kept = False
        if "nonfinite" in values:
            self.nonfinite += int(np.asarray(values["nonfinite"]).sum())
        if "pos_nc" in values:
            values = _from_pooled(values, self.site.positions)
        pos, mx, sm, size = (np.asarray(values[k]) for k in ("pos", "max", "sum", "size"))
        sat = np.asarray(values["sat"]) if "sat" in values else None
        mn = np.asarray(values["min"]) if "min" in values else None
        nan = np.asarray(values["nan"]) if "nan" in values else None
        if self.site.in_loop:  # per-iteration scan outputs: fold the iterations
            iterations = [i for i in range(pos.shape[0]) if pos[i].size] if pos.ndim == 2 else []
            if not iterations:
                return
            pos, sm = pos[iterations].sum(0), sm[iterations].sum(0)
            mx = mx[iterations].max(0)
            mn = mn[iterations].min(0) if mn is not None else None
            nan = nan[iterations].max(0) if nan is not None else None
            sat = sat[iterations].sum(0) if sat is not None else None
            size = int(np.asarray(size).sum())
        size = int(size)
        masked = keep is not None and self.site.token_layout is not None
        if masked:  # elements per position times the kept positions (a batch may keep none)
            size = size // keep.size * int(np.count_nonzero(keep)) if keep.size else 0
        if pos.size == 0 or (size == 0 and not masked):  # the site did not run (untaken If branch)
            return
        pos = pos.reshape(-1)
        units = pos.shape[0]
        if self.positive is None:
            self.positive = np.zeros(units, np.int64)
            self.max_pre = np.full(units, -np.inf)
            self.sum_abs = np.zeros(units)
            self.saturated = np.zeros(units, np.int64) if sat is not None else None
        elif units != self.positive.shape[0]:
            raise UserError(
                f"ONNX layer {self.site.name} produced {units} units on one batch and {self.positive.shape[0]} on another; pass --channel-dim"
            )
        self.positive += pos.astype(np.int64)
        mx = mx.reshape(-1)
        if self.site.float16:
            mx = mx.astype(np.float16).astype(np.float64)
        if nan is not None:  # NaN in a unit's input: its max (and min) is NaN, as amax/amin give in torch
            mx = np.where(nan.reshape(-1) > 0, np.nan, mx)
        self.max_pre = np.maximum(self.max_pre, mx)
        if mn is not None:
            mn = mn.reshape(-1)
            if self.site.float16:
                mn = mn.astype(np.float16).astype(np.float64)
            if nan is not None:
                mn = np.where(nan.reshape(-1) > 0, np.nan, mn)
            self.min_pre = mn if self.min_pre is None else np.minimum(self.min_pre, mn)
        self.sum_abs += sm.reshape(-1)
        if self.saturated is not None and sat is not None:
            self.saturated += sat.reshape(-1).astype(np.int64)
        self.elements += size // units
        self.samples += samples

    def layer_stats(self) -> LayerStats:
        layer = self._layer_stats()
        if self.masked:  # as the torch probe says it (engine.mask_notes names the unmasked ones)
            site = self.site
            mark = "applied" if site.token_layout else site.mask_unapplied or "no token axis"
            if site.token_layout and not self.frames_told:  # a batch's cells / frames not told
                mark = PIXELS_MIXED if site.cells else FRAMES_NOT_TOLD
            if mark in MASK_NOT_APPLIED and self.all_kept and self.positive is not None:
                # every batch kept every position: counting all of them is counting the kept ones, under
                # any reading of the layout (a Scan body, a square batch nothing told)
                mark = "applied"
            layer.extra["position_mask"] = mark
        if self.site.axis_lost:  # counted on a guessed axis: the gate stops on it
            layer.extra["unit_axis"] = UNIT_AXIS_NOT_FOLLOWED
        elif self.site.axis_assumed:  # no layer placed its units: counted on an assumed axis, gated too
            layer.extra["unit_axis"] = UNIT_AXIS_ASSUMED
        if self.site.experts_merged:  # unit i of every expert counted as one: the gate stops on it
            layer.extra[EXPERTS_MERGED] = self.site.experts_merged
        return layer

    def _layer_stats(self) -> LayerStats:
        site = self.site
        if self.positive is None:
            empty_i, empty_f = np.zeros(0, np.int64), np.zeros(0)
            return LayerStats(
                site.name,
                site.op,
                site.channel_dim,
                empty_i,
                0,
                empty_f,
                empty_f,
                module_type=site.module_type or ("Relu" if site.op == "relu" else "Clip"),
                producer=site.producer,
                implicit=site.implicit,
                weight=site.weight,
                output_tensor=site.output_tensor,
                samples=0,
            )
        bias = None
        if site.bias is not None and np.asarray(site.bias).reshape(-1).shape[0] == self.positive.shape[0]:
            bias = np.asarray(site.bias, dtype=np.float64).reshape(-1)
        return LayerStats(
            name=site.name,
            op=site.op,
            channel_dim=site.channel_dim,
            positive_counts=self.positive,
            elements_per_unit=self.elements,
            max_preactivation=self.max_pre,
            sum_abs=self.sum_abs,
            saturated_counts=self.saturated,
            module_type=site.module_type or ("Relu" if site.op == "relu" else "Clip"),
            producer=site.producer if bias is not None else None,
            bias=bias,
            implicit=site.implicit,
            weight=site.weight,
            output_tensor=site.output_tensor,
            min_preactivation=self.min_pre,
            samples=self.samples,
            nonfinite=self.nonfinite,
        )


def scan_onnx(options, data: CalibrationData, device: str) -> tuple[LoadedModel, list[LayerStats]]:
    from deadrelu_cli.loaders.onnx_model import load_onnx

    if not device.startswith("cuda"):  # the first build of the custom-op library overlaps the loading
        from deadrelu_cli import native

        native.prepare_onnx()
    loaded = load_onnx(LoadOptions(options.model, device=device))
    mask = resolve_mask(options.mask, options.exclude_token_ids, data)
    data.unfed = unfed_arrays(mask, data, loaded)  # a mask the graph does not take is read, not fed
    order = feed_order(loaded, data)
    dtypes = {spec.name: spec.dtype for spec in loaded.inputs}
    for spec in loaded.inputs:
        source = next(s for s in data.sources if s.name == order[spec.name])
        if (
            spec.dtype
            and source.dtype.kind == "f"
            and spec.dtype.startswith("float")
            and source.dtype != np.dtype(spec.dtype)
        ):
            loaded.notes.append(
                f"input {spec.name}: data {source.dtype} converted to the model's {spec.dtype}"
            )
        elif spec.dtype and source.dtype.kind in "iu" and spec.dtype.startswith("float"):
            # raw pixel values (0-255) where the model expects normalised floats: a classic preprocessing slip
            loaded.notes.append(
                f"input {spec.name}: data {source.dtype} converted to the model's {spec.dtype} as raw values "
                f"(no scaling); if the model expects normalised inputs, normalise the data first"
            )
        if spec.shape and source.name not in data.consts:
            got = source.shape
            if len(got) != len(spec.shape) or any(
                e is not None and g != e for e, g in zip(spec.shape[1:], got[1:], strict=False)
            ):
                if source.name not in data.batch_axes:
                    shown = "x".join("?" if e is None else str(e) for e in spec.shape)
                    raise UserError(
                        f"{data.path}: array {source.name!r} has shape {list(got)}, model input {spec.name!r} expects {shown} {spec.dtype}"
                        f"{shape_advice(got, tuple(spec.shape))}"
                    )
    from deadrelu_cli.probe.onnx_deployed import deployed_view

    changed, deployed_notes, hidden = deployed_view(loaded.runnable)
    hidden.update(stored_zero_relus(loaded.runnable, options.ops))  # Max(x, a zero buffer) after a layer
    if changed:  # the graph differs from the file's bytes now
        loaded.extra.pop("file_bytes", None)
        loaded.extra.pop("rereadable", None)
    advice = "scan the float model for those layers"
    if any("stored zero tensor" in label for label in hidden):
        advice += (
            " (a ReLU spelled with a checkpoint's zeros: re-export it as Relu, or with zeros the code makes)"
        )
    if any(label.split("(")[0] in ("RNN", "GRU", "LSTM") for label in hidden):
        advice += (
            " (an RNN/GRU/LSTM node runs its activation inside itself at every time step: not countable)"
        )
    loaded.notes.extend(deployed_notes + unseen_notes(dict(hidden), options.ops, advice))
    loaded.extra["unseen"] = dict(hidden)  # the report keeps them: a gate fails on those of the --ops
    sites = find_sites(loaded.runnable, options.ops)
    # mixtures of experts of separate modules, by their weights (read before the weights are released)
    experts = expert_groups((init.name, tuple(init.dims)) for init in loaded.runnable.graph.initializer)
    for site in sites:
        site.track_min = options.explain
    others = tuple(op for op in NAMED_WHEN_UNSCANNED if op not in options.ops)
    unscanned = Counter(site.op for site in find_sites(loaded.runnable, others)) if others else Counter()
    if unscanned:  # a LeakyRelu beside the Relus: said, in the report (not gated)
        loaded.extra["unscanned"] = dict(unscanned)
        loaded.notes.append(unscanned_text(dict(unscanned), options.ops))
    if not sites:
        loaded.notes.append(no_sites_note_of(loaded.runnable, options.ops))
        return loaded, []
    # Sites found (they keep the small tensors they need): the sessions read the large weights from the
    # scan's private copy of the file, and the graph held for the rest of the scan is without them
    # (restore_weights puts them back)
    release_weights(loaded)
    weights_dir = loaded.extra.get("weights_dir")
    total = data.local_samples if options.limit is None else min(options.limit, data.local_samples)
    batch_size = _batch_size(options, loaded, data, order, total)  # None: auto, sized once the session runs
    # with a mask, two samples (where the graph allows): a [B*T, C] site is then told from a [T, C] one;
    # three with masks of 2 tokens, where [T, B, C] (time-major) and [B, T, C] have one shape
    probe_batch = loaded.fixed_batch or (
        layout_probe_size(total, mask_lengths(mask, data)) if mask is not None else batch_size or 1
    )
    _discover_shapes(
        loaded.runnable,
        sites,
        data,
        order,
        dtypes,
        device,
        probe_batch,
        mask,
        options.channel_dim,
        weights_dir,
    )
    for site in sites:  # [N, C, T] and [N, T, C] look alike: say which one was assumed, and gate
        site.axis_assumed = (
            (site.rank or 0) >= 3
            and site.channel_first is None
            and site.unit_axis is None
            and not site.axis_lost
            and options.channel_dim is None
        )
    guessed = {site.name: site.rank for site in sites if site.axis_assumed}
    loaded.notes.extend(axis_guess_notes(guessed, "Conv/Gemm/MatMul/BatchNorm"))
    for site in sites:
        site.axis_lost = site.axis_lost and options.channel_dim is None and (site.rank or 0) >= 2
    merged = {site.name: ("", site.experts_merged) for site in sites if site.experts_merged}
    if merged:  # an exported fused mixture of experts: one activation for every expert's rows
        loaded.notes.append(
            merged_experts_note(
                merged,
                "scan the model before export (state_dict + --arch, or its Hugging Face folder), which "
                "counts each expert apart, or pass --allow-unseen to gate on them as counted",
            )
        )
    lost = [site.name for site in sites if site.axis_lost]
    if lost:  # a layer's units moved where the walk lost them: counted on a guess, said and gated
        loaded.notes.append(axis_lost_note(lost))
    masked = mask is not None and any(site.token_layout for site in sites)
    library = kernel_library(device)
    started = time.perf_counter()
    try:
        model_bytes = instrumented_bytes(
            loaded,
            sites,
            options.threshold,
            options.channel_dim,
            device,
            kernel_jobs=KERNEL_JOBS if library else 0,
        )
        session = make_session(model_bytes, device, loaded.notes, weights_dir, library)
    except UserError:
        if library is None:
            raise
        # onnxruntime refused the custom op (a runtime that reports a newer version than its C API has):
        # the graph's own ops count, with the same numbers; a model it cannot run fails here again
        library = None
        model_bytes = instrumented_bytes(loaded, sites, options.threshold, options.channel_dim, device)
        session = make_session(model_bytes, device, loaded.notes, weights_dir)
    switch = _OutputMaxSwitch(loaded, sites, options, device, library)
    switch.build_s = time.perf_counter() - started
    del model_bytes
    outputs = [dict(site.outputs) for site in sites]
    output_names = [name for per_site in outputs for name in per_site.values()]
    recount = _NanRecount(loaded, sites, options, device)
    accumulators = [HostAccumulator(site, mask is not None) for site in sites]
    done = 0

    def sample_cost() -> int | None:
        if device.startswith("cuda"):  # host memory says nothing of the GPU's
            return None
        one = next(data.batches(1))
        feeds = {inp: as_input(one[arr], dtypes.get(inp), inp) for inp, arr in order.items()}
        if masked:
            _mask_feeds(feeds, batch_mask(mask, one), sites)
        try:
            return one_sample_growth(session, output_names, feeds)
        except Exception:  # noqa: BLE001 - onnxruntime's own types; the first batch reports it
            return None

    if batch_size is None:  # auto: sized by one sample's run, which a one-sample scan need not pay twice
        batch_size = (
            1 if total <= 1 else onnx_batch_size(options.batch_size, loaded, data, order, sample_cost)
        )

    if total <= batch_size:  # one batch: nothing to switch to
        switch.eligible = []

    padding_seen = [False]  # a batch's token mask left a position out (the experts' rows then say so)

    def feeds_of():
        for batch in data.batches(batch_size, options.limit, options.allow_nonfinite):
            feeds = {inp: as_input(batch[arr], dtypes.get(inp), inp) for inp, arr in order.items()}
            # read also where no site is masked: a layer that counted every position says so unless
            # every batch kept every position (HostAccumulator.all_kept)
            keep = batch_mask(mask, batch) if mask is not None else None
            padding_seen[0] = padding_seen[0] or (keep is not None and not bool(np.all(keep)))
            keeps = _mask_feeds(feeds if masked else {}, keep, sites)
            yield batch, feeds, keeps

    try:
        for index, (batch, feeds, keeps) in enumerate(prefetched(feeds_of())):
            rebuilt = switch.ready()
            if rebuilt is not None:  # the old session (and its arena) goes with the last reference to it
                session, outputs = rebuilt
                output_names = [name for per_site in outputs for name in per_site.values()]
            started = time.perf_counter()
            try:
                results = dict(zip(output_names, session.run(output_names, feeds), strict=True))
                per_site = [{key: results[name] for key, name in out.items()} for out in outputs]
                if recount.needed(per_site, feeds):
                    per_site = recount.run(feeds)
            except UserError:
                raise
            except Exception as exc:  # onnxruntime's own exception types
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                if index == 0:
                    # onnxruntime puts which dimension is wrong on a line of its own: "index: 0 Got: 4 Expected: 1"
                    detail = [line.strip() for line in str(exc).splitlines()[1:] if "Got:" in line]
                    hint = "check that --data fits the model's inputs"
                    if loaded.fixed_batch is not None and batch_size != loaded.fixed_batch:
                        hint = f"the model's inputs fix the batch at {loaded.fixed_batch}: leave out --batch-size (and batch-size in [tool.deadrelu]) or pass --batch-size {loaded.fixed_batch}"
                    raise UserError(
                        f"onnxruntime failed on the first batch: {'; '.join([first, *detail])}; {hint}"
                    ) from None
                raise
            batch_s = time.perf_counter() - started
            first_batched = next(n for n in order.values() if n not in data.consts)
            samples = batch[first_batched].shape[data.batch_axes.get(first_batched, 0)]
            for acc, values in zip(accumulators, per_site, strict=True):
                acc.add(values, samples, *keeps.get(acc.site.mask_key, (None, True)))
            done += samples
            switch.consider(accumulators, batch_s, -(-(total - done) // batch_size))
            if options.progress:
                options.progress(done, total)
    finally:
        switch.close()
    layers = [acc.layer_stats() for acc in accumulators]
    if padding_seen[0]:  # an expert's rows, gathered by the graph's index ops: not the mask's positions
        mark_unattributed_rows(layers, experts)
    return loaded, layers


def _mask_feeds(feeds: dict, keep: np.ndarray | None, sites: list[OnnxSite]) -> dict:
    """Put the batch's position mask into `feeds`, and the frames' mask of each conv subsampler a site's
    positions come through (probe.onnx_graph.frames_keep), or with an image's pixel mask [B, H, W], the
    cells' mask of each feature map (probe.onnx_graph.cells_keep). Returns, per site `mask_key` (None:
    the batch's), (its mask, whether it is the real positions' mask) for HostAccumulator.add."""
    if keep is None:
        return {}
    if keep.ndim == 2:  # a pixel mask is never fed as it is: only its cells' masks are
        feeds[MASK_INPUT] = np.ascontiguousarray(keep, dtype=bool)
    keeps = {None: (keep, True)}
    for site in sites:
        key = site.mask_key
        if key and key not in keeps:  # also unmasked ones: all_kept reads it
            keeps[key] = cells_keep(site.cells, keep) if site.cells else frames_keep(site.frames, keep)
        if key and site.token_layout:
            feeds[site.mask_input] = np.ascontiguousarray(keeps[key][0])
    return keeps


def _batch_size(
    options, loaded: LoadedModel, data: CalibrationData, order: dict[str, str], total: int
) -> int | None:
    """--batch-size as given; by default the batch the graph's inputs fix (exported with batch 1, say);
    None for auto on a graph that fixes none (onnx_batch_size sizes it, measuring one sample's run)."""
    from deadrelu_cli.inputs import resolve_batch_size

    fixed = None
    for spec in loaded.inputs:  # the samples axis of a batched input, where the graph fixes its size
        array = order.get(spec.name)
        axis = data.batch_axes.get(array, 0)
        if array is not None and array not in data.consts and spec.shape and len(spec.shape) > axis:
            fixed = spec.shape[axis] if fixed is None else fixed
    loaded.fixed_batch = fixed
    alone = per_batch_quantization(
        dynamic_quantizers(loaded.runnable),
        options.batch_size,
        options.batch_size_explicit,
        fixed,
        loaded.notes,
    )
    if alone is not None:
        return alone
    if fixed is None or options.batch_size_explicit:
        if options.batch_size == "auto":
            return None
        return resolve_batch_size(options.batch_size, data, list(order.values()))
    if total % fixed:
        raise fixed_batch_error(loaded.path, fixed, total)
    loaded.notes.append(
        f"the model's inputs fix the batch size at {fixed}: scanned with --batch-size {fixed}"
    )
    return fixed


DYNAMIC_QUANTIZERS = ("DynamicQuantizeLinear", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM")


def dynamic_quantizers(model) -> str:
    """The ops (with counts) that quantize activations with a scale computed from the whole tensor they
    get, "" when there are none: one scale per batch, so every sample's activations depend on the others
    in its batch (onnxruntime.quantization.quantize_dynamic makes them)."""
    import onnx

    found: Counter = Counter()

    def walk(graph) -> None:
        for node in graph.node:
            if node.op_type in DYNAMIC_QUANTIZERS:
                found[node.op_type] += 1
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    walk(attribute.g)

    walk(model.graph)
    return ", ".join(f"{count} {op}" for op, count in found.most_common())


_ACTIVATION_LIKE = (
    "Sigmoid",
    "Tanh",
    "HardSigmoid",
    "HardSwish",
    "Gelu",
    "LeakyRelu",
    "Elu",
    "Selu",
    "PRelu",
    "Softplus",
    "Mish",
    "Clip",
)


def no_sites_note_of(model, ops: tuple[str, ...]) -> str:
    """Say what the graph uses instead (x * Sigmoid(x) is SiLU: a smooth activation has no dead units);
    `scan` and `inspect` alike."""
    from collections import Counter

    from deadrelu_cli.probe.ops import no_sites_note

    found = Counter(node.op_type for node in model.graph.node if node.op_type in _ACTIVATION_LIKE)
    return no_sites_note(f"the graph has no {'/'.join(ops)} nodes", found)


def runner(loaded: LoadedModel, data: CalibrationData, device: str):
    """batch -> list of output arrays of the plain (uninstrumented) graph."""
    session = make_session(loaded.runnable.SerializeToString(), device, [], loaded.extra.get("weights_dir"))
    order = feed_order(loaded, data)
    dtypes = {spec.name: spec.dtype for spec in loaded.inputs}

    to_frames = _output_frames(loaded.runnable, [o.name for o in session.get_outputs()])

    def run(batch):
        feeds = {i: as_input(batch[a], dtypes.get(i), i) for i, a in order.items()}
        out = OutputArrays(np.asarray(o) for o in session.run(None, feeds))
        out.to_frames = to_frames
        return out

    return run


def _output_frames(model, names: list[str]):
    """A speech encoder's outputs are frames (probe.onnx_graph.frame_chains): the mask [batch, tokens] ->
    its frames' mask, as the scan counts them, for `fix` to compare outputs on the real frames (the mask
    itself where it is not right-padded, which leaves those outputs compared everywhere); None where no
    output, or outputs of different steps, hold frames."""
    from deadrelu_cli.probe.onnx_graph import frame_chains

    chains = frame_chains(model)
    found = {chains.get(name) for name in names}
    steps = {axes[0] for axes in found if axes and len(axes) == 1}  # one spatial axis: the frames'
    if len(steps) != 1 or None in found:
        return None
    chain = steps.pop()

    def to_frames(keep: np.ndarray) -> np.ndarray:
        frames, real = frames_keep(chain, keep)
        return frames if real else keep

    return to_frames
