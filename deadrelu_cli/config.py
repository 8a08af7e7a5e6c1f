"""Settings from `[tool.deadrelu]` in the nearest pyproject.toml, or a deadrelu.toml; flags override them."""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deadrelu_cli.errors import UserError
from deadrelu_cli.files import parse_toml

# key in the file -> (parameter name in the CLI, expected type)
KEYS: dict[str, tuple[str, type | tuple[type, ...]]] = {
    "max-dead": ("max_dead", (int, float)),
    "max-dead-layer": ("max_dead_layer", (int, float)),
    "layer-limits": ("layer_limit", dict),
    "max-dead-units": ("max_dead_units", int),
    "baseline": ("baseline", str),
    "max-increase": ("max_increase", (int, float)),
    "allow-no-sites": ("allow_no_sites", bool),
    "allow-unseen": ("allow_unseen", bool),
    "allow-unpaired": ("allow_unpaired", bool),
    "batch-size": ("batch_size", (int, str)),
    "limit": ("limit", int),
    "device": ("device", str),
    "threshold": ("threshold", (int, float)),
    "dying": ("dying", (int, float)),
    "tau": ("tau", (int, float)),
    "ops": ("ops", (str, list)),
    "channel-dim": ("channel_dim", int),
    "junit": ("junit", str),
    "markdown": ("markdown", str),
}


@dataclass
class FileConfig:
    path: Path | None = None
    values: dict[str, Any] = field(default_factory=dict)  # CLI parameter name -> value
    skipped: list[str] = field(default_factory=list)  # files passed over on the way up, and why


def find_config(start: Path | None = None, skipped: list[str] | None = None) -> Path | None:
    """The nearest deadrelu.toml, or pyproject.toml that has a [tool.deadrelu] table, from START upwards.
    SKIPPED, when given, collects a line for each unreadable pyproject.toml passed over (see below)."""
    directory = (start or Path.cwd()).resolve()
    for folder in (directory, *directory.parents):
        own = folder / "deadrelu.toml"
        pyproject = folder / "pyproject.toml"
        if own.is_file():
            if pyproject.is_file() and _table(pyproject, required=False) is not None:
                # two sets of limits for one folder: using either one silently ignores the other
                raise UserError(
                    f"{folder}: both deadrelu.toml and pyproject.toml [tool.deadrelu] hold settings; keep one, "
                    "or pass --config FILE"
                )
            return _trusted(own, directory)
        if pyproject.is_file() and _pyproject_table(pyproject, directory, skipped) is not None:
            return _trusted(pyproject, directory)
    return None


def _pyproject_table(path: Path, start: Path, skipped: list[str] | None) -> dict | None:
    """A pyproject.toml on the way up is read to see whether it has our table. One that cannot be read
    stops the command when it is ours (its [tool.deadrelu] limits would be lost: a gate must not pass on
    defaults), but is passed over with a warning when someone else could have put it there (an invalid
    /tmp/pyproject.toml planted by another user would otherwise stop every run under /tmp)."""
    try:
        return _table(path, required=False)
    except UserError as exc:
        try:
            _trusted(path, start)
        except UserError:
            if skipped is not None:
                skipped.append(f"{exc}; not ours to use (another user could have written it), passed over")
            return None
        raise UserError(f"{exc}; fix it, or pass --config FILE to read settings from elsewhere") from None


def _trusted(path: Path, start: Path) -> Path:
    """A settings file found by looking upwards is used only if no one could have put it there who could
    not also have changed the folder we run in (START): a /tmp/deadrelu.toml planted by another user
    would set the limits of every run under /tmp. So it is refused when
    * another user owns it: not us, not root, not its folder's owner (who can replace any file in it:
      root in a container reading a checkout that the runner's uid 1001 owns), or
    * it or its folder is writable by others, unless START is too, without the sticky bit: in a folder
      anyone may change (GitLab's Docker executor checks out with umask 0000) the models, data and
      --arch code are no safer than the settings; in /tmp (sticky) only the settings file could be
      someone else's. --config names a file anyway."""
    import os
    import stat

    if os.name != "posix":  # Windows: st_mode says 0o666/0o777 for every writable file (ACLs decide)
        return path
    info, folder, here = path.stat(), path.parent.stat(), start.stat()
    foreign = info.st_uid not in (os.geteuid(), 0, folder.st_uid)
    open_here = here.st_mode & stat.S_IWOTH and not here.st_mode & stat.S_ISVTX
    others = (info.st_mode | folder.st_mode) & stat.S_IWOTH and not open_here
    if others or foreign:
        why = "it or its folder is writable by other users" if others else "another user owns it"
        raise UserError(
            f"{path}: a settings file found by looking upwards from here, but {why}; pass --config {path} to "
            "use it, or remove it"
        )
    return path


