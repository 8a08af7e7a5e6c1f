"""Untrusted text (layer, node, input and file names from a model or a report) made safe where it is shown.

A name comes from the file being scanned, so it may hold terminal escape sequences, newlines that
forge a line of CI output (`\\n::warning …`), Rich markup, Markdown or XML-invalid characters. Every
renderer passes names through the one function for its medium; JSON keeps the exact name.
"""

from __future__ import annotations

import unicodedata

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Characters that move the cursor, end a line or reorder text: C0/C1 controls, DEL, format characters
# (bidi overrides, zero-width), line and paragraph separators.
_UNSAFE_CATEGORIES = ("Cc", "Cf", "Zl", "Zp")


def _escape_char(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def terminal_text(text: object, keep: str = "") -> str:
    """TEXT with every control, format and line-separator character written as a visible escape
    (`\\x1b`, `\\n`, `\\u202e`); characters in KEEP are left as they are."""
    value = str(text)
    if value.isprintable() and not keep:  # the common case: nothing to do
        return value
    return "".join(
        _escape_char(ch) if ch not in keep and unicodedata.category(ch) in _UNSAFE_CATEGORIES else ch
        for ch in value
    )


def html_text(text: object) -> str:
    """For HTML text and attribute values: escaped controls (as the terminal shows them), then `<>&"'`."""
    import html

    return html.escape(terminal_text(text), quote=True)


def rich_text(text: object) -> str:
    """For a Rich renderable that parses markup (table cells): escaped controls and escaped `[…]`."""
    from rich.markup import escape

    return escape(terminal_text(text))


def markdown_code(text: object, in_table: bool = False) -> str:
    """A Markdown code span showing TEXT literally; IN_TABLE: in a GFM table cell, whose `|` ends the cell
    even in a code span unless escaped (elsewhere the backslash would show)."""
    value = terminal_text(text)
    if in_table:
        value = value.replace("|", "\\|")
    longest = run = 0
    for ch in value:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * (longest + 1)
    pad = " " if value.startswith("`") or value.endswith("`") else ""
    return f"{fence}{pad}{value}{pad}{fence}"


_MARKDOWN_SPECIAL = set("\\`*_[]<>|~&")  # inline specials (text never starts a line here)


def markdown_text(text: object) -> str:
    """TEXT as literal Markdown prose (every character that Markdown or a GFM table reads is escaped)."""
    return "".join("\\" + ch if ch in _MARKDOWN_SPECIAL else ch for ch in terminal_text(text))


def xml_text(text: object) -> str:
    """For XML text and attributes (ElementTree escapes <, &, quotes): no characters XML 1.0 forbids."""
    return terminal_text(text)


def github_message(text: object) -> str:
    """The message of a GitHub workflow command (`::error …::MESSAGE`): %, CR and LF percent-encoded
    as the runner decodes them, other controls escaped, so nothing starts a new command line."""
    value = terminal_text(text, keep="\r\n")
    return value.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def github_property(text: object) -> str:
    """A property value of a workflow command (`title=…`): as a message, plus `:` and `,` encoded."""
    return github_message(text).replace(":", "%3A").replace(",", "%2C")


def shown_names(names) -> str:
    """The first five names of a list, comma-separated, "…" where more follow (a note's list of layers)."""
    names = list(names)
    return ", ".join(names[:5]) + (", …" if len(names) > 5 else "")
