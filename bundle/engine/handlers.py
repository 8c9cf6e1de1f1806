"""Ignite handlers the training config wires in: gradient clipping, model selection, early stopping, resumable
atomic checkpoints, a CPU-time budget, the per-epoch training curve, the loss terms and TensorBoard contours.

MONAI's ``CheckpointSaver`` writes with ``atomic=False`` and ``EarlyStopHandler`` keeps no resumable
state, and both would need the trainer inside the trainer's own handler list (a reference cycle in the
config); these small handlers get the trainer from ``attach(engine)`` instead.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.engines.utils import IterationEvents

from bundle.cli import as_flag
from bundle.data.io import DataError, atomic_write, checkpoint_problem, load_weights
from bundle.distributed import is_rank0
from bundle.model.losses import DSHFNLoss
from bundle.nuclei.overlays import contour_overlay

logger = logging.getLogger("bundle.engine.handlers")


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file in the target folder, then rename: a crash never leaves half a file."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


#: ignite's start line for an engine whose state MONAI set up before ``run()``: every fresh run "resumes from
#: iteration 0"
_FRESH_START = re.compile(r"^Engine run resuming from iteration 0, epoch (\d+) until (\d+) epochs$")


class _FreshStartFilter(logging.Filter):
    """Say "starting" where ignite says "resuming from iteration 0" (a real resume is logged by
    :class:`ResumableCheckpoint` with the epoch it continues from)."""

    def filter(self, record: logging.LogRecord) -> bool:
        m = _FRESH_START.match(record.getMessage())
        if m:
            epoch, max_epochs = int(m.group(1)), int(m.group(2))
            record.msg = (f"Engine run starting with max_epochs={max_epochs}" if epoch == 0
                          else f"Engine run starting at epoch {epoch + 1}")
            record.args = ()
        return True


def log_fresh_start(engine: Engine | None) -> None:
    """Install :class:`_FreshStartFilter` on ``engine``'s logger (once)."""
    log = getattr(engine, "logger", None)
    if log is not None and not any(isinstance(f, _FreshStartFilter) for f in log.filters):
        log.addFilter(_FreshStartFilter())


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


class BestModelSaver:
    """Save ``network.state_dict()`` (plain, atomically) whenever the evaluator's key metric reaches a new best.

    Attach to the evaluator. MONAI's ``Workflow`` tracks ``state.best_metric``/``best_metric_epoch`` for the
    key metric before other ``EPOCH_COMPLETED`` handlers run; this handler saves when the best is this
    epoch's. :class:`ResumableCheckpoint` stores that best, so a resumed run keeps comparing against it.
    """

    def __init__(self, network: torch.nn.Module, save_path: str) -> None:
        self.network = network
        self.save_path = save_path

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.best_metric_epoch != engine.state.epoch:
            return
        net = self.network.module if hasattr(self.network, "module") else self.network  # unwrap DDP
        atomic_torch_save(net.state_dict(), self.save_path)
        logger.info(f"epoch {engine.state.epoch}: new best key metric {engine.state.best_metric:.4f}, saved {self.save_path}")


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


class _ValidatorBest:
    """``state_dict`` view of a MONAI evaluator's best key metric (ignite's own state_dict omits it)."""

    def __init__(self, validator: Engine) -> None:
        self.validator = validator

    def state_dict(self) -> dict:
        return {"best_metric": float(self.validator.state.best_metric), "best_metric_epoch": int(self.validator.state.best_metric_epoch)}

    def load_state_dict(self, state: dict) -> None:
        self.validator.state.best_metric = state["best_metric"]
        self.validator.state.best_metric_epoch = state["best_metric_epoch"]


