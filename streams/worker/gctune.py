"""The garbage collector's settings in the worker's processes (docs/architecture.md, "Speed").

CPython collects its youngest generation every 700 net allocations of container objects. The
pipeline builds a few dozen per event (validated models, the events of a closing session, pair
and row dicts), nearly all freed by reference counting as soon as they are used, so the default
runs a collection every few dozen events and walks whatever survives (the open sessions' state,
Faust's buffers) again at each older-generation pass. Fewer, larger collections and start-up's
objects left out of them (``gc.freeze``) cost the same memory within a few MB and measured
11% less CPU per event in ``benchmarks/bench_handle.py``.
"""

from __future__ import annotations

import gc

#: allocations between two young collections, and young (then middle) collections between two
#: collections of the next generation
THRESHOLDS = (50_000, 50, 100)


def tune_gc() -> None:
    """Leave everything built so far (modules, the app, settings) out of every later
    collection, and collect less often."""
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
