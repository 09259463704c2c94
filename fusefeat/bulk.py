"""Building millions of small objects at once (a corpus listing, a resume index).

CPython's cyclic garbage collector runs every few hundred allocations of container objects
(tuples, lists, dicts) and, now and then, walks every object alive: while a listing of a
million files is built, that doubles its time. The objects built here are strings and tuples
that form no cycles, so the collector has nothing to find in them: it is paused meanwhile.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager


@contextmanager
def gc_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
