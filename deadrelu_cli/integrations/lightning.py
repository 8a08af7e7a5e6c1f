"""A Lightning `Callback` that watches the model for dead units while it trains.

    from deadrelu_cli.integrations.lightning import DeadReluCallback
    trainer = L.Trainer(callbacks=[DeadReluCallback(every=100, max_dead_layer=0.5)])

Per window (`window` sampled steps, one every `every` optimizer steps) it logs the per-layer dead
fractions to every logger of the trainer (TensorBoard, CSV, W&B, …), writes the window's JSON report next
to the checkpoints (`<checkpoint dir>/deadrelu/deadrelu-step<N>.json`, what `deadrelu trend` reads), warns
once per layer over its limit, and with `stop_on_gate=True` stops training. Settings come from
[tool.deadrelu] as for the CLI, then the arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the older package name
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as exc:
        raise ImportError(
            "deadrelu_cli.integrations.lightning needs Lightning: pip install 'deadrelu[lightning]'"
        ) from exc

from deadrelu_cli.report.model import Report
from deadrelu_cli.watcher import Watch, layer_metrics


class DeadReluCallback(Callback):
    """Dead/dying/dormant units per window of training steps (see `deadrelu_cli.watcher.Watch`).

    `submodule`: watch `pl_module.<submodule>` (e.g. "model") so that layer names match a scan of the
    saved weights; default: the LightningModule itself. `out_dir`: where the reports go (default: the
    ModelCheckpoint's folder, else the trainer's root dir, + "/deadrelu"). `prefix`: of the metric names.
    `position_mask`: a function of the batch giving the token positions to count ([batch, tokens], e.g.
    `lambda batch: batch["attention_mask"]`); default: every position.
    """

    def __init__(
        self,
        every: int = 100,
        window: int = 1,
        *,
        submodule: str | None = None,
        out_dir: str | Path | None = None,
        stop_on_gate: bool = False,
        config: str | bool | None = None,
        prefix: str = "deadrelu/",
        position_mask: Callable[[Any], Any] | None = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        self.position_mask = position_mask
        self.every, self.window = every, window
        self.submodule = submodule
        self.out_dir = out_dir
        self.stop_on_gate = stop_on_gate
        self.config = config
        self.prefix = prefix
        self.settings = settings
        self.watch: Watch | None = None
        self._trainer = None

    def _report_dir(self, trainer) -> Path:
        if self.out_dir is not None:
            return Path(self.out_dir)
        checkpoint = getattr(trainer, "checkpoint_callback", None)
        folder = getattr(checkpoint, "dirpath", None) or trainer.default_root_dir
        return Path(folder) / "deadrelu"

    def on_train_start(self, trainer, pl_module) -> None:
        module = pl_module.get_submodule(self.submodule) if self.submodule else pl_module
        self._trainer = trainer
        self.watch = Watch(
            module,
            self.every,
            self.window,
            out_dir=self._report_dir(trainer) if trainer.is_global_zero else None,
            on_report=self._on_report,
            stop_on_gate=self.stop_on_gate,
            config=self.config,
            name=f"<{type(pl_module).__name__}{'.' + self.submodule if self.submodule else ''}>",
            keep_reports=1,
            **self.settings,
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.watch.epoch = trainer.current_epoch
        sampled = self.watch.step(trainer.global_step)
        if sampled and self.position_mask is not None:
            self.watch.set_position_mask(self.position_mask(batch))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.watch.current_step:  # the optimizer stepped: the step is over, and
            self.watch.end_step()  # a window closes now (logged, and a gate stops, after this very batch)
        else:  # a micro-batch of gradient accumulation: the next batch continues this step
            self.watch.pause()  # (validation forwards in between are not counted)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if (
            self.watch is not None
        ):  # a window ends at each checkpoint: a resumed run keeps the steps before it
            self.watch.checkpoint()

    def on_train_end(self, trainer, pl_module) -> None:
        if self.watch is not None:
            self.watch.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        # fit() failed (or was interrupted): on_train_end never comes, and the probe must not stay on
        # the model (and on every module of the process, through its global hooks)
        if self.watch is not None:
            self.watch.abort()

    def _on_report(self, report: Report) -> None:
        trainer = self._trainer
        metrics = layer_metrics(report, self.prefix)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=report.training.step)
        if self.watch.should_stop:
            trainer.should_stop = True
