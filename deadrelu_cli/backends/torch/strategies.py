"""Fixes on eager nn.Modules (state_dict + --arch, safetensors, pickled modules).

reinit and bias-shift change parameters only (state_dict in, state_dict out); prune changes layer
widths, and leaky/elu change the activation, so those produce a self-contained artifact (.pt2, .onnx, .ts).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deadrelu_cli.fixes.plan import FixOptions, LayerOutcome, LayerPlan, firing_cuts, shift_gains
from deadrelu_cli.probe.base import ProbeSettings
from deadrelu_cli.probe.eager import EagerProbe
from deadrelu_cli.probe.experts import fused_expert_of
from deadrelu_cli.wiring.model import TensorRef, UnitWiring
from deadrelu_cli.wiring.torch import BATCH_NORM, eager_wiring, named_tensor, submodule, write_conflict


def install_substitutes(
    model: nn.Module, substitutes: dict[str, Callable[[torch.Tensor], torch.Tensor]]
) -> nn.Module:
    """Make the named activation call sites of `model` run another function, in place.

    Root forward hooks switch the call-site mode on and off around every forward, so the module
    keeps its own structure and names (and torch.export traces the substituted calls).
    """
    probe = EagerProbe(model, ProbeSettings())
    probe.substitutes = dict(substitutes)
    probe.recording = False  # the other sites must stay plain ops (torch.export cannot trace the counting)
    probe.attach()  # the hooks stay for the module's lifetime
    active = []

    def start(_module, _args):
        probe.begin_forward()
        mode = probe.mode()
        mode.__enter__()
        active.append(mode)

    def stop(_module, _args, _output):
        if active:
            active.pop().__exit__(None, None, None)

    model.register_forward_pre_hook(start, prepend=True)
    model.register_forward_hook(stop, always_call=True)
    return model


def substitute_for(strategy: str, slope: float) -> Callable[[torch.Tensor], torch.Tensor]:
    if strategy == "elu":
        return lambda x: F.elu(x)
    return lambda x: F.leaky_relu(x, slope)


def patch_module(
    module: nn.Module, layers: list[str], strategy: str = "leaky", slope: float = 0.01
) -> nn.Module:
    """Public API: the module with the given call sites switched to LeakyReLU(slope) (or ELU); the
    original module is not modified. Site names are those of `deadrelu scan`."""
    return install_substitutes(
        copy.deepcopy(module), {name: substitute_for(strategy, slope) for name in layers}
    )


def _layer(report, name: str):
    return report.layer(name) if report is not None else None


def fix_generator(seed: int, *stream: int) -> torch.Generator:
    """A CPU generator for --seed and a stream number, seeded through numpy's SeedSequence: not the
    stream of torch.manual_seed(seed) itself, so a model built right after torch.manual_seed(0) does
    not get its own init rows redrawn by --seed 0."""
    mixed = np.random.SeedSequence([int(seed), 0x5EED, *stream]).generate_state(1, np.uint64)[0]
    return torch.Generator(device="cpu").manual_seed(int(mixed))


def _fresh_rows(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rows drawn like nn.Linear/nn.ConvNd's default init (kaiming_uniform with a=sqrt(5))."""
    fresh = torch.empty(weight.shape, dtype=torch.float32)
    fan_in = int(np.prod(weight.shape[1:]))
    bound = 1.0 / math.sqrt(fan_in) if fan_in else 0.0
    fresh.uniform_(-bound, bound, generator=generator)  # = kaiming_uniform_(a=sqrt(5)) bound
    return fresh.to(device=weight.device, dtype=weight.dtype)


Touched = dict[str, list[tuple[int, list[int]]]]  # tensor name -> (axis, indices) that a fix rewrote


def _touch(touched: Touched | None, name: str | None, axis: int, indices: list[int]) -> None:
    if touched is not None and name:
        touched.setdefault(name, []).append((axis, list(indices)))


def reinit(
    model: nn.Module,
    probe: EagerProbe,
    report,
    plans: list[LayerPlan],
    options: FixOptions,
    touched: Touched | None = None,
    drawn: dict[str, str] | None = None,
) -> list[LayerOutcome]:
    """ReDo on an nn.Module (see reinit_units)."""
    return reinit_units(
        model,
        {plan.name: eager_wiring(model, probe, report.layer(plan.name)) for plan in plans},
        plans,
        options,
        touched,
        report,
        drawn,
    )


