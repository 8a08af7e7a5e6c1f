"""What a scan is asked to do: the options every command and the Python API build, in one place."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from deadrelu_cli.errors import UserError
from deadrelu_cli.probe.ops import DEFAULT_OPS

ProgressCallback = Callable[[int, int], None]  # (samples done, samples total)

# --dtype spellings -> torch dtype names (one table for the model-folder loader and apply_dtype)
DTYPE_NAMES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "fp32": "float32",
    "float32": "float32",
}


@dataclass
class ScanOptions:
    model: str
    data: str | None
    arch: str | None = None
    trust_pickle: bool = False
    weights_key: str | None = None  # the checkpoint dict's key that holds the weights (None: found)
    batch_size: int | str = "auto"  # or a positive int
    batch_size_explicit: bool = False  # given by the user: a graph's fixed batch does not replace it
    limit: int | None = None
    device: str = "auto"
    threshold: float = 0.0
    dying: float = 0.01
    tau: float = 0.1
    channel_dim: int | None = None
    ops: tuple[str, ...] = DEFAULT_OPS
    allow_nonfinite: bool = False
    compile: bool = False  # counting inside the graph, through torch.compile
    dtype: str | None = None  # run the model in bf16 / fp16 / fp32
    channels_last: bool = False  # run conv models (and 4-D inputs) in channels_last memory format
    consts: tuple[str, ...] = ()  # arrays fed whole to every batch
    batch_axes: dict[str, int] = field(default_factory=dict)  # arrays whose samples are not on axis 0
    distributed: bool = False  # under torchrun: scan this rank's shard, all_reduce the counts
    explain: bool = False  # the cause of each dead unit, and what to do
    certify: bool = False  # data-free bounds: which units can never fire over the input box
    input_range: tuple[float, float] | str | None = None  # (LO, HI) or "auto" (min/max of the data)
    input_shape: str | None = None  # one sample's shape when neither the model nor the data gives it
    mask: str | None = (
        None  # array of --data whose nonzero positions count ("none": every position; None: attention_mask if present)
    )
    exclude_token_ids: tuple[int, ...] = ()  # positions holding these input_ids do not count (e.g. BOS)
    text: str | None = (
        None  # --text FILE: documents tokenized with the model folder's tokenizer (instead of --data)
    )
    text_field: str = "text"  # JSONL key of the document text
    seq_len: int = 128  # --text: tokens per sample (longer documents are truncated)
    text_packing: str = "pad"  # --text: "pad" (a document per sample) or "pack" (EOS-joined --seq-len blocks)
    device_map: str | None = None  # --device-map for model folders (accelerate): auto, cpu, …
    max_memory: str | None = None  # --max-memory for --device-map: the most each device holds
    progress: ProgressCallback | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_finite("--threshold", self.threshold)
        check_finite("--dying", self.dying, 0.0, 1.0)
        check_finite("--tau", self.tau, 0.0)
        if not isinstance(self.batch_size, str) and (
            isinstance(self.batch_size, bool) or self.batch_size < 1
        ):
            raise UserError(f"--batch-size {self.batch_size}: must be at least 1 (or auto)")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit {self.limit}: must be at least 1")
        if self.text_packing not in ("pad", "pack"):
            raise UserError(f"--text-packing {self.text_packing!r}: choose pad or pack")


def check_finite(flag: str, value, low: float | None = None, high: float | None = None) -> None:
    """Exit 2 unless VALUE is a finite number within [LOW, HIGH] (NaN slips through plain comparisons)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{flag} {value!r}: give a number") from None
    if not math.isfinite(number):
        raise UserError(f"{flag} {value}: give a finite number")
    if low is not None and number < low or high is not None and number > high:
        bounds = f"in [{low:g}, {high:g}]" if high is not None else f"at least {low:g}"
        raise UserError(f"{flag} {value}: must be {bounds}")
