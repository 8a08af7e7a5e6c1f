"""The torch backend of the scan: a probe on the model (eager, .pt2, TorchScript), the batch loop."""

from __future__ import annotations

import contextlib
import os

import numpy as np

from deadrelu_cli.backends.torch.inputs import (
    cpu_activation_bytes,
    cuda_sample_cost,
    detect_float_fed,
    example_inputs,
    first_layer_hint,
    integer_hint,
    model_call,
    model_tensors,
    position_hint,
    speech_frames,
)
from deadrelu_cli.calibration import CalibrationData, prefetched
from deadrelu_cli.errors import UserError
from deadrelu_cli.gate import (
    EXPERTS_MERGED,
    UNIT_AXIS_ASSUMED,
    UNIT_AXIS_NOT_FOLLOWED,
    unscanned_text,
    unseen_notes,
)
from deadrelu_cli.inputs import (
    AUDIO_INPUTS,
    AUDIO_VALUES,
    DECODER_IDS,
    DECODER_MASK,
    DEFAULT_MASK,
    GROUPED_INPUTS,
    LABELS,
    PADDING_CHECK,
    TARGET_MASK,
    TOKEN_IDS,
    batch_mask,
    by_keyword,
    check_shapes,
    decoder_batch_mask,
    decoder_from_labels,
    decoder_scope,
    dict_groups,
    fixed_batch_error,
    label_arrays,
    labels_note,
    mask_lengths,
    match_inputs,
    per_batch_quantization,
    resolve_batch_size,
    resolve_mask,
    square_free_batch_size,
    target_batch_mask,
    unbatched_advice,
    unfed_arrays,
)
from deadrelu_cli.loaders.model import LoadedModel
from deadrelu_cli.options import ScanOptions
from deadrelu_cli.probe.ops import axis_guess_notes, axis_lost_note
from deadrelu_cli.wiring.model import is_last_axis_vector


def batch_size_for(
    requested, model: LoadedModel, data: CalibrationData, order: list[str], device: str
) -> int:
    if requested == "auto" and model.fixed_batch is not None:
        return model.fixed_batch
    return resolve_batch_size(
        requested,
        data,
        order,
        cuda_sample_cost(model, data, order, device),
        cpu_activation_bytes(model, data, order, device),
    )


def dynamic_quantizers(runnable) -> str:
    """torch.ao's dynamically quantized layers (their input quantized with one scale per call, so a sample's
    activations depend on the samples batched with it), with counts; "" for none. A module of
    torch.ao.nn.quantized.dynamic, or in TorchScript the quantized ops that run one; float16 dynamic
    layers quantize only their weights and are left out."""
    from collections import Counter

    import torch

    found: Counter = Counter()
    if isinstance(runnable, torch.jit.ScriptModule):
        try:
            graph = runnable.inlined_graph
        except Exception:  # noqa: BLE001 - a module without forward: nothing to inspect
            return ""

        def walk(block) -> None:
            for node in block.nodes():
                kind = node.kind()
                if (
                    kind.startswith("quantized::") and "dynamic" in kind and "fp16" not in kind
                ) or kind == "aten::quantize_per_tensor_dynamic":
                    found[kind] += 1
                for inner in node.blocks():
                    walk(inner)

        walk(graph)
    elif isinstance(runnable, torch.nn.Module):
        for module in runnable.modules():
            kind = type(module)
            if ".quantized.dynamic" not in kind.__module__ or kind.__name__ == "Module":
                continue
            packed = getattr(module, "_packed_params", None)
            if (
                getattr(packed, "dtype", None) == torch.float16
                or getattr(module, "dtype", None) == torch.float16
            ):
                continue
            found[f"dynamic {kind.__name__}"] += 1
    return ", ".join(f"{count} {op}" for op, count in found.most_common())


def make_probe(
    model: LoadedModel,
    settings,
    compile_graph: bool = False,
    example: tuple | None = None,
    names: list[str] | None = None,
):
    if compile_graph:
        from deadrelu_cli.probe.graph_stats import InGraphProbe, export_for_stats

        if model.kind == "eager":
            return InGraphProbe(
                export_for_stats(model.runnable, example, names), settings, compile_graph=True
            )
        if model.kind == "exported":
            from deadrelu_cli.loaders.torch_models import graph_module_with_stack

            graph_module = graph_module_with_stack(model.extra["program"]).to(
                next(iter(model.runnable.parameters())).device
            )
            return InGraphProbe(graph_module, settings, compile_graph=True)
        raise UserError(
            "--compile works on state_dict/safetensors (with --arch) and .pt2 models, not TorchScript"
        )
    if model.kind == "eager":
        from deadrelu_cli.probe.eager import EagerProbe

        return EagerProbe(model.runnable, settings)
    if model.kind == "exported":
        from deadrelu_cli.probe.exported import ExportedProbe

        return ExportedProbe(model.runnable, settings)
    if model.kind == "torchscript":
        from deadrelu_cli.probe.torchscript import TorchScriptProbe

        return TorchScriptProbe(model.runnable, settings)
    raise AssertionError(model.kind)


