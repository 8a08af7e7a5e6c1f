"""ONNX graph probe: find activation sites (subgraphs included) and instrument the graph in memory.

After every site the graph gets per-channel reductions, so only [C]-sized vectors leave it per
batch, whatever the activation size:
  positives = ReduceSum(Cast(Greater(x, threshold), int64))   over every axis but the channel axis
  max_pre   = ReduceMax(x)
  sum_abs   = ReduceSum(Cast(y, double))                      y = the activation's output (>= 0)
  size      = Size(y)                                         elements, to derive elements per unit
  saturated = ReduceSum(Cast(x >= 6, int64))                  relu6 only
NCHW-like sites use per-(sample, channel) global pools instead, and count with an exact step built
from ops onnxruntime keeps in its blocked layout (see _exact_step); static H*W replaces Size.
Sites inside If/Loop/Scan bodies are exposed through extra outputs of those nodes: an If branch
that does not hold the site yields empty vectors (the site did not run), a Loop/Scan body yields
per-iteration scan outputs that are summed on the host.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from deadrelu_cli.errors import UserError
from deadrelu_cli.probe.onnx_deployed import NCHWC_CONV, fused_origin, implicit_relu, nchwc_tensor
from deadrelu_cli.probe.ops import (
    clamp_is_layer,
    counts_from_output,
    pixel_cells,
    stored_zeros_label,
    threshold_below,
    unit_axis_reduced,
)
from deadrelu_cli.wiring.onnx import consumer_layout, fused_experts_rows, producer_weight, trace_producer
from deadrelu_cli.wiring.onnx_index import GraphIndex, attr, float_type, opset_version

SUBGRAPH_OPS = ("If", "Loop", "Scan")
STAT_KEYS = ("pos", "max", "sum", "size", "sat")
# the graph input the scan adds for a position mask: bool [batch, tokens], True on the positions that count
MASK_INPUT = "deadrelu_position_mask"


@dataclass
class OnnxSite:
    name: str
    op: str  # relu, relu6, clip, leaky_relu, … or hardswish_part (never a layer by default)
    node_name: str
    input_name: str
    output_name: str
    graph_path: tuple[str, ...]  # () for the main graph, else the chain of subgraph attribute paths
    rank: int | None = None
    channel_first: bool | None = None
    unit_axis: int | None = None  # set when a Transpose between producer and site moved the unit axis
    axis_lost: bool = False  # a producer made the units, a layout op on the way moved them out of reach
    axis_assumed: bool = False  # rank >= 3 with no producer to place the units: counted on a guess (scan)
    experts_merged: int = 0  # a fused mixture of experts' activation: how many experts' rows it runs
    producer: str | None = None
    bias: np.ndarray | None = None
    clip_max: float | None = None
    outputs: dict[str, str] = field(default_factory=dict)  # stat key -> graph output name
    in_loop: bool = False
    channel_dim: int = -1
    float16: bool = False
    positions: int | None = None  # elements per (sample, unit) when static: no Size output needed
    implicit: str | None = None  # "quantize" (a zero-point clamp) or "fused" (split from a fused node)
    module_type: str | None = None  # the node type that performs the activation, when not a plain op
    weight: str | None = None  # the producer's stored weight (matches deployed layers to float ones)
    output_tensor: str | None = None  # the activation's output as the exported graph names it (pairs layers)
    track_min: bool = False  # also the per-unit minimum of the pre-activation (--explain)
    # where the site's tensor holds the position mask's [batch, tokens] (probe.ops.token_layout), found
    # on a first batch; None: no mask, or positions that are not the mask's (counted over every element)
    token_layout: str | None = None
    mask_unapplied: str | None = None  # why a position mask could not be applied here, when not for its shape
    spelled: str | None = None  # "Max" / "Where" / "Mul": a ReLU the graph spells without a Relu node
    # the conv/pool steps (along the frames axis) between the graph's inputs and this site, where its
    # positions are the mask's shortened by them (a speech encoder's frames; frame_chains): the frames' mask
    frames: tuple[tuple[int, int, int, bool], ...] | None = None
    step_direction: int = 0  # TOKEN_STEPS: the direction its Scan iterates the tokens in (1: last first)
    frames_axis: int | None = None  # CONV_FRAMES: the axis of its [B, C, frames, …] that holds the frames
    # PIXEL_CELLS: (stride y, stride x, h, w) of its [B, C, h, w] feature map over an image's pixel mask
    cells: tuple[int, int, int, int] | None = None

    @property
    def mask_input(self) -> str:
        """The graph input holding this site's position mask: the batch's, its frames' (`frames`), or its
        feature map's cells' (`cells`)."""
        if self.cells:
            return cells_mask_name(self.cells)
        return frame_mask_name(self.frames) if self.frames else MASK_INPUT

    @property
    def mask_key(self) -> tuple | None:
        """What the mask of this site is made from, beside the batch's own (None): frames or cells."""
        return self.cells or self.frames or None


# One Conv / MaxPool / AveragePool step along one spatial axis: (effective kernel, stride, both pads
# summed, SAME auto-padding), what its output length is of its input's (frame_count)
FrameStep = tuple[int, int, int, bool]
# per spatial axis of the convs on the way, the steps along it: one axis after Conv1d's, two after a
# Conv2d subsampler over (frames, features) (a Conformer's), () where no conv is on the way
AxisChains = tuple[tuple[FrameStep, ...], ...]
_FRAME_OPS = ("Conv", "MaxPool", "AveragePool")


def _frame_steps(node: onnx.NodeProto, index: GraphIndex) -> list[FrameStep] | None:
    """The length arithmetic of a Conv/MaxPool/AveragePool node, per spatial axis; None where it cannot
    be read (a pool with ceil_mode, a kernel of unknown size)."""
    kernel = attr(node, "kernel_shape")
    if kernel is None and node.op_type == "Conv" and len(node.input) > 1:
        weight = index.shape(node.input[1])
        if weight is None and index.constant(node.input[1]) is not None:  # an initializer: its own shape
            weight = list(index.constant(node.input[1]).shape)
        kernel = weight[2:] if weight is not None and len(weight) >= 3 else None
    if not kernel or any(k is None for k in kernel) or attr(node, "ceil_mode", 0):
        return None
    axes = len(kernel)
    strides = list(attr(node, "strides") or [1] * axes)
    dilations = list(attr(node, "dilations") or [1] * axes)
    pads = list(attr(node, "pads") or [0] * (2 * axes))
    auto = attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto == "VALID":
        pads = [0] * (2 * axes)
    if len(strides) != axes or len(dilations) != axes or len(pads) != 2 * axes:
        return None
    return [
        (
            dilations[a] * (int(kernel[a]) - 1) + 1,
            int(strides[a]),
            int(pads[a]) + int(pads[a + axes]),
            auto.startswith("SAME"),
        )
        for a in range(axes)
    ]


