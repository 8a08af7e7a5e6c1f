"""Calibration data: .npz / .npy / .pt / .safetensors -> a stream of batches (numpy arrays).

First axis = samples. Nothing is read whole that can be streamed: .npy is read batch by batch, .npz
members are read row-block by row-block from the zip stream, safetensors by slices. Pickles are
never allowed (numpy allow_pickle=False, torch weights_only=True).
"""

from __future__ import annotations

import tokenize
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from deadrelu_cli.errors import UserError
from deadrelu_cli.loaders.detect import check_readable_file, check_torch_file, refuse_ambiguous_names
from deadrelu_cli.memory import check_fits_in_memory
from deadrelu_cli.report.fingerprint import SampleSketch

# PyTorch's nn.Transformer* / nn.MultiheadAttention key padding masks: nonzero (True, or an additive
# -inf) marks padding, 0 a real token; their -inf is data, not a non-finite value
PADDING_MASK_SUFFIX = "key_padding_mask"

NUMERIC_KINDS = "biuf"  # bool, int, unsigned, float


class NotData(UserError):
    """A file of a data suffix that holds no arrays of samples: an optimizer state, a training
    checkpoint, a model's weights. Refused when named; a --data FOLDER leaves it out with a note."""

    def __init__(self, path, what: str) -> None:
        self.what = what
        super().__init__(
            f"{path}: {what}, not calibration data; give the data file(s): a tensor or a dict of tensors "
            "with samples on the first axis"
        )


class ArraySource(Protocol):
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    def rows(self, start: int, stop: int) -> np.ndarray: ...

    def whole(self) -> np.ndarray: ...


@dataclass
class InMemorySource:
    name: str
    array: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def rows(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.array[start:stop])

    def whole(self) -> np.ndarray:
        return np.asarray(self.array)


class NpzMemberSource:
    """One array inside an .npz, read sequentially from the (possibly compressed) zip member."""

    def __init__(self, path: Path, member: str, name: str) -> None:
        self.path, self.member, self.name = path, member, name
        try:
            with zipfile.ZipFile(path) as archive, archive.open(member) as stream:
                self.shape, fortran, self.dtype = _read_npy_header(stream, f"{path}:{name}")
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:  # e.g. a damaged local header
            raise UserError(f"{path}: array {name!r} is damaged ({exc}); re-create the .npz") from None
        self.fortran = fortran and len(self.shape) > 1  # rows are not contiguous: read whole (_open_npz)
        self._row_bytes, declared = _row_and_total_bytes(self.shape, self.dtype)
        self.declared_bytes = declared
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(member)
            stored, self.compressed = info.file_size, info.compress_size
        if declared > stored:  # a header promising more data than the member holds (or a bomb of a shape)
            raise UserError(
                f"{path}: array {name!r} declares shape {list(self.shape)} but holds only {stored} bytes; the file is damaged"
            )
        self._archive = None
        self._stream = None
        self._position = 0

    def rows(self, start: int, stop: int) -> np.ndarray:
        if self._stream is None or start < self._position:
            self.close()
            self._archive = zipfile.ZipFile(self.path)
            self._stream = self._archive.open(self.member)
            _read_npy_header(self._stream, self.name)
            self._position = 0
        if start > self._position:
            self.rows(self._position, start)  # skip forward through the stream
        count = stop - start
        try:
            raw = self._stream.read(count * self._row_bytes)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
            self.close()
            raise UserError(
                f"{self.path}: array {self.name!r} is damaged ({exc}); re-create the .npz"
            ) from None
        if len(raw) != count * self._row_bytes:
            raise UserError(f"{self.path}: array {self.name!r} is truncated (the file is damaged)")
        self._position = stop
        return np.frombuffer(raw, dtype=self.dtype).reshape((count, *self.shape[1:]))

    def whole(self) -> np.ndarray:
        check_fits_in_memory(self.shape, self.dtype, f"{self.path}: array {self.name!r}")
        try:
            with zipfile.ZipFile(self.path) as archive, archive.open(self.member) as stream:
                return np.lib.format.read_array(stream, allow_pickle=False)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as exc:
            raise UserError(
                f"{self.path}: array {self.name!r} is damaged ({exc}); re-create the .npz"
            ) from None

    def verify_rest(self, chunk: int = 1 << 20) -> None:
        """Read the member to its end: zipfile checks the CRC-32 only there, and a scan that stops early
        (--limit, one rank's shard) must not use damaged rows unnoticed."""
        if self._stream is None:
            return
        try:
            while self._stream.read(chunk):
                pass
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
            raise UserError(
                f"{self.path}: array {self.name!r} is damaged ({exc}); re-create the .npz"
            ) from None
        finally:
            self.close()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._archive.close()
            self._stream = self._archive = None


