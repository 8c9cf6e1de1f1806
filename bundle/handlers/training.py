"""Ignite handlers the training config wires in around the loop: gradient clipping, early stopping, the learning
rate, a CPU-time budget, the per-epoch training curve, the loss terms and TensorBoard contours.

MONAI's ``EarlyStopHandler`` keeps no resumable state and would need the trainer inside the trainer's own handler
list (a reference cycle in the config); these small handlers get the trainer from ``attach(engine)`` instead.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

from bundle.core.files import atomic_write
from bundle.model.losses import DSHFNLoss
from bundle.nuclei.overlays import contour_overlay

logger = logging.getLogger(__name__)


class GradientClipHandler:
    """Clip the global gradient norm between ``backward()`` and ``optimizer.step()`` (paper Table 2: 5.0).

    Hooks MONAI's ``IterationEvents.BACKWARD_COMPLETED``; under AMP the gradients are unscaled first so the
    threshold applies to true gradient norms.
    """

    def __init__(self, max_norm: float = 5.0, norm_type: float = 2.0) -> None:
        self.max_norm = max_norm
        self.norm_type = norm_type

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None:
            scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm, self.norm_type)


class EarlyStopping:
    """Stop training when the evaluator's key metric has not improved for ``patience`` epochs (paper: 15).

    Attach to the trainer after the ``ValidationHandler``. Stateless: it reads the evaluator's
    ``best_metric_epoch``, which :class:`ResumableCheckpoint` saves and restores.
    """

    def __init__(self, validator: Engine, patience: int = 15) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.validator = validator
        self.patience = patience

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        best_epoch = getattr(self.validator.state, "best_metric_epoch", -1)
        if best_epoch < 0:  # no validation yet
            return
        if engine.state.epoch - best_epoch >= self.patience:
            logger.info(f"early stopping at epoch {engine.state.epoch}: best key metric was at epoch {best_epoch}")
            engine.terminate()


class LearningRateLogger:
    """Put the learning rate an epoch trained with into ``engine.state.metrics["lr"]`` at its end, where MONAI's
    ``StatsHandler``/``TensorBoardStatsHandler`` (registered after this) log it with the other scalars.

    The rate is read when the epoch starts: an epoch-level ``LrScheduleHandler`` has already stepped to the next
    epoch's rate by the time the epoch-completed handlers run.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, name: str = "lr") -> None:
        self.optimizer = optimizer
        self.name = name
        self._lr = float("nan")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._read)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _read(self, engine: Engine) -> None:
        self._lr = float(self.optimizer.param_groups[0]["lr"])

    def __call__(self, engine: Engine) -> None:
        engine.state.metrics[self.name] = self._lr


class TrainingBudget:
    """Stop training at the end of the first epoch after ``minutes`` of this process's CPU time
    (``time.process_time``), so runs compared under one budget get the same compute whatever else the machine runs.

    Written because ignite's ``TimeLimit`` counts wall-clock seconds, which a second job on the same cores stretches.
    With several threads the CPU time grows faster than the wall clock: compare runs at the same thread count.
    The budget counts from the first epoch of this process (a resumed run gets a new budget).
    """

    def __init__(self, minutes: float) -> None:
        if not minutes > 0:
            raise ValueError(f"TrainingBudget: minutes must be > 0, got {minutes}")
        self.seconds = 60.0 * float(minutes)
        self.start: float | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def started(self, engine: Engine) -> None:
        if self.start is None:
            self.start = time.process_time()

    def used(self) -> float:
        """CPU seconds used since the first epoch started (0 before)."""
        return 0.0 if self.start is None else time.process_time() - self.start

    def __call__(self, engine: Engine) -> None:
        if self.used() >= self.seconds:
            logger.info(f"training budget of {self.seconds / 60:.1f} CPU minutes used up after epoch {engine.state.epoch}")
            engine.terminate()


