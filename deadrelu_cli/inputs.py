"""Backend-neutral input plumbing: which data array feeds which model input, shape checks, batch size."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from deadrelu_cli.calibration import PADDING_MASK_SUFFIX, CalibrationData
from deadrelu_cli.errors import UserError
from deadrelu_cli.loaders.model import LoadedModel
from deadrelu_cli.report.model import PER_BATCH_NOTE


def describe_model_inputs(model: LoadedModel) -> str:
    """The model's inputs as `name[dims] dtype`, for messages about data that does not fit them."""
    described = ", ".join(
        f"{s.name}{'[' + ', '.join('?' if d is None else str(d) for d in s.shape) + ']' if s.shape else ''}"
        f"{' ' + str(s.dtype) if s.dtype else ''}"
        for s in model.inputs
    )
    optional = [n for n in model.keyword_inputs if n not in {s.name for s in model.inputs}]
    if optional:  # an eager model's forward() arguments with defaults (input_ids, attention_mask, …)
        listed = ", ".join(optional[:12]) + (f", … ({len(optional) - 12} more)" if len(optional) > 12 else "")
        described = (
            f"{described} (forward() also takes {listed})"
            if described
            else f"{listed} (forward()'s arguments)"
        )
    return described or "unknown (the model does not declare them)"


def describe_arrays(data: CalibrationData) -> str:
    """The data file's arrays as `name[shape] dtype`: the other side of an input mismatch."""
    return ", ".join(f"{s.name}{list(s.shape)} {np.dtype(s.dtype).name}" for s in data.sources) or "no arrays"


def mismatch(data: CalibrationData, model: LoadedModel, what: str) -> UserError:
    """One message for data that does not fit the model's inputs: what is wrong, and both sides."""
    shapes = {(tuple(s.shape), np.dtype(s.dtype)) for s in data.sources}
    prefixes = {m.group(1) if (m := re.fullmatch(r"(.*?)_?\d+", s.name)) else None for s in data.sources}
    # a list of samples saved one by one: arr_0, arr_1, … (or s0, s1, …), all of one shape
    numbered = None not in prefixes and len(prefixes) == 1
    if numbered and len(data.sources) > max(2, len(model.inputs)) and len(shapes) == 1:
        ((shape, dtype),) = shapes
        return UserError(
            f"{data.path}: holds {len(data.sources)} arrays of one shape {list(shape)} {dtype.name}, and the "
            f"model has {len(model.inputs) or 'fewer'} input(s): one array per sample? stack them into one array "
            "with the samples on the first axis (np.stack(samples), torch.stack for a .pt list)"
        )
    dicts = (  # torch only: an ONNX graph takes no dicts
        "; INPUT.KEY arrays make a dict for an input that takes one, e.g. batch.image and batch.meta for "
        "forward(self, batch)"
        if model.backend == "torch"
        else ""
    )
    return UserError(
        f"{data.path}: {what}; the file holds {describe_arrays(data)}; the model's inputs are "
        f"{describe_model_inputs(model)} (name the arrays after the inputs{dicts})"
    )


GROUPED_INPUTS = (
    "{option} traces the model with one tensor per input, and this one takes its inputs as one tuple or "
    "dict (the data's INPUT.KEY arrays); scan without {option}"
)


def dict_groups(model: LoadedModel, order: list[str]) -> dict[str, list[tuple[str, int]]] | None:
    """For a torch forward() that takes dicts: arrays named INPUT.KEY (batch.image, batch.meta) grouped
    by input, each as (key, position in `order`); None when the arrays are not named so."""
    if model.backend != "torch" or not model.inputs or not order:
        return None
    wanted = [spec.name for spec in model.inputs]
    groups: dict[str, list[tuple[str, int]]] = {name: [] for name in wanted}
    for index, name in enumerate(order):
        prefix, dot, key = name.partition(".")
        if not dot or prefix not in groups or not key:
            return None
        groups[prefix].append((key, index))
    return groups if all(groups.values()) else None


