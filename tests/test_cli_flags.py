"""bundle.cli.as_flag: command-line switches arrive from ``monai.bundle run`` as strings ('false' stays a string
under fire), so they are read by word, never by Python truthiness."""

from __future__ import annotations

import pytest

from bundle.cli import as_flag
from bundle.data.io import DataError
from bundle.engine.handlers import ResumableCheckpoint
from bundle.inference.engine import NucleiSegmenter
from bundle.model.network import DSHFN


@pytest.mark.parametrize("value,expected", [(True, True), (False, False), ("true", True), ("False", False),
                                            ("false", False), (" NO ", False), ("on", True), ("0", False), (1, True),
                                            (0, False)])
def test_words_and_bools(value, expected):
    assert as_flag(value, "x") is expected


@pytest.mark.parametrize("value", ["maybe", "", "2", None])
def test_anything_else_is_one_clear_error(value):
    with pytest.raises(DataError, match=r"resume=.*give true or false"):
        as_flag(value, "resume")


def test_engine_and_checkpoint_read_switches_by_word(tmp_path):
    seg = NucleiSegmenter(DSHFN(features=4, levels=2, streams="local"), resume="false", progress="false", amp="false")
    assert (seg.resume, seg.progress, seg.amp) == (False, False, False)
    assert ResumableCheckpoint(str(tmp_path / "c.pt"), {}, resume="false").resume is False
    assert ResumableCheckpoint(str(tmp_path / "c.pt"), {}, resume="true").resume is True