class ResumableCheckpoint:
    """Write everything a killed run needs to continue to one file every epoch, and reload it on start.

    The file holds the trainer state (epoch, iteration), the AMP grad scaler when there is one, the
    ``validator``'s best key metric and its epoch (what early stopping and model selection read), and every
    object of ``save_dict`` (network, optimizer, lr scheduler...). It is
    written atomically at ``EPOCH_COMPLETED`` (register it after validation and model selection so their
    state is current). With ``resume=True`` and an existing file, ``STARTED`` restores it and training
    continues from the saved epoch; ``resume=False`` starts fresh (and overwrites the file).
    """

    def __init__(
        self,
        save_path: str,
        save_dict: dict[str, Any],
        validator: Engine | None = None,
        resume: bool = False,
        map_location: str | None = "cpu",
    ) -> None:
        self.save_path = save_path
        self.save_dict = dict(save_dict)
        if validator is not None:
            self.save_dict["validator_best"] = _ValidatorBest(validator)
        self.resume = as_flag(resume, "--resume")
        self.map_location = map_location
        self.validator = validator

    def _objects(self, engine: Engine) -> dict[str, Any]:
        objs = {"trainer": engine, **self.save_dict}
        scaler = getattr(engine, "scaler", None)
        if scaler is not None:
            objs["scaler"] = scaler
        for k, v in objs.items():
            if hasattr(v, "module") and isinstance(v, torch.nn.Module):
                objs[k] = v.module  # DDP: store plain weights
        return objs

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        log_fresh_start(engine)
        log_fresh_start(self.validator)

    def save(self, engine: Engine) -> None:
        # every rank loads (so all resume together) but only rank 0 writes
        if not is_rank0():
            return
        atomic_torch_save({k: v.state_dict() for k, v in self._objects(engine).items()}, self.save_path)

    def load(self, engine: Engine) -> None:
        if not self.resume:
            return
        if not os.path.isfile(self.save_path):
            logger.warning(f"resume requested but {self.save_path} does not exist: starting from epoch 0")
            return
        try:
            # weights_only: tensors and plain containers/numbers only (what save() writes), so a planted file cannot
            # run code on load
            ckpt = torch.load(self.save_path, map_location=self.map_location, weights_only=True)
        except Exception as e:  # an empty, truncated, foreign or planted file: say which and what to do
            raise DataError(f"{self.save_path}: cannot read the checkpoint to resume from "
                            f"({checkpoint_problem(self.save_path, e)}). Delete it, or give --resume false to "
                            "start afresh (it is overwritten)") from None
        if not isinstance(ckpt, dict) or "trainer" not in ckpt:  # e.g. a model.pt given as the checkpoint
            raise DataError(f"{self.save_path}: is not a resumable training checkpoint (no trainer state; "
                            "model.pt holds weights only). Delete it, or give --resume false to start afresh")
        objs = {k: v for k, v in self._objects(engine).items() if k in ckpt}
        max_epochs = engine.state.max_epochs
        try:
            Checkpoint.load_objects(to_load=objs, checkpoint=ckpt)
        except (RuntimeError, KeyError, ValueError, TypeError) as e:  # another network, optimiser or schedule
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(f"{self.save_path}: does not fit this training's network or optimiser "
                            f"({detail if len(detail) <= 160 else type(e).__name__}). Resume with the config it was "
                            "written by, or give --resume false to start afresh") from None
        if max_epochs is not None and engine.state.epoch > max_epochs:
            raise DataError(f"{self.save_path} is at epoch {engine.state.epoch}, beyond max_epochs={max_epochs}: "
                            "give --max_epochs above it to continue")
        engine.state.max_epochs = max_epochs
        logger.info(f"resumed from {self.save_path} at epoch {engine.state.epoch}")


class WeightsLoader:
    """Load the network's weights when the engine starts, through :func:`bundle.data.io.load_weights` (weights
    only): a missing, empty, truncated, foreign or planted file stops with one line naming ``option``, where
    MONAI's ``CheckpointLoader`` ends a long traceback with torch's advice to load with ``weights_only=False``.

    Accepts a plain state dict or ``{"model": state_dict}`` (what training writes), into a DDP-wrapped network too.
    """

    def __init__(self, load_path: str | None, network: torch.nn.Module, map_location: Any = "cpu",
                 option: str = "--ckpt_path") -> None:
        self.load_path, self.network, self.map_location, self.option = load_path, network, map_location, option

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)
        log_fresh_start(engine)

    def __call__(self, engine: Engine) -> None:
        net = self.network.module if isinstance(self.network, torch.nn.parallel.DistributedDataParallel) else self.network
        load_weights(net, self.load_path, self.map_location, option=self.option)
        logger.info(f"weights loaded from {self.load_path}")


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

    Config: ``{"_target_": "bundle.engine.handlers.LossTermsHandler", "loss": "@loss"}`` in ``train_handlers``.
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
