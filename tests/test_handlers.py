"""Training handlers: gradient clipping, model selection, early stopping, atomic resumable checkpoints.

Exercised on a tiny MONAI SupervisedTrainer/SupervisedEvaluator pair with a scripted validation metric, so
each expectation (which epoch is saved, when training stops, where a resumed run continues) is known.
"""

from __future__ import annotations

import os

import pytest
import torch
from ignite.engine import Events
from ignite.metrics import Metric
from ignite.metrics.metric import EpochWise
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import ValidationHandler

from bundle.core.errors import DataError
from bundle.core.files import atomic_torch_save
from bundle.handlers.checkpoints import BestModelSaver, ResumableCheckpoint
from bundle.handlers.training import EarlyStopping, GradientClipHandler


class ScriptedMetric(Metric):
    """Key-metric stand-in: its value at validator epoch e is ``scores[e - 1]``."""

    def __init__(self, scores):
        self.scores = scores
        self._engine = None
        super().__init__()

    def attach(self, engine, name, usage=EpochWise()):
        self._engine = engine
        super().attach(engine, name, usage)

    def reset(self):
        pass

    def update(self, output):
        pass

    def compute(self):
        return self.scores[self._engine.state.epoch - 1]


def _data(n=4):
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(2, 3, generator=g), "label": torch.randn(2, 1, generator=g)} for _ in range(n)]


def _engines(tmp_path, scores, max_epochs, resume=False, patience=100, lr=0.1):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    validator = SupervisedEvaluator(
        device="cpu", val_data_loader=_data(2), network=net, key_val_metric={"val_mean_dice": ScriptedMetric(scores)}
    )
    BestModelSaver(net, str(tmp_path / "model.pt")).attach(validator)
    trainer = SupervisedTrainer(
        device="cpu", max_epochs=max_epochs, train_data_loader=_data(4), network=net, optimizer=opt,
        loss_function=torch.nn.MSELoss(),
    )
    ValidationHandler(validator=validator, interval=1, epoch_level=True).attach(trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: sched.step())
    ResumableCheckpoint(
        str(tmp_path / "checkpoint.pt"), {"network": net, "optimizer": opt, "lr_scheduler": sched},
        validator=validator, resume=resume,
    ).attach(trainer)
    EarlyStopping(validator, patience=patience).attach(trainer)
    return trainer, validator, net, opt, sched


def test_atomic_save_leaves_no_temp_and_replaces(tmp_path):
    path = tmp_path / "sub" / "x.pt"
    atomic_torch_save({"a": 1}, str(path))
    atomic_torch_save({"a": 2}, str(path))
    assert torch.load(path)["a"] == 2
    assert os.listdir(path.parent) == ["x.pt"]
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # readable like any other output


def test_atomic_save_failure_keeps_previous_file(tmp_path):
    path = tmp_path / "x.pt"
    atomic_torch_save({"a": 1}, str(path))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_torch_save({"a": Unpicklable()}, str(path))
    assert torch.load(path)["a"] == 1
    assert os.listdir(tmp_path) == ["x.pt"]


def test_gradient_clip_bounds_global_norm():
    torch.manual_seed(0)
    net = torch.nn.Linear(16, 1)
    data = [{"image": torch.randn(8, 16) * 100, "label": torch.randn(8, 1) * 100}]
    norms = []
    trainer = SupervisedTrainer(
        device="cpu", max_epochs=1, train_data_loader=data, network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.0), loss_function=torch.nn.MSELoss(),
    )
    GradientClipHandler(max_norm=0.5).attach(trainer)
    from monai.engines.utils import IterationEvents

    @trainer.on(IterationEvents.BACKWARD_COMPLETED)
    def _record(engine):  # registered after the clip handler, so sees clipped gradients
        norms.append(torch.norm(torch.stack([p.grad.norm() for p in net.parameters()])).item())

    trainer.run()
    assert norms and norms[0] == pytest.approx(0.5, rel=1e-4)


def test_best_model_saved_at_best_epoch_and_early_stop(tmp_path):
    scores = [0.2, 0.5, 0.4, 0.45, 0.3, 0.1, 0.6]
    trainer, validator, net, *_ = _engines(tmp_path, scores, max_epochs=7, patience=3)
    trainer.run()
    # best 0.5 at epoch 2; epochs 3, 4, 5 do not improve -> stop at epoch 5 (2 + patience)
    assert trainer.state.epoch == 5
    assert validator.state.best_metric == pytest.approx(0.5)
    assert validator.state.best_metric_epoch == 2
    sd = torch.load(tmp_path / "model.pt")
    assert set(sd) == {"weight", "bias"}  # plain state_dict


def test_resume_continues_from_saved_epoch_with_same_state(tmp_path):
    scores = [0.1, 0.2, 0.3, 0.25, 0.24, 0.23]
    # reference: 4 epochs straight
    ref_dir = tmp_path / "ref"
    trainer, _, net_ref, _, sched_ref = _engines(ref_dir, scores, max_epochs=4)
    trainer.run()
    ref_w = net_ref.weight.detach().clone()

    # interrupted after 2 epochs, then resumed to 4 in a fresh process-like setup
    run_dir = tmp_path / "run"
    trainer, _, _, _, _ = _engines(run_dir, scores, max_epochs=2)
    trainer.run()
    started = []
    trainer, validator, net, opt, sched = _engines(run_dir, scores, max_epochs=4, resume=True)
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: started.append(e.state.epoch))
    trainer.run()
    assert started == [3, 4]  # continued, did not restart at 1
    assert validator.state.best_metric == pytest.approx(0.3) and validator.state.best_metric_epoch == 3
    assert sched.last_epoch == sched_ref.last_epoch == 4
    torch.testing.assert_close(net.weight, ref_w)  # identical to the uninterrupted run
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["trainer"]["iteration"] == 4 * 4  # 4 epochs x 4 batches
    assert {"network", "optimizer", "lr_scheduler", "validator_best", "trainer"} <= set(ckpt)


def test_resume_with_corrupt_checkpoint_names_file(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    trainer, *_ = _engines(tmp_path, [0.1, 0.2], max_epochs=2, resume=True)
    with pytest.raises(DataError, match=r"checkpoint\.pt: cannot read the checkpoint.*--resume false"):
        trainer.run()