def attach_biases(model: LoadedModel, layers) -> None:
    """Copy each unit's bias (of the producing Linear/Conv/BN) into the stats, for the drill-down."""
    attach_module_biases(model.runnable, layers)


def attach_module_biases(runnable, layers) -> None:
    """attach_biases on a module (or anything with named parameters/buffers): live models too (watch)."""
    import torch

    from deadrelu_cli.wiring.torch import offloaded

    params = None
    nested: dict | None = None

    def nested_modules() -> dict:
        """Modules by their names without the segments of nested wrappers (what the probe names them)."""
        nonlocal nested
        if nested is None:
            from deadrelu_cli.probe.eager import module_names

            nested = {}
            if isinstance(runnable, torch.nn.Module):
                by_id = {id(m): m for m in runnable.modules()}
                for ident, name in module_names(runnable).items():  # outer first: the wrapped one wins
                    nested[name] = by_id[ident]
        return nested

    def tensor_of(producer: str, key: str):
        nonlocal params
        # the producer's own tensors, not a dict of the whole model's (ScriptModules have no get_submodule)
        if isinstance(runnable, torch.nn.Module) and not isinstance(runnable, torch.jit.ScriptModule):
            try:  # a parameter or buffer; accelerate's copy where it was offloaded (a meta tensor)
                return offloaded(runnable.get_submodule(producer), key)
            except AttributeError:
                pass  # not a module path: a wrapper nested inside (FSDP1), else by name below
            module = nested_modules().get(producer)
            if module is not None:
                return offloaded(module, key)
        if params is None:
            params = {}
            if hasattr(runnable, "named_parameters"):
                params.update(dict(runnable.named_parameters()))
            if hasattr(runnable, "named_buffers"):
                params.update({k: v for k, v in runnable.named_buffers() if k not in params})
        return params.get(f"{producer}.{key}")

    for layer in layers:
        if layer.producer is None:
            continue
        bias = tensor_of(layer.producer, "bias")
        if (
            isinstance(bias, torch.Tensor)
            and is_last_axis_vector(tuple(bias.shape))  # [N] or [1, N]
            and bias.shape[-1] == layer.units
        ):
            if hasattr(bias, "full_tensor"):  # a DTensor (FSDP2's fully_shard): gathered, on every rank alike
                bias = bias.full_tensor()
            # a copy first: numpy's view would pin the storage, which FSDP frees and regrows in place
            layer.bias = bias.detach().float().cpu().clone().numpy().astype(np.float64).reshape(-1)
            continue
        weight = tensor_of(layer.producer, "weight")
        mean = tensor_of(layer.producer, "running_mean") if bias is None and weight is None else None
        if not (
            bias is None  # bias=False (T5, LLaMA-style MLPs): still the layer's producer, for the fixes
            and isinstance(weight, torch.Tensor)
            and weight.dim() >= 2
            and weight.shape[0] == layer.units
        ) and not (  # an affine=False BatchNorm: its per-unit mean and variance make the units
            isinstance(mean, torch.Tensor) and tuple(mean.shape) == (layer.units,)
        ):
            layer.producer = None


def scan_torch(
    model: LoadedModel,
    data: CalibrationData,
    options: ScanOptions,
    device: str,
    collectors: dict | None = None,
) -> tuple[list, object]:
    """Replay the data through a probe of the model; returns the layer statistics and the probe."""
    from deadrelu_cli.probe.experts import experts_apart, fused_experts

    if model.kind == "eager" and options.compile:
        fused = [path for path, module in model.runnable.named_modules() if fused_experts(module)]
        if fused:  # the compiled graph runs every expert's rows through one activation: one "unit" each
            raise UserError(
                f"--compile: {', '.join(fused[:3])}{', …' if len(fused) > 3 else ''} is a fused mixture of experts, "
                "whose experts a compiled graph cannot count apart; scan without --compile"
            )
    if model.kind != "eager" or options.compile:
        return _scan_torch(model, data, options, device, collectors)
    with experts_apart(model.runnable) as fused:  # each expert's units apart
        return _scan_torch(model, data, options, device, collectors, fused)


