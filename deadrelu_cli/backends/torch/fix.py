"""The torch side of `deadrelu fix`: patch a copy of the model and write the artifact OUT asks for."""

from __future__ import annotations

import io
import sys
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from deadrelu_cli.backends.torch import strategies as eager
from deadrelu_cli.backends.torch.inputs import example_inputs, model_call, torch_runner
from deadrelu_cli.errors import UserError
from deadrelu_cli.files import give_umask_permissions, write_bytes
from deadrelu_cli.fixes.plan import (
    ARTIFACT_SUFFIXES,
    STATE_SUFFIXES,
    FixOptions,
    FixResult,
    LayerOutcome,
    LayerPlan,
)
from deadrelu_cli.inputs import dict_groups, match_inputs
from deadrelu_cli.loaders import LoadOptions, load_model
from deadrelu_cli.loaders.torch_models import load_torchscript_archive

ARCHITECTURE_CHANGING = ("prune", "leaky", "elu")


def _serialized(save) -> bytes:
    """What SAVE(buffer) writes, in memory: the file itself is written by files.write_bytes, so a full
    disk is one line (exit 2) and never torch's C++ writer aborting the process."""
    buffer = io.BytesIO()
    save(buffer)
    return buffer.getvalue()


def program_dynamic_shapes(program) -> tuple:
    """Per user input of an ExportedProgram, the dims it allows: a Dim with the program's own range where
    the dim is symbolic, static elsewhere (a static batch stays static; a constrained one keeps its range)."""
    from torch.export.graph_signature import InputKind

    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    dims: dict[str, object] = {}
    shapes = []
    for spec in program.graph_signature.input_specs:
        if spec.kind != InputKind.USER_INPUT:
            continue
        value = placeholders[spec.arg.name].meta.get("val")
        entry = {}
        for axis, size in enumerate(getattr(value, "shape", ())):
            if not isinstance(size, torch.SymInt):
                continue
            symbol = size.node.expr
            if str(symbol) not in dims:
                bounds = program.range_constraints.get(symbol)
                lower = int(bounds.lower) if bounds is not None else 1
                upper = int(bounds.upper) if bounds is not None and bounds.upper < sys.maxsize else None
                dims[str(symbol)] = torch.export.Dim(f"d_{symbol}", min=lower, max=upper)
            entry[axis] = dims[str(symbol)]
        shapes.append(entry or None)
    return tuple(shapes)


def write_artifact(
    module: torch.nn.Module, example: tuple, path: Path, suffix: str, dynamic_shapes: tuple | None = None
) -> None:
    """A self-contained model file (.pt2 ExportedProgram, .onnx, TorchScript .ts/.jit) with a dynamic batch
    (a .pt2: `dynamic_shapes` when given, e.g. the original program's own).

    A model that cannot be exported (data-dependent control flow, cache objects in its outputs) is a
    one-line error naming the format, never an internal error."""
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False  # Hugging Face models: no DynamicCache in the traced outputs
    try:
        _export(module, example, path, suffix, dynamic_shapes)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - exporters raise anything; the user gets one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"--output {suffix}: the patched model could not be exported ({type(exc).__name__}: {first[:200]}); "
            "try another format (.pt2, .onnx, .ts), or reinit/bias-shift/kick, which keep the architecture "
            "and write weights"
        ) from exc


def _export(
    module: torch.nn.Module, example: tuple, path: Path, suffix: str, dynamic_shapes: tuple | None
) -> None:
    try:
        module = module.eval()
    except NotImplementedError:  # an ExportedProgram's module: already in inference form
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if suffix == ".pt2":
            batch = torch.export.Dim("batch", min=1)
            shapes = dynamic_shapes if dynamic_shapes is not None else tuple({0: batch} for _ in example)
            program = torch.export.export(module, example, dynamic_shapes=shapes)
            data = _serialized(lambda buffer: torch.export.save(program, buffer))
        elif suffix == ".onnx":
            names = [f"input{i}" if len(example) > 1 else "input" for i in range(len(example))]
            data = _serialized(
                lambda buffer: torch.onnx.export(
                    module,
                    example,
                    buffer,
                    input_names=names,
                    dynamo=False,
                    opset_version=17,
                    dynamic_axes={n: {0: "batch"} for n in names},
                )
            )
        else:
            traced = torch.jit.trace(module, example)
            data = _serialized(lambda buffer: torch.jit.save(traced, buffer))
    write_bytes(path, data)