# arrays a training set keeps beside the inputs: never fed to a model that takes no input of that name
LABEL_NAMES = frozenset(
    {"y", "label", "labels", "target", "targets", "class", "classes", "y_true", "label_ids", "targets_onehot"}
)
_POSITIONAL = re.compile(r"(?:arr_|input)(\d+)")  # np.savez(f, a, b) -> arr_0, arr_1; a .pt list -> input0, …


LABELS = "labels"
IGNORE_INDEX = -100  # transformers' label padding (the loss ignores it)


def derives_decoder_from_labels(runnable, arguments) -> bool:
    """Whether `runnable` is a transformers encoder-decoder that runs its decoder on `labels` shifted
    right (the start token first) when it gets no `decoder_input_ids`: one with
    `prepare_decoder_input_ids_from_labels` (T5, BART, mBART), or whose forward() takes both (M2M100,
    NLLB, Blenderbot, Speech2Text, Whisper shift them inside forward() without that method).
    `arguments`: the names forward() takes."""
    return (
        getattr(getattr(runnable, "config", None), "is_encoder_decoder", False) is True
        and LABELS in arguments
        and (hasattr(runnable, "prepare_decoder_input_ids_from_labels") or DECODER_IDS in arguments)
    )


def decoder_from_labels(model: LoadedModel, names) -> bool:
    """Whether the model is an encoder-decoder that derives its decoder's input from `labels`
    (`derives_decoder_from_labels`) and the data gives it `labels` [samples, tokens] and no
    `decoder_input_ids`: those labels are then the decoder's tokens, and fed."""
    return (
        LABELS in names
        and DECODER_IDS not in names
        and derives_decoder_from_labels(model.runnable, model.keyword_inputs)
    )


def is_transformers_model(runnable) -> bool:
    """A Hugging Face transformers model (by class name and module: transformers is not imported for it)."""
    return any(
        cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers.")
        for cls in type(runnable).__mro__
    )


def label_arrays(model: LoadedModel, names: list[str]) -> tuple[str, ...]:
    """The data's label arrays (`y`, `labels`, `targets`, …) not fed to the model: every one but those
    naming a required input (an ONNX graph's, a forward(x, y) without a default), an argument of a
    forward() that is not a transformers model's (a class-conditional net's `forward(x, t, y=None)`
    embeds `y`: its units depend on it) and an encoder-decoder's `labels` its decoder's input derives
    from (`decoder_from_labels`). A transformers head's `labels` would only compute a loss."""
    fed = {spec.name for spec in model.inputs}
    if not is_transformers_model(model.runnable):
        fed |= set(model.keyword_inputs)
    if decoder_from_labels(model, names):
        fed.add(LABELS)
    return tuple(n for n in names if n.lower() in LABEL_NAMES and n not in fed)


def labels_note(labels: tuple[str, ...]) -> str:
    return (
        f"array(s) {', '.join(labels)} not fed to the model: labels, which play no part in which units fire "
        "(only the inputs are replayed; a transformers model's labels would only compute a loss)"
    )


def positional_arrays(names: list[str], wanted: list[str]) -> list[str] | None:
    """np.savez's positional arrays (arr_0, arr_1, …) or a .pt list's (input0, …), in their numeric
    order, when they are exactly one per model input and no array names an input."""
    numbers = [_POSITIONAL.fullmatch(n) for n in names]
    if len(wanted) < 2 or len(names) != len(wanted) or not all(numbers) or set(names) & set(wanted):
        return None
    if sorted(int(m.group(1)) for m in numbers) != list(range(len(names))):
        return None
    return sorted(names, key=lambda n: int(_POSITIONAL.fullmatch(n).group(1)))


