"""The one way commands make a Rich console: full-width rows in CI logs and pipes, not 80 columns."""

from __future__ import annotations

import os

from rich.console import Console

# Without a terminal Rich assumes 80 columns and folds or drops table columns; a log is read whole.
UNBOUNDED_WIDTH = 4096


def make_console(stderr: bool = False, soft_wrap: bool = False) -> Console:
    """A console for tables and messages: the terminal's width on a TTY, `$COLUMNS` when set, else unbounded."""
    # emoji=False: Rich turns `:warning:` into ⚠ even where markup is escaped, so a layer named
    # `x:warning:y` would show as another name (deadrelu writes no emoji codes of its own)
    console = Console(stderr=stderr, highlight=False, soft_wrap=soft_wrap, emoji=False)
    if not console.is_terminal and not os.environ.get("COLUMNS", "").strip().isdigit():
        console.width = UNBOUNDED_WIDTH
    return console