def source_layout_state(model: torch.nn.Module, extra: dict) -> dict[str, torch.Tensor]:
    """The model's weights under the source checkpoint's own key names and dtypes: the wrapper prefix the
    loader stripped (`model.`, `module.`) put back, fp16/bf16 tensors written as fp16/bf16 again, the
    tensors --arch had no place for kept as they were."""
    prefix, dtypes = extra.get("key_prefix", ""), extra.get("dtypes", {})
    state = {f"{prefix}{k}": v for k, v in model.state_dict().items()}
    state = {k: v.to(dtypes[k]) if k in dtypes and v.dtype != dtypes[k] else v for k, v in state.items()}
    state.update(extra.get("left_out", {}))
    return state


def _write_state(model: torch.nn.Module, path: Path, suffix: str, whole_module: bool, extra: dict) -> None:
    if suffix == ".safetensors":
        from safetensors.torch import save

        data = save({k: v.detach().contiguous().cpu() for k, v in source_layout_state(model, extra).items()})
    else:
        state = model if whole_module else source_layout_state(model, extra)
        data = _serialized(lambda buffer: torch.save(state, buffer))
    write_bytes(path, data)


def shift_and_settle(
    scanned, model, plans: list[LayerPlan], sources: dict, options: FixOptions, scan_options, touched=None
) -> list:
    """bias-shift on `model` (an nn.Module, a program's module or a TorchScript module, its tensors
    under their stored names): the cuts read on `scanned`'s model, the gains measured and the shift
    made on `model`, then rescanned and moved again where a unit is off its count (`settle_shifts`).
    `sources`: producers reached through elementwise ops, per site. `touched` receives what moved."""
    quiet = replace(scan_options, progress=None)
    firing: dict = {}
    quantiles = eager.collect_quantiles(scanned, plans, options.target_rate, options.seed, quiet, firing)
    targets = eager.shift_targets(model, scanned.report, plans, sources)
    gains = eager.measure_gains(scanned, model, plans, targets, scan_options)
    # the dtype each target is written back in (fp16/bf16 weights loaded into an fp32 --arch)
    extra = scanned.model.extra or {}
    prefix, dtypes = extra.get("key_prefix", ""), extra.get("dtypes", {})
    stored = {t: dtypes[f"{prefix}{t}"] for t in targets.values() if f"{prefix}{t}" in dtypes}
    outcomes = eager.bias_shift(
        model,
        scanned.report,
        plans,
        quantiles,
        targets,
        gains,
        touched,
        scan_options.threshold,
        firing,
        stored,
    )
    eager.settle_shifts(
        scanned, model, plans, targets, gains, outcomes, options.target_rate, options.seed, quiet, stored
    )
    return outcomes


