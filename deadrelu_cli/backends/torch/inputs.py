"""Torch input plumbing: batches as tensors on the device, dtype and memory-format options, hints."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from deadrelu_cli.calibration import CalibrationData
from deadrelu_cli.errors import UserError
from deadrelu_cli.inputs import AUDIO_INPUTS, OutputArrays, layout_advice, unbatched_advice
from deadrelu_cli.loaders.model import LoadedModel
from deadrelu_cli.options import DTYPE_NAMES


def first_layer_hint(model: LoadedModel, data: CalibrationData) -> str | None:
    """After the first batch failed: when the model's first registered parametrised layer is a Linear or
    Conv that the data does not fit, say so (a guess — registration order is not always execution
    order — so it only words an error that has already happened, never refuses a model that runs)."""
    from torch import nn

    if model.kind != "eager" or len(data.sources) != 1:
        return None
    first = next(
        (m for m in model.runnable.modules() if any(True for _ in m.parameters(recurse=False))),
        None,
    )
    shape = data.sources[0].shape
    if isinstance(first, nn.Linear) and len(shape) >= 2 and shape[-1] != first.in_features:
        return f"{data.path}: samples have {shape[-1]} features (shape {list(shape)}) but the model's first Linear expects {first.in_features}"
    rank = {nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5}.get(type(first))
    if rank and len(shape) == rank - 1 and shape[0] == first.in_channels:
        return f"{data.path}: {unbatched_advice(shape)}"
    if rank and len(shape) == rank and shape[1] != first.in_channels:
        advice = layout_advice(shape, (None, first.in_channels, None, None))
        return f"{data.path}: samples have {shape[1]} channels (shape {list(shape)}) but the model's first Conv expects {first.in_channels}{advice}"
    return None


def position_hint(model: LoadedModel, batch: dict[str, np.ndarray], order: list[str]) -> str | None:
    """After the first batch failed: when its token arrays are longer than the positions the model's
    config declares (`max_position_embeddings`, GPT-2's `n_positions`), say so and what to pass."""
    config = getattr(model.runnable, "config", None)
    limit = next(
        (
            v
            for k in ("max_position_embeddings", "n_positions")
            if isinstance(v := getattr(config, k, None), int)
        ),
        None,
    )
    lengths = [batch[name].shape[1] for name in order if name.endswith("input_ids") and batch[name].ndim == 2]
    if limit is None or not lengths or max(lengths) <= limit:
        return None
    return (
        f"the samples hold {max(lengths)} tokens but the model takes at most {limit} positions "
        f"(max_position_embeddings in its config.json); pass --seq-len {limit} with --text, or cut the --data arrays"
    )


def integer_hint(batch: dict[str, np.ndarray], order: list[str], error: BaseException) -> str | None:
    """After the first batch failed on float data where the model indexes (an Embedding given float
    token ids): name the array and the dtype to save it in."""
    floats = [name for name in order if batch[name].dtype.kind == "f"]
    text = str(error)
    if not floats or not ("indices" in text or "Long, Int" in text or "IntTensor" in text):
        return None
    return (
        f"the model takes integers (token ids, indices) where the data holds floats "
        f"({', '.join(f'{n}: {batch[n].dtype}' for n in floats)}); save them as int64 (x.astype(np.int64))"
    )


def to_tensor(
    array: np.ndarray, float_dtype: str, device: str, channels_last: bool = False, as_float: bool = False
):
    """One batch array as a model input on `device` (`as_float`: integer/bool data the model takes as
    floats, `LoadedModel.float_fed`). Runs in the prefetch thread: on CUDA the batch is
    staged in pinned memory and copied asynchronously, then cast on the GPU, so the copy overlaps the
    model running the previous batch and the host never waits for it."""
    import torch

    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, order="C")  # torch wants writable memory; the batch is small
    if as_float and array.dtype.kind in "biu":
        array = array.astype(np.float32)  # exact for uint8/int8/int16/bool; cast to float_dtype below
    if array.dtype.kind in "iu":
        array = array.astype(np.int64, copy=False)
    tensor = torch.from_numpy(array)
    if device.startswith("cuda"):
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    else:
        tensor = tensor.to(device)
    if array.dtype.kind == "f":
        tensor = tensor.to(getattr(torch, float_dtype))
    if channels_last and tensor.dim() == 4:
        tensor = tensor.contiguous(memory_format=torch.channels_last)
    return tensor


def model_tensors(model: LoadedModel, batch: dict[str, np.ndarray], order: list[str], device: str) -> tuple:
    """A batch's arrays as the model's inputs, in `order` (one conversion for the scan, its batch
    sizing, torch.export's example and a fix's comparison)."""
    return tuple(
        to_tensor(batch[name], model.float_dtype, device, model.channels_last, name in model.float_fed)
        for name in order
    )


# integer arrays that are token ids or masks by their name: fed as int64, never probed as images
_INTEGER_NAMES = ("input_ids", "mask", "token_type_ids", "position_ids", "labels")