def match_inputs(model: LoadedModel, data: CalibrationData) -> list[str]:
    """Order the data's arrays as the model's inputs: by name when every array names an argument of
    forward() (input_ids, attention_mask, pixel_values, …; see `by_keyword`), else positionally
    (one array for one input; np.savez's arr_0, arr_1, … in their order)."""
    unfed = set(getattr(data, "unfed", ()))  # e.g. a --mask array that is not a model input
    names = [n for n in data.names if n not in unfed]
    wanted = [spec.name for spec in model.inputs]
    accepted = model.keyword_inputs
    if names and accepted and all(n in accepted for n in names) and all(w in names for w in wanted):
        return [n for n in accepted if n in names]
    if len(names) == 1 and len(wanted) <= 1:
        return names
    positional = positional_arrays(names, wanted)
    if positional:
        return positional
    grouped = sorted(
        names, key=lambda n: wanted.index(n.partition(".")[0]) if n.partition(".")[0] in wanted else -1
    )
    if dict_groups(model, grouped):  # INPUT.KEY arrays: one dict per input, in the inputs' order
        return grouped
    if wanted and all(n in names for n in wanted):
        extra = [n for n in names if n not in wanted]
        if extra:
            raise mismatch(data, model, f"arrays {', '.join(extra)} match no model input")
        return wanted
    missing = [w for w in wanted if w not in names]
    raise mismatch(
        data, model, f"no array for model input(s) {', '.join(missing)}" if missing else "arrays do not match"
    )


def by_keyword(model: LoadedModel, order: list[str]) -> bool:
    """Whether the arrays go to forward() by name (every one names an argument it takes)."""
    return bool(order) and bool(model.keyword_inputs) and all(n in model.keyword_inputs for n in order)


def unbatched_advice(shape: tuple[int, ...]) -> str:
    """For an array that is one sample without its sample axis."""
    return (
        f"the array has shape {list(shape)}: one sample without the sample axis? the first axis is samples: "
        "save it with one (x[None], np.expand_dims(x, 0))"
    )


def _fits(got: tuple[int, ...], expected: tuple) -> bool:
    return len(got) == len(expected) and all(e is None or e == g for e, g in zip(expected, got, strict=True))


def layout_advice(got: tuple[int, ...], expected: tuple) -> str:
    """For 4-D images in the other layout than the model's: [N, H, W, C] data for an [N, C, H, W]
    input, or the reverse (a TensorFlow-layout ONNX export); "" otherwise."""
    if len(got) != 4 or len(expected) != 4 or _fits(got[1:], tuple(expected[1:])):
        return ""
    if _fits((got[3], got[1], got[2]), tuple(expected[1:])):
        have, want, axes = "[N, H, W, C]", "[N, C, H, W]", "(0, 3, 1, 2)"
    elif _fits((got[2], got[3], got[1]), tuple(expected[1:])):
        have, want, axes = "[N, C, H, W]", "[N, H, W, C]", "(0, 2, 3, 1)"
    else:
        return ""
    return (
        f"; the data looks laid out {have} and the model takes {want}: transpose it "
        f"(np.transpose(x, {axes}); --channels-last changes only the memory format, not the data's layout)"
    )


def shape_advice(got: tuple[int, ...], expected: tuple) -> str:
    """What to do about data of shape `got` for an input of shape `expected` (None = any size)."""
    if _fits(got, tuple(expected[1:])):
        return "; " + unbatched_advice(got)
    return layout_advice(got, expected)


def check_shapes(model: LoadedModel, data: CalibrationData, order: list[str]) -> None:
    if dict_groups(model, order):  # dict inputs: no shape declared per key
        return
    by_name = {s.name: s for s in data.sources}
    for spec, name in zip(model.inputs, order, strict=False):
        if spec.shape is None:
            continue
        got = by_name[name].shape
        expected = tuple(spec.shape)
        if len(got) != len(expected) or any(
            e is not None and e != g for e, g in zip(expected[1:], got[1:], strict=False)
        ):
            shown = "x".join("?" if e is None else str(e) for e in expected)
            raise mismatch(
                data,
                model,
                f"array {name!r} has shape {list(got)}, the model input {spec.name!r} expects {shown} "
                f"(first axis = samples){shape_advice(got, expected)}",
            )