def apply_torch(
    scanned, plans: list[LayerPlan], options: FixOptions, scan_options, temp: Path, result: FixResult
):

    loaded = scanned.model
    if loaded.kind == "exported" and options.strategy in ("leaky", "elu"):
        return _patch_exported(scanned, plans, options, scan_options, temp, result)
    if loaded.kind == "exported" and options.strategy == "bias-shift":
        return _bias_shift_exported(scanned, plans, options, scan_options, temp, result)
    if loaded.kind == "exported" and options.strategy in ("reinit", "kick", "prune"):
        return _reweight_exported(scanned, plans, options, scan_options, temp, result)
    if loaded.kind == "torchscript":
        _script_output(options.output)
        if options.strategy in ("leaky", "elu"):
            return _patch_torchscript(scanned, plans, options, scan_options, temp, result)
        return _reweight_torchscript(scanned, plans, options, scan_options, temp, result)
    if loaded.kind != "eager":
        raise UserError(
            f"--strategy {options.strategy} on a {loaded.format} file is not supported; "
            "fix the state_dict with --arch, or the ONNX export, instead"
        )
    suffix = Path(options.output).suffix.lower()
    folder_out = loaded.format == "hf_folder"
    if folder_out and options.strategy in ARCHITECTURE_CHANGING:
        raise UserError(
            f"--strategy {options.strategy} changes the {'layer widths' if options.strategy == 'prune' else 'activation'}, "
            "which a model folder's config.json cannot express (from_pretrained would rebuild the old model); "
            "on a model folder use reinit, bias-shift or kick"
        )
    if folder_out:
        pass
    elif suffix not in ARTIFACT_SUFFIXES and suffix not in STATE_SUFFIXES:
        raise UserError(
            f"--output {options.output}: unknown extension; use .pt/.pth/.safetensors (weights), .pt2, .onnx or .ts"
        )
    if options.strategy in ARCHITECTURE_CHANGING and suffix in STATE_SUFFIXES:
        raise UserError(
            f"--strategy {options.strategy} changes the {'layer widths' if options.strategy == 'prune' else 'activation'}, "
            "which a state_dict cannot hold; write OUT.pt2 (ExportedProgram), OUT.onnx or OUT.ts (TorchScript), "
            "or use deadrelu_cli.fixes.patch_module on your live nn.Module"
        )
    device = scanned.device
    order = match_inputs(loaded, scanned.data)
    example = example_inputs(scanned.model, scanned.data, order, device)
    original = loaded.runnable
    model = eager.clone(original)
    probe = scanned.probe
    report = scanned.report
    result.params_before = eager.count_params(original)
    call = model_call(loaded, order, example)  # by name where the scan feeds by name
    result.flops_before = eager.linear_conv_flops(original, *call)
    training = None
    if suffix in STATE_SUFFIXES and loaded.format in ("state_dict", "safetensors"):
        from deadrelu_cli.backends.torch.resume import read_training_checkpoint

        training = read_training_checkpoint(
            Path(loaded.path), loaded.format, scan_options.trust_pickle, scan_options.weights_key
        )
    touched: dict = {}  # parameter entries the fix rewrites (their optimizer moments are reset)
    if options.strategy == "reinit":
        drawn: dict[str, str] = {}
        outcomes = eager.reinit(model, probe, report, plans, options, touched, drawn)
        eager.flip_silent_rows(scanned, model, plans, drawn, replace(scan_options, progress=None), outcomes)
    elif options.strategy == "bias-shift":
        sources = getattr(probe, "shift_sources", {})
        outcomes = shift_and_settle(scanned, model, plans, sources, options, scan_options, touched)
    elif options.strategy == "kick":
        outcomes = eager.kick(model, probe, report, plans, options, touched)
    elif options.strategy == "prune":
        outcomes, result.new_widths = eager.prune(model, probe, report, plans)
    else:
        outcomes = []
        substitutes = {}
        for plan in plans:
            op = report.layer(plan.name).op
            applied = op == "relu"
            if applied:
                substitutes[plan.name] = eager.substitute_for(options.strategy, options.slope)
            action = (
                f"ReLU → {'ELU' if options.strategy == 'elu' else f'LeakyReLU({options.slope:g})'}"
                if applied
                else f"skipped: {op} is not a plain relu"
            )
            outcomes.append(LayerOutcome(plan.name, plan.units, action, applied, len(plan.units)))
        model = eager.install_substitutes(model, substitutes)
    if any(o.applied for o in outcomes):
        if folder_out:
            from deadrelu_cli.backends.torch.folder import write_model_folder
            from deadrelu_cli.backends.torch.resume import reset_folder_optimizer

            result.notes.extend(write_model_folder(model, loaded.path, temp))
            # a Trainer's checkpoint-N/ folder: its optimizer.pt must not keep the recycled units' moments
            notes, states = reset_folder_optimizer(
                Path(loaded.path), temp, model, options.strategy, touched, scan_options.trust_pickle
            )
            result.notes.extend(notes)
            give_umask_permissions(temp)  # (safetensors writes its shards 0600)
            if states and options.resume_steps > 0 and options.strategy in ("reinit", "kick"):
                _check_resume(states, scanned, scan_options, temp, options.resume_steps, outcomes, result)
        elif suffix in ARTIFACT_SUFFIXES:
            if dict_groups(loaded, order):  # INPUT.KEY arrays: forward() takes them as one tuple/dict
                if suffix in (".pt2", ".onnx"):
                    raise UserError(
                        f"--output {suffix}: the model takes its inputs as one tuple or dict (the data's "
                        "INPUT.KEY arrays), which a written program would take as separate inputs the data "
                        "does not name; write OUT.ts (TorchScript keeps the tuple or dict)"
                    )
                example = call[0]
            write_artifact(model, example, temp, suffix)
        elif training is not None:
            _write_training_checkpoint(training, model, temp, suffix, options, touched, result, loaded.extra)
            if options.resume_steps > 0:
                _check_resume(
                    _written_states(training, temp, result, scan_options),
                    scanned,
                    scan_options,
                    temp,
                    options.resume_steps,
                    outcomes,
                    result,
                )
        else:
            _write_state(model, temp, suffix, loaded.format == "module", loaded.extra)
    result.params_after = eager.count_params(model)
    result.flops_after = eager.linear_conv_flops(model, *call)

    def patched_runner():
        from deadrelu_cli.backends.runners import runner_for

        return runner_for(
            load_model(
                LoadOptions(
                    str(temp),
                    scan_options.arch,
                    scan_options.trust_pickle,
                    device,
                    scan_options.dtype,
                    scan_options.device_map,
                    scan_options.max_memory,
                    weights_key=scan_options.weights_key,
                )
            ),
            scanned.data,
            device,
        )

    return torch_runner(loaded, order, device), patched_runner, outcomes