def detect_float_fed(model: LoadedModel, data: CalibrationData, order: list[str], device: str) -> None:
    """Integer or bool data (uint8 images, 0/1 features) for a model that computes in floats: the first
    sample is run as int64 (token ids, indices) and, when that fails, with those arrays as floats; if
    that runs, they are fed as floats from then on (`model.float_fed`), with the note an ONNX scan
    gives. Nothing is counted here (no probe is attached yet)."""
    import torch

    sources = {s.name: s for s in data.sources}
    candidates = tuple(
        name
        for name in order
        if np.dtype(sources[name].dtype).kind in "biu" and not any(t in name for t in _INTEGER_NAMES)
    )
    one = next(data.batches(1), None) if candidates else None
    if one is None:  # nothing to decide, or no sample here (a rank whose shard is empty)
        return

    def runs() -> bool:
        args, kwargs = model_call(model, order, model_tensors(model, one, order, device))
        try:
            with torch.inference_mode():
                model.runnable(*args, **kwargs)
        except Exception:  # noqa: BLE001 - any failure: the scan's first batch says what is wrong
            return False
        return True

    if runs():
        return
    model.float_fed = candidates
    if not runs():
        model.float_fed = ()  # not a dtype problem: the scan's first batch says what is wrong
        return
    for name in candidates:
        model.notes.append(
            f"input {name}: data {np.dtype(sources[name].dtype).name} converted to the model's {model.float_dtype} "
            "as raw values (no scaling); if the model expects normalised inputs, normalise the data first"
        )


def model_call(model: LoadedModel, order: list[str], tensors: tuple) -> tuple[tuple, dict]:
    """(args, kwargs) for forward(): by name when the arrays name its arguments (inputs.by_keyword),
    one dict per input for INPUT.KEY arrays (inputs.dict_groups), else in order."""
    from deadrelu_cli.inputs import by_keyword, dict_groups

    if by_keyword(model, order):
        return (), dict(zip(order, tensors, strict=True))
    groups = dict_groups(model, order)
    if groups:
        return tuple(_grouped(groups[spec.name], tensors) for spec in model.inputs), {}
    return tensors, {}


def _grouped(group: list[tuple[str, int]], tensors: tuple):
    """One input's INPUT.KEY arrays: a tuple when the keys are 0, 1, … (`inputs.0`, `inputs.1` for a
    `forward(self, inputs)` that unpacks `x, lengths = inputs`), else a dict by key."""
    keys = sorted(key for key, _ in group)
    if all(key.isdigit() for key in keys) and sorted(int(key) for key in keys) == list(range(len(keys))):
        return tuple(tensors[index] for _, index in sorted(group, key=lambda item: int(item[0])))
    return {key: tensors[index] for key, index in group}


def example_inputs(
    model: LoadedModel, data: CalibrationData, order: list[str], device: str, samples: int | None = None
) -> tuple:
    """The first (up to) two samples, or `samples` (a static batch), as model inputs: what torch.export
    traces with."""
    first = next(data.batches(min(samples or 2, data.samples)))
    return model_tensors(model, first, order, device)


def apply_channels_last(model: LoadedModel, enabled: bool) -> None:
    """--channels-last: NHWC memory format for the model's 4-D weights and inputs (what cuDNN and
    oneDNN run fastest, above all in bf16). The probe reduces such activations as [N*H*W, C] views."""
    if not enabled:
        return
    import torch

    if not hasattr(model.runnable, "to") or model.kind == "torchscript":  # ONNX is refused by run_scan
        raise UserError("--channels-last needs an nn.Module or a .pt2 program, not TorchScript")
    model.runnable = model.runnable.to(memory_format=torch.channels_last)
    model.channels_last = True


def apply_dtype(model: LoadedModel, dtype: str | None) -> None:
    """--dtype: run a torch model in bf16/fp16 (or fp32)."""
    if not dtype:
        return
    import torch

    names = DTYPE_NAMES
    if dtype not in names:
        raise UserError(f"--dtype {dtype!r}: choose bf16, fp16 or fp32")
    if model.backend != "torch":
        raise UserError("--dtype applies to torch models; an ONNX model runs in the types of its graph")
    if model.format != "hf_folder":  # a model folder was loaded in this dtype already
        model.runnable = model.runnable.to(getattr(torch, names[dtype]))
    model.float_dtype = names[dtype]
    if names[dtype] != "float32":
        model.notes.append(
            f"ran in {names[dtype]}: values within rounding of the threshold may count differently than in float32"
        )


def cuda_sample_cost(model: LoadedModel, data: CalibrationData, order: list[str], device: str):
    """For --batch-size auto on CUDA: () -> (peak bytes of one sample, half the free memory)."""

    def measure() -> tuple[int, int]:
        import torch

        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        one = next(data.batches(1))
        tensors = model_tensors(model, one, order, device)
        args, kwargs = model_call(model, order, tensors)
        with torch.inference_mode():
            model.runnable(*args, **kwargs)
        free, _total = torch.cuda.mem_get_info()
        return max(1, torch.cuda.max_memory_allocated() - before), free // 2

    return measure if device.startswith("cuda") else None