class TrainingCurve:
    """Append one row per epoch to a CSV file: epoch, the epoch's process CPU seconds, the trainer's scalar metrics
    (epoch-mean loss terms, learning rate) and, in epochs where it ran, the validator's metrics.

    The file is rewritten atomically each epoch and rows of epochs at or after the current one are dropped first,
    so a run resumed from an earlier checkpoint (or on another machine with the CSV copied back) keeps one row per
    epoch. Written because MONAI's ``MetricsSaver`` stores final metrics only and TensorBoard event files are not
    a table a user can open in pandas. Register it last in ``train_handlers``.
    """

    def __init__(self, path: str, validator: Engine | None = None) -> None:
        self.path = path
        self.validator = validator
        self._start = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def started(self, engine: Engine) -> None:
        self._start = time.process_time()

    def rows(self) -> list[dict[str, str]]:
        """The rows written so far ([] when there is no file)."""
        import csv

        if not os.path.exists(self.path):
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def __call__(self, engine: Engine) -> None:
        import csv
        import io

        epoch = engine.state.epoch
        row: dict[str, Any] = {"epoch": epoch, "cpu_seconds": round(time.process_time() - self._start, 1)}
        row.update({k: v for k, v in engine.state.metrics.items() if isinstance(v, (int, float))})
        validator = self.validator
        if validator is not None and getattr(validator.state, "epoch", None) == epoch:
            row.update({f"val_{k}" if not k.startswith("val_") else k: v
                        for k, v in validator.state.metrics.items() if isinstance(v, (int, float))})
        rows = [r for r in self.rows() if int(r["epoch"]) < epoch] + [row]
        fields: list[str] = []
        for r in rows:
            fields += [k for k in r if k not in fields]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                f.write(buf.getvalue())

        atomic_write(self.path, write)


class LossTermsHandler:
    """Ignite handler: after every iteration, copy a loss's ``last_terms`` into the engine state for logging.

    The values go to ``engine.state.metrics["<prefix><term>"]`` (read by MONAI's ``StatsHandler`` /
    ``TensorBoardStatsHandler`` at epoch end: the last iteration's values) and, when ``engine.state.output`` is
    a dict (MONAI's ``SupervisedTrainer``; a list of dicts is handled item by item), into it under the same keys
    (for per-iteration ``output_transform``s). With ``epoch_mean=True`` the metrics hold the running mean over the
    current epoch instead of the last value. One host sync per iteration (all terms in one transfer).

    Config: ``{"_target_": "bundle.handlers.training.LossTermsHandler", "loss": "@loss"}`` in ``train_handlers``.
    """

    def __init__(self, loss: DSHFNLoss, prefix: str = "loss_", epoch_mean: bool = True) -> None:
        self.loss = loss
        self.prefix = prefix
        self.epoch_mean = epoch_mean
        self._sums: dict[str, float] = {}
        self._count = 0

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _reset(self, engine=None) -> None:
        self._sums, self._count = {}, 0

    def __call__(self, engine) -> None:
        terms = self.loss.last_terms
        if not terms:
            return
        names = list(terms)
        values = torch.stack([terms[k].float() for k in names]).tolist()
        current = {self.prefix + k: v for k, v in zip(names, values)}
        self._count += 1
        for k, v in current.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        shown = {k: self._sums[k] / self._count for k in current} if self.epoch_mean else current
        engine.state.metrics.update(shown)
        output = engine.state.output
        for item in output if isinstance(output, list) else [output]:
            if isinstance(item, dict):
                item.update(current)


class TensorBoardContourHandler:
    """Log contour overlays of the first ``max_images`` validation samples to TensorBoard once per validation.

    Reads ``engine.state.output`` (MONAI's decollated list of dicts) after the evaluator's first iteration;
    ``pred`` and ``label`` must already be binary single-channel masks (the evaluator's postprocessing).
    """

    def __init__(self, log_dir: str, max_images: int = 4, tag: str = "val/contours", image_key: str = "image") -> None:
        self.log_dir = log_dir
        self.max_images = max_images
        self.tag = tag
        self.image_key = image_key
        self._writer = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.iteration != 1:  # MONAI's Evaluator.run restarts the count: first batch of each validation only
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for i, item in enumerate(outputs[: self.max_images]):
            panel = contour_overlay(item[self.image_key], item.get("pred"), item.get("label"))
            self._writer.add_image(f"{self.tag}/{i}", panel, global_step=engine.state.epoch, dataformats="HWC")
        self._writer.flush()