def _write_training_checkpoint(
    training, model, temp: Path, suffix: str, options, touched, result, extra: dict
) -> None:
    """The fixed weights written back into the training checkpoint's own layout, moments reset."""
    from deadrelu_cli.backends.torch.resume import write_training_checkpoint

    if training.checkpoint is None or suffix == ".safetensors":
        _write_state(model, temp, suffix, False, extra)
        if training.checkpoint is not None:
            result.notes.append(
                f"{Path(options.output).name} holds weights only: the checkpoint's other entries (optimizer, "
                "epoch, …) are not in it; write a .pt/.ckpt to keep them"
            )
            training.checkpoint = None
    notes, result.companions, result.copies = write_training_checkpoint(
        training, model, temp, Path(options.output), options.strategy, touched
    )
    result.notes.extend(notes)


def _written_states(training, temp: Path, result, scan_options) -> list[dict]:
    """The optimizer states as written (optimizer.pt beside OUT, or inside the checkpoint)."""
    from deadrelu_cli.backends.torch.optimizer_state import find_optimizer_states
    from deadrelu_cli.loaders.torch_models import torch_load

    if result.companions:
        # files this run wrote: no archive check needed
        written = torch_load(result.companions[0][0], "cpu", scan_options.trust_pickle, checked=True)
    elif training.checkpoint is not None:
        written = torch_load(temp, "cpu", scan_options.trust_pickle, checked=True)
    else:
        return []
    return [state for where, state in find_optimizer_states(written) if where not in training.foreign]


def _check_resume(
    states: list[dict], scanned, scan_options, temp: Path, steps: int, outcomes, result
) -> None:
    """Resume from what was written: the optimizer states loaded over the fixed weights, `steps` steps
    of each with no new gradient (the updates the stored moments alone make), then rescanned on the data."""
    from deadrelu_cli.backends.torch.resume import resume_check
    from deadrelu_cli.backends.torch.scan import scan_torch

    if not states:
        return
    resumed = load_model(
        LoadOptions(
            str(temp),
            scan_options.arch,
            scan_options.trust_pickle,
            scanned.device,
            weights_key=scan_options.weights_key,
        )
    )
    resume_check(resumed, states, steps)
    layers, _ = scan_torch(resumed, scanned.data, replace(scan_options, progress=None), scanned.device)
    by_name = {layer.name: layer for layer in layers}
    for outcome in outcomes:
        layer = by_name.get(outcome.name)
        if outcome.applied and layer is not None and layer.ran:
            outcome.alive_after_resume = int((layer.positive_counts[outcome.units] > 0).sum())
    result.notes.append(
        f"resume check: the written optimizer state(s) loaded over the fixed weights, {steps} optimizer steps "
        "with no new gradient (what the stored moments alone do), then rescanned on the data"
    )


