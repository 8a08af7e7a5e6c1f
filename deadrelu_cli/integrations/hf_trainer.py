"""A Hugging Face `TrainerCallback` that watches the model for dead units while it trains.

    from deadrelu_cli.integrations.hf_trainer import DeadReluCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    DeadReluCallback(every=100, max_dead_layer=0.5).attach(trainer)

Per window (`window` sampled steps, one every `every` optimizer steps) it logs the per-layer dead
fractions through `trainer.log` (so every reporting integration — TensorBoard, W&B, … — and
`trainer.state.log_history` get them), writes the window's JSON report next to the checkpoints
(`<output_dir>/deadrelu/deadrelu-step<N>.json`, what `deadrelu trend` reads), warns once per layer over
its limit, and with `stop_on_gate=True` stops training. Added with `Trainer(callbacks=[cb])` instead of
`attach`, the metrics go into the `logs` of the Trainer's next log event: `log_history` and the callbacks
after this one get them, the reporting integrations that the Trainer added before it do not. Settings come from [tool.deadrelu] as for the CLI, then the arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as exc:
    raise ImportError(
        "deadrelu_cli.integrations.hf_trainer needs transformers: pip install 'deadrelu[transformers]'"
    ) from exc

from deadrelu_cli.report.model import Report
from deadrelu_cli.watcher import Watch, layer_metrics


class DeadReluCallback(TrainerCallback):
    """Dead/dying/dormant units per window of training steps (see `deadrelu_cli.watcher.Watch`)."""

    def __init__(
        self,
        every: int = 100,
        window: int = 1,
        *,
        out_dir: str | Path | None = None,
        stop_on_gate: bool = False,
        config: str | bool | None = None,
        prefix: str = "deadrelu/",
        **settings: Any,
    ) -> None:
        self.every, self.window = every, window
        self.out_dir = out_dir
        self.stop_on_gate = stop_on_gate
        self.config = config
        self.prefix = prefix
        self.settings = settings
        self.watch: Watch | None = None
        self.trainer = None
        self._pending: dict[str, float] = {}
        self._pending_step: int | None = None  # the step of the window whose metrics are pending

    def attach(self, trainer) -> DeadReluCallback:
        """Add this callback to `trainer`, logging through `trainer.log` (what all its loggers read)."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.watch is not None:  # an earlier train() that failed (the Trainer tells no callback): its
            self.watch.pause()  # probe comes off before a new one goes on
        folder = Path(self.out_dir) if self.out_dir is not None else Path(args.output_dir) / "deadrelu"
        self.watch = Watch(
            model,
            self.every,
            self.window,
            out_dir=folder if state.is_world_process_zero else None,
            on_report=self._on_report,
            stop_on_gate=self.stop_on_gate,
            config=self.config,
            name=f"<{type(model).__name__}>",
            keep_reports=1,
            **self.settings,
        )

    def on_step_begin(self, args, state, control, **kwargs):
        self.watch.epoch = int(state.epoch or 0)
        self.watch.step(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.watch.end_step()  # the optimizer has stepped: evaluation forwards after it are not counted
        return self._flush(control)

    def on_save(self, args, state, control, **kwargs):
        if (
            self.watch is not None
        ):  # a window ends at each checkpoint: a resumed run keeps the steps before it
            self.watch.checkpoint()

    def on_train_end(self, args, state, control, **kwargs):
        if self.watch is not None:
            self.watch.close()
        return self._flush(control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending and logs is not None:  # not attached: ride along with the Trainer's own log
            logs.update(self._pending)
            if state.log_history:  # the entry Trainer.log just appended (a copy of `logs`)
                state.log_history[-1].update(self._pending)
            self._pending.clear()

    def _on_report(self, report: Report) -> None:
        self._pending.update(layer_metrics(report, self.prefix))
        self._pending_step = report.training.step
        if self.trainer is None:  # riding along with a later log event of the Trainer: say whose step
            self._pending[f"{self.prefix}step"] = float(report.training.step)

    def _flush(self, control):
        if self._pending and self.trainer is not None:
            metrics, self._pending = self._pending, {}
            # Trainer.log clears control.should_log (CallbackHandler.on_log): the Trainer's own log of
            # this step (its loss, learning rate, grad norm), decided before us, would be lost
            should_log = control.should_log
            # logged at the window's step (the weights after that many optimizer steps, as checkpoint-N
            # and the evaluation at step N): the step has ended, so state.global_step is one more, and
            # Trainer.log and every reporting integration read state.global_step
            state = self.trainer.state
            now, state.global_step = state.global_step, self._pending_step
            try:
                self.trainer.log(metrics)
            finally:
                state.global_step = now
            control.should_log = self.trainer.control.should_log = should_log
        elif self._pending:
            control.should_log = True  # so that the metrics reach a log event soon
        if self.watch is not None and self.watch.should_stop:
            control.should_training_stop = True
        return control
