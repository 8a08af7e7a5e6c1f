"""`--arch MODULE:FACTORY`: build the nn.Module that a state_dict belongs to."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from deadrelu_cli.errors import UserError


def _import_module(spec: str):
    candidate = Path(spec)
    if spec.endswith(".py") or candidate.is_file():
        if not candidate.is_file():
            raise UserError(f"--arch: no such file {spec}")
        name = f"deadrelu_arch_{abs(hash(str(candidate.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(name, candidate)
        if module_spec is None or module_spec.loader is None:
            raise UserError(f"--arch: cannot import {spec}")
        module = importlib.util.module_from_spec(module_spec)
        sys.path.insert(0, str(candidate.resolve().parent))  # so the file can import its siblings
        # registered like any import (importlib's recipe): torch.compile / torch.cond (dynamo), pickle and
        # typing resolve the model's classes through sys.modules by their __module__
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise UserError(f"--arch: importing {spec} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            sys.path.pop(0)
        return module
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        raise UserError(
            f"--arch: cannot import module {spec!r} ({exc}); give an importable name or a path to a .py file"
        ) from exc
    except Exception as exc:
        raise UserError(f"--arch: importing {spec} failed: {type(exc).__name__}: {exc}") from exc


def build_from_arch(arch: str):
    """Import MODULE and call FACTORY() (a function or a class taking no arguments)."""
    from torch import nn

    module_part, sep, factory_name = arch.rpartition(":")
    if not sep or not module_part or not factory_name:
        raise UserError(
            f"--arch {arch!r}: expected MODULE:FACTORY, e.g. models.py:build or torchvision.models:resnet18"
        )
    module = _import_module(module_part)
    factory = getattr(module, factory_name, None)
    if factory is None or not callable(factory):
        available = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))[
            :8
        ]
        raise UserError(
            f"--arch: {module_part} has no callable {factory_name!r} (callables there: {', '.join(available)})"
        )
    try:
        model = factory()
    except Exception as exc:
        raise UserError(f"--arch: {factory_name}() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise UserError(f"--arch: {factory_name}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def arch_file(arch: str | None) -> str | None:
    """The .py file an --arch spec imports (None for an importable module name)."""
    if not arch:
        return None
    module_part = arch.rpartition(":")[0]
    return module_part if module_part and Path(module_part).is_file() else None
