"""Files the tool reads and writes: one guard so that no output lands on an input, special files
refused before a blocking open, writes atomic with the user's permissions, a full disk one line.

Commands call `guard_outputs` once, before any work, with every path they will write and every path
they will read; readers call `check_regular_file` before they open anything; writers go through
`write_atomic` / `write_text_atomic` / `write_bytes_atomic` or `temp_path_for` + `commit_temp`.
"""

from __future__ import annotations

import glob
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from deadrelu_cli.errors import UserError

MAX_FOLDER_FILES = 100_000  # a folder given as an input is compared file by file up to this many
Role = tuple[str, "str | Path | None"]  # ("--json", "out.json"): how the user named it, and the path


# --- reading ---------------------------------------------------------------------------------------


def special_kind(mode: int) -> str | None:
    """'a FIFO', 'a socket', 'a device' for a special file's st_mode; None for a regular file/folder."""
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return None


def check_regular_file(path: str | Path, what: str = "input") -> Path:
    """Refuse (exit 2) a missing path, a folder or a special file, from stat alone: no open that can block."""
    p = Path(path)
    try:
        info = p.stat()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; check the {what} path") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    except ValueError:  # a NUL byte in a name from a settings file
        raise UserError(f"{str(path)!r}: not a usable file name") from None
    kind = special_kind(info.st_mode)
    if kind:
        raise UserError(f"{path}: is {kind}, not a file; give the {what} file itself")
    if stat.S_ISDIR(info.st_mode):
        raise UserError(f"{path}: is a directory; give the {what} file itself")
    return p


def check_folder_files(folder: Path, extra: Iterable[Path] = ()) -> None:
    """Refuse (exit 2) a model folder holding a FIFO, socket or device among its files (or EXTRA, e.g. the
    shards an index names), from stat alone: the libraries that read the folder open what they find, and
    opening a FIFO blocks forever (in native code that no signal interrupts)."""
    for path in [*Path(folder).iterdir(), *extra]:
        try:
            mode = path.stat().st_mode
        except OSError:
            continue  # a dangling link: the reader says it is missing
        kind = special_kind(mode)
        if kind:
            raise UserError(f"{path}: is {kind}, not a file; a model folder holds plain files")


# Settings, configs, indexes and text documents are a few levels deep; a file nested deeper is refused
# before the recursive code that reads it next (transformers' config classes, our own walks) overflows.
MAX_NESTING = 64


def _too_deep(source: str | Path) -> UserError:
    return UserError(
        f"{source}: nested more than {MAX_NESTING} levels deep; the file is damaged or was built to crash readers"
    )


def check_nesting(value, source: str | Path) -> None:
    """Refuse a parsed JSON/TOML value nested deeper than MAX_NESTING (an iterative walk: no recursion)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_NESTING:
            raise _too_deep(source)
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)


def parse_json(text: str | bytes, source: str | Path, **kwargs):
    """json.loads of a file from outside: nesting past MAX_NESTING (or past the parser's recursion, a
    RecursionError: exit 3) is a one-line UserError naming SOURCE; invalid JSON still raises ValueError,
    for the caller to word."""
    import json

    try:
        value = json.loads(text, **kwargs)
    except RecursionError:
        raise _too_deep(source) from None
    check_nesting(value, source)
    return value


def parse_toml(text: str, source: str | Path) -> dict:
    """tomllib.loads with parse_json's nesting limit (tomllib recurses too); TOMLDecodeError is the caller's."""
    import tomllib

    try:
        value = tomllib.loads(text)
    except RecursionError:
        raise _too_deep(source) from None
    check_nesting(value, source)
    return value


def expand_pattern(pattern: str) -> list[Path]:
    """The files a glob pattern names, sorted (the pattern itself when a file has that literal name)."""
    if any(ch in pattern for ch in "*?[") and not Path(pattern).exists():
        return [Path(m) for m in sorted(glob.glob(pattern))]
    return [Path(pattern)]


def folder_roots(folder: Path) -> list[Path]:
    """Where the files of a model folder may really live: the folder itself, and for a snapshot of the
    Hugging Face hub cache (`…/snapshots/REV/file -> ../../blobs/HASH`) that cache's blobs."""
    folder = Path(folder).resolve()
    roots = [folder]
    if folder.parent.name == "snapshots":
        roots.append(folder.parent.parent / "blobs")
    return roots