class NpyFileSource:
    """A .npy file read row block by row block straight into fresh arrays.

    Not a memory map: the pages of a map that the scan touches count towards the process's resident
    memory, so a 10x larger dataset would raise peak RSS by its size. Reading each batch into a fresh
    array keeps memory at one batch (plus the prefetched ones) whatever the file size; the kernel's page
    cache still serves repeated reads."""

    name = "input"

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as handle:
            self.shape, self.fortran, self.dtype = _read_npy_header(handle, str(path))
            self._offset = handle.tell()
        if self.dtype.hasobject:
            raise UserError(
                f"{path}: cannot read .npy: it holds Python objects (never unpickled); save numeric arrays "
                f"({RAGGED_ADVICE})"
            )
        self._row_bytes, declared = _row_and_total_bytes(self.shape, self.dtype)
        stored = path.stat().st_size - self._offset
        if declared > stored:
            raise UserError(
                f"{path}: declares shape {list(self.shape)} {self.dtype} ({declared} bytes) but holds {stored}; "
                "the file is truncated"
            )

    def rows(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
        wanted = out.nbytes
        view = memoryview(out.reshape(-1).view(np.uint8))
        with open(self.path, "rb", buffering=0) as handle:  # a handle per call: no shared file position
            handle.seek(self._offset + start * self._row_bytes)
            done = 0
            while done < wanted:  # a raw read may return fewer bytes than asked
                got = handle.readinto(view[done:])
                if not got:
                    raise UserError(f"{self.path}: the file ended early (truncated while being read?)")
                done += got
        return out

    def whole(self) -> np.ndarray:
        check_fits_in_memory(self.shape, self.dtype, str(self.path))
        if not self.shape:
            return self.rows(0, 1).reshape(())
        return self.rows(0, self.shape[0])


class SafetensorsSource:
    def __init__(
        self, path: Path, name: str, shape: tuple[int, ...], dtype: np.dtype, bf16_at: int | None = None
    ) -> None:
        self.path, self.name, self.shape, self.dtype = path, name, shape, dtype
        # bf16 (numpy has no such type, safetensors' numpy reader refuses it): the file offset of the
        # tensor's bytes, read here and widened exactly to float32, as bf16 .pt data is
        self.bf16_at = bf16_at

    def rows(self, start: int, stop: int) -> np.ndarray:
        if self.bf16_at is not None:
            return self._bf16_rows(start, stop)
        from safetensors import safe_open

        with safe_open(str(self.path), framework="np") as handle:
            return np.asarray(handle.get_slice(self.name)[start:stop])

    def whole(self) -> np.ndarray:
        if self.bf16_at is not None:
            return self._bf16_rows(0, self.shape[0]) if self.shape else self._bf16_rows(0, 1).reshape(())
        from safetensors import safe_open

        with safe_open(str(self.path), framework="np") as handle:
            return handle.get_tensor(self.name)

    def _bf16_rows(self, start: int, stop: int) -> np.ndarray:
        row = int(np.prod(self.shape[1:], dtype=np.int64)) if self.shape else 1
        stop = max(start, min(stop, self.shape[0] if self.shape else 1))
        with open(self.path, "rb") as handle:
            handle.seek(self.bf16_at + 2 * start * row)
            raw = np.frombuffer(handle.read(2 * (stop - start) * row), dtype="<u2")
        wide = (raw.astype(np.uint32) << 16).view(np.float32)  # bf16 is the upper half of a float32
        return wide.reshape((stop - start, *self.shape[1:]))


def _safetensors_data_offsets(path: Path) -> tuple[int, dict]:
    """Where the tensors' bytes start in a safetensors file, and its header (already read by safe_open)."""
    import json

    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return 8 + size, json.loads(handle.read(size))


def _row_and_total_bytes(shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, int]:
    """Bytes per sample (row) and in all, as an .npy header declares them (a scalar is one row)."""
    row = int(np.prod(shape[1:], dtype=object)) * dtype.itemsize if shape else dtype.itemsize
    return row, row * (shape[0] if shape else 1)


def _read_npy_header(stream, label: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    from numpy.lib import format as npy

    try:
        version = npy.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(stream)
        else:
            shape, fortran, dtype = npy.read_array_header_2_0(stream)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, tokenize.TokenError, TypeError) as exc:
        # a damaged header dict: numpy parses it as a Python literal (TokenError when unbalanced)
        raise UserError(f"{label}: not a valid .npy array ({exc})") from None
    return tuple(int(d) for d in shape), bool(fortran), np.dtype(dtype)


@dataclass
class CalibrationData:
    """The arrays of a data file. Batched arrays have samples on `batch_axes[name]` (default 0);
    `consts` are fed whole to every batch (a sample rate, a mask, an initial state)."""

    path: str
    sources: list[ArraySource]
    batch_axes: dict[str, int] = field(default_factory=dict)
    consts: tuple[str, ...] = ()
    window: tuple[int, int] | None = None  # this process's shard of the samples (distributed scans)
    unfed: tuple[str, ...] = ()  # arrays read for counting only (a --mask that is not a model input)
    optional: tuple[str, ...] = ()  # arrays fed only to a model that takes them (--text's tokenizer outputs)
    notes: list[str] = field(default_factory=list)  # what a --data FOLDER read and left out
    # when set, every batch read adds its samples' digests (the report's data fingerprint: which
    # samples were counted, for merge's overlap check); passes that read a sample again add nothing
    sketch: SampleSketch | None = None
    # per sample, the digests that stand for it in that fingerprint instead of its arrays' (a block of
    # packed text: the documents it holds), or None
    sample_digests: list[np.ndarray] | None = None
    # --allow-nonfinite for every pass that does not say (the first sample read to size batches or find
    # dtypes must not refuse what the scan accepts)
    allow_nonfinite: bool = False

    def shard(self, rank: int, world: int, limit: int | None) -> None:
        total = self.samples if limit is None else min(limit, self.samples)
        self.window = (rank * total // world, (rank + 1) * total // world)

    def select(self, first: int, last: int) -> None:
        """Only samples [first, last) from now on (the hold-out part of `fix --holdout`)."""
        self.window = (first, last)

    @property
    def local_samples(self) -> int:
        return self.window[1] - self.window[0] if self.window else self.samples

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def configure(
        self, batch_axes: dict[str, int] | None = None, consts: tuple[str, ...] = ()
    ) -> CalibrationData:
        for name in list(batch_axes or {}) + list(consts):
            if name not in self.names:
                raise UserError(f"{self.path}: no array named {name!r} (arrays: {', '.join(self.names)})")
        self.batch_axes = dict(batch_axes or {})
        self.consts = tuple(consts)
        batched = self._batched()
        if not batched:
            raise UserError(f"{self.path}: every array is --const; at least one must hold samples")
        counts = {}
        for source in batched:
            axis = self.batch_axes.get(source.name, 0)
            if len(source.shape) == 0:
                raise UserError(
                    f"{self.path}: array {source.name!r} is a scalar; the first axis must be samples (or pass --const {source.name})"
                )
            if not -len(source.shape) <= axis < len(source.shape):
                raise UserError(
                    f"--batch-axis {source.name}={axis}: the array has only {len(source.shape)} axes"
                )
            counts[source.name] = source.shape[axis]
            if source.shape[axis] == 0:
                raise UserError(
                    f"{self.path}: array {source.name!r} has zero samples (shape {list(source.shape)}); "
                    "nothing to replay: save at least one sample on that axis"
                )
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{k}: {v}" for k, v in counts.items())
            raise UserError(
                f"{self.path}: arrays have different sample counts ({listed}); the first axis must be samples "
                "(use --const NAME for an array fed whole, --batch-axis NAME=AXIS for another sample axis)"
            )
        return self

    def _batched(self) -> list[ArraySource]:
        return [s for s in self.sources if s.name not in self.consts]

    @property
    def samples(self) -> int:
        first = self._batched()[0]
        return first.shape[self.batch_axes.get(first.name, 0)]

    def batches(
        self, batch_size: int, limit: int | None = None, allow_nonfinite: bool | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        if allow_nonfinite is None:
            allow_nonfinite = self.allow_nonfinite
        total = self.samples if limit is None else min(limit, self.samples)
        first, last = self.window if self.window else (0, total)
        try:
            yield from self._batches(first, last, batch_size, allow_nonfinite)
        finally:  # each pass closes what it opened: a glob over thousands of .npz keeps no file open
            self.close()

    def close(self) -> None:
        for source in self.sources:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def _batches(
        self, first: int, last: int, batch_size: int, allow_nonfinite: bool
    ) -> Iterator[dict[str, np.ndarray]]:
        constants = {s.name: s.whole() for s in self.sources if s.name in self.consts}
        for start in range(first, last, batch_size):
            stop = min(start + batch_size, last)
            batch = dict(constants)
            for source in self._batched():
                axis = self.batch_axes.get(source.name, 0)
                if axis % len(source.shape) == 0:
                    rows = source.rows(start, stop)
                else:
                    # samples on another axis (e.g. an RNN state [layers, B, H]): read whole, take the slice
                    rows = np.take(source.whole(), np.arange(start, stop), axis=axis)
                if (
                    not allow_nonfinite
                    and rows.dtype.kind == "f"
                    and not np.isfinite(rows).all()
                    and not (source.name.endswith(PADDING_MASK_SUFFIX) and not np.isnan(rows).any())
                ):
                    moved = np.moveaxis(rows, axis, 0).reshape(stop - start, -1)
                    bad = start + int(np.flatnonzero(~np.isfinite(moved).all(axis=1))[0])
                    raise UserError(
                        f"{self.path}: array {source.name!r} has NaN or Inf at sample {bad}; "
                        "clean the data or pass --allow-nonfinite"
                    )
                batch[source.name] = rows
            if self.sketch is not None and self.sample_digests is not None:
                self.sketch.merge_digests(np.concatenate(self.sample_digests[start:stop]))
            elif self.sketch is not None:
                self.sketch.add({s.name: batch[s.name] for s in self._batched()}, self.batch_axes)
            yield batch
        for source in self._batched():
            if isinstance(source, NpzMemberSource):
                source.verify_rest()


def sample_axis(data, name: str) -> int | None:
    """Where array NAME of the data holds its samples: None for an array fed whole (--const)."""
    if name in getattr(data, "consts", ()):
        return None
    axis = getattr(data, "batch_axes", {}).get(name, 0)
    rank = len({s.name: s for s in data.sources}[name].shape)
    return axis % rank if rank else 0


class MultiFileData:
    """Several data files with the same arrays (`--data 'calib-*.npy'`), scanned one after another."""

    def __init__(self, pattern: str, parts: list[CalibrationData]) -> None:
        self.path = pattern
        self.parts = parts
        names = parts[0].names
        for part in parts[1:]:
            if part.names != names:
                raise UserError(
                    f"{part.path}: holds arrays {', '.join(part.names)}, {parts[0].path} holds {', '.join(names)}"
                )
        self.consts = parts[0].consts
        self.batch_axes = parts[0].batch_axes
        self.unfed: tuple[str, ...] = ()
        self.notes: list[str] = []
        self.sketch: SampleSketch | None = None
        self.sample_digests: list[np.ndarray] | None = None
        self.allow_nonfinite = False

    @property
    def names(self) -> list[str]:
        return self.parts[0].names

    @property
    def sources(self) -> list[ArraySource]:
        return self.parts[0].sources

    @property
    def samples(self) -> int:
        return sum(part.samples for part in self.parts)

    @property
    def local_samples(self) -> int:
        return self.samples

    def shard(self, rank: int, world: int, limit: int | None) -> None:
        if limit is not None:
            raise UserError(
                "--limit with a glob of data files is ambiguous under --distributed; drop one of them"
            )
        self.parts = self.parts[rank::world]  # files dealt to ranks in sorted order (a rank may get none)

    def batches(self, batch_size: int, limit: int | None = None, allow_nonfinite: bool | None = None):
        if allow_nonfinite is None:
            allow_nonfinite = self.allow_nonfinite
        remaining = limit
        for part in self.parts:
            if remaining is not None and remaining <= 0:
                return
            part.sketch = self.sketch
            yield from part.batches(batch_size, remaining, allow_nonfinite)
            if remaining is not None:
                remaining -= part.samples


def _validate(
    path: str, sources: list[ArraySource], batch_axes: dict[str, int] | None, consts: tuple[str, ...]
) -> CalibrationData:
    if not sources:
        raise UserError(f"{path}: holds no arrays")
    for source in sources:
        if source.dtype.kind not in NUMERIC_KINDS:
            raise UserError(
                f"{path}: array {source.name!r} has dtype {source.dtype}, expected numbers (float, int or bool)"
                + (f" ({RAGGED_ADVICE})" if source.dtype.hasobject else "")
            )
    return CalibrationData(path=path, sources=sources).configure(batch_axes, consts)


def _open_npy(path: Path) -> list[ArraySource]:
    try:
        source = NpyFileSource(path)
    except (OSError, EOFError) as exc:
        raise UserError(f"{path}: cannot read .npy ({exc}); the file is truncated or not .npy") from None
    if source.fortran:  # column-major: rows are not contiguous in the file; numpy's memory map copes
        try:
            return [InMemorySource("input", np.load(path, mmap_mode="r", allow_pickle=False))]
        except ValueError as exc:
            raise UserError(f"{path}: cannot read .npy ({exc})") from None
    return [source]


# A compressed .npz is streamed, so a deflate bomb costs no memory, but every sample it declares is
# scanned: 400 KB of deflated zeros declare 25 million samples (40 s of a tiny MLP). Deflate's ceiling is
# ~1030x (zeros: 1027x), which only data of almost one repeated value reach; real sparse data stay below
# (a binary bag of words at 0.2% density 426x, at 0.05% 740x; TF-IDF rows 228x), so they are not refused.
MAX_NPZ_EXPANSION = 1000
MIN_NPZ_REFUSED = 64 << 20  # below this a file is small whatever its ratio (an all-zero test array)


def check_expansion(what: str, members: list[tuple[int, int]]) -> None:
    """Refuse .npz data (one file, or every file of a glob or folder together: members as (declared
    bytes, compressed bytes)) that declare more than MAX_NPZ_EXPANSION times what they store and more
    than MIN_NPZ_REFUSED bytes."""
    declared = sum(d for d, _ in members)
    stored = sum(c for _, c in members)
    if declared > MIN_NPZ_REFUSED and declared > MAX_NPZ_EXPANSION * max(1, stored):
        raise UserError(
            f"{what}: compressed arrays expand {declared // max(1, stored)}x ({_size(stored)} to "
            f"{_size(declared)}, almost one repeated value): refused as a likely zip bomb; if the data "
            "are real, save them with np.savez (uncompressed) or as .npy"
        )


def npz_members(parts: list) -> list[tuple[int, int]]:
    """(declared bytes, compressed bytes) of every .npz array of several data files (check_expansion)."""
    return [
        (source.declared_bytes, source.compressed)
        for part in parts
        for source in getattr(part, "sources", ())
        if isinstance(source, NpzMemberSource)
    ]


def _size(count: int) -> str:
    for unit, shift in (("GB", 30), ("MB", 20), ("KB", 10)):
        if count >= 1 << shift:
            return f"{count / (1 << shift):.1f} {unit}"
    return f"{count} bytes"


def _open_npz(path: Path) -> list[ArraySource]:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"{path}: not a valid .npz archive ({exc})") from None
    refuse_ambiguous_names(path, names)  # numpy reads the last of two `x.npy`, another reader the first
    members = [NpzMemberSource(path, m, m[: -len(".npy")]) for m in names if m.endswith(".npy")]
    check_expansion(str(path), [(m.declared_bytes, m.compressed) for m in members])
    # np.savez keeps a Fortran-ordered array (a transpose, a pandas frame's .values) in that order: its
    # rows are not contiguous in the stream, so it is read whole (CRC-checked) as a .npy of it would be
    return [InMemorySource(m.name, m.whole()) if m.fortran else m for m in members]


def _open_pt(path: Path) -> list[ArraySource]:
    import pickle

    import torch

    check_torch_file(path)  # CRCs, and no zip bomb: torch's reader checks neither
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise NotData(
            path, "refused to unpickle: Python objects beyond tensors (a training checkpoint?)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UserError(
            f"{path}: cannot read tensor file ({type(exc).__name__}); it is truncated or not torch.save data"
        ) from None

    data_dtypes = {
        torch.float16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32, torch.int64,
        torch.uint8, torch.bool,
    }  # fmt: skip

    def to_numpy(value, key):
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{path}: entry {key!r} is a {type(value).__name__}, expected a tensor")
        if value.layout != torch.strided or value.is_quantized or value.is_nested:
            kind = "quantized" if value.is_quantized else "nested" if value.is_nested else str(value.layout)
            raise UserError(
                f"{path}: entry {key!r} is a {kind.replace('torch.', '')} tensor; save it dense (.to_dense())"
            )
        if value.dtype != torch.bfloat16 and (value.is_complex() or value.dtype not in data_dtypes):
            raise UserError(
                f"{path}: entry {key!r} has dtype {str(value.dtype).replace('torch.', '')}; "
                "save numbers as float16/32/64, an integer type or bool"
            )
        # a view whose strides repeat its storage (stride 0) claims any number of samples from a few
        # stored bytes, which a conversion or the batches would make real: the values must be in the file
        stored = value.untyped_storage().nbytes() // value.element_size()
        if value.numel() > stored:
            raise UserError(
                f"{path}: entry {key!r} has shape {list(value.shape)} but the file stores only {stored} of its "
                "values (an expanded view); save it with .contiguous()"
            )
        if value.dtype == torch.bfloat16:
            check_fits_in_memory(tuple(value.shape), np.dtype(np.float32), f"{path}: entry {key!r}")
            value = value.float()
        return value.detach().cpu().numpy()

    if isinstance(obj, torch.Tensor):
        return [InMemorySource("input", to_numpy(obj, "input"))]
    if isinstance(obj, dict) and {"state", "param_groups"} <= set(obj):
        raise NotData(path, "an optimizer state (state, param_groups)")
    if isinstance(obj, dict) and any(isinstance(v, dict | list | tuple) for v in obj.values()):
        nested = [str(k) for k, v in obj.items() if isinstance(v, dict | list | tuple)]
        raise NotData(
            path,
            f"a checkpoint of nested entries ({', '.join(nested[:4])}{', …' if len(nested) > 4 else ''})",
        )
    if isinstance(obj, dict):
        return [InMemorySource(str(k), to_numpy(v, k)) for k, v in obj.items()]
    if isinstance(obj, list | tuple):
        return [InMemorySource(f"input{i}", to_numpy(v, i)) for i, v in enumerate(obj)]
    raise NotData(path, f"holds a {type(obj).__name__}")


def _open_safetensors(path: Path) -> list[ArraySource]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as handle:
            sources = []
            for key in handle.keys():
                sl = handle.get_slice(key)
                dtype_name = sl.get_dtype().lower()
                mapping = {
                    "f32": "float32",
                    "f64": "float64",
                    "f16": "float16",
                    "i64": "int64",
                    "i32": "int32",
                    "i16": "int16",
                    "i8": "int8",
                    "u8": "uint8",
                    "bool": "bool",
                }
                shape = tuple(sl.get_shape())
                if dtype_name == "bf16":
                    start, header = _safetensors_data_offsets(path)
                    at = start + int(header[key]["data_offsets"][0])
                    sources.append(SafetensorsSource(path, key, shape, np.dtype(np.float32), bf16_at=at))
                    continue
                np_dtype = np.dtype(mapping.get(dtype_name, dtype_name))
                sources.append(SafetensorsSource(path, key, shape, np_dtype))
    except (SafetensorError, OSError, TypeError, ValueError, KeyError) as exc:
        raise UserError(f"{path}: cannot read safetensors data ({exc})") from None
    return sources


def open_calibration(
    path: str, batch_axes: dict[str, int] | None = None, consts: tuple[str, ...] = (), skip: tuple = ()
):
    """One data file, or every file matching a glob (`calib-*.npy`) or every data file of a folder,
    scanned in sorted order; a folder's files in `skip` (the model, checkpoints beside the data) are left out."""
    if any(ch in str(path) for ch in "*?[") and not Path(path).exists():
        import glob

        files = sorted(glob.glob(str(path)))
        if not files:
            raise UserError(f"--data {path}: no file matches this pattern")
        if len(files) > 1:
            parts = [open_calibration(f, batch_axes, consts) for f in files]
            check_expansion(f"--data {path}", npz_members(parts))
            return MultiFileData(str(path), parts)
        path = files[0]
    if Path(path).is_dir():
        return _open_folder(Path(path), batch_axes, consts, skip)
    p = check_readable_file(path, "data")
    with open(p, "rb") as handle:
        head = handle.read(8)
    suffix = p.suffix.lower()
    if suffix in TEXT_SUFFIXES and not head.startswith((b"\x93NUMPY", b"PK")):
        raise UserError(
            f"{path}: a text file is not calibration data (.npz, .npy, .pt or .safetensors arrays); "
            "to scan a model folder on text, pass --text FILE (one document per line, or .jsonl)"
        )
    if head.startswith(b"\x93NUMPY"):
        sources = _open_npy(p)
    elif head.startswith(b"PK") and suffix != ".pt" and suffix != ".pth":
        sources = _open_npz(p)
    elif suffix in (".pt", ".pth") or head.startswith(b"PK") or head[:1] == b"\x80":
        sources = _open_pt(p)
    elif suffix == ".safetensors" or head[:8] != b"" and len(head) == 8:
        sources = _open_safetensors(p)
    else:
        raise UserError(
            f"{path}: unsupported data format; use .npz, .npy, .pt or .safetensors with samples on the first axis"
        )
    if _weight_names([s.name for s in sources]):
        raise NotData(path, f"a model's weights ({', '.join(s.name for s in sources[:3])}, …)")
    return _validate(str(path), sources, batch_axes, consts)


PARAMETER_NAMES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _weight_names(names: list[str]) -> bool:
    """A state_dict's names (`0.weight`, `encoder.layer.0.attention.bias`, a bare Linear's `weight`),
    not data's: some name's last part is `weight`, and every name is dotted or a parameter's (data's
    `INPUT.KEY` arrays name no weight; a sample-weight array `weight` beside `x` keeps it data)."""
    last = [name.rsplit(".", 1)[-1] for name in names]
    return "weight" in last and all(
        "." in n or part in PARAMETER_NAMES for n, part in zip(names, last, strict=True)
    )


def _open_folder(folder: Path, batch_axes, consts, skip: tuple):
    """--data FOLDER: every data file in it, sorted, as the glob FOLDER/* would give; the model (and
    trend's checkpoints) in SKIP, files of no data suffix, and data-suffix files that hold no arrays of
    samples (an optimizer state, a training checkpoint, a model's weights: `NotData`, never unpickled)
    are left out, and a note says what was read and what was not."""
    skipped = {Path(str(f)).resolve() for f in skip if f is not None}
    entries = sorted(f for f in folder.iterdir() if f.is_file())
    others = [f for f in entries if f.suffix.lower() not in DATA_SUFFIXES]
    parts, left_out = [], []
    for f in entries:
        if f in others:
            continue
        if f.resolve() in skipped:
            left_out.append(f"{f.name} (the model being scanned)")
            continue
        try:
            parts.append(open_calibration(str(f), batch_axes, consts))
        except NotData as exc:
            left_out.append(f"{f.name} ({exc.what})")

    def listed(names: list[str]) -> str:
        return "; ".join(names[:6]) + (f"; … ({len(names)} in all)" if len(names) > 6 else "")

    if not parts:
        raise UserError(
            f"--data {folder}: a folder without data files ({', '.join(DATA_SUFFIXES)})"
            + (f"; left out: {listed(left_out)}" if left_out else "")
            + "; give a file or a glob"
        )
    note = f"--data {folder}: read {len(parts)} data file(s): {listed([Path(p.path).name for p in parts])}"
    if left_out:
        note += f"; left out {len(left_out)}: {listed(left_out)}"
    if others:
        note += f"; {len(others)} other file(s) of no data format ignored"
    check_expansion(f"--data {folder}", npz_members(parts))
    data = parts[0] if len(parts) == 1 else MultiFileData(str(folder), parts)
    data.notes.append(note)
    return data


# what an object array usually is: samples of different shapes that numpy could not stack
RAGGED_ADVICE = (
    "an object array is usually samples of different shapes: pad or resize them to one shape and "
    "np.stack them, with an attention_mask for padded tokens"
)
DATA_SUFFIXES = (".npz", ".npy", ".pt", ".pth", ".safetensors")
TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".tsv", ".md")


def prefetched(iterable, depth: int = 2, enabled: bool = True):
    """Yield from `iterable`, producing the next items in a background thread (reading and checking
    batch k+1 overlaps the model running batch k). Exceptions are re-raised in the caller.

    Measured with scripts/bench.py on 2 CPU cores it still pays (reading, copying and NaN-checking the
    next batch overlaps the model's own work); on CUDA it keeps the GPU fed."""
    if not enabled:
        yield from iterable
        return
    import queue
    import threading

    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in iterable:
                if stop.is_set():
                    return
                items.put((True, item))
            items.put((True, done))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            items.put((False, exc))

    thread = threading.Thread(target=produce, name="deadrelu-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = items.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                items.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
