"""The one error the bundle's front ends print as a single line (:mod:`bundle.core.cli`)."""

from __future__ import annotations


class DataError(ValueError):
    """A dataset file is missing, unreadable or has the wrong content; the message names the file and the fix."""
