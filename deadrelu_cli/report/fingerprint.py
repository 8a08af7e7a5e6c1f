"""What samples a report counted, small enough for the report: a bottom-k sketch of per-sample digests.

Each sample gets a 64-bit digest (sha256 of its row of each batched array, with the array's name,
dtype and row shape; summed over the arrays), so batch size and order change nothing. A report keeps
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
METHOD = "sha256-64 per sample, smallest 512"


@dataclass
class SampleSketch:
    """The K smallest distinct per-sample digests seen; `complete` while every distinct digest is kept."""

    digests: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    complete: bool = True
    size: int = SKETCH_SIZE

    def add(self, batch: dict[str, np.ndarray], batch_axes: dict[str, int] | None = None) -> None:
        """The samples of one batch: BATCH maps array names to arrays with samples on `batch_axes[name]`
        (default 0); constants fed whole are not in it."""
        names = sorted(batch)
        if not names:
            return
        axes = batch_axes or {}
        rows = [np.moveaxis(np.asarray(batch[n]), axes.get(n, 0), 0) for n in names]
        count = rows[0].shape[0]
        # per array, one sha256 state over its name, dtype and row shape, copied for each row (cheaper
        # than a fresh hash; sha256 has CPU instructions where blake2b has none)
        heads = [
            hashlib.sha256(f"{n}\0{r.dtype.str}\0{r.shape[1:]}\0".encode())
            for n, r in zip(names, rows, strict=True)
        ]
        rows = [np.ascontiguousarray(r).reshape(count, -1).view(np.uint8) for r in rows]
        found = np.zeros(count, dtype=np.uint64)
        for head, r in zip(heads, rows, strict=True):
            digests = bytearray()
            for i in range(count):
                h = head.copy()
                h.update(r[i])
                digests += h.digest()[:8]
            found += np.frombuffer(bytes(digests), dtype="<u8")  # several arrays: summed (mod 2**64)
        self.merge_digests(found)

    def merge_digests(self, found: np.ndarray, complete: bool = True) -> None:
        union = np.union1d(self.digests, found)
        self.complete = self.complete and complete and union.size <= self.size
        self.digests = union[: self.size]

    def to_dict(self) -> dict:
        return {
            "method": METHOD,
            "complete": self.complete,
            "digests": [f"{int(d):016x}" for d in self.digests],
        }


def sketch_from_dict(d: dict) -> SampleSketch | None:
    """A report's `data.fingerprint`, or None when absent or made another way (not comparable)."""
    if not isinstance(d, dict) or d.get("method") != METHOD:
        return None
    digests = np.array(sorted(int(h, 16) for h in d["digests"]), dtype=np.uint64)
    return SampleSketch(digests=digests, complete=bool(d["complete"]))


def shared_samples(a: SampleSketch, b: SampleSketch) -> int:
    """How many samples the two sketches show in both reports (a lower bound unless both are complete)."""
    return int(np.intersect1d(a.digests, b.digests).size)


def union_sketch(sketches: list[SampleSketch]) -> SampleSketch:
    out = SampleSketch()
    for sketch in sketches:
        out.merge_digests(sketch.digests, sketch.complete)
    return out