def reinit_units(
    model: nn.Module,
    wirings: dict[str, UnitWiring | str],
    plans: list[LayerPlan],
    options: FixOptions,
    touched: Touched | None = None,
    report=None,
    drawn: dict[str, str] | None = None,
) -> list[LayerOutcome]:
    """ReDo: re-initialise dead units' incoming weights, zero their bias and their outgoing weights
    (BatchNorm after them reset to identity), so the model's outputs do not change. `model` resolves
    the wirings' tensor names (an nn.Module, or a program's module). `touched` (when given) receives
    the entries rewritten, by tensor name (for resetting their optimizer moments); `drawn` (when given)
    the weight whose rows were redrawn, per layer (for `flip_silent_rows`)."""
    outcomes = []
    with torch.no_grad():
        for index, plan in enumerate(plans):
            outcome = LayerOutcome(plan.name, plan.units, "", False, len(plan.units))
            outcomes.append(outcome)
            wire = wirings[plan.name]
            if isinstance(wire, str):
                outcome.action = wire
                continue
            bn = wire.batchnorm
            bn_names = [bn.weight, bn.bias, bn.running_mean, bn.running_var] if bn is not None else []
            names = [wire.weight.name, wire.bias, *bn_names, *(ref.name for _, ref in wire.consumers())]
            conflict = write_conflict(model, names, report, _layer(report, plan.name))
            if conflict:
                outcome.action = conflict
                continue
            weight, bias = named_tensor(model, wire.weight.name), named_tensor(model, wire.bias)
            readers = {ref.name: named_tensor(model, ref.name) for _, ref in wire.consumers()}
            try:
                columns = {
                    name: wire.consumer_columns(
                        plan.units, plan.all_units, tensor.shape[1], TensorRef(name, 1)
                    )
                    for name, tensor in readers.items()
                }
            except ValueError as exc:
                outcome.action = f"skipped: {exc}"
                continue
            units = torch.tensor(plan.units, dtype=torch.long, device=weight.device)
            fresh = _fresh_rows(weight, fix_generator(options.seed, 1, index))
            weight[units] = fresh[units]
            if bias is not None:
                bias[units] = 0.0
            if bn is not None:
                for name, value in (
                    (bn.weight, 1.0),
                    (bn.bias, 0.0),
                    (bn.running_mean, 0.0),
                    (bn.running_var, 1.0),
                ):
                    tensor = named_tensor(model, name)
                    if tensor is not None:
                        tensor[units] = value
            for name, tensor in readers.items():
                tensor[:, torch.tensor(columns[name], dtype=torch.long, device=tensor.device)] = 0.0
            _touch(touched, wire.weight.name, 0, plan.units)
            if bias is not None:
                _touch(touched, wire.bias, 0, plan.units)
            if bn is not None:
                _touch(touched, bn.weight, 0, plan.units)
                _touch(touched, bn.bias, 0, plan.units)
            for name in readers:
                _touch(touched, name, 1, columns[name])
            if drawn is not None:
                drawn[plan.name] = wire.weight.name
            outcome.applied = True
            what = f"{wire.owner} rows re-initialised" + (f", {bn.owner} reset" if bn is not None else "")
            outcome.action = f"{what}; {', '.join(name for name, _ in wire.consumers())} inputs zeroed"
    return outcomes