def reached_from(graph: onnx.GraphProto, sources: set[str]) -> set[str]:
    """The tensors of `graph` whose values depend on any of `sources` (graph inputs), not counting their
    sizes. A node holding subgraphs is taken to depend on them (its bodies may read any tensor around them)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    reached, frontier = set(sources), list(sources)
    for node in graph.node:
        if _subgraphs(node):
            frontier.extend(out for out in node.output if out and out not in reached)
            reached.update(out for out in node.output if out)
    while frontier:
        for node in consumers.get(frontier.pop(), ()):
            if node.op_type in ("Shape", "Size"):  # a batch size read off a token input carries no positions
                continue
            for out in node.output:
                if out and out not in reached:
                    reached.add(out)
                    frontier.append(out)
    return reached


def frame_chains(model: onnx.ModelProto) -> dict[str, AxisChains | None]:
    """Per value of the graph (If branches and Loop/Scan bodies included, which see the enclosing
    graph's values), the conv/pool steps between the graph's inputs and it, per spatial axis (a speech
    encoder's strided subsampler: the frames its positions are); None where values of different steps
    meet (nothing to map the mask through), convs of another spatial rank follow, or a Scan's per-step
    slice or a Loop's stacked outputs hold them (a Scan's stacked outputs carry its scan inputs' steps:
    one entry per step). Constants carry no steps, so they never conflict.
    Nodes are in topological order (ONNX's rule)."""
    chains: dict[str, AxisChains | None] = {i.name: () for i in model.graph.input}
    _walk_chains(model.graph, GraphIndex(model.graph), chains)
    return chains


def _walk_chains(graph: onnx.GraphProto, index: GraphIndex, chains: dict) -> None:
    for node in graph.node:
        found = [chains[name] for name in node.input if name in chains]
        outputs = [_merged_chain(found)] * len(node.output)
        if node.op_type in _FRAME_OPS and node.input and node.input[0] in chains:
            base = chains[node.input[0]]
            steps = _frame_steps(node, index)
            rank = index.rank(node.input[0])
            if base is None or steps is None or (rank is not None and rank != 2 + len(steps)):
                chain = None
            elif not base:
                chain = tuple((step,) for step in steps)
            else:
                chain = (
                    tuple((*b, step) for b, step in zip(base, steps, strict=True))
                    if len(base) == len(steps)
                    else None
                )
            outputs = [chain] * len(node.output)
        bodies = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
        # the values a Loop/Scan carries from step to step, as the node takes them (a Loop's counter and
        # condition, a Scan's per-step slices carry nothing known) and as its body returns them
        if node.op_type == "Loop":
            carried, skip_in, skip_out = list(node.input[2:]), 2, 1
        elif node.op_type == "Scan":
            carried, skip_in, skip_out = (
                list(node.input[: len(node.input) - attr(node, "num_scan_inputs", 0)]),
                0,
                0,
            )
        else:
            carried, skip_in, skip_out = [], 0, 0
        for body in bodies:
            for position, value in enumerate(body.input):
                k = position - skip_in
                chains[value.name] = chains.get(carried[k], ()) if 0 <= k < len(carried) else None
                if node.op_type == "Loop" and position < 2:
                    chains[value.name] = ()
            _walk_chains(body, GraphIndex(body, index), chains)
        if node.op_type == "If" and len(bodies) == 2:  # each output: the branches' agree, or None
            outputs = [
                _merged_chain([chains.get(b.output[k].name, ()) for b in bodies if k < len(b.output)])
                for k in range(len(node.output))
            ]
        elif node.op_type in ("Loop", "Scan") and bodies:  # carried values out as in; stacked ones below
            body_out = bodies[0].output
            # a Scan's stacked outputs hold one entry per step of its scan inputs: their steps (the frames
            # where it iterates them); a Loop's, one per iteration of a count nothing here ties to them
            stacked = (
                _merged_chain([chains.get(name, ()) for name in node.input[len(carried) :] if name])
                if node.op_type == "Scan"
                else None
            )
            outputs = [
                _merged_chain([chains.get(carried[k], ()), chains.get(body_out[k + skip_out].name, ())])
                if k < len(carried) and k + skip_out < len(body_out)
                else stacked
                for k in range(len(node.output))
            ]
        for out, chain in zip(node.output, outputs, strict=True):
            chains[out] = chain


def unmapped_steps(model: onnx.ModelProto, chains: dict[str, AxisChains | None]) -> set[str]:
    """Main-graph values computed from a Loop's stacked outputs, or a Scan's whose steps frame_chains
    could not follow: one entry per iteration of something nothing here ties to the mask's positions
    (a site there that the mask's shape does not fit is marked, not taken as having no token axis)."""
    found: set[str] = set()
    for node in model.graph.node:
        if any(name in found for name in node.input):
            found.update(node.output)
        elif node.op_type in ("Loop", "Scan"):
            carried = len(node.input) - (attr(node, "num_scan_inputs", 0) if node.op_type == "Scan" else 2)
            found.update(out for out in node.output[carried:] if chains.get(out) is None)
    return found


def _merged_chain(found: list) -> AxisChains | None:
    """The steps of a node's output from its inputs': the one chain they carry (constants carry none),
    None where they differ. Except where they differ only by stride-1 steps (wav2vec2's positional conv,
    added back to the stream it came from after a slice that undoes its extra frame): an elementwise
    op's operands have one length, and the stream without those steps is what the positions are."""
    if any(c is None for c in found):
        return None
    chains = {c for c in found if c}
    if len(chains) <= 1:
        return next(iter(chains), ())
    strided = {tuple(tuple(step for step in axis if step[1] != 1) for axis in c) for c in chains}
    return min(chains, key=lambda c: sum(map(len, c))) if len(strided) == 1 else None


def site_frames(
    chains: dict[str, AxisChains | None],
    value: str,
    shape: tuple[int, ...],
    dim: int,
    batch: int,
    tokens: int,
) -> tuple[tuple[FrameStep, ...], int, int | None] | None:
    """(the steps, the frames they make of `tokens`, the axis that holds them) of the one spatial axis
    of the convs before `value` (frame_chains) whose frames a tensor of `shape` holds as the mask's
    positions: by probe.ops.token_layout (axis None), or as a conv's own output [B, C, frames, …] (the
    spatial axis's own axis: a Conv2d subsampler's frames axis, not its features'); None where none
    fits, or more than one differently. The scan's rule and the fix's alike."""
    from deadrelu_cli.probe.ops import token_layout

    fits = set()
    axes = chains.get(value) or ()
    for spatial, chain in enumerate(axes):
        frames = int(frame_count(chain, tokens))
        if frames == tokens:
            continue
        if token_layout(shape, dim, batch, frames) is not None:
            fits.add((chain, frames, None))
        elif (
            len(shape) == 2 + len(axes) >= 4
            and dim == 1
            and shape[0] == batch
            and shape[2 + spatial] == frames
        ):
            fits.add((chain, frames, 2 + spatial))
    return next(iter(fits)) if len(fits) == 1 else None


def conv_frames_keep(keep: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """A frames' mask [B, frames] shaped to broadcast against a conv output of `rank` whose frames are
    on `axis` ([B, C, frames, features]: [B, 1, frames, 1])."""
    shape = [keep.shape[0]] + [1] * (rank - 1)
    shape[axis] = keep.shape[1]
    return keep.reshape(shape)


def frame_count(chain: tuple[FrameStep, ...], lengths):
    """The frames each step chain makes of `lengths` positions (an int or an int array), as the
    Conv/pool ops size their output (floor((L + pads - kernel) / stride) + 1; SAME: ceil(L / stride));
    a real length is mapped so too: the frames Hugging Face's speech encoders count as real
    (`_get_feat_extract_output_lengths`)."""
    out = np.asarray(lengths, dtype=np.int64)
    for kernel, stride, pads, same in chain:
        if same:
            out = -(-out // stride)
        else:
            out = np.maximum((out + pads - kernel) // stride + 1, 0)
    return out


def frames_keep(chain: tuple[FrameStep, ...], keep: np.ndarray) -> tuple[np.ndarray, bool]:
    """The frames' mask of a batch's position mask `keep` [batch, tokens] after `chain`: frame f of a
    sample is real when f < frame_count(its real length), and whether that held (every sample's kept
    positions first, padding after: the convention those lengths rest on). Else every frame, and False:
    the layer says so, and a gate fails on it."""
    keep = np.asarray(keep, dtype=bool)
    frames = int(frame_count(chain, keep.shape[1]))
    lengths = keep.sum(axis=1)
    if not np.array_equal(keep, np.arange(keep.shape[1])[None, :] < lengths[:, None]):
        return np.ones((keep.shape[0], frames), bool), False
    return np.arange(frames)[None, :] < frame_count(chain, lengths)[:, None], True


def frame_mask_name(chain: tuple[FrameStep, ...]) -> str:
    """The graph input the scan adds for the frames' mask of `chain` (one per distinct chain)."""
    steps = "_".join(f"k{k}s{s}p{p}{'same' if same else ''}" for k, s, p, same in chain)
    return f"{MASK_INPUT}_frames_{steps}"


# token_layout of a conv feature map [B, C, h, w] over images given a pixel mask [B, H, W]: its cells of
# image only (probe.ops.pixel_cells), fed as a [B, h, w] mask
PIXEL_CELLS = "pixel_cells"


def _aligned(step: FrameStep) -> bool:
    """Whether a conv/pool step maps blocks of `stride` positions onto one output each (n·s in, n out:
    padding k - 1 in all, SAME, or a k = s patch), so that its output cell i is the block [i·s, (i+1)·s)."""
    stride = step[1]
    return all(int(frame_count((step,), n * stride)) == n for n in (1, 2, 3))


def site_cells(
    chains: dict[str, AxisChains | None],
    value: str,
    shape: tuple[int, ...],
    dim: int,
    batch: int,
    height: int,
    width: int,
) -> tuple[int, int, int, int] | None:
    """(stride y, stride x, h, w) where a tensor of `shape` is a feature map [B, C, h, w] over images of
    H×W pixels: by the conv/pool steps between the graph's inputs and `value` (frame_chains), each of
    them block-aligned (the strides multiply), else by its grid dividing the image (the torch probe's
    rule, probe.accumulator.PixelMask); None for any other tensor."""
    if len(shape) != 4 or dim != 1 or shape[0] != batch:
        return None
    h, w = int(shape[2]), int(shape[3])
    grid = pixel_grid(chains, value, height, width)
    if grid is not None and grid[2:] == (h, w):
        return grid
    if 0 < h <= height and 0 < w <= width and not height % h and not width % w:
        return (height // h, width // w, h, w)
    return None


def pixel_grid(
    chains: dict[str, AxisChains | None], value: str, height: int, width: int
) -> tuple[int, int, int, int] | None:
    """(stride y, stride x, h, w) of the feature map the block-aligned conv/pool steps before `value`
    make of an H×W image (frame_chains); None where the steps are not that."""
    axes = chains.get(value)
    if axes == ():  # no conv on the way: the image's own grid
        axes = ((), ())
    if axes is None or len(axes) != 2 or not all(_aligned(step) for axis in axes for step in axis):
        return None
    strides = [int(np.prod([step[1] for step in axis])) for axis in axes]
    return (*strides, int(frame_count(axes[0], height)), int(frame_count(axes[1], width)))


def cells_keep(cells: tuple[int, int, int, int], pixels: np.ndarray) -> tuple[np.ndarray, bool]:
    """A feature map's cells' mask [B, h, w] of a batch's pixel mask (probe.ops.pixel_cells), and whether
    it held; else every cell, and False (some cell holds image and padding both: the layer says so)."""
    sy, sx, h, w = cells
    found = pixel_cells(pixels, (sy, sx), (h, w))
    if found is None:
        return np.ones((np.asarray(pixels).shape[0], h, w), bool), False
    return found, True


def cells_mask_name(cells: tuple[int, int, int, int]) -> str:
    """The graph input the scan adds for the cells' mask of a feature map (one per grid)."""
    return f"{MASK_INPUT}_cells_s{cells[0]}x{cells[1]}_{cells[2]}x{cells[3]}"


# token_layout of a site in the body of a main-graph Scan that iterates the mask's tokens: one step's
# [B, ..., C] slice, masked by the mask's column of that step (a scan input the scan adds, token_steps)
TOKEN_STEPS = "scan_steps"
# token_layout of a conv output [B, C, frames, features, …] after a Conv2d subsampler: the frames' mask
# on the site's `frames_axis`
CONV_FRAMES = "conv_frames"
STEP_MASK = MASK_INPUT + "_step"  # the Scan body's input of that column, [batch] bool


def token_steps(
    node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]], batch: int, tokens: int
) -> int | None:
    """The direction (0 forward, 1 reverse) in which Scan `node` iterates the position mask's tokens:
    some scan input is [T, B, ...] scanned on axis 0 or [B, T, ...] on axis 1 (`shapes`: each input's on
    the first batch; probe.ops.token_layout's reading), every such input one direction, none of them of
    a shape that reads both ways (as many samples as tokens); else None (it iterates something else, or
    nothing says what)."""
    from deadrelu_cli.probe.ops import TOKEN_ROWS, TOKENS_FIRST, layout_ambiguous, token_layout

    count = attr(node, "num_scan_inputs", 0)
    inputs = list(node.input[len(node.input) - count :]) if count else []
    axes = list(attr(node, "scan_input_axes") or [0] * count)
    directions = list(attr(node, "scan_input_directions") or [0] * count)
    found = set()
    for name, axis, direction in zip(inputs, axes, directions, strict=False):
        shape = shapes.get(name)
        if shape is None or len(shape) < 3:
            continue
        if layout_ambiguous(shape, len(shape) - 1, batch, tokens):
            return None
        layout = token_layout(shape, len(shape) - 1, batch, tokens)
        if (layout, axis % len(shape)) in ((TOKENS_FIRST, 0), (TOKEN_ROWS, 1)):
            found.add(int(direction))
    return found.pop() if len(found) == 1 and batch != tokens else None


def frame_steps(
    node: onnx.NodeProto,
    chains: dict[str, AxisChains | None],
    shapes: dict[str, tuple[int, ...]],
    batch: int,
    tokens: int,
) -> tuple[tuple[FrameStep, ...], int] | None:
    """(the steps, the direction) where Scan `node` iterates the frames a conv subsampler makes of the
    mask's tokens (token_steps with the frames for the tokens, its scan inputs after those steps:
    frame_chains); None where it does not, or more than one way."""
    count = attr(node, "num_scan_inputs", 0)
    candidates = {
        chain
        for name in (node.input[len(node.input) - count :] if count else [])
        for chain in chains.get(name) or ()
    }
    fits = set()
    for chain in candidates:
        frames = int(frame_count(chain, tokens))
        direction = token_steps(node, shapes, batch, frames) if frames != tokens else None
        if direction is not None:
            fits.add((chain, direction))
    return next(iter(fits)) if len(fits) == 1 else None


def add_step_mask(
    node: onnx.NodeProto, body: onnx.GraphProto, direction: int, mask: str = MASK_INPUT
) -> None:
    """Make the position mask (`mask`: the batch's, or its frames') a scan input of Scan `node` (axis 1:
    the tokens, in `direction`), read in its body as STEP_MASK: the kept samples of each step."""
    count = attr(node, "num_scan_inputs", 0)
    axes = list(attr(node, "scan_input_axes") or [0] * count)
    directions = list(attr(node, "scan_input_directions") or [0] * count)
    values = {
        "num_scan_inputs": count + 1,
        "scan_input_axes": [*axes, 1],
        "scan_input_directions": [*directions, direction],
    }
    for name, value in values.items():  # in place: the `body` attribute (the graph being instrumented) stays
        found = next((a for a in node.attribute if a.name == name), None)
        if found is None:
            node.attribute.append(helper.make_attribute(name, value))
        elif isinstance(value, list):
            del found.ints[:]
            found.ints.extend(value)
        else:
            found.i = value
    node.input.append(mask)
    body.input.append(helper.make_tensor_value_info(STEP_MASK, TensorProto.BOOL, ["batch"]))


def _clip_bounds(node: onnx.NodeProto, index: GraphIndex) -> tuple[float | None, float | None]:
    if len(node.input) > 1 or attr(node, "min") is None:
        lo = index.constant(node.input[1]) if len(node.input) > 1 else None
        hi = index.constant(node.input[2]) if len(node.input) > 2 else None
        return (None if lo is None else float(lo)), (None if hi is None else float(hi))
    return float(attr(node, "min", -np.inf)), float(attr(node, "max", np.inf))


def _is_hard_sigmoid_part(node: onnx.NodeProto, index: GraphIndex) -> bool:
    """Clip(x + 3, 0, 6) scaled by 1/6: the decomposed HardSigmoid, or HardSwish either as
    x * (Clip(x + 3, 0, 6) / 6) or as (x * Clip(x + 3, 0, 6)) / 6 (PaddlePaddle's paddle2onnx)."""
    source = index.producer.get(node.input[0])
    if source is None or source.op_type != "Add":
        return False
    if not any(v is not None and np.allclose(v, 3.0) for v in (index.constant(i) for i in source.input)):
        return False
    data_inputs = {i for i in source.input if index.constant(i) is None}

    def scales_by_a_sixth(consumer: onnx.NodeProto) -> bool:
        consts = [index.constant(i) for i in consumer.input]
        if consumer.op_type == "Div":
            return any(c is not None and np.allclose(c, 6.0) for c in consts)
        return consumer.op_type == "Mul" and any(
            c is not None and np.allclose(c, 1 / 6.0, rtol=1e-3) for c in consts
        )

    for consumer in index.consumers.get(node.output[0], []):
        if scales_by_a_sixth(consumer):
            return True
        if consumer.op_type == "Mul" and data_inputs & set(consumer.input):  # x * Clip(x + 3, 0, 6), then / 6
            if any(scales_by_a_sixth(after) for after in index.consumers.get(consumer.output[0], [])):
                return True
    return False


# ops that take an index / bound tensor at these input positions, and ops an index passes through
_INDEX_INPUTS = {
    "Gather": (1,),
    "GatherElements": (1,),
    "GatherND": (1,),
    "ScatterElements": (1,),
    "ScatterND": (1,),
    "Slice": (1, 2, 3, 4),
    "Range": (0, 1, 2),
    "OneHot": (0,),
}
_INDEX_PASS_THROUGH = ("Cast", "Unsqueeze", "Squeeze", "Reshape", "Floor", "Ceil", "Round", "Identity")


def _is_index_clamp(node: onnx.NodeProto, index: GraphIndex) -> bool:
    """Clip(i, 0, n) whose every use is as an index or slice bound (position ids clamped to a table):
    a guard on indices, not an activation of units."""
    pending, seen, uses = [node.output[0]], set(), 0
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        for consumer in index.consumers.get(name, []):
            for position, value in enumerate(consumer.input):
                if value != name:
                    continue
                uses += 1
                if consumer.op_type in _INDEX_PASS_THROUGH and position == 0:
                    pending.extend(consumer.output)
                elif position not in _INDEX_INPUTS.get(consumer.op_type, ()):
                    return False
    return uses > 0


def max_relu_input(
    node: onnx.NodeProto, index: GraphIndex, checkpoint: frozenset[str] = frozenset()
) -> str | None:
    """The pre-activation of a ReLU written `Max(x, 0)` (jax.nn.relu and tf.maximum(x, 0) through
    tf2onnx, torch.maximum(x, 0) exported, torch.maximum(x, torch.zeros_like(x)) as
    Max(x, ConstantOfShape(Shape(x)))): x, when the other operand is zeros the graph makes (see
    _graph_zeros) and x comes from a layer with weights; None for other maxima (a LayerNorm's variance
    clamp, a stable softmax's running max), whose input is a reduction, not a layer's units."""
    if node.op_type != "Max" or len(node.input) != 2 or not all(node.input):
        return None
    for data, other in (node.input, node.input[::-1]):
        if index.constant(data) is None and _graph_zeros(other, data, index, checkpoint, node):
            return data if producer_weight(index, data) is not None else None
    return None


SPELLINGS = ("Max", "Where", "Mul")  # the ops a ReLU is spelled with in a graph (spelled_relu_input)

# Where(test(x, 0), a, b) is relu(x) when the test keeps x where x > 0 (or >= 0) and takes zeros elsewhere:
# per comparison (x on the left), whether its true branch is x
_WHERE_TESTS = {"Greater": True, "GreaterOrEqual": True, "Less": False, "LessOrEqual": False}
_FLIPPED = {
    "Greater": "Less",
    "Less": "Greater",
    "GreaterOrEqual": "LessOrEqual",
    "LessOrEqual": "GreaterOrEqual",
}


def where_relu_input(
    node: onnx.NodeProto, index: GraphIndex, checkpoint: frozenset[str] = frozenset()
) -> str | None:
    """The pre-activation of a ReLU written `Where(x > 0, x, 0)` (torch.where(x > 0, x, 0) exported) or
    `Where(x < 0, 0, x)` (tf2onnx / jax2onnx forms; >= and <= too, and the comparison either way round):
    x, on the same terms as max_relu_input (zeros the graph makes, not widening x; x from a layer)."""
    if node.op_type != "Where" or len(node.input) != 3 or not all(node.input):
        return None
    tested = _sign_test(node.input[0], index, checkpoint)
    if tested is None:
        return None
    x, keeps_x = tested
    kept, zeros = node.input[1:] if keeps_x else node.input[:0:-1]
    if kept != x or index.constant(x) is not None or not _graph_zeros(zeros, x, index, checkpoint, node):
        return None
    return x if producer_weight(index, x) is not None else None


def _sign_test(name: str, index: GraphIndex, checkpoint: frozenset[str]) -> tuple[str, bool] | None:
    """(x, whether the test is true where x > 0) for a mask `name` that compares x with zeros the graph
    makes (x > 0, x >= 0, x < 0, x <= 0, either way round), through Casts (torch's masked_fill exports its
    mask as Cast(Less(x, 0), to=BOOL)) and Nots (`~(x > 0)`: true where x <= 0); None for any other mask."""
    test, negated = index.producer.get(name), False
    while test is not None and test.op_type in ("Cast", "Not") and len(test.input) == 1:
        negated ^= test.op_type == "Not"
        test = index.producer.get(test.input[0])
    if test is None or test.op_type not in _WHERE_TESTS or len(test.input) != 2:
        return None
    left, right = test.input
    if _graph_zeros(right, left, index, checkpoint, test):
        return left, _WHERE_TESTS[test.op_type] != negated
    if _graph_zeros(left, right, index, checkpoint, test):
        return right, _WHERE_TESTS[_FLIPPED[test.op_type]] != negated
    return None


def mul_relu_input(
    node: onnx.NodeProto, index: GraphIndex, checkpoint: frozenset[str] = frozenset()
) -> str | None:
    """The pre-activation of a ReLU written `x * (x > 0)` (or `x >= 0`, either order; torch exports the
    mask as Cast(Greater(x, 0)) to x's type): x, on the same terms as max_relu_input (x from a layer, its
    mask made from x itself and zeros the graph makes). The product is relu(x) except at x = -inf (NaN)."""
    if node.op_type != "Mul" or len(node.input) != 2 or not all(node.input):
        return None
    for data, mask in (node.input, node.input[::-1]):
        if index.producer.get(mask) is None or index.producer[mask].op_type != "Cast":
            continue  # ONNX's Mul takes one type: a bool mask reaches it cast
        tested = _sign_test(mask, index, checkpoint)
        if tested == (data, True) and index.constant(data) is None:
            return data if producer_weight(index, data) is not None else None
    return None


def spelled_relu_input(
    node: onnx.NodeProto, index: GraphIndex, checkpoint: frozenset[str] = frozenset()
) -> str | None:
    """x of a ReLU that the graph spells with Max, Where or Mul (no Relu node), else None. `checkpoint`:
    the initializers that hold a checkpoint's tensors (checkpoint_tensors), never zeros the graph makes."""
    return (
        max_relu_input(node, index, checkpoint)
        or where_relu_input(node, index, checkpoint)
        or mul_relu_input(node, index, checkpoint)
    )


def stored_zero_relus(model: onnx.ModelProto, ops: tuple[str, ...]) -> Counter:
    """The Max / Where nodes that would spell a ReLU of a layer's output but for their zeros, a checkpoint
    tensor (checkpoint_tensors): no sites (probe.ops above zeros_fit), named for the scan's `unseen` as
    the torch formats name them (probe.ops.stored_zeros_label). Main graph only."""
    found: Counter = Counter()
    checkpoint = checkpoint_tensors(model)
    if "relu" not in ops or not checkpoint:
        return found
    index = GraphIndex(model.graph)
    for node in model.graph.node:
        if node.op_type in ("Max", "Where") and spelled_relu_input(node, index, checkpoint) is None:
            if spelled_relu_input(node, index) is not None:
                found[stored_zeros_label(node.name or node.output[0], node.op_type)] += 1
    return found


def _graph_zeros(
    name: str, data: str, index: GraphIndex, checkpoint: frozenset[str], user: onnx.NodeProto
) -> bool:
    """Whether `name` is zeros the graph itself makes that do not widen `data` (the rule of the torch
    formats, probe.ops above zeros_fit): a Constant node or a constant initializer of zeros (one, or a
    tensor broadcasting into `data`: torch.zeros(C)), or ConstantOfShape / Expand of zeros to Shape(data)
    (torch.zeros_like). Not a checkpoint tensor (checkpoint_tensors), even when all zero. ONNX ops take
    one element type for both operands, so no dtype can be promoted. Through Casts (zeros of any type are
    zeros: torch's `clamp_min(x, zeros_like(x))` exports a Cast of them)."""
    node = index.producer.get(name)
    if node is not None and node.op_type == "Cast" and len(node.input) == 1:
        return _graph_zeros(node.input[0], data, index, checkpoint, user)
    if node is not None and node.op_type in ("ConstantOfShape", "Expand"):
        if len(node.input) != (1 if node.op_type == "ConstantOfShape" else 2):
            return False
        if node.op_type == "ConstantOfShape":
            fill = next(
                (numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"), np.zeros(1)
            )
        else:
            fill = index.constant(node.input[0])
            if fill is None or fill.size != 1 or _stored_in(node.input[0], index, checkpoint):
                return False
        if np.asarray(fill).size == 0 or np.any(np.asarray(fill) != 0):
            return False
        shape_of = index.producer.get(node.input[-1])
        whole = shape_of is not None and attr(shape_of, "start", 0) == 0 and attr(shape_of, "end") is None
        if shape_of is not None and shape_of.op_type == "Shape" and whole:
            # x's own shape, or one that shape inference shows is the same dim for dim (zeros_like(h))
            return shape_of.input[0] == data or _same_dims(index, shape_of.input[0], data)
        dims = index.constant(node.input[-1])
        shape = tuple(int(d) for d in np.ravel(dims)) if dims is not None else None
        return shape is not None and _broadcasts_into(shape, index.shape(data))
    value = index.constant(name)
    if value is None or (_stored_in(name, index, checkpoint) and not _code_operand(user, checkpoint)):
        return False
    value = np.asarray(value)
    if value.size == 0 or np.any(value != 0):
        return False
    # zeros that widen x (or of a shape not known to fit it): no elementwise ReLU of x
    shape = index.shape(data)
    return value.ndim == 0 or _broadcasts_into(value.shape, shape) or (value.size == 1 and shape is None)


def _same_dims(index: GraphIndex, a: str, b: str) -> bool:
    """Whether shape inference gives `a` and `b` the same shape (symbolic dims by their names)."""

    def dims(name: str) -> list | None:
        vi = index.value_info.get(name)
        if vi is None or not vi.type.tensor_type.HasField("shape"):
            return None
        return [d.dim_value or d.dim_param or None for d in vi.type.tensor_type.shape.dim]

    first, second = dims(a), dims(b)
    return first is not None and first == second and None not in first


_SIGNATURE = "pkg.torch.export.ExportedProgram.graph_signature"
_STATE_DICT_KEY = re.compile(r"[A-Za-z_]\w*(\.\w+)*\Z")  # a module's parameter or buffer, as torch names it
_FX_NODE = "pkg.torch.onnx.fx_node"  # a dynamo export's node: the torch.export node it was translated from


def checkpoint_tensors(model: onnx.ModelProto) -> frozenset[str]:
    """Initializers that hold a checkpoint's values rather than constants of the code: those that are
    also graph inputs (a caller may feed others); in a torch.onnx export (dynamo) those its
    ExportedProgram signature lists as parameters or buffers; in a TorchScript-based torch.onnx export
    (no signature) those named as state_dict keys (`fc.bias`, `floor`): that exporter keeps the code's
    constants in Constant nodes, which a simplifier may turn into initializers named after their
    outputs (`/Constant_output_0`, `onnx::Max_5`). As in the torch
    formats, a parameter or buffer of zeros is no ReLU's zero operand. Also "%" + each placeholder name
    of the signature's parameters and buffers (see _code_operand)."""
    graphs = [model.graph]
    for graph in graphs:
        graphs.extend(
            a.g for node in graph.node for a in node.attribute if a.type == onnx.AttributeProto.GRAPH
        )
    names = {i.name for i in model.graph.input}
    signature = next((p.value for p in model.graph.metadata_props if p.key == _SIGNATURE), None)
    if signature is not None:
        for line in signature.splitlines():
            if (" PARAMETER " in line or " BUFFER " in line) and "target='" in line:
                names.add(line.split("target='", 1)[1].split("'", 1)[0])
                names.add("%" + line.split(":", 1)[0].strip())  # its placeholder in fx_node metadata
    elif model.producer_name == "pytorch":
        names |= {
            init.name for graph in graphs for init in graph.initializer if _STATE_DICT_KEY.match(init.name)
        }
    return frozenset(names)


def _code_operand(user: onnx.NodeProto, checkpoint: frozenset[str]) -> bool:
    """Whether a dynamo export's `user` node read no parameter or buffer in the program it was translated
    from (its fx_node metadata names the operands): its stored operand is then a constant of the code that
    the exporter's optimizer merged with an equal checkpoint tensor (torch.zeros(C) with a zero buffer)."""
    fx = next((p.value for p in user.metadata_props if p.key == _FX_NODE), "")
    if "args = (" not in fx:
        return False
    operands = re.findall(r"%(\w+)", fx.split("args = (", 1)[1])
    return bool(operands) and not any(f"%{operand}" in checkpoint for operand in operands)


def _stored_in(name: str, index: GraphIndex, checkpoint: frozenset[str]) -> bool:
    """Whether `name` is (a re-shaping of) one of the `checkpoint` initializers."""
    chain = index.reshaped_from(name) or [name]
    return chain[-1] in checkpoint


def _broadcasts_into(small: tuple[int, ...], shape: list[int | None] | None) -> bool:
    """Whether a constant of shape `small` broadcasts against a tensor of `shape` (None: a symbolic dim,
    which may be 1) without widening it: torch.maximum(x, torch.zeros(C)) exports its zeros as [C]."""
    if shape is None or len(small) > len(shape):
        return False
    return all(s == 1 or s == d for s, d in zip(small[::-1], shape[::-1], strict=False))


def classify(
    node: onnx.NodeProto, index: GraphIndex, checkpoint: frozenset[str] = frozenset()
) -> tuple[str, float | None] | None:
    if node.op_type == "Relu":
        return "relu", None
    if node.op_type in SPELLINGS:
        return ("relu", None) if spelled_relu_input(node, index, checkpoint) is not None else None
    if node.op_type == "Clip":
        lo, hi = _clip_bounds(node, index)
        if lo is None or lo != 0.0 or _is_index_clamp(node, index):
            return None
        if _is_hard_sigmoid_part(node, index):
            return "hardswish_part", hi
        if hi == 6.0:
            return "relu6", 6.0
        if hi == np.inf or (hi is None and (len(node.input) < 3 or not node.input[2])):
            return "relu", None  # Clip(x, 0) with no upper bound (torch.clamp(x, min=0)): a ReLU
        return "clip", hi
    if node.op_type == "LeakyRelu":
        return "leaky_relu", None
    if node.op_type == "Elu":
        return "elu", None
    if node.op_type == "Gelu":
        return "gelu", None
    return None


_REDUCTIONS = frozenset(
    {
        "ReduceSum",
        "ReduceMean",
        "ReduceMax",
        "ReduceMin",
        "ReduceProd",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSumExp",
    }
)
# elementwise ops that keep a reduction one value per position (probe.aten_ops.PER_POSITION_OPS)
_PER_POSITION = frozenset(
    {"Add", "Sub", "Mul", "Div", "Neg", "Pow", "Abs", "Sqrt", "Exp", "Log", "Cast", "Identity"}
)


def _per_position(index: GraphIndex, name: str) -> bool:
    """Whether a tensor is one value per position, no units: a reduction over the unit axis
    (probe.ops.unit_axis_reduced) or an elementwise op of one (`ReduceSum(h, -1) - m`), as the torch
    probes read it (probe.exported._per_position); an input broadcast to more values than the node's output
    (`Sub(h, ReduceMean(h, keepdims=1))`: back over h's units, a centred layer) is not followed."""
    stack, seen = [name], 0
    while stack and seen < 32:
        node, seen = index.producer.get(stack.pop()), seen + 1
        if node is None:
            continue
        if node.op_type in _REDUCTIONS and node.input:
            axes = attr(node, "axes")
            if axes is None and len(node.input) > 1 and node.input[1]:  # an input from opset 13 / 18
                found = index.constant(node.input[1])
                axes = None if found is None else [int(a) for a in np.ravel(found)]
            rank = index.rank(node.input[0])
            if axes is not None and rank is not None:
                channel_first = trace_producer(index, node.input[0]).channel_first
                if unit_axis_reduced(rank, list(axes), channel_first):
                    return True
        elif node.op_type in _PER_POSITION:
            shape = index.shape(node.output[0])
            stack.extend(i for i in node.input if i and (shape is None or index.shape(i) in (None, shape)))
    return False


def _clip_is_layer(index: GraphIndex, site: OnnxSite, trace) -> bool:
    """probe.ops.clamp_is_layer for a Clip(x, 0) whose input no layer produced, from the shapes that
    shape inference gave (an unknown shape: a layer); a Clip of one value per position (a margin
    `(h.sum(-1) - m).clamp(min=0)`, _per_position) is none, whatever its shape."""
    if _per_position(index, site.input_name):
        return False
    shape = index.shape(site.input_name)
    if shape is None:
        return True
    # the unit axis site_channel_dim takes when no producer says: dim 1 from rank 4 on, else the last
    unit_axis = site.unit_axis if site.unit_axis is not None else 1 if len(shape) >= 4 else -1
    return clamp_is_layer(tuple(shape), unit_axis, trace.producer is not None)


_BRANCH_ORDER = {"then_branch": 0, "else_branch": 1}


def _subgraphs(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    """Subgraph attributes in reading order (an If's then branch before its else branch)."""
    found = [(attr.name, attr.g) for attr in node.attribute if attr.type == onnx.AttributeProto.GRAPH]
    return sorted(found, key=lambda item: _BRANCH_ORDER.get(item[0], 2))


def find_sites(model: onnx.ModelProto, ops: tuple[str, ...], include_all: bool = False) -> list[OnnxSite]:
    """Activation sites in topological (node) order; subgraph sites named with their path."""
    sites: list[OnnxSite] = []
    checkpoint = checkpoint_tensors(model)

    def walk(
        graph: onnx.GraphProto, path: tuple[str, ...], prefix: str, outer: GraphIndex | None, in_loop: bool
    ):
        index = GraphIndex(graph, outer)
        for node in graph.node:
            kind = classify(node, index, checkpoint)
            implicit = implicit_relu(node, index) if kind is None and (include_all or "relu" in ops) else None
            site = None
            if kind is not None and (include_all or kind[0] in ops):
                base = node.name or node.output[0]
                pre = spelled_relu_input(node, index, checkpoint) or node.input[0]
                site = OnnxSite(
                    name=f"{prefix}{base}",
                    op=kind[0],
                    node_name=node.name,
                    input_name=pre,
                    output_name=node.output[0],
                    graph_path=path,
                    rank=index.rank(pre),
                    clip_max=kind[1],
                    in_loop=in_loop,
                    spelled=node.op_type if node.op_type in SPELLINGS else None,
                )
                # a fused activation writes the fused node's output, which onnxruntime keeps from the
                # float graph's activation; an nchwc copy is named after that tensor
                site.output_tensor = None if path else node.output[0]
                origin = fused_origin(site.input_name)
                if origin is not None:
                    site.implicit, site.module_type = "fused", origin
                    if origin == NCHWC_CONV and not path:
                        site.output_tensor = nchwc_tensor(node.name)
            elif implicit is not None and implicit[2] is not None:
                # a quantize clamping at the zero point: reads the pre-activation (when the graph has it)
                # and the dequantized output, which is > 0 exactly when the quantized value is above zero
                name, pre, dequantized = implicit
                site = OnnxSite(
                    name=f"{prefix}{name}",
                    op="relu",
                    node_name=node.name,
                    input_name=pre or dequantized,
                    output_name=dequantized,
                    graph_path=path,
                    rank=index.rank(dequantized) or index.rank(node.output[0]),
                    in_loop=in_loop,
                    implicit="quantize",
                    module_type=node.op_type,
                )
                # quantize_static gives the Relu's output name to the tensor it now quantizes: the float
                # graph's activation output, which pairs the layers when no weight does (a BatchNorm's)
                site.output_tensor = pre if pre and not path else None
            if site is not None:
                site.weight = producer_weight(index, site.input_name)
                trace = trace_producer(index, site.input_name)
                site.channel_first, site.producer, site.bias = trace.channel_first, trace.producer, trace.bias
                site.unit_axis, site.axis_lost = trace.axis, trace.lost
                site.experts_merged = fused_experts_rows(index, site.input_name)
                if site.module_type == NCHWC_CONV:  # reordered back to NCHW: units on dim 1
                    site.channel_first = True
                if site.channel_first is None:
                    if kind is not None and node.op_type == "Clip" and not _clip_is_layer(index, site, trace):
                        site = None  # Clip(x, 0) of a scalar / a variance kept as [B, T, 1]: no units
                    else:
                        site.channel_first = consumer_layout(index, site.output_name)
                if site is not None:
                    sites.append(site)
            for attr_name, sub in _subgraphs(node):
                label = node.name or node.output[0]
                walk(
                    sub,
                    (*path, f"{label}:{attr_name}"),
                    f"{prefix}{label}/{attr_name}/",
                    index,
                    in_loop or node.op_type in ("Loop", "Scan"),
                )

    walk(model.graph, (), "", None, False)
    return sites


def onnx_sites(path: str, ops: tuple[str, ...]):
    """For `deadrelu inspect`: the sites as StaticSite rows."""
    from deadrelu_cli.loaders.onnx_model import read_onnx
    from deadrelu_cli.probe.exported import StaticSite
    from deadrelu_cli.probe.onnx_deployed import deployed_view

    model = read_onnx(path)
    deployed_view(model)  # the unseen nodes are a note of the scan; inspect lists what it can see
    return [
        StaticSite(
            s.name,
            s.op,
            False,
            s.module_type or ("Relu" if s.op == "relu" else s.op),
            s.channel_first,
            s.producer,
        )
        for s in find_sites(model, ops, include_all=True)
    ]


# ---------------------------------------------------------------------------------------------
# instrumentation


class _Builder:
    """Adds reduction nodes to one graph, respecting the opset's form of the Reduce* axes."""

    def __init__(self, graph: onnx.GraphProto, opset: int, tag: str) -> None:
        self.graph, self.opset, self.tag = graph, opset, tag
        self.count = 0

    def fresh(self, stem: str) -> str:
        self.count += 1
        return f"deadrelu_{self.tag}_{stem}_{self.count}"

    def node(self, op: str, inputs: list[str], stem: str, **attrs) -> str:
        out = self.fresh(stem)
        self.graph.node.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(self, array: np.ndarray, stem: str) -> str:
        name = self.fresh(stem)
        self.graph.node.append(
            helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(array, name))
        )
        return name

    def reduce(self, op: str, x: str, axes: list[int], stem: str) -> str:
        axes_from_input = (op == "ReduceSum" and self.opset >= 13) or (
            op in ("ReduceMax", "ReduceMin") and self.opset >= 18
        )
        if not axes:
            return self.node("Identity", [x], stem)
        if axes_from_input:
            return self.node(op, [x, self.const(np.array(axes, dtype=np.int64), "axes")], stem, keepdims=0)
        return self.node(op, [x], stem, axes=axes, keepdims=0)


def output_only_max(site: OnnxSite, threshold: float) -> bool:
    """Whether, once every unit of the site has fired, the max of its output is the max of its input.

    For relu with threshold t >= 0 a unit that fired saw some x > t >= 0, so its max pre-activation is
    positive and equals the max of y = max(x, 0) over the same positions (later batches included: the
    running max is max(max x before, max y after) = max x). relu6/clip cap y, an implicit (quantized or
    fused) site's output is not max(x, 0) of its input, and --explain needs the input's minimum. A Where
    spelling outputs 0 (not NaN) for a NaN input, which would hide the NaN from the max; a Mul spelling
    outputs NaN for x = -inf."""
    return (
        site.op == "relu"
        and site.spelled not in ("Where", "Mul")
        and threshold >= 0.0
        and site.implicit is None
        and not site.track_min
        and not site.graph_path
        and site.input_name != site.output_name
    )


KERNEL_DOMAIN = "deadrelu"  # the custom ops of native.onnx_library(): ReluStats, ClipStats
KERNEL_STATS = ("max", "pos", "sum", "size")  # their outputs, in order (ClipStats: and "sat")


def kernel_countable(site: OnnxSite, channel_dim: int, threshold: float, elem_type: int) -> bool:
    """Whether the compiled kernel (deadrelu.ReluStats / ClipStats, one read of the tensor) can count this
    site: a float32 relu, relu6 or Clip(x, 0, cap) of the main graph, counted at threshold 0 (x > 0), with
    its units on axis 1 or last. Spelled, quantized or fused ones, --explain's minimum and other thresholds
    keep the graph's own ops."""
    rank = site.rank or 0
    capped = site.op in ("relu6", "clip") and site.clip_max is not None and 0.0 < site.clip_max < np.inf
    return (
        (site.op == "relu" or capped)
        and site.spelled is None
        and site.implicit is None
        and not site.track_min
        and not site.graph_path
        and rank >= 2
        and channel_dim in (1, rank - 1)
        and threshold == 0.0
        and elem_type == TensorProto.FLOAT
    )


def _kernel_stats(
    builder: _Builder, site: OnnxSite, channel_dim: int, source: str, jobs: int
) -> dict[str, str]:
    """The site's max, count, sum and size from one ReluStats node reading `source` (the pre-activation, or
    the output where output_only_max allows: relu(relu(x)) = relu(x), so the count and sum are the same)."""
    keys = (*KERNEL_STATS, "sat") if site.op != "relu" else KERNEL_STATS
    outs = [builder.fresh(key) for key in keys]
    attrs = {"units_last": int(channel_dim == (site.rank or 0) - 1), "jobs": jobs}
    if site.op != "relu":  # clip(x, 0, cap): its sum is that of the clipped values, "sat" the count at cap
        attrs["cap"] = float(site.clip_max)
    op = "ClipStats" if site.op != "relu" else "ReluStats"
    builder.graph.node.append(
        helper.make_node(op, [source], outs, name=outs[0], domain=KERNEL_DOMAIN, **attrs)
    )
    return dict(zip(keys, outs, strict=True))


def _exact_step(builder: _Builder, y: str) -> str:
    """1.0 where y > 0, else 0.0, for y >= 0, built from an op onnxruntime runs in its blocked NCHWc layout
    (HardSigmoid, elementwise), so the activation is not copied back to NCHW for a Greater.

    HardSigmoid(v) = min(max(alpha * v, 0), 1) with beta = 0. y * 2**127 * 2**22 >= 1 for every positive
    float32 (the smallest is 2**-149); scaling by powers of two is exact and inf clips to 1, so clipping
    after each scaling gives exactly 1 for y > 0 and 0 for y = 0. (Two elementwise passes cost about a third
    of the two depthwise 1x1 Convs this replaced: ResNet-18, onnxruntime's profiler, 7.3% -> 2.7% of a run.)
    A NaN in y makes the batch's sum NaN, and the host recounts that batch with Greater."""
    once = builder.node("HardSigmoid", [y], "step127", alpha=2.0**127, beta=0.0)
    return builder.node("HardSigmoid", [once], "step22", alpha=2.0**22, beta=0.0)


def _add_reductions(
    builder: _Builder,
    site: OnnxSite,
    channel_dim: int,
    threshold: float,
    elem_type: int,
    shape: list[int | None] | None = None,
    exact_step: bool = True,
    max_from_output: bool = False,
    nan_flags: bool = False,
    keep: str | None = None,
    finite_only: bool = False,
    kernel_jobs: int = 0,
) -> dict[str, str]:
    """Per-channel statistics of one site. Full-size intermediates stay 4 bytes per element
    (int32 / float); only the [C] results are widened to int64 / double. `max_from_output`: the max
    reads the ReLU's output instead of its input (see output_only_max), so the pre-activation has one
    consumer and onnxruntime keeps Conv+Relu fused. `nan_flags`: also whether each unit's input held a
    NaN (the recount of a NaN batch: a max pool's NaN handling depends on the order it reads in).
    `keep`: a bool tensor broadcasting against the site's (the position mask, see _keep_of): only where it
    is true do values count; every statistic but the size, which the host scales to the kept positions.
    `finite_only` (--allow-nonfinite): where the input or the output is NaN or ±Inf, the input reads -inf
    and the output 0 (no firing, nothing to the max or the sum), and "nonfinite" counts those places.
    `kernel_jobs` > 0: where kernel_countable, one deadrelu.ReluStats node counts the site instead, its
    rows shared out in that many jobs (the session must have native.onnx_library() registered)."""
    site.positions = None
    countable = kernel_countable(site, channel_dim, threshold, elem_type) and exact_step
    if kernel_jobs > 0 and countable and keep is None and not (nan_flags or finite_only):
        peak = site.output_name if max_from_output and output_only_max(site, threshold) else site.input_name
        return _kernel_stats(builder, site, channel_dim, peak, kernel_jobs)
    rank = site.rank or 0
    axes = [d for d in range(rank) if d != channel_dim] if rank > 1 else []
    np_type = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    # the threshold as the largest value of the activation's own type at most it (probe.ops.threshold_below)
    exact_threshold = threshold_below(
        threshold, "bfloat16" if elem_type == TensorProto.BFLOAT16 else np.dtype(np_type)
    )
    x, y = site.input_name, site.output_name
    if site.rank is None:
        # Rank unknown (e.g. inside an If branch that shape inference could not see through): view the
        # tensor as [N, C, rest] (units on dim 1) or [rest, C] (units last); both reshapes work for any rank.
        if channel_dim == -1:
            last = builder.node(
                "Slice",
                [
                    builder.node("Shape", [x], "shape"),
                    builder.const(np.array([-1], np.int64), "m1"),
                    builder.const(np.array([np.iinfo(np.int64).max], np.int64), "end"),
                ],
                "lastdim",
            )
            shape = builder.node(
                "Concat", [builder.const(np.array([-1], np.int64), "minus1"), last], "flatshape", axis=0
            )
            axes = [0]
        else:
            shape = builder.const(np.array([0, 0, -1], np.int64), "ncrest")
            axes = [0, 2]
        x = builder.node("Reshape", [x, shape], "xflat")
        y = builder.node("Reshape", [y, shape], "yflat")
        rank = 3 if channel_dim != -1 else 2
    if elem_type not in (TensorProto.FLOAT, TensorProto.DOUBLE):  # fp16/bf16: reduce in float32
        # onnxruntime on CPU runs fp16 ops in float32 and may merge this Cast with its own, so the
        # values can be the float32 ones before fp16 rounding: the host rounds max_pre back (rounding
        # is monotonic, so that is exact); counts differ only for |x| below fp16's smallest subnormal.
        site.float16 = elem_type == TensorProto.FLOAT16
        x = builder.node("Cast", [x], "xf", to=TensorProto.FLOAT)
        y = builder.node("Cast", [y], "yf", to=TensorProto.FLOAT)
        np_type = np.float32

    def widen(name: str, to: int, stem: str) -> str:
        return builder.node("Cast", [name], stem, to=to)

    wrong = None
    if finite_only:
        # not |v| < inf: true for NaN and ±Inf alike (Less and Abs exist from opset 7; IsInf from 10)
        inf = builder.const(np.array(np.inf, dtype=np_type), "inf")

        def bad(v: str, stem: str) -> str:
            return builder.node(
                "Not",
                [builder.node("Less", [builder.node("Abs", [v], f"{stem}abs"), inf], f"{stem}lt")],
                stem,
            )

        wrong = builder.node("Or", [bad(x, "xbad"), bad(y, "ybad")], "bad")
        x = builder.node(
            "Where", [wrong, builder.const(np.array(-np.inf, dtype=np_type), "neginf"), x], "xfin"
        )
        y = builder.node("Where", [wrong, builder.const(np.array(0, dtype=np_type), "zero"), y], "yfin")

    def nonfinite_count(keep_mask: str | None) -> str:
        """How many values were not finite (where the position mask keeps them), as one int64."""
        bad64 = builder.node("Cast", [wrong], "bad64", to=TensorProto.INT64)
        if keep_mask is not None:
            bad64 = builder.node(
                "Where", [keep_mask, bad64, builder.const(np.array(0, np.int64), "nofill")], "kbad"
            )
        return builder.node("ReduceSum", [bad64], "nonfinite", keepdims=0)

    from_output = counts_from_output(site.op, threshold) or (
        site.op == "clip" and 0.0 <= threshold < (site.clip_max or np.inf)
    )
    nonnegative = site.op in ("relu", "relu6", "clip")
    magnitude = y if nonnegative else builder.node("Abs", [y], "abs")
    source = (
        y if from_output else x
    )  # reading y only keeps onnxruntime's Conv+Relu fusion for everything but the max
    peak = y if max_from_output and output_only_max(site, threshold) else x

    def greater() -> str:
        thr = builder.const(np.array(exact_threshold, dtype=np_type), "threshold")
        return builder.node(
            "Cast", [builder.node("Greater", [source, thr], "gt")], "cast", to=TensorProto.FLOAT
        )

    def is_nan() -> str:
        return builder.node("Cast", [builder.node("IsNaN", [x], "isnan")], "nanf32", to=TensorProto.FLOAT)

    at_cap = None
    if site.op in ("relu6", "clip") and site.clip_max is not None:
        cap = builder.const(np.array(site.clip_max, dtype=np_type), "cap")
        at_cap = builder.node(
            "Cast",
            [builder.node("Not", [builder.node("Less", [y, cap], "below")], "atcap")],
            "casts",
            to=TensorProto.FLOAT,
        )
    # Elements per unit: from a static H*W, else Size of the output (same shape as the input; Size of a
    # conv output would make onnxruntime copy that tensor out of its blocked NCHWc layout)
    if channel_dim == 1 and rank >= 3 and not site.graph_path and keep is None:
        # NCHW-like: the global pools are onnxruntime's fastest reductions; they give per-(sample, channel)
        # means, which the host turns back into exact counts (means of 0/1 times H*W, rounded) and sums.
        known = shape if shape is not None and len(shape) == rank and site.rank is not None else None
        out = {}
        if known is not None and all(known[2:]):
            site.positions = int(np.prod(known[2:]))  # static H*W: no Size, which would need the NCHW copy
        else:
            out["size"] = builder.node("Size", [site.output_name], "size")
        use_step = exact_step and from_output and threshold == 0.0 and elem_type == TensorProto.FLOAT
        use_step = use_step and builder.opset >= 6  # HardSigmoid-6
        fired = _exact_step(builder, y) if use_step else greater()
        out["pos_nc"] = builder.node("GlobalAveragePool", [fired], "pos_nc")
        out["sum_nc"] = builder.node("GlobalAveragePool", [magnitude], "sum_nc")
        out["max_nc"] = builder.node("GlobalMaxPool", [peak], "max_nc")
        if site.track_min:  # min = -max(-x): GlobalMaxPool is the pooled reduction onnxruntime has
            out["min_nc"] = builder.node("GlobalMaxPool", [builder.node("Neg", [x], "neg")], "negmin_nc")
        if at_cap is not None:
            out["sat_nc"] = builder.node("GlobalAveragePool", [at_cap], "sat_nc")
        if nan_flags:
            out["nan_nc"] = builder.node("GlobalMaxPool", [is_nan()], "nan_nc")
        if wrong is not None:
            out["nonfinite"] = nonfinite_count(None)
        return out

    def kept(value: str, fill: float, dtype, stem: str) -> str:
        """`value` where the position counts, else `fill` (the reduction's identity): exact, NaN-safe."""
        if keep is None:
            return value
        return builder.node("Where", [keep, value, builder.const(np.array(fill, dtype=dtype), "fill")], stem)

    out = {"size": builder.node("Size", [site.output_name], "size")}
    fired32 = kept(builder.node("Cast", [greater()], "fired32", to=TensorProto.INT32), 0, np.int32, "kpos")
    out["pos"] = widen(builder.reduce("ReduceSum", fired32, axes, "pos32"), TensorProto.INT64, "pos")
    peak = kept(peak, -np.inf, np_type, "kmax")
    out["max"] = widen(builder.reduce("ReduceMax", peak, axes, "maxf"), TensorProto.DOUBLE, "max")
    if site.track_min:
        low = kept(x, np.inf, np_type, "kmin")
        out["min"] = widen(builder.reduce("ReduceMin", low, axes, "minf"), TensorProto.DOUBLE, "min")
    if nan_flags:
        nan = kept(is_nan(), 0.0, np.float32, "knan")
        out["nan"] = widen(builder.reduce("ReduceMax", nan, axes, "nanf"), TensorProto.DOUBLE, "nan")
    magnitude = kept(magnitude, 0.0, np_type, "ksum")
    out["sum"] = widen(builder.reduce("ReduceSum", magnitude, axes, "sumf"), TensorProto.DOUBLE, "sum")
    if at_cap is not None:
        at_cap32 = kept(builder.node("Cast", [at_cap], "sat_i32", to=TensorProto.INT32), 0, np.int32, "ksat")
        out["sat"] = widen(builder.reduce("ReduceSum", at_cap32, axes, "sat32"), TensorProto.INT64, "sat")
    if wrong is not None:
        out["nonfinite"] = nonfinite_count(keep)
    return out


def _keep_of(builder: _Builder, site: OnnxSite) -> str:
    """The position mask [batch, tokens] reshaped to broadcast against the site's tensor:
    [B, T, 1, …] (TOKEN_ROWS), [T, B, 1, …] (TOKENS_FIRST), [B*T, 1, …] (TOKEN_FLAT), [B, 1, T]
    (TOKENS_LAST); [T*B, 1, …] of the mask transposed (TOKEN_FLAT_TIME_MAJOR: rows t*B + b)."""
    from deadrelu_cli.probe.ops import TOKEN_FLAT, TOKEN_FLAT_TIME_MAJOR, TOKEN_ROWS, TOKENS_FIRST

    rank = site.rank or 0
    mask = site.mask_input  # the batch's mask, or its frames' after a conv subsampler
    if site.token_layout == TOKEN_STEPS:  # one step's [B, ..., C]: that step's column of the mask
        mask, shape = STEP_MASK, [-1] + [1] * (rank - 1)
    elif site.token_layout == PIXEL_CELLS:  # [B, C, h, w]: [B, 1, h, w]
        shape = [0, 1, *site.cells[2:]]
    elif site.token_layout == CONV_FRAMES:  # [B, C, frames, …]: [B, 1, frames, 1, …]
        shape = [0] + [1] * (rank - 1)
        shape[site.frames_axis] = -1
    elif site.token_layout in (TOKEN_ROWS, TOKENS_FIRST):
        shape = [0, 0] + [1] * (rank - 2)  # 0: copy that dim of the mask
        if site.token_layout == TOKENS_FIRST:
            mask = builder.node("Transpose", [mask], "keept", perm=[1, 0])
    elif site.token_layout in (TOKEN_FLAT, TOKEN_FLAT_TIME_MAJOR):
        shape = [-1] + [1] * (rank - 1)
        if site.token_layout == TOKEN_FLAT_TIME_MAJOR:
            mask = builder.node("Transpose", [mask], "keept", perm=[1, 0])
    else:
        shape = [0, 1, -1]
    return builder.node("Reshape", [mask, builder.const(np.array(shape, np.int64), "keepshape")], "keep")


_STAT_TYPES = {
    "pos": TensorProto.INT64,
    "max": TensorProto.DOUBLE,
    "sum": TensorProto.DOUBLE,
    "size": TensorProto.INT64,
    "sat": TensorProto.INT64,
    "min": TensorProto.DOUBLE,
    "min_nc": TensorProto.FLOAT,
    "pos_nc": TensorProto.FLOAT,
    "sum_nc": TensorProto.FLOAT,
    "max_nc": TensorProto.FLOAT,
    "sat_nc": TensorProto.FLOAT,
    "nan": TensorProto.DOUBLE,
    "nan_nc": TensorProto.FLOAT,
    "nonfinite": TensorProto.INT64,
}


def _empty_like_stat(builder: _Builder, key: str) -> str:
    dtype = onnx.helper.tensor_dtype_to_np_dtype(_STAT_TYPES[key])
    if key in ("size", "nonfinite"):
        return builder.const(np.array(0, dtype=dtype), "zero")
    return builder.const(np.zeros((0,), dtype=dtype), "empty")


def site_channel_dim(site: OnnxSite, override: int | None) -> int:
    """Dim 1 for conv-like outputs, the last dim for MatMul/Gemm outputs; `override` wins. With an
    unknown rank: 1, or -1 (last) when the producer is a MatMul/Gemm."""
    from deadrelu_cli.probe.ops import resolve_channel_dim

    if site.rank is None:
        if override in (1, -1):
            return override
        return -1 if site.channel_first is False else 1
    if site.rank <= 1:
        return 0
    if site.unit_axis is not None and override is None and 0 <= site.unit_axis < site.rank:
        return site.unit_axis
    inferred = 1 if (site.channel_first or (site.channel_first is None and site.rank >= 4)) else -1
    return resolve_channel_dim(site.rank, inferred, override)


GraphPath = tuple[str, ...]


def subgraph_map(
    graph: onnx.GraphProto,
) -> tuple[dict[GraphPath, onnx.GraphProto], dict[GraphPath, tuple[GraphPath, onnx.NodeProto, str]]]:
    """Every graph path (OnnxSite.graph_path) to its GraphProto inside `graph`, and each subgraph's
    owner: (the parent's path, the If/Loop/Scan node, the attribute name)."""
    graphs: dict[GraphPath, onnx.GraphProto] = {(): graph}
    owners: dict[GraphPath, tuple[GraphPath, onnx.NodeProto, str]] = {}

    def collect(graph: onnx.GraphProto, path: GraphPath) -> None:
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    sub_path = (*path, f"{node.name or node.output[0]}:{attribute.name}")
                    graphs[sub_path] = attribute.g
                    owners[sub_path] = (path, node, attribute.name)
                    collect(attribute.g, sub_path)

    collect(graph, ())
    return graphs, owners


def lift_to_main(
    graphs: dict,
    owners: dict,
    path: GraphPath,
    names: dict[str, str],
    types: dict[str, int],
    empty: Callable[[_Builder, str], str],
    opset: int,
    tag: str,
    site_name: str,
) -> dict[str, str]:
    """Values of the graph at `path` (key -> value name) made outputs of each enclosing If/Loop/Scan up
    to the main graph: an If's other branch gives `empty(builder, key)`, a Loop/Scan stacks them per
    iteration ([iterations, ...]). Returns key -> the main graph's value name."""
    while path:
        parent_path, owner, attr_name = owners[path]
        body = graphs[path]
        for key, value in names.items():
            body.output.append(helper.make_tensor_value_info(value, types[key], None))
        if owner.op_type == "If":
            other_attr = "else_branch" if attr_name == "then_branch" else "then_branch"
            other = next(a.g for a in owner.attribute if a.name == other_attr)
            filler = _Builder(other, opset, f"{tag}f")
            for key in names:
                value = empty(filler, key)
                other.output.append(helper.make_tensor_value_info(value, types[key], None))
            lifted = {}
            for key in names:
                out_name = f"deadrelu_{tag}_{key}_if{len(path)}"
                owner.output.append(out_name)
                lifted[key] = out_name
            names = lifted
        elif owner.op_type in ("Loop", "Scan"):
            # extra body outputs become scan outputs, stacked per iteration: [iterations, C]
            lifted = {}
            for key in names:
                out_name = f"deadrelu_{tag}_{key}_loop{len(path)}"
                owner.output.append(out_name)
                lifted[key] = out_name
            for attr in owner.attribute:  # keep Scan's per-output lists the right length
                if attr.name in ("scan_output_axes", "scan_output_directions"):
                    attr.ints.extend([0] * len(names))
            names = lifted
        else:
            raise UserError(f"ONNX layer {site_name}: subgraphs of {owner.op_type} nodes are not supported")
        path = parent_path
    return names


def instrument(
    model: onnx.ModelProto,
    sites: list[OnnxSite],
    threshold: float,
    channel_dim_override: int | None,
    keep_outputs: bool = False,
    exact_step: bool = True,
    max_from_output: frozenset[int] = frozenset(),
    nan_flags: bool = False,
    finite_only: bool = False,
    kernel_jobs: int = 0,
) -> onnx.ModelProto:
    """A copy of the model whose outputs are the per-site statistics (and the original outputs if asked).
    `exact_step=False` counts with Greater everywhere (the recount for a batch with NaN activations).
    `max_from_output`: indices of sites (all of whose units have fired) whose max reads the output.
    `nan_flags`: per unit, whether its input held a NaN (IsNaN, opset 9 on). `finite_only`: NaN/±Inf
    values left out of every statistic and counted per site (--allow-nonfinite, _add_reductions).
    `kernel_jobs` > 0: sites the compiled kernel can count are counted by it (_add_reductions)."""
    inst = onnx.ModelProto()
    inst.CopyFrom(model)
    opset = opset_version(inst)
    if not keep_outputs:
        del inst.graph.output[:]
    graphs, owners = subgraph_map(inst.graph)
    indexes = {path: GraphIndex(g) for path, g in graphs.items()}
    if any(site.token_layout and not site.cells for site in sites):  # the batch's position mask
        inst.graph.input.append(
            helper.make_tensor_value_info(MASK_INPUT, TensorProto.BOOL, ["batch", "tokens"])
        )
    for name in dict.fromkeys(s.mask_input for s in sites if s.token_layout and s.frames):
        inst.graph.input.append(helper.make_tensor_value_info(name, TensorProto.BOOL, ["batch", "frames"]))
    for cells in dict.fromkeys(s.cells for s in sites if s.token_layout == PIXEL_CELLS):
        inst.graph.input.append(
            helper.make_tensor_value_info(cells_mask_name(cells), TensorProto.BOOL, ["batch", *cells[2:]])
        )
    for path in dict.fromkeys(s.graph_path for s in sites if s.token_layout == TOKEN_STEPS):
        first = next(s for s in sites if s.graph_path == path and s.token_layout == TOKEN_STEPS)
        add_step_mask(owners[path][1], graphs[path], first.step_direction, first.mask_input)
    for i, site in enumerate(sites):
        if site.rank is None and channel_dim_override not in (None, 1, -1):
            raise UserError(
                f"ONNX layer {site.name}: the rank of its input is unknown, so --channel-dim "
                f"{channel_dim_override} cannot be applied; use 1 or -1"
            )
        dim = site_channel_dim(site, channel_dim_override)
        site.channel_dim = dim
        graph = graphs[site.graph_path]
        builder = _Builder(graph, opset, f"s{i}")
        index = indexes[site.graph_path]
        stats = _add_reductions(
            builder,
            site,
            dim,
            threshold,
            float_type(index, site.input_name),
            index.shape(site.output_name),
            exact_step,
            i in max_from_output,
            nan_flags and opset >= 9 and not finite_only,
            _keep_of(builder, site) if site.token_layout else None,
            finite_only,
            kernel_jobs,
        )
        # Lift the statistics out through each enclosing If/Loop/Scan up to the main graph.
        names = lift_to_main(
            graphs,
            owners,
            site.graph_path,
            dict(stats),
            _STAT_TYPES,
            _empty_like_stat,
            opset,
            f"s{i}",
            site.name,
        )
        site.outputs = names
        for key, value in names.items():
            inst.graph.output.append(helper.make_tensor_value_info(value, _STAT_TYPES[key], None))
    if any(node.domain == KERNEL_DOMAIN for node in inst.graph.node) and not any(
        entry.domain == KERNEL_DOMAIN for entry in inst.opset_import
    ):
        inst.opset_import.append(helper.make_opsetid(KERNEL_DOMAIN, 1))
    return inst