def fixed_batch_error(path, fixed: int, total: int) -> UserError:
    """A graph whose inputs fix the batch size, and a sample count it does not divide."""
    if total < fixed:
        return UserError(
            f"{path}: its inputs fix the batch size at {fixed}, and the data holds only {total} samples; "
            f"give at least {fixed} samples (a multiple of {fixed}), or re-export with a dynamic batch dim"
        )
    return UserError(
        f"{path}: its inputs fix the batch size at {fixed}, and {total} samples is not a multiple "
        f"of it; re-export with a dynamic batch dim or pass --limit {total - total % fixed}"
    )


# --batch-size auto on the CPU: the batch's activations (every intermediate tensor of one forward
# pass, summed) stay within this; the input alone within the same. Plain inference holds a few of
# them at a time, the scan (its probe, onnxruntime's statistics branches) some more, so this bounds
# both, whatever the model (a 16 kHz audio CNN holds ~100x more per sample than a 112x112 ResNet).
AUTO_BATCH_BYTES = 256 << 20
AUTO_MAX_BATCH = 1024


def per_batch_quantization(
    quantizers: str, requested, explicit: bool, fixed: int | None, notes: list[str]
) -> int | None:
    """The batch size for a model that quantizes its activations with one scale per run (`quantizers`
    names those ops, "" for none), whose every sample's activations then depend on the samples batched
    with it: 1 where the user left the batch size to the scan (each sample alone, as a server answering
    one request at a time runs it), else None (the batch as asked). Says which in `notes`."""
    if not quantizers:
        return None
    said = f"{PER_BATCH_NOTE} ({quantizers}: one scale for the whole batch), so"
    if fixed is None and not explicit:
        notes.append(
            f"{said} a sample's activations depend on the samples batched with it: each sample was run "
            "alone (batch 1), as a server answering one request at a time runs it; pass --batch-size N to "
            "count batches of N run together"
        )
        return 1
    if fixed is not None:
        if fixed != 1:  # no batch of 1 to offer: the graph takes batches of `fixed` only
            notes.append(
                f"{said} these counts are for batches of {fixed}, the size the model's inputs fix, and "
                "change with the samples' order"
            )
    elif str(requested) != "1":
        notes.append(
            f"{said} these counts are for the batches this scan ran (--batch-size {requested}) and change "
            "with the batch size and the samples' order; --batch-size 1 counts each sample alone"
        )
    return None


def resolve_batch_size(
    requested: int | str,
    data: CalibrationData,
    order: list[str],
    measure: Callable[[], tuple[int, int]] | None = None,
    activation_bytes: Callable[[], int | None] | None = None,
) -> int:
    """An int as given; "auto": the largest power of two (up to 1024) whose batch fits comfortably.
    On CPU, one sample's input and its activations (`activation_bytes`: bytes per sample, from shape
    inference or a one-sample pass; None when unknown) times the batch stay within AUTO_BATCH_BYTES;
    `measure` (CUDA) gives one sample's peak bytes and the budget instead."""
    if not isinstance(requested, str):
        return int(requested)
    if requested != "auto":
        raise UserError(f"--batch-size {requested!r}: give a positive integer or auto")
    per_sample = (
        sum(int(np.prod(s.shape[1:], dtype=np.int64)) * 4 for s in data.sources if s.name in order) or 4
    )
    budget = AUTO_BATCH_BYTES
    if measure is not None:  # a device that can say what one sample costs (CUDA)
        sample_peak, budget = measure()
        per_sample = max(per_sample, sample_peak)
    elif activation_bytes is not None:
        per_sample = max(per_sample, activation_bytes() or 0)
    size = 1
    while size * 2 <= AUTO_MAX_BATCH and size * 2 * per_sample <= budget:
        size *= 2
    return size