def exported_tensors(model: LoadedModel) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of a .pt2 / TorchScript model's parameters and buffers: what an export keeps of
    its modules (probe.experts reads mixtures of experts off them)."""
    runnable = model.runnable
    return [(name, tuple(t.shape)) for name, t in (*runnable.named_parameters(), *runnable.named_buffers())]


def mark_merged_experts(model: LoadedModel, layers: list) -> None:
    """Mark the layers of a .pt2 / TorchScript export of a fused mixture of experts (its weights still
    `[experts, …]`, its per-expert forward gone): `extra[EXPERTS_MERGED]` and a note; the gate stops on them."""
    from deadrelu_cli.probe.experts import fused_holders, merged_expert_sites, merged_experts_note

    merged = merged_expert_sites([layer.name for layer in layers], fused_holders(exported_tensors(model)))
    for layer in layers:
        if layer.name in merged:
            layer.extra[EXPERTS_MERGED] = merged[layer.name][1]
    if merged:
        note = merged_experts_note(
            merged,
            "scan the model before export (state_dict + --arch, or its Hugging Face folder), which counts "
            "each expert apart, or pass --allow-unseen to gate on them as counted",
        )
        if note not in model.notes:
            model.notes.append(note)


def _scan_torch(
    model: LoadedModel,
    data: CalibrationData,
    options: ScanOptions,
    device: str,
    collectors: dict | None = None,
    fused: dict[str, int] | None = None,
) -> tuple[list, object]:
    import torch

    from deadrelu_cli.probe.base import ProbeSettings
    from deadrelu_cli.probe.experts import declare_unreached, expert_groups, mark_unattributed_rows

    mask = resolve_mask(options.mask, options.exclude_token_ids, data)
    # set per scan: the same data may serve another model later
    data.unfed = unfed_arrays(mask, data, model)
    labels = label_arrays(model, data.names)
    if labels and labels_note(labels) not in model.notes:
        model.notes.append(labels_note(labels))
    # the position mask is an attention_mask that forward() does not take: the model sees the padding
    unseen_padding = mask is not None and mask.array == DEFAULT_MASK and DEFAULT_MASK in data.unfed
    padded = False
    padding_seen = False  # a batch's token mask left a position out (an export's experts then say so)
    # token ids without any mask: every position counts; padding there would count as tokens unsaid
    pad_id = unmasked_pad_id(model, data, mask, options.mask)
    pad_positions = 0
    if mask is not None and options.compile:
        raise UserError(
            "--compile counts inside the graph, which takes no position mask; drop --compile, or pass --mask none"
        )
    order = match_inputs(model, data)
    check_shapes(model, data, order)
    detect_float_fed(model, data, order, device)
    # an encoder-decoder fed its own decoder tokens: the decoder's sites count on those tokens' positions
    # (the encoder's attention_mask says nothing about them; without decoder_input_ids the decoder runs
    # on the shifted input_ids, whose positions the attention_mask does mark)
    # (or on the labels shifted right, an encoder-decoder fed labels and no decoder_input_ids)
    from_labels = decoder_from_labels(model, order)
    decoder = (
        decoder_scope(model.runnable)
        if (DECODER_IDS in order or from_labels) and options.mask != "none"
        else None
    )
    if from_labels and options.exclude_token_ids:
        model.notes.append(
            f"--exclude-token-ids applies to the encoder's positions: the decoder runs on the {LABELS} "
            "shifted right and counts every position that is not label padding (-100)"
        )
    if (
        decoder is not None
        and not from_labels
        and DECODER_MASK not in data.names
        and not options.exclude_token_ids
    ):
        model.notes.append(
            f"the data has {DECODER_IDS} but no {DECODER_MASK}: the decoder's sites ({decoder}.*) count "
            f"every decoder position, padding included; add a {DECODER_MASK} array to count real tokens only"
        )
    # torch's own nn.Transformer decoder runs on the target sequence: its tgt_key_padding_mask's positions
    targets = transformer_decoders(model.runnable) if decoder is None and options.mask != "none" else ()
    if targets and mask is None and TARGET_MASK not in order:
        targets = ()
    if targets and TARGET_MASK not in order:
        model.notes.append(
            f"the data has no {TARGET_MASK}: the sites of the nn.Transformer decoder ({', '.join(targets)}) "
            f"count every target position, padding included; add a {TARGET_MASK} array (True on padding)"
        )
    # (an encoder-decoder's speech encoder too, Speech2Text: its decoder keeps the decoder's scope)
    frames = audio_frame_scope(model.runnable, mask, order)
    pooled = (
        (pooled_blocks(model.runnable) or derived_scopes(model.runnable))
        if mask is not None and decoder is None and frames is None
        else None
    )
    # a token mask is not an image or audio tower's (CLIP's vision_model with as many patches as tokens)
    towers = (
        other_modality_towers(model.runnable)
        if mask is not None and TOKEN_IDS in order and mask_rank(mask, data) == 2 and frames is None
        else None
    )
    # speech encoder fed audio with no mask at all: zero-padded audio would count its padded frames unsaid
    hop = (
        frame_hop(model.runnable)
        if mask is None and options.mask != "none" and AUDIO_VALUES in order and speech_frames(model.runnable)
        else None
    )
    zero_tailed = 0
    settings = ProbeSettings(
        threshold=options.threshold,
        channel_dim=options.channel_dim,
        ops=options.ops,
        track_min=options.explain,
        skip_nonfinite=options.allow_nonfinite,
    )
    # first: a model run one sample at a time needs no batch sizing (auto runs a sample to size it)
    alone = per_batch_quantization(
        dynamic_quantizers(model.runnable),
        options.batch_size,
        options.batch_size_explicit,
        model.fixed_batch,
        model.notes,
    )
    batch_size = alone or batch_size_for(options.batch_size, model, data, order, device)
    example = None
    if options.compile:
        if dict_groups(model, order):
            raise UserError(GROUPED_INPUTS.format(option="--compile"))
        example = example_inputs(model, data, order, device)
    names = list(order) if options.compile and by_keyword(model, order) else None
    probe = make_probe(model, settings, options.compile, example, names)
    if towers is not None and hasattr(probe, "sites_reached_by"):
        # a graph (.pt2) says it by data flow: the sites no token input reaches are on other positions
        tokens = token_arrays(mask, data)
        positions = {i for i, name in enumerate(order) if name in tokens}
        if positions:  # (none: no rule, as before)
            reached = probe.sites_reached_by(positions)
            towers = {**towers, **{site.name: None for site in probe.sites if site.name not in reached}}
    probe.registry.collectors.update(collectors or {})
    total = data.local_samples if options.limit is None else min(options.limit, data.local_samples)
    if model.fixed_batch is not None:  # also when auto chose it: a last, partial batch would not run
        if total % model.fixed_batch:
            raise fixed_batch_error(model.path, model.fixed_batch, total)
        batch_size = model.fixed_batch
    elif mask is not None or targets:  # no batch of `tokens` samples: a time-major layout stays unambiguous
        tokens = mask_lengths(mask, data, *((TARGET_MASK,) if targets else ()))
        batch_size = square_free_batch_size(batch_size, total, tokens)
    done = 0
    context = probe.attached() if hasattr(probe, "attached") else contextlib.nullcontext()
    if mask is not None and mask_rank(mask, data) == 3 and isinstance(model.runnable, torch.nn.Module):
        # an image's pixel mask: a module given it flattened as its attention_mask (DETR's encoder)
        # counts its sites on it, the positions the model itself treats as image
        modules = attention_mask_modules(model.runnable)
        context = _with(context, module_attention_masks(modules, probe.registry))

    def prepared(batch: dict) -> tuple:
        return (
            batch,
            model_tensors(model, batch, order, device),
            None if mask is None else torch.from_numpy(batch_mask(mask, batch)).to(device),
            decoder_batch_mask(mask, batch)
            if decoder is not None
            else target_batch_mask(batch)
            if targets
            else None,
        )

    def tensors():
        nonlocal padded, pad_positions, zero_tailed
        for batch in data.batches(batch_size, options.limit, options.allow_nonfinite):
            padded = padded or (unseen_padding and not np.asarray(batch[DEFAULT_MASK]).all())
            if hop is not None:
                zero_tailed += trailing_zero_samples(batch[AUDIO_VALUES], hop)
            if pad_id is not None:
                pad_positions += int(np.count_nonzero(np.asarray(batch[TOKEN_IDS]) == pad_id))
            yield prepared(batch)

    def forward(inputs, kept, decoder_kept) -> None:
        nonlocal padding_seen
        if not padding_seen and model.kind != "eager":
            padding_seen = any(k is not None and not bool(k.all()) for k in (kept, decoder_kept))
        if decoder is not None:
            scoped = None if decoder_kept is None else torch.from_numpy(decoder_kept).to(device)
            encoder = {frames[0]: frames[1](kept)} if frames is not None else {}
            probe.registry.set_position_mask(kept, {decoder: scoped, **encoder})
        elif targets:
            scoped = None if decoder_kept is None else torch.from_numpy(decoder_kept).to(device)
            probe.registry.set_position_mask(kept, dict.fromkeys(targets, scoped))
        elif frames is not None:
            path, to_frames = frames
            probe.registry.set_position_mask(kept, {path: to_frames(kept)})
        elif pooled is not None:
            probe.registry.set_position_mask(kept, {**(towers or {}), **pooled(kept)})
        elif mask is not None:
            probe.registry.set_position_mask(kept, towers)
        args, kwargs = model_call(model, order, inputs)
        probe.run(args, kwargs)

    forwards = 0
    # sites whose layout their shape cannot say (probe.ops.row_order_ambiguous / layout_ambiguous) are
    # told by reordering a batch's samples: before the batch is counted where collectors (fixes) read
    # the kept positions; else after it, only where such a site ran (its batch counted every way meanwhile)
    tell_first = mask is not None and bool(probe.registry.collectors)
    tried: set[str] = set()

    def tell(batch: dict) -> None:
        tell_layouts(probe.registry, batch, data, lambda b: forward(*prepared(b)[1:]))

    with context, torch.inference_mode():
        for index, (batch, inputs, kept, decoder_kept) in enumerate(prefetched(tensors())):
            try:
                if tell_first and kept is not None and kept.shape[0] > 1:
                    tell_first = False
                    tell(batch)
                forward(inputs, kept, decoder_kept)
                untold = {name for name, site in probe.registry.sites.items() if site.pending} - tried
                if untold and kept is not None and kept.shape[0] > 1:
                    tried |= untold
                    tell(batch)
            except UserError:
                raise
            except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                if index == 0:
                    shapes = ", ".join(f"{n}{list(batch[n].shape)}" for n in order)
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    hint = "check that --data fits the model's input"
                    if DECODER_IDS not in order and decoder_scope(model.runnable) is not None:
                        hint = (  # T5 derives no decoder inputs from input_ids (BART does)
                            f"an encoder-decoder model: give --data {DECODER_IDS} and {DECODER_MASK} "
                            "arrays (the decoder's tokens) beside input_ids and attention_mask"
                        )
                    raise UserError(
                        first_layer_hint(model, data)
                        or position_hint(model, batch, order)
                        or integer_hint(batch, order, exc)
                        or f"the model failed on the first batch ({shapes}): {first}; {hint}"
                    ) from exc
                raise_if_model_code(exc, index, batch, order)
                raise
            except Exception as exc:  # noqa: BLE001 - an AttributeError, AssertionError, … of any origin
                raise_if_model_code(exc, index, batch, order)
                raise
            done += inputs[0].shape[0] if inputs and inputs[0].dim() else 0
            forwards += 1
            if options.progress:
                options.progress(done, total)
    declare_unreached(probe.registry, fused or {})
    layers = probe.registry.layer_stats()
    guesses = probe.registry.axis_guesses
    guessed = {layer.name: guesses[layer.name] for layer in layers if layer.name in guesses}
    for layer in layers:  # [N, C, T] and [N, T, C] look alike: say which one was assumed, and gate
        if layer.name in guessed:
            layer.extra["unit_axis"] = UNIT_AXIS_ASSUMED
    for note in axis_guess_notes(guessed, "Linear/Conv/BatchNorm/LayerNorm"):
        if note not in model.notes:
            model.notes.append(note)
    lost = [layer.name for layer in layers if layer.name in probe.registry.axis_lost]
    if lost:  # a layer's units moved where the probe lost them: counted on a guess, said and gated
        for layer in layers:
            if layer.name in probe.registry.axis_lost:
                layer.extra["unit_axis"] = UNIT_AXIS_NOT_FOLLOWED
        note = axis_lost_note(lost)
        if note not in model.notes:
            model.notes.append(note)
    if model.kind != "eager":  # an export of a fused mixture of experts: one activation for every expert
        mark_merged_experts(model, layers)
        if padding_seen:  # an expert's rows, gathered by the export's index ops: not the mask's positions
            mark_unattributed_rows(layers, expert_groups(exported_tensors(model)))
    attach_biases(model, layers)
    check_sample_axis(layers, data, order, done, forwards, mask is not None)
    unscanned = dict(getattr(probe, "unscanned", {}))
    if unscanned:  # a LeakyReLU beside the ReLUs: said, in the report (not gated)
        model.extra["unscanned"] = unscanned
        note = unscanned_text(unscanned, options.ops)
        if note not in model.notes:
            model.notes.append(note)
    hidden = dict(getattr(probe, "hidden", {}))
    if hidden:  # activations the probe cannot count: said, kept in the report, and a gate stops on them
        model.extra["unseen"] = {**model.extra.get("unseen", {}), **hidden}
        advice = "their units are not in the table, and a gate fails on them unless --allow-unseen"
        if any(": RNN(" in key for key in hidden):
            advice += (
                " (an nn.RNN runs its ReLU inside one kernel over every time step: nn.RNNCell is counted)"
            )
        notes = unseen_notes(hidden, options.ops, advice)
        model.notes.extend(note for note in notes if note not in model.notes)
    unseen_note = (
        "the model's forward() takes no attention_mask: padded positions are not counted, but the model "
        "saw them, so where attention (or any mixing) reaches them the real tokens of padded samples may "
        "differ from an unpadded run; samples of one length (no padding) avoid it"
    )
    if padded and unseen_note not in model.notes:
        model.notes.append(unseen_note)
    if zero_tailed:
        model.notes.append(
            f"{PADDING_CHECK}the data has {AUDIO_VALUES} but no {DEFAULT_MASK}: every frame was counted, and "
            f"{zero_tailed} of {done} samples end in {hop} or more exact zeros (a frame's worth or more), which "
            f"looks like zero-padding counted as audio; if it is, add an {DEFAULT_MASK} array (1 on real audio "
            "samples): the encoder then counts only the frames the model treats as real (for a model fed "
            f"without one, as wav2vec2-base, name that array otherwise and pass --mask NAME: it marks the "
            "positions without being fed)"
        )
    if pad_positions:
        model.notes.append(
            f"{PADDING_CHECK}the data has {TOKEN_IDS} but no {DEFAULT_MASK}: every position was counted, and {pad_positions} "
            f"of them hold the model's pad_token_id {pad_id}; if that is padding, add an {DEFAULT_MASK} array "
            f"(1 on real tokens) or pass --exclude-token-ids {pad_id}"
        )
    if not layers and not any(note.startswith("the model ran no") for note in model.notes):
        model.notes.append(no_sites_note(model, options.ops))
    return layers, probe


def model_code_frame(exc: BaseException):
    """Where the model's own code (its class, its library: transformers, timm, …) raised `exc` inside its
    forward: the innermost frame outside torch and the standard library, or None when that frame is this
    tool's (a probe hook runs inside the forward: then it is an internal error)."""
    import sysconfig
    import traceback

    import torch

    library = (os.path.dirname(torch.__file__) + os.sep, sysconfig.get_paths()["stdlib"] + os.sep)
    ours = (
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) + os.sep
    )  # the package
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename.startswith(library) or frame.filename.startswith("<"):
            continue  # torch's own frames (its modules' __getattr__, F.*), generated code
        if frame.filename.startswith(ours) and (frame.line or "").strip() in _FORWARDED:
            continue  # the probe's torch-function mode handing the model's own op call on to torch
        return None if frame.filename.startswith(ours) else frame
    return None


