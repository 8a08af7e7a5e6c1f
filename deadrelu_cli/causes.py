"""Why a unit is dead (`scan --explain`) and structural checks that need no data (the causes' names and
what to do about each: report/advice.py).

Each rule and its formula is documented in docs/causes.md. The rules read the saved weights and the
scan's own statistics (max pre-activation), so they cost no extra pass over the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deadrelu_cli.wiring.model import ProducerTensors, producer_tensors, upstream_sites


@dataclass
class Finding:
    """A structural problem found without data."""

    kind: str
    where: str
    message: str


def _median_positive(values: np.ndarray) -> float:
    return float(np.median(values)) if values.size else 0.0


def explain_layer(
    layer, producer: ProducerTensors | None, upstream_dead: set[int] | None = None, upstream_units: int = 0
) -> dict[int, str]:
    """Cause of each dead unit of one layer, from its producer's tensors and, for "starved", the dead
    units of the layer feeding the producer (docs/causes.md)."""
    dead = np.flatnonzero(layer.dead_mask()).astype(int).tolist()
    if not dead:
        return {}
    if producer is None or (producer.weight is None and producer.bias is None):
        return dict.fromkeys(dead, "unknown")
    causes: dict[int, str] = {}
    max_pre = layer.max_preactivation
    if producer.batchnorm:
        gamma = producer.weight if producer.weight is not None else np.ones(layer.units)
        beta = producer.bias if producer.bias is not None else np.zeros(layer.units)
        tiny = 1e-3 * _median_positive(np.abs(gamma)) + 1e-12
        for unit in dead:
            if beta[unit] <= 0 and (abs(gamma[unit]) <= tiny or max_pre[unit] - beta[unit] > 0):
                causes[unit] = "batchnorm shift"
            else:
                causes[unit] = "direction"
        return causes
    weight = producer.weight
    if weight is None or weight.ndim < 2 or weight.shape[0] != layer.units:  # not a Linear/Conv
        return dict.fromkeys(dead, "unknown")
    rows = weight.reshape(weight.shape[0], -1)
    norms = np.linalg.norm(rows, axis=1)
    bias_values = producer.bias if producer.bias is not None else np.zeros(layer.units)
    median = _median_positive(norms)
    # the input columns each upstream unit feeds: in_features / units (Linear), the kernel (Conv)
    per_unit = (
        weight.shape[1] // max(1, upstream_units) if weight.ndim == 2 else int(np.prod(weight.shape[2:]))
    )
    for unit in dead:
        if upstream_dead is not None and upstream_units:
            # which upstream units this unit reads (weight != 0): all of them dead -> starved
            used = {int(i) // max(1, per_unit) for i in np.flatnonzero(rows[unit])}
            if used <= upstream_dead:
                causes[unit] = "starved"
                continue
        if norms[unit] < 0.1 * median and bias_values[unit] <= 0:
            causes[unit] = "collapsed weights"
        elif bias_values[unit] <= 0 and max_pre[unit] - bias_values[unit] > 0:
            causes[unit] = "negative bias"
        else:
            causes[unit] = "direction"
    return causes


def _torch_view(model_loaded, probe, report):
    """Per layer: its producer's tensors (read by name, so modules and .pt2 programs alike) and the
    layer whose output the producer reads."""
    from deadrelu_cli.wiring.torch import named_tensor

    if model_loaded.kind == "eager":
        model, consumers = model_loaded.runnable, getattr(probe, "consumers", {})
    else:
        from deadrelu_cli.loaders.torch_models import graph_module_with_stack
        from deadrelu_cli.probe.exported import find_sites
        from deadrelu_cli.wiring.torch import exported_wiring

        model = graph_module_with_stack(model_loaded.extra["program"])  # unprobed: its sites are findable
        consumers = {}
        for node, site in find_sites(model.graph, tuple(probe.settings.ops)):
            wiring = exported_wiring(model, node)
            if not isinstance(wiring, str):
                consumers[site.name] = {wiring.consumer}

    def array(name: str) -> np.ndarray | None:
        tensor = named_tensor(model, name)
        return None if tensor is None else tensor.detach().double().cpu().numpy()

    producers, upstream = {}, {}
    for layer in report.layers:
        if layer.producer is None:
            producers[layer.name] = None
            continue
        weight = array(f"{layer.producer}.weight")
        # a BatchNorm, or a LayerNorm/GroupNorm (a 1-D per-unit gamma): beta shifts normalised values
        batchnorm = named_tensor(model, f"{layer.producer}.running_mean") is not None or (
            weight is not None and weight.ndim == 1
        )
        producers[layer.name] = ProducerTensors(batchnorm, weight, array(f"{layer.producer}.bias"))
        upstream[layer.name] = next(
            (site for site, names in consumers.items() if layer.producer in names), None
        )
    return producers, upstream


def _onnx_view(model_loaded, report, ops: tuple[str, ...]):
    """The same from an ONNX graph: the producer's stored tensors (Conv/Gemm/MatMul+bias rows, or a
    BatchNormalization's scale and B) and the layer whose activation the producer reads."""
    from deadrelu_cli.loaders.onnx_model import restore_weights
    from deadrelu_cli.probe.onnx_graph import find_sites
    from deadrelu_cli.wiring.onnx import unit_wiring
    from deadrelu_cli.wiring.onnx_index import GraphIndex, stored_array

    restore_weights(model_loaded)  # the scan held the graph without its large weights
    model = model_loaded.runnable
    index = GraphIndex(model.graph)
    wirings = {
        site.name: unit_wiring(model, site.input_name, site.output_name, index)
        for site in find_sites(model, ops)
        if not site.graph_path
    }
    upstream = upstream_sites(wirings)
    producers = {
        name: producer_tensors(wiring, lambda tensor: stored_array(index, tensor))
        for name, wiring in wirings.items()
    }
    return (
        {layer.name: producers.get(layer.name) for layer in report.layers},
        {layer.name: upstream.get(layer.name) for layer in report.layers},
    )


