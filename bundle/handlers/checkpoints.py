"""Ignite handlers that save and load weights: the best model, a resumable checkpoint written atomically every
epoch, and the weights an evaluation starts from.

MONAI's ``CheckpointSaver`` writes with ``atomic=False`` and its ``CheckpointLoader`` ends a long traceback with
torch's advice to load with ``weights_only=False``; these write through :func:`bundle.core.files.atomic_write`
and load weights only, with one-line errors.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint

from bundle.core.cli import as_flag
from bundle.core.distributed import is_rank0
from bundle.core.errors import DataError
from bundle.core.files import atomic_torch_save
from bundle.model.weights import checkpoint_problem, load_weights

logger = logging.getLogger(__name__)

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
    """Load the network's weights when the engine starts, through :func:`bundle.model.weights.load_weights` (weights
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

