"""The one compiled kernel (csrc/relu_stats.c): a float32 relu or relu6 run and counted in one pass over memory.

Built once per machine with the system's C compiler (a fraction of a second), kept in the user's cache
directory and loaded with ctypes. Why compiled: with ATen's kernels the eager probe needs five passes per
slice of a relu's output for its max, count and sum, ~4–6% of a CPU forward pass; this kernel is the relu
itself plus a few vector instructions (docs/performance.md). Why built here rather than shipped: the package
stays one pure-Python wheel for every platform. Where there is no C compiler, or `DEADRELU_NATIVE=0`,
ATen's kernels count instead, with the same numbers; where the compiler has no OpenMP (Apple's clang),
the same source builds a one-thread kernel, used for relu6 (whose ATen path costs ~2× a forward pass) and
where torch itself runs one thread.

Framework-free: it takes raw addresses, so any caller that owns the memory can use it."""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

SOURCE = Path(__file__).with_name("csrc") / "relu_stats.c"
FLAGS = ("-O3", "-shared", "-fPIC")
PARALLEL_FLAGS = ("-fopenmp",)  # without them (no OpenMP) the same source builds a one-thread kernel
SWITCH = "DEADRELU_NATIVE"  # "0": never build or load the kernel
BUILD_SECONDS = 120