# the start of a report note saying that padding may have been counted as data: printed as a warning
# (first, and on stderr when the report goes to stdout), not as a plain note
PADDING_CHECK = "check padding: "
TOKEN_IDS = "input_ids"
DEFAULT_MASK = "attention_mask"
# arrays named *key_padding_mask mark padding (calibration.PADDING_MASK_SUFFIX); src_/plain ones are the
# default mask after attention_mask (tgt_/memory_ ones mark another sequence: a decoder's, the encoder output's)
DEFAULT_PADDING_MASKS = ("src_key_padding_mask", "key_padding_mask")
# an image model's padding mask [samples, height, width] (DETR and its kin: 1 on image, 0 on padding)
PIXEL_MASK = "pixel_mask"
AUDIO_VALUES = "input_values"  # a speech model's raw audio [samples, audio samples]
AUDIO_FEATURES = "input_features"  # filterbank frames [samples, frames, features] (Speech2Text)
# a speech encoder's inputs that an attention_mask of [samples, audio samples or frames] marks: the
# encoder runs on fewer frames (a conv feature extractor, a subsampler), by the model's own mapping
AUDIO_INPUTS = (AUDIO_VALUES, AUDIO_FEATURES)


@dataclass(frozen=True)
class MaskSpec:
    """Which token positions count: where array `array` is nonzero (None: every position), or where it
    is 0 when it `marks_padding` (a `*key_padding_mask`), minus the positions whose `input_ids` are in
    `exclude_token_ids`."""

    array: str | None
    exclude_token_ids: tuple[int, ...] = ()
    marks_padding: bool = False

    def describe(self) -> dict:
        described = {"array": self.array, "exclude_token_ids": list(self.exclude_token_ids)}
        if self.marks_padding:
            described["marks"] = "padding"
        return described


def resolve_mask(requested: str | None, exclude_token_ids: tuple[int, ...], data) -> MaskSpec | None:
    """--mask NAME | none | auto (default: the data's attention_mask, when it has one), --exclude-token-ids."""
    names = data.names
    if requested in (None, "auto"):
        array = next((n for n in (DEFAULT_MASK, *DEFAULT_PADDING_MASKS, PIXEL_MASK) if n in names), None)
    elif requested == "none":
        array = None
    elif requested in names:
        array = requested
    else:
        raise UserError(
            f"--mask {requested}: {data.path} has no array of that name (arrays: {', '.join(names)})"
        )
    if exclude_token_ids and TOKEN_IDS not in names:
        raise UserError(
            f"--exclude-token-ids needs the token ids: {data.path} has no {TOKEN_IDS!r} array (arrays: {', '.join(names)})"
        )
    if array is None and not exclude_token_ids:
        return None
    by_name = {s.name: s for s in data.sources}
    for name in filter(None, (array, TOKEN_IDS if exclude_token_ids else None)):
        shape = by_name[name].shape
        pixels = len(shape) == 3 and name == array and not exclude_token_ids  # an image's pixel mask
        if len(shape) != 2 and not pixels:
            raise UserError(
                f"{data.path}: the mask array {name!r} has shape {list(shape)}; a mask is [samples, tokens] "
                "(or [samples, height, width] for an image's pixels)"
            )
    # a mask of another length than the sequence it marks would mark nothing (the model may even run)
    # (not `input_features`: Speech2Text lays it out [samples, frames, features], Whisper [samples,
    # features, frames], and Whisper's feature extractor gives a mask over the frames)
    for name in (TOKEN_IDS, AUDIO_VALUES) if array is not None else ():
        if name in by_name and len(by_name[name].shape) == 2 and by_name[name].shape != by_name[array].shape:
            raise UserError(
                f"{data.path}: the mask array {array!r} has shape {list(by_name[array].shape)} but {name!r} has "
                f"{list(by_name[name].shape)}: give one mask value per position (or --mask none to count every position)"
            )
    marks_padding = array is not None and array.endswith(PADDING_MASK_SUFFIX)
    if marks_padding:
        _check_padding_convention(by_name[array], data.path)
    return MaskSpec(array, tuple(int(t) for t in exclude_token_ids), marks_padding)


def is_pixel_mask(spec: MaskSpec | None, data) -> bool:
    """Whether the mask is an image's [samples, height, width] pixel mask (resolve_mask lets one through)."""
    if spec is None or spec.array is None:
        return False
    return any(s.name == spec.array and len(s.shape) == 3 for s in data.sources)


