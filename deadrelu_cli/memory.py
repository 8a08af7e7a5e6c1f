"""How much memory the host has left, and refusing allocations that cannot fit (before they are made)."""

from __future__ import annotations

import numpy as np

from deadrelu_cli.errors import UserError


def available_memory() -> int:
    """Bytes of memory this process could still use (MemAvailable; a generous default elsewhere)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 40


def resident_memory() -> int | None:
    """Bytes of this process's memory resident now (Linux /proc/self/statm), else None."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            import os

            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def check_fits_in_memory(shape: tuple[int, ...], dtype: np.dtype, label: str) -> None:
    """Refuse, before allocating, an array whose declared size cannot fit in memory."""
    size = int(np.prod([int(d) for d in shape], dtype=object)) * np.dtype(dtype).itemsize
    if size > available_memory():
        raise UserError(
            f"{label} declares {size / 2**30:.1f} GiB ({list(shape)} {dtype}), more than the memory available; "
            "the file is damaged or not meant to be read whole"
        )
