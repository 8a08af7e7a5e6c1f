"""What a loader returns: the model ready to run a batch, whatever the file format was."""

from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LoadOptions:
    path: str
    arch: str | None = None
    trust_pickle: bool = False
    device: str = "cpu"
    dtype: str | None = None  # --dtype: model folders are loaded in it (others are cast after loading)
    device_map: str | None = None  # --device-map (model folders, through accelerate)
    max_memory: str | None = None  # --max-memory with --device-map: "0=20GiB,cpu=64GiB"
    weights_key: str | None = None  # --weights-key: the checkpoint dict's key that holds the weights


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, shape (None for a dynamic axis), dtype name ('float32', 'int64', …)."""

    name: str
    shape: tuple[int | None, ...] | None = None
    dtype: str | None = None


@dataclass
class LoadedModel:
    path: Path
    format: str  # one of report.model.MODEL_FORMATS
    digest: str | Future  # sha256 of the file, computed in the background while the scan runs
    backend: str  # "torch" or "onnx"
    runnable: Any  # nn.Module / ScriptModule / GraphModule / onnx ModelProto
    kind: str  # "eager", "torchscript", "exported", "onnx"
    inputs: list[InputSpec] = field(default_factory=list)
    # every argument name forward() accepts by keyword (eager models): data arrays named so are passed by name
    keyword_inputs: tuple[str, ...] = ()
    float_dtype: str = "float32"
    channels_last: bool = False  # --channels-last: 4-D inputs are converted to NHWC too
    fixed_batch: int | None = None  # graphs exported with a static batch size
    # integer/bool data arrays the model takes as floats (uint8 images): fed as float_dtype, not int64
    float_fed: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return self.digest.result() if isinstance(self.digest, Future) else self.digest


_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deadrelu-sha256")


def file_sha256_async(path: str | Path) -> Future:
    """sha256 of a file in a background thread (hashlib releases the GIL), overlapping the scan."""
    return _HASHER.submit(file_sha256, path)


def bytes_sha256_async(raw: bytes) -> Future:
    """sha256 of bytes held in memory, in the background: the hash of exactly what was read (a file
    written over after the read cannot give the report another file's hash)."""
    return _HASHER.submit(lambda: hashlib.sha256(raw).hexdigest())


class StreamingSha256:
    """sha256 of several chunks (a model file, then the external data it reads) hashed in order in the
    background as they are handed over; at most a few chunks wait, so memory stays near one chunk."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._pending: list[Future] = []

    def update(self, chunk: bytes) -> None:
        self._pending.append(_HASHER.submit(self._digest.update, chunk))  # one worker: in order
        while len(self._pending) > 2:
            self._pending.pop(0).result()

    def hexdigest_async(self) -> Future:
        self._pending.clear()
        return _HASHER.submit(self._digest.hexdigest)


def reread_verified(path: str | Path, sha256: str) -> bytes | None:
    """The file's bytes read again, or None when they are no longer those whose hash is SHA256 (the file
    was replaced while the scan ran): a caller then falls back to what it holds in memory."""
    try:
        raw = Path(path).read_bytes()
    except OSError:
        return None
    return raw if hashlib.sha256(raw).hexdigest() == sha256 else None


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