def _program_module(scanned, options: FixOptions) -> torch.fx.GraphModule:
    """A fresh, unprobed module of a scanned ExportedProgram (the scan's own carries its recorders)."""
    from deadrelu_cli.loaders.torch_models import graph_module_with_stack

    if Path(options.output).suffix.lower() != ".pt2":
        raise UserError(
            f"--output {options.output}: an ExportedProgram is patched into an ExportedProgram; use a .pt2 name"
        )
    from deadrelu_cli.probe.base import copy_program_module
    from deadrelu_cli.probe.exported import prepare_program

    # a copy: program.module() shares the program's tensors with the module the original runner runs,
    # so edits in place would change "before" too and the comparison would check nothing
    program = graph_module_with_stack(scanned.model.extra["program"])
    module = copy_program_module(program).to(scanned.device)
    prepare_program(module)  # the RNNCell steps and decomposed thresholds are sites, as scanned
    return module


def _exported_runners(
    scanned, graph_module: torch.fx.GraphModule, temp: Path, result: FixResult, patched: bool = True
):
    """Write the patched module as a .pt2 (when anything was patched); the (original, patched) runners."""
    from deadrelu_cli.backends.runners import runner_for

    loaded = scanned.model
    order = match_inputs(loaded, scanned.data)
    example = example_inputs(loaded, scanned.data, order, scanned.device, loaded.fixed_batch)
    if patched:  # re-exported under the program's own shape constraints
        shapes = program_dynamic_shapes(loaded.extra["program"])
        write_artifact(graph_module, example, temp, ".pt2", shapes)
    result.params_before = result.params_after = eager.count_params(graph_module)
    result.flops_before = eager.linear_conv_flops(loaded.extra["program"].module(), example)
    result.flops_after = eager.linear_conv_flops(graph_module, example)

    def patched_runner():
        return runner_for(
            load_model(LoadOptions(str(temp), device=scanned.device)), scanned.data, scanned.device
        )

    return torch_runner(loaded, order, scanned.device), patched_runner


def _bias_shift_exported(
    scanned, plans: list[LayerPlan], options: FixOptions, scan_options, temp: Path, result: FixResult
):
    """bias-shift on an ExportedProgram: the producers' biases (Linear/Conv bias, BatchNorm beta) are
    parameters of program.module() under their original names; shift them, re-export, .pt2 out."""
    graph_module = _program_module(scanned, options)
    # the quantiles come from a scan of another fresh module: the scan's probe rewrote its own graph
    rescan = replace(scanned, model=replace(scanned.model, runnable=_program_module(scanned, options)))
    from deadrelu_cli.probe.exported import find_sites, shift_source

    sources = {
        site.name: shift_source(node) for node, site in find_sites(graph_module.graph, scan_options.ops)
    }
    sources = {name: source for name, source in sources.items() if source}
    outcomes = shift_and_settle(rescan, graph_module, plans, sources, options, scan_options)
    return (
        *_exported_runners(scanned, graph_module, temp, result, any(o.applied for o in outcomes)),
        outcomes,
    )


