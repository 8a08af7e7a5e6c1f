"""Resume-safe fixes of training checkpoints: the fixed weights go back where they came from, the
optimizer moments of the rewritten entries are reset, everything else is kept as it was.

Layouts: one file holding a dict (`{"model": …, "optimizer": …, "epoch": …}`, Lightning's `.ckpt` with
`state_dict` and `optimizer_states`), or a Hugging Face Trainer checkpoint folder (`model.safetensors` /
`pytorch_model.bin` with `optimizer.pt`, `scheduler.pt`, `trainer_state.json`, … beside it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deadrelu_cli.backends.torch.optimizer_state import (
    find_optimizer_states,
    map_parameters,
    optimizer_for,
    reset_moments,
)
from deadrelu_cli.errors import UserError
from deadrelu_cli.files import check_companion_free, copyable_reason, temp_path_for
from deadrelu_cli.loaders.companions import HF_OPTIMIZER_FILE, OPTIMIZER_FILES
from deadrelu_cli.loaders.torch_models import (
    load_checkpoint_weights,
    strip_wrapper_prefixes,
    torch_load,
    weight_dicts,
    weights_key,
)

RESETTING_STRATEGIES = ("reinit", "kick", "bias-shift")  # every strategy that rewrites entries in place


@dataclass
class TrainingCheckpoint:
    """A checkpoint that holds more than weights: what to write back, and where its optimizer is."""

    path: Path
    checkpoint: Any  # the whole object of the weights file (None: a safetensors weights file)
    weights_key: str | None  # where its weights are (None: at the top level)
    optimizer_file: Path | None = None  # Hugging Face: optimizer.pt beside the weights
    optimizer_file_state: dict | None = None
    notes: list[str] = field(default_factory=list)
    # --weights-key chose one of several weight dicts: an optimizer state that does not fit its
    # architecture is another weight dict's (a GAN's D optimizer when G is fixed), kept as it was
    chosen_among_several: bool = False
    foreign: list[tuple] = field(default_factory=list)  # where those optimizer states are

    def optimizers(self) -> list[tuple[tuple, dict]]:
        if self.optimizer_file_state is not None:
            return [((), self.optimizer_file_state)]
        return find_optimizer_states(self.checkpoint)


def read_training_checkpoint(
    path: Path, fmt: str, trust_pickle: bool, chosen: str | None = None
) -> TrainingCheckpoint | None:
    """The checkpoint's extra content, or None when the file is weights only (and no optimizer file,
    the Trainer's optimizer.pt or accelerate's optimizer.bin, is beside it). A checkpoint dict holding
    several weight dicts (a model and its EMA copy, a GAN's G and D) is fixed only under the one the user
    names (`chosen`, --weights-key): fixing one and writing the others back unfixed is never guessed."""
    checkpoint = None
    if fmt == "state_dict":
        checkpoint, unread = load_checkpoint_weights(path, "cpu", trust_pickle)  # checked when loaded
        if unread:  # placeholders written back would replace the user's hyper-parameters
            shown = ", ".join(unread[:3]) + (", …" if len(unread) > 3 else "")
            raise UserError(
                f"{path}: fix writes the checkpoint back with its other entries as they were, and these hold "
                f"objects of classes deadrelu does not unpickle ({shown}); pass --trust-pickle to keep them "
                "(it can run code), or fix the state_dict saved alone"
            )
        several = weight_dicts(checkpoint)
        if len(several) > 1 and chosen is None:
            raise UserError(
                f"{path}: the checkpoint holds {len(several)} weight dicts ({', '.join(map(repr, several))}); "
                "pass --weights-key NAME to fix one of them (the others are written back as they are)"
            )
    beside, optimizer_file_state = None, None
    for name in OPTIMIZER_FILES:
        candidate = path.parent / name
        if candidate.is_file() and candidate.resolve() != path.resolve():
            state = torch_load(candidate, "cpu", trust_pickle)
            if find_optimizer_states(state):
                beside, optimizer_file_state = candidate, state
                break
    wraps = isinstance(checkpoint, Mapping) and (
        weights_key(checkpoint, chosen) is not None
        or not all(isinstance(v, torch.Tensor) for v in checkpoint.values())
    )
    if not wraps and optimizer_file_state is None:
        return None
    return TrainingCheckpoint(
        path,
        checkpoint if wraps else None,
        weights_key(checkpoint, chosen) if wraps else None,
        beside,
        optimizer_file_state,
        chosen_among_several=chosen is not None and len(weight_dicts(checkpoint)) > 1,
    )


def _fixed_weights(original: Mapping, model: nn.Module) -> dict:
    """The original weight dict, same keys and order, with the architecture's tensors taken from `model`."""
    fixed = model.state_dict()
    by_arch_name = strip_wrapper_prefixes({k: k for k in original}, set(fixed))  # arch name -> original key
    original_key = {v: k for k, v in by_arch_name.items()}
    out = {}
    for key, value in original.items():
        name = original_key.get(key, key)
        if isinstance(value, torch.Tensor) and name in fixed:
            out[key] = fixed[name].detach().to(device=value.device, dtype=value.dtype).clone()
        else:
            out[key] = value
    return out


def _reset_all(
    training: TrainingCheckpoint | None, states: list[tuple[tuple, dict]], model: nn.Module, touched: dict
) -> list[str]:
    notes = []
    for where, state in states:
        try:
            mapping = map_parameters(state, model)
        except UserError:
            if training is None or not training.chosen_among_several:
                raise
            training.foreign.append(where)
            notes.append(
                f"{'/'.join(map(str, where))}: does not fit the weights under {training.weights_key!r} "
                "(another weight dict's optimizer): kept as it was"
            )
            continue
        reset, unknown = reset_moments(state, mapping, touched)
        if training is None:
            label = HF_OPTIMIZER_FILE
        elif training.optimizer_file is not None:
            label = training.optimizer_file.name
        else:
            label = "/".join(map(str, where))
        notes.append(
            f"{label}: moments of the rewritten entries reset in {reset} parameter(s) "
            f"(parameters mapped by {mapping.source}); per-parameter step counts kept"
        )
        if unknown:
            notes.append(f"{label}: optimizer state {', '.join(unknown)} is not a known moment and was kept")
    return notes


def write_training_checkpoint(
    training: TrainingCheckpoint,
    model: nn.Module,
    temp: Path,
    output: Path,
    strategy: str,
    touched: dict,
) -> tuple[list[str], list[tuple[Path, Path]], list[tuple[Path, Path]]]:
    """Write the fixed checkpoint to `temp` (in the layout of the input); returns notes, (temp, final)
    companions to move into place with OUT, and (source, destination) files to copy beside OUT."""
    notes: list[str] = []
    companions: list[tuple[Path, Path]] = []
    copies: list[tuple[Path, Path]] = []
    resetting = strategy in RESETTING_STRATEGIES
    if training.checkpoint is not None:  # one file: weights, optimizer and the rest together
        checkpoint = dict(training.checkpoint)
        if training.weights_key is None:
            checkpoint.update(_fixed_weights({k: v for k, v in checkpoint.items()}, model))
        else:
            checkpoint[training.weights_key] = _fixed_weights(checkpoint[training.weights_key], model)
            kept = [k for k in weight_dicts(checkpoint) if k != training.weights_key]
            if kept:  # --weights-key chose one of several
                notes.append(
                    f"fixed the weights under {training.weights_key!r}; {', '.join(map(repr, kept))} written back "
                    "as they were (fix each with its own --weights-key)"
                )
        states = find_optimizer_states(checkpoint)
        if resetting and states:
            notes += _reset_all(training, states, model, touched)
        elif states:
            notes.append(f"--strategy {strategy}: the optimizer state was kept as it was")
        torch.save(checkpoint, temp)
        notes.append("every other entry of the checkpoint was kept as it was")
    if training.optimizer_file is not None:  # optimizer.pt (Trainer) / optimizer.bin (accelerate) beside
        name = training.optimizer_file.name
        folder = output.parent if str(output.parent) else Path(".")
        if folder.resolve() == training.optimizer_file.parent.resolve():
            raise UserError(
                f"--output {output}: the checkpoint's {name} would be overwritten beside it; "
                "write the fixed checkpoint into another folder"
            )
        check_companion_free(folder / name, output)
        state = training.optimizer_file_state
        if resetting:
            notes += _reset_all(training, [((), state)], model, touched)
        companion = temp_path_for(folder / name)  # a fresh file (mkstemp), never a link
        torch.save(state, companion)
        companions.append((companion, folder / name))
        skip = {training.path.name, name, output.name}
        source = training.optimizer_file.parent
        others = sorted(f.name for f in source.glob("optimizer_*.bin"))
        if others:  # accelerate's further optimizers (of further models): not this model's
            notes.append(f"{', '.join(others)}: another model's optimizer (accelerate), copied as it was")
        for item in sorted(source.iterdir()):
            destination = folder / item.name  # never through a link, never over a file
            if (
                item.is_file()
                and item.name not in skip
                and not destination.exists()
                and not destination.is_symlink()
            ):
                reason = copyable_reason(item, source)  # never a link out of the checkpoint's folder
                if reason is None:
                    copies.append((item, folder / item.name))
                else:
                    notes.append(
                        f"{item.name} not copied beside {output.name}: {reason}; copy it yourself if you trust it"
                    )
        if copies:
            notes.append(
                f"copied beside {output.name}: {', '.join(dst.name for _, dst in copies)} (resume from {folder})"
            )
    return notes, companions, copies


def reset_folder_optimizer(
    source: Path, out: Path, model: nn.Module, strategy: str, touched: dict, trust_pickle: bool
) -> tuple[list[str], list[dict]]:
    """A Hugging Face Trainer `checkpoint-N/` folder fixed as a model folder: its `optimizer.pt` (already
    copied into `out` with the folder's other files) is written again with the moments of the rewritten
    entries reset. Returns notes and the optimizer states written (none: no optimizer.pt)."""
    file = Path(source) / HF_OPTIMIZER_FILE
    if not file.is_file() or copyable_reason(file, Path(source)) is not None:
        return [], []  # (a link out of the folder was not copied either, and said so)
    checkpoint = torch_load(file, "cpu", trust_pickle)
    states = find_optimizer_states(checkpoint)
    if not states:
        return [], []
    if strategy not in RESETTING_STRATEGIES:
        return [f"--strategy {strategy}: {HF_OPTIMIZER_FILE} was copied as it was"], [s for _, s in states]
    notes = _reset_all(None, states, model, touched)
    target = Path(out) / HF_OPTIMIZER_FILE
    temp = temp_path_for(target)
    torch.save(checkpoint, temp)
    temp.replace(target)
    notes.append("the folder's other files (scheduler, trainer state, RNG states, …) copied as they were")
    return notes, [s for _, s in states]


def resume_check(loaded, optimizer_states: list[dict], steps: int) -> None:
    """Load each written optimizer state (a GAN's two, …) into an optimizer of its kind over
    `loaded.runnable` and take `steps` steps of all of them with zero gradients: the updates the stored
    moments make on their own when training resumes (zero after a reset). The caller rescans the model
    afterwards."""
    model = loaded.runnable
    optimizers = [optimizer_for(state, model, map_parameters(state, model)) for state in optimizer_states]
    for _ in range(steps):
        for parameter in model.parameters():
            parameter.grad = torch.zeros_like(parameter)
        for optimizer in optimizers:
            optimizer.step()
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