def _check_padding_convention(source, path) -> None:
    """A `*key_padding_mask` that marks every position of a sample as padding is one written the other
    way round (1 on real tokens: an unpadded sample is then all 1), which would count the padding only;
    by PyTorch's convention such a sample has no token at all (attention over it gives NaN)."""
    try:
        for start in range(0, source.shape[0], 4096):  # in row blocks: O(block) memory
            rows = np.asarray(source.rows(start, min(start + 4096, source.shape[0]))) != 0
            full = np.flatnonzero(rows.all(axis=1))
            if full.size:
                raise UserError(
                    f"{path}: {source.name!r} marks every position of sample {start + int(full[0])} as padding: "
                    "an array named *key_padding_mask follows PyTorch's convention (True or nonzero on padding); "
                    "if it is 1 on real tokens, name it attention_mask (or pass --mask none to count every position)"
                )
    finally:
        close = getattr(source, "close", None)
        if close is not None:  # the scan's batches reopen it
            close()


def unfed_arrays(mask: MaskSpec | None, data, model: LoadedModel) -> tuple[str, ...]:
    """The data's arrays not passed to the model: the --mask array (and the attention_mask) when the
    model takes no input of that name (it only says which positions count: a loss mask, or the attention_mask that --text
    always makes), and the data's optional arrays (--text's token_type_ids, attention_mask) that
    forward() does not take (FNet takes no attention_mask, OPT no token_type_ids), and label arrays
    (`label_arrays`)."""
    model_inputs = set(model.keyword_inputs) | {spec.name for spec in model.inputs}
    candidates = [mask.array if mask is not None else None]
    if model_inputs:  # the data's attention_mask only says which positions count (--mask none or NAME too)
        candidates.append(DEFAULT_MASK)
    if model.keyword_inputs:  # forward()'s arguments are known
        candidates += getattr(data, "optional", ())
    unfed = [name for name in candidates if name and name in data.names and name not in model_inputs]
    return tuple(dict.fromkeys(unfed + list(label_arrays(model, data.names))))


def square_free_batch_size(batch_size: int, total: int, tokens: tuple[int, ...]) -> int:
    """`batch_size`, or the largest smaller one with which no batch has as many samples as a mask has
    tokens (`tokens`: each mask's length): a [tokens, batch, ...] activation (time-major) is told from a
    [batch, tokens, ...] one by its shape, which such a batch leaves ambiguous. Counts never depend on
    the batch size."""
    lengths = {t for t in tokens if t > 1}

    def square(size: int) -> bool:
        return bool(lengths & {min(size, total), total % size if size < total else 0})

    size = batch_size
    while size > 1 and square(size):
        size = min(size, total) - 1
    return size


def mask_lengths(mask: MaskSpec | None, data, *extra: str) -> tuple[int, ...]:
    """The token lengths of the data's [samples, tokens] arrays that a position mask reads (its array, or
    the input_ids --exclude-token-ids reads), and of the arrays `extra` names (another scope's mask)."""
    names = {(mask.array or TOKEN_IDS) if mask is not None else None, *extra}
    return tuple(s.shape[1] for s in data.sources if s.name in names and len(s.shape) == 2)


def layout_probe_size(total: int, tokens: tuple[int, ...]) -> int:
    """How many samples the batch that decides where a graph's sites hold the mask's positions takes:
    two (a [B*T, C] site is then told from a [T, C] one), or the next count that is no mask's length
    (`tokens`: a batch of 2 samples of 2 tokens leaves [T, B, ...] and [B, T, ...] one shape); at most
    `total`."""
    size = 2
    while size in tokens:
        size += 1
    return min(size, total)


TARGET_MASK = "tgt_key_padding_mask"  # nn.Transformer's decoder-side padding (PyTorch's convention)