def flip_silent_rows(
    result,
    model: nn.Module,
    plans: list[LayerPlan],
    drawn: dict[str, str],
    options_for_scan,
    outcomes: list[LayerOutcome] | None = None,
) -> dict[str, int]:
    """After reinit: negate each fresh row whose unit still never exceeds --threshold on the data while
    its negation would. With its bias 0 and its BatchNorm reset, the unit's pre-activation is linear in
    the row (negating it negates every value exactly), so the negated row exceeds the threshold wherever
    the drawn one was below minus it (on inputs that are all >= 0, a fresh row fires on ~all or ~no
    samples: a coin flip per unit); the init distribution is symmetric, so it is as likely a draw. Its
    outgoing weights are zero, so no other site changes and one pass serves every layer. `outcomes`
    (when given) get `promised`: per unit, the fraction of values above the threshold after the flip
    (0 for a unit neither row makes fire: its inputs are zero or too small there). Returns the flips
    per layer."""
    from dataclasses import replace

    from deadrelu_cli.backends.torch.scan import scan_torch

    planned = [plan for plan in plans if plan.name in drawn]
    if not planned:
        return {}
    threshold = float(options_for_scan.threshold)
    units = {plan.name: plan.units for plan in planned}
    above: dict[str, torch.Tensor] = {}  # values > threshold, per unit
    below: dict[str, torch.Tensor] = {}  # values < -threshold: those the negated row makes fire
    seen: dict[str, int] = {}

    def collector(name):
        def collect(pre: torch.Tensor, channel_dim: int) -> None:
            values = pre.detach().movedim(channel_dim, -1)[..., units[name]]
            if not values.numel():  # a batch of padding only: a position mask keeps no position
                return
            rows = values.reshape(-1, len(units[name])).double()
            up, down = (rows > threshold).sum(0).cpu(), (rows < -threshold).sum(0).cpu()
            above[name] = up if name not in above else above[name] + up
            below[name] = down if name not in below else below[name] + down
            seen[name] = seen.get(name, 0) + rows.shape[0]

        return collect

    probed = scannable(result, model)
    options = replace(options_for_scan, progress=None, compile=False)
    scan_torch(
        probed.model, probed.data, options, probed.device, {p.name: collector(p.name) for p in planned}
    )
    by_name = {outcome.name: outcome for outcome in outcomes or []}
    flipped = {}
    with torch.no_grad():
        for plan in planned:
            if plan.name not in above:
                continue
            up, down = above[plan.name].tolist(), below[plan.name].tolist()
            silent = [i for i, (a, b) in enumerate(zip(up, down, strict=True)) if a == 0 and b > 0]
            if silent:
                weight = named_tensor(model, drawn[plan.name])
                rows = torch.tensor([plan.units[i] for i in silent], dtype=torch.long, device=weight.device)
                weight[rows] = -weight[rows]
                flipped[plan.name] = len(silent)
            if plan.name in by_name:
                negated = set(silent)
                fires = [down[i] if i in negated else up[i] for i in range(len(up))]
                by_name[plan.name].promised = [count / seen[plan.name] for count in fires]
    return flipped


