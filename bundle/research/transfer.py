"""MoNuSeg cross-organ transfer (paper Figure 5): train on one organ group, test on the organs never seen.

The organ groups are the folds of the committed grouped split (``configs/splits/monuseg_5fold_seed42.json``:
0 kidney, 1 prostate, 2 breast, 3 liver, 4 bladder + colon + stomach). Row ``i`` of the transfer matrix:

* ``train``: the tiles of fold ``i`` only (one organ group);
* ``val``: fold ``(i + 1) % K`` (another organ), used only for model selection (validation Dice, early
  stopping, best checkpoint), the same "val = next fold" convention as the cross-validation protocol;
* ``test``: every tile of the other ``K - 2`` folds.

Nothing is tuned on a test column, so the test cells of the matrix are out-of-organ results; the val cell of a
row is optimistic (it chose the checkpoint) and the diagonal is the training organ itself.
"""

from __future__ import annotations

import os
from typing import Literal

from bundle.data.layout import get_datalist

__all__ = ["ROLES", "transfer_folds", "fold_role", "transfer_datalist"]

#: what a fold is for a given row: its training organ, its model-selection organ, or a held-out test organ
ROLES = ("train", "val", "test")
TransferPart = Literal["train", "val", "test", "all"]


def transfer_folds(row: int, n_folds: int = 5) -> dict[str, list[int]]:
    """Folds of row ``row``: ``{"train": [row], "val": [(row + 1) % K], "test": the other K - 2 folds}``."""
    if n_folds < 3:
        raise ValueError(f"the transfer protocol needs at least 3 folds (train, val, test), got n_folds={n_folds}")
    if not 0 <= row < n_folds:
        raise ValueError(f"row (the training fold) must be in 0..{n_folds - 1}, got {row}")
    val = (row + 1) % n_folds
    return {"train": [row], "val": [val], "test": [f for f in range(n_folds) if f not in (row, val)]}


def fold_role(row: int, fold: int, n_folds: int = 5) -> str:
    """Role (``"train"``, ``"val"`` or ``"test"``) of ``fold`` for the model of row ``row``."""
    parts = transfer_folds(row, n_folds)
    return next(role for role in ROLES if fold in parts[role])


def _part_folds(row: int, part: str, n_folds: int) -> list[int]:
    """Folds of ``part`` (a role or ``"all"``) of row ``row``."""
    parts = transfer_folds(row, n_folds)
    if part == "all":
        return list(range(n_folds))
    if part not in parts:
        raise ValueError(f"part must be one of {[*ROLES, 'all']}, got {part!r}")
    return parts[part]


def transfer_datalist(
    dataset_dir: str | os.PathLike,
    row: int,
    part: TransferPart = "train",
    split_file: str | os.PathLike | None = None,
    n_folds: int = 5,
    seed: int = 42,
) -> list[dict[str, str]]:
    """MONAI datalist of ``part`` of row ``row`` (see the module docstring), in fold order.

    Built from :func:`bundle.data.layout.get_datalist` (the tiles of fold ``f`` are its ``test`` part), so the same
    split file, dataset validation and error messages apply. For configs::

        {"_target_": "bundle.research.transfer.transfer_datalist", "dataset_dir": "@dataset_root", "row": "@fold",
         "part": "train", "split_file": "@split_file"}
    """
    folds = _part_folds(row, part, n_folds)
    return [item for f in folds for item in get_datalist(dataset_dir, f, "test", split_file, n_folds, seed)]
