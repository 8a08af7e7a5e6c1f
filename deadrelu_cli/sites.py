"""The activation sites of a model without calibration data (for `deadrelu inspect`)."""

from __future__ import annotations

from deadrelu_cli.errors import UserError
from deadrelu_cli.probe.exported import StaticSite


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(part) for part in text.lower().replace(",", "x").split("x") if part)
    except ValueError:
        raise UserError(
            f"--input-shape {text!r}: expected sizes like 3x32x32 (one sample, no batch axis)"
        ) from None
    if not dims or any(d < 1 for d in dims):
        raise UserError(f"--input-shape {text!r}: sizes must be positive")
    return dims


def guess_input_shape(module) -> tuple[int, ...] | None:
    """One sample's shape when the model starts with a Linear (its in_features); None otherwise."""
    from torch import nn

    first = next(
        (m for m in module.modules() if isinstance(m, nn.Linear | nn.modules.conv._ConvNd | nn.Embedding)),
        None,
    )
    return (first.in_features,) if isinstance(first, nn.Linear) else None


def _eager_sites(
    model, ops, input_shape: tuple[int, ...] | None
) -> tuple[list[StaticSite], list[tuple[str, str]]]:
    import torch

    from deadrelu_cli.probe.base import ProbeSettings
    from deadrelu_cli.probe.eager import EagerProbe
    from deadrelu_cli.probe.ops import is_activation_module_type

    module = model.runnable
    if input_shape is None:
        input_shape = guess_input_shape(module)
    if input_shape is not None:
        probe = EagerProbe(module, ProbeSettings(ops=ops))
        sample = torch.zeros(
            (1, *input_shape),
            dtype=getattr(torch, model.float_dtype),
            device=next(iter(module.parameters()), torch.zeros(0)).device,
        )
        with probe.attached(), torch.inference_mode():
            try:
                probe.run((sample,))
            except Exception as exc:
                raise UserError(
                    f"a zero sample of shape {list(sample.shape)} failed in the model ({str(exc).splitlines()[0]}); check --input-shape"
                ) from None
        from deadrelu_cli.causes import structural_checks

        findings = structural_checks(model, probe)
        notes = [("warning", f"{f.kind}: {f.message}") for f in findings] + hidden_notes(probe.hidden)
        return [
            StaticSite(s.name, s.op, False, s.module_type or "", None, s.producer)
            for s in probe.registry.sites.values()
        ], notes
    sites = []
    for name, sub in module.named_modules():
        qualified = f"{type(sub).__module__}.{type(sub).__qualname__}"
        if is_activation_module_type(qualified):
            op = {
                "ReLU": "relu",
                "ReLU6": "relu6",
                "LeakyReLU": "leaky_relu",
                "ELU": "elu",
                "GELU": "gelu",
                "SiLU": "silu",
            }.get(type(sub).__name__)
            if op in ops:
                sites.append(StaticSite(name, op, False, type(sub).__name__, None, None))
    return (
        sites,
        [
            (
                "note",
                "activation modules only: functional relus and reuse at several call sites show once a forward runs; pass --input-shape",
            )
        ],
    )


def list_sites(
    path: str,
    arch: str | None,
    trust_pickle: bool,
    ops: tuple[str, ...],
    input_shape: str | None,
    weights_key: str | None = None,
):
    from deadrelu_cli.loaders import LoadOptions, check_weights_key, detect_format, load_model

    check_weights_key(path, detect_format(path), weights_key)
    if detect_format(path) == "onnx":
        from deadrelu_cli.probe.onnx_graph import onnx_sites

        sites = onnx_sites(path, ops)
        if sites:
            return sites, []
        import onnx

        from deadrelu_cli.backends.onnx.scan import no_sites_note_of

        # as scan says it: what the graph uses instead (0 sites alone reads like a finding)
        return sites, [("note", no_sites_note_of(onnx.load(path, load_external_data=False), ops))]
    model = load_model(LoadOptions(path, arch, trust_pickle, "cpu", weights_key=weights_key))
    sites, notes = _sites_of(model, ops, input_shape)
    if not sites and model.kind in ("eager", "exported"):
        from deadrelu_cli.backends.torch.scan import no_sites_note

        notes = [*notes, ("note", no_sites_note(model, ops))]
    return sites, notes


def _sites_of(model, ops: tuple[str, ...], input_shape: str | None):
    shape = parse_shape(input_shape) if input_shape else None
    if model.kind == "eager":
        return _eager_sites(model, ops, shape)
    from deadrelu_cli.probe.base import ProbeSettings

    if model.kind == "exported":
        from deadrelu_cli.probe.exported import find_sites, prepare_program
        from deadrelu_cli.probe.hidden import graph_hidden

        prepare_program(model.runnable)  # as the scan counts them
        sites = [site for _, site in find_sites(model.runnable.graph, ops)]
        return sites, hidden_notes(graph_hidden(model.runnable, ops))
    from deadrelu_cli.probe.torchscript import TorchScriptProbe

    probe = TorchScriptProbe(model.runnable, ProbeSettings(ops=ops))
    undecided = [site.name for site in probe.sites if site.clamp and site.channel_first is None]
    notes = hidden_notes(probe.hidden)
    if undecided:  # probe.ops.clamp_is_layer needs the clamped tensor's shape, known once it runs
        notes.append(
            (
                "note",
                f"{', '.join(undecided)}: a clamp no layer feeds; a scan counts it only if what it clamps "
                "has more than one unit (not a clamped loss, norm or variance)",
            )
        )
    return probe.sites, notes


def hidden_notes(hidden) -> list[tuple[str, str]]:
    """What `inspect` says about activations the scan will name as unseen rather than count."""
    from deadrelu_cli.gate import unseen_text

    if not hidden:
        return []
    return [
        (
            "note",
            f"not countable (a scan names them as unseen, and a gate fails on them): {unseen_text(dict(hidden))}",
        )
    ]