def collect_quantiles(
    result,
    plans: list[LayerPlan],
    target_rate: float,
    seed: int,
    options_for_scan,
    firing: dict | None = None,
) -> dict[str, np.ndarray]:
    """For each planned unit, the cut (`plan.firing_cuts`): moved by --threshold minus it, the unit
    exceeds --threshold on about `target_rate` of the data (ties fire together). `firing` (when given)
    receives per layer (values > --threshold per unit now, how many should be after the move, values
    per unit)."""
    from deadrelu_cli.backends.torch.scan import scan_torch

    limit_per_unit = 200_000
    rng = np.random.default_rng(seed)
    samples: dict[str, list[np.ndarray]] = {plan.name: [] for plan in plans}
    counts = dict.fromkeys(samples, 0)
    units = {plan.name: plan.units for plan in plans}

    def collector(name):
        def collect(pre: torch.Tensor, channel_dim: int) -> None:
            values = pre.detach().movedim(channel_dim, -1)[..., units[name]].reshape(-1, len(units[name]))
            values = values.float().cpu().numpy()
            if counts[name] + len(values) > limit_per_unit:  # keep a uniform subsample, bounded memory
                keep = max(1, limit_per_unit * len(values) // max(1, counts[name] + len(values)))
                values = values[rng.choice(len(values), size=min(keep, len(values)), replace=False)]
            samples[name].append(values)
            counts[name] += len(values)

        return collect

    scan_torch(
        result.model,
        result.data,
        options_for_scan,
        result.device,
        collectors={plan.name: collector(plan.name) for plan in plans},
    )
    quantiles = {}
    for name, chunks in samples.items():
        values = np.concatenate(chunks, axis=0).astype(np.float64)
        quantiles[name], wanted = firing_cuts(values, target_rate)
        if firing is not None:
            firing[name] = ((values > options_for_scan.threshold).sum(axis=0), wanted, len(values))
    return quantiles


def scannable(result, model: nn.Module):
    """`result` (a scan's result) running `model` instead; a program's module gets a copy of its graph
    that shares its tensors (the probe rewrites the graph it runs)."""
    from dataclasses import replace

    if isinstance(model, torch.fx.GraphModule):
        model = torch.fx.GraphModule(model, copy.deepcopy(model.graph))
    return replace(result, model=replace(result.model, runnable=model))


def settle_shifts(
    result,
    model: nn.Module,
    plans: list[LayerPlan],
    targets: dict[str, str],
    gains: dict[str, np.ndarray | str],
    outcomes: list[LayerOutcome],
    target_rate: float,
    seed: int,
    options_for_scan,
    stored: dict[str, torch.dtype] | None = None,
) -> int:
    """After `bias_shift`, rescan the shifted model and move again the units that do not fire on
    exactly their target count: the quantiles were taken on the original model, units revived in an
    earlier layer change what a later one sees, and a value next to the cut may round to the other
    side once the bias moves (a large bias and a long dot product: the sum rounds differently). Each
    round settles at least the first layer still off (in the order the sites run); one round per
    layer, plus one that checks the last moves (a single layer: a rescan, and a second move only where
    it is off); returns the rounds taken. `outcome.promised` follows the units moved again."""
    threshold = options_for_scan.threshold
    live = [p for p in plans if not isinstance(gains.get(p.name, targets[p.name]), str)]
    if not live:
        return 0
    by_name = {outcome.name: outcome for outcome in outcomes}
    rounds = 0
    with torch.no_grad():
        for _ in range(len(live) + 1):
            firing: dict = {}
            quantiles = collect_quantiles(
                scannable(result, model), live, target_rate, seed, options_for_scan, firing
            )
            rounds += 1
            moved = False
            for plan in live:
                fired, wanted, n = firing[plan.name]
                off = fired != wanted
                if not off.any():
                    continue
                tensor = named_tensor(model, targets[plan.name])
                units = torch.tensor(np.asarray(plan.units)[off], dtype=torch.long, device=tensor.device)
                move = threshold - quantiles[plan.name][off]
                gain = np.asarray(gains[plan.name], dtype=np.float64)[off]
                shift = torch.from_numpy(move / gain).to(tensor.device)
                was = tensor[units].double()
                now = place_shifted(tensor, units, was + shift, gain, (stored or {}).get(targets[plan.name]))
                # a half-precision entry one step from the cut cannot move closer: it stays, firing on
                # what it fires on now (place_shifted kept it on the firing side)
                stuck = np.zeros(len(plan.units), bool)
                stuck[np.flatnonzero(off)] = (now == was).cpu().numpy()
                outcome = by_name[plan.name]
                rates = np.where(stuck, fired / max(1, n), wanted / max(1, n))
                if outcome.promised is not None:  # what the unit now fires on, as moved again
                    outcome.promised = np.where(off, rates, outcome.promised).tolist()
                if stuck.any() and outcome.coarse_dtype is None:
                    dtype = (stored or {}).get(targets[plan.name]) or tensor.dtype
                    outcome.coarse_dtype = str(dtype).split(".")[-1]
                    outcome.action += (
                        f"; {outcome.coarse_dtype} steps wider than the gap at some cuts (see note)"
                    )
                if not (off & ~stuck).any():
                    continue
                moved = True
                if "re-settled" not in outcome.action:
                    outcome.action += f"; {int((off & ~stuck).sum())} re-settled on a rescan"
            if not moved:
                break
    return rounds


def shift_targets(
    model: nn.Module, report, plans: list[LayerPlan], sources: dict[str, str]
) -> dict[str, str]:
    """Per planned layer, the stored tensor whose entries bias-shift moves, or why there is none
    ("skipped: …"): the producer's bias (a Linear/Conv bias, a BatchNorm/LayerNorm/GroupNorm beta), or
    an affine=False BatchNorm's running_mean. `sources` (the eager probe's `shift_sources`) names a
    producer reached through elementwise ops with tensor operands (`scale * fc(x)`, `fc(x) + x`)."""
    targets = {}
    for plan in plans:
        layer = report.layer(plan.name)
        producer = layer.producer or sources.get(plan.name)
        module = submodule(model, producer) if producer else None  # (a TorchScript module too)
        name = None
        if isinstance(getattr(module, "bias", None), torch.Tensor):
            name = f"{producer}.bias"
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            name = f"{producer}.running_mean"  # affine=False: the mean subtracted is the per-unit offset
        if name is None:
            fused = fused_expert_of(model, plan.name) if isinstance(model, nn.Module) else None
            targets[plan.name] = (
                f"skipped: {fused}"
                if fused
                else "skipped: no bias to shift (no single producer, or it has bias=False)"
            )
            continue
        targets[plan.name] = write_conflict(model, [name], report, layer) or name
    return targets


def measure_gains(
    result, model: nn.Module, plans: list[LayerPlan], targets: dict[str, str], options_for_scan
) -> dict[str, np.ndarray | str]:
    """Per planned layer, how much each unit's pre-activation moves when its entry of the target tensor
    moves by 1 (d pre / d entry), measured on a few samples: a shift is exact only where that is one
    constant per unit and the site's other units do not move at all. Else why not ("skipped: …").

    Runs the model once as it is and once per layer with the layer's entries moved (restored after,
    bit for bit), so ops between the tensor and the activation (a scale, a negative BatchNorm gamma, a
    residual add, a LayerNorm after the Linear) are measured rather than assumed."""
    from dataclasses import replace

    from deadrelu_cli.backends.torch.scan import scan_torch

    fixed = getattr(result.model, "fixed_batch", None)
    samples = fixed or min(16, result.data.local_samples)
    options = replace(options_for_scan, limit=samples, progress=None, compile=False)

    def capture(names):
        probed = scannable(result, model)
        seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}

        def collector(name):
            def collect(pre: torch.Tensor, channel_dim: int) -> None:
                if pre.is_floating_point():  # the precision the pre-activation is rounded to (_gain)
                    eps[name] = max(eps.get(name, 0.0), torch.finfo(pre.dtype).eps)
                values = pre.detach().movedim(channel_dim, -1)
                seen[name].append(values.reshape(-1, values.shape[-1]).double().cpu())

            return collect

        scan_torch(probed.model, probed.data, options, probed.device, {n: collector(n) for n in names})
        return {name: torch.cat(chunks) if chunks else None for name, chunks in seen.items()}

    out: dict[str, np.ndarray | str] = {}
    eps: dict[str, float] = {}
    measured = [plan for plan in plans if not targets[plan.name].startswith("skipped")]
    if not measured:
        return {plan.name: targets[plan.name] for plan in plans}
    with torch.no_grad():
        base = capture([plan.name for plan in measured])
        if (
            any(v is not None and not v.shape[0] for v in base.values())
            and samples < result.data.local_samples
        ):
            # a position mask kept nothing of the first samples there (padding only): read every sample
            options = replace(options_for_scan, progress=None, compile=False)
            base = capture([plan.name for plan in measured])
        for plan in plans:
            target = targets[plan.name]
            if target.startswith("skipped"):
                out[plan.name] = target
                continue
            tensor = named_tensor(model, target)
            units = torch.tensor(plan.units, dtype=torch.long, device=tensor.device)
            kept = tensor[units].clone()
            before = base[plan.name]
            if before is None:
                out[plan.name] = "skipped: the site did not run on the first samples"
                continue
            if not before.shape[0]:  # a position mask kept nothing there: no gain to read
                out[plan.name] = (
                    f"skipped: the first {samples} samples keep no position of the site (padding only)"
                )
                continue
            delta = 1.0 + float(before.abs().max()) if before.numel() else 1.0
            tensor[units] = (kept.double() + delta).to(tensor.dtype)
            # the move as stored (a half-precision bias rounds it), per unit
            applied = (tensor[units].double() - kept.double()).cpu()
            try:
                after = capture([plan.name])[plan.name]
            finally:
                tensor[units] = kept
            out[plan.name] = _gain(target, plan.units, before, after, applied, eps.get(plan.name, 0.0))
    return out