class ReluStats:
    """The loaded kernel. `run` counts one batch into float64/int64 accumulators in place."""

    def __init__(self, library: ctypes.CDLL, path: Path, parallel: bool = True) -> None:
        self.path = path
        self.parallel = parallel  # built with OpenMP: its `threads` run at once, else one after another
        self._run = library.deadrelu_relu_stats
        self._run.restype = None
        self._run.argtypes = [
            ctypes.c_void_p,  # x
            ctypes.c_void_p,  # y (may be x)
            ctypes.c_int64,  # outer
            ctypes.c_int64,  # units
            ctypes.c_int64,  # length of a unit's row (1: units last)
            ctypes.c_int,  # columns
            ctypes.c_int,  # threads
            ctypes.c_void_p,  # scratch
            ctypes.c_float,  # cap (relu6: 6; relu: +inf)
            ctypes.c_void_p,  # max (float64)
            ctypes.c_void_p,  # count (int64)
            ctypes.c_void_p,  # sum (float64)
            ctypes.c_void_p,  # count at the cap (int64; None for relu)
        ]
        self._scratch_bytes = library.deadrelu_scratch_bytes
        self._scratch_bytes.restype = ctypes.c_int64
        self._scratch_bytes.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
        self._local = threading.local()  # one scratch buffer per thread, kept and grown

    def run(
        self,
        x: int,
        y: int,
        outer: int,
        units: int,
        length: int,
        columns: bool,
        threads: int,
        maximum: int,
        count: int,
        total: int,
        cap: float | None = None,
        at_cap: int | None = None,
    ) -> None:
        """y = relu(x) for contiguous float32 x of [outer, units, length] (y may be x), and per unit the
        max of x, the count of x > 0 and the sum of y added into `maximum`, `count` and `total` (float64,
        int64, float64 arrays of `units`). `columns`: read x as [outer, units*length] (units last, or
        short rows), else as outer*units rows of `length` each. With `cap` (relu6: 6.0), y = min(relu(x),
        cap) and the count of x >= cap is added into `at_cap` (int64)."""
        need = max(8, self._scratch_bytes(units, length, int(columns), threads))
        buffer = getattr(self._local, "buffer", None)
        if buffer is None or ctypes.sizeof(buffer) < need:
            buffer = self._local.buffer = (ctypes.c_double * (need // 8 + 1))()  # 8-byte aligned
        if (cap is None) != (at_cap is None):
            raise ValueError("cap and at_cap go together")
        limit = math.inf if cap is None else cap
        self._run(
            x, y, outer, units, length, int(columns), threads, buffer, limit, maximum, count, total, at_cap
        )


_lock = threading.Lock()
_loaded: tuple[ReluStats | None, str] | None = None
_started = threading.Lock()
_builder: threading.Thread | None = None


def relu_stats() -> ReluStats | None:
    """The kernel, built and loaded on first use; None where it cannot be (`status()` says why)."""
    global _loaded
    if _loaded is None:
        with _lock:
            if _loaded is None:
                _loaded = _load()
    return _loaded[0]


def prepare() -> None:
    """Load the kernel on a background thread (building it the first time, ~1 s), so that a first build
    overlaps the model's loading; relu_stats() then waits for it, so every batch of a scan is counted
    the same way whatever the timing. Call it after importing torch: the library then links to the
    OpenMP runtime torch has loaded rather than loading the system's first."""
    global _builder
    with _started:
        if _loaded is None and _builder is None:
            _builder = threading.Thread(target=relu_stats, name="deadrelu-native", daemon=True)
            _builder.start()


def status() -> str:
    """What the kernel is: where it was loaded from, or why it is not used."""
    relu_stats()
    assert _loaded is not None
    return _loaded[1]


def cache_dir() -> Path:
    """Where the built library is kept: $XDG_CACHE_HOME/deadrelu/native (~/.cache/deadrelu/native). The
    user's own directory, never a shared one such as /tmp, where another user could put a library there."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "deadrelu" / "native"


def compiler() -> list[str] | None:
    """The C compiler to build with: $CC (with its arguments), else cc, gcc or clang on PATH."""
    named = shlex.split(os.environ.get("CC", ""))
    if named and shutil.which(named[0]):
        return [shutil.which(named[0]), *named[1:]]
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def _load() -> tuple[ReluStats | None, str]:
    if os.environ.get(SWITCH, "1").strip() == "0":
        return None, f"off ({SWITCH}=0)"
    command = compiler()
    if command is None:
        return None, "no C compiler ($CC, cc, gcc or clang): the ATen kernels count"
    source = SOURCE.read_bytes()

    def target(flags: tuple[str, ...]) -> Path:
        key = hashlib.sha256(
            b"\0".join([source, " ".join([*command, *flags]).encode(), platform.machine().encode()])
        ).hexdigest()[:16]
        return cache_dir() / f"relu_stats-{key}.so"

    parallel, serial = target((*FLAGS, *PARALLEL_FLAGS)), target(FLAGS)
    why = ""
    if not parallel.is_file() and not serial.is_file():  # (a serial build is made only after a failed one)
        error = _build(command, (*FLAGS, *PARALLEL_FLAGS), parallel)
        if error is not None:  # no OpenMP (Apple's clang; clang without libomp): one thread, still one pass
            why = f" without OpenMP ({error})"
            error = _build(command, FLAGS, serial)
            if error is not None:
                return None, error
    path = parallel if parallel.is_file() else serial
    try:
        library = ctypes.CDLL(str(path))
    except OSError as exc:
        return None, f"could not load {path}: {exc}"
    return ReluStats(library, path, path == parallel), f"loaded {path}{why}"


def _build(command: list[str], flags: tuple[str, ...], target: Path) -> str | None:
    """Compile SOURCE into `target`, atomically (a temporary file renamed: two processes building at once
    both end with a whole library). The reason it failed, or None."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=".so")
        os.close(handle)
    except OSError as exc:
        return f"cannot write the kernel's cache {target.parent}: {exc.strerror or exc}"
    try:
        done = subprocess.run(
            [*command, *flags, "-o", temporary, str(SOURCE)],
            capture_output=True,
            text=True,
            timeout=BUILD_SECONDS,
            check=False,
        )
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            return (
                f"{command[0]} could not build the kernel: {lines[0] if lines else f'exit {done.returncode}'}"
            )
        os.replace(temporary, target)
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{command[0]} could not build the kernel: {exc}"
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