_FORWARDED = ("out = func(*args, **kwargs)", "return func(*args, **kwargs)")


def raise_if_model_code(exc: BaseException, index: int, batch: dict, order: list[str]) -> None:
    """An error raised by the model's own code is the model's (or the data's), not the tool's: one line,
    exit 2, naming where it was raised (a model whose forward reads an attribute its pickle lacks, an
    `assert` on the input's shape, a later batch longer than its position table)."""
    frame = model_code_frame(exc)
    if frame is None:
        return
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    shapes = ", ".join(f"{n}{list(np.shape(batch[n]))}" for n in order if n in batch)
    where = f"{os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}()"
    raise UserError(
        f"the model's own code raised {type(exc).__name__} at {where} on batch {index + 1} ({shapes})"
        f"{': ' + first if first else ''}; the error is in the model (or in what it expects beside "
        "--data), not in deadrelu: --debug shows the traceback"
    ) from exc


def tell_layouts(registry, batch: dict, data: CalibrationData, run) -> None:
    """Sites whose tensor holds the mask's positions in a way its shape cannot say (flattened rows
    [B*T, ...] of a [B, T] or of a time-major [T, B] tensor; [B, T, ...] and [T, B, ...] at as many
    samples as tokens): told by running `batch` (`run`) again with its samples in reverse order and
    seeing which part of the tensor comes back reversed (probe.ops.reordered_layout). Nothing is counted
    in these runs; a site it cannot tell (one vector everywhere) is counted as the accumulator's pending
    rule says (every position, and a note). Two forwards more (one where no such site ran)."""
    from deadrelu_cli.probe.ops import layout_ambiguous, reordered_layout, row_order_ambiguous

    def fingerprints(arrays: dict) -> dict:
        registry.fingerprints = {}
        try:
            run(arrays)
            return registry.fingerprints
        finally:
            registry.fingerprints = None

    first = fingerprints(batch)
    unclear = {
        name: calls
        for name, calls in first.items()
        if any(
            layout_ambiguous(shape, dim, b, t) or row_order_ambiguous(shape, dim, b, t)
            for shape, dim, b, t, _ in calls
        )
    }
    if not unclear:
        return
    consts, axes = set(getattr(data, "consts", ())), getattr(data, "batch_axes", {})
    reversed_batch = {}
    for name, array in batch.items():
        array = np.asarray(array)
        axis = axes.get(name, 0)
        reversed_batch[name] = array if name in consts or array.ndim <= axis else np.flip(array, axis).copy()
    second = fingerprints(reversed_batch)
    for name, calls in unclear.items():
        again = second.get(name, [])
        if len(again) != len(calls):
            continue
        told = {
            reordered_layout(shape, dim, b, t, sums, other[4])
            for (shape, dim, b, t, sums), other in zip(calls, again, strict=True)
            if layout_ambiguous(shape, dim, b, t) or row_order_ambiguous(shape, dim, b, t)
        }
        if len(told) == 1 and None not in told:
            registry.tell_layout(name, told.pop())


