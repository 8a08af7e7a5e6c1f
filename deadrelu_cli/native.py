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

import contextlib
import ctypes
import hashlib
import math
import mmap
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

SOURCE = Path(__file__).with_name("csrc") / "relu_stats.c"
ONNX_SOURCE = SOURCE.with_name("ort_relu_stats.c")  # the same kernel as an onnxruntime custom op
FLAGS = ("-O3", "-shared", "-fPIC")
PARALLEL_FLAGS = ("-fopenmp",)  # without them (no OpenMP) the same source builds a one-thread kernel
# last, after $CC and its arguments: IEEE semantics (NaN, -0.0) whatever they say (CC="gcc -ffast-math" built a
# kernel whose relu lost -0.0 and whose max missed NaN; -fno-fast-math alone keeps an explicit
# -ffinite-math-only)
IEEE_FLAGS = ("-fno-fast-math", "-fno-finite-math-only", "-fsigned-zeros")
SWITCH = "DEADRELU_NATIVE"  # 0 / false / off / no: never build or load the kernel
BUILD_SECONDS = 120
# Appended to a built library with the sha256 of what precedes it; FORMAT names the layout in the cache key
# (a library from before the trailer is rebuilt under a new name, not taken for a damaged one).
MARK = b"deadrelu-relu-stats-sha256:"
FORMAT = b"trailer-1"


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
            # its own pages (anonymous mmap, page-aligned), not malloc's heap: made during a first forward
            # pass between activations, a heap block that stays kept glibc from reusing the freed ones
            pages = self._local.pages = mmap.mmap(-1, need)
            buffer = self._local.buffer = (ctypes.c_char * need).from_buffer(pages)
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
_onnx_lock = threading.Lock()
_onnx_built: tuple[Path | None, str] | None = None
_onnx_builder: threading.Thread | None = None


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
            # not a daemon: a scan that stops early (a bad --arch, exit 2) waits for the build at exit (once,
            # ~1 s), which is then cached; a daemon thread was stopped mid-build, the compiler's temporary
            # file left in the cache and the kernel never built while scans kept failing fast
            _builder = threading.Thread(target=relu_stats, name="deadrelu-native")
            _builder.start()


def _forget_the_builder() -> None:
    """In a forked child: the parent's builder thread does not exist there, and a lock it held when the
    process forked would stay held, relu_stats() waiting for it forever. The child builds or loads the
    kernel itself (a build is atomic, so two processes building at once is fine)."""
    global _lock, _started, _builder, _onnx_lock, _onnx_builder
    _lock, _started, _builder = threading.Lock(), threading.Lock(), None
    _onnx_lock, _onnx_builder = threading.Lock(), None


os.register_at_fork(after_in_child=_forget_the_builder)


def status() -> str:
    """What the kernel is: where it was loaded from, or why it is not used."""
    relu_stats()
    assert _loaded is not None
    return _loaded[1]


def statuses() -> list[str]:
    """What this process's scans counted with so far, one line per library it asked for (loads nothing):
    `--debug` prints them."""
    lines = []
    if _loaded is not None:
        lines.append(f"counting kernel: {_loaded[1]}")
    if _onnx_built is not None:
        lines.append(f"onnxruntime op: {_onnx_built[1]}")
    return lines


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


def switched_off() -> str | None:
    """The reason the kernel is off by the environment ($DEADRELU_NATIVE 0, false, off or no, as other
    tools' switches read), else None."""
    value = os.environ.get(SWITCH, "").strip()
    return f"off ({SWITCH}={value})" if value.lower() in ("0", "false", "off", "no") else None


def _load() -> tuple[ReluStats | None, str]:
    off = switched_off()
    if off:
        return None, off
    parallel_flags, serial_flags = (*FLAGS, *PARALLEL_FLAGS, *IEEE_FLAGS), (*FLAGS, *IEEE_FLAGS)
    # the OpenMP build first; without OpenMP (Apple's clang; clang without libomp): one thread, still one pass
    path, which, why = _compiled("relu_stats", SOURCE, (parallel_flags, serial_flags))
    if path is None:
        return None, f"{why}: the ATen kernels count" if why.startswith("no C compiler") else why
    try:
        kernel = ReluStats(ctypes.CDLL(str(path)), path, which == 0)
    except (OSError, AttributeError) as exc:  # AttributeError: a library without the kernel's symbols
        return None, f"could not load {path}: {exc}"
    return kernel, f"loaded {path}{why}"


def onnx_library() -> Path | None:
    """The onnxruntime custom-op library (csrc/ort_relu_stats.c: the kernel as deadrelu.ReluStats, run on
    onnxruntime's own threads), built on first use; None where it cannot be (`onnx_status()` says why).
    Never loaded here: onnxruntime loads it into the sessions it is registered with."""
    global _onnx_built
    if _onnx_built is None:
        with _onnx_lock:
            if _onnx_built is None:
                _onnx_built = _load_onnx()
    return _onnx_built[0]


def onnx_status() -> str:
    """What the custom-op library is: where it was built, or why there is none."""
    onnx_library()
    assert _onnx_built is not None
    return _onnx_built[1]


def prepare_onnx() -> None:
    """Build the custom-op library on a background thread (as `prepare` does for the kernel)."""
    global _onnx_builder
    with _started:
        if _onnx_built is None and _onnx_builder is None:
            _onnx_builder = threading.Thread(target=onnx_library, name="deadrelu-native-onnx")
            _onnx_builder.start()