def _reweight_exported(
    scanned, plans: list[LayerPlan], options: FixOptions, scan_options, temp: Path, result: FixResult
):
    """reinit / kick / prune on an ExportedProgram: the units' weights found in its graph, edited (or
    narrowed) in place, re-exported, .pt2 out."""
    from deadrelu_cli.backends.torch.program import narrow
    from deadrelu_cli.probe.exported import find_sites
    from deadrelu_cli.wiring.torch import exported_wiring

    graph_module = _program_module(scanned, options)
    wanted = {plan.name for plan in plans}
    need_consumer = options.strategy != "kick"
    wirings = {
        site.name: exported_wiring(
            graph_module, node, need_consumer, to_write=True, narrowing=options.strategy == "prune"
        )
        for node, site in find_sites(graph_module.graph, scan_options.ops)
        if site.name in wanted
    }
    wirings.update({name: "skipped: not found in the program's graph" for name in wanted - wirings.keys()})
    params_before = eager.count_params(graph_module)
    if options.strategy == "prune":
        outcomes, keep_out, keep_in = eager.prune_plan(graph_module, wirings, scanned.report, plans)
        narrow(graph_module, keep_out, keep_in)
        result.new_widths = eager.narrowed_widths(keep_out)
    else:
        if options.strategy == "reinit":
            drawn: dict[str, str] = {}
            outcomes = eager.reinit_units(graph_module, wirings, plans, options, None, scanned.report, drawn)
            eager.flip_silent_rows(
                scanned, graph_module, plans, drawn, replace(scan_options, progress=None), outcomes
            )
        else:
            outcomes = eager.kick_units(graph_module, wirings, plans, options, None, scanned.report)
    runners = _exported_runners(scanned, graph_module, temp, result, any(o.applied for o in outcomes))
    result.params_before = params_before  # (_exported_runners counts the patched module for both)
    return (*runners, outcomes)


def _patch_exported(
    scanned, plans: list[LayerPlan], options: FixOptions, scan_options, temp: Path, result: FixResult
):
    """leaky/elu on an ExportedProgram: swap the activation nodes of the planned sites, re-export, .pt2 out."""
    from deadrelu_cli.probe.exported import find_sites

    graph_module = _program_module(scanned, options)
    wanted = {plan.name: plan for plan in plans}
    aten = torch.ops.aten
    outcomes = []
    for node, site in list(find_sites(graph_module.graph, scan_options.ops)):
        plan = wanted.get(site.name)
        if plan is None:
            continue
        if site.op != "relu":
            outcomes.append(
                LayerOutcome(
                    plan.name, plan.units, f"skipped: {site.op} is not a plain relu", False, len(plan.units)
                )
            )
            continue
        if options.strategy == "leaky":
            node.target = aten.leaky_relu_.default if site.in_place else aten.leaky_relu.default
            node.args = (node.args[0], options.slope)
            action = f"aten.relu → leaky_relu({options.slope:g})"
        else:
            node.target = aten.elu_.default if site.in_place else aten.elu.default
            node.args = (node.args[0],)
            action = "aten.relu → elu"
        outcomes.append(LayerOutcome(plan.name, plan.units, action, True, len(plan.units)))
    graph_module.recompile()
    return (*_exported_runners(scanned, graph_module, temp, result), outcomes)


_TS_ACTIVATIONS = ("aten::relu", "aten::relu_", "aten::hardtanh", "aten::hardtanh_", "aten::relu6")


def _ts_activation_nodes(block, spelled) -> list:
    """Activation nodes of a TorchScript graph in program order (blocks included); a clamp or threshold
    with a ReLU's bounds is one (the scan counts it as a site; a fix skips it as not a plain relu), and so
    is a ReLU spelled with a maximum, a select or a mask after a layer (`spelled`: probe.torchscript's
    spelled_relu_reader)."""
    from deadrelu_cli.probe.aten_ops import aten_base
    from deadrelu_cli.probe.ops import CLAMP_OPS, aten_op_kind, clamp_bounds

    found = []
    for node in block.nodes():
        base = aten_base(node.kind()).rstrip("_") if node.kind().startswith("aten::") else ""
        if spelled(node) is not None:
            found.append(node)
        elif base in ("clamp", "clip", "clamp_min", "threshold"):
            constants = [v.toIValue() if v.node().kind() == "prim::Constant" else v for v in node.inputs()]
            if CLAMP_OPS.get(clamp_bounds(base, tuple(constants[1:])) or ()) is not None:
                found.append(node)
        elif node.kind() in _TS_ACTIVATIONS:
            constants = [v.toIValue() if v.node().kind() == "prim::Constant" else v for v in node.inputs()]
            if aten_op_kind(node.kind(), tuple(constants)) is not None:  # hardtanh(x, -1, 1): no site
                found.append(node)
        for inner in node.blocks():
            found.extend(_ts_activation_nodes(inner, spelled))
    return found


