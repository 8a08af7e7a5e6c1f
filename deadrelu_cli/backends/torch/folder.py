"""Write a patched model back as a Hugging Face model folder, in the source folder's own layout.

Every file that is not a weight file (config.json, generation_config.json, tokenizer files, README)
is copied; the weights go into safetensors files with the source's tensor names and the source's
sharding (the same tensors in the same shard names, the same index), in the source's dtypes. A
source stored as pytorch_model.bin gets transformers' own safetensors layout (save_pretrained).
"""

from __future__ import annotations

from pathlib import Path

import torch

from deadrelu_cli.errors import UserError
from deadrelu_cli.files import copy_folder_file, copyable_reason
from deadrelu_cli.loaders.hf_folder import WEIGHT_INDEXES, weight_files


def _lookup(state: dict[str, torch.Tensor], key: str, prefix: str) -> torch.Tensor | None:
    """A source tensor name in the model's state_dict (a base-model checkpoint inside a *For* class
    carries no `prefix.`; a *For* checkpoint read into a base model carries one too many)."""
    if key in state:
        return state[key]
    if prefix and f"{prefix}.{key}" in state:
        return state[f"{prefix}.{key}"]
    if prefix and key.startswith(f"{prefix}.") and key[len(prefix) + 1 :] in state:
        return state[key[len(prefix) + 1 :]]
    return None


def _is_weight_file(path: Path) -> bool:
    return path.name in WEIGHT_INDEXES or (
        path.suffix in (".safetensors", ".bin") and path.name.startswith(("model", "pytorch_model"))
    )


def write_model_folder(model: torch.nn.Module, source: Path, out: Path) -> list[str]:
    """Fill the (empty) folder `out`; returns notes for the fix result."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    source, out = Path(source), Path(out)
    notes = []
    for path in sorted(source.iterdir()):
        if path.is_file() and not _is_weight_file(path):
            skipped = copy_folder_file(path, out / path.name, source)
            if skipped:
                notes.append(skipped)
    files = weight_files(source)
    if any(f.suffix != ".safetensors" for f in files):
        model.save_pretrained(out, safe_serialization=True)
        copy_folder_file(
            source / "config.json", out / "config.json", source
        )  # the source's, not save_pretrained's
        return [
            *notes,
            "the source held pytorch_model.bin: weights written as safetensors by save_pretrained",
        ]
    state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "") or ""
    for file in files:
        tensors = {}
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {"format": "pt"}
            for key in handle.keys():
                value = _lookup(state, key, prefix)
                if value is None:
                    raise UserError(
                        f"{file}: tensor {key!r} has no counterpart in the loaded model; cannot write the folder "
                        "in the source's layout"
                    )
                dtype = handle.get_slice(key).get_dtype()
                stored = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(dtype)
                value = value.detach()
                if stored is not None and value.is_floating_point():
                    value = value.to(stored)
                tensors[key] = value.to("cpu", copy=True).contiguous()  # own memory: tied tensors too
        save_file(tensors, str(out / file.name), metadata=metadata)
    for index in WEIGHT_INDEXES:
        if (source / index).is_file():
            reason = copyable_reason(source / index, source)
            if reason is not None:
                raise UserError(f"{source / index}: {reason}; the folder cannot be written in its layout")
            copy_folder_file(source / index, out / index, source)
    return notes