def _gain(
    target: str, units: list[int], before, after, applied: torch.Tensor, eps: float = 0.0
) -> np.ndarray | str:
    """`plan.shift_gains` on the captured CPU float64 tensors."""
    return shift_gains(
        target, units, before.numpy(), None if after is None else after.numpy(), applied.numpy(), eps
    )


def place_shifted(
    tensor: torch.Tensor, units: torch.Tensor, exact: torch.Tensor, gain, stored: torch.dtype | None
) -> torch.Tensor:
    """Write `exact` (float64, the shifted entries) into `tensor` at `units`, as the file will hold
    them: rounded to the entry's dtype (the tensor's, or the checkpoint's it is written back to:
    `stored`) towards the side that fires (up for a positive gain), not to the nearest — one step of a
    float16/bfloat16 bias, or of a float32 one far larger than the unit's values (a bias near 1e8
    beside values a few steps apart), can be wider than the gap above the cut, and the nearest value
    would leave the unit dead in the written file. Returns the entries written (float64)."""
    dtype = stored if stored is not None else tensor.dtype
    if dtype.is_floating_point:
        up = torch.from_numpy(np.asarray(gain, dtype=np.float64) > 0).to(exact.device).expand_as(exact)
        rounded = exact.to(dtype)
        short = torch.where(up, rounded.double() < exact, rounded.double() > exact)
        toward = torch.where(up, torch.tensor(float("inf")), torch.tensor(float("-inf"))).to(rounded)
        exact = torch.where(short, torch.nextafter(rounded, toward), rounded).double()
    tensor[units] = exact.to(tensor.device, tensor.dtype)
    return tensor[units].double()