def copyable_reason(path: Path, folder: Path) -> str | None:
    """Why a file of someone else's folder must not be copied into an output (None: it may): a link
    that leaves the folder (`README.md -> ~/.aws/credentials` or `/proc/self/environ` would land in the
    output, which CI uploads as an artifact), or something that is not a regular file."""
    target = path.resolve()
    if not any(target.is_relative_to(root) for root in folder_roots(folder)):
        return f"a link to {target}, outside the model's folder"
    try:
        mode = target.stat().st_mode
    except OSError as exc:
        return f"cannot read it ({exc.strerror})"
    if not stat.S_ISREG(mode):
        return special_kind(mode) or "not a regular file"
    return None


def copy_folder_file(source: Path, destination: Path, folder: Path) -> str | None:
    """Copy SOURCE, a file of the input folder FOLDER, to DESTINATION when `copyable_reason` allows it;
    returns a note naming what was left out instead."""
    import shutil

    reason = copyable_reason(source, folder)
    if reason is not None:
        return f"{source.name} not copied: {reason}; copy it yourself if you trust it"
    try:
        shutil.copy2(source.resolve(), destination)
    except OSError as exc:
        raise _disk_error(destination, exc) from None
    return None


# --- the output guard ------------------------------------------------------------------------------


def _identity(path: Path) -> tuple[Path, tuple[int, int] | None]:
    try:
        resolved = path.resolve()
    except ValueError:  # a NUL byte: only a settings file can carry one (argv cannot)
        raise UserError(f"{str(path)!r}: not a usable file name") from None
    try:
        info = path.stat()
    except OSError:
        return resolved, None
    return resolved, (info.st_dev, info.st_ino)


def _expand_input(path: Path) -> Iterable[Path]:
    if path.is_dir():
        for count, child in enumerate(path.rglob("*")):
            if count >= MAX_FOLDER_FILES:
                return
            if child.is_file():
                yield child
        yield path
    else:
        yield path


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (resolved path, or one inode: symlinks and hard links)."""
    resolved_a, inode_a = _identity(Path(a))
    resolved_b, inode_b = _identity(Path(b))
    return resolved_a == resolved_b or (inode_a is not None and inode_a == inode_b)


def guard_outputs(outputs: Sequence[Role], inputs: Sequence[Role]) -> None:
    """Exit 2, before anything is read or written, when an output is one of the inputs (a folder input
    counts file by file) or another output — compared by resolved path (symlinks) and by inode (hard
    links). Outputs of None or '-' (stdout) are skipped; inputs may be globs (as `--data` takes them)."""
    known: list[tuple[str, Path, Path, tuple[int, int] | None]] = []
    for label, value in inputs:
        if not value:
            continue
        for pattern_match in expand_pattern(str(value)):
            for path in _expand_input(pattern_match):
                resolved, inode = _identity(path)
                known.append((label, path, resolved, inode))
    for label, value in outputs:
        if not value or str(value) == "-":
            continue
        out = Path(value)
        check_writable(label, out)
        resolved, inode = _identity(out)
        for other_label, other, other_resolved, other_inode in known:
            if resolved == other_resolved or (inode is not None and inode == other_inode):
                raise UserError(
                    f"{label} {value}: is the same file as {other_label} {other}; "
                    "refusing to overwrite it (nothing was written); choose another path"
                )
        known.append((label, out, resolved, inode))


def check_writable(label: str, out: Path) -> None:
    """An output whose folder is missing or read-only, or that is a folder itself, is refused up front,
    not after an hour of scanning (`--output` of a folder fix is a folder that does not exist yet)."""
    directory = out.parent if str(out.parent) else Path(".")
    if not directory.is_dir():
        raise UserError(
            f"{label} {out}: directory {directory} does not exist (nothing was done); create it first"
        )
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UserError(f"{label} {out}: cannot write in {directory} (permission denied; nothing was done)")
    if out.is_dir() and label != "--output":
        raise UserError(f"{label} {out}: is a directory; give a file name")


def check_companion_free(final: Path, output: str | Path) -> None:
    """A file written beside OUT (a training checkpoint's optimizer.pt) never replaces one already there."""
    if final.exists() or final.is_symlink():
        raise UserError(
            f"--output {output}: {final} exists already and the fixed checkpoint's {final.name} would replace "
            "it (nothing was written); write the fixed checkpoint into another folder"
        )


def refuse_overwrite_of_inputs(output: str | Path, inputs: list[str | Path]) -> None:
    """One output against plain input paths (kept for callers that have no labels)."""
    guard_outputs([("output", output)], [("an input", source) for source in inputs])


# --- writing ---------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


TEMP_NAME = re.compile(r"^\.(?P<stem>.*)\.tmp\.[^.]+(?P<suffix>.*)$")  # what temp_path_for makes


def _disk_error(path: str | Path, exc: OSError) -> UserError:
    path = Path(path)
    temp = TEMP_NAME.match(path.name)
    shown = path.with_name(temp["stem"] + temp["suffix"]) if temp else path  # the file the user named
    return UserError(f"{shown}: write failed ({exc.strerror or exc}); nothing was written")


def require_temp_folder(what: str) -> None:
    """WHAT (torch's TorchScript and torch.export loaders, its compiler, matplotlib) needs a writable
    temporary folder; without one (a read-only container with no tmpfs) each failed in its own way: an
    ExportedProgram "truncated", TorchScript data that "does not fit", an internal error. Say it once."""
    try:
        tempfile.gettempdir()
    except FileNotFoundError:  # tempfile found no folder it can write to
        raise UserError(
            f"{what} needs a writable temporary folder and there is none (/tmp, /var/tmp, the current "
            "folder are read-only): set TMPDIR to a writable folder, e.g. TMPDIR=$PWD/build"
        ) from None


def temp_folder_for(target: str | Path) -> Path:
    """A new empty folder beside TARGET with the permissions a plain mkdir() would give (not mkdtemp's 0700)."""
    target = Path(target)
    directory = target.parent if str(target.parent) else Path(".")
    try:
        folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=directory))
    except OSError as exc:
        raise UserError(f"--output {target}: cannot write there ({exc.strerror})") from None
    folder.chmod(0o777 & ~_umask())
    return folder


