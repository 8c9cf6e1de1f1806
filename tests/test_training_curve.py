"""bundle.handlers.training.TrainingCurve: one CSV row per epoch with the trainer's scalars and, in validated epochs, the
validator's; a resumed run replaces the rows from its epoch on. Checked with pandas-free csv reading."""

from __future__ import annotations

import csv

from ignite.engine import Engine, Events

from bundle.handlers.training import TrainingCurve


def make_run(tmp_path, val_every: int = 2):
    validator = Engine(lambda e, b: None)
    trainer = Engine(lambda e, b: None)

    @trainer.on(Events.EPOCH_COMPLETED)
    def metrics(engine):
        engine.state.metrics["loss_total"] = 1.0 / engine.state.epoch
        engine.state.metrics["note"] = "not a number"  # non-scalar metrics are left out
        if engine.state.epoch % val_every == 0:
            # what MONAI's ValidationHandler leaves behind: the validator's epoch is the trainer's
            validator.state.epoch = engine.state.epoch
            validator.state.metrics = {"val_mean_dice": 0.1 * engine.state.epoch, "val_iou": 0.05 * engine.state.epoch}

    curve = TrainingCurve(str(tmp_path / "curve.csv"), validator=validator)
    curve.attach(trainer)
    return trainer, curve


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_one_row_per_epoch_with_validation_where_it_ran(tmp_path):
    trainer, curve = make_run(tmp_path)
    trainer.run([0, 1, 2], max_epochs=4)
    rows = read(tmp_path / "curve.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert [float(r["loss_total"]) for r in rows] == [1.0, 0.5, 1 / 3, 0.25]
    assert [r["val_mean_dice"] for r in rows] == ["", "0.2", "", "0.4"]
    assert [r["val_iou"] for r in rows] == ["", "0.1", "", "0.2"]
    assert "note" not in rows[0] and float(rows[0]["cpu_seconds"]) >= 0
    assert curve.rows() == rows


def test_resumed_run_replaces_rows_from_its_epoch(tmp_path):
    trainer, _ = make_run(tmp_path)
    trainer.run([0], max_epochs=4)
    # a second process resumes from the checkpoint of epoch 2: epochs 3.. are written again, once each
    trainer2, _ = make_run(tmp_path)

    @trainer2.on(Events.STARTED)
    def resume(engine):
        engine.state.epoch = 2
        engine.state.iteration = 2

    trainer2.run([0], max_epochs=5)
    rows = read(tmp_path / "curve.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves no temp file


def test_learning_rate_is_the_one_each_epoch_trained_with():
    """With an epoch-level scheduler stepping first (as in train.json), the logged rate is the rate the optimizer
    used during that epoch, not the next epoch's: checked against the rate seen at every iteration."""
    import torch
    from monai.handlers import LrScheduleHandler

    from bundle.handlers.training import LearningRateLogger

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=3, eta_min=0.0)
    trainer = Engine(lambda e, b: None)
    used, logged = {}, {}
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: used.setdefault(e.state.epoch, opt.param_groups[0]["lr"]))
    LrScheduleHandler(sched, print_lr=False).attach(trainer)
    LearningRateLogger(opt).attach(trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: logged.__setitem__(e.state.epoch, e.state.metrics["lr"]))
    trainer.run([0, 1], max_epochs=4)
    assert logged == used
    assert logged[1] == 1.0 and logged[4] == 1.0  # warm restart after 3 epochs
    assert 0.0 < logged[3] < logged[2] < 1.0
