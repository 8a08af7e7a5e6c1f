"""What samples a report counted, small enough for the report: a bottom-k sketch of per-sample digests.

Each sample gets a 64-bit digest (sha256 of its row of each batched array, with the array's name,
dtype and row shape — short rows a vectorised splitmix64 chain, `row_digests`; summed over the arrays), so batch size and order change nothing;
with a position mask, token arrays give only their kept positions, so padding widths change nothing either;
a block of packed text (`--text-packing pack`) is known by the documents it holds, so where the stream was cut changes nothing. A report keeps
the K smallest distinct digests. Two reports share a sample when their lists share a digest; below K samples the list is every sample's,
so overlap is found exactly. Above, the lists hold every digest up to their K-th smallest, and any
shared sample whose digest lies below the smaller of those two bounds is in both lists: an overlap of
m samples out of N is missed with probability about exp(-m·K/N) (K = 512: m ≥ N/100 is found with
probability 1 − e⁻⁵ ≈ 99.3%). The union of two sketches' lists, cut to K, is the sketch of the union,
so merged reports keep one. Backend-free (numpy and hashlib).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

SKETCH_SIZE = 512
METHOD = "sha256-64 per sample (rows up to 64 bytes: splitmix64 words), smallest 512"
# with a position mask: the token arrays' kept positions only (the padding a file's longest document sets
# is no part of a sample: the same document padded to another width is the same sample)
MASKED_METHOD = "sha256-64 per sample of its kept positions, smallest 512"
# --text-packing pack: a block is a cut of one stream of documents, and where the cuts fall depends on
# every document before; the report fingerprints the documents each block holds (a sample's stand-ins)
DOCUMENT_METHOD = "sha256-64 per packed document of its token ids, smallest 512"
# arrays of a decoder's sequence: as long as the mask's only by chance, so never cut by it
OTHER_SEQUENCE = ("decoder_", "tgt")


@dataclass
class SampleSketch:
    """The K smallest distinct per-sample digests seen; `complete` while every distinct digest is kept.
    `mask` (an array name; `marks_padding`: nonzero on padding): digest only the kept positions of the
    arrays laid out [samples, tokens, ...] like it."""

    digests: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    complete: bool = True
    size: int = SKETCH_SIZE
    mask: str | None = None
    marks_padding: bool = False
    method: str = ""

    def __post_init__(self) -> None:
        self.method = self.method or (MASKED_METHOD if self.mask else METHOD)

    def add(self, batch: dict[str, np.ndarray], batch_axes: dict[str, int] | None = None) -> None:
        """The samples of one batch: BATCH maps array names to arrays with samples on `batch_axes[name]`
        (default 0); constants fed whole are not in it."""
        names = sorted(batch)
        if not names:
            return
        axes = batch_axes or {}
        rows = [np.asarray(batch[n]) for n in names]
        rows = [np.moveaxis(r, axes[n], 0) if axes.get(n, 0) else r for n, r in zip(names, rows, strict=True)]
        count = rows[0].shape[0]
        keep = self._kept(batch, axes, count)
        found = np.zeros(count, dtype=np.uint64)
        for n, r in zip(names, rows, strict=True):  # (name, dtype, row shape) start each row's digest
            if keep is not None and r.shape[:2] == keep.shape and not n.startswith(OTHER_SEQUENCE):
                head = hashlib.sha256(f"{n}\0{r.dtype.str}\0{r.shape[2:]}\0kept\0".encode())
                found += _kept_digests(r, keep, head)
                continue
            head = hashlib.sha256(f"{n}\0{r.dtype.str}\0{r.shape[1:]}\0".encode())
            found += row_digests(np.ascontiguousarray(r).reshape(count, -1).view(np.uint8), head)
        self.merge_digests(found)  # several arrays: summed (mod 2**64)

    def _kept(self, batch: dict, axes: dict, count: int) -> np.ndarray | None:
        """The batch's kept positions [samples, tokens] (bool), or None without a 2-D mask."""
        if self.mask is None or self.mask not in batch:
            return None
        mask = np.asarray(batch[self.mask])
        mask = np.moveaxis(mask, axes[self.mask], 0) if axes.get(self.mask, 0) else mask
        if mask.ndim != 2 or mask.shape[0] != count:
            return None
        return mask == 0 if self.marks_padding else mask != 0

    def merge_digests(self, found: np.ndarray, complete: bool = True) -> None:
        if self.digests.size == self.size:  # full: only digests below the largest kept can enter
            largest = self.digests[-1]
            self.complete = self.complete and complete and not (found > largest).any()
            found = found[found < largest]
            if not found.size:
                return
        union = np.union1d(self.digests, found)
        self.complete = self.complete and complete and union.size <= self.size
        self.digests = union[: self.size]

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "complete": self.complete,
            "digests": [f"{int(d):016x}" for d in self.digests],
        }