def explain(report, model_loaded, probe, ops: tuple[str, ...] = ("relu", "relu6")) -> None:
    """Store each dead unit's cause in layer.extra['causes'] (unit -> cause) and the counts per cause;
    and the channels constant over the data in layer.extra['constant_channels'], with a note."""
    constant_channels(report)
    if model_loaded is not None and model_loaded.kind in ("eager", "exported"):
        producers, upstream = _torch_view(model_loaded, probe, report)
    elif model_loaded is not None and model_loaded.backend == "onnx":
        producers, upstream = _onnx_view(model_loaded, report, ops)
    else:
        report.notes.append("--explain: causes are not worked out for TorchScript models")
        return
    dead_by_site = {layer.name: set(np.flatnonzero(layer.dead_mask()).tolist()) for layer in report.layers}
    units_by_site = {layer.name: layer.units for layer in report.layers}
    for layer in report.layers:
        above = upstream.get(layer.name)
        causes = explain_layer(
            layer,
            producers.get(layer.name),
            dead_by_site.get(above) if above else None,
            units_by_site.get(above, 0),
        )
        if causes:
            layer.extra["causes"] = {str(unit): cause for unit, cause in sorted(causes.items())}
            counts: dict[str, int] = {}
            for cause in causes.values():
                counts[cause] = counts.get(cause, 0) + 1
            layer.extra["cause_counts"] = counts


def constant_channels(report) -> None:
    """Channels whose activation is one value over all the data (all zero, or a single value): an INT8
    calibrator cannot give them a range ("tensor is uniformly zero") or wastes one on them."""
    missing_min = False
    for layer in report.layers:
        zero, single = layer.constant_masks()
        missing_min |= single is None and layer.ran
        found = {"all_zero": np.flatnonzero(zero).astype(int).tolist()}
        if single is not None:
            found["single_value"] = np.flatnonzero(single).astype(int).tolist()
        if not any(found.values()):
            continue
        layer.extra["constant_channels"] = found
        parts = [f"{kind.replace('_', ' ')}: {_few(units)}" for kind, units in found.items() if units]
        report.notes.append(
            f"--explain: layer {layer.name}: {sum(map(len, found.values()))} channel(s) constant over the data "
            f"({'; '.join(parts)}); INT8 calibration cannot give them a range"
        )
    if missing_min:
        report.notes.append(
            "--explain: single-value channels need the per-unit minimum, which this run did not record "
            "(compiled or distributed scans); all-zero channels are listed"
        )


def _few(units: list[int], shown: int = 8) -> str:
    return ", ".join(map(str, units[:shown])) + (f", … ({len(units)} in all)" if len(units) > shown else "")


def structural_checks(model_loaded, probe) -> list[Finding]:
    """Problems visible without data: ReLU on the output or before a softmax, BN channels that are
    constant, units whose incoming weights are all zero."""
    import torch
    from torch import nn

    findings: list[Finding] = []
    if model_loaded is None or model_loaded.kind != "eager":
        return findings
    model = model_loaded.runnable
    read = getattr(probe, "consumers", {})
    for site in getattr(probe, "final_output_sites", set()):
        if read.get(site):  # also read by a layer inside: features returned beside the heads they feed
            continue
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
            # a softmax only: a LayerNorm after a ReLU (Canine's projection, post-norm blocks) is ordinary
            if consumer.strip("<>") in ("softmax", "log_softmax", "_softmax"):
                findings.append(
                    Finding(
                        "relu-before-softmax",
                        site,
                        f"{site} feeds a {consumer.strip('<>')}: probabilities "
                        "of units at 0 can become exactly 0 and the loss infinite; use softmax on raw scores",
                    )
                )
    from deadrelu_cli.wiring.torch import offloaded

    # zero rows matter where they feed an activation; elsewhere (an LM head tied to an embedding whose
    # padding row is zero) they are not dead units
    registry = getattr(probe, "registry", None)
    producers = {site.producer for site in registry.sites.values()} if registry is not None else None
    for name, module in model.named_modules():
        weight = (
            offloaded(module, "weight") if isinstance(getattr(module, "weight", None), torch.Tensor) else None
        )
        if weight is None:
            continue
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            constant = torch.nonzero(weight.detach() == 0).flatten().tolist()
            if constant:
                findings.append(
                    Finding(
                        "constant-bn",
                        name,
                        f"{name}: channels {constant[:8]} have gamma = 0 and output "
                        "the constant beta for every input",
                    )
                )
        if isinstance(module, nn.Linear | nn.modules.conv._ConvNd) and (
            producers is None or name in producers
        ):
            rows = weight.detach().reshape(weight.shape[0], -1)
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
