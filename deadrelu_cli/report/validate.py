"""A report read from disk is untrusted: check it against its JSON schema and for consistency before
anything uses it (gate, merge, diff, report, --baseline). A failure names the field, exit 2."""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path
from typing import Any

from deadrelu_cli.errors import UserError

MAX_DEPTH = 16  # a report nests 4 levels; `extra` may add a few
MAX_INT = 2**53  # counts beyond this are not counts (and lose exactness in float64)


@cache
def _schema(version: int) -> dict:
    return json.loads(Path(__file__).with_name(f"schema_v{version}.json").read_text(encoding="utf-8"))


def _field(path) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, dict | list))
    return deepest


class _Bad(Exception):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"field {field}: {problem}")


def _count(value: Any, field: str, upper: int | None = None, upper_name: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(field, f"{value!r} is not an integer")
    if value < 0:
        raise _Bad(field, f"{value} is negative")
    if value > MAX_INT:
        raise _Bad(field, f"{value} is larger than any count")
    if upper is not None and value > upper:
        raise _Bad(field, f"{value} is more than {upper_name} ({upper})")
    return value


def _array(layer: dict, key: str, units: int, where: str, optional: bool = False) -> list | None:
    value = layer.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, list):
        raise _Bad(f"{where}.{key}", "missing or not an array")
    if len(value) != units:
        raise _Bad(f"{where}.{key}", f"has {len(value)} entries for {units} units")
    return value


def _finite(value: Any, field: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _Bad(field, f"{value!r} is not a finite number")


def _check_layer(layer: dict, i: int) -> None:
    where = f"layers[{i}]"
    units = _count(layer.get("units"), f"{where}.units")
    elements = _count(layer.get("elements_per_unit"), f"{where}.elements_per_unit")
    for j, v in enumerate(_array(layer, "positive_counts", units, where)):
        _count(v, f"{where}.positive_counts[{j}]", elements, "elements_per_unit")
    for j, v in enumerate(_array(layer, "saturated_counts", units, where, optional=True) or []):
        _count(v, f"{where}.saturated_counts[{j}]", elements, "elements_per_unit")
    for j, v in enumerate(_array(layer, "max_preactivation", units, where)):
        _finite(v, f"{where}.max_preactivation[{j}]", allow_none=True)
    for j, v in enumerate(_array(layer, "sum_abs", units, where)):
        _finite(v, f"{where}.sum_abs[{j}]")
        if v < 0:
            raise _Bad(f"{where}.sum_abs[{j}]", f"{v} is negative")
    for j, v in enumerate(_array(layer, "bias", units, where, optional=True) or []):
        _finite(v, f"{where}.bias[{j}]")
    bounds = _array(layer, "upper_bound", units, where, optional=True) if layer.get("upper_bound") else None
    for j, v in enumerate(bounds or []):
        _finite(v, f"{where}.upper_bound[{j}]", allow_none=True)
    for key in (
        "dead_indices",
        "dying_indices",
        "dormant_indices",
        "saturated_indices",
        "certified_dead_indices",
    ):
        indices = layer.get(key)
        if indices is None:
            continue
        if not isinstance(indices, list) or len(indices) > units:
            raise _Bad(f"{where}.{key}", f"holds more indices than the {units} units")
        for j, v in enumerate(indices):
            _count(v, f"{where}.{key}[{j}]", units - 1, "the last unit")
    if not isinstance(layer.get("channel_dim"), int) or abs(layer["channel_dim"]) > 64:
        raise _Bad(f"{where}.channel_dim", f"{layer.get('channel_dim')!r} is not an axis")


def _check_consistency(d: dict) -> None:
    settings = d.get("settings", {})
    for key in ("threshold", "dying", "tau"):
        _finite(settings.get(key), f"settings.{key}")
    if not 0.0 <= settings["dying"] <= 1.0:
        raise _Bad("settings.dying", f"{settings['dying']} is outside [0, 1]")
    if settings["tau"] < 0:
        raise _Bad("settings.tau", f"{settings['tau']} is negative")
    _count(d.get("data", {}).get("samples"), "data.samples")
    layers = d.get("layers")
    if not isinstance(layers, list):
        raise _Bad("layers", "missing or not an array")
    names: dict[Any, int] = {}
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict):
            raise _Bad(f"layers[{i}]", "is not an object")
        _check_layer(layer, i)
        # every command finds a layer by its name (gate, diff, trend, --layer): call sites are unique
        if layer.get("name") in names:
            raise _Bad(
                f"layers[{i}].name", f"{layer['name']!r} is also the name of layers[{names[layer['name']]}]"
            )
        names[layer.get("name")] = i


def validate_report(d: Any, source: str, version: int) -> None:
    """Raise UserError (exit 2, naming the field) unless D is a well-formed, self-consistent report."""
    import jsonschema

    hint = "re-create it with `deadrelu scan … --json`"
    if _depth(d) > MAX_DEPTH:
        raise UserError(f"{source}: nested deeper than a deadrelu report ({MAX_DEPTH} levels); {hint}")
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(_schema(version)).iter_errors(d))
    if error is not None:
        problem = " ".join(error.message.split())
        problem = problem if len(problem) <= 160 else problem[:159] + "…"
        raise UserError(
            f"{source}: not a valid deadrelu report: field {_field(error.absolute_path)}: {problem}; {hint}"
        )
    try:
        _check_consistency(d)
    except _Bad as exc:
        raise UserError(f"{source}: inconsistent deadrelu report: {exc}; {hint}") from None


def reject_constant(name: str):
    """json.loads(parse_constant=…): NaN and Infinity are not JSON and never in a report."""
    raise ValueError(f"{name} is not a valid JSON number")
