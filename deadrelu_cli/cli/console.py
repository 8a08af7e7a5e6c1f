"""The one way commands make a Rich console: full-width rows in CI logs and pipes, not 80 columns."""

from __future__ import annotations

import os
import sys

from rich.console import Console

# Without a terminal Rich assumes 80 columns and folds or drops table columns; a log is read whole.
UNBOUNDED_WIDTH = 4096


class _TableConsole(Console):
    """A console that never prints a table narrower than its columns' minimum (their longest word): at
    COLUMNS=30 Rich cut numbers to "66…" and names to "/r…"; a line longer than the window loses nothing."""

    def print(self, *objects, **kwargs):
        from rich.measure import Measurement
        from rich.table import Table

        tables = [o for o in objects if isinstance(o, Table)]
        if not tables or kwargs.get("width") is not None:
            return super().print(*objects, **kwargs)
        options = self.options.update_width(1 << 16)
        needed = max(Measurement.get(self, options, table).minimum for table in tables)
        if needed <= self.width:
            return super().print(*objects, **kwargs)
        narrow, self.width = self.width, needed
        try:
            return super().print(*objects, **kwargs)
        finally:
            self.width = narrow


def make_console(stderr: bool = False, soft_wrap: bool = False) -> Console:
    """A console for tables and messages: the terminal's width on a TTY, `$COLUMNS` when set, else unbounded."""
    # emoji=False: Rich turns `:warning:` into ⚠ even where markup is escaped, so a layer named
    # `x:warning:y` would show as another name (deadrelu writes no emoji codes of its own)
    console = _TableConsole(stderr=stderr, highlight=False, soft_wrap=soft_wrap, emoji=False)
    columns = os.environ.get("COLUMNS", "").strip()
    # COLUMNS=0 (a pseudo-terminal without a size: `docker exec -t`, some runners) is no width: Rich
    # took it as 0 and printed nothing but the table, not even the gate's verdict or an error
    sized = columns.isdigit() and int(columns) > 0
    if not on_a_terminal(console) and not sized:
        console.width = UNBOUNDED_WIDTH
    elif not sized and console.width < 1:
        import shutil

        console.width = shutil.get_terminal_size().columns  # asks the terminal when COLUMNS is 0
    return console


def survive_narrow_encodings() -> None:
    """A log that is not UTF-8 (PYTHONIOENCODING=ascii, a Windows runner's cp1252 pipe) cannot hold the
    table's bars and dots: they become '?' instead of an internal error. Rich draws its borders in ASCII
    there by itself; JSON on stdout is ASCII already, so no name in it changes."""
    import codecs

    for stream in (sys.stdout, sys.stderr):
        encoding = getattr(stream, "encoding", None)
        try:
            utf8 = encoding is not None and codecs.lookup(encoding).name.startswith("utf")
        except LookupError:
            utf8 = False
        if not utf8 and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


def on_a_terminal(console: Console) -> bool:
    """Whether the console writes to a real terminal. Rich calls any stream a terminal under FORCE_COLOR
    (set in CI for coloured logs): colours are then kept, but a log gets no progress animation and its
    tables keep their full width."""
    isatty = getattr(console.file, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False