def check_sample_axis(
    layers: list, data: CalibrationData, order: list[str], samples: int, forwards: int, masked: bool
) -> None:
    """Every sample gives every site at least one value per unit; when every site saw fewer, exactly one
    value per unit per forward, the model did not take the arrays' first axis as samples (one sample
    saved without its sample axis, [6] into a Linear(6, …), runs as one vector): refused rather than
    reported as that many samples. Sites that saw some rows of a batch (a mixture of experts' routed
    rows) are no such case."""
    ran = [layer for layer in layers if layer.ran and layer.samples is None]
    if (
        masked
        or samples < 2
        or not ran
        or any(layer.elements_per_unit >= samples or layer.elements_per_unit != forwards for layer in ran)
    ):
        return
    shapes = ", ".join(f"{s.name}{list(s.shape)}" for s in data.sources if s.name in order)
    seen = max(layer.elements_per_unit for layer in ran)
    raise UserError(
        f"{data.path}: the model saw {seen} value(s) per unit where {samples} samples were read ({shapes}), so it "
        f"does not take the first axis as samples; {unbatched_advice(data.sources[0].shape)}"
    )


def transformer_decoders(runnable) -> tuple[str, ...]:
    """Module paths of torch's nn.TransformerDecoder / nn.TransformerDecoderLayer modules (the outermost
    ones): their sites run on the target sequence, whose padding `tgt_key_padding_mask` marks."""
    from torch import nn

    if not isinstance(runnable, nn.Module):
        return ()
    kinds = (nn.TransformerDecoder, nn.TransformerDecoderLayer)
    paths = [name for name, module in runnable.named_modules() if name and isinstance(module, kinds)]
    return tuple(p for p in paths if not any(p.startswith(q + ".") for q in paths))