def _load_onnx() -> tuple[Path | None, str]:
    off = switched_off()
    if off:
        return None, off
    # one thread per job: onnxruntime's intra-op threads run the jobs; pthread for the scratch's lock
    path, _, why = _compiled("ort_relu_stats", ONNX_SOURCE, ((*FLAGS, "-pthread", *IEEE_FLAGS),))
    if path is None and why.startswith("no C compiler"):
        return None, f"{why}: onnxruntime's own ops count"
    return (path, f"{path}{why}") if path is not None else (None, why)


def _compiled(
    stem: str, source_path: Path, flag_sets: tuple[tuple[str, ...], ...]
) -> tuple[Path | None, int, str]:
    """A whole library built from `source_path` (and the kernel's source, which it may include) with
    the first of `flag_sets` that builds, from the cache or built now: (path, which flag set, a note for
    the status line), or (None, -1, why not)."""
    command = compiler()
    if command is None:
        return None, -1, "no C compiler ($CC, cc, gcc or clang)"
    # the source and the kernel it includes (the custom op's #include "relu_stats.c")
    sources = b"\0".join(path.read_bytes() for path in sorted({source_path, SOURCE}))

    def target(flags: tuple[str, ...]) -> Path:
        key = hashlib.sha256(
            b"\0".join([FORMAT, sources, " ".join([*command, *flags]).encode(), platform.machine().encode()])
        ).hexdigest()[:16]
        return cache_dir() / f"{stem}-{key}.so"

    targets = [target(flags) for flags in flag_sets]
    try:
        states = {path: _intact(path) for path in targets}
    except OSError as exc:  # e.g. HOME=/root for another user: the cache cannot even be looked at
        return None, -1, f"cannot read the kernel's cache {targets[0].parent}: {exc.strerror or exc}"
    # a whole library, the first flag set's first (a later one is built only after the earlier ones failed)
    which = next((i for i, p in enumerate(targets) if states[p] is True), None)
    if which is not None:
        return targets[which], which, ""
    damaged = False in states.values()  # so this build replaces a damaged copy
    why, built = "", None
    for index, (flags, candidate) in enumerate(zip(flag_sets, targets, strict=True)):
        error = _build(command, flags, candidate, source_path)
        if error is None:
            built = index
            break
        if isinstance(error, Transient):  # a later flag set's library would be cached for good instead
            return None, -1, error
        why = f" without OpenMP ({error})"
    if built is None:
        return None, -1, error
    which, path = built, targets[built]
    try:
        state = _intact(path)
    except OSError as exc:
        return None, -1, f"cannot read the kernel's cache {path.parent}: {exc.strerror or exc}"
    if state is not True:
        return None, -1, f"the kernel built into {path} does not read back whole"
    return path, which, why + (" (rebuilt: the cached copy was damaged)" if damaged else "")


def _intact(path: Path) -> bool | None:
    """Whether `path` is a library _build wrote, whole (its MARK trailer and digest match): None when
    there is none. Checked before it is loaded because a damaged library is not refused by the loader:
    a truncated one kills the process with SIGBUS inside dlopen (copied caches, a full disk, a crash
    before the data reached it). OSError where the cache cannot be read."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    size = len(MARK) + hashlib.sha256().digest_size
    body, trailer = data[:-size], data[-size:]
    return len(data) > size and trailer == MARK + hashlib.sha256(body).digest()


class Transient(str):
    """Why a build failed, where the failure says nothing of the compiler (a timeout, a failed start)."""


def _build(command: list[str], flags: tuple[str, ...], target: Path, source: Path = SOURCE) -> str | None:
    """Compile `source` into `target`, atomically (a temporary file renamed: two processes building at once
    both end with a whole library). The reason it failed, or None."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _sweep(target.parent)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=".so")
        os.close(handle)
    except OSError as exc:
        return f"cannot write the kernel's cache {target.parent}: {exc.strerror or exc}"
    try:
        done = subprocess.run(
            [*command, *flags, "-o", temporary, str(source)],
            capture_output=True,
            text=True,
            timeout=BUILD_SECONDS,
            check=False,
        )
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            # the first error, not "In file included from ..." (gcc -m32 without 32-bit headers)
            said = next((line for line in lines if "error" in line), lines[0] if lines else None)
            return f"{command[0]} could not build the kernel: {said or f'exit {done.returncode}'}"
        with open(temporary, "rb+") as library:  # the trailer _intact checks (a loader ignores it)
            body = library.read()
            library.write(MARK + hashlib.sha256(body).digest())
        os.replace(temporary, target)
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        # the compiler ran out of time or could not be started (a loaded machine, no memory to fork):
        # a reason that need not recur, so no fallback is built and cached in its place
        return Transient(f"{command[0]} could not build the kernel: {exc} (tried again by the next scan)")
    finally:
        with contextlib.suppress(FileNotFoundError):  # renamed, or swept by another process
            os.unlink(temporary)


def _sweep(directory: Path) -> None:
    """Remove temporary files of builds that cannot still be running (twice BUILD_SECONDS old: a compiler
    is stopped after BUILD_SECONDS): what a process killed mid-build left behind."""
    for stale in directory.glob(".build-*.so"):
        try:
            if time.time() - stale.stat().st_mtime > 2 * BUILD_SECONDS:
                stale.unlink()
        except OSError:  # removed by another process meanwhile, or not ours to remove: harmless
            pass
