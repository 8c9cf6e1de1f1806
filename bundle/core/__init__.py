"""The base layer every other part of the bundle stands on; it imports nothing of the bundle.

:mod:`~bundle.core.errors` (the one-line :class:`DataError`), :mod:`~bundle.core.files` (atomic writes),
:mod:`~bundle.core.cli` (front ends' error hook and on/off switches) and :mod:`~bundle.core.distributed`
(device, rank and the process group's start and stop, for every front end)."""
