"""`watch()`: dead, dying and dormant units while a model trains, one Report per window.

    w = watch(model, every=100, window=1)
    for step, batch in enumerate(loader):
        w.step()                    # before the forward: is this step sampled?
        loss = loss_fn(model(batch.x), batch.y)
        ...
    w.close()                       # the last, partial window
    w.reports[-1].summary()

On a sampled step the same eager probe as `deadrelu scan` (every activation call site, functional and
in-place ReLUs, unit axes, names) is attached for the forwards of that step, and taken off at the next
`step()` / `end_step()`: an unsampled step runs with no hook and no TorchFunctionMode at all. Counts are
the exact raw counts of the report model, one set per window (`window` sampled steps), so the reports
are ordinary Reports: JSON, gate, HTML, `deadrelu trend` work on them.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# what the first window's report needs (biases read through wiring.torch) is loaded with watch(), not
# in the middle of a training step
import deadrelu_cli.wiring.torch  # noqa: F401
from deadrelu_cli.backends.torch.inputs import speech_frames
from deadrelu_cli.backends.torch.scan import (
    attach_module_biases,
    attention_mask_modules,
    derived_scopes,
    module_attention_masks,
    other_modality_towers,
    pooled_blocks,
)
from deadrelu_cli.display import shown_names
from deadrelu_cli.distributed import World, reduce_layers
from deadrelu_cli.errors import UserError
from deadrelu_cli.files import write_text_atomic
from deadrelu_cli.gate import (
    LAYOUT_AMBIGUOUS,
    ROW_ORDER_AMBIGUOUS,
    ROWS_NOT_ATTRIBUTED,
    UNIT_AXIS_ASSUMED,
    UNIT_AXIS_NOT_FOLLOWED,
    GateConfig,
    GateResult,
    evaluate,
    parse_layer_limits,
    unscanned_text,
    unseen_notes,
)
from deadrelu_cli.inputs import (
    AUDIO_INPUTS,
    DECODER_IDS,
    DECODER_MASK,
    DEFAULT_MASK,
    IGNORE_INDEX,
    LABELS,
    PIXEL_MASK,
    TOKEN_IDS,
    decoder_scope,
    derives_decoder_from_labels,
)
from deadrelu_cli.probe.base import ProbeSettings
from deadrelu_cli.probe.eager import EagerProbe
from deadrelu_cli.probe.experts import ACTIVATION, fused_experts
from deadrelu_cli.probe.ops import axis_guess_notes, axis_lost_note, parse_ops
from deadrelu_cli.report.model import DataInfo, ModelInfo, Report, Settings, TrainingInfo, report_to_json


class DeadLayerWarning(UserWarning):
    """A layer crossed its dead-fraction limit while training (issued once per layer and run)."""


@dataclass
class WatchSettings:
    """What a watch counts and checks; from [tool.deadrelu] (as for the CLI), then the arguments."""

    threshold: float = 0.0
    dying: float = 0.01
    tau: float = 0.1
    ops: tuple[str, ...] = ("relu", "relu6")
    channel_dim: int | None = None
    gate: GateConfig = field(default_factory=GateConfig)


# the reports a watch keeps in memory by default: each holds a few numbers per unit, so that a long run's
# memory stays O(units) (out_dir and on_report see every window; keep_reports=None keeps all)
KEEP_REPORTS = 100
COMPILED_WRAPPER_WARNING = r"Using `torch\.compile\(module\)` when there are global hooks"
CONFIG_FIELDS = ("threshold", "dying", "tau", "ops", "channel_dim")
GATE_FIELDS = (
    "max_dead",
    "max_dead_layer",
    "layer_limit",
    "max_dead_units",
    "baseline",
    "max_increase",
    "allow_no_sites",
    "allow_unseen",
)


def watch_settings(config: str | bool | None = None, **given: Any) -> WatchSettings:
    """Settings from the config file (`config`: a path, None = the nearest [tool.deadrelu], False = none),
    overridden by the arguments that are not None. Gate keys are those of `deadrelu gate`."""
    from deadrelu_cli.config import load_config

    if "layer_limits" in given:  # the name docs/training.md and [tool.deadrelu] use (the flag: --layer-limit)
        given["layer_limit"] = given.pop("layer_limits")
    values: dict[str, Any] = {}
    if config is not False:
        overridden = frozenset(k for k, v in given.items() if v is not None)
        file_config = load_config(config if isinstance(config, str) else None, given=overridden)
        for line in file_config.skipped:
            warnings.warn(f"deadrelu: {line}", UserWarning, stacklevel=2)
        values.update(file_config.values)
    values.update({k: v for k, v in given.items() if v is not None})
    unknown = set(given) - set(CONFIG_FIELDS) - set(GATE_FIELDS)
    if unknown:
        raise UserError(f"watch(): unknown setting(s) {', '.join(sorted(unknown))}")
    ops = values.get("ops", ("relu", "relu6"))
    limits = values.get("layer_limit") or []
    if isinstance(limits, dict):
        limits = [f"{glob}={limit}" for glob, limit in limits.items()]
    baseline = values.get("baseline")
    if isinstance(baseline, (str, Path)):
        from deadrelu_cli.report.model import load_report

        baseline = load_report(baseline)
    return WatchSettings(
        threshold=float(values.get("threshold", 0.0)),
        dying=float(values.get("dying", 0.01)),
        tau=float(values.get("tau", 0.1)),
        ops=parse_ops(ops) if isinstance(ops, str) else tuple(ops),
        channel_dim=values.get("channel_dim"),
        gate=GateConfig(
            max_dead=values.get("max_dead"),
            max_dead_layer=values.get("max_dead_layer"),
            layer_limits=parse_layer_limits(list(limits)),
            max_dead_units=values.get("max_dead_units"),
            baseline=baseline,
            max_increase=values.get("max_increase"),
            allow_no_sites=bool(values.get("allow_no_sites", False)),
            allow_unseen=bool(values.get("allow_unseen", False)),
        ),
    )


def architecture_sha256(model: nn.Module) -> str:
    """A stable id of the architecture (class, parameter and buffer names, shapes, dtypes): the weights
    change while training, so reports of one run share this id (and `deadrelu merge` can join windows)."""
    digest = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        digest.update(f"\n{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
    return digest.hexdigest()


def is_fsdp1(model: nn.Module) -> bool:
    """An FSDP1 `FullyShardedDataParallel` wrapper (by name: no FSDP import on the way)."""
    return "FullyShardedDataParallel" in {cls.__name__ for cls in type(model).__mro__}


def wrapped_inside(model: nn.Module) -> nn.Module | None:
    """The module a wrapper holds (None: `model` is no wrapper): `torch.compile`'s, DistributedDataParallel,
    nn.DataParallel (refused over several devices), FSDP1 `FullyShardedDataParallel` (wrappers an
    auto-wrap policy nests further inside are left out of the names by the probe), a PEFT model (the base
    model, its adapters inside it)."""
    inner = getattr(model, "_orig_mod", None)
    kinds = {cls.__name__ for cls in type(model).__mro__}
    if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
        return inner
    if "PeftModel" in kinds and hasattr(model, "get_base_model"):
        return model.get_base_model()
    if "BaseTuner" in kinds and isinstance(getattr(model, "model", None), nn.Module):  # a LoraModel
        return model.model
    if is_fsdp1(model):
        return model.module
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        devices = getattr(model, "device_ids", None) or []
        if isinstance(model, nn.DataParallel) and len(devices) > 1:
            # each device runs its own replica in its own thread: modules the watch does not know,
            # under a TorchFunctionMode the other threads do not see
            raise UserError(
                f"watch(): nn.DataParallel over {len(devices)} devices runs replicas of the model in "
                "threads, which the probe cannot count; use DistributedDataParallel (torchrun), whose "
                "counts watch() combines over the ranks"
            )
        return model.module
    return None


def wrappers(model: nn.Module) -> list[nn.Module]:
    """`model`, and each module wrapped inside it down to the innermost (see `wrapped_inside`)."""
    chain = [model]
    while (inner := wrapped_inside(chain[-1])) is not None:
        chain.append(inner)
    return chain


def unwrapped(model: nn.Module) -> nn.Module:
    """The module that `torch.compile(module)`, DistributedDataParallel, nn.DataParallel, FSDP1 or a PEFT
    model wraps (in any nesting): its names are those of eager and of a scan of the saved weights (no
    `_orig_mod.`, `module.`, `_fsdp_wrapped_module.` or `base_model.model.` prefix), and its forward's
    signature tells where a positional `attention_mask` is (a wrapper's is `*inputs, **kwargs`). The
    wrapper calls it, so its own hooks see every forward."""
    return wrappers(model)[-1]


def _forward_arguments(model: nn.Module) -> tuple[str, ...]:
    """The parameter names of `model.forward` (none when its signature cannot be read)."""
    try:
        return tuple(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return ()


def positional_index(model: nn.Module, argument: str | None) -> int | None:
    """Where `argument` sits among the positional parameters of `model.forward`, or None."""
    if argument is None:
        return None
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional.index(argument) if argument in positional else None


def padding_mask_modules(model: nn.Module) -> list[tuple[str, nn.Module, str, int | None]]:
    """torch's own transformer modules in `model` (the outermost nn.TransformerEncoder / Decoder / their
    Layers; nn.Transformer's encoder and decoder), each as (path, module, its key padding mask argument,
    where that sits among forward()'s positional parameters): their sites count the positions that mask
    leaves (True or nonzero marks padding, PyTorch's convention), as `deadrelu scan` counts them."""
    kinds = {
        nn.TransformerEncoder: "src_key_padding_mask",
        nn.TransformerEncoderLayer: "src_key_padding_mask",
        nn.TransformerDecoder: "tgt_key_padding_mask",
        nn.TransformerDecoderLayer: "tgt_key_padding_mask",
    }
    found = [
        (path, module, kinds[type(module)])
        for path, module in model.named_modules()
        if type(module) in kinds  # a subclass may take its mask otherwise
    ]
    paths = [path for path, _, _ in found]

    def nested(path: str) -> bool:  # inside another of them ("" = the model itself holds every one)
        return any(other != path and (not other or path.startswith(other + ".")) for other in paths)

    return [
        (path, module, argument, positional_index(module, argument))
        for path, module, argument in found
        if not nested(path)
    ]


def _in_backward() -> bool:
    """Whether autograd's backward is running: gradient checkpointing calls a block again there to
    recompute its activations, which is not a forward of the training step."""
    task = getattr(torch._C, "_current_graph_task_id", None)  # what torch.utils.checkpoint itself reads
    return task is not None and task() != -1


def _batch_size(args: tuple, kwargs: dict) -> int:
    """The rows of the forward's first tensor argument, also inside a dict or list (`model(batch)`)."""
    for value in torch.utils._pytree.tree_leaves((args, kwargs)):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 0


def window_samples(layers: list, rows: int) -> int:
    """A window's `data.samples`: the most samples any site saw (the rows of the forwards that reached
    it: a GAN's discriminator sees real and generated rows, its generator only the noise); each site
    that saw fewer keeps its own `samples` (the table's Samples column), the others get None. `rows`
    (every forward's rows) when no site ran."""
    seen = [layer.samples for layer in layers if layer.ran and layer.samples is not None]
    samples = max(seen) if seen else rows
    for layer in layers:
        if layer.samples == samples or not layer.ran:
            layer.samples = None
    return samples


class Watch:
    """Samples every `every`-th training step; `window` sampled steps make one Report.

    Call `step()` at the start of each training step (before the forward), optionally with the trainer's
    global step; `end_step()` after it (optional in a plain loop: the next `step()` does it). A window's
    Report is made when its last sampled step ends; `close()` (or leaving the `with` block) makes the
    last, partial one. `on_report(report)` is called with each Report; `out_dir` gets one JSON report per
    window (`deadrelu-step00001200.json`); `reports` holds the last `keep_reports` (100; None: all); limits (`max_dead_layer`, …, or [tool.deadrelu]) warn once per
    layer with a `DeadLayerWarning`, and with `stop_on_gate=True` set `should_stop` when one is exceeded.
    `mask` names the forward argument read as the position mask of each sampled forward (default
    "attention_mask": positions where it is 0 are not counted, as in `deadrelu scan`); None turns it off.
    Data-parallel (a `torch.distributed` process group of several ranks is initialized): a window's
    counts are those of all ranks (one all_reduce per statistic when the window closes, so every rank
    must close it, as DDP's ranks do), every rank gets the same report and `should_stop`, and rank 0
    alone writes `out_dir` and warns; `distributed=False` keeps each rank's own counts.
    A forward made in eval mode with gradients off (`model.eval()` + `torch.no_grad()`: a validation
    loop inside a sampled step) is not counted, and the window's report says how many were skipped;
    `count_evaluation=True` counts them. The model may be a `torch.compile`, DistributedDataParallel or
    nn.DataParallel wrapper: the module inside is watched (its names, its forward's arguments).
    """

    def __init__(
        self,
        model: nn.Module,
        every: int = 100,
        window: int = 1,
        *,
        out_dir: str | Path | None = None,
        on_report: Callable[[Report], None] | None = None,
        stop_on_gate: bool = False,
        config: str | bool | None = None,
        name: str | None = None,
        keep_reports: int | None = KEEP_REPORTS,
        mask: str | None = "attention_mask",
        distributed: bool = True,
        count_evaluation: bool = False,
        **settings: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise UserError(f"watch(): expected an nn.Module, got {type(model).__name__}")
        if every < 1 or window < 1:
            raise UserError("watch(): every and window must be at least 1")
        # FSDP1 keeps the parameters flattened and sharded between forwards: read the biases inside
        # summon_full_params of the wrapper given (a collective: every rank closes the window alike)
        chain = wrappers(model)
        self._fsdp = next((m for m in chain if is_fsdp1(m)), None)
        model = chain[-1]
        self.model = model
        self.every = int(every)
        self.window = int(window)
        self.settings = watch_settings(config, **settings)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.on_report = on_report
        self.stop_on_gate = stop_on_gate
        self.name = name or f"<in-memory {type(model).__name__}>"
        self.keep_reports = keep_reports
        self.reports: list[Report] = []
        self.gate_results: list[GateResult] = []
        self.should_stop = False
        self.epoch: int | None = None
        self._next_step = 0  # the step number step() assigns when not told
        self._current: int | None = None  # the step running now
        self._handles: list = []
        self._modes: list = []
        self._stance = None  # torch.compiler's stance while a sampled step runs eagerly
        self._mask: torch.Tensor | None = None  # the position mask given for the current step
        self._outer: nn.Module | None = None  # an owned module whose own call began the running forward
        self._written: set[Path] = set()  # reports this watch wrote to out_dir
        # the first step this watch began: a run resumed from a checkpoint starts there, and an earlier
        # run's reports of steps before it are kept (_replace_earlier)
        self._first_step: int | None = None
        self._overwrite_warned = False
        self._recomputing = 0  # root calls under way inside backward (gradient checkpointing)
        self._evaluating = 0  # root calls under way that are an evaluation (not counted)
        self._evaluations = 0  # evaluation forwards skipped in this window
        self._replicas = 0  # forwards of copies of the model sharing its hooks (nn.DataParallel), not counted
        self.count_evaluation = count_evaluation
        self.distributed = distributed
        self.mask_argument = mask  # the forward's argument read as the position mask (None: none)
        self._mask_index = positional_index(model, mask)
        # an image model's pixel_mask (DETR): read when the forward has no attention_mask
        self._pixel_index = positional_index(model, PIXEL_MASK)
        try:
            takes_pixels = mask is not None and PIXEL_MASK in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            takes_pixels = False
        self._pixel_modules = attention_mask_modules(model) if takes_pixels else []
        # a speech encoder's attention_mask is over audio samples: its encoder counts on the frames' mask
        self._frames = speech_frames(model, for_sites=True)
        self._audio_index = {name: positional_index(model, name) for name in AUDIO_INPUTS}
        # a Funnel-style encoder: each block on its pooled mask; Decision Transformer, Canine: derived masks
        self._pooled = pooled_blocks(model) or derived_scopes(model)
        # a multimodal model's image or audio towers: a forward's token mask is not theirs (CLIP)
        self._towers = other_modality_towers(model)
        self._ids_index = positional_index(model, TOKEN_IDS)
        self._decoder = decoder_scope(model)  # an encoder-decoder's decoder: on its own tokens' positions
        self._from_labels = derives_decoder_from_labels(model, _forward_arguments(model))
        self._padding_modules = padding_mask_modules(model)  # nn.Transformer*: their key padding masks
        # fused mixtures of experts: one activation for every expert (the scan splits them; a training
        # step is not changed, so here it is said)
        self._fused = {
            f"{path}.{ACTIVATION}": count
            for path, module in model.named_modules()
            if (count := fused_experts(module))
        }
        self._mask_warned = False
        # one probe for the run (names, tables); its counters are restarted per window
        self._probe = EagerProbe(
            model,
            ProbeSettings(
                threshold=self.settings.threshold,
                channel_dim=self.settings.channel_dim,
                ops=self.settings.ops,
            ),
        )
        self._sampled: list[int] = []  # steps sampled in this window
        self._samples = 0  # rows of every forward of the window
        self._site_samples: dict[str, int] = {}  # rows of the forwards that reached each site
        self._forward: tuple[int, dict[str, int]] | None = None  # the running forward's rows, and where
        # each site's count stood when it began
        self._windows = 0
        self._previous_dead: dict[str, np.ndarray] = {}
        self._warned: set[str] = set()
        self._arch_sha = architecture_sha256(model)

    # -- the loop's side ----------------------------------------------------------------------------
    def is_sampled(self, step: int) -> bool:
        return step % self.every == 0

    def step(self, step: int | None = None, position_mask: torch.Tensor | None = None) -> bool:
        """A training step begins (before its forward). Returns whether it is sampled. Called again
        with the same `step` (a trainer's gradient-accumulation micro-batches), it continues that step.
        `position_mask` ([batch, tokens], bool or 0/1): count only those positions in this step's
        forwards (see `set_position_mask`); None: each forward's own `attention_mask` argument when it
        has one (see `mask`), else every position."""
        self._mask = position_mask
        current = self._next_step if step is None else int(step)
        if step is not None and current == self._current:
            if self.is_sampled(current):
                self._attach()
            return self.is_sampled(current)
        self.end_step()
        self._current = current
        self._next_step = current + 1
        if self._first_step is None:
            self._first_step = current
        if not self.is_sampled(current):
            return False
        last = self._sampled[-1] if self._sampled else None
        if last is not None and (self._block(last) != self._block(current) or current < last):
            # the open window's block is over (steps were skipped: a resume), or the numbering started
            # again (step numbers per epoch): the window ends here
            self._close_window()
        self._attach()
        self._sampled.append(current)
        return True

    def set_position_mask(self, mask: torch.Tensor | None) -> None:
        """Count only the token positions where `mask` ([batch, tokens], bool or 0/1) is true in the
        forwards that follow (the probe's own masking: sites without a token axis count every element
        and say so); None goes back to each forward's own `attention_mask` (or every position). A mask
        given here or to `step()` wins over the forward's own. On an unsampled step it is only kept."""
        self._mask = mask
        if self._handles:
            self._probe.set_position_mask(mask)

    def pause(self) -> None:
        """Take the probe off until the next `step()` (forwards in between, e.g. validation, are not counted)."""
        self._detach()

    def end_step(self) -> Report | None:
        """The step's forwards are done: take the probe off; the window's Report when it is complete."""
        self._detach()
        if self._sampled and self._block_end(self._sampled[-1]):
            return self._close_window()
        return None

    # Windows are blocks of `every * window` steps (steps 0-199, 200-399, … for every=100, window=2), not
    # counts of the steps this process sampled: a run resumed at step 250 puts step 300 in the window
    # of 200-399, the one the first run's report of those steps covers (and replaces), so that reports
    # of two runs never overlap
    def _block(self, step: int) -> int:
        return step // (self.every * self.window)

    def _block_end(self, step: int) -> bool:
        return (step // self.every) % self.window == self.window - 1

    def checkpoint(self) -> Report | None:
        """A checkpoint is being saved after the steps so far: the open window ends here (its Report, with
        fewer sampled steps than `window`), so that no report holds steps from both sides of a checkpoint.
        A run resumed from it keeps the reports of the steps before it and replaces those after it; a
        report that mixed both could only be dropped whole. The Lightning and `Trainer` callbacks call it
        when they save."""
        self._detach()
        if self._sampled:
            return self._close_window()
        return None

    def close(self) -> Report | None:
        """End the run: the last window's Report, even when it has fewer sampled steps than `window`."""
        self._detach()
        if self._sampled:
            return self._close_window()
        return None

    @property
    def current_step(self) -> int | None:
        """The number of the step that `step()` began last (None before the first)."""
        return self._current

    @property
    def last(self) -> Report | None:
        return self.reports[-1] if self.reports else None

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()

    def abort(self) -> Report | None:
        """The training failed (an exception left the loop): take the probe off. In one process the open
        window's report is made, as by `close()`; with several ranks the open window is dropped, since a
        rank that fails must not enter a collective its peers are not in (it would be paired with their
        next window's, and mix its counts into it)."""
        if self._world() is None:
            return self.close()
        self._detach()
        self._sampled, self._samples, self._site_samples = [], 0, {}
        self._evaluations = self._replicas = 0
        self._probe.restart_counts()
        return None

    # -- attaching ----------------------------------------------------------------------------------
    def _attach(self) -> None:
        if self._handles:
            return
        probe, root = self._probe, self.model
        probe.set_position_mask(self._mask)
        # the sampled step runs as written (eager): compiled code, and torch.cond, which compiles its
        # branches on its first call and would trace this probe's mode (importing the compiler costs ~2 s,
        # once; a training loop has loaded it already with its optimizer)
        set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
        if set_stance is not None:
            self._stance = set_stance("force_eager")
            # torch warns that global hooks also fire for a torch.compile(module) wrapper: ours skip it
            warnings.filterwarnings("ignore", message=COMPILED_WRAPPER_WARNING, category=UserWarning)

        registry = probe.registry

        def begin(args, kwargs):
            probe.begin_forward()
            rows = _batch_size(args, kwargs)
            self._samples += rows
            # which sites this forward reaches: they saw its rows (a GAN's G and D are forwards apart)
            self._forward = (rows, registry.elements_seen())
            if self._mask is None and self.mask_argument is not None:  # given masks win
                self._apply_mask(self._forward_mask(args, kwargs), args, kwargs)
            elif self._mask is not None and (self._frames, self._pooled, self._towers) != (None, None, {}):
                self._apply_mask(self._mask, args, kwargs)
            probe.note_inputs(args, kwargs)  # a square batch: the token ids' axes, followed
            mode = probe.mode()
            mode.__enter__()
            self._modes.append(mode)

        def end():
            if self._modes:
                self._modes.pop().__exit__(None, None, None)
            if self._forward is not None:
                (rows, before), self._forward = self._forward, None
                for name, seen in registry.elements_seen().items():
                    if seen != before.get(name, 0):
                        self._site_samples[name] = self._site_samples.get(name, 0) + rows

        def start(module, args, kwargs):
            if module is not root:  # a replica (nn.DataParallel copies the model, hooks included) runs
                # in a thread of its own: other modules, another mode stack; a deepcopy made while the
                # probe was on carries these hooks too, and they stay inert on it after this step
                self._replicas += bool(self._handles)
                return
            if _in_backward():  # `checkpoint(model, x)` recomputing the model: counted when it ran
                self._recomputing += 1
                return
            if self._evaluation(root):
                self._evaluating += 1
                return
            begin(args, kwargs)
            probe.enter_module(root, args)

        def stop(module, args, output):
            if module is not root:
                return
            if self._recomputing:
                self._recomputing -= 1
                return
            if self._evaluating:
                self._evaluating -= 1
                return
            probe.leave_module(root, args, output)
            end()

        # A forward may also begin at a module the model owns, called without the root: a
        # LightningModule's training_step calls `self.model(x)`, a GAN wrapper `self.G(z)`. Such a call
        # is a forward of its own (its positional arguments only: a global hook sees no keywords).
        def outer_start(module, args):
            if not self._modes and not self._evaluating and not _in_backward():
                if self._evaluation(module):
                    return
                self._outer = module
                begin(args, {})

        def outer_stop(module):
            if module is self._outer:
                self._outer = None
                end()

        # the root's own hooks (they see the keyword arguments) begin and end a forward; the probe's two
        # global hooks follow the modules below it, and call outer_start / outer_stop for an owned module
        # called on its own: four hooks to add and remove, whatever the model's size
        self._handles.append(root.register_forward_pre_hook(start, prepend=True, with_kwargs=True))
        self._handles.extend(probe.attach_global(outer_start, outer_stop))
        self._handles.append(root.register_forward_hook(stop, always_call=True))
        if self._pixel_modules:  # a module given an image's mask flattened (DETR's encoder)
            self._handles.extend(module_attention_masks(self._pixel_modules, registry))
        if self.mask_argument is not None:  # after `start` (a root nn.TransformerEncoder: its own mask)
            for path, module, argument, index in self._padding_modules:
                hook = self._padding_hook(path, argument, index, argument.startswith("tgt"))
                self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _padding_hook(self, path: str, argument: str, index: int | None, target: bool):
        """A pre-hook on torch's transformer module at `path`: its sites count the positions its key padding
        mask (`argument`) leaves, unless a position mask was given (step(), set_position_mask). A decoder
        (`target`) runs on the target sequence: without a tgt_key_padding_mask it counts every position
        (the source's mask says nothing of them)."""

        def hook(module, args, kwargs):
            if self._mask is not None or self._evaluating or self._recomputing:
                return
            value = kwargs.get(argument)
            if value is None and index is not None and len(args) > index:
                value = args[index]
            keep = value == 0 if isinstance(value, torch.Tensor) and value.dim() == 2 else None
            if keep is not None or target:
                self._probe.registry.set_scoped_mask(path, keep)
            else:  # no mask of its own this call: not the one an earlier call of this forward gave
                self._probe.registry.given_scope(path)

        return hook

    def _evaluation(self, module: nn.Module) -> bool:
        """A forward made in eval mode with gradients off (a validation loop inside the step, `model.eval()`
        + `torch.no_grad()`): not a training forward, not counted (unless `count_evaluation`)."""
        if self.count_evaluation or module.training or torch.is_grad_enabled():
            return False
        self._evaluations += 1
        return True

    def _apply_mask(self, mask: torch.Tensor | None, args: tuple, kwargs: dict) -> None:
        """The probe's position mask for one forward. A mask of the forward's `input_values` shape on a
        speech encoder is over audio samples: the encoder's sites get the frames' mask, as `deadrelu
        scan` gives them (backends.torch.inputs.speech_frames)."""
        scoped = None
        if mask is not None and self._frames is not None:
            for name, index in self._audio_index.items():
                audio = kwargs.get(name)
                if audio is None and index is not None and len(args) > index:
                    audio = args[index]
                if isinstance(audio, torch.Tensor) and tuple(audio.shape[:2]) == tuple(mask.shape):
                    path, to_frames = self._frames
                    scoped = {path: to_frames(mask)}
                    break
        if mask is not None and scoped is None and self._pooled is not None and mask.dim() == 2:
            scoped = self._pooled(mask)
        if mask is not None and mask.dim() == 2 and self._towers and self._takes_tokens(args, kwargs):
            scoped = {**self._towers, **(scoped or {})}
        if self._decoder is not None:  # beside a speech encoder's frames (Speech2Text) too
            decoder = self._decoder_keep(kwargs)
            if decoder is not False:
                scoped = {**(scoped or {}), self._decoder: decoder}
        self._probe.set_position_mask(mask, scoped)

    def _takes_tokens(self, args: tuple, kwargs: dict) -> bool:
        """Whether the forward was given token ids (its mask then is the tokens', not the audio's)."""
        if isinstance(kwargs.get(TOKEN_IDS), torch.Tensor):
            return True
        index = self._ids_index
        return index is not None and len(args) > index and isinstance(args[index], torch.Tensor)

    def _decoder_keep(self, kwargs: dict) -> torch.Tensor | None | bool:
        """The decoder's positions of an encoder-decoder's forward, as `deadrelu scan` counts them: its
        `decoder_attention_mask`; with `decoder_input_ids` and none, every position (None); with `labels`
        it derives its input from (shifted right), the start position and each one after a label that is
        not -100 (and within a `decoder_attention_mask`, as inputs.decoder_batch_mask); False without any
        of these (the decoder runs on the shifted input_ids: the encoder's mask)."""
        given, ids, labels = (kwargs.get(k) for k in (DECODER_MASK, DECODER_IDS, LABELS))
        keep = given != 0 if isinstance(given, torch.Tensor) and given.dim() == 2 else None
        if isinstance(ids, torch.Tensor):
            return keep
        if isinstance(labels, torch.Tensor) and labels.dim() == 2 and self._from_labels:
            real = labels != IGNORE_INDEX
            shifted = torch.cat([torch.ones_like(real[:, :1]), real[:, :-1]], dim=1)
            return shifted if keep is None or keep.shape != shifted.shape else keep & shifted
        return False if keep is None else keep

    def _forward_mask(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The forward's own `attention_mask` (or `mask_argument`): positions where it is 0 are not
        positions, as for `deadrelu scan` on a model folder. None when the forward has none."""
        value = kwargs.get(self.mask_argument)
        if value is None and self._mask_index is not None and len(args) > self._mask_index:
            value = args[self._mask_index]
        if value is None and self.mask_argument == DEFAULT_MASK:
            # an image model's padding mask (DETR's pixel_mask): its pixels, as `deadrelu scan` reads them
            value = kwargs.get(PIXEL_MASK)
            if value is None and self._pixel_index is not None and len(args) > self._pixel_index:
                value = args[self._pixel_index]
            if not isinstance(value, torch.Tensor) or value.dim() != 3:
                return None
            return value
        if not isinstance(value, torch.Tensor):
            return None
        if value.dim() == 3 and self.mask_argument == PIXEL_MASK:
            return value
        if value.dim() != 2:
            if not self._mask_warned:
                self._mask_warned = True
                warnings.warn(
                    f"deadrelu: the forward's {self.mask_argument} has shape {list(value.shape)}, not "
                    "[batch, tokens]: every position is counted (pass position_mask= to step() to choose)",
                    UserWarning,
                    stacklevel=2,
                )
            return None
        return value

    def _detach(self) -> None:
        self._outer, self._recomputing, self._evaluating, self._forward = None, 0, 0, None
        while self._modes:  # a forward that never returned (an exception inside a hook)
            self._modes.pop().__exit__(None, None, None)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._stance is not None:  # compiled code runs compiled again, from its cache
            self._stance.__exit__(None, None, None)
            self._stance = None

    # -- the window's report ------------------------------------------------------------------------
    def _note_once(self, report: Report, key: str, note: str) -> None:
        """A note on this window's report, and a warning the first time in the run (`key`): the counts of
        every window miss what it says."""
        report.notes.append(note)
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"deadrelu: {note}", UserWarning, stacklevel=4)

    def _close_window(self) -> Report:
        sampled, self._sampled = self._sampled, []
        samples, self._samples = self._samples, 0
        site_samples, self._site_samples = self._site_samples, {}
        evaluations, self._evaluations = self._evaluations, 0
        replicas, self._replicas = self._replicas, 0
        layers = self._probe.registry.layer_stats()  # host copies: the counters start over in place
        self._probe.restart_counts()
        for layer in layers:
            if layer.ran:
                layer.samples = site_samples.get(layer.name, 0)
        parameter = next(self.model.parameters(), None)
        device = str(parameter.device) if parameter is not None else "cpu"
        world = self._world()
        if world is not None:  # data-parallel: every rank's counts, summed (max of maxima), on every rank
            layers, samples = reduce_layers(world, layers, samples, device, layer_samples=True)
        samples = window_samples(layers, samples)
        if self._fsdp is not None:
            from torch.distributed.fsdp import FullyShardedDataParallel

            with FullyShardedDataParallel.summon_full_params(self._fsdp, writeback=False):
                attach_module_biases(self.model, layers)
        else:
            attach_module_biases(self.model, layers)
        # a diverging run (NaN/Inf activations or weights) must not stop the training from here: its
        # report says so, and is kept in memory when JSON cannot hold it
        nan_units = {layer.name: int(np.isnan(layer.sum_abs).sum()) for layer in layers if layer.ran}
        nan_units = {name: n for name, n in nan_units.items() if n}
        unwritable = [layer.name for layer in layers if not np.isfinite(layer.sum_abs).all()]
        bad_bias = []
        for layer in layers:
            if layer.bias is not None and not np.isfinite(layer.bias).all():
                bad_bias.append(layer.name)
                layer.bias = None
        training = TrainingInfo(
            step=sampled[-1],
            first_step=sampled[0],
            sampled_steps=len(sampled),
            every=self.every,
            window=self._windows,
            epoch=self.epoch,
            rank=self._own_rank(world),
        )
        kept_before = carried = 0
        for layer in layers:
            if not layer.ran:
                continue
            dead = layer.dead_mask()
            before = self._previous_dead.get(layer.name)
            if before is not None and before.shape == dead.shape:
                training.newly_dead[layer.name] = np.flatnonzero(dead & ~before).tolist()
                training.revived[layer.name] = np.flatnonzero(before & ~dead).tolist()
                was, still = int(before.sum()), int((before & dead).sum())
                training.persistence[layer.name] = still / was if was else None
                kept_before += was
                carried += still
            self._previous_dead[layer.name] = dead
        training.persistence_overall = carried / kept_before if kept_before else None
        s = self.settings
        where = f", {world.size} processes" if world is not None else ""
        report = Report(
            model=ModelInfo(path=self.name, format="module", sha256=self._arch_sha),
            data=DataInfo(
                path=f"training steps {sampled[0]}–{sampled[-1]} ({len(sampled)} sampled, every {self.every}{where})",
                samples=samples,
            ),
            settings=Settings(s.threshold, s.dying, s.tau, s.channel_dim, device.split(":")[0], tuple(s.ops)),
            layers=layers,
            training=training,
            # ReLUs the probe cannot count (an nn.RNN's kernel, TorchScript code): named, and gated
            unseen=dict(self._probe.hidden),
            unscanned=self._probe.unscanned,
        )
        report.notes.extend(
            unseen_notes(report.unseen, tuple(s.ops), "a limit fails on them unless allow_unseen=True")
        )
        if report.unscanned:  # a LeakyReLU beside the ReLUs: said, not counted
            report.notes.append(unscanned_text(report.unscanned, tuple(s.ops), "ops="))
        if evaluations:
            report.notes.append(
                f"{evaluations} forward(s) in eval mode with gradients off (an evaluation) on the sampled "
                "steps were not counted; watch(count_evaluation=True) counts them"
            )
        if replicas:
            self._note_once(
                report,
                "<replicas>",
                f"{replicas} forward(s) of copies of the model that share its hooks (nn.DataParallel's replicas "
                "over several devices: use DistributedDataParallel) were not counted",
            )
        if not layers:
            report.notes.append(
                f"the model ran no {'/'.join(s.ops)} call on the sampled steps: nothing to count"
            )
        lost = [layer.name for layer in layers if layer.name in self._probe.registry.axis_lost]
        if lost:  # a layer's units moved where the probe lost them: counted on a guess, a limit fails on it
            for layer in layers:
                if layer.name in lost:
                    layer.extra["unit_axis"] = UNIT_AXIS_NOT_FOLLOWED
            report.notes.append(axis_lost_note(lost))
        guesses = self._probe.registry.axis_guesses
        guessed = {layer.name: guesses[layer.name] for layer in layers if layer.name in guesses}
        for layer in layers:  # no layer placed their units: counted on an assumed axis, a limit fails on it
            if layer.name in guessed:
                layer.extra["unit_axis"] = UNIT_AXIS_ASSUMED
        report.notes.extend(axis_guess_notes(guessed, "Linear/Conv/BatchNorm/LayerNorm"))
        fused = [
            f"{layer.name} ({self._fused[layer.name]} experts)"
            for layer in layers
            if layer.name in self._fused
        ]
        if fused:
            self._note_once(
                report,
                "<experts>",
                f"fused mixture of experts: {', '.join(fused)} run every expert through one activation, so the "
                "watch counts unit i of all experts as one unit (dead only if dead in every expert); "
                "`deadrelu scan` of a saved checkpoint counts each expert's units apart",
            )
        diverged = []
        if nan_units:
            diverged.append(
                f"NaN activations (has the training diverged?) in {sum(nan_units.values())} unit(s) of "
                f"{', '.join(nan_units)}: a NaN is no firing, so these units count as dead whether or not "
                "they are (their layers' dead fraction is logged as NaN)"
            )
        if bad_bias:
            diverged.append(f"NaN/Inf bias in {', '.join(bad_bias)}: left out of the report")
        if unwritable and self.out_dir is not None:
            diverged.append(
                f"the sum of |activation| of {', '.join(unwritable)} is NaN or Inf, which a JSON report "
                f"cannot hold: this window's report is not written to {self.out_dir}"
            )
        report.notes.extend(diverged)
        ambiguous = [layer.name for layer in layers if layer.extra.get("position_mask") == LAYOUT_AMBIGUOUS]
        if ambiguous:
            shown = shown_names(ambiguous)
            self._note_once(
                report,
                "<layout>",
                f"position mask not applied to {len(ambiguous)} layer(s): every sampled batch had as many "
                "samples as tokens, so their [batch, tokens, …] and [tokens, batch, …] activations had one "
                f"shape; they counted every position, padding included: {shown}; a sampled step with another "
                "batch size or sequence length tells them apart",
            )
        unordered = [
            layer.name for layer in layers if layer.extra.get("position_mask") == ROW_ORDER_AMBIGUOUS
        ]
        if unordered:
            shown = shown_names(unordered)
            self._note_once(
                report,
                "<row order>",
                f"position mask not applied to {len(unordered)} layer(s): their activations are flattened "
                "[batch·tokens, …] rows made where the probe did not see the [batch, tokens, …] or "
                "[tokens, batch, …] tensor they were flattened from (a view/reshape/flatten of it in the "
                f"forward tells the order); they counted every position, padding included: {shown}",
            )
        unrouted = [layer.name for layer in layers if layer.extra.get("position_mask") == ROWS_NOT_ATTRIBUTED]
        if unrouted:
            shown = shown_names(unrouted)
            self._note_once(
                report,
                "<routed rows>",
                f"position mask not applied to {len(unrouted)} layer(s) inside one expert of a mixture of "
                "experts: their rows (the tokens routed to the expert) came through an op the probe does not "
                "follow back to their tokens (it reads indexing, index_select, reshapes and row-wise ops); "
                f"they counted every row, padding's included: {shown}",
            )
        self._windows += 1
        self.reports.append(report)
        if self.keep_reports is not None and len(self.reports) > self.keep_reports:
            del self.reports[: len(self.reports) - self.keep_reports]
        main = world is None or world.is_main  # rank 0 alone writes and warns; every rank decides alike
        if diverged and main and "<diverged>" not in self._warned:  # once per run
            self._warned.add("<diverged>")
            warnings.warn(f"deadrelu: step {training.step}: {'; '.join(diverged)}", UserWarning, stacklevel=3)
        if self.out_dir is not None and main and not unwritable:
            target = self.out_dir / f"deadrelu-step{training.step:08d}.json"
            earlier = self._earlier_reports(training.step)  # read before the write replaces one of them
            if target.exists() and target not in self._written and not self._overwrite_warned:
                # an earlier run's report (a re-run, or a resumed run whose steps start at 0 again)
                self._overwrite_warned = True
                warnings.warn(
                    f"deadrelu: {target} is an earlier run's report and is replaced; a resumed run keeps "
                    "its steps apart with w.step(global_step), a new run with another out_dir",
                    UserWarning,
                    stacklevel=3,
                )
            write_text_atomic(target, report_to_json(report))
            self._written.add(target)
            self._replace_earlier(target, training.step, earlier)
        self._check(report, warn=main)
        if self.on_report is not None:
            self.on_report(report)
        return report

    def _earlier_reports(self, step: int) -> dict[Path, tuple[int, int] | None]:
        """The reports an earlier run left in out_dir for steps of the block of `step`, each with its
        (first, last) sampled step (None where the file does not say)."""
        span = self.every * self.window
        first = self._block(step) * span
        found: dict[Path, tuple[int, int] | None] = {}
        for path in self.out_dir.glob("deadrelu-step*.json"):
            number = path.name[len("deadrelu-step") : -len(".json")]
            if not number.isdigit() or not first <= int(number) < first + span or path in self._written:
                continue
            try:
                training = json.loads(path.read_text(encoding="utf-8")).get("training") or {}
                found[path] = (int(training["first_step"]), int(training["step"]))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                found[path] = None
        return found

    def _replace_earlier(self, target: Path, step: int, earlier: dict) -> None:
        """Replace the reports an earlier run left in out_dir for steps of this window's block (a run
        resumed from a checkpoint replays the steps after it: the first run's report of them, e.g. its
        partial last window, would otherwise stand beside this one in `deadrelu trend`). A report of steps
        before the step this run began at (the checkpoint's) is the trajectory this run continues: kept.
        One that holds steps from both sides cannot be split: it goes, and a warning names the steps lost
        (`checkpoint()` at each save keeps them apart)."""
        span = self.every * self.window
        first = self._block(step) * span
        start = self._first_step if self._first_step is not None else first
        kept = {path for path, steps in earlier.items() if steps is not None and steps[1] < start}
        replaced = sorted(path for path in earlier if path not in kept)
        removed = [path for path in replaced if path != target]  # the target: overwritten, warned above
        for path in removed:
            path.unlink(missing_ok=True)
        if removed:
            warnings.warn(
                f"deadrelu: {', '.join(p.name for p in removed)} in {self.out_dir}: an earlier run's "
                f"report of steps {first}-{first + span - 1}, replaced by {target.name} (this run's steps)",
                UserWarning,
                stacklevel=4,
            )
        lost = sorted(
            (steps[0], start - 1)
            for path, steps in earlier.items()
            if path not in kept and steps is not None and steps[0] < start
        )
        if lost:
            shown = ", ".join(f"{a}-{b}" for a, b in lost)
            warnings.warn(
                f"deadrelu: steps {shown} (before step {start}, where this run began) are in no report of "
                f"{self.out_dir}: the earlier run's report held them together with steps after that point "
                "(the steps this run replays), and cannot be split; call w.checkpoint() when saving a "
                "checkpoint (the Lightning and Trainer callbacks do) so that a window ends there",
                UserWarning,
                stacklevel=4,
            )

    @staticmethod
    def _own_rank(world: World | None) -> int | None:
        """This process's rank when the window holds its own counts only (distributed=False under several
        ranks): merge tells such windows of one step apart by it."""
        dist = torch.distributed
        if world is not None or not (dist.is_available() and dist.is_initialized()):
            return None
        return dist.get_rank() if dist.get_world_size() > 1 else None

    def _world(self) -> World | None:
        """The process group to combine counts over (None: one process, or `distributed=False`)."""
        dist = torch.distributed
        if not self.distributed or not (dist.is_available() and dist.is_initialized()):
            return None
        if dist.get_world_size() < 2:
            return None
        return World(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))

    def _check(self, report: Report, warn: bool = True) -> None:
        if not self.settings.gate.active:
            return
        result = evaluate(report, self.settings.gate)
        self.gate_results.append(result)
        step = report.training.step if report.training else "?"
        for verdict in result.layers:
            if verdict.failures and verdict.name not in self._warned and warn:
                self._warned.add(verdict.name)
                warnings.warn(f"deadrelu: step {step}: {verdict.failures[0]}", DeadLayerWarning, stacklevel=3)
        if result.model_failures and "<model>" not in self._warned and warn:  # once, like a layer
            self._warned.add("<model>")
            message = (
                result.model_failures[0]
                .replace("pass --allow-no-sites", "pass allow_no_sites=True")
                .replace("pass --allow-unseen", "pass allow_unseen=True")
            )
            warnings.warn(f"deadrelu: step {step}: {message}", DeadLayerWarning, stacklevel=3)
        if not result.passed and self.stop_on_gate:
            self.should_stop = True


def layer_metrics(report: Report, prefix: str = "deadrelu/") -> dict[str, float]:
    """Flat metrics for a trainer's loggers: per layer the dead fraction, and the model's totals."""
    summary = report.summary()
    # units that saw a NaN count as dead whether or not they are (see Watch._close_window): their
    # layers', and the model's, dead fraction is NaN rather than a number that looks like an answer
    nan_layers = {layer.name for layer in report.layers if layer.ran and np.isnan(layer.sum_abs).any()}
    metrics: dict[str, float] = {
        f"{prefix}dead_fraction": float("nan") if nan_layers else summary.dead_fraction,
        f"{prefix}dead": float(summary.dead),
        f"{prefix}dying": float(summary.dying),
        f"{prefix}dormant": float(summary.dormant),
    }
    training = report.training
    if training is not None and training.persistence_overall is not None:
        metrics[f"{prefix}persistence"] = training.persistence_overall
    for layer in report.layers:
        if layer.ran and layer.units:
            nan = layer.name in nan_layers
            metrics[f"{prefix}dead_fraction/{layer.name}"] = (
                float("nan") if nan else float(layer.dead_mask().mean())
            )
    if nan_layers:
        metrics[f"{prefix}nan_units"] = float(sum(int(np.isnan(lay.sum_abs).sum()) for lay in report.layers))
    return metrics


def watch(model: nn.Module, every: int = 100, window: int = 1, **options: Any) -> Watch:
    """Watch `model` while it trains (see `Watch`)."""
    return Watch(model, every, window, **options)