def audio_frame_scope(runnable, mask, order) -> tuple[str, object] | None:
    """The scan's `speech_frames`: where the data's mask (its attention_mask, or a --mask array of the
    audio's shape, which inputs.resolve_mask checked) is over the audio samples or frames it feeds
    (`input_values`, or Speech2Text's `input_features`, which its subsampler shortens)."""
    if mask is None or mask.array is None or not any(name in order for name in AUDIO_INPUTS):
        return None
    return speech_frames(runnable, for_sites=True)


def forward_arguments(module) -> set[str] | None:
    """The names of module.forward()'s arguments: its signature, or a TorchScript method's schema
    (a traced submodule keeps the names); None when neither tells."""
    import inspect

    try:
        return set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError, AttributeError):
        pass
    try:
        return {argument.name for argument in module.forward.schema.arguments[1:]}
    except (AttributeError, RuntimeError):  # a TorchScript submodule that no forward calls
        return None


def other_modality_towers(runnable) -> dict[str, None]:
    """A multimodal model's image or audio towers (CLIP's `vision_model`, CLAP's `audio_model`, a LLaVA's
    vision tower): the outermost modules below the root whose forward() takes pixel_values, input_values
    or input_features and no token ids. They run on patches or frames, never on the tokens, so the token
    mask is not theirs, also where their sequence has the tokens' length: {path: None} (every position)."""
    from torch import nn

    if not isinstance(runnable, nn.Module):
        return {}
    found: list[str] = []
    for path, module in runnable.named_modules():
        if not path or any(path.startswith(q + ".") for q in found):
            continue
        parameters = forward_arguments(module)
        if parameters is None:
            continue
        if parameters & {"pixel_values", *AUDIO_INPUTS} and not parameters & {TOKEN_IDS, "inputs_embeds"}:
            found.append(path)
    return dict.fromkeys(found)