SMALL_ROW = 64  # bytes: rows up to this long get the vectorised digest (a Python call per row costs more)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, on uint64 arrays (numpy wraps the products mod 2**64)."""
    h = (h ^ (h >> np.uint64(30))) * _M1
    h = (h ^ (h >> np.uint64(27))) * _M2
    return h ^ (h >> np.uint64(31))


def row_digests(rows: np.ndarray, head) -> np.ndarray:
    """A 64-bit digest per row of ROWS (uint8 [count, length]), started from HEAD (a sha256 state):
    sha256 of head + row, or, for rows of at most SMALL_ROW bytes, a splitmix64 chain over the row's
    8-byte words seeded by the head's digest, for all rows at once. Which one depends only on the row
    length, so the same array gives the same digests in any batch size."""
    count, length = rows.shape
    if length <= SMALL_ROW:
        padded = np.zeros((count, -(-length // 8) * 8), np.uint8)
        padded[:, :length] = rows
        words = padded.view("<u8")
        h = np.full(count, int.from_bytes(head.digest()[:8], "little"), dtype=np.uint64)
        for w in range(words.shape[1]):
            h = _mix(h ^ words[:, w])
        return h
    out = bytearray()
    for i in range(count):  # a copied state per row: cheaper than a fresh hash of head + row
        h = head.copy()
        h.update(rows[i])
        out += h.digest()[:8]
    return np.frombuffer(bytes(out), dtype="<u8").astype(np.uint64)


def _kept_digests(rows: np.ndarray, keep: np.ndarray, head) -> np.ndarray:
    """A 64-bit digest per sample of ROWS [count, tokens, ...]: sha256 of head + its kept positions'
    bytes (KEEP [count, tokens]), so the padding around them changes nothing."""
    out = bytearray()
    for i in range(rows.shape[0]):
        h = head.copy()
        h.update(np.ascontiguousarray(rows[i][keep[i]]).tobytes())
        out += h.digest()[:8]
    return np.frombuffer(bytes(out), dtype="<u8").astype(np.uint64)


def document_digests(documents: list[list[int]]) -> np.ndarray:
    """A 64-bit digest per document (DOCUMENT_METHOD): sha256 of its token ids as little-endian int64."""
    head = hashlib.sha256(b"document\0<i8\0")
    out = bytearray()
    for ids in documents:
        h = head.copy()
        h.update(np.asarray(ids, dtype="<i8").tobytes())
        out += h.digest()[:8]
    return np.frombuffer(bytes(out), dtype="<u8").astype(np.uint64)


def sketch_from_dict(d: dict) -> SampleSketch | None:
    """A report's `data.fingerprint`, or None when absent or made another way (not comparable)."""
    if not isinstance(d, dict) or d.get("method") not in (METHOD, MASKED_METHOD, DOCUMENT_METHOD):
        return None
    digests = np.array(sorted(int(h, 16) for h in d["digests"]), dtype=np.uint64)
    return SampleSketch(digests=digests, complete=bool(d["complete"]), method=d["method"])


def shared_samples(a: SampleSketch, b: SampleSketch) -> int:
    """How many samples the two sketches show in both reports (a lower bound unless both are complete)."""
    return int(np.intersect1d(a.digests, b.digests).size)


def union_sketch(sketches: list[SampleSketch]) -> SampleSketch:
    """The sketch of the union (every sketch made the same way: `method`)."""
    out = SampleSketch(method=sketches[0].method if sketches else "")
    for sketch in sketches:
        out.merge_digests(sketch.digests, sketch.complete)
    return out