def _table(path: Path, required: bool = True) -> dict | None:
    try:
        document = parse_toml(path.read_text(encoding="utf-8"), path)
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: invalid TOML ({exc})") from None
    table = document.get("tool", {}).get("deadrelu")
    if table is None and path.name == "deadrelu.toml":
        table = {k: v for k, v in document.items() if k != "tool"}
    if table is None and required:
        raise UserError(f"{path}: has no [tool.deadrelu] table")
    return table


def check_inside(path: Path, key: str, value: str) -> None:
    """A file a settings file names (an output it writes, the baseline it reads) stays inside the file's
    folder (links resolved): the file may come with someone else's checkout, and `junit =
    "../../.bashrc"` would replace a file of yours with text that carries the model's layer names, and
    `baseline = "/abs/other-project/report.json"` would gate a pull request against a report it chose
    from outside the checkout. On the command line (--junit, --baseline) any path is yours to give."""
    folder = path.parent.resolve()
    try:
        inside = not Path(value).is_absolute() and (folder / value).resolve().is_relative_to(folder)
    except (OSError, ValueError):  # a NUL byte, a link loop
        raise UserError(f"{path}: {key} = {shown(value)} is not a usable file name") from None
    if not inside:
        raise UserError(
            f"{path}: {key} = {shown(value)} is outside the folder of the settings file; name a file inside "
            f"it, or give --{key} on the command line"
        )


def shown(value: Any, limit: int = 80) -> str:
    """A settings value as an error message quotes it: its repr (control characters as escapes, the
    terminal escapes the rest), cut to LIMIT characters — a 1 MB string is not a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def table_label(path: Path | str) -> str:
    """Where the settings sit in PATH, for messages: "[tool.deadrelu]", or "" for a deadrelu.toml that
    holds them at its top level (naming a table the file does not have would send the user looking)."""
    path = Path(path)
    if path.name != "deadrelu.toml":
        return "[tool.deadrelu]"
    try:
        document = parse_toml(path.read_text(encoding="utf-8"), path)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return ""
    return "[tool.deadrelu]" if isinstance(document.get("tool", {}).get("deadrelu"), dict) else ""


def load_config(explicit: str | None = None, start: Path | None = None) -> FileConfig:
    skipped: list[str] = []
    path = Path(explicit) if explicit else find_config(start, skipped)
    if path is None:
        return FileConfig(skipped=skipped)
    if not path.is_file():
        raise UserError(f"--config {explicit}: no such file")
    table = _table(path) or {}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in KEYS:
            close = difflib.get_close_matches(key.replace("_", "-"), list(KEYS), n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; known keys: {', '.join(KEYS)}"
            where = table_label(path)
            raise UserError(f"{path}: unknown key {key!r}{' in ' + where if where else ''}{hint}")
        name, expected = KEYS[key]
        # bool is an int to Python: true is no number, but it is the value of an allow-… key
        if (isinstance(value, bool) and expected is not bool) or not isinstance(value, expected):
            raise UserError(f"{path}: {key} = {shown(value)} has the wrong type")
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        item_type = (int, float) if key == "layer-limits" else str  # {glob = fraction}, [op names]
        if any(isinstance(item, bool) or not isinstance(item, item_type) for item in items):
            raise UserError(f"{path}: {key} = {shown(value)} has the wrong type")
        if key == "layer-limits":
            value = [f"{glob}={limit}" for glob, limit in value.items()]
        if key == "ops" and isinstance(value, list):
            value = ",".join(value)
        if key == "batch-size":
            value = str(value)
        if key in ("baseline", "junit", "markdown"):
            check_inside(path, key, value)
        if key in ("baseline", "junit", "markdown"):  # paths are relative to the config file
            value = str(path.parent / value) if not Path(value).is_absolute() else value
        values[name] = value
    return FileConfig(path=path, values=values, skipped=skipped)