def token_arrays(mask, data) -> set[str]:
    """The data's arrays laid out as the token mask is ([samples, tokens, …]: the ids, the mask itself)."""
    shapes = {s.name: tuple(s.shape) for s in data.sources}
    lead = shapes.get(mask.array or TOKEN_IDS, ())[:2]
    return {name for name, shape in shapes.items() if len(lead) == 2 and shape[:2] in (lead, lead[::-1])}


def mask_rank(mask, data) -> int:
    """The rank of the data's mask array (3: an image's [samples, height, width] pixel mask)."""
    return next((len(s.shape) for s in data.sources if s.name == mask.array), 2)


@contextlib.contextmanager
def _with(outer, handles: list):
    try:
        with outer:
            yield
    finally:
        for handle in handles:
            handle.remove()


def attention_mask_modules(runnable) -> list[tuple[str, object, int]]:
    """The modules below the root whose forward() takes an `attention_mask`: (path, module, its index
    among the positional arguments), for module_attention_masks."""
    import inspect

    found = []
    for path, module in runnable.named_modules():
        if not path:
            continue
        try:
            parameters = list(inspect.signature(module.forward).parameters)
        except (TypeError, ValueError):
            continue
        if "attention_mask" in parameters:
            found.append((path, module, parameters.index("attention_mask")))
    return found


def module_attention_masks(modules: list[tuple[str, object, int]], registry) -> list:
    """Pre-hooks on `modules` (attention_mask_modules; handles to remove): while the scan's mask is an
    image's pixel mask (probe.accumulator.PixelMask), a module called with a 2-D attention_mask of the
    batch — DETR's encoder, given the pixel mask interpolated to its feature map and flattened — counts
    the sites under it where that mask keeps (an additive 0/-inf mask: where it is 0). That is the model's
    own reading of the pixel mask at those positions, exact whatever the stride."""
    import torch

    from deadrelu_cli.probe.accumulator import PixelMask

    def hook_for(path: str, index: int):
        def hook(module, args, kwargs):
            given = registry.position_mask
            if not isinstance(given, PixelMask):
                return
            value = kwargs.get("attention_mask")
            if value is None and len(args) > index:
                value = args[index]
            if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[0] != given.batch:
                return
            if value.dtype == torch.bool:
                keep = value
            elif value.is_floating_point() and bool((value < 0).any()):
                keep = value == 0  # additive: 0 where attended, a large negative number on padding
            else:
                keep = value != 0
            registry.set_scoped_mask(path, keep)

        return hook

    return [
        module.register_forward_pre_hook(hook_for(path, index), with_kwargs=True)
        for path, module, index in modules
    ]


def pooled_blocks(runnable):
    """Funnel-style encoders pool their sequence between blocks ([B, T] -> [B, ceil(T/2)], the CLS kept
    apart) and their attention_mask with it by min (a pooled position is padding when a position it
    pools is): a function from the mask to each block's own ({block path: mask}), by the model's own
    pooling (`attention_structure.pool_tensor`), so each block counts the positions the model treats as
    real; None for other models."""
    import torch

    base = getattr(runnable, "base_model", runnable)
    encoder = getattr(base, "encoder", None)
    pool = getattr(getattr(encoder, "attention_structure", None), "pool_tensor", None)
    blocks = getattr(encoder, "blocks", None)
    config = getattr(encoder, "config", None)
    if not (callable(pool) and isinstance(blocks, torch.nn.ModuleList) and config is not None):
        return None
    path = next((name for name, module in runnable.named_modules() if module is encoder and name), None)
    if path is None:
        return None
    shortest = 2 if getattr(config, "separate_cls", False) else 1  # as the encoder decides to pool

    def masks_of(kept: torch.Tensor) -> dict:
        scoped, current = {}, kept.float()
        for index in range(len(blocks)):
            if index > 0 and current.shape[1] > shortest:
                current = pool(current, mode="min")
            scoped[f"{path}.blocks.{index}"] = current > 0
        return scoped

    return masks_of


