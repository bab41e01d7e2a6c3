"""Environment variables set for a block of code and restored after it, for one process's settings read by libraries."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

_UNCHANGED = object()


@contextmanager
def environment_variable(name: str, value: str | None | object = _UNCHANGED) -> Iterator[None]:
    """Set ``name`` to ``value`` (``None`` removes it; no value leaves it) for the block, then restore it.

    Whatever the block sets ``name`` to is undone too: the variable leaves as it came in.
    """
    previous = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    elif value is not _UNCHANGED:
        os.environ[name] = str(value)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous
