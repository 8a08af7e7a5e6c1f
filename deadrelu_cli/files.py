"""Safe writes: never a partial file, never the user's input overwritten."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from deadrelu_cli.errors import UserError


def refuse_overwrite_of_inputs(output: str | Path, inputs: list[str | Path]) -> None:
    out = Path(output).resolve()
    for source in inputs:
        if source and Path(source).exists() and Path(source).resolve() == out:
            raise UserError(f"{output}: refusing to overwrite an input file; choose another output path")


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write through a temp file in the target directory, then rename over the target."""
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise UserError(f"{path}: directory {directory} does not exist")
    try:
        handle, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise UserError(f"{path}: cannot write here ({exc.strerror})") from None
    os.close(handle)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions a plain open() would
    try:
        write(tmp)
        os.replace(tmp, target)
    except OSError as exc:
        raise UserError(f"{path}: write failed ({exc.strerror}); nothing was written") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