def _patch_torchscript(
    scanned, plans: list[LayerPlan], options: FixOptions, scan_options, temp: Path, result: FixResult
):
    """leaky/elu on a TorchScript archive: inline forward, swap the planned activation nodes, save TorchScript.

    The k-th activation node of the inlined forward is the k-th call site the scan found (the probe
    already checked that order against execution); anything else is refused."""
    module = _fresh_script(scanned, scan_options)
    graph = module.forward.graph
    nodes, sites, spelled = _script_sites(scanned, module, graph)
    wanted = {plan.name: plan for plan in plans}
    outcomes = []
    for node, site in zip(nodes, sites, strict=True):
        plan = wanted.get(site.name)
        if plan is None:
            continue
        pre = spelled(node) if site.spelled else None  # x of maximum(x, 0), where(x > 0, x, 0), x * (x > 0)
        if pre is None and site.op == "relu" and site.clamp:  # clamp(x, min=0), threshold(x, 0, 0): of x
            pre = node.inputsAt(0)
        if site.op != "relu" or (pre is None and node.kind() not in ("aten::relu", "aten::relu_")):
            what = site.op if site.op != "relu" else node.kind()  # a ReLU written as a clamp / threshold
            outcomes.append(
                LayerOutcome(
                    plan.name, plan.units, f"skipped: {what} is not a plain relu", False, len(plan.units)
                )
            )
            continue
        # an in-place relu_ gets the in-place substitute: scripted code may go on reading its input
        # (`h.relu_(); return h`), which an out-of-place op would leave un-activated
        in_place = "_" if node.kind().endswith("_") else ""  # relu_, clamp_min_, masked_fill_, mul_
        pre = node.inputsAt(0) if pre is None else pre
        with graph.insert_point_guard(node):
            if options.strategy == "leaky":
                replacement = graph.create(
                    f"aten::leaky_relu{in_place}", [pre, graph.insertConstant(options.slope)]
                )
            else:
                one = graph.insertConstant(1.0)
                replacement = graph.create(f"aten::elu{in_place}", [pre, one, one, one])
            graph.insertNode(replacement)
            replacement.output().setType(node.output().type())
        written = node.kind()
        node.output().replaceAllUsesWith(replacement.output())
        node.destroy()
        outcomes.append(
            LayerOutcome(
                plan.name,
                plan.units,
                f"{written} → {replacement.kind().split('::')[1]}",
                True,
                len(plan.units),
            )
        )
    return (*_script_runners(scanned, module, temp), outcomes)


def _script_output(output: str) -> None:
    """A TorchScript archive is fixed into a TorchScript archive: OUT must not claim another format."""
    suffix = Path(output).suffix.lower()
    if suffix not in (".ts", ".jit", ".pt", ".pth"):
        raise UserError(
            f"--output {output}: a TorchScript archive is patched into a TorchScript archive; use a .ts "
            "(or .pt) name, or fix the ONNX export for an .onnx"
        )


def _fresh_script(scanned, scan_options) -> torch.jit.ScriptModule:
    """A fresh copy of the scanned TorchScript archive, to patch (the original runner keeps its own)."""
    loaded = scanned.model
    return load_torchscript_archive(  # checked again: the archive's code runs while it loads
        loaded.path, scanned.device, scan_options.trust_pickle, loaded.sha256
    )


def _script_sites(scanned, module, graph) -> tuple[list, list, Callable]:
    """The activation nodes of a TorchScript forward `graph`, inlined in place, with the scan's sites:
    the k-th activation node is the k-th call site (the probe checked that order against execution);
    and the reader of a spelled site's x (probe.torchscript.spelled_relu_reader)."""
    from deadrelu_cli.probe.torchscript import spelled_relu_reader

    torch._C._jit_pass_inline(graph)
    torch._C._jit_pass_constant_propagation(graph)
    spelled = spelled_relu_reader(module)
    nodes = _ts_activation_nodes(graph, spelled)
    sites = scanned.probe.sites
    if len(nodes) != len(sites):
        raise UserError(
            f"{scanned.model.path}: its inlined graph has {len(nodes)} activations but the scan found "
            f"{len(sites)} call sites; patch the state_dict with --arch or the ONNX export instead"
        )
    return nodes, sites, spelled


