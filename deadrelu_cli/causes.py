"""Why a unit is dead (`scan --explain`), structural checks that need no data, and what to do about both.

Each rule and its formula is documented in docs/causes.md. The rules read the saved weights and the
scan's own statistics (max pre-activation), so they cost no extra pass over the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CAUSES = ("starved", "collapsed weights", "batchnorm shift", "negative bias", "direction", "unknown")

ADVICE = {
    "negative bias": [
        "a lower learning rate or a warm-up",
        "a small positive bias initialisation (e.g. 0.1)",
        "gradient clipping",
        "fix: `deadrelu fix … --strategy bias-shift` or `--strategy reinit`",
    ],
    "collapsed weights": [
        "exclude biases (and norms) from weight decay",
        "a smaller weight decay",
        "fix: `deadrelu fix … --strategy reinit` (ReDo) or `--strategy kick`",
    ],
    "batchnorm shift": [
        "check BatchNorm's beta/gamma under weight decay",
        "a lower learning rate",
        "fix: `deadrelu fix … --strategy bias-shift` (raises beta) or `--strategy reinit`",
    ],
    "starved": [
        "fix the layer feeding it first (its inputs are dead)",
        "fix: run `deadrelu fix` on the upstream layer",
    ],
    "direction": [
        "He (Kaiming) initialisation",
        "Leaky ReLU or ELU",
        "Adam instead of plain SGD",
        "fix: `deadrelu fix … --strategy leaky` or `--strategy reinit`",
    ],
    "unknown": ["Leaky ReLU or ELU", "fix: `deadrelu fix … --strategy leaky`"],
}


@dataclass
class Finding:
    """A structural problem found without data."""

    kind: str
    where: str
    message: str


def _median_positive(values: np.ndarray) -> float:
    return float(np.median(values)) if values.size else 0.0


def explain_layer(
    layer, module, model, probe, dead_by_site: dict[str, set[int]], units_by_site: dict[str, int]
) -> dict[int, str]:
    """Cause of each dead unit of one layer (eager torch models)."""
    import torch
    from torch import nn

    dead = np.flatnonzero(layer.dead_mask()).astype(int).tolist()
    if not dead:
        return {}
    if layer.producer is None or module is None:
        return dict.fromkeys(dead, "unknown")
    producer = model.get_submodule(layer.producer)
    causes: dict[int, str] = {}
    max_pre = layer.max_preactivation
    if isinstance(producer, nn.modules.batchnorm._BatchNorm):
        gamma = (
            producer.weight.detach().double().cpu().numpy()
            if producer.weight is not None
            else np.ones(layer.units)
        )
        beta = (
            producer.bias.detach().double().cpu().numpy()
            if producer.bias is not None
            else np.zeros(layer.units)
        )
        tiny = 1e-3 * _median_positive(np.abs(gamma)) + 1e-12
        for unit in dead:
            if beta[unit] <= 0 and (abs(gamma[unit]) <= tiny or max_pre[unit] - beta[unit] > 0):
                causes[unit] = "batchnorm shift"
            else:
                causes[unit] = "direction"
        return causes
    if not isinstance(producer, nn.Linear | nn.modules.conv._ConvNd):
        return dict.fromkeys(dead, "unknown")
    weight = producer.weight.detach().double().cpu()
    rows = weight.reshape(weight.shape[0], -1)
    norms = torch.linalg.vector_norm(rows, dim=1).numpy()
    bias = (
        producer.bias.detach().double().cpu().numpy() if producer.bias is not None else np.zeros(layer.units)
    )
    median = _median_positive(norms)
    upstream_site = next(
        (site for site, consumers in getattr(probe, "consumers", {}).items() if layer.producer in consumers),
        None,
    )
    upstream_dead = dead_by_site.get(upstream_site) if upstream_site else None
    upstream_units = units_by_site.get(upstream_site, 0) if upstream_site else 0
    for unit in dead:
        if upstream_dead is not None and upstream_units:
            # which upstream units this unit reads (weight != 0): all of them dead -> starved
            per_unit = (
                producer.in_features // upstream_units
                if isinstance(producer, nn.Linear)
                else int(np.prod(producer.kernel_size))
            )
            used = {int(i) // max(1, per_unit) for i in torch.nonzero(rows[unit]).flatten().tolist()}
            if used <= upstream_dead:
                causes[unit] = "starved"
                continue
        if norms[unit] < 0.1 * median and bias[unit] <= 0:
            causes[unit] = "collapsed weights"
        elif bias[unit] <= 0 and max_pre[unit] - bias[unit] > 0:
            causes[unit] = "negative bias"
        else:
            causes[unit] = "direction"
    return causes


def explain(report, model_loaded, probe) -> None:
    """Store each dead unit's cause in layer.extra['causes'] (unit -> cause) and the counts per cause."""
    if model_loaded is None or model_loaded.kind != "eager":
        report.notes.append(
            "--explain: causes are worked out for eager models (state_dict/safetensors with --arch)"
        )
        return
    model = model_loaded.runnable
    dead_by_site = {layer.name: set(np.flatnonzero(layer.dead_mask()).tolist()) for layer in report.layers}
    units_by_site = {layer.name: layer.units for layer in report.layers}
    for layer in report.layers:
        causes = explain_layer(layer, model, model, probe, dead_by_site, units_by_site)
        if causes:
            layer.extra["causes"] = {str(unit): cause for unit, cause in sorted(causes.items())}
            counts: dict[str, int] = {}
            for cause in causes.values():
                counts[cause] = counts.get(cause, 0) + 1
            layer.extra["cause_counts"] = counts


def structural_checks(model_loaded, probe) -> list[Finding]:
    """Problems visible without data: ReLU on the output or before a softmax, BN channels that are
    constant, units whose incoming weights are all zero."""
    import torch
    from torch import nn

    findings: list[Finding] = []
    if model_loaded is None or model_loaded.kind != "eager":
        return findings
    model = model_loaded.runnable
    for site in getattr(probe, "final_output_sites", set()):
        findings.append(
            Finding(
                "relu-on-output",
                site,
                f"{site} applies a ReLU to the model's output: outputs can never be "
                "negative, and units stuck at 0 give no gradient; put the activation before the last layer",
            )
        )
    for site, consumers in getattr(probe, "consumers", {}).items():
        for consumer in consumers:
            if consumer.strip("<>") in ("softmax", "log_softmax", "_softmax", "layer_norm", "normalize"):
                findings.append(
                    Finding(
                        "relu-before-softmax",
                        site,
                        f"{site} feeds a {consumer.strip('<>')}: probabilities "
                        "of units at 0 can become exactly 0 and the loss infinite; use softmax on raw scores",
                    )
                )
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
            constant = torch.nonzero(module.weight.detach() == 0).flatten().tolist()
            if constant:
                findings.append(
                    Finding(
                        "constant-bn",
                        name,
                        f"{name}: channels {constant[:8]} have gamma = 0 and output "
                        "the constant beta for every input",
                    )
                )
        if isinstance(module, nn.Linear | nn.modules.conv._ConvNd):
            rows = module.weight.detach().reshape(module.weight.shape[0], -1)
            zero = torch.nonzero((rows == 0).all(dim=1)).flatten().tolist()
            if zero:
                findings.append(
                    Finding(
                        "zero-weights",
                        name,
                        f"{name}: units {zero[:8]} have all incoming weights = 0 "
                        "(their output is the bias alone)",
                    )
                )
    return findings
