"""Puts the bundle root on ``sys.path`` so that ``python scripts/<tool>.py`` imports the ``bundle`` package without an
install. Python puts this folder on the path when it runs a script from it; each tool imports this module first."""

import sys
from pathlib import Path

#: the bundle root (the folder holding configs/ and bundle/)
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