def derived_scopes(runnable):
    """Models that run part of themselves on a sequence the attention_mask does not fit, with a mask they
    derive from it (or none: Perceiver's latents, every position): Decision Transformer (three tokens per time step, its mask stacked alike: the
    `encoder`'s sites) and Canine (molecules: the characters' mask max-pooled by `downsampling_rate`, by
    the model's own `_downsample_attention_mask`: the deep `encoder` and `chars_to_molecules`). A function
    from the data's mask to {module path: mask}, as `pooled_blocks`; None for other models."""
    import torch

    base = getattr(runnable, "base_model", runnable)
    paths = {id(module): name for name, module in runnable.named_modules() if name}
    encoder = getattr(base, "encoder", None)
    if encoder is None or id(encoder) not in paths:
        return None
    if isinstance(getattr(getattr(base, "embeddings", None), "latents", None), torch.nn.Parameter):
        # Perceiver: its encoder runs on its learned latents, which no token mask marks, also where there
        # are as many latents as tokens (every position counts)
        return lambda kept: {paths[id(encoder)]: None}
    if all(
        isinstance(getattr(base, name, None), torch.nn.Module)
        for name in ("embed_return", "embed_state", "embed_action")
    ):
        # Decision Transformer: (return, state, action) per time step, interleaved
        return lambda kept: {paths[id(encoder)]: kept.bool().repeat_interleave(3, dim=1)}
    downsample = getattr(base, "_downsample_attention_mask", None)
    rate = getattr(getattr(base, "config", None), "downsampling_rate", None)
    molecules = getattr(base, "chars_to_molecules", None)
    if callable(downsample) and isinstance(rate, int) and id(molecules) in paths:

        def molecules_of(kept: torch.Tensor) -> dict:
            mask = downsample(kept.float(), downsampling_rate=rate) > 0
            return {paths[id(encoder)]: mask, paths[id(molecules)]: mask}

        return molecules_of
    return None


def trailing_zero_samples(audio: np.ndarray, run: int) -> int:
    """How many samples (rows of [samples, audio samples]) end in at least `run` exact zeros: what
    zero-padding looks like (and digital silence too; nothing in the audio tells them apart)."""
    audio = np.asarray(audio)
    if audio.ndim != 2 or audio.shape[1] < run or run < 1:
        return 0
    return int(np.count_nonzero((audio[:, audio.shape[1] - run :] == 0).all(axis=1)))


def frame_hop(runnable) -> int:
    """Audio samples per frame of a speech encoder's feature extractor (its conv strides' product)."""
    strides = getattr(getattr(runnable, "config", None), "conv_stride", None) or (1,)
    return int(np.prod([int(s) for s in strides]))


def unmasked_pad_id(model: LoadedModel, data: CalibrationData, mask, requested: str | None) -> int | None:
    """The config's pad_token_id when the data's token ids are counted with no mask at all (not asked
    for with --mask none): where that id occurs, padding may be counted as tokens, which must be said."""
    if mask is not None or requested == "none" or TOKEN_IDS not in data.names:
        return None
    pad_id = getattr(getattr(model.runnable, "config", None), "pad_token_id", None)
    return pad_id if isinstance(pad_id, int) and not isinstance(pad_id, bool) else None


_SMOOTH_ACTIVATIONS = ("SiLU", "GELU", "Sigmoid", "Tanh", "Hardswish", "Hardsigmoid", "Mish", "Softplus")
_OTHER_ACTIVATIONS = ("LeakyReLU", "ELU", "SELU", "PReLU")


def no_sites_note(model: LoadedModel, ops: tuple[str, ...]) -> str:
    """Say what the model uses instead of ReLUs (its activation modules, or a .pt2 graph's ops)."""
    from collections import Counter

    from deadrelu_cli.probe.ops import no_sites_note as describe

    found: Counter = Counter()
    if model.kind == "exported":
        graph = model.extra["program"].graph
        wanted = {name.lower() for name in _SMOOTH_ACTIVATIONS + _OTHER_ACTIVATIONS}
        for node in graph.nodes:
            base = str(getattr(node.target, "__name__", "")).split(".")[0].rstrip("_")
            if node.op == "call_function" and base.replace("_", "") in wanted:  # leaky_relu: LeakyReLU
                found[base] += 1
    elif hasattr(model.runnable, "modules"):
        for module in model.runnable.modules():
            if type(module).__name__ in _SMOOTH_ACTIVATIONS + _OTHER_ACTIVATIONS:
                found[type(module).__name__] += 1
    return describe(f"the model ran no {'/'.join(ops)} call", found)