def bias_shift(
    model: nn.Module,
    report,
    plans: list[LayerPlan],
    quantiles: dict[str, np.ndarray],
    targets: dict[str, str],
    gains: dict[str, np.ndarray | str],
    touched: Touched | None = None,
    threshold: float = 0.0,
    firing: dict | None = None,
    stored: dict[str, torch.dtype] | None = None,
) -> list[LayerOutcome]:
    """Move each dead unit's target tensor entry (`shift_targets`: bias, BN/LN beta, affine-free BN
    mean) so that about `target_rate` of its values exceed `threshold` (`quantiles`: per unit, the cut
    of `collect_quantiles`, whose `firing` gives how many values fire after the move), divided by the unit's measured gain (`measure_gains`,
    sign included). `touched` (when given) receives the entries moved. `model` is an nn.Module, or an ExportedProgram's module, whose parameters keep their
    original names."""
    outcomes = []
    with torch.no_grad():
        for plan in plans:
            outcome = LayerOutcome(plan.name, plan.units, "", False, len(plan.units))
            outcomes.append(outcome)
            gain = gains.get(plan.name, targets[plan.name])
            if isinstance(gain, str):
                outcome.action = gain
                continue
            target = targets[plan.name]
            tensor = named_tensor(model, target)
            q = torch.tensor(quantiles[plan.name], dtype=torch.float64)
            # after the move, exactly the values above the cut exceed the threshold: pre + gain * shift
            # = pre - q + threshold
            shift = (threshold - q) / torch.from_numpy(np.asarray(gain, dtype=np.float64))
            units = torch.tensor(plan.units, dtype=torch.long, device=tensor.device)
            exact = tensor[units].double() + shift.to(tensor.device)
            place_shifted(tensor, units, exact, gain, (stored or {}).get(target))
            _touch(touched, target, 0, plan.units)  # their optimizer moments are reset, as reinit/kick's
            outcome.applied = True
            if firing is not None and plan.name in firing:
                _, wanted, n = firing[plan.name]
                outcome.promised = (np.asarray(wanted) / max(1, n)).tolist()
            moved = "raised" if target.endswith(".bias") and bool((shift >= 0).all()) else "moved"
            outcome.action = f"{target} {moved} by {float(shift.min()):.4g}…{float(shift.max()):.4g}" + (
                ""
                if np.allclose(gain, 1.0)
                else f" (gain {float(np.min(gain)):.4g}…{float(np.max(gain)):.4g})"
            )
    return outcomes


def _rebuild(module: nn.Module, keep_out: list[int] | None, keep_in: list[int] | None) -> nn.Module:
    """A copy of a Linear/Conv/BatchNorm with only the kept output units / input columns."""
    return _narrowed(module, keep_out, keep_in).train(module.training)