def target_batch_mask(batch: dict[str, np.ndarray]) -> np.ndarray | None:
    """bool [batch, target tokens]: the positions of a torch nn.Transformer decoder's sequence that
    count (its `tgt_key_padding_mask` is 0 there); None without one (every position)."""
    return np.asarray(batch[TARGET_MASK]) == 0 if TARGET_MASK in batch else None


def batch_mask(spec: MaskSpec, batch: dict[str, np.ndarray]) -> np.ndarray:
    """bool [batch, tokens]: the positions of this batch that count."""
    keep = None
    if spec.array is not None:
        marked = np.asarray(batch[spec.array]) != 0
        keep = ~marked if spec.marks_padding else marked
    if spec.exclude_token_ids:
        ids = np.asarray(batch[TOKEN_IDS])
        drop = np.isin(ids, np.asarray(spec.exclude_token_ids, dtype=ids.dtype))
        keep = ~drop if keep is None else keep & ~drop
        if keep.shape != ids.shape:
            raise UserError(f"the mask {spec.array!r} and {TOKEN_IDS!r} have different shapes")
    return keep


DECODER_IDS = "decoder_input_ids"
DECODER_MASK = "decoder_attention_mask"


def decoder_scope(runnable) -> str | None:
    """The module path of an encoder-decoder's decoder (Hugging Face's `get_decoder()`, under
    `config.is_encoder_decoder`), whose sites run on the decoder's tokens; None for other models."""
    config = getattr(runnable, "config", None)
    if not getattr(config, "is_encoder_decoder", False) or not hasattr(runnable, "get_decoder"):
        return None
    decoder = runnable.get_decoder()
    return next((name for name, module in runnable.named_modules() if module is decoder and name), None)


def decoder_batch_mask(spec: MaskSpec | None, batch: dict[str, np.ndarray]) -> np.ndarray | None:
    """bool [batch, decoder tokens]: the decoder positions of this batch that count, where the data
    feeds the decoder its own `decoder_input_ids`: its `decoder_attention_mask`, minus the positions
    holding --exclude-token-ids; None (every position) without either. Where the decoder runs on the
    `labels` shifted right (`decoder_from_labels`): the start position and each one after a label that
    is not -100 (and within a `decoder_attention_mask`)."""
    keep = np.asarray(batch[DECODER_MASK]) != 0 if DECODER_MASK in batch else None
    if DECODER_IDS not in batch and LABELS in batch:  # decoder_from_labels: the labels shifted right
        real = np.asarray(batch[LABELS]) != IGNORE_INDEX
        shifted = np.concatenate([np.ones_like(real[:, :1]), real[:, :-1]], axis=1)  # the start token counts
        if keep is not None and keep.shape != shifted.shape:
            raise UserError(f"{DECODER_MASK!r} and {LABELS!r} have different shapes")
        return shifted if keep is None else keep & shifted
    if spec is not None and spec.exclude_token_ids:
        ids = np.asarray(batch[DECODER_IDS])
        drop = np.isin(ids, np.asarray(spec.exclude_token_ids, dtype=ids.dtype))
        keep = ~drop if keep is None else keep & ~drop
    if keep is not None and keep.shape != np.asarray(batch[DECODER_IDS]).shape:
        raise UserError(f"{DECODER_MASK!r} and {DECODER_IDS!r} have different shapes")
    return keep


class OutputArrays(list):
    """A model's output arrays for one batch, with each one's name in `names` (the key of a dict-like
    output, transformers' ModelOutput; "" otherwise)."""

    names: tuple[str, ...] = ()
    # a speech encoder's: the [batch, audio] mask -> its frames' [batch, frames] mask (None: not one)
    to_frames = None


def output_keep(
    name: str, keep: np.ndarray | None, decoder_keep: np.ndarray | None, decoder_fed: bool
) -> np.ndarray | None:
    """The positions of output `name` that count: an encoder-decoder fed its own decoder tokens
    computes its `encoder_*` outputs on the encoder's tokens (`keep`) and the others on the decoder's
    (`decoder_keep`; None: every position)."""
    if not decoder_fed or name.startswith("encoder_"):
        return keep
    return decoder_keep