def speech_frames(runnable, for_sites: bool = False) -> tuple[str, object] | None:
    """Speech encoders (wav2vec2, HuBERT, WavLM, Data2VecAudio, …) take an attention_mask over the raw
    audio samples but run their transformer on frames, which that mask does not fit: (the encoder's
    module path, a function from the samples' mask to the frames'), using the library's own mapping
    (the frames the model itself treats as padding); None for other models. The scan and `watch()`
    both scope the encoder's sites to the frames' mask with it. `for_sites`: the mask of the positions
    the encoder's sites run on, which SEW / SEW-D squeeze: their transformer runs on the frames
    average-pooled by `squeeze_factor`, with the frames' mask max-pooled alike (a squeezed position is
    real when any frame it pools is: the model's own mask)."""
    import torch

    to_frames = getattr(runnable, "_get_feature_vector_attention_mask", None)
    frame_count = getattr(runnable, "_get_feat_extract_output_lengths", None)
    encoder = getattr(getattr(runnable, "base_model", None), "encoder", None)
    if not (callable(to_frames) and callable(frame_count) and isinstance(encoder, torch.nn.Module)):
        return None
    path = next((name for name, module in runnable.named_modules() if module is encoder and name), None)
    if path is None:
        return None
    squeeze = getattr(getattr(encoder, "config", None), "squeeze_factor", 1)
    if not (
        for_sites
        and isinstance(getattr(encoder, "pool", None), torch.nn.AvgPool1d)
        and isinstance(squeeze, int)
    ):
        squeeze = 1

    def frames_of(kept: torch.Tensor) -> torch.Tensor:
        count = int(frame_count(torch.tensor(kept.shape[1])))
        frames = to_frames(count, kept.long()).bool()
        if squeeze > 1:
            pooled = torch.nn.functional.max_pool1d(frames.float().unsqueeze(1), squeeze, squeeze)
            frames = pooled.squeeze(1) > 0
        return frames

    return path, frames_of


def torch_runner(loaded: LoadedModel, order: list[str], device: str):
    """batch -> list of output arrays (a fix compares the model before and after)."""
    import torch

    # a speech encoder fed audio (or frames) and a mask over them runs on fewer frames: its outputs'
    # positions are the frames the model itself treats as real (`OutputArrays.to_frames`)
    frames = speech_frames(loaded.runnable) if any(name in order for name in AUDIO_INPUTS) else None

    def to_frames(keep: np.ndarray) -> np.ndarray:
        import torch

        return frames[1](torch.from_numpy(keep)).cpu().numpy()

    def run(batch: dict[str, np.ndarray]) -> list[np.ndarray]:
        inputs = tuple(
            to_tensor(batch[name], loaded.float_dtype, device, as_float=name in loaded.float_fed)
            for name in order
        )
        args, kwargs = model_call(loaded, order, inputs)
        with torch.inference_mode():
            out = loaded.runnable(*args, **kwargs)
        # a dict-like output (transformers' ModelOutput) keeps each array's key: an encoder-decoder's
        # `encoder_*` outputs run on the encoder's tokens, the rest on the decoder's
        parts = list(out.items()) if isinstance(out, Mapping) else [("", out)]
        arrays, names = OutputArrays(), []
        for key, value in parts:
            for leaf in torch.utils._pytree.tree_leaves(value):
                if isinstance(leaf, torch.Tensor):
                    arrays.append(leaf.detach().float().cpu().numpy())
                    names.append(str(key))
        arrays.names = tuple(names)
        arrays.to_frames = to_frames if frames is not None else None
        return arrays

    return run


def cpu_activation_bytes(model: LoadedModel, data: CalibrationData, order: list[str], device: str):
    """For --batch-size auto on CPU: () -> bytes of every tensor one sample's forward pass creates (an
    upper bound of what a batch holds per sample), or None when it cannot be measured (TorchScript,
    or the sample fails: the scan's first batch then reports the error)."""
    if device.startswith("cuda") or model.kind == "torchscript":
        return None

    def measure() -> int | None:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        total = 0

        class Sizes(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                nonlocal total
                out = func(*args, **(kwargs or {}))
                for leaf in torch.utils._pytree.tree_leaves(out):
                    if isinstance(leaf, torch.Tensor):
                        total += leaf.numel() * leaf.element_size()
                return out

        one = next(data.batches(1))
        tensors = model_tensors(model, one, order, device)
        args, kwargs = model_call(model, order, tensors)
        try:
            with torch.inference_mode(), Sizes():
                model.runnable(*args, **kwargs)
        except Exception:  # noqa: BLE001 - the scan's first batch says what is wrong
            return None
        return total

    return measure