def _narrowed(module: nn.Module, keep_out: list[int] | None, keep_in: list[int] | None) -> nn.Module:
    with torch.no_grad():
        if isinstance(module, BATCH_NORM):
            idx = torch.tensor(keep_out, dtype=torch.long)
            new = type(module)(
                len(keep_out),
                eps=module.eps,
                momentum=module.momentum,
                affine=module.affine,
                track_running_stats=module.track_running_stats,
            )
            for name in ("weight", "bias", "running_mean", "running_var"):
                src = getattr(module, name)
                if src is not None:
                    getattr(new, name).copy_(src[idx])
            new.num_batches_tracked = module.num_batches_tracked
            return new.to(module.weight.device if module.weight is not None else "cpu")
        weight = module.weight
        if keep_out is not None:
            weight = weight[torch.tensor(keep_out, dtype=torch.long)]
        if keep_in is not None:
            weight = weight[:, torch.tensor(keep_in, dtype=torch.long)]
        bias = module.bias
        if bias is not None and keep_out is not None:
            bias = bias[torch.tensor(keep_out, dtype=torch.long)]
        if isinstance(module, nn.Linear):
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        else:
            new = type(module)(
                weight.shape[1],
                weight.shape[0],
                module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                groups=1,
                bias=bias is not None,
                padding_mode=module.padding_mode,
            )
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
        return new.to(device=module.weight.device, dtype=module.weight.dtype)


def prune_plan(
    model: nn.Module, wirings: dict[str, UnitWiring | str], report, plans: list[LayerPlan]
) -> tuple[list[LayerOutcome], dict[str, set[int]], dict[str, set[int]]]:
    """Which output units (of Linear/Conv/BN, by name) and which consumer input columns to keep
    (`model` resolves the wirings' tensor names)."""
    keep_out: dict[str, set[int]] = {}
    keep_in: dict[str, set[int]] = {}
    outcomes = []
    for plan in plans:
        layer = report.layer(plan.name)
        outcome = LayerOutcome(plan.name, plan.units, "", False, len(plan.units))
        outcomes.append(outcome)
        if layer.op != "relu":
            outcome.action = f"skipped: only relu units are exactly zero when dead ({layer.op})"
            continue
        wiring = wirings[plan.name]
        if isinstance(wiring, str):
            outcome.action = wiring
            continue
        conflict = write_conflict(model, [], report, layer)  # narrowing a shared module narrows every site
        if conflict:
            outcome.action = conflict
            continue
        incoming_name, consumer_name = wiring.owner, wiring.consumer
        bn_name = wiring.batchnorm.owner if wiring.batchnorm is not None else ""
        if len(plan.units) == plan.all_units:
            outcome.action = (
                "skipped: every unit is dead; removing the whole layer changes the architecture too much"
            )
            continue
        refs = dict(wiring.consumers())
        fan_ins = {name: named_tensor(model, ref.name).shape[1] for name, ref in refs.items()}
        try:  # (past the other parts of a concatenation the consumer reads, when there is one)
            removed = {
                name: wiring.consumer_columns(plan.units, plan.all_units, fan_in, refs[name])
                for name, fan_in in fan_ins.items()
            }
        except ValueError as exc:
            outcome.action = f"skipped: {exc}"
            continue
        kept = [u for u in range(plan.all_units) if u not in set(plan.units)]
        for name in [incoming_name] + ([bn_name] if wiring.batchnorm is not None else []):
            keep_out[name] = keep_out.get(name, set(range(plan.all_units))) & set(kept)
        for name, fan_in in fan_ins.items():
            keep_in[name] = keep_in.get(name, set(range(fan_in))) - set(removed[name])
        consumer_name = ", ".join(fan_ins)
        outcome.applied = True
        outcome.units_after = len(kept)
        outcome.action = f"{incoming_name}{' + ' + bn_name if wiring.batchnorm is not None else ''} narrowed to {len(kept)}; {consumer_name} inputs removed"
    return outcomes, keep_out, keep_in


def prune(
    model: nn.Module, probe: EagerProbe, report, plans: list[LayerPlan]
) -> tuple[list[LayerOutcome], dict[str, int]]:
    """Remove dead units: their producer rows (and BN channels) and the matching consumer inputs."""
    wirings = {plan.name: eager_wiring(model, probe, report.layer(plan.name)) for plan in plans}
    outcomes, keep_out, keep_in = prune_plan(model, wirings, report, plans)
    for name in sorted(set(keep_out) | set(keep_in)):
        module = model.get_submodule(name)
        out = sorted(keep_out[name]) if name in keep_out else None
        inp = sorted(keep_in[name]) if name in keep_in else None
        new = _rebuild(module, out, inp if not isinstance(module, BATCH_NORM) else None)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return outcomes, narrowed_widths(keep_out)