def give_umask_permissions(folder: Path) -> None:
    """The files of a folder this run wrote get the permissions a plain open() would give: writers such
    as safetensors' save_file create theirs 0600 whatever the umask, unreadable to a model server."""
    mode = 0o666 & ~_umask()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def temp_path_for(target: str | Path, label: str = "") -> Path:
    """An empty temp file beside TARGET with the permissions a plain open() would give (not mkstemp's 0600)."""
    target = Path(target)
    directory = target.parent if str(target.parent) else Path(".")
    prefix = f"{label} " if label else ""
    if not directory.is_dir():
        raise UserError(f"{prefix}{target}: directory {directory} does not exist")
    try:
        handle, name = tempfile.mkstemp(prefix=f".{target.stem}.tmp.", suffix=target.suffix, dir=directory)
    except OSError as exc:
        raise UserError(f"{prefix}{target}: cannot write here ({exc.strerror})") from None
    try:
        os.fchmod(handle, 0o666 & ~_umask())
    finally:
        os.close(handle)
    return Path(name)


def commit_temp(temp: Path, target: str | Path) -> None:
    """Rename a finished temp file over TARGET (atomic on one file system)."""
    try:
        os.replace(temp, target)
    except OSError as exc:
        raise _disk_error(target, exc) from None


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write through a temp file in the target directory, then rename over the target; a failed
    write (a full disk included) is exit 2 with one line and leaves neither the target nor a temp file."""
    tmp = temp_path_for(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise _disk_error(path, exc) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write DATA to PATH (a temp file the caller owns); a full disk is exit 2 with one line."""
    try:
        with open(path, "wb") as handle:
            handle.write(data)
    except OSError as exc:
        raise _disk_error(path, exc) from None


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def append_text(path: str | Path, text: str) -> None:
    """Append to a file someone else owns (GitHub's step summary); a failure is exit 2 with one line."""
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as exc:
        raise UserError(f"{path}: cannot append ({exc.strerror or exc})") from None