def _script_none(module: torch.jit.ScriptModule, name: str) -> bool:
    """Whether the attribute `name` of a TorchScript module holds None (a layer built with bias=False)."""
    from deadrelu_cli.probe.base import submodule

    owner, _, leaf = name.rpartition(".")
    try:
        return getattr(submodule(module, owner) if owner else module, leaf, False) is None
    except AttributeError:
        return False


def _script_runners(scanned, module: torch.jit.ScriptModule, temp: Path):
    """Write the patched TorchScript module to `temp`; the (original, patched) runners."""
    from deadrelu_cli.backends.runners import runner_for

    write_bytes(temp, _serialized(lambda buffer: torch.jit.save(module, buffer)))
    order = match_inputs(scanned.model, scanned.data)

    def patched_runner():
        return runner_for(
            load_model(LoadOptions(str(temp), device=scanned.device)), scanned.data, scanned.device
        )

    return torch_runner(scanned.model, order, scanned.device), patched_runner


def _reweight_torchscript(
    scanned, plans: list[LayerPlan], options: FixOptions, scan_options, temp: Path, result: FixResult
):
    """reinit / kick / prune / bias-shift on a TorchScript archive: the units' tensors are the module's
    own parameters, found through the inlined forward's GetAttr chains (`script_wiring`; bias-shift:
    the producer the scan named), edited in place (prune: narrowed), saved as TorchScript."""
    from deadrelu_cli.backends.torch.program import narrow
    from deadrelu_cli.wiring.torch import script_weight_reads, script_wiring

    module = _fresh_script(scanned, scan_options)
    example = example_inputs(
        scanned.model, scanned.data, match_inputs(scanned.model, scanned.data), scanned.device
    )
    result.params_before = eager.count_params(module)
    result.flops_before = eager.linear_conv_flops(module, example)
    report = scanned.report
    if options.strategy == "bias-shift":
        outcomes = shift_and_settle(scanned, module, plans, {}, options, scan_options)
    else:
        graph = module.forward.graph.copy()  # inlined to read the wiring; the module keeps its own code
        nodes, sites, spelled = _script_sites(scanned, module, graph)
        reads = script_weight_reads(graph)
        wanted = {plan.name for plan in plans}
        need_consumer = options.strategy != "kick"
        wirings = {
            site.name: script_wiring(
                node,
                reads,
                need_consumer,
                spelled(node) if site.spelled else None,
                module,
                spelled,
                report.layer(site.name).channel_dim,
            )
            for node, site in zip(nodes, sites, strict=True)
            if site.name in wanted
        }
        wirings.update({name: "skipped: not found in the module's graph" for name in wanted - wirings.keys()})
        for wiring in wirings.values():  # a scripted Conv/Linear with bias=False reads `self.bias` (None)
            if not isinstance(wiring, str) and wiring.bias and _script_none(module, wiring.bias):
                wiring.bias = None
        if options.strategy == "prune":
            outcomes, keep_out, keep_in = eager.prune_plan(module, wirings, report, plans)
            narrow(module, keep_out, keep_in)
            result.new_widths = eager.narrowed_widths(keep_out)
        elif options.strategy == "reinit":
            drawn: dict[str, str] = {}
            outcomes = eager.reinit_units(module, wirings, plans, options, None, report, drawn)
            quiet = replace(scan_options, progress=None)
            eager.flip_silent_rows(scanned, module, plans, drawn, quiet, outcomes)
        else:
            outcomes = eager.kick_units(module, wirings, plans, options, None, report)
    result.params_after = eager.count_params(module)
    if options.strategy == "prune" and any(o.applied for o in outcomes):
        try:  # a forward that hard-codes a width (x.view(-1, 128)) fails here: said, not a traceback
            result.flops_after = eager.linear_conv_flops(module, example)
        except RuntimeError as exc:
            raise UserError(
                "--strategy prune: the narrowed TorchScript module no longer runs on the data: its code "
                "likely hard-codes a width (x.view(-1, 256)); prune the state_dict with --arch, the .pt2 "
                "or the ONNX export instead"
            ) from exc
    else:
        result.flops_after = eager.linear_conv_flops(module, example)
    return (*_script_runners(scanned, module, temp), outcomes)