def narrowed_widths(keep_out: dict[str, set[int]]) -> dict[str, int]:
    """The "new widths" a prune reports: per Linear/Conv/BatchNorm it narrowed, its units kept (the
    consumers keep their own widths; the sites are named in the table)."""
    return {name: len(kept) for name, kept in sorted(keep_out.items())}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def linear_conv_flops(model: nn.Module, example: tuple, kwargs: dict | None = None) -> int:
    """Multiply-accumulates for one sample of every matmul/linear/conv the model runs (what pruning
    removes), from the shapes seen at run time; any module kind (eager, a program's module, TorchScript).
    `kwargs`: the example by argument name, as the scan feeds a model whose data names forward()'s
    arguments (GPT-2's second positional argument is past_key_values, not attention_mask)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # FlopCounterMode's module tracker hooks the backward of every module input that requires grad, which
    # fails under inference_mode where a module is called with parameters (weight_norm, spectral_norm)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.inference_mode(), counter:
            model(*example, **(kwargs or {}))  # the whole example: a static-batch program takes no other
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    # the samples: the first tensor's first axis, also inside a dict or tuple input (INPUT.KEY arrays)
    leaves = [
        leaf for leaf in torch.utils._pytree.tree_leaves((example, kwargs or {})) if torch.is_tensor(leaf)
    ]
    samples = max(1, leaves[0].shape[0]) if leaves and leaves[0].dim() else 1
    return int(counter.get_total_flops()) // 2 // samples  # FLOPs count a multiply and an add


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def kick(
    model: nn.Module,
    probe: EagerProbe,
    report,
    plans: list[LayerPlan],
    options: FixOptions,
    touched: Touched | None = None,
) -> list[LayerOutcome]:
    """kick on an nn.Module (see kick_units)."""
    wirings = {
        plan.name: eager_wiring(model, probe, report.layer(plan.name), need_consumer=False) for plan in plans
    }
    return kick_units(model, wirings, plans, options, touched, report)


def kick_units(
    model: nn.Module,
    wirings: dict[str, UnitWiring | str],
    plans: list[LayerPlan],
    options: FixOptions,
    touched: Touched | None = None,
    report=None,
) -> list[LayerOutcome]:
    """A seeded random push of each dead unit's incoming weights and bias (bias upwards), scaled by
    `kick_scale` times the layer's weight standard deviation."""
    outcomes = []
    generator = fix_generator(options.seed, 2)
    with torch.no_grad():
        for plan in plans:
            outcome = LayerOutcome(plan.name, plan.units, "", False, len(plan.units))
            outcomes.append(outcome)
            wire = wirings[plan.name]
            if isinstance(wire, str):
                outcome.action = wire
                continue
            conflict = write_conflict(
                model, [wire.weight.name, wire.shift], report, _layer(report, plan.name)
            )
            if conflict:
                outcome.action = conflict
                continue
            weight = named_tensor(model, wire.weight.name)
            sigma = float(weight.detach().float().std()) * options.kick_scale
            units = torch.tensor(plan.units, dtype=torch.long)
            noise = torch.randn((len(plan.units), *weight.shape[1:]), generator=generator) * sigma
            weight[units] += noise.to(weight)
            target = named_tensor(model, wire.shift)  # BatchNorm beta, else the bias
            if target is not None:
                target[units] += (torch.randn(len(plan.units), generator=generator).abs() * sigma).to(target)
                _touch(touched, wire.shift, 0, plan.units)
            _touch(touched, wire.weight.name, 0, plan.units)
            outcome.applied = True
            pushed = (  # an affine=False BatchNorm has no beta: the rows alone are pushed
                f" and {wire.batchnorm.owner} beta"
                if wire.batchnorm is not None and target is not None
                else ""
            ) or (" and bias" if wire.batchnorm is None and target is not None else "")
            outcome.action = f"{wire.owner} rows{pushed} kicked (σ = {sigma:.3g})"
    return outcomes
